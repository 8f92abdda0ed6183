//! Stable Diffusion 3 / 3.5 MMDiT (`SD3Transformer2DModel`, diffusers
//! `models/transformers/transformer_sd3.py`): joint attention over [image; text] tokens, AdaLN-Zero
//! modulation, SD3.5's qk-norm and dual attention, a `context_pre_only` last block, and a
//! centre-cropped sin-cos position table.
//!
//! Load a diffusers `transformer/` folder with [`load_dir`]; the bundled Shapes model uses this
//! same code with a tiny config.

mod config;
mod model;

use std::path::Path;

pub use config::Sd3Config;
pub use model::{JointAttention, JointTransformerBlock, PatchEmbed, Sd3Transformer};

use burn::tensor::Device;

use super::weights::{LoadError, Weights};

/// Loads `config.json` + `diffusion_pytorch_model[.safetensors | -*.safetensors + index]` from a
/// diffusers component folder.
pub fn load_dir(dir: &Path, device: &Device) -> Result<Sd3Transformer, LoadError> {
    let config = super::read_config::<Sd3Config>(&dir.join("config.json"))?;
    config.validate().map_err(|message| LoadError::Config {
        path: dir.join("config.json"),
        message,
    })?;
    let weights = Weights::open_dir(dir, "diffusion_pytorch_model")?;
    Sd3Transformer::load(config, weights, device)
}

impl crate::sample::pipeline::Denoiser for Sd3Transformer {
    /// SD3 takes diffusers timesteps σ·1000; a missing pooled vector is zeros.
    fn velocity(
        &self,
        x: burn::tensor::Tensor<4>,
        sigma: f64,
        cond: &crate::sample::pipeline::Conditioning,
    ) -> burn::tensor::Tensor<4> {
        let batch = x.dims()[0];
        let pooled = cond.pooled.clone().unwrap_or_else(|| {
            burn::tensor::Tensor::zeros([batch, self.config.pooled_projection_dim], &x.device())
        });
        let timesteps = vec![sigma * crate::sample::schedule::NUM_TRAIN_TIMESTEPS as f64; batch];
        self.forward(x, &timesteps, cond.sequence.clone(), pooled)
    }
}

/// Loads a single-file checkpoint in diffusers, SAI or BFL layout (detected from its keys) with
/// the given config (as diffusers' `from_single_file(..., config=...)`).
pub fn load_file(
    path: &Path,
    config: Sd3Config,
    device: &Device,
) -> Result<Sd3Transformer, LoadError> {
    config.validate().map_err(|message| LoadError::Config {
        path: path.to_path_buf(),
        message,
    })?;
    let mut weights = Weights::open_file(path)?;
    let layout = super::convert::detect(&weights);
    super::convert::alias_to_diffusers(&mut weights, layout, config.inner_dim());
    Sd3Transformer::load(config, weights, device)
}
