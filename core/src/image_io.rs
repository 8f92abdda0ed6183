//! PNG files: images with their generation settings in text chunks (prompt, seed, sampler,
//! steps, model, adapters), and reading PNGs made by any software for scoring.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use crate::world::render::Image;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Png { path: String, message: String },
}

/// Writes an 8-bit RGB PNG with `text` as `tEXt` chunks, creating missing parent folders.
pub fn save_png(image: &Image, path: &Path, text: &[(&str, String)]) -> Result<(), ImageError> {
    let name = path.display().to_string();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| ImageError::Io {
            path: parent.display().to_string(),
            source,
        })?;
    }
    let file = File::create(path).map_err(|source| ImageError::Io {
        path: name.clone(),
        source,
    })?;
    write_png(image, BufWriter::new(file), text, &name)
}

/// The PNG file of `image` in memory (no text chunks).
pub fn encode_png(image: &Image) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_png(image, &mut bytes, &[], "<memory>").expect("encoding to memory cannot fail");
    bytes
}

fn write_png(
    image: &Image,
    out: impl std::io::Write,
    text: &[(&str, String)],
    name: &str,
) -> Result<(), ImageError> {
    let png_err = |e: png::EncodingError| ImageError::Png {
        path: name.to_string(),
        message: e.to_string(),
    };
    let mut encoder = png::Encoder::new(out, image.width as u32, image.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        encoder
            .add_text_chunk(key.to_string(), value.clone())
            .map_err(png_err)?;
    }
    let mut writer = encoder.write_header().map_err(png_err)?;
    let bytes: Vec<u8> = image.pixels.iter().flatten().copied().collect();
    writer.write_image_data(&bytes).map_err(png_err)?;
    writer.finish().map_err(png_err)
}

/// Reads a PNG (grey, grey+alpha, RGB or RGBA; 8 or 16 bits) as RGB, compositing alpha over white.
pub fn load_png(path: &Path) -> Result<Image, ImageError> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|source| ImageError::Io {
        path: name.clone(),
        source,
    })?;
    read_png(std::io::BufReader::new(file), &name)
}

/// [`load_png`] from bytes in memory; `name` says where they came from in errors.
pub fn decode_png(bytes: &[u8], name: &str) -> Result<Image, ImageError> {
    read_png(std::io::Cursor::new(bytes), name)
}

fn read_png(input: impl std::io::BufRead + std::io::Seek, name: &str) -> Result<Image, ImageError> {
    let png_err = |e: png::DecodingError| ImageError::Png {
        path: name.to_string(),
        message: e.to_string(),
    };
    let mut decoder = png::Decoder::new(input);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(png_err)?;
    let mut buffer = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader.next_frame(&mut buffer).map_err(png_err)?;
    let (width, height) = (info.width as usize, info.height as usize);
    let channels = info.color_type.samples();
    let pixels = buffer[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|p| match channels {
            1 => [p[0]; 3],
            2 => [over_white(p[0], p[1]); 3],
            3 => [p[0], p[1], p[2]],
            _ => [
                over_white(p[0], p[3]),
                over_white(p[1], p[3]),
                over_white(p[2], p[3]),
            ],
        })
        .collect();
    Ok(Image {
        width,
        height,
        pixels,
    })
}

fn over_white(value: u8, alpha: u8) -> u8 {
    let a = alpha as u32;
    ((value as u32 * a + 255 * (255 - a) + 127) / 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip_keeps_pixels_and_settings() {
        let image = Image {
            width: 3,
            height: 2,
            pixels: vec![
                [1, 2, 3],
                [4, 5, 6],
                [7, 8, 9],
                [10, 11, 12],
                [13, 14, 15],
                [255, 0, 128],
            ],
        };
        let path = std::env::temp_dir().join(format!("pf-png-{}.png", std::process::id()));
        save_png(&image, &path, &[("prompt", "a red circle".into())]).unwrap();
        assert_eq!(load_png(&path).unwrap(), image);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.windows(12).any(|w| w == b"a red circle"));
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = load_png(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
