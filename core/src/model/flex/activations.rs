//! Fused element-wise activations for burn's Flex CPU backend.
//!
//! On Flex, `gelu_tanh` written with tensor ops is seven passes over memory, and its `sigmoid` is a
//! single-threaded scalar loop calling libm's `expf`; together they took 18% of a batch-16
//! sampling profile. Here each activation is one pass split over rayon's threads, with a
//! branch-free sigmoid on a polynomial `exp` (Cephes' `expf`, within 2 ulp) that the compiler
//! vectorises, with AVX2 + FMA when the CPU has them. Results agree with the tensor-op version
//! within 1e-6 relative (tested in `layers.rs`).
//!
//! Under autodiff (training on Flex) each activation is one tracked op whose backward is one more
//! fused pass, `grad · f'(x)`, instead of the tensor-op graph's dozen nodes (forward and backward
//! tested against it in `layers.rs`). A tensor on another device or not f32 keeps the tensor-op
//! version (see [`applies`]).

use burn::backend::{Dispatch, DispatchDevice, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor};
use burn_flex::{Flex, FlexTensor};

use crate::model::layers::{GELU_CUBIC, TWO_SQRT_2_OVER_PI};

#[cfg_attr(
    feature = "native",
    backend_extension(Flex, Autodiff: cfg(feature = "native"))
)]
#[cfg_attr(not(feature = "native"), backend_extension(Flex))]
pub trait FusedActivationOps: burn::backend::Backend {
    fn fused_gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self>;
    fn fused_silu(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl FusedActivationOps for Flex {
    fn fused_gelu_tanh(x: FlexTensor) -> FlexTensor {
        map_in_place(x, gelu_tanh_f32)
    }

    fn fused_silu(x: FlexTensor) -> FlexTensor {
        map_in_place(x, silu_f32)
    }
}

#[cfg(feature = "native")]
mod tracked {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, AutodiffBackend};
    use burn_flex::{Flex, FlexTensor};

    use super::{FusedActivationOps, gelu_tanh_grad_f32, silu_grad_f32};

    /// One fused activation in the autodiff graph; the state is its input, the backward pass one
    /// fused `grad · f'(x)` over it.
    #[derive(Debug)]
    struct FusedUnary {
        derivative: fn(&[f32], &mut [f32]),
    }

    impl Backward<Flex, 1> for FusedUnary {
        type State = FlexTensor;

        fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let x = ops.state;
            unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
                super::zip_in_place(grad, &x, self.derivative)
            });
        }
    }

    fn tracked<C: CheckpointStrategy>(
        x: FloatTensor<Autodiff<Flex, C>>,
        forward: fn(FlexTensor) -> FlexTensor,
        derivative: fn(&[f32], &mut [f32]),
    ) -> FloatTensor<Autodiff<Flex, C>> {
        let node = x.node();
        let input = <Autodiff<Flex, C> as AutodiffBackend>::inner(x);
        // Compute-bound: the input itself is the state (no recomputation from a checkpoint). The
        // forward pass writes a copy, since the state shares the input's storage.
        match (FusedUnary { derivative })
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(input.clone(), forward(input)),
            OpsKind::UnTracked(prep) => prep.finish(forward(input)),
        }
    }

    impl<C: CheckpointStrategy> FusedActivationOps for Autodiff<Flex, C> {
        fn fused_gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
            tracked::<C>(x, Flex::fused_gelu_tanh, gelu_tanh_grad_f32)
        }

        fn fused_silu(x: FloatTensor<Self>) -> FloatTensor<Self> {
            tracked::<C>(x, Flex::fused_silu, silu_grad_f32)
        }
    }
}

/// Whether the fused kernels can run on `x`: an f32 tensor on Flex, tracked by autodiff or not
/// (the browser build, which has no autodiff, takes them only outside it).
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32
        && (cfg!(feature = "native") || !x.is_autodiff())
        && matches!(
            x.device().as_dispatch().clone().inner(),
            DispatchDevice::Flex(_)
        )
}

/// GELU with the tanh approximation; `x` must satisfy [`applies`].
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedActivationOps>::fused_gelu_tanh(
        x.into_dispatch(),
    ))
}

/// SiLU `x·sigmoid(x)`; `x` must satisfy [`applies`].
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedActivationOps>::fused_silu(
        x.into_dispatch(),
    ))
}

/// Applies `f` to every element, in place when `x` owns its contiguous storage (a copy otherwise).
fn map_in_place(x: FlexTensor, f: fn(&mut [f32])) -> FlexTensor {
    let mut x = contiguous(x);
    let n = x.layout().num_elements();
    let values = &mut x.storage_mut::<f32>()[..n];
    #[cfg(feature = "native")]
    {
        use rayon::prelude::*;
        // 16 Ki elements per task: large enough that scheduling is noise, small enough to split
        // a [32, 80, 512] MLP activation over both cores.
        values.par_chunks_mut(1 << 14).for_each(f);
    }
    #[cfg(not(feature = "native"))]
    f(values);
    x
}

/// `x` itself when its storage starts at its first element in row-major order, else a copy.
fn contiguous(x: FlexTensor) -> FlexTensor {
    if x.is_contiguous() && x.layout().start_offset() == 0 {
        x
    } else {
        x.to_contiguous()
    }
}

