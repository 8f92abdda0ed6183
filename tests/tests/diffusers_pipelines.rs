//! Real pipeline folders against diffusers: tiny SD3.5, FLUX.1 and FLUX.2-klein pipelines saved
//! with `save_pretrained` (`tools/golden/make_pipeline_fixtures.py`).

use burn::tensor::{Device, Tensor};
use portaflow::device::ChosenDevice;
use portaflow::model::weights::Weights;
use portaflow::pipeline::text::TextStack;
use portaflow_tests::{golden, max_rel_diff};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec().unwrap()
}

fn call(name: &str) -> serde_json::Value {
    let path = golden("pipelines").join(name).join("golden/call.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn expect(io: &mut Weights, key: &str, got: Tensor<3>) {
    let dims = got.dims().to_vec();
    let want = io.read(key, &dims).unwrap().unwrap();
    let rel = max_rel_diff(&values(got), &want);
    println!("{key}: relative error {rel:.2e}");
    assert!(rel < 1e-5, "{key} differs from diffusers by {rel}");
}

fn check_text(name: &str, text: TextStack, pooled: bool, device: &Device) {
    let mut text = text;
    let call = call(name);
    text.set_max_sequence_length(call["max_sequence_length"].as_u64().unwrap() as usize);
    let dir = golden("pipelines").join(name);
    let mut io = Weights::open_file(&dir.join("golden/io.safetensors")).unwrap();
    let prompt = call["prompt"].as_str().unwrap().to_string();
    let cond = text.encode(&[prompt], device).unwrap();
    expect(&mut io, "prompt_embeds", cond.sequence);
    if pooled {
        let got = cond.pooled.unwrap();
        let want = io
            .read("pooled_prompt_embeds", &got.dims())
            .unwrap()
            .unwrap();
        let rel = max_rel_diff(&values(got), &want);
        println!("pooled_prompt_embeds: relative error {rel:.2e}");
        assert!(rel < 1e-5, "pooled differs from diffusers by {rel}");
    }
}

#[test]
fn sd35_prompt_embeddings_match_diffusers() {
    let device = ChosenDevice::cpu().device;
    let dir = golden("pipelines").join("sd35_pipeline_tiny");
    let text = TextStack::load_sd3(&dir, 32, &device).unwrap();
    check_text("sd35_pipeline_tiny", text, true, &device);
}

#[test]
fn flux1_prompt_embeddings_match_diffusers() {
    let device = ChosenDevice::cpu().device;
    let dir = golden("pipelines").join("flux1_pipeline_tiny");
    let text = TextStack::load_flux1(&dir, &device).unwrap();
    check_text("flux1_pipeline_tiny", text, true, &device);
}

#[test]
fn klein_prompt_embeddings_match_diffusers() {
    let device = ChosenDevice::cpu().device;
    let dir = golden("pipelines").join("klein_pipeline_tiny");
    let mut text = TextStack::load_flux2(&dir, &device).unwrap();
    if let TextStack::Flux2 { layers, .. } = &mut text {
        *layers = vec![1, 2, 3];
    }
    check_text("klein_pipeline_tiny", text, false, &device);
}
