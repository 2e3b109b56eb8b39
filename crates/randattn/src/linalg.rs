//! Small shared linear algebra: a vectorised `exp`, the stable row softmax, dot products, error
//! measures and the fast Walsh–Hadamard transform (matrix products: [`crate::matrix`]).

use crate::error::{Error, Result};

/// `‖got − want‖_F / ‖want‖_F`, accumulated in f64 (how every report measures an estimate).
pub fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Cosine similarity of two vectors, in f64 (0 for a zero vector).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(f64::MIN_POSITIVE)
}

/// Dot product with sixteen partial sums, so that it vectorises.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// [`dot`] in f64, with eight partial sums (vectorises; differs from a sequential sum only in
/// f64 rounding). Inlined, so that it vectorises inside the caller's target features.
#[inline(always)]
pub fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// A vector of `len` zeros whose pages are touched by writing.
///
/// `vec![0.0; len]` asks the allocator for zeroed memory, which for large sizes is fresh pages
/// mapped to the shared zero page: a kernel that first *reads* such a buffer (an accumulator,
/// `out += ...`) takes one fault to map the zero page and a second, copy-on-write fault with a
/// TLB shootdown across the process's threads when it writes. Measured on YOSO's accumulators
/// (2-core VM), those faults were half of the run time. Writing the zeros up front costs one
/// cheap fault per page.
pub fn zeroed(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.resize(len, 0.0f32);
    v
}

/// [`zeroed`], written by the thread pool: for the large per-call buffers of a backward (the
/// gradients of Q, K and V are `B·H·n·d` each), whose first touch is a page fault per 4 KiB and
/// whose zeroing, done by one thread, would otherwise sit in front of the parallel work.
/// Below 256 KiB one thread zeroes it: splitting costs more than it saves.
pub fn par_zeroed(len: usize) -> Vec<f32> {
    par_filled(len, 0.0)
}

/// A vector of `len` copies of `value`, written by the thread pool as [`par_zeroed`] (one thread
/// below 256 KiB).
pub fn par_filled<T: Copy + Send + Sync>(len: usize, value: T) -> Vec<T> {
    use rayon::prelude::*;
    let mut v: Vec<T> = Vec::with_capacity(len);
    if len * std::mem::size_of::<T>() < 1 << 18 {
        // Written, not `vec![value; len]`: see [`zeroed`].
        v.resize(len, value);
        return v;
    }
    v.spare_capacity_mut()[..len]
        .par_chunks_mut((1 << 16) / std::mem::size_of::<T>().max(1))
        .for_each(|chunk| chunk.fill(std::mem::MaybeUninit::new(value)));
    // SAFETY: the loop above wrote every one of the first `len` elements.
    unsafe { v.set_len(len) };
    v
}

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5 · 2^23: adding it rounds a float to the nearest integer, which lands in the low mantissa
/// bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `e^x` to about 2 ulp for x in [-87.3, 88], 0 below (including −∞), +∞ above 88.03 (true
/// `e^x` overflows f32 at 88.72), written with plain
/// arithmetic and bit operations so that loops over it vectorise.
///
/// Range reduction `x = n·ln2 + r`, |r| ≤ ln2/2, then Cephes' degree-7 minimax polynomial for
/// `e^r` and `2^n` built in the exponent bits.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    exp_poly::<false>(x)
}

