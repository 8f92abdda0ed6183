//! GenEval scoring of Shapes-world images: a [`PromptSpec`] against the detector's output.
//!
//! Two verdicts per image, both as in the reference code (ALGORITHMS.md §6 and §1.9):
//! - `correct`: GenEval's `evaluate` (djghosh13/geneval `evaluation/evaluate_images.py`): per
//!   include clause the top-`count` detections of the class (by confidence) must exist, all have
//!   the colour, and stand in the relation to every object of the target clause; exclude clauses
//!   fail at ≥ `count` detections;
//! - `score` and `strict_correct`: Flow-GRPO's partial-credit training reward
//!   (`reward_server/gen_eval.py:evaluate_reward`), exact counts, exclude ignored, quirks kept.
//!
//! Detections are taken as given (the detector already dropped what it is not confident about);
//! per class at most [`MAX_PER_CLASS`], highest confidence first, as GenEval's detector keeps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::detect::{Detection, detect};
use super::prompt::{PromptSpec, TAGS};
use super::render::Image;
use super::scene::{Color, Shape};

/// GenEval keeps at most 16 detections per class.
pub const MAX_PER_CLASS: usize = 16;
/// GenEval's `POSITION_THRESHOLD`: each axis offset shrinks by this times the summed box sizes.
pub const POSITION_SHRINK: f32 = 0.1;

/// The verdicts on one image.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// GenEval's image correctness.
    pub correct: bool,
    /// Flow-GRPO's strict correctness: every include clause met with exact counts.
    pub strict_correct: bool,
    /// Flow-GRPO's partial-credit score (mean of the clause terms; can be negative).
    pub score: f32,
}

/// Detects the shapes in `image` and scores them against `spec`.
pub fn evaluate_image(spec: &PromptSpec, image: &Image) -> Verdict {
    evaluate(spec, &detect(image).objects)
}

/// Scores `detections` against `spec` (any spec: unknown classes simply find nothing).
pub fn evaluate(spec: &PromptSpec, detections: &[Detection]) -> Verdict {
    let by_class = group_by_class(detections);
    let found = |class: &str| -> &[&Detection] {
        Shape::parse(class)
            .and_then(|s| by_class.get(&s))
            .map_or(&[], |v| v.as_slice())
    };
    let (strict_correct, score) = flow_grpo_score(spec, &found);
    Verdict {
        correct: geneval_correct(spec, &found),
        strict_correct,
        score,
    }
}

/// Detections per class, highest confidence first, at most [`MAX_PER_CLASS`].
fn group_by_class(detections: &[Detection]) -> BTreeMap<Shape, Vec<&Detection>> {
    let mut by_class: BTreeMap<Shape, Vec<&Detection>> = BTreeMap::new();
    for d in detections {
        by_class.entry(d.shape).or_default().push(d);
    }
    for list in by_class.values_mut() {
        list.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
        list.truncate(MAX_PER_CLASS);
    }
    by_class
}

fn has_color(d: &Detection, color: &str) -> bool {
    Color::parse(color) == Some(d.color)
}

/// Whether every object of `group` stands in `relation` to every object of `targets`.
fn all_related(group: &[&Detection], relation: &str, targets: &[&Detection]) -> bool {
    group.iter().all(|a| {
        targets
            .iter()
            .all(|b| relative_position(a.bbox, b.bbox).contains(&relation))
    })
}

/// GenEval's `evaluate`: strict per-image correctness.
fn geneval_correct<'a>(spec: &PromptSpec, found: &dyn Fn(&str) -> &'a [&'a Detection]) -> bool {
    let mut correct = true;
    // The matched objects of each include clause, `None` where the clause failed.
    let mut matched_groups: Vec<Option<&[&Detection]>> = Vec::new();
    for clause in &spec.include {
        let all = found(&clause.class);
        let top = &all[..clause.count.min(all.len())];
        let mut matched = top.len() >= clause.count;
        if matched {
            if let Some(color) = &clause.color {
                matched = top.iter().filter(|d| has_color(d, color)).count() >= clause.count;
            }
            if let (true, Some((relation, target))) = (matched, &clause.position) {
                matched = match matched_groups.get(*target) {
                    Some(Some(targets)) => all_related(top, relation, targets),
                    _ => false,
                };
            }
        }
        correct &= matched;
        matched_groups.push(matched.then_some(top));
    }
    for clause in &spec.exclude {
        if found(&clause.class).len() >= clause.count {
            correct = false;
        }
    }
    correct
}

