//! Bulk conversions between f32 and bf16 (`half::bf16`), bit for bit as `half` does them.
//!
//! f32 → bf16 rounds to nearest, ties to even: with `x` the f32 bits,
//! `bf16 = (x + 0x7FFF + ((x >> 16) & 1)) >> 16`, except that a NaN keeps its top 16 bits with
//! the quiet bit (0x0040) set. Subnormal inputs round like any other value. bf16 → f32 is the
//! exact widening `x << 16`, except that a NaN gets its quiet bit set (as `half` does).
//!
//! The AVX-512 path does the rounding with integer instructions rather than `vcvtneps2bf16`
//! (`_mm512_cvtneps_pbh`): that instruction treats subnormal inputs as zero (see the test
//! `cvtneps_flushes_subnormals`), so it would not match `half::bf16::from_f32` on them; the
//! integer form is as fast, since the conversion is bound by memory traffic.

use half::bf16;

use super::isa::{isa, Isa};

/// f32 → bf16 bits, round to nearest even, NaN stays (quiet) NaN: `half::bf16::from_f32`.
#[inline(always)]
pub(crate) fn round_bits(v: f32) -> u16 {
    let x = v.to_bits();
    if x & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((x >> 16) | 0x0040) as u16;
    }
    ((x + 0x7FFF + ((x >> 16) & 1)) >> 16) as u16
}

/// bf16 bits → f32, NaN made quiet: `half::bf16::to_f32`.
#[inline(always)]
pub(crate) fn widen_bits(b: u16) -> f32 {
    if b & 0x7FFF > 0x7F80 {
        f32::from_bits(((b | 0x0040) as u32) << 16)
    } else {
        f32::from_bits((b as u32) << 16)
    }
}

/// dst[i] = bf16(src[i]) (round to nearest even). Panics if the lengths differ.
pub(crate) fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    f32_to_bf16_with(isa(), src, dst)
}

/// dst[i] = f32(src[i]). Panics if the lengths differ.
pub(crate) fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    bf16_to_f32_with(isa(), src, dst)
}

/// The bits of a bf16 slice (`half::bf16` is `repr(transparent)` over `u16`).
pub(crate) fn as_bits(s: &[bf16]) -> &[u16] {
    // SAFETY: bf16 is a repr(transparent) wrapper of u16: same size, alignment and validity.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, s.len()) }
}

/// Mutable bits of a bf16 slice.
pub(crate) fn as_bits_mut(s: &mut [bf16]) -> &mut [u16] {
    // SAFETY: as in `as_bits`; every u16 is a valid bf16.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut u16, s.len()) }
}

/// [`f32_to_bf16`] on an explicit instruction-set level (which the CPU must support).
pub(crate) fn f32_to_bf16_with(isa: Isa, src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_bf16: lengths differ");
    assert!(isa.supported(), "f32_to_bf16: CPU lacks {isa:?}");
    let dst = as_bits_mut(dst);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW (asserted), lengths are equal.
        Isa::Avx512Bf16 => unsafe { x86::f32_to_bf16_avx512(src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 (asserted), lengths are equal.
        Isa::Avx2 => unsafe { x86::f32_to_bf16_avx2(src, dst) },
        _ => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = round_bits(s);
            }
        }
    }
}

