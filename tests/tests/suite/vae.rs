//! The SD3 and FLUX.2 autoencoders against diffusers (tiny random models, non-square latents).

use burn::tensor::{Device, Tensor, TensorData};
use portaflow::device::ChosenDevice;
use portaflow::model::vae;
use portaflow::model::weights::Weights;
use portaflow_tests::{golden, max_abs_diff, max_rel_diff, vulkan};

fn read4(io: &mut Weights, key: &str, device: &Device) -> (Tensor<4>, Vec<f32>) {
    let shape: [usize; 4] = io.shape(key).unwrap().try_into().unwrap();
    let values = io.read(key, &shape).unwrap().unwrap();
    (
        Tensor::from_data(TensorData::new(values.clone(), shape), device),
        values,
    )
}

fn check(name: &str, latent_key: &str, encoded_key: &str, device: &Device) {
    let dir = golden(name);
    let model = vae::load_dir(&dir, device).unwrap();
    let mut io = Weights::open_file(&dir.join("io.safetensors")).unwrap();
    let (latent, _) = read4(&mut io, latent_key, device);
    let (_, want) = read4(&mut io, "decoded", device);
    let got: Vec<f32> = model.decode(latent).into_data().try_to_vec().unwrap();
    let err = max_abs_diff(&got, &want);
    let rel = max_rel_diff(&got, &want);
    println!("{name}: decode max |ours − diffusers| = {err:.2e}, relative {rel:.2e}");
    assert!(
        rel < 1e-4,
        "{name}: decode differs by {err} (relative {rel})"
    );

    let (image, _) = read4(&mut io, "image", device);
    let (_, want) = read4(&mut io, encoded_key, device);
    let got: Vec<f32> = model.encode(image).into_data().try_to_vec().unwrap();
    let err = max_abs_diff(&got, &want);
    let rel = max_rel_diff(&got, &want);
    println!("{name}: encode max |ours − diffusers| = {err:.2e}, relative {rel:.2e}");
    assert!(
        rel < 1e-4,
        "{name}: encode differs by {err} (relative {rel})"
    );
}

#[test]
fn sd3_vae_matches_diffusers_on_cpu() {
    check(
        "vae_sd3_tiny",
        "latents_model_space",
        "encoded_model_space",
        &ChosenDevice::cpu().device,
    );
}

#[test]
fn flux2_vae_matches_diffusers_on_cpu() {
    check(
        "vae_flux2_tiny",
        "latents_normalized",
        "encoded_normalized",
        &ChosenDevice::cpu().device,
    );
}

#[test]
fn sd3_vae_matches_diffusers_on_vulkan() {
    check(
        "vae_sd3_tiny",
        "latents_model_space",
        "encoded_model_space",
        &vulkan().device,
    );
}

/// `save_dir` writes diffusers' own key names: the tiny diffusers VAE saved by us holds exactly
/// the keys (and shapes) diffusers wrote, and loads back to the same decoder output.
#[test]
fn a_saved_autoencoder_has_the_keys_diffusers_wrote() {
    let device = ChosenDevice::cpu().device;
    let dir = golden("vae_sd3_tiny");
    let model = vae::load_dir(&dir, &device).unwrap();
    let out = portaflow_tests::TempDir::new("vae-save");
    model.save_dir(out.path()).unwrap();
    let keys = |path: &std::path::Path| -> Vec<(String, Vec<usize>)> {
        let bytes = std::fs::read(path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut keys: Vec<_> = file
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.shape().to_vec()))
            .collect();
        keys.sort();
        keys
    };
    let weights = "diffusion_pytorch_model.safetensors";
    assert_eq!(keys(&out.path().join(weights)), keys(&dir.join(weights)));
    let reloaded = vae::load_dir(out.path(), &device).unwrap();
    let z = Tensor::<4>::from_data(
        TensorData::new(
            (0..16 * 4 * 6).map(|i| ((i % 7) as f32 - 3.0) / 3.0).collect(),
            [1, 16, 4, 6],
        ),
        &device,
    );
    let a: Vec<f32> = model.decode(z.clone()).into_data().try_to_vec().unwrap();
    let b: Vec<f32> = reloaded.decode(z).into_data().try_to_vec().unwrap();
    assert_eq!(a, b, "a saved and reloaded autoencoder decodes differently");
}

mod training {
    use super::*;
    use burn::module::Module;
    use portaflow::model::vae::Vae;
    use portaflow::train::vae::{VaeTrainConfig, calibrate, renders, shapes_vae_config, train_vae};
    use portaflow::world::prompt_sets;

    fn config(steps: usize) -> VaeTrainConfig {
        VaeTrainConfig {
            steps,
            batch_size: 2,
            warmup_steps: 1,
            decay_steps: 0,
            log_every: 1,
            checkpoint_every: 2,
            ..Default::default()
        }
    }

    fn decoder_out(vae: &Vae) -> Vec<f32> {
        vae.decoder.conv_out.weight.val().into_data().try_to_vec().unwrap()
    }

    /// A killed autoencoder run resumes exactly; the folder it writes loads and is calibrated
    /// (the calibration batch's latents have mean 0 and std 1 in transformer space).
    #[test]
    fn autoencoder_training_resumes_exactly_and_writes_a_calibrated_folder() {
        let cpu = ChosenDevice::cpu().device;
        let ad = cpu.clone().autodiff();
        let (train, _) = prompt_sets::build();
        let fresh = || Vae::init(shapes_vae_config(), 3, &ad).unwrap();
        let straight = portaflow_tests::TempDir::new("vae-straight");
        let a = train_vae(fresh(), &config(4), &train, straight.path(), &ad, |_| {}).unwrap();
        let resumed = portaflow_tests::TempDir::new("vae-resumed");
        train_vae(fresh(), &config(2), &train, resumed.path(), &ad, |_| {}).unwrap();
        let mut losses = Vec::new();
        let b = train_vae(fresh(), &config(4), &train, resumed.path(), &ad, |m| {
            losses.push(m.loss)
        })
        .unwrap();
        assert_eq!(losses.len(), 2, "the resumed run repeats or skips steps");
        let diff = max_abs_diff(&decoder_out(&a), &decoder_out(&b));
        assert!(diff < 1e-6, "resumed run differs from the straight run by {diff}");
        assert!(
            max_abs_diff(&decoder_out(&a), &decoder_out(&fresh().valid())) > 1e-4,
            "training did not move the decoder"
        );

        let saved = vae::load_dir(&straight.path().join("vae"), &cpu).unwrap();
        assert_eq!(decoder_out(&saved), decoder_out(&a));
        let images = renders(&train, &config(4), u64::MAX, 64, 64);
        let latents: Vec<f32> = saved
            .encode(portaflow::pipeline::from_images(&images, &cpu))
            .into_data()
            .try_to_vec()
            .unwrap();
        let n = latents.len() as f64;
        let mean = latents.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (latents.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 1.0).abs() < 1e-3,
            "calibrated latents have mean {mean}, std {std}"
        );
        let mut again = saved.clone();
        calibrate(&mut again, &images, &cpu);
        assert_eq!(again.config, saved.config, "calibration is not deterministic");
    }
}
