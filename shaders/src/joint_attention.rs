//! Attention with qk-norm and RoPE fused in, reading the projections without a head split
//! (`wgsl/joint_attention.wgsl`). On a joint MMDiT / FLUX sequence it replaces the head-split
//! copies, four RMS norms, the RoPE arithmetic, the attention and the head merge with one
//! launch. The plain-tensor twin is `split_heads` → `RmsNorm` → `apply_rope` → `sdpa` →
//! `merge_heads` in `portaflow::model::layers`.

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::{Dispatch, DispatchDevice, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::template::{KernelSource, SourceTemplate};
use cubecl::prelude::KernelId;

use crate::{KernelError, KernelTemplate, bits};

const KERNEL: &str = "joint_attention";
const WORKGROUP_SIZE: u32 = 64;
/// Floats of workgroup memory for one tile's keys, values and scores (WebGPU's default limit
/// for all workgroup memory is 16 KiB = 4096 floats; the key norms take a little more).
const TILE_FLOATS: usize = 3840;
/// The widest head the kernel takes (its query and output live in registers).
pub const MAX_HEAD_DIM: usize = 256;

pub(crate) const TEMPLATE: KernelTemplate = KernelTemplate {
    file: "joint_attention.wgsl",
    source: include_str!("../wgsl/joint_attention.wgsl"),
    example: || JointAttentionSource { head_dim: 32 }.source().complete(),
};

/// The kernel for one head width: the tile holds as many keys as fit in [`TILE_FLOATS`], and
/// the per-vec4 lines of the query and output registers are written out.
struct JointAttentionSource {
    head_dim: usize,
}

impl JointAttentionSource {
    /// Keys per tile: each takes a key and a value row and a score per lane.
    fn tile(&self) -> usize {
        (TILE_FLOATS / (2 * self.head_dim + WORKGROUP_SIZE as usize)).max(1)
    }

    /// `line` once per vec4 of a head (`{c}` → its index), joined by `separator`.
    fn per_vec4(&self, line: &str, separator: &str) -> String {
        (0..self.head_dim / 4)
            .map(|c| line.replace("{c}", &c.to_string()))
            .collect::<Vec<_>>()
            .join(separator)
    }
}

/// Whether the kernel takes heads of `head_dim`.
fn head_dim_fits(head_dim: usize) -> bool {
    head_dim % 4 == 0 && (4..=MAX_HEAD_DIM).contains(&head_dim)
}

impl KernelSource for JointAttentionSource {
    fn source(&self) -> SourceTemplate {
        let lines = |line: &str| self.per_vec4(&format!("    {line}"), "\n");
        SourceTemplate::new(TEMPLATE.source)
            .register("workgroup_size", WORKGROUP_SIZE.to_string())
            .register("head_dim", self.head_dim.to_string())
            .register("tile", self.tile().to_string())
            .register("load_query", lines("var qr{c} = q4(at + 4u * {c}u);"))
            .register("query_squares", self.per_vec4("dot(qr{c}, qr{c})", " + "))
            .register(
                "finish_query",
                lines("qr{c} = finish(qr{c}, {c}u, qs, qw, query, n, use_norm, use_rope);"),
            )
            .register("zero_output", lines("var acc{c} = vec4<f32>(0.0);"))
            .register("score", self.per_vec4("dot(qr{c}, keys[kb + {c}u])", " + "))
            .register("rescale", lines("    acc{c} *= fade;"))
            .register(
                "accumulate",
                lines("        acc{c} += p * values[kb + {c}u];"),
            )
            .register(
                "store_output",
                lines("    store4(to + 4u * {c}u, acc{c} * inv);"),
            )
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((WORKGROUP_SIZE, self.head_dim))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// What the attention applies besides softmax(q·kᵀ/√d)·v.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionOptions {
    /// Heads in the projections' last dimension (`heads · head_dim`).
    pub heads: usize,
    /// Rows below this use the first segment's norm weights, the rest the second's.
    pub first: usize,
    /// RMS norm ε (`None`: no qk-norm; `norms` is then not read).
    pub norm_eps: Option<f32>,
    /// Whether `rope` holds tables to rotate q and k by.
    pub rope: bool,
}

/// Output spec for the lazy Fusion backend: like `q`.
fn attention_meta(
    q: &TensorSpec,
    _k: &TensorSpec,
    _v: &TensorSpec,
    _norms: &TensorSpec,
    _rope: &TensorSpec,
    _params: &[u32; 5],
    _eps: &f32,
) -> TensorSpec {
    q.clone()
}

#[backend_extension(Cube, Fusion)]
pub trait JointAttentionOps: burn::backend::Backend {
    /// `params`: n, first, heads, flags, head_dim.
    #[fusion(meta = attention_meta)]
    fn fused_joint_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        norms: FloatTensor<Self>,
        rope: FloatTensor<Self>,
        params: [u32; 5],
        eps: f32,
    ) -> FloatTensor<Self>;
}

impl JointAttentionOps for CubeBackend {
    fn fused_joint_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        norms: FloatTensor<Self>,
        rope: FloatTensor<Self>,
        params: [u32; 5],
        eps: f32,
    ) -> FloatTensor<Self> {
        let [n, first, heads, flags, head_dim] = params.map(|p| p as usize);
        let (q, k, v, norms, rope) = (
            into_contiguous(q),
            into_contiguous(k),
            into_contiguous(v),
            into_contiguous(norms),
            into_contiguous(rope),
        );
        // q: [b, n, heads·head_dim]
        let shape = q.meta.shape().clone();
        let b = shape[0];
        let client = q.client.clone();
        let out = empty_device_dtype(client.clone(), q.device.clone(), shape, DType::F32);

        let source = JointAttentionSource { head_dim };
        let blocks = n.div_ceil(WORKGROUP_SIZE as usize);
        let units = b * heads * blocks;
        crate::launch(
            &client,
            source,
            WORKGROUP_SIZE,
            units,
            vec![
                q.handle.clone().binding(),
                k.handle.clone().binding(),
                v.handle.clone().binding(),
                norms.handle.clone().binding(),
                rope.handle.clone().binding(),
            ],
            &[
                bits(n),
                bits(first),
                bits(heads),
                bits(flags),
                eps,
                bits(blocks),
                bits(b),
            ],
            vec![out.handle.clone().binding()],
        );
        out
    }
}

