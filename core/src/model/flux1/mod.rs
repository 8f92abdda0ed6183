//! FLUX.1 (`FluxTransformer2DModel`, diffusers `models/transformers/transformer_flux.py`): double-
//! stream blocks over [text; image] with 3-axis interleaved RoPE, then single-stream blocks with
//! parallel attention and MLP; guidance embedding for the guidance-distilled `dev` model.
//!
//! The model works on packed tokens (2×2 latent patches, channel = c·4 + dy·2 + dx); timestep and
//! guidance arrive as σ ∈ [0, 1] and are multiplied by 1000 inside, as in diffusers.

use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::double_stream::{DoubleStreamBlock, DoubleStreamSpec, Modulation};
use super::layers::{
    GeluFeedForward, Linear, MlpEmbedder, QkvNorm, chunks, gated, norm_modulate, rope_attention,
    rope_tables, timestep_embedding,
};
use super::weights::{LoadError, Weights};

/// diffusers' `FluxTransformer2DModel` config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flux1Config {
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
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub guidance_embeds: bool,
    pub axes_dims_rope: Vec<usize>,
}

fn one() -> usize {
    1
}

/// RoPE base of FLUX.1.
pub const ROPE_THETA: f64 = 10_000.0;

impl Flux1Config {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub fn validate(&self) -> Result<(), String> {
        let rope: usize = self.axes_dims_rope.iter().sum();
        if rope != self.attention_head_dim {
            return Err(format!(
                "axes_dims_rope {:?} sum to {rope}, attention_head_dim is {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        if self.axes_dims_rope.iter().any(|d| d % 2 == 1) {
            return Err(format!(
                "axes_dims_rope {:?} must all be even",
                self.axes_dims_rope
            ));
        }
        if self.patch_size != 1 {
            return Err(format!(
                "patch_size {} is not supported (FLUX packs 2×2 patches outside the model)",
                self.patch_size
            ));
        }
        Ok(())
    }

    /// Parameter count as diffusers counts it.
    pub fn parameter_count(&self) -> usize {
        let d = self.inner_dim();
        let hd = self.attention_head_dim;
        let lin = |i: usize, o: usize| i * o + o;
        let mlp = 4 * d;
        let mut n = lin(self.in_channels, d) + lin(self.joint_attention_dim, d);
        n += lin(256, d) + lin(d, d) + lin(self.pooled_projection_dim, d) + lin(d, d);
        if self.guidance_embeds {
            n += lin(256, d) + lin(d, d);
        }
        let double = 2 * lin(d, 6 * d) + 8 * lin(d, d) + 4 * hd + 2 * (lin(d, mlp) + lin(mlp, d));
        let single = lin(d, 3 * d) + lin(d, mlp) + lin(d + mlp, d) + 3 * lin(d, d) + 2 * hd;
        n += self.num_layers * double + self.num_single_layers * single;
        n + lin(d, 2 * d) + lin(d, self.out_channels())
    }

    /// FLUX.1-dev (guidance-distilled): 19 double + 38 single blocks, 24 × 128 heads.
    pub fn flux1_dev() -> Self {
        Self {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: vec![16, 56, 56],
        }
    }

    /// FLUX.1-schnell: dev without the guidance embedder.
    pub fn flux1_schnell() -> Self {
        Self {
            guidance_embeds: false,
            ..Self::flux1_dev()
        }
    }
}

/// Double-stream block: GELU-tanh feed-forwards, its own `norm1` / `norm1_context` modulation.
pub type FluxTransformerBlock = DoubleStreamBlock<GeluFeedForward>;

/// Single-stream block.
#[derive(Module, Debug)]
pub struct FluxSingleTransformerBlock {
    pub norm: Linear,
    pub attn: QkvNorm,
    pub proj_mlp: Linear,
    pub proj_out: Linear,
}

crate::linears!(FluxSingleTransformerBlock: norm, attn, proj_mlp, proj_out);

/// FLUX.1 transformer.
#[derive(Module, Debug)]
pub struct Flux1Transformer {
    pub x_embedder: Linear,
    pub context_embedder: Linear,
    pub timestep_embedder: MlpEmbedder,
    pub guidance_embedder: Option<MlpEmbedder>,
    pub text_embedder: MlpEmbedder,
    pub transformer_blocks: Vec<FluxTransformerBlock>,
    pub single_transformer_blocks: Vec<FluxSingleTransformerBlock>,
    pub norm_out: Linear,
    pub proj_out: Linear,
    #[module(skip)]
    pub config: Flux1Config,
}

crate::linears!(Flux1Transformer: x_embedder, context_embedder, timestep_embedder, guidance_embedder, text_embedder, transformer_blocks, single_transformer_blocks, norm_out, proj_out);

impl FluxSingleTransformerBlock {
    fn load(
        w: &mut Weights,
        i: usize,
        c: &Flux1Config,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let p = format!("single_transformer_blocks.{i}");
        let (d, hd) = (c.inner_dim(), c.attention_head_dim);
        Ok(Self {
            norm: Linear::load(w, &format!("{p}.norm.linear"), d, 3 * d, true, device)?,
            attn: QkvNorm::load(
                w,
                &format!("{p}.attn"),
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                d,
                hd,
                true,
                device,
            )?,
            proj_mlp: Linear::load(w, &format!("{p}.proj_mlp"), d, 4 * d, true, device)?,
            proj_out: Linear::load(w, &format!("{p}.proj_out"), 5 * d, d, true, device)?,
        })
    }

