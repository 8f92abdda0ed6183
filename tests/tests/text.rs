//! Text encoders against transformers: tiny random CLIP text models (made by
//! `tools/golden/make_text_fixtures.py`) on the CPU backend and the Vulkan adapter.

use burn::tensor::{Device, Tensor};
use portaflow::device::ChosenDevice;
use portaflow::model::weights::Weights;
use portaflow::text::clip;
use portaflow_tests::{golden, max_rel_diff, vulkan};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec().unwrap()
}

fn check_clip(name: &str, device: &Device) {
    let dir = golden(name);
    let model = clip::load_dir(&dir, device).unwrap();
    let mut io = Weights::open_file(&dir.join("io.safetensors")).unwrap();
    let shape = io.shape("input_ids").unwrap();
    let ids: Vec<Vec<u32>> = io
        .read("input_ids", &shape)
        .unwrap()
        .unwrap()
        .chunks(shape[1])
        .map(|row| row.iter().map(|&v| v as u32).collect())
        .collect();
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
        let want = io.read(key, &dims).unwrap().unwrap();
        let rel = max_rel_diff(&got, &want);
        println!("{name} {key}: relative error {rel:.2e}");
        assert!(
            rel < 1e-5,
            "{name} {key}: differs from transformers by {rel} (relative)"
        );
    }
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
