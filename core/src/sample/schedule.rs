//! Noise schedules as pure f64 functions: sigma lists from σ = 1 (noise) down to 0 (data).
//!
//! Mirrors diffusers' `FlowMatchEulerDiscreteScheduler` (ECOSYSTEM.md §5.1) and the numbers in
//! ALGORITHMS.md §1.1: the training table is shifted statically, `set_timesteps` takes a linspace
//! between its ends and shifts **again** (the "double shift" Flow-GRPO's log-probs depend on).

use thiserror::Error;

/// Errors in schedule parameters, caught before any sampling starts.
#[derive(Debug, Error, PartialEq)]
pub enum ScheduleError {
    #[error("steps must be at least 1, found {0}")]
    NoSteps(usize),
    #[error("steps = {0} is beyond the supported maximum of {max}", max = MAX_STEPS)]
    TooManySteps(usize),
    #[error("shift must be a positive finite number, found {0}")]
    BadShift(f64),
    #[error(
        "explicit sigmas must start at or below 1, decrease strictly and stay above 0, found {0:?}"
    )]
    BadSigmas(Vec<f64>),
}

/// The largest step count accepted (diffusers' training table has 1000 entries).
pub const MAX_STEPS: usize = 1000;

/// diffusers' default training table length.
pub const NUM_TRAIN_TIMESTEPS: usize = 1000;

/// Static time shift `s·σ / (1 + (s − 1)·σ)` (SD3: s = 3).
pub fn static_shift(sigma: f64, shift: f64) -> f64 {
    shift * sigma / (1.0 + (shift - 1.0) * sigma)
}

/// RTDMD's generator timesteps (of [`NUM_TRAIN_TIMESTEPS`]): where a 4-step student samples.
pub const RTDMD_TIMESTEPS: [f64; 4] = [1000.0, 750.0, 500.0, 250.0];

/// σ of each timestep (of [`NUM_TRAIN_TIMESTEPS`]) through a model's static shift: a few-step
/// student's σ list (the bundled model, shift 1: RTDMD's → [1, 0.75, 0.5, 0.25]).
pub fn timestep_sigmas(timesteps: &[f64], shift: f64) -> Vec<f64> {
    timesteps
        .iter()
        .map(|t| static_shift(t / NUM_TRAIN_TIMESTEPS as f64, shift))
        .collect()
}

/// Exponential time shift `e^μ / (e^μ + (1/σ − 1))` used with dynamic shifting (FLUX).
pub fn exponential_time_shift(mu: f64, sigma: f64) -> f64 {
    if sigma <= 0.0 {
        return 0.0;
    }
    mu.exp() / (mu.exp() + (1.0 / sigma - 1.0))
}

/// FLUX.1's `calculate_shift`: mu linear in the image token count, from (256, 0.5) to
/// (4096, 1.15) with the scheduler defaults.
pub fn flux_mu(image_seq_len: usize) -> f64 {
    let (base_len, max_len, base_shift, max_shift) = (256.0, 4096.0, 0.5, 1.15);
    let slope = (max_shift - base_shift) / (max_len - base_len);
    slope * image_seq_len as f64 + (base_shift - slope * base_len)
}

/// FLUX.2's `compute_empirical_mu`: a fit in image token count and step count.
pub fn flux2_empirical_mu(image_seq_len: usize, steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let len = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * len + b2;
    }
    let m_200 = a2 * len + b2;
    let m_10 = a1 * len + b1;
    let a = (m_200 - m_10) / 190.0;
    let b = m_200 - 200.0 * a;
    a * steps as f64 + b
}

fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => (0..n)
            .map(|i| start + (end - start) * i as f64 / (n - 1) as f64)
            .collect(),
    }
}

fn check_steps(steps: usize) -> Result<(), ScheduleError> {
    match steps {
        0 => Err(ScheduleError::NoSteps(steps)),
        s if s > MAX_STEPS => Err(ScheduleError::TooManySteps(s)),
        _ => Ok(()),
    }
}

/// A sampling schedule: `steps + 1` sigmas, the last one 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub sigmas: Vec<f64>,
}

