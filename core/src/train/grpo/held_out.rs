//! The run's own rewards on the held-out images. The Shapes detector's GenEval report judges the
//! Shapes world only; a run on a real model scores with a reward server, so its held-out curve is
//! that server's verdicts (Flow-GRPO's evaluation calls the training reward on the test prompts).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::reward::{Reward, RewardError, Task};
use crate::world::render::Image;

/// One reward on the held-out images.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldOutReward {
    /// Mean score over the images it judged.
    pub mean: f64,
    /// Strict success rate overall: the mean of the per-tag rates, as GenEval's overall.
    pub success: f64,
    pub success_by_tag: BTreeMap<String, f64>,
    /// Images it judged (a reward may leave prompts of another task unjudged).
    pub judged: usize,
}

/// Accumulates each reward's verdicts batch by batch; the first failure is kept and reported by
/// [`HeldOutScorer::finish`] (later batches are skipped).
pub struct HeldOutScorer<'a> {
    rewards: Vec<(String, &'a dyn Reward)>,
    /// Per reward: score sum, judged count, and per tag (successes, judged).
    sums: Vec<(f64, usize, BTreeMap<String, (usize, usize)>)>,
    error: Option<RewardError>,
}

impl<'a> HeldOutScorer<'a> {
    /// Rewards named as they report themselves; a repeated name gets `#2`, `#3`, …
    pub fn new(rewards: impl IntoIterator<Item = &'a dyn Reward>) -> Self {
        let mut named: Vec<(String, &dyn Reward)> = Vec::new();
        for reward in rewards {
            let base = reward.name().to_string();
            let mut name = base.clone();
            let mut k = 1;
            while named.iter().any(|(n, _)| *n == name) {
                k += 1;
                name = format!("{base}#{k}");
            }
            named.push((name, reward));
        }
        let sums = vec![Default::default(); named.len()];
        Self {
            rewards: named,
            sums,
            error: None,
        }
    }

    /// Scores one batch: image `i` answers `tasks[i]`.
    pub fn score(&mut self, tasks: &[Task], images: &[Image]) {
        if self.error.is_some() {
            return;
        }
        for ((_, reward), (sum, judged, tags)) in self.rewards.iter().zip(&mut self.sums) {
            let scores = match reward.score(images, tasks) {
                Ok(scores) => scores,
                Err(e) => {
                    self.error = Some(e);
                    return;
                }
            };
            for (task, score) in tasks.iter().zip(scores) {
                let Some(score) = score else { continue };
                *sum += score.reward as f64;
                *judged += 1;
                let tag = tags.entry(task.tag().to_string()).or_default();
                tag.0 += score.success as usize;
                tag.1 += 1;
            }
        }
    }

    /// Each reward's held-out numbers by name, or the first scoring failure.
    pub fn finish(self) -> Result<BTreeMap<String, HeldOutReward>, RewardError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        Ok(self
            .rewards
            .into_iter()
            .zip(self.sums)
            .map(|((name, _), (sum, judged, tags))| {
                let success_by_tag: BTreeMap<String, f64> = tags
                    .into_iter()
                    .map(|(tag, (ok, n))| (tag, ok as f64 / n as f64))
                    .collect();
                let success = if success_by_tag.is_empty() {
                    0.0
                } else {
                    success_by_tag.values().sum::<f64>() / success_by_tag.len() as f64
                };
                let mean = if judged == 0 {
                    0.0
                } else {
                    sum / judged as f64
                };
                let held_out = HeldOutReward {
                    mean,
                    success,
                    success_by_tag,
                    judged,
                };
                (name, held_out)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::Score;
    use crate::world::prompt::{PromptSpec, parse_jsonl};

    /// Scores an image by its first pixel's red level; succeeds above one half; judges only
    /// prompts tagged `colors` when `colors_only`.
    struct Red {
        colors_only: bool,
    }

    impl Reward for Red {
        fn name(&self) -> &str {
            "red"
        }

        fn score(
            &self,
            images: &[Image],
            tasks: &[Task],
        ) -> Result<Vec<Option<Score>>, RewardError> {
            Ok(images
                .iter()
                .zip(tasks)
                .map(|(image, task)| {
                    let red = image.pixels[0][0] as f32 / 255.0;
                    (!self.colors_only || task.tag() == "colors").then_some(Score {
                        reward: red,
                        success: red > 0.5,
                    })
                })
                .collect())
        }
    }

    struct Failing;

    impl Reward for Failing {
        fn name(&self) -> &str {
            "server"
        }

        fn score(&self, _: &[Image], _: &[Task]) -> Result<Vec<Option<Score>>, RewardError> {
            Err(RewardError::Config("the server is down".into()))
        }
    }

    fn image(red: u8) -> Image {
        Image {
            width: 2,
            height: 2,
            pixels: vec![[red, 0, 0]; 4],
        }
    }

    fn tasks() -> Vec<Task> {
        specs().into_iter().map(Task::Shapes).collect()
    }

    fn specs() -> Vec<PromptSpec> {
        parse_jsonl(concat!(
            r#"{"tag":"colors","include":[{"class":"circle","count":1,"color":"red"}],"prompt":"a photo of a red circle"}"#,
            "\n",
            r#"{"tag":"single_object","include":[{"class":"square","count":1}],"prompt":"a photo of a square"}"#,
            "\n",
        ), "test")
        .unwrap()
    }

    #[test]
    fn each_reward_gets_its_mean_and_per_tag_success_under_its_own_name() {
        let (all, colors) = (Red { colors_only: false }, Red { colors_only: true });
        let mut scorer = HeldOutScorer::new([&all as &dyn Reward, &colors]);
        let tasks = tasks();
        // Two batches: colors 255 / 0, single_object 255 / 255.
        scorer.score(&tasks, &[image(255), image(255)]);
        scorer.score(&tasks, &[image(0), image(255)]);
        let got = scorer.finish().unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), ["red", "red#2"]);
        let red = &got["red"];
        assert_eq!(red.judged, 4);
        assert!((red.mean - 0.75).abs() < 1e-9, "{red:?}");
        assert_eq!(red.success_by_tag["colors"], 0.5);
        assert_eq!(red.success_by_tag["single_object"], 1.0);
        assert!(
            (red.success - 0.75).abs() < 1e-9,
            "the mean of the tag rates"
        );
        let colors = &got["red#2"];
        assert_eq!(colors.judged, 2);
        assert!((colors.mean - 0.5).abs() < 1e-9);
        assert_eq!(colors.success_by_tag.keys().collect::<Vec<_>>(), ["colors"]);
    }

    #[test]
    fn a_failing_reward_is_reported_once_scoring_ends() {
        let (red, failing) = (Red { colors_only: false }, Failing);
        let mut scorer = HeldOutScorer::new([&red as &dyn Reward, &failing]);
        scorer.score(&tasks()[..1], &[image(255)]);
        scorer.score(&tasks()[1..], &[image(255)]);
        let err = scorer.finish().unwrap_err().to_string();
        assert!(err.contains("the server is down"), "{err}");
    }
}
