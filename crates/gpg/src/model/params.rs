//! The parameter tree of a Qwen2 model, defined once and generic over what each leaf holds.
//!
//! `Qwen2Params<Tensor>` is the model's weights, `Qwen2Params<Vec<f32>>` its gradients or the
//! optimiser's f32 master copy; every user walks the same structure, so no hand-kept list of
//! parameters can drift from another. Field names mirror the Hugging Face module tree:
//!
//! ```text
//! model.embed_tokens.weight                         [V, H]
//! model.layers.N.input_layernorm.weight             [H]
//! model.layers.N.self_attn.{q,k,v}_proj.{weight,bias}  [q_dim|kv_dim, H], [q_dim|kv_dim]
//! model.layers.N.self_attn.o_proj.weight            [H, q_dim]
//! model.layers.N.self_attn.{q,k}_norm.weight        [head_dim]  (Qwen3 only)
//! model.layers.N.post_attention_layernorm.weight    [H]
//! model.layers.N.mlp.{gate,up}_proj.weight          [I, H]
//! model.layers.N.mlp.down_proj.weight               [H, I]
//! model.norm.weight                                 [H]
//! lm_head.weight                                    [V, H]   (absent when tied)
//! ```
//!
//! Biases follow the family (config.rs: q/k/v always in Qwen2, `attention_bias` also on o_proj
//! in Qwen3 and Llama, `mlp_bias` on the MLP in Llama).
//!
//! [`Qwen2Params::visit`] yields every leaf with its HF name in this fixed order; `visit_mut`,
//! `try_map` and [`Qwen2Params::zip_mut`] are built on the same walk. Two trees are matched by
//! name (a zip of trees with different structure is an error, never a silent shift).

use anyhow::{ensure, Result};

use super::config::Qwen2Config;

/// y = x·Wᵀ (+ b): `weight` is [out, in] as transformers stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear<T> {
    pub weight: T,
    pub bias: Option<T>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Attention<T> {
    pub q_proj: Linear<T>,
    pub k_proj: Linear<T>,
    pub v_proj: Linear<T>,
    pub o_proj: Linear<T>,
    /// Qwen3's RMSNorm weight over each query head [head_dim] (`None` in other families).
    pub q_norm: Option<T>,
    /// Qwen3's RMSNorm weight over each key head [head_dim].
    pub k_norm: Option<T>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mlp<T> {
    pub gate_proj: Linear<T>,
    pub up_proj: Linear<T>,
    pub down_proj: Linear<T>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecoderLayer<T> {
    pub input_layernorm: T,
    pub self_attn: Attention<T>,
    pub post_attention_layernorm: T,
    pub mlp: Mlp<T>,
}

/// Every parameter of `Qwen2ForCausalLM`.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2Params<T> {
    pub embed_tokens: T,
    pub layers: Vec<DecoderLayer<T>>,
    pub norm: T,
    /// `None` when `tie_word_embeddings`: the head is `embed_tokens`.
    pub lm_head: Option<T>,
}

/// What a leaf is, for code that treats kinds differently (e.g. which leaves are matrices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafKind {
    /// The embedding matrix or the untied head, [V, H].
    Embedding,
    /// The weight matrix of a linear layer.
    LinearWeight,
    /// The bias of a linear layer.
    Bias,
    /// An RMSNorm weight.
    Norm,
}

impl LeafKind {
    /// Leaves that are matrices (stored in the compute dtype); the others are vectors.
    pub fn is_matrix(self) -> bool {
        matches!(self, LeafKind::Embedding | LeafKind::LinearWeight)
    }
}

/// A leaf's place in the tree: its HF name, kind and shape (from the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub name: String,
    pub kind: LeafKind,
    pub shape: Vec<usize>,
}

/// The seven linear layers of a decoder layer with their HF names, in tree order.
const ATTN: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
const MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

