//! diffusers' GELU(tanh) feed-forward (`net.0.proj` → GELU → `net.2`) on Flex in row blocks.
//!
//! In tensor ops the `[rows, hidden]` activation (4× the model width) goes through memory four
//! times after its matmul: bias add, GELU, and the second matmul's read, each a pass over a tensor
//! larger than the core's L2 at batch 16 with CFG. Here each block of [`BLOCK_ROWS`] rows makes its
//! hidden activation in a buffer that stays in cache: the bias is written first and the matmul
//! accumulates onto it, GELU runs in place, and the second matmul accumulates onto the output
//! block's bias. Blocks run on rayon's threads with single-threaded matmuls. Forward only
//! (sampling); autodiff keeps the tensor ops.

use burn::backend::{Dispatch, DispatchDevice, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::{Flex, FlexTensor};

use super::activations::gelu_tanh_f32;
use super::{Strided, matmul};

/// Rows per block: 64 rows of a 512-wide hidden activation are 128 KiB.
const BLOCK_ROWS: usize = 64;

thread_local! {
    static HIDDEN: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[backend_extension(Flex)]
pub trait FlexMlpOps: burn::backend::Backend {
    fn flex_gelu_mlp(
        x: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

impl FlexMlpOps for Flex {
    fn flex_gelu_mlp(
        x: FlexTensor,
        w1: FlexTensor,
        b1: FlexTensor,
        w2: FlexTensor,
        b2: FlexTensor,
    ) -> FlexTensor {
        let shape = x.layout().shape().to_vec();
        let d = *shape.last().expect("gelu_mlp: x has a last dimension");
        let rows = shape.iter().product::<usize>() / d.max(1);
        let h = w1.layout().shape()[1];
        let [x, w1, b1, w2, b2] = [x, w1, b1, w2, b2].map(|t| t.to_contiguous());
        let out = gelu_mlp_f32(
            &x.storage::<f32>()[..rows * d],
            [
                &w1.storage::<f32>()[..d * h],
                &b1.storage::<f32>()[..h],
                &w2.storage::<f32>()[..h * d],
                &b2.storage::<f32>()[..d],
            ],
            [rows, d, h],
        );
        FlexTensor::from_data(TensorData::new(out, shape))
    }
}

/// Whether [`gelu_mlp`] can run: f32 on Flex outside autodiff, `w1` `[d, h]` and `w2` `[h, d]`
/// for an input whose last dimension is d.
pub fn applies(x: &Tensor<3>, w1: &Tensor<2>, w2: &Tensor<2>) -> bool {
    let d = x.dims()[2];
    let ([w1_in, h], [w2_in, w2_out]) = (w1.dims(), w2.dims());
    [x.dtype(), w1.dtype(), w2.dtype()] == [DType::F32; 3]
        && !x.is_autodiff()
        && !w1.is_autodiff()
        && (w1_in, w2_in, w2_out) == (d, h, d)
        && matches!(
            x.device().as_dispatch().clone().inner(),
            DispatchDevice::Flex(_)
        )
}

/// `gelu_tanh(x·w1 + b1)·w2 + b2`; the arguments must satisfy [`applies`].
///
/// # Shapes
/// - `x`: `[b, seq, d]`, `w1`: `[d, h]`, `b1`: `[h]`, `w2`: `[h, d]`, `b2`: `[d]` → `[b, seq, d]`
pub fn gelu_mlp(
    x: Tensor<3>,
    w1: Tensor<2>,
    b1: Tensor<1>,
    w2: Tensor<2>,
    b2: Tensor<1>,
) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FlexMlpOps>::flex_gelu_mlp(
        x.into_dispatch(),
        w1.into_dispatch(),
        b1.into_dispatch(),
        w2.into_dispatch(),
        b2.into_dispatch(),
    ))
}

/// `x` `[rows, d]`, `w1` `[d, h]`, `b1` `[h]`, `w2` `[h, d]`, `b2` `[d]`, all row-major; returns
/// `[rows, d]`.
fn gelu_mlp_f32(x: &[f32], [w1, b1, w2, b2]: [&[f32]; 4], [rows, d, h]: [usize; 3]) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * d];
    if rows * d == 0 {
        return out;
    }
    let block = |x: &[f32], out: &mut [f32]| {
        let r = x.len() / d;
        // One [r, h] buffer per thread: a fresh 128 KiB allocation per block would be an mmap
        // (glibc's default threshold) and page faults.
        HIDDEN.with_borrow_mut(|hidden| {
            hidden.resize(r * h, 0.0);
            for row in hidden.chunks_mut(h) {
                row.copy_from_slice(b1);
            }
            let (x, w1) = (Strided(x, [d, 1]), Strided(w1, [h, 1]));
            matmul(hidden, [r, h, d], x, w1, 1.0, true);
            gelu_tanh_f32(hidden);
            for row in out.chunks_mut(d) {
                row.copy_from_slice(b2);
            }
            let (hidden, w2) = (Strided(hidden, [h, 1]), Strided(w2, [d, 1]));
            matmul(out, [r, d, h], hidden, w2, 1.0, true);
        });
    };
    #[cfg(feature = "native")]
    {
        use rayon::prelude::*;
        out.par_chunks_mut(BLOCK_ROWS * d)
            .zip(x.par_chunks(BLOCK_ROWS * d))
            .for_each(|(o, x)| block(x, o));
    }
    #[cfg(not(feature = "native"))]
    out.chunks_mut(BLOCK_ROWS * d)
        .zip(x.chunks(BLOCK_ROWS * d))
        .for_each(|(o, x)| block(x, o));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::gelu_tanh;
    use burn::tensor::{Device, Distribution};

    /// The tensor-op feed-forward the kernel replaces.
    fn reference(
        x: Tensor<3>,
        w1: Tensor<2>,
        b1: Tensor<1>,
        w2: Tensor<2>,
        b2: Tensor<1>,
    ) -> Tensor<3> {
        let hidden = gelu_tanh(x.matmul(w1.unsqueeze()) + b1.unsqueeze());
        hidden.matmul(w2.unsqueeze()) + b2.unsqueeze()
    }

    #[test]
    fn gelu_mlp_equals_the_tensor_ops() {
        let device = Device::flex();
        // Rows below, at and across block boundaries; widths that are not multiples of 8.
        for [b, seq, d, h] in [
            [1, 1, 8, 32],
            [2, 37, 24, 96],
            [3, 80, 128, 512],
            [1, 64, 7, 13],
        ] {
            let normal = Distribution::Normal(0.0, 1.0);
            let x = Tensor::<3>::random([b, seq, d], normal, &device);
            let w1 = Tensor::<2>::random([d, h], normal, &device) / (d as f64).sqrt();
            let b1 = Tensor::<1>::random([h], normal, &device);
            let w2 = Tensor::<2>::random([h, d], normal, &device) / (h as f64).sqrt();
            let b2 = Tensor::<1>::random([d], normal, &device);
            assert!(applies(&x, &w1, &w2));
            let ours = gelu_mlp(x.clone(), w1.clone(), b1.clone(), w2.clone(), b2.clone());
            let plain = reference(x, w1, b1, w2, b2);
            assert_eq!(ours.dims(), [b, seq, d]);
            let worst = (ours - plain.clone()).abs().max().into_scalar::<f32>();
            let scale = plain.abs().max().into_scalar::<f32>();
            assert!(
                worst <= 1e-5 * scale.max(1.0),
                "[{b}, {seq}, {d}] × {h}: worst {worst:e}"
            );
        }
    }

    #[test]
    fn gelu_mlp_declines_what_it_cannot_compute() {
        let device = Device::flex();
        let x = Tensor::<3>::zeros([1, 4, 8], &device);
        let (w1, w2) = (
            Tensor::<2>::zeros([8, 16], &device),
            Tensor::<2>::zeros([16, 8], &device),
        );
        assert!(applies(&x, &w1, &w2));
        assert!(!applies(&x, &Tensor::<2>::zeros([9, 16], &device), &w2));
        assert!(!applies(&x, &w1, &Tensor::<2>::zeros([16, 9], &device)));
        assert!(!applies(&x.autodiff().require_grad(), &w1, &w2), "autodiff");
    }
}
