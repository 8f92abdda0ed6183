//! One sampler step: given x at σ and the model velocity v, produce x at σ', plus what RL training
//! needs (the policy mean, its std and the log-prob of the sample taken).
//!
//! Formulas: ALGORITHMS.md §1.2–1.3. All step maths is f32 on the tensors with scalar coefficients
//! computed in f64. On wgpu the rollout step can run as one fused kernel
//! (`portaflow_shaders::flow_sde_step`); this file is its plain-tensor twin and the only version
//! autodiff sees.

use burn::tensor::Tensor;

use super::schedule::{cps_std, flow_sde_g, flow_sde_std};

/// Mean and std of one Flow-GRPO SDE step from σ to σ' (σ' < σ).
///
/// μ = x·(1 + g²·dt/(2σ)) + v·(1 + g²·(1−σ)/(2σ))·dt with dt = σ' − σ, std = g·sqrt(|dt|).
///
/// # Shapes
/// - `x`, `v`: `[batch, ...]`; returns μ of the same shape.
pub fn flow_sde_mean<const D: usize>(
    x: Tensor<D>,
    v: Tensor<D>,
    sigma: f64,
    sigma_next: f64,
    sigma_max: f64,
    noise_level: f64,
) -> (Tensor<D>, f64) {
    let g = flow_sde_g(sigma, sigma_max, noise_level);
    let dt = sigma_next - sigma;
    let coef_x = 1.0 + g * g * dt / (2.0 * sigma);
    let coef_v = (1.0 + g * g * (1.0 - sigma) / (2.0 * sigma)) * dt;
    let std = flow_sde_std(sigma, sigma_next, sigma_max, noise_level);
    (x.mul_scalar(coef_x) + v.mul_scalar(coef_v), std)
}

/// Which step rule a sampler uses.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum StepKind {
    /// Deterministic Euler step of the probability-flow ODE.
    Euler,
    /// Flow-GRPO's SDE (§1.2–1.3): g = a·sqrt(σ/(1−σ)), full Gaussian log-prob.
    FlowSde { noise_level: f64 },
    /// DanceGRPO's SDE (§2.1): constant g = η, log-prob without constants.
    DanceSde { eta: f64 },
    /// Coefficients-preserving sampling (§1.3 "cps", §3.1): std = σ'·sin(ηπ/2), log-prob −(x'−μ)².
    Cps { eta: f64 },
}

impl StepKind {
    /// Checks the noise parameter: finite, and in [0, 1] for CPS.
    pub fn validate(&self) -> Result<(), String> {
        let (name, value, max) = match *self {
            Self::Euler => return Ok(()),
            Self::FlowSde { noise_level } => ("flow-sde noise_level", noise_level, 10.0),
            Self::DanceSde { eta } => ("dance-sde eta", eta, 10.0),
            Self::Cps { eta } => ("cps eta", eta, 1.0),
        };
        if value.is_finite() && (0.0..=max).contains(&value) {
            Ok(())
        } else {
            Err(format!("{name} must be in [0, {max}], found {value}"))
        }
    }
}

