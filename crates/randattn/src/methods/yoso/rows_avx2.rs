//! The fast hash with AVX2 and FMA for rotations of 16 to 128 coordinates: the register kernel
//! of [`super::rows`] on eight-lane registers, for CPUs without AVX-512.
//!
//! A token's coordinates stay in `d_pad / 8` `ymm` registers through the whole rotation: the
//! butterfly stages 1, 2 and 4 pair lanes of one register (a lane permutation and one fused
//! multiply-add by ±1, `z·1 + z'` and `z·(−1) + z'`: exact products, so each result is the same
//! rounding of the same two operands as the lane kernel's `lo + hi` and `lo − hi`), stages 8 and
//! up pair registers; the signs are one multiply each and the code bits are the sign bits of the
//! result (one compare and one `movemask` per register). Same stages, operands and order as the
//! lane kernel, so the same codes bit for bit (a test checks it).
//!
//! The AVX-512 kernel's code is not shared (not made generic over the register type) on purpose:
//! its speed depends on how LLVM schedules it, which moved with unrelated changes before (see
//! the README's YOSO section); this file leaves its machine code byte for byte as it was.
//!
//! On a 2-core AMD EPYC (Zen 3, AVX2, no AVX-512), `hash_time` (d = 64, 32 768 rows, 32 hashes
//! of 12 bits): 25.5 → 15.7 ms median against the lane kernel; the YOSO forward at n = 4096
//! 51 → 41 ms.

use std::arch::x86_64::*;

use super::hash::MAX_TAU;

/// Whether rotations of `d_pad` coordinates run here (the sizes of `super::rows::handles`; a
/// function of its own here, as calling that one changed the AVX-512 kernel's machine code).
pub(super) fn handles(d_pad: usize) -> bool {
    matches!(d_pad, 16 | 32 | 64 | 128)
}

/// One butterfly stage inside a register: `sign` is +1 in each pair's lower lane and −1 in its
/// upper one, `swap` the register with each pair exchanged.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn stage(z: __m256, swap: __m256, sign: __m256) -> __m256 {
    _mm256_fmadd_ps(z, sign, swap)
}

/// `z ← H·diag(s)·z` for each of `T` tokens of `R` registers: `s` is `8·R` signs.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn signed_fwht<const R: usize, const T: usize>(
    z: &mut [[__m256; R]; T],
    s: &[f32],
    signs_of: &[__m256; 3],
) {
    assert!(s.len() >= 8 * R);
    for k in 0..R {
        // SAFETY: `s` has `8·R` floats (asserted), register `k` reads 8 of them.
        let sk = unsafe { _mm256_loadu_ps(s.as_ptr().add(8 * k)) };
        for zt in z.iter_mut() {
            let mut v = _mm256_mul_ps(zt[k], sk);
            v = stage(v, _mm256_permute_ps::<0b10_11_00_01>(v), signs_of[0]);
            v = stage(v, _mm256_permute_ps::<0b01_00_11_10>(v), signs_of[1]);
            v = stage(v, _mm256_permute2f128_ps::<0x01>(v, v), signs_of[2]);
            zt[k] = v;
        }
    }
    let mut span = 1;
    while span < R {
        for zt in z.iter_mut() {
            for k in 0..R {
                if k & span == 0 {
                    let (a, b) = (zt[k], zt[k + span]);
                    zt[k] = _mm256_add_ps(a, b);
                    zt[k + span] = _mm256_sub_ps(a, b);
                }
            }
        }
        span *= 2;
    }
}

/// Register `k` of a row: its coordinates `8k .. 8k + 8`, zeros past the row's end.
#[inline]
#[target_feature(enable = "avx2")]
fn load_part(row: &[f32], k: usize) -> __m256 {
    let have = row.len().saturating_sub(8 * k).min(8);
    if have == 8 {
        // SAFETY: eight readable floats from `8k` on.
        return unsafe { _mm256_loadu_ps(row.as_ptr().add(8 * k)) };
    }
    let mut part = [0.0f32; 8];
    if have > 0 {
        part[..have].copy_from_slice(&row[8 * k..8 * k + have]);
    }
    // SAFETY: eight readable floats.
    unsafe { _mm256_loadu_ps(part.as_ptr()) }
}

