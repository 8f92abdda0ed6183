//! SD3 / SD3.5 MMDiT against diffusers: golden outputs of tiny random models (made by
//! `tools/golden/make_transformer_fixtures.py`), on the CPU backend and the Vulkan adapter;
//! real-size parameter counts; bad checkpoints give clear errors.

use burn::tensor::{Device, Tensor};
use portaflow::device::ChosenDevice;
use portaflow::model::sd3::{self, Sd3Config};
use portaflow::model::weights::Weights;
use portaflow_tests::{copy_fixture, golden, io_tensor, max_abs_diff, max_rel_diff, vulkan};

fn check_sd3(name: &str, device: &Device) {
    let dir = golden(name);
    let model = sd3::load_dir(&dir, device).unwrap();
    let mut io = Weights::open_file(&dir.join("io.safetensors")).unwrap();
    let x: Tensor<4> = io_tensor(&mut io, "hidden_states", device);
    let context: Tensor<3> = io_tensor(&mut io, "encoder_hidden_states", device);
    let pooled: Tensor<2> = io_tensor(&mut io, "pooled_projections", device);
    let timesteps: Vec<f64> = io
        .read("timestep", &[2])
        .unwrap()
        .unwrap()
        .iter()
        .map(|&t| t as f64)
        .collect();
    let want = io.read("output", &x.dims()).unwrap().unwrap();

    model.check_input(x.dims()).unwrap();
    let embedded: Vec<f32> = model
        .embed_patches(x.clone())
        .into_data()
        .try_to_vec()
        .unwrap();
    let want_embedded = io
        .read("intermediate.pos_embed", &[2, 24, model.config.inner_dim()])
        .unwrap()
        .unwrap();
    let err = max_abs_diff(&embedded, &want_embedded);
    assert!(err < 1e-4, "{name}: patch + pos embed differs by {err}");

    let got: Vec<f32> = model
        .forward(x, &timesteps, context, pooled)
        .into_data()
        .try_to_vec()
        .unwrap();
    let err = max_abs_diff(&got, &want);
    let rel = max_rel_diff(&got, &want);
    println!("{name}: max |ours − diffusers| = {err:.2e}, relative {rel:.2e}");
    assert!(
        rel < 1e-4,
        "{name}: output differs from diffusers by {err} (relative {rel})"
    );
}

#[test]
fn sd3_tiny_matches_diffusers_on_cpu() {
    check_sd3("sd3_tiny", &ChosenDevice::cpu().device);
}

#[test]
fn sd35_tiny_matches_diffusers_on_cpu() {
    check_sd3("sd35_tiny", &ChosenDevice::cpu().device);
}

#[test]
fn sd35_tiny_matches_diffusers_on_vulkan() {
    check_sd3("sd35_tiny", &vulkan().device);
}

/// The same through the fused joint-attention kernel (off by default). Switching it on is
/// process-wide, so other Vulkan tests running meanwhile may take it too; they agree within their
/// tolerances either way.
#[test]
fn sd35_tiny_matches_diffusers_on_vulkan_through_the_fused_attention() {
    use portaflow::model::layers::{fused_attention_applies, set_fused_attention};
    let device = vulkan().device;
    set_fused_attention(true);
    let probe = burn::tensor::Tensor::<3>::zeros([1, 1, 4], &device);
    assert!(fused_attention_applies(&probe), "the kernel path is taken");
    check_sd3("sd35_tiny", &device);
    set_fused_attention(false);
}

#[test]
fn real_size_parameter_counts_match_diffusers() {
    let text = std::fs::read_to_string(golden("param_counts.json")).unwrap();
    let counts: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (preset, config) in [
        ("sd3-medium", Sd3Config::sd3_medium()),
        ("sd3.5-medium", Sd3Config::sd3_5_medium()),
        ("sd3.5-large", Sd3Config::sd3_5_large()),
    ] {
        let entry = &counts[preset];
        let want = entry["parameters"].as_u64().unwrap() as usize;
        assert_eq!(config.parameter_count(), want, "{preset}");
        // The preset equals diffusers' config for the same model.
        let theirs: Sd3Config = serde_json::from_value(entry["config"].clone()).unwrap();
        assert_eq!(config, theirs, "{preset}");
    }
}

#[test]
fn truncated_checkpoint_is_a_clear_error() {
    let tmp = copy_fixture("sd3_tiny");
    let file = tmp.path().join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = sd3::load_dir(tmp.path(), &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && err.contains("truncated or corrupt"),
        "{err}"
    );
}

#[test]
fn config_that_disagrees_with_the_weights_names_key_and_shapes() {
    let tmp = copy_fixture("sd3_tiny");
    let path = tmp.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["pooled_projection_dim"] = 48.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let err = sd3::load_dir(tmp.path(), &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "time_text_embed.text_embedder.linear_1.weight: expected shape [32, 48], found [32, 32]"
        ),
        "{err}"
    );
}

#[test]
fn missing_and_unused_keys_are_listed() {
    // SD3 weights read as SD3.5 (qk-norm, dual attention): the extra parameters are missing.
    let tmp = copy_fixture("sd3_tiny");
    let path = tmp.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["qk_norm"] = "rms_norm".into();
    std::fs::write(&path, config.to_string()).unwrap();
    let err = sd3::load_dir(tmp.path(), &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing") && err.contains("transformer_blocks.0.attn.norm_q.weight"),
        "{err}"
    );

    // SD3.5 weights read as SD3: its qk-norm and attn2 tensors match nothing.
    let tmp = copy_fixture("sd35_tiny");
    let path = tmp.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["qk_norm"] = serde_json::Value::Null;
    std::fs::write(&path, config.to_string()).unwrap();
    let err = sd3::load_dir(tmp.path(), &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("match no parameter") && err.contains("norm_added_k.weight"),
        "{err}"
    );
}

#[test]
fn sai_single_file_loads_to_the_same_model() {
    let dir = golden("sd35_tiny");
    let config: Sd3Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let device = Device::flex();
    let original = sd3::load_file(&dir.join("original_sai.safetensors"), config, &device).unwrap();
    let diffusers = sd3::load_dir(&dir, &device).unwrap();
    let mut io = Weights::open_file(&dir.join("io.safetensors")).unwrap();
    let x: Tensor<4> = io_tensor(&mut io, "hidden_states", &device);
    let context: Tensor<3> = io_tensor(&mut io, "encoder_hidden_states", &device);
    let pooled: Tensor<2> = io_tensor(&mut io, "pooled_projections", &device);
    let t = [1000.0, 437.5];
    let a: Vec<f32> = original
        .forward(x.clone(), &t, context.clone(), pooled.clone())
        .into_data()
        .try_to_vec()
        .unwrap();
    let b: Vec<f32> = diffusers
        .forward(x, &t, context, pooled)
        .into_data()
        .try_to_vec()
        .unwrap();
    assert_eq!(a, b, "SAI layout must give bit-identical weights");
}
