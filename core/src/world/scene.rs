//! Scenes of the Shapes world: flat-colour shapes on a plain background, sampled so that objects
//! never overlap and stay inside the frame.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Shape classes (GenEval's "class").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Self::Circle => "circle",
            Self::Square => "square",
            Self::Triangle => "triangle",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// Named colours with their reference RGB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Color {
    pub const ALL: [Color; 6] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Red => "red",
            Self::Green => "green",
            Self::Blue => "blue",
            Self::Yellow => "yellow",
            Self::Purple => "purple",
            Self::Orange => "orange",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Reference colour (sRGB, 0–255).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Self::Red => [220, 40, 40],
            Self::Green => [40, 170, 60],
            Self::Blue => [40, 80, 220],
            Self::Yellow => [235, 210, 40],
            Self::Purple => [140, 50, 180],
            Self::Orange => [245, 130, 30],
        }
    }
}

/// One object: a shape of a colour, centred at (`cx`, `cy`) with half-size `r`, in units of the
/// image side (0–1), so a scene renders at any resolution.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub color: Color,
    pub cx: f32,
    pub cy: f32,
    pub r: f32,
    /// The exact RGB this object is painted with (its colour with a small jitter).
    pub rgb: [u8; 3],
}

/// A scene: background colour and objects.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub background: [u8; 3],
    pub objects: Vec<Object>,
}

/// Object size range (half-size as a fraction of the image side).
pub const MIN_R: f32 = 0.08;
pub const MAX_R: f32 = 0.14;
/// Gap kept between objects and to the frame (fraction of the side).
pub const MARGIN: f32 = 0.03;

/// A request for one object; the sampler picks its place (and its colour when `None`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Want {
    pub shape: Shape,
    pub color: Option<Color>,
}

/// Draws a plain light background and places `wants` without overlap; `constraint` may reject
/// a placement (for position prompts). Returns `None` if no placement was found in `tries`.
pub fn sample_scene(
    rng: &mut impl Rng,
    wants: &[Want],
    tries: usize,
    constraint: impl Fn(&[Object]) -> bool,
) -> Option<Scene> {
    let level = rng.random_range(225..=250u8);
    let tint = |rng: &mut dyn rand::RngCore| level.saturating_sub(rng.random_range(0..6u8));
    let background = [tint(rng), tint(rng), tint(rng)];
    'attempt: for _ in 0..tries {
        let mut objects: Vec<Object> = Vec::with_capacity(wants.len());
        for want in wants {
            let r = rng.random_range(MIN_R..MAX_R);
            let mut placed = false;
            for _ in 0..50 {
                let cx = rng.random_range(r + MARGIN..1.0 - r - MARGIN);
                let cy = rng.random_range(r + MARGIN..1.0 - r - MARGIN);
                if objects.iter().all(|o| {
                    ((o.cx - cx).powi(2) + (o.cy - cy).powi(2)).sqrt() > (o.r + r) * 1.45 + MARGIN
                }) {
                    let color = want
                        .color
                        .unwrap_or_else(|| Color::ALL[rng.random_range(0..Color::ALL.len())]);
                    let jitter = |c: u8, rng: &mut dyn rand::RngCore| {
                        (c as i32 + rng.random_range(-12..=12)).clamp(0, 255) as u8
                    };
                    let base = color.rgb();
                    let rgb = [
                        jitter(base[0], rng),
                        jitter(base[1], rng),
                        jitter(base[2], rng),
                    ];
                    objects.push(Object {
                        shape: want.shape,
                        color,
                        cx,
                        cy,
                        r,
                        rgb,
                    });
                    placed = true;
                    break;
                }
            }
            if !placed {
                continue 'attempt;
            }
        }
        if constraint(&objects) {
            return Some(Scene {
                background,
                objects,
            });
        }
    }
    None
}