/// Codes of rows `d ≤ 8·R` wide (zero-padded), `tau ≤ 30` bits, `m` hashes, `⌊8·R/τ⌋` per
/// rotation, written hash-major into `codes` (`m × n`); `signs` holds `3 × 8·R` per rotation.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn fast_codes_in<const R: usize, const T: usize>(
    rows: &[f32],
    d: usize,
    (tau, m): (usize, usize),
    signs: &[f32],
    codes: &mut [u32],
) {
    let width = 8 * R;
    assert!((1..=width).contains(&d) && (1..=MAX_TAU as usize).contains(&tau));
    assert!(rows.len().is_multiple_of(d));
    let n = rows.len() / d;
    let per_rotation = width / tau;
    let rotations = m.div_ceil(per_rotation);
    assert!(codes.len() == n * m && signs.len() >= rotations * 3 * width);
    // Lane `i` is +1 where bit `h` of `i` is clear (the pair's lower lane), −1 where it is set.
    let mut signs_of = [_mm256_setzero_ps(); 3];
    for (s, sign) in signs_of.iter_mut().enumerate() {
        let mut lanes = [1.0f32; 8];
        for (i, l) in lanes.iter_mut().enumerate() {
            if i & (1 << s) != 0 {
                *l = -1.0;
            }
        }
        // SAFETY: eight readable floats.
        *sign = unsafe { _mm256_loadu_ps(lanes.as_ptr()) };
    }
    let code_mask = ((1u64 << tau) - 1) as u32;
    let zero = _mm256_setzero_ps();
    // Plain index loops: the AVX-512 kernel's iterator instantiations stay its own (sharing
    // them changed how LLVM inlined that kernel).
    let mut first = 0;
    while first < n {
        let tokens = T.min(n - first);
        let mut x = [[zero; R]; T];
        for t in 0..tokens {
            let row = &rows[(first + t) * d..(first + t + 1) * d];
            for (k, xk) in x[t].iter_mut().enumerate() {
                *xk = load_part(row, k);
            }
        }
        for r in 0..rotations {
            let s = &signs[r * 3 * width..(r + 1) * 3 * width];
            let mut z = x;
            signed_fwht(&mut z, &s[..width], &signs_of);
            signed_fwht(&mut z, &s[width..2 * width], &signs_of);
            signed_fwht(&mut z, &s[2 * width..], &signs_of);
            let hashes = per_rotation.min(m - r * per_rotation);
            for (t, zt) in z.iter().enumerate().take(tokens) {
                // Register `k`'s eight sign bits at bits `8k ..`, in 64 bits where they fit.
                let sign_bits = |k: usize| {
                    let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(zt[k], zero);
                    _mm256_movemask_ps(gt) as u8
                };
                let at = &mut codes[r * per_rotation * n + first + t..];
                if R <= 8 {
                    let bits = (0..R).fold(0u64, |b, k| b | u64::from(sign_bits(k)) << (8 * k));
                    for g in 0..hashes {
                        at[g * n] = (bits >> (g * tau)) as u32 & code_mask;
                    }
                } else {
                    let bits = (0..R).fold(0u128, |b, k| b | u128::from(sign_bits(k)) << (8 * k));
                    for g in 0..hashes {
                        at[g * n] = (bits >> (g * tau)) as u32 & code_mask;
                    }
                }
            }
        }
        first += T;
    }
}

/// The fast hash's codes for rotations of `d_pad` coordinates (see [`handles`]): rows `d` wide,
/// `tau`-bit codes, `m` hashes; `codes` hash-major (`m × n`).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
///
/// # Panics
/// When `d_pad` is not one [`handles`] names, or the sizes do not agree (caller bugs).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn fast_codes(
    rows: &[f32],
    (d, d_pad): (usize, usize),
    (tau, m): (usize, usize),
    signs: &[f32],
    codes: &mut [u32],
) {
    // SAFETY (every arm): the caller guarantees AVX2 and FMA.
    unsafe {
        match d_pad {
            16 => fast_codes_in::<2, 4>(rows, d, (tau, m), signs, codes),
            32 => fast_codes_in::<4, 2>(rows, d, (tau, m), signs, codes),
            64 => fast_codes_in::<8, 2>(rows, d, (tau, m), signs, codes),
            128 => fast_codes_in::<16, 1>(rows, d, (tau, m), signs, codes),
            _ => panic!("no register kernel for rotations of {d_pad}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn codes_are_bit_for_bit_those_of_the_lane_kernel() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        super::super::rows::check_against_the_lane_kernel(|rows, sizes, hashes, signs, codes| {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { super::fast_codes(rows, sizes, hashes, signs, codes) }
        });
    }
}
