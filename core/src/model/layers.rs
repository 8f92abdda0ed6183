//! Layers shared by every model family (SD3 MMDiT, FLUX.1, FLUX.2): linear, norms, modulation,
//! timestep embeddings, multi-head attention. Written once here, never copied per family.

use burn::module::{Module, Param};
use burn::tensor::activation::sigmoid;
use burn::tensor::module::{attention, linear};
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::weights::{LoadError, Weights};
use crate::lora::LoraAdapter;

/// Epsilon of every LayerNorm and RMSNorm in the supported families.
pub const NORM_EPS: f64 = 1e-6;

/// A linear layer `y = x·W + b` with W stored `[d_in, d_out]` (checkpoints store `[d_out, d_in]`;
/// the loader transposes once), plus any LoRA adapters attached to it.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
    /// Side paths added to the output in order (see [`crate::lora`]).
    pub lora: Vec<LoraAdapter>,
    /// The module path in the diffusers / transformers tree (`transformer_blocks.0.attn.to_q`):
    /// what PEFT's `target_modules` and every LoRA file's keys name.
    #[module(skip)]
    pub path: String,
}

impl Linear {
    /// Loads `<prefix>.weight` `[d_out, d_in]` and, if `bias`, `<prefix>.bias` `[d_out]`.
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Self::load_stored(w, prefix, &[d_out, d_in], d_in, d_out, bias, device)
    }

    /// Like [`Linear::load`] for a weight stored with another shape of the same row-major layout
    /// (a patchify convolution `[d_out, c, p, p]` is a linear over `c·p·p` inputs).
    pub fn load_stored(
        w: &mut Weights,
        prefix: &str,
        stored: &[usize],
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Self, LoadError> {
        debug_assert_eq!(stored.iter().product::<usize>(), d_in * d_out);
        let key = format!("{prefix}.weight");
        let values = w
            .read(&key, stored)?
            .unwrap_or_else(|| vec![0.0; d_in * d_out]);
        // [d_out, d_in] → [d_in, d_out]
        let mut transposed = vec![0.0f32; values.len()];
        for o in 0..d_out {
            for i in 0..d_in {
                transposed[i * d_out + o] = values[o * d_in + i];
            }
        }
        let weight = Tensor::from_data(TensorData::new(transposed, [d_in, d_out]), device);
        let bias = if bias {
            Some(Param::from_tensor(w.tensor(
                &format!("{prefix}.bias"),
                [d_out],
                device,
            )?))
        } else {
            None
        };
        Ok(Self {
            weight: Param::from_tensor(weight),
            bias,
            lora: Vec::new(),
            path: prefix.to_string(),
        })
    }

    /// # Shapes
    /// - `x`: `[..., d_in]` → `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let base = linear(
            x.clone(),
            self.weight.val(),
            self.bias.as_ref().map(|b| b.val()),
        );
        self.lora
            .iter()
            .filter(|adapter| adapter.is_active())
            .fold(base, |y, adapter| y + adapter.forward(x.clone()))
    }

    pub fn d_in(&self) -> usize {
        self.weight.val().dims()[0]
    }

    pub fn d_out(&self) -> usize {
        self.weight.val().dims()[1]
    }
}

/// RMSNorm with a learned scale (the qk-norm of SD3.5 / FLUX; T5's and Qwen3's layer norms).
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    #[module(skip)]
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(
        w: &mut Weights,
        key: &str,
        dim: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            weight: Param::from_tensor(w.tensor(key, [dim], device)?),
            eps: NORM_EPS,
        })
    }

    /// The same norm with another ε (text encoders' `layer_norm_epsilon` / `rms_norm_eps`).
    pub fn with_eps(self, eps: f64) -> Self {
        Self { eps, ..self }
    }

    /// `x · rsqrt(mean(x²) + ε) · weight` over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let rms = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        let weight: Tensor<D> = self.weight.val().unsqueeze();
        x / rms * weight
    }
}

