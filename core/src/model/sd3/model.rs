//! The MMDiT of SD3 / SD3.5 (diffusers `SD3Transformer2DModel`). Field paths follow diffusers'
//! key paths (`transformer_blocks.{i}.attn.to_q` → `transformer_blocks[i].attn.to_q`).

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

use crate::model::layers::{
    GeluFeedForward, Linear, MlpEmbedder, RmsNorm, chunks, gated, layer_norm, merge_heads,
    modulate, norm_modulate, sdpa, silu, split_heads, timestep_embedding,
};
use crate::model::weights::{LoadError, Weights};

use super::config::Sd3Config;

/// Patch embedding (a stride-p convolution, computed as patchify + linear) plus the centre-cropped
/// sin-cos position table.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    /// `pos_embed.proj` as a linear over (c, p, q)-ordered patches: `[c·p·p, dim]`.
    pub proj: Linear,
    /// `pos_embed.pos_embed`: `[1, max², dim]`.
    pub pos_embed: Param<Tensor<3>>,
}

crate::linears!(PatchEmbed: proj);

/// diffusers' `get_2d_sincos_pos_embed(dim, grid, base_size)` for a `grid`×`grid` table: positions
/// scaled by `base_size / grid`; the first half of each vector encodes the column, the second the
/// row, each as `[sin, cos]` over frequencies `10000^(−k/(dim/4))`.
///
/// # Shapes
/// - returns `grid²·dim` values, row-major `[grid·grid, dim]` (token = row·grid + column)
pub fn sincos_2d_table(dim: usize, grid: usize, base_size: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let scale = base_size as f64 / grid as f64;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut table = Vec::with_capacity(grid * grid * dim);
    for row in 0..grid {
        for column in 0..grid {
            for position in [column as f64 * scale, row as f64 * scale] {
                table.extend(omega.iter().map(|w| (position * w).sin() as f32));
                table.extend(omega.iter().map(|w| (position * w).cos() as f32));
            }
        }
    }
    table
}

/// One joint attention: image and text streams attend together, image first.
#[derive(Module, Debug)]
pub struct JointAttention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out_0: Linear,
    pub add_q_proj: Option<Linear>,
    pub add_k_proj: Option<Linear>,
    pub add_v_proj: Option<Linear>,
    /// Absent in the last block (`context_pre_only`).
    pub to_add_out: Option<Linear>,
    pub norm_q: Option<RmsNorm>,
    pub norm_k: Option<RmsNorm>,
    pub norm_added_q: Option<RmsNorm>,
    pub norm_added_k: Option<RmsNorm>,
}

crate::linears!(JointAttention: to_q, to_k, to_v, to_out_0, add_q_proj, add_k_proj, add_v_proj, to_add_out);

/// One MMDiT block.
#[derive(Module, Debug)]
pub struct JointTransformerBlock {
    /// AdaLN-Zero of the image stream: 6·dim, or 9·dim with dual attention.
    pub norm1: Linear,
    /// Text stream modulation: AdaLN-Zero (6·dim), or AdaLN-continuous (2·dim, scale then
    /// shift) in the last block.
    pub norm1_context: Linear,
    pub attn: JointAttention,
    /// SD3.5's second, image-only attention.
    pub attn2: Option<JointAttention>,
    pub ff: GeluFeedForward,
    pub ff_context: Option<GeluFeedForward>,
}

crate::linears!(JointTransformerBlock: norm1, norm1_context, attn, attn2, ff, ff_context);

/// SD3 / SD3.5 transformer.
#[derive(Module, Debug)]
pub struct Sd3Transformer {
    pub pos_embed: PatchEmbed,
    pub time_text_embed_timestep_embedder: MlpEmbedder,
    pub time_text_embed_text_embedder: MlpEmbedder,
    pub context_embedder: Linear,
    pub transformer_blocks: Vec<JointTransformerBlock>,
    pub norm_out: Linear,
    pub proj_out: Linear,
    #[module(skip)]
    pub config: Sd3Config,
}

crate::linears!(Sd3Transformer: pos_embed, time_text_embed_timestep_embedder, time_text_embed_text_embedder, context_embedder, transformer_blocks, norm_out, proj_out);

