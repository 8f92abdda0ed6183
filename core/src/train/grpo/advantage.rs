//! Group-relative advantages (`flow_grpo/stat_tracking.py::PerPromptStatTracker`, type `grpo`)
//! and zero-advantage filtering (ALGORITHMS.md §1.5).

use rand::Rng;
use rand::seq::SliceRandom;

use super::config::StdScope;

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
}