/// LayerNorm without affine parameters over the last dimension.
pub fn layer_norm<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let mean = x.clone().mean_dim(D - 1);
    let centered = x - mean;
    let var = centered.clone().square().mean_dim(D - 1);
    centered / var.add_scalar(NORM_EPS).sqrt()
}

/// LayerNorm with a learned scale and shift (CLIP's `layer_norm1/2`, `final_layer_norm`).
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    #[module(skip)]
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `<prefix>.weight` and `<prefix>.bias`, both `[dim]`.
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        dim: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            weight: Param::from_tensor(w.tensor(&format!("{prefix}.weight"), [dim], device)?),
            bias: Param::from_tensor(w.tensor(&format!("{prefix}.bias"), [dim], device)?),
            eps,
        })
    }

    /// `(x − mean) / sqrt(var + ε) · weight + bias` over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let mean = x.clone().mean_dim(D - 1);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(D - 1);
        let weight: Tensor<D> = self.weight.val().unsqueeze();
        let bias: Tensor<D> = self.bias.val().unsqueeze();
        centered / var.add_scalar(self.eps).sqrt() * weight + bias
    }
}

/// A token embedding table (`nn.Embedding`): row `i` is the vector of token `i`.
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    /// Loads `<prefix>.weight` `[count, dim]`.
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        count: usize,
        dim: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            weight: Param::from_tensor(w.tensor(
                &format!("{prefix}.weight"),
                [count, dim],
                device,
            )?),
        })
    }

    /// # Shapes
    /// - `ids`: `[b, seq]` → `[b, seq, dim]`
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, seq] = ids.dims();
        let dim = self.weight.val().dims()[1];
        // [b·seq] rows of the table → [b, seq, dim]
        self.weight
            .val()
            .select(0, ids.reshape([b * seq]))
            .reshape([b, seq, dim])
    }
}

/// `x·(1 + scale) + shift` with per-sample modulation vectors.
///
/// # Shapes
/// - `x`: `[b, seq, dim]`; `shift`, `scale`: `[b, dim]`
pub fn modulate(x: Tensor<3>, shift: Tensor<2>, scale: Tensor<2>) -> Tensor<3> {
    x * scale.add_scalar(1.0).unsqueeze_dim(1) + shift.unsqueeze_dim(1)
}

/// Whether the hand-written kernels (`portaflow_shaders`) take `x`: it lives on a wgpu device
/// and tracks no gradient (they have no backward).
pub fn kernels_apply<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(
        x.device().as_dispatch(),
        burn::backend::DispatchDevice::Cube(_)
    ) && !x.is_autodiff()
}

/// `modulate(layer_norm(x), shift, scale)`, the AdaLN input of every MMDiT / FLUX block: one
/// fused kernel (`portaflow_shaders::norm_modulate`) on a wgpu device outside autodiff, the
/// tensor ops elsewhere.
///
/// # Shapes
/// - `x`: `[b, seq, dim]`; `shift`, `scale`: `[b, dim]`
pub fn norm_modulate(x: Tensor<3>, shift: Tensor<2>, scale: Tensor<2>) -> Tensor<3> {
    if kernels_apply(&x) {
        // Falls back on what the kernel declines (e.g. half precision).
        if let Ok(out) =
            portaflow_shaders::norm_modulate(x.clone(), shift.clone(), scale.clone(), NORM_EPS)
        {
            return out;
        }
    }
    modulate(layer_norm(x), shift, scale)
}

/// Whether [`fused_joint_attention`] runs at all. Off by default: on lavapipe it measured 7–10%
/// slower end to end than burn's tensor ops (BENCHMARKS.md, "Fused joint attention"); on a GPU
/// driver it is unmeasured. `PORTAFLOW_FUSED_ATTENTION=1` turns it on for a process.
fn fused_attention_switch() -> &'static std::sync::atomic::AtomicBool {
    static SWITCH: std::sync::OnceLock<std::sync::atomic::AtomicBool> = std::sync::OnceLock::new();
    SWITCH.get_or_init(|| {
        let on = std::env::var("PORTAFLOW_FUSED_ATTENTION").is_ok_and(|v| v == "1");
        std::sync::atomic::AtomicBool::new(on)
    })
}

