//! Which instruction set the hand-written kernels use, detected once per process.
//!
//! Three levels, each a superset of the one below it:
//! - [`Isa::Avx512Bf16`]: AVX-512F/BW/VL and AVX512-BF16 (`vdpbf16ps`), e.g. AMD Zen 4 or
//!   Intel Sapphire Rapids and later;
//! - [`Isa::Avx2`]: AVX2 and FMA (x86-64-v3);
//! - [`Isa::Portable`]: plain Rust loops, any target.
//!
//! The environment variable `GPG_RL_ISA=portable|avx2|avx512` caps the level (it can only
//! lower it: asking for a level the CPU lacks prints a warning and uses the detected one).
//! Kernels take the level as an argument in their `*_with` entry points so that tests can run
//! every path the CPU supports without touching the environment.

use std::sync::OnceLock;

/// An instruction-set level of the CPU kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F + BW + VL + AVX512-BF16.
    Avx512Bf16,
    /// AVX2 + FMA.
    Avx2,
    /// No SIMD intrinsics.
    Portable,
}

impl Isa {
    /// 2, 1, 0 from the widest level down.
    fn rank(self) -> u8 {
        match self {
            Isa::Avx512Bf16 => 2,
            Isa::Avx2 => 1,
            Isa::Portable => 0,
        }
    }

    /// The name printed by benchmarks (and accepted by `GPG_RL_ISA`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Avx512Bf16 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Whether the running CPU can execute this level.
    pub(crate) fn supported(self) -> bool {
        self.rank() <= detected().rank()
    }

    /// Every level the running CPU supports, widest first (for tests and benchmarks).
    #[cfg(test)]
    pub(crate) fn all_supported() -> Vec<Isa> {
        [Isa::Avx512Bf16, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }
}

/// The widest level the CPU supports (ignoring `GPG_RL_ISA`).
fn detected() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512bf16") {
                return Isa::Avx512Bf16;
            }
            if has!("avx2") && has!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// The level the kernels use: the detected one, capped by `GPG_RL_ISA` when it is set.
pub(crate) fn isa() -> Isa {
    static CHOSEN: OnceLock<Isa> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let best = detected();
        let Ok(want) = std::env::var("GPG_RL_ISA") else {
            return best;
        };
        let want = match want.trim().to_ascii_lowercase().as_str() {
            "portable" => Isa::Portable,
            "avx2" => Isa::Avx2,
            "avx512" | "avx512bf16" => Isa::Avx512Bf16,
            other => {
                eprintln!(
                    "warning: GPG_RL_ISA={other:?} is not portable|avx2|avx512; using {}",
                    best.name()
                );
                return best;
            }
        };
        if want.supported() {
            want
        } else {
            eprintln!(
                "warning: GPG_RL_ISA={} but the CPU supports only {}; using {}",
                want.name(),
                best.name(),
                best.name()
            );
            best
        }
    })
}

/// Name of the instruction-set level the CPU kernels run with: "avx512", "avx2" or "portable".
pub fn isa_name() -> &'static str {
    isa().name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_nested_and_the_chosen_one_is_supported() {
        assert!(Isa::Portable.supported());
        assert!(isa().supported());
        if Isa::Avx512Bf16.supported() {
            assert!(Isa::Avx2.supported());
        }
        println!(
            "kernels use {} (detected {})",
            isa_name(),
            detected().name()
        );
    }
}
