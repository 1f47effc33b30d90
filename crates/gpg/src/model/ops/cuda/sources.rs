//! The CUDA C sources of the kernels, one module per file under `kernels/`, each compiled as
//! `COMMON` (kernels/common.cuh: bf16 bit conversions, block reductions) followed by the file.
//! bf16 travels as 16-bit integers, so the sources need no CUDA header: a bare NVRTC compiles
//! them.

/// kernels/common.cuh, prepended to every module.
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// A kernel module: its name and source (without the common header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Module {
    pub name: &'static str,
    pub source: &'static str,
    /// The `extern "C"` kernels it defines (checked after loading).
    pub kernels: &'static [&'static str],
}

impl Module {
    /// The full text NVRTC compiles.
    pub fn text(&self) -> String {
        format!("{COMMON}\n// ---- {}.cu ----\n{}", self.name, self.source)
    }
}

pub const RMS_NORM: Module = Module {
    name: "rms_norm",
    source: include_str!("kernels/rms_norm.cu"),
    kernels: &[
        "rms_norm_fwd_f32",
        "rms_norm_fwd_bf16",
        "rms_norm_bwd_f32",
        "rms_norm_bwd_bf16",
        "sum_parts",
    ],
};

pub const ROPE: Module = Module {
    name: "rope",
    source: include_str!("kernels/rope.cu"),
    kernels: &["rope_f32", "rope_bf16"],
};

pub const SWIGLU: Module = Module {
    name: "swiglu",
    source: include_str!("kernels/swiglu.cu"),
    kernels: &[
        "swiglu_fwd_f32",
        "swiglu_fwd_bf16",
        "swiglu_bwd_f32",
        "swiglu_bwd_bf16",
    ],
};

pub const ATTENTION: Module = Module {
    name: "attention",
    source: include_str!("kernels/attention.cu"),
    kernels: &[
        "attention_fwd",
        "attention_bwd_dot",
        "attention_bwd_dq",
        "attention_bwd_dkv",
        "kv_append",
        "kv_write_rows",
        "attention_decode_paged",
    ],
};

pub const LM_HEAD: Module = Module {
    name: "lm_head",
    source: include_str!("kernels/lm_head.cu"),
    kernels: &["head_chunk_fold", "head_finish", "head_chunk_dlogits"],
};

pub const EMBEDDING: Module = Module {
    name: "embedding",
    source: include_str!("kernels/embedding.cu"),
    kernels: &["embedding_fwd_f32", "embedding_fwd_bf16", "embedding_bwd"],
};

pub const OPTIM: Module = Module {
    name: "optim",
    source: include_str!("kernels/optim.cu"),
    kernels: &["adamw_step", "sum_squares", "sum_f64"],
};

pub const ELEMENTWISE: Module = Module {
    name: "elementwise",
    source: include_str!("kernels/elementwise.cu"),
    kernels: &[
        "add_bias_f32",
        "cast_f32_bf16",
        "cast_bf16_f32",
        "add_f32",
        "col_sum_parts",
        "add_sum_parts",
    ],
};

pub const SAMPLING: Module = Module {
    name: "sampling",
    source: include_str!("kernels/sampling.cu"),
    kernels: &["sample_rows"],
};

/// Every module, in the order the check compiles them.
pub const ALL: &[Module] = &[
    RMS_NORM,
    ROPE,
    SWIGLU,
    ATTENTION,
    LM_HEAD,
    EMBEDDING,
    OPTIM,
    ELEMENTWISE,
    SAMPLING,
];

/// The `extern "C" __global__` kernels a source defines, in order: (name, the argument of its
/// `__launch_bounds__` with a `#define`d name resolved, if it has one).
pub fn kernel_definitions(source: &str) -> Vec<(&str, Option<u32>)> {
    source
        .split("extern \"C\" __global__ void ")
        .skip(1)
        .map(|rest| {
            let (bounds, rest) = match rest.trim_start().strip_prefix("__launch_bounds__(") {
                Some(r) => {
                    let end = r.find(')').unwrap_or(0);
                    let arg = r[..end].split(',').next().unwrap_or("").trim();
                    let value = arg.parse().ok().or_else(|| {
                        source
                            .lines()
                            .find_map(|l| l.strip_prefix(&format!("#define {arg} ")))
                            .and_then(|v| v.trim().parse().ok())
                    });
                    (value, &r[end + 1..])
                }
                None => (None, rest),
            };
            (rest.split('(').next().unwrap_or("").trim(), bounds)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every declared kernel is defined as `extern "C" __global__ void NAME(` in its source and
    /// every defined kernel is declared (the list is what the loader asks the module for).
    #[test]
    fn declared_kernels_match_the_sources() {
        for m in ALL {
            let defined: Vec<&str> = kernel_definitions(m.source)
                .into_iter()
                .map(|(name, _)| name)
                .collect();
            let mut declared = m.kernels.to_vec();
            let mut found = defined.clone();
            declared.sort_unstable();
            found.sort_unstable();
            assert_eq!(declared, found, "module {}", m.name);
            // Each source states its equation in a leading comment.
            assert!(m.source.starts_with("//"), "module {}", m.name);
        }
    }
}