/// Multi-head attention on a wgpu device with the qk-norm and RoPE fused in. No gradient flows
/// through the result (inference only).
///
/// # Shapes
/// - `q`, `k`, `v`: `[b, n, heads·head_dim]` (projections, heads not split)
/// - `norms`: `[4, head_dim]`: q and k RMS weights of rows `< first`, then of the rest
///   (read only with `norm_eps`)
/// - `rope`: `(cos, sin)`, each `[n, head_dim]` (interleaved pairs), with `options.rope`
/// - returns: `[b, n, heads·head_dim]` (heads merged)
pub fn joint_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    norms: Option<Tensor<2>>,
    rope: Option<(Tensor<2>, Tensor<2>)>,
    options: AttentionOptions,
) -> Result<Tensor<3>, KernelError> {
    let device = q.device();
    if !matches!(device.as_dispatch(), DispatchDevice::Cube(_)) {
        return Err(KernelError::NotCubeDevice {
            kernel: KERNEL,
            device: format!("{device:?}"),
        });
    }
    let [b, n, width] = q.dims();
    let heads = options.heads;
    let invalid = |message: String| KernelError::Invalid {
        kernel: KERNEL,
        message,
    };
    if heads == 0 || width % heads != 0 {
        return Err(invalid(format!(
            "width {width} is not a multiple of {heads} heads"
        )));
    }
    let head_dim = width / heads;
    if !head_dim_fits(head_dim) {
        return Err(invalid(format!(
            "head_dim {head_dim} must be a multiple of 4, at most {MAX_HEAD_DIM}"
        )));
    }
    if b * n == 0 || b * n * width > u32::MAX as usize {
        return Err(invalid(format!(
            "needs a non-empty [b, n, width] tensor, found {:?}",
            q.dims()
        )));
    }
    if options.norm_eps.is_some() != norms.is_some() {
        return Err(invalid(
            "norm weights go with a norm ε and only with one".into(),
        ));
    }
    if options.rope != rope.is_some() {
        return Err(invalid(
            "RoPE tables go with `rope: true` and only with it".into(),
        ));
    }
    let mut inputs: Vec<(&'static str, DType, Vec<usize>, Vec<usize>)> = vec![
        ("q", q.dtype(), q.dims().to_vec(), vec![b, n, width]),
        ("k", k.dtype(), k.dims().to_vec(), vec![b, n, width]),
        ("v", v.dtype(), v.dims().to_vec(), vec![b, n, width]),
    ];
    if let Some(w) = &norms {
        inputs.push(("norms", w.dtype(), w.dims().to_vec(), vec![4, head_dim]));
    }
    if let Some((cos, sin)) = &rope {
        inputs.push(("cos", cos.dtype(), cos.dims().to_vec(), vec![n, head_dim]));
        inputs.push(("sin", sin.dtype(), sin.dims().to_vec(), vec![n, head_dim]));
    }
    for (input, dtype, found, expected) in inputs {
        if dtype != DType::F32 {
            return Err(KernelError::DType {
                kernel: KERNEL,
                found: format!("{dtype:?} for `{input}`"),
            });
        }
        if found != expected {
            return Err(KernelError::Shape {
                kernel: KERNEL,
                input,
                expected,
                found,
            });
        }
    }
    // Bindings must exist even when unread.
    let placeholder = || Tensor::<2>::zeros([1, 2], &device);
    let norms = norms.unwrap_or_else(placeholder);
    let rope = match rope {
        Some((cos, sin)) => Tensor::cat(vec![cos, sin], 0), // [2n, head_dim]
        None => placeholder(),
    };
    let flags = usize::from(options.norm_eps.is_some()) | (usize::from(options.rope) << 1);
    let params = [n, options.first.min(n), heads, flags, head_dim].map(|p| p as u32);
    let [q, k, v] = [q, k, v].map(|t| t.without_autodiff().into_dispatch());
    let [norms, rope] = [norms, rope].map(|t| t.without_autodiff().into_dispatch());
    let out = <Dispatch as JointAttentionOps>::fused_joint_attention(
        q,
        k,
        v,
        norms,
        rope,
        params,
        options.norm_eps.unwrap_or(0.0),
    );
    Ok(Tensor::from_dispatch(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_fills_every_placeholder() {
        for head_dim in [4, 32, 48, 64, 128, 256] {
            assert!(head_dim_fits(head_dim));
            let source = JointAttentionSource { head_dim };
            let text = source.source().complete();
            assert!(!text.contains("{{"), "unfilled placeholder in:\n{text}");
            assert!(text.contains(&format!("const D: u32 = {head_dim}u;")));
            assert!(source.tile() * (2 * head_dim + WORKGROUP_SIZE as usize) <= TILE_FLOATS);
            assert!(text.contains(&format!("acc{} * inv", head_dim / 4 - 1)));
        }
        for head_dim in [2, 6, 260, 512] {
            assert!(!head_dim_fits(head_dim), "{head_dim}");
        }
    }
}
