//! The Qwen2-VL image processor (transformers' slow, PIL-backed `Qwen2VLImageProcessor`, which
//! Qwen2.5-VL uses too): image → `pixel_values` [n_patches, 3·T·p·p] and its grid (t, h, w).
//!
//! Steps, each as transformers computes it:
//! 1. RGB (alpha composited on white): [`super::decode`].
//! 2. `smart_resize` to (h', w'), both multiples of f = patch_size·merge_size (28), with
//!    min_pixels ≤ h'·w' ≤ max_pixels and the aspect ratio kept as closely as possible; then
//!    Pillow's bicubic resize: [`super::resample`].
//! 3. rescale and normalise: v = (f32(u8 · rescale_factor in f64) − mean_c) / std_c, in f32
//!    with f32 mean/std (transformers' `rescale` upcasts to f64 and casts to f32; `normalize`
//!    works in the image's f32).
//! 4. patches: with gh = h'/p, gw = w'/p and m = merge_size, row
//!    `((bh·(gw/m) + bw)·m + mh)·m + mw` holds the p×p patch at grid cell
//!    (bh·m + mh, bw·m + mw) — the m×m patches a merger joins are consecutive — and its columns
//!    are `((c·T + t)·p + i)·p + j` with the single frame repeated for the T temporal slots.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::decode::RgbImage;
use super::resample::resize_bicubic;

/// OpenAI CLIP's per-channel mean (transformers' `OPENAI_CLIP_MEAN`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's per-channel std (transformers' `OPENAI_CLIP_STD`).
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The settings of preprocessor_config.json that the processor uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

impl Default for ImageProcessor {
    /// transformers' defaults (Qwen2-VL's released preprocessor_config.json).
    fn default() -> Self {
        ImageProcessor {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            do_resize: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }
}

/// One processed image.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// [grid_t·grid_h·grid_w, 3·T·p·p] row-major.
    pub pixel_values: Vec<f32>,
    /// (t, h, w) in patches (t = 1 for an image).
    pub grid_thw: [usize; 3],
}

impl ProcessedImage {
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }
}

/// transformers' `smart_resize`: the (height, width) an image is resized to. Python's
/// `round` rounds half to even, as `f64::round_ties_even` does.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 || factor == 0 {
        bail!("smart_resize: empty image ({width}×{height}) or factor 0");
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        bail!("absolute aspect ratio must be smaller than 200, got {ratio} ({width}×{height})");
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

fn get_usize(obj: &serde_json::Map<String, Value>, key: &str, what: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .with_context(|| format!("{what}: `{key}` must be a non-negative integer, got {v}")),
    }
}

fn get_bool(obj: &serde_json::Map<String, Value>, key: &str, what: &str) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .with_context(|| format!("{what}: `{key}` must be true or false, got {v}")),
    }
}

fn get_triple(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<Option<[f64; 3]>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let x = n.as_f64().context("number")?;
            Ok(Some([x; 3]))
        }
        Some(Value::Array(a)) if a.len() == 3 => {
            let mut out = [0.0; 3];
            for (o, v) in out.iter_mut().zip(a) {
                *o = v
                    .as_f64()
                    .with_context(|| format!("{what}: `{key}` must hold numbers, got {v}"))?;
            }
            Ok(Some(out))
        }
        Some(v) => bail!("{what}: `{key}` must be a number or 3 numbers, got {v}"),
    }
}

impl ImageProcessor {
    /// Reads preprocessor_config.json from a model directory (the defaults when the file is
    /// absent). `min_pixels` / `max_pixels` win over `size.shortest_edge` / `longest_edge`, as
    /// in transformers.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses the contents of a preprocessor_config.json; `what` names it in errors.
    pub fn from_json(text: &str, what: &str) -> Result<Self> {
        let v: Value =
            serde_json::from_str(text).with_context(|| format!("{what}: invalid JSON"))?;
        let obj = v
            .as_object()
            .with_context(|| format!("{what}: expected a JSON object"))?;
        let mut p = Self::default();
        if let Some(Value::Object(size)) = obj.get("size") {
            if let Some(x) = get_usize(size, "shortest_edge", what)? {
                p.min_pixels = x;
            }
            if let Some(x) = get_usize(size, "longest_edge", what)? {
                p.max_pixels = x;
            }
        }
        if let Some(x) = get_usize(obj, "min_pixels", what)? {
            p.min_pixels = x;
        }
        if let Some(x) = get_usize(obj, "max_pixels", what)? {
            p.max_pixels = x;
        }
        if let Some(x) = get_usize(obj, "patch_size", what)? {
            p.patch_size = x;
        }
        if let Some(x) = get_usize(obj, "temporal_patch_size", what)? {
            p.temporal_patch_size = x;
        }
        if let Some(x) = get_usize(obj, "merge_size", what)? {
            p.merge_size = x;
        }
        if let Some(x) = get_bool(obj, "do_resize", what)? {
            p.do_resize = x;
        }
        if let Some(x) = get_bool(obj, "do_rescale", what)? {
            p.do_rescale = x;
        }
        if let Some(x) = get_bool(obj, "do_normalize", what)? {
            p.do_normalize = x;
        }
        if let Some(v) = obj.get("rescale_factor").filter(|v| !v.is_null()) {
            p.rescale_factor = v
                .as_f64()
                .with_context(|| format!("{what}: `rescale_factor` must be a number, got {v}"))?;
        }
        if let Some(x) = get_triple(obj, "image_mean", what)? {
            p.image_mean = x;
        }
        if let Some(x) = get_triple(obj, "image_std", what)? {
            p.image_std = x;
        }
        if let Some(rs) = obj.get("resample").and_then(Value::as_u64) {
            // PIL's Resampling.BICUBIC = 3 is the only filter ported.
            if rs != 3 {
                bail!("{what}: `resample` = {rs} is not supported (only 3, bicubic)");
            }
        }
        p.validate(what)?;
        Ok(p)
    }