impl Schedule {
    /// diffusers' static-shift schedule (SD3 / SD3.5, `shift = 3.0`), double shift included.
    pub fn shifted(steps: usize, shift: f64) -> Result<Self, ScheduleError> {
        check_steps(steps)?;
        if !(shift.is_finite() && shift > 0.0) {
            return Err(ScheduleError::BadShift(shift));
        }
        let sigma_max = static_shift(1.0, shift);
        let sigma_min = static_shift(1.0 / NUM_TRAIN_TIMESTEPS as f64, shift);
        let mut sigmas: Vec<f64> = linspace(sigma_max, sigma_min, steps)
            .into_iter()
            .map(|t| static_shift(t, shift))
            .collect();
        sigmas.push(0.0);
        Ok(Self { sigmas })
    }

    /// FLUX-style dynamic shift: `linspace(1, 1/n, n)` mapped through the exponential time shift
    /// with `mu` (from [`flux_mu`] for FLUX.1, [`flux2_empirical_mu`] for FLUX.2-klein).
    pub fn dynamic(steps: usize, mu: f64) -> Result<Self, ScheduleError> {
        check_steps(steps)?;
        if !mu.is_finite() {
            return Err(ScheduleError::BadShift(mu));
        }
        let mut sigmas: Vec<f64> = linspace(1.0, 1.0 / steps as f64, steps)
            .into_iter()
            .map(|s| exponential_time_shift(mu, s))
            .collect();
        sigmas.push(0.0);
        Ok(Self { sigmas })
    }

    /// An explicit sigma list (e.g. RTDMD's 4-step `[1, 0.9, 0.75, 0.5]`); 0 is appended.
    pub fn explicit(sigmas: &[f64]) -> Result<Self, ScheduleError> {
        check_steps(sigmas.len())?;
        let valid = sigmas[0] <= 1.0
            && sigmas.iter().all(|s| s.is_finite() && *s > 0.0)
            && sigmas.windows(2).all(|w| w[1] < w[0]);
        if !valid {
            return Err(ScheduleError::BadSigmas(sigmas.to_vec()));
        }
        let mut sigmas = sigmas.to_vec();
        sigmas.push(0.0);
        Ok(Self { sigmas })
    }

    /// Number of denoising steps.
    pub fn steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    /// The model's timestep input for step `i` (`1000·σ_i`).
    pub fn timestep(&self, i: usize) -> f64 {
        self.sigmas[i] * NUM_TRAIN_TIMESTEPS as f64
    }

    /// `σ_max` as Flow-GRPO uses it for the σ = 1 substitution: `sigmas[1]`.
    pub fn sigma_max(&self) -> f64 {
        self.sigmas[1.min(self.sigmas.len() - 1)]
    }
}

/// Flow-GRPO's SDE std factor `g = a·sqrt(σ / (1 − σ*))`, σ* = `sigma_max` when σ = 1.
pub fn flow_sde_g(sigma: f64, sigma_max: f64, noise_level: f64) -> f64 {
    let sigma_star = if sigma == 1.0 { sigma_max } else { sigma };
    noise_level * (sigma / (1.0 - sigma_star)).sqrt()
}

/// Flow-GRPO's Gaussian policy std `g·sqrt(|dt|)` for the step σ → σ'.
pub fn flow_sde_std(sigma: f64, sigma_next: f64, sigma_max: f64, noise_level: f64) -> f64 {
    flow_sde_g(sigma, sigma_max, noise_level) * (sigma - sigma_next).sqrt()
}

