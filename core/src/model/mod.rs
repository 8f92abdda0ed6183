//! Model families and the layers they share.

pub mod convert;
pub mod export;
pub mod flux1;
pub mod flux2;
pub mod init;
pub mod layers;
pub mod sd3;
pub mod vae;
pub mod weights;

use std::path::Path;

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
