//! GenEval-format prompt metadata for the Shapes world: the six tags, their templates, and JSONL
//! reading with line-numbered errors.
//!
//! A line: `{"tag": "position", "include": [{"class": "circle", "count": 1}, {"class": "square",
//! "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a square left of a circle"}`.
//! As in GenEval, the position clause's target is named by its index in `include`, and the
//! positioned object is described relative to it.

use std::path::Path;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::scene::{Color, Shape};

/// GenEval's six categories.
pub const TAGS: [&str; 6] = [
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
];

/// Spatial relations (GenEval's names).
pub const RELATIONS: [&str; 4] = ["left of", "right of", "above", "below"];

/// One `include` clause.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Include {
    pub class: String,
    pub count: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
    /// `[relation, index of the target clause]`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<(String, usize)>,
}

/// One `exclude` clause: fail if at least `count` objects of `class` are found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exclude {
    pub class: String,
    pub count: usize,
}

/// A prompt with its GenEval metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptSpec {
    pub tag: String,
    pub include: Vec<Include>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<Exclude>,
    pub prompt: String,
}

/// Errors in prompt files.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
}

impl PromptSpec {
    /// Checks a GenEval line of any vocabulary (GenEval's own COCO classes too): a known tag, a
    /// prompt, include clauses with positive counts, known relations to another clause.
    pub fn validate_structure(&self) -> Result<(), String> {
        if !TAGS.contains(&self.tag.as_str()) {
            return Err(format!(
                "unknown tag `{}` (expected one of {})",
                self.tag,
                TAGS.join(", ")
            ));
        }
        if self.prompt.trim().is_empty() {
            return Err("empty prompt".into());
        }
        if self.include.is_empty() {
            return Err("no include clause".into());
        }
        for (i, clause) in self.include.iter().enumerate() {
            if clause.count == 0 {
                return Err(format!("include[{i}]: count 0"));
            }
            if let Some((relation, target)) = &clause.position {
                if !RELATIONS.contains(&relation.as_str()) {
                    return Err(format!("include[{i}]: unknown relation `{relation}`"));
                }
                if *target >= self.include.len() || *target == i {
                    return Err(format!(
                        "include[{i}]: position target {target} is not another include clause"
                    ));
                }
            }
        }
        Ok(())
    }

    /// [`Self::validate_structure`], and classes, colours and counts within the Shapes world,
    /// which the built-in detector and rewards judge.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_structure()?;
        for (i, clause) in self.include.iter().enumerate() {
            if Shape::parse(&clause.class).is_none() {
                return Err(format!(
                    "include[{i}]: unknown class `{}` (known: circle, square, triangle)",
                    clause.class
                ));
            }
            if !(1..=4).contains(&clause.count) {
                return Err(format!("include[{i}]: count {} outside 1–4", clause.count));
            }
            if let Some(color) = &clause.color {
                if Color::parse(color).is_none() {
                    let known: Vec<&str> = Color::ALL.iter().map(|c| c.name()).collect();
                    return Err(format!(
                        "include[{i}]: unknown color `{color}` (known: {})",
                        known.join(", ")
                    ));
                }
            }
        }
        for (i, clause) in self.exclude.iter().enumerate() {
            if Shape::parse(&clause.class).is_none() {
                return Err(format!("exclude[{i}]: unknown class `{}`", clause.class));
            }
        }
        Ok(())
    }
}

/// Reads a GenEval-format JSONL file; blank lines are skipped; every error names its line
/// (counted from 1).
pub fn read_jsonl(path: &Path) -> Result<Vec<PromptSpec>, PromptError> {
    read_lines(path, PromptSpec::validate)
}

/// Reads a GenEval-format JSONL file of any vocabulary (flow_grpo's `dataset/geneval`, judged by
/// a reward server): only the lines' structure is checked ([`PromptSpec::validate_structure`]).
pub fn read_geneval_jsonl(path: &Path) -> Result<Vec<PromptSpec>, PromptError> {
    read_lines(path, PromptSpec::validate_structure)
}