/// Flow-GRPO's `evaluate_reward` (strict): `(strict_correct, score)`, the score the mean of
/// partial-credit terms per include clause.
///
/// Quirks kept from the reference: the count term `1 − |count − n|/count` goes negative when
/// n > 2·count; a failed count on a clause with colour or position appends an extra 0; a position
/// check appends 0 at its first failing pair and then 1.0 regardless (a failed check gives
/// [0, 1]); a clause whose target clause failed appends a single 0.
fn flow_grpo_score<'a>(
    spec: &PromptSpec,
    found: &dyn Fn(&str) -> &'a [&'a Detection],
) -> (bool, f32) {
    let mut terms: Vec<f32> = Vec::new();
    let mut strict_correct = true;
    let mut matched_groups: Vec<Option<&[&Detection]>> = Vec::new();
    for clause in &spec.include {
        let objects = found(&clause.class);
        let count = clause.count.max(1) as f32;
        let n = objects.len();
        terms.push(1.0 - (count - n as f32).abs() / count);
        let mut matched = n == clause.count;
        if !matched {
            if clause.color.is_some() || clause.position.is_some() {
                terms.push(0.0);
            }
        } else if let Some(color) = &clause.color {
            let hits = objects.iter().filter(|d| has_color(d, color)).count();
            terms.push(1.0 - (count - hits as f32).abs() / count);
            matched = hits == clause.count;
        } else if let Some((relation, target)) = &clause.position {
            match matched_groups.get(*target) {
                Some(Some(targets)) => {
                    if !all_related(objects, relation, targets) {
                        matched = false;
                        terms.push(0.0);
                    }
                    terms.push(1.0);
                }
                _ => {
                    matched = false;
                    terms.push(0.0);
                }
            }
        }
        strict_correct &= matched;
        matched_groups.push(matched.then_some(objects));
    }
    let score = if terms.is_empty() {
        0.0
    } else {
        terms.iter().sum::<f32>() / terms.len() as f32
    };
    (strict_correct, score)
}

/// GenEval's `relative_position`: the relations of box `a` to box `b` (`[x0, y0, x1, y1]`, y
/// down). The centre offset shrinks per axis by [`POSITION_SHRINK`]·(size_a + size_b) (clamped at
/// 0, sign kept) and is divided by the unshrunk offset's length; a component beyond ±0.5 gives
/// the relation ("above" = dy < −0.5). Boxes whose shrunk offset vanishes have none.
pub fn relative_position(a: [f32; 4], b: [f32; 4]) -> Vec<&'static str> {
    let center = |q: [f32; 4]| [(q[0] + q[2]) / 2.0, (q[1] + q[3]) / 2.0];
    let size = |q: [f32; 4]| [(q[2] - q[0]).abs(), (q[3] - q[1]).abs()];
    let (ca, cb, sa, sb) = (center(a), center(b), size(a), size(b));
    let offset = [ca[0] - cb[0], ca[1] - cb[1]];
    let revised: [f32; 2] = std::array::from_fn(|k| {
        (offset[k].abs() - POSITION_SHRINK * (sa[k] + sb[k])).max(0.0) * offset[k].signum()
    });
    if revised.iter().all(|v| v.abs() < 1e-3) {
        return Vec::new();
    }
    let norm = offset[0].hypot(offset[1]);
    let (dx, dy) = (revised[0] / norm, revised[1] / norm);
    let mut relations = Vec::new();
    if dx < -0.5 {
        relations.push("left of");
    }
    if dx > 0.5 {
        relations.push("right of");
    }
    if dy < -0.5 {
        relations.push("above");
    }
    if dy > 0.5 {
        relations.push("below");
    }
    relations
}