/// Mean and std of the Gaussian policy π(x' | x) of one step σ → σ'.
///
/// At σ' = 0 (the last step) and for `Euler` the step is deterministic (std 0).
///
/// # Shapes
/// - `x`, `v`: `[batch, ...]`; returns μ of the same shape.
pub fn policy_mean<const D: usize>(
    kind: StepKind,
    x: Tensor<D>,
    v: Tensor<D>,
    sigma: f64,
    sigma_next: f64,
    sigma_max: f64,
) -> (Tensor<D>, f64) {
    match kind {
        StepKind::Euler => (euler_step(x, v, sigma, sigma_next), 0.0),
        StepKind::FlowSde { noise_level } => {
            flow_sde_mean(x, v, sigma, sigma_next, sigma_max, noise_level)
        }
        StepKind::DanceSde { eta } => {
            // μ = x + [v + (η²/(2σ²))·(x − (1−σ)·x̂0)]·dt, x̂0 = x − σ·v
            //   = x·(1 + η²σ·dt/(2σ²)) + v·(1 + η²(1−σ)σ/(2σ²))·dt
            let dt = sigma_next - sigma;
            let k = eta * eta / (2.0 * sigma * sigma);
            let coef_x = 1.0 + k * sigma * dt;
            let coef_v = (1.0 + k * (1.0 - sigma) * sigma) * dt;
            (
                x.mul_scalar(coef_x) + v.mul_scalar(coef_v),
                eta * (sigma - sigma_next).sqrt(),
            )
        }
        StepKind::Cps { eta } => {
            if sigma_next == 0.0 || eta == 0.0 {
                return (euler_step(x, v, sigma, sigma_next), 0.0);
            }
            // x̂0 = x − σv, x̂1 = x + (1−σ)v; μ = (1−σ')·x̂0 + σ'·cos(ηπ/2)·x̂1
            let angle = eta * std::f64::consts::FRAC_PI_2;
            let c = sigma_next * angle.cos();
            let coef_x = (1.0 - sigma_next) + c;
            let coef_v = -(1.0 - sigma_next) * sigma + c * (1.0 - sigma);
            (
                x.mul_scalar(coef_x) + v.mul_scalar(coef_v),
                cps_std(sigma_next, eta),
            )
        }
    }
}

/// Applies a method's log-prob scale and constants to a mean squared residual: Flow-SDE is the
/// full Gaussian, Dance-SDE −(x'−μ)²/(2s²) (its constants are dead code upstream), CPS −(x'−μ)².
fn scale_log_prob<const D: usize>(kind: StepKind, mean_sq: Tensor<D>, std: f64) -> Tensor<D> {
    match kind {
        StepKind::Euler | StepKind::Cps { .. } => mean_sq.mul_scalar(-1.0),
        StepKind::FlowSde { .. } => mean_sq
            .mul_scalar(-1.0 / (2.0 * std * std))
            .add_scalar(-std.ln() - (2.0 * std::f64::consts::PI).sqrt().ln()),
        StepKind::DanceSde { .. } => mean_sq.mul_scalar(-1.0 / (2.0 * std * std)),
    }
}

/// Per-sample log-prob of `sample` under the step's policy, averaged over all non-batch elements;
/// `sample` is data (detached).
///
/// # Shapes
/// - `sample`, `mean`: `[batch, ...]`; returns `[batch]`.
pub fn log_prob<const D: usize>(
    kind: StepKind,
    sample: Tensor<D>,
    mean: Tensor<D>,
    std: f64,
) -> Tensor<1> {
    let batch = sample.dims()[0];
    let per_sample = sample.shape().num_elements() / batch;
    // [batch, ...] → [batch, per_sample] → [batch]
    let mean_sq = (sample.detach() - mean)
        .square()
        .reshape([batch, per_sample])
        .mean_dim(1)
        .squeeze_dim::<1>(1);
    scale_log_prob(kind, mean_sq, std)
}

/// Spatial log-prob for BoxFlow-style training: averaged over channels only, one value per latent
/// pixel.
///
/// # Shapes
/// - `sample`, `mean`: `[batch, channels, h, w]`; returns `[batch, h, w]`.
pub fn log_prob_map(kind: StepKind, sample: Tensor<4>, mean: Tensor<4>, std: f64) -> Tensor<3> {
    // [b, c, h, w] → [b, 1, h, w] → [b, h, w]
    let mean_sq = (sample.detach() - mean)
        .square()
        .mean_dim(1)
        .squeeze_dim::<3>(1);
    scale_log_prob(kind, mean_sq, std)
}

/// Result of one stochastic step.
pub struct StepOutput<const D: usize> {
    /// x at σ', detached (it is data for training).
    pub next: Tensor<D>,
    /// The policy mean μ.
    pub mean: Tensor<D>,
    /// The policy std s (the same for every element).
    pub std: f64,
    /// Per-sample log-prob of `next`, `[batch]`.
    pub log_prob: Tensor<1>,
}