impl<T> Attention<T> {
    fn linears(&self) -> [&Linear<T>; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }
    /// The QK-norm weights with their HF names (after the projections, as transformers
    /// lists them).
    fn head_norms(&self) -> [(&'static str, Option<&T>); 2] {
        [
            ("q_norm", self.q_norm.as_ref()),
            ("k_norm", self.k_norm.as_ref()),
        ]
    }
}

impl<T> Mlp<T> {
    fn linears(&self) -> [&Linear<T>; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }
    fn linears_mut(&mut self) -> [&mut Linear<T>; 3] {
        [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj]
    }
}

impl<T> Linear<T> {
    fn try_map<U>(
        &self,
        prefix: &str,
        f: &mut impl FnMut(&str, &T) -> Result<U>,
    ) -> Result<Linear<U>> {
        Ok(Linear {
            weight: f(&format!("{prefix}.weight"), &self.weight)?,
            bias: match &self.bias {
                Some(b) => Some(f(&format!("{prefix}.bias"), b)?),
                None => None,
            },
        })
    }
}

/// The callback of [`Qwen2Params::build`], as its helpers see it.
type LeafFn<'a, T> = dyn FnMut(String, LeafKind, &[usize]) -> Result<T> + 'a;

impl<T> Qwen2Params<T> {
    /// Builds a tree from the config, asking `f` for every leaf (in [`Self::visit`] order).
    pub fn build(config: &Qwen2Config, mut f: impl FnMut(&LeafInfo) -> Result<T>) -> Result<Self> {
        let h = config.hidden_size;
        let (qd, kvd, inter, v) = (
            config.q_dim(),
            config.kv_dim(),
            config.intermediate_size,
            config.vocab_size,
        );
        let mut leaf = |name: String, kind: LeafKind, shape: &[usize]| {
            f(&LeafInfo {
                name,
                kind,
                shape: shape.to_vec(),
            })
        };
        let embed_tokens = leaf(
            "model.embed_tokens.weight".into(),
            LeafKind::Embedding,
            &[v, h],
        )?;
        let linear = |leaf: &mut LeafFn<'_, T>,
                      name: String,
                      out: usize,
                      inp: usize,
                      bias: bool|
         -> Result<Linear<T>> {
            Ok(Linear {
                weight: leaf(
                    format!("{name}.weight"),
                    LeafKind::LinearWeight,
                    &[out, inp],
                )?,
                bias: if bias {
                    Some(leaf(format!("{name}.bias"), LeafKind::Bias, &[out])?)
                } else {
                    None
                },
            })
        };
        let (qkv_b, o_b, mlp_b) = (config.qkv_bias(), config.o_proj_bias(), config.mlp_bias());
        let hd = config.head_dim();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let input_layernorm =
                leaf(format!("{p}.input_layernorm.weight"), LeafKind::Norm, &[h])?;
            let q_proj = linear(&mut leaf, format!("{p}.self_attn.q_proj"), qd, h, qkv_b)?;
            let k_proj = linear(&mut leaf, format!("{p}.self_attn.k_proj"), kvd, h, qkv_b)?;
            let v_proj = linear(&mut leaf, format!("{p}.self_attn.v_proj"), kvd, h, qkv_b)?;
            let o_proj = linear(&mut leaf, format!("{p}.self_attn.o_proj"), h, qd, o_b)?;
            let mut head_norm = |name: &str| -> Result<Option<T>> {
                config
                    .qk_norm()
                    .then(|| {
                        leaf(
                            format!("{p}.self_attn.{name}.weight"),
                            LeafKind::Norm,
                            &[hd],
                        )
                    })
                    .transpose()
            };
            let self_attn = Attention {
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                q_norm: head_norm("q_norm")?,
                k_norm: head_norm("k_norm")?,
            };
            let post_attention_layernorm = leaf(
                format!("{p}.post_attention_layernorm.weight"),
                LeafKind::Norm,
                &[h],
            )?;
            let mlp = Mlp {
                gate_proj: linear(&mut leaf, format!("{p}.mlp.gate_proj"), inter, h, mlp_b)?,
                up_proj: linear(&mut leaf, format!("{p}.mlp.up_proj"), inter, h, mlp_b)?,
                down_proj: linear(&mut leaf, format!("{p}.mlp.down_proj"), h, inter, mlp_b)?,
            };
            layers.push(DecoderLayer {
                input_layernorm,
                self_attn,
                post_attention_layernorm,
                mlp,
            });
        }
        let norm = leaf("model.norm.weight".into(), LeafKind::Norm, &[h])?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(leaf("lm_head.weight".into(), LeafKind::Embedding, &[v, h])?)
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Calls `f(name, leaf)` for every leaf, in the fixed HF order of the module docs.
    pub fn visit<'a>(&'a self, mut f: impl FnMut(&str, &'a T)) {
        f("model.embed_tokens.weight", &self.embed_tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            f(
                &format!("{p}.input_layernorm.weight"),
                &layer.input_layernorm,
            );
            for (name, lin) in ATTN.iter().zip(layer.self_attn.linears()) {
                visit_linear(&format!("{p}.self_attn.{name}"), lin, &mut f);
            }
            for (name, w) in layer.self_attn.head_norms() {
                if let Some(w) = w {
                    f(&format!("{p}.self_attn.{name}.weight"), w);
                }
            }
            f(
                &format!("{p}.post_attention_layernorm.weight"),
                &layer.post_attention_layernorm,
            );
            for (name, lin) in MLP.iter().zip(layer.mlp.linears()) {
                visit_linear(&format!("{p}.mlp.{name}"), lin, &mut f);
            }
        }
        f("model.norm.weight", &self.norm);
        if let Some(head) = &self.lm_head {
            f("lm_head.weight", head);
        }
    }