/// One scored image of an evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Index of the prompt in its prompt file.
    pub index: usize,
    /// Which sample of that prompt.
    pub sample: usize,
    pub tag: String,
    pub correct: bool,
    pub strict_correct: bool,
    pub score: f32,
    /// Components the detector could not name (stray blobs, unnamed colours, malformed shapes):
    /// the image-cleanliness guard of RL runs.
    #[serde(default)]
    pub artifacts: usize,
    /// The dense compositional score ([`super::dense`]).
    #[serde(default)]
    pub dense: f32,
}

/// An evaluation: `{overall, tags: {tag: accuracy}, images: [...]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Unweighted mean of the tag accuracies (GenEval's `summary_scores.py`), over the tags that
    /// have images; 0 without images.
    pub overall: f32,
    /// Fraction of correct images per tag, only for tags that have images.
    pub tags: BTreeMap<String, f32>,
    pub images: Vec<ImageRecord>,
}

impl Report {
    /// Summarises `images`. Tags are GenEval's six plus any other tag found (all averaged alike);
    /// a tag with no image is left out of `tags` and of `overall`, not counted as 0.
    pub fn new(images: Vec<ImageRecord>) -> Self {
        let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for image in &images {
            let entry = counts.entry(image.tag.clone()).or_default();
            entry.0 += image.correct as usize;
            entry.1 += 1;
        }
        let tags: BTreeMap<String, f32> = counts
            .into_iter()
            .map(|(tag, (correct, total))| (tag, correct as f32 / total as f32))
            .collect();
        let overall = if tags.is_empty() {
            0.0
        } else {
            tags.values().sum::<f32>() / tags.len() as f32
        };
        Self {
            overall,
            tags,
            images,
        }
    }

    /// Mean of Flow-GRPO's partial-credit training score over the images: finer-grained than
    /// the strict accuracy, which moves by a whole image per tag.
    pub fn score_mean(&self) -> f64 {
        let n = self.images.len().max(1) as f64;
        self.images.iter().map(|i| i.score as f64).sum::<f64>() / n
    }

    /// Mean of the dense compositional score over the images.
    pub fn dense_mean(&self) -> f64 {
        let n = self.images.len().max(1) as f64;
        self.images.iter().map(|i| i.dense as f64).sum::<f64>() / n
    }

    /// Mean artifacts per image.
    pub fn artifact_rate(&self) -> f64 {
        let n = self.images.len().max(1) as f64;
        self.images.iter().map(|i| i.artifacts as f64).sum::<f64>() / n
    }

    pub fn missing_tags(&self) -> Vec<&'static str> {
        TAGS.into_iter()
            .filter(|t| !self.tags.contains_key(*t))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::prompt::{Exclude, Include};

    fn det(shape: Shape, color: Color, x: f32, y: f32, confidence: f32) -> Detection {
        Detection {
            shape,
            color,
            bbox: [x - 5.0, y - 5.0, x + 5.0, y + 5.0],
            center: [x, y],
            area: 80.0,
            confidence,
        }
    }

    fn clause(class: &str, count: usize) -> Include {
        Include {
            class: class.into(),
            count,
            color: None,
            position: None,
        }
    }

    fn spec(tag: &str, include: Vec<Include>, exclude: Vec<Exclude>) -> PromptSpec {
        PromptSpec {
            tag: tag.into(),
            include,
            exclude,
            prompt: "test".into(),
        }
    }

    #[test]
    fn relative_position_follows_geneval() {
        let b = [10.0, 10.0, 20.0, 20.0];
        // Straight left by 20 px: shrunk by 0.1·(10 + 10) = 2 → dx = −18/20.
        assert_eq!(relative_position([-10.0, 10.0, 0.0, 20.0], b), ["left of"]);
        assert_eq!(relative_position([10.0, -10.0, 20.0, 0.0], b), ["above"]);
        assert_eq!(relative_position([10.0, 30.0, 20.0, 40.0], b), ["below"]);
        // Diagonal (20, 20): each component (20 − 2)/28.3 = 0.64 → both relations.
        assert_eq!(
            relative_position([30.0, 30.0, 40.0, 40.0], b),
            ["right of", "below"]
        );
        // Offset (10, 20): dx = 8/22.4 = 0.36 → only "below".
        assert_eq!(relative_position([20.0, 30.0, 30.0, 40.0], b), ["below"]);
        // Overlapping centres: shrunk offset vanishes.
        assert!(relative_position([11.0, 11.0, 21.0, 21.0], b).is_empty());
    }

