//! The locality-sensitive hashes of YOSO: τ-bit SimHash and the fast Hadamard pseudo-rotation
//! hash.
//!
//! Both map a vector `x` to `m` codes of `τ` bits, bit `t` of a code being `1[⟨r_t, x⟩ > 0]` for
//! some direction `r_t`. For SimHash the directions are i.i.d. Gaussian, so two vectors at angle
//! `θ` agree on one bit with probability `1 − θ/π` and collide (equal codes) with probability
//! exactly `(1 − θ/π)^τ`, independently across the `m` hashes. The fast hash replaces the
//! Gaussian matrix by the rows of a structured pseudo-rotation `H·D₃·H·D₂·H·D₁` (Andoni et al.),
//! `H` the Walsh–Hadamard matrix and `Dᵢ` random ±1 diagonals: O(d log d) per rotation instead
//! of O(d·τ) per hash, with a collision probability close to (not exactly) `(1 − θ/π)^τ`. One
//! rotation yields `⌊d_pad/τ⌋` hashes from disjoint coordinate groups.
//!
//! Unlike the reference kernels, any `d` works: the fast hash zero-pads rows to
//! `d_pad = next_power_of_two(max(d, τ))`, and queries and keys are always hashed with their
//! own codes (the reference's non-fast path hashed queries with the key codes).

use rand::Rng;
use rand_distr::StandardNormal;

use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef, matmul};
use crate::rng::StreamRng;

use super::lanes::{self, LANES, Lanes};

/// Code stored for a token that was not hashed (a masked query or key); never a valid code.
pub const NO_CODE: u32 = u32::MAX;
/// Largest supported code length in bits.
pub const MAX_TAU: u32 = 30;

crate::choice! {
    /// Which hash family draws the codes.
    pub enum HashFamily {
        /// Fast Hadamard pseudo-rotation hash (the paper's default).
        Fast = "fast",
        /// Plain SimHash with Gaussian hyperplanes.
        SimHash = "simhash",
    }
}

/// Tokens per GEMM block of SimHash (bounds its scratch to `SIMHASH_BLOCK · m · τ` floats).
const SIMHASH_BLOCK: usize = 64;

/// `m` hash functions of `τ` bits on `d`-dimensional vectors, drawn once and applied to any
/// number of rows (queries and keys of one head share one `LshHash`).
#[derive(Debug, Clone)]
pub struct LshHash {
    d: usize,
    tau: usize,
    m: usize,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// Gaussian directions `[d, m·τ]`, column `h·τ + t` is bit `t` of hash `h`.
    SimHash { directions: Vec<f32> },
    /// `rotations × 3 × d_pad` random signs of `D₁, D₂, D₃`.
    Fast {
        d_pad: usize,
        per_rotation: usize,
        signs: Vec<f32>,
    },
}

impl LshHash {
    /// Draws `m` hashes of `tau` bits for vectors of dimension `d` from `rng`.
    ///
    /// Errors when `d` or `m` is 0 or `tau` is outside `1..=MAX_TAU`.
    pub fn draw(
        family: HashFamily,
        d: usize,
        tau: u32,
        m: usize,
        rng: &mut StreamRng,
    ) -> Result<Self> {
        if d == 0 || m == 0 || !(1..=MAX_TAU).contains(&tau) {
            return Err(Error::shape(
                "hash",
                format!("needs d ≥ 1, m ≥ 1 and 1 ≤ tau ≤ {MAX_TAU}; got d={d}, m={m}, tau={tau}"),
            ));
        }
        let tau = tau as usize;
        let kind = match family {
            HashFamily::SimHash => Kind::SimHash {
                directions: (0..d * m * tau)
                    .map(|_| rng.sample::<f32, _>(StandardNormal))
                    .collect(),
            },
            HashFamily::Fast => {
                let d_pad = d.max(tau).next_power_of_two();
                let per_rotation = d_pad / tau;
                let rotations = m.div_ceil(per_rotation);
                let mut signs = Vec::with_capacity(rotations * 3 * d_pad);
                while signs.len() < rotations * 3 * d_pad {
                    let bits: u64 = rng.random();
                    let take = (rotations * 3 * d_pad - signs.len()).min(64);
                    signs.extend((0..take).map(|i| if bits >> i & 1 == 1 { 1.0 } else { -1.0 }));
                }
                Kind::Fast {
                    d_pad,
                    per_rotation,
                    signs,
                }
            }
        };
        Ok(LshHash { d, tau, m, kind })
    }

    /// Number of hashes `m`.
    pub fn hashes(&self) -> usize {
        self.m
    }

    /// Code length `τ` in bits.
    pub fn tau(&self) -> u32 {
        self.tau as u32
    }

