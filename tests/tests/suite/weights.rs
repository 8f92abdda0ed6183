//! The checkpoint loader (`model::weights`) on the ways diffusers saves a model and the ways a file
//! can be wrong: sharded folders and F16 / BF16 files (made by
//! `tools/golden/make_loader_fixtures.py` from `sd3_tiny`) reproduce diffusers' output; lying
//! headers, wrong dtypes, shapes that disagree with the config, missing and unused keys are
//! errors naming the file, the key, what was expected and what was found.

use std::path::Path;

use burn::tensor::Device;
use portaflow::model::sd3;
use portaflow_tests::{
    copy_fixture, golden, golden_output, max_rel_diff, sd3_forward_on_golden_inputs,
};
use serde_json::{Map, Value, json};

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

// ---------------------------------------------------------------------------------------------
// Saved the other ways diffusers saves: shards, f16, bf16
// ---------------------------------------------------------------------------------------------

#[test]
fn sharded_folder_matches_the_single_file_and_diffusers() {
    let device = Device::flex();
    let dir = golden("sd3_tiny_sharded");
    let shards = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with("diffusion_pytorch_model-") && name.ends_with(".safetensors")
        })
        .count();
    assert!(
        shards > 1,
        "the fixture must be sharded, found {shards} shard(s)"
    );
    assert!(
        !dir.join(WEIGHTS).exists(),
        "no single file next to the shards"
    );

    let sharded = sd3::load_dir(&dir, &device).unwrap();
    let single = sd3::load_dir(&golden("sd3_tiny"), &device).unwrap();
    let got = sd3_forward_on_golden_inputs(&sharded, "sd3_tiny", &device);
    let same = sd3_forward_on_golden_inputs(&single, "sd3_tiny", &device);
    assert_eq!(
        got, same,
        "shards hold the same f32 values as the single file"
    );
    let rel = max_rel_diff(&got, &golden_output("sd3_tiny"));
    println!("sd3_tiny_sharded ({shards} shards): relative error to diffusers {rel:.2e}");
    assert!(rel < 1e-4, "relative error {rel}");
}

/// Loads an F16 / BF16 fixture and compares it with diffusers' f32 forward of the same rounded
/// weights; also shows the rounding is visible against the f32 fixture (so the test would notice
/// a loader that ignored the file's dtype).
fn check_low_precision(fixture: &str, dtype: &str) {
    let device = Device::flex();
    let dir = golden(fixture);
    let header = read_header(&std::fs::read(dir.join(WEIGHTS)).unwrap()).0;
    assert!(
        header
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .all(|(_, v)| v["dtype"] == dtype),
        "{fixture}: every tensor should be stored as {dtype}"
    );
    let model = sd3::load_dir(&dir, &device).unwrap();
    let got = sd3_forward_on_golden_inputs(&model, "sd3_tiny", &device);
    let rel = max_rel_diff(&got, &golden_output(fixture));
    let rounding = max_rel_diff(&golden_output(fixture), &golden_output("sd3_tiny"));
    println!(
        "{fixture}: relative error {rel:.2e} (the rounding itself moves the output {rounding:.2e})"
    );
    assert!(rel < 1e-4, "{fixture}: relative error {rel}");
    assert!(
        rounding > 10.0 * rel,
        "{fixture}: the {dtype} rounding ({rounding}) should dwarf the tolerance"
    );
}

#[test]
fn f16_weights_load_as_f32_and_match_diffusers() {
    check_low_precision("sd3_tiny_f16", "F16");
}

#[test]
fn bf16_weights_load_as_f32_and_match_diffusers() {
    check_low_precision("sd3_tiny_bf16", "BF16");
}

// ---------------------------------------------------------------------------------------------
// Bad files
// ---------------------------------------------------------------------------------------------