/// [`exp_approx`], with fused multiply-adds when `FMA` (only instantiate it with `FMA = true`
/// inside a function compiled with the `fma` target feature; elsewhere `mul_add` is a slow
/// library call).
#[inline(always)]
fn exp_poly<const FMA: bool>(x: f32) -> f32 {
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    let xc = x.clamp(-87.3, 88.7);
    let t = madd(xc, LOG2_E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let r = madd(n, -LN2_LO, madd(n, -LN2_HI, xc));
    let mut p = 1.987_569_1e-4;
    p = madd(p, r, 1.398_2e-3);
    p = madd(p, r, 8.333_452e-3);
    p = madd(p, r, 4.166_579_6e-2);
    p = madd(p, r, 1.666_666_5e-1);
    p = madd(p, r, 0.5);
    let p = madd(p, r * r, r + 1.0);
    let pow2n = f32::from_bits(
        (t.to_bits()
            .wrapping_sub(ROUND_MAGIC.to_bits())
            .wrapping_add(127))
            << 23,
    );
    if x < -87.3 { 0.0 } else { p * pow2n }
}

#[inline(always)]
fn exp_shifted_sum_impl<const FMA: bool>(row: &mut [f32], shift: f32) -> f32 {
    // Two simple loops rather than one fused one: the loop vectoriser handles each, whereas the
    // fused form was left scalar.
    for x in row.iter_mut() {
        *x = exp_poly::<FMA>(*x - shift);
    }
    sum_impl(row)
}

/// Sum with sixteen partial sums, inlined so that it vectorises inside the caller's target
/// features (see `multiversion!`).
#[inline(always)]
pub fn sum_lanes(row: &[f32]) -> f32 {
    sum_impl(row)
}

/// Maximum with 64 partial maxima (−∞ for an empty row), inlined like [`sum_lanes`].
#[inline(always)]
pub fn max_lanes(row: &[f32]) -> f32 {
    row_max_impl(row)
}

/// [`sum_lanes`] in two halves: its sixteen partial sums and the sum of its remainder, so that a
/// caller can finish several rows' sums side by side (the same bits when it adds each row's
/// partial sums in lane order, starting from the empty sum, then the remainder's).
#[inline(always)]
pub fn lane_partials(row: &[f32]) -> ([f32; 16], f32) {
    let mut acc = [0.0f32; 16];
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += *x;
        }
    }
    (acc, rest.iter().sum::<f32>())
}

#[inline(always)]
fn sum_impl(row: &[f32]) -> f32 {
    let (acc, rest) = lane_partials(row);
    acc.iter().sum::<f32>() + rest
}

#[inline(always)]
fn row_max_impl(row: &[f32]) -> f32 {
    // Four registers' worth of independent partial maxima (a single chain is bound by the
    // latency of max, not by loads), and `>` rather than `f32::max`, which also handles NaN
    // and costs a compare and a blend per step: a NaN is skipped either way.
    let mut acc = [f32::NEG_INFINITY; 64];
    let chunks = row.chunks_exact(64);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = if *x > *a { *x } else { *a };
        }
    }
    // Halve the partial maxima in steps (vector maxima, not 64 scalar ones: rows as short as a
    // register or two are common).
    let mut width = 32;
    while width > 0 {
        let (lo, hi) = acc.split_at_mut(width);
        for (a, x) in lo.iter_mut().zip(&hi[..width]) {
            *a = if *x > *a { *x } else { *a };
        }
        width /= 2;
    }
    rest.iter().fold(acc[0], |m, x| if *x > m { *x } else { m })
}

/// Defines a function whose body is compiled three times — for AVX-512F, for AVX2 + FMA and for
/// the baseline target — and runs the best one the CPU supports (checked at run time).
///
/// For the project's own kernels (hashing, scatter/gather, pair walks): their loops are written
/// plainly over `chunks_exact` / fixed-size lane arrays, and the compiler vectorises each copy to
/// its register width. Helpers called from the body should be `#[inline(always)]` so they are
/// compiled with the same features. Free functions only (no `self`, no generics).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? $body
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for `avx2`.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}
pub(crate) use multiversion;

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx512f,fma")]
    pub fn exp_shifted_sum_avx512(row: &mut [f32], shift: f32) -> f32 {
        super::exp_shifted_sum_impl::<true>(row, shift)
    }
    #[target_feature(enable = "avx2,fma")]
    pub fn exp_shifted_sum_avx2(row: &mut [f32], shift: f32) -> f32 {
        super::exp_shifted_sum_impl::<true>(row, shift)
    }
    #[target_feature(enable = "avx512f")]
    pub fn row_max_avx512(row: &[f32]) -> f32 {
        super::row_max_impl(row)
    }
    #[target_feature(enable = "avx2,fma")]
    pub fn row_max_avx2(row: &[f32]) -> f32 {
        super::row_max_impl(row)
    }
    #[target_feature(enable = "avx512f,fma")]
    pub fn softmax_row_avx512(row: &mut [f32]) {
        super::softmax_row_impl::<true>(row)
    }
    #[target_feature(enable = "avx2,fma")]
    pub fn softmax_row_avx2(row: &mut [f32]) {
        super::softmax_row_impl::<true>(row)
    }
}

