//! The vision tower of Qwen2-VL and Qwen2.5-VL: image patches → embeddings of the language
//! model's width, one per 2×2 block of patches; forward and explicit backward.
//!
//! For the packed patches of all images, x: [N, E] (E = the tower's width):
//!
//! ```text
//! x   = pixels · W_patchᵀ                         (Conv3d with stride = kernel, as a linear map)
//! (Qwen2.5-VL: rows permuted into windows, see `window_index`)
//! per block:
//!   xn  = norm1(x)                                (LayerNorm(+bias) in Qwen2-VL, RMSNorm in 2.5)
//!   q,k,v = split(xn·W_qkvᵀ + b_qkv)              [N, nh, hd] each
//!   q,k = rope2d(q), rope2d(k)                     angles (h·f_i | w·f_i) of the patch's cell
//!   att = full_attention(q, k, v) within each image (2.5: within each window, except the
//!         `fullatt_block_indexes` blocks, which see the whole image)
//!   x   = x + att·W_projᵀ + b_proj
//!   x   = x + mlp(norm2(x))                       (fc2(quick_gelu(fc1 ·)) in Qwen2-VL,
//!                                                  down(silu(gate ·) ⊙ up ·) in 2.5, with biases)
//! merger: y = fc2(gelu(fc1(view(ln_q(x), [N/4, 4E]))))   [N/4, H]
//! (Qwen2.5-VL: merged rows permuted back to image order)
//! ```
//!
//! The 2-D rotary angles: with hd the head width and f_i = θ^(−2i/(hd/2)) for i < hd/4, a patch
//! at grid cell (h, w) rotates the pair (i, i + hd/2) by h·f_i for i < hd/4 and by
//! w·f_(i−hd/4) for hd/4 ≤ i < hd/2 (transformers' `Qwen2VLVisionRotaryEmbedding`).

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::Value;

use super::ops::{self, Gelu, Rope, VarLen};
use super::params::Linear;

/// The two tower designs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionKind {
    /// Qwen2-VL: LayerNorm, fc1/fc2 MLP with quick GELU, attention within each image.
    Qwen2Vl,
    /// Qwen2.5-VL: RMSNorm, gated SiLU MLP, window attention except the full-attention blocks.
    Qwen25Vl,
}

/// `vision_config` of a Qwen2-VL / Qwen2.5-VL checkpoint (the fields the tower uses).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub kind: VisionKind,
    pub depth: usize,
    /// The tower's width E (`embed_dim` in Qwen2-VL, `hidden_size` in Qwen2.5-VL).
    pub width: usize,
    pub num_heads: usize,
    /// Width of the MLP's hidden layer.
    pub mlp_hidden: usize,
    /// Width of the merger's output: the language model's hidden size.
    pub out_hidden: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    /// Qwen2-VL's MLP activation (`quick_gelu` or `gelu`).
    pub act: Gelu,
    /// Qwen2.5-VL: window width in pixels and the blocks with whole-image attention.
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub rope_theta: f64,
}

fn field_usize(v: &Value, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).with_context(|| {
            format!("vision_config.{key} must be a non-negative integer, got {x}")
        }),
    }
}

fn need(v: &Value, key: &str) -> Result<usize> {
    field_usize(v, key)?.with_context(|| format!("vision_config.{key} is missing"))
}

