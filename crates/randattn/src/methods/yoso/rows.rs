//! The fast hash with AVX-512 for rotations of 16 to 128 coordinates, each token held in one to
//! eight registers (four tokens at a time).
//!
//! The lane kernel ([`super::hash`]) transforms sixteen tokens at once, one per SIMD lane, and
//! streams the `d_pad × 16` work array through L1 seven times per rotation (a copy and two
//! passes per transform): its loads and stores, and the transposition of the rows into lanes,
//! are most of its cost. Here a token's coordinates stay in `d_pad / 16` `zmm` registers through
//! the whole rotation: the butterfly stages 1, 2, 4 and 8 pair lanes of one register (a lane
//! permutation and one fused multiply-add by ±1 per stage, `z·1 + z'` and `z·(−1) + z'` with
//! `z'` the partner lane: exact products, so each result is the same rounding of the same two
//! operands as the lane kernel's `lo + hi` and `lo − hi`), stages 16, 32 and 64 pair registers;
//! the signs of `D₁, D₂, D₃` are one multiply each, and the code bits are the sign bits of the
//! result, one compare per register. The stages, their operands and their order are those of
//! the lane kernel, so the codes are bit for bit the same (a test checks it). On a 2-core AMD
//! EPYC (Zen 4) at `d = 64` it takes two thirds of the lane kernel's time (`perf` samples of 30
//! forwards at n = 4096: 1073 against 1620).

use std::arch::x86_64::*;

use super::hash::MAX_TAU;

/// Whether rotations of `d_pad` coordinates run here.
pub(super) fn handles(d_pad: usize) -> bool {
    matches!(d_pad, 16 | 32 | 64 | 128)
}

/// One butterfly stage of span `h` inside each register: lanes `i` and `i ^ h` become
/// `z_lo + z_hi` (the lower lane) and `z_lo − z_hi` (the upper one). `swap` is the register
/// with each pair exchanged; `sign` is +1 in lower lanes and −1 in upper ones.
#[inline]
#[target_feature(enable = "avx512f")]
fn stage(z: __m512, swap: __m512, sign: __m512) -> __m512 {
    _mm512_fmadd_ps(z, sign, swap)
}

/// `z ← H·diag(s)·z` for each of `T` tokens of `R` registers: `s` is `16·R` signs.
#[inline]
#[target_feature(enable = "avx512f")]
fn signed_fwht<const R: usize, const T: usize>(
    z: &mut [[__m512; R]; T],
    s: &[f32],
    signs_of: &[__m512; 4],
) {
    assert!(s.len() >= 16 * R);
    for k in 0..R {
        // SAFETY: `s` has `16·R` floats (asserted), register `k` reads 16 of them.
        let sk = unsafe { _mm512_loadu_ps(s.as_ptr().add(16 * k)) };
        for zt in z.iter_mut() {
            let mut v = _mm512_mul_ps(zt[k], sk);
            v = stage(v, _mm512_permute_ps::<0b10_11_00_01>(v), signs_of[0]);
            v = stage(v, _mm512_permute_ps::<0b01_00_11_10>(v), signs_of[1]);
            v = stage(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v), signs_of[2]);
            v = stage(v, _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v), signs_of[3]);
            zt[k] = v;
        }
    }
    let mut span = 1;
    while span < R {
        for zt in z.iter_mut() {
            for k in 0..R {
                if k & span == 0 {
                    let (a, b) = (zt[k], zt[k + span]);
                    zt[k] = _mm512_add_ps(a, b);
                    zt[k + span] = _mm512_sub_ps(a, b);
                }
            }
        }
        span *= 2;
    }
}

