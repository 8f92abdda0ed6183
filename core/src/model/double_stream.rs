//! The FLUX double-stream block, shared by FLUX.1 (`FluxTransformerBlock`, diffusers
//! `transformer_flux.py`) and FLUX.2 (`Flux2TransformerBlock`, `transformer_flux2.py`): separate
//! image and text weights, one joint attention over [text; image] with RoPE and qk-norm, then a
//! feed-forward per stream, each sub-layer AdaLN-Zero modulated and gated.
//!
//! The two families differ in two things only, and this file states both:
//! - the feed-forward: FLUX.1's GELU-tanh ×4 ([`GeluFeedForward`]) or FLUX.2's SwiGLU
//!   (`flux2::SwiGlu`), a type parameter [`StreamFeedForward`];
//! - where the modulation comes from: FLUX.1 blocks own `norm1.linear` / `norm1_context.linear`;
//!   FLUX.2 computes one image and one text modulation per forward and shares them with every
//!   block ([`Modulation`]).
//!
//! Field names stay the diffusers names (`norm1`, `ff`, `ff_context`, `to_add_out`, …).

use crate::lora::Linears;
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::layers::{
    GeluFeedForward, Linear, QkvNorm, chunks, gated, norm_modulate, rope_attention,
};
use super::weights::{LoadError, Weights};

/// A per-stream feed-forward of a double-stream block.
pub trait StreamFeedForward {
    /// # Shapes
    /// - `x`: `[b, n, d]` → `[b, n, d]`
    fn forward(&self, x: Tensor<3>) -> Tensor<3>;
}

impl StreamFeedForward for GeluFeedForward {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        GeluFeedForward::forward(self, x)
    }
}

/// The six modulation chunks (shift, scale, gate for attention, then for the FF) of each stream.
pub enum Modulation<'a> {
    /// FLUX.1: `SiLU(temb)` `[b, d]`, projected by the block's own `norm1` / `norm1_context`.
    PerBlock(&'a Tensor<2>),
    /// FLUX.2: chunks computed once per forward by the model, each `[b, d]`.
    Shared {
        image: &'a [Tensor<2>],
        text: &'a [Tensor<2>],
    },
}

/// Sizes and options of one block.
pub struct DoubleStreamSpec {
    /// Hidden width `heads · head_dim`.
    pub dim: usize,
    pub head_dim: usize,
    /// FLUX.1 linears have biases; FLUX.2 has none anywhere.
    pub bias: bool,
    /// FLUX.1: the block holds `norm1.linear` and `norm1_context.linear` (`[d, 6d]`).
    pub own_modulation: bool,
}

/// Double-stream block; `F` is the feed-forward type.
#[derive(Module, Debug)]
pub struct DoubleStreamBlock<F: Module> {
    /// `norm1.linear` (FLUX.1 only): image modulation `[d, 6d]`.
    pub norm1: Option<Linear>,
    /// `norm1_context.linear` (FLUX.1 only): text modulation `[d, 6d]`.
    pub norm1_context: Option<Linear>,
    /// `attn.{to_q, to_k, to_v, norm_q, norm_k}`
    pub attn_image: QkvNorm,
    /// `attn.{add_q_proj, add_k_proj, add_v_proj, norm_added_q, norm_added_k}`
    pub attn_context: QkvNorm,
    pub to_out_0: Linear,
    pub to_add_out: Linear,
    pub ff: F,
    pub ff_context: F,
}

impl<F: Module + Linears> Linears for DoubleStreamBlock<F> {
    fn for_each_linear(&self, f: &mut dyn FnMut(&Linear)) {
        self.norm1.for_each_linear(f);
        self.norm1_context.for_each_linear(f);
        self.attn_image.for_each_linear(f);
        self.attn_context.for_each_linear(f);
        self.to_out_0.for_each_linear(f);
        self.to_add_out.for_each_linear(f);
        self.ff.for_each_linear(f);
        self.ff_context.for_each_linear(f);
    }
    fn for_each_linear_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        self.norm1.for_each_linear_mut(f);
        self.norm1_context.for_each_linear_mut(f);
        self.attn_image.for_each_linear_mut(f);
        self.attn_context.for_each_linear_mut(f);
        self.to_out_0.for_each_linear_mut(f);
        self.to_add_out.for_each_linear_mut(f);
        self.ff.for_each_linear_mut(f);
        self.ff_context.for_each_linear_mut(f);
    }
}

