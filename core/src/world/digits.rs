//! The digits task, the Shapes world's analogue of text rendering: prompts `the number "37"`
//! (1–4 digits), a stroke-font renderer drawing the number on a light background, a template
//! OCR reading it back, and Flow-GRPO's OCR reward (ALGORITHMS.md §1.9).
//!
//! The OCR: foreground by distance to the background (as the shape detector), one glyph per
//! connected component (8-connectivity; components overlapping in x are merged), glyphs read
//! left to right, each normalised to a [`GRID_W`]×[`GRID_H`] coverage grid (height fills the
//! grid, aspect kept, centred) and named by the template with the highest correlation. Templates
//! are this font's digits at two stroke widths, read through the same path, so the match is
//! independent of scale, position, colour and (within the font's range) stroke width.

use std::sync::OnceLock;

use rand::Rng;

use super::detect::{
    connected_components, coverage, estimate_background, foreground_mask, hsv_to_rgb,
};
use super::render::Image;

/// The prompt asking for `number`: `the number "37"`.
pub fn prompt_for(number: &str) -> String {
    format!("the number \"{number}\"")
}

/// The text between the first pair of double quotes (Flow-GRPO's OCR target), if any.
pub fn quoted(prompt: &str) -> Option<&str> {
    let mut parts = prompt.split('"');
    parts.next();
    let inside = parts.next()?;
    // A lone opening quote has no closing one.
    parts.next().map(|_| inside)
}

/// Whether GRPO holds `number` out of training for its held-out evaluation (one in 25 of 0–999:
/// 12, 37, …, 987). Pretraining draws every number, as a real base has seen all text.
pub fn is_held_out(number: usize) -> bool {
    number % 25 == 12
}

/// The held-out numbers' prompts, ascending.
pub fn held_out_prompts() -> Vec<String> {
    (0..1000)
        .filter(|&n| is_held_out(n))
        .map(|n| prompt_for(&n.to_string()))
        .collect()
}

/// A random number of 1–4 digits, without a leading zero unless it is "0".
pub fn random_number(rng: &mut impl Rng) -> String {
    let len = rng.random_range(1..=4);
    (0..len)
        .map(|i| {
            let low = if i == 0 && len > 1 { 1 } else { 0 };
            char::from(b'0' + rng.random_range(low..=9u8))
        })
        .collect()
}

/// Levenshtein distance between two strings, in characters.
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diagonal + (ca != *cb) as usize)
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Flow-GRPO's OCR reward (`flow_grpo/ocr.py`): target = the prompt's first quoted text; both
/// strings lose their spaces and are lowercased; the target found inside the recognised text
/// scores 1, otherwise `1 − min(levenshtein, len)/len`. Where the reference would raise (no
/// quoted text, empty target) the reward is 0.
pub fn ocr_reward(prompt: &str, recognised: &str) -> f32 {
    let normalise = |s: &str| s.replace(' ', "").to_lowercase();
    let Some(target) = quoted(prompt).map(normalise) else {
        return 0.0;
    };
    let len = target.chars().count();
    if len == 0 {
        return 0.0;
    }
    let recognised = normalise(recognised);
    let distance = if recognised.contains(&target) {
        0
    } else {
        levenshtein(&recognised, &target).min(len)
    };
    1.0 - distance as f32 / len as f32
}

/// Glyph box width in units of the glyph height; strokes' centrelines stay inside
/// `[0, GLYPH_WIDTH] × [0, 1]` (y down).
pub const GLYPH_WIDTH: f32 = 0.6;

/// Polyline points of an elliptical arc, angles in degrees (0 = right, 90 = down), either
/// direction.
fn arc(cx: f32, cy: f32, rx: f32, ry: f32, from: f32, to: f32) -> Vec<(f32, f32)> {
    let steps = ((to - from).abs() / 15.0).ceil().max(1.0) as usize;
    (0..=steps)
        .map(|k| {
            let a = (from + (to - from) * k as f32 / steps as f32).to_radians();
            (cx + rx * a.cos(), cy + ry * a.sin())
        })
        .collect()
}

fn joined(parts: &[Vec<(f32, f32)>]) -> Vec<(f32, f32)> {
    parts.concat()
}

