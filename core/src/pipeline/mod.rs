//! Text-to-image pipelines: a model folder (tokenizers, text encoders, transformer, VAE,
//! scheduler settings) turned into images. `model_index.json`'s `_class_name` picks the family:
//! `StableDiffusion3Pipeline` (SD3 / SD3.5), `FluxPipeline` (FLUX.1), `Flux2KleinPipeline`
//! (FLUX.2-klein), or `PortaflowShapesPipeline` (formerly `PortaflowPixelPipeline`, still read),
//! the bundled Shapes model, laid out as:
//!
//! ```text
//! model_index.json                 components, and the pixel resolution of pixel-space models
//! scheduler/scheduler_config.json  FlowMatchEulerDiscreteScheduler: shift
//! tokenizer/tokenizer.json         HF tokenizers
//! text_encoder/                    CLIPTextModelWithProjection (config.json + model.safetensors)
//! transformer/                     SD3Transformer2DModel (config.json + safetensors)
//! vae/                             AutoencoderKL, in latent models only
//! ```
//!
//! Conditioning follows SD3: the sequence is the text encoder's penultimate hidden state, the
//! pooled vector its projected end-token state; the unconditional branch encodes "".
//! Pixel-space models predict RGB in [−1, 1] directly; latent models decode through `vae/`.

pub mod eval;
pub mod memory;
pub mod text;
pub mod transformer;

pub use text::TextStack;
pub use transformer::Transformer;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::lora::{self, LoraError, LoraWeights};
use crate::model::sd3::{self, Sd3Config, Sd3Transformer};
use crate::model::vae::{self, Vae};
use crate::model::weights::LoadError;
use crate::model::{flux1, flux2};
use crate::sample::pipeline::{
    Conditioning, Denoiser, NoiseSource, Progress, SampleError, SampleOptions, sample,
};
use crate::sample::schedule::{Schedule, ScheduleError, flux_mu, flux2_empirical_mu};
use crate::sample::select::StepPlan;
use crate::sample::step::StepKind;
use crate::text::TextError;
use crate::text::clip::{self, ClipTextConfig, ClipTextModel};
use crate::text::tokenizer::{self, PromptTokenizer};
use crate::world::render::Image;
use text::Encoder;

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
    #[serde(rename = "_class_name", deserialize_with = "current_class_name")]
    pub class_name: String,
    /// Side of the generated images in pixels, for models that work in pixel space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_resolution: Option<usize>,
    /// What the transformer outputs (diffusers' `prediction_type` idea): the flow velocity
    /// (SD3, FLUX) or the clean sample.
    #[serde(default)]
    pub prediction: Prediction,
    /// The component table (`"transformer": ["diffusers", "SD3Transformer2DModel"]`, …), kept
    /// as written.
    #[serde(flatten)]
    pub components: std::collections::BTreeMap<String, serde_json::Value>,
}

/// The pipeline classes this crate runs.
pub const BUNDLED_CLASS: &str = "PortaflowShapesPipeline";
/// The bundled architecture's name before it gained latent models; still read, as [`BUNDLED_CLASS`].
const OLD_BUNDLED_CLASS: &str = "PortaflowPixelPipeline";

fn current_class_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    Ok(match name.as_str() {
        OLD_BUNDLED_CLASS => BUNDLED_CLASS.into(),
        _ => name,
    })
}
pub const SUPPORTED_CLASSES: [&str; 4] = [
    BUNDLED_CLASS,
    "StableDiffusion3Pipeline",
    "FluxPipeline",
    "Flux2KleinPipeline",
];

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
    pub transformer: &'a Transformer,
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
    /// FLUX: the schedule is shifted by μ from the image's token count instead of `shift`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_dynamic_shifting: bool,
}

fn default_shift() -> f64 {
    1.0
}
fn default_train_steps() -> usize {
    1000
}

