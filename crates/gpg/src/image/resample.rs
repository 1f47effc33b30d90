//! Pillow's bicubic resize (`Image.resize(size, Image.BICUBIC)`), ported from its
//! libImaging/Resample.c so the result is the same to the last bit.
//!
//! The resize is separable: a horizontal pass over the rows the vertical pass will read, whose
//! result is rounded and clipped to 8 bits, then a vertical pass. Per axis, output pixel `xx`
//! of `out` pixels taken from `in` pixels (scale = in/out, s = max(scale, 1)):
//!
//! ```text
//! center = (xx + 0.5)·scale,   support = 2·s            (bicubic, a = −0.5)
//! xmin   = max(0, ⌊center − support + 0.5⌋),  xmax = min(in, ⌊center + support + 0.5⌋)
//! w_x    = cubic((x − center + 0.5)/s) for x in xmin..xmax, normalised to Σ w = 1 (in f64)
//! k_x    = trunc(w_x·2²² ± 0.5)                          (fixed point, 22 fraction bits)
//! out    = clip₀²⁵⁵((2²¹ + Σ_x in[x]·k_x) >> 22)          (i32 arithmetic)
//! ```
//!
//! An axis whose size does not change is not filtered at all, and an image whose size does not
//! change is copied, as in Pillow.

use super::decode::RgbImage;

/// Fraction bits of the fixed-point coefficients (Pillow's `PRECISION_BITS`, 32 − 8 − 2).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (Keys, a = −0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The filter taps of one axis: for each output pixel, the first input pixel and the
/// fixed-point weights of the pixels from there on.
struct Taps {
    /// (xmin, count) per output pixel.
    bounds: Vec<(usize, usize)>,
    /// `ksize` fixed-point weights per output pixel (zeros past `count`).
    k: Vec<i32>,
    ksize: usize,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the box 0..in_size.
fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f32 as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0.0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin);
        let mut ww = 0.0f64;
        for (x, wx) in w.iter_mut().enumerate().take(count) {
            *wx = bicubic((x as f64 + xmin as f64 - center + 0.5) * inv_filterscale);
            ww += *wx;
        }
        for (x, &wx) in w.iter().enumerate().take(count) {
            let wx = if ww != 0.0 { wx / ww } else { wx };
            let fixed = wx * (1u32 << PRECISION_BITS) as f64;
            k[xx * ksize + x] = if wx < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, count));
    }
    Taps { bounds, k, ksize }
}

/// Pillow's `clip8`: the 8-bit value of a fixed-point sum.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes `img` to `width` × `height` with Pillow's bicubic filter (see the module doc).
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let need_horizontal = width != img.width;
    let need_vertical = height != img.height;
    let vert = taps(img.height, height);
    // Rows of the source the vertical pass reads.
    let first_row = vert.bounds.first().map_or(0, |b| b.0);
    let last_row = vert.bounds.last().map_or(0, |b| b.0 + b.1);

    let (mut cur, mut row_offset) = (img.clone(), 0usize);
    if need_horizontal {
        let hor = taps(img.width, width);
        let rows = last_row - first_row;
        let mut out = vec![0u8; rows * width * 3];
        for y in 0..rows {
            let line =
                &img.data[(y + first_row) * img.width * 3..(y + first_row + 1) * img.width * 3];
            let dst = &mut out[y * width * 3..(y + 1) * width * 3];
            for (xx, &(xmin, count)) in hor.bounds.iter().enumerate() {
                let k = &hor.k[xx * hor.ksize..xx * hor.ksize + count];
                let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                for (x, &kx) in k.iter().enumerate() {
                    let p = &line[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += p[c] as i32 * kx;
                    }
                }
                for c in 0..3 {
                    dst[xx * 3 + c] = clip8(acc[c]);
                }
            }
        }
        cur = RgbImage {
            width,
            height: rows,
            data: out,
        };
        row_offset = first_row;
    }
    if need_vertical {
        let w = cur.width;
        let mut out = vec![0u8; height * w * 3];
        for (yy, &(ymin, count)) in vert.bounds.iter().enumerate() {
            let k = &vert.k[yy * vert.ksize..yy * vert.ksize + count];
            let dst = &mut out[yy * w * 3..(yy + 1) * w * 3];
            for (xc, d) in dst.iter_mut().enumerate() {
                let mut acc = 1i32 << (PRECISION_BITS - 1);
                for (y, &ky) in k.iter().enumerate() {
                    acc += cur.data[(ymin - row_offset + y) * w * 3 + xc] as i32 * ky;
                }
                *d = clip8(acc);
            }
        }
        cur = RgbImage {
            width: w,
            height,
            data: out,
        };
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_interpolates_and_weights_sum_to_one() {
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(2.5), 0.0);
        for (in_size, out_size) in [(7, 28), (100, 28), (33, 56), (5, 3)] {
            let t = taps(in_size, out_size);
            for (xx, &(_, count)) in t.bounds.iter().enumerate() {
                let sum: i64 = t.k[xx * t.ksize..xx * t.ksize + count]
                    .iter()
                    .map(|&k| k as i64)
                    .sum();
                // Rounding each tap moves the sum by at most half a unit per tap.
                assert!((sum - (1 << PRECISION_BITS)).abs() <= count as i64, "{sum}");
            }
        }
    }

    #[test]
    fn constant_image_stays_constant_and_same_size_is_a_copy() {
        let img = RgbImage::new(9, 5, [10u8, 200, 77].repeat(45)).unwrap();
        let r = resize_bicubic(&img, 28, 56);
        assert_eq!((r.width, r.height), (28, 56));
        assert!(r.data.chunks_exact(3).all(|p| p == [10, 200, 77]));
        let same = resize_bicubic(&img, 9, 5);
        assert_eq!(same, img);
    }
}