/// The strokes (polylines) of a digit in glyph units; `None` for other characters.
fn strokes(digit: char) -> Option<Vec<Vec<(f32, f32)>>> {
    let w = GLYPH_WIDTH;
    Some(match digit {
        '0' => vec![arc(w / 2.0, 0.5, w / 2.0, 0.5, 0.0, 360.0)],
        '1' => vec![vec![(0.1, 0.22), (0.36, 0.0), (0.36, 1.0)]],
        '2' => vec![joined(&[
            arc(0.3, 0.28, 0.3, 0.28, 165.0, 395.0),
            vec![(0.0, 1.0), (w, 1.0)],
        ])],
        '3' => vec![
            arc(0.3, 0.26, 0.27, 0.26, 200.0, 450.0),
            arc(0.3, 0.76, 0.3, 0.24, 270.0, 520.0),
        ],
        '4' => vec![vec![(0.46, 1.0), (0.46, 0.0), (0.0, 0.68), (w, 0.68)]],
        '5' => vec![joined(&[
            vec![(0.56, 0.0), (0.08, 0.0), (0.05, 0.47)],
            arc(0.3, 0.7, 0.3, 0.3, 225.0, 495.0),
        ])],
        '6' => vec![joined(&[
            vec![(0.52, 0.0), (0.22, 0.22)],
            arc(0.3, 0.7, 0.3, 0.3, 205.0, 565.0),
        ])],
        '7' => vec![vec![(0.0, 0.0), (w, 0.0), (0.2, 1.0)]],
        '8' => vec![
            arc(0.3, 0.25, 0.25, 0.25, 0.0, 360.0),
            arc(0.3, 0.73, 0.3, 0.27, 0.0, 360.0),
        ],
        '9' => vec![
            arc(0.3, 0.3, 0.3, 0.3, 0.0, 360.0),
            vec![(w, 0.3), (0.56, 0.58), (0.38, 0.85), (0.08, 1.0)],
        ],
        _ => return None,
    })
}

/// Where and how a number is drawn; lengths in units of the image side.
#[derive(Clone, Debug, PartialEq)]
pub struct TextStyle {
    /// Top-left corner of the first glyph box.
    pub x: f32,
    pub y: f32,
    /// Glyph height.
    pub height: f32,
    /// Stroke width as a fraction of the height.
    pub stroke: f32,
    /// Gap between glyph boxes as a fraction of the height.
    pub gap: f32,
    pub color: [u8; 3],
}

impl TextStyle {
    /// Width of `len` glyphs including the stroke overhang, in image-side units.
    pub fn width(&self, len: usize) -> f32 {
        let len = len.max(1) as f32;
        self.height * (len * GLYPH_WIDTH + (len - 1.0) * self.gap + self.stroke)
    }

    /// A random style for `len` glyphs that fits the image: heights 0.22–0.45 of the side
    /// (14–29 px at 64×64), strokes 0.1–0.16 of the height, a dark or saturated colour.
    pub fn random(rng: &mut impl Rng, len: usize) -> Self {
        let stroke = rng.random_range(0.1..0.16);
        let gap = rng.random_range(0.28..0.4);
        let mut style = Self {
            x: 0.0,
            y: 0.0,
            height: 1.0,
            stroke,
            gap,
            color: hsv_to_rgb(
                rng.random_range(0.0..360.0),
                rng.random_range(0.3..1.0),
                rng.random_range(0.1..0.7),
            ),
        };
        // At most 0.9 of the side wide (4 digits: ≤ 0.24 high).
        let tallest = (0.9 / style.width(len)).min(0.45);
        style.height = rng.random_range(0.22..tallest.max(0.23));
        // Ink overhangs the glyph boxes by half a stroke; keep 0.04 of the side clear.
        let overhang = style.height * stroke / 2.0;
        let (ink_width, ink_height) = (style.width(len), style.height + 2.0 * overhang);
        let free = |ink: f32| (1.0 - 0.08 - ink).max(1e-3);
        style.x = 0.04 + overhang + rng.random_range(0.0..free(ink_width));
        style.y = 0.04 + overhang + rng.random_range(0.0..free(ink_height));
        style
    }
}

