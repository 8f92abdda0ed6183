//! The fused Flow-GRPO SDE step: x, v, noise → x', mean, per-sample log-prob in one pass.
//!
//! Formula: ALGORITHMS.md §1.2–1.3 (`sde_step_with_logprob`, "sde" branch), including the σ = 1
//! substitution σ* = σ_max. The plain-tensor twin is `portaflow::sample::step::flow_sde_step`.

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::{Dispatch, DispatchDevice, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;

use crate::{KernelError, KernelTemplate, bits, wgsl_kernel_source};

const KERNEL: &str = "flow_sde_step";
const WORKGROUP_SIZE: u32 = 256;

pub(crate) const TEMPLATE: KernelTemplate = KernelTemplate {
    file: "flow_sde_step.wgsl",
    source: include_str!("../wgsl/flow_sde_step.wgsl"),
    example: || TEMPLATE.instantiate(&[("workgroup_size", "256")]),
};

wgsl_kernel_source!(SdeStepSource, TEMPLATE, WORKGROUP_SIZE);

/// Output specs of the fused step for the lazy Fusion backend: x' and mean like `x`, log-prob `[batch]`.
fn step_meta(
    x: &TensorSpec,
    _v: &TensorSpec,
    _noise: &TensorSpec,
    _sigma: &f32,
    _sigma_next: &f32,
    _sigma_max: &f32,
    _noise_level: &f32,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    let log_prob = TensorSpec::new(Shape::new([x.shape[0]]), DType::F32);
    (x.clone(), x.clone(), log_prob)
}

#[backend_extension(Cube, Fusion)]
pub trait SdeStepOps: burn::backend::Backend {
    #[fusion(meta = step_meta)]
    fn fused_flow_sde_step(
        x: FloatTensor<Self>,
        v: FloatTensor<Self>,
        noise: FloatTensor<Self>,
        sigma: f32,
        sigma_next: f32,
        sigma_max: f32,
        noise_level: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl SdeStepOps for CubeBackend {
    fn fused_flow_sde_step(
        x: FloatTensor<Self>,
        v: FloatTensor<Self>,
        noise: FloatTensor<Self>,
        sigma: f32,
        sigma_next: f32,
        sigma_max: f32,
        noise_level: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (x, v, noise) = (
            into_contiguous(x),
            into_contiguous(v),
            into_contiguous(noise),
        );
        let shape = x.meta.shape().clone();
        let batch = shape[0];
        let per_sample = shape.num_elements() / batch;
        let client = x.client.clone();
        let device = x.device.clone();

        let x_next = empty_device_dtype(client.clone(), device.clone(), shape.clone(), DType::F32);
        let mean = empty_device_dtype(client.clone(), device.clone(), shape, DType::F32);
        let log_prob = empty_device_dtype(client.clone(), device, Shape::new([batch]), DType::F32);

        crate::launch(
            &client,
            SdeStepSource,
            WORKGROUP_SIZE,
            batch,
            vec![
                x.handle.clone().binding(),
                v.handle.clone().binding(),
                noise.handle.clone().binding(),
            ],
            &[sigma, sigma_next, sigma_max, noise_level, bits(per_sample)],
            vec![
                x_next.handle.clone().binding(),
                mean.handle.clone().binding(),
                log_prob.handle.clone().binding(),
            ],
        );

        (x_next, mean, log_prob)
    }
}

/// Result of one fused step.
pub struct SdeStepOutput<const D: usize> {
    /// The next latent x' = mean + s·noise.
    pub next: Tensor<D>,
    /// The Gaussian policy mean μ.
    pub mean: Tensor<D>,
    /// Per-sample log-prob of x' under N(μ, s²I), averaged over all non-batch elements. `[batch]`
    pub log_prob: Tensor<1>,
}

/// Runs the fused Flow-GRPO SDE step on a wgpu device.
///
/// `sigma_max` is the schedule's second sigma (`sigmas[1]`), substituted for σ in the std when
/// σ = 1. No gradient flows through the result: it is the rollout step; training recomputes the
/// log-prob with differentiable tensor ops.
///
/// # Shapes
/// - `x`, `v`, `noise`: `[batch, ...]`, all equal
/// - returns `next`, `mean`: like `x`; `log_prob`: `[batch]`
pub fn flow_sde_step<const D: usize>(
    x: Tensor<D>,
    v: Tensor<D>,
    noise: Tensor<D>,
    sigma: f64,
    sigma_next: f64,
    sigma_max: f64,
    noise_level: f64,
) -> Result<SdeStepOutput<D>, KernelError> {
    let device = x.device();
    if !matches!(device.as_dispatch(), DispatchDevice::Cube(_)) {
        return Err(KernelError::NotCubeDevice {
            kernel: KERNEL,
            device: format!("{device:?}"),
        });
    }
    for (name, tensor) in [("x", &x), ("v", &v), ("noise", &noise)] {
        if tensor.dtype() != DType::F32 {
            return Err(KernelError::DType {
                kernel: KERNEL,
                found: format!("{:?} for `{name}`", tensor.dtype()),
            });
        }
        if tensor.dims() != x.dims() {
            return Err(KernelError::Shape {
                kernel: KERNEL,
                input: name,
                expected: x.dims().to_vec(),
                found: tensor.dims().to_vec(),
            });
        }
    }
    let per_sample: usize = x.dims()[1..].iter().product();
    if D < 2 || x.dims()[0] == 0 || per_sample == 0 || per_sample > u32::MAX as usize {
        return Err(KernelError::Invalid {
            kernel: KERNEL,
            message: format!(
                "needs a non-empty [batch, ...] tensor, found {:?}",
                x.dims()
            ),
        });
    }
    if !(sigma > 0.0 && sigma <= 1.0 && sigma_next >= 0.0 && sigma_next < sigma) {
        return Err(KernelError::Invalid {
            kernel: KERNEL,
            message: format!(
                "needs 0 <= sigma_next < sigma <= 1, found sigma {sigma}, sigma_next {sigma_next}"
            ),
        });
    }
    if sigma == 1.0 && !(sigma_max < 1.0) {
        return Err(KernelError::Invalid {
            kernel: KERNEL,
            message: format!(
                "sigma = 1 needs sigma_max < 1 for the std substitution, found {sigma_max}"
            ),
        });
    }
    if !(noise_level > 0.0) {
        return Err(KernelError::Invalid {
            kernel: KERNEL,
            message: format!(
                "noise_level must be > 0 (use the Euler step for the ODE), found {noise_level}"
            ),
        });
    }

    let [x, v, noise] = [x, v, noise].map(|t| t.without_autodiff().into_dispatch());
    let (next, mean, log_prob) = <Dispatch as SdeStepOps>::fused_flow_sde_step(
        x,
        v,
        noise,
        sigma as f32,
        sigma_next as f32,
        sigma_max as f32,
        noise_level as f32,
    );
    Ok(SdeStepOutput {
        next: Tensor::from_dispatch(next),
        mean: Tensor::from_dispatch(mean),
        log_prob: Tensor::from_dispatch(log_prob),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_cubecl::template::KernelSource;

    #[test]
    fn template_fills_every_placeholder() {
        let text = SdeStepSource.source().complete();
        assert!(!text.contains("{{"), "unfilled placeholder in:\n{text}");
        assert!(text.contains("@workgroup_size(256, 1, 1)"));
    }
}
