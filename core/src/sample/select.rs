//! Which sampler steps are stochastic and which are trained.
//!
//! Flow-GRPO adds noise at every step and trains all but the last (ALGORITHMS.md §1.6);
//! Flow-GRPO-Fast uses a random SDE window (§1.8); MixGRPO slides a window forward as training
//! progresses and rolls back (§2.2); Flow-Factory draws a random subset per epoch (§2.3); RTDMD
//! draws a seeded subset and gives the other stochastic steps prompt-seeded shared noise (§3.3).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// RTDMD's seed offset for its step-subset RNG (`seed + epoch + 104729`).
pub const RTDMD_SEED_OFFSET: u64 = 104_729;

/// The rule that picks the trained steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum StepSelection {
    /// Every step but the last (Flow-GRPO: `timestep_fraction = 0.99`).
    AllButLast,
    /// A fixed window `[start, start + size)`.
    Window { start: usize, size: usize },
    /// A window of `size` whose start is drawn uniformly from `lo..=hi − size` once per
    /// iteration, shared by the whole batch (Flow-GRPO-Fast: size 3 in (0, steps/2)).
    RandomWindow { size: usize, lo: usize, hi: usize },
    /// MixGRPO's progressive window: starts at 0, moves by `shift` every `iters_per_shift`
    /// optimizer iterations; past `max_start` it rolls back to 0 (or stays, without roll-back).
    /// A window reaching past the last step is cut there (MixGRPO: `max_start = steps − 2`).
    Progressive {
        size: usize,
        iters_per_shift: usize,
        shift: usize,
        max_start: usize,
        roll_back: bool,
    },
    /// `count` steps drawn from `candidates` per epoch by an RNG seeded with
    /// `seed + epoch + seed_offset` (Flow-Factory: offset 0; RTDMD: 104729).
    RandomSubset {
        candidates: Vec<usize>,
        count: usize,
        seed_offset: u64,
    },
}

/// What the steps outside the selection do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OffSelection {
    /// Deterministic (ODE) steps.
    Deterministic,
    /// Stochastic with each sample's own noise (Flow-GRPO's untrained last step).
    Stochastic,
    /// Stochastic with noise seeded by the prompt, so a group shares it (RTDMD).
    SharedNoise,
}

/// What every step of one rollout does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// Whether step i adds noise.
    pub stochastic: Vec<bool>,
    /// Whether step i is trained (its log-prob enters the loss).
    pub trained: Vec<bool>,
    /// Whether step i's noise is shared by a prompt's group (seeded by the prompt).
    pub shared_noise: Vec<bool>,
}

impl StepPlan {
    /// Every step deterministic: ODE sampling (evaluation).
    pub fn ode(steps: usize) -> Self {
        Self {
            stochastic: vec![false; steps],
            trained: vec![false; steps],
            shared_noise: vec![false; steps],
        }
    }

    /// Indices of the trained steps.
    pub fn trained_steps(&self) -> Vec<usize> {
        (0..self.trained.len())
            .filter(|&i| self.trained[i])
            .collect()
    }
}

/// Where in training a rollout happens; the random selections are functions of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrainingClock {
    pub seed: u64,
    pub epoch: u64,
    /// Optimizer iterations done so far (MixGRPO's window position).
    pub iteration: u64,
}

impl StepSelection {
    /// The default for steps outside this selection, as each method does it.
    pub fn default_off_selection(&self) -> OffSelection {
        match self {
            Self::AllButLast => OffSelection::Stochastic,
            Self::Window { .. } | Self::RandomWindow { .. } | Self::Progressive { .. } => {
                OffSelection::Deterministic
            }
            Self::RandomSubset { seed_offset, .. } if *seed_offset == RTDMD_SEED_OFFSET => {
                OffSelection::SharedNoise
            }
            Self::RandomSubset { .. } => OffSelection::Deterministic,
        }
    }

