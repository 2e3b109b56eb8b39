//! The expectation of the LSH estimator, `B_ij = (1 − arccos(q̂_i·k̂_j)/π)^τ`, and the blocked
//! O(n²) kernels that use it: YOSO-E's forward `(B ⊙ M) V` and the backward passes that need the
//! exact `B` (`surrogate-exact-b`, `true`). Tiles of `QUERY_BLOCK × KEY_TILE`; never an
//! `n_q × n_k` buffer.

use std::f32::consts::{FRAC_1_PI, PI};

use crate::matrix::{MatMut, MatRef, matmul};

/// Query rows per tile.
pub(crate) const QUERY_BLOCK: usize = 128;
/// Keys per tile.
pub(crate) const KEY_TILE: usize = 256;

/// The `true` backward evaluates `B'(x)` at `x` clamped to `[−SLOPE_CLAMP, SLOPE_CLAMP]`.
///
/// `B'(x) = τ (1 − θ/π)^{τ−1} / (π sin θ)` is infinite at `x = ±1` (θ = 0 or π). A near-parallel
/// pair (θ < 2.56°) therefore gets the derivative at θ = 2.56° instead — finite, at most
/// `22·τ / π`, and exact for every other pair. Where the input normalisation is differentiated
/// too, the true contribution of such a pair is tangential and of size `B'(x)·sin θ`, which stays
/// bounded; the clamp only shrinks it. (The reference code instead shrinks every cosine by 0.98
/// or 0.99, which biases every pair.)
pub const SLOPE_CLAMP: f32 = 0.999;

/// `arccos(x)` for `x ∈ [−1, 1]` (inputs outside are clamped), absolute error below 2e-6 (a few
/// f32 ulp of π).
///
/// Abramowitz & Stegun 4.4.46: `arccos(a) = √(1 − a)·P₇(a)` for `a ∈ [0, 1]` (error ≤ 2e-8 in
/// exact arithmetic), and `arccos(−a) = π − arccos(a)`. Plain arithmetic (no `mul_add`, which is a
/// library call without FMA), so loops vectorise.
// The coefficients as published (the constant term is A&S's fit, not exactly π/2).
#[allow(clippy::excessive_precision, clippy::approx_constant)]
#[inline(always)]
pub fn acos_approx(x: f32) -> f32 {
    let a = x.abs().min(1.0);
    let p = -0.001_262_491_1f32;
    let p = p * a + 0.006_670_090_1;
    let p = p * a - 0.017_088_126;
    let p = p * a + 0.030_891_881;
    let p = p * a - 0.050_174_305;
    let p = p * a + 0.088_978_987;
    let p = p * a - 0.214_598_8;
    let p = p * a + 1.570_796_305_0;
    let r = (1.0 - a).sqrt() * p;
    if x >= 0.0 { r } else { PI - r }
}

/// `y^e` for `e < 32` by repeated squaring over a fixed five bits, so that a loop over many `y`
/// with the same `e` vectorises (`y^0 = 1`).
#[inline(always)]
fn powi(y: f32, e: u32) -> f32 {
    debug_assert!(e < 32);
    let (mut r, mut base) = (1.0f32, y);
    for bit in 0..5 {
        if (e >> bit) & 1 == 1 {
            r *= base;
        }
        base *= base;
    }
    r
}

crate::linalg::multiversion! {
    /// Over a tile of cosines `p`: `p ← B(p)`, and `w ← (τ/2)·B(p)` (`slope = Surrogate`) or
    /// `w ← B'(p)` (`True`) when `w` is not empty.
    fn tile_weights(p: &mut [f32], w: &mut [f32], tau: u32, slope: Slope) {
        if !w.is_empty() {
            match slope {
                Slope::True => {
                    for (wv, pv) in w.iter_mut().zip(p.iter()) {
                        *wv = collision_slope(*pv, tau);
                    }
                }
                Slope::Surrogate => {
                    for (wv, pv) in w.iter_mut().zip(p.iter()) {
                        *wv = 0.5 * tau as f32 * collision_probability(*pv, tau);
                    }
                }
            }
        }
        for pv in p.iter_mut() {
            *pv = collision_probability(*pv, tau);
        }
    }
}

/// The collision probability `B(x) = (1 − arccos(x)/π)^τ` of a τ-bit SimHash for unit vectors
/// with cosine `x`.
#[inline(always)]
pub fn collision_probability(x: f32, tau: u32) -> f32 {
    powi(1.0 - acos_approx(x) * FRAC_1_PI, tau)
}