/// A loaded text-to-image model.
pub struct Pipeline {
    pub text: TextStack,
    pub transformer: Transformer,
    /// The autoencoder of latent-space models; `None` in pixel space.
    pub vae: Option<Vae>,
    pub index: ModelIndex,
    pub scheduler: SchedulerConfig,
}

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub steps: usize,
    pub guidance_scale: f64,
    /// Guidance only while lo < σ ≤ hi; `None`: on every step (see [`SampleOptions`]).
    pub guidance_interval: Option<(f64, f64)>,
    /// Euler (deterministic) or a stochastic step on every step but the last.
    pub kind: StepKind,
    /// One seed per image.
    pub seeds: Vec<u64>,
    pub negative_prompt: String,
    /// Image `(height, width)` in pixels; `None`: the model's default.
    pub size: Option<(usize, usize)>,
    /// The initial noise `[b, c, h, w]` in the sampler's latent space instead of the seeds' (to
    /// reproduce another engine's image); the seeds still drive stochastic steps.
    pub initial_noise: Option<Tensor<4>>,
    /// An explicit σ list (diffusers' `sigmas=`, e.g. RTDMD's 4-step `[1, 0.9, 0.75, 0.5]`; 0 is
    /// appended) instead of the scheduler's `steps`-step schedule.
    pub sigmas: Option<Vec<f64>>,
}

impl GenerateOptions {
    /// Deterministic Euler sampling of one image per seed with classifier-free guidance.
    pub fn euler(steps: usize, guidance_scale: f64, seeds: Vec<u64>) -> Self {
        Self {
            steps,
            guidance_scale,
            guidance_interval: None,
            kind: StepKind::Euler,
            seeds,
            negative_prompt: String::new(),
            size: None,
            initial_noise: None,
            sigmas: None,
        }
    }
}

/// The size knobs of a Shapes model (the rest of [`shapes_configs`] is fixed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShapesArchitecture {
    pub patch_size: usize,
    /// Transformer and text-encoder width (heads of 32).
    pub width: usize,
    /// MMDiT blocks.
    pub layers: usize,
}

impl Default for ShapesArchitecture {
    fn default() -> Self {
        Self {
            patch_size: SHAPES_PATCH,
            width: 128,
            layers: 6,
        }
    }
}

/// The bundled Shapes model's architecture, for pretraining from scratch.
///
/// 64×64 RGB in pixel space (no VAE to train), patch 8 → 8×8 = 64 image tokens. At 64 px the
/// smallest object (half-size 0.08 → ~10 px across) covers ~80 pixels, enough for the detector
/// to tell a circle from a square. Width 128 (4 heads × 32) with SD3.5's qk-norm, 6 MMDiT
/// blocks; a 2-layer CLIP-style text encoder of width 128 over a word-level vocabulary: 3.9 M
/// parameters, about 0.2 GFLOP per image per denoising step. Measured on this 2-core machine:
/// patch 4 (256 tokens) at width 96 cost 6.5 s per training step of 32 images, too slow to
/// pretrain here; patch 8 is ~3× cheaper.
pub fn shapes_configs(
    vocab_size: usize,
    start_id: u32,
    end_id: u32,
    arch: ShapesArchitecture,
) -> (ClipTextConfig, Sd3Config) {
    let ShapesArchitecture {
        patch_size,
        width,
        layers,
    } = arch;
    let heads = width / 32;
    let text = ClipTextConfig {
        vocab_size,
        hidden_size: width,
        intermediate_size: 2 * width,
        projection_dim: width,
        num_hidden_layers: 2,
        num_attention_heads: heads,
        max_position_embeddings: 16,
        hidden_act: "quick_gelu".into(),
        layer_norm_eps: 1e-5,
        bos_token_id: start_id,
        eos_token_id: end_id,
        pad_token_id: 0,
    };
    let transformer = Sd3Config {
        sample_size: SHAPES_RESOLUTION,
        patch_size,
        in_channels: 3,
        num_layers: layers,
        attention_head_dim: 32,
        num_attention_heads: heads,
        joint_attention_dim: width,
        caption_projection_dim: width,
        pooled_projection_dim: width,
        out_channels: 3,
        pos_embed_max_size: SHAPES_RESOLUTION / patch_size,
        dual_attention_layers: vec![],
        qk_norm: Some("rms_norm".into()),
    };
    (text, transformer)
}

