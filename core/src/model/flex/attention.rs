//! Scaled dot-product attention on Flex, for sampling and training.
//!
//! Flex's attention for short sequences runs two matmuls per head around a softmax written for
//! every element type and option (mask, bias, soft-cap, causal), a scalar loop calling libm's
//! `expf`: 9% of a batch-16 sampling profile. Here the softmax is one vectorisable pass on the
//! polynomial `exp` of [`super::activations`], the scale is folded into the first matmul, and
//! heads run on rayon's threads. No mask.
//!
//! Under autodiff (training on Flex) it is one tracked op that keeps the softmax probabilities P
//! per head; its backward is four matmuls and one row pass per head (dV = Pᵀ·dO, dP = dO·Vᵀ,
//! dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = scale·dS·K, dK = scale·dSᵀ·Q) instead of the dozen nodes
//! of burn's attention written in tensor ops.

use burn::backend::{Dispatch, DispatchDevice, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::{Flex, FlexTensor};

use super::activations::exp_f32;
use super::{Strided, matmul};

#[cfg_attr(
    feature = "native",
    backend_extension(Flex, Autodiff: cfg(feature = "native"))
)]
#[cfg_attr(not(feature = "native"), backend_extension(Flex))]
pub trait FlexAttentionOps: burn::backend::Backend {
    fn flex_sdpa(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

impl FlexAttentionOps for Flex {
    fn flex_sdpa(q: FlexTensor, k: FlexTensor, v: FlexTensor) -> FlexTensor {
        forward(q, k, v, false).0
    }
}

/// `[b, h, s, d]` of a 4-D tensor.
fn dims4(t: &FlexTensor) -> [usize; 4] {
    t.layout()
        .shape()
        .to_vec()
        .try_into()
        .expect("sdpa: 4-D inputs")
}

/// The attention output `[b, h, s_q, d_v]` and, if `keep_probs`, the softmax probabilities
/// `[b, h, s_q, s_kv]`.
fn forward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    keep_probs: bool,
) -> (FlexTensor, Option<FlexTensor>) {
    let ([b, h, s_q, d], [_, _, s_kv, _], [_, _, _, d_v]) = (dims4(&q), dims4(&k), dims4(&v));
    let (q, k, v) = (q.to_contiguous(), k.to_contiguous(), v.to_contiguous());
    let (out, probs) = sdpa_f32(
        &q.storage::<f32>()[..b * h * s_q * d],
        &k.storage::<f32>()[..b * h * s_kv * d],
        &v.storage::<f32>()[..b * h * s_kv * d_v],
        [b * h, s_q, s_kv, d, d_v],
        keep_probs,
    );
    (
        FlexTensor::from_data(TensorData::new(out, [b, h, s_q, d_v])),
        probs.map(|p| FlexTensor::from_data(TensorData::new(p, [b, h, s_q, s_kv]))),
    )
}

/// Whether [`sdpa`] can run: f32 tensors on Flex, tracked by autodiff or not (the browser build,
/// which has no autodiff, takes it only outside it), q `[b, h, s_q, d]`, k `[b, h, s_kv, d]` and
/// v `[b, h, s_kv, d_v]`.
pub fn applies(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> bool {
    let ([b, h, _, d], [kb, kh, s_kv, kd], [vb, vh, vs, _]) = (q.dims(), k.dims(), v.dims());
    [q, k, v]
        .iter()
        .all(|t| t.dtype() == DType::F32 && (cfg!(feature = "native") || !t.is_autodiff()))
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
/// `[heads, s_kv, d_v]`; returns `[heads, s_q, d_v]` and, if `keep_probs`, the probabilities
/// `[heads, s_q, s_kv]`.
fn sdpa_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    [heads, s_q, s_kv, d, d_v]: [usize; 5],
    keep_probs: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let mut out = vec![0.0f32; heads * s_q * d_v];
    let mut probs = vec![0.0f32; if keep_probs { heads * s_q * s_kv } else { 0 }];
    if out.is_empty() || s_kv == 0 {
        return (out, keep_probs.then_some(probs));
    }
    let scale = 1.0 / (d as f32).sqrt();
    let head = |scratch: &mut Vec<f32>, (i, (out, kept)): (usize, (&mut [f32], &mut [f32]))| {
        // The probabilities go straight into `kept` when they are kept.
        let scores: &mut [f32] = if kept.is_empty() {
            &mut scratch[..]
        } else {
            kept
        };
        let (q, k, v) = (
            &q[i * s_q * d..][..s_q * d],
            &k[i * s_kv * d..][..s_kv * d],
            &v[i * s_kv * d_v..][..s_kv * d_v],
        );
        // scores [s_q, s_kv] = scale · q [s_q, d] · kᵀ (k is [s_kv, d])
        matmul(
            scores,
            [s_q, s_kv, d],
            Strided(q, [d, 1]),
            Strided(k, [1, d]),
            scale,
            false,
        );
        softmax_rows(scores, s_kv);
        // out [s_q, d_v] = scores · v [s_kv, d_v]
        matmul(
            out,
            [s_q, d_v, s_kv],
            Strided(scores, [s_kv, 1]),
            Strided(v, [d_v, 1]),
            1.0,
            false,
        );
    };
    let scratch = || vec![0.0f32; if keep_probs { 0 } else { s_q * s_kv }];
    // With nothing kept, every head gets an empty `kept` slice.
    let kept_len = if keep_probs { s_q * s_kv } else { 0 };
    #[cfg(feature = "native")]
    {
        use rayon::prelude::*;
        let kept: Vec<&mut [f32]> = if keep_probs {
            probs.chunks_mut(kept_len).collect()
        } else {
            (0..heads).map(|_| &mut [][..]).collect()
        };
        out.par_chunks_mut(s_q * d_v)
            .zip(kept)
            .enumerate()
            .for_each_init(scratch, head);
    }
    #[cfg(not(feature = "native"))]
    {
        let mut scores = scratch();
        let mut empty: [f32; 0] = [];
        for (i, out) in out.chunks_mut(s_q * d_v).enumerate() {
            let kept = if keep_probs {
                &mut probs[i * kept_len..][..kept_len]
            } else {
                &mut empty[..]
            };
            head(&mut scores, (i, (out, kept)));
        }
    }
    (out, keep_probs.then_some(probs))
}

/// Gradients of [`sdpa_f32`]'s inputs from its probabilities and the output's gradient `dout`
/// `[heads, s_q, d_v]`: (dq, dk, dv), each shaped like its input.
#[cfg_attr(not(feature = "native"), allow(dead_code))] // autodiff only: native builds
fn sdpa_backward_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dout: &[f32],
    [heads, s_q, s_kv, d, d_v]: [usize; 5],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; heads * s_q * d],
        vec![0.0f32; heads * s_kv * d],
        vec![0.0f32; heads * s_kv * d_v],
    );
    if heads * s_q * s_kv == 0 {
        return (dq, dk, dv);
    }
    let scale = 1.0 / (d as f32).sqrt();
    let head =
        |ds: &mut Vec<f32>,
         (i, ((dq, dk), dv)): (usize, ((&mut [f32], &mut [f32]), &mut [f32]))| {
            let q = &q[i * s_q * d..][..s_q * d];
            let k = &k[i * s_kv * d..][..s_kv * d];
            let v = &v[i * s_kv * d_v..][..s_kv * d_v];
            let p = &probs[i * s_q * s_kv..][..s_q * s_kv];
            let dout = &dout[i * s_q * d_v..][..s_q * d_v];
            // dv [s_kv, d_v] = pᵀ · dout
            matmul(
                dv,
                [s_kv, d_v, s_q],
                Strided(p, [1, s_kv]),
                Strided(dout, [d_v, 1]),
                1.0,
                false,
            );
            // dp [s_q, s_kv] = dout · vᵀ
            matmul(
                ds,
                [s_q, s_kv, d_v],
                Strided(dout, [d_v, 1]),
                Strided(v, [1, d_v]),
                1.0,
                false,
            );
            // ds = scale · p ⊙ (dp − rowsum(dp ⊙ p)), in place: the softmax's and the scale's backward
            for (dp, p) in ds.chunks_mut(s_kv).zip(p.chunks(s_kv)) {
                let dot: f32 = dp.iter().zip(p).map(|(a, b)| a * b).sum();
                for (g, &pj) in dp.iter_mut().zip(p) {
                    *g = scale * pj * (*g - dot);
                }
            }
            // dq [s_q, d] = ds · k; dk [s_kv, d] = dsᵀ · q
            matmul(
                dq,
                [s_q, d, s_kv],
                Strided(ds, [s_kv, 1]),
                Strided(k, [d, 1]),
                1.0,
                false,
            );
            matmul(
                dk,
                [s_kv, d, s_q],
                Strided(ds, [1, s_kv]),
                Strided(q, [d, 1]),
                1.0,
                false,
            );
        };
    let scratch = || vec![0.0f32; s_q * s_kv];
    #[cfg(feature = "native")]
    {
        use rayon::prelude::*;
        dq.par_chunks_mut(s_q * d)
            .zip(dk.par_chunks_mut(s_kv * d))
            .zip(dv.par_chunks_mut(s_kv * d_v))
            .enumerate()
            .for_each_init(scratch, head);
    }
    #[cfg(not(feature = "native"))]
    {
        let mut ds = scratch();
        dq.chunks_mut(s_q * d)
            .zip(dk.chunks_mut(s_kv * d))
            .zip(dv.chunks_mut(s_kv * d_v))
            .enumerate()
            .for_each(|item| head(&mut ds, item));
    }
    (dq, dk, dv)
}