/// Codes of rows `d ≤ 16·R` wide (zero-padded to `16·R`), `tau ≤ 30` bits, `m` hashes,
/// `⌊16·R/τ⌋` per rotation, written hash-major into `codes` (`m × n`). `signs` holds `3 × 16·R`
/// signs per rotation. `T` tokens are transformed together: independent dependency chains the
/// CPU overlaps, `R·T` registers.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn fast_codes_in<const R: usize, const T: usize>(
    rows: &[f32],
    d: usize,
    (tau, m): (usize, usize),
    signs: &[f32],
    codes: &mut [u32],
) {
    let width = 16 * R;
    assert!((1..=width).contains(&d) && (1..=MAX_TAU as usize).contains(&tau));
    assert!(rows.len().is_multiple_of(d));
    let n = rows.len() / d;
    let per_rotation = width / tau;
    assert!(codes.len() == n * m && signs.len() >= m.div_ceil(per_rotation) * 3 * width);
    // Lane `i` is +1 where bit `h` of `i` is clear (the pair's lower lane), −1 where it is set.
    let signs_of: [__m512; 4] = std::array::from_fn(|s| {
        let h = 1usize << s;
        let lanes: [f32; 16] = std::array::from_fn(|i| if i & h == 0 { 1.0 } else { -1.0 });
        // SAFETY: 16 readable floats.
        unsafe { _mm512_loadu_ps(lanes.as_ptr()) }
    });
    // Which of each register's 16 lanes hold a coordinate of the row.
    let loaded: [__mmask16; R] = std::array::from_fn(|k| {
        let have = d.saturating_sub(16 * k).min(16);
        ((1u32 << have) - 1) as __mmask16
    });
    let job = Job {
        loaded,
        signs_of,
        signs,
        n,
        tau,
        m,
        per_rotation,
    };
    let mut blocks = rows.chunks_exact(T * d);
    for (b, block) in (&mut blocks).enumerate() {
        job.codes::<T>(block, b * T, codes);
    }
    let done = n - blocks.remainder().len() / d;
    for (i, row) in blocks.remainder().chunks_exact(d).enumerate() {
        job.codes::<1>(row, done + i, codes);
    }
}

/// What every block of rows shares.
struct Job<'a, const R: usize> {
    loaded: [__mmask16; R],
    signs_of: [__m512; 4],
    signs: &'a [f32],
    n: usize,
    tau: usize,
    m: usize,
    per_rotation: usize,
}

impl<const R: usize> Job<'_, R> {
    /// The codes of `T` consecutive rows, the first of them row `first`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn codes<const T: usize>(&self, block: &[f32], first: usize, codes: &mut [u32]) {
        let (width, n, tau, m, per_rotation) =
            (16 * R, self.n, self.tau, self.m, self.per_rotation);
        let d = block.len() / T;
        let code_mask = ((1u64 << tau) - 1) as u32;
        let zero = _mm512_setzero_ps();
        let x: [[__m512; R]; T] = std::array::from_fn(|t| {
            let row = &block[t * d..(t + 1) * d];
            std::array::from_fn(|k| {
                if self.loaded[k] == 0 {
                    return zero;
                }
                // SAFETY: the mask reads only lanes `16k .. min(d, 16k + 16)` of the row.
                unsafe { _mm512_maskz_loadu_ps(self.loaded[k], row.as_ptr().add(16 * k)) }
            })
        });
        for (r, s) in self
            .signs
            .chunks_exact(3 * width)
            .take(m.div_ceil(per_rotation))
            .enumerate()
        {
            let mut z = x;
            signed_fwht(&mut z, &s[..width], &self.signs_of);
            signed_fwht(&mut z, &s[width..2 * width], &self.signs_of);
            signed_fwht(&mut z, &s[2 * width..], &self.signs_of);
            for (t, zt) in z.iter().enumerate() {
                let positive = zt.map(|zk| _mm512_cmp_ps_mask::<_CMP_GT_OQ>(zk, zero));
                let hashes = per_rotation.min(m - r * per_rotation);
                let at = &mut codes[r * per_rotation * n + first + t..];
                // 64-bit shifts where the bits fit (128-bit ones take several instructions).
                if R <= 4 {
                    store_codes::<u64>(&positive, (hashes, tau, code_mask), n, at);
                } else {
                    store_codes::<u128>(&positive, (hashes, tau, code_mask), n, at);
                }
            }
        }
    }
}

/// A token's sign bits, one 16-bit compare mask per register, as one integer.
trait Bits: Copy {
    /// Mask `k` in bits `16k .. 16k + 16`.
    fn gather(masks: &[__mmask16]) -> Self;
    /// The 32 bits from bit `at` on.
    fn bits_at(self, at: usize) -> u32;
}

/// [`Bits`] for an unsigned integer type wide enough for the masks.
macro_rules! bits {
    ($t:ty) => {
        impl Bits for $t {
            #[inline(always)]
            fn gather(masks: &[__mmask16]) -> Self {
                masks
                    .iter()
                    .enumerate()
                    .fold(0, |b, (k, &p)| b | <$t>::from(p) << (16 * k))
            }
            #[inline(always)]
            fn bits_at(self, at: usize) -> u32 {
                (self >> at) as u32
            }
        }
    };
}
bits!(u64);
bits!(u128);

