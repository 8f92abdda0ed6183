//! The Shapes-world detector: finds flat-colour shapes on a plain light background in an RGB
//! image and names their shape and colour, the way GenEval's detector + colour classifier do for
//! photos. Works at any resolution; tuned for 64×64, where shapes are 10–18 px across.
//!
//! Pipeline:
//! 1. background = per-channel median of the border pixels;
//! 2. foreground = pixels differing from it by ≥ [`FOREGROUND_MIN`] in some channel;
//! 3. *core* pixels = foreground pixels whose eight neighbours are foreground and of nearly the
//!    same colour (the flat inside of a shape), labelled with their colour name; core pixels are
//!    grouped into connected components (8-connectivity) per colour label, so touching shapes of
//!    different colours come apart;
//! 4. the remaining foreground pixels (anti-aliased edges, thin tips) join the nearest core
//!    component (breadth-first growth); a foreground blob without core pixels is one component;
//! 5. per component: its colour (median of the core pixels), a soft coverage α ∈ [0, 1] per
//!    pixel (projection onto the background→colour line), and from α the area, bbox, centre,
//!    fill ratio, aspect and skewness, which name the shape.
//!
//! Components smaller than [`MIN_AREA_FRACTION`] of the image are ignored (noise); larger ones
//! that are not a confident shape and colour are returned as [`Artifact`]s with a reason.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::render::Image;
use super::scene::{Color, Shape};

/// A pixel is foreground when some channel differs from the background by at least this much
/// (0–255). At 24, an anti-aliased edge pixel joins when ≳ 10–15 % covered.
pub const FOREGROUND_MIN: u8 = 24;
/// Core pixels differ from each of their neighbours by at most this much in every channel.
const FLAT_TOLERANCE: u8 = 24;
/// Components with a soft area below this fraction of the image (≈ 12 px at 64×64) are ignored.
pub const MIN_AREA_FRACTION: f32 = 0.003;
/// Components below this fraction of the image (≈ 20 px at 64×64; the smallest world shape is a
/// triangle of ≈ 52 px) are too small to name a shape: they are artifacts.
pub const MIN_SHAPE_FRACTION: f32 = 0.005;

/// One named shape found in an image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub shape: Shape,
    pub color: Color,
    /// `[x0, y0, x1, y1]` in pixels of the pixels at least half covered; x0, y0 inclusive, x1,
    /// y1 exclusive (so `x1 - x0` is the width).
    pub bbox: [f32; 4],
    /// Coverage-weighted centroid `[x, y]` in pixels (pixel centres at +0.5).
    pub center: [f32; 2],
    /// Soft area in pixels (sum of coverage).
    pub area: f32,
    /// 0.5–1: 0.5 at a decision boundary of shape or colour, 1 well inside both.
    pub confidence: f32,
}

/// Why a component is not a detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactReason {
    /// Too small to tell a shape (see [`MIN_SHAPE_FRACTION`]).
    TooSmall,
    /// Grey, black, white, brown, or a hue between named ranges.
    UnnamedColor,
    /// Neither circle, square nor upright triangle.
    UnknownShape,
}

/// A component that is neither ignorable noise nor a confident shape of a named colour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// As [`Detection::bbox`].
    pub bbox: [f32; 4],
    pub area: f32,
    pub reason: ArtifactReason,
}

/// Everything [`detect`] found.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Detections {
    pub objects: Vec<Detection>,
    pub artifacts: Vec<Artifact>,
    /// The estimated background colour.
    pub background: [u8; 3],
}

/// Finds the shapes in `image` (any size; an empty image has none).
pub fn detect(image: &Image) -> Detections {
    detect_with_components(image).1
}

/// [`detect`], also returning the measured components it named (for scores that read them,
/// such as the dense score): one pass over the image for both.
pub fn detect_with_components(image: &Image) -> (Vec<Component>, Detections) {
    let (found, background) = components(image);
    let named = name_components(&found, background, (image.width * image.height) as f32);
    (found, named)
}

