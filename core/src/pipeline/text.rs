//! The text side of each pipeline family: which encoders a diffusers folder holds and how its
//! pipeline turns their outputs into the transformer's conditioning.
//!
//! - SD3 / SD3.5 (`pipeline_stable_diffusion_3.py`, `encode_prompt`): CLIP-L's and bigG's
//!   penultimate hidden states side by side, zero-padded to T5's width, then T5's last hidden
//!   state after them along the sequence (zeros when `text_encoder_3` is absent); the pooled
//!   vector is both CLIPs' projected end-token states side by side.
//! - FLUX.1 (`pipeline_flux.py`): the sequence is T5's last hidden state; the pooled vector is
//!   CLIP's `pooler_output` (no projection).
//! - FLUX.2-klein (`pipeline_flux2_klein.py`): Qwen3's hidden states at `text_encoder_out_layers`
//!   (9, 18, 27 by default), concatenated per token, on the chat-templated prompt; no pooled
//!   vector.
//! - The bundled Shapes model: one CLIP with projection, SD3's rule for a single encoder.

use std::path::Path;

use burn::tensor::{Device, Tensor};

use super::PipelineError;
use crate::lora::Linears;
use crate::sample::pipeline::Conditioning;
use crate::text::clip::{self, ClipTextModel};
use crate::text::qwen3::{self, Qwen3TextEncoder};
use crate::text::t5::{self, T5EncoderModel};
use crate::text::tokenizer::PromptTokenizer;

/// A tokenizer and the encoder it feeds.
pub struct Encoder<M> {
    pub tokenizer: PromptTokenizer,
    pub model: M,
}

/// Fails when the tokenizer can emit ids the encoder has no embedding for (a tokenizer folder
/// from another model).
fn check_vocabulary(
    dir: &Path,
    tokenizer: &PromptTokenizer,
    vocab_size: usize,
) -> Result<(), PipelineError> {
    let ids = tokenizer.tokenizer.get_vocab_size(true);
    if ids > vocab_size {
        return Err(PipelineError::Folder {
            path: dir.to_path_buf(),
            message: format!(
                "the tokenizer has {ids} tokens but its text encoder embeds only {vocab_size}: they belong to different models"
            ),
        });
    }
    Ok(())
}

/// The text encoders of a pipeline and their combination rule.
pub enum TextStack {
    /// The bundled Shapes model: one CLIP with projection (trained jointly by `pretrain`).
    Clip(Encoder<ClipTextModel>),
    Sd3 {
        clip_l: Encoder<ClipTextModel>,
        clip_g: Encoder<ClipTextModel>,
        t5: Option<Encoder<T5EncoderModel>>,
        /// Width of the joint sequence (T5's `d_model`, the transformer's `joint_attention_dim`).
        joint_width: usize,
    },
    Flux1 {
        clip: Encoder<ClipTextModel>,
        t5: Encoder<T5EncoderModel>,
    },
    Flux2 {
        qwen: Encoder<Qwen3TextEncoder>,
        layers: Vec<usize>,
    },
    /// Not loaded, or freed after encoding (`--low-memory`).
    Freed,
}

/// diffusers' default `max_sequence_length` of T5 (SD3: 256, FLUX.1: 512) and Qwen3 (klein: 512).
pub const SD3_MAX_SEQUENCE: usize = 256;
pub const FLUX1_MAX_SEQUENCE: usize = 512;
pub const FLUX2_MAX_SEQUENCE: usize = 512;
/// klein's default `text_encoder_out_layers`.
pub const KLEIN_LAYERS: [usize; 3] = [9, 18, 27];

fn clip_encoder(
    dir: &Path,
    tokenizer: &str,
    encoder: &str,
    device: &Device,
) -> Result<Encoder<ClipTextModel>, PipelineError> {
    let model = clip::load_dir(&dir.join(encoder), device)?;
    let tokenizer =
        PromptTokenizer::from_folder(&dir.join(tokenizer), model.config.max_position_embeddings)?;
    check_vocabulary(dir, &tokenizer, model.config.vocab_size)?;
    Ok(Encoder { tokenizer, model })
}

