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

impl super::Family for Sd3Transformer {
    type Config = Sd3Config;

    fn validate(config: &Sd3Config) -> Result<(), String> {
        config.validate()
    }

    fn from_weights(config: Sd3Config, w: Weights, device: &Device) -> Result<Self, LoadError> {
        Self::load(config, w, device)
    }
}

impl super::SingleFile for Sd3Transformer {
    fn inner_dim(config: &Sd3Config) -> usize {
        config.inner_dim()
    }
}

/// Loads a diffusers `transformer/` folder (see [`super::Family::load_dir`]).
pub fn load_dir(dir: &Path, device: &Device) -> Result<Sd3Transformer, LoadError> {
    <Sd3Transformer as super::Family>::load_dir(dir, device)
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

/// Loads a single file in diffusers or SAI layout (see [`super::SingleFile::load_file`]).
pub fn load_file(
    path: &Path,
    config: Sd3Config,
    device: &Device,
) -> Result<Sd3Transformer, LoadError> {
    <Sd3Transformer as super::SingleFile>::load_file(path, config, device)
}

impl Sd3Transformer {
    /// A fresh, untrained model: parameters from [`super::init`] (seeded), the position table
    /// filled with diffusers' 2-D sin-cos values and frozen, as diffusers keeps it (a buffer).
    pub fn init(config: Sd3Config, seed: u64, device: &Device) -> Result<Self, LoadError> {
        config.validate().map_err(|message| LoadError::Config {
            path: "<new model config>".into(),
            message,
        })?;
        let mut model = Self::load(config, Weights::initializer(seed), device)?;
        let c = &model.config;
        let base = (c.sample_size / c.patch_size).max(1);
        let table = model::sincos_2d_table(c.inner_dim(), c.pos_embed_max_size, base);
        let max = c.pos_embed_max_size;
        let table = burn::tensor::Tensor::from_data(
            burn::tensor::TensorData::new(table, [1, max * max, c.inner_dim()]),
            device,
        );
        model.pos_embed.pos_embed = burn::module::Param::from_tensor(table).set_require_grad(false);
        Ok(model)
    }

    /// Writes `config.json` and `diffusion_pytorch_model.safetensors` in diffusers' layout, so the
    /// folder loads in diffusers (`SD3Transformer2DModel.from_pretrained`) and in [`load_dir`].
    pub fn save_dir(&self, dir: &Path) -> Result<(), LoadError> {
        let mut config = serde_json::to_value(&self.config).expect("config serialises");
        config["_class_name"] = "SD3Transformer2DModel".into();
        let c = &self.config;
        let reshape = std::collections::BTreeMap::from([(
            "pos_embed.proj.weight".to_string(),
            vec![c.inner_dim(), c.in_channels, c.patch_size, c.patch_size],
        )]);
        let tensors = super::export::checkpoint_tensors(self, &reshape);
        super::export::save_component(
            dir,
            &config,
            "diffusion_pytorch_model.safetensors",
            &tensors,
            None,
        )
    }
}