    /// [`Self::visit`] with mutable leaves.
    pub fn visit_mut<'a>(&'a mut self, mut f: impl FnMut(&str, &'a mut T)) {
        f("model.embed_tokens.weight", &mut self.embed_tokens);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            f(
                &format!("{p}.input_layernorm.weight"),
                &mut layer.input_layernorm,
            );
            let attn = &mut layer.self_attn;
            for (name, lin) in ATTN.iter().zip([
                &mut attn.q_proj,
                &mut attn.k_proj,
                &mut attn.v_proj,
                &mut attn.o_proj,
            ]) {
                visit_linear_mut(&format!("{p}.self_attn.{name}"), lin, &mut f);
            }
            for (name, w) in [("q_norm", &mut attn.q_norm), ("k_norm", &mut attn.k_norm)] {
                if let Some(w) = w {
                    f(&format!("{p}.self_attn.{name}.weight"), w);
                }
            }
            f(
                &format!("{p}.post_attention_layernorm.weight"),
                &mut layer.post_attention_layernorm,
            );
            for (name, lin) in MLP.iter().zip(layer.mlp.linears_mut()) {
                visit_linear_mut(&format!("{p}.mlp.{name}"), lin, &mut f);
            }
        }
        f("model.norm.weight", &mut self.norm);
        if let Some(head) = &mut self.lm_head {
            f("lm_head.weight", head);
        }
    }