#[cfg(feature = "native")]
mod tracked {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, AutodiffBackend};
    use burn::tensor::TensorData;
    use burn_flex::{Flex, FlexTensor};

    use super::{FlexAttentionOps, dims4, forward, sdpa_backward_f32};

    /// The fused attention in the autodiff graph; the state is q, k, v and the probabilities.
    #[derive(Debug)]
    struct FusedAttention;

    impl Backward<Flex, 3> for FusedAttention {
        type State = [FlexTensor; 4];

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [q, k, v, probs] = ops.state;
            let dout = grads.consume::<Flex>(&ops.node).to_contiguous();
            let ([b, h, s_q, d], [_, _, s_kv, _], [_, _, _, d_v]) =
                (dims4(&q), dims4(&k), dims4(&v));
            let (dq, dk, dv) = sdpa_backward_f32(
                &q.storage::<f32>()[..b * h * s_q * d],
                &k.storage::<f32>()[..b * h * s_kv * d],
                &v.storage::<f32>()[..b * h * s_kv * d_v],
                &probs.storage::<f32>()[..b * h * s_q * s_kv],
                &dout.storage::<f32>()[..b * h * s_q * d_v],
                [b * h, s_q, s_kv, d, d_v],
            );
            let grads_of = [
                (dq, [b, h, s_q, d]),
                (dk, [b, h, s_kv, d]),
                (dv, [b, h, s_kv, d_v]),
            ];
            for (parent, (grad, shape)) in ops.parents.into_iter().zip(grads_of) {
                if let Some(node) = parent {
                    let grad = FlexTensor::from_data(TensorData::new(grad, shape));
                    grads.register::<Flex>(node.id, grad);
                }
            }
        }
    }

    impl<C: CheckpointStrategy> FlexAttentionOps for Autodiff<Flex, C> {
        fn flex_sdpa(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let nodes = [q.node(), k.node(), v.node()];
            let inner = <Autodiff<Flex, C> as AutodiffBackend>::inner;
            // Contiguous once here: the state and the forward read the same storage.
            let (q, k, v) = (
                inner(q).to_contiguous(),
                inner(k).to_contiguous(),
                inner(v).to_contiguous(),
            );
            match FusedAttention
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let (out, probs) = forward(q.clone(), k.clone(), v.clone(), true);
                    let probs = probs.expect("kept probabilities");
                    prep.finish([q, k, v, probs], out)
                }
                OpsKind::UnTracked(prep) => prep.finish(forward(q, k, v, false).0),
            }
        }
    }
}

