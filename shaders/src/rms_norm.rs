//! RMSNorm with a learned scale over the last dimension in one pass per row (the q / k norms of
//! SD3.5 and FLUX attention, the text encoders' norms) instead of a reduction and the
//! element-wise ops around it. The plain-tensor twin is `RmsNorm::forward` in
//! `portaflow::model::layers`.

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::{Dispatch, DispatchDevice, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::template::{KernelSource, SourceKernel, SourceTemplate};
use cubecl::prelude::{CubeDim, KernelId};
use cubecl::server::KernelArguments;

use crate::{KernelError, KernelTemplate, one_workgroup_per_row};

const KERNEL: &str = "rms_norm";
const WORKGROUP_SIZE: u32 = 32;

pub(crate) const TEMPLATE: KernelTemplate = KernelTemplate {
    file: "rms_norm.wgsl",
    source: include_str!("../wgsl/rms_norm.wgsl"),
    example_values: &[("workgroup_size", "32")],
};

struct RmsNormSource;

impl KernelSource for RmsNormSource {
    fn source(&self) -> SourceTemplate {
        SourceTemplate::new(TEMPLATE.source).register("workgroup_size", WORKGROUP_SIZE.to_string())
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info(WORKGROUP_SIZE)
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// Output spec for the lazy Fusion backend: like `x`.
fn rms_norm_meta(x: &TensorSpec, _weight: &TensorSpec, _eps: &f32) -> TensorSpec {
    x.clone()
}

#[backend_extension(Cube, Fusion)]
pub trait RmsNormOps: burn::backend::Backend {
    #[fusion(meta = rms_norm_meta)]
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;
}

impl RmsNormOps for CubeBackend {
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        let (x, weight) = (into_contiguous(x), into_contiguous(weight));
        // x: [..., width], read as [rows, width]
        let shape = x.meta.shape().clone();
        let width = shape[shape.num_dims() - 1];
        let rows = shape.num_elements() / width;
        let client = x.client.clone();
        let out = empty_device_dtype(client.clone(), x.device.clone(), shape, DType::F32);

        let params = [
            f32::from_bits(width as u32),
            eps,
            f32::from_bits(rows as u32),
        ];
        let params: Vec<u8> = params.iter().flat_map(|p| p.to_le_bytes()).collect();
        let params = client.create_from_slice(&params);

        let arguments = KernelArguments::new().with_buffers(vec![
            x.handle.clone().binding(),
            weight.handle.clone().binding(),
            params.binding(),
            out.handle.clone().binding(),
        ]);
        let kernel = SourceKernel::new(RmsNormSource, CubeDim::new_1d(WORKGROUP_SIZE));
        client.launch(Box::new(kernel), one_workgroup_per_row(rows), arguments);
        out
    }
}

/// `x · rsqrt(mean(x²) + eps) · weight` over the last dimension, fused, on a wgpu device. No
/// gradient flows through the result (inference only).
///
/// # Shapes
/// - `x`: `[..., width]`; `weight`: `[width]`
/// - returns: like `x`
pub fn rms_norm<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<1>,
    eps: f64,
) -> Result<Tensor<D>, KernelError> {
    let device = x.device();
    if !matches!(device.as_dispatch(), DispatchDevice::Cube(_)) {
        return Err(KernelError::NotCubeDevice {
            kernel: KERNEL,
            device: format!("{device:?}"),
        });
    }
    for (name, dtype) in [("x", x.dtype()), ("weight", weight.dtype())] {
        if dtype != DType::F32 {
            return Err(KernelError::DType {
                kernel: KERNEL,
                found: format!("{dtype:?} for `{name}`"),
            });
        }
    }
    let width = x.dims()[D - 1];
    if weight.dims() != [width] {
        return Err(KernelError::Shape {
            kernel: KERNEL,
            input: "weight",
            expected: vec![width],
            found: weight.dims().to_vec(),
        });
    }
    let elements = x.shape().num_elements();
    if elements == 0 || elements > u32::MAX as usize {
        return Err(KernelError::Invalid {
            kernel: KERNEL,
            message: format!("needs a non-empty tensor, found {:?}", x.dims()),
        });
    }
    let out = <Dispatch as RmsNormOps>::fused_rms_norm(
        x.without_autodiff().into_dispatch(),
        weight.without_autodiff().into_dispatch(),
        eps as f32,
    );
    Ok(Tensor::from_dispatch(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_fills_every_placeholder() {
        let text = RmsNormSource.source().complete();
        assert!(!text.contains("{{"), "unfilled placeholder in:\n{text}");
        assert!(text.contains("@workgroup_size(32, 1, 1)"));
    }
}