    /// # Shapes
    /// - `x`: the joint stream `[b, n_txt + n_img, d]`
    fn forward(
        &self,
        x: Tensor<3>,
        temb_act: Tensor<2>,
        rope: &(Tensor<4>, Tensor<4>),
        heads: usize,
    ) -> Tensor<3> {
        let m = chunks(self.norm.forward(temb_act), 3);
        let normed = norm_modulate(x.clone(), m[0].clone(), m[1].clone());
        let mlp = super::layers::gelu_tanh(self.proj_mlp.forward(normed.clone()));
        let [q, k, v] = self.attn.forward(normed, heads);
        let attn = rope_attention(q, k, v, &rope.0, &rope.1);
        // [b, s, d + 4d] → [b, s, d]
        x + gated(
            self.proj_out.forward(Tensor::cat(vec![attn, mlp], 2)),
            m[2].clone(),
        )
    }
}

impl Flux1Transformer {
    /// Builds the model from diffusers-layout weights with full key coverage.
    pub fn load(config: Flux1Config, mut w: Weights, device: &Device) -> Result<Self, LoadError> {
        let d = config.inner_dim();
        let double_spec = DoubleStreamSpec {
            dim: d,
            head_dim: config.attention_head_dim,
            bias: true,
            own_modulation: true,
        };
        let model = Self {
            x_embedder: Linear::load(&mut w, "x_embedder", config.in_channels, d, true, device)?,
            context_embedder: Linear::load(
                &mut w,
                "context_embedder",
                config.joint_attention_dim,
                d,
                true,
                device,
            )?,
            timestep_embedder: MlpEmbedder::load(
                &mut w,
                "time_text_embed.timestep_embedder",
                256,
                d,
                true,
                device,
            )?,
            guidance_embedder: if config.guidance_embeds {
                Some(MlpEmbedder::load(
                    &mut w,
                    "time_text_embed.guidance_embedder",
                    256,
                    d,
                    true,
                    device,
                )?)
            } else {
                None
            },
            text_embedder: MlpEmbedder::load(
                &mut w,
                "time_text_embed.text_embedder",
                config.pooled_projection_dim,
                d,
                true,
                device,
            )?,
            transformer_blocks: (0..config.num_layers)
                .map(|i| {
                    let ff =
                        |w: &mut Weights, p: &str| GeluFeedForward::load(w, p, d, 4 * d, device);
                    FluxTransformerBlock::load(&mut w, i, &double_spec, ff, device)
                })
                .collect::<Result<_, _>>()?,
            single_transformer_blocks: (0..config.num_single_layers)
                .map(|i| FluxSingleTransformerBlock::load(&mut w, i, &config, device))
                .collect::<Result<_, _>>()?,
            norm_out: Linear::load(&mut w, "norm_out.linear", d, 2 * d, true, device)?,
            proj_out: Linear::load(&mut w, "proj_out", d, config.out_channels(), true, device)?,
            config,
        };
        w.finish()?;
        Ok(model)
    }

