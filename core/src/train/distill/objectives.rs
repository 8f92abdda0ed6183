//! The per-step objectives of AC-DMD (RTDMD, ALGORITHMS.md §3.2) and Flow-OPD (§5), written as
//! tensor functions of the quantities the papers name.

use burn::tensor::Tensor;

#[cfg(test)]
use crate::sample::schedule::cps_std;
use crate::sample::step::{self, StepKind};

/// AC-DMD's forward kernel from the ambient level `s` to `t' > s`:
/// `a = (1 − t')/(1 − s)`, `σ_ts = sqrt(max(t'² − a²s², 1e-12))`; returns `(a·x_s + σ_ts·ε, σ_ts)`.
pub fn renoise(x_s: Tensor<4>, noise: Tensor<4>, s: f64, t: f64) -> (Tensor<4>, f64) {
    let a = (1.0 - t) / (1.0 - s);
    let sigma_ts = (t * t - a * a * s * s).max(1e-12).sqrt();
    (x_s * a + noise * sigma_ts, sigma_ts)
}

/// One CPS transition σ → σ' with given noise (RTDMD's sampler, §3.1): `x̂0 = x − σv`,
/// `x̂1 = x + (1−σ)v`, `x' = (1−σ')·x̂0 + σ'cos(ηπ/2)·x̂1 + σ'sin(ηπ/2)·ε`. At σ' = 0 it is
/// deterministic (x' = x̂0).
pub fn cps_transition(
    x: Tensor<4>,
    v: Tensor<4>,
    noise: Tensor<4>,
    sigma: f64,
    sigma_next: f64,
    eta: f64,
) -> Tensor<4> {
    // σ_max only matters to the Flow-GRPO SDE.
    let (mean, std) = step::policy_mean(StepKind::Cps { eta }, x, v, sigma, sigma_next, 1.0);
    if std == 0.0 { mean } else { mean + noise * std }
}

/// AC-DMD's generator loss: with `p_real = x_s − x_s^real`, `p_fake = x_s − x_s^fake`,
/// `g = (p_real − p_fake) / mean_{c,h,w}|p_real|` per sample, `L = ½·MSE(x_s, sg(x_s − g))`.
/// Its gradient with respect to x_s is `g / numel`, pointing from the real score's prediction
/// toward the fake one's. `real` and `fake` are computed without gradients.
///
/// # Shapes
/// - `x_s`, `real`, `fake`: `[b, c, h, w]` → `[1]`
pub fn dmd_loss(x_s: Tensor<4>, real: Tensor<4>, fake: Tensor<4>) -> Tensor<1> {
    let [b, c, h, w] = x_s.dims();
    let p_real = x_s.clone().detach() - real.detach();
    let p_fake = x_s.clone().detach() - fake.detach();
    // [b, c, h, w] → [b, c·h·w] → [b, 1] → [b, 1, 1, 1]
    let scale = p_real
        .clone()
        .abs()
        .reshape([b, c * h * w])
        .mean_dim(1)
        .reshape([b, 1, 1, 1]);
    let g = (p_real - p_fake) / scale;
    let target = (x_s.clone() - g).detach();
    (x_s - target).square().mean() * 0.5
}

/// AC-DMD's fake-score target and weight for a re-noised `x_{t'}` from the ambient `x_s`
/// (`move_scale_out`): the loss is `w·‖σ_ts·v_fake − (σ_ts·α·x_s + β'·ε)‖²` with
/// `α = −1/(1−s)`, `β' = t' + (1−t')·s²/(1−s)²`, `w = clamp(1/σ_ts², 0, 10)`; at s = 0 the target
/// velocity `α·x_s + (β'/σ_ts)·ε` is the flow's `ε − x₀`. Mean over every element.
pub fn fake_score_loss(
    v_fake: Tensor<4>,
    x_s: Tensor<4>,
    noise: Tensor<4>,
    s: f64,
    t: f64,
    sigma_ts: f64,
) -> Tensor<1> {
    let alpha = -1.0 / (1.0 - s);
    let beta = t + (1.0 - t) * s * s / ((1.0 - s) * (1.0 - s));
    let weight = (1.0 / (sigma_ts * sigma_ts)).clamp(0.0, 10.0);
    let target = x_s * (sigma_ts * alpha) + noise * beta;
    (v_fake * sigma_ts - target.detach()).square().mean() * weight
}

/// The consistency estimator of AC-DMD's fake-score regulariser: `mean((h'_1 − h)·(h'_2 − h))`
/// over two independent stochastic paths, an unbiased estimate of `‖E h' − h‖²`.
pub fn consistency(anchor: Tensor<4>, path1: Tensor<4>, path2: Tensor<4>) -> Tensor<1> {
    ((path1 - anchor.clone()) * (path2 - anchor)).mean()
}