impl JointAttention {
    fn load(
        w: &mut Weights,
        prefix: &str,
        config: &Sd3Config,
        joint: bool,
        context_out: bool,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let d = config.inner_dim();
        let hd = config.attention_head_dim;
        let lin = |w: &mut Weights, name: &str| {
            Linear::load(w, &format!("{prefix}.{name}"), d, d, true, device)
        };
        let norm = |w: &mut Weights, name: &str| -> Result<Option<RmsNorm>, LoadError> {
            if config.has_qk_norm() {
                Ok(Some(RmsNorm::load(
                    w,
                    &format!("{prefix}.{name}.weight"),
                    hd,
                    device,
                )?))
            } else {
                Ok(None)
            }
        };
        let opt = |w: &mut Weights, name: &str, on: bool| {
            if on { lin(w, name).map(Some) } else { Ok(None) }
        };
        Ok(Self {
            to_q: lin(w, "to_q")?,
            to_k: lin(w, "to_k")?,
            to_v: lin(w, "to_v")?,
            to_out_0: lin(w, "to_out.0")?,
            add_q_proj: opt(w, "add_q_proj", joint)?,
            add_k_proj: opt(w, "add_k_proj", joint)?,
            add_v_proj: opt(w, "add_v_proj", joint)?,
            to_add_out: opt(w, "to_add_out", joint && context_out)?,
            norm_q: norm(w, "norm_q")?,
            norm_k: norm(w, "norm_k")?,
            norm_added_q: if joint {
                norm(w, "norm_added_q")?
            } else {
                None
            },
            norm_added_k: if joint {
                norm(w, "norm_added_k")?
            } else {
                None
            },
        })
    }

    /// Projects one stream to per-head q, k, v with optional qk-norm. `[b, s, d]` → 3 × `[b, h, s, hd]`.
    fn qkv(
        q: &Linear,
        k: &Linear,
        v: &Linear,
        nq: &Option<RmsNorm>,
        nk: &Option<RmsNorm>,
        x: Tensor<3>,
        heads: usize,
    ) -> [Tensor<4>; 3] {
        let mut q = split_heads(q.forward(x.clone()), heads);
        let mut k = split_heads(k.forward(x.clone()), heads);
        let v = split_heads(v.forward(x), heads);
        if let Some(n) = nq {
            q = n.forward(q);
        }
        if let Some(n) = nk {
            k = n.forward(k);
        }
        [q, k, v]
    }

    /// [`Self::forward`] through the fused attention kernel (wgpu, no autodiff), or `None`.
    fn fused(
        &self,
        x: &Tensor<3>,
        context: Option<&Tensor<3>>,
        heads: usize,
    ) -> Option<(Tensor<3>, Option<Tensor<3>>)> {
        if !crate::model::layers::fused_attention_applies(x) {
            return None;
        }
        let n_img = x.dims()[1];
        let joint = match (
            context,
            &self.add_q_proj,
            &self.add_k_proj,
            &self.add_v_proj,
        ) {
            (Some(c), Some(aq), Some(ak), Some(av)) => Some((c, aq, ak, av)),
            _ => None,
        };
        let image_norms = (&self.norm_q, &self.norm_k);
        let text_norms = match joint {
            Some(_) => (&self.norm_added_q, &self.norm_added_k),
            None => image_norms,
        };
        let norms = crate::model::layers::fused_attention_norms([image_norms, text_norms])?;
        let (q, k, v) = (
            self.to_q.forward(x.clone()),
            self.to_k.forward(x.clone()),
            self.to_v.forward(x.clone()),
        );
        let (q, k, v) = match joint {
            // [b, n_img + n_txt, d]: image first (SD3's order)
            Some((c, aq, ak, av)) => (
                Tensor::cat(vec![q, aq.forward(c.clone())], 1),
                Tensor::cat(vec![k, ak.forward(c.clone())], 1),
                Tensor::cat(vec![v, av.forward(c.clone())], 1),
            ),
            None => (q, k, v),
        };
        // [b, n_img + n_txt, d]
        let out = crate::model::layers::fused_joint_attention(&q, &k, &v, heads, n_img, norms)?;
        let n_txt = out.dims()[1] - n_img;
        let image = self.to_out_0.forward(out.clone().narrow(1, 0, n_img));
        let text = match (&self.to_add_out, n_txt) {
            (Some(proj), n) if n > 0 => Some(proj.forward(out.narrow(1, n_img, n))),
            _ => None,
        };
        Some((image, text))
    }