/// `grad[i] = grad[i] · f'(x[i])` in place over `grad` (copied first when shared or strided);
/// `x` and `grad` have one shape.
#[cfg_attr(not(feature = "native"), allow(dead_code))]
fn zip_in_place(
    grad: FlexTensor,
    x: &FlexTensor,
    derivative: fn(&[f32], &mut [f32]),
) -> FlexTensor {
    let mut grad = contiguous(grad);
    let x = contiguous(x.clone());
    let n = grad.layout().num_elements();
    assert_eq!(
        n,
        x.layout().num_elements(),
        "activation gradient and input sizes"
    );
    let x_values = &x.storage::<f32>()[..n];
    let values = &mut grad.storage_mut::<f32>()[..n];
    #[cfg(feature = "native")]
    {
        use rayon::prelude::*;
        values
            .par_chunks_mut(1 << 14)
            .zip(x_values.par_chunks(1 << 14))
            .for_each(|(g, x)| derivative(x, g));
    }
    #[cfg(not(feature = "native"))]
    derivative(x_values, values);
    grad
}

/// Defines a slice kernel that runs `$scalar` on every element, compiled twice on x86-64: for
/// AVX2 + FMA (chosen at run time) and for the baseline.
macro_rules! slice_kernel {
    ($name:ident, $scalar:ident) => {
        pub(super) fn $name(values: &mut [f32]) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide(values: &mut [f32]) {
                    values.iter_mut().for_each(|v| *v = $scalar(*v));
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `wide` was compiled for.
                    return unsafe { wide(values) };
                }
            }
            values.iter_mut().for_each(|v| *v = $scalar(*v));
        }
    };
}

slice_kernel!(gelu_tanh_f32, gelu_tanh_one);
slice_kernel!(silu_f32, silu_one);

/// Defines a backward slice kernel `grad[i] *= $derivative(x[i])`, compiled like `slice_kernel`.
macro_rules! grad_kernel {
    ($name:ident, $derivative:ident) => {
        #[cfg_attr(not(feature = "native"), allow(dead_code))]
        fn $name(x: &[f32], grad: &mut [f32]) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide(x: &[f32], grad: &mut [f32]) {
                    grad.iter_mut()
                        .zip(x)
                        .for_each(|(g, &x)| *g *= $derivative(x));
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `wide` was compiled for.
                    return unsafe { wide(x, grad) };
                }
            }
            grad.iter_mut()
                .zip(x)
                .for_each(|(g, &x)| *g *= $derivative(x));
        }
    };
}

grad_kernel!(gelu_tanh_grad_f32, gelu_tanh_derivative);
grad_kernel!(silu_grad_f32, silu_derivative);

/// `e^x` for x ≤ 88 (larger x returns e^88), within 2 ulp: Cephes' `expf`. x = n·ln2 + r with
/// |r| ≤ ln2/2, e^r by a degree-7 polynomial, 2^n through the exponent bits. Branch-free, so loops
/// over it vectorise.
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    // t = ROUND + n with n = round(x·log2 e) ∈ [−126, 127]: in ROUND's binade the ulp is 1, so
    // n is also t's bit pattern minus ROUND's, an integer subtraction that vectorises (a float →
    // int cast is scalarised, since Rust's `as` saturates).
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    // [-126, 127] after the clamp: a normal power of two.
    er * f32::from_bits(((n_bits + 127) << 23) as u32)
}

/// `1 / (1 + e^−x)`; for x < −88 it returns about 6e-39 instead of e^x, an absolute error
/// below f32's smallest normal.
#[inline(always)]
fn sigmoid_one(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// `layers::gelu_tanh`'s formula on one element.
#[inline(always)]
fn gelu_tanh_one(x: f32) -> f32 {
    let cube = x * x * x;
    let inner = (x + cube * GELU_CUBIC as f32) * TWO_SQRT_2_OVER_PI as f32;
    x * sigmoid_one(inner)
}

#[inline(always)]
fn silu_one(x: f32) -> f32 {
    x * sigmoid_one(x)
}

/// d/dx of x·σ(u), u = K(x + c·x³): σ(u) + x·σ(u)(1 − σ(u))·K(1 + 3c·x²).
#[inline(always)]
fn gelu_tanh_derivative(x: f32) -> f32 {
    let (k, c) = (TWO_SQRT_2_OVER_PI as f32, GELU_CUBIC as f32);
    let s = sigmoid_one((x + x * x * x * c) * k);
    s + x * s * (1.0 - s) * k * (1.0 + 3.0 * c * x * x)
}

/// d/dx of x·σ(x): σ(x)(1 + x(1 − σ(x))).
#[inline(always)]
fn silu_derivative(x: f32) -> f32 {
    let s = sigmoid_one(x);
    s * (1.0 + x * (1.0 - s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst: f64 = 0.0;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let ours = exp_f32(x) as f64;
            let exact = (x as f64).exp();
            worst = worst.max((ours - exact).abs() / exact);
        }
        // 2 ulp of f32 is 2^-22 ≈ 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(-1000.0), exp_f32(-87.0));
        assert!(exp_f32(1000.0).is_finite());
    }
}