/// Names measured [`components`] of an image of `total` pixels: shapes, or artifacts with a
/// reason.
fn name_components(components: &[Component], background: [u8; 3], total: f32) -> Detections {
    let mut found = Detections {
        background,
        ..Default::default()
    };
    for Component { rgb, measure } in components {
        let rgb = *rgb;
        let artifact = |reason| Artifact {
            bbox: measure.bbox,
            area: measure.area,
            reason,
        };
        if measure.area < MIN_SHAPE_FRACTION * total {
            found.artifacts.push(artifact(ArtifactReason::TooSmall));
            continue;
        }
        let Some((named, color_margin)) = name_color(rgb) else {
            found.artifacts.push(artifact(ArtifactReason::UnnamedColor));
            continue;
        };
        let Some((shape, shape_margin)) = classify_shape(measure) else {
            found.artifacts.push(artifact(ArtifactReason::UnknownShape));
            continue;
        };
        found.objects.push(Detection {
            shape,
            color: named,
            bbox: measure.bbox,
            center: measure.center,
            area: measure.area,
            confidence: 0.5 + 0.5 * color_margin.min(shape_margin),
        });
    }
    found
}

/// One foreground component of an image, measured but not named.
#[derive(Clone, Debug)]
pub struct Component {
    /// Its colour: the median of its flat inside.
    pub rgb: [u8; 3],
    pub measure: Measure,
}

/// The foreground components of `image` (steps 1–5 of the pipeline) that are not ignorable
/// noise (soft area ≥ [`MIN_AREA_FRACTION`] of the image), and the estimated background.
pub fn components(image: &Image) -> (Vec<Component>, [u8; 3]) {
    let (width, height) = (image.width, image.height);
    if width == 0 || height == 0 || image.pixels.len() != width * height {
        return (Vec::new(), [0; 3]);
    }
    let background = estimate_background(image);
    let foreground = foreground_mask(image, background);
    let flat = |a: [u8; 3], b: [u8; 3]| (0..3).all(|c| a[c].abs_diff(b[c]) <= FLAT_TOLERANCE);
    let core: Vec<bool> = (0..width * height)
        .map(|i| {
            foreground[i]
                && neighbours(i, width, height)
                    .all(|j| foreground[j] && flat(image.pixels[i], image.pixels[j]))
        })
        .collect();
    let label = |i: usize| name_color(image.pixels[i]).map(|(c, _)| c);
    let mut seeds: Vec<Vec<usize>> =
        connected_components(width, height, |i| core[i], |a, b| label(a) == label(b))
            .into_iter()
            .filter(|pixels| pixels.len() >= 3)
            .collect();
    let owner = grow(width, height, &foreground, &mut seeds);

    let mut members: Vec<Vec<usize>> = vec![Vec::new(); seeds.len()];
    for (i, o) in owner.iter().enumerate() {
        if let Some(o) = o {
            members[*o].push(i);
        }
    }
    let ignore_below = (MIN_AREA_FRACTION * (width * height) as f32).max(2.0);
    let components = members
        .iter()
        .zip(&seeds)
        .map(|(pixels, core_pixels)| {
            let rgb = component_color(image, background, core_pixels, pixels);
            let measure = Measure::of(image, width, pixels, background, rgb);
            Component { rgb, measure }
        })
        .filter(|c| c.measure.area >= ignore_below)
        .collect();
    (components, background)
}

/// Per-channel median of the border pixels (shapes keep off the frame, so the border is
/// background).
pub fn estimate_background(image: &Image) -> [u8; 3] {
    let (w, h) = (image.width, image.height);
    let border: Vec<[u8; 3]> = (0..w * h)
        .filter(|i| {
            let (x, y) = (i % w, i / w);
            x == 0 || y == 0 || x + 1 == w || y + 1 == h
        })
        .map(|i| image.pixels[i])
        .collect();
    median(&border)
}

/// Pixels differing from `background` by at least [`FOREGROUND_MIN`] in some channel.
pub fn foreground_mask(image: &Image, background: [u8; 3]) -> Vec<bool> {
    image
        .pixels
        .iter()
        .map(|p| (0..3).any(|c| p[c].abs_diff(background[c]) >= FOREGROUND_MIN))
        .collect()
}

