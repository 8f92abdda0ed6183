//! BoxFlow-GRPO's defect boxes (ALGORITHMS.md §2.5) from the Shapes detector, and the per-pixel
//! reward map they make. BoxFlow asks a VLM for boxes labelled `artifact` or `misalignment`; here
//! the detector knows exactly which objects break the prompt:
//! - misalignment: an object of a class the prompt does not ask for; beyond a clause's count
//!   (the least confident ones); of the wrong colour; misplaced against its target clause; or
//!   counted by an `exclude` clause;
//! - artifact: a blob that is not a nameable shape (stray pixels, unnamed colours, odd outlines).
//!
//! Missing objects have no place to box; the scalar reward already charges them.

use serde::{Deserialize, Serialize};

use crate::world::detect::{Detection, Detections};
use crate::world::geneval::relative_position;
use crate::world::prompt::PromptSpec;
use crate::world::scene::{Color, Shape};

/// What a box marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefectLabel {
    Artifact,
    Misalignment,
}

/// One defect box.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DefectBox {
    pub label: DefectLabel,
    /// `[x0, y0, x1, y1]` as fractions of the image width and height (0–1, y down).
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    /// 0–100 (BoxFlow's VLM field); `None` counts as 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub importance: Option<f32>,
}

/// The defect boxes of one image's detections against `spec`, for an image of `size` (w, h).
pub fn defect_boxes(spec: &PromptSpec, found: &Detections, size: (usize, usize)) -> Vec<DefectBox> {
    let (w, h) = (size.0 as f32, size.1 as f32);
    let fraction = |b: [f32; 4]| [b[0] / w, b[1] / h, b[2] / w, b[3] / h];
    let mut wrong = vec![false; found.objects.len()];
    let by_confidence = |shape: Shape| -> Vec<usize> {
        let mut ids: Vec<usize> = (0..found.objects.len())
            .filter(|&i| found.objects[i].shape == shape)
            .collect();
        ids.sort_by(|&a, &b| {
            found.objects[b]
                .confidence
                .total_cmp(&found.objects[a].confidence)
        });
        ids
    };
    let asked: Vec<Option<Shape>> = spec
        .include
        .iter()
        .map(|c| Shape::parse(&c.class))
        .collect();
    for (i, d) in found.objects.iter().enumerate() {
        if !asked.contains(&Some(d.shape)) {
            wrong[i] = true;
        }
    }
    // The objects each include clause keeps (its top `count` of the class).
    let mut kept: Vec<Vec<usize>> = Vec::new();
    for (clause, shape) in spec.include.iter().zip(&asked) {
        let Some(shape) = shape else {
            kept.push(Vec::new());
            continue;
        };
        let ids = by_confidence(*shape);
        let (top, extra) = ids.split_at(clause.count.min(ids.len()));
        // Extra objects only break the prompt when the class is counted (or coloured, where a
        // second object of the class would be a wrong-coloured one).
        for &i in extra {
            wrong[i] = true;
        }
        if let Some(color) = clause.color.as_deref().and_then(Color::parse) {
            for &i in top {
                if found.objects[i].color != color {
                    wrong[i] = true;
                }
            }
        }
        kept.push(top.to_vec());
    }
    for (k, clause) in spec.include.iter().enumerate() {
        let Some((relation, target)) = &clause.position else {
            continue;
        };
        let targets: Vec<&Detection> = kept
            .get(*target)
            .map(|ids| ids.iter().map(|&i| &found.objects[i]).collect())
            .unwrap_or_default();
        if targets.is_empty() {
            continue; // the target is missing: nothing to say where this one should be
        }
        for &i in &kept[k] {
            let a = &found.objects[i];
            if !targets
                .iter()
                .all(|b| relative_position(a.bbox, b.bbox).contains(&relation.as_str()))
            {
                wrong[i] = true;
            }
        }
    }
    for clause in &spec.exclude {
        if let Some(shape) = Shape::parse(&clause.class) {
            let ids = by_confidence(shape);
            if ids.len() >= clause.count {
                for &i in &ids[clause.count.saturating_sub(1)..] {
                    wrong[i] = true;
                }
            }
        }
    }
    let misaligned = found
        .objects
        .iter()
        .zip(&wrong)
        .filter(|(_, w)| **w)
        .map(|(d, _)| DefectBox {
            label: DefectLabel::Misalignment,
            bbox: fraction(d.bbox),
            importance: None,
        });
    let artifacts = found.artifacts.iter().map(|a| DefectBox {
        label: DefectLabel::Artifact,
        bbox: fraction(a.bbox),
        importance: None,
    });
    misaligned.chain(artifacts).collect()
}