/// Flow-OPD's per-step reward as its code computes it: the negative
/// `mean_{c,h,w}(μ_θ − μ_teacher)² / (2·g²)` per sample (Flow-GRPO's KL without |dt|), with the
/// teacher routed by the prompt's task.
///
/// # Shapes
/// - `mean`, `teacher_mean`: `[b, c, h, w]` → `[b]`
pub fn opd_kl_reward(mean: Tensor<4>, teacher_mean: Tensor<4>, g: f64) -> Tensor<1> {
    let [b, c, h, w] = mean.dims();
    // [b, c, h, w] → [b, c·h·w] → [b]
    (mean - teacher_mean)
        .square()
        .reshape([b, c * h * w])
        .mean_dim(1)
        .reshape([b])
        .div_scalar(-2.0 * g * g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, TensorData};

    fn random(seed_shift: f64, device: &Device) -> Tensor<4> {
        Tensor::<4>::random([2, 3, 4, 4], Distribution::Normal(seed_shift, 1.0), device)
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{x} vs {y}");
        }
    }

    #[test]
    fn renoising_keeps_the_noise_level_of_the_flow() {
        // x_s = (1−s)x0 + s·n; a·x_s + σ_ts·ε has x0 coefficient 1−t' and noise variance t'².
        let (s, t) = (0.3, 0.7);
        let a = (1.0 - t) / (1.0 - s);
        let device = Device::flex();
        let (x0, n) = (random(0.0, &device), random(0.0, &device));
        let x_s = x0.clone() * (1.0 - s) + n * s;
        let (_, sigma_ts) = renoise(x_s, random(0.0, &device), s, t);
        assert!((a * (1.0 - s) - (1.0 - t)).abs() < 1e-12);
        assert!(((a * s).powi(2) + sigma_ts * sigma_ts - t * t).abs() < 1e-12);
    }

    #[test]
    fn cps_preserves_the_noise_coefficient_and_is_euler_at_eta_zero() {
        let device = Device::flex();
        let (x, v, e) = (
            random(0.0, &device),
            random(0.5, &device),
            random(0.0, &device),
        );
        let euler = x.clone() + v.clone() * (0.6 - 0.8);
        let cps0 = cps_transition(x.clone(), v.clone(), e.clone(), 0.8, 0.6, 0.0);
        close(&values(cps0), &values(euler), 1e-5);
        // c² + ρ² = σ'² (coefficients preserving).
        let (sn, eta) = (0.6f64, 0.9f64);
        let c = sn * (eta * std::f64::consts::FRAC_PI_2).cos();
        assert!((c * c + cps_std(sn, eta).powi(2) - sn * sn).abs() < 1e-12);
        let last = cps_transition(x.clone(), v.clone(), e, 0.5, 0.0, 0.9);
        close(&values(last), &values(x - v * 0.5), 1e-5);
    }

    #[test]
    fn the_dmd_gradient_is_the_normalised_score_difference() {
        let device = Device::flex();
        let x_s = random(0.0, &device);
        let (real, fake) = (random(0.2, &device), random(-0.1, &device));
        let x = x_s.clone().autodiff().require_grad();
        let loss = dmd_loss(x.clone(), real.clone().autodiff(), fake.clone().autodiff());
        let grads = loss.backward();
        let got = values(x.grad(&grads).unwrap());
        // d/dx ½·mean((x − sg(x − g))²) = g / numel
        let p_real = x_s.clone() - real;
        let p_fake = x_s - fake;
        let scale = p_real
            .clone()
            .abs()
            .reshape([2, 48])
            .mean_dim(1)
            .reshape([2, 1, 1, 1]);
        let want = values((p_real - p_fake) / scale / 96.0);
        close(&got, &want, 1e-6);
    }

    #[test]
    fn the_fake_score_target_is_the_flow_velocity_at_s_zero() {
        let device = Device::flex();
        let (x0, e) = (random(0.0, &device), random(0.0, &device));
        let t = 0.6;
        let (_, sigma_ts) = renoise(x0.clone(), e.clone(), 0.0, t);
        assert!((sigma_ts - t).abs() < 1e-12);
        // A fake score that predicts ε − x₀ exactly has zero loss.
        let perfect = e.clone() - x0.clone();
        let loss = fake_score_loss(perfect, x0.clone(), e.clone(), 0.0, t, sigma_ts);
        assert!(loss.into_scalar::<f32>().abs() < 1e-10);
        let off = fake_score_loss(e.clone() - x0.clone() + 0.1, x0, e, 0.0, t, sigma_ts);
        // w = 1/t², residual σ_ts·0.1 → w·(t·0.1)² = 0.01.
        assert!((off.into_scalar::<f32>() - 0.01).abs() < 1e-5);
    }

    #[test]
    fn consistency_is_zero_when_one_path_stays_at_the_anchor_and_kl_reward_is_minus_the_kl() {
        let device = Device::flex();
        let (h, p) = (random(0.0, &device), random(1.0, &device));
        assert_eq!(
            consistency(h.clone(), h.clone(), p.clone()).into_scalar::<f32>(),
            0.0
        );
        let same = consistency(h.clone(), p.clone(), p.clone()).into_scalar::<f32>();
        let want = (p.clone() - h.clone()).square().mean().into_scalar::<f32>();
        assert!((same - want).abs() < 1e-5);
        let shift =
            Tensor::<4>::from_data(TensorData::new(vec![0.3f32; 96], [2, 3, 4, 4]), &device);
        let r = values(opd_kl_reward(p.clone() + shift, p, 0.5));
        close(&r, &[-0.09 / 0.5, -0.09 / 0.5], 1e-6);
    }
}
