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
