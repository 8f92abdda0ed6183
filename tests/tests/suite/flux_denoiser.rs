//! FLUX.1 and FLUX.2 driven as `Denoiser`s (`model::flux_denoiser`): from the sampler's
//! image-shaped latent, σ and a `Conditioning`, the wrapper must reproduce diffusers' transformer
//! output on the golden inputs (packing, position ids, timestep and guidance scaling all
//! included), sample by sample since the fixtures give each sample its own timestep.

use burn::tensor::{Device, Tensor};
use portaflow::model::flux_denoiser::{pack_flux1, tokens};
use portaflow::model::weights::Weights;
use portaflow::model::{flux1, flux2};
use portaflow::sample::pipeline::{Conditioning, Denoiser};
use portaflow_tests::{golden, io_tensor, max_rel_diff};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec().unwrap()
}

/// Compares `denoiser.velocity` on the fixture's image-shaped latents, sample by sample, with
/// diffusers' packed output, after packing it with `pack`.
fn check(
    fixture: &str,
    denoiser: &dyn Denoiser,
    latent_key: &str,
    pooled: bool,
    pack: fn(Tensor<4>) -> Tensor<3>,
    device: &Device,
) {
    let mut io = Weights::open_file(&golden(fixture).join("io.safetensors")).unwrap();
    let latents: Tensor<4> = io_tensor(&mut io, latent_key, device);
    let hidden: Tensor<3> = io_tensor(&mut io, "hidden_states", device);
    let context: Tensor<3> = io_tensor(&mut io, "encoder_hidden_states", device);
    let pooled: Option<Tensor<2>> =
        pooled.then(|| io_tensor(&mut io, "pooled_projections", device));
    let want: Tensor<3> = io_tensor(&mut io, "output", device);
    let sigmas = values(io_tensor::<1>(&mut io, "timestep", device));
    let guidance = io
        .shape("guidance")
        .map(|_| values(io_tensor::<1>(&mut io, "guidance", device)));
    // The wrapper's packing is the pipeline's: it reproduces the fixture's hidden_states.
    assert_eq!(
        values(pack(latents.clone())),
        values(hidden),
        "{fixture}: packing"
    );
    for (i, &sigma) in sigmas.iter().enumerate() {
        let cond = Conditioning {
            sequence: context.clone().narrow(0, i, 1),
            pooled: pooled.as_ref().map(|p| p.clone().narrow(0, i, 1)),
            guidance: guidance.as_ref().map(|g| f64::from(g[i])),
        };
        let v = denoiser.velocity(latents.clone().narrow(0, i, 1), f64::from(sigma), &cond);
        assert_eq!(v.dims(), latents.clone().narrow(0, i, 1).dims());
        let got = values(pack(v));
        let want = values(want.clone().narrow(0, i, 1));
        let rel = max_rel_diff(&got, &want);
        println!("{fixture} sample {i} (σ = {sigma}): relative error to diffusers {rel:.2e}");
        assert!(rel < 1e-4, "{fixture} sample {i}: relative error {rel}");
    }
}

fn check_flux1(fixture: &str) {
    let device = Device::flex();
    let model = flux1::load_dir(&golden(fixture), &device).unwrap();
    check(
        fixture,
        &model,
        "latents_unpacked",
        true,
        pack_flux1,
        &device,
    );
}

fn check_flux2(fixture: &str) {
    let device = Device::flex();
    let model = flux2::load_dir(&golden(fixture), &device).unwrap();
    check(
        fixture,
        &model,
        "latents_patchified",
        false,
        tokens,
        &device,
    );
}

#[test]
fn flux1_dev_denoiser_matches_diffusers() {
    check_flux1("flux1_tiny");
}

#[test]
fn flux1_schnell_denoiser_matches_diffusers() {
    check_flux1("flux1_schnell_tiny");
}

#[test]
fn flux2_klein_denoiser_matches_diffusers() {
    check_flux2("flux2_tiny");
}

#[test]
fn flux2_dev_denoiser_matches_diffusers() {
    check_flux2("flux2_dev_tiny");
}

#[test]
fn flux1_guidance_reaches_the_model() {
    // The dev model's output depends on the conditioning's guidance (none given: the pipeline's
    // default 3.5), so the wrapper must pass it through.
    let device = Device::flex();
    let model = flux1::load_dir(&golden("flux1_tiny"), &device).unwrap();
    let mut io = Weights::open_file(&golden("flux1_tiny").join("io.safetensors")).unwrap();
    let latents: Tensor<4> = io_tensor(&mut io, "latents_unpacked", &device);
    let context: Tensor<3> = io_tensor(&mut io, "encoder_hidden_states", &device);
    let x = latents.narrow(0, 1, 1);
    let cond = |g| Conditioning {
        sequence: context.clone().narrow(0, 1, 1),
        pooled: None,
        guidance: g,
    };
    let a = values(model.velocity(x.clone(), 0.5, &cond(Some(4.0))));
    let b = values(model.velocity(x, 0.5, &cond(None)));
    assert!(max_rel_diff(&a, &b) > 1e-4, "guidance had no effect");
}