/// Distance from `p` to the segment `a`–`b`.
fn segment_distance(p: (f32, f32), a: (f32, f32), b: (f32, f32)) -> f32 {
    let (abx, aby) = (b.0 - a.0, b.1 - a.1);
    let length2 = abx * abx + aby * aby;
    let t = if length2 > 0.0 {
        (((p.0 - a.0) * abx + (p.1 - a.1) * aby) / length2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    (p.0 - a.0 - t * abx).hypot(p.1 - a.1 - t * aby)
}

/// Draws the digits of `text` into `image` (other characters leave a blank glyph box),
/// anti-aliased: a pixel is covered by `stroke/2 − distance + ½` (in pixels, clamped), the
/// area of a pixel-wide box filter across a straight stroke edge.
pub fn draw_text(image: &mut Image, text: &str, style: &TextStyle) {
    let side = image.width.max(image.height) as f32;
    let height_px = style.height * side;
    let half_stroke = style.stroke * height_px / 2.0;
    for (k, ch) in text.chars().enumerate() {
        let Some(glyph) = strokes(ch) else { continue };
        let left = style.x * side + k as f32 * (GLYPH_WIDTH + style.gap) * height_px;
        let top = style.y * side;
        let to_px = |(gx, gy): (f32, f32)| (left + gx * height_px, top + gy * height_px);
        let segments: Vec<((f32, f32), (f32, f32))> = glyph
            .iter()
            .flat_map(|line| line.windows(2).map(|w| (to_px(w[0]), to_px(w[1]))))
            .collect();
        let reach = half_stroke + 1.0;
        let x0 = (left - reach).floor().max(0.0) as usize;
        let y0 = (top - reach).floor().max(0.0) as usize;
        let x1 =
            ((left + GLYPH_WIDTH * height_px + reach).ceil().max(0.0) as usize).min(image.width);
        let y1 = ((top + height_px + reach).ceil().max(0.0) as usize).min(image.height);
        for py in y0..y1 {
            for px in x0..x1 {
                let centre = (px as f32 + 0.5, py as f32 + 0.5);
                let distance = segments
                    .iter()
                    .map(|&(a, b)| segment_distance(centre, a, b))
                    .fold(f32::MAX, f32::min);
                let alpha = (half_stroke - distance + 0.5).clamp(0.0, 1.0);
                if alpha > 0.0 {
                    let pixel = &mut image.pixels[py * image.width + px];
                    *pixel = std::array::from_fn(|c| {
                        (pixel[c] as f32 * (1.0 - alpha) + style.color[c] as f32 * alpha).round()
                            as u8
                    });
                }
            }
        }
    }
}

/// A `size`×`size` image of `number` in a random style on a light background.
pub fn render_number(rng: &mut impl Rng, number: &str, size: usize) -> Image {
    let level = rng.random_range(225..=250u8);
    let background: [u8; 3] =
        std::array::from_fn(|_| level.saturating_sub(rng.random_range(0..6u8)));
    let mut image = Image {
        width: size,
        height: size,
        pixels: vec![background; size * size],
    };
    let style = TextStyle::random(rng, number.chars().count());
    draw_text(&mut image, number, &style);
    image
}

/// Normalised glyph grid size (columns × rows).
pub const GRID_W: usize = 12;
pub const GRID_H: usize = 16;

/// One glyph's coverage on the normalised grid, zero-mean and unit-norm (so a dot product is a
/// correlation).
type Grid = [f32; GRID_W * GRID_H];

/// Reads the digits in `image`, left to right (empty if none).
pub fn read_digits(image: &Image) -> String {
    let templates = templates();
    glyph_grids(image)
        .iter()
        .map(|grid| {
            let score = |t: &Grid| t.iter().zip(grid).map(|(a, b)| a * b).sum::<f32>();
            templates
                .iter()
                .max_by(|a, b| score(&a.1).total_cmp(&score(&b.1)))
                .map_or('?', |t| t.0)
        })
        .collect()
}

/// The templates: every digit of the font at a thin and a thick stroke, read like an input.
fn templates() -> &'static [(char, Grid)] {
    static TEMPLATES: OnceLock<Vec<(char, Grid)>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let mut out = Vec::new();
        for stroke in [0.1, 0.16] {
            for digit in '0'..='9' {
                let mut image = Image {
                    width: 64,
                    height: 64,
                    pixels: vec![[240; 3]; 64 * 64],
                };
                let style = TextStyle {
                    x: 0.25,
                    y: 0.1,
                    height: 0.75,
                    stroke,
                    gap: 0.3,
                    color: [0; 3],
                };
                draw_text(&mut image, &digit.to_string(), &style);
                let grids = glyph_grids(&image);
                assert_eq!(grids.len(), 1, "template {digit} is one glyph");
                out.push((digit, grids[0]));
            }
        }
        out
    })
}

