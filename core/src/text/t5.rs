//! T5 encoder (transformers `T5EncoderModel`; SD3's `text_encoder_3` and FLUX.1's
//! `text_encoder_2` are T5 v1.1 XXL): a shared token embedding, pre-RMSNorm blocks of
//! bidirectional self-attention without score scaling plus a (gated) feed-forward, relative
//! position biases computed by the first block and shared by all, a final RMSNorm. Mirrors
//! `transformers/models/t5/modeling_t5.py`. Parameter paths equal transformers' keys
//! (`encoder.block.{i}.layer.0.SelfAttention.q`); diffusers calls it without an attention mask,
//! so padding tokens are attended to, as here.

use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::{gelu, relu, silu};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::model::layers::{Embedding, Linear, RmsNorm, merge_heads, split_heads};
use crate::model::weights::{LoadError, Weights};

/// transformers' `T5Config` fields the encoder uses (others in `config.json` are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `"relu"` (T5 v1.0), `"gated-gelu"` (v1.1: tanh-approximate GELU), `"gated-silu"`, …
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

impl T5Config {
    /// (gated, activation) as transformers parses `feed_forward_proj`: `"gated-gelu"` means the
    /// tanh-approximate `gelu_new`.
    fn feed_forward(&self) -> Result<(bool, &str), String> {
        let (gated, act) = match self.feed_forward_proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, self.feed_forward_proj.as_str()),
            _ => return Err(self.unsupported_ff()),
        };
        let act = match (gated, act) {
            (true, "gelu") => "gelu_new",
            (_, "relu" | "gelu" | "silu" | "gelu_new") => act,
            _ => return Err(self.unsupported_ff()),
        };
        Ok((gated, act))
    }

    fn unsupported_ff(&self) -> String {
        format!(
            "feed_forward_proj `{}` is not supported (relu, gelu, silu, gated-relu, gated-gelu, gated-silu)",
            self.feed_forward_proj
        )
    }

    pub fn validate(&self) -> Result<(), String> {
        self.feed_forward()?;
        if self.num_heads == 0 || self.relative_attention_num_buckets < 4 {
            return Err("num_heads must be positive and relative_attention_num_buckets ≥ 4".into());
        }
        Ok(())
    }
}

/// `SelfAttention`: q, k, v, o without biases; the first block also owns the relative position
/// bias table `[num_buckets, num_heads]`.
#[derive(Module, Debug)]
pub struct T5Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub relative_attention_bias: Option<Embedding>,
}

/// `layer.0`: RMSNorm then self-attention.
#[derive(Module, Debug)]
pub struct T5SelfAttentionLayer {
    pub self_attention: T5Attention,
    pub layer_norm: RmsNorm,
}

/// `layer.1.DenseReluDense`: `wi` (or gated `wi_0`, `wi_1`) then `wo`.
#[derive(Module, Debug)]
pub struct T5DenseActDense {
    pub wi: Option<Linear>,
    pub wi_0: Option<Linear>,
    pub wi_1: Option<Linear>,
    pub wo: Linear,
}

/// `layer.1`: RMSNorm then the feed-forward.
#[derive(Module, Debug)]
pub struct T5FeedForwardLayer {
    pub dense_relu_dense: T5DenseActDense,
    pub layer_norm: RmsNorm,
}

#[derive(Module, Debug)]
pub struct T5Block {
    pub attention: T5SelfAttentionLayer,
    pub feed_forward: T5FeedForwardLayer,
}

#[derive(Module, Debug)]
pub struct T5Stack {
    pub block: Vec<T5Block>,
    pub final_layer_norm: RmsNorm,
}

/// `T5EncoderModel`.
#[derive(Module, Debug)]
pub struct T5EncoderModel {
    pub shared: Embedding,
    pub encoder: T5Stack,
    #[module(skip)]
    pub config: T5Config,
}

crate::linears!(T5Attention: q, k, v, o);
crate::linears!(T5SelfAttentionLayer: self_attention);
crate::linears!(T5DenseActDense: wi, wi_0, wi_1, wo);
crate::linears!(T5FeedForwardLayer: dense_relu_dense);
crate::linears!(T5Block: attention, feed_forward);
crate::linears!(T5Stack: block);
crate::linears!(T5EncoderModel: encoder);

