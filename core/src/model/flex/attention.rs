//! Scaled dot-product attention on Flex for sampling.
//!
//! Flex's attention for short sequences runs two matmuls per head around a softmax written for
//! every element type and option (mask, bias, soft-cap, causal), a scalar loop calling libm's
//! `expf`: 9% of a batch-16 sampling profile. Here the softmax is one vectorisable pass on the
//! polynomial `exp` of [`super::activations`], the scale is folded into the first matmul, and
//! heads run on rayon's threads. No mask, no autodiff (training keeps burn's attention).

use burn::backend::{Dispatch, DispatchDevice, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::{Flex, FlexTensor};

use super::activations::exp_f32;

#[backend_extension(Flex)]
pub trait FlexAttentionOps: burn::backend::Backend {
    fn flex_sdpa(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

impl FlexAttentionOps for Flex {
    fn flex_sdpa(q: FlexTensor, k: FlexTensor, v: FlexTensor) -> FlexTensor {
        let dims = |t: &FlexTensor| -> [usize; 4] {
            t.layout()
                .shape()
                .to_vec()
                .try_into()
                .expect("sdpa: 4-D inputs")
        };
        let ([b, h, s_q, d], [_, _, s_kv, _], [_, _, _, d_v]) = (dims(&q), dims(&k), dims(&v));
        let (q, k, v) = (q.to_contiguous(), k.to_contiguous(), v.to_contiguous());
        let out = sdpa_f32(
            &q.storage::<f32>()[..b * h * s_q * d],
            &k.storage::<f32>()[..b * h * s_kv * d],
            &v.storage::<f32>()[..b * h * s_kv * d_v],
            [b * h, s_q, s_kv, d, d_v],
        );
        FlexTensor::from_data(TensorData::new(out, [b, h, s_q, d_v]))
    }
}

/// Whether [`sdpa`] can run: f32 tensors on Flex outside autodiff, q `[b, h, s_q, d]`, k
/// `[b, h, s_kv, d]` and v `[b, h, s_kv, d_v]`.
pub fn applies(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> bool {
    let ([b, h, _, d], [kb, kh, s_kv, kd], [vb, vh, vs, _]) = (q.dims(), k.dims(), v.dims());
    [q, k, v]
        .iter()
        .all(|t| t.dtype() == DType::F32 && !t.is_autodiff())
        && (kb, kh, kd) == (b, h, d)
        && (vb, vh, vs) == (b, h, s_kv)
        && matches!(
            q.device().as_dispatch().clone().inner(),
            DispatchDevice::Flex(_)
        )
}

/// softmax(q·kᵀ/√d)·v without mask; the arguments must satisfy [`applies`].
///
/// # Shapes
/// - `q`: `[b, h, s_q, d]`, `k`: `[b, h, s_kv, d]`, `v`: `[b, h, s_kv, d_v]` → `[b, h, s_q, d_v]`
pub fn sdpa(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FlexAttentionOps>::flex_sdpa(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
    ))
}

/// `heads` independent attentions over row-major q `[heads, s_q, d]`, k `[heads, s_kv, d]`, v
/// `[heads, s_kv, d_v]`; returns `[heads, s_q, d_v]`.
fn sdpa_f32(q: &[f32], k: &[f32], v: &[f32], [heads, s_q, s_kv, d, d_v]: [usize; 5]) -> Vec<f32> {
    let mut out = vec![0.0f32; heads * s_q * d_v];
    if out.is_empty() {
        return out;
    }
    let scale = 1.0 / (d as f32).sqrt();
    let head = |scores: &mut Vec<f32>, (i, out): (usize, &mut [f32])| {
        let (q, k, v) = (
            &q[i * s_q * d..][..s_q * d],
            &k[i * s_kv * d..][..s_kv * d],
            &v[i * s_kv * d_v..][..s_kv * d_v],
        );
        // SAFETY: scores is [s_q, s_kv]; q [s_q, d] row-major; kᵀ read from k [s_kv, d]
        // row-major (row stride 1 along d, column stride d along s_kv).
        unsafe {
            gemm::gemm(
                s_q,
                s_kv,
                d,
                scores.as_mut_ptr(),
                1,
                s_kv as isize,
                false,
                q.as_ptr(),
                1,
                d as isize,
                k.as_ptr(),
                d as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        softmax_rows(scores, s_kv);
        // SAFETY: out [s_q, d_v] = scores [s_q, s_kv] · v [s_kv, d_v], all row-major.
        unsafe {
            gemm::gemm(
                s_q,
                d_v,
                s_kv,
                out.as_mut_ptr(),
                1,
                d_v as isize,
                false,
                scores.as_ptr(),
                1,
                s_kv as isize,
                v.as_ptr(),
                1,
                d_v as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    let scratch = || vec![0.0f32; s_q * s_kv];
    #[cfg(feature = "native")]
    {
        use rayon::prelude::*;
        out.par_chunks_mut(s_q * d_v)
            .enumerate()
            .for_each_init(scratch, head);
    }
    #[cfg(not(feature = "native"))]
    {
        let mut scores = scratch();
        out.chunks_mut(s_q * d_v)
            .enumerate()
            .for_each(|item| head(&mut scores, item));
    }
    out
}

/// Softmax of every `width`-long row of `scores`, in place; compiled for AVX2 + FMA when the CPU
/// has them.
fn softmax_rows(scores: &mut [f32], width: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(scores: &mut [f32], width: usize) {
            scores.chunks_mut(width).for_each(softmax_row);
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features `wide` was compiled for.
            return unsafe { wide(scores, width) };
        }
    }
    scores.chunks_mut(width).for_each(softmax_row);
}

#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    row.iter_mut().for_each(|x| *x = exp_f32(*x - max));
    // Eight partial sums, so that the reduction vectorises without reassociation.
    let mut lanes = [0.0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    let sum = lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::module::attention;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn sdpa_equals_burns_attention() {
        let device = Device::flex();
        // One token, the bundled model's joint sequence, cross-attention lengths, d_v ≠ d, and
        // logits large enough that the softmax must subtract its maximum.
        for ([b, h, s_q, s_kv, d, d_v], std) in [
            ([1, 1, 1, 1, 4, 4], 1.0),
            ([2, 4, 80, 80, 32, 32], 1.0),
            ([3, 2, 7, 13, 8, 5], 1.0),
            ([1, 2, 9, 9, 16, 16], 30.0),
        ] {
            let normal = |shape: [usize; 4]| {
                Tensor::<4>::random(shape, Distribution::Normal(0.0, std), &device)
            };
            let (q, k, v) = (
                normal([b, h, s_q, d]),
                normal([b, h, s_kv, d]),
                normal([b, h, s_kv, d_v]),
            );
            assert!(applies(&q, &k, &v));
            let ours: Vec<f32> = sdpa(q.clone(), k.clone(), v.clone())
                .into_data()
                .try_to_vec()
                .unwrap();
            let burn: Vec<f32> = attention(q, k, v, None, None, Default::default())
                .into_data()
                .try_to_vec()
                .unwrap();
            assert_eq!(ours.len(), burn.len());
            let tolerance = 1e-4;
            for (i, (a, e)) in ours.iter().zip(&burn).enumerate() {
                assert!(
                    (a - e).abs() <= tolerance * e.abs().max(1.0),
                    "[{b}, {h}, {s_q}×{s_kv}, {d}→{d_v}] element {i}: {a} vs {e}"
                );
            }
        }
    }

    #[test]
    fn sdpa_declines_what_it_cannot_compute() {
        let device = Device::flex();
        let t = |shape: [usize; 4]| Tensor::<4>::zeros(shape, &device);
        let (q, k, v) = (t([1, 2, 5, 8]), t([1, 2, 6, 8]), t([1, 2, 6, 3]));
        assert!(applies(&q, &k, &v));
        assert!(!applies(&q, &t([1, 2, 6, 4]), &v), "head width");
        assert!(!applies(&q, &k, &t([1, 2, 5, 3])), "value length");
        assert!(
            !applies(&q.clone().autodiff().require_grad(), &k, &v),
            "autodiff"
        );
    }
}