impl VisionConfig {
    /// Reads `vision_config` (either model type's field names).
    pub fn from_json(v: &Value, kind: VisionKind) -> Result<Self> {
        ensure!(v.is_object(), "vision_config must be a JSON object");
        let num_heads = need(v, "num_heads")?;
        let depth = need(v, "depth")?;
        let in_channels = field_usize(v, "in_channels")?
            .or(field_usize(v, "in_chans")?)
            .unwrap_or(3);
        let patch_size = field_usize(v, "patch_size")?.unwrap_or(14);
        let temporal_patch_size = field_usize(v, "temporal_patch_size")?.unwrap_or(2);
        let merge_size = field_usize(v, "spatial_merge_size")?.unwrap_or(2);
        let rope_theta = v
            .get("rope_parameters")
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let act_name = v.get("hidden_act").and_then(Value::as_str);
        let c = match kind {
            VisionKind::Qwen2Vl => {
                let width = need(v, "embed_dim")?;
                let ratio = v.get("mlp_ratio").and_then(Value::as_f64).unwrap_or(4.0);
                let act = match act_name.unwrap_or("quick_gelu") {
                    "quick_gelu" => Gelu::Quick,
                    "gelu" => Gelu::Exact,
                    other => bail!(
                        "vision_config.hidden_act {other:?} is not supported (quick_gelu or gelu)"
                    ),
                };
                VisionConfig {
                    kind,
                    depth,
                    width,
                    num_heads,
                    mlp_hidden: (width as f64 * ratio) as usize,
                    out_hidden: need(v, "hidden_size")?,
                    in_channels,
                    patch_size,
                    temporal_patch_size,
                    merge_size,
                    act,
                    window_size: 0,
                    fullatt_block_indexes: Vec::new(),
                    rope_theta,
                }
            }
            VisionKind::Qwen25Vl => {
                if let Some(a) = act_name.filter(|a| *a != "silu") {
                    bail!("vision_config.hidden_act {a:?} is not supported (silu)");
                }
                let full = match v.get("fullatt_block_indexes") {
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|x| x.as_u64().map(|n| n as usize))
                        .collect::<Option<Vec<_>>>()
                        .context("vision_config.fullatt_block_indexes must hold integers")?,
                    _ => Vec::new(),
                };
                VisionConfig {
                    kind,
                    depth,
                    width: need(v, "hidden_size")?,
                    num_heads,
                    mlp_hidden: need(v, "intermediate_size")?,
                    out_hidden: need(v, "out_hidden_size")?,
                    in_channels,
                    patch_size,
                    temporal_patch_size,
                    merge_size,
                    act: Gelu::Exact,
                    window_size: field_usize(v, "window_size")?.unwrap_or(112),
                    fullatt_block_indexes: full,
                    rope_theta,
                }
            }
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.width > 0 && self.num_heads > 0 && self.width.is_multiple_of(self.num_heads),
            "vision_config: the width ({}) must be a positive multiple of num_heads ({})",
            self.width,
            self.num_heads
        );
        ensure!(
            self.head_dim().is_multiple_of(4),
            "vision_config: head_dim ({}) must be a multiple of 4 for the 2-D rotary embedding",
            self.head_dim()
        );
        ensure!(
            self.patch_size > 0 && self.merge_size > 0 && self.temporal_patch_size > 0,
            "vision_config: patch_size, spatial_merge_size and temporal_patch_size must be positive"
        );
        if self.kind == VisionKind::Qwen25Vl {
            ensure!(
                self.window_size >= self.merge_size * self.patch_size,
                "vision_config.window_size ({}) must be at least spatial_merge_size·patch_size",
                self.window_size
            );
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.width / self.num_heads
    }

    /// One patch row: in_channels · temporal_patch_size · patch_size².
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    fn has_norm_bias(&self) -> bool {
        self.kind == VisionKind::Qwen2Vl
    }
}

/// A norm's weight and (LayerNorm only) bias.
#[derive(Debug, Clone, PartialEq)]
pub struct Norm<T> {
    pub weight: T,
    pub bias: Option<T>,
}

