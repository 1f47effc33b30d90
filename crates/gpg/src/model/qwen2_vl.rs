//! Qwen2-VL / Qwen2.5-VL: the vision tower ([`super::vision`]) feeding the Qwen2 decoder
//! ([`super::qwen2`]) through the `<|image_pad|>` positions, with M-RoPE positions.
//!
//! A sequence's stack inputs are its token embeddings with row r replaced by image embedding
//! j when token r is the j-th `<|image_pad|>` of the batch (one pad per merge² patches). Each
//! token has three positions (t, h, w) (transformers' `get_rope_index`): text tokens count up
//! (all three equal); the pads of an image with merged grid (T, H', W') that starts at
//! position s get (s + t, s + row, s + col), and the text after it starts at
//! s + max(H', W'). The rotary angle of frequency i uses component sec(i) of the token's
//! positions, the sections being `mrope_section` (e.g. [16, 24, 24] of head_dim/2 = 64).
//! After the prompt every new token is text, so decoding rotates by the 1-D table at position
//! (prompt length + k + δ), δ = max position + 1 − prompt length.
//!
//! Checkpoints load in both layouts transformers uses (flat config with `visual.*` +
//! `model.*` weights as on the hub; `text_config` / `vision_config` with `model.visual.*` +
//! `model.language_model.*` as transformers 5 writes) and save back in the layout they came in.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::config::Qwen2Config;
use super::ops::{Rope, VarLen};
use super::precision::Precision;
use super::qwen2::{
    leaf_dtype, Activations, ForwardCache, Grads, Qwen2, TokenLogprobs, TrainBatch, Weights,
};
use super::vision::{
    self, VisionCache, VisionConfig, VisionGrads, VisionKind, VisionTower, VisionWeights,
};
use super::weights::{self, WeightMap};
use crate::image::ProcessedImage;

/// How a checkpoint names its tensors and lays out its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VlLayout {
    /// Flat config.json (text fields at the top, `vision_config` inside); weights `visual.*`,
    /// `model.*`, `lm_head.weight` (the hub's Qwen2-VL / Qwen2.5-VL releases).
    Hub,
    /// `text_config` + `vision_config`; weights `model.visual.*`, `model.language_model.*`,
    /// `lm_head.weight` (transformers 5).
    Nested,
}

/// config.json of a Qwen2-VL / Qwen2.5-VL checkpoint.
#[derive(Debug, Clone)]
pub struct Qwen2VLConfig {
    pub text: Qwen2Config,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    /// Sections of head_dim/2 that take the t, h and w positions.
    pub mrope_section: [usize; 3],
    pub layout: VlLayout,
    /// How the weights are named: `layout`'s names unless the checkpoint says otherwise
    /// (transformers 5's `save_pretrained` writes the hub's names beside a nested config);
    /// set by [`Qwen2VL::load`] from the names found, and kept when saving.
    pub weight_names: VlLayout,
    /// The file as read, written back unchanged on save.
    pub raw: Value,
}

fn token_id(obj: &Value, key: &str, default: u32) -> Result<u32> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .map(|x| x as u32)
            .with_context(|| format!("`{key}` must be a token id, got {v}")),
    }
}

