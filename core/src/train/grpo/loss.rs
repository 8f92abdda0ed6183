//! The per-step objective (`scripts/train_sd3.py`, ALGORITHMS.md §1.6): PPO's clipped surrogate
//! on per-sample step log-probs, and the KL to the reference policy.

use burn::tensor::Tensor;

/// `mean_batch(max(−A·ρ, −A·clamp(ρ, 1 − ε, 1 + ε)))` with ρ = exp(log π − log π_old).
/// Returns the loss (a 1-element tensor) and ρ.
///
/// # Shapes
/// - `log_prob`, `old_log_prob`, `advantages`: `[batch]`
pub fn clipped_surrogate(
    log_prob: Tensor<1>,
    old_log_prob: Tensor<1>,
    advantages: Tensor<1>,
    clip_range: f64,
) -> (Tensor<1>, Tensor<1>) {
    clipped_surrogate_of_log_ratio(log_prob - old_log_prob, advantages, clip_range)
}

/// GRPO-Guard's RatioNorm log-ratio, per sample: `s·(log π − log π_old) + mse/(2s)` with
/// `mse = mean_{c,h,w}((μ_θ − μ_old)²)` and `s` the step's std. For x' = μ_old + s·ε this is
/// −mean((μ_old − μ_θ)·ε): zero-mean whatever σ.
///
/// # Shapes
/// - `log_prob`, `old_log_prob`: `[batch]`; `mean`, `old_mean`: `[batch, c, h, w]`
pub fn ratio_norm_log_ratio(
    log_prob: Tensor<1>,
    old_log_prob: Tensor<1>,
    mean: Tensor<4>,
    old_mean: Tensor<4>,
    std: f64,
) -> Tensor<1> {
    let [b, c, h, w] = mean.dims();
    // [b, c, h, w] → [b, c·h·w] → [b]
    let mse = (mean - old_mean)
        .square()
        .reshape([b, c * h * w])
        .mean_dim(1)
        .reshape([b]);
    (log_prob - old_log_prob).mul_scalar(std) + mse.div_scalar(2.0 * std)
}

/// [`clipped_surrogate`] from a per-sample log-ratio. Returns the loss and ρ.
pub fn clipped_surrogate_of_log_ratio(
    log_ratio: Tensor<1>,
    advantages: Tensor<1>,
    clip_range: f64,
) -> (Tensor<1>, Tensor<1>) {
    let ratio = log_ratio.exp();
    let unclipped = advantages.clone().neg() * ratio.clone();
    let clipped = advantages.neg() * ratio.clone().clamp(1.0 - clip_range, 1.0 + clip_range);
    (unclipped.max_pair(clipped).mean(), ratio)
}

/// BoxFlow's per-pixel PPO: ρ(h, w) = exp(log π(h, w) − log π_old(h, w)), the clipped surrogate
/// per pixel with the pixel's advantage, mean over pixels and batch. Returns the loss and ρ.
///
/// # Shapes
/// - `log_prob`, `old_log_prob`, `advantages`: `[batch, h, w]`
pub fn spatial_clipped_surrogate(
    log_prob: Tensor<3>,
    old_log_prob: Tensor<3>,
    advantages: Tensor<3>,
    clip_range: f64,
) -> (Tensor<1>, Tensor<3>) {
    let ratio = (log_prob - old_log_prob).exp();
    let unclipped = advantages.clone().neg() * ratio.clone();
    let clipped = advantages.neg() * ratio.clone().clamp(1.0 - clip_range, 1.0 + clip_range);
    (unclipped.max_pair(clipped).mean(), ratio)
}

/// Flow-GRPO's KL as coded: `mean_{c,h,w}((μ_θ − μ_ref)²) / (2 g²)` per sample, averaged over
/// the batch. `g` is the un-scaled std (no sqrt|dt|), so this is the true Gaussian KL × |dt|.
///
/// # Shapes
/// - `mean`, `reference_mean`: `[batch, c, h, w]`
pub fn x_space_kl(mean: Tensor<4>, reference_mean: Tensor<4>, g: f64) -> Tensor<1> {
    (mean - reference_mean)
        .square()
        .mean()
        .div_scalar(2.0 * g * g)
}

/// Flow-Factory's `v-based` KL: `mean((v_θ − v_ref)²)`.
pub fn v_space_kl(velocity: Tensor<4>, reference_velocity: Tensor<4>) -> Tensor<1> {
    (velocity - reference_velocity).square().mean()
}

/// Diagnostics of one trained step, as Flow-GRPO logs them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// `0.5·mean((log π − log π_old)²)`.
    pub approx_kl: f64,
    /// Fraction of samples with |ρ − 1| > ε.
    pub clip_fraction: f64,
    pub ratio_mean: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    pub policy_loss: f64,
    pub kl: f64,
}

impl StepStats {
    pub fn from_values(ratios: &[f32], policy_loss: f64, kl: f64, clip_range: f64) -> Self {
        let n = ratios.len().max(1) as f64;
        let log = |r: f32| (r as f64).ln();
        Self {
            approx_kl: 0.5 * ratios.iter().map(|&r| log(r).powi(2)).sum::<f64>() / n,
            clip_fraction: ratios
                .iter()
                .filter(|&&r| ((r as f64) - 1.0).abs() > clip_range)
                .count() as f64
                / n,
            ratio_mean: ratios.iter().map(|&r| r as f64).sum::<f64>() / n,
            ratio_min: ratios.iter().fold(f64::INFINITY, |m, &r| m.min(r as f64)),
            ratio_max: ratios
                .iter()
                .fold(f64::NEG_INFINITY, |m, &r| m.max(r as f64)),
            policy_loss,
            kl,
        }
    }

