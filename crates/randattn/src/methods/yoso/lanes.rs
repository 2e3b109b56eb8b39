//! Sixteen f32 lanes in SIMD registers, for the fast hash: one token per lane.
//!
//! The compiler's auto-vectoriser turns the lane-array loops of the transform into gathers and
//! scatters across coordinates (it vectorises the wrong loop), so the few operations the hash
//! needs are written here once per instruction set: AVX-512F (one `zmm`), AVX2 (two `ymm`) and
//! a portable fallback. The kernel is generic over [`Lanes`] and instantiated inside functions
//! compiled with the matching target feature.
//!
//! Soundness: the x86 implementations call intrinsics, so they may only run on a CPU with the
//! feature. They are private to this module and reachable only through the `fast_codes_*` entry
//! points, whose callers check the CPU first.

use super::hash::{FastShape, fast_codes_with};

/// Tokens transformed at once.
pub(super) const LANES: usize = 16;

/// The operations of the fast hash on [`LANES`] lanes.
///
/// Every method is `unsafe`: the x86 implementations are compiled with their target feature
/// (so they inline into the kernels that have it) and may only run on a CPU that has it.
pub(super) trait Lanes: Copy {
    /// Per-lane codes being built.
    type Codes: Copy;
    unsafe fn zero() -> Self;
    unsafe fn load(src: &[f32; LANES]) -> Self;
    unsafe fn store(self, dst: &mut [f32; LANES]);
    unsafe fn add(self, other: Self) -> Self;
    unsafe fn sub(self, other: Self) -> Self;
    unsafe fn scale(self, s: f32) -> Self;
    unsafe fn no_codes() -> Self::Codes;
    /// `codes | (1 << bit)` in the lanes where `self > 0`.
    unsafe fn set_bit_where_positive(self, bit: u32, codes: Self::Codes) -> Self::Codes;
    unsafe fn store_codes(codes: Self::Codes, dst: &mut [u32; LANES]);
}

/// Plain arrays (any CPU).
#[derive(Clone, Copy)]
pub(super) struct Portable([f32; LANES]);

