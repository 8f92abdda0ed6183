//! The `torch.save` reader (`model::torch_pt`) on files torch 2.15 wrote
//! (`tools/golden/make_torch_pt_fixtures.py`): every dtype, views sharing a storage, nested dicts,
//! a module's state dict, pickle protocol 4, deflated entries, RTDMD's LoRA `.pt`, and files that
//! must be refused: a pickle that would run `os.system`, broken archives, the legacy format.

use std::path::{Path, PathBuf};

use portaflow::model::torch_pt::{PtError, PtTensor, read_state_dict};
use portaflow::model::weights::Weights;
use portaflow_tests::golden;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    golden("torch_pt").join(name)
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Reads a fixture and compares keys (in order), shapes and values bit for bit with what torch
/// holds (`expected.json`, values as torch's `.float()`).
fn matches_torch(name: &str) {
    let got = read_state_dict(&fixture(name)).unwrap_or_else(|e| panic!("{e}"));
    let want = expected()["readable"][name].as_array().unwrap().clone();
    let got_keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    let want_keys: Vec<&str> = want.iter().map(|t| t["key"].as_str().unwrap()).collect();
    assert_eq!(got_keys, want_keys, "{name}: keys in file order");
    for ((key, tensor), want) in got.iter().zip(&want) {
        let shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
        let values: Vec<f64> = serde_json::from_value(want["values"].clone()).unwrap();
        let values: Vec<f32> = values.into_iter().map(|v| v as f32).collect();
        assert_eq!(tensor.shape, shape, "{name}: {key}: shape");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&tensor.values), bits(&values), "{name}: {key}: values");
    }
}

fn read_error(name: &str) -> PtError {
    match read_state_dict(&fixture(name)) {
        Ok(tensors) => panic!("{name}: expected an error, read {} tensors", tensors.len()),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------
// Files torch wrote, read exactly
// ---------------------------------------------------------------------------------------------

#[test]
fn f32_state_dict_matches_torch() {
    matches_torch("flat_f32.pt");
}

#[test]
fn f16_state_dict_matches_torch() {
    matches_torch("f16.pt");
}

#[test]
fn bf16_state_dict_matches_torch() {
    matches_torch("bf16.pt");
}

#[test]
fn f64_state_dict_rounds_like_torch_float() {
    matches_torch("f64.pt");
}

#[test]
fn views_sharing_one_storage_read_with_their_offset_and_stride() {
    matches_torch("non_contiguous.pt");
    // The same numbers seen through different views: transposed[j][i] == base[i][j].
    let got = read_state_dict(&fixture("non_contiguous.pt")).unwrap();
    let get = |key: &str| &got.iter().find(|(k, _)| k == key).unwrap().1;
    let (base, transposed) = (get("base"), get("transposed"));
    assert_eq!(
        (base.shape.as_slice(), transposed.shape.as_slice()),
        (&[4, 6][..], &[6, 4][..])
    );
    for i in 0..4 {
        for j in 0..6 {
            assert_eq!(transposed.values[j * 4 + i], base.values[i * 6 + j]);
        }
    }
    assert_eq!(
        get("expanded").values,
        [6.0, 6.5, 6.0, 6.5, 6.0, 6.5],
        "stride-0 broadcast"
    );
}

#[test]
fn nested_dicts_flatten_with_dotted_keys_and_skip_non_tensors() {
    matches_torch("nested.pt");
    let got = read_state_dict(&fixture("nested.pt")).unwrap();
    let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "state_dict.layer.weight",
            "state_dict.layer.bias",
            "generator_ema.inner.deep"
        ]
    );
}

#[test]
fn module_state_dict_with_peft_lora_keys_matches_torch() {
    matches_torch("lora_module.pt");
    let got = read_state_dict(&fixture("lora_module.pt")).unwrap();
    assert!(got.iter().any(
        |(k, t)| k == "transformer_blocks.1.attn.to_k.lora_B.default.weight" && t.shape == [6, 2]
    ));
}

#[test]
fn pickle_protocol_4_matches_torch() {
    matches_torch("protocol4.pt");
}

