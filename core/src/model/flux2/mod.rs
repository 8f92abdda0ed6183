//! FLUX.2 (`Flux2Transformer2DModel`, diffusers `models/transformers/transformer_flux2.py`; dev and
//! klein): no biases, no pooled text vector, modulation computed once per forward and shared by
//! every block, SwiGLU feed-forwards, single blocks with one fused `to_qkv_mlp_proj`, and 4-axis
//! interleaved RoPE with θ = 2000 (text positions on the 4th axis).

use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::double_stream::{DoubleStreamBlock, DoubleStreamSpec, Modulation, StreamFeedForward};
use super::layers::{
    Linear, MlpEmbedder, RmsNorm, chunks, gated, norm_modulate, rope_attention, rope_tables,
    split_heads, timestep_embedding,
};
use super::weights::{LoadError, Weights};

/// diffusers' `Flux2Transformer2DModel` config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flux2Config {
    #[serde(default = "one")]
    pub patch_size: usize,
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    #[serde(default = "default_channels")]
    pub timestep_guidance_channels: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    pub axes_dims_rope: Vec<usize>,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub guidance_embeds: bool,
}

fn one() -> usize {
    1
}
fn default_channels() -> usize {
    256
}
fn default_mlp_ratio() -> f64 {
    3.0
}
fn default_theta() -> f64 {
    2000.0
}
fn default_eps() -> f64 {
    1e-6
}

impl Flux2Config {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Hidden width of the SwiGLU feed-forwards.
    pub fn mlp_hidden(&self) -> usize {
        (self.inner_dim() as f64 * self.mlp_ratio) as usize
    }

    pub fn validate(&self) -> Result<(), String> {
        let rope: usize = self.axes_dims_rope.iter().sum();
        if rope != self.attention_head_dim || self.axes_dims_rope.iter().any(|d| d % 2 == 1) {
            return Err(format!(
                "axes_dims_rope {:?} must be even and sum to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        if self.patch_size != 1 {
            return Err(format!(
                "patch_size {} is not supported (FLUX.2 patchifies outside the model)",
                self.patch_size
            ));
        }
        if (self.eps - 1e-6).abs() > 1e-12 {
            return Err(format!(
                "eps {} is not supported (the shared layers use 1e-6)",
                self.eps
            ));
        }
        Ok(())
    }

    /// Parameter count as diffusers counts it.
    pub fn parameter_count(&self) -> usize {
        let (d, hd, m) = (self.inner_dim(), self.attention_head_dim, self.mlp_hidden());
        let c = self.timestep_guidance_channels;
        let mut n = d * self.in_channels + d * self.joint_attention_dim;
        n += (c * d + d * d) * if self.guidance_embeds { 2 } else { 1 };
        n += 2 * d * 6 * d + d * 3 * d;
        let double = 8 * d * d + 4 * hd + 2 * (d * 2 * m + m * d);
        let single = d * (3 * d + 2 * m) + (d + m) * d + 2 * hd;
        n += self.num_layers * double + self.num_single_layers * single;
        n + d * 2 * d + d * self.out_channels()
    }

    fn base(
        num_layers: usize,
        num_single_layers: usize,
        heads: usize,
        joint: usize,
        guidance: bool,
    ) -> Self {
        Self {
            patch_size: 1,
            in_channels: 128,
            out_channels: None,
            num_layers,
            num_single_layers,
            attention_head_dim: 128,
            num_attention_heads: heads,
            joint_attention_dim: joint,
            timestep_guidance_channels: 256,
            mlp_ratio: 3.0,
            axes_dims_rope: vec![32, 32, 32, 32],
            rope_theta: 2000.0,
            eps: 1e-6,
            guidance_embeds: guidance,
        }
    }

    /// FLUX.2-klein-4B (diffusers `scripts/convert_flux2_to_diffusers.py`): 5 double, 20 single,
    /// 24 heads, Qwen3 states of width 7680, no guidance.
    pub fn flux2_klein_4b() -> Self {
        Self::base(5, 20, 24, 7680, false)
    }

    /// FLUX.2-klein-9B: 8 double, 24 single, 32 heads, text width 12288.
    pub fn flux2_klein_9b() -> Self {
        Self::base(8, 24, 32, 12288, false)
    }

    /// FLUX.2-dev: 8 double, 48 single, 48 heads, text width 15360, guidance embedding.
    pub fn flux2_dev() -> Self {
        Self::base(8, 48, 48, 15360, true)
    }
}

/// SwiGLU feed-forward: `linear_in` → silu(first half)·second half → `linear_out`.
#[derive(Module, Debug)]
pub struct SwiGlu {
    pub linear_in: Linear,
    pub linear_out: Linear,
}

crate::linears!(SwiGlu: linear_in, linear_out);

impl SwiGlu {
    fn load(
        w: &mut Weights,
        prefix: &str,
        d: usize,
        hidden: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            linear_in: Linear::load(
                w,
                &format!("{prefix}.linear_in"),
                d,
                2 * hidden,
                false,
                device,
            )?,
            linear_out: Linear::load(w, &format!("{prefix}.linear_out"), hidden, d, false, device)?,
        })
    }
}