/// transformers' `_relative_position_bucket` for a bidirectional encoder: half the buckets for
/// keys after the query; within each half, exact buckets for distances below `buckets/4` and
/// log-spaced ones up to `max_distance`.
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let distance = relative.abs();
    let max_exact = half / 2;
    if distance < max_exact {
        bucket += distance;
    } else {
        // f32 as torch computes it, truncated towards zero by `.to(torch.long)`.
        let large = max_exact
            + ((distance as f32 / max_exact as f32).ln()
                / (max_distance as f32 / max_exact as f32).ln()
                * (half - max_exact) as f32) as i64;
        bucket += large.min(half - 1);
    }
    bucket as usize
}

impl T5EncoderModel {
    /// Loads transformers-layout weights, checking coverage. The token table is `shared.weight`;
    /// a tied copy under `encoder.embed_tokens.weight` is accepted in its place or beside it.
    pub fn load(
        config: T5Config,
        mut weights: Weights,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let w = &mut weights;
        let (gated, _) = config.feed_forward().map_err(|message| LoadError::Config {
            path: "config.json".into(),
            message,
        })?;
        let (d, inner, eps) = (
            config.d_model,
            config.num_heads * config.d_kv,
            config.layer_norm_epsilon,
        );
        let table = if w.contains("shared.weight") {
            w.skip("encoder.embed_tokens.weight");
            "shared"
        } else {
            "encoder.embed_tokens"
        };
        let shared = Embedding::load(w, table, config.vocab_size, d, device)?;
        let lin = |w: &mut Weights, key: String, d_in, d_out| {
            Linear::load(w, &key, d_in, d_out, false, device)
        };
        let norm = |w: &mut Weights, key: String| {
            RmsNorm::load(w, &key, d, device).map(|n| n.with_eps(eps))
        };
        let block = (0..config.num_layers)
            .map(|i| {
                let a = format!("encoder.block.{i}.layer.0.SelfAttention");
                let f = format!("encoder.block.{i}.layer.1.DenseReluDense");
                let relative_attention_bias = if i == 0 {
                    Some(Embedding::load(
                        w,
                        &format!("{a}.relative_attention_bias"),
                        config.relative_attention_num_buckets,
                        config.num_heads,
                        device,
                    )?)
                } else {
                    None
                };
                let (wi, wi_0, wi_1) = if gated {
                    (
                        None,
                        Some(lin(w, format!("{f}.wi_0"), d, config.d_ff)?),
                        Some(lin(w, format!("{f}.wi_1"), d, config.d_ff)?),
                    )
                } else {
                    (Some(lin(w, format!("{f}.wi"), d, config.d_ff)?), None, None)
                };
                Ok(T5Block {
                    attention: T5SelfAttentionLayer {
                        self_attention: T5Attention {
                            q: lin(w, format!("{a}.q"), d, inner)?,
                            k: lin(w, format!("{a}.k"), d, inner)?,
                            v: lin(w, format!("{a}.v"), d, inner)?,
                            o: lin(w, format!("{a}.o"), inner, d)?,
                            relative_attention_bias,
                        },
                        layer_norm: norm(
                            w,
                            format!("encoder.block.{i}.layer.0.layer_norm.weight"),
                        )?,
                    },
                    feed_forward: T5FeedForwardLayer {
                        dense_relu_dense: T5DenseActDense {
                            wi,
                            wi_0,
                            wi_1,
                            wo: lin(w, format!("{f}.wo"), config.d_ff, d)?,
                        },
                        layer_norm: norm(
                            w,
                            format!("encoder.block.{i}.layer.1.layer_norm.weight"),
                        )?,
                    },
                })
            })
            .collect::<Result<_, LoadError>>()?;
        let final_layer_norm = norm(w, "encoder.final_layer_norm.weight".into())?;
        weights.finish()?;
        Ok(Self {
            shared,
            encoder: T5Stack {
                block,
                final_layer_norm,
            },
            config,
        })
    }

