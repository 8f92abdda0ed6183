//! The sampling loop: noise → denoiser → step, with CFG, stochastic-step plans, the rollout
//! record RL training needs, progress callbacks and cancellation.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::schedule::{self, Schedule};
use super::select::StepPlan;
use super::step::{self, StepKind};

/// Text conditioning of a batch.
#[derive(Clone, Debug)]
pub struct Conditioning {
    /// Token states `[batch, seq, dim]`.
    pub sequence: Tensor<3>,
    /// Pooled text vector `[batch, dim]` (SD3, FLUX.1); `None` for models without one.
    pub pooled: Option<Tensor<2>>,
    /// FLUX guidance-embedding strength, for guidance-distilled models.
    pub guidance: Option<f64>,
}

impl Conditioning {
    /// Batch size.
    pub fn batch(&self) -> usize {
        self.sequence.dims()[0]
    }

    /// `[self; other]` along the batch: one forward for CFG's two branches.
    pub fn concat(&self, other: &Self) -> Self {
        Self {
            sequence: Tensor::cat(vec![self.sequence.clone(), other.sequence.clone()], 0),
            pooled: match (&self.pooled, &other.pooled) {
                (Some(a), Some(b)) => Some(Tensor::cat(vec![a.clone(), b.clone()], 0)),
                _ => None,
            },
            guidance: self.guidance,
        }
    }

    /// Several batches joined along the batch.
    pub fn cat(parts: &[Self]) -> Self {
        Self {
            sequence: Tensor::cat(parts.iter().map(|p| p.sequence.clone()).collect(), 0),
            pooled: parts
                .iter()
                .map(|p| p.pooled.clone())
                .collect::<Option<Vec<_>>>()
                .map(|pooled| Tensor::cat(pooled, 0)),
            guidance: parts.first().and_then(|p| p.guidance),
        }
    }

    /// The rows `index` of the batch.
    pub fn select(&self, index: &Tensor<1, Int>) -> Self {
        Self {
            sequence: self.sequence.clone().select(0, index.clone()),
            pooled: self.pooled.clone().map(|p| p.select(0, index.clone())),
            guidance: self.guidance,
        }
    }

    /// The same values on the autodiff device (as constants).
    pub fn autodiff(&self) -> Self {
        Self {
            sequence: self.sequence.clone().autodiff(),
            pooled: self.pooled.clone().map(Tensor::autodiff),
            guidance: self.guidance,
        }
    }
}