fn read_lines(
    path: &Path,
    validate: fn(&PromptSpec) -> Result<(), String>,
) -> Result<Vec<PromptSpec>, PromptError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PromptError::Io {
        path: shown.clone(),
        source,
    })?;
    parse_lines(&text, &shown, validate)
}

/// Parses GenEval-format JSONL text of the Shapes world (see [`read_jsonl`]).
pub fn parse_jsonl(text: &str, origin: &str) -> Result<Vec<PromptSpec>, PromptError> {
    parse_lines(text, origin, PromptSpec::validate)
}

fn parse_lines(
    text: &str,
    origin: &str,
    validate: fn(&PromptSpec) -> Result<(), String>,
) -> Result<Vec<PromptSpec>, PromptError> {
    let mut specs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let error = |message: String| PromptError::Line {
            path: origin.to_string(),
            line: index + 1,
            message,
        };
        let spec: PromptSpec = serde_json::from_str(line)
            .map_err(|e| error(format!("not a GenEval metadata line: {e}")))?;
        validate(&spec).map_err(error)?;
        specs.push(spec);
    }
    Ok(specs)
}

/// Every word the world's prompts use (GenEval templates and the digits task), in a fixed
/// order: the bundled tokenizer's vocabulary.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = [
        "a", "an", "photo", "of", "and", "the", "number", "left", "right", "above", "below", "one",
        "two", "three", "four", "\"",
    ]
    .iter()
    .map(|w| w.to_string())
    .collect();
    for shape in Shape::ALL {
        words.push(shape.name().to_string());
        words.push(plural(shape.name()));
    }
    words.extend(Color::ALL.iter().map(|c| c.name().to_string()));
    words.extend((0..10).map(|d| d.to_string()));
    words
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

pub(super) fn number(n: usize) -> &'static str {
    ["zero", "one", "two", "three", "four"][n]
}

pub(super) fn plural(class: &str) -> String {
    format!("{class}s")
}

/// "a red circle", "an orange square", "a triangle"
pub(super) fn noun_phrase(class: &str, color: Option<&str>) -> String {
    match color {
        Some(c) => format!("{} {c} {class}", article(c)),
        None => format!("{} {class}", article(class)),
    }
}

