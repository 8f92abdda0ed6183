//! A dense compositional score: GenEval's clauses judged with soft, continuous evidence instead
//! of yes/no verdicts, for RL on a base model that rarely gets a whole prompt right.
//!
//! GenEval (and Flow-GRPO's partial credit) names each component first and then counts names,
//! so a square drawn a little too round scores exactly like no square at all, and a group of
//! images that all miss gives no advantage. Here every measured component keeps a likelihood of
//! being each shape and each colour (the detector's `shape_likelihood`, `color_likelihood`: 1
//! where it would name it so, falling off softly outside); each include clause picks its
//! best-fitting components, and each relation is 1 beyond GenEval's threshold and falls off
//! short of it. The score is 1 exactly where GenEval's strict verdict holds on a clean image,
//! so it shapes the reward without moving the goal.
//!
//! Score of an image against a spec (in [−1, 1]):
//! - per include clause, the mean over its `count` slots of the fit of the component in that
//!   slot (0 for a missing one): fit = size · shape likelihood, with a colour it is
//!   size · (shape + shape · colour) / 2, so a right shape of the wrong colour earns half;
//! - per clause with a relation, the mean relation likelihood over (object, target) pairs;
//! - the mean of those terms, minus [`EXTRA_PENALTY`] per unclaimed component that looks like a
//!   class the prompt counts and [`STRAY_PENALTY`] per unclaimed component that looks like no
//!   shape (each weighted by how much it looks so), clamped at −1.

use super::detect::{
    Component, Interval, MIN_AREA_FRACTION, MIN_SHAPE_FRACTION, color_likelihood, components,
    shape_likelihood,
};
use super::geneval::POSITION_SHRINK;
use super::prompt::PromptSpec;
use super::render::Image;
use super::scene::{Color, Shape};

/// Penalty per unclaimed component that looks like a class of the prompt (it breaks a count).
pub const EXTRA_PENALTY: f32 = 0.3;
/// Penalty per unclaimed component that looks like no shape (a stray blob).
pub const STRAY_PENALTY: f32 = 0.15;
/// A relation holds beyond GenEval's 0.5; its likelihood halves ≈ 0.35 short of that.
const RELATION: Interval = Interval {
    low: 0.5,
    high: f32::INFINITY,
    scale: 0.15,
};

/// The dense score of `image` against `spec`.
pub fn dense_score(spec: &PromptSpec, image: &Image) -> f32 {
    let (found, _) = components(image);
    let total = (image.width * image.height) as f32;
    score_components(spec, &found, total)
}

/// The dense score of measured components (`total` = image pixels).
pub fn score_components(spec: &PromptSpec, found: &[Component], total: f32) -> f32 {
    let size: Vec<f32> = found.iter().map(|c| size_likelihood(c, total)).collect();
    let shapes: Vec<[f32; 3]> = found.iter().map(shape_likelihoods).collect();
    let mut claimed = vec![false; found.len()];
    // The components each clause claimed, best fit first.
    let mut picked: Vec<Vec<usize>> = Vec::with_capacity(spec.include.len());
    let mut terms: Vec<f32> = Vec::new();
    for clause in &spec.include {
        let shape = Shape::parse(&clause.class);
        let color = clause.color.as_deref().map(Color::parse);
        let fit = |i: usize| -> f32 {
            let Some(shape) = shape else { return 0.0 };
            let own = size[i] * shapes[i][shape as usize];
            match color {
                None => own,
                Some(None) => 0.0,
                Some(Some(color)) => own * (1.0 + color_likelihood(found[i].rgb, color)) / 2.0,
            }
        };
        let mut candidates: Vec<(f32, usize)> = (0..found.len())
            .filter(|&i| !claimed[i])
            .map(|i| (fit(i), i))
            .filter(|&(f, _)| f > 0.0)
            .collect();
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
        candidates.truncate(clause.count);
        let slots = clause.count.max(1) as f32;
        terms.push(candidates.iter().map(|c| c.0).sum::<f32>() / slots);
        let mine: Vec<usize> = candidates.iter().map(|c| c.1).collect();
        for &i in &mine {
            claimed[i] = true;
        }
        if let Some((relation, target)) = &clause.position {
            let targets = picked.get(*target).map_or(&[][..], |t| t.as_slice());
            let pairs = mine.len() * targets.len();
            let related = if pairs == 0 {
                0.0
            } else {
                let sum: f32 = mine
                    .iter()
                    .flat_map(|&a| targets.iter().map(move |&b| (a, b)))
                    .map(|(a, b)| {
                        relation_likelihood(found[a].measure.bbox, found[b].measure.bbox, relation)
                    })
                    .sum();
                sum / pairs as f32
            };
            terms.push(related);
        }
        picked.push(mine);
    }
    let counted: Vec<Shape> = spec
        .include
        .iter()
        .filter_map(|c| Shape::parse(&c.class))
        .collect();
    let mut penalty = 0.0;
    for i in (0..found.len()).filter(|&i| !claimed[i]) {
        let like_counted = counted
            .iter()
            .map(|&s| shapes[i][s as usize])
            .fold(0.0, f32::max);
        let like_any = shapes[i].into_iter().fold(0.0, f32::max);
        penalty += EXTRA_PENALTY * size[i] * like_counted + STRAY_PENALTY * (1.0 - like_any);
    }
    let mean = if terms.is_empty() {
        0.0
    } else {
        terms.iter().sum::<f32>() / terms.len() as f32
    };
    (mean - penalty).max(-1.0)
}

