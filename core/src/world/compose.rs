//! Scenes that satisfy a prompt: the objects a GenEval metadata line asks for, placed so that
//! position clauses hold with a clear margin, with unspecified colours drawn at random.

use rand::Rng;

use super::prompt::PromptSpec;
use super::scene::{Color, Object, Scene, Shape, Want, sample_scene};

/// Whether `object` stands in `relation` to `target` with a clear margin (image coordinates,
/// y down): the centre offset along the relation's axis exceeds both the other-axis offset and
/// the sum of the half-sizes.
pub fn clearly_related(object: &Object, relation: &str, target: &Object) -> bool {
    let (dx, dy) = (object.cx - target.cx, object.cy - target.cy);
    let gap = object.r + target.r;
    match relation {
        "left of" => -dx > gap && -dx > dy.abs(),
        "right of" => dx > gap && dx > dy.abs(),
        "above" => -dy > gap && -dy > dx.abs(),
        "below" => dy > gap && dy > dx.abs(),
        _ => false,
    }
}

/// A scene holding exactly what `spec`'s include clauses ask for (nothing else), or `None` if
/// no placement was found (the caller draws again). `spec` must be valid.
pub fn scene_for(rng: &mut impl Rng, spec: &PromptSpec) -> Option<Scene> {
    let mut wants = Vec::new();
    // Index of each clause's first object in `wants`.
    let mut first = Vec::new();
    for clause in &spec.include {
        first.push(wants.len());
        let shape = Shape::parse(&clause.class)?;
        let color = clause.color.as_deref().and_then(Color::parse);
        wants.extend(std::iter::repeat_n(Want { shape, color }, clause.count));
    }
    let constraint = |objects: &[Object]| {
        spec.include
            .iter()
            .enumerate()
            .all(|(i, clause)| match &clause.position {
                Some((relation, target)) => (0..clause.count).all(|k| {
                    (0..spec.include[*target].count).all(|t| {
                        clearly_related(
                            &objects[first[i] + k],
                            relation,
                            &objects[first[*target] + t],
                        )
                    })
                }),
                None => true,
            })
    };
    sample_scene(rng, &wants, 200, constraint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::prompt::{TAGS, random_spec};
    use rand::SeedableRng;

    #[test]
    fn scenes_hold_what_the_prompt_asks() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for tag in TAGS {
            for _ in 0..40 {
                let spec = random_spec(&mut rng, tag);
                let scene = scene_for(&mut rng, &spec).expect("placement found");
                let wanted: usize = spec.include.iter().map(|c| c.count).sum();
                assert_eq!(scene.objects.len(), wanted, "{}", spec.prompt);
                for clause in &spec.include {
                    let of_class = scene
                        .objects
                        .iter()
                        .filter(|o| o.shape.name() == clause.class)
                        .filter(|o| clause.color.as_deref().is_none_or(|c| o.color.name() == c));
                    assert_eq!(of_class.count(), clause.count, "{}", spec.prompt);
                }
            }
        }
    }
}