impl Lanes for Portable {
    type Codes = [u32; LANES];
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; LANES])
    }
    #[inline(always)]
    unsafe fn load(src: &[f32; LANES]) -> Self {
        Portable(*src)
    }
    #[inline(always)]
    unsafe fn store(self, dst: &mut [f32; LANES]) {
        *dst = self.0;
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        Portable(std::array::from_fn(|l| self.0[l] + o.0[l]))
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        Portable(std::array::from_fn(|l| self.0[l] - o.0[l]))
    }
    #[inline(always)]
    unsafe fn scale(self, s: f32) -> Self {
        Portable(self.0.map(|x| x * s))
    }
    #[inline(always)]
    unsafe fn no_codes() -> Self::Codes {
        [0; LANES]
    }
    #[inline(always)]
    unsafe fn set_bit_where_positive(self, bit: u32, codes: Self::Codes) -> Self::Codes {
        std::array::from_fn(|l| codes[l] | (u32::from(self.0[l] > 0.0) << bit))
    }
    #[inline(always)]
    unsafe fn store_codes(codes: Self::Codes, dst: &mut [u32; LANES]) {
        *dst = codes;
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{FastShape, LANES, Lanes, fast_codes_with};

    /// One AVX-512 register.
    #[derive(Clone, Copy)]
    pub(in super::super) struct Avx512(__m512);

    // Pointers come from `&[f32; 16]` / `&[u32; 16]`, valid for 16 elements.
    impl Lanes for Avx512 {
        type Codes = __m512i;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn zero() -> Self {
            Avx512(_mm512_setzero_ps())
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(src: &[f32; LANES]) -> Self {
            // SAFETY: 16 readable floats.
            Avx512(unsafe { _mm512_loadu_ps(src.as_ptr()) })
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store(self, dst: &mut [f32; LANES]) {
            // SAFETY: 16 writable floats.
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), self.0) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn add(self, o: Self) -> Self {
            Avx512(_mm512_add_ps(self.0, o.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn sub(self, o: Self) -> Self {
            Avx512(_mm512_sub_ps(self.0, o.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn scale(self, s: f32) -> Self {
            Avx512(_mm512_mul_ps(self.0, _mm512_set1_ps(s)))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn no_codes() -> __m512i {
            _mm512_setzero_si512()
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn set_bit_where_positive(self, bit: u32, codes: __m512i) -> __m512i {
            let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, _mm512_setzero_ps());
            _mm512_mask_or_epi32(codes, positive, codes, _mm512_set1_epi32(1 << bit))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store_codes(codes: __m512i, dst: &mut [u32; LANES]) {
            // SAFETY: 16 writable u32.
            unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), codes) }
        }
    }

    /// Two AVX2 registers.
    #[derive(Clone, Copy)]
    pub(in super::super) struct Avx2(__m256, __m256);

    impl Lanes for Avx2 {
        type Codes = (__m256i, __m256i);
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn zero() -> Self {
            Avx2(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn load(src: &[f32; LANES]) -> Self {
            // SAFETY: 16 readable floats, read as two halves.
            unsafe {
                Avx2(
                    _mm256_loadu_ps(src.as_ptr()),
                    _mm256_loadu_ps(src.as_ptr().add(8)),
                )
            }
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn store(self, dst: &mut [f32; LANES]) {
            // SAFETY: 16 writable floats, written as two halves.
            unsafe {
                _mm256_storeu_ps(dst.as_mut_ptr(), self.0);
                _mm256_storeu_ps(dst.as_mut_ptr().add(8), self.1);
            }
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn add(self, o: Self) -> Self {
            Avx2(_mm256_add_ps(self.0, o.0), _mm256_add_ps(self.1, o.1))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn sub(self, o: Self) -> Self {
            Avx2(_mm256_sub_ps(self.0, o.0), _mm256_sub_ps(self.1, o.1))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn scale(self, s: f32) -> Self {
            let s = _mm256_set1_ps(s);
            Avx2(_mm256_mul_ps(self.0, s), _mm256_mul_ps(self.1, s))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn no_codes() -> (__m256i, __m256i) {
            (_mm256_setzero_si256(), _mm256_setzero_si256())
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn set_bit_where_positive(
            self,
            bit: u32,
            codes: (__m256i, __m256i),
        ) -> (__m256i, __m256i) {
            let zero = _mm256_setzero_ps();
            let one = _mm256_set1_epi32(1 << bit);
            let lo = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(self.0, zero));
            let hi = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(self.1, zero));
            (
                _mm256_or_si256(codes.0, _mm256_and_si256(lo, one)),
                _mm256_or_si256(codes.1, _mm256_and_si256(hi, one)),
            )
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn store_codes(codes: (__m256i, __m256i), dst: &mut [u32; LANES]) {
            // SAFETY: 16 writable u32, written as two halves.
            unsafe {
                _mm256_storeu_si256(dst.as_mut_ptr().cast(), codes.0);
                _mm256_storeu_si256(dst.as_mut_ptr().add(8).cast(), codes.1);
            }
        }
    }

    /// The fast hash with AVX-512.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(in super::super) unsafe fn fast_codes_avx512(
        rows: &[f32],
        shape: FastShape,
        signs: &[f32],
        codes: &mut [u32],
    ) {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { fast_codes_with::<Avx512>(rows, shape, signs, codes) }
    }

    /// The fast hash with AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(in super::super) unsafe fn fast_codes_avx2(
        rows: &[f32],
        shape: FastShape,
        signs: &[f32],
        codes: &mut [u32],
    ) {
        // SAFETY: the caller guarantees AVX2.
        unsafe { fast_codes_with::<Avx2>(rows, shape, signs, codes) }
    }

    /// The signed transform alone, for tests.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(test)]
    #[target_feature(enable = "avx512f")]
    pub(in super::super) unsafe fn fwht_avx512(z: &mut [[f32; LANES]], signs: &[f32]) {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { super::super::hash::fwht_lanes::<Avx512>(z, Some(signs)) }
    }

    /// The signed transform alone, for tests.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(test)]
    #[target_feature(enable = "avx2")]
    pub(in super::super) unsafe fn fwht_avx2(z: &mut [[f32; LANES]], signs: &[f32]) {
        // SAFETY: the caller guarantees AVX2.
        unsafe { super::super::hash::fwht_lanes::<Avx2>(z, Some(signs)) }
    }
}
