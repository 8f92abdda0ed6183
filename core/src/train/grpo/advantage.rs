//! Group-relative advantages (`flow_grpo/stat_tracking.py::PerPromptStatTracker`, type `grpo`)
//! and zero-advantage filtering (ALGORITHMS.md §1.5).

use rand::Rng;
use rand::seq::SliceRandom;

use super::config::{RewardAggregate, StdScope};
use crate::reward::Score;

/// Added to the std (Flow-GRPO's `+ 1e-4`).
pub const STD_EPS: f64 = 1e-4;

/// `A_i = (r_i − mean_{group(i)}) / (std + 1e-4)`, with the std over every reward of the epoch
/// (`Global`) or over the sample's own group. `group[i]` identifies sample i's prompt. With one
/// sample per group, tracking is off upstream: `A = (r − mean_all) / (std_all + 1e-4)`.
pub fn advantages(rewards: &[f64], group: &[usize], scope: StdScope) -> Vec<f64> {
    assert_eq!(rewards.len(), group.len());
    let stats = |values: &[f64]| -> (f64, f64) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        // numpy's np.std: population std.
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    };
    let (global_mean, global_std) = stats(rewards);
    let members = |g: usize| -> Vec<f64> {
        rewards
            .iter()
            .zip(group)
            .filter(|&(_, &gi)| gi == g)
            .map(|(&r, _)| r)
            .collect()
    };
    let singletons = group
        .iter()
        .all(|g| group.iter().filter(|h| *h == g).count() == 1);
    rewards
        .iter()
        .zip(group)
        .map(|(&r, &g)| {
            if singletons {
                return (r - global_mean) / (global_std + STD_EPS);
            }
            let (mean, std) = stats(&members(g));
            let std = match scope {
                StdScope::Global => global_std,
                StdScope::Group => std,
            };
            (r - mean) / (std + STD_EPS)
        })
        .collect()
}

/// Flow-GRPO's filtering: samples with zero advantage (a group whose rewards are all equal) teach
/// nothing and are dropped; dropped ones are re-added at random until the kept count is a
/// multiple of `batch`. Returns the kept sample indices in their original order.
pub fn keep_informative(advantages: &[f64], batch: usize, rng: &mut impl Rng) -> Vec<usize> {
    let (mut kept, mut dropped): (Vec<usize>, Vec<usize>) =
        (0..advantages.len()).partition(|&i| advantages[i] != 0.0);
    dropped.shuffle(rng);
    while kept.len() % batch != 0 || kept.is_empty() {
        match dropped.pop() {
            Some(i) => kept.push(i),
            None => break,
        }
    }
    kept.sort_unstable();
    kept
}

/// Several rewards' scores of an epoch turned into one advantage per usable sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Combined {
    /// Samples with a usable reward (every reward that judged them gave a finite score).
    pub valid: Vec<usize>,
    /// One per `valid` sample.
    pub advantages: Vec<f64>,
    /// The weighted sum of the judging rewards, one per `valid` sample (what curves show).
    pub rewards: Vec<f64>,
    /// Strict success: every judging reward's, one per `valid` sample.
    pub success: Vec<bool>,
}

/// Combines `scores[k][i]` (reward k on sample i; `None` where k does not judge i) with
/// `weights[k]`:
/// - `Sum` (Flow-GRPO's `multi_score` avg): r_i = Σ_k w_k·r_ki, then [`advantages`];
/// - `Advantages` (DanceGRPO / GDPO): [`advantages`] per reward over the samples it judged, then
///   A_i = Σ_k w_k·A_ki;
/// - `AdvantagesRestandardized` (RTDMD's `weight_advantages`): that sum re-standardised over
///   the epoch, (A − mean) / (std + 1e-4).
///
/// A sample no reward judges is an error naming it; a sample with a non-finite score is left out.
pub fn combine(
    scores: &[Vec<Option<Score>>],
    weights: &[f64],
    group: &[usize],
    scope: StdScope,
    aggregate: RewardAggregate,
) -> Result<Combined, usize> {
    assert_eq!(scores.len(), weights.len());
    let n = group.len();
    let mut valid = Vec::with_capacity(n);
    let mut rewards = Vec::with_capacity(n);
    let mut success = Vec::with_capacity(n);
    for i in 0..n {
        let judged: Vec<(Score, f64)> = scores
            .iter()
            .zip(weights)
            .filter_map(|(s, &w)| s[i].map(|s| (s, w)))
            .collect();
        if judged.is_empty() {
            return Err(i);
        }
        if judged.iter().any(|(s, _)| !s.reward.is_finite()) {
            continue;
        }
        valid.push(i);
        rewards.push(judged.iter().map(|(s, w)| w * s.reward as f64).sum());
        success.push(judged.iter().all(|(s, _)| s.success));
    }
    let valid_groups: Vec<usize> = valid.iter().map(|&i| group[i]).collect();
    let advantages_of_valid = match aggregate {
        RewardAggregate::Sum => advantages(&rewards, &valid_groups, scope),
        RewardAggregate::Advantages | RewardAggregate::AdvantagesRestandardized => {
            let mut total = vec![0.0; valid.len()];
            for (k, per_sample) in scores.iter().enumerate() {
                let members: Vec<usize> = (0..valid.len())
                    .filter(|&v| per_sample[valid[v]].is_some())
                    .collect();
                if members.is_empty() {
                    continue;
                }
                let values: Vec<f64> = members
                    .iter()
                    .map(|&v| per_sample[valid[v]].unwrap().reward as f64)
                    .collect();
                let groups: Vec<usize> = members.iter().map(|&v| valid_groups[v]).collect();
                for (&v, a) in members.iter().zip(advantages(&values, &groups, scope)) {
                    total[v] += weights[k] * a;
                }
            }
            if aggregate == RewardAggregate::AdvantagesRestandardized && !total.is_empty() {
                let m = total.len() as f64;
                let mean = total.iter().sum::<f64>() / m;
                let std = (total.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / m).sqrt();
                for a in &mut total {
                    *a = (*a - mean) / (std + STD_EPS);
                }
            }
            total
        }
    };
    Ok(Combined {
        valid,
        advantages: advantages_of_valid,
        rewards,
        success,
    })
}