/// One Flow-GRPO SDE step with the given standard-normal `noise`: x' = μ + s·noise.
///
/// `sigma_max` is the schedule's `sigmas[1]` (used in place of σ when σ = 1).
pub fn flow_sde_step<const D: usize>(
    x: Tensor<D>,
    v: Tensor<D>,
    noise: Tensor<D>,
    sigma: f64,
    sigma_next: f64,
    sigma_max: f64,
    noise_level: f64,
) -> StepOutput<D> {
    let (mean, std) = flow_sde_mean(x, v, sigma, sigma_next, sigma_max, noise_level);
    let next = (mean.clone() + noise.mul_scalar(std)).detach();
    let log_prob = log_prob(
        StepKind::FlowSde { noise_level },
        next.clone(),
        mean.clone(),
        std,
    );
    StepOutput {
        next,
        mean,
        std,
        log_prob,
    }
}

/// Deterministic Euler step of the probability-flow ODE: x' = x + v·(σ' − σ).
pub fn euler_step<const D: usize>(
    x: Tensor<D>,
    v: Tensor<D>,
    sigma: f64,
    sigma_next: f64,
) -> Tensor<D> {
    x + v.mul_scalar(sigma_next - sigma)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec().unwrap()
    }

    #[test]
    fn sde_step_matches_hand_computed_values() {
        let device = Device::flex();
        // σ = 0.5 → σ' = 0.25, a = 0.7: g² = 0.49·0.5/0.5 = 0.49, dt = −0.25,
        // coef_x = 1 − 0.49·0.25/1 = 0.8775, coef_v = (1 + 0.49·0.5/1)·(−0.25) = −0.31125,
        // std = 0.7·0.5 = 0.35.
        let x = Tensor::<2>::from_data(TensorData::from([[1.0f32, -2.0]]), &device);
        let v = Tensor::<2>::from_data(TensorData::from([[0.5f32, 1.0]]), &device);
        let noise = Tensor::<2>::from_data(TensorData::from([[1.0f32, 0.0]]), &device);
        let out = flow_sde_step(x, v, noise, 0.5, 0.25, 0.9, 0.7);
        assert!((out.std - 0.35).abs() < 1e-12);
        let mean = values(out.mean);
        let expected_mean = [0.8775 - 0.155625, -1.755 - 0.31125];
        let next = values(out.next);
        for i in 0..2 {
            assert!(
                (mean[i] - expected_mean[i] as f32).abs() < 1e-6,
                "mean {mean:?}"
            );
        }
        assert!((next[0] - (expected_mean[0] + 0.35) as f32).abs() < 1e-6);
        assert!((next[1] - expected_mean[1] as f32).abs() < 1e-6);
        // log-prob: mean over the two elements of −z²/2 (z = 1, 0) − log 0.35 − log √(2π).
        let expected = -0.25 - 0.35f64.ln() - (2.0 * std::f64::consts::PI).sqrt().ln();
        let log_prob = values(out.log_prob);
        assert!(
            (log_prob[0] as f64 - expected).abs() < 1e-5,
            "{log_prob:?} vs {expected}"
        );
    }

    #[test]
    fn zero_noise_level_is_the_euler_step() {
        let device = Device::flex();
        let x = Tensor::<2>::from_data(TensorData::from([[1.0f32, -2.0]]), &device);
        let v = Tensor::<2>::from_data(TensorData::from([[0.5f32, 1.0]]), &device);
        let (mean, std) = flow_sde_mean(x.clone(), v.clone(), 0.6, 0.4, 0.9, 0.0);
        assert_eq!(std, 0.0);
        let euler = euler_step(x, v, 0.6, 0.4);
        let (a, b) = (values(mean), values(euler));
        for i in 0..2 {
            assert!((a[i] - b[i]).abs() < 1e-6);
        }
    }

    fn t4(values: [f32; 2], device: &Device) -> Tensor<4> {
        Tensor::<4>::from_data(TensorData::new(values.to_vec(), [1, 2, 1, 1]), device)
    }

    #[test]
    fn cps_preserves_coefficients_and_reduces_to_euler() {
        let device = Device::flex();
        let (x, v) = (t4([1.0, -2.0], &device), t4([0.5, 1.0], &device));
        // η = 0 is Euler exactly.
        let (mean, std) = policy_mean(
            StepKind::Cps { eta: 0.0 },
            x.clone(),
            v.clone(),
            0.75,
            0.5,
            0.9,
        );
        assert_eq!(std, 0.0);
        let euler = values(euler_step(x.clone(), v.clone(), 0.75, 0.5));
        assert_eq!(values(mean), euler);
        // η = 0.9: μ = (1−σ')x̂0 + σ'cos(ηπ/2)x̂1, std = σ' sin(ηπ/2), so c² + ρ² = σ'².
        let (mean, std) = policy_mean(StepKind::Cps { eta: 0.9 }, x, v, 0.75, 0.5, 0.9);
        let angle = 0.9 * std::f64::consts::FRAC_PI_2;
        let (x0, x1) = (1.0 - 0.75 * 0.5, 1.0 + 0.25 * 0.5);
        let want = 0.5 * x0 + 0.5 * angle.cos() * x1;
        assert!((values(mean)[0] as f64 - want).abs() < 1e-6);
        assert!(((0.5 * angle.cos()).powi(2) + std * std - 0.25).abs() < 1e-12);
    }

    #[test]
    fn log_prob_reductions_and_constants_follow_each_method() {
        let device = Device::flex();
        // One sample, 2 channels, 1×2 pixels; residuals (1, 3) and (0, 2).
        let sample = Tensor::<4>::from_data(
            TensorData::new(vec![1.0f32, 3.0, 0.0, 2.0], [1, 2, 1, 2]),
            &device,
        );
        let mean = Tensor::<4>::zeros([1, 2, 1, 2], &device);
        let per_pixel = log_prob_map(
            StepKind::Cps { eta: 0.9 },
            sample.clone(),
            mean.clone(),
            0.3,
        );
        assert_eq!(per_pixel.dims(), [1, 1, 2]);
        assert_eq!(
            per_pixel.into_data().try_to_vec::<f32>().unwrap(),
            vec![-0.5, -6.5]
        );
        let per_sample = log_prob(
            StepKind::Cps { eta: 0.9 },
            sample.clone(),
            mean.clone(),
            0.3,
        );
        assert_eq!(
            per_sample.into_data().try_to_vec::<f32>().unwrap(),
            vec![-3.5]
        );
        let dance = log_prob(
            StepKind::DanceSde { eta: 0.3 },
            sample.clone(),
            mean.clone(),
            0.5,
        );
        assert!((dance.into_data().try_to_vec::<f32>().unwrap()[0] - (-3.5 / 0.5)).abs() < 1e-5);
        let flow = log_prob(StepKind::FlowSde { noise_level: 0.7 }, sample, mean, 0.5);
        let want = -3.5 / 0.5 - 0.5f64.ln() - (2.0 * std::f64::consts::PI).sqrt().ln();
        assert!((flow.into_data().try_to_vec::<f32>().unwrap()[0] as f64 - want).abs() < 1e-5);
    }

    #[test]
    fn step_kinds_reject_out_of_range_noise() {
        assert!(StepKind::Cps { eta: 1.5 }.validate().is_err());
        assert!(
            StepKind::FlowSde {
                noise_level: f64::NAN
            }
            .validate()
            .is_err()
        );
        assert!(StepKind::DanceSde { eta: -0.1 }.validate().is_err());
        assert!(StepKind::FlowSde { noise_level: 0.7 }.validate().is_ok());
    }
}
