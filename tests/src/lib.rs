//! Shared helpers for the workspace integration tests in `tests/tests/`.

use std::path::{Path, PathBuf};

use portaflow::device::{self, ChosenDevice, DeviceRequest};

/// The Vulkan device GPU-path tests run on.
///
/// Never falls back to the CPU: a GPU test that silently ran on Flex would prove nothing. Under
/// `CI=true` the adapter must be the software one (Mesa lavapipe / llvmpipe), which is what CI
/// machines have; a developer's hardware GPU is fine elsewhere.
pub fn vulkan() -> ChosenDevice {
    let chosen = device::select(DeviceRequest::Vulkan).unwrap_or_else(|e| {
        panic!("GPU tests need a Vulkan adapter ({e}); run the README's test command, which installs Mesa lavapipe")
    });
    let adapter = chosen
        .adapter()
        .expect("a Vulkan request yields a wgpu adapter");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        assert!(
            adapter.is_software() && adapter.name.to_ascii_lowercase().contains("llvmpipe"),
            "CI=true: expected the software Vulkan adapter (lavapipe/llvmpipe), found {adapter}"
        );
    }
    chosen
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest absolute difference relative to the reference's largest magnitude (at least 1): the
/// issue's "relative error" for comparing whole outputs against a reference implementation.
pub fn max_rel_diff(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    max_abs_diff(got, want) / scale
}

/// A golden fixture folder under `assets/golden/` (made by `tools/golden/`).
pub fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/golden")
        .join(name)
}