/// BoxFlow's penalties and floors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MapSettings {
    /// Penalty inside `artifact` boxes (× the group's reward std with `adaptive_alpha`).
    pub alpha_artifact: f64,
    /// Penalty inside `misalignment` boxes.
    pub alpha_misalignment: f64,
    /// Scale the penalties by the group's scalar-reward std.
    pub adaptive_alpha: bool,
    /// Smallest penalty inside a box.
    pub min_penalty: f64,
    /// Floor of the per-pixel group std in the advantage.
    pub std_floor: f64,
}

impl Default for MapSettings {
    fn default() -> Self {
        Self {
            alpha_artifact: 0.5,
            alpha_misalignment: 0.05,
            adaptive_alpha: true,
            min_penalty: 0.02,
            std_floor: 0.1,
        }
    }
}

/// The reward map `R(h, w) = r − Σ_label penalty_label·mask_label(h, w)` on a `rows × cols` grid
/// (the latent's), row-major. A label's mask is the union of its boxes (overlaps of one label do
/// not stack), weighted by importance/100 (max over overlapping boxes); a grid cell belongs to a
/// box when its centre does. `group_std` is the std of the scalar rewards of the image's group.
pub fn reward_map(
    reward: f64,
    boxes: &[DefectBox],
    rows: usize,
    cols: usize,
    group_std: f64,
    settings: &MapSettings,
) -> Vec<f32> {
    let scale = if settings.adaptive_alpha {
        group_std
    } else {
        1.0
    };
    let mut map = vec![reward as f32; rows * cols];
    for (label, alpha) in [
        (DefectLabel::Artifact, settings.alpha_artifact),
        (DefectLabel::Misalignment, settings.alpha_misalignment),
    ] {
        let penalty = (alpha * scale).max(settings.min_penalty);
        let mut mask = vec![0f32; rows * cols];
        for b in boxes.iter().filter(|b| b.label == label) {
            let weight = b.importance.map_or(1.0, |i| (i / 100.0).clamp(0.0, 1.0));
            for r in 0..rows {
                let y = (r as f32 + 0.5) / rows as f32;
                if y < b.bbox[1] || y >= b.bbox[3] {
                    continue;
                }
                for c in 0..cols {
                    let x = (c as f32 + 0.5) / cols as f32;
                    if x >= b.bbox[0] && x < b.bbox[2] {
                        let m = &mut mask[r * cols + c];
                        *m = m.max(weight);
                    }
                }
            }
        }
        for (value, m) in map.iter_mut().zip(&mask) {
            *value -= (penalty as f32) * m;
        }
    }
    map
}