/// The block's MLP: Qwen2-VL's fc1/fc2 or Qwen2.5-VL's gated one.
#[derive(Debug, Clone, PartialEq)]
pub enum VisionMlp<T> {
    Fc {
        fc1: Linear<T>,
        fc2: Linear<T>,
    },
    Gated {
        gate_proj: Linear<T>,
        up_proj: Linear<T>,
        down_proj: Linear<T>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionBlock<T> {
    pub norm1: Norm<T>,
    pub norm2: Norm<T>,
    pub qkv: Linear<T>,
    pub proj: Linear<T>,
    pub mlp: VisionMlp<T>,
}

/// Every parameter of the tower, named as transformers names them under `visual.`:
///
/// ```text
/// patch_embed.proj.weight                    [E, C, T, P, P] (held as [E, C·T·P·P])
/// blocks.N.norm{1,2}.{weight,bias}           [E]   (bias: Qwen2-VL only)
/// blocks.N.attn.qkv.{weight,bias}            [3E, E], [3E]
/// blocks.N.attn.proj.{weight,bias}           [E, E], [E]
/// blocks.N.mlp.fc{1,2}.{weight,bias}         (Qwen2-VL) | mlp.{gate,up,down}_proj.* (2.5)
/// merger.ln_q.{weight,bias}                  [E]
/// merger.mlp.0.{weight,bias}                 [4E, 4E], [4E]
/// merger.mlp.2.{weight,bias}                 [H, 4E], [H]
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct VisionParams<T> {
    pub patch_embed: T,
    pub blocks: Vec<VisionBlock<T>>,
    pub merger_ln: Norm<T>,
    pub merger_fc1: Linear<T>,
    pub merger_fc2: Linear<T>,
}

/// A leaf of the tower: name (without the `visual.` prefix), shape as stored in the checkpoint,
/// and whether it is a matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisionLeaf {
    pub name: String,
    pub shape: Vec<usize>,
    pub is_matrix: bool,
}

impl<T> VisionParams<T> {
    /// Builds the tree from the config, asking `f` for every leaf in [`Self::named`] order.
    pub fn build(c: &VisionConfig, mut f: impl FnMut(&VisionLeaf) -> Result<T>) -> Result<Self> {
        let mut leaf = |name: String, shape: Vec<usize>, is_matrix: bool| {
            f(&VisionLeaf {
                name,
                shape,
                is_matrix,
            })
        };
        let e = c.width;
        let patch_embed = leaf(
            "patch_embed.proj.weight".into(),
            vec![
                e,
                c.in_channels,
                c.temporal_patch_size,
                c.patch_size,
                c.patch_size,
            ],
            true,
        )?;
        fn linear<T>(
            leaf: &mut impl FnMut(String, Vec<usize>, bool) -> Result<T>,
            name: &str,
            out: usize,
            inp: usize,
        ) -> Result<Linear<T>> {
            Ok(Linear {
                weight: leaf(format!("{name}.weight"), vec![out, inp], true)?,
                bias: Some(leaf(format!("{name}.bias"), vec![out], false)?),
            })
        }
        let norm = |leaf: &mut dyn FnMut(String, Vec<usize>, bool) -> Result<T>, name: &str| {
            Ok::<_, anyhow::Error>(Norm {
                weight: leaf(format!("{name}.weight"), vec![e], false)?,
                bias: if c.has_norm_bias() {
                    Some(leaf(format!("{name}.bias"), vec![e], false)?)
                } else {
                    None
                },
            })
        };
        let mut blocks = Vec::with_capacity(c.depth);
        for i in 0..c.depth {
            let p = format!("blocks.{i}");
            let norm1 = norm(&mut leaf, &format!("{p}.norm1"))?;
            let norm2 = norm(&mut leaf, &format!("{p}.norm2"))?;
            let qkv = linear(&mut leaf, &format!("{p}.attn.qkv"), 3 * e, e)?;
            let proj = linear(&mut leaf, &format!("{p}.attn.proj"), e, e)?;
            let mlp = match c.kind {
                VisionKind::Qwen2Vl => VisionMlp::Fc {
                    fc1: linear(&mut leaf, &format!("{p}.mlp.fc1"), c.mlp_hidden, e)?,
                    fc2: linear(&mut leaf, &format!("{p}.mlp.fc2"), e, c.mlp_hidden)?,
                },
                VisionKind::Qwen25Vl => VisionMlp::Gated {
                    gate_proj: linear(&mut leaf, &format!("{p}.mlp.gate_proj"), c.mlp_hidden, e)?,
                    up_proj: linear(&mut leaf, &format!("{p}.mlp.up_proj"), c.mlp_hidden, e)?,
                    down_proj: linear(&mut leaf, &format!("{p}.mlp.down_proj"), e, c.mlp_hidden)?,
                },
            };
            blocks.push(VisionBlock {
                norm1,
                norm2,
                qkv,
                proj,
                mlp,
            });
        }
        let m = e * c.merge_size * c.merge_size;
        let merger_ln = norm(&mut leaf, "merger.ln_q")?;
        let merger_fc1 = linear(&mut leaf, "merger.mlp.0", m, m)?;
        let merger_fc2 = linear(&mut leaf, "merger.mlp.2", c.out_hidden, m)?;
        Ok(VisionParams {
            patch_embed,
            blocks,
            merger_ln,
            merger_fc1,
            merger_fc2,
        })
    }

