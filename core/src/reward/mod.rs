//! Rewards: one trait, and the Shapes world's exact rewards — the GenEval compositional score
//! (Flow-GRPO's partial-credit `scores`, with strict correctness alongside) and the OCR reward of
//! the digits task. Trainers see only [`Reward`]; what a prompt asks for travels as a [`Task`].

pub mod boxes;
// Trains with autodiff and draws scenes as pretraining does: native builds only.
#[cfg(feature = "native")]
pub mod clip_score;
pub mod http;
pub mod remote;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::world::dense::score_components;
use crate::world::detect::{Component, Detections, detect_with_components};
use crate::world::digits;
use crate::world::geneval::evaluate;
use crate::world::prompt::PromptSpec;
use crate::world::render::Image;
use boxes::{DefectBox, defect_boxes};

/// What one training prompt asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum Task {
    /// A GenEval metadata line.
    Shapes(PromptSpec),
    /// A text-rendering prompt (`the number "37"`); the target is its first quoted text.
    Digits { prompt: String },
}

impl From<PromptSpec> for Task {
    fn from(spec: PromptSpec) -> Self {
        Self::Shapes(spec)
    }
}

impl Task {
    pub fn prompt(&self) -> &str {
        match self {
            Self::Shapes(spec) => &spec.prompt,
            Self::Digits { prompt } => prompt,
        }
    }

    /// The GenEval tag, or `digits`.
    pub fn tag(&self) -> &str {
        match self {
            Self::Shapes(spec) => &spec.tag,
            Self::Digits { .. } => "digits",
        }
    }
}

/// Scores of one image.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// What drives advantages.
    pub reward: f32,
    /// Strict success (GenEval image correctness; exact OCR read), for accuracy curves.
    pub success: bool,
}

/// Why a batch could not be scored (a scorer in this process cannot fail; a remote one can).
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("reward server {url}: {message} (gave up after {attempts} attempt(s), {seconds:.1} s)")]
    Remote {
        url: String,
        attempts: usize,
        seconds: f64,
        message: String,
    },
    #[error("{0}")]
    Config(String),
}

/// A reward function over generated images.
pub trait Reward: Send + Sync {
    fn name(&self) -> &str;

    /// One score per image; `tasks[i]` describes image `i`. A task the reward does not judge
    /// scores `None` (multi-reward training masks it, as Flow-GRPO's −10 sentinel does).
    fn score(&self, images: &[Image], tasks: &[Task]) -> Result<Vec<Option<Score>>, RewardError>;

    /// Scores and BoxFlow's defect boxes per image (spatial training). Rewards that cannot
    /// localise defects give no boxes.
    fn score_with_boxes(&self, images: &[Image], tasks: &[Task]) -> Result<Scored, RewardError> {
        Ok(Scored {
            scores: self.score(images, tasks)?,
            boxes: vec![Vec::new(); images.len()],
        })
    }
}

/// Scores with defect boxes, one entry per image.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scored {
    pub scores: Vec<Option<Score>>,
    pub boxes: Vec<Vec<DefectBox>>,
}

/// Each task scored by its own exact reward: GenEval for Shapes prompts, OCR for digits.
pub struct ByTaskReward;

impl Reward for ByTaskReward {
    fn name(&self) -> &str {
        "geneval+ocr"
    }

    fn score(&self, images: &[Image], tasks: &[Task]) -> Result<Vec<Option<Score>>, RewardError> {
        let shapes = ShapesReward.score(images, tasks)?;
        let ocr = OcrReward.score(images, tasks)?;
        Ok(shapes.into_iter().zip(ocr).map(|(s, o)| s.or(o)).collect())
    }

    fn score_with_boxes(&self, images: &[Image], tasks: &[Task]) -> Result<Scored, RewardError> {
        let shapes = ShapesReward.score_with_boxes(images, tasks)?;
        let ocr = OcrReward.score(images, tasks)?;
        Ok(Scored {
            scores: shapes
                .scores
                .into_iter()
                .zip(ocr)
                .map(|(s, o)| s.or(o))
                .collect(),
            boxes: shapes.boxes,
        })
    }
}

/// Flow-GRPO's GenEval training reward on the Shapes detector.
pub struct ShapesReward;

impl Reward for ShapesReward {
    fn name(&self) -> &str {
        "geneval"
    }

    fn score(&self, images: &[Image], tasks: &[Task]) -> Result<Vec<Option<Score>>, RewardError> {
        Ok(judge_shapes(images, tasks, false, geneval_score).scores)
    }

    fn score_with_boxes(&self, images: &[Image], tasks: &[Task]) -> Result<Scored, RewardError> {
        Ok(judge_shapes(images, tasks, true, geneval_score))
    }
}