/// Soft coverage of `pixel` by a surface of colour `color` over `background`: the projection of
/// `pixel - background` onto `color - background`, clamped to [0, 1].
pub fn coverage(pixel: [u8; 3], background: [u8; 3], color: [u8; 3]) -> f32 {
    let (mut dot, mut norm) = (0.0, 0.0);
    for c in 0..3 {
        let d = color[c] as f32 - background[c] as f32;
        dot += (pixel[c] as f32 - background[c] as f32) * d;
        norm += d * d;
    }
    if norm < 1.0 {
        return 0.0;
    }
    (dot / norm).clamp(0.0, 1.0)
}

/// Connected components (8-connectivity) of the pixels where `member` holds, neighbours joined
/// only when `joined(a, b)`. Pixels are row-major indices; components come in scan order of
/// their first pixel.
pub fn connected_components(
    width: usize,
    height: usize,
    member: impl Fn(usize) -> bool,
    joined: impl Fn(usize, usize) -> bool,
) -> Vec<Vec<usize>> {
    let mut seen = vec![false; width * height];
    let mut components = Vec::new();
    let mut queue = VecDeque::new();
    for start in 0..width * height {
        if seen[start] || !member(start) {
            continue;
        }
        seen[start] = true;
        queue.push_back(start);
        let mut pixels = Vec::new();
        while let Some(i) = queue.pop_front() {
            pixels.push(i);
            for j in neighbours(i, width, height) {
                if !seen[j] && member(j) && joined(i, j) {
                    seen[j] = true;
                    queue.push_back(j);
                }
            }
        }
        components.push(pixels);
    }
    components
}

/// The up-to-eight neighbours of pixel `i`.
fn neighbours(i: usize, width: usize, height: usize) -> impl Iterator<Item = usize> {
    let (x, y) = ((i % width) as isize, (i / width) as isize);
    (-1..=1isize)
        .flat_map(move |dy| (-1..=1isize).map(move |dx| (x + dx, y + dy)))
        .filter(move |&(nx, ny)| {
            (nx, ny) != (x, y) && nx >= 0 && ny >= 0 && nx < width as isize && ny < height as isize
        })
        .map(move |(nx, ny)| ny as usize * width + nx as usize)
}

/// Gives every foreground pixel to the seed it is nearest to (breadth-first through foreground,
/// 8-connectivity). Foreground blobs no seed reaches become new seeds of their own (with no core
/// pixels), appended to `seeds`. Returns the owner of each pixel.
fn grow(
    width: usize,
    height: usize,
    foreground: &[bool],
    seeds: &mut Vec<Vec<usize>>,
) -> Vec<Option<usize>> {
    let mut owner: Vec<Option<usize>> = vec![None; width * height];
    let mut queue = VecDeque::new();
    for (s, pixels) in seeds.iter().enumerate() {
        for &i in pixels {
            owner[i] = Some(s);
            queue.push_back(i);
        }
    }
    let spread = |owner: &mut Vec<Option<usize>>, queue: &mut VecDeque<usize>| {
        while let Some(i) = queue.pop_front() {
            for j in neighbours(i, width, height) {
                if foreground[j] && owner[j].is_none() {
                    owner[j] = owner[i];
                    queue.push_back(j);
                }
            }
        }
    };
    spread(&mut owner, &mut queue);
    for start in 0..width * height {
        if foreground[start] && owner[start].is_none() {
            owner[start] = Some(seeds.len());
            seeds.push(Vec::new());
            queue.push_back(start);
            spread(&mut owner, &mut queue);
        }
    }
    owner
}

fn median(colors: &[[u8; 3]]) -> [u8; 3] {
    if colors.is_empty() {
        return [255; 3];
    }
    std::array::from_fn(|c| {
        let mut channel: Vec<u8> = colors.iter().map(|p| p[c]).collect();
        channel.sort_unstable();
        channel[channel.len() / 2]
    })
}

/// A component's colour: the median of its core pixels, or without any, its pixel farthest from
/// the background.
fn component_color(
    image: &Image,
    background: [u8; 3],
    core_pixels: &[usize],
    pixels: &[usize],
) -> [u8; 3] {
    if !core_pixels.is_empty() {
        return median(
            &core_pixels
                .iter()
                .map(|&i| image.pixels[i])
                .collect::<Vec<_>>(),
        );
    }
    let distance = |i: usize| {
        (0..3)
            .map(|c| image.pixels[i][c].abs_diff(background[c]) as u32)
            .sum::<u32>()
    };
    pixels
        .iter()
        .map(|&i| (distance(i), i))
        .max()
        .map_or(background, |(_, i)| image.pixels[i])
}

