//! Text encoders against transformers: tiny random CLIP, T5 and Qwen3 models (made by
//! `tools/golden/make_text_fixtures.py`) on the CPU backend and the Vulkan adapter.

use burn::tensor::{Device, Tensor};
use portaflow::device::ChosenDevice;
use portaflow::model::weights::Weights;
use portaflow::text::tokenizer::PromptTokenizer;
use portaflow::text::{clip, qwen3, t5};
use portaflow_tests::{golden, max_rel_diff, vulkan};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec().unwrap()
}

/// An integer table stored as f32 rows (`input_ids`, `attention_mask`).
fn rows(io: &mut Weights, key: &str) -> Vec<Vec<u32>> {
    let shape = io.shape(key).unwrap();
    io.read(key, &shape)
        .unwrap()
        .unwrap()
        .chunks(shape[1])
        .map(|row| row.iter().map(|&v| v as u32).collect())
        .collect()
}

fn assert_close(name: &str, key: &str, got: Vec<f32>, io: &mut Weights, dims: &[usize], tol: f32) {
    let want = io.read(key, dims).unwrap().unwrap();
    let rel = max_rel_diff(&got, &want);
    println!("{name} {key}: relative error {rel:.2e}");
    assert!(
        rel < tol,
        "{name} {key}: differs from transformers by {rel} (relative)"
    );
}

fn check_clip(name: &str, device: &Device) {
    let dir = golden(name);
    let model = clip::load_dir(&dir, device).unwrap();
    let mut io = Weights::open_file(&dir.join("io.safetensors")).unwrap();
    let ids = rows(&mut io, "input_ids");
    let shape = [ids.len(), ids[0].len()];
    let out = model.forward(&ids, device);
    let d = model.config.hidden_size;
    let checks = [
        (
            "last_hidden_state",
            values(out.last_hidden_state),
            vec![2, shape[1], d],
        ),
        (
            "penultimate_hidden_state",
            values(out.hidden_states[out.hidden_states.len() - 2].clone()),
            vec![2, shape[1], d],
        ),
        (
            "text_embeds",
            values(out.pooled),
            vec![2, model.config.projection_dim],
        ),
    ];
    for (key, got, dims) in checks {
        assert_close(name, key, got, &mut io, &dims, 1e-5);
    }
}

fn check_t5(name: &str, device: &Device) {
    let dir = golden(name);
    let model = t5::load_dir(&dir, device).unwrap();
    let mut io = Weights::open_file(&dir.join("io.safetensors")).unwrap();
    let ids = rows(&mut io, "input_ids");
    let dims = [ids.len(), ids[0].len(), model.config.d_model];
    let got = values(model.forward(&ids, device));
    assert_close(name, "last_hidden_state", got, &mut io, &dims, 1e-5);
}

fn check_qwen3(device: &Device) {
    let dir = golden("qwen3_tiny");
    let model = qwen3::load_dir(&dir, device).unwrap();
    let mut io = Weights::open_file(&dir.join("io.safetensors")).unwrap();
    let ids = rows(&mut io, "input_ids");
    let mask: Vec<Vec<bool>> = rows(&mut io, "attention_mask")
        .into_iter()
        .map(|row| row.into_iter().map(|m| m == 1).collect())
        .collect();
    let layers = model.config.num_hidden_layers;
    let states = model.hidden_states(&ids, &mask, layers, device);
    assert_eq!(states.len(), layers + 1);
    let dims = [ids.len(), ids[0].len(), model.config.hidden_size];
    for (i, state) in states.into_iter().enumerate() {
        let key = format!("hidden_states.{i}");
        assert_close("qwen3_tiny", &key, values(state), &mut io, &dims, 1e-5);
    }
    // Stopping early gives the same leading states (klein asks for layers 9, 18, 27 of 36).
    let partial = model.hidden_states(&ids, &mask, 2, device);
    assert_eq!(partial.len(), 3);
    assert_close(
        "qwen3_tiny",
        "hidden_states.2",
        values(partial[2].clone()),
        &mut io,
        &dims,
        1e-5,
    );
}

#[test]
fn t5_encoder_matches_transformers_on_cpu() {
    let cpu = ChosenDevice::cpu();
    check_t5("t5_tiny", &cpu.device);
    check_t5("t5_relu_tiny", &cpu.device);
}

#[test]
fn t5_encoder_matches_transformers_on_vulkan() {
    check_t5("t5_tiny", &vulkan().device);
}

#[test]
fn qwen3_hidden_states_match_transformers_on_cpu() {
    check_qwen3(&ChosenDevice::cpu().device);
}

#[test]
fn qwen3_hidden_states_match_transformers_on_vulkan() {
    check_qwen3(&vulkan().device);
}

#[test]
fn clip_text_matches_transformers_on_cpu() {
    let cpu = ChosenDevice::cpu();
    check_clip("clip_text_tiny", &cpu.device);
    check_clip("clip_text_bigg_tiny", &cpu.device);
}

#[test]
fn clip_text_matches_transformers_on_vulkan() {
    check_clip("clip_text_tiny", &vulkan().device);
}

#[test]
fn clip_checkpoint_with_a_wrong_width_names_the_key() {
    let dir = golden("clip_text_tiny");
    let mut config: clip::ClipTextConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config.intermediate_size = 48;
    let weights = Weights::open_file(&dir.join("model.safetensors")).unwrap();
    let err = clip::ClipTextModel::load(config, weights, &ChosenDevice::cpu().device)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("text_model.encoder.layers.0.mlp.fc1.weight")
            && err.contains("[48, 32]")
            && err.contains("[64, 32]"),
        "{err}"
    );
}

/// Each tokenizer folder as a diffusers pipeline calls it, against transformers' ids and masks
/// (`tools/golden/make_tokenizer_fixtures.py`): CLIP built from vocab.json + merges.txt (pad
/// `<|endoftext|>` and SD3's bigG `!`), T5 and Qwen3 from tokenizer.json, Qwen3 through its chat
/// template; long prompts truncated, odd whitespace, case, apostrophes, unknown characters.
#[test]
fn folder_tokenizers_match_transformers() {
    let root = golden("tokenizers");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("expected.json")).unwrap())
            .unwrap();
    for (name, case) in expected.as_object().unwrap() {
        let max_length = case["max_length"].as_u64().unwrap() as usize;
        let tokenizer = PromptTokenizer::from_folder(&root.join(name), max_length).unwrap();
        for row in case["encodings"].as_array().unwrap() {
            let prompt = row["prompt"].as_str().unwrap();
            let text = if case["chat_template"].as_bool().unwrap() {
                qwen3::chat_prompt(prompt)
            } else {
                prompt.to_string()
            };
            let got = tokenizer.encode_with_mask(&[text]).unwrap();
            let ids: Vec<u32> = serde_json::from_value(row["input_ids"].clone()).unwrap();
            let mask: Vec<u8> = serde_json::from_value(row["attention_mask"].clone()).unwrap();
            assert_eq!(got.ids[0], ids, "{name}: ids of {prompt:?}");
            let mask: Vec<bool> = mask.into_iter().map(|m| m == 1).collect();
            assert_eq!(got.mask[0], mask, "{name}: mask of {prompt:?}");
        }
    }
}

#[test]
fn a_folder_without_a_tokenizer_names_what_it_expected() {
    let dir = std::env::temp_dir().join(format!("pf-empty-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = PromptTokenizer::from_folder(&dir, 77)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("merges.txt"),
        "{err}"
    );
}