/// Whether [`fused_joint_attention`] would run on `x` (switched on, wgpu, no autodiff): callers
/// check before computing its inputs.
pub fn fused_attention_applies<const D: usize>(x: &Tensor<D>) -> bool {
    fused_attention_switch().load(std::sync::atomic::Ordering::Relaxed) && kernels_apply(x)
}

/// Turns the fused joint attention on or off for the whole process.
pub fn set_fused_attention(on: bool) {
    fused_attention_switch().store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The fused attention's qk-norm input for two segments' (q, k) norms: `Some(None)` without
/// norms, `Some(Some((weights [4, head_dim], ε)))` with all four, `None` when the segments
/// disagree in presence or ε (the kernel takes one ε). Callers check it before computing the
/// projections.
pub fn fused_attention_norms(
    norms: [(&Option<RmsNorm>, &Option<RmsNorm>); 2],
) -> Option<Option<(Tensor<2>, f64)>> {
    match [norms[0].0, norms[0].1, norms[1].0, norms[1].1] {
        [Some(a), Some(b), Some(c), Some(d)] => {
            if [b, c, d].iter().any(|n| n.eps != a.eps) {
                return None;
            }
            let rows = [a, b, c, d].map(|n| n.weight.val().unsqueeze_dim::<2>(0));
            Some(Some((Tensor::cat(rows.to_vec(), 0), a.eps))) // [4, head_dim]
        }
        [None, None, None, None] => Some(None),
        _ => None,
    }
}

/// Joint attention on projections that are not split into heads: `q`, `k`, `v` `[b, n, d]`,
/// rows `< first` normed with the first two rows of `norms` (from [`fused_attention_norms`]) and
/// the rest with the last two, attention, merged heads `[b, n, d]`, in one kernel
/// (`portaflow_shaders::joint_attention`). Only where [`fused_attention_applies`]; `None` if the
/// kernel declines its input (the caller keeps its tensor ops).
pub fn fused_joint_attention(
    q: &Tensor<3>,
    k: &Tensor<3>,
    v: &Tensor<3>,
    heads: usize,
    first: usize,
    norms: Option<(Tensor<2>, f64)>,
) -> Option<Tensor<3>> {
    let options = portaflow_shaders::AttentionOptions {
        heads,
        first,
        norm_eps: norms.as_ref().map(|(_, eps)| *eps as f32),
        rope: false,
    };
    let weights = norms.map(|(w, _)| w);
    portaflow_shaders::joint_attention(q.clone(), k.clone(), v.clone(), weights, None, options).ok()
}

/// `x · gate` with a per-sample gate. `x`: `[b, seq, dim]`, `gate`: `[b, dim]`.
pub fn gated(x: Tensor<3>, gate: Tensor<2>) -> Tensor<3> {
    x * gate.unsqueeze_dim(1)
}

/// Splits a modulation vector `[b, n·dim]` into its `n` chunks `[b, dim]`.
pub fn chunks(x: Tensor<2>, n: usize) -> Vec<Tensor<2>> {
    x.chunk(n, 1)
}

/// diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: frequencies
/// `exp(−ln(10000)·i/(dim/2))`, output `[cos, sin]`.
///
/// The frequencies and arguments are formed in f32 exactly as diffusers forms them: at FLUX's
/// guidance inputs (×1000, so arguments up to ~4000) an f64 argument differs by 1e-4 rad.
///
/// # Shapes
/// - returns `[timesteps.len(), dim]`
pub fn timestep_embedding(timesteps: &[f64], dim: usize, device: &Device) -> Tensor<2> {
    let half = dim / 2;
    let frequencies: Vec<f32> = (0..half)
        .map(|i| ((-(10000f32.ln()) * i as f32) / half as f32).exp())
        .collect();
    let mut values = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f64> = frequencies.iter().map(|&f| (t as f32 * f) as f64).collect();
        values.extend(args.iter().map(|a| a.cos() as f32));
        values.extend(args.iter().map(|a| a.sin() as f32));
    }
    Tensor::from_data(TensorData::new(values, [timesteps.len(), dim]), device)
}