    /// Hash codes of the rows of `rows` (`n × d` row-major), written **hash-major** into `codes`
    /// (`m × n`: `codes[h·n + i]` is hash `h` of row `i`, in `0..2^τ`). Rows with
    /// `keep[i] == false` get [`NO_CODE`].
    ///
    /// # Panics
    /// When `rows.len()` is not a multiple of `d` or `codes` / `keep` do not have `n·m` / `n`
    /// entries (a caller bug, never user input).
    pub fn codes(&self, rows: &[f32], keep: Option<&[bool]>, codes: &mut [u32]) {
        let n = rows.len() / self.d;
        assert!(rows.len() == n * self.d && codes.len() == n * self.m);
        assert!(keep.is_none_or(|k| k.len() == n));
        match &self.kind {
            Kind::SimHash { directions } => self.simhash_codes(directions, rows, codes),
            Kind::Fast {
                d_pad,
                per_rotation,
                signs,
            } => fast_codes(
                rows,
                FastShape {
                    d: self.d,
                    d_pad: *d_pad,
                    tau: self.tau,
                    m: self.m,
                    per_rotation: *per_rotation,
                },
                signs,
                codes,
            ),
        }
        if let Some(keep) = keep {
            for hash in codes.chunks_exact_mut(n) {
                for (c, k) in hash.iter_mut().zip(keep) {
                    if !k {
                        *c = NO_CODE;
                    }
                }
            }
        }
    }

    fn simhash_codes(&self, directions: &[f32], rows: &[f32], codes: &mut [u32]) {
        let (d, m, tau) = (self.d, self.m, self.tau);
        let n = rows.len() / d;
        let width = m * tau;
        let mut proj = vec![0.0f32; SIMHASH_BLOCK.min(n) * width];
        for (blk, rows) in rows.chunks(SIMHASH_BLOCK * d).enumerate() {
            let nb = rows.len() / d;
            matmul(
                MatMut::new(&mut proj, nb, width),
                false,
                MatRef::new(rows, nb, d),
                MatRef::new(directions, d, width),
                1.0,
            );
            for (l, p) in proj.chunks_exact(width).take(nb).enumerate() {
                for (h, bits) in p.chunks_exact(tau).enumerate() {
                    codes[h * n + blk * SIMHASH_BLOCK + l] = pack_bits(bits);
                }
            }
        }
    }
}

/// Sizes of a fast hash.
#[derive(Debug, Clone, Copy)]
pub(super) struct FastShape {
    pub(super) d: usize,
    pub(super) d_pad: usize,
    pub(super) tau: usize,
    pub(super) m: usize,
    pub(super) per_rotation: usize,
}

/// The fast hash of all rows, with the widest SIMD the CPU has.
fn fast_codes(rows: &[f32], shape: FastShape, signs: &[f32], codes: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            if super::rows::handles(shape.d_pad) {
                let sizes = ((shape.d, shape.d_pad), (shape.tau, shape.m));
                // SAFETY: the CPU has AVX-512F.
                return unsafe { super::rows::fast_codes(rows, sizes.0, sizes.1, signs, codes) };
            }
            // SAFETY: the CPU has AVX-512F.
            return unsafe { lanes::fast_codes_avx512(rows, shape, signs, codes) };
        }
        if std::is_x86_feature_detected!("avx2") {
            if std::is_x86_feature_detected!("fma") && super::rows_avx2::handles(shape.d_pad) {
                let sizes = ((shape.d, shape.d_pad), (shape.tau, shape.m));
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe {
                    super::rows_avx2::fast_codes(rows, sizes.0, sizes.1, signs, codes)
                };
            }
            // SAFETY: the CPU has AVX2.
            return unsafe { lanes::fast_codes_avx2(rows, shape, signs, codes) };
        }
    }
    // SAFETY: the portable lanes run on any CPU.
    unsafe { fast_codes_with::<lanes::Portable>(rows, shape, signs, codes) };
}