impl Qwen2VLConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read the model config", path.display()))?;
        Self::from_json(&text)
            .with_context(|| format!("{}: not a usable Qwen2-VL config", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: Value = serde_json::from_str(text).context("invalid JSON")?;
        let obj = raw.as_object().context("expected a JSON object")?;
        let kind = match obj.get("model_type").and_then(Value::as_str) {
            Some("qwen2_vl") => VisionKind::Qwen2Vl,
            Some("qwen2_5_vl") => VisionKind::Qwen25Vl,
            other => bail!("`model_type` is {other:?}; expected \"qwen2_vl\" or \"qwen2_5_vl\""),
        };
        let (layout, mut text_obj) = match obj.get("text_config") {
            Some(Value::Object(t)) => (VlLayout::Nested, t.clone()),
            _ => {
                let mut t = obj.clone();
                t.remove("vision_config");
                (VlLayout::Hub, t)
            }
        };
        // The top-level tie flag is the one transformers honours for the composite model.
        if let Some(tie) = obj.get("tie_word_embeddings").filter(|v| v.is_boolean()) {
            text_obj.insert("tie_word_embeddings".into(), tie.clone());
        }
        let section_of = |v: Option<&Value>| -> Option<Vec<usize>> {
            v?.get("mrope_section")?
                .as_array()?
                .iter()
                .map(|x| x.as_u64().map(|n| n as usize))
                .collect()
        };
        let section = section_of(text_obj.get("rope_parameters"))
            .or_else(|| section_of(text_obj.get("rope_scaling")))
            .context("no `mrope_section` in rope_parameters or rope_scaling")?;
        ensure!(
            section.len() == 3,
            "`mrope_section` must have 3 entries, got {section:?}"
        );
        // The M-RoPE entries are handled here; the decoder's own check wants plain RoPE.
        if let Some(Value::Object(rs)) = text_obj.get("rope_scaling") {
            let t = rs
                .get("type")
                .or_else(|| rs.get("rope_type"))
                .and_then(Value::as_str);
            ensure!(
                matches!(t, Some("mrope") | Some("default") | None),
                "rope_scaling type {t:?} is not supported (mrope)"
            );
            text_obj.remove("rope_scaling");
        }
        if let Some(Value::Object(rp)) = text_obj.get_mut("rope_parameters") {
            rp.remove("mrope_section");
            if rp.get("rope_type").and_then(Value::as_str) == Some("mrope") {
                rp.insert("rope_type".into(), "default".into());
            }
        }
        let text: Qwen2Config =
            serde_json::from_value(Value::Object(text_obj)).context("text config")?;
        text.validate().context("text config")?;
        ensure!(
            section.iter().sum::<usize>() == text.head_dim() / 2,
            "`mrope_section` {section:?} must sum to head_dim/2 = {}",
            text.head_dim() / 2
        );
        let vision_value = obj.get("vision_config").context("no `vision_config`")?;
        let vision = VisionConfig::from_json(vision_value, kind)?;
        ensure!(
            vision.out_hidden == text.hidden_size,
            "vision output width {} differs from the text hidden_size {}",
            vision.out_hidden,
            text.hidden_size
        );
        let ids = |key: &str, default: u32| -> Result<u32> {
            let id = token_id(&raw, key, default)?;
            ensure!(
                (id as usize) < text.vocab_size,
                "`{key}` = {id} is outside the vocabulary"
            );
            Ok(id)
        };
        Ok(Qwen2VLConfig {
            image_token_id: ids("image_token_id", 151655)?,
            video_token_id: ids("video_token_id", 151656)?,
            vision_start_token_id: ids("vision_start_token_id", 151652)?,
            vision_end_token_id: ids("vision_end_token_id", 151653)?,
            mrope_section: [section[0], section[1], section[2]],
            text,
            vision,
            layout,
            weight_names: layout,
            raw,
        })
    }

    pub fn text_name(&self, name: &str) -> String {
        match self.weight_names {
            VlLayout::Hub => name.to_string(),
            VlLayout::Nested => match name.strip_prefix("model.") {
                Some(rest) => format!("model.language_model.{rest}"),
                None => name.to_string(),
            },
        }
    }

    pub fn vision_name(&self, name: &str) -> String {
        match self.weight_names {
            VlLayout::Hub => format!("visual.{name}"),
            VlLayout::Nested => format!("model.visual.{name}"),
        }
    }

    /// The language-model tokens one image becomes.
    pub fn image_tokens(&self, grid: [usize; 3]) -> usize {
        grid.iter().product::<usize>() / (self.vision.merge_size * self.vision.merge_size)
    }

    /// M-RoPE positions (t, h, w) of every token of one sequence whose images have patch grids
    /// `grids` (in order of appearance), and δ = max position + 1 − length.
    pub fn rope_index(&self, tokens: &[u32], grids: &[[usize; 3]]) -> Result<([Vec<u32>; 3], i64)> {
        let m = self.vision.merge_size;
        let mut pos: [Vec<u32>; 3] = Default::default();
        let mut current = 0u32;
        let mut images = grids.iter();
        let mut i = 0;
        while i < tokens.len() {
            if tokens[i] != self.image_token_id {
                for p in pos.iter_mut() {
                    p.push(current);
                }
                current += 1;
                i += 1;
                continue;
            }
            let run = tokens[i..]
                .iter()
                .take_while(|&&t| t == self.image_token_id)
                .count();
            let grid = images.next().with_context(|| {
                format!(
                    "the sequence has more <|image_pad|> runs than the {} images given",
                    grids.len()
                )
            })?;
            let (t, h, w) = (grid[0], grid[1] / m, grid[2] / m);
            ensure!(
                run == t * h * w,
                "a run of {run} <|image_pad|> tokens for an image of {} tokens (grid {grid:?})",
                t * h * w
            );
            for ti in 0..t {
                for hi in 0..h {
                    for wi in 0..w {
                        pos[0].push(current + ti as u32);
                        pos[1].push(current + hi as u32);
                        pos[2].push(current + wi as u32);
                    }
                }
            }
            current += h.max(w) as u32;
            i += run;
        }
        ensure!(
            images.next().is_none(),
            "{} images given but the sequence has fewer <|image_pad|> runs",
            grids.len()
        );
        let max = pos
            .iter()
            .flat_map(|p| p.iter())
            .copied()
            .max()
            .map_or(-1, |m| m as i64);
        Ok((pos, max + 1 - tokens.len() as i64))
    }

    /// Per-token rotary tables for M-RoPE positions `pos` (one row per token).
    pub fn mrope_tables(&self, pos: &[Vec<u32>; 3]) -> Result<Rope> {
        let hd = self.text.head_dim();
        let half = hd / 2;
        let theta = self.text.rope_theta() as f32;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / hd as f32))
            .collect();
        let [s0, s1, _] = self.mrope_section;
        let comp = |i: usize| {
            if i < s0 {
                0
            } else if i < s0 + s1 {
                1
            } else {
                2
            }
        };
        let n = pos[0].len();
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
        for ((pt, ph), pw) in pos[0].iter().zip(&pos[1]).zip(&pos[2]) {
            let p = [*pt, *ph, *pw];
            for (i, &f) in inv.iter().enumerate() {
                let a = p[comp(i)] as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Rope::from_tables(hd, cos, sin)
    }
}