/// Geometry of one component from its soft coverage.
#[derive(Clone, Debug)]
pub struct Measure {
    /// Soft area in pixels.
    pub area: f32,
    /// As [`Detection::bbox`].
    pub bbox: [f32; 4],
    /// As [`Detection::center`].
    pub center: [f32; 2],
    /// Widest row coverage / tallest column coverage (sub-pixel extents).
    pub width: f32,
    pub height: f32,
    /// Skewness of the coverage along x and y (y down: an upright triangle is ≈ −0.57).
    pub skew_x: f32,
    pub skew_y: f32,
    /// Kurtosis along the diagonals minus along the axes: 0 for a disc, ≈ +0.6 for an
    /// axis-aligned square (its diagonal profile is a tent, its axis profile flat). Moments
    /// integrate over the whole shape, so pixel quantisation barely moves this.
    pub corner_excess: f32,
}

impl Measure {
    fn of(
        image: &Image,
        width: usize,
        pixels: &[usize],
        background: [u8; 3],
        color: [u8; 3],
    ) -> Self {
        let alpha: Vec<(usize, usize, f32)> = pixels
            .iter()
            .map(|&i| {
                (
                    i % width,
                    i / width,
                    coverage(image.pixels[i], background, color),
                )
            })
            .collect();
        let area: f32 = alpha.iter().map(|p| p.2).sum();
        let mut bbox = [f32::MAX, f32::MAX, f32::MIN, f32::MIN];
        for &(x, y, a) in &alpha {
            if a >= 0.5 {
                bbox = [
                    bbox[0].min(x as f32),
                    bbox[1].min(y as f32),
                    bbox[2].max(x as f32 + 1.0),
                    bbox[3].max(y as f32 + 1.0),
                ];
            }
        }
        if bbox[0] > bbox[2] {
            bbox = [0.0; 4];
        }
        let mut rows = std::collections::BTreeMap::<usize, f32>::new();
        let mut cols = std::collections::BTreeMap::<usize, f32>::new();
        for &(x, y, a) in &alpha {
            *rows.entry(y).or_default() += a;
            *cols.entry(x).or_default() += a;
        }
        let moments = |axis: &dyn Fn(&(usize, usize, f32)) -> f32| {
            let total = area.max(f32::EPSILON);
            let mean = alpha.iter().map(|p| p.2 * axis(p)).sum::<f32>() / total;
            let central = |k: i32| {
                alpha
                    .iter()
                    .map(|p| p.2 * (axis(p) - mean).powi(k))
                    .sum::<f32>()
                    / total
            };
            let variance = central(2).max(1e-6);
            (
                mean,
                central(3) / variance.powf(1.5),
                central(4) / (variance * variance),
            )
        };
        // Pixel centres at +0.5.
        let (cx, skew_x, kurt_x) = moments(&|p| p.0 as f32 + 0.5);
        let (cy, skew_y, kurt_y) = moments(&|p| p.1 as f32 + 0.5);
        let (_, _, kurt_d1) = moments(&|p| (p.0 + p.1) as f32);
        let (_, _, kurt_d2) = moments(&|p| p.0 as f32 - p.1 as f32);
        Self {
            area,
            bbox,
            center: [cx, cy],
            width: rows.values().copied().fold(0.0, f32::max),
            height: cols.values().copied().fold(0.0, f32::max),
            skew_x,
            skew_y,
            corner_excess: (kurt_d1 + kurt_d2 - kurt_x - kurt_y) / 2.0,
        }
    }

    /// Area over the box of the sub-pixel extents: circle π/4, square 1, triangle ½.
    pub fn fill(&self) -> f32 {
        self.area / (self.width * self.height).max(f32::EPSILON)
    }
}

/// A feature's accepted interval for one class, and the scale its margin is measured in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub low: f32,
    pub high: f32,
    pub scale: f32,
}

impl Interval {
    const fn new(low: f32, high: f32, scale: f32) -> Self {
        Self { low, high, scale }
    }

    /// The distance inside over `scale`, capped at 1; `None` outside.
    fn margin(self, v: f32) -> Option<f32> {
        (v >= self.low && v <= self.high)
            .then(|| ((v - self.low).min(self.high - v) / self.scale).min(1.0))
    }