impl StreamFeedForward for SwiGlu {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.linear_out.forward(swiglu(self.linear_in.forward(x)))
    }
}

/// `silu(x[..half]) · x[half..]` over the last dimension.
fn swiglu(x: Tensor<3>) -> Tensor<3> {
    let half = x.dims()[2] / 2;
    silu(x.clone().narrow(2, 0, half)) * x.narrow(2, half, half)
}

/// Double-stream block: SwiGLU feed-forwards, modulation shared from the model.
pub type Flux2TransformerBlock = DoubleStreamBlock<SwiGlu>;

/// Single-stream block with the fused `[q | k | v | gate | up]` projection.
#[derive(Module, Debug)]
pub struct Flux2SingleTransformerBlock {
    pub to_qkv_mlp_proj: Linear,
    pub norm_q: RmsNorm,
    pub norm_k: RmsNorm,
    pub to_out: Linear,
}

crate::linears!(Flux2SingleTransformerBlock: to_qkv_mlp_proj, to_out);

/// FLUX.2 transformer.
#[derive(Module, Debug)]
pub struct Flux2Transformer {
    pub x_embedder: Linear,
    pub context_embedder: Linear,
    pub timestep_embedder: MlpEmbedder,
    pub guidance_embedder: Option<MlpEmbedder>,
    pub double_stream_modulation_img: Linear,
    pub double_stream_modulation_txt: Linear,
    pub single_stream_modulation: Linear,
    pub transformer_blocks: Vec<Flux2TransformerBlock>,
    pub single_transformer_blocks: Vec<Flux2SingleTransformerBlock>,
    pub norm_out: Linear,
    pub proj_out: Linear,
    #[module(skip)]
    pub config: Flux2Config,
}

crate::linears!(Flux2Transformer: x_embedder, context_embedder, timestep_embedder, guidance_embedder, double_stream_modulation_img, double_stream_modulation_txt, single_stream_modulation, transformer_blocks, single_transformer_blocks, norm_out, proj_out);

type Rope = (Tensor<4>, Tensor<4>);

impl Flux2SingleTransformerBlock {
    fn load(
        w: &mut Weights,
        i: usize,
        c: &Flux2Config,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let p = format!("single_transformer_blocks.{i}.attn");
        let (d, hd, m) = (c.inner_dim(), c.attention_head_dim, c.mlp_hidden());
        Ok(Self {
            to_qkv_mlp_proj: Linear::load(
                w,
                &format!("{p}.to_qkv_mlp_proj"),
                d,
                3 * d + 2 * m,
                false,
                device,
            )?,
            norm_q: RmsNorm::load(w, &format!("{p}.norm_q.weight"), hd, device)?,
            norm_k: RmsNorm::load(w, &format!("{p}.norm_k.weight"), hd, device)?,
            to_out: Linear::load(w, &format!("{p}.to_out"), d + m, d, false, device)?,
        })
    }

    /// `m`: the shared single-stream modulation (shift, scale, gate). `x`: `[b, n_txt + n_img, d]`.
    fn forward(&self, x: Tensor<3>, m: &[Tensor<2>], rope: &Rope, heads: usize) -> Tensor<3> {
        let d = x.dims()[2];
        let normed = norm_modulate(x.clone(), m[0].clone(), m[1].clone());
        let fused = self.to_qkv_mlp_proj.forward(normed); // [b, s, 3d + 2m]
        let mlp_width = fused.dims()[2] - 3 * d;
        let q = self
            .norm_q
            .forward(split_heads(fused.clone().narrow(2, 0, d), heads));
        let k = self
            .norm_k
            .forward(split_heads(fused.clone().narrow(2, d, d), heads));
        let v = split_heads(fused.clone().narrow(2, 2 * d, d), heads);
        let attn = rope_attention(q, k, v, &rope.0, &rope.1);
        let mlp = swiglu(fused.narrow(2, 3 * d, mlp_width));
        x + gated(
            self.to_out.forward(Tensor::cat(vec![attn, mlp], 2)),
            m[2].clone(),
        )
    }
}

