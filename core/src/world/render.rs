//! Anti-aliased rendering of a scene: each pixel is the average of 4×4 sub-samples (or of a
//! chosen number, for robustness tests).

use super::scene::{Object, Scene, Shape};

/// An RGB image, row-major, 8 bits per channel.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<[u8; 3]>,
}

impl Image {
    pub fn get(&self, x: usize, y: usize) -> [u8; 3] {
        self.pixels[y * self.width + x]
    }
}

/// Whether the point (x, y) (image-side units) is inside `object`.
pub fn covers(object: &Object, x: f32, y: f32) -> bool {
    let (dx, dy) = (x - object.cx, y - object.cy);
    let r = object.r;
    match object.shape {
        Shape::Circle => dx * dx + dy * dy <= r * r,
        // Same area as the circle would look too big; 0.88 r keeps the visual sizes close.
        Shape::Square => dx.abs() <= 0.88 * r && dy.abs() <= 0.88 * r,
        // Upright isosceles triangle inscribed in the box of half-size r: apex at the top.
        Shape::Triangle => {
            let t = (dy + r) / (2.0 * r); // 0 at the apex, 1 at the base
            (0.0..=1.0).contains(&t) && dx.abs() <= t * r
        }
    }
}

/// Sub-samples per pixel side used by [`render`].
pub const SUBSAMPLES: usize = 4;

/// Renders `scene` at `size`×`size` pixels, each pixel the average of 4×4 sub-samples.
pub fn render(scene: &Scene, size: usize) -> Image {
    render_supersampled(scene, size, SUBSAMPLES)
}

/// Renders `scene` at `size`×`size` pixels, each pixel the average of `samples`×`samples`
/// sub-samples (1 = no anti-aliasing: the colour at the pixel centre).
pub fn render_supersampled(scene: &Scene, size: usize, samples: usize) -> Image {
    let samples = samples.max(1);
    let n = (samples * samples) as u32;
    let mut pixels = Vec::with_capacity(size * size);
    for py in 0..size {
        for px in 0..size {
            // Objects whose box reaches this pixel; most pixels have none and are background.
            let (x0, y0) = (px as f32 / size as f32, py as f32 / size as f32);
            let x1 = x0 + 1.0 / size as f32;
            let y1 = y0 + 1.0 / size as f32;
            let near: Vec<&Object> = scene
                .objects
                .iter()
                .filter(|o| {
                    o.cx + o.r >= x0 && o.cx - o.r <= x1 && o.cy + o.r >= y0 && o.cy - o.r <= y1
                })
                .collect();
            if near.is_empty() {
                pixels.push(scene.background);
                continue;
            }
            let mut sum = [0u32; 3];
            for sy in 0..samples {
                for sx in 0..samples {
                    let x = (px as f32 + (sx as f32 + 0.5) / samples as f32) / size as f32;
                    let y = (py as f32 + (sy as f32 + 0.5) / samples as f32) / size as f32;
                    let rgb = near
                        .iter()
                        .rev()
                        .find(|o| covers(o, x, y))
                        .map_or(scene.background, |o| o.rgb);
                    for c in 0..3 {
                        sum[c] += rgb[c] as u32;
                    }
                }
            }
            pixels.push(sum.map(|s| ((s + n / 2) / n) as u8));
        }
    }
    Image {
        width: size,
        height: size,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::scene::Color;

    #[test]
    fn shapes_have_their_expected_fill_ratios() {
        // Area inside the r-box: circle π/4·4r², square 0.88²·4r², triangle ½·4r².
        let ratio = |shape| {
            let o = Object {
                shape,
                color: Color::Red,
                cx: 0.5,
                cy: 0.5,
                r: 0.25,
                rgb: [0; 3],
            };
            let n = 400;
            let inside = (0..n * n)
                .filter(|i| {
                    covers(
                        &o,
                        0.25 + 0.5 * (i % n) as f32 / n as f32,
                        0.25 + 0.5 * (i / n) as f32 / n as f32,
                    )
                })
                .count();
            inside as f32 / (n * n) as f32
        };
        assert!((ratio(Shape::Circle) - std::f32::consts::FRAC_PI_4).abs() < 0.01);
        assert!((ratio(Shape::Square) - 0.88 * 0.88).abs() < 0.01);
        assert!((ratio(Shape::Triangle) - 0.5).abs() < 0.01);
    }

    #[test]
    fn edges_are_anti_aliased() {
        let scene = Scene {
            background: [255, 255, 255],
            objects: vec![Object {
                shape: Shape::Circle,
                color: Color::Blue,
                cx: 0.5,
                cy: 0.5,
                r: 0.3,
                rgb: [0, 0, 255],
            }],
        };
        let image = render(&scene, 32);
        assert_eq!(image.get(16, 16), [0, 0, 255]);
        assert_eq!(image.get(0, 0), [255, 255, 255]);
        let mixed = image
            .pixels
            .iter()
            .filter(|p| p[0] > 0 && p[0] < 255)
            .count();
        assert!(
            mixed > 10,
            "expected partially covered edge pixels, found {mixed}"
        );
    }
}
