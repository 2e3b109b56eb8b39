//! The fast hash for rotations of 64 coordinates with AVX-512, each token held in four registers
//! (four tokens at a time).
//!
//! The lane kernel ([`super::hash`]) transforms sixteen tokens at once, one per SIMD lane, and
//! streams the `64 × 16` work array through L1 seven times per rotation (a copy and two passes
//! per transform): its loads and stores, and the transposition of the rows into lanes, are most
//! of its cost. Here a token's 64 coordinates stay in four `zmm` registers through the whole
//! rotation: the butterfly stages 1, 2, 4 and 8 pair lanes of one register (a lane permutation
//! and one fused multiply-add by ±1 per stage, `z·1 + z'` and `z·(−1) + z'` with `z'` the
//! partner lane: exact products, so each result is the same rounding of the same two operands as
//! the lane kernel's `lo + hi` and `lo − hi`), stages 16 and 32 pair the registers; the signs of
//! `D₁, D₂, D₃` are one multiply each, and the code bits are the 64 sign bits of the result, one
//! compare per register. The stages, their operands and their order are those of the lane
//! kernel, so the codes are bit for bit the same (a test checks it). On a 2-core AMD EPYC
//! (Zen 4) it takes two thirds of the lane kernel's time (`perf` samples of 30 forwards at
//! n = 4096: 1073 against 1620).

use std::arch::x86_64::*;

use super::hash::MAX_TAU;

/// Coordinates of one rotation handled here.
pub(super) const WIDTH: usize = 64;

/// The four registers of one token.
type Row = [__m512; 4];

/// One butterfly stage of span `h` inside each register: lanes `i` and `i ^ h` become
/// `z_lo + z_hi` (the lower lane) and `z_lo − z_hi` (the upper one). `swap` is the register
/// with each pair exchanged; `sign` is +1 in lower lanes and −1 in upper ones.
#[inline]
#[target_feature(enable = "avx512f")]
fn stage(z: __m512, swap: __m512, sign: __m512) -> __m512 {
    _mm512_fmadd_ps(z, sign, swap)
}

/// `z ← H·diag(s)·z` for each of `R` tokens (independent chains the CPU overlaps): `s` is 64
/// signs.
#[inline]
#[target_feature(enable = "avx512f")]
fn signed_fwht<const R: usize>(z: &mut [Row; R], s: &[f32], signs_of: &[__m512; 4]) {
    assert!(s.len() >= WIDTH);
    for k in 0..4 {
        // SAFETY: `s` has 64 floats (asserted), register `k` reads 16 of them.
        let sk = unsafe { _mm512_loadu_ps(s.as_ptr().add(16 * k)) };
        for zr in z.iter_mut() {
            let mut v = _mm512_mul_ps(zr[k], sk);
            v = stage(v, _mm512_permute_ps::<0b10_11_00_01>(v), signs_of[0]);
            v = stage(v, _mm512_permute_ps::<0b01_00_11_10>(v), signs_of[1]);
            v = stage(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v), signs_of[2]);
            v = stage(v, _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v), signs_of[3]);
            zr[k] = v;
        }
    }
    for zr in z.iter_mut() {
        let [a, b, c, d] = *zr;
        let (a, b, c, d) = (
            _mm512_add_ps(a, b),
            _mm512_sub_ps(a, b),
            _mm512_add_ps(c, d),
            _mm512_sub_ps(c, d),
        );
        *zr = [
            _mm512_add_ps(a, c),
            _mm512_add_ps(b, d),
            _mm512_sub_ps(a, c),
            _mm512_sub_ps(b, d),
        ];
    }
}

/// Tokens transformed together.
const TOGETHER: usize = 4;

