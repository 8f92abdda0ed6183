//! Text-to-image pipelines: a model folder (tokenizer, text encoder, transformer, scheduler
//! settings) turned into images. The bundled Shapes model is such a folder, in diffusers' layout:
//!
//! ```text
//! model_index.json                 components, and the pixel resolution of pixel-space models
//! scheduler/scheduler_config.json  FlowMatchEulerDiscreteScheduler: shift
//! tokenizer/tokenizer.json         HF tokenizers
//! text_encoder/                    CLIPTextModelWithProjection (config.json + model.safetensors)
//! transformer/                     SD3Transformer2DModel (config.json + safetensors)
//! ```
//!
//! Conditioning follows SD3: the sequence is the text encoder's penultimate hidden state, the
//! pooled vector its projected end-token state; the unconditional branch encodes "".
//! Pixel-space models predict RGB in [−1, 1] directly (no VAE).

pub mod eval;
pub mod text;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::lora::{self, LoraError, LoraWeights};
use crate::model::sd3::{self, Sd3Config, Sd3Transformer};
use crate::model::weights::LoadError;
use crate::sample::pipeline::{
    Conditioning, Denoiser, NoiseSource, Progress, SampleError, SampleOptions, sample,
};
use crate::sample::schedule::{Schedule, ScheduleError};
use crate::sample::select::StepPlan;
use crate::sample::step::StepKind;
use crate::text::TextError;
use crate::text::clip::{self, ClipTextConfig, ClipTextModel};
use crate::text::tokenizer::{self, PromptTokenizer};
use crate::world::render::Image;

/// Errors of loading or running a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("{path}: {message}")]
    Folder { path: PathBuf, message: String },
}

/// `model_index.json`: diffusers' component table plus the image size of pixel-space models.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    pub transformer: (String, String),
    pub text_encoder: (String, String),
    pub tokenizer: (String, String),
    pub scheduler: (String, String),
    /// Side of the generated images in pixels, for models that work in pixel space.
    pub pixel_resolution: Option<usize>,
    /// What the transformer outputs (diffusers' `prediction_type` idea): the flow velocity
    /// (SD3, FLUX) or the clean sample.
    #[serde(default)]
    pub prediction: Prediction,
}

/// The transformer's output parametrisation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// v = ε − x₀ directly (SD3, FLUX).
    #[default]
    Velocity,
    /// x̂₀, turned into v = (x_σ − x̂₀) / max(σ, [`MIN_SIGMA_DIVISOR`]). In pixel space with
    /// patches wider than the model (8·8·3 = 192 values into 128 channels) a network cannot
    /// carry the per-pixel noise that ε- or v-prediction must output, but it can output the
    /// clean image, which lies on a low-dimensional manifold (Li & He 2025, "Back to Basics:
    /// Let Denoising Generative Models Denoise" — JiT). Measured here: v-prediction at patch 8
    /// still drew pure noise after 360 steps.
    Sample,
}

/// JiT's clip of the noise level in the x → v conversion.
pub const MIN_SIGMA_DIVISOR: f64 = 0.05;

/// The transformer seen as a velocity model, whatever it outputs.
pub struct PipelineDenoiser<'a> {
    pub transformer: &'a Sd3Transformer,
    pub prediction: Prediction,
}

impl Denoiser for PipelineDenoiser<'_> {
    fn velocity(&self, x: Tensor<4>, sigma: f64, cond: &Conditioning) -> Tensor<4> {
        let out = self.transformer.velocity(x.clone(), sigma, cond);
        match self.prediction {
            Prediction::Velocity => out,
            Prediction::Sample => (x - out).div_scalar(sigma.max(MIN_SIGMA_DIVISOR)),
        }
    }
}

/// `scheduler/scheduler_config.json` fields we use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(default = "default_shift")]
    pub shift: f64,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
}

fn default_shift() -> f64 {
    1.0
}
fn default_train_steps() -> usize {
    1000
}