/// Softmax of every `width`-long row of `scores`, in place; compiled for AVX2 + FMA when the CPU
/// has them.
fn softmax_rows(scores: &mut [f32], width: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(scores: &mut [f32], width: usize) {
            // `for` loops, not `for_each`: an `Iterator::fold` left out of line would be compiled
            // without this function's AVX2 (measured: 7% of a sampling profile).
            for row in scores.chunks_mut(width) {
                softmax_row(row);
            }
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
    // The maximum and the sum in eight lanes each, so that both vectorise (a single running
    // `max` or sum is a serial dependency chain the compiler may not reorder).
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(x);
        }
    }
    let max = lanes
        .iter()
        .chain(chunks.remainder())
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for x in row.iter_mut() {
        *x = exp_f32(*x - max);
    }
    let mut lanes = [0.0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    let sum = lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
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

    /// Under autodiff: the same values and the same gradients of q, k and v as burn's attention
    /// (written in tensor ops there), for a loss that weighs every output differently.
    #[test]
    fn tracked_sdpa_has_burns_values_and_gradients() {
        let device = Device::flex();
        for [b, h, s_q, s_kv, d, d_v] in [[2, 4, 80, 80, 32, 32], [1, 2, 7, 13, 8, 5]] {
            let normal = |shape: [usize; 4]| {
                Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
            };
            let (q, k, v) = (
                normal([b, h, s_q, d]),
                normal([b, h, s_kv, d]),
                normal([b, h, s_kv, d_v]),
            );
            let weights = normal([b, h, s_q, d_v]).autodiff();
            let run = |fused: bool| {
                let [q, k, v] = [&q, &k, &v].map(|t| t.clone().autodiff().require_grad());
                if fused {
                    assert!(applies(&q, &k, &v));
                }
                let y = if fused {
                    sdpa(q.clone(), k.clone(), v.clone())
                } else {
                    attention(
                        q.clone(),
                        k.clone(),
                        v.clone(),
                        None,
                        None,
                        Default::default(),
                    )
                };
                let grads = (y.clone() * weights.clone()).sum().backward();
                let values = |t: Tensor<4>| -> Vec<f32> { t.into_data().try_to_vec().unwrap() };
                [
                    values(y.inner()),
                    values(q.grad(&grads).unwrap()),
                    values(k.grad(&grads).unwrap()),
                    values(v.grad(&grads).unwrap()),
                ]
            };
            let (ours, burn) = (run(true), run(false));
            for (name, (a, e)) in ["output", "dq", "dk", "dv"]
                .iter()
                .zip(ours.iter().zip(&burn))
            {
                assert_eq!(a.len(), e.len());
                for (i, (a, e)) in a.iter().zip(e).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-4 * e.abs().max(1.0),
                        "[{b}, {h}, {s_q}×{s_kv}, {d}→{d_v}] {name}[{i}]: {a} vs {e}"
                    );
                }
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
        assert!(!applies(&q, &t([1, 3, 6, 8]), &v), "head count");
        assert!(!applies(&q, &k.clone().cast(DType::F16), &v), "f16");
    }
}