/// The text a chat message's image part becomes in Qwen2-VL's chat template (before the
/// processor expands the pad to one `<|image_pad|>` per merged patch).
pub const IMAGE_PLACEHOLDER: &str = "<|vision_start|><|image_pad|><|vision_end|>";

/// Expands the i-th `<|image_pad|>` of `ids` into `counts[i]` copies, as the Qwen2-VL processor
/// does to the rendered prompt. The number of pads must equal the number of images.
pub fn expand_image_pads(ids: &[u32], image_token_id: u32, counts: &[usize]) -> Result<Vec<u32>> {
    let pads = ids.iter().filter(|&&t| t == image_token_id).count();
    ensure!(
        pads == counts.len(),
        "the prompt has {pads} <|image_pad|> tokens for {} images",
        counts.len()
    );
    let mut out = Vec::with_capacity(ids.len() + counts.iter().sum::<usize>());
    let mut next = counts.iter();
    for &t in ids {
        if t == image_token_id {
            let n = *next.next().context("internal: more pads than images")?;
            out.extend(std::iter::repeat_n(t, n));
        } else {
            out.push(t);
        }
    }
    Ok(out)
}

/// A vision-language model: the tower and the decoder, each parameter held once.
#[derive(Debug, Clone)]
pub struct Qwen2VL {
    pub config: Qwen2VLConfig,
    /// The language model (its config is `config.text`).
    pub text: Qwen2,
    pub visual: VisionWeights,
}

/// Gradients of every parameter; `visual` is `None` when the tower is frozen.
pub struct VlGrads {
    pub text: Grads,
    pub visual: Option<VisionGrads>,
}

/// One (prompt, completion) pair with the prompt's images, in order of appearance.
pub struct VlSequence<'a> {
    pub prompt: &'a [u32],
    pub completion: &'a [u32],
    pub images: &'a [ProcessedImage],
}

