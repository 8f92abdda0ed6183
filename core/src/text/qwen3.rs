//! Qwen3 decoder used as a text encoder (FLUX.2-klein's `text_encoder`, transformers
//! `Qwen3ForCausalLM`): token embedding, pre-RMSNorm layers of causal grouped-query attention with
//! per-head q/k RMSNorm and rotate-half RoPE, SwiGLU MLPs, a final RMSNorm. Mirrors
//! `transformers/models/qwen3/modeling_qwen3.py`. FLUX.2-klein conditions on the hidden states of
//! a few layers (9, 18, 27 for klein-4B), so the forward stops after the deepest one asked for;
//! the language-model head is never used (a stored `lm_head.weight` is accepted and ignored).

use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::model::layers::{Embedding, Linear, RmsNorm, merge_heads, split_heads};
use crate::model::weights::{LoadError, Weights};

/// transformers' `Qwen3Config` fields the encoder uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// transformers < 5 stores θ here; 5.x moved it into `rope_parameters`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
}

/// `rope_parameters` of transformers 5.x configs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
    pub rope_theta: f64,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_hidden_act() -> String {
    "silu".into()
}
fn default_rope_type() -> String {
    "default".into()
}

impl Qwen3Config {
    /// RoPE base θ from either config generation (Qwen3's default 1e6).
    pub fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(1_000_000.0)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act `{}` is not supported (silu)",
                self.hidden_act
            ));
        }
        if let Some(r) = &self.rope_parameters
            && r.rope_type != "default"
        {
            return Err(format!(
                "rope_type `{}` is not supported (default)",
                r.rope_type
            ));
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
            || !self.head_dim.is_multiple_of(2)
        {
            return Err(format!(
                "num_attention_heads {} must be a multiple of num_key_value_heads {} and head_dim {} even",
                self.num_attention_heads, self.num_key_value_heads, self.head_dim
            ));
        }
        Ok(())
    }
}

#[derive(Module, Debug)]
pub struct Qwen3Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: RmsNorm,
    pub k_norm: RmsNorm,
}

#[derive(Module, Debug)]
pub struct Qwen3Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Module, Debug)]
pub struct Qwen3Layer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Qwen3Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Qwen3Mlp,
}

/// `Qwen3Model` (the `model.` prefix of `Qwen3ForCausalLM`).
#[derive(Module, Debug)]
pub struct Qwen3Model {
    pub embed_tokens: Embedding,
    pub layers: Vec<Qwen3Layer>,
    pub norm: RmsNorm,
}

#[derive(Module, Debug)]
pub struct Qwen3TextEncoder {
    pub model: Qwen3Model,
    #[module(skip)]
    pub config: Qwen3Config,
}

crate::linears!(Qwen3Attention: q_proj, k_proj, v_proj, o_proj);
crate::linears!(Qwen3Mlp: gate_proj, up_proj, down_proj);
crate::linears!(Qwen3Layer: self_attn, mlp);
crate::linears!(Qwen3Model: layers);
crate::linears!(Qwen3TextEncoder: model);

/// The text FLUX.2-klein encodes for a prompt: Qwen3's chat template applied to one user message
/// with `add_generation_prompt=True, enable_thinking=False` (`_get_qwen3_prompt_embeds`).
pub fn chat_prompt(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
}

/// transformers' default RoPE tables for positions `0..seq`: `inv_freq_i = θ^(−2i/d)`, the
/// angles repeated over both halves (`cat(freqs, freqs)`), formed in f32 as torch forms them.
///
/// # Shapes
/// - returns `(cos, sin)`, each `[1, 1, seq, head_dim]`
pub fn rope_half_tables(
    seq: usize,
    head_dim: usize,
    theta: f64,
    device: &Device,
) -> (Tensor<4>, Tensor<4>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(seq * head_dim);
    let mut sin = Vec::with_capacity(seq * head_dim);
    for p in 0..seq {
        let angles: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
        for _ in 0..2 {
            cos.extend(angles.iter().map(|a| a.cos()));
            sin.extend(angles.iter().map(|a| a.sin()));
        }
    }
    let shape = [1, 1, seq, head_dim];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// Rotate-half RoPE: `x·cos + rotate_half(x)·sin`, `rotate_half([x₁, x₂]) = [−x₂, x₁]`.
///
/// # Shapes
/// - `x`: `[b, heads, seq, head_dim]`; `cos`, `sin`: `[1, 1, seq, head_dim]`
pub fn apply_rope_half(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let d = x.dims()[3];
    let first = x.clone().narrow(3, 0, d / 2);
    let second = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![second.neg(), first], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// `[b, kv_heads, seq, hd]` → `[b, kv_heads·groups, seq, hd]`, each kv head repeated `groups`
/// times in a row (transformers' `repeat_kv`).
fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, kv, s, hd] = x.dims();
    // [b, kv, 1, s, hd] → [b, kv, groups, s, hd] → [b, kv·groups, s, hd]
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, groups, s, hd])
        .reshape([b, kv * groups, s, hd])
}