    fn validate(&self, what: &str) -> Result<()> {
        if self.patch_size == 0 || self.merge_size == 0 || self.temporal_patch_size == 0 {
            bail!("{what}: patch_size, merge_size and temporal_patch_size must be positive");
        }
        if self.min_pixels > self.max_pixels {
            bail!(
                "{what}: min_pixels ({}) is larger than max_pixels ({})",
                self.min_pixels,
                self.max_pixels
            );
        }
        if self.image_std.contains(&0.0) {
            bail!("{what}: `image_std` has a zero entry");
        }
        Ok(())
    }

    /// The resize factor: patch_size · merge_size.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Length of one patch row: 3 · temporal_patch_size · patch_size².
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The tokens an image becomes in the language model: patches / merge_size².
    pub fn num_image_tokens(&self, grid_thw: [usize; 3]) -> usize {
        grid_thw.iter().product::<usize>() / (self.merge_size * self.merge_size)
    }

    /// Processes one image (see the module doc).
    pub fn process(&self, img: &RgbImage) -> Result<ProcessedImage> {
        let (p, m, tp) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let img = if self.do_resize {
            let (h, w) = smart_resize(
                img.height,
                img.width,
                self.factor(),
                self.min_pixels,
                self.max_pixels,
            )?;
            resize_bicubic(img, w, h)
        } else {
            img.clone()
        };
        let (h, w) = (img.height, img.width);
        if h % (p * m) != 0 || w % (p * m) != 0 {
            bail!(
                "image of {w}×{h} is not a multiple of patch_size·merge_size = {} (resizing is off)",
                p * m
            );
        }
        // Channel planes in f32, rescaled and normalised as transformers does it.
        let mean = self.image_mean.map(|x| x as f32);
        let std = self.image_std.map(|x| x as f32);
        let mut planes = vec![0.0f32; 3 * h * w];
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut v = if self.do_rescale {
                    (px[c] as f64 * self.rescale_factor) as f32
                } else {
                    px[c] as f32
                };
                if self.do_normalize {
                    v = (v - mean[c]) / std[c];
                }
                planes[c * h * w + i] = v;
            }
        }
        let (gh, gw) = (h / p, w / p);
        let dim = self.patch_dim();
        let mut out = vec![0.0f32; gh * gw * dim];
        let mut row = 0;
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        let dst = &mut out[row * dim..(row + 1) * dim];
                        let mut col = 0;
                        for c in 0..3 {
                            for _t in 0..tp {
                                for i in 0..p {
                                    let src = c * h * w + (y0 + i) * w + x0;
                                    dst[col..col + p].copy_from_slice(&planes[src..src + p]);
                                    col += p;
                                }
                            }
                        }
                        row += 1;
                    }
                }
            }
        }
        Ok(ProcessedImage {
            pixel_values: out,
            grid_thw: [1, gh, gw],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_transformers_hand_cases() {
        // Values from transformers' smart_resize.
        assert_eq!(smart_resize(64, 64, 28, 3136, 1003520).unwrap(), (56, 56));
        assert_eq!(smart_resize(10, 10, 28, 3136, 1003520).unwrap(), (56, 56));
        assert_eq!(smart_resize(42, 70, 28, 3136, 1003520).unwrap(), (56, 56));
        assert_eq!(smart_resize(42, 98, 28, 3136, 1003520).unwrap(), (56, 112));
        assert_eq!(
            smart_resize(2000, 3000, 28, 3136, 1003520).unwrap(),
            (812, 1204)
        );
        assert!(smart_resize(1, 300, 28, 3136, 1003520).is_err());
    }

    #[test]
    fn config_reads_min_max_pixels_and_rejects_bad_fields() {
        let p = ImageProcessor::from_json(
            r#"{"min_pixels": 1000, "max_pixels": 20000, "size": {"shortest_edge": 5, "longest_edge": 9},
                "image_mean": [0.5, 0.5, 0.5], "patch_size": 14}"#,
            "pp.json",
        )
        .unwrap();
        assert_eq!((p.min_pixels, p.max_pixels), (1000, 20000));
        assert_eq!(p.image_mean, [0.5; 3]);
        let err = ImageProcessor::from_json(r#"{"merge_size": "two"}"#, "pp.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pp.json") && err.contains("merge_size"),
            "{err}"
        );
    }
}
