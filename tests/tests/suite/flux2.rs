//! FLUX.2 against diffusers on tiny random models (klein without guidance, dev with).

use burn::tensor::{Device, Tensor};
use portaflow::device::ChosenDevice;
use portaflow::model::flux2::{self, Flux2Config};
use portaflow_tests::{
    flux2_forward_on_golden_inputs, golden, golden_output, max_abs_diff, max_rel_diff, vulkan,
};

fn check(name: &str, device: &Device) {
    let model = flux2::load_dir(&golden(name), device).unwrap();
    let got = flux2_forward_on_golden_inputs(&model, name, device);
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
fn flux2_klein_tiny_matches_diffusers_on_cpu() {
    check("flux2_tiny", &ChosenDevice::cpu().device);
}

#[test]
fn flux2_dev_tiny_matches_diffusers_on_cpu() {
    check("flux2_dev_tiny", &ChosenDevice::cpu().device);
}

#[test]
fn flux2_klein_tiny_matches_diffusers_on_vulkan() {
    check("flux2_tiny", &vulkan().device);
}

#[test]
fn flux2_real_size_parameter_counts_match_diffusers() {
    let text = std::fs::read_to_string(golden("param_counts.json")).unwrap();
    let counts: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (preset, config) in [
        ("flux.2-klein-4b", Flux2Config::flux2_klein_4b()),
        ("flux.2-klein-9b", Flux2Config::flux2_klein_9b()),
        ("flux.2-dev", Flux2Config::flux2_dev()),
    ] {
        assert_eq!(
            config.parameter_count() as u64,
            counts[preset]["parameters"].as_u64().unwrap(),
            "{preset}"
        );
        let theirs: Flux2Config = serde_json::from_value(counts[preset]["config"].clone()).unwrap();
        assert_eq!(config, theirs, "{preset}");
    }
}

#[test]
fn bfl_single_file_matches_diffusers() {
    let dir = golden("flux2_tiny");
    let config: Flux2Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let device = Device::flex();
    let original =
        flux2::load_file(&dir.join("original_bfl.safetensors"), config, &device).unwrap();
    let diffusers = flux2::load_dir(&dir, &device).unwrap();
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
    let img: Vec<Vec<f64>> = (0..6)
        .map(|i| vec![0.0, (i / 3) as f64, (i % 3) as f64, 0.0])
        .collect();
    let txt: Vec<Vec<f64>> = (0..3).map(|l| vec![0.0, 0.0, 0.0, l as f64]).collect();
    let run = |m: &flux2::Flux2Transformer| -> Vec<f32> {
        m.forward(x.clone(), &[0.5], None, c.clone(), &img, &txt)
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
