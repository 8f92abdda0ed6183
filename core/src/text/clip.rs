//! CLIP text encoder (transformers `CLIPTextModel` / `CLIPTextModelWithProjection`): token and
//! position embeddings, pre-LN transformer layers with causal self-attention, a final LayerNorm,
//! the pooled vector at the end token and an optional projection. Field paths equal
//! transformers' keys (`text_model.encoder.layers.{i}.self_attn.q_proj` →
//! `text_model.encoder_layers[i].self_attn.q_proj`).

use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::model::layers::{Embedding, LayerNorm, Linear, merge_heads, split_heads};
use crate::model::weights::{Alias, LoadError, Weights};

/// transformers' `CLIPTextConfig` fields (others in `config.json` are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Width of `text_projection` (used when the checkpoint has one).
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// `"quick_gelu"` (CLIP-L) or `"gelu"` (OpenCLIP bigG).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub bos_token_id: u32,
    /// Pooling position: the first end token; transformers' legacy value 2 means "largest id".
    pub eos_token_id: u32,
    #[serde(default)]
    pub pad_token_id: u32,
}

fn default_projection_dim() -> usize {
    512
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(format!(
                "hidden_act `{}` is not supported (quick_gelu, gelu)",
                self.hidden_act
            ));
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}

#[derive(Module, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
}

crate::linears!(ClipAttention: q_proj, k_proj, v_proj, out_proj);

#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

crate::linears!(ClipMlp: fc1, fc2);

#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

crate::linears!(ClipEncoderLayer: self_attn, mlp);

impl ClipEncoderLayer {
    /// Pre-LN self-attention and MLP with residuals; causal for text, bidirectional for images;
    /// QuickGELU (`x·sigmoid(1.702x)`) or exact GELU.
    ///
    /// # Shapes
    /// - `x`: `[b, seq, d]` → `[b, seq, d]`
    pub fn forward(&self, x: Tensor<3>, heads: usize, causal: bool, quick_gelu: bool) -> Tensor<3> {
        let attn = &self.self_attn;
        let h = self.layer_norm1.forward(x.clone());
        let q = split_heads(attn.q_proj.forward(h.clone()), heads);
        let k = split_heads(attn.k_proj.forward(h.clone()), heads);
        let v = split_heads(attn.v_proj.forward(h), heads);
        let options = AttentionModuleOptions {
            is_causal: causal,
            ..Default::default()
        };
        let a = merge_heads(attention(q, k, v, None, None, options));
        let x = x + attn.out_proj.forward(a);
        let h = self.mlp.fc1.forward(self.layer_norm2.forward(x.clone()));
        let h = if quick_gelu {
            h.clone() * sigmoid(h.mul_scalar(1.702))
        } else {
            gelu(h)
        };
        x + self.mlp.fc2.forward(h)
    }

    /// A layer of width `d` and MLP width `hidden` at `prefix` (`….encoder.layers.{i}`).
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        d: usize,
        hidden: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let lin = |w: &mut Weights, key: String, d_in, d_out| {
            Linear::load(w, &key, d_in, d_out, true, device)
        };
        let p = prefix;
        Ok(Self {
            self_attn: ClipAttention {
                q_proj: lin(w, format!("{p}.self_attn.q_proj"), d, d)?,
                k_proj: lin(w, format!("{p}.self_attn.k_proj"), d, d)?,
                v_proj: lin(w, format!("{p}.self_attn.v_proj"), d, d)?,
                out_proj: lin(w, format!("{p}.self_attn.out_proj"), d, d)?,
            },
            layer_norm1: LayerNorm::load(w, &format!("{p}.layer_norm1"), d, eps, device)?,
            mlp: ClipMlp {
                fc1: lin(w, format!("{p}.mlp.fc1"), d, hidden)?,
                fc2: lin(w, format!("{p}.mlp.fc2"), hidden, d)?,
            },
            layer_norm2: LayerNorm::load(w, &format!("{p}.layer_norm2"), d, eps, device)?,
        })
    }
}

#[derive(Module, Debug)]
pub struct ClipEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

/// `text_model.*`
#[derive(Module, Debug)]
pub struct ClipTextTransformer {
    pub embeddings: ClipEmbeddings,
    pub encoder_layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
}

crate::linears!(ClipTextTransformer: encoder_layers);

/// The whole encoder; `text_projection` is present for `CLIPTextModelWithProjection`.
#[derive(Module, Debug)]
pub struct ClipTextModel {
    pub text_model: ClipTextTransformer,
    pub text_projection: Option<Linear>,
    #[module(skip)]
    pub config: ClipTextConfig,
}

crate::linears!(ClipTextModel: text_model, text_projection);

/// What an encoder pass gives: every hidden state, the final normalised sequence and the pooled
/// (projected if the model has a projection) vector.
pub struct ClipTextOutput {
    /// Embedding output then each layer's output: `num_hidden_layers + 1` tensors `[b, seq, d]`.
    pub hidden_states: Vec<Tensor<3>>,
    /// `final_layer_norm` of the last layer: `[b, seq, d]`.
    pub last_hidden_state: Tensor<3>,
    /// `[b, projection_dim]` with a projection, else `[b, d]`.
    pub pooled: Tensor<2>,
}