    /// Returns the image output and, if there is a text stream with an output projection, the
    /// text output.
    ///
    /// # Shapes
    /// - `x`: `[b, n_img, d]`, `context`: `[b, n_txt, d]`
    fn forward(
        &self,
        x: Tensor<3>,
        context: Option<Tensor<3>>,
        heads: usize,
    ) -> (Tensor<3>, Option<Tensor<3>>) {
        let n_img = x.dims()[1];
        if let Some(out) = self.fused(&x, context.as_ref(), heads) {
            return out;
        }
        let [mut q, mut k, mut v] = Self::qkv(
            &self.to_q,
            &self.to_k,
            &self.to_v,
            &self.norm_q,
            &self.norm_k,
            x,
            heads,
        );
        let n_txt = match (
            &context,
            &self.add_q_proj,
            &self.add_k_proj,
            &self.add_v_proj,
        ) {
            (Some(c), Some(aq), Some(ak), Some(av)) => {
                let [cq, ck, cv] = Self::qkv(
                    aq,
                    ak,
                    av,
                    &self.norm_added_q,
                    &self.norm_added_k,
                    c.clone(),
                    heads,
                );
                // [b, h, n_img + n_txt, hd]: image first (SD3's order)
                q = Tensor::cat(vec![q, cq], 2);
                k = Tensor::cat(vec![k, ck], 2);
                v = Tensor::cat(vec![v, cv], 2);
                c.dims()[1]
            }
            _ => 0,
        };
        let out = merge_heads(sdpa(q, k, v)); // [b, n_img + n_txt, d]
        let image = self.to_out_0.forward(out.clone().narrow(1, 0, n_img));
        let text = match (&self.to_add_out, n_txt) {
            (Some(proj), n) if n > 0 => Some(proj.forward(out.narrow(1, n_img, n))),
            _ => None,
        };
        (image, text)
    }
}

impl JointTransformerBlock {
    fn load(
        w: &mut Weights,
        index: usize,
        config: &Sd3Config,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let p = format!("transformer_blocks.{index}");
        let d = config.inner_dim();
        let last = index + 1 == config.num_layers;
        let dual = config.dual_attention_layers.contains(&index);
        Ok(Self {
            norm1: Linear::load(
                w,
                &format!("{p}.norm1.linear"),
                d,
                if dual { 9 * d } else { 6 * d },
                true,
                device,
            )?,
            norm1_context: Linear::load(
                w,
                &format!("{p}.norm1_context.linear"),
                d,
                if last { 2 * d } else { 6 * d },
                true,
                device,
            )?,
            attn: JointAttention::load(w, &format!("{p}.attn"), config, true, !last, device)?,
            attn2: if dual {
                Some(JointAttention::load(
                    w,
                    &format!("{p}.attn2"),
                    config,
                    false,
                    false,
                    device,
                )?)
            } else {
                None
            },
            ff: GeluFeedForward::load(w, &format!("{p}.ff"), d, 4 * d, device)?,
            ff_context: if last {
                None
            } else {
                Some(GeluFeedForward::load(
                    w,
                    &format!("{p}.ff_context"),
                    d,
                    4 * d,
                    device,
                )?)
            },
        })
    }