/// A loaded text-to-image model.
pub struct Pipeline {
    pub tokenizer: PromptTokenizer,
    pub text_encoder: ClipTextModel,
    pub transformer: Sd3Transformer,
    pub index: ModelIndex,
    pub scheduler: SchedulerConfig,
}

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub steps: usize,
    pub guidance_scale: f64,
    /// Euler (deterministic) or a stochastic step on every step but the last.
    pub kind: StepKind,
    /// One seed per image.
    pub seeds: Vec<u64>,
    pub negative_prompt: String,
}

/// The bundled Shapes model's architecture, for pretraining from scratch.
///
/// 64×64 RGB in pixel space (no VAE to train), patch 8 → 8×8 = 64 image tokens. At 64 px the
/// smallest object (half-size 0.08 → ~10 px across) covers ~80 pixels, enough for the detector
/// to tell a circle from a square; an 8-px patch of flat colour with one or two edges is well
/// within what a width-128 token can emit through `proj_out` (rank 128 for 192 values). Width
/// 128 (4 heads × 32) with SD3.5's qk-norm, 6 MMDiT blocks; a 2-layer CLIP-style text encoder of
/// width 128 over a word-level vocabulary: 3.9 M parameters, about 0.2 GFLOP per image per
/// denoising step. Measured on this 2-core machine: patch 4 (256 tokens) at width 96 cost
/// 6.5 s per training step of 32 images, too slow to pretrain here; patch 8 is ~3× cheaper.
pub fn shapes_configs(
    vocab_size: usize,
    start_id: u32,
    end_id: u32,
) -> (ClipTextConfig, Sd3Config) {
    let width = 128;
    let text = ClipTextConfig {
        vocab_size,
        hidden_size: width,
        intermediate_size: 2 * width,
        projection_dim: width,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 16,
        hidden_act: "quick_gelu".into(),
        layer_norm_eps: 1e-5,
        bos_token_id: start_id,
        eos_token_id: end_id,
        pad_token_id: 0,
    };
    let transformer = Sd3Config {
        sample_size: SHAPES_RESOLUTION,
        patch_size: SHAPES_PATCH,
        in_channels: 3,
        num_layers: 6,
        attention_head_dim: 32,
        num_attention_heads: 4,
        joint_attention_dim: width,
        caption_projection_dim: width,
        pooled_projection_dim: width,
        out_channels: 3,
        pos_embed_max_size: SHAPES_RESOLUTION / SHAPES_PATCH,
        dual_attention_layers: vec![],
        qk_norm: Some("rms_norm".into()),
    };
    (text, transformer)
}

/// Image side of the bundled model.
pub const SHAPES_RESOLUTION: usize = 64;
/// Patch side of the bundled model.
pub const SHAPES_PATCH: usize = 8;

/// The folder of the bundled Shapes model (override with `PORTAFLOW_MODEL`).
pub fn bundled_dir() -> PathBuf {
    std::env::var_os("PORTAFLOW_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/shapes-base")
        })
}

impl Pipeline {
    /// Loads a pipeline folder (see the module docs for the layout).
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self, PipelineError> {
        if !dir.join("model_index.json").exists() {
            return Err(PipelineError::Folder {
                path: dir.to_path_buf(),
                message: "no model_index.json: not a pipeline folder".into(),
            });
        }
        let index: ModelIndex = crate::model::read_config(&dir.join("model_index.json"))?;
        let scheduler: SchedulerConfig =
            crate::model::read_config(&dir.join("scheduler/scheduler_config.json"))?;
        let text_encoder = clip::load_dir(&dir.join("text_encoder"), device)?;
        let tokenizer = PromptTokenizer::from_file(
            &dir.join("tokenizer/tokenizer.json"),
            text_encoder.config.max_position_embeddings,
            tokenizer::PAD,
        )?;
        let transformer = sd3::load_dir(&dir.join("transformer"), device)?;
        Ok(Self {
            tokenizer,
            text_encoder,
            transformer,
            index,
            scheduler,
        })
    }