    /// Mean of several steps' stats (min / max over all).
    pub fn mean(all: &[StepStats]) -> Self {
        let n = all.len().max(1) as f64;
        let avg = |f: fn(&StepStats) -> f64| all.iter().map(f).sum::<f64>() / n;
        Self {
            approx_kl: avg(|s| s.approx_kl),
            clip_fraction: avg(|s| s.clip_fraction),
            ratio_mean: avg(|s| s.ratio_mean),
            ratio_min: all.iter().fold(f64::INFINITY, |m, s| m.min(s.ratio_min)),
            ratio_max: all
                .iter()
                .fold(f64::NEG_INFINITY, |m, s| m.max(s.ratio_max)),
            policy_loss: avg(|s| s.policy_loss),
            kl: avg(|s| s.kl),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t(values: &[f32]) -> Tensor<1> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            &Device::flex(),
        )
    }

    fn scalar(x: Tensor<1>) -> f64 {
        x.into_scalar::<f32>() as f64
    }

    #[test]
    fn on_policy_surrogate_is_minus_mean_advantage() {
        let (loss, ratio) =
            clipped_surrogate(t(&[0.3, -1.0]), t(&[0.3, -1.0]), t(&[2.0, -1.0]), 1e-4);
        assert!((scalar(loss) + 0.5).abs() < 1e-7);
        assert_eq!(
            ratio.into_data().try_to_vec::<f32>().unwrap(),
            vec![1.0, 1.0]
        );
    }

    #[test]
    fn clipping_is_pessimistic_on_both_sides() {
        let eps = 0.2;
        let ln = |r: f32| r.ln();
        // ρ = 1.5: with A = 1 the clipped term wins (−1.2); with A = −1 the unclipped one (1.5).
        let (loss, _) = clipped_surrogate(t(&[ln(1.5)]), t(&[0.0]), t(&[1.0]), eps);
        assert!((scalar(loss) + 1.2).abs() < 1e-6);
        let (loss, _) = clipped_surrogate(t(&[ln(1.5)]), t(&[0.0]), t(&[-1.0]), eps);
        assert!((scalar(loss) - 1.5).abs() < 1e-6);
        // ρ = 0.5: with A = 1 unclipped (−0.5), with A = −1 clipped (0.8).
        let (loss, _) = clipped_surrogate(t(&[ln(0.5)]), t(&[0.0]), t(&[1.0]), eps);
        assert!((scalar(loss) + 0.5).abs() < 1e-6);
        let (loss, _) = clipped_surrogate(t(&[ln(0.5)]), t(&[0.0]), t(&[-1.0]), eps);
        assert!((scalar(loss) - 0.8).abs() < 1e-6);
    }

    #[test]
    fn x_space_kl_divides_the_mean_square_by_two_g_squared() {
        let device = Device::flex();
        let a = Tensor::<4>::from_data(TensorData::new(vec![1.0f32, 2.0], [1, 2, 1, 1]), &device);
        let b = Tensor::<4>::zeros([1, 2, 1, 1], &device);
        // mean((1, 4)) = 2.5; / (2·0.25) = 5
        assert!((scalar(x_space_kl(a, b, 0.5)) - 5.0).abs() < 1e-6);
    }

    #[test]
    fn stats_count_clipped_samples() {
        let s = StepStats::from_values(&[1.0, 1.5, 0.9, 1.00001], 0.0, 0.0, 1e-4);
        assert_eq!(s.clip_fraction, 0.5);
        assert_eq!(s.ratio_max, 1.5);
    }
}

#[cfg(test)]
mod ratio_norm_tests {
    use super::*;
    use crate::sample::step::{StepKind, log_prob};
    use burn::tensor::{Device, Distribution};

    #[test]
    fn ratio_norm_is_minus_the_mean_of_the_mean_shift_times_the_noise() {
        let device = Device::flex();
        let s = 0.07;
        let shape = [3, 2, 4, 4];
        let old_mean = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let eps = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let shift = Tensor::<4>::random(shape, Distribution::Normal(0.0, 0.01), &device);
        let mean = old_mean.clone() + shift.clone();
        let x_next = old_mean.clone() + eps.clone().mul_scalar(s);
        let kind = StepKind::FlowSde { noise_level: 0.7 };
        let lp = log_prob(kind, x_next.clone(), mean.clone(), s);
        let lp_old = log_prob(kind, x_next, old_mean.clone(), s);
        let got = ratio_norm_log_ratio(lp, lp_old, mean, old_mean, s);
        // −mean((μ_old − μ_θ)·ε) = mean(shift·ε)
        let want = (shift * eps).reshape([3, 32]).mean_dim(1).reshape([3]);
        let (got, want): (Vec<f32>, Vec<f32>) = (
            got.into_data().try_to_vec::<f32>().unwrap(),
            want.into_data().try_to_vec::<f32>().unwrap(),
        );
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }
}
