//! PNG files to 8-bit RGB, as `PIL.Image.open(path)` followed by transformers'
//! `convert_to_rgb` gives them.
//!
//! The `png` crate expands palettes, sub-byte grey levels and `tRNS` transparency to 8-bit
//! channels (as Pillow's unpackers do) and keeps the high byte of 16-bit colour samples (as
//! Pillow's `RGB;16B` / `RGBA;16B` unpackers do). An image with an alpha channel is then
//! composited on an opaque white background with Pillow's integer `alpha_composite`
//! (AlphaComposite.c):
//!
//! ```text
//! blend   = 255·(255 − a)                 (the background's alpha is 255)
//! outa255 = 255·a + blend
//! coef1   = a·255·255·2⁷ / outa255        (integer division)
//! coef2   = 255·2⁷ − coef1
//! c'      = div255(c·coef1 + 255·coef2 + 128·2⁷) >> 7,   div255(x) = ((x >> 8) + x) >> 8
//! ```
//!
//! and a pixel with a = 0 becomes white. 16-bit greyscale PNGs are rejected: Pillow opens them
//! as 32-bit integer images whose RGB conversion clips rather than scales, which no real
//! dataset relies on.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// An 8-bit RGB image, rows top to bottom, pixels `[r, g, b]` interleaved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `height · width · 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// An image from interleaved RGB bytes (length checked).
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != width * height * 3 {
            bail!(
                "an RGB image of {width}×{height} needs {} bytes, got {}",
                width * height * 3,
                data.len()
            );
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }
}

/// Pillow's `alpha_composite` of the pixel (c, a) over opaque white, for one channel.
fn over_white(c: u8, a: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    if a == 0 {
        return 255;
    }
    let (c, a) = (c as u32, a as u32);
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    ((((tmp >> 8) + tmp) >> 8) >> PRECISION_BITS) as u8
}

/// Decodes PNG bytes to RGB; `what` names the source in errors.
pub fn decode_png(bytes: &[u8], what: &str) -> Result<RgbImage> {
    let mut decoder = png::Decoder::new(bytes);
    let header = decoder
        .read_header_info()
        .with_context(|| format!("{what}: not a readable PNG file"))?;
    if header.bit_depth == png::BitDepth::Sixteen
        && matches!(
            header.color_type,
            png::ColorType::Grayscale | png::ColorType::GrayscaleAlpha
        )
    {
        bail!("{what}: 16-bit greyscale PNGs are not supported; convert the image to 8-bit");
    }
    let (width, height) = (header.width as usize, header.height as usize);
    if width == 0 || height == 0 {
        bail!("{what}: the image is empty ({width}×{height})");
    }
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder
        .read_info()
        .with_context(|| format!("{what}: not a readable PNG file"))?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let frame = reader
        .next_frame(&mut buf)
        .with_context(|| format!("{what}: corrupt PNG data"))?;
    let buf = &buf[..frame.buffer_size()];
    let n = width * height;
    let channels = frame.color_type.samples();
    if buf.len() != n * channels || frame.bit_depth != png::BitDepth::Eight {
        bail!(
            "{what}: unexpected PNG layout after decoding ({:?}, {:?})",
            frame.color_type,
            frame.bit_depth
        );
    }
    let mut data = Vec::with_capacity(n * 3);
    match frame.color_type {
        png::ColorType::Rgb => data.extend_from_slice(buf),
        png::ColorType::Rgba => {
            for p in buf.chunks_exact(4) {
                data.extend(p[..3].iter().map(|&c| over_white(c, p[3])));
            }
        }
        png::ColorType::Grayscale => {
            for &l in buf {
                data.extend([l, l, l]);
            }
        }
        png::ColorType::GrayscaleAlpha => {
            for p in buf.chunks_exact(2) {
                let l = over_white(p[0], p[1]);
                data.extend([l, l, l]);
            }
        }
        png::ColorType::Indexed => {
            bail!("{what}: the palette was not expanded while decoding")
        }
    }
    RgbImage::new(width, height, data)
}

/// Reads and decodes a PNG file to RGB.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes =
        std::fs::read(path).with_context(|| format!("{}: cannot read image", path.display()))?;
    decode_png(&bytes, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compositing_matches_pillow_on_hand_cases() {
        // Opaque keeps the colour, transparent is white.
        assert_eq!(over_white(17, 255), 17);
        assert_eq!(over_white(17, 0), 255);
        // Half transparent black over white: Pillow gives 127 (checked with
        // Image.alpha_composite(white, Image.new("RGBA", (1, 1), (0, 0, 0, 128)))).
        assert_eq!(over_white(0, 128), 127);
    }

    #[test]
    fn bad_bytes_are_an_error_naming_the_source() {
        let err = decode_png(b"not a png", "x.png").unwrap_err().to_string();
        assert!(err.contains("x.png"), "{err}");
    }
}