/// Two linears with SiLU between (diffusers' `TimestepEmbedding`, `PixArtAlphaTextProjection`).
#[derive(Module, Debug)]
pub struct MlpEmbedder {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

crate::linears!(MlpEmbedder: linear_1, linear_2);

impl MlpEmbedder {
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        d_in: usize,
        dim: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            linear_1: Linear::load(w, &format!("{prefix}.linear_1"), d_in, dim, bias, device)?,
            linear_2: Linear::load(w, &format!("{prefix}.linear_2"), dim, dim, bias, device)?,
        })
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }
}

/// `2·√(2/π)`: GELU(tanh)'s `tanh(z)` is `2·sigmoid(2z) − 1`.
pub(crate) const TWO_SQRT_2_OVER_PI: f64 =
    2.0 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
/// GELU(tanh)'s cubic coefficient.
pub(crate) const GELU_CUBIC: f64 = 0.044715;

/// GELU with the tanh approximation (PyTorch's `gelu(approximate="tanh")`, diffusers'
/// "gelu-approximate", T5's "gelu_new") written as `x·sigmoid(2·√(2/π)·(x + 0.044715·x³))`,
/// which equals `½·x·(1 + tanh(…))` exactly since `½(1 + tanh z) = sigmoid(2z)`. burn's
/// `gelu_approximate` computes x³ with `powf` and calls `tanh`, both scalar libm calls per element
/// on the CPU: they took 37% of a Flex sampling profile, against one `exp` here. On Flex outside
/// autodiff it is one fused pass (`flex::activations`), within 1e-6 relative.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if super::flex::activations::applies(&x) {
        return super::flex::activations::gelu_tanh(x);
    }
    gelu_tanh_tensor_ops(x)
}

/// [`gelu_tanh`] in tensor ops, for every device and for autodiff.
fn gelu_tanh_tensor_ops<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let cube = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cube * GELU_CUBIC) * TWO_SQRT_2_OVER_PI;
    x * sigmoid(inner)
}

/// SiLU `x·sigmoid(x)`: burn's, or on Flex outside autodiff one fused pass (`flex::activations`),
/// within 1e-6 relative.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if super::flex::activations::applies(&x) {
        return super::flex::activations::silu(x);
    }
    burn::tensor::activation::silu(x)
}

/// diffusers' `FeedForward(activation_fn="gelu-approximate")`: `net.0.proj` → GELU(tanh) → `net.2`.
#[derive(Module, Debug)]
pub struct GeluFeedForward {
    pub net_0_proj: Linear,
    pub net_2: Linear,
}

crate::linears!(GeluFeedForward: net_0_proj, net_2);

impl GeluFeedForward {
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        dim: usize,
        hidden: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            net_0_proj: Linear::load(
                w,
                &format!("{prefix}.net.0.proj"),
                dim,
                hidden,
                true,
                device,
            )?,
            net_2: Linear::load(w, &format!("{prefix}.net.2"), hidden, dim, true, device)?,
        })
    }

    /// On Flex outside autodiff, without active LoRA side paths, one row-blocked kernel
    /// (`flex::mlp`, equal to these ops within 1e-5).
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let (up, down) = (&self.net_0_proj, &self.net_2);
        if let (Some(b1), Some(b2)) = (&up.bias, &down.bias)
            && !up.lora.iter().chain(&down.lora).any(|a| a.is_active())
            && super::flex::mlp::applies(&x, &up.weight.val(), &down.weight.val())
        {
            return super::flex::mlp::gelu_mlp(
                x,
                up.weight.val(),
                b1.val(),
                down.weight.val(),
                b2.val(),
            );
        }
        down.forward(gelu_tanh(up.forward(x)))
    }
}