/// The fast hash: [`LANES`] tokens at a time, one per SIMD lane, through `H·D₃·H·D₂·H·D₁` per
/// rotation; codes written hash-major.
///
/// # Safety
/// The CPU must support the instruction set `V` is compiled for.
#[inline(always)]
pub(super) unsafe fn fast_codes_with<V: Lanes>(
    rows: &[f32],
    shape: FastShape,
    signs: &[f32],
    codes: &mut [u32],
) {
    let FastShape {
        d,
        d_pad,
        tau,
        m,
        per_rotation,
    } = shape;
    let n = rows.len() / d;
    // Rows transposed (coordinate-major, one token per lane), then the rotation's work array.
    let mut xt = vec![[0.0f32; LANES]; d];
    let mut z = vec![[0.0f32; LANES]; d_pad];
    let mut lane_codes = [0u32; LANES];
    for i0 in (0..n).step_by(LANES) {
        let nb = LANES.min(n - i0);
        for (l, row) in rows[i0 * d..(i0 + nb) * d].chunks_exact(d).enumerate() {
            for (xc, x) in xt.iter_mut().zip(row) {
                xc[l] = *x;
            }
        }
        for (r, signs) in signs.chunks_exact(3 * d_pad).enumerate() {
            let (s1, rest) = signs.split_at(d_pad);
            let (s2, s3) = rest.split_at(d_pad);
            // SAFETY (this block): the caller guarantees the CPU supports `V`.
            unsafe {
                for ((zc, xc), s) in z.iter_mut().zip(&xt).zip(s1) {
                    V::load(xc).scale(*s).store(zc);
                }
                for zc in &mut z[d..] {
                    *zc = [0.0; LANES];
                }
                fwht_lanes::<V>(&mut z, None);
                fwht_lanes::<V>(&mut z, Some(s2));
                fwht_lanes::<V>(&mut z, Some(s3));
                for g in 0..per_rotation {
                    let h = r * per_rotation + g;
                    if h >= m {
                        break;
                    }
                    let mut bits = V::no_codes();
                    for (u, zc) in z[g * tau..(g + 1) * tau].iter().enumerate() {
                        bits = V::load(zc).set_bit_where_positive(u as u32, bits);
                    }
                    V::store_codes(bits, &mut lane_codes);
                    codes[h * n + i0..h * n + i0 + nb].copy_from_slice(&lane_codes[..nb]);
                }
            }
        }
    }
}

/// `z ← H·diag(signs)·z` along the first axis (length a power of two), lane by lane, in passes
/// of up to three butterfly stages whose eight operands stay in registers.
///
/// # Safety
/// As [`fast_codes_with`].
#[inline(always)]
pub(super) unsafe fn fwht_lanes<V: Lanes>(z: &mut [[f32; LANES]], signs: Option<&[f32]>) {
    let bits = z.len().trailing_zeros() as usize;
    if bits == 0 {
        if let Some(s) = signs {
            // SAFETY: as the function's.
            unsafe { V::load(&z[0]).scale(s[0]).store(&mut z[0]) };
        }
        return;
    }
    let mut s0 = 0;
    while s0 < bits {
        let signs = if s0 == 0 { signs } else { None };
        // SAFETY: as the function's.
        unsafe {
            match (bits - s0).min(3) {
                3 => fwht_pass::<V, 8>(z, 1 << s0, signs),
                2 => fwht_pass::<V, 4>(z, 1 << s0, signs),
                _ => fwht_pass::<V, 2>(z, 1 << s0, signs),
            }
        }
        s0 += 3;
    }
}

/// Butterfly stages `h0, 2·h0, …, (G/2)·h0` of the transform, on groups of `G` coordinates
/// `h0` apart.
///
/// # Safety
/// As [`fast_codes_with`].
#[inline(always)]
unsafe fn fwht_pass<V: Lanes, const G: usize>(
    z: &mut [[f32; LANES]],
    h0: usize,
    signs: Option<&[f32]>,
) {
    let span = h0 * G;
    for block in (0..z.len()).step_by(span) {
        for base in block..block + h0 {
            // SAFETY: as the function's.
            unsafe {
                let mut r = [V::zero(); G];
                for (j, rj) in r.iter_mut().enumerate() {
                    let c = base + j * h0;
                    *rj = match signs {
                        Some(s) => V::load(&z[c]).scale(s[c]),
                        None => V::load(&z[c]),
                    };
                }
                let mut h = 1;
                while h < G {
                    for j in 0..G {
                        if j & h == 0 {
                            let (a, b) = (r[j], r[j + h]);
                            r[j] = a.add(b);
                            r[j + h] = a.sub(b);
                        }
                    }
                    h *= 2;
                }
                for (j, v) in r.iter().enumerate() {
                    v.store(&mut z[base + j * h0]);
                }
            }
        }
    }
}