/// Segments `image` into glyphs (left to right) and normalises each.
fn glyph_grids(image: &Image) -> Vec<Grid> {
    let (width, height) = (image.width, image.height);
    if width == 0 || height == 0 || image.pixels.len() != width * height {
        return Vec::new();
    }
    let background = estimate_background(image);
    let foreground = foreground_mask(image, background);
    let mut glyphs = connected_components(width, height, |i| foreground[i], |_, _| true);
    let largest = glyphs.iter().map(Vec::len).max().unwrap_or(0);
    glyphs.retain(|g| g.len() >= 3 && g.len() * 8 >= largest);
    let x_range = |g: &[usize]| {
        let xs = g.iter().map(|&i| i % width);
        (xs.clone().min().unwrap_or(0), xs.max().unwrap_or(0))
    };
    glyphs.sort_by_key(|g| x_range(g).0);
    // Merge pieces of one broken glyph: x-ranges overlapping by half the narrower.
    let mut merged: Vec<Vec<usize>> = Vec::new();
    for g in glyphs {
        if let Some(last) = merged.last_mut() {
            let (a, b) = (x_range(last), x_range(&g));
            let overlap = a.1.min(b.1) as isize - a.0.max(b.0) as isize + 1;
            let narrower = (a.1 - a.0).min(b.1 - b.0) as isize + 1;
            if overlap * 2 >= narrower {
                last.extend(g);
                continue;
            }
        }
        merged.push(g);
    }
    merged
        .iter()
        .map(|g| normalise_glyph(image, background, g))
        .collect()
}