/// How much a component is big enough to be an object: 0 at ignorable noise
/// ([`MIN_AREA_FRACTION`]), 1 from twice the smallest nameable shape ([`MIN_SHAPE_FRACTION`]).
fn size_likelihood(c: &Component, total: f32) -> f32 {
    let fraction = c.measure.area / total.max(1.0);
    let full = 2.0 * MIN_SHAPE_FRACTION;
    ((fraction - MIN_AREA_FRACTION) / (full - MIN_AREA_FRACTION)).clamp(0.0, 1.0)
}

/// One component's likelihood of each of [`Shape::ALL`].
fn shape_likelihoods(c: &Component) -> [f32; 3] {
    Shape::ALL.map(|s| shape_likelihood(&c.measure, s))
}

/// How much box `a` stands in `relation` to box `b`: GenEval's `relative_position` offset
/// (shrunk by [`POSITION_SHRINK`] of the summed sizes, over the unshrunk length), its component
/// along the relation: 1 beyond GenEval's 0.5 threshold, a Gaussian of the shortfall below it.
pub fn relation_likelihood(a: [f32; 4], b: [f32; 4], relation: &str) -> f32 {
    let center = |q: [f32; 4]| [(q[0] + q[2]) / 2.0, (q[1] + q[3]) / 2.0];
    let size = |q: [f32; 4]| [(q[2] - q[0]).abs(), (q[3] - q[1]).abs()];
    let (ca, cb, sa, sb) = (center(a), center(b), size(a), size(b));
    let offset = [ca[0] - cb[0], ca[1] - cb[1]];
    let norm = offset[0].hypot(offset[1]);
    if norm < 1e-3 {
        return 0.0;
    }
    let revised: [f32; 2] = std::array::from_fn(|k| {
        (offset[k].abs() - POSITION_SHRINK * (sa[k] + sb[k])).max(0.0) * offset[k].signum() / norm
    });
    let along = match relation {
        "left of" => -revised[0],
        "right of" => revised[0],
        "above" => -revised[1],
        "below" => revised[1],
        _ => return 0.0,
    };
    RELATION.soft(along)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::compose::scene_for;
    use crate::world::detect::detect;
    use crate::world::geneval::{evaluate, relative_position};
    use crate::world::prompt::{TAGS, random_spec};
    use crate::world::render::{render, render_supersampled};
    use crate::world::scene::{Object, Scene};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn one(shape: Shape, color: Color, cx: f32, cy: f32, r: f32) -> Object {
        Object {
            shape,
            color,
            cx,
            cy,
            r,
            rgb: color.rgb(),
        }
    }

    fn scene(objects: Vec<Object>) -> Image {
        render(
            &Scene {
                background: [240, 238, 236],
                objects,
            },
            64,
        )
    }

    #[test]
    fn rendered_shapes_are_most_like_themselves() {
        for shape in Shape::ALL {
            for r in [0.08, 0.11, 0.14] {
                for samples in [1, 4, 8] {
                    let image = render_supersampled(
                        &Scene {
                            background: [240, 238, 236],
                            objects: vec![one(shape, Color::Blue, 0.47, 0.52, r)],
                        },
                        64,
                        samples,
                    );
                    let (found, _) = components(&image);
                    assert_eq!(found.len(), 1, "{shape:?} r {r}");
                    let like = shape_likelihoods(&found[0]);
                    assert_eq!(like[shape as usize], 1.0, "{shape:?} r {r} × {samples}");
                    for other in Shape::ALL.into_iter().filter(|&s| s != shape) {
                        assert!(
                            like[other as usize] < 0.6,
                            "{shape:?} r {r} × {samples}: {like:?} {:?}",
                            found[0].measure
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn palette_colours_are_most_like_themselves() {
        for color in Color::ALL {
            assert_eq!(color_likelihood(color.rgb(), color), 1.0, "{color:?}");
            for other in Color::ALL.into_iter().filter(|&c| c != color) {
                // Neighbours on the hue circle keep some credit (palette yellow sits 12° past
                // orange's range: 0.47), the rest next to none.
                let like = color_likelihood(color.rgb(), other);
                assert!(like < 0.5, "{color:?} as {other:?}: {like}");
            }
        }
        assert!(color_likelihood([128, 128, 128], Color::Red) < 0.01);
        let orange_ish_red = color_likelihood([230, 110, 40], Color::Red); // hue 22°: 8° into orange
        assert!(
            orange_ish_red > 0.0 && orange_ish_red < 1.0,
            "{orange_ish_red}"
        );
    }

    #[test]
    fn relations_hold_fully_where_geneval_says_so() {
        let b = [10.0, 10.0, 20.0, 20.0];
        for (a, relation) in [
            ([-10.0, 10.0, 0.0, 20.0], "left of"),
            ([10.0, -10.0, 20.0, 0.0], "above"),
            ([10.0, 30.0, 20.0, 40.0], "below"),
            ([30.0, 30.0, 40.0, 40.0], "right of"),
        ] {
            assert_eq!(relation_likelihood(a, b, relation), 1.0, "{relation}");
            assert!(relative_position(a, b).contains(&relation));
        }
        // Offset (10, 20): GenEval says "below" only; dx = 0.36 < 0.5 keeps partial credit.
        let a = [20.0, 30.0, 30.0, 40.0];
        let right = relation_likelihood(a, b, "right of");
        assert!(right > 0.5 && right < 1.0, "{right}");
        assert_eq!(relation_likelihood(a, b, "below"), 1.0);
        assert!(relation_likelihood(a, b, "above") < 0.01);
        assert_eq!(relation_likelihood(b, b, "left of"), 0.0);
    }

    /// The score is high where GenEval says correct and lower where the same spec is violated.
    #[test]
    fn correct_scenes_score_high_and_above_violations() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let mut correct_scores = Vec::new();
        for i in 0..300 {
            let spec = random_spec(&mut rng, TAGS[i % TAGS.len()]);
            let Some(built) = scene_for(&mut rng, &spec) else {
                continue;
            };
            let image = render(&built, 64);
            if !evaluate(&spec, &detect(&image).objects).strict_correct {
                continue;
            }
            correct_scores.push(dense_score(&spec, &image));
        }
        assert!(correct_scores.len() > 250, "{}", correct_scores.len());
        let low = correct_scores.iter().copied().fold(f32::MAX, f32::min);
        let mean = correct_scores.iter().sum::<f32>() / correct_scores.len() as f32;
        assert!(mean > 0.85 && low > 0.5, "mean {mean}, lowest {low}");
    }

    #[test]
    fn each_kind_of_mistake_costs() {
        let spec = |line: &str| -> PromptSpec { serde_json::from_str(line).unwrap() };
        let red_square = spec(
            r#"{"tag":"colors","include":[{"class":"square","count":1,"color":"red"}],"exclude":[],"prompt":"a photo of a red square"}"#,
        );
        let right = dense_score(
            &red_square,
            &scene(vec![one(Shape::Square, Color::Red, 0.5, 0.5, 0.12)]),
        );
        let blue = dense_score(
            &red_square,
            &scene(vec![one(Shape::Square, Color::Blue, 0.5, 0.5, 0.12)]),
        );
        let round = dense_score(
            &red_square,
            &scene(vec![one(Shape::Circle, Color::Red, 0.5, 0.5, 0.12)]),
        );
        let nothing = dense_score(&red_square, &scene(vec![]));
        let extra = dense_score(
            &red_square,
            &scene(vec![
                one(Shape::Square, Color::Red, 0.3, 0.5, 0.1),
                one(Shape::Square, Color::Red, 0.7, 0.5, 0.1),
            ]),
        );
        assert!(right > 0.9, "{right}");
        // A wrong colour keeps half; a wrong shape keeps less than that; nothing keeps nothing.
        assert!((0.35..0.6).contains(&blue), "{blue}");
        assert!(round < blue, "{round}");
        assert_eq!(nothing, 0.0);
        assert!(extra < right - 0.2, "{extra}");

        let left = spec(
            r#"{"tag":"position","include":[{"class":"circle","count":1},{"class":"triangle","count":1,"position":["left of",0]}],"exclude":[],"prompt":"a photo of a triangle left of a circle"}"#,
        );
        let circle = one(Shape::Circle, Color::Green, 0.7, 0.5, 0.1);
        let good = dense_score(
            &left,
            &scene(vec![
                circle,
                one(Shape::Triangle, Color::Red, 0.3, 0.5, 0.1),
            ]),
        );
        let half = dense_score(
            &left,
            &scene(vec![
                circle,
                one(Shape::Triangle, Color::Red, 0.5, 0.2, 0.1),
            ]),
        );
        let wrong = dense_score(
            &left,
            &scene(vec![
                circle,
                one(Shape::Triangle, Color::Red, 0.85, 0.2, 0.08),
            ]),
        );
        assert!(
            good > 0.9 && good > half && half > wrong,
            "{good} {half} {wrong}"
        );
    }

    #[test]
    fn degenerate_input_scores_without_panicking() {
        let spec: PromptSpec = serde_json::from_str(
            r#"{"tag":"position","include":[{"class":"hexagon","count":2,"color":"teal","position":["next to",5]}],"exclude":[],"prompt":"x"}"#,
        )
        .unwrap();
        for (w, h) in [(0, 0), (1, 1), (64, 64)] {
            let image = Image {
                width: w,
                height: h,
                pixels: vec![[200; 3]; w * h],
            };
            assert!(dense_score(&spec, &image).is_finite());
        }
        let image = scene(vec![one(Shape::Circle, Color::Red, 0.5, 0.5, 0.1)]);
        let score = dense_score(&spec, &image);
        assert!((-1.0..=0.0).contains(&score), "{score}");
    }
}