impl Flux2Transformer {
    /// Builds the model from diffusers-layout weights with full key coverage.
    pub fn load(config: Flux2Config, mut w: Weights, device: &Device) -> Result<Self, LoadError> {
        let d = config.inner_dim();
        let c = config.timestep_guidance_channels;
        let double_spec = DoubleStreamSpec {
            dim: d,
            head_dim: config.attention_head_dim,
            bias: false,
            own_modulation: false,
        };
        let model = Self {
            x_embedder: Linear::load(&mut w, "x_embedder", config.in_channels, d, false, device)?,
            context_embedder: Linear::load(
                &mut w,
                "context_embedder",
                config.joint_attention_dim,
                d,
                false,
                device,
            )?,
            timestep_embedder: MlpEmbedder::load(
                &mut w,
                "time_guidance_embed.timestep_embedder",
                c,
                d,
                false,
                device,
            )?,
            guidance_embedder: if config.guidance_embeds {
                Some(MlpEmbedder::load(
                    &mut w,
                    "time_guidance_embed.guidance_embedder",
                    c,
                    d,
                    false,
                    device,
                )?)
            } else {
                None
            },
            double_stream_modulation_img: Linear::load(
                &mut w,
                "double_stream_modulation_img.linear",
                d,
                6 * d,
                false,
                device,
            )?,
            double_stream_modulation_txt: Linear::load(
                &mut w,
                "double_stream_modulation_txt.linear",
                d,
                6 * d,
                false,
                device,
            )?,
            single_stream_modulation: Linear::load(
                &mut w,
                "single_stream_modulation.linear",
                d,
                3 * d,
                false,
                device,
            )?,
            transformer_blocks: (0..config.num_layers)
                .map(|i| {
                    let ff = |w: &mut Weights, p: &str| {
                        SwiGlu::load(w, p, d, config.mlp_hidden(), device)
                    };
                    Flux2TransformerBlock::load(&mut w, i, &double_spec, ff, device)
                })
                .collect::<Result<_, _>>()?,
            single_transformer_blocks: (0..config.num_single_layers)
                .map(|i| Flux2SingleTransformerBlock::load(&mut w, i, &config, device))
                .collect::<Result<_, _>>()?,
            norm_out: Linear::load(&mut w, "norm_out.linear", d, 2 * d, false, device)?,
            proj_out: Linear::load(&mut w, "proj_out", d, config.out_channels(), false, device)?,
            config,
        };
        w.finish()?;
        Ok(model)
    }

    /// Velocity prediction on packed tokens; `timesteps` / `guidance` σ-scaled (×1000 inside);
    /// ids have 4 axes (t, h, w, l).
    ///
    /// # Shapes
    /// - `x`: `[b, n_img, in_channels]`, `context`: `[b, n_txt, joint_attention_dim]` → `[b, n_img, out]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        timesteps: &[f64],
        guidance: Option<&[f64]>,
        context: Tensor<3>,
        img_ids: &[Vec<f64>],
        txt_ids: &[Vec<f64>],
    ) -> Tensor<3> {
        let device = x.device();
        let (n_txt, n_img) = (context.dims()[1], x.dims()[1]);
        let channels = self.config.timestep_guidance_channels;
        let scaled = |v: &[f64]| v.iter().map(|t| t * 1000.0).collect::<Vec<_>>();
        let mut temb = self.timestep_embedder.forward(timestep_embedding(
            &scaled(timesteps),
            channels,
            &device,
        ));
        if let (Some(embedder), Some(g)) = (&self.guidance_embedder, guidance) {
            temb = temb + embedder.forward(timestep_embedding(&scaled(g), channels, &device));
        }
        let temb_act = silu(temb);
        let mod_img = chunks(
            self.double_stream_modulation_img.forward(temb_act.clone()),
            6,
        );
        let mod_txt = chunks(
            self.double_stream_modulation_txt.forward(temb_act.clone()),
            6,
        );
        let mod_single = chunks(self.single_stream_modulation.forward(temb_act.clone()), 3);
        let ids: Vec<Vec<f64>> = txt_ids.iter().chain(img_ids).cloned().collect();
        let rope = rope_tables(
            &ids,
            &self.config.axes_dims_rope,
            self.config.rope_theta,
            &device,
        );
        let heads = self.config.num_attention_heads;

        let mut hidden = self.x_embedder.forward(x);
        let mut context = self.context_embedder.forward(context);
        for block in &self.transformer_blocks {
            let modulation = Modulation::Shared {
                image: &mod_img,
                text: &mod_txt,
            };
            (hidden, context) = block.forward(hidden, context, modulation, &rope, heads);
        }
        let mut joint = Tensor::cat(vec![context, hidden], 1);
        for block in &self.single_transformer_blocks {
            joint = block.forward(joint, &mod_single, &rope, heads);
        }
        let hidden = joint.narrow(1, n_txt, n_img);
        let m = chunks(self.norm_out.forward(temb_act), 2); // scale, shift
        self.proj_out
            .forward(norm_modulate(hidden, m[1].clone(), m[0].clone()))
    }
}

impl super::Family for Flux2Transformer {
    type Config = Flux2Config;

    fn validate(config: &Flux2Config) -> Result<(), String> {
        config.validate()
    }

    fn from_weights(config: Flux2Config, w: Weights, device: &Device) -> Result<Self, LoadError> {
        Self::load(config, w, device)
    }
}

impl super::SingleFile for Flux2Transformer {
    fn inner_dim(config: &Flux2Config) -> usize {
        config.inner_dim()
    }
}

/// Loads a diffusers `transformer/` folder (see [`super::Family::load_dir`]).
pub fn load_dir(dir: &Path, device: &Device) -> Result<Flux2Transformer, LoadError> {
    <Flux2Transformer as super::Family>::load_dir(dir, device)
}

/// Loads a single file in diffusers or BFL layout (see [`super::SingleFile::load_file`]).
pub fn load_file(
    path: &Path,
    config: Flux2Config,
    device: &Device,
) -> Result<Flux2Transformer, LoadError> {
    <Flux2Transformer as super::SingleFile>::load_file(path, config, device)
}