    /// The position bias every layer adds to its attention scores.
    ///
    /// # Shapes
    /// - returns `[1, heads, seq, seq]`
    fn position_bias(&self, seq: usize, device: &Device) -> Tensor<4> {
        let table = &self.encoder.block[0]
            .attention
            .self_attention
            .relative_attention_bias
            .as_ref()
            .expect("the first block owns the bias table");
        let buckets: Vec<i64> = (0..seq)
            .flat_map(|q| {
                (0..seq).map(move |k| {
                    relative_position_bucket(
                        k as i64 - q as i64,
                        self.config.relative_attention_num_buckets,
                        self.config.relative_attention_max_distance,
                    ) as i64
                })
            })
            .collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(buckets, [1, seq * seq]), device);
        // [1, seq·seq, heads] → [1, seq, seq, heads] → [1, heads, seq, seq]
        table
            .forward(ids)
            .reshape([1, seq, seq, self.config.num_heads])
            .permute([0, 3, 1, 2])
    }

    /// The encoder's last hidden state (after the final RMSNorm).
    ///
    /// # Shapes
    /// - `ids`: `b` rows of equal length `seq` → `[b, seq, d_model]`
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Tensor<3> {
        let (b, seq) = (ids.len(), ids.first().map_or(0, Vec::len));
        let flat: Vec<i64> = ids.iter().flatten().map(|&t| t as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, seq]), device);
        let mut x = self.shared.forward(ids);
        let bias = self.position_bias(seq, device);
        let heads = self.config.num_heads;
        let (_, act) = self.config.feed_forward().expect("validated at load");
        let activate = |h: Tensor<3>| match act {
            "relu" => relu(h),
            "gelu" => gelu(h),
            "gelu_new" => crate::model::layers::gelu_tanh(h),
            _ => silu(h),
        };
        for block in &self.encoder.block {
            let attn = &block.attention.self_attention;
            let h = block.attention.layer_norm.forward(x.clone());
            let q = split_heads(attn.q.forward(h.clone()), heads);
            let k = split_heads(attn.k.forward(h.clone()), heads);
            let v = split_heads(attn.v.forward(h), heads);
            // T5 does not scale its scores by 1/√d_kv (the init absorbs it).
            let options = AttentionModuleOptions {
                scale: Some(1.0),
                ..Default::default()
            };
            let a = attention(q, k, v, None, Some(bias.clone()), options);
            x = x + attn.o.forward(merge_heads(a));
            let ff = &block.feed_forward.dense_relu_dense;
            let h = block.feed_forward.layer_norm.forward(x.clone());
            let h = match (&ff.wi, &ff.wi_0, &ff.wi_1) {
                (Some(wi), _, _) => activate(wi.forward(h)),
                (None, Some(wi_0), Some(wi_1)) => {
                    activate(wi_0.forward(h.clone())) * wi_1.forward(h)
                }
                _ => unreachable!("built with wi or wi_0 and wi_1"),
            };
            x = x + ff.wo.forward(h);
        }
        self.encoder.final_layer_norm.forward(x)
    }
}

impl crate::model::Family for T5EncoderModel {
    type Config = T5Config;
    const WEIGHTS: &'static str = "model";

    fn validate(config: &T5Config) -> Result<(), String> {
        config.validate()
    }

    fn from_weights(
        config: T5Config,
        weights: Weights,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Self::load(config, weights, device)
    }
}

/// Loads a transformers text-encoder folder (`config.json` + `model.safetensors` or shards).
pub fn load_dir(dir: &Path, device: &Device) -> Result<T5EncoderModel, LoadError> {
    <T5EncoderModel as crate::model::Family>::load_dir(dir, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_buckets_match_transformers() {
        // torch: T5Attention._relative_position_bucket(arange(-200, 201, 50)[...], True, 32, 128)
        let relative = [
            -200, -150, -100, -50, -9, -8, -7, -1, 0, 1, 7, 8, 9, 50, 100, 150, 200,
        ];
        let expected = [
            15, 15, 15, 13, 8, 8, 7, 1, 0, 17, 23, 24, 24, 29, 31, 31, 31,
        ];
        for (r, e) in relative.iter().zip(expected) {
            assert_eq!(relative_position_bucket(*r, 32, 128), e, "relative {r}");
        }
    }
}