/// Codes of rows `d ≤ 64` wide (zero-padded to 64), `tau ≤ 30`-bit, `m` hashes, `⌊64/τ⌋` per rotation,
/// written hash-major into `codes` (`m × n`). `signs` holds `3 × 64` signs per rotation.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn fast_codes(
    rows: &[f32],
    d: usize,
    tau: usize,
    m: usize,
    signs: &[f32],
    codes: &mut [u32],
) {
    assert!(
        (1..=WIDTH).contains(&d)
            && (1..=MAX_TAU as usize).contains(&tau)
            && rows.len().is_multiple_of(d)
    );
    let n = rows.len() / d;
    let per_rotation = WIDTH / tau;
    assert!(codes.len() == n * m && signs.len() >= m.div_ceil(per_rotation) * 3 * WIDTH);
    // Lane `i` is +1 where bit `h` of `i` is clear (the pair's lower lane), −1 where it is set.
    let signs_of: [__m512; 4] = std::array::from_fn(|s| {
        let h = 1usize << s;
        let lanes: [f32; 16] = std::array::from_fn(|i| if i & h == 0 { 1.0 } else { -1.0 });
        // SAFETY: 16 readable floats.
        unsafe { _mm512_loadu_ps(lanes.as_ptr()) }
    });
    // Which of each register's 16 lanes hold a coordinate of the row.
    let loaded: [__mmask16; 4] = std::array::from_fn(|k| {
        let have = d.saturating_sub(16 * k).min(16);
        ((1u32 << have) - 1) as __mmask16
    });
    let sizes = Sizes {
        n,
        tau,
        m,
        per_rotation,
    };
    let mut blocks = rows.chunks_exact(TOGETHER * d);
    for (b, block) in (&mut blocks).enumerate() {
        rows_codes::<TOGETHER>(block, b * TOGETHER, loaded, &signs_of, signs, sizes, codes);
    }
    let done = n - blocks.remainder().len() / d;
    for (i, row) in blocks.remainder().chunks_exact(d).enumerate() {
        rows_codes::<1>(row, done + i, loaded, &signs_of, signs, sizes, codes);
    }
}

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Sizes {
    n: usize,
    tau: usize,
    m: usize,
    per_rotation: usize,
}

/// The codes of `R` consecutive rows, the first of them row `first`.
#[inline]
#[target_feature(enable = "avx512f")]
fn rows_codes<const R: usize>(
    block: &[f32],
    first: usize,
    loaded: [__mmask16; 4],
    signs_of: &[__m512; 4],
    signs: &[f32],
    sizes: Sizes,
    codes: &mut [u32],
) {
    let Sizes {
        n,
        tau,
        m,
        per_rotation,
    } = sizes;
    let d = block.len() / R;
    let code_mask = (1u64 << tau) - 1;
    let zero = _mm512_setzero_ps();
    let x: [Row; R] = std::array::from_fn(|t| {
        let row = &block[t * d..(t + 1) * d];
        std::array::from_fn(|k| {
            if loaded[k] == 0 {
                return zero;
            }
            // SAFETY: the mask reads only lanes `16k .. min(d, 16k + 16)` of the row.
            unsafe { _mm512_maskz_loadu_ps(loaded[k], row.as_ptr().add(16 * k)) }
        })
    });
    for (r, s) in signs
        .chunks_exact(3 * WIDTH)
        .take(m.div_ceil(per_rotation))
        .enumerate()
    {
        let mut z = x;
        signed_fwht(&mut z, &s[..WIDTH], signs_of);
        signed_fwht(&mut z, &s[WIDTH..2 * WIDTH], signs_of);
        signed_fwht(&mut z, &s[2 * WIDTH..], signs_of);
        for (t, zt) in z.iter().enumerate() {
            let mut bits = 0u64;
            for (k, zk) in zt.iter().enumerate() {
                let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(*zk, zero);
                bits |= u64::from(positive) << (16 * k);
            }
            for g in 0..per_rotation.min(m - r * per_rotation) {
                let h = r * per_rotation + g;
                codes[h * n + first + t] = ((bits >> (g * tau)) & code_mask) as u32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::super::hash::{FastShape, fast_codes_with};
    use super::super::lanes::Portable;
    use super::WIDTH;
    use crate::rng::stream;

    #[test]
    fn codes_are_bit_for_bit_those_of_the_lane_kernel() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut rng = stream(7, 0, 0, "rows64");
        for (d, tau, m, n) in [
            (64usize, 12usize, 32usize, 37usize),
            (50, 5, 13, 17),
            (33, 16, 9, 5),
            (64, 30, 3, 20),
            (64, 1, 70, 3),
        ] {
            let per_rotation = WIDTH / tau;
            let rotations = m.div_ceil(per_rotation);
            let signs: Vec<f32> = (0..rotations * 3 * WIDTH)
                .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
                .collect();
            // Gaussian-ish rows with exact zeros and ties sprinkled in.
            let mut rows: Vec<f32> = (0..n * d).map(|_| rng.random::<f32>() - 0.5).collect();
            for x in rows.iter_mut().step_by(7) {
                *x = 0.0;
            }
            rows[..d].fill(0.25);
            let mut want = vec![0u32; n * m];
            let shape = FastShape {
                d,
                d_pad: WIDTH,
                tau,
                m,
                per_rotation,
            };
            // SAFETY: the portable lanes run on any CPU.
            unsafe { fast_codes_with::<Portable>(&rows, shape, &signs, &mut want) };
            let mut got = vec![0u32; n * m];
            // SAFETY: the CPU has AVX-512F (checked above).
            unsafe { super::fast_codes(&rows, d, tau, m, &signs, &mut got) };
            assert_eq!(got, want, "d={d} tau={tau} m={m}");
        }
    }
}
