//! Every `.wgsl` file in `shaders/wgsl/` is registered in `KERNELS`, and every registered kernel
//! parses and validates with naga once its template values are filled in.

use std::collections::BTreeSet;
use std::path::Path;

use portaflow_shaders::KERNELS;

#[test]
fn every_wgsl_file_is_registered() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("wgsl");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".wgsl"))
        .collect();
    let registered: BTreeSet<String> = KERNELS.iter().map(|k| k.file.to_string()).collect();
    assert_eq!(
        on_disk,
        registered,
        "files in {} vs portaflow_shaders::KERNELS",
        dir.display()
    );
    for kernel in KERNELS {
        let text = std::fs::read_to_string(dir.join(kernel.file)).unwrap();
        assert_eq!(
            text, kernel.source,
            "{} is stale in the binary",
            kernel.file
        );
    }
}

#[test]
fn every_kernel_validates_with_naga() {
    assert!(!KERNELS.is_empty());
    for kernel in KERNELS {
        let source = (kernel.example)();
        assert!(
            !source.contains("{{"),
            "{}: unfilled template value",
            kernel.file
        );
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("{}: {}", kernel.file, e.emit_to_string(&source)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::default(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {}", kernel.file, e.emit_to_string(&source)));
    }
}

#[test]
fn a_broken_kernel_is_rejected() {
    // The validator must be able to fail: an undeclared identifier is an error.
    let source = "@compute @workgroup_size(1) fn main() { let a = b; }";
    assert!(naga::front::wgsl::parse_str(source).is_err());
}
