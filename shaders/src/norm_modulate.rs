//! The fused AdaLN input of an MMDiT / FLUX block: LayerNorm (no affine) over the last dimension,
//! then `·(1 + scale) + shift` per sample, in one pass per token instead of a reduction, a
//! second reduction and the element-wise ops between them. The plain-tensor twin is
//! `modulate(layer_norm(x), shift, scale)` in `portaflow::model::layers`.

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::{Dispatch, DispatchDevice, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;

use crate::{KernelError, KernelTemplate, bits, wgsl_kernel_source};

const KERNEL: &str = "norm_modulate";
const WORKGROUP_SIZE: u32 = 64;

pub(crate) const TEMPLATE: KernelTemplate = KernelTemplate {
    file: "norm_modulate.wgsl",
    source: include_str!("../wgsl/norm_modulate.wgsl"),
    example: || TEMPLATE.instantiate(&[("workgroup_size", "64")]),
};

wgsl_kernel_source!(NormModulateSource, TEMPLATE, WORKGROUP_SIZE);

/// Output spec for the lazy Fusion backend: like `x`.
fn norm_modulate_meta(
    x: &TensorSpec,
    _shift: &TensorSpec,
    _scale: &TensorSpec,
    _eps: &f32,
) -> TensorSpec {
    x.clone()
}

#[backend_extension(Cube, Fusion)]
pub trait NormModulateOps: burn::backend::Backend {
    #[fusion(meta = norm_modulate_meta)]
    fn fused_norm_modulate(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;
}

impl NormModulateOps for CubeBackend {
    fn fused_norm_modulate(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        let (x, shift, scale) = (
            into_contiguous(x),
            into_contiguous(shift),
            into_contiguous(scale),
        );
        // x: [b, tokens, width]
        let shape = x.meta.shape().clone();
        let (tokens, width) = (shape[1], shape[2]);
        let rows = shape[0] * tokens;
        let client = x.client.clone();
        let out = empty_device_dtype(client.clone(), x.device.clone(), shape, DType::F32);

        crate::launch(
            &client,
            NormModulateSource,
            WORKGROUP_SIZE,
            rows,
            vec![
                x.handle.clone().binding(),
                shift.handle.clone().binding(),
                scale.handle.clone().binding(),
            ],
            &[bits(width), bits(tokens), eps, bits(rows)],
            vec![out.handle.clone().binding()],
        );
        out
    }
}

/// LayerNorm without affine parameters over the last dimension, then `·(1 + scale) + shift`
/// per sample, fused, on a wgpu device. No gradient flows through the result (inference only).
///
/// # Shapes
/// - `x`: `[b, tokens, width]`; `shift`, `scale`: `[b, width]`
/// - returns: like `x`
pub fn norm_modulate(
    x: Tensor<3>,
    shift: Tensor<2>,
    scale: Tensor<2>,
    eps: f64,
) -> Result<Tensor<3>, KernelError> {
    let device = x.device();
    if !matches!(device.as_dispatch(), DispatchDevice::Cube(_)) {
        return Err(KernelError::NotCubeDevice {
            kernel: KERNEL,
            device: format!("{device:?}"),
        });
    }
    let [b, tokens, width] = x.dims();
    for (name, dtype, dims) in [
        ("x", x.dtype(), x.dims().to_vec()),
        ("shift", shift.dtype(), shift.dims().to_vec()),
        ("scale", scale.dtype(), scale.dims().to_vec()),
    ] {
        if dtype != DType::F32 {
            return Err(KernelError::DType {
                kernel: KERNEL,
                found: format!("{dtype:?} for `{name}`"),
            });
        }
        if name != "x" && dims != [b, width] {
            return Err(KernelError::Shape {
                kernel: KERNEL,
                input: name,
                expected: vec![b, width],
                found: dims,
            });
        }
    }
    if b * tokens == 0 || width == 0 || b * tokens * width > u32::MAX as usize {
        return Err(KernelError::Invalid {
            kernel: KERNEL,
            message: format!(
                "needs a non-empty [b, tokens, width] tensor, found {:?}",
                x.dims()
            ),
        });
    }
    let [x, shift, scale] = [
        x.without_autodiff().into_dispatch(),
        shift.without_autodiff().into_dispatch(),
        scale.without_autodiff().into_dispatch(),
    ];
    let out = <Dispatch as NormModulateOps>::fused_norm_modulate(x, shift, scale, eps as f32);
    Ok(Tensor::from_dispatch(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_cubecl::template::KernelSource;

    #[test]
    fn template_fills_every_placeholder() {
        let text = NormModulateSource.source().complete();
        assert!(!text.contains("{{"), "unfilled placeholder in:\n{text}");
        assert!(text.contains("@workgroup_size(64, 1, 1)"));
    }
}