/// Per-pixel group-relative advantages of reward maps: `A = (R − mean_G) / max(std_G, floor)`
/// per group and pixel, no clipping. `maps[i]` belongs to group `group[i]`.
pub fn map_advantages(maps: &[Vec<f32>], group: &[usize], std_floor: f64) -> Vec<Vec<f32>> {
    let pixels = maps.first().map_or(0, Vec::len);
    let mut out = vec![vec![0f32; pixels]; maps.len()];
    let mut groups: Vec<usize> = group.to_vec();
    groups.sort_unstable();
    groups.dedup();
    for g in groups {
        let members: Vec<usize> = (0..maps.len()).filter(|&i| group[i] == g).collect();
        let n = members.len() as f64;
        for p in 0..pixels {
            let mean = members.iter().map(|&i| maps[i][p] as f64).sum::<f64>() / n;
            let var = members
                .iter()
                .map(|&i| (maps[i][p] as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            let std = var.sqrt().max(std_floor);
            for &i in &members {
                out[i][p] = ((maps[i][p] as f64 - mean) / std) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::detect::detect;
    use crate::world::render::render;
    use crate::world::scene::{Object, Scene};

    fn spec(line: &str) -> PromptSpec {
        serde_json::from_str(line).unwrap()
    }

    fn scene(objects: &[(Shape, Color, f32, f32)]) -> crate::world::render::Image {
        let scene = Scene {
            background: [235, 235, 235],
            objects: objects
                .iter()
                .map(|&(shape, color, cx, cy)| Object {
                    shape,
                    color,
                    cx,
                    cy,
                    r: 0.1,
                    rgb: color.rgb(),
                })
                .collect(),
        };
        render(&scene, 64)
    }

    #[test]
    fn the_detector_boxes_what_breaks_the_prompt() {
        let two = spec(
            r#"{"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}], "prompt": "a photo of a red circle and a blue square"}"#,
        );
        // Right: nothing to box.
        let right = scene(&[
            (Shape::Circle, Color::Red, 0.3, 0.3),
            (Shape::Square, Color::Blue, 0.7, 0.7),
        ]);
        assert_eq!(defect_boxes(&two, &detect(&right), (64, 64)), vec![]);
        // A green square and an unasked triangle: two misalignment boxes where they are.
        let wrong = scene(&[
            (Shape::Circle, Color::Red, 0.3, 0.3),
            (Shape::Square, Color::Green, 0.7, 0.7),
            (Shape::Triangle, Color::Blue, 0.3, 0.75),
        ]);
        let boxes = defect_boxes(&two, &detect(&wrong), (64, 64));
        assert_eq!(boxes.len(), 2, "{boxes:?}");
        assert!(boxes.iter().all(|b| b.label == DefectLabel::Misalignment));
        let centre = |b: &DefectBox| ((b.bbox[0] + b.bbox[2]) / 2.0, (b.bbox[1] + b.bbox[3]) / 2.0);
        let mut centres: Vec<(f32, f32)> = boxes.iter().map(centre).collect();
        centres.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!((centres[0].0 - 0.3).abs() < 0.05 && (centres[0].1 - 0.75).abs() < 0.05);
        assert!((centres[1].0 - 0.7).abs() < 0.05 && (centres[1].1 - 0.7).abs() < 0.05);
    }

    #[test]
    fn misplaced_and_surplus_objects_are_boxed() {
        let left = spec(
            r#"{"tag": "position", "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a circle left of a square"}"#,
        );
        let swapped = scene(&[
            (Shape::Square, Color::Blue, 0.3, 0.5),
            (Shape::Circle, Color::Red, 0.7, 0.5),
        ]);
        let boxes = defect_boxes(&left, &detect(&swapped), (64, 64));
        assert_eq!(boxes.len(), 1, "{boxes:?}");
        assert!(
            boxes[0].bbox[0] > 0.5,
            "the circle on the right is the misplaced one"
        );
        let two = spec(
            r#"{"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}], "prompt": "a photo of two circles"}"#,
        );
        let three = scene(&[
            (Shape::Circle, Color::Red, 0.2, 0.5),
            (Shape::Circle, Color::Red, 0.5, 0.5),
            (Shape::Circle, Color::Red, 0.8, 0.5),
        ]);
        let boxes = defect_boxes(&two, &detect(&three), (64, 64));
        assert!(!boxes.is_empty() && boxes.len() < 3, "{boxes:?}");
    }

    #[test]
    fn maps_subtract_penalties_inside_boxes_and_advantages_floor_the_std() {
        let boxes = [
            DefectBox {
                label: DefectLabel::Artifact,
                bbox: [0.0, 0.0, 0.5, 0.5],
                importance: None,
            },
            DefectBox {
                label: DefectLabel::Artifact,
                bbox: [0.25, 0.25, 0.75, 0.75],
                importance: Some(50.0),
            },
            DefectBox {
                label: DefectLabel::Misalignment,
                bbox: [0.5, 0.5, 1.0, 1.0],
                importance: None,
            },
        ];
        let settings = MapSettings::default();
        let map = reward_map(0.8, &boxes, 4, 4, 0.4, &settings);
        let at = |r: usize, c: usize| map[r * 4 + c];
        // artifact 0.5·0.4 = 0.2 (overlap does not stack); misalignment 0.05·0.4 = 0.02.
        assert!((at(0, 0) - 0.6).abs() < 1e-6);
        assert!((at(1, 1) - 0.6).abs() < 1e-6);
        assert!((at(2, 2) - (0.8 - 0.1 - 0.02)).abs() < 1e-6, "{map:?}");
        assert!((at(3, 3) - 0.78).abs() < 1e-6);
        assert!((at(0, 3) - 0.8).abs() < 1e-6);
        // A group of two: pixel std 0.1 at a box, 0 elsewhere → floored at 0.1.
        let clean = reward_map(0.8, &[], 4, 4, 0.4, &settings);
        let a = map_advantages(&[map.clone(), clean], &[0, 0], 0.1);
        assert!(
            (a[0][0] + 1.0).abs() < 1e-5 && (a[1][0] - 1.0).abs() < 1e-5,
            "{:?}",
            a[0]
        );
        assert_eq!(a[0][3], 0.0);
    }
}
