//! 3×3 convolution (stride 1, padding 1) on burn's Flex CPU backend without im2col.
//!
//! Flex lowers every convolution to a tiled im2col whose gather is a scalar closure; for the
//! autoencoder's few-channel 3×3 convolutions at full resolution that gather, not the matmul,
//! took most of a batch-16 decode. Here the zero-padded image is one `[c_in, (h+2)·(w+2)]` matrix
//! and each of the nine taps is a matmul of a shifted, contiguous window of it with that tap's
//! weights: output pixel `(y, x)` sits at `y·(w+2) + x` of a `(w+2)`-wide grid, and tap
//! `(ky, kx)` reads the same grid `ky·(w+2) + kx` further on. The matmuls run transposed
//! (`[positions, c_in] · [c_in, c_out]`), so their long side is gemm's m, which it reads in place,
//! and only the small weight block is packed (a batch-16 decode took about 15% less than with the
//! window as the packed operand). The grid's two extra columns per row are dropped at the end.
//! Images run on rayon's threads, each with single-threaded matmuls. Forward only (decoding);
//! autodiff keeps burn's convolution.

use burn::backend::{Dispatch, DispatchDevice, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::{Flex, FlexTensor};

use super::{Strided, matmul_into};

#[backend_extension(Flex)]
pub trait FlexConvOps: burn::backend::Backend {
    fn flex_conv3x3(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

impl FlexConvOps for Flex {
    fn flex_conv3x3(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let dims = |t: &FlexTensor| t.layout().shape().to_vec();
        let (xd, wd) = (dims(&x), dims(&weight));
        let [b, c_in, h, w]: [usize; 4] = xd.try_into().expect("conv3x3: x is [b, c, h, w]");
        let c_out = wd[0];
        let x = x.to_contiguous();
        let (weight, bias) = (weight.to_contiguous(), bias.to_contiguous());
        let out = conv3x3_f32(
            &x.storage::<f32>()[..b * c_in * h * w],
            &weight.storage::<f32>()[..c_out * c_in * 9],
            &bias.storage::<f32>()[..c_out],
            [b, c_in, h, w],
            c_out,
        );
        FlexTensor::from_data(TensorData::new(out, [b, c_out, h, w]))
    }
}

/// Whether [`conv3x3`] can run: f32 tensors on Flex outside autodiff, a `[c_out, c_in, 3, 3]`
/// weight for a `[b, c_in, h, w]` input.
pub fn applies(x: &Tensor<4>, weight: &Tensor<4>) -> bool {
    let [_, c_in, _, _] = x.dims();
    let [_, w_in, kh, kw] = weight.dims();
    x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && !x.is_autodiff()
        && !weight.is_autodiff()
        && (w_in, kh, kw) == (c_in, 3, 3)
        && matches!(
            x.device().as_dispatch().clone().inner(),
            DispatchDevice::Flex(_)
        )
}

/// A 3×3 convolution, stride 1, zero padding 1, with bias; the arguments must satisfy
/// [`applies`].
///
/// # Shapes
/// - `x`: `[b, c_in, h, w]`, `weight`: `[c_out, c_in, 3, 3]`, `bias`: `[c_out]` → `[b, c_out, h, w]`
pub fn conv3x3(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FlexConvOps>::flex_conv3x3(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// `x` `[b, c_in, h, w]`, `weight` `[c_out, c_in, 3, 3]`, `bias` `[c_out]`, all row-major; returns
/// `[b, c_out, h, w]`.
fn conv3x3_f32(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    [b, c_in, h, w]: [usize; 4],
    c_out: usize,
) -> Vec<f32> {
    let image =
        |x: &[f32], out: &mut [f32]| conv3x3_image(x, weight, bias, [c_in, h, w], c_out, out);
    let mut out = vec![0.0f32; b * c_out * h * w];
    let (in_len, out_len) = (c_in * h * w, c_out * h * w);
    if out_len == 0 {
        return out;
    }
    #[cfg(feature = "native")]
    {
        use rayon::prelude::*;
        out.par_chunks_mut(out_len)
            .zip(x.par_chunks(in_len))
            .for_each(|(o, x)| image(x, o));
    }
    #[cfg(not(feature = "native"))]
    out.chunks_mut(out_len)
        .zip(x.chunks(in_len))
        .for_each(|(o, x)| image(x, o));
    out
}

/// One image: `x` `[c_in, h, w]` → `out` `[c_out, h, w]`.
fn conv3x3_image(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    [c_in, h, w]: [usize; 3],
    c_out: usize,
    out: &mut [f32],
) {
    let pw = w + 2; // the padded grid's width
    // [c_in, (h+2)·(w+2)] plus two trailing zeros: the last tap's window runs two past the grid.
    let plane = (h + 2) * pw + 2;
    let mut padded = vec![0.0f32; c_in * plane];
    for c in 0..c_in {
        for y in 0..h {
            let from = &x[(c * h + y) * w..][..w];
            padded[c * plane + (y + 1) * pw + 1..][..w].copy_from_slice(from);
        }
    }
    // [c_out, h·(w+2)]: the output on the padded grid's rows
    let n = h * pw;
    let mut grid = vec![0.0f32; c_out * n];
    for tap in 0..9 {
        let offset = (tap / 3) * pw + tap % 3;
        // gridᵀ [h·(w+2), c_out] (+)= the window at `offset` of every padded channel, read as
        //   [h·(w+2), c_in], · the tap's weights [c_in, c_out] (weight[co, ci, tap] at
        //   co·c_in·9 + ci·9 + tap). The long side is the matmul's m, contiguous in the window
        //   and in `grid`, so gemm packs only the small weight block.
        let window = Strided(&padded[offset..], [1, plane]);
        let taps = Strided(&weight[tap..], [9, c_in * 9]);
        matmul_into(
            &mut grid,
            [1, n],
            [n, c_out, c_in],
            window,
            taps,
            1.0,
            tap > 0,
        );
    }
    for co in 0..c_out {
        for y in 0..h {
            let row = &grid[co * n + y * pw..][..w];
            let dst = &mut out[(co * h + y) * w..][..w];
            for (d, &g) in dst.iter_mut().zip(row) {
                *d = g + bias[co];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn conv3x3_equals_burns_convolution() {
        let device = Device::flex();
        // Odd sizes, one channel, more outputs than inputs and the reverse, batch 1 and 3.
        for [b, c_in, c_out, h, w] in [[1, 1, 1, 1, 1], [3, 4, 8, 5, 7], [2, 16, 3, 9, 4]] {
            let x = Tensor::<4>::random([b, c_in, h, w], Distribution::Normal(0.0, 1.0), &device);
            let weight =
                Tensor::<4>::random([c_out, c_in, 3, 3], Distribution::Normal(0.0, 1.0), &device);
            let bias = Tensor::<1>::random([c_out], Distribution::Normal(0.0, 1.0), &device);
            assert!(applies(&x, &weight));
            let ours: Vec<f32> = conv3x3(x.clone(), weight.clone(), bias.clone())
                .into_data()
                .try_to_vec()
                .unwrap();
            let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
            let burn: Vec<f32> = conv2d(x, weight, Some(bias), options)
                .into_data()
                .try_to_vec()
                .unwrap();
            assert_eq!(ours.len(), burn.len());
            for (i, (a, e)) in ours.iter().zip(&burn).enumerate() {
                assert!(
                    (a - e).abs() <= 1e-4 * e.abs().max(1.0),
                    "[{b}, {c_in}→{c_out}, {h}, {w}] element {i}: {a} vs {e}"
                );
            }
        }
    }

    #[test]
    fn conv3x3_declines_what_it_cannot_compute() {
        let device = Device::flex();
        let x = Tensor::<4>::zeros([1, 4, 5, 5], &device);
        assert!(
            !applies(&x, &Tensor::<4>::zeros([8, 4, 1, 1], &device)),
            "1×1"
        );
        assert!(
            !applies(&x, &Tensor::<4>::zeros([8, 3, 3, 3], &device)),
            "channels"
        );
        assert!(
            !applies(
                &x.autodiff().require_grad(),
                &Tensor::<4>::zeros([8, 4, 3, 3], &device)
            ),
            "autodiff"
        );
    }
}