    /// A fresh (untrained) pipeline with the given architecture.
    pub fn fresh(
        tokenizer: PromptTokenizer,
        text_config: ClipTextConfig,
        transformer_config: Sd3Config,
        seed: u64,
        device: &Device,
    ) -> Result<Self, PipelineError> {
        let resolution = transformer_config.sample_size;
        Ok(Self {
            tokenizer,
            text_encoder: ClipTextModel::init(text_config, seed, device),
            transformer: Sd3Transformer::init(transformer_config, seed.wrapping_add(1), device)?,
            index: ModelIndex {
                class_name: "PortaflowPixelPipeline".into(),
                transformer: ("diffusers".into(), "SD3Transformer2DModel".into()),
                text_encoder: ("transformers".into(), "CLIPTextModelWithProjection".into()),
                tokenizer: ("tokenizers".into(), "tokenizer.json".into()),
                scheduler: ("diffusers".into(), "FlowMatchEulerDiscreteScheduler".into()),
                pixel_resolution: Some(resolution),
                prediction: Prediction::Sample,
            },
            scheduler: SchedulerConfig {
                class_name: "FlowMatchEulerDiscreteScheduler".into(),
                shift: 1.0,
                num_train_timesteps: 1000,
            },
        })
    }

    /// Attaches every component of an adapter file to this pipeline's transformer and text
    /// encoder; returns how many linears were wrapped. Nothing stays attached on error.
    pub fn add_lora(
        &mut self,
        weights: &LoraWeights,
        name: &str,
        weight: f64,
        device: &Device,
    ) -> Result<usize, LoraError> {
        let mut attached = 0;
        for component in weights.components() {
            let modules = weights.component(&component);
            let result = match component.as_str() {
                "transformer" => lora::attach(&mut self.transformer, name, modules, weight, device),
                "text_encoder" => {
                    lora::attach(&mut self.text_encoder, name, modules, weight, device)
                }
                other => Err(LoraError::NoSuchModule {
                    adapter: name.to_string(),
                    paths: vec![format!(
                        "{other}.* (this pipeline has a transformer and a text_encoder)"
                    )],
                }),
            };
            match result {
                Ok(n) => attached += n,
                Err(e) => {
                    lora::remove(&mut self.transformer, name);
                    lora::remove(&mut self.text_encoder, name);
                    return Err(e);
                }
            }
        }
        Ok(attached)
    }

    /// Writes the pipeline folder. Adapters must be merged first (`lora::merge`), or they would be
    /// silently left out.
    pub fn save_dir(&self, dir: &Path) -> Result<(), PipelineError> {
        let live: Vec<String> = lora::unmerged(&self.transformer)
            .into_iter()
            .chain(lora::unmerged(&self.text_encoder))
            .collect();
        if !live.is_empty() {
            return Err(PipelineError::Folder {
                path: dir.to_path_buf(),
                message: format!(
                    "adapters {live:?} are attached but not merged; merge them (`portaflow lora merge`) or save them as adapters"
                ),
            });
        }
        let write = |path: PathBuf, text: String| -> Result<(), PipelineError> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| LoadError::Io {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            std::fs::write(&path, text).map_err(|source| LoadError::Io { path, source }.into())
        };
        write(dir.join("model_index.json"), pretty(&self.index))?;
        write(
            dir.join("scheduler/scheduler_config.json"),
            pretty(&self.scheduler),
        )?;
        let tokenizer_json = self
            .tokenizer
            .tokenizer
            .to_string(true)
            .map_err(|e| TextError::Encode(e.to_string()))?;
        write(dir.join("tokenizer/tokenizer.json"), tokenizer_json)?;
        self.text_encoder.save_dir(&dir.join("text_encoder"))?;
        self.transformer.save_dir(&dir.join("transformer"))?;
        Ok(())
    }