/// DenseGRPO's per-step advantages: `returns[k][i]` is the reward of sample i's completion from
/// latent k; step j is credited ΔR_j = R_{j+1} − R_j, normalised per step over the group
/// ([`advantages`]). A sample with any non-finite ΔR gets 0 at every step.
pub fn step_advantages(
    returns: &std::collections::BTreeMap<usize, Vec<f64>>,
    trained: &[usize],
    group: &[usize],
    scope: StdScope,
) -> std::collections::BTreeMap<usize, Vec<f64>> {
    let n = group.len();
    let deltas: Vec<(usize, Vec<f64>)> = trained
        .iter()
        .map(|&j| {
            let delta = (0..n)
                .map(|i| returns[&(j + 1)][i] - returns[&j][i])
                .collect();
            (j, delta)
        })
        .collect();
    let members: Vec<usize> = (0..n)
        .filter(|&i| deltas.iter().all(|(_, d)| d[i].is_finite()))
        .collect();
    let groups: Vec<usize> = members.iter().map(|&i| group[i]).collect();
    deltas
        .into_iter()
        .map(|(j, delta)| {
            let mut full = vec![0.0; n];
            if !members.is_empty() {
                let values: Vec<f64> = members.iter().map(|&i| delta[i]).collect();
                for (&i, a) in members.iter().zip(advantages(&values, &groups, scope)) {
                    full[i] = a;
                }
            }
            (j, full)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn global_std_uses_every_reward_and_group_means() {
        // Two groups: [1, 0] and [1, 1]. Global std of [1, 0, 1, 1] = sqrt(3)/4.
        let a = advantages(&[1.0, 0.0, 1.0, 1.0], &[0, 0, 1, 1], StdScope::Global);
        let std = 3f64.sqrt() / 4.0 + STD_EPS;
        assert!((a[0] - 0.5 / std).abs() < 1e-12);
        assert!((a[1] + 0.5 / std).abs() < 1e-12);
        assert_eq!(&a[2..], &[0.0, 0.0]);
        let g = advantages(&[1.0, 0.0, 1.0, 1.0], &[0, 0, 1, 1], StdScope::Group);
        assert!((g[0] - 0.5 / (0.5 + STD_EPS)).abs() < 1e-12);
        assert_eq!(&g[2..], &[0.0, 0.0]);
    }

    #[test]
    fn one_sample_per_prompt_normalises_over_the_batch() {
        let a = advantages(&[2.0, 0.0], &[0, 1], StdScope::Group);
        assert!((a[0] - 1.0 / (1.0 + STD_EPS)).abs() < 1e-12);
    }

    #[test]
    fn filtering_keeps_informative_samples_and_fills_batches() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let a = [0.5, -0.5, 0.0, 0.0, 0.3, 0.0];
        let kept = keep_informative(&a, 2, &mut rng);
        assert!(kept.len() % 2 == 0 && [0, 1, 4].iter().all(|i| kept.contains(i)));
        assert_eq!(kept.len(), 4);
        let all_zero = keep_informative(&[0.0; 4], 2, &mut rng);
        assert_eq!(
            all_zero.len(),
            2,
            "an all-zero epoch still trains one batch (KL only)"
        );
    }

    fn score(reward: f32) -> Option<Score> {
        Some(Score {
            reward,
            success: reward == 1.0,
        })
    }

    #[test]
    fn one_reward_combines_to_plain_advantages() {
        let rewards = [1.0, 0.0, 0.5, 0.5];
        let groups = [0, 0, 1, 1];
        let scores = vec![rewards.iter().map(|&r| score(r as f32)).collect()];
        for aggregate in [RewardAggregate::Sum, RewardAggregate::Advantages] {
            let c = combine(&scores, &[1.0], &groups, StdScope::Global, aggregate).unwrap();
            assert_eq!(c.valid, [0, 1, 2, 3]);
            assert_eq!(
                c.advantages,
                advantages(&rewards, &groups, StdScope::Global)
            );
            assert_eq!(c.success, [true, false, false, false]);
        }
    }

    #[test]
    fn per_reward_normalisation_differs_from_the_weighted_sum() {
        // Reward 0 judges samples 0–3 (shapes), reward 1 samples 4–7 (digits) on a 10× scale.
        let groups = [0, 0, 1, 1, 2, 2, 3, 3];
        let shapes: Vec<_> = [1.0, 0.0, 1.0, 0.0]
            .iter()
            .map(|&r| score(r))
            .chain([None; 4])
            .collect();
        let digits: Vec<_> = [None; 4]
            .into_iter()
            .chain([10.0, 0.0, 10.0, 0.0].iter().map(|&r| score(r)))
            .collect();
        let scores = vec![shapes, digits];
        let sum = combine(
            &scores,
            &[1.0, 1.0],
            &groups,
            StdScope::Global,
            RewardAggregate::Sum,
        )
        .unwrap();
        // One global std (of 1, 0, 1, 0, 10, 0, 10, 0): the digits dominate.
        assert!(sum.advantages[4] > 5.0 * sum.advantages[0]);
        assert_eq!(sum.rewards, [1.0, 0.0, 1.0, 0.0, 10.0, 0.0, 10.0, 0.0]);
        let per = combine(
            &scores,
            &[1.0, 1.0],
            &groups,
            StdScope::Global,
            RewardAggregate::Advantages,
        )
        .unwrap();
        // Each reward normalised by its own std (0.5 and 5): equal weight.
        assert!(
            (per.advantages[0] - per.advantages[4]).abs() < 1e-3,
            "{:?}",
            per.advantages
        );
        let weighted = combine(
            &scores,
            &[2.0, 1.0],
            &groups,
            StdScope::Global,
            RewardAggregate::Advantages,
        )
        .unwrap();
        assert!((weighted.advantages[0] - 2.0 * per.advantages[0]).abs() < 1e-12);
        let re = combine(
            &scores,
            &[2.0, 1.0],
            &groups,
            StdScope::Global,
            RewardAggregate::AdvantagesRestandardized,
        )
        .unwrap();
        let m = re.advantages.iter().sum::<f64>() / 8.0;
        let std = (re.advantages.iter().map(|a| (a - m).powi(2)).sum::<f64>() / 8.0).sqrt();
        assert!(m.abs() < 1e-12 && (std - 1.0).abs() < 1e-3, "{m} {std}");
    }

    #[test]
    fn unjudged_samples_are_errors_and_non_finite_ones_are_left_out() {
        let scores = vec![vec![score(1.0), None, score(f32::NAN), score(0.0)]];
        assert_eq!(
            combine(
                &scores,
                &[1.0],
                &[0, 0, 1, 1],
                StdScope::Global,
                RewardAggregate::Sum
            ),
            Err(1)
        );
        let scores = vec![vec![score(1.0), score(0.5), score(f32::NAN), score(0.0)]];
        let c = combine(
            &scores,
            &[1.0],
            &[0, 0, 1, 1],
            StdScope::Global,
            RewardAggregate::Sum,
        )
        .unwrap();
        assert_eq!(c.valid, [0, 1, 3]);
    }

    #[test]
    fn dense_advantages_credit_the_step_that_changed_the_outcome() {
        // Two samples of one group: sample 0's completion jumps to 1 at step 1 (x1 → x2),
        // sample 1's at step 0; the last sample has a NaN completion and trains nothing.
        let returns = std::collections::BTreeMap::from([
            (0, vec![0.0, 0.0, 0.0]),
            (1, vec![0.0, 1.0, f64::NAN]),
            (2, vec![1.0, 1.0, 1.0]),
        ]);
        let a = step_advantages(&returns, &[0, 1], &[0, 0, 0], StdScope::Group);
        let std = 0.5 + STD_EPS;
        assert!((a[&0][1] - 0.5 / std).abs() < 1e-12 && (a[&0][0] + 0.5 / std).abs() < 1e-12);
        assert!((a[&1][0] - 0.5 / std).abs() < 1e-12 && (a[&1][1] + 0.5 / std).abs() < 1e-12);
        assert_eq!((a[&0][2], a[&1][2]), (0.0, 0.0));
    }
}