/// The glyph's coverage resampled onto the grid: its bbox scaled so its height fills the grid,
/// centred horizontally, each cell the mean of 3×3 bilinear samples.
fn normalise_glyph(image: &Image, background: [u8; 3], pixels: &[usize]) -> Grid {
    let width = image.width;
    let distance = |i: usize| {
        (0..3)
            .map(|c| image.pixels[i][c].abs_diff(background[c]) as u32)
            .sum::<u32>()
    };
    let ink = pixels
        .iter()
        .map(|&i| (distance(i), i))
        .max()
        .map_or(background, |(_, i)| image.pixels[i]);
    let (xs, ys) = (
        pixels.iter().map(|&i| i % width),
        pixels.iter().map(|&i| i / width),
    );
    let (x0, x1) = (xs.clone().min().unwrap_or(0), xs.max().unwrap_or(0) + 1);
    let (y0, y1) = (ys.clone().min().unwrap_or(0), ys.max().unwrap_or(0) + 1);
    let member: std::collections::HashSet<usize> = pixels.iter().copied().collect();
    let alpha = |x: isize, y: isize| -> f32 {
        if x < x0 as isize || y < y0 as isize || x >= x1 as isize || y >= y1 as isize {
            return 0.0;
        }
        let i = y as usize * width + x as usize;
        if member.contains(&i) {
            coverage(image.pixels[i], background, ink)
        } else {
            0.0
        }
    };
    let bilinear = |x: f32, y: f32| {
        let (fx, fy) = (x - 0.5, y - 0.5);
        let (ix, iy) = (fx.floor(), fy.floor());
        let (tx, ty) = (fx - ix, fy - iy);
        let (ix, iy) = (ix as isize, iy as isize);
        alpha(ix, iy) * (1.0 - tx) * (1.0 - ty)
            + alpha(ix + 1, iy) * tx * (1.0 - ty)
            + alpha(ix, iy + 1) * (1.0 - tx) * ty
            + alpha(ix + 1, iy + 1) * tx * ty
    };
    let scale = (y1 - y0) as f32 / GRID_H as f32; // source pixels per cell
    let centre_x = (x0 + x1) as f32 / 2.0;
    let mut grid: Grid = [0.0; GRID_W * GRID_H];
    for row in 0..GRID_H {
        for col in 0..GRID_W {
            let mut sum = 0.0;
            for sy in 0..3 {
                for sx in 0..3 {
                    let gx = col as f32 + (sx as f32 + 0.5) / 3.0 - GRID_W as f32 / 2.0;
                    let gy = row as f32 + (sy as f32 + 0.5) / 3.0;
                    sum += bilinear(centre_x + gx * scale, y0 as f32 + gy * scale);
                }
            }
            grid[row * GRID_W + col] = sum / 9.0;
        }
    }
    let mean = grid.iter().sum::<f32>() / grid.len() as f32;
    grid.iter_mut().for_each(|v| *v -= mean);
    let norm = grid.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
    grid.iter_mut().for_each(|v| *v /= norm);
    grid
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn prompts_carry_their_target() {
        assert_eq!(prompt_for("37"), "the number \"37\"");
        assert_eq!(quoted(&prompt_for("0451")), Some("0451"));
        assert_eq!(quoted("a \"b\" and \"c\""), Some("b"));
        assert_eq!(quoted("no quotes"), None);
        assert_eq!(quoted("only \"one"), None);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let n = random_number(&mut rng);
            assert!(
                (1..=4).contains(&n.len()) && n.chars().all(|c| c.is_ascii_digit()),
                "{n}"
            );
            assert!(n.len() == 1 || !n.starts_with('0'), "{n}");
        }
    }

    #[test]
    fn reward_follows_flow_grpo() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
        let p = prompt_for("1234");
        assert_eq!(ocr_reward(&p, "1234"), 1.0);
        // Substring rule: extra text around the target costs nothing.
        assert_eq!(ocr_reward(&p, "x1234y"), 1.0);
        assert_eq!(ocr_reward(&p, "12 34"), 1.0);
        assert_eq!(ocr_reward(&p, "1284"), 0.75);
        assert_eq!(ocr_reward(&p, "12"), 0.5);
        // Distance capped at the target length.
        assert_eq!(ocr_reward(&p, "987654321"), 0.0);
        assert_eq!(ocr_reward("the word \"AbC\"", "abc"), 1.0);
        assert_eq!(ocr_reward("no quotes", "1"), 0.0);
        assert_eq!(ocr_reward("the number \" \"", "1"), 0.0);
    }

    #[test]
    fn ocr_reads_random_renders() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let n = 2000;
        let mut exact = 0;
        let mut shown = 0;
        for _ in 0..n {
            let number = random_number(&mut rng);
            let image = render_number(&mut rng, &number, 64);
            let read = read_digits(&image);
            if read == number {
                exact += 1;
            } else if shown < 10 {
                shown += 1;
                eprintln!("MISS {number} read {read}");
            }
        }
        let rate = exact as f32 / n as f32;
        eprintln!("exact reads: {rate}");
        assert!(rate >= 0.995, "exact reads {rate}");
    }

    #[test]
    fn ocr_reads_other_resolutions() {
        let mut rng = ChaCha8Rng::seed_from_u64(22);
        for size in [48, 128] {
            let exact = (0..500)
                .filter(|_| {
                    let number = random_number(&mut rng);
                    read_digits(&render_number(&mut rng, &number, size)) == number
                })
                .count();
            assert!(exact >= 495, "{size}×{size}: {exact}/500 exact");
        }
    }

    #[test]
    fn ocr_of_blank_or_tiny_images_is_empty() {
        for (w, h) in [(0, 0), (1, 1), (64, 64)] {
            let image = Image {
                width: w,
                height: h,
                pixels: vec![[230; 3]; w * h],
            };
            assert_eq!(read_digits(&image), "");
        }
    }
}