    /// # Shapes
    /// - `x`: `[b, n_img, d]`, `context`: `[b, n_txt, d]`, `temb_act` = SiLU(temb): `[b, d]`
    /// - returns the new image stream and, except in the last block, the new text stream
    fn forward(
        &self,
        x: Tensor<3>,
        context: Tensor<3>,
        temb_act: Tensor<2>,
        heads: usize,
    ) -> (Tensor<3>, Option<Tensor<3>>) {
        let m = chunks(
            self.norm1.forward(temb_act.clone()),
            if self.attn2.is_some() { 9 } else { 6 },
        );
        // SD3.5's second attention reads the same LayerNorm with its own modulation: normalise
        // once for both; a block with one attention takes the fused norm + modulate.
        let (attn_in, attn2_in) = if self.attn2.is_some() {
            let normed = layer_norm(x.clone());
            (
                modulate(normed.clone(), m[0].clone(), m[1].clone()),
                Some(modulate(normed, m[6].clone(), m[7].clone())),
            )
        } else {
            (norm_modulate(x.clone(), m[0].clone(), m[1].clone()), None)
        };

        let context_mod = self.norm1_context.forward(temb_act);
        let (context_in, context_m) = if self.ff_context.is_some() {
            let cm = chunks(context_mod, 6);
            (
                norm_modulate(context.clone(), cm[0].clone(), cm[1].clone()),
                Some(cm),
            )
        } else {
            // AdaLayerNormContinuous: scale first, then shift
            let cm = chunks(context_mod, 2);
            (
                norm_modulate(context.clone(), cm[1].clone(), cm[0].clone()),
                None,
            )
        };

        let heads_n = heads;
        let (attn_img, attn_txt) = self.attn.forward(attn_in, Some(context_in), heads_n);
        let mut x = x + gated(attn_img, m[2].clone());
        if let (Some(attn2), Some(attn2_in)) = (&self.attn2, attn2_in) {
            let (out, _) = attn2.forward(attn2_in, None, heads_n);
            x = x + gated(out, m[8].clone());
        }
        let ff_in = norm_modulate(x.clone(), m[3].clone(), m[4].clone());
        x = x.clone() + gated(self.ff.forward(ff_in), m[5].clone());

        let context = match (context_m, attn_txt, &self.ff_context) {
            (Some(cm), Some(attn_txt), Some(ff_context)) => {
                let c = context + gated(attn_txt, cm[2].clone());
                let ff_in = norm_modulate(c.clone(), cm[3].clone(), cm[4].clone());
                Some(c.clone() + gated(ff_context.forward(ff_in), cm[5].clone()))
            }
            _ => None,
        };
        (x, context)
    }
}

impl Sd3Transformer {
    /// Builds the model from diffusers-layout weights, checking that every parameter is present
    /// and every tensor is used.
    pub fn load(config: Sd3Config, mut w: Weights, device: &Device) -> Result<Self, LoadError> {
        let d = config.inner_dim();
        let (c, p) = (config.in_channels, config.patch_size);
        // pos_embed.proj: conv weight [d, c, p, p] is a linear over (c, p, q)-ordered patches.
        let proj = Linear::load_stored(
            &mut w,
            "pos_embed.proj",
            &[d, c, p, p],
            c * p * p,
            d,
            true,
            device,
        )?;
        let max = config.pos_embed_max_size;
        let pos_embed = PatchEmbed {
            proj,
            // A fixed table (a buffer in diffusers): never trained.
            pos_embed: Param::from_tensor(w.tensor(
                "pos_embed.pos_embed",
                [1, max * max, d],
                device,
            )?)
            .set_require_grad(false),
        };
        let model = Self {
            pos_embed,
            time_text_embed_timestep_embedder: MlpEmbedder::load(
                &mut w,
                "time_text_embed.timestep_embedder",
                256,
                d,
                true,
                device,
            )?,
            time_text_embed_text_embedder: MlpEmbedder::load(
                &mut w,
                "time_text_embed.text_embedder",
                config.pooled_projection_dim,
                d,
                true,
                device,
            )?,
            context_embedder: Linear::load(
                &mut w,
                "context_embedder",
                config.joint_attention_dim,
                d,
                true,
                device,
            )?,
            transformer_blocks: (0..config.num_layers)
                .map(|i| JointTransformerBlock::load(&mut w, i, &config, device))
                .collect::<Result<_, _>>()?,
            norm_out: Linear::load(&mut w, "norm_out.linear", d, 2 * d, true, device)?,
            proj_out: Linear::load(
                &mut w,
                "proj_out",
                d,
                p * p * config.out_channels,
                true,
                device,
            )?,
            config,
        };
        w.finish()?;
        Ok(model)
    }