/// The image side of a packed batch: every image's patches, the rows of their
/// `<|image_pad|>` tokens and the M-RoPE positions of every packed token.
pub struct ImageInputs {
    /// Every image's patches, in order of appearance over the batch [N, patch_dim].
    pub pixel_values: Vec<f32>,
    pub grids: Vec<[usize; 3]>,
    /// Packed rows of the `<|image_pad|>` tokens, in order.
    pub image_rows: Vec<u32>,
    /// (t, h, w) positions of every packed token.
    pub positions: [Vec<u32>; 3],
}

/// A packed batch for the training forward of any model: the tokens ([`TrainBatch`]) and, for
/// a model with a vision tower, its [`ImageInputs`]. Invariant: `images` is `Some` exactly
/// when the batch was packed for a model with a tower ([`Batch::new`]; a text prompt then has
/// no images and 1-D positions on all three axes), `None` for a text model
/// ([`Batch::text_only`]).
pub struct Batch {
    pub text: TrainBatch,
    pub images: Option<Box<ImageInputs>>,
}

impl Batch {
    /// A text model's batch (no image inputs).
    pub fn text_only(text: TrainBatch) -> Self {
        Batch { text, images: None }
    }

    pub fn num_completion_tokens(&self) -> usize {
        self.text.num_completion_tokens()
    }

    /// The image inputs of a batch packed for a model with a tower.
    pub fn images(&self) -> Result<&ImageInputs> {
        self.images
            .as_deref()
            .context("internal: a text batch for a model with a vision tower")
    }

    /// Packs sequences with their images for a model with a tower of `config`.
    pub fn new(config: &Qwen2VLConfig, seqs: &[VlSequence<'_>]) -> Result<Self> {
        let pairs: Vec<(&[u32], &[u32])> = seqs.iter().map(|s| (s.prompt, s.completion)).collect();
        let text = TrainBatch::new(&pairs)?;
        let mut pixel_values = Vec::new();
        let mut grids = Vec::new();
        let mut positions: [Vec<u32>; 3] = Default::default();
        let mut image_rows = Vec::new();
        let mut row = 0u32;
        for (i, s) in seqs.iter().enumerate() {
            let g: Vec<[usize; 3]> = s.images.iter().map(|im| im.grid_thw).collect();
            // The images are the prompt's; every completion token is text (a sampled
            // <|image_pad|> included: decoding embeds it as a token), at 1-D positions
            // prompt_len + k + δ on all three axes, as `rollout::generate_vl` decoded it.
            let (p, delta) = config
                .rope_index(s.prompt, &g)
                .with_context(|| format!("sequence {i}"))?;
            let first = s.prompt.len() as i64 + delta;
            for (dst, src) in positions.iter_mut().zip(p) {
                dst.extend(src);
                dst.extend((0..s.completion.len() as i64).map(|k| (first + k) as u32));
            }
            for &t in s.prompt {
                if t == config.image_token_id {
                    image_rows.push(row);
                }
                row += 1;
            }
            row += s.completion.len() as u32;
            for im in s.images {
                ensure!(
                    im.pixel_values.len() == im.num_patches() * config.vision.patch_dim(),
                    "sequence {i}: an image's pixel_values do not match its grid"
                );
                pixel_values.extend_from_slice(&im.pixel_values);
            }
            grids.extend(g);
        }
        ensure!(
            row as usize == text.tokens.len(),
            "internal: the packed batch has {} rows, the sequences {row}",
            text.tokens.len()
        );
        Ok(Batch {
            text,
            images: Some(Box::new(ImageInputs {
                pixel_values,
                grids,
                image_rows,
                positions,
            })),
        })
    }
}

/// What a training forward keeps for the backward: the decoder's cache and, when the tower
/// trains, the tower's (`None` for a text model or a frozen tower).
pub struct VlForwardCache {
    pub text: ForwardCache,
    pub vision: Option<VisionCache>,
}

impl Qwen2VL {
    /// Loads a checkpoint directory (either layout) in `precision`.
    pub fn load(dir: &Path, device: &Device, precision: Precision) -> Result<Self> {
        let mut config = Qwen2VLConfig::from_dir(dir)?;
        let mut w = WeightMap::from_dir(dir, device)?;
        let names = w.remaining();
        if names.iter().any(|n| n.starts_with("model.language_model.")) {
            config.weight_names = VlLayout::Nested;
        } else if names.iter().any(|n| n.starts_with("visual.")) {
            config.weight_names = VlLayout::Hub;
        }
        let text_weights = Weights::build(&config.text, |leaf| {
            w.take(
                &config.text_name(&leaf.name),
                &leaf.shape,
                leaf_dtype(leaf.kind, precision),
            )
        })
        .with_context(|| format!("{}: checkpoint does not match config.json", dir.display()))?;
        if config.text.tie_word_embeddings {
            w.take_optional(
                "lm_head.weight",
                &[config.text.vocab_size, config.text.hidden_size],
                precision.matrix_dtype(),
            )?;
        }
        let visual = vision::build_weights(&config.vision, |leaf| {
            let dtype = if leaf.is_matrix {
                precision.matrix_dtype()
            } else {
                DType::F32
            };
            w.take(&config.vision_name(&leaf.name), &leaf.shape, dtype)
        })
        .with_context(|| format!("{}: vision tower does not match config.json", dir.display()))?;
        let unexpected: Vec<_> = w
            .remaining()
            .into_iter()
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if !unexpected.is_empty() {
            bail!(
                "{}: the checkpoint holds tensors this {} model does not use: {:?}",
                dir.display(),
                config.raw["model_type"],
                unexpected
            );
        }
        let text = Qwen2::assemble(config.text.clone(), text_weights, precision, device)?;
        Ok(Qwen2VL {
            config,
            text,
            visual,
        })
    }