    /// Every leaf with its name (without the `visual.` prefix), in a fixed order.
    pub fn named(&self) -> Vec<(String, &T)> {
        let mut out = vec![("patch_embed.proj.weight".to_string(), &self.patch_embed)];
        fn lin<'a, T>(out: &mut Vec<(String, &'a T)>, name: &str, l: &'a Linear<T>) {
            out.push((format!("{name}.weight"), &l.weight));
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), b));
            }
        }
        fn norm<'a, T>(out: &mut Vec<(String, &'a T)>, name: &str, n: &'a Norm<T>) {
            out.push((format!("{name}.weight"), &n.weight));
            if let Some(b) = &n.bias {
                out.push((format!("{name}.bias"), b));
            }
        }
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("blocks.{i}");
            norm(&mut out, &format!("{p}.norm1"), &b.norm1);
            norm(&mut out, &format!("{p}.norm2"), &b.norm2);
            lin(&mut out, &format!("{p}.attn.qkv"), &b.qkv);
            lin(&mut out, &format!("{p}.attn.proj"), &b.proj);
            match &b.mlp {
                VisionMlp::Fc { fc1, fc2 } => {
                    lin(&mut out, &format!("{p}.mlp.fc1"), fc1);
                    lin(&mut out, &format!("{p}.mlp.fc2"), fc2);
                }
                VisionMlp::Gated {
                    gate_proj,
                    up_proj,
                    down_proj,
                } => {
                    lin(&mut out, &format!("{p}.mlp.gate_proj"), gate_proj);
                    lin(&mut out, &format!("{p}.mlp.up_proj"), up_proj);
                    lin(&mut out, &format!("{p}.mlp.down_proj"), down_proj);
                }
            }
        }
        norm(&mut out, "merger.ln_q", &self.merger_ln);
        lin(&mut out, "merger.mlp.0", &self.merger_fc1);
        lin(&mut out, "merger.mlp.2", &self.merger_fc2);
        out
    }

    /// Every leaf, mutably, in [`Self::named`] order.
    pub fn leaves_mut(&mut self) -> Vec<&mut T> {
        fn pair<'a, T>(out: &mut Vec<&'a mut T>, w: &'a mut T, b: &'a mut Option<T>) {
            out.push(w);
            if let Some(b) = b {
                out.push(b);
            }
        }
        let mut out = vec![&mut self.patch_embed];
        for b in &mut self.blocks {
            pair(&mut out, &mut b.norm1.weight, &mut b.norm1.bias);
            pair(&mut out, &mut b.norm2.weight, &mut b.norm2.bias);
            pair(&mut out, &mut b.qkv.weight, &mut b.qkv.bias);
            pair(&mut out, &mut b.proj.weight, &mut b.proj.bias);
            match &mut b.mlp {
                VisionMlp::Fc { fc1, fc2 } => {
                    pair(&mut out, &mut fc1.weight, &mut fc1.bias);
                    pair(&mut out, &mut fc2.weight, &mut fc2.bias);
                }
                VisionMlp::Gated {
                    gate_proj,
                    up_proj,
                    down_proj,
                } => {
                    pair(&mut out, &mut gate_proj.weight, &mut gate_proj.bias);
                    pair(&mut out, &mut up_proj.weight, &mut up_proj.bias);
                    pair(&mut out, &mut down_proj.weight, &mut down_proj.bias);
                }
            }
        }
        pair(
            &mut out,
            &mut self.merger_ln.weight,
            &mut self.merger_ln.bias,
        );
        pair(
            &mut out,
            &mut self.merger_fc1.weight,
            &mut self.merger_fc1.bias,
        );
        pair(
            &mut out,
            &mut self.merger_fc2.weight,
            &mut self.merger_fc2.bias,
        );
        out
    }
}

/// The tower's weights: matrices in the compute dtype, vectors in f32.
pub type VisionWeights = VisionParams<Tensor>;
/// Gradients of the tower's parameters.
pub type VisionGrads = VisionParams<Vec<f32>>;

/// Where each patch sits, how patches group into attention segments, and (Qwen2.5-VL) the
/// window order, for a list of images.
#[derive(Debug, Clone)]
pub struct PatchLayout {
    /// (h, w) grid cell of each patch, in the processor's order.
    pub cells: Vec<(u32, u32)>,
    /// Segments of whole images (one per frame), in the order the blocks see the rows.
    pub image_segments: VarLen,
    /// Segments of windows (Qwen2.5-VL) in the order the blocks see the rows.
    pub window_segments: VarLen,
    /// Qwen2.5-VL: merged unit i of the blocks' order is merged unit `window_index[i]` of the
    /// image order (identity for Qwen2-VL).
    pub window_index: Vec<usize>,
}