/// Builds a prompt of `tag` with random attributes, GenEval-style wording.
pub fn random_spec(rng: &mut impl Rng, tag: &str) -> PromptSpec {
    let shape = |rng: &mut dyn rand::RngCore| {
        Shape::ALL[rng.random_range(0..Shape::ALL.len())]
            .name()
            .to_string()
    };
    let color = |rng: &mut dyn rand::RngCore| {
        Color::ALL[rng.random_range(0..Color::ALL.len())]
            .name()
            .to_string()
    };
    let two_distinct = |rng: &mut dyn rand::RngCore,
                        pick: &dyn Fn(&mut dyn rand::RngCore) -> String| loop {
        let (a, b) = (pick(rng), pick(rng));
        if a != b {
            return (a, b);
        }
    };
    let one = |class: String| Include {
        class,
        count: 1,
        color: None,
        position: None,
    };
    match tag {
        "single_object" => {
            let class = shape(rng);
            PromptSpec {
                tag: tag.into(),
                prompt: format!("a photo of {}", noun_phrase(&class, None)),
                include: vec![one(class)],
                exclude: vec![],
            }
        }
        "two_object" => {
            let (a, b) = two_distinct(rng, &shape);
            PromptSpec {
                tag: tag.into(),
                prompt: format!(
                    "a photo of {} and {}",
                    noun_phrase(&a, None),
                    noun_phrase(&b, None)
                ),
                include: vec![one(a), one(b)],
                exclude: vec![],
            }
        }
        "counting" => {
            let class = shape(rng);
            let count = rng.random_range(2..=4);
            PromptSpec {
                tag: tag.into(),
                prompt: format!("a photo of {} {}", number(count), plural(&class)),
                include: vec![Include {
                    class: class.clone(),
                    count,
                    color: None,
                    position: None,
                }],
                exclude: vec![Exclude {
                    class,
                    count: count + 1,
                }],
            }
        }
        "colors" => {
            let (class, c) = (shape(rng), color(rng));
            PromptSpec {
                tag: tag.into(),
                prompt: format!("a photo of {}", noun_phrase(&class, Some(&c))),
                include: vec![Include {
                    class,
                    count: 1,
                    color: Some(c),
                    position: None,
                }],
                exclude: vec![],
            }
        }
        "position" => {
            let (a, b) = two_distinct(rng, &shape);
            let relation = RELATIONS[rng.random_range(0..RELATIONS.len())];
            PromptSpec {
                tag: tag.into(),
                prompt: format!(
                    "a photo of {} {relation} {}",
                    noun_phrase(&b, None),
                    noun_phrase(&a, None)
                ),
                include: vec![
                    one(a),
                    Include {
                        class: b,
                        count: 1,
                        color: None,
                        position: Some((relation.into(), 0)),
                    },
                ],
                exclude: vec![],
            }
        }
        "color_attr" => {
            let (a, b) = two_distinct(rng, &shape);
            let (ca, cb) = two_distinct(rng, &color);
            PromptSpec {
                tag: tag.into(),
                prompt: format!(
                    "a photo of {} and {}",
                    noun_phrase(&a, Some(&ca)),
                    noun_phrase(&b, Some(&cb))
                ),
                include: vec![
                    Include {
                        class: a,
                        count: 1,
                        color: Some(ca),
                        position: None,
                    },
                    Include {
                        class: b,
                        count: 1,
                        color: Some(cb),
                        position: None,
                    },
                ],
                exclude: vec![],
            }
        }
        other => panic!("unknown tag {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn prompts_read_like_geneval() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for tag in TAGS {
            for _ in 0..50 {
                let spec = random_spec(&mut rng, tag);
                spec.validate().unwrap();
                assert!(spec.prompt.starts_with("a photo of "), "{}", spec.prompt);
                assert!(!spec.prompt.contains("a orange"), "{}", spec.prompt);
            }
        }
        let spec = PromptSpec {
            tag: "counting".into(),
            include: vec![Include {
                class: "circle".into(),
                count: 3,
                color: None,
                position: None,
            }],
            exclude: vec![Exclude {
                class: "circle".into(),
                count: 4,
            }],
            prompt: "a photo of three circles".into(),
        };
        let line = serde_json::to_string(&spec).unwrap();
        assert_eq!(
            line,
            r#"{"tag":"counting","include":[{"class":"circle","count":3}],"exclude":[{"class":"circle","count":4}],"prompt":"a photo of three circles"}"#
        );
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        let text = concat!(
            r#"{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}"#,
            "\n\n",
            r#"{"tag": "colors", "include": [{"class": "hexagon", "count": 1}], "prompt": "a photo of a hexagon"}"#,
        );
        let err = parse_jsonl(text, "test.jsonl").unwrap_err().to_string();
        assert!(
            err.starts_with("test.jsonl:3:") && err.contains("unknown class `hexagon`"),
            "{err}"
        );
        let err = parse_jsonl("{not json", "x.jsonl").unwrap_err().to_string();
        assert!(err.starts_with("x.jsonl:1:"), "{err}");
        // GenEval's own vocabulary passes the structural check alone; a broken structure not.
        let coco = r#"{"tag": "counting", "include": [{"class": "bench", "count": 5}], "prompt": "a photo of five benches"}"#;
        assert_eq!(
            parse_lines(coco, "g", PromptSpec::validate_structure).unwrap()[0].include[0].class,
            "bench"
        );
        let err = parse_jsonl(coco, "g").unwrap_err().to_string();
        assert!(err.contains("unknown class `bench`"), "{err}");
        let relation = r#"{"tag": "position", "include": [{"class": "bus", "count": 1, "position": ["behind", 0]}], "prompt": "a bus"}"#;
        let err = parse_lines(relation, "g", PromptSpec::validate_structure)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown relation `behind`"), "{err}");
        let geneval_line = r#"{"tag": "position", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a square left of a circle"}"#;
        assert_eq!(
            parse_jsonl(geneval_line, "g").unwrap()[0].include[1].position,
            Some(("left of".into(), 0))
        );
    }
}
