//! A pipeline from files held in memory: what the browser fetched. Only the bundled architecture
//! (an SD3 transformer + one CLIP text encoder, in pixel space or on a Shapes autoencoder's
//! latents) loads this way; its folder has the files listed in [`BUNDLED_FILES`], plus
//! [`AUTOENCODER_FILES`] for a latent model.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::Device;

use super::text::{Encoder, TextStack};
use super::{BUNDLED_CLASS, ModelIndex, Pipeline, PipelineError, SchedulerConfig, Transformer};
use crate::model::Family;
use crate::model::sd3::Sd3Transformer;
use crate::model::vae::Vae;
use crate::text::clip::ClipTextModel;
use crate::text::tokenizer::{self, PromptTokenizer};

/// The files of a bundled-architecture pipeline folder, relative to it.
pub const BUNDLED_FILES: [&str; 7] = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
];

/// The autoencoder's files, present when `model_index.json` lists a `vae` (a latent Shapes model).
pub const AUTOENCODER_FILES: [&str; 2] =
    ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"];

impl Pipeline {
    /// Builds the pipeline from its folder's files (relative path → bytes, as in
    /// [`BUNDLED_FILES`]); the weight files are consumed.
    pub fn from_memory(
        mut files: BTreeMap<String, Vec<u8>>,
        device: &Device,
    ) -> Result<Self, PipelineError> {
        let folder = PathBuf::from("<fetched model>");
        let missing: Vec<&str> = BUNDLED_FILES
            .iter()
            .copied()
            .filter(|f| !files.contains_key(*f))
            .collect();
        if !missing.is_empty() {
            return Err(PipelineError::Folder {
                path: folder,
                message: format!("missing {}", missing.join(", ")),
            });
        }
        let json_error = |name: &str, e: serde_json::Error| PipelineError::Folder {
            path: PathBuf::from(name),
            message: e.to_string(),
        };
        let index: ModelIndex = serde_json::from_slice(&files["model_index.json"])
            .map_err(|e| json_error("model_index.json", e))?;
        if index.class_name != BUNDLED_CLASS {
            return Err(PipelineError::Folder {
                path: folder,
                message: format!(
                    "model_index.json names `{}`; in memory only the bundled architecture `{BUNDLED_CLASS}` loads",
                    index.class_name
                ),
            });
        }
        let latent = index.components.contains_key("vae");
        let missing_vae: Vec<&str> = AUTOENCODER_FILES
            .iter()
            .copied()
            .filter(|f| latent && !files.contains_key(*f))
            .collect();
        if !missing_vae.is_empty() {
            return Err(PipelineError::Folder {
                path: folder,
                message: format!(
                    "model_index.json lists a vae; missing {}",
                    missing_vae.join(", ")
                ),
            });
        }
        let scheduler: SchedulerConfig =
            serde_json::from_slice(&files["scheduler/scheduler_config.json"])
                .map_err(|e| json_error("scheduler/scheduler_config.json", e))?;
        let mut take = |name: &str| files.remove(name).expect("checked above");
        let text_config = take("text_encoder/config.json");
        let model = ClipTextModel::load_bytes(
            "text_encoder",
            &text_config,
            take("text_encoder/model.safetensors"),
            device,
        )?;
        let tokenizer = PromptTokenizer::from_bytes(
            "tokenizer/tokenizer.json",
            &take("tokenizer/tokenizer.json"),
            model.config.max_position_embeddings,
            tokenizer::PAD,
        )?;
        let transformer_config = take("transformer/config.json");
        let transformer = Sd3Transformer::load_bytes(
            "transformer",
            &transformer_config,
            take("transformer/diffusion_pytorch_model.safetensors"),
            device,
        )?;
        let vae = match latent {
            true => Some(Vae::load_bytes(
                "vae",
                &take("vae/config.json"),
                take("vae/diffusion_pytorch_model.safetensors"),
                device,
            )?),
            false => None,
        };
        Ok(Pipeline {
            text: TextStack::Clip(Encoder { tokenizer, model }),
            transformer: Transformer::Sd3(transformer),
            vae,
            index,
            scheduler,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundled_files() -> BTreeMap<String, Vec<u8>> {
        let dir = super::super::bundled_dir();
        BUNDLED_FILES
            .iter()
            // the bundled model is a latent one
            .chain(&AUTOENCODER_FILES)
            .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
            .collect()
    }

    #[test]
    fn the_bundled_model_from_memory_draws_what_it_draws_from_disk() {
        let device = Device::flex();
        let from_disk = Pipeline::from_dir(&super::super::bundled_dir(), &device).unwrap();
        let from_memory = Pipeline::from_memory(bundled_files(), &device).unwrap();
        let options = super::super::GenerateOptions::euler(3, 4.0, vec![5]);
        let prompts = vec!["a photo of a red circle".to_string()];
        let a = from_disk
            .generate(&prompts, &options, &device, |_| {}, None)
            .unwrap();
        let b = from_memory
            .generate(&prompts, &options, &device, |_| {}, None)
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn missing_truncated_and_foreign_files_are_named() {
        let device = Device::flex();
        let mut files = bundled_files();
        files.remove("tokenizer/tokenizer.json");
        let err = Pipeline::from_memory(files, &device)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("missing tokenizer/tokenizer.json"), "{err}");

        let mut files = bundled_files();
        let weights = files
            .get_mut("transformer/diffusion_pytorch_model.safetensors")
            .unwrap();
        weights.truncate(weights.len() / 2);
        let err = Pipeline::from_memory(files, &device)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("transformer/diffusion_pytorch_model.safetensors")
                && err.contains("truncated"),
            "{err}"
        );

        let mut files = bundled_files();
        files.insert(
            "model_index.json".into(),
            br#"{"_class_name": "FluxPipeline"}"#.to_vec(),
        );
        let err = Pipeline::from_memory(files, &device)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("FluxPipeline"), "{err}");
    }
}