/// Writes a token's `hashes` codes of `tau` bits (`code_mask` = `2^τ − 1`) from its compare
/// masks, hash `g` at `at[g·n]` (hash-major codes).
#[inline(always)]
fn store_codes<B: Bits>(
    masks: &[__mmask16],
    (hashes, tau, code_mask): (usize, usize, u32),
    n: usize,
    at: &mut [u32],
) {
    let bits = B::gather(masks);
    for g in 0..hashes {
        at[g * n] = bits.bits_at(g * tau) & code_mask;
    }
}

/// The fast hash's codes for rotations of `d_pad` coordinates (see [`handles`]): rows `d` wide,
/// `tau`-bit codes, `m` hashes; `codes` hash-major (`m × n`).
///
/// # Safety
/// The CPU must support AVX-512F.
///
/// # Panics
/// When `d_pad` is not one [`handles`], or the sizes do not agree (caller bugs).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn fast_codes(
    rows: &[f32],
    (d, d_pad): (usize, usize),
    (tau, m): (usize, usize),
    signs: &[f32],
    codes: &mut [u32],
) {
    // SAFETY (every arm): the caller guarantees AVX-512F.
    unsafe {
        match d_pad {
            16 => fast_codes_in::<1, 8>(rows, d, (tau, m), signs, codes),
            32 => fast_codes_in::<2, 4>(rows, d, (tau, m), signs, codes),
            64 => fast_codes_in::<4, 4>(rows, d, (tau, m), signs, codes),
            128 => fast_codes_in::<8, 2>(rows, d, (tau, m), signs, codes),
            _ => panic!("no register kernel for rotations of {d_pad}"),
        }
    }
}

/// The codes of a register kernel `kernel(rows, (d, d_pad), (tau, m), signs, codes)` against
/// the portable lane kernel's, over rotations of 16 to 128 coordinates, rows narrower than the
/// rotation, one to thirty bits, hashes spanning several rotations, exact zeros and a constant
/// row (shared by the AVX-512 and AVX2 kernels' tests).
#[cfg(test)]
pub(super) fn check_against_the_lane_kernel(
    kernel: impl Fn(&[f32], (usize, usize), (usize, usize), &[f32], &mut [u32]),
) {
    use rand::Rng;

    use super::hash::{FastShape, fast_codes_with};
    use super::lanes::Portable;
    use crate::rng::stream;

    let mut rng = stream(7, 0, 0, "rows");
    for (d, d_pad, tau, m, n) in [
        (64usize, 64usize, 12usize, 32usize, 37usize),
        (50, 64, 5, 13, 17),
        (33, 64, 16, 9, 5),
        (64, 64, 30, 3, 20),
        (64, 64, 1, 70, 3),
        (16, 16, 4, 9, 11),
        (3, 16, 16, 2, 6),
        (32, 32, 12, 32, 41),
        (20, 32, 7, 5, 4),
        (128, 128, 14, 32, 23),
        (100, 128, 30, 9, 9),
        (65, 128, 1, 200, 2),
    ] {
        let per_rotation = d_pad / tau;
        let rotations = m.div_ceil(per_rotation);
        let signs: Vec<f32> = (0..rotations * 3 * d_pad)
            .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
            .collect();
        // Rows with exact zeros and a constant row sprinkled in.
        let mut rows: Vec<f32> = (0..n * d).map(|_| rng.random::<f32>() - 0.5).collect();
        for x in rows.iter_mut().step_by(7) {
            *x = 0.0;
        }
        rows[..d].fill(0.25);
        let mut want = vec![0u32; n * m];
        let shape = FastShape {
            d,
            d_pad,
            tau,
            m,
            per_rotation,
        };
        // SAFETY: the portable lanes run on any CPU.
        unsafe { fast_codes_with::<Portable>(&rows, shape, &signs, &mut want) };
        let mut got = vec![0u32; n * m];
        kernel(&rows, (d, d_pad), (tau, m), &signs, &mut got);
        assert_eq!(got, want, "d={d} d_pad={d_pad} tau={tau} m={m}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn codes_are_bit_for_bit_those_of_the_lane_kernel() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        super::check_against_the_lane_kernel(|rows, sizes, hashes, signs, codes| {
            // SAFETY: the CPU has AVX-512F (checked above).
            unsafe { super::fast_codes(rows, sizes, hashes, signs, codes) }
        });
    }
}