impl ClipTextModel {
    /// Loads transformers-layout weights, checking coverage. A `text_projection.weight` in the
    /// file makes it the `WithProjection` variant.
    pub fn load(
        config: ClipTextConfig,
        mut w: Weights,
        device: &Device,
    ) -> Result<Self, LoadError> {
        // transformers 5 writes `CLIPTextModel` without the `text_model.` prefix that older
        // checkpoints (and every `WithProjection` one) carry; read either.
        if !w.contains("text_model.embeddings.token_embedding.weight") {
            for key in w.keys() {
                if key.starts_with("embeddings.")
                    || key.starts_with("encoder.")
                    || key.starts_with("final_layer_norm.")
                {
                    let alias = Alias {
                        source: key.clone(),
                        rows: None,
                        swap_halves: false,
                    };
                    w.alias(format!("text_model.{key}"), alias);
                }
            }
        }
        let with_projection = w.contains("text_projection.weight");
        let model = Self::build(config, &mut w, with_projection, device)?;
        w.finish()?;
        Ok(model)
    }

    /// A fresh `WithProjection` encoder drawn from the initialisation rule (seeded).
    pub fn init(config: ClipTextConfig, seed: u64, device: &Device) -> Self {
        let mut w = Weights::initializer(seed);
        Self::build(config, &mut w, true, device).expect("initialisation cannot miss a key")
    }

    fn build(
        config: ClipTextConfig,
        w: &mut Weights,
        with_projection: bool,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        let encoder_layers = (0..config.num_hidden_layers)
            .map(|i| {
                ClipEncoderLayer::load(
                    w,
                    &format!("text_model.encoder.layers.{i}"),
                    d,
                    config.intermediate_size,
                    eps,
                    device,
                )
            })
            .collect::<Result<_, LoadError>>()?;
        Ok(Self {
            text_model: ClipTextTransformer {
                embeddings: ClipEmbeddings {
                    token_embedding: Embedding::load(
                        w,
                        "text_model.embeddings.token_embedding",
                        config.vocab_size,
                        d,
                        device,
                    )?,
                    position_embedding: Embedding::load(
                        w,
                        "text_model.embeddings.position_embedding",
                        config.max_position_embeddings,
                        d,
                        device,
                    )?,
                },
                encoder_layers,
                final_layer_norm: LayerNorm::load(
                    w,
                    "text_model.final_layer_norm",
                    d,
                    eps,
                    device,
                )?,
            },
            text_projection: if with_projection {
                Some(Linear::load(
                    w,
                    "text_projection",
                    d,
                    config.projection_dim,
                    false,
                    device,
                )?)
            } else {
                None
            },
            config,
        })
    }

    /// Where each sequence is pooled: the first end token (or, with transformers' legacy
    /// `eos_token_id == 2`, the largest id); the last position if there is none.
    pub fn pooling_positions(&self, ids: &[Vec<u32>]) -> Vec<usize> {
        ids.iter()
            .map(|row| {
                let found = if self.config.eos_token_id == 2 {
                    let max = row.iter().max().copied();
                    row.iter().position(|&t| Some(t) == max)
                } else {
                    row.iter().position(|&t| t == self.config.eos_token_id)
                };
                found.unwrap_or(row.len().saturating_sub(1))
            })
            .collect()
    }

    /// # Shapes
    /// - `ids`: `b` rows of equal length `seq ≤ max_position_embeddings`
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> ClipTextOutput {
        let (b, seq) = (ids.len(), ids.first().map_or(0, Vec::len));
        let d = self.config.hidden_size;
        let flat: Vec<i64> = ids.iter().flatten().map(|&t| t as i64).collect();
        let ids_tensor = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, seq]), device);
        let embeddings = &self.text_model.embeddings;
        let positions: Tensor<3> = embeddings
            .position_embedding
            .weight
            .val()
            .slice([0..seq, 0..d])
            .unsqueeze();
        let mut x = embeddings.token_embedding.forward(ids_tensor) + positions;
        let mut hidden_states = vec![x.clone()];
        let heads = self.config.num_attention_heads;
        let quick_gelu = self.config.hidden_act != "gelu";
        for layer in &self.text_model.encoder_layers {
            x = layer.forward(x, heads, true, quick_gelu);
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.text_model.final_layer_norm.forward(x);
        let rows: Vec<i64> = self
            .pooling_positions(ids)
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * seq + p) as i64)
            .collect();
        // [b·seq, d] rows at the pooling positions → [b, d]
        let pooled = last_hidden_state.clone().reshape([b * seq, d]).select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(rows, [b]), device),
        );
        let pooled = match &self.text_projection {
            Some(projection) => projection.forward(pooled),
            None => pooled,
        };
        ClipTextOutput {
            hidden_states,
            last_hidden_state,
            pooled,
        }
    }
}

impl ClipTextModel {
    /// Writes `config.json` and `model.safetensors` in transformers' layout.
    pub fn save_dir(&self, dir: &Path) -> Result<(), LoadError> {
        let mut config = serde_json::to_value(&self.config).expect("config serialises");
        config["architectures"] = serde_json::json!([if self.text_projection.is_some() {
            "CLIPTextModelWithProjection"
        } else {
            "CLIPTextModel"
        }]);
        config["model_type"] = "clip_text_model".into();
        let tensors = crate::model::export::checkpoint_tensors(self, &Default::default());
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        crate::model::export::save_component(
            dir,
            &config,
            "model.safetensors",
            &tensors,
            Some(metadata),
        )
    }
}

impl crate::model::Family for ClipTextModel {
    type Config = ClipTextConfig;
    const WEIGHTS: &'static str = "model";

    fn validate(config: &ClipTextConfig) -> Result<(), String> {
        config.validate()
    }

    fn from_weights(
        config: ClipTextConfig,
        weights: Weights,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Self::load(config, weights, device)
    }
}

/// Loads a transformers text-encoder folder (`config.json` + `model.safetensors` or shards).
pub fn load_dir(dir: &Path, device: &Device) -> Result<ClipTextModel, LoadError> {
    <ClipTextModel as crate::model::Family>::load_dir(dir, device)
}