/// `[b, seq, heads·head_dim]` → `[b, heads, seq, head_dim]`.
pub fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, seq, width] = x.dims();
    x.reshape([b, seq, heads, width / heads]).swap_dims(1, 2)
}

/// `[b, heads, seq, head_dim]` → `[b, seq, heads·head_dim]`.
pub fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, heads, seq, head_dim] = x.dims();
    x.swap_dims(1, 2).reshape([b, seq, heads * head_dim])
}

/// Scaled dot-product attention without mask, scale 1/√head_dim: burn's, or on Flex
/// `flex::attention` (one tracked op under autodiff).
///
/// # Shapes
/// - `q`, `k`, `v`: `[b, heads, seq, head_dim]` → `[b, heads, seq, head_dim]`
pub fn sdpa(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    if super::flex::attention::applies(&q, &k, &v) {
        return super::flex::attention::sdpa(q, k, v);
    }
    attention(q, k, v, None, None, Default::default())
}

/// Rotary position tables of FLUX's multi-axis RoPE (`FluxPosEmbed`): for each axis of width
/// d_a, frequencies ω_k = θ^(−2k/d_a); angles in f64; cos/sin repeated per interleaved pair and the
/// axes concatenated.
///
/// # Shapes
/// - `ids`: one `[axes]` position row per token → `(cos, sin)`, each `[1, 1, tokens, Σ d_a]`
pub fn rope_tables(
    ids: &[Vec<f64>],
    axes_dims: &[usize],
    theta: f64,
    device: &Device,
) -> (Tensor<4>, Tensor<4>) {
    let width: usize = axes_dims.iter().sum();
    let mut cos = Vec::with_capacity(ids.len() * width);
    let mut sin = Vec::with_capacity(ids.len() * width);
    for row in ids {
        for (axis, &dim) in axes_dims.iter().enumerate() {
            for k in 0..dim / 2 {
                let omega = 1.0 / theta.powf(2.0 * k as f64 / dim as f64);
                let angle = row[axis] * omega;
                let (c, s) = (angle.cos() as f32, angle.sin() as f32);
                cos.extend([c, c]);
                sin.extend([s, s]);
            }
        }
    }
    let shape = [1, 1, ids.len(), width];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// Applies interleaved RoPE: pairs (x[2i], x[2i+1]) rotate together,
/// `out = x·cos + rot(x)·sin` with `rot(x)[2i] = −x[2i+1]`, `rot(x)[2i+1] = x[2i]`.
///
/// # Shapes
/// - `x`: `[b, heads, seq, head_dim]`; `cos`, `sin`: `[1, 1, seq, head_dim]`
pub fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    // [b, h, s, d/2, 2]
    let pairs: Tensor<5> = x.clone().reshape([b, h, s, d / 2, 2]);
    let even = pairs.clone().narrow(4, 0, 1);
    let odd = pairs.narrow(4, 1, 1);
    let rotated: Tensor<4> = Tensor::cat(vec![odd.neg(), even], 4).reshape([b, h, s, d]);
    x * cos.clone() + rotated * sin.clone()
}

/// q/k/v with qk-norm for one stream.
#[derive(Module, Debug)]
pub struct QkvNorm {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub norm_q: RmsNorm,
    pub norm_k: RmsNorm,
}

crate::linears!(QkvNorm: q, k, v);

impl QkvNorm {
    /// Loads `<prefix>.{names[0..3]}` (linears d → d) and `<prefix>.{names[3..5]}.weight` (RMSNorm).
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        names: [&str; 5],
        d: usize,
        hd: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let lin = |w: &mut Weights, n: &str| {
            Linear::load(w, &format!("{prefix}.{n}"), d, d, bias, device)
        };
        Ok(Self {
            q: lin(w, names[0])?,
            k: lin(w, names[1])?,
            v: lin(w, names[2])?,
            norm_q: RmsNorm::load(w, &format!("{prefix}.{}.weight", names[3]), hd, device)?,
            norm_k: RmsNorm::load(w, &format!("{prefix}.{}.weight", names[4]), hd, device)?,
        })
    }

    /// `[b, s, d]` → q, k, v `[b, h, s, hd]`, q and k normalised.
    pub fn forward(&self, x: Tensor<3>, heads: usize) -> [Tensor<4>; 3] {
        [
            self.norm_q
                .forward(split_heads(self.q.forward(x.clone()), heads)),
            self.norm_k
                .forward(split_heads(self.k.forward(x.clone()), heads)),
            split_heads(self.v.forward(x), heads),
        ]
    }
}