impl PatchLayout {
    /// The layout of images with patch grids `grids` (t, h, w), as transformers'
    /// `get_vision_position_ids`, `get_vision_cu_seqlens` and `get_vision_window_index` compute it.
    pub fn new(c: &VisionConfig, grids: &[[usize; 3]]) -> Result<Self> {
        let m = c.merge_size;
        let mut cells = Vec::new();
        let mut frame_lens = Vec::new();
        let mut window_index = Vec::new();
        let mut window_lens = Vec::new();
        let mut unit_base = 0usize;
        for (i, &[t, h, w]) in grids.iter().enumerate() {
            ensure!(
                t > 0 && h > 0 && w > 0 && h.is_multiple_of(m) && w.is_multiple_of(m),
                "image {i}: grid {t}×{h}×{w} is not a positive multiple of spatial_merge_size {m}"
            );
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for mh in 0..m {
                            for mw in 0..m {
                                cells.push(((bh * m + mh) as u32, (bw * m + mw) as u32));
                            }
                        }
                    }
                }
                frame_lens.push(h * w);
            }
            let (lh, lw) = (h / m, w / m);
            match c.kind {
                VisionKind::Qwen2Vl => {
                    window_index.extend(unit_base..unit_base + t * lh * lw);
                }
                VisionKind::Qwen25Vl => {
                    let ws = c.window_size / m / c.patch_size;
                    let (nwh, nww) = (lh.div_ceil(ws).max(1), lw.div_ceil(ws).max(1));
                    // transformers pads to a multiple of ws plus (when already a multiple) one
                    // more window of padding; those windows are empty and dropped.
                    for f in 0..t {
                        for wy in 0..nwh {
                            for wx in 0..nww {
                                let mut n = 0;
                                for y in wy * ws..((wy + 1) * ws).min(lh) {
                                    for x in wx * ws..((wx + 1) * ws).min(lw) {
                                        window_index.push(unit_base + f * lh * lw + y * lw + x);
                                        n += 1;
                                    }
                                }
                                if n > 0 {
                                    window_lens.push(n * m * m);
                                }
                            }
                        }
                    }
                }
            }
            unit_base += t * lh * lw;
        }
        if c.kind == VisionKind::Qwen2Vl {
            window_lens = frame_lens.clone();
        }
        Ok(PatchLayout {
            cells,
            image_segments: VarLen::from_lens(&frame_lens),
            window_segments: VarLen::from_lens(&window_lens),
            window_index,
        })
    }

    /// Patch rows in the blocks' order: row r of the blocks is patch `patch_order()[r]`.
    fn patch_order(&self, unit: usize) -> Vec<u32> {
        self.window_index
            .iter()
            .flat_map(|&u| (u * unit..(u + 1) * unit).map(|p| p as u32))
            .collect()
    }
}

/// The 2-D rotary tables of `cells` (one row per patch, see the module doc).
fn rope_tables(c: &VisionConfig, cells: &[(u32, u32)]) -> Result<Rope> {
    let hd = c.head_dim();
    let (half, quarter) = (hd / 2, hd / 4);
    let spatial = half as f32;
    let inv: Vec<f32> = (0..quarter)
        .map(|i| 1.0f32 / (c.rope_theta as f32).powf((2 * i) as f32 / spatial))
        .collect();
    let mut cos = Vec::with_capacity(cells.len() * half);
    let mut sin = Vec::with_capacity(cells.len() * half);
    for &(h, w) in cells {
        for p in [h, w] {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    Rope::from_tables(hd, cos, sin)
}

/// Activations of one block kept for its backward.
struct BlockCache {
    x: Tensor,
    xn: Tensor,
    rstd1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    att: Tensor,
    lse: Tensor,
    xm: Tensor,
    xn2: Tensor,
    rstd2: Tensor,
    /// fc1 output (Qwen2-VL) or gate (2.5).
    a: Tensor,
    /// up (2.5 only).
    b: Option<Tensor>,
    /// The MLP's hidden activation.
    hid: Tensor,
}

/// What the tower's backward needs from its forward.
pub struct VisionCache {
    pixels: Tensor,
    order: Vec<u32>,
    rope: Rope,
    blocks: Vec<BlockCache>,
    x_final: Tensor,
    rstd_merge: Tensor,
    merged_in: Tensor,
    fc1_out: Tensor,
    gelu_out: Tensor,
    layout: PatchLayout,
}

/// The tower over `config`'s weights.
pub struct VisionTower<'a> {
    pub config: &'a VisionConfig,
    pub weights: &'a VisionWeights,
}

fn norm_forward(n: &Norm<Tensor>, x: &Tensor) -> Result<(Tensor, Tensor)> {
    match &n.bias {
        Some(b) => ops::layer_norm(x, &n.weight, b, 1e-6),
        None => ops::rms_norm(x, &n.weight, 1e-6),
    }
}

fn norm_backward(
    n: &Norm<Tensor>,
    dy: &Tensor,
    x: &Tensor,
    rstd: &Tensor,
    g: &mut Norm<Vec<f32>>,
) -> Result<Tensor> {
    match &n.bias {
        Some(_) => {
            let (dx, dw, db) = ops::layer_norm_backward(dy, x, &n.weight, rstd)?;
            add_into(&mut g.weight, &dw)?;
            if let Some(gb) = g.bias.as_mut() {
                add_into(gb, &db)?;
            }
            Ok(dx)
        }
        None => {
            let (dx, dw) = ops::rms_norm_backward(dy, x, &n.weight, rstd)?;
            add_into(&mut g.weight, &dw)?;
            Ok(dx)
        }
    }
}

fn add_into(grad: &mut [f32], t: &Tensor) -> Result<()> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    ensure!(
        v.len() == grad.len(),
        "internal: gradient of {} for a buffer of {}",
        v.len(),
        grad.len()
    );
    grad.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
    Ok(())
}