    /// Image side in pixels (pixel-space models).
    pub fn resolution(&self) -> usize {
        self.index
            .pixel_resolution
            .unwrap_or(self.transformer.config.sample_size)
    }

    /// SD3-style conditioning of `prompts`.
    pub fn encode(&self, prompts: &[String], device: &Device) -> Result<Conditioning, TextError> {
        let ids = self.tokenizer.encode(prompts)?;
        let out = self.text_encoder.forward(&ids, device);
        let penultimate = out.hidden_states[out.hidden_states.len() - 2].clone();
        Ok(Conditioning {
            sequence: penultimate,
            pooled: Some(out.pooled),
            guidance: None,
        })
    }

    /// Generates one image per seed for each prompt (`prompts.len() == seeds.len()`).
    pub fn generate(
        &self,
        prompts: &[String],
        options: &GenerateOptions,
        device: &Device,
        on_step: impl FnMut(Progress),
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<Image>, PipelineError> {
        if prompts.len() != options.seeds.len() {
            return Err(SampleError::Invalid(format!(
                "{} prompts for {} seeds",
                prompts.len(),
                options.seeds.len()
            ))
            .into());
        }
        let schedule = Schedule::shifted(options.steps, self.scheduler.shift)?;
        let cond = self.encode(prompts, device)?;
        let uncond = if options.guidance_scale != 1.0 {
            Some(self.encode(
                &vec![options.negative_prompt.clone(); prompts.len()],
                device,
            )?)
        } else {
            None
        };
        let steps = schedule.steps();
        let mut plan = StepPlan::ode(steps);
        if options.kind != StepKind::Euler {
            // Stochastic on every step but the last, which lands on the data.
            for i in 0..steps.saturating_sub(1) {
                plan.stochastic[i] = true;
            }
        }
        let noise = NoiseSource::new(options.seeds.clone());
        let size = self.resolution();
        let channels = self.transformer.config.in_channels;
        let x = noise.initial([channels, size, size], device);
        let sample_options = SampleOptions {
            schedule: &schedule,
            kind: options.kind,
            plan,
            guidance_scale: options.guidance_scale,
            shared_seeds: None,
            record: false,
        };
        let (x, _) = sample(
            &PipelineDenoiser {
                transformer: &self.transformer,
                prediction: self.index.prediction,
            },
            x,
            &cond,
            uncond.as_ref(),
            &noise,
            &sample_options,
            on_step,
            cancel,
        )?;
        Ok(to_images(x))
    }
}

fn pretty(value: &impl Serialize) -> String {
    serde_json::to_string_pretty(value).expect("plain data serialises")
}

/// RGB in [−1, 1] `[b, 3, h, w]` → 8-bit images.
pub fn to_images(x: Tensor<4>) -> Vec<Image> {
    let [b, c, h, w] = x.dims();
    let values: Vec<f32> = x
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 images");
    (0..b)
        .map(|i| {
            let at = |ch: usize, y: usize, xx: usize| {
                let v = values[((i * c + ch) * h + y) * w + xx];
                ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
            };
            Image {
                width: w,
                height: h,
                pixels: (0..h * w)
                    .map(|p| {
                        [
                            at(0, p / w, p % w),
                            at(1, p / w, p % w),
                            at(2, p / w, p % w),
                        ]
                    })
                    .collect(),
            }
        })
        .collect()
}

/// 8-bit images → RGB in [−1, 1] `[b, 3, h, w]` (all of equal size).
pub fn from_images(images: &[Image], device: &Device) -> Tensor<4> {
    let (h, w) = (images[0].height, images[0].width);
    let mut values = Vec::with_capacity(images.len() * 3 * h * w);
    for image in images {
        for ch in 0..3 {
            values.extend(image.pixels.iter().map(|p| p[ch] as f32 / 127.5 - 1.0));
        }
    }
    Tensor::from_data(TensorData::new(values, [images.len(), 3, h, w]), device)
}