/// A Shapes transformer config moved onto an autoencoder's latent grid: 64 px / f cells a side
/// of `latent_channels` each (the patch size stays the architecture's).
pub fn on_latents(config: Sd3Config, vae: &crate::model::vae::VaeConfig) -> Sd3Config {
    let side = SHAPES_RESOLUTION / vae.downscale();
    Sd3Config {
        sample_size: side,
        in_channels: vae.latent_channels,
        out_channels: vae.latent_channels,
        pos_embed_max_size: side / config.patch_size,
        ..config
    }
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
    /// Loads a pipeline folder: the bundled layout (see the module docs) or a diffusers
    /// SD3 / SD3.5, FLUX.1 or FLUX.2-klein folder.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self, PipelineError> {
        Self::load(dir, device, true)
    }

    /// The transformer and VAE of a folder without its text encoders (`TextStack::Freed`),
    /// for sampling from conditioning computed by [`Pipeline::load_text`] beforehand.
    pub fn without_text(dir: &Path, device: &Device) -> Result<Self, PipelineError> {
        Self::load(dir, device, false)
    }

    /// The tokenizers and text encoders of a folder alone.
    pub fn load_text(dir: &Path, device: &Device) -> Result<TextStack, PipelineError> {
        let (index, _) = read_index(dir)?;
        load_text_stack(dir, &index, device)
    }

    fn load(dir: &Path, device: &Device, with_text: bool) -> Result<Self, PipelineError> {
        let folder_error = |message: String| PipelineError::Folder {
            path: dir.to_path_buf(),
            message,
        };
        let (index, scheduler) = read_index(dir)?;
        let text = if with_text {
            load_text_stack(dir, &index, device)?
        } else {
            TextStack::Freed
        };
        let vae = || vae::load_dir(&dir.join("vae"), device);
        let transformer_dir = dir.join("transformer");
        let (transformer, vae) = match index.class_name.as_str() {
            BUNDLED_CLASS => (
                Transformer::Sd3(sd3::load_dir(&transformer_dir, device)?),
                // a latent Shapes model lists its autoencoder; a pixel-space one has none
                match index.components.contains_key("vae") {
                    true => Some(vae()?),
                    false => None,
                },
            ),
            "StableDiffusion3Pipeline" => (
                Transformer::Sd3(sd3::load_dir(&transformer_dir, device)?),
                Some(vae()?),
            ),
            "FluxPipeline" => (
                Transformer::Flux1(flux1::load_dir(&transformer_dir, device)?),
                Some(vae()?),
            ),
            _ => (
                Transformer::Flux2(flux2::load_dir(&transformer_dir, device)?),
                Some(vae()?),
            ),
        };
        let expected = match &transformer {
            Transformer::Sd3(t) => t.config.joint_attention_dim,
            Transformer::Flux1(t) => t.config.joint_attention_dim,
            Transformer::Flux2(t) => t.config.joint_attention_dim,
        };
        // klein's layer choice is checked by `set_text_layers` and `encode`; the width must
        // divide into whole Qwen3 layers here already.
        if let TextStack::Flux2 { qwen, .. } = &text
            && expected % qwen.model.config.hidden_size != 0
        {
            return Err(folder_error(format!(
                "the transformer's joint_attention_dim {expected} is not a whole number of Qwen3 layers of width {}",
                qwen.model.config.hidden_size
            )));
        }
        if !matches!(text, TextStack::Flux2 { .. } | TextStack::Freed)
            && text.sequence_width() != expected
        {
            return Err(folder_error(format!(
                "the text encoders give sequences of width {}; the transformer's joint_attention_dim is {expected}",
                text.sequence_width()
            )));
        }
        Ok(Self {
            text,
            transformer,
            vae,
            index,
            scheduler,
        })
    }

    /// A fresh (untrained) pipeline with the given architecture, in pixel space or, given a
    /// trained autoencoder, in its latent space; it predicts the clean sample in both. Measured
    /// on latents: a velocity-predicting model warm-started from the pixel model still drew
    /// texture after 1000 steps, its x̂₀ error at σ = 1 (1.10) three times the mean image's
    /// (0.34), while the x-predicting pixel model starts from the mean image.
    pub fn fresh(
        tokenizer: PromptTokenizer,
        text_config: ClipTextConfig,
        transformer_config: Sd3Config,
        vae: Option<Vae>,
        seed: u64,
        device: &Device,
    ) -> Result<Self, PipelineError> {
        let resolution = transformer_config.sample_size;
        let component = |library: &str, class: &str| serde_json::json!([library, class]);
        let latent = vae.is_some();
        let vae_component = latent.then(|| ("vae", component("diffusers", "AutoencoderKL")));
        Ok(Self {
            text: TextStack::Clip(Encoder {
                tokenizer,
                model: ClipTextModel::init(text_config, seed, device),
            }),
            transformer: Transformer::Sd3(Sd3Transformer::init(
                transformer_config,
                seed.wrapping_add(1),
                device,
            )?),
            vae,
            index: ModelIndex {
                class_name: BUNDLED_CLASS.into(),
                pixel_resolution: (!latent).then_some(resolution),
                prediction: Prediction::Sample,
                components: [
                    (
                        "transformer",
                        component("diffusers", "SD3Transformer2DModel"),
                    ),
                    (
                        "text_encoder",
                        component("transformers", "CLIPTextModelWithProjection"),
                    ),
                    ("tokenizer", component("tokenizers", "tokenizer.json")),
                    (
                        "scheduler",
                        component("diffusers", "FlowMatchEulerDiscreteScheduler"),
                    ),
                ]
                .into_iter()
                .chain(vae_component)
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            },
            scheduler: SchedulerConfig {
                class_name: "FlowMatchEulerDiscreteScheduler".into(),
                shift: 1.0,
                num_train_timesteps: 1000,
                use_dynamic_shifting: false,
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
        let mut result = Ok(());
        for component in weights.components() {
            let modules = weights.component(&component);
            let outcome = if component == "transformer" {
                lora::attach(&mut self.transformer, name, modules, weight, device)
            } else {
                let mut parts = self.text.components_mut();
                let names: Vec<&str> = parts.iter().map(|(n, _)| *n).collect();
                let names = names.join(", ");
                match parts.iter_mut().find(|(n, _)| *n == component) {
                    Some((_, encoder)) => {
                        lora::attach(&mut **encoder, name, modules, weight, device)
                    }
                    None => Err(LoraError::NoSuchModule {
                        adapter: name.to_string(),
                        paths: vec![format!(
                            "{component}.* (this pipeline has a transformer and {names})"
                        )],
                    }),
                }
            };
            match outcome {
                Ok(n) => attached += n,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if let Err(e) = result {
            lora::remove(&mut self.transformer, name);
            for (_, encoder) in self.text.components_mut() {
                lora::remove(&mut *encoder, name);
            }
            return Err(e);
        }
        Ok(attached)
    }

    /// Sets the multiplier of adapter `name` wherever it is attached; returns how many linears.
    pub fn set_lora_weight(&mut self, name: &str, weight: f64) -> Result<usize, LoraError> {
        let has = |model: &dyn lora::Linears| lora::adapters(model).iter().any(|(n, _)| n == name);
        let mut count = 0;
        if has(&self.transformer) {
            count += lora::set_weight(&mut self.transformer, name, weight)?;
        }
        for (_, encoder) in self.text.components_mut() {
            if has(&*encoder) {
                count += lora::set_weight(&mut *encoder, name, weight)?;
            }
        }
        if count == 0 {
            return Err(LoraError::Unknown(name.to_string()));
        }
        Ok(count)
    }

    /// Folds adapter `name` into the base weights of every component that has it (diffusers'
    /// `fuse_lora`): the same function without the side path's two matmuls per linear, for
    /// sampling with fixed adapters. Returns how many linears.
    pub fn merge_lora(&mut self, name: &str) -> Result<usize, LoraError> {
        let has = |model: &dyn lora::Linears| lora::adapters(model).iter().any(|(n, _)| n == name);
        let mut count = 0;
        if has(&self.transformer) {
            count += lora::merge(&mut self.transformer, name)?;
        }
        for (_, encoder) in self.text.components_mut() {
            if has(&*encoder) {
                count += lora::merge(&mut *encoder, name)?;
            }
        }
        if count == 0 {
            return Err(LoraError::Unknown(name.to_string()));
        }
        Ok(count)
    }

    /// Detaches adapter `name` from every component; returns how many linears had it.
    pub fn remove_lora(&mut self, name: &str) -> usize {
        let mut count = lora::remove(&mut self.transformer, name);
        for (_, encoder) in self.text.components_mut() {
            count += lora::remove(&mut *encoder, name);
        }
        count
    }

    /// Writes the pipeline folder. Adapters must be merged first (`lora::merge`), or they would be
    /// silently left out.
    pub fn save_dir(&self, dir: &Path) -> Result<(), PipelineError> {
        let (TextStack::Clip(clip), Transformer::Sd3(transformer)) =
            (&self.text, &self.transformer)
        else {
            return Err(PipelineError::Folder {
                path: dir.to_path_buf(),
                message: format!(
                    "writing a whole `{}` folder is not supported; save adapters instead (`portaflow lora convert`)",
                    self.index.class_name
                ),
            });
        };
        let live: Vec<String> = lora::unmerged(transformer)
            .into_iter()
            .chain(lora::unmerged(&clip.model))
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
        let tokenizer_json = clip
            .tokenizer
            .tokenizer
            .to_string(true)
            .map_err(|e| TextError::Encode(e.to_string()))?;
        write(dir.join("tokenizer/tokenizer.json"), tokenizer_json)?;
        clip.model.save_dir(&dir.join("text_encoder"))?;
        transformer.save_dir(&dir.join("transformer"))?;
        if let Some(vae) = &self.vae {
            vae.save_dir(&dir.join("vae"))?;
        }
        Ok(())
    }

    /// The bundled architecture's parts (a CLIP and an SD3 transformer in pixel space).
    pub fn as_bundled(&self) -> Option<(&Encoder<ClipTextModel>, &Sd3Transformer)> {
        match (&self.text, &self.transformer) {
            (TextStack::Clip(clip), Transformer::Sd3(t)) if self.vae.is_none() => Some((clip, t)),
            _ => None,
        }
    }

    /// How many pixels one latent cell covers (1 in pixel space).
    pub fn vae_scale(&self) -> usize {
        self.vae.as_ref().map_or(1, |v| v.config.downscale())
    }

    /// Default image side in pixels: the bundled model's resolution, else the transformer's
    /// `sample_size` latent cells (SD3) or diffusers' 1024 (FLUX).
    pub fn resolution(&self) -> usize {
        if let Some(side) = self.index.pixel_resolution {
            return side;
        }
        match &self.transformer {
            Transformer::Sd3(t) => t.config.sample_size * self.vae_scale(),
            _ => 1024,
        }
    }

    /// Conditioning of `prompts` as the family's diffusers pipeline forms it.
    pub fn encode(
        &self,
        prompts: &[String],
        device: &Device,
    ) -> Result<Conditioning, PipelineError> {
        self.text.encode(prompts, device)
    }

    /// The sampler's latent shape `[c, h, w]` for an image of `height × width` pixels.
    pub fn latent_shape(&self, height: usize, width: usize) -> Result<[usize; 3], PipelineError> {
        let scale = self.vae_scale();
        // FLUX packs 2×2 latent cells into a token; FLUX.2's sampler latent is already packed.
        let (multiple, cell) = match &self.transformer {
            Transformer::Sd3(t) => (scale * t.config.patch_size, scale),
            Transformer::Flux1(_) => (2 * scale, scale),
            Transformer::Flux2(_) => (2 * scale, 2 * scale),
        };
        if height == 0
            || width == 0
            || !height.is_multiple_of(multiple)
            || !width.is_multiple_of(multiple)
        {
            return Err(SampleError::Invalid(format!(
                "image size {height}×{width} must be a positive multiple of {multiple} for this model"
            ))
            .into());
        }
        Ok([
            self.transformer.latent_channels(),
            height / cell,
            width / cell,
        ])
    }

    /// The denoising schedule of `steps` steps for a latent of `shape`.
    fn schedule(&self, steps: usize, shape: [usize; 3]) -> Result<Schedule, PipelineError> {
        let tokens = |cells: usize| (shape[1] / cells) * (shape[2] / cells);
        Ok(match &self.transformer {
            Transformer::Flux1(_) if self.scheduler.use_dynamic_shifting => {
                Schedule::dynamic(steps, flux_mu(tokens(2)))?
            }
            Transformer::Flux2(_) => {
                Schedule::dynamic(steps, flux2_empirical_mu(tokens(1), steps))?
            }
            _ => Schedule::shifted(steps, self.scheduler.shift)?,
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
        let x = self.generate_latents(prompts, options, device, on_step, cancel)?;
        Ok(to_images(self.decode(x)))
    }

    /// Latents → RGB in [−1, 1] `[b, 3, H, W]` (the VAE's decode in latent space).
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        match &self.vae {
            Some(vae) => vae.decode(latents),
            None => latents,
        }
    }

    /// Samples the final latents (before the VAE), one per seed.
    pub fn generate_latents(
        &self,
        prompts: &[String],
        options: &GenerateOptions,
        device: &Device,
        on_step: impl FnMut(Progress),
        cancel: Option<&AtomicBool>,
    ) -> Result<Tensor<4>, PipelineError> {
        let (cond, uncond) = self.conditioning(prompts, options, device)?;
        self.sample_conditioned(cond, uncond, options, device, on_step, cancel)
    }

    /// The prompts' conditioning at `guidance_scale` as the family's pipeline applies it (a
    /// guidance-distilled FLUX embeds the scale; a model that runs CFG also gets the empty
    /// prompt's conditioning), for trainers that sample without [`GenerateOptions`].
    pub fn guided_conditioning(
        &self,
        prompts: &[String],
        guidance_scale: f64,
        device: &Device,
    ) -> Result<(Conditioning, Option<Conditioning>), PipelineError> {
        let cond = self
            .transformer
            .with_embedded_guidance(self.encode(prompts, device)?, guidance_scale);
        let uncond = if self.runs_cfg(guidance_scale) {
            Some(self.encode(&vec![String::new(); prompts.len()], device)?)
        } else {
            None
        };
        Ok((cond, uncond))
    }

    /// The prompts' conditioning and, when the model runs CFG, the negative prompt's.
    pub fn conditioning(
        &self,
        prompts: &[String],
        options: &GenerateOptions,
        device: &Device,
    ) -> Result<(Conditioning, Option<Conditioning>), PipelineError> {
        let cond = self.encode(prompts, device)?;
        let uncond = if self.runs_cfg(options.guidance_scale) {
            let negatives = vec![options.negative_prompt.clone(); prompts.len()];
            Some(self.encode(&negatives, device)?)
        } else {
            None
        };
        Ok((cond, uncond))
    }

    /// Whether sampling runs classifier-free guidance, as the family's diffusers pipeline does
    /// by default: guidance-distilled FLUX takes the scale as an input instead, and
    /// `FluxPipeline` never runs CFG (its `true_cfg_scale` defaults to 1; schnell ignores the
    /// scale altogether).
    pub fn runs_cfg(&self, guidance_scale: f64) -> bool {
        guidance_scale > 1.0
            && !self.transformer.guidance_embeds()
            && !matches!(self.transformer, Transformer::Flux1(_))
    }

    /// Samples from conditioning computed beforehand (by this pipeline, or by its text
    /// encoders alone before they were freed: `--low-memory`).
    pub fn sample_conditioned(
        &self,
        cond: Conditioning,
        uncond: Option<Conditioning>,
        options: &GenerateOptions,
        device: &Device,
        on_step: impl FnMut(Progress),
        cancel: Option<&AtomicBool>,
    ) -> Result<Tensor<4>, PipelineError> {
        let prompts = cond.batch();
        if prompts != options.seeds.len() {
            return Err(SampleError::Invalid(format!(
                "{prompts} prompts for {} seeds",
                options.seeds.len()
            ))
            .into());
        }
        let side = self.resolution();
        let (height, width) = options.size.unwrap_or((side, side));
        let shape = self.latent_shape(height, width)?;
        let schedule = match &options.sigmas {
            Some(sigmas) => Schedule::explicit(sigmas)?,
            None => self.schedule(options.steps, shape)?,
        };
        let cond = self
            .transformer
            .with_embedded_guidance(cond, options.guidance_scale);
        let steps = schedule.steps();
        let mut plan = StepPlan::ode(steps);
        if options.kind != StepKind::Euler {
            // Stochastic on every step but the last, which lands on the data.
            for i in 0..steps.saturating_sub(1) {
                plan.stochastic[i] = true;
            }
        }
        let noise = NoiseSource::new(options.seeds.clone());
        let x = match &options.initial_noise {
            Some(x) => {
                let [b, c, h, w] = x.dims();
                if b != prompts || [c, h, w] != shape {
                    return Err(SampleError::Invalid(format!(
                        "initial noise is {:?}; this model samples {:?} for {prompts} prompt(s) at {height}×{width}",
                        x.dims(),
                        [prompts, shape[0], shape[1], shape[2]],
                    ))
                    .into());
                }
                x.clone()
            }
            None => noise.initial(shape, device),
        };
        let sample_options = SampleOptions {
            guidance_interval: options.guidance_interval,
            schedule: &schedule,
            kind: options.kind,
            plan,
            guidance_scale: if uncond.is_some() {
                options.guidance_scale
            } else {
                1.0
            },
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
        Ok(x)
    }
}

/// Initial noise from a safetensors file holding one tensor `[n, c, h, w]` (`generate
/// --latents`: e.g. the `latents` a diffusers pipeline was called with).
pub fn read_noise(path: &Path, device: &Device) -> Result<Tensor<4>, PipelineError> {
    let mut weights = crate::model::weights::Weights::open_file(path)?;
    let problem = |message: String| PipelineError::Folder {
        path: path.to_path_buf(),
        message,
    };
    let keys = weights.keys();
    let [key] = keys.as_slice() else {
        return Err(problem(format!(
            "expected one tensor (the initial noise), found {}: {keys:?}",
            keys.len()
        )));
    };
    let shape = weights.shape(key).unwrap_or_default();
    let [n, c, h, w] = shape[..] else {
        return Err(problem(format!(
            "`{key}` is {shape:?}, expected [n, c, h, w]"
        )));
    };
    Ok(weights.tensor(key, [n, c, h, w], device)?)
}

/// `model_index.json` (its class checked) and the scheduler settings of a folder.
fn read_index(dir: &Path) -> Result<(ModelIndex, SchedulerConfig), PipelineError> {
    if !dir.join("model_index.json").exists() {
        return Err(PipelineError::Folder {
            path: dir.to_path_buf(),
            message: "no model_index.json: not a pipeline folder".into(),
        });
    }
    let index: ModelIndex = crate::model::read_config(&dir.join("model_index.json"))?;
    if !SUPPORTED_CLASSES.contains(&index.class_name.as_str()) {
        return Err(PipelineError::Folder {
            path: dir.to_path_buf(),
            message: format!(
                "model_index.json names `{}`; supported pipelines: {}",
                index.class_name,
                SUPPORTED_CLASSES.join(", ")
            ),
        });
    }
    let scheduler = crate::model::read_config(&dir.join("scheduler/scheduler_config.json"))?;
    Ok((index, scheduler))
}

/// The text side of a folder of a supported class.
fn load_text_stack(
    dir: &Path,
    index: &ModelIndex,
    device: &Device,
) -> Result<TextStack, PipelineError> {
    Ok(match index.class_name.as_str() {
        BUNDLED_CLASS => {
            let model = clip::load_dir(&dir.join("text_encoder"), device)?;
            let tokenizer = PromptTokenizer::from_file(
                &dir.join("tokenizer/tokenizer.json"),
                model.config.max_position_embeddings,
                tokenizer::PAD,
            )?;
            TextStack::Clip(Encoder { tokenizer, model })
        }
        "StableDiffusion3Pipeline" => {
            let config: Sd3Config =
                crate::model::read_config(&dir.join("transformer/config.json"))?;
            TextStack::load_sd3(dir, config.joint_attention_dim, device)?
        }
        "FluxPipeline" => TextStack::load_flux1(dir, device)?,
        _ => TextStack::load_flux2(dir, device)?,
    })
}

fn pretty(value: &impl Serialize) -> String {
    serde_json::to_string_pretty(value).expect("plain data serialises")
}

/// RGB in [−1, 1] `[b, 3, h, w]` → 8-bit images.
pub fn to_images(x: Tensor<4>) -> Vec<Image> {
    images_from_data(x.into_data())
}

/// [`to_images`] for data already read back (the browser reads asynchronously).
pub fn images_from_data(data: TensorData) -> Vec<Image> {
    let [b, c, h, w]: [usize; 4] = data.shape().as_slice().try_into().expect("[b, 3, h, w]");
    let values: Vec<f32> = data
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_bundled_class_name_reads_as_the_current_one() {
        let json = |name: &str| {
            format!(
                r#"{{"_class_name": "{name}", "transformer": ["diffusers", "SD3Transformer2DModel"]}}"#
            )
        };
        let old: ModelIndex = serde_json::from_str(&json("PortaflowPixelPipeline")).unwrap();
        assert_eq!(old.class_name, BUNDLED_CLASS);
        let sd3: ModelIndex = serde_json::from_str(&json("StableDiffusion3Pipeline")).unwrap();
        assert_eq!(sd3.class_name, "StableDiffusion3Pipeline");
        // written back under the current name
        assert!(serde_json::to_string(&old).unwrap().contains(BUNDLED_CLASS));
    }
}