/// Splits a safetensors file into its header (as JSON) and its data bytes.
fn read_header(bytes: &[u8]) -> (Map<String, Value>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn write_file(path: &Path, header: &Map<String, Value>, data: &[u8]) {
    let header = serde_json::to_vec(header).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// Edits the header of a copy of `sd3_tiny`'s weights (the data bytes stay as they are), loads
/// the folder and returns the error message.
fn load_with_header(edit: impl FnOnce(&mut Map<String, Value>)) -> (String, String) {
    let tmp = copy_fixture("sd3_tiny");
    let path = tmp.path().join(WEIGHTS);
    let (mut header, data) = read_header(&std::fs::read(&path).unwrap());
    edit(&mut header);
    write_file(&path, &header, &data);
    let err = sd3::load_dir(tmp.path(), &Device::flex())
        .err()
        .expect("the load must fail")
        .to_string();
    (err, path.display().to_string())
}

/// The stored tensors of a file as (dtype, shape, bytes), in data order.
type Tensors = Vec<(String, String, Vec<usize>, Vec<u8>)>;

fn read_tensors(path: &Path) -> Tensors {
    let (header, data) = read_header(&std::fs::read(path).unwrap());
    let mut tensors: Vec<_> = header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(key, info)| {
            let offsets: Vec<usize> = serde_json::from_value(info["data_offsets"].clone()).unwrap();
            let shape: Vec<usize> = serde_json::from_value(info["shape"].clone()).unwrap();
            let dtype = info["dtype"].as_str().unwrap().to_string();
            (key, dtype, shape, data[offsets[0]..offsets[1]].to_vec())
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// Writes tensors contiguously, as a well-formed safetensors file.
fn write_tensors(path: &Path, tensors: &Tensors) {
    let mut header = Map::new();
    let mut data = Vec::new();
    for (key, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        let offsets = [start, data.len()];
        header.insert(
            key.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": offsets}),
        );
    }
    write_file(path, &header, &data);
}

/// Rewrites a copy of `sd3_tiny`'s weights tensor by tensor (a well-formed file), loads the
/// folder and returns the error message and the weights file's path.
fn load_with_tensors(edit: impl FnOnce(&mut Tensors)) -> (String, String) {
    let tmp = copy_fixture("sd3_tiny");
    let path = tmp.path().join(WEIGHTS);
    let mut tensors = read_tensors(&path);
    edit(&mut tensors);
    write_tensors(&path, &tensors);
    let err = sd3::load_dir(tmp.path(), &Device::flex())
        .err()
        .expect("the load must fail")
        .to_string();
    (err, path.display().to_string())
}

fn offsets(header: &Map<String, Value>, key: &str) -> (u64, u64) {
    let o = &header[key]["data_offsets"];
    (o[0].as_u64().unwrap(), o[1].as_u64().unwrap())
}

#[test]
fn tensor_reaching_past_the_end_of_the_file_is_named() {
    let (err, file) = load_with_header(|header| {
        let last = header
            .keys()
            .filter(|k| *k != "__metadata__")
            .max_by_key(|k| offsets(header, k).1)
            .unwrap()
            .clone();
        assert_eq!(last, "transformer_blocks.1.norm1_context.linear.weight");
        let (start, end) = offsets(header, &last);
        header[&last]["data_offsets"] = json!([start + 4096, end + 4096]);
    });
    assert!(err.starts_with(&file), "{err}");
    assert!(
        err.contains(
            "transformer_blocks.1.norm1_context.linear.weight: data_offsets [351744, 359936] \
             reach past the end of the data (355840 bytes)"
        ),
        "{err}"
    );
}

#[test]
fn overlapping_tensors_are_named() {
    let (err, file) = load_with_header(|header| {
        let (start, end) = offsets(header, "transformer_blocks.0.attn.to_q.weight");
        header["transformer_blocks.1.attn.to_q.weight"]["data_offsets"] = json!([start, end]);
    });
    assert!(err.starts_with(&file), "{err}");
    assert!(
        err.contains("transformer_blocks.1.attn.to_q.weight (bytes ")
            && err.contains(") overlaps transformer_blocks.0.attn.to_q.weight (bytes "),
        "{err}"
    );
}

#[test]
fn shape_and_byte_length_that_disagree_are_named() {
    let (err, file) = load_with_header(|header| {
        header["proj_out.bias"]["shape"] = json!([65]);
    });
    assert!(err.starts_with(&file), "{err}");
    assert!(
        err.contains("proj_out.bias: shape [65] of F32 needs 260 bytes, data_offsets [")
            && err.contains("] give 256"),
        "{err}"
    );
}

#[test]
fn integer_dtype_is_named_with_the_types_read() {
    let (err, file) = load_with_tensors(|tensors| {
        let bias = tensors.iter_mut().find(|t| t.0 == "proj_out.bias").unwrap();
        // The same shape, stored as I64: the bytes are consistent, the type is not a float.
        bias.1 = "I64".into();
        bias.3 = (0..64i64).flat_map(i64::to_le_bytes).collect();
    });
    assert!(
        err.contains(&format!(
            "proj_out.bias: dtype I64 in {file} is not a float type this loader reads (F32, F16, BF16, F64)"
        )),
        "{err}"
    );
}

#[test]
fn shape_that_disagrees_with_the_config_is_named() {
    let (err, file) = load_with_tensors(|tensors| {
        let bias = tensors.iter_mut().find(|t| t.0 == "proj_out.bias").unwrap();
        bias.2 = vec![63];
        bias.3.truncate(63 * 4);
    });
    assert!(
        err.contains(&format!(
            "proj_out.bias: expected shape [64], found [63] in {file}"
        )),
        "{err}"
    );
}

#[test]
fn missing_key_is_named_with_its_shape() {
    let (err, file) = load_with_tensors(|tensors| tensors.retain(|t| t.0 != "proj_out.bias"));
    let folder = Path::new(&file).parent().unwrap().display().to_string();
    assert!(
        err.contains(&format!(
            "1 parameter(s) missing from {folder}: proj_out.bias (expected [64])"
        )),
        "{err}"
    );
}

#[test]
fn unused_key_is_named_with_its_shape() {
    let (err, file) = load_with_tensors(|tensors| {
        tensors.push((
            "proj_out.extra".into(),
            "F32".into(),
            vec![2, 3],
            vec![0; 24],
        ))
    });
    let folder = Path::new(&file).parent().unwrap().display().to_string();
    assert!(
        err.contains(&format!(
            "1 tensor(s) in {folder} match no parameter of the model: proj_out.extra (F32 [2, 3])"
        )),
        "{err}"
    );
}
