//! The committed train / test prompt sets (`assets/prompts/shapes_{train,test}.jsonl`).
//!
//! Every prompt of every tag is enumerated, then split so that the test set holds attribute
//! combinations no training prompt has:
//! - colour–shape bindings: six of the eighteen (each colour once) never appear in training
//!   prompts (neither `colors` nor `color_attr`); test `colors` asks for exactly those, test
//!   `color_attr` prompts have at least one of them;
//! - counting: "two squares", "three triangles", "four circles" are test-only;
//! - position: a quarter of the (object, relation, target) triples are test-only;
//! - two_object: one order of each pair is test-only ("a square and a circle" is test,
//!   "a circle and a square" is train);
//! - single_object has three prompts in all; they are in both sets (GenEval's tag needs them).

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::prompt::{Exclude, Include, PromptSpec, RELATIONS, noun_phrase, number, plural};
use super::scene::{Color, Shape};

/// Colour–shape bindings reserved for the test set.
pub const HELD_OUT_BINDINGS: [(Color, Shape); 6] = [
    (Color::Purple, Shape::Circle),
    (Color::Yellow, Shape::Circle),
    (Color::Orange, Shape::Square),
    (Color::Blue, Shape::Square),
    (Color::Red, Shape::Triangle),
    (Color::Green, Shape::Triangle),
];

/// Counting prompts reserved for the test set.
pub const HELD_OUT_COUNTS: [(usize, Shape); 3] =
    [(2, Shape::Square), (3, Shape::Triangle), (4, Shape::Circle)];

/// How many `color_attr` test prompts are kept (drawn with a fixed seed from all eligible).
pub const COLOR_ATTR_TEST_PROMPTS: usize = 24;

fn one(shape: Shape, color: Option<Color>) -> Include {
    Include {
        class: shape.name().into(),
        count: 1,
        color: color.map(|c| c.name().into()),
        position: None,
    }
}

fn held_out(color: Color, shape: Shape) -> bool {
    HELD_OUT_BINDINGS.contains(&(color, shape))
}

fn ordered_pairs() -> Vec<(Shape, Shape)> {
    Shape::ALL
        .iter()
        .flat_map(|&a| Shape::ALL.iter().map(move |&b| (a, b)))
        .filter(|(a, b)| a != b)
        .collect()
}

/// (train, test) prompt sets.
pub fn build() -> (Vec<PromptSpec>, Vec<PromptSpec>) {
    let (mut train, mut test) = (Vec::new(), Vec::new());
    let spec = |tag: &str, include, exclude, prompt| PromptSpec {
        tag: tag.into(),
        include,
        exclude,
        prompt,
    };
    for shape in Shape::ALL {
        let s = spec(
            "single_object",
            vec![one(shape, None)],
            vec![],
            format!("a photo of {}", noun_phrase(shape.name(), None)),
        );
        train.push(s.clone());
        test.push(s);
    }
    for (a, b) in ordered_pairs() {
        let s = spec(
            "two_object",
            vec![one(a, None), one(b, None)],
            vec![],
            format!(
                "a photo of {} and {}",
                noun_phrase(a.name(), None),
                noun_phrase(b.name(), None)
            ),
        );
        // One order of each pair is test-only: the order where the first comes later in ALL.
        if (a as usize) > (b as usize) {
            &mut test
        } else {
            &mut train
        }
        .push(s);
    }
    for count in 2..=4 {
        for shape in Shape::ALL {
            let s = spec(
                "counting",
                vec![Include {
                    class: shape.name().into(),
                    count,
                    color: None,
                    position: None,
                }],
                vec![Exclude {
                    class: shape.name().into(),
                    count: count + 1,
                }],
                format!("a photo of {} {}", number(count), plural(shape.name())),
            );
            if HELD_OUT_COUNTS.contains(&(count, shape)) {
                &mut test
            } else {
                &mut train
            }
            .push(s);
        }
    }
    for shape in Shape::ALL {
        for color in Color::ALL {
            let s = spec(
                "colors",
                vec![one(shape, Some(color))],
                vec![],
                format!(
                    "a photo of {}",
                    noun_phrase(shape.name(), Some(color.name()))
                ),
            );
            if held_out(color, shape) {
                &mut test
            } else {
                &mut train
            }
            .push(s);
        }
    }
    for (k, (target, object)) in ordered_pairs().into_iter().enumerate() {
        for (r, relation) in RELATIONS.iter().enumerate() {
            let s = spec(
                "position",
                vec![
                    one(target, None),
                    Include {
                        position: Some((relation.to_string(), 0)),
                        ..one(object, None)
                    },
                ],
                vec![],
                format!(
                    "a photo of {} {relation} {}",
                    noun_phrase(object.name(), None),
                    noun_phrase(target.name(), None)
                ),
            );
            if (k + r) % 4 == 0 {
                &mut test
            } else {
                &mut train
            }
            .push(s);
        }
    }
    let mut color_attr_test = Vec::new();
    for (a, b) in ordered_pairs() {
        for ca in Color::ALL {
            for cb in Color::ALL {
                if ca == cb {
                    continue;
                }
                let s = spec(
                    "color_attr",
                    vec![one(a, Some(ca)), one(b, Some(cb))],
                    vec![],
                    format!(
                        "a photo of {} and {}",
                        noun_phrase(a.name(), Some(ca.name())),
                        noun_phrase(b.name(), Some(cb.name()))
                    ),
                );
                if held_out(ca, a) || held_out(cb, b) {
                    color_attr_test.push(s);
                } else {
                    train.push(s);
                }
            }
        }
    }
    color_attr_test.shuffle(&mut ChaCha8Rng::seed_from_u64(2026));
    color_attr_test.truncate(COLOR_ATTR_TEST_PROMPTS);
    test.extend(color_attr_test);
    (train, test)
}

/// JSONL text of a prompt set, one GenEval metadata line per prompt.
pub fn to_jsonl(specs: &[PromptSpec]) -> String {
    specs
        .iter()
        .map(|s| serde_json::to_string(s).expect("plain data") + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn test_prompts_hold_combinations_training_never_shows() {
        let (train, test) = build();
        let train_prompts: HashSet<&str> = train.iter().map(|s| s.prompt.as_str()).collect();
        for s in &test {
            s.validate().unwrap();
            if s.tag != "single_object" {
                assert!(!train_prompts.contains(s.prompt.as_str()), "{}", s.prompt);
            }
        }
        for s in &train {
            for clause in &s.include {
                if let Some(c) = &clause.color {
                    let binding = (
                        Color::parse(c).unwrap(),
                        Shape::parse(&clause.class).unwrap(),
                    );
                    assert!(!HELD_OUT_BINDINGS.contains(&binding), "{}", s.prompt);
                }
            }
        }
        for tag in super::super::prompt::TAGS {
            assert!(
                test.iter().any(|s| s.tag == tag),
                "no test prompt for {tag}"
            );
            assert!(
                train.iter().any(|s| s.tag == tag),
                "no train prompt for {tag}"
            );
        }
    }

    /// The committed files are exactly what [`build`] makes.
    #[test]
    fn committed_prompt_files_are_current() {
        let (train, test) = build();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/prompts");
        for (name, specs) in [("shapes_train.jsonl", &train), ("shapes_test.jsonl", &test)] {
            let path = dir.join(name);
            let text = to_jsonl(specs);
            if std::env::var_os("PORTAFLOW_WRITE_PROMPTS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == text,
                "{} is stale; regenerate with PORTAFLOW_WRITE_PROMPTS=1 cargo test --workspace --lib prompt_sets",
                path.display()
            );
        }
    }
}