    /// 1 inside; outside, a Gaussian of the distance with a width of two margin scales — the
    /// soft counterpart of [`Interval::margin`] the dense score uses.
    pub fn soft(self, v: f32) -> f32 {
        let outside = (self.low - v).max(v - self.high).max(0.0);
        (-0.5 * (outside / (2.0 * self.scale)).powi(2)).exp()
    }
}

/// Circles have fewer corners than this ([`Measure::corner_excess`]), squares more.
const CORNERS: f32 = 0.34;
/// Below this skewness along y the mass sits low: a triangle.
const LOW_MASS: f32 = -0.3;

/// The features `shape` is named by: (value of `m`, the interval it must lie in).
///
/// Upright triangles put their mass low (skewness along y ≈ −0.56) and fill half their box;
/// circles and squares are level and fill π/4 and 1 of it, but at 10 px a pixel of quantisation
/// moves the box by 10 %, so they are told apart by [`Measure::corner_excess`] instead (circle
/// ≈ 0, square ≈ 0.6; measured −0.19…0.18 and 0.50…0.62 at 1, 16 and 64 samples per pixel).
/// Every shape is about as wide as tall and symmetric left to right.
pub fn shape_features(m: &Measure, shape: Shape) -> Vec<(f32, Interval)> {
    let aspect = (m.width / m.height.max(f32::EPSILON)).ln();
    let mut features = vec![
        (aspect, Interval::new(-0.35, 0.35, 0.15)),
        (m.skew_x, Interval::new(-0.25, 0.25, 0.12)),
    ];
    let level = Interval::new(-0.18, 0.18, 0.08);
    features.extend(match shape {
        Shape::Triangle => [
            (m.skew_y, Interval::new(-0.9, LOW_MASS, 0.12)),
            (m.fill(), Interval::new(0.4, 0.7, 0.05)),
        ]
        .to_vec(),
        Shape::Circle => [
            (m.skew_y, level),
            (m.corner_excess, Interval::new(-0.4, CORNERS, 0.12)),
            (m.fill(), Interval::new(0.6, 0.93, 0.05)),
        ]
        .to_vec(),
        Shape::Square => [
            (m.skew_y, level),
            (m.corner_excess, Interval::new(CORNERS, 1.0, 0.12)),
            (m.fill(), Interval::new(0.88, 1.12, 0.05)),
        ]
        .to_vec(),
    });
    features
}

/// Names the shape with a margin in [0, 1] (0 at a decision boundary); `None` for anything else.
/// Mass low makes a triangle, else corners make a square, else a circle; then every feature of
/// that shape ([`shape_features`]) must lie in its interval, and the margin is the smallest.
fn classify_shape(m: &Measure) -> Option<(Shape, f32)> {
    let shape = if m.skew_y < LOW_MASS {
        Shape::Triangle
    } else if m.corner_excess < CORNERS {
        Shape::Circle
    } else {
        Shape::Square
    };
    let margin = shape_features(m, shape)
        .into_iter()
        .try_fold(1.0f32, |low, (v, interval)| {
            Some(low.min(interval.margin(v)?))
        })?;
    Some((shape, margin))
}

/// How much a measured component looks like `shape`, in (0, 1]: 1 where the detector would
/// name it so, falling off softly ([`Interval::soft`]) with each feature's distance outside.
pub fn shape_likelihood(m: &Measure, shape: Shape) -> f32 {
    shape_features(m, shape)
        .into_iter()
        .map(|(v, interval)| interval.soft(v))
        .product()
}

/// Hue (degrees, 0–360), saturation and value (0–1) of an sRGB colour.
pub fn rgb_to_hsv(rgb: [u8; 3]) -> (f32, f32, f32) {
    let [r, g, b] = rgb.map(|c| c as f32 / 255.0);
    let max = r.max(g).max(b);
    let chroma = max - r.min(g).min(b);
    let hue = if chroma <= 0.0 {
        0.0
    } else if max == r {
        60.0 * ((g - b) / chroma).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / chroma + 2.0)
    } else {
        60.0 * ((r - g) / chroma + 4.0)
    };
    let saturation = if max > 0.0 { chroma / max } else { 0.0 };
    (hue, saturation, max)
}