    /// Checks the selection against a schedule of `steps` steps.
    pub fn validate(&self, steps: usize) -> Result<(), String> {
        let fits = |end: usize, what: &str| {
            if end <= steps {
                Ok(())
            } else {
                Err(format!(
                    "{what} ends at step {end}, beyond the {steps} steps of the schedule"
                ))
            }
        };
        match self {
            Self::AllButLast if steps < 2 => Err("all-but-last needs at least 2 steps".into()),
            Self::AllButLast => Ok(()),
            Self::Window { size: 0, .. }
            | Self::RandomWindow { size: 0, .. }
            | Self::Progressive { size: 0, .. } => Err("window size must be at least 1".into()),
            Self::Window { start, size } => fits(start + size, "window"),
            Self::RandomWindow { size, lo, hi } => {
                if lo + size > *hi {
                    Err(format!(
                        "random window of size {size} does not fit in [{lo}, {hi})"
                    ))
                } else {
                    fits(*hi, "random window range")
                }
            }
            Self::Progressive {
                iters_per_shift,
                shift,
                max_start,
                ..
            } => {
                if *iters_per_shift == 0 || *shift == 0 {
                    Err("progressive window needs iters_per_shift ≥ 1 and shift ≥ 1".into())
                } else if *max_start >= steps {
                    Err(format!(
                        "progressive window max_start {max_start} is outside the {steps} steps"
                    ))
                } else {
                    Ok(())
                }
            }
            Self::RandomSubset {
                candidates, count, ..
            } => {
                if *count == 0 || *count > candidates.len() {
                    Err(format!(
                        "cannot draw {count} steps from {} candidates",
                        candidates.len()
                    ))
                } else if let Some(bad) = candidates.iter().find(|&&c| c >= steps) {
                    Err(format!(
                        "candidate step {bad} is outside the {steps} steps of the schedule"
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Every step this selection can ever train on a schedule of `steps` steps, ascending.
    pub fn reachable(&self, steps: usize) -> Vec<usize> {
        let mut reach = match self {
            Self::AllButLast => (0..steps.saturating_sub(1)).collect(),
            Self::Window { start, size } => (*start..start + size).collect(),
            Self::RandomWindow { lo, hi, .. } => (*lo..*hi).collect(),
            Self::Progressive {
                size, max_start, ..
            } => (0..max_start + size).collect(),
            Self::RandomSubset { candidates, .. } => candidates.clone(),
        };
        reach.retain(|&i| i < steps);
        reach.sort_unstable();
        reach.dedup();
        reach
    }

    /// The trained steps for one rollout.
    pub fn trained(&self, steps: usize, clock: TrainingClock) -> Vec<bool> {
        let window = |start: usize, size: usize| {
            (0..steps).map(|i| i >= start && i < start + size).collect()
        };
        match self {
            Self::AllButLast => (0..steps).map(|i| i + 1 < steps).collect(),
            Self::Window { start, size } => window(*start, *size),
            Self::RandomWindow { size, lo, hi } => {
                let mut rng = ChaCha8Rng::seed_from_u64(
                    clock.seed ^ clock.iteration.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                window(rng.random_range(*lo..=hi - size), *size)
            }
            Self::Progressive {
                size,
                iters_per_shift,
                shift,
                max_start,
                roll_back,
            } => {
                let moved = (clock.iteration as usize / iters_per_shift) * shift;
                let start = if *roll_back {
                    moved % (max_start + 1)
                } else {
                    moved.min(*max_start)
                };
                window(start, *size)
            }
            Self::RandomSubset {
                candidates,
                count,
                seed_offset,
            } => {
                let mut rng = ChaCha8Rng::seed_from_u64(clock.seed + clock.epoch + seed_offset);
                let mut pool = candidates.clone();
                let mut chosen = vec![false; steps];
                for _ in 0..*count {
                    let pick = rng.random_range(0..pool.len());
                    chosen[pool.swap_remove(pick)] = true;
                }
                chosen
            }
        }
    }

    /// The full plan of one rollout.
    pub fn plan(&self, steps: usize, clock: TrainingClock, off: OffSelection) -> StepPlan {
        let trained = self.trained(steps, clock);
        let stochastic = trained
            .iter()
            .map(|&t| t || off != OffSelection::Deterministic)
            .collect();
        let shared_noise = trained
            .iter()
            .map(|&t| !t && off == OffSelection::SharedNoise)
            .collect();
        StepPlan {
            stochastic,
            trained,
            shared_noise,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(epoch: u64, iteration: u64) -> TrainingClock {
        TrainingClock {
            seed: 42,
            epoch,
            iteration,
        }
    }

    #[test]
    fn flow_grpo_trains_nine_of_ten_steps_with_noise_everywhere() {
        let plan = StepSelection::AllButLast.plan(10, clock(0, 0), OffSelection::Stochastic);
        assert_eq!(plan.trained_steps(), (0..9).collect::<Vec<_>>());
        assert!(plan.stochastic.iter().all(|&s| s));
    }

    #[test]
    fn random_window_stays_in_range_and_covers_it() {
        let selection = StepSelection::RandomWindow {
            size: 3,
            lo: 0,
            hi: 5,
        };
        selection.validate(10).unwrap();
        let mut starts = std::collections::BTreeSet::new();
        for iteration in 0..200 {
            let plan = selection.plan(10, clock(0, iteration), OffSelection::Deterministic);
            let trained = plan.trained_steps();
            assert_eq!(trained.len(), 3);
            assert!(trained[0] <= 2 && trained[2] == trained[0] + 2);
            assert_eq!(plan.stochastic, plan.trained, "ODE outside the window");
            starts.insert(trained[0]);
        }
        assert_eq!(starts, [0, 1, 2].into());
    }

    #[test]
    fn progressive_window_moves_and_rolls_back() {
        let selection = StepSelection::Progressive {
            size: 4,
            iters_per_shift: 25,
            shift: 1,
            max_start: 23,
            roll_back: true,
        };
        selection.validate(25).unwrap();
        let start = |iteration| {
            selection
                .trained(25, clock(0, iteration))
                .iter()
                .position(|&t| t)
                .unwrap()
        };
        assert_eq!(start(0), 0);
        assert_eq!(start(24), 0);
        assert_eq!(start(25), 1);
        assert_eq!(start(25 * 23), 23);
        assert_eq!(start(25 * 24), 0, "rolls back past max_start");
        let clamped = StepSelection::Progressive {
            size: 4,
            iters_per_shift: 25,
            shift: 1,
            max_start: 23,
            roll_back: false,
        };
        assert_eq!(
            clamped
                .trained(25, clock(0, 25 * 30))
                .iter()
                .position(|&t| t),
            Some(23)
        );
    }

    #[test]
    fn seeded_subset_is_deterministic_per_epoch_and_shares_noise_elsewhere() {
        let selection = StepSelection::RandomSubset {
            candidates: vec![0, 1, 2],
            count: 2,
            seed_offset: RTDMD_SEED_OFFSET,
        };
        selection.validate(4).unwrap();
        assert_eq!(selection.default_off_selection(), OffSelection::SharedNoise);
        let a = selection.plan(4, clock(3, 0), OffSelection::SharedNoise);
        let b = selection.plan(4, clock(3, 99), OffSelection::SharedNoise);
        assert_eq!(a, b, "depends on seed and epoch only");
        assert_eq!(a.trained_steps().len(), 2);
        assert!(a.trained_steps().iter().all(|&s| s < 3));
        for i in 0..4 {
            assert_eq!(a.shared_noise[i], !a.trained[i]);
        }
        let differs = (0..20).any(|e| selection.trained(4, clock(e, 0)) != a.trained);
        assert!(differs, "different epochs draw different subsets");
    }

    #[test]
    fn reachable_steps_are_exactly_the_union_of_every_draw() {
        let selections = [
            StepSelection::AllButLast,
            StepSelection::Window { start: 2, size: 3 },
            StepSelection::RandomWindow {
                size: 3,
                lo: 1,
                hi: 7,
            },
            StepSelection::Progressive {
                size: 3,
                iters_per_shift: 2,
                shift: 1,
                max_start: 8,
                roll_back: true,
            },
            StepSelection::RandomSubset {
                candidates: vec![6, 1, 3],
                count: 2,
                seed_offset: 0,
            },
        ];
        for selection in selections {
            selection.validate(10).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            for k in 0..400 {
                seen.extend(
                    selection
                        .plan(10, clock(k, k), OffSelection::Deterministic)
                        .trained_steps(),
                );
            }
            let seen: Vec<usize> = seen.into_iter().collect();
            assert_eq!(selection.reachable(10), seen, "{selection:?}");
        }
    }

    #[test]
    fn selections_outside_the_schedule_are_rejected() {
        assert!(
            StepSelection::Window { start: 8, size: 3 }
                .validate(10)
                .is_err()
        );
        assert!(
            StepSelection::RandomWindow {
                size: 3,
                lo: 0,
                hi: 2
            }
            .validate(10)
            .is_err()
        );
        assert!(
            StepSelection::RandomSubset {
                candidates: vec![1, 12],
                count: 1,
                seed_offset: 0
            }
            .validate(10)
            .is_err()
        );
        assert!(
            StepSelection::RandomSubset {
                candidates: vec![1],
                count: 2,
                seed_offset: 0
            }
            .validate(10)
            .is_err()
        );
        assert!(StepSelection::AllButLast.validate(1).is_err());
        assert!(
            StepSelection::Window { start: 0, size: 0 }
                .validate(10)
                .is_err()
        );
    }
}