fn t5_encoder(
    dir: &Path,
    tokenizer: &str,
    encoder: &str,
    max_sequence: usize,
    device: &Device,
) -> Result<Encoder<T5EncoderModel>, PipelineError> {
    let encoder = Encoder {
        tokenizer: PromptTokenizer::from_folder(&dir.join(tokenizer), max_sequence)?,
        model: t5::load_dir(&dir.join(encoder), device)?,
    };
    check_vocabulary(dir, &encoder.tokenizer, encoder.model.config.vocab_size)?;
    Ok(encoder)
}

impl TextStack {
    /// SD3 / SD3.5: `text_encoder` (CLIP-L), `text_encoder_2` (bigG), optional `text_encoder_3`
    /// (T5); `joint_width` is the transformer's `joint_attention_dim`.
    pub fn load_sd3(
        dir: &Path,
        joint_width: usize,
        device: &Device,
    ) -> Result<Self, PipelineError> {
        let t5 = if dir.join("text_encoder_3").join("config.json").exists() {
            Some(t5_encoder(
                dir,
                "tokenizer_3",
                "text_encoder_3",
                SD3_MAX_SEQUENCE,
                device,
            )?)
        } else {
            None
        };
        let clip_l = clip_encoder(dir, "tokenizer", "text_encoder", device)?;
        let clip_g = clip_encoder(dir, "tokenizer_2", "text_encoder_2", device)?;
        let clip_width = clip_l.model.config.hidden_size + clip_g.model.config.hidden_size;
        let t5_width = t5.as_ref().map_or(joint_width, |t| t.model.config.d_model);
        if clip_width > joint_width || t5_width != joint_width {
            return Err(PipelineError::Folder {
                path: dir.to_path_buf(),
                message: format!(
                    "the transformer's joint_attention_dim is {joint_width}; the CLIP encoders give {clip_width} and T5 {t5_width} (CLIP widths must fit, T5 must equal it)"
                ),
            });
        }
        Ok(Self::Sd3 {
            clip_l,
            clip_g,
            t5,
            joint_width,
        })
    }

    /// FLUX.1: `text_encoder` (CLIP-L) and `text_encoder_2` (T5).
    pub fn load_flux1(dir: &Path, device: &Device) -> Result<Self, PipelineError> {
        Ok(Self::Flux1 {
            clip: clip_encoder(dir, "tokenizer", "text_encoder", device)?,
            t5: t5_encoder(
                dir,
                "tokenizer_2",
                "text_encoder_2",
                FLUX1_MAX_SEQUENCE,
                device,
            )?,
        })
    }

    /// FLUX.2-klein: `text_encoder` (Qwen3) read at klein's default layers.
    pub fn load_flux2(dir: &Path, device: &Device) -> Result<Self, PipelineError> {
        let qwen = Encoder {
            tokenizer: PromptTokenizer::from_folder(&dir.join("tokenizer"), FLUX2_MAX_SEQUENCE)?,
            model: qwen3::load_dir(&dir.join("text_encoder"), device)?,
        };
        check_vocabulary(dir, &qwen.tokenizer, qwen.model.config.vocab_size)?;
        Ok(Self::Flux2 {
            qwen,
            layers: KLEIN_LAYERS.to_vec(),
        })
    }

    /// The text encoders by diffusers component name (`text_encoder`, `text_encoder_2`, …), for
    /// LoRA adapters that target them.
    pub fn components_mut(&mut self) -> Vec<(&'static str, &mut dyn Linears)> {
        match self {
            Self::Freed => Vec::new(),
            Self::Clip(clip) => vec![("text_encoder", &mut clip.model as &mut dyn Linears)],
            Self::Sd3 {
                clip_l, clip_g, t5, ..
            } => {
                let mut parts: Vec<(&'static str, &mut dyn Linears)> = vec![
                    ("text_encoder", &mut clip_l.model),
                    ("text_encoder_2", &mut clip_g.model),
                ];
                if let Some(t5) = t5 {
                    parts.push(("text_encoder_3", &mut t5.model));
                }
                parts
            }
            Self::Flux1 { clip, t5 } => vec![
                ("text_encoder", &mut clip.model as &mut dyn Linears),
                ("text_encoder_2", &mut t5.model),
            ],
            Self::Flux2 { qwen, .. } => vec![("text_encoder", &mut qwen.model as &mut dyn Linears)],
        }
    }