#[test]
fn parameters_read_as_their_tensor() {
    matches_torch("parameter.pt");
}

#[test]
fn deflated_zip_entries_read_like_stored_ones() {
    matches_torch("deflated.pt");
    let stored = read_state_dict(&fixture("flat_f32.pt")).unwrap();
    assert_eq!(read_state_dict(&fixture("deflated.pt")).unwrap(), stored);
}

/// The RTDMD-style LoRA `.pt` of the LoRA fixtures holds the same f32 numbers as its PEFT copy.
#[test]
fn rtdmd_generator_ema_matches_its_peft_safetensors_copy() {
    let lora = golden("lora/flux2_rtdmd");
    let pt = read_state_dict(&lora.join("cold_start/generator_ema.pt")).unwrap();
    let mut peft =
        Weights::open_file(&lora.join("cold_start_peft/adapter_model.safetensors")).unwrap();
    assert_eq!(pt.len(), 24);
    assert_eq!(pt.len(), peft.keys().len());
    for (key, PtTensor { shape, values }) in &pt {
        let peft_key = format!("base_model.model.{}", key.replace(".default.", "."));
        let want = peft
            .read(&peft_key, shape)
            .unwrap()
            .unwrap_or_else(|| panic!("{peft_key}"));
        assert_eq!(values, &want, "{key}");
    }
    // The bf16 adapter next to it reads too, every value a bf16 number.
    let bf16 = read_state_dict(&lora.join("rtdmd/generator_ema.pt")).unwrap();
    assert_eq!(bf16.len(), 24);
    assert!(
        bf16.iter()
            .all(|(_, t)| t.values.iter().all(|v| v.to_bits() & 0xffff == 0))
    );
}

// ---------------------------------------------------------------------------------------------
// Files that must be refused, with a message that says why
// ---------------------------------------------------------------------------------------------

#[test]
fn malicious_pickle_is_refused_at_the_global_it_names() {
    for name in ["evil.pt", "evil_protocol4.pt"] {
        match read_error(name) {
            PtError::ForbiddenGlobal {
                module,
                name: global,
                ..
            } => {
                assert_eq!(
                    (module.as_str(), global.as_str()),
                    ("posix", "system"),
                    "{name}"
                );
            }
            other => panic!("{name}: expected ForbiddenGlobal, got {other}"),
        }
    }
}

#[test]
fn every_broken_file_fails_with_its_message() {
    let expected = expected();
    let errors = expected["errors"].as_object().unwrap();
    assert_eq!(errors.len(), 8);
    for (name, needles) in errors {
        let message = read_error(name).to_string();
        assert!(
            message.contains(&*fixture(name).display().to_string()),
            "names the file: {message}"
        );
        for needle in needles.as_array().unwrap() {
            let needle = needle.as_str().unwrap();
            assert!(
                message.contains(needle),
                "{name}: {needle:?} not in {message:?}"
            );
        }
        println!("{name}: {message}");
    }
}

#[test]
fn broken_files_fail_with_the_right_kind_of_error() {
    assert!(matches!(
        read_error("truncated.pt"),
        PtError::Truncated { .. }
    ));
    assert!(matches!(read_error("legacy.pt"), PtError::Legacy { .. }));
    assert!(matches!(
        read_error("missing_storage.pt"),
        PtError::MissingStorage { .. }
    ));
    assert!(matches!(
        read_error("short_storage.pt"),
        PtError::StorageTooSmall { available: 1, .. }
    ));
    assert!(matches!(
        read_error("int_tensor.pt"),
        PtError::NotFloat { .. }
    ));
    assert!(matches!(
        read_error("not_a_dict.pt"),
        PtError::NotADict {
            found: "a list",
            ..
        }
    ));
    assert!(matches!(
        read_error("expected.json"),
        PtError::NotZip { .. }
    ));
    let missing = read_state_dict(Path::new("no/such/file.pt")).unwrap_err();
    assert!(matches!(missing, PtError::Io { .. }), "{missing}");
}