/// `B'(x) = τ (1 − θ/π)^{τ−1} / (π sin θ)` at `x` clamped to `±`[`SLOPE_CLAMP`].
#[inline(always)]
pub fn collision_slope(x: f32, tau: u32) -> f32 {
    let x = x.clamp(-SLOPE_CLAMP, SLOPE_CLAMP);
    let y = 1.0 - acos_approx(x) * FRAC_1_PI;
    tau as f32 * powi(y, tau - 1) * FRAC_1_PI / (1.0 - x * x).sqrt()
}

/// One head's normalised inputs for the blocked kernels.
pub(crate) struct Head<'a> {
    /// Normalised queries `n_q × d`.
    pub q: &'a [f32],
    /// Normalised keys `n_k × d`.
    pub k: &'a [f32],
    /// Values `n_k × d_v`.
    pub v: &'a [f32],
    /// Key mask of this batch element.
    pub keep: Option<&'a [bool]>,
    pub d: usize,
    pub d_v: usize,
    pub tau: u32,
}

impl Head<'_> {
    /// `S = B(Q̂_blk K̂_tileᵀ)` with masked key columns zeroed; `s` is `rows × cols`.
    fn probabilities(&self, s: &mut [f32], q_blk: &[f32], c0: usize, cols: usize) {
        let (d, tau) = (self.d, self.tau);
        let rows = q_blk.len() / d;
        matmul(
            MatMut::new(s, rows, cols),
            false,
            MatRef::new(q_blk, rows, d),
            MatRef::new(&self.k[c0 * d..(c0 + cols) * d], cols, d).t(),
            1.0,
        );
        let keep = self.keep.map(|m| &m[c0..c0 + cols]);
        tile_weights(s, &mut [], tau, Slope::Surrogate);
        for row in s.chunks_exact_mut(cols) {
            if let Some(keep) = keep {
                for (x, k) in row.iter_mut().zip(keep) {
                    if !k {
                        *x = 0.0;
                    }
                }
            }
        }
    }

    /// `out = (B ⊙ M) V` for the query rows `q_blk` (`rows × d`); `out` is `rows × d_v`.
    pub(crate) fn forward_block(&self, q_blk: &[f32], out: &mut [f32], scratch: &mut Vec<f32>) {
        let (d, d_v) = (self.d, self.d_v);
        let rows = q_blk.len() / d;
        let n_k = self.k.len() / d;
        out.fill(0.0);
        scratch.resize(rows * KEY_TILE.min(n_k), 0.0);
        for c0 in (0..n_k).step_by(KEY_TILE) {
            let cols = KEY_TILE.min(n_k - c0);
            if self
                .keep
                .is_some_and(|m| m[c0..c0 + cols].iter().all(|k| !k))
            {
                continue;
            }
            let s = &mut scratch[..rows * cols];
            self.probabilities(s, q_blk, c0, cols);
            matmul(
                MatMut::new(out, rows, d_v),
                true,
                MatRef::new(s, rows, cols),
                MatRef::new(&self.v[c0 * d_v..(c0 + cols) * d_v], cols, d_v),
                1.0,
            );
        }
    }
}

/// Which weight multiplies `(G Vᵀ)_ij` in the gradients of the normalised inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Slope {
    /// The paper's surrogate `B'(x) ≈ (τ/2)·B(x)`.
    Surrogate,
    /// The exact derivative [`collision_slope`].
    True,
}