/// CPS std `σ'·sin(a·π/2)` for the step σ → σ'.
pub fn cps_std(sigma_next: f64, noise_level: f64) -> f64 {
    sigma_next * (noise_level * std::f64::consts::FRAC_PI_2).sin()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts `found` equals a table value printed with `decimals` decimals, within half a unit
    /// of its last printed digit.
    fn assert_printed(found: f64, printed: &str, what: &str) {
        let decimals = printed.split('.').nth(1).map_or(0, str::len) as i32;
        let expected: f64 = printed.parse().unwrap();
        let tolerance = 0.5 * 10f64.powi(-decimals) + 1e-12;
        assert!(
            (found - expected).abs() <= tolerance,
            "{what}: found {found}, table {printed}"
        );
    }

    /// ALGORITHMS.md §1.1, N = 10, shift 3, a = 0.7 (CPS column: a = 0.8).
    const SIGMAS: [&str; 10] = [
        "1.0", "0.9601", "0.9133", "0.8577", "0.7904", "0.7073", "0.6022", "0.4649", "0.2780",
        "0.00893",
    ];
    const TIMESTEPS: [&str; 10] = [
        "1000", "960.13", "913.35", "857.69", "790.37", "707.28", "602.15", "464.88", "278.05",
        "8.93",
    ];
    const STD_DEV_T: [&str; 10] = [
        "3.506", "3.435", "2.273", "1.719", "1.359", "1.088", "0.861", "0.652", "0.434", "0.066",
    ];
    const GAUSSIAN_STD: [&str; 10] = [
        "0.700", "0.743", "0.536", "0.446", "0.392", "0.353", "0.319", "0.282", "0.225", "0.0063",
    ];
    const CPS_STD: [&str; 10] = [
        "0.913", "0.869", "0.816", "0.752", "0.673", "0.573", "0.442", "0.264", "0.0085", "0",
    ];

    #[test]
    fn shifted_schedule_matches_flow_grpo_table() {
        let schedule = Schedule::shifted(10, 3.0).unwrap();
        assert_eq!(schedule.sigmas.len(), 11);
        assert_eq!(schedule.sigmas[10], 0.0);
        for i in 0..10 {
            assert_printed(schedule.sigmas[i], SIGMAS[i], &format!("sigma[{i}]"));
            assert_printed(
                schedule.timestep(i),
                TIMESTEPS[i],
                &format!("timestep[{i}]"),
            );
        }
    }

    #[test]
    fn sde_and_cps_std_match_flow_grpo_table() {
        let s = Schedule::shifted(10, 3.0).unwrap();
        for i in 0..10 {
            let (sigma, next) = (s.sigmas[i], s.sigmas[i + 1]);
            assert_printed(
                flow_sde_g(sigma, s.sigma_max(), 0.7),
                STD_DEV_T[i],
                &format!("g[{i}]"),
            );
            assert_printed(
                flow_sde_std(sigma, next, s.sigma_max(), 0.7),
                GAUSSIAN_STD[i],
                &format!("std[{i}]"),
            );
            assert_printed(cps_std(next, 0.8), CPS_STD[i], &format!("cps std[{i}]"));
        }
    }

    #[test]
    fn bad_parameters_are_rejected_up_front() {
        assert_eq!(Schedule::shifted(0, 3.0), Err(ScheduleError::NoSteps(0)));
        assert_eq!(
            Schedule::shifted(5000, 3.0),
            Err(ScheduleError::TooManySteps(5000))
        );
        assert!(matches!(
            Schedule::shifted(10, f64::NAN),
            Err(ScheduleError::BadShift(_))
        ));
        assert!(matches!(
            Schedule::shifted(10, -1.0),
            Err(ScheduleError::BadShift(_))
        ));
        assert!(Schedule::explicit(&[1.0, 0.9, 0.75, 0.5]).is_ok());
        assert!(Schedule::explicit(&[1.0, 0.9, 0.95]).is_err());
        assert!(Schedule::explicit(&[1.2, 0.5]).is_err());
        assert!(Schedule::explicit(&[]).is_err());
    }

    #[test]
    fn flux_dynamic_schedules_follow_their_fits() {
        // 1024² FLUX.1: 4096 tokens → mu = 1.15; 256 tokens → 0.5.
        assert!((flux_mu(4096) - 1.15).abs() < 1e-12);
        assert!((flux_mu(256) - 0.5).abs() < 1e-12);
        // FLUX.2: above 4300 tokens the step count does not matter; at 200 steps the two fits meet.
        assert_eq!(flux2_empirical_mu(5000, 4), flux2_empirical_mu(5000, 50));
        assert!((flux2_empirical_mu(1024, 200) - (0.00016927 * 1024.0 + 0.45666666)).abs() < 1e-9);
        assert!(
            (flux2_empirical_mu(1024, 10) - (8.73809524e-05 * 1024.0 + 1.89833333)).abs() < 1e-9
        );
        let s = Schedule::dynamic(4, flux_mu(4096)).unwrap();
        assert_eq!(s.sigmas.len(), 5);
        assert_eq!(s.sigmas[0], 1.0);
        // σ = 0.25 shifted with mu 1.15: e^1.15 / (e^1.15 + 3)
        let e = 1.15f64.exp();
        assert!((s.sigmas[3] - e / (e + 3.0)).abs() < 1e-12);
    }

    #[test]
    fn time_shifts_fix_the_ends() {
        assert_eq!(static_shift(1.0, 3.0), 1.0);
        assert_eq!(static_shift(0.0, 3.0), 0.0);
        assert!((exponential_time_shift(0.0, 0.25) - 0.25).abs() < 1e-12);
        assert!((exponential_time_shift(1.15, 1.0) - 1.0).abs() < 1e-12);
    }
}