/// Replaces every `x` of `row` by `e^(x − shift)` and returns their sum (vectorised; picks
/// AVX-512 or AVX2 at run time when the CPU has them).
pub fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { x86::exp_shifted_sum_avx512(row, shift) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { x86::exp_shifted_sum_avx2(row, shift) };
        }
    }
    exp_shifted_sum_impl::<false>(row, shift)
}

multiversion! {
    /// Sum of `row` with sixteen partial sums (vectorises; not sequential order).
    pub fn row_sum(row: &[f32]) -> f32 {
        sum_impl(row)
    }
}

/// Maximum of `row` (−∞ for an empty or all −∞ row), vectorised like [`exp_shifted_sum`].
pub fn row_max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the feature the function was compiled for.
            return unsafe { x86::row_max_avx512(row) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { x86::row_max_avx2(row) };
        }
    }
    row_max_impl(row)
}

multiversion! {
    /// `dst ← s · src`, element by element.
    pub fn scaled_copy(dst: &mut [f32], src: &[f32], s: f32) {
        for (o, v) in dst.iter_mut().zip(src) {
            *o = s * v;
        }
    }
}

multiversion! {
    /// `x ← s · x`, element by element (the same bits as [`scaled_copy`] from a copy of `x`).
    pub fn scale_in_place(x: &mut [f32], s: f32) {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

multiversion! {
    /// `s · src` as a new vector.
    pub fn scaled(src: &[f32], s: f32) -> Vec<f32> {
        src.iter().map(|v| v * s).collect()
    }
}

/// Numerically stable softmax of one row, in place: subtracts the row maximum before `exp`.
/// Entries equal to −∞ are masked out; a row with no finite entry becomes all zeros (not NaN).
/// Vectorised like [`exp_shifted_sum`], whose exponentials it shares.
pub fn softmax_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { x86::softmax_row_avx512(row) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { x86::softmax_row_avx2(row) };
        }
    }
    softmax_row_impl::<false>(row)
}