/// [`bf16_to_f32`] on an explicit instruction-set level (which the CPU must support).
pub(crate) fn bf16_to_f32_with(isa: Isa, src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "bf16_to_f32: lengths differ");
    assert!(isa.supported(), "bf16_to_f32: CPU lacks {isa:?}");
    let src = as_bits(src);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW (asserted), lengths are equal.
        Isa::Avx512Bf16 => unsafe { x86::bf16_to_f32_avx512(src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 (asserted), lengths are equal.
        Isa::Avx2 => unsafe { x86::bf16_to_f32_avx2(src, dst) },
        _ => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = widen_bits(s);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{round_bits, widen_bits};
    use std::arch::x86_64::*;

    /// 16 f32 (as i32 bits) → 16 rounded bf16 in the low halves of the 32-bit lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn round16(x: __m512i) -> __m512i {
        let hi = _mm512_srli_epi32::<16>(x);
        let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
        let biased = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), lsb);
        let rounded = _mm512_srli_epi32::<16>(biased);
        let abs = _mm512_and_si512(x, _mm512_set1_epi32(0x7FFF_FFFF));
        let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7F80_0000));
        let quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x0040));
        _mm512_mask_mov_epi32(rounded, nan, quiet)
    }

    /// # Safety
    /// The CPU must support AVX-512F/BW; `src.len() == dst.len()`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn f32_to_bf16_avx512(src: &[f32], dst: &mut [u16]) {
        let n = src.len();
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i < n {
            let left = n - i;
            let mask: __mmask16 = if left >= 16 { !0 } else { (1u16 << left) - 1 };
            // SAFETY: the mask keeps the loads and stores inside the first n elements.
            unsafe {
                let x = _mm512_maskz_loadu_epi32(mask, s.add(i) as *const i32);
                _mm512_mask_cvtepi32_storeu_epi16(d.add(i) as *mut i16, mask, round16(x));
            }
            i += 16;
        }
    }

    /// # Safety
    /// The CPU must support AVX-512F/BW; `src.len() == dst.len()`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn bf16_to_f32_avx512(src: &[u16], dst: &mut [f32]) {
        let n = src.len();
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i < n {
            let left = n - i;
            let mask: __mmask16 = if left >= 16 { !0 } else { (1u16 << left) - 1 };
            // SAFETY: the mask keeps the loads and stores inside the first n elements.
            unsafe {
                let b = _mm256_maskz_loadu_epi16(mask, s.add(i) as *const i16);
                let x = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b));
                let abs = _mm512_and_si512(x, _mm512_set1_epi32(0x7FFF_FFFF));
                let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7F80_0000));
                let x = _mm512_mask_or_epi32(x, nan, x, _mm512_set1_epi32(0x0040_0000));
                _mm512_mask_storeu_ps(d.add(i), mask, _mm512_castsi512_ps(x));
            }
            i += 16;
        }
    }

    /// # Safety
    /// The CPU must support AVX2; `src.len() == dst.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn f32_to_bf16_avx2(src: &[f32], dst: &mut [u16]) {
        let n = src.len();
        let n8 = n - n % 8;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 ≤ n for both slices.
            unsafe {
                let x = _mm256_loadu_si256(s.add(i) as *const __m256i);
                let hi = _mm256_srli_epi32::<16>(x);
                let lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
                let biased = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), lsb);
                let rounded = _mm256_srli_epi32::<16>(biased);
                let abs = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFF_FFFF));
                // Signed compare is right: abs ≤ 0x7FFF_FFFF is non-negative.
                let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F80_0000));
                let quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x0040));
                let r = _mm256_blendv_epi8(rounded, quiet, nan);
                // Values are ≤ 0xFFFF, so the unsigned saturating pack is exact; it packs
                // within 128-bit lanes, the permute puts the two halves together.
                let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(r, r));
                _mm_storeu_si128(d.add(i) as *mut __m128i, _mm256_castsi256_si128(packed));
            }
            i += 8;
        }
        for j in n8..n {
            dst[j] = round_bits(src[j]);
        }
    }

    /// # Safety
    /// The CPU must support AVX2; `src.len() == dst.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn bf16_to_f32_avx2(src: &[u16], dst: &mut [f32]) {
        let n = src.len();
        let n8 = n - n % 8;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 ≤ n for both slices.
            unsafe {
                let b = _mm_loadu_si128(s.add(i) as *const __m128i);
                let x = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(b));
                let abs = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFF_FFFF));
                let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F80_0000));
                let q = _mm256_and_si256(nan, _mm256_set1_epi32(0x0040_0000));
                let x = _mm256_or_si256(x, q);
                _mm256_storeu_ps(d.add(i), _mm256_castsi256_ps(x));
            }
            i += 8;
        }
        for j in n8..n {
            dst[j] = widen_bits(src[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every special class plus a sweep of bit patterns (and lengths that leave tails).
    fn samples() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001), // signalling NaN
            f32::from_bits(0xFF81_2345),
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1),           // smallest subnormal
            f32::from_bits(0x0000_8000), // subnormal tie
            f32::from_bits(0x0001_8000), // subnormal tie, odd
            f32::from_bits(0x807F_FFFF), // largest negative subnormal
            f32::from_bits(0x3F80_8000), // tie to even (down)
            f32::from_bits(0x3F81_8000), // tie to even (up)
            f32::from_bits(0x7F7F_8000), // rounds up to infinity
        ];
        let mut x: u32 = 0x1234_5678;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            v.push(f32::from_bits(x));
        }
        v
    }

    #[test]
    fn conversions_match_half_bit_for_bit_on_every_path() {
        let src = samples();
        for isa in Isa::all_supported() {
            for len in [0, 1, 7, 8, 15, 16, 17, 33, src.len()] {
                let s = &src[..len];
                let mut b = vec![bf16::ZERO; len];
                f32_to_bf16_with(isa, s, &mut b);
                for (i, (&x, &got)) in s.iter().zip(&b).enumerate() {
                    let want = bf16::from_f32(x);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{isa:?} f32->bf16 [{i}] {:#010x}",
                        x.to_bits()
                    );
                }
                let mut back = vec![0.0f32; len];
                // Widen the original bits (NaNs included, unquieted ones too).
                let raw: Vec<bf16> = s
                    .iter()
                    .map(|x| bf16::from_bits((x.to_bits() >> 16) as u16))
                    .collect();
                bf16_to_f32_with(isa, &raw, &mut back);
                for (i, (&r, &got)) in raw.iter().zip(&back).enumerate() {
                    assert_eq!(
                        got.to_bits(),
                        r.to_f32().to_bits(),
                        "{isa:?} bf16->f32 [{i}]"
                    );
                }
            }
        }
    }

    /// Why the AVX-512 path does not use `vcvtneps2bf16`: it flushes subnormal inputs to zero.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn cvtneps_flushes_subnormals() {
        if !Isa::Avx512Bf16.supported() {
            println!("skipped: no AVX512-BF16");
            return;
        }
        #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
        fn cvt(x: f32) -> u16 {
            use std::arch::x86_64::*;
            let v = _mm512_set1_ps(x);
            let b = _mm512_cvtneps_pbh(v);
            // SAFETY: __m256bh and __m256i are both 256 bits.
            let i: __m256i = unsafe { std::mem::transmute(b) };
            (_mm256_extract_epi32::<0>(i) & 0xFFFF) as u16
        }
        let sub = f32::from_bits(0x0001_8000);
        // SAFETY: the CPU supports the features (checked above).
        let got = unsafe { cvt(sub) };
        assert_eq!(bf16::from_f32(sub).to_bits(), 0x0002);
        assert_eq!(got, 0, "vcvtneps2bf16 no longer flushes subnormals?");
        // Normal numbers agree.
        // SAFETY: as above.
        assert_eq!(
            unsafe { cvt(1.0 + 1.0 / 256.0) },
            bf16::from_f32(1.0 + 1.0 / 256.0).to_bits()
        );
    }
}
