//! Model families and the layers they share.

pub mod convert;
pub mod double_stream;
pub mod export;
pub mod flex;
pub mod flux1;
pub mod flux2;
pub mod flux_denoiser;
pub mod init;
pub mod layers;
pub mod sd3;
pub mod torch_pt;
pub mod vae;
pub mod weights;

use std::path::{Path, PathBuf};

use weights::LoadError;

/// Reads a diffusers `config.json` into `T`, naming the file and field on error.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A model family: its diffusers `config.json` type, the check of a config, and how a model is
/// built from diffusers-layout weights. Reading a diffusers component folder is written once here.
pub trait Family: Sized {
    type Config: serde::de::DeserializeOwned;

    /// The weights file's stem: diffusers' `diffusion_pytorch_model`, transformers' `model`.
    const WEIGHTS: &'static str = "diffusion_pytorch_model";

    /// Checks a config before any weight is read; the message names the field at fault.
    fn validate(config: &Self::Config) -> Result<(), String>;

    /// Builds the model from diffusers-layout weights, failing on missing or unused keys.
    fn from_weights(
        config: Self::Config,
        weights: weights::Weights,
        device: &burn::tensor::Device,
    ) -> Result<Self, LoadError>;

    /// Loads `config.json` + `<WEIGHTS>.safetensors` (or its shards listed in
    /// `<WEIGHTS>.safetensors.index.json`) from a diffusers / transformers component folder.
    fn load_dir(dir: &Path, device: &burn::tensor::Device) -> Result<Self, LoadError> {
        let path = dir.join("config.json");
        let config = read_config::<Self::Config>(&path)?;
        Self::validate(&config).map_err(|message| LoadError::Config { path, message })?;
        let weights = weights::Weights::open_dir(dir, Self::WEIGHTS)?;
        Self::from_weights(config, weights, device)
    }

    /// The same from bytes in memory (the browser's fetched files); `name` is the component's
    /// folder as errors call it.
    fn load_bytes(
        name: &str,
        config_json: &[u8],
        weights: Vec<u8>,
        device: &burn::tensor::Device,
    ) -> Result<Self, LoadError> {
        let path = PathBuf::from(format!("{name}/config.json"));
        let config =
            serde_json::from_slice::<Self::Config>(config_json).map_err(|e| LoadError::Config {
                path: path.clone(),
                message: e.to_string(),
            })?;
        Self::validate(&config).map_err(|message| LoadError::Config { path, message })?;
        let weights = weights::Weights::from_bytes(
            &format!("{name}/{}.safetensors", Self::WEIGHTS),
            weights,
        )?;
        Self::from_weights(config, weights, device)
    }
}

/// A transformer family that also loads the original single-file layouts (SAI, BFL).
pub trait SingleFile: Family {
    /// Hidden width `heads · head_dim`: where the rename tables split fused qkv tensors.
    fn inner_dim(config: &Self::Config) -> usize;

    /// Loads a single-file checkpoint in diffusers, SAI or BFL layout (detected from its keys)
    /// with the given config (as diffusers' `from_single_file(..., config=...)`).
    fn load_file(
        path: &Path,
        config: Self::Config,
        device: &burn::tensor::Device,
    ) -> Result<Self, LoadError> {
        Self::validate(&config).map_err(|message| LoadError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        let mut weights = weights::Weights::open_file(path)?;
        let layout = convert::detect(&weights);
        convert::alias_to_diffusers(&mut weights, layout, Self::inner_dim(&config));
        Self::from_weights(config, weights, device)
    }
}