    /// Words of `prompt` a word-level tokenizer does not know (the bundled model); byte-level
    /// tokenizers know every word.
    pub fn unknown_words(&self, prompt: &str) -> Vec<String> {
        match self {
            Self::Clip(clip) => clip.tokenizer.unknown_words(prompt),
            _ => Vec::new(),
        }
    }

    /// Parameter count of every encoder.
    pub fn parameters(&self) -> usize {
        use burn::module::Module;
        match self {
            Self::Freed => 0,
            Self::Clip(clip) => clip.model.num_params(),
            Self::Sd3 {
                clip_l, clip_g, t5, ..
            } => {
                clip_l.model.num_params()
                    + clip_g.model.num_params()
                    + t5.as_ref().map_or(0, |t| t.model.num_params())
            }
            Self::Flux1 { clip, t5 } => clip.model.num_params() + t5.model.num_params(),
            Self::Flux2 { qwen, .. } => qwen.model.num_params(),
        }
    }

    /// The same encoders without autodiff (for sampling next to a model being trained).
    pub fn valid(self) -> Self {
        fn plain<M: burn::module::Module>(e: Encoder<M>) -> Encoder<M> {
            Encoder {
                model: e.model.valid(),
                tokenizer: e.tokenizer,
            }
        }
        match self {
            Self::Freed => Self::Freed,
            Self::Clip(clip) => Self::Clip(plain(clip)),
            Self::Sd3 {
                clip_l,
                clip_g,
                t5,
                joint_width,
            } => Self::Sd3 {
                clip_l: plain(clip_l),
                clip_g: plain(clip_g),
                t5: t5.map(plain),
                joint_width,
            },
            Self::Flux1 { clip, t5 } => Self::Flux1 {
                clip: plain(clip),
                t5: plain(t5),
            },
            Self::Flux2 { qwen, layers } => Self::Flux2 {
                qwen: plain(qwen),
                layers,
            },
        }
    }

    /// FLUX.2-klein: which Qwen3 hidden states are stacked (`text_encoder_out_layers`).
    pub fn set_text_layers(&mut self, asked: Vec<usize>) -> Result<(), PipelineError> {
        let Self::Flux2 { qwen, layers } = self else {
            return Err(PipelineError::Folder {
                path: "text_encoder".into(),
                message: "text_encoder_out_layers applies to FLUX.2-klein's Qwen3 only".into(),
            });
        };
        let depth = qwen.model.config.num_hidden_layers;
        if asked.is_empty() || asked.iter().any(|&l| l == 0 || l > depth) {
            return Err(PipelineError::Folder {
                path: "text_encoder".into(),
                message: format!(
                    "text_encoder_out_layers {asked:?}: the Qwen3 encoder has {depth} layers (valid: 1..={depth})"
                ),
            });
        }
        *layers = asked;
        Ok(())
    }

    /// Width of the sequence `encode` produces.
    pub fn sequence_width(&self) -> usize {
        match self {
            Self::Freed => 0,
            Self::Clip(clip) => clip.model.config.hidden_size,
            Self::Sd3 { joint_width, .. } => *joint_width,
            Self::Flux1 { t5, .. } => t5.model.config.d_model,
            Self::Flux2 { qwen, layers } => layers.len() * qwen.model.config.hidden_size,
        }
    }

    /// Sets the long encoder's sequence length (diffusers' `max_sequence_length`).
    pub fn set_max_sequence_length(&mut self, length: usize) {
        match self {
            Self::Sd3 { t5: Some(t5), .. } | Self::Flux1 { t5, .. } => {
                t5.tokenizer.max_length = length
            }
            Self::Sd3 { .. } | Self::Clip(_) | Self::Freed => {}
            Self::Flux2 { qwen, .. } => qwen.tokenizer.max_length = length,
        }
    }