/// Gradients through the exact `B` for the keys `k0..k0 + dk.len()/d` of one head:
/// `dQ̂ += [(G Vᵀ) ⊙ W] K̂`, `dK̂ += [(G Vᵀ) ⊙ W]ᵀ Q̂` with `W` given by `slope` (masked keys
/// get 0), and `dV += Bᵀ G` when `dv` is given. `g` is the gradient of the output before the
/// output normalisation, with zero rows for masked queries.
pub(crate) fn backward_chunk(
    x: &Head<'_>,
    g: &[f32],
    slope: Slope,
    k0: usize,
    dq: &mut [f32],
    dk: &mut [f32],
    mut dv: Option<&mut [f32]>,
) {
    let (d, d_v, tau) = (x.d, x.d_v, x.tau);
    let n_q = x.q.len() / d;
    let n_keys = dk.len() / d;
    let tile = KEY_TILE.min(n_keys);
    let mut w = vec![0.0f32; QUERY_BLOCK * tile];
    let mut p = vec![0.0f32; QUERY_BLOCK * tile];
    let mut s = vec![0.0f32; QUERY_BLOCK * tile];
    for t0 in (0..n_keys).step_by(KEY_TILE) {
        let cols = KEY_TILE.min(n_keys - t0);
        let c0 = k0 + t0;
        let keep = x.keep.map(|m| &m[c0..c0 + cols]);
        if keep.is_some_and(|m| m.iter().all(|k| !k)) {
            continue;
        }
        let k_tile = &x.k[c0 * d..(c0 + cols) * d];
        let v_tile = &x.v[c0 * d_v..(c0 + cols) * d_v];
        for r0 in (0..n_q).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(n_q - r0);
            let g_blk = &g[r0 * d_v..(r0 + rows) * d_v];
            if g_blk.iter().all(|x| *x == 0.0) {
                continue;
            }
            let q_blk = &x.q[r0 * d..(r0 + rows) * d];
            let (w, p, s) = (
                &mut w[..rows * cols],
                &mut p[..rows * cols],
                &mut s[..rows * cols],
            );
            // p = cosines, then B (and the slope in w).
            matmul(
                MatMut::new(p, rows, cols),
                false,
                MatRef::new(q_blk, rows, d),
                MatRef::new(k_tile, cols, d).t(),
                1.0,
            );
            tile_weights(p, w, tau, slope);
            for (prow, wrow) in p.chunks_exact_mut(cols).zip(w.chunks_exact_mut(cols)) {
                if let Some(keep) = keep {
                    for ((pv, wv), k) in prow.iter_mut().zip(wrow.iter_mut()).zip(keep) {
                        if !k {
                            *pv = 0.0;
                            *wv = 0.0;
                        }
                    }
                }
            }
            if let Some(dv) = dv.as_deref_mut() {
                matmul(
                    MatMut::new(&mut dv[t0 * d_v..(t0 + cols) * d_v], cols, d_v),
                    true,
                    MatRef::new(p, rows, cols).t(),
                    MatRef::new(g_blk, rows, d_v),
                    1.0,
                );
            }
            // s = (G Vᵀ) ⊙ W
            matmul(
                MatMut::new(s, rows, cols),
                false,
                MatRef::new(g_blk, rows, d_v),
                MatRef::new(v_tile, cols, d_v).t(),
                1.0,
            );
            for (sv, wv) in s.iter_mut().zip(w.iter()) {
                *sv *= *wv;
            }
            matmul(
                MatMut::new(&mut dq[r0 * d..(r0 + rows) * d], rows, d),
                true,
                MatRef::new(s, rows, cols),
                MatRef::new(k_tile, cols, d),
                1.0,
            );
            matmul(
                MatMut::new(&mut dk[t0 * d..(t0 + cols) * d], cols, d),
                true,
                MatRef::new(s, rows, cols).t(),
                MatRef::new(q_blk, rows, d),
                1.0,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acos_and_the_collision_probability_are_accurate() {
        let mut worst = 0.0f64;
        for i in 0..=20_000 {
            let x = -1.0 + i as f64 / 10_000.0;
            worst = worst.max((acos_approx(x as f32) as f64 - x.acos()).abs());
        }
        assert!(worst < 2e-6, "acos error {worst}");
        assert_eq!(acos_approx(1.5), 0.0);
        for &(x, tau) in &[(0.3f64, 8u32), (-0.7, 3), (0.95, 12), (0.0, 1)] {
            let want = (1.0 - x.acos() / std::f64::consts::PI).powi(tau as i32);
            let got = collision_probability(x as f32, tau) as f64;
            assert!((got - want).abs() < 1e-6 * (1.0 + want), "{x} {tau}");
            // Slope against a central difference of the f64 formula.
            let b = |x: f64| (1.0 - x.acos() / std::f64::consts::PI).powi(tau as i32);
            let fd = (b(x + 1e-6) - b(x - 1e-6)) / 2e-6;
            let slope = collision_slope(x as f32, tau) as f64;
            assert!((slope - fd).abs() < 1e-4 * (1.0 + fd.abs()), "{x} {tau}");
        }
        // Clamped near ±1: finite, equal to the slope at the clamp.
        assert_eq!(collision_slope(1.0, 9), collision_slope(SLOPE_CLAMP, 9));
        assert!(collision_slope(-1.0, 9).is_finite());
    }
}