    /// Velocity prediction on packed tokens.
    ///
    /// `timesteps` and `guidance` are per sample, σ-scaled (the model multiplies by 1000);
    /// `img_ids` / `txt_ids` are one position row (3 axes) per token.
    ///
    /// # Shapes
    /// - `x`: `[b, n_img, in_channels]`, `context`: `[b, n_txt, joint_attention_dim]`,
    ///   `pooled`: `[b, pooled_projection_dim]` → `[b, n_img, out_channels]`
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: Tensor<3>,
        timesteps: &[f64],
        guidance: Option<&[f64]>,
        context: Tensor<3>,
        pooled: Tensor<2>,
        img_ids: &[Vec<f64>],
        txt_ids: &[Vec<f64>],
    ) -> Tensor<3> {
        let device = x.device();
        let n_txt = context.dims()[1];
        let n_img = x.dims()[1];
        let scaled = |v: &[f64]| v.iter().map(|t| t * 1000.0).collect::<Vec<_>>();
        let mut temb =
            self.timestep_embedder
                .forward(timestep_embedding(&scaled(timesteps), 256, &device));
        if let (Some(embedder), Some(g)) = (&self.guidance_embedder, guidance) {
            temb = temb + embedder.forward(timestep_embedding(&scaled(g), 256, &device));
        }
        let temb_act = silu(temb + self.text_embedder.forward(pooled));
        let ids: Vec<Vec<f64>> = txt_ids.iter().chain(img_ids).cloned().collect();
        let rope = rope_tables(&ids, &self.config.axes_dims_rope, ROPE_THETA, &device);
        let heads = self.config.num_attention_heads;

        let mut hidden = self.x_embedder.forward(x);
        let mut context = self.context_embedder.forward(context);
        for block in &self.transformer_blocks {
            let modulation = Modulation::PerBlock(&temb_act);
            (hidden, context) = block.forward(hidden, context, modulation, &rope, heads);
        }
        let mut joint = Tensor::cat(vec![context, hidden], 1);
        for block in &self.single_transformer_blocks {
            joint = block.forward(joint, temb_act.clone(), &rope, heads);
        }
        let hidden = joint.narrow(1, n_txt, n_img);
        let m = chunks(self.norm_out.forward(temb_act), 2); // scale, shift
        self.proj_out
            .forward(norm_modulate(hidden, m[1].clone(), m[0].clone()))
    }
}

impl super::Family for Flux1Transformer {
    type Config = Flux1Config;

    fn validate(config: &Flux1Config) -> Result<(), String> {
        config.validate()
    }

    fn from_weights(config: Flux1Config, w: Weights, device: &Device) -> Result<Self, LoadError> {
        Self::load(config, w, device)
    }
}

impl super::SingleFile for Flux1Transformer {
    fn inner_dim(config: &Flux1Config) -> usize {
        config.inner_dim()
    }
}

/// Loads a diffusers `transformer/` folder (see [`super::Family::load_dir`]).
pub fn load_dir(dir: &Path, device: &Device) -> Result<Flux1Transformer, LoadError> {
    <Flux1Transformer as super::Family>::load_dir(dir, device)
}

/// Loads a single file in diffusers or BFL layout (see [`super::SingleFile::load_file`]).
pub fn load_file(
    path: &Path,
    config: Flux1Config,
    device: &Device,
) -> Result<Flux1Transformer, LoadError> {
    <Flux1Transformer as super::SingleFile>::load_file(path, config, device)
}
