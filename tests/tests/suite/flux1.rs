//! FLUX.1 against diffusers on tiny random models (dev with guidance, schnell without).

use burn::tensor::{Device, Tensor};
use portaflow::device::ChosenDevice;
use portaflow::model::flux1::{self, Flux1Config};
use portaflow_tests::{
    flux1_forward_on_golden_inputs, golden, golden_output, max_abs_diff, max_rel_diff, vulkan,
};

fn check(name: &str, device: &Device) {
    let model = flux1::load_dir(&golden(name), device).unwrap();
    let got = flux1_forward_on_golden_inputs(&model, name, device);
    let want = golden_output(name);
    let err = max_abs_diff(&got, &want);
    let rel = max_rel_diff(&got, &want);
    println!("{name}: max |ours − diffusers| = {err:.2e}, relative {rel:.2e}");
    assert!(
        rel < 1e-4,
        "{name}: output differs from diffusers by {err} (relative {rel})"
    );
}

#[test]
fn flux1_dev_tiny_matches_diffusers_on_cpu() {
    check("flux1_tiny", &ChosenDevice::cpu().device);
}

#[test]
fn flux1_schnell_tiny_matches_diffusers_on_cpu() {
    check("flux1_schnell_tiny", &ChosenDevice::cpu().device);
}

#[test]
fn flux1_dev_tiny_matches_diffusers_on_vulkan() {
    check("flux1_tiny", &vulkan().device);
}

#[test]
fn flux1_real_size_parameter_counts_match_diffusers() {
    let text = std::fs::read_to_string(golden("param_counts.json")).unwrap();
    let counts: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (preset, config) in [
        ("flux.1-dev", Flux1Config::flux1_dev()),
        ("flux.1-schnell", Flux1Config::flux1_schnell()),
    ] {
        assert_eq!(
            config.parameter_count() as u64,
            counts[preset]["parameters"].as_u64().unwrap(),
            "{preset}"
        );
        let theirs: Flux1Config = serde_json::from_value(counts[preset]["config"].clone()).unwrap();
        assert_eq!(config, theirs, "{preset}");
    }
}

#[test]
fn bfl_single_file_matches_diffusers() {
    let dir = golden("flux1_tiny");
    let config: Flux1Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let device = Device::flex();
    let original =
        flux1::load_file(&dir.join("original_bfl.safetensors"), config, &device).unwrap();
    let diffusers = flux1::load_dir(&dir, &device).unwrap();
    let x = Tensor::<3>::random(
        [1, 6, 16],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let c = Tensor::<3>::random(
        [1, 3, 32],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let p = Tensor::<2>::random(
        [1, 32],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let img: Vec<Vec<f64>> = (0..6)
        .map(|i| vec![0.0, (i / 3) as f64, (i % 3) as f64])
        .collect();
    let txt = vec![vec![0.0; 3]; 3];
    let run = |m: &flux1::Flux1Transformer| -> Vec<f32> {
        m.forward(
            x.clone(),
            &[0.5],
            Some(&[3.5]),
            c.clone(),
            p.clone(),
            &img,
            &txt,
        )
        .into_data()
        .try_to_vec()
        .unwrap()
    };
    assert_eq!(
        run(&original),
        run(&diffusers),
        "BFL layout must give bit-identical weights"
    );
}