/// `Σ_t 2^t · 1[bits_t > 0]`.
fn pack_bits(bits: &[f32]) -> u32 {
    bits.iter()
        .enumerate()
        .fold(0, |code, (t, x)| code | u32::from(*x > 0.0) << t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::fwht;
    use crate::rng::stream;

    #[test]
    fn lane_transform_matches_the_scalar_fwht() {
        for n in [1, 2, 4, 8, 16, 32, 64, 128, 256] {
            check_lane_transform(n);
        }
    }

    fn check_lane_transform(n: usize) {
        let mut z = vec![[0.0f32; LANES]; n];
        for (c, zc) in z.iter_mut().enumerate() {
            for (l, x) in zc.iter_mut().enumerate() {
                *x = ((c * 7 + l * 3) as f32 * 0.37).sin();
            }
        }
        let mut want: Vec<Vec<f32>> = (0..LANES)
            .map(|l| z.iter().map(|zc| zc[l]).collect())
            .collect();
        let signs: Vec<f32> = (0..n)
            .map(|c| if c % 3 == 1 { -1.0 } else { 1.0 })
            .collect();
        let mut z2 = z.clone();
        // SAFETY: the portable lanes run on any CPU.
        unsafe { fwht_lanes::<lanes::Portable>(&mut z, Some(&signs)) };
        fast_transform_best(&mut z2, &signs);
        for (l, w) in want.iter_mut().enumerate() {
            for (x, s) in w.iter_mut().zip(&signs) {
                *x *= s;
            }
            fwht(w).unwrap();
            for c in 0..n {
                assert!((z[c][l] - w[c]).abs() < 1e-4 * n as f32, "n={n}");
                assert!((z2[c][l] - w[c]).abs() < 1e-4 * n as f32, "n={n}");
            }
        }
    }

    /// The transform with the SIMD backend the CPU has.
    fn fast_transform_best(z: &mut [[f32; LANES]], signs: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { lanes::fwht_avx512(z, signs) };
            }
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                return unsafe { lanes::fwht_avx2(z, signs) };
            }
        }
        // SAFETY: the portable lanes run on any CPU.
        unsafe { fwht_lanes::<lanes::Portable>(z, Some(signs)) };
    }

    #[test]
    fn fast_hash_equals_the_dense_rotation_and_is_scale_invariant() {
        // Every code bit is the sign of one coordinate of H·D3·H·D2·H·D1·x; check against a
        // dense evaluation, for a d that is not a power of two (padded internally).
        let (d, tau, m) = (17, 5, 9);
        let h = LshHash::draw(HashFamily::Fast, d, tau, m, &mut stream(3, 0, 0, "t")).unwrap();
        let Kind::Fast {
            d_pad,
            per_rotation,
            signs,
        } = &h.kind
        else {
            unreachable!()
        };
        assert_eq!((*d_pad, *per_rotation), (32, 6));
        let n = 11;
        let rows: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.91).cos()).collect();
        let mut codes = vec![0u32; n * m];
        h.codes(&rows, None, &mut codes);
        // The portable lanes give the same codes as the SIMD path the CPU picked.
        let mut portable = vec![0u32; n * m];
        let shape = FastShape {
            d,
            d_pad: *d_pad,
            tau: tau as usize,
            m,
            per_rotation: *per_rotation,
        };
        // SAFETY: the portable lanes run on any CPU.
        unsafe { fast_codes_with::<lanes::Portable>(&rows, shape, signs, &mut portable) };
        assert_eq!(portable, codes);
        let scaled: Vec<f32> = rows.iter().map(|x| x * 3.5).collect();
        let mut codes2 = vec![0u32; n * m];
        h.codes(&scaled, None, &mut codes2);
        assert_eq!(codes, codes2);
        for i in 0..n {
            for hash in 0..m {
                let (r, g) = (hash / per_rotation, hash % per_rotation);
                let s = &signs[r * 3 * d_pad..(r + 1) * 3 * d_pad];
                let mut x = vec![0.0f32; *d_pad];
                x[..d].copy_from_slice(&rows[i * d..(i + 1) * d]);
                for k in 0..3 {
                    for (xc, sc) in x.iter_mut().zip(&s[k * d_pad..(k + 1) * d_pad]) {
                        *xc *= sc;
                    }
                    fwht(&mut x).unwrap();
                }
                let want = pack_bits(&x[g * tau as usize..(g + 1) * tau as usize]);
                assert_eq!(codes[hash * n + i], want, "row {i} hash {hash}");
            }
        }
    }

    #[test]
    fn masked_rows_get_no_code_and_bad_sizes_are_errors() {
        let h = LshHash::draw(HashFamily::SimHash, 4, 3, 2, &mut stream(0, 0, 0, "t")).unwrap();
        let rows = [1.0f32; 12];
        let mut codes = [0u32; 6];
        h.codes(&rows, Some(&[true, false, true]), &mut codes);
        // Hash-major: [hash 0 of rows 0..3, hash 1 of rows 0..3].
        assert_eq!((codes[1], codes[4]), (NO_CODE, NO_CODE));
        assert!([0, 2, 3, 5].iter().all(|&i| codes[i] < 8));
        for (d, tau, m) in [(0, 3, 2), (4, 0, 2), (4, 31, 2), (4, 3, 0)] {
            assert!(LshHash::draw(HashFamily::Fast, d, tau, m, &mut stream(0, 0, 0, "t")).is_err());
        }
    }
}