/// Gathers rows `idx` of x [N, D].
fn rows(x: &Tensor, idx: &[u32]) -> Result<Tensor> {
    let i = Tensor::from_slice(idx, idx.len(), x.device())?;
    Ok(x.index_select(&i, 0)?)
}

/// The inverse of a permutation.
fn inverse(p: &[u32]) -> Vec<u32> {
    let mut inv = vec![0u32; p.len()];
    for (i, &j) in p.iter().enumerate() {
        inv[j as usize] = i as u32;
    }
    inv
}

impl<'a> VisionTower<'a> {
    fn segments_for(&self, block: usize, layout: &'a PatchLayout) -> &'a VarLen {
        if self.config.kind == VisionKind::Qwen25Vl
            && !self.config.fullatt_block_indexes.contains(&block)
        {
            &layout.window_segments
        } else {
            &layout.image_segments
        }
    }

    /// The image embeddings [N/merge², out_hidden] of packed `pixels` [N, patch_dim] with patch
    /// grids `grids`, and (when `keep`) what the backward needs.
    pub fn forward(
        &self,
        pixels: &Tensor,
        grids: &[[usize; 3]],
        keep: bool,
    ) -> Result<(Tensor, Option<VisionCache>)> {
        let c = self.config;
        let layout = PatchLayout::new(c, grids)?;
        let n = layout.cells.len();
        ensure!(
            pixels.dims() == [n, c.patch_dim()],
            "vision tower: pixel_values of shape {:?}, expected [{n}, {}] for grids {grids:?}",
            pixels.dims(),
            c.patch_dim()
        );
        let unit = c.merge_size * c.merge_size;
        let order = layout.patch_order(unit);
        let cells: Vec<(u32, u32)> = order.iter().map(|&p| layout.cells[p as usize]).collect();
        let rope = rope_tables(c, &cells)?;
        let positions: Vec<u32> = (0..n as u32).collect();
        let (e, nh, hd) = (c.width, c.num_heads, c.head_dim());
        let x0 = ops::linear(pixels, &self.weights.patch_embed, None)?;
        let mut x = rows(&x0, &order)?;
        let mut caches = Vec::new();
        for (bi, blk) in self.weights.blocks.iter().enumerate() {
            let seqs = self.segments_for(bi, &layout);
            let (xn, rstd1) = norm_forward(&blk.norm1, &x)?;
            let qkv = blk.qkv.forward(&xn)?;
            let q = qkv.narrow(1, 0, e)?.contiguous()?.reshape((n, nh, hd))?;
            let k = qkv.narrow(1, e, e)?.contiguous()?.reshape((n, nh, hd))?;
            let v = qkv
                .narrow(1, 2 * e, e)?
                .contiguous()?
                .reshape((n, nh, hd))?;
            let q = rope.forward(&q, &positions)?;
            let k = rope.forward(&k, &positions)?;
            let (att, lse) = ops::full_attention(&q, &k, &v, seqs)?;
            let att = att.reshape((n, e))?;
            let xm = (&x + blk.proj.forward(&att)?)?;
            let (xn2, rstd2) = norm_forward(&blk.norm2, &xm)?;
            let (a, b, hid, out) = match &blk.mlp {
                VisionMlp::Fc { fc1, fc2 } => {
                    let a = fc1.forward(&xn2)?;
                    let hid = ops::gelu(&a, c.act)?;
                    let out = fc2.forward(&hid)?;
                    (a, None, hid, out)
                }
                VisionMlp::Gated {
                    gate_proj,
                    up_proj,
                    down_proj,
                } => {
                    let a = gate_proj.forward(&xn2)?;
                    let b = up_proj.forward(&xn2)?;
                    let hid = ops::swiglu(&a, &b)?;
                    let out = down_proj.forward(&hid)?;
                    (a, Some(b), hid, out)
                }
            };
            let x_next = (&xm + out)?;
            if keep {
                caches.push(BlockCache {
                    x,
                    xn,
                    rstd1,
                    q,
                    k,
                    v,
                    att,
                    lse,
                    xm,
                    xn2,
                    rstd2,
                    a,
                    b,
                    hid,
                });
            }
            x = x_next;
        }
        let (xln, rstd_merge) = norm_forward(&self.weights.merger_ln, &x)?;
        let merged_in = xln.reshape((n / unit, e * unit))?;
        let fc1_out = self.weights.merger_fc1.forward(&merged_in)?;
        let gelu_out = ops::gelu(&fc1_out, Gelu::Exact)?;
        let merged = self.weights.merger_fc2.forward(&gelu_out)?;
        // Back to image order: output unit window_index[i] is merged row i.
        let back = inverse(
            &layout
                .window_index
                .iter()
                .map(|&u| u as u32)
                .collect::<Vec<_>>(),
        );
        let out = rows(&merged, &back)?;
        let cache = keep.then(|| VisionCache {
            pixels: pixels.clone(),
            order,
            rope,
            blocks: caches,
            x_final: x,
            rstd_merge,
            merged_in,
            fc1_out,
            gelu_out,
            layout,
        });
        Ok((out, cache))
    }

    /// Backward from dy = ∂L/∂(image embeddings) [N/merge², out_hidden] (image order), adding
    /// every tower parameter's gradient to `grads`.
    pub fn backward(&self, cache: VisionCache, dy: &Tensor, grads: &mut VisionGrads) -> Result<()> {
        let c = self.config;
        let (e, nh, hd) = (c.width, c.num_heads, c.head_dim());
        let n = cache.layout.cells.len();
        let w = self.weights;
        let window: Vec<u32> = cache
            .layout
            .window_index
            .iter()
            .map(|&u| u as u32)
            .collect();
        // out = merged[back]  ⇒  dmerged[i] = dy[window_index[i]].
        let dmerged = rows(dy, &window)?;
        let dgelu = w
            .merger_fc2
            .backward(&dmerged, &cache.gelu_out, &mut grads.merger_fc2)?;
        let dfc1 = ops::gelu_backward(&dgelu, &cache.fc1_out, Gelu::Exact)?;
        let dmerged_in = w
            .merger_fc1
            .backward(&dfc1, &cache.merged_in, &mut grads.merger_fc1)?;
        let dxln = dmerged_in.reshape((n, e))?;
        let mut dx = norm_backward(
            &w.merger_ln,
            &dxln,
            &cache.x_final,
            &cache.rstd_merge,
            &mut grads.merger_ln,
        )?;
        let positions: Vec<u32> = (0..n as u32).collect();
        for (bi, ((blk, bc), gb)) in w
            .blocks
            .iter()
            .zip(cache.blocks)
            .zip(grads.blocks.iter_mut())
            .enumerate()
            .rev()
        {
            let seqs = self.segments_for(bi, &cache.layout);
            let dxn2 = match (&blk.mlp, &mut gb.mlp) {
                (VisionMlp::Fc { fc1, fc2 }, VisionMlp::Fc { fc1: g1, fc2: g2 }) => {
                    let dhid = fc2.backward(&dx, &bc.hid, g2)?;
                    let da = ops::gelu_backward(&dhid, &bc.a, c.act)?;
                    fc1.backward(&da, &bc.xn2, g1)?
                }
                (
                    VisionMlp::Gated {
                        gate_proj,
                        up_proj,
                        down_proj,
                    },
                    VisionMlp::Gated {
                        gate_proj: gg,
                        up_proj: gu,
                        down_proj: gd,
                    },
                ) => {
                    let dhid = down_proj.backward(&dx, &bc.hid, gd)?;
                    let up = bc.b.as_ref().context("internal: gated MLP kept no up")?;
                    let (dgate, dup) = ops::swiglu_backward(&dhid, &bc.a, up)?;
                    (gate_proj.backward(&dgate, &bc.xn2, gg)?
                        + up_proj.backward(&dup, &bc.xn2, gu)?)?
                }
                _ => bail!("internal: vision gradient tree does not match the weights"),
            };
            let dxm = (&dx + norm_backward(&blk.norm2, &dxn2, &bc.xm, &bc.rstd2, &mut gb.norm2)?)?;
            let datt = blk.proj.backward(&dxm, &bc.att, &mut gb.proj)?;
            let att = bc.att.reshape((n, nh, hd))?;
            let (dq, dk, dv) = ops::full_attention_backward(
                &datt.reshape((n, nh, hd))?,
                &bc.q,
                &bc.k,
                &bc.v,
                &att,
                &bc.lse,
                seqs,
            )?;
            let dq = cache.rope.backward(&dq, &positions)?.reshape((n, e))?;
            let dk = cache.rope.backward(&dk, &positions)?.reshape((n, e))?;
            let dqkv = Tensor::cat(&[&dq, &dk, &dv.reshape((n, e))?], 1)?;
            let dxn = blk.qkv.backward(&dqkv, &bc.xn, &mut gb.qkv)?;
            dx = (dxm + norm_backward(&blk.norm1, &dxn, &bc.x, &bc.rstd1, &mut gb.norm1)?)?;
        }
        // x = x0[order]  ⇒  dx0[order[r]] = dx[r].
        let dx0 = rows(&dx, &inverse(&cache.order))?;
        ops::linear_backward_params(
            &dx0,
            &cache.pixels,
            &mut grads.patch_embed,
            None,
            w.patch_embed.dtype() == DType::BF16,
        )?;
        Ok(())
    }
}

/// A zero gradient buffer for every tower parameter.
pub fn zero_grads(w: &VisionWeights, c: &VisionConfig) -> Result<VisionGrads> {
    let sizes: std::collections::HashMap<String, usize> = w
        .named()
        .into_iter()
        .map(|(n, t)| (n, t.elem_count()))
        .collect();
    VisionParams::build(c, |leaf| {
        let n = sizes
            .get(&leaf.name)
            .with_context(|| format!("internal: no weight {}", leaf.name))?;
        Ok(vec![0.0f32; *n])
    })
}

/// Loads the tower's weights through `take(leaf)` (checkpoint names and shapes); the patch
/// embedding is then held as [E, patch_dim].
pub fn build_weights(
    c: &VisionConfig,
    take: impl FnMut(&VisionLeaf) -> Result<Tensor>,
) -> Result<VisionWeights> {
    let mut w = VisionParams::build(c, take)?;
    w.patch_embed = w.patch_embed.reshape((c.width, c.patch_dim()))?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kind: VisionKind) -> VisionConfig {
        VisionConfig {
            kind,
            depth: 2,
            width: 16,
            num_heads: 2,
            mlp_hidden: 24,
            out_hidden: 8,
            in_channels: 3,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            act: Gelu::Quick,
            window_size: 56,
            fullatt_block_indexes: vec![1],
            rope_theta: 10000.0,
        }
    }

    #[test]
    fn window_layout_matches_transformers_hand_case() {
        // A 6×8-patch image → 3×4 merged units; windows of 2×2 units:
        // [0,1,4,5], [2,3,6,7], [8,9], [10,11] (transformers' get_vision_window_index).
        let c = config(VisionKind::Qwen25Vl);
        let l = PatchLayout::new(&c, &[[1, 6, 8]]).unwrap();
        assert_eq!(l.window_index, vec![0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 10, 11]);
        assert_eq!(l.window_segments.offsets, vec![0, 16, 32, 40, 48]);
        assert_eq!(l.image_segments.offsets, vec![0, 48]);
        // The first merged unit's 4 patches are the 2×2 cells at the origin.
        assert_eq!(&l.cells[..4], &[(0, 0), (0, 1), (1, 0), (1, 1)]);
    }
}
