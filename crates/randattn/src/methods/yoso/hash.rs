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
use crate::linalg::{Mat, gemm};
use crate::rng::StreamRng;

/// Code stored for a token that was not hashed (a masked query or key); never a valid code.
pub const NO_CODE: u32 = u32::MAX;
/// Largest supported code length in bits.
pub const MAX_TAU: u32 = 30;

/// Which hash family draws the codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashFamily {
    /// Fast Hadamard pseudo-rotation hash (the paper's default).
    #[default]
    Fast,
    /// Plain SimHash with Gaussian hyperplanes.
    SimHash,
}

impl HashFamily {
    /// The name used by `--set hash=...`.
    pub fn name(self) -> &'static str {
        match self {
            HashFamily::Fast => "fast",
            HashFamily::SimHash => "simhash",
        }
    }
}

/// Lanes of the fast hash: it transforms this many tokens at once, one per SIMD lane.
const LANES: usize = 16;
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
            gemm(
                nb,
                width,
                d,
                &mut proj,
                width,
                Mat::rows(rows, d),
                Mat::rows(directions, width),
                1.0,
                false,
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
struct FastShape {
    d: usize,
    d_pad: usize,
    tau: usize,
    m: usize,
    per_rotation: usize,
}

crate::linalg::multiversion! {
    /// The fast hash of all rows: [`LANES`] tokens at a time, one per SIMD lane, through
    /// `H·D₃·H·D₂·H·D₁` per rotation; codes written hash-major.
    fn fast_codes(rows: &[f32], shape: FastShape, signs: &[f32], codes: &mut [u32]) {
        let FastShape { d, d_pad, tau, m, per_rotation } = shape;
        let n = rows.len() / d;
        // Rows transposed (coordinate-major, token per lane), then the rotation's work array.
        let mut xt = vec![[0.0f32; LANES]; d];
        let mut z = vec![[0.0f32; LANES]; d_pad];
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
                for ((zc, xc), s) in z.iter_mut().zip(&xt).zip(s1) {
                    for (a, b) in zc.iter_mut().zip(xc) {
                        *a = *b * s;
                    }
                }
                for zc in &mut z[d..] {
                    *zc = [0.0; LANES];
                }
                fwht_lanes(&mut z);
                scale_lanes(&mut z, s2);
                fwht_lanes(&mut z);
                scale_lanes(&mut z, s3);
                fwht_lanes(&mut z);
                for g in 0..per_rotation {
                    let h = r * per_rotation + g;
                    if h >= m {
                        break;
                    }
                    let mut lane_codes = [0u32; LANES];
                    for (u, zc) in z[g * tau..(g + 1) * tau].iter().enumerate() {
                        for (code, x) in lane_codes.iter_mut().zip(zc) {
                            *code |= u32::from(*x > 0.0) << u;
                        }
                    }
                    codes[h * n + i0..h * n + i0 + nb].copy_from_slice(&lane_codes[..nb]);
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

/// Unnormalised Walsh–Hadamard transform along the first axis of `z` (length a power of two),
/// independently in each lane. Written on the flat array so every butterfly stage is a loop over
/// contiguous runs of at least [`LANES`] floats (unit stride: plain vector adds).
#[inline(always)]
fn fwht_lanes(z: &mut [[f32; LANES]]) {
    let n = z.len();
    let flat = z.as_flattened_mut();
    let mut h = 1;
    while h < n {
        for block in flat.chunks_exact_mut(2 * h * LANES) {
            let (lo, hi) = block.split_at_mut(h * LANES);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (s, t) = (*a + *b, *a - *b);
                *a = s;
                *b = t;
            }
        }
        h *= 2;
    }
}

#[inline(always)]
fn scale_lanes(z: &mut [[f32; LANES]], signs: &[f32]) {
    for (zc, s) in z.iter_mut().zip(signs) {
        for x in zc.iter_mut() {
            *x *= s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::fwht;
    use crate::rng::stream;

    #[test]
    fn lane_transform_matches_the_scalar_fwht() {
        let n = 32;
        let mut z = vec![[0.0f32; LANES]; n];
        for (c, zc) in z.iter_mut().enumerate() {
            for (l, x) in zc.iter_mut().enumerate() {
                *x = ((c * 7 + l * 3) as f32 * 0.37).sin();
            }
        }
        let mut want: Vec<Vec<f32>> = (0..LANES)
            .map(|l| z.iter().map(|zc| zc[l]).collect())
            .collect();
        fwht_lanes(&mut z);
        for (l, w) in want.iter_mut().enumerate() {
            fwht(w).unwrap();
            for c in 0..n {
                assert!((z[c][l] - w[c]).abs() < 1e-4);
            }
        }
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