impl Qwen3TextEncoder {
    /// Loads transformers-layout weights (`model.*`, optional `lm_head.weight`), checking coverage.
    pub fn load(
        config: Qwen3Config,
        mut weights: Weights,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let w = &mut weights;
        w.skip("lm_head.weight");
        let (d, hd, bias, eps) = (
            config.hidden_size,
            config.head_dim,
            config.attention_bias,
            config.rms_norm_eps,
        );
        let (q_width, kv_width) = (
            config.num_attention_heads * hd,
            config.num_key_value_heads * hd,
        );
        let norm = |w: &mut Weights, key: String, dim| {
            RmsNorm::load(w, &key, dim, device).map(|n| n.with_eps(eps))
        };
        let lin = |w: &mut Weights, key: String, d_in, d_out, bias| {
            Linear::load(w, &key, d_in, d_out, bias, device)
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let a = format!("{p}.self_attn");
                let m = format!("{p}.mlp");
                let ff = config.intermediate_size;
                Ok(Qwen3Layer {
                    input_layernorm: norm(w, format!("{p}.input_layernorm.weight"), d)?,
                    self_attn: Qwen3Attention {
                        q_proj: lin(w, format!("{a}.q_proj"), d, q_width, bias)?,
                        k_proj: lin(w, format!("{a}.k_proj"), d, kv_width, bias)?,
                        v_proj: lin(w, format!("{a}.v_proj"), d, kv_width, bias)?,
                        o_proj: lin(w, format!("{a}.o_proj"), q_width, d, bias)?,
                        q_norm: norm(w, format!("{a}.q_norm.weight"), hd)?,
                        k_norm: norm(w, format!("{a}.k_norm.weight"), hd)?,
                    },
                    post_attention_layernorm: norm(
                        w,
                        format!("{p}.post_attention_layernorm.weight"),
                        d,
                    )?,
                    mlp: Qwen3Mlp {
                        gate_proj: lin(w, format!("{m}.gate_proj"), d, ff, false)?,
                        up_proj: lin(w, format!("{m}.up_proj"), d, ff, false)?,
                        down_proj: lin(w, format!("{m}.down_proj"), ff, d, false)?,
                    },
                })
            })
            .collect::<Result<_, LoadError>>()?;
        let model = Qwen3Model {
            embed_tokens: Embedding::load(w, "model.embed_tokens", config.vocab_size, d, device)?,
            layers,
            norm: norm(w, "model.norm.weight".into(), d)?,
        };
        weights.finish()?;
        Ok(Self { model, config })
    }

    /// transformers' `hidden_states` up to index `depth`: entry 0 is the embedding output, entry
    /// `i` the output of layer `i` (the last layer's entry, `num_hidden_layers`, is after the
    /// final norm, as transformers records it). Padding keys (`mask[b][k] == false`) are never
    /// attended to.
    ///
    /// # Shapes
    /// - `ids`, `mask`: `b` rows of equal length `seq` → `depth + 1` tensors `[b, seq, hidden]`
    pub fn hidden_states(
        &self,
        ids: &[Vec<u32>],
        mask: &[Vec<bool>],
        depth: usize,
        device: &Device,
    ) -> Vec<Tensor<3>> {
        let c = &self.config;
        let depth = depth.min(c.num_hidden_layers);
        let (b, seq) = (ids.len(), ids.first().map_or(0, Vec::len));
        let flat: Vec<i64> = ids.iter().flatten().map(|&t| t as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, seq]), device);
        // true = masked: a later key, or a padding key.
        let blocked: Vec<bool> = mask
            .iter()
            .flat_map(|row| (0..seq).flat_map(move |q| (0..seq).map(move |k| k > q || !row[k])))
            .collect();
        let blocked =
            Tensor::<4, Bool>::from_data(TensorData::new(blocked, [b, 1, seq, seq]), device);
        let (cos, sin) = rope_half_tables(seq, c.head_dim, c.theta(), device);
        let groups = c.num_attention_heads / c.num_key_value_heads;
        let mut x = self.model.embed_tokens.forward(ids);
        let mut states = vec![x.clone()];
        for layer in &self.model.layers[..depth] {
            let attn = &layer.self_attn;
            let h = layer.input_layernorm.forward(x.clone());
            // [b, heads, seq, head_dim], q and k normalised per head before RoPE
            let q = attn.q_norm.forward(split_heads(
                attn.q_proj.forward(h.clone()),
                c.num_attention_heads,
            ));
            let k = attn.k_norm.forward(split_heads(
                attn.k_proj.forward(h.clone()),
                c.num_key_value_heads,
            ));
            let v = split_heads(attn.v_proj.forward(h), c.num_key_value_heads);
            let q = apply_rope_half(q, &cos, &sin);
            let k = repeat_kv(apply_rope_half(k, &cos, &sin), groups);
            let v = repeat_kv(v, groups);
            let a = attention(q, k, v, Some(blocked.clone()), None, Default::default());
            x = x + attn.o_proj.forward(merge_heads(a));
            let h = layer.post_attention_layernorm.forward(x.clone());
            let mlp = &layer.mlp;
            let h = silu(mlp.gate_proj.forward(h.clone())) * mlp.up_proj.forward(h);
            x = x + mlp.down_proj.forward(h);
            states.push(x.clone());
        }
        if depth == c.num_hidden_layers {
            let last = states.pop().expect("at least the embedding");
            states.push(self.model.norm.forward(last));
        }
        states
    }
}

impl crate::model::Family for Qwen3TextEncoder {
    type Config = Qwen3Config;
    const WEIGHTS: &'static str = "model";

    fn validate(config: &Qwen3Config) -> Result<(), String> {
        config.validate()
    }

    fn from_weights(
        config: Qwen3Config,
        weights: Weights,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Self::load(config, weights, device)
    }
}

/// Loads a transformers text-encoder folder (`config.json` + `model.safetensors` or shards).
pub fn load_dir(dir: &Path, device: &Device) -> Result<Qwen3TextEncoder, LoadError> {
    <Qwen3TextEncoder as crate::model::Family>::load_dir(dir, device)
}