    /// A tree of the same structure whose leaves are `f(name, leaf)`.
    pub fn try_map<U>(&self, mut f: impl FnMut(&str, &T) -> Result<U>) -> Result<Qwen2Params<U>> {
        let embed_tokens = f("model.embed_tokens.weight", &self.embed_tokens)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            let m = &l.mlp;
            layers.push(DecoderLayer {
                input_layernorm: f(&format!("{p}.input_layernorm.weight"), &l.input_layernorm)?,
                self_attn: Attention {
                    q_proj: a.q_proj.try_map(&format!("{p}.self_attn.q_proj"), &mut f)?,
                    k_proj: a.k_proj.try_map(&format!("{p}.self_attn.k_proj"), &mut f)?,
                    v_proj: a.v_proj.try_map(&format!("{p}.self_attn.v_proj"), &mut f)?,
                    o_proj: a.o_proj.try_map(&format!("{p}.self_attn.o_proj"), &mut f)?,
                    q_norm: match &a.q_norm {
                        Some(w) => Some(f(&format!("{p}.self_attn.q_norm.weight"), w)?),
                        None => None,
                    },
                    k_norm: match &a.k_norm {
                        Some(w) => Some(f(&format!("{p}.self_attn.k_norm.weight"), w)?),
                        None => None,
                    },
                },
                post_attention_layernorm: f(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &l.post_attention_layernorm,
                )?,
                mlp: Mlp {
                    gate_proj: m.gate_proj.try_map(&format!("{p}.mlp.gate_proj"), &mut f)?,
                    up_proj: m.up_proj.try_map(&format!("{p}.mlp.up_proj"), &mut f)?,
                    down_proj: m.down_proj.try_map(&format!("{p}.mlp.down_proj"), &mut f)?,
                },
            });
        }
        let norm = f("model.norm.weight", &self.norm)?;
        let lm_head = match &self.lm_head {
            Some(h) => Some(f("lm_head.weight", h)?),
            None => None,
        };
        Ok(Qwen2Params {
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Every leaf with its name, in visit order.
    pub fn named(&self) -> Vec<(String, &T)> {
        let mut out = Vec::new();
        self.visit(|n, t| out.push((n.to_string(), t)));
        out
    }

    /// Every leaf mutably with its name, in visit order.
    pub fn named_mut(&mut self) -> Vec<(String, &mut T)> {
        let mut out = Vec::new();
        self.visit_mut(|n, t| out.push((n.to_string(), t)));
        out
    }

    /// The leaf called `name`, if the tree has one.
    pub fn get(&self, name: &str) -> Option<&T> {
        let mut found = None;
        self.visit(|n, t| {
            if n == name {
                found = Some(t);
            }
        });
        found
    }

    /// Calls `f(name, mine, theirs)` for every pair of leaves with the same name. Errors when
    /// the two trees do not have the same leaves (e.g. tied against untied, bias against none).
    pub fn zip_mut<U>(
        &mut self,
        other: &Qwen2Params<U>,
        mut f: impl FnMut(&str, &mut T, &U) -> Result<()>,
    ) -> Result<()> {
        let theirs = other.named();
        let mine = self.named_mut();
        ensure!(
            mine.len() == theirs.len(),
            "parameter trees differ: {} leaves against {}",
            mine.len(),
            theirs.len()
        );
        for ((name, a), (other_name, b)) in mine.into_iter().zip(theirs) {
            ensure!(
                name == other_name,
                "parameter trees differ: `{name}` against `{other_name}`"
            );
            f(&name, a, b)?;
        }
        Ok(())
    }
}

fn visit_linear<'a, T>(prefix: &str, lin: &'a Linear<T>, f: &mut impl FnMut(&str, &'a T)) {
    f(&format!("{prefix}.weight"), &lin.weight);
    if let Some(b) = &lin.bias {
        f(&format!("{prefix}.bias"), b);
    }
}

fn visit_linear_mut<'a, T>(
    prefix: &str,
    lin: &'a mut Linear<T>,
    f: &mut impl FnMut(&str, &'a mut T),
) {
    f(&format!("{prefix}.weight"), &mut lin.weight);
    if let Some(b) = &mut lin.bias {
        f(&format!("{prefix}.bias"), b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tied: bool) -> Qwen2Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 10, "hidden_size": 4, "intermediate_size": 6,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "tie_word_embeddings": tied
        }))
        .unwrap()
    }

    #[test]
    fn build_visit_map_and_get_agree_on_names_and_order() {
        let cfg = config(false);
        let tree =
            Qwen2Params::build(&cfg, |l| Ok((l.name.clone(), l.kind, l.shape.clone()))).unwrap();
        let names: Vec<String> = tree.named().into_iter().map(|(n, _)| n).collect();
        // Every leaf's stored name equals the name the walk gives it.
        tree.visit(|n, (stored, _, _)| assert_eq!(n, stored));
        assert_eq!(names.len(), 1 + 2 * 12 + 1 + 1);
        assert_eq!(names[0], "model.embed_tokens.weight");
        assert_eq!(names[2], "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(names[3], "model.layers.0.self_attn.q_proj.bias");
        assert_eq!(names.last().unwrap(), "lm_head.weight");
        let mapped = tree.try_map(|n, _| Ok(n.len())).unwrap();
        mapped.visit(|n, &len| assert_eq!(n.len(), len));
        let (_, kind, shape) = tree.get("model.layers.1.mlp.down_proj.weight").unwrap();
        assert_eq!(
            (*kind, shape.as_slice()),
            (LeafKind::LinearWeight, &[4usize, 6][..])
        );
        assert!(tree.get("nope").is_none());
        let tied = Qwen2Params::build(&config(true), |_| Ok(0u8)).unwrap();
        assert!(tied.lm_head.is_none());
    }

    #[test]
    fn zip_matches_by_name_and_refuses_different_trees() {
        let mut a =
            Qwen2Params::build(&config(false), |l| Ok(l.shape.iter().product::<usize>())).unwrap();
        let b = a.try_map(|_, &n| Ok(n * 2)).unwrap();
        a.zip_mut(&b, |_, x, y| {
            *x += *y;
            Ok(())
        })
        .unwrap();
        a.visit(|n, &x| {
            let shape = b.get(n).unwrap() / 2;
            assert_eq!(x, 3 * shape);
        });
        let tied = Qwen2Params::build(&config(true), |_| Ok(0usize)).unwrap();
        let err = a.zip_mut(&tied, |_, _, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("parameter trees differ"), "{err}");
    }
}