    /// The model as a borrowed decoder + tower (what every pass runs on).
    pub fn view(&self) -> VlModel<'_> {
        VlModel {
            config: &self.config,
            text: &self.text,
            visual: &self.visual,
        }
    }

    /// See [`VlModel::parameters`].
    pub fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        self.view().parameters()
    }

    /// See [`VlModel::save_pretrained`].
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        self.view().save_pretrained(dir)
    }

    /// See [`VlModel::zero_grads`].
    pub fn zero_grads(&self, freeze_vision: bool) -> Result<VlGrads> {
        self.view().zero_grads(freeze_vision)
    }

    /// See [`VlModel::forward_scored`].
    pub fn forward_scored(
        &self,
        batch: &Batch,
        inv_temperature: f32,
        keep: Option<Activations>,
        train_vision: bool,
    ) -> Result<(TokenLogprobs, Option<VlForwardCache>)> {
        self.view()
            .forward_scored(batch, inv_temperature, keep, train_vision)
    }

    /// See [`VlModel::logprobs`].
    pub fn logprobs(&self, batch: &Batch, inv_temperature: f32) -> Result<TokenLogprobs> {
        self.view().logprobs(batch, inv_temperature)
    }

    /// See [`VlModel::backward_into`].
    pub fn backward_into(
        &self,
        batch: &Batch,
        cache: VlForwardCache,
        g: &[f32],
        grads: &mut VlGrads,
    ) -> Result<()> {
        self.view().backward_into(batch, cache, g, grads)
    }

    /// See [`VlModel::named_grads`].
    pub fn named_grads<'g>(&self, grads: &'g VlGrads) -> Vec<(String, &'g Vec<f32>)> {
        self.view().named_grads(grads)
    }

    /// See [`VlModel::parameter_count`].
    pub fn parameter_count(&self) -> usize {
        self.view().parameter_count()
    }
}

/// A vision-language model borrowed as its parts: the decoder and the tower may be held apart
/// (the training policy keeps the decoder as its text model and the tower beside it).
#[derive(Clone, Copy)]
pub struct VlModel<'a> {
    pub config: &'a Qwen2VLConfig,
    /// The language model (its config is `config.text`).
    pub text: &'a Qwen2,
    pub visual: &'a VisionWeights,
}