impl<F: Module + StreamFeedForward> DoubleStreamBlock<F> {
    /// Loads `transformer_blocks.{i}`; `load_ff(weights, prefix)` reads one feed-forward.
    pub fn load(
        w: &mut Weights,
        i: usize,
        spec: &DoubleStreamSpec,
        load_ff: impl Fn(&mut Weights, &str) -> Result<F, LoadError>,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let p = format!("transformer_blocks.{i}");
        let (d, hd, bias) = (spec.dim, spec.head_dim, spec.bias);
        let modulation = |w: &mut Weights, name: &str| {
            if spec.own_modulation {
                let key = format!("{p}.{name}.linear");
                Linear::load(w, &key, d, 6 * d, bias, device).map(Some)
            } else {
                Ok(None)
            }
        };
        let qkv = |w: &mut Weights, names| {
            QkvNorm::load(w, &format!("{p}.attn"), names, d, hd, bias, device)
        };
        Ok(Self {
            norm1: modulation(w, "norm1")?,
            norm1_context: modulation(w, "norm1_context")?,
            attn_image: qkv(w, ["to_q", "to_k", "to_v", "norm_q", "norm_k"])?,
            attn_context: qkv(
                w,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
            )?,
            to_out_0: Linear::load(w, &format!("{p}.attn.to_out.0"), d, d, bias, device)?,
            to_add_out: Linear::load(w, &format!("{p}.attn.to_add_out"), d, d, bias, device)?,
            ff: load_ff(w, &format!("{p}.ff"))?,
            ff_context: load_ff(w, &format!("{p}.ff_context"))?,
        })
    }

    /// # Shapes
    /// - `x`: `[b, n_img, d]`, `context`: `[b, n_txt, d]` → the same two
    /// - `rope`: cos / sin tables over `n_txt + n_img` positions (text first)
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: Tensor<3>,
        modulation: Modulation,
        rope: &(Tensor<4>, Tensor<4>),
        heads: usize,
    ) -> (Tensor<3>, Tensor<3>) {
        let (m, cm) = match modulation {
            Modulation::PerBlock(temb_act) => {
                let own = |linear: &Option<Linear>| {
                    let linear = linear
                        .as_ref()
                        .expect("a per-block modulation needs a block loaded with own_modulation");
                    chunks(linear.forward(temb_act.clone()), 6)
                };
                (own(&self.norm1), own(&self.norm1_context))
            }
            Modulation::Shared { image, text } => (image.to_vec(), text.to_vec()),
        };
        let x_in = norm_modulate(x.clone(), m[0].clone(), m[1].clone());
        let c_in = norm_modulate(context.clone(), cm[0].clone(), cm[1].clone());
        let [q, k, v] = self.attn_image.forward(x_in, heads);
        let [cq, ck, cv] = self.attn_context.forward(c_in, heads);
        let (n_txt, n_img) = (context.dims()[1], x.dims()[1]);
        // [b, n_txt + n_img, d]: text first (FLUX's order)
        let out = rope_attention(
            Tensor::cat(vec![cq, q], 2),
            Tensor::cat(vec![ck, k], 2),
            Tensor::cat(vec![cv, v], 2),
            &rope.0,
            &rope.1,
        );
        let attn_txt = self.to_add_out.forward(out.clone().narrow(1, 0, n_txt));
        let attn_img = self.to_out_0.forward(out.narrow(1, n_txt, n_img));

        let x = x + gated(attn_img, m[2].clone());
        let x = feed_forward(&self.ff, x, &m[3..6]);
        let c = context + gated(attn_txt, cm[2].clone());
        let c = feed_forward(&self.ff_context, c, &cm[3..6]);
        (x, c)
    }
}

/// `x + gate · ff(LN(x)·(1 + scale) + shift)` with `m = [shift, scale, gate]`.
fn feed_forward<F: StreamFeedForward>(ff: &F, x: Tensor<3>, m: &[Tensor<2>]) -> Tensor<3> {
    let input = norm_modulate(x.clone(), m[0].clone(), m[1].clone());
    x + gated(ff.forward(input), m[2].clone())
}