/// Anything that predicts the flow velocity v ≈ ε − x0: every model family implements it, every
/// sampler and trainer drives it.
pub trait Denoiser {
    /// Velocity at noise level `sigma` (σ = 1 is pure noise).
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, h, w]`; `cond.sequence`: `[batch, seq, dim]`; returns like `x`.
    fn velocity(&self, x: Tensor<4>, sigma: f64, cond: &Conditioning) -> Tensor<4>;
}

/// Seeded standard-normal noise, per sample and per step, generated on the host so that every
/// backend gets the same numbers for the same seed.
#[derive(Clone, Debug)]
pub struct NoiseSource {
    /// One seed per sample of the batch.
    pub seeds: Vec<u64>,
}

impl NoiseSource {
    pub fn new(seeds: Vec<u64>) -> Self {
        Self { seeds }
    }

    /// Noise for the given `stream` (0: initial latent, i + 1: step i), `[batch, shape...]`.
    fn draw(seeds: &[u64], stream: u64, shape: [usize; 3], device: &Device) -> Tensor<4> {
        let per_sample = shape.iter().product::<usize>();
        let mut values = Vec::with_capacity(seeds.len() * per_sample);
        for &seed in seeds {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(stream);
            values.extend((0..per_sample).map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                z as f32
            }));
        }
        let [c, h, w] = shape;
        Tensor::from_data(TensorData::new(values, [seeds.len(), c, h, w]), device)
    }

    /// The initial latent x(σ = 1) ~ N(0, I).
    pub fn initial(&self, shape: [usize; 3], device: &Device) -> Tensor<4> {
        Self::draw(&self.seeds, 0, shape, device)
    }

    /// The noise of step `step`, from `seeds` (the samples' own, or shared per prompt).
    pub fn step(seeds: &[u64], step: usize, shape: [usize; 3], device: &Device) -> Tensor<4> {
        Self::draw(seeds, step as u64 + 1, shape, device)
    }
}

/// Progress report after each step.
pub struct Progress<'a> {
    pub step: usize,
    pub steps: usize,
    /// The current latent, for a live preview.
    pub latent: &'a Tensor<4>,
}

/// What training needs from a rollout.
#[derive(Clone, Debug)]
pub struct Rollout {
    /// Latents x_0 … x_T (`steps + 1` of them), each `[batch, c, h, w]`, detached.
    pub latents: Vec<Tensor<4>>,
    /// Per step: the log-prob of the step taken, `[batch]` (`None` for deterministic steps).
    pub log_probs: Vec<Option<Tensor<1>>>,
    /// Per step: the policy mean (kept for GRPO-Guard and KL diagnostics).
    pub means: Vec<Tensor<4>>,
    /// Per step: the policy std (0 for deterministic steps).
    pub stds: Vec<f64>,
    /// The schedule's sigmas.
    pub sigmas: Vec<f64>,
    /// Which steps were stochastic / trained.
    pub plan: StepPlan,
}

/// Errors of the sampling loop.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("cancelled before step {step} of {steps}")]
    Cancelled { step: usize, steps: usize },
    #[error("invalid sampler settings: {0}")]
    Invalid(String),
}

/// Sampler settings.
pub struct SampleOptions<'a> {
    pub schedule: &'a Schedule,
    /// Step rule for stochastic steps (deterministic steps are Euler).
    pub kind: StepKind,
    /// Which steps are stochastic / trained / share noise.
    pub plan: StepPlan,
    /// Classifier-free guidance scale w: v = v_u + w·(v_c − v_u); 1 disables CFG.
    pub guidance_scale: f64,
    /// Guidance only on steps with lo < σ ≤ hi (Kynkäänniemi et al. 2024, "Applying guidance in
    /// a limited interval"); the other steps run the conditional branch alone. `None`: every step.
    pub guidance_interval: Option<(f64, f64)>,
    /// Per-sample seeds for shared-noise steps (e.g. hash of the prompt), when the plan has any.
    pub shared_seeds: Option<Vec<u64>>,
    /// Keep the rollout record.
    pub record: bool,
}

impl SampleOptions<'_> {
    /// The guidance scale of a step at `sigma`: 1 outside the guidance interval.
    pub fn guidance_at(&self, sigma: f64) -> f64 {
        match self.guidance_interval {
            Some((lo, hi)) if !(lo < sigma && sigma <= hi) => 1.0,
            _ => self.guidance_scale,
        }
    }

    fn validate(
        &self,
        batch: usize,
        has_uncond: bool,
        noise: &NoiseSource,
    ) -> Result<(), SampleError> {
        let steps = self.schedule.steps();
        let invalid = |m: String| Err(SampleError::Invalid(m));
        self.kind.validate().map_err(SampleError::Invalid)?;
        if self.plan.stochastic.len() != steps || self.plan.trained.len() != steps {
            return invalid(format!(
                "step plan covers {} steps, schedule has {steps}",
                self.plan.stochastic.len()
            ));
        }
        if !(self.guidance_scale.is_finite() && self.guidance_scale >= 0.0) {
            return invalid(format!(
                "guidance scale must be ≥ 0, found {}",
                self.guidance_scale
            ));
        }
        if let Some((lo, hi)) = self.guidance_interval
            && !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo < hi)
        {
            return invalid(format!(
                "guidance interval must have 0 ≤ low < high, found ({lo}, {hi}]"
            ));
        }
        if self.guidance_scale != 1.0 && !has_uncond {
            return invalid(
                "CFG (guidance scale ≠ 1) needs an unconditional (negative) conditioning".into(),
            );
        }
        if noise.seeds.len() != batch {
            return invalid(format!(
                "{} noise seeds for a batch of {batch}",
                noise.seeds.len()
            ));
        }
        if self.plan.shared_noise.iter().any(|&s| s)
            && self.shared_seeds.as_ref().is_none_or(|s| s.len() != batch)
        {
            return invalid(
                "the step plan shares noise but no per-sample shared seeds were given".into(),
            );
        }
        if self.plan.stochastic.iter().any(|&s| s) && self.kind == StepKind::Euler {
            return invalid("the step plan has stochastic steps but the sampler is Euler".into());
        }
        Ok(())
    }
}

/// Velocity with classifier-free guidance: both branches in one batched forward.
pub fn guided_velocity(
    denoiser: &dyn Denoiser,
    x: Tensor<4>,
    sigma: f64,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    guidance_scale: f64,
) -> Tensor<4> {
    match uncond {
        Some(uncond) if guidance_scale != 1.0 => {
            let batch = x.dims()[0];
            // [2·batch, c, h, w]: unconditional first, as diffusers does.
            let both = denoiser.velocity(
                Tensor::cat(vec![x.clone(), x], 0),
                sigma,
                &uncond.concat(cond),
            );
            let v_uncond = both.clone().narrow(0, 0, batch);
            let v_cond = both.narrow(0, batch, batch);
            v_uncond.clone() + (v_cond - v_uncond).mul_scalar(guidance_scale)
        }
        _ => denoiser.velocity(x, sigma, cond),
    }
}

/// Runs the sampler from `x` at σ = 1 to σ = 0.
///
/// `on_step` is called after every step; `cancel` is checked before every step.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    denoiser: &dyn Denoiser,
    x: Tensor<4>,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    noise: &NoiseSource,
    options: &SampleOptions,
    mut on_step: impl FnMut(Progress),
    cancel: Option<&AtomicBool>,
) -> Result<(Tensor<4>, Option<Rollout>), SampleError> {
    let [batch, c, h, w] = x.dims();
    options.validate(batch, uncond.is_some(), noise)?;
    let schedule = options.schedule;
    let steps = schedule.steps();
    let device = x.device();
    let mut x = x;
    let mut rollout = options.record.then(|| Rollout {
        latents: vec![x.clone()],
        log_probs: Vec::with_capacity(steps),
        means: Vec::with_capacity(steps),
        stds: Vec::with_capacity(steps),
        sigmas: schedule.sigmas.clone(),
        plan: options.plan.clone(),
    });
    for i in 0..steps {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(SampleError::Cancelled { step: i, steps });
        }
        let (sigma, sigma_next) = (schedule.sigmas[i], schedule.sigmas[i + 1]);
        let v = guided_velocity(
            denoiser,
            x.clone(),
            sigma,
            cond,
            uncond,
            options.guidance_at(sigma),
        );
        let kind = if options.plan.stochastic[i] {
            options.kind
        } else {
            StepKind::Euler
        };
        let sigma_max = schedule.sigma_max();
        let seeds = match (options.plan.shared_noise[i], &options.shared_seeds) {
            (true, Some(shared)) => shared.as_slice(),
            _ => noise.seeds.as_slice(),
        };
        let fused = match kind {
            StepKind::FlowSde { noise_level } if sigma_next > 0.0 && fused_sde_pays(&x) => {
                let eps = NoiseSource::step(seeds, i, [c, h, w], &device);
                let (x, v) = (x.clone(), v.clone());
                portaflow_shaders::flow_sde_step(
                    x,
                    v,
                    eps,
                    sigma,
                    sigma_next,
                    sigma_max,
                    noise_level,
                )
                .ok()
                .map(|out| {
                    let std = schedule::flow_sde_std(sigma, sigma_next, sigma_max, noise_level);
                    let log_prob = options.record.then_some(out.log_prob);
                    (out.next, out.mean, std, log_prob)
                })
            }
            _ => None,
        };
        let (next, mean, std, log_prob) = match fused {
            Some(step) => step,
            None => {
                let (mean, std) = step::policy_mean(kind, x, v, sigma, sigma_next, sigma_max);
                if std > 0.0 {
                    let eps = NoiseSource::step(seeds, i, [c, h, w], &device);
                    let next = (mean.clone() + eps.mul_scalar(std)).detach();
                    let log_prob = options
                        .record
                        .then(|| step::log_prob(kind, next.clone(), mean.clone(), std));
                    (next, mean, std, log_prob)
                } else {
                    (mean.clone().detach(), mean, std, None)
                }
            }
        };
        if let Some(r) = rollout.as_mut() {
            r.latents.push(next.clone());
            r.log_probs.push(log_prob);
            r.means.push(mean);
            r.stds.push(std);
        }
        x = next;
        on_step(Progress {
            step: i + 1,
            steps,
            latent: &x,
        });
    }
    Ok((x, rollout))
}

/// Largest latent (all samples) for which the fused WGSL Flow-SDE step beat the tensor ops on
/// lavapipe (BENCHMARKS.md, "Flow-SDE sampler step"): it saves kernel launches, but runs one
/// workgroup per sample, so on large latents it leaves the device's threads idle (3× slower at
/// 4 × 16 × 128 × 128).
pub const FUSED_SDE_MAX_ELEMENTS: usize = 32_768;

/// Whether a Flow-SDE step on `x` runs as the fused kernel: a wgpu (CubeCL) device, not Flex and
/// not autodiff (the kernel has no backward; training recomputes log-probs with tensor ops), and a
/// latent small enough for it to be faster.
fn fused_sde_pays(x: &Tensor<4>) -> bool {
    let on_wgpu = matches!(
        x.device().as_dispatch(),
        burn::backend::DispatchDevice::Cube(_)
    );
    on_wgpu && x.shape().num_elements() <= FUSED_SDE_MAX_ELEMENTS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::select::{OffSelection, StepSelection, TrainingClock};

    /// Data x0 ~ N(m, diag(s²)); the exact rectified-flow velocity is
    /// v(x, σ) = E[ε − x0 | x_σ] = (σ − (1−σ)s²)/((1−σ)²s² + σ²) · (x − (1−σ)m) − m.
    struct GaussianData {
        mean: Vec<f32>,
        std: Vec<f32>,
    }

    impl Denoiser for GaussianData {
        fn velocity(&self, x: Tensor<4>, sigma: f64, _cond: &Conditioning) -> Tensor<4> {
            let device = x.device();
            let d = self.mean.len();
            let (coef, offset): (Vec<f32>, Vec<f32>) = self
                .mean
                .iter()
                .zip(&self.std)
                .map(|(&m, &s)| {
                    let (m, s) = (m as f64, s as f64);
                    let var = (1.0 - sigma).powi(2) * s * s + sigma * sigma;
                    let k = (sigma - (1.0 - sigma) * s * s) / var;
                    (k as f32, (-k * (1.0 - sigma) * m - m) as f32)
                })
                .unzip();
            let coef = Tensor::<4>::from_data(TensorData::new(coef, [1, d, 1, 1]), &device);
            let offset = Tensor::<4>::from_data(TensorData::new(offset, [1, d, 1, 1]), &device);
            x * coef + offset
        }
    }

    fn moments(x: Tensor<4>) -> (Vec<f64>, Vec<f64>) {
        let [n, d, _, _] = x.dims();
        let v: Vec<f32> = x.into_data().try_to_vec().unwrap();
        (0..d)
            .map(|j| {
                let col: Vec<f64> = (0..n).map(|i| v[i * d + j] as f64).collect();
                let mean = col.iter().sum::<f64>() / n as f64;
                let var = col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
                (mean, var)
            })
            .unzip()
    }

    fn run(kind: StepKind, plan: StepPlan, steps: usize) -> (Vec<f64>, Vec<f64>, GaussianData) {
        let device = Device::flex();
        let data = GaussianData {
            mean: vec![1.0, -2.0, 0.5, 3.0],
            std: vec![0.5, 1.0, 0.2, 2.0],
        };
        let n = 4000;
        let noise = NoiseSource::new((0..n as u64).collect());
        let cond = Conditioning {
            sequence: Tensor::zeros([n, 1, 1], &device),
            pooled: None,
            guidance: None,
        };
        // shift 1: evenly spaced sigmas; Euler's error on narrow Gaussians needs ~200 steps to stay
        // under 3% (measured: 13% variance deficit at 40 shifted steps for s = 0.5).
        let schedule = Schedule::shifted(steps, 1.0).unwrap();
        let options = SampleOptions {
            guidance_interval: None,
            schedule: &schedule,
            kind,
            plan,
            guidance_scale: 1.0,
            shared_seeds: None,
            record: false,
        };
        let x = noise.initial([4, 1, 1], &device);
        let (out, _) = sample(&data, x, &cond, None, &noise, &options, |_| {}, None).unwrap();
        let (mean, var) = moments(out);
        (mean, var, data)
    }

    fn assert_marginals(label: &str, (mean, var, data): (Vec<f64>, Vec<f64>, GaussianData)) {
        for j in 0..4 {
            let (m, s) = (data.mean[j] as f64, data.std[j] as f64);
            // 5 standard errors of the sample mean plus a small discretisation allowance.
            let mean_tol = 5.0 * s / (4000f64).sqrt() + 0.03 * s;
            assert!(
                (mean[j] - m).abs() < mean_tol,
                "{label} dim {j}: mean {} vs {m} (tol {mean_tol})",
                mean[j]
            );
            let rel = var[j] / (s * s);
            assert!(
                (rel - 1.0).abs() < 0.12,
                "{label} dim {j}: variance {} vs {} (ratio {rel})",
                var[j],
                s * s
            );
        }
    }

    #[test]
    fn ode_transports_noise_to_the_data_distribution() {
        assert_marginals("ode", run(StepKind::Euler, StepPlan::ode(200), 200));
    }

    #[test]
    fn flow_sde_keeps_the_ode_marginals() {
        let plan =
            StepSelection::AllButLast.plan(200, TrainingClock::default(), OffSelection::Stochastic);
        assert_marginals(
            "flow-sde",
            run(StepKind::FlowSde { noise_level: 0.7 }, plan, 200),
        );
    }

    #[test]
    fn cps_keeps_the_mean_but_not_the_variance() {
        // CPS preserves the noise coefficient (c² + ρ² = σ'²), not the marginal: it re-noises
        // the posterior mean E[x0 | x], so with an exact denoiser the spread shrinks. Measured
        // (numpy, 1000 steps, η = 0.9): variance ratio ≈ 0.57 for every data std; the mean is exact.
        let plan =
            StepSelection::AllButLast.plan(200, TrainingClock::default(), OffSelection::Stochastic);
        let (mean, var, data) = run(StepKind::Cps { eta: 0.9 }, plan, 200);
        for j in 0..4 {
            let (m, s) = (data.mean[j] as f64, data.std[j] as f64);
            assert!(
                (mean[j] - m).abs() < 5.0 * s / (4000f64).sqrt() + 0.03 * s,
                "dim {j}: mean {}",
                mean[j]
            );
            let ratio = var[j] / (s * s);
            assert!(
                (0.45..0.68).contains(&ratio),
                "dim {j}: variance ratio {ratio}"
            );
        }
        // Small η approaches the ODE, which does keep the marginal.
        let plan =
            StepSelection::AllButLast.plan(200, TrainingClock::default(), OffSelection::Stochastic);
        assert_marginals("cps η=0.05", run(StepKind::Cps { eta: 0.05 }, plan, 200));
    }

    #[test]
    fn a_wrong_marginal_is_detected() {
        // The check must be able to fail: a denoiser with the wrong mean is caught.
        let (mut mean, var, data) = run(StepKind::Euler, StepPlan::ode(200), 200);
        mean[0] += 0.2;
        let result = std::panic::catch_unwind(|| assert_marginals("shifted", (mean, var, data)));
        assert!(result.is_err());
    }

    #[test]
    fn same_seed_same_image_whatever_the_batch() {
        let device = Device::flex();
        let noise = NoiseSource::new(vec![7, 8, 9]);
        let alone = NoiseSource::new(vec![8]).initial([2, 2, 2], &device);
        let batch = noise.initial([2, 2, 2], &device).narrow(0, 1, 1);
        assert_eq!(
            alone.into_data().try_to_vec::<f32>().unwrap(),
            batch.into_data().try_to_vec::<f32>().unwrap()
        );
    }

    #[test]
    fn cancellation_stops_between_steps_and_bad_settings_fail_up_front() {
        let device = Device::flex();
        let data = GaussianData {
            mean: vec![0.0],
            std: vec![1.0],
        };
        let noise = NoiseSource::new(vec![1]);
        let cond = Conditioning {
            sequence: Tensor::zeros([1, 1, 1], &device),
            pooled: None,
            guidance: None,
        };
        let schedule = Schedule::shifted(5, 3.0).unwrap();
        let options = SampleOptions {
            guidance_interval: None,
            schedule: &schedule,
            kind: StepKind::Euler,
            plan: StepPlan::ode(5),
            guidance_scale: 1.0,
            shared_seeds: None,
            record: true,
        };
        let cancel = AtomicBool::new(false);
        let mut seen = 0;
        let result = sample(
            &data,
            noise.initial([1, 1, 1], &device),
            &cond,
            None,
            &noise,
            &options,
            |p| {
                seen = p.step;
                if p.step == 2 {
                    cancel.store(true, Ordering::Relaxed);
                }
            },
            Some(&cancel),
        );
        assert!(
            matches!(result, Err(SampleError::Cancelled { step: 2, steps: 5 })),
            "{seen}"
        );

        let cfg = SampleOptions {
            guidance_scale: 4.5,
            ..options
        };
        let err = sample(
            &data,
            noise.initial([1, 1, 1], &device),
            &cond,
            None,
            &noise,
            &cfg,
            |_| {},
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unconditional"), "{err}");
    }

    /// v = the conditioning's value (`sequence` [b, 1, 1]), whatever x and σ.
    struct ConstantVelocity;

    impl Denoiser for ConstantVelocity {
        fn velocity(&self, x: Tensor<4>, _sigma: f64, cond: &Conditioning) -> Tensor<4> {
            let b = x.dims()[0];
            // [b, 1, 1] → [b, 1, 1, 1]
            x.zeros_like() + cond.sequence.clone().reshape([b, 1, 1, 1])
        }
    }

    #[test]
    fn guidance_applies_only_inside_its_interval() {
        let device = Device::flex();
        let noise = NoiseSource::new(vec![3]);
        let constant = |value: f32| Conditioning {
            sequence: Tensor::from_data(TensorData::new(vec![value], [1, 1, 1]), &device),
            pooled: None,
            guidance: None,
        };
        let (cond, uncond) = (constant(1.0), constant(0.0));
        let schedule = Schedule::shifted(10, 1.0).unwrap();
        let w = 4.0;
        // Euler with v_u = 0 and v_c = 1: x moves by −Σ g_i·(σ_i − σ_{i+1}), g_i = w on guided steps.
        let moved = |interval: Option<(f64, f64)>| -> f64 {
            let options = SampleOptions {
                schedule: &schedule,
                kind: StepKind::Euler,
                plan: StepPlan::ode(10),
                guidance_scale: w,
                guidance_interval: interval,
                shared_seeds: None,
                record: false,
            };
            let x = noise.initial([1, 1, 1], &device);
            let start = x.clone().into_scalar::<f32>() as f64;
            let (end, _) = sample(
                &ConstantVelocity,
                x,
                &cond,
                Some(&uncond),
                &noise,
                &options,
                |_| {},
                None,
            )
            .unwrap();
            end.into_scalar::<f32>() as f64 - start
        };
        let expected = |lo: f64, hi: f64| -> f64 {
            -(0..10)
                .map(|i| {
                    let (s, next) = (schedule.sigmas[i], schedule.sigmas[i + 1]);
                    let g = if lo < s && s <= hi { w } else { 1.0 };
                    g * (s - next)
                })
                .sum::<f64>()
        };
        assert!((moved(None) + w).abs() < 1e-5, "{}", moved(None));
        assert!((moved(Some((0.0, 1.0))) + w).abs() < 1e-5);
        // no step inside: plain conditional sampling
        assert!((moved(Some((2.0, 3.0))) + 1.0).abs() < 1e-5);
        let partial = moved(Some((0.5, 1.0)));
        assert!((partial - expected(0.5, 1.0)).abs() < 1e-5, "{partial}");
        assert!(partial > -w + 0.5 && partial < -1.5, "{partial}");

        let bad = SampleOptions {
            schedule: &schedule,
            kind: StepKind::Euler,
            plan: StepPlan::ode(10),
            guidance_scale: w,
            guidance_interval: Some((0.6, 0.2)),
            shared_seeds: None,
            record: false,
        };
        let x = noise.initial([1, 1, 1], &device);
        let err = sample(
            &ConstantVelocity,
            x,
            &cond,
            Some(&uncond),
            &noise,
            &bad,
            |_| {},
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("guidance interval"), "{err}");
    }

    #[test]
    fn rollout_records_every_latent_and_log_prob() {
        let device = Device::flex();
        let data = GaussianData {
            mean: vec![0.5],
            std: vec![1.0],
        };
        let noise = NoiseSource::new(vec![1, 2]);
        let cond = Conditioning {
            sequence: Tensor::zeros([2, 1, 1], &device),
            pooled: None,
            guidance: None,
        };
        let schedule = Schedule::shifted(10, 3.0).unwrap();
        let plan = StepSelection::Window { start: 2, size: 3 }.plan(
            10,
            TrainingClock::default(),
            OffSelection::Deterministic,
        );
        let options = SampleOptions {
            guidance_interval: None,
            schedule: &schedule,
            kind: StepKind::FlowSde { noise_level: 0.7 },
            plan,
            guidance_scale: 1.0,
            shared_seeds: None,
            record: true,
        };
        let (_, rollout) = sample(
            &data,
            noise.initial([1, 1, 1], &device),
            &cond,
            None,
            &noise,
            &options,
            |_| {},
            None,
        )
        .unwrap();
        let rollout = rollout.unwrap();
        assert_eq!(rollout.latents.len(), 11);
        let stochastic: Vec<bool> = rollout.log_probs.iter().map(Option::is_some).collect();
        assert_eq!(
            stochastic,
            (0..10).map(|i| (2..5).contains(&i)).collect::<Vec<_>>()
        );
        // The recorded log-prob is recomputable from the stored latents (what training does).
        let i = 3;
        let v = data.velocity(rollout.latents[i].clone(), schedule.sigmas[i], &cond);
        let (mean, std) = step::policy_mean(
            options.kind,
            rollout.latents[i].clone(),
            v,
            schedule.sigmas[i],
            schedule.sigmas[i + 1],
            schedule.sigma_max(),
        );
        let again = step::log_prob(options.kind, rollout.latents[i + 1].clone(), mean, std);
        let stored = rollout.log_probs[i].clone().unwrap();
        let diff = (again - stored).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-5, "{diff}");
    }
}