#[inline(always)]
fn softmax_row_impl<const FMA: bool>(row: &mut [f32]) {
    let max = row_max_impl(row);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let sum = exp_shifted_sum_impl::<FMA>(row, max);
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

multiversion! {
    /// Backward of a softmax row in place: given `p = softmax(x)` and `dp = ∂L/∂p`, leaves
    /// `∂L/∂x = p ⊙ (dp − ⟨p, dp⟩)` in `dp` (the inner product with [`dot`]'s sixteen partial
    /// sums). Entries where `p` is 0 (masked) get 0.
    pub fn softmax_row_backward(dp: &mut [f32], p: &[f32]) {
        let inner = dot(dp, p);
        for (d, pv) in dp.iter_mut().zip(p) {
            *d = pv * (*d - inner);
        }
    }
}

/// Unnormalised fast Walsh–Hadamard transform in place: `x ← H x` with `H` the Sylvester
/// Hadamard matrix of size `x.len()` (entries ±1, `H_ij = (−1)^popcount(i & j)`), in
/// `O(n log n)`. Divide by `√n` for the orthonormal transform.
///
/// Errors unless the length is a power of two (callers that need any length pad with zeros).
pub fn fwht(x: &mut [f32]) -> Result<()> {
    let n = x.len();
    if !n.is_power_of_two() {
        return Err(Error::shape(
            "fwht input",
            format!("has length {n} but the transform needs a power of two"),
        ));
    }
    let mut h = 1;
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (s, t) = (*a + *b, *a - *b);
                *a = s;
                *b = t;
            }
        }
        h *= 2;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_matches_std_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_approx(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.00731;
        }
        // f32 epsilon is 1.19e-7; allow 3 ulp.
        assert!(worst < 3.6e-7, "worst relative error {worst}");
        // The vectorised (FMA where available) path over the same range.
        let mut xs: Vec<f32> = (0..23_900).map(|i| -87.0 + i as f32 * 0.00731).collect();
        let want: Vec<f64> = xs.iter().map(|x| (*x as f64).exp()).collect();
        exp_shifted_sum(&mut xs, 0.0);
        for (g, w) in xs.iter().zip(&want) {
            assert!(((*g as f64 - w) / w).abs() < 3.6e-7, "{g} vs {w}");
        }
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-1e4), 0.0);
        assert_eq!(exp_approx(0.0), 1.0);
    }

    #[test]
    fn exp_shifted_sum_and_max_agree_with_scalar_code() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        row[5] = f32::NEG_INFINITY;
        let max = row_max(&row);
        assert_eq!(max, row.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let want: Vec<f64> = row.iter().map(|&x| ((x - max) as f64).exp()).collect();
        let sum = exp_shifted_sum(&mut row, max);
        for (g, w) in row.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 4e-7 * w.max(1e-30), "{g} vs {w}");
        }
        assert!((sum as f64 - want.iter().sum::<f64>()).abs() < 1e-5);
        assert_eq!(row[5], 0.0);
    }

    #[test]
    fn softmax_row_is_stable_and_handles_all_masked() {
        let mut row = vec![1e4, 1e4 - 1.0, -1e4, f32::NEG_INFINITY];
        softmax_row(&mut row);
        let e = (-1.0f32).exp();
        assert!((row[0] - 1.0 / (1.0 + e)).abs() < 1e-6);
        assert!((row[1] - e / (1.0 + e)).abs() < 1e-6);
        assert_eq!(row[2], 0.0);
        assert_eq!(row[3], 0.0);
        let mut masked = vec![f32::NEG_INFINITY; 5];
        softmax_row(&mut masked);
        assert_eq!(masked, vec![0.0; 5]);
    }

    #[test]
    fn fwht_equals_dense_hadamard() {
        for log_n in 0..=8 {
            let n = 1usize << log_n;
            let x: Vec<f32> = (0..n).map(|i| ((i * 7 + 3) % 11) as f32 - 5.0).collect();
            let mut fast = x.clone();
            fwht(&mut fast).unwrap();
            for (i, got) in fast.iter().enumerate() {
                let want: f32 = (0..n)
                    .map(|j| {
                        if (i & j).count_ones() % 2 == 0 {
                            x[j]
                        } else {
                            -x[j]
                        }
                    })
                    .sum();
                assert_eq!(*got, want, "n={n} i={i}");
            }
            // Applying it twice gives n·x.
            fwht(&mut fast).unwrap();
            for (a, b) in fast.iter().zip(&x) {
                assert_eq!(*a, n as f32 * b);
            }
        }
        let err = fwht(&mut [0.0; 6]).unwrap_err().to_string();
        assert!(err.contains("length 6"), "{err}");
    }

    #[test]
    fn softmax_row_backward_is_the_jacobian_transpose() {
        let x = [0.3f32, -1.2, 2.0, 0.0];
        let mut p = x;
        softmax_row(&mut p);
        let dp = [0.5f32, -0.25, 1.0, 2.0];
        let mut dx = dp;
        softmax_row_backward(&mut dx, &p);
        for (i, got) in dx.iter().enumerate() {
            // ∂p_j/∂x_i = p_j (δ_ij − p_i)
            let want: f64 = (0..4)
                .map(|j| {
                    let delta = if i == j { 1.0 } else { 0.0 };
                    dp[j] as f64 * p[j] as f64 * (delta - p[i] as f64)
                })
                .sum();
            assert!((*got as f64 - want).abs() < 1e-6, "{i}: {got} vs {want}");
        }
    }
}