impl<'a> VlModel<'a> {
    /// Every parameter with its checkpoint name and shape (the layout the model was loaded
    /// from; the patch embedding back in its Conv3d shape).
    pub fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = self
            .text
            .parameters()
            .into_iter()
            .map(|(n, t)| (self.config.text_name(&n), t.clone()))
            .collect();
        let c = &self.config.vision;
        for (n, t) in self.visual.named() {
            let t = if n == "patch_embed.proj.weight" {
                t.reshape((
                    c.width,
                    c.in_channels,
                    c.temporal_patch_size,
                    c.patch_size,
                    c.patch_size,
                ))?
            } else {
                t.clone()
            };
            out.push((self.config.vision_name(&n), t));
        }
        Ok(out)
    }

    /// Writes config.json (as it was read) and model.safetensors in the layout the model came
    /// in, each file atomically.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create directory", dir.display()))?;
        weights::write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&self.config.raw)?.as_bytes(),
        )?;
        weights::save_safetensors(
            &self.parameters()?,
            self.text.precision().matrix_dtype(),
            &dir.join("model.safetensors"),
        )
    }

    pub fn tower(&self) -> VisionTower<'a> {
        VisionTower {
            config: &self.config.vision,
            weights: self.visual,
        }
    }

    /// Zero gradients (none for the tower when `freeze_vision`).
    pub fn zero_grads(&self, freeze_vision: bool) -> Result<VlGrads> {
        Ok(VlGrads {
            text: self.text.zero_grads()?,
            visual: if freeze_vision {
                None
            } else {
                Some(vision::zero_grads(self.visual, &self.config.vision)?)
            },
        })
    }

    /// The decoder's stack inputs: token embeddings with the image embeddings at the pads.
    fn stack_inputs(
        &self,
        tokens: &[u32],
        image_rows: &[u32],
        pixel_values: &[f32],
        grids: &[[usize; 3]],
        keep: bool,
    ) -> Result<(Tensor, Option<VisionCache>)> {
        let x = self.text.embed(tokens)?;
        if grids.is_empty() {
            ensure!(
                image_rows.is_empty(),
                "{} <|image_pad|> tokens but no images",
                image_rows.len()
            );
            return Ok((x, None));
        }
        let dev = self.text.device();
        let n = pixel_values.len() / self.config.vision.patch_dim();
        let pixels = Tensor::from_slice(pixel_values, (n, self.config.vision.patch_dim()), dev)?;
        let (emb, cache) = self.tower().forward(&pixels, grids, keep)?;
        ensure!(
            emb.dim(0)? == image_rows.len(),
            "image features and image tokens do not match: {} <|image_pad|> tokens, {} image embeddings",
            image_rows.len(),
            emb.dim(0)?
        );
        let idx = Tensor::from_slice(image_rows, image_rows.len(), dev)?;
        // x[rows] = emb: zero those rows, then add.
        let mut mask = vec![1.0f32; tokens.len()];
        for &r in image_rows {
            mask[r as usize] = 0.0;
        }
        let mask = Tensor::from_vec(mask, (tokens.len(), 1), dev)?;
        let x = x.broadcast_mul(&mask)?.index_add(&idx, &emb, 0)?;
        Ok((x, cache))
    }

    /// The log-probs of every completion token; with `keep`, the cache for the backward
    /// (the tower's activations only when `train_vision`).
    pub fn forward_scored(
        &self,
        batch: &Batch,
        inv_temperature: f32,
        keep: Option<Activations>,
        train_vision: bool,
    ) -> Result<(TokenLogprobs, Option<VlForwardCache>)> {
        let images = batch.images()?;
        let (x, vision) = self.stack_inputs(
            &batch.text.tokens,
            &images.image_rows,
            &images.pixel_values,
            &images.grids,
            keep.is_some() && train_vision,
        )?;
        let rope = self.config.mrope_tables(&images.positions)?;
        let (lp, cache) =
            self.text
                .forward_embedded(&batch.text, x, Some(rope), inv_temperature, keep)?;
        Ok((lp, cache.map(|text| VlForwardCache { text, vision })))
    }

    /// Log-probs only.
    pub fn logprobs(&self, batch: &Batch, inv_temperature: f32) -> Result<TokenLogprobs> {
        Ok(self.forward_scored(batch, inv_temperature, None, false)?.0)
    }

    /// Backward from g_t, adding every parameter's gradient to `grads` (the tower's only when
    /// `grads.visual` is present and the forward kept its activations).
    pub fn backward_into(
        &self,
        batch: &Batch,
        cache: VlForwardCache,
        g: &[f32],
        grads: &mut VlGrads,
    ) -> Result<()> {
        self.backward_into_parts(batch, cache, g, &mut grads.text, grads.visual.as_mut())
    }

    /// [`Self::backward_into`] with the decoder's and the tower's buffers apart (`tower`:
    /// `None` when the tower is frozen).
    pub fn backward_into_parts(
        &self,
        batch: &Batch,
        cache: VlForwardCache,
        g: &[f32],
        text: &mut Grads,
        tower: Option<&mut VisionGrads>,
    ) -> Result<()> {
        let image_rows = &batch.images()?.image_rows;
        let dx = self
            .text
            .backward_to_inputs(&batch.text, cache.text, g, text)?;
        let mut is_image = vec![false; batch.text.tokens.len()];
        for &r in image_rows {
            is_image[r as usize] = true;
        }
        self.text
            .add_embedding_grad(&dx, &batch.text.tokens, |r| !is_image[r], text)?;
        if let (Some(vg), Some(vc)) = (tower, cache.vision) {
            let idx = Tensor::from_slice(image_rows, image_rows.len(), dx.device())?;
            let demb = dx.index_select(&idx, 0)?;
            self.tower().backward(vc, &demb, vg)?;
        }
        Ok(())
    }

    /// Prefill for sampling: prompts (token ids with their images) packed; returns the
    /// final-normed hidden state of each prompt's last token, the per-layer KV of every
    /// prompt token and each prompt's M-RoPE δ.
    #[allow(clippy::type_complexity)]
    pub fn prefill(
        &self,
        prompts: &[(&[u32], &[ProcessedImage])],
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>, VarLen, Vec<i64>)> {
        let mut tokens = Vec::new();
        let mut pixel_values = Vec::new();
        let mut grids = Vec::new();
        let mut positions: [Vec<u32>; 3] = Default::default();
        let mut deltas = Vec::new();
        let mut lens = Vec::new();
        for (i, (p, images)) in prompts.iter().enumerate() {
            ensure!(!p.is_empty(), "prompt {i} is empty");
            let g: Vec<[usize; 3]> = images.iter().map(|im| im.grid_thw).collect();
            let (pos, delta) = self
                .config
                .rope_index(p, &g)
                .with_context(|| format!("prompt {i}"))?;
            for (d, s) in positions.iter_mut().zip(pos) {
                d.extend(s);
            }
            deltas.push(delta);
            for im in images.iter() {
                pixel_values.extend_from_slice(&im.pixel_values);
            }
            grids.extend(g);
            tokens.extend_from_slice(p);
            lens.push(p.len());
        }
        if let Some(bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.text.vocab_size)
        {
            bail!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.config.text.vocab_size
            );
        }
        let image_rows: Vec<u32> = tokens
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == self.config.image_token_id)
            .map(|(r, _)| r as u32)
            .collect();
        let (x, _) = self.stack_inputs(&tokens, &image_rows, &pixel_values, &grids, false)?;
        let rope = self.config.mrope_tables(&positions)?;
        let seqs = VarLen::from_lens(&lens);
        let rows: Vec<u32> = (0..tokens.len() as u32).collect();
        let (h, kv) = self.text.prefill_embedded(x, &seqs, &rope, &rows)?;
        Ok((h, kv, seqs, deltas))
    }

    /// Every gradient with its parameter's checkpoint name (tower included when present).
    pub fn named_grads<'g>(&self, grads: &'g VlGrads) -> Vec<(String, &'g Vec<f32>)> {
        let mut out: Vec<(String, &Vec<f32>)> = grads
            .text
            .named()
            .into_iter()
            .map(|(n, g)| (self.config.text_name(&n), g))
            .collect();
        if let Some(v) = &grads.visual {
            out.extend(
                v.named()
                    .into_iter()
                    .map(|(n, g)| (self.config.vision_name(&n), g)),
            );
        }
        out
    }

    pub fn parameter_count(&self) -> usize {
        self.text.parameter_count()
            + self
                .visual
                .named()
                .iter()
                .map(|(_, t)| t.elem_count())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// config.json of Qwen/Qwen2-VL-2B-Instruct (hub layout), abridged to the fields read.
    const QWEN2_VL_2B: &str = r#"{
      "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
      "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
      "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
      "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
      "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960,
      "max_position_embeddings": 32768, "max_window_layers": 28, "num_attention_heads": 12,
      "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
      "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": true,
      "torch_dtype": "bfloat16", "use_cache": true, "use_sliding_window": false,
      "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
        "in_chans": 3, "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "temporal_patch_size": 2},
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
      "vocab_size": 151936}"#;

    /// config.json of Qwen/Qwen2.5-VL-3B-Instruct (hub layout), abridged.
    const QWEN25_VL_3B: &str = r#"{
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
      "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 11008,
      "max_position_embeddings": 128000, "num_attention_heads": 16, "num_hidden_layers": 36,
      "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
      "tie_word_embeddings": true, "vocab_size": 151936, "image_token_id": 151655,
      "vision_start_token_id": 151652, "vision_end_token_id": 151653, "video_token_id": 151656,
      "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
        "intermediate_size": 3420, "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048,
        "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2},
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}"#;

    #[test]
    fn hub_configs_of_the_paper_models_parse() {
        let c = Qwen2VLConfig::from_json(QWEN2_VL_2B).unwrap();
        assert_eq!(c.layout, VlLayout::Hub);
        assert!(c.text.tie_word_embeddings);
        assert_eq!(
            (c.text.hidden_size, c.text.head_dim(), c.mrope_section),
            (1536, 128, [16, 24, 24])
        );
        assert_eq!(
            (c.vision.width, c.vision.mlp_hidden, c.vision.out_hidden),
            (1280, 5120, 1536)
        );
        assert_eq!(c.vision.kind, VisionKind::Qwen2Vl);
        let c = Qwen2VLConfig::from_json(QWEN25_VL_3B).unwrap();
        assert_eq!(c.vision.kind, VisionKind::Qwen25Vl);
        assert_eq!(c.vision.fullatt_block_indexes, vec![7, 15, 23, 31]);
        assert_eq!(
            (c.vision.width, c.vision.out_hidden, c.vision.window_size),
            (1280, 2048, 112)
        );
        let bad = QWEN2_VL_2B.replace("[16, 24, 24]", "[16, 24, 23]");
        let err = format!("{:#}", Qwen2VLConfig::from_json(&bad).unwrap_err());
        assert!(err.contains("mrope_section"), "{err}");
    }

    #[test]
    fn rope_index_matches_get_rope_index_by_hand() {
        let c = Qwen2VLConfig::from_json(QWEN2_VL_2B).unwrap();
        let pad = c.image_token_id;
        // 2 text tokens, an image of 4×6 patches (2×3 merged), 2 text tokens.
        let tokens = [1, 2, pad, pad, pad, pad, pad, pad, 3, 4];
        let (pos, delta) = c.rope_index(&tokens, &[[1, 4, 6]]).unwrap();
        assert_eq!(pos[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
        assert_eq!(pos[1], vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
        assert_eq!(pos[2], vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
        assert_eq!(delta, 7 - 10);
        // Text only: 1-D positions, δ = 0; a pad count that does not fit the grid is an error.
        let (pos, delta) = c.rope_index(&[5, 6, 7], &[]).unwrap();
        assert_eq!((pos[1].clone(), delta), (vec![0, 1, 2], 0));
        assert!(c.rope_index(&tokens, &[[1, 4, 4]]).is_err());
        assert!(c.rope_index(&tokens, &[]).is_err());
    }

    #[test]
    fn text_only_mrope_tables_equal_the_1d_table() {
        let c = Qwen2VLConfig::from_json(QWEN2_VL_2B).unwrap();
        let p: Vec<u32> = vec![0, 3, 17, 400];
        let t = c.mrope_tables(&[p.clone(), p.clone(), p.clone()]).unwrap();
        let r = Rope::new(128, 1e6, 512);
        let mut a = vec![0.5f32; 4 * 128];
        let mut b = a.clone();
        t.forward_slice(&mut a, 1, &[0, 1, 2, 3]).unwrap();
        r.forward_slice(&mut b, 1, &p).unwrap();
        assert_eq!(a, b, "bit-identical to the decoder's own table");
    }
}