/// One component pass per Shapes image gives its score (from the prompt, the measured components,
/// the named detections and the pixel count) and, when asked, BoxFlow's defect boxes; other tasks
/// get no score.
fn judge_shapes(
    images: &[Image],
    tasks: &[Task],
    with_boxes: bool,
    score: impl Fn(&PromptSpec, &[Component], &Detections, f32) -> Score,
) -> Scored {
    let mut scored = Scored::default();
    for (image, task) in images.iter().zip(tasks) {
        let (score, boxes) = match task {
            Task::Shapes(spec) => {
                let (found, named) = detect_with_components(image);
                let total = (image.width * image.height) as f32;
                let boxes = if with_boxes {
                    defect_boxes(spec, &named, (image.width, image.height))
                } else {
                    Vec::new()
                };
                (Some(score(spec, &found, &named, total)), boxes)
            }
            Task::Digits { .. } => (None, Vec::new()),
        };
        scored.scores.push(score);
        scored.boxes.push(boxes);
    }
    scored
}

/// Flow-GRPO's partial-credit score and GenEval's verdict.
fn geneval_score(spec: &PromptSpec, _: &[Component], named: &Detections, _: f32) -> Score {
    let verdict = evaluate(spec, &named.objects);
    Score {
        reward: verdict.score,
        success: verdict.correct,
    }
}

/// The dense score; success stays GenEval's verdict.
fn dense_score(spec: &PromptSpec, found: &[Component], named: &Detections, total: f32) -> Score {
    Score {
        reward: score_components(spec, found, total),
        success: evaluate(spec, &named.objects).correct,
    }
}

/// The dense compositional score ([`crate::world::dense`]) as a reward; success stays GenEval's
/// strict image correctness, so accuracy curves mean the same under either reward.
pub struct DenseShapesReward;

impl Reward for DenseShapesReward {
    fn name(&self) -> &str {
        "geneval_dense"
    }

    fn score(&self, images: &[Image], tasks: &[Task]) -> Result<Vec<Option<Score>>, RewardError> {
        Ok(judge_shapes(images, tasks, false, dense_score).scores)
    }

    fn score_with_boxes(&self, images: &[Image], tasks: &[Task]) -> Result<Scored, RewardError> {
        Ok(judge_shapes(images, tasks, true, dense_score))
    }
}

/// Flow-GRPO's OCR reward on the digits task's template OCR.
pub struct OcrReward;

impl Reward for OcrReward {
    fn name(&self) -> &str {
        "ocr"
    }

    fn score(&self, images: &[Image], tasks: &[Task]) -> Result<Vec<Option<Score>>, RewardError> {
        Ok(images
            .iter()
            .zip(tasks)
            .map(|(image, task)| match task {
                Task::Digits { prompt } => {
                    let read = digits::read_digits(image);
                    let reward = digits::ocr_reward(prompt, &read);
                    Some(Score {
                        reward,
                        success: reward == 1.0,
                    })
                }
                Task::Shapes(_) => None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::compose::scene_for;
    use crate::world::prompt::random_spec;
    use crate::world::render::render;
    use rand::SeedableRng;

    #[test]
    fn rewards_judge_their_own_task_only() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let spec = random_spec(&mut rng, "color_attr");
        let scene = scene_for(&mut rng, &spec).unwrap();
        let shapes_image = render(&scene, 64);
        let digits_image = digits::render_number(&mut rng, "37", 64);
        let tasks = [
            Task::Shapes(spec),
            Task::Digits {
                prompt: digits::prompt_for("37"),
            },
        ];
        let images = [shapes_image, digits_image];
        let shapes = ShapesReward.score(&images, &tasks).unwrap();
        assert_eq!(
            shapes[0],
            Some(Score {
                reward: 1.0,
                success: true
            })
        );
        assert_eq!(shapes[1], None);
        let ocr = OcrReward.score(&images, &tasks).unwrap();
        assert_eq!(ocr[0], None);
        assert_eq!(
            ocr[1],
            Some(Score {
                reward: 1.0,
                success: true
            })
        );
        // The wrong image for the prompt scores lower.
        let swapped = ShapesReward
            .score(&[images[1].clone()], &tasks[..1])
            .unwrap();
        assert!(swapped[0].unwrap().reward < 1.0 && !swapped[0].unwrap().success);
        let dense = DenseShapesReward.score(&images, &tasks).unwrap();
        assert!(dense[0].unwrap().reward > 0.85 && dense[0].unwrap().success);
        assert_eq!(dense[1], None);
        let both = ByTaskReward.score(&images, &tasks).unwrap();
        assert_eq!(both, vec![shapes[0], ocr[1]]);
        // Both Shapes rewards localise the same defects (spatial training): none on the right
        // image, some on the wrong one.
        let right = DenseShapesReward.score_with_boxes(&images, &tasks).unwrap();
        assert!(right.boxes.iter().all(Vec::is_empty), "{:?}", right.boxes);
        let wrong = (&[images[1].clone()], &tasks[..1]);
        let dense = DenseShapesReward
            .score_with_boxes(wrong.0, wrong.1)
            .unwrap();
        let strict = ShapesReward.score_with_boxes(wrong.0, wrong.1).unwrap();
        assert!(!dense.boxes[0].is_empty());
        assert_eq!(dense.boxes, strict.boxes);
    }
}