    /// The transformer's conditioning for `prompts`.
    ///
    /// # Shapes
    /// - SD3: sequence `[b, 77 + L, joint]`, pooled `[b, p_l + p_g]`; FLUX.1: `[b, L, d_t5]`,
    ///   `[b, d_clip]`; FLUX.2: `[b, L, layers·hidden]`, no pooled
    pub fn encode(
        &self,
        prompts: &[String],
        device: &Device,
    ) -> Result<Conditioning, PipelineError> {
        let clip_penultimate = |e: &Encoder<ClipTextModel>| -> Result<_, PipelineError> {
            let out = e.model.forward(&e.tokenizer.encode(prompts)?, device);
            Ok((
                out.hidden_states[out.hidden_states.len() - 2].clone(),
                out.pooled,
            ))
        };
        Ok(match self {
            Self::Freed => {
                return Err(PipelineError::Folder {
                    path: "text_encoder".into(),
                    message:
                        "the text encoders are not loaded (--low-memory frees them after encoding)"
                            .into(),
                });
            }
            Self::Clip(clip) => {
                let (sequence, pooled) = clip_penultimate(clip)?;
                Conditioning {
                    sequence,
                    pooled: Some(pooled),
                    guidance: None,
                }
            }
            Self::Sd3 {
                clip_l,
                clip_g,
                t5,
                joint_width,
            } => {
                let (l, pooled_l) = clip_penultimate(clip_l)?;
                let (g, pooled_g) = clip_penultimate(clip_g)?;
                let clip = Tensor::cat(vec![l, g], 2);
                let [b, clip_seq, clip_width] = clip.dims();
                // [b, 77, d_l + d_g] → [b, 77, joint]: zeros on the right
                let clip = Tensor::cat(
                    vec![
                        clip,
                        Tensor::zeros([b, clip_seq, joint_width - clip_width], device),
                    ],
                    2,
                );
                let long = match t5 {
                    Some(t5) => t5.model.forward(&t5.tokenizer.encode(prompts)?, device),
                    None => Tensor::zeros([b, SD3_MAX_SEQUENCE, *joint_width], device),
                };
                Conditioning {
                    sequence: Tensor::cat(vec![clip, long], 1),
                    pooled: Some(Tensor::cat(vec![pooled_l, pooled_g], 1)),
                    guidance: None,
                }
            }
            Self::Flux1 { clip, t5 } => {
                let pooled = clip
                    .model
                    .forward(&clip.tokenizer.encode(prompts)?, device)
                    .pooled;
                Conditioning {
                    sequence: t5.model.forward(&t5.tokenizer.encode(prompts)?, device),
                    pooled: Some(pooled),
                    guidance: None,
                }
            }
            Self::Flux2 { qwen, layers } => {
                let templated: Vec<String> =
                    prompts.iter().map(|p| qwen3::chat_prompt(p)).collect();
                let encoded = qwen.tokenizer.encode_with_mask(&templated)?;
                let depth = qwen.model.config.num_hidden_layers;
                if layers.is_empty() || layers.iter().any(|&l| l == 0 || l > depth) {
                    return Err(PipelineError::Folder {
                        path: "text_encoder".into(),
                        message: format!(
                            "text_encoder_out_layers {layers:?} do not fit a Qwen3 encoder of {depth} layers; set them (--text-encoder-out-layers)"
                        ),
                    });
                }
                let deepest = layers.iter().copied().max().unwrap_or(0);
                let states = qwen
                    .model
                    .hidden_states(&encoded.ids, &encoded.mask, deepest, device);
                // per token [layer a; layer b; …]: [b, L, layers·hidden]
                let picked = layers.iter().map(|&i| states[i].clone()).collect();
                Conditioning {
                    sequence: Tensor::cat(picked, 2),
                    pooled: None,
                    guidance: None,
                }
            }
        })
    }
}
