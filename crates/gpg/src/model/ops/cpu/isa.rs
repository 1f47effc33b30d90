//! Which instruction set the hand-written kernels use, detected once per process.
//!
//! Three levels, each a superset of the one below it:
//! - [`Isa::Avx512Bf16`]: AVX-512F/BW/VL and AVX512-BF16 (`vdpbf16ps`), e.g. AMD Zen 4 or
//!   Intel Sapphire Rapids and later;
//! - [`Isa::Avx2`]: AVX2 and FMA (x86-64-v3);
//! - [`Isa::Portable`]: plain Rust loops, any target.
//!
//! Above them, [`amx`]: Intel AMX-BF16 tiles (Sapphire Rapids and later) for the bf16 matrix
//! products, on top of the AVX-512 level (detected by CPUID, enabled by the Linux permission
//! request in [`super::amx::available`]).
//!
//! The environment variable `GPG_RL_ISA=portable|avx2|avx512|amx` caps the level (it can only
//! lower it: asking for a level the CPU lacks prints a warning and uses the detected one);
//! `avx512` and below turn AMX off.
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
    chosen().0
}

/// Whether the bf16 matrix products may use AMX tiles: the CPU and OS allow it
/// ([`super::amx::available`]) and `GPG_RL_ISA` does not cap the level below `amx`.
pub(crate) fn amx() -> bool {
    chosen().1
}

/// (level, AMX allowed), read once from the CPU and `GPG_RL_ISA`.
fn chosen() -> (Isa, bool) {
    static CHOSEN: OnceLock<(Isa, bool)> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let best = detected();
        let has_amx = || best == Isa::Avx512Bf16 && super::amx::available();
        let Ok(want) = std::env::var("GPG_RL_ISA") else {
            return (best, has_amx());
        };
        let best_name = if has_amx() { "amx" } else { best.name() };
        let want = match want.trim().to_ascii_lowercase().as_str() {
            "portable" => Isa::Portable,
            "avx2" => Isa::Avx2,
            "avx512" | "avx512bf16" => Isa::Avx512Bf16,
            "amx" => {
                if !has_amx() {
                    eprintln!(
                        "warning: GPG_RL_ISA=amx but the CPU (or OS) has no AMX-BF16; using {}",
                        best.name()
                    );
                }
                return (best, has_amx());
            }
            other => {
                eprintln!(
                    "warning: GPG_RL_ISA={other:?} is not portable|avx2|avx512|amx; using {best_name}"
                );
                return (best, has_amx());
            }
        };
        if want.supported() {
            (want, false)
        } else {
            eprintln!(
                "warning: GPG_RL_ISA={} but the CPU supports only {best_name}; using {best_name}",
                want.name(),
            );
            (best, has_amx())
        }
    })
}

/// Name of the instruction-set level the CPU kernels run with: "avx512+amx", "avx512",
/// "avx2" or "portable".
pub fn isa_name() -> &'static str {
    match isa() {
        Isa::Avx512Bf16 if amx() => "avx512+amx",
        other => other.name(),
    }
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
        if amx() {
            assert_eq!(isa(), Isa::Avx512Bf16);
        }
        println!(
            "kernels use {} (detected {}, AMX-BF16 {})",
            isa_name(),
            detected().name(),
            if super::super::amx::available() {
                "usable"
            } else {
                "absent"
            }
        );
    }
}