    /// Patchify, project and add the centre-cropped position table.
    ///
    /// # Shapes
    /// - `x`: `[b, c, H, W]` → `[b, (H/p)·(W/p), d]`, tokens row-major
    pub fn embed_patches(&self, x: Tensor<4>) -> Tensor<3> {
        let [b, c, height, width] = x.dims();
        let p = self.config.patch_size;
        let (h, w) = (height / p, width / p);
        // [b, c, h, p, w, p] → [b, h, w, c, p, p] → [b, h·w, c·p·p]
        let patches = x
            .reshape([b, c, h, p, w, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, h * w, c * p * p]);
        let tokens = self.pos_embed.proj.forward(patches);
        let max = self.config.pos_embed_max_size;
        let (top, left) = ((max - h) / 2, (max - w) / 2);
        let d = self.config.inner_dim();
        // [1, max², d] → [1, max, max, d] → crop [1, h, w, d] → [1, h·w, d]
        let table = self
            .pos_embed
            .pos_embed
            .val()
            .reshape([1, max, max, d])
            .slice([0..1, top..top + h, left..left + w, 0..d])
            .reshape([1, h * w, d]);
        tokens + table
    }

    /// Velocity prediction.
    ///
    /// `timesteps` are diffusers' SD3 timesteps (σ·1000), one per sample.
    ///
    /// # Shapes
    /// - `x`: `[b, in_channels, H, W]` (H, W multiples of the patch size, at most
    ///   `pos_embed_max_size · patch`), `context`: `[b, n_txt, joint_attention_dim]`,
    ///   `pooled`: `[b, pooled_projection_dim]` → `[b, out_channels, H, W]`
    pub fn forward(
        &self,
        x: Tensor<4>,
        timesteps: &[f64],
        context: Tensor<3>,
        pooled: Tensor<2>,
    ) -> Tensor<4> {
        let [b, _, height, width] = x.dims();
        let p = self.config.patch_size;
        let (h, w) = (height / p, width / p);
        let device = x.device();
        let mut hidden = self.embed_patches(x);
        let t_emb = self
            .time_text_embed_timestep_embedder
            .forward(timestep_embedding(timesteps, 256, &device));
        let temb = t_emb + self.time_text_embed_text_embedder.forward(pooled);
        let temb_act = silu(temb);
        let mut context = self.context_embedder.forward(context);
        let heads = self.config.num_attention_heads;
        for block in &self.transformer_blocks {
            let (x, c) = block.forward(hidden, context.clone(), temb_act.clone(), heads);
            hidden = x;
            if let Some(c) = c {
                context = c;
            }
        }
        // norm_out: AdaLayerNormContinuous, scale then shift
        let m = chunks(self.norm_out.forward(temb_act), 2);
        let hidden = norm_modulate(hidden, m[1].clone(), m[0].clone());
        let out = self.proj_out.forward(hidden); // [b, h·w, p·p·c_out], channels (p, q, c)
        let c_out = self.config.out_channels;
        // [b, h, w, p, q, c] → [b, c, h, p, w, q] → [b, c, H, W]
        out.reshape([b, h, w, p, p, c_out])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, c_out, h * p, w * p])
    }

    /// Checks an input latent fits the model, before any compute.
    pub fn check_input(&self, dims: [usize; 4]) -> Result<(), String> {
        let [_, c, height, width] = dims;
        let p = self.config.patch_size;
        let max = self.config.pos_embed_max_size * p;
        if c != self.config.in_channels {
            return Err(format!(
                "latent has {c} channels, the model expects {}",
                self.config.in_channels
            ));
        }
        if height % p != 0 || width % p != 0 || height == 0 || width == 0 {
            return Err(format!(
                "latent size {height}×{width} is not a multiple of the patch size {p}"
            ));
        }
        if height > max || width > max {
            return Err(format!(
                "latent size {height}×{width} exceeds the position table ({max}×{max})"
            ));
        }
        Ok(())
    }
}