/// Attention over the joint [text; image] sequence with RoPE. Inputs `[b, h, s, hd]`.
pub fn rope_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    cos: &Tensor<4>,
    sin: &Tensor<4>,
) -> Tensor<3> {
    merge_heads(sdpa(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v))
}

#[cfg(test)]
mod tests {

    #[test]
    fn gelu_tanh_equals_burns_gelu_approximate() {
        let device = Device::flex();
        let x = Tensor::<1>::from_data(
            TensorData::new(
                (-80..=80).map(|i| i as f32 * 0.1).collect::<Vec<_>>(),
                [161],
            ),
            &device,
        );
        let ours: Vec<f32> = gelu_tanh(x.clone()).into_data().try_to_vec().unwrap();
        let burn: Vec<f32> = burn::tensor::activation::gelu_approximate(x)
            .into_data()
            .try_to_vec()
            .unwrap();
        for (a, b) in ours.iter().zip(&burn) {
            assert!((a - b).abs() <= 2e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    use super::*;

    /// Worst relative difference, with an absolute floor far below what a model can notice.
    fn worst_relative(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / (y.abs() + 1e-30))
            .fold(0.0, f32::max)
    }

    #[test]
    fn flex_fused_activations_match_the_tensor_ops() {
        let device = Device::flex();
        // Both signs, tiny and saturating values, an odd length (not a multiple of a chunk).
        let values: Vec<f32> = (0..40_001)
            .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 24.0 * (1.0 + (i % 7) as f32))
            .collect();
        let x = Tensor::<2>::from_data(TensorData::new(values, [1, 40_001]), &device);
        assert!(crate::model::flex::activations::applies(&x));
        let fused: Vec<f32> = gelu_tanh(x.clone()).into_data().try_to_vec().unwrap();
        let plain: Vec<f32> = gelu_tanh_tensor_ops(x.clone())
            .into_data()
            .try_to_vec()
            .unwrap();
        let worst = worst_relative(&fused, &plain);
        assert!(worst < 1e-6, "gelu: worst relative difference {worst:e}");
        let fused: Vec<f32> = silu(x.clone()).into_data().try_to_vec().unwrap();
        let plain: Vec<f32> = burn::tensor::activation::silu(x.clone())
            .into_data()
            .try_to_vec()
            .unwrap();
        let worst = worst_relative(&fused, &plain);
        assert!(worst < 1e-6, "silu: worst relative difference {worst:e}");
        // A transposed (non-contiguous) view gives the same values as its contiguous copy.
        let t = x
            .clone()
            .slice([0..1, 0..40_000])
            .reshape([200, 200])
            .transpose();
        let copy = Tensor::<2>::from_data(t.clone().into_data(), &device);
        let fused_t: Vec<f32> = gelu_tanh(t).into_data().try_to_vec().unwrap();
        let fused_copy: Vec<f32> = gelu_tanh(copy).into_data().try_to_vec().unwrap();
        assert_eq!(fused_t, fused_copy);
        // A shared input is left untouched.
        let before: Vec<f32> = x.clone().into_data().try_to_vec().unwrap();
        let _ = silu(x.clone());
        assert_eq!(x.into_data().try_to_vec::<f32>().unwrap(), before);
    }

    #[test]
    fn flex_fused_activations_differentiate_like_the_tensor_ops() {
        let device = Device::flex();
        let n = 40_001;
        let values: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 16.0)
            .collect();
        // An upstream gradient that is not all ones, so the backward pass must multiply by it.
        let weights: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) * 0.25).collect();
        let weights = Tensor::<2>::from_data(TensorData::new(weights, [1, n]), &device);
        let x = Tensor::<2>::from_data(TensorData::new(values, [1, n]), &device);
        type Activation = fn(Tensor<2>) -> Tensor<2>;
        let run = |f: Activation| {
            let x = x.clone().autodiff().require_grad();
            let y = f(x.clone());
            let grads = (y.clone() * weights.clone().autodiff()).sum().backward();
            let value: Vec<f32> = y.inner().into_data().try_to_vec().unwrap();
            let grad: Vec<f32> = x.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
            (value, grad)
        };
        let tracked = x.clone().autodiff().require_grad();
        assert!(crate::model::flex::activations::applies(&tracked));
        let pairs: [(&str, Activation, Activation); 2] = [
            ("gelu", gelu_tanh, gelu_tanh_tensor_ops),
            ("silu", silu, burn::tensor::activation::silu),
        ];
        for (name, fused, plain) in pairs {
            let (fused_value, fused_grad) = run(fused);
            let (plain_value, plain_grad) = run(plain);
            let worst = worst_relative(&fused_value, &plain_value);
            assert!(worst < 1e-6, "{name}: worst relative difference {worst:e}");
            // The derivative crosses zero, so the bound is absolute plus relative.
            let worst = fused_grad
                .iter()
                .zip(&plain_grad)
                .map(|(a, b)| (a - b).abs() / (1e-4 + b.abs()))
                .fold(0.0, f32::max);
            assert!(worst < 1e-3, "{name}: worst gradient difference {worst:e}");
            assert!(plain_grad.iter().any(|g| g.abs() > 1.0));
        }
    }

    #[test]
    fn rope_rotates_interleaved_pairs() {
        let device = Device::flex();
        // One token at position 1 on a single axis of width 4, θ = 1: every ω = 1, angle 1.
        let (cos, sin) = rope_tables(&[vec![1.0]], &[4], 1.0, &device);
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![1.0f32, 0.0, 0.0, 2.0], [1, 1, 1, 4]),
            &device,
        );
        let y: Vec<f32> = apply_rope(x, &cos, &sin).into_data().try_to_vec().unwrap();
        let (c, s) = (1f32.cos(), 1f32.sin());
        // (1, 0) → (c, s); (0, 2) → (−2s, 2c)
        let want = [c, s, -2.0 * s, 2.0 * c];
        for i in 0..4 {
            assert!((y[i] - want[i]).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn timestep_embedding_is_cos_then_sin() {
        let device = Device::flex();
        let e: Vec<f32> = timestep_embedding(&[0.0, 1.0], 4, &device)
            .into_data()
            .try_to_vec()
            .unwrap();
        // t = 0: cos 0 = 1 (both), sin 0 = 0; t = 1: freqs [1, 0.01].
        assert_eq!(&e[..4], &[1.0, 1.0, 0.0, 0.0]);
        let want = [1f64.cos(), 0.01f64.cos(), 1f64.sin(), 0.01f64.sin()];
        for i in 0..4 {
            assert!((e[4 + i] as f64 - want[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn layer_norm_and_rms_norm_normalise_the_last_dim() {
        let device = Device::flex();
        let x = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 6.0], [1, 4]),
            &device,
        );
        let y: Vec<f32> = layer_norm(x.clone()).into_data().try_to_vec().unwrap();
        let mean: f32 = y.iter().sum::<f32>() / 4.0;
        let var: f32 = y.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-4);
        let norm = RmsNorm {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![1.0f32, 1.0, 1.0, 2.0], [4]),
                &device,
            )),
            eps: NORM_EPS,
        };
        let y: Vec<f32> = norm.forward(x).into_data().try_to_vec().unwrap();
        let rms = ((1.0f32 + 4.0 + 9.0 + 36.0) / 4.0).sqrt();
        assert!((y[3] - 12.0 / rms).abs() < 1e-5);
    }
}