/// The sRGB colour of a hue (degrees), saturation and value (0–1).
pub fn hsv_to_rgb(hue: f32, saturation: f32, value: f32) -> [u8; 3] {
    let h = hue.rem_euclid(360.0) / 60.0;
    let chroma = value * saturation;
    let x = chroma * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (chroma, x, 0.0),
        1 => (x, chroma, 0.0),
        2 => (0.0, chroma, x),
        3 => (0.0, x, chroma),
        4 => (x, 0.0, chroma),
        _ => (chroma, 0.0, x),
    };
    let m = value - chroma;
    [r, g, b].map(|c| ((c + m) * 255.0).round().clamp(0.0, 255.0) as u8)
}

/// Hue ranges of the named colours, degrees `[from, to)`; red wraps through 0. Boundaries sit
/// midway between typical hues (red 0, orange 28, yellow 52, green 129, blue 227, purple 281),
/// so a colour may drift ≈ ±10° before it changes name.
pub const HUE_RANGES: [(Color, f32, f32); 6] = [
    (Color::Red, 325.0, 14.0),
    (Color::Orange, 14.0, 40.0),
    (Color::Yellow, 40.0, 75.0),
    (Color::Green, 75.0, 175.0),
    (Color::Blue, 175.0, 255.0),
    (Color::Purple, 255.0, 325.0),
];
/// Below this saturation a colour is grey / white / black, not a named colour.
pub const MIN_SATURATION: f32 = 0.35;
/// Below this value a colour is too dark to name (black); orange and yellow need
/// [`MIN_WARM_VALUE`] (darker ones are brown / olive).
pub const MIN_VALUE: f32 = 0.3;
pub const MIN_WARM_VALUE: f32 = 0.55;

/// Names a colour by hue range, with a margin in [0, 1] (hue distance to the nearest range
/// boundary over 10°, saturation distance over 0.1). `None` for greys, black, brown.
pub fn name_color(rgb: [u8; 3]) -> Option<(Color, f32)> {
    let (hue, saturation, value) = rgb_to_hsv(rgb);
    if saturation < MIN_SATURATION || value < MIN_VALUE {
        return None;
    }
    let (color, from, to) = HUE_RANGES.into_iter().find(|&(_, from, to)| {
        if from < to {
            (from..to).contains(&hue)
        } else {
            hue >= from || hue < to
        }
    })?;
    if matches!(color, Color::Orange | Color::Yellow) && value < MIN_WARM_VALUE {
        return None;
    }
    let to_from = (hue - from).rem_euclid(360.0);
    let to_to = (to - hue).rem_euclid(360.0);
    let margin = (to_from.min(to_to) / 10.0)
        .min((saturation - MIN_SATURATION) / 0.1)
        .min(1.0);
    Some((color, margin))
}