    #[test]
    fn counting_uses_include_and_exclude() {
        let three = spec(
            "counting",
            vec![clause("circle", 3)],
            vec![Exclude {
                class: "circle".into(),
                count: 4,
            }],
        );
        let circles = |n: usize| -> Vec<Detection> {
            (0..n)
                .map(|i| det(Shape::Circle, Color::Red, 10.0 + 12.0 * i as f32, 10.0, 0.9))
                .collect()
        };
        let v = evaluate(&three, &circles(3));
        assert_eq!((v.correct, v.strict_correct, v.score), (true, true, 1.0));
        let v = evaluate(&three, &circles(2));
        assert!(!v.correct && !v.strict_correct);
        assert!((v.score - (1.0 - 1.0 / 3.0)).abs() < 1e-6);
        // Four: the include clause is met but the exclude clause fails.
        let v = evaluate(&three, &circles(4));
        assert!(!v.correct && !v.strict_correct);
        // Seven of three: the count term goes negative (1 − 4/3).
        assert!((evaluate(&three, &circles(7)).score + 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn geneval_allows_extra_objects_the_strict_score_does_not() {
        let one = spec("single_object", vec![clause("square", 1)], vec![]);
        let two = [
            det(Shape::Square, Color::Red, 10.0, 10.0, 0.9),
            det(Shape::Square, Color::Blue, 40.0, 10.0, 0.8),
        ];
        let v = evaluate(&one, &two);
        assert!(v.correct && !v.strict_correct);
        assert_eq!(v.score, 0.0);
    }

    #[test]
    fn colour_is_checked_on_the_top_count_detections() {
        let mut red = clause("circle", 1);
        red.color = Some("red".into());
        let s = spec("colors", vec![red], vec![]);
        let likely_blue = det(Shape::Circle, Color::Blue, 10.0, 10.0, 0.9);
        let less_likely_red = det(Shape::Circle, Color::Red, 40.0, 10.0, 0.6);
        // GenEval looks at the most confident circle only; it is blue.
        let v = evaluate(&s, &[less_likely_red.clone(), likely_blue.clone()]);
        assert!(!v.correct);
        // Flow-GRPO: two circles for one → count term 0, plus the extra 0 for the colour.
        assert_eq!((v.strict_correct, v.score), (false, 0.0));
        let v = evaluate(&s, &[less_likely_red]);
        assert_eq!((v.correct, v.strict_correct, v.score), (true, true, 1.0));
        let v = evaluate(&s, &[likely_blue]);
        assert_eq!((v.correct, v.strict_correct, v.score), (false, false, 0.5));
    }

    #[test]
    fn position_failure_scores_zero_then_one() {
        let mut square = clause("square", 1);
        square.position = Some(("left of".into(), 0));
        let s = spec("position", vec![clause("circle", 1), square], vec![]);
        let circle = det(Shape::Circle, Color::Red, 40.0, 30.0, 0.9);
        let left = det(Shape::Square, Color::Red, 10.0, 30.0, 0.9);
        let right = det(Shape::Square, Color::Red, 60.0, 30.0, 0.9);
        let v = evaluate(&s, &[circle.clone(), left]);
        assert_eq!((v.correct, v.strict_correct, v.score), (true, true, 1.0));
        // Terms [1 (circle count), 1 (square count), 0, 1 (the quirk)].
        let v = evaluate(&s, &[circle, right.clone()]);
        assert_eq!((v.correct, v.strict_correct, v.score), (false, false, 0.75));
        // No circle: the target failed → terms [0, 1, 0].
        let v = evaluate(&s, &[right]);
        assert!(!v.correct && !v.strict_correct);
        assert!((v.score - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn nothing_found_scores_without_panicking() {
        let mut odd = clause("hexagon", 0);
        odd.position = Some(("left of".into(), 7));
        let s = spec("position", vec![odd], vec![]);
        let v = evaluate(&s, &[]);
        assert!(!v.correct);
        assert!(v.score.is_finite());
        let empty = spec("single_object", vec![], vec![]);
        assert_eq!(evaluate(&empty, &[]).score, 0.0);
        for (w, h) in [(0, 0), (1, 1)] {
            let image = Image {
                width: w,
                height: h,
                pixels: vec![[200; 3]; w * h],
            };
            let v = evaluate_image(
                &spec("single_object", vec![clause("circle", 1)], vec![]),
                &image,
            );
            assert_eq!((v.correct, v.score), (false, 0.0));
        }
    }

    #[test]
    fn summary_is_the_mean_of_tag_accuracies() {
        let record = |tag: &str, correct| ImageRecord {
            index: 0,
            sample: 0,
            tag: tag.into(),
            correct,
            strict_correct: correct,
            score: correct as u8 as f32,
            artifacts: 0,
            dense: 0.0,
        };
        // counting 1/4, colors 1/1: overall (0.25 + 1) / 2, not 2/5.
        let mut images: Vec<_> = (0..4).map(|i| record("counting", i == 0)).collect();
        images.push(record("colors", true));
        let report = Report::new(images);
        assert_eq!(report.tags["counting"], 0.25);
        assert_eq!(report.overall, 0.625);
        assert_eq!(
            report.missing_tags(),
            ["single_object", "two_object", "position", "color_attr"]
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["tags"]["colors"], 1.0);
        assert_eq!(json["images"][0]["correct"], true);
        assert_eq!(Report::new(vec![]).overall, 0.0);
    }

    /// Scenes composed for random specs of all six tags, and deliberately wrong ones.
    mod agreement {
        use super::*;
        use crate::world::compose::scene_for;
        use crate::world::detect::{hsv_to_rgb, rgb_to_hsv};
        use crate::world::prompt::{RELATIONS, random_spec};
        use crate::world::render::render_supersampled;
        use crate::world::scene::Scene;
        use rand::{Rng, SeedableRng};
        use rand_chacha::ChaCha8Rng;

        /// A spec the scene is built from so that `spec` is violated: another colour, another
        /// count, the opposite relation, or a missing object.
        fn violate(rng: &mut impl Rng, spec: &PromptSpec) -> PromptSpec {
            let mut wrong = spec.clone();
            let other = |rng: &mut dyn rand::RngCore, name: &str, all: &[&'static str]| loop {
                let pick = all[rng.random_range(0..all.len())];
                if pick != name {
                    return pick.to_string();
                }
            };
            let shapes = Shape::ALL.map(|s| s.name());
            let colors = Color::ALL.map(|c| c.name());
            match spec.tag.as_str() {
                "single_object" => {
                    wrong.include[0].class = other(rng, &spec.include[0].class, &shapes)
                }
                "two_object" => {
                    wrong.include.remove(rng.random_range(0..2));
                }
                "counting" => {
                    let count = spec.include[0].count;
                    wrong.include[0].count = if rng.random_bool(0.5) {
                        count - 1
                    } else {
                        count + 1
                    };
                }
                "colors" | "color_attr" => {
                    let k = rng.random_range(0..spec.include.len());
                    let color = spec.include[k].color.clone().unwrap();
                    wrong.include[k].color = Some(other(rng, &color, &colors));
                }
                "position" => {
                    let (relation, target) = spec.include[1].position.clone().unwrap();
                    let opposite = RELATIONS.iter().position(|r| *r == relation).unwrap() ^ 1;
                    wrong.include[1].position = Some((RELATIONS[opposite].into(), target));
                }
                other => panic!("{other}"),
            }
            wrong
        }

        /// Renders `n` scenes per verdict (satisfying and violating, tags in turn) with
        /// `samples`² sub-samples after `restyle`, and returns the fraction of verdicts the
        /// detector gets right.
        fn agreement(
            seed: u64,
            n: usize,
            samples: usize,
            restyle: impl Fn(&mut ChaCha8Rng, &mut Scene),
        ) -> f32 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut agree = 0;
            let mut shown = 0;
            for i in 0..n {
                let spec = random_spec(&mut rng, TAGS[i % TAGS.len()]);
                for expected in [true, false] {
                    let built = if expected {
                        spec.clone()
                    } else {
                        violate(&mut rng, &spec)
                    };
                    let mut scene = loop {
                        if let Some(scene) = scene_for(&mut rng, &built) {
                            break scene;
                        }
                    };
                    restyle(&mut rng, &mut scene);
                    let image = render_supersampled(&scene, 64, samples);
                    let verdict = evaluate_image(&spec, &image);
                    if verdict.correct == expected {
                        agree += 1;
                    } else if shown < 8 {
                        shown += 1;
                        eprintln!(
                            "MISS expected {expected}: {} | scene {:?} | found {:?}",
                            spec.prompt,
                            scene,
                            detect(&image)
                        );
                    }
                }
            }
            agree as f32 / (2 * n) as f32
        }

        #[test]
        fn detector_verdicts_agree_with_ground_truth() {
            let rate = agreement(11, 2000, 4, |_, _| {});
            eprintln!("agreement over 2×2000 scenes: {rate}");
            assert!(rate >= 0.995, "agreement {rate}");
        }

        /// Another palette: every object's hue turned by `hue` degrees (drawn per scene from
        /// `hues`), saturation ×0.75–1.1, value ×0.8–1.05, and a light background of another tone.
        fn repaint(hues: &'static [f32]) -> impl Fn(&mut ChaCha8Rng, &mut Scene) {
            move |rng, scene| {
                let turn = hues[rng.random_range(0..hues.len())];
                let turn = if hues.len() == 2 {
                    turn
                } else {
                    rng.random_range(hues[0]..=hues[1])
                };
                let saturate = rng.random_range(0.75..1.1f32);
                let brighten = rng.random_range(0.8..1.05f32);
                for o in &mut scene.objects {
                    let (h, s, v) = rgb_to_hsv(o.rgb);
                    o.rgb = hsv_to_rgb(h + turn, (s * saturate).min(1.0), (v * brighten).min(1.0));
                }
                scene.background = hsv_to_rgb(
                    rng.random_range(0.0..360.0),
                    rng.random_range(0.0..0.12),
                    rng.random_range(0.85..1.0),
                );
            }
        }

        #[test]
        fn verdicts_survive_another_palette() {
            let rate = agreement(12, 2000, 4, repaint(&[-10.0, 10.0, 0.0]));
            eprintln!("another palette, hue turned by −10°…10° per scene: {rate}");
            assert!(rate >= 0.99, "agreement {rate}");
        }

        /// At exactly ±10° a fixed hue naming must err: orange (28°) sits 24° from yellow (52°)
        /// and 28° from red (0°), and the sampler's ±12 RGB jitter spreads hues by ≈ ±3.5° (1σ),
        /// so about a quarter of the turned oranges and yellows cross the midpoint. Only colour
        /// prompts naming those colours are affected.
        #[test]
        fn verdicts_at_the_extreme_hue_turns() {
            let rate = agreement(13, 2000, 4, repaint(&[-10.0, 10.0]));
            eprintln!("another palette, hue turned by ±10° exactly: {rate}");
            assert!(rate >= 0.975, "agreement {rate}");
        }

        #[test]
        fn verdicts_survive_without_anti_aliasing() {
            let rate = agreement(14, 2000, 1, |_, _| {});
            eprintln!("1 sample per pixel: {rate}");
            assert!(rate >= 0.99, "agreement {rate}");
        }

        #[test]
        fn verdicts_survive_finer_anti_aliasing() {
            let rate = agreement(15, 2000, 8, |_, _| {});
            eprintln!("8×8 samples per pixel: {rate}");
            assert!(rate >= 0.99, "agreement {rate}");
        }
    }
}
