//! FLUX.1 and FLUX.2 transformers as [`Denoiser`]s: the sampler's image-shaped latent becomes the
//! token sequence, position ids and σ the transformers take, the way diffusers' pipelines form
//! them.
//!
//! - FLUX.1 (`pipeline_flux.py`): the sampler latent is the VAE latent `[b, c, h, w]`; 2×2
//!   patches become tokens (`_pack_latents`, channel = c·4 + dy·2 + dx), image ids are
//!   (0, row, col) over the packed grid, text ids are zeros (`_prepare_latent_image_ids`).
//! - FLUX.2 (`pipeline_flux2_klein.py`): the sampler latent is already 2×2-patchified
//!   `[b, 4c, h/2, w/2]` (the space the VAE's BatchNorm statistics live in); every pixel is a token
//!   (`_pack_latents`), image ids are (0, row, col, 0), text ids (0, 0, 0, l) (`_prepare_latent_ids`,
//!   `_prepare_text_ids`).
//!
//! Both take the timestep as σ ∈ [0, 1] (the pipelines pass t/1000; the models multiply by 1000)
//! and the guidance-embedding strength as the raw scale (`Conditioning::guidance`, else the
//! pipeline's default).

use burn::tensor::Tensor;

use super::flux1::Flux1Transformer;
use super::flux2::Flux2Transformer;
use super::vae::{patchify2, unpatchify2};
use crate::sample::pipeline::{Conditioning, Denoiser};

/// `FluxPipeline.__call__`'s default `guidance_scale`.
pub const FLUX1_DEFAULT_GUIDANCE: f64 = 3.5;
/// `Flux2Pipeline.__call__`'s default `guidance_scale` (FLUX.2-dev; klein has no guidance embedder).
pub const FLUX2_DEFAULT_GUIDANCE: f64 = 4.0;

/// Image pixels as tokens: `[b, c, h, w]` → `[b, h·w, c]`, row-major.
pub fn tokens(x: Tensor<4>) -> Tensor<3> {
    let [b, c, h, w] = x.dims();
    // [b, c, h·w] → [b, h·w, c]
    x.reshape([b, c, h * w]).swap_dims(1, 2)
}

/// Inverse of [`tokens`]: `[b, h·w, c]` → `[b, c, h, w]`.
pub fn untokens(x: Tensor<3>, h: usize, w: usize) -> Tensor<4> {
    let [b, _, c] = x.dims();
    // [b, h·w, c] → [b, c, h·w] → [b, c, h, w]
    x.swap_dims(1, 2).reshape([b, c, h, w])
}

/// FLUX.1 `_pack_latents`: `[b, c, h, w]` → `[b, (h/2)·(w/2), 4c]`, channel = c·4 + dy·2 + dx.
pub fn pack_flux1(latents: Tensor<4>) -> Tensor<3> {
    tokens(patchify2(latents))
}

/// FLUX.1 `_unpack_latents`: `[b, (h/2)·(w/2), 4c]` → `[b, c, h, w]`.
pub fn unpack_flux1(tokens: Tensor<3>, h: usize, w: usize) -> Tensor<4> {
    unpatchify2(untokens(tokens, h / 2, w / 2))
}

/// Position ids of a `rows × cols` token grid, row-major: `[0, row, col]` plus `extra` zeros.
pub fn grid_ids(rows: usize, cols: usize, extra: usize) -> Vec<Vec<f64>> {
    (0..rows)
        .flat_map(|r| (0..cols).map(move |c| (r, c)))
        .map(|(r, c)| {
            let mut id = vec![0.0, r as f64, c as f64];
            id.resize(3 + extra, 0.0);
            id
        })
        .collect()
}

impl Denoiser for Flux1Transformer {
    /// # Shapes
    /// - `x`: VAE latent `[b, c, h, w]` (h, w even), `4c = in_channels`; returns like `x`.
    fn velocity(&self, x: Tensor<4>, sigma: f64, cond: &Conditioning) -> Tensor<4> {
        let [b, _, h, w] = x.dims();
        let device = x.device();
        let pooled = cond
            .pooled
            .clone()
            .unwrap_or_else(|| Tensor::zeros([b, self.config.pooled_projection_dim], &device));
        let guidance = vec![cond.guidance.unwrap_or(FLUX1_DEFAULT_GUIDANCE); b];
        let txt_ids = vec![vec![0.0; 3]; cond.sequence.dims()[1]];
        let out = self.forward(
            pack_flux1(x),
            &vec![sigma; b],
            Some(&guidance),
            cond.sequence.clone(),
            pooled,
            &grid_ids(h / 2, w / 2, 0),
            &txt_ids,
        );
        unpack_flux1(out, h, w)
    }
}

impl Denoiser for Flux2Transformer {
    /// # Shapes
    /// - `x`: patchified latent `[b, in_channels, h, w]`; returns like `x`.
    fn velocity(&self, x: Tensor<4>, sigma: f64, cond: &Conditioning) -> Tensor<4> {
        let [b, _, h, w] = x.dims();
        let guidance = vec![cond.guidance.unwrap_or(FLUX2_DEFAULT_GUIDANCE); b];
        let txt_ids: Vec<Vec<f64>> = (0..cond.sequence.dims()[1])
            .map(|l| vec![0.0, 0.0, 0.0, l as f64])
            .collect();
        let out = self.forward(
            tokens(x),
            &vec![sigma; b],
            Some(&guidance),
            cond.sequence.clone(),
            &grid_ids(h, w, 1),
            &txt_ids,
        );
        untokens(out, h, w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn flux1_packing_puts_dy_dx_last_and_round_trips() {
        let device = Device::flex();
        // [1, 2, 2, 4]: value = c·100 + y·10 + x
        let values: Vec<f32> = (0..2)
            .flat_map(|c| {
                (0..2).flat_map(move |y| (0..4).map(move |x| (c * 100 + y * 10 + x) as f32))
            })
            .collect();
        let latents =
            Tensor::<4>::from_data(TensorData::new(values.clone(), [1, 2, 2, 4]), &device);
        let packed = pack_flux1(latents.clone());
        assert_eq!(packed.dims(), [1, 2, 8]);
        let got: Vec<f32> = packed.clone().into_data().try_to_vec().unwrap();
        // token 1 = patch (row 0, col 1): channels c·4 + dy·2 + dx
        assert_eq!(
            &got[8..16],
            &[2.0, 3.0, 12.0, 13.0, 102.0, 103.0, 112.0, 113.0]
        );
        let back: Vec<f32> = unpack_flux1(packed, 2, 4).into_data().try_to_vec().unwrap();
        assert_eq!(back, values);
    }

    #[test]
    fn grid_ids_are_row_major() {
        assert_eq!(
            grid_ids(2, 2, 1),
            vec![
                vec![0.0, 0.0, 0.0, 0.0],
                vec![0.0, 0.0, 1.0, 0.0],
                vec![0.0, 1.0, 0.0, 0.0],
                vec![0.0, 1.0, 1.0, 0.0],
            ]
        );
    }
}