/// How much `rgb` looks like `color`, in [0, 1]: 1 where [`name_color`] names it so, falling
/// off softly outside the hue range (width 10°, [`name_color`]'s margin scale: a red 14° into
/// orange keeps ≈ 0.4), and below the saturation and value floors (width 0.1).
pub fn color_likelihood(rgb: [u8; 3], color: Color) -> f32 {
    let (hue, saturation, value) = rgb_to_hsv(rgb);
    let Some(&(_, from, to)) = HUE_RANGES.iter().find(|r| r.0 == color) else {
        return 0.0;
    };
    let inside_hue = if from < to {
        (from..to).contains(&hue)
    } else {
        hue >= from || hue < to
    };
    let hue_outside = if inside_hue {
        0.0
    } else {
        (from - hue)
            .rem_euclid(360.0)
            .min((hue - to).rem_euclid(360.0))
    };
    let floor = if matches!(color, Color::Orange | Color::Yellow) {
        MIN_WARM_VALUE
    } else {
        MIN_VALUE
    };
    let gauss = |outside: f32, width: f32| (-0.5 * (outside.max(0.0) / width).powi(2)).exp();
    gauss(hue_outside, 10.0) * gauss(MIN_SATURATION - saturation, 0.1) * gauss(floor - value, 0.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::render::render;
    use crate::world::scene::{Object, Scene};

    fn scene(objects: &[(Shape, Color, f32, f32, f32)]) -> Scene {
        Scene {
            background: [240, 238, 236],
            objects: objects
                .iter()
                .map(|&(shape, color, cx, cy, r)| Object {
                    shape,
                    color,
                    cx,
                    cy,
                    r,
                    rgb: color.rgb(),
                })
                .collect(),
        }
    }

    #[test]
    fn palette_colours_have_their_names() {
        for color in Color::ALL {
            let (named, margin) = name_color(color.rgb()).unwrap();
            assert_eq!(named, color);
            assert!(margin > 0.9, "{color:?} margin {margin}");
        }
        for grey_or_brown in [
            [128, 128, 128],
            [20, 20, 25],
            [250, 250, 250],
            [110, 70, 30],
        ] {
            assert_eq!(name_color(grey_or_brown), None, "{grey_or_brown:?}");
        }
        for color in Color::ALL {
            let (h, s, v) = rgb_to_hsv(color.rgb());
            let back = hsv_to_rgb(h, s, v);
            assert!(
                (0..3).all(|c| back[c].abs_diff(color.rgb()[c]) <= 1),
                "{color:?}"
            );
        }
    }

    #[test]
    fn finds_each_shape_with_its_box() {
        let s = scene(&[
            (Shape::Circle, Color::Red, 0.25, 0.25, 0.1),
            (Shape::Square, Color::Blue, 0.7, 0.3, 0.1),
            (Shape::Triangle, Color::Yellow, 0.4, 0.72, 0.1),
        ]);
        let found = detect(&render(&s, 64));
        assert!(found.artifacts.is_empty(), "{:?}", found.artifacts);
        assert_eq!(found.objects.len(), 3, "{:?}", found.objects);
        for (o, d) in s.objects.iter().zip(&found.objects) {
            assert_eq!((d.shape, d.color), (o.shape, o.color), "{d:?}");
            assert!((d.center[0] - o.cx * 64.0).abs() < 1.0, "{d:?}");
            assert!(d.confidence > 0.7, "{d:?}");
        }
        // The circle spans 0.15–0.35 of the side: 9.6–22.4 px.
        assert_eq!(found.objects[0].bbox, [10.0, 10.0, 22.0, 22.0]);
    }

    #[test]
    fn touching_shapes_of_different_colours_separate() {
        let s = scene(&[
            (Shape::Square, Color::Green, 0.4, 0.5, 0.12),
            (
                Shape::Square,
                Color::Purple,
                0.4 + 2.0 * 0.88 * 0.12,
                0.5,
                0.12,
            ),
        ]);
        let found = detect(&render(&s, 64));
        let mut named: Vec<_> = found.objects.iter().map(|d| (d.shape, d.color)).collect();
        named.sort();
        assert_eq!(
            named,
            [
                (Shape::Square, Color::Green),
                (Shape::Square, Color::Purple)
            ]
        );
    }

    #[test]
    fn unnamed_blobs_are_artifacts_and_specks_are_ignored() {
        let mut image = render(&scene(&[(Shape::Circle, Color::Blue, 0.3, 0.3, 0.12)]), 64);
        // A grey square and a brown one, 8×8 px, and a 2×2 speck.
        for (x0, y0, n, rgb) in [
            (40, 40, 8, [100, 100, 100]),
            (10, 45, 8, [110, 70, 30]),
            (50, 10, 2, [0, 0, 0]),
        ] {
            for y in y0..y0 + n {
                for x in x0..x0 + n {
                    image.pixels[y * 64 + x] = rgb;
                }
            }
        }
        let found = detect(&image);
        assert_eq!(found.objects.len(), 1);
        assert_eq!(found.artifacts.len(), 2, "{:?}", found.artifacts);
        assert!(
            found
                .artifacts
                .iter()
                .all(|a| a.reason == ArtifactReason::UnnamedColor)
        );
    }

    #[test]
    fn degenerate_images_give_nothing() {
        for (w, h) in [(0, 0), (1, 1), (3, 1), (64, 64)] {
            let image = Image {
                width: w,
                height: h,
                pixels: vec![[240; 3]; w * h],
            };
            assert_eq!(detect(&image).objects.len(), 0);
        }
        let broken = Image {
            width: 4,
            height: 4,
            pixels: vec![],
        };
        assert_eq!(detect(&broken), Detections::default());
    }
}
