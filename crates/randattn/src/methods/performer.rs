//! Performer (FAVOR+): softmax attention through positive random features.
//!
//! Choromanski et al., *Rethinking Attention with Performers*, ICLR 2021; the baseline that
//! Zheng, Wang, Kong (*Linear Complexity Randomized Self-attention Mechanism*, ICML 2022) read as
//! self-normalised importance sampling. Brief: `shared/papers/lara.md` §1, §2, §5.
//!
//! # The estimator
//!
//! With `x = s^{1/2}·q` (and likewise for keys, so `x_q·x_k = s·q·k`, `s = 1/√d` by default) and
//! `m` directions `ω_i`, the positive features
//!
//! ```text
//! φ(x)_i = exp(ω_i·x − ‖x‖²/2) / √m        (hyperbolic: [exp(±ω_i·x − ‖x‖²/2)] / √(2m))
//! ```
//!
//! satisfy `E[φ(x_q)·φ(x_k)] = exp(s·q·k)` for `ω_i ~ N(0, I)`, and
//!
//! ```text
//! O = φ(Q) (φ(K)ᵀ V) / (φ(Q) · φ(K)ᵀ 1)
//! ```
//!
//! costs `O(n·m·(d + d_v))` time and `O(n·m)` memory. Each kernel value is estimated without bias;
//! the ratio (the output) is biased but consistent.
//!
//! **Orthogonal features** (on by default): blocks of `d` directions orthogonalised by
//! Gram–Schmidt (QR) of a Gaussian matrix, each row rescaled to the norm of an independent
//! Gaussian vector, so every `ω_i` is still marginally `N(0, I)` while rows in a block are exactly
//! orthogonal — lower variance than i.i.d. directions.
//!
//! **Stabilisation without bias.** `exp` would overflow for large logits. Each query's features are
//! divided by their own maximum, and all keys' features of a head by one common maximum: both
//! factors cancel exactly in the ratio, so the estimate is unchanged. No additive epsilon (the
//! reference implementations add 1e-4 or 1e-6 to features or denominators, which biases every
//! row); a row whose denominator still underflows to 0 outputs 0.
//!
//! # Masks, randomness, backward
//!
//! Masked keys are left out of both sums; masked queries output 0. The directions of head `h`
//! come from `rng::stream(seed, 0, h, "performer/features")`, shared by the batch (they play the
//! role of a layer's feature matrix). The backward holds them fixed and differentiates the
//! features exactly: `∂φ_i/∂x = φ_i (ω_i − x)`.

use rand::Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::estimator::{Estimator, Grads, HeadGrads, MethodInfo};
use crate::inputs::{AttentionInputs, Dims};
use crate::linalg::{dot, exp_shifted_sum, row_max};
use crate::matrix::{MatMut, MatRef, matmul, product};
use crate::memory::{Memory, Sizes};
use crate::params::{Auto, in_range, resolve_scale, scale_rule};
use crate::rng::stream;

/// Largest number of features accepted.
pub const MAX_FEATURES: usize = 1 << 16;

crate::choice! {
    /// The feature map.
    pub enum Kernel {
        /// `exp(ω·x − ‖x‖²/2)`.
        Positive = "positive",
        /// `exp(±ω·x − ‖x‖²/2)` (two features per direction).
        Hyperbolic = "hyperbolic",
    }
}

crate::method_params! {
    /// Performer `performer`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Performer {
        /// number of random directions m
        pub features: usize = 256, in_range(1, MAX_FEATURES as u64);
        /// orthogonal random features (blocks of d orthogonal directions)
        pub orthogonal: bool = true;
        /// feature map exp(w.x - |x|^2/2), or both signs of w
        pub kernel: Kernel = Kernel::Positive;
        /// softmax temperature s in softmax(s * Q K^T)
        pub scale: Auto<f32> = Auto::Auto, scale_rule();
    }
}

/// What the backward reuses from the forward: the random directions of every head (`m × d`
/// each), so Gram–Schmidt runs once per forward + backward.
#[derive(Debug, Clone)]
pub struct PerformerSaved {
    directions: Vec<Vec<f32>>,
}

/// Rows [`gram_schmidt`] carries through the finished basis together: their chains of
/// projections are independent, so they overlap in the CPU instead of waiting on each other.
const GS_GROUP: usize = 4;

crate::linalg::multiversion! {
    /// Modified Gram–Schmidt in f64 on the rows of `block` (`rows × d`): the orthonormal rows, in
    /// order. Each row takes its projections on the earlier rows one by one, in order, then is
    /// normalised; rows go in groups of [`GS_GROUP`] through the basis finished before the group
    /// (the same operations in the same order as row by row, so the same bits).
    fn gram_schmidt(block: &[f32], d: usize) -> Vec<f64> {
        let mut basis = vec![0.0f64; block.len()];
        for (v, src) in basis.iter_mut().zip(block) {
            *v = *src as f64;
        }
        let rows = block.len() / d;
        for g in (0..rows).step_by(GS_GROUP) {
            let (done, group) = basis.split_at_mut(g * d);
            let group = &mut group[..(rows - g).min(GS_GROUP) * d];
            for b in done.chunks_exact(d) {
                for v in group.chunks_exact_mut(d) {
                    let p = crate::linalg::dot_f64(v, b);
                    for (x, y) in v.iter_mut().zip(b) {
                        *x -= p * y;
                    }
                }
            }
            for i in 0..group.len() / d {
                let (earlier, rest) = group.split_at_mut(i * d);
                let v = &mut rest[..d];
                for b in earlier.chunks_exact(d) {
                    let p = crate::linalg::dot_f64(v, b);
                    for (x, y) in v.iter_mut().zip(b) {
                        *x -= p * y;
                    }
                }
                let norm = crate::linalg::dot_f64(v, v).sqrt().max(1e-30);
                for x in v.iter_mut() {
                    *x /= norm;
                }
            }
        }
        basis
    }
}

impl Performer {
    /// The `m × d` directions of head `h` for `seed` (what the forward uses).
    pub fn directions(&self, d: usize, seed: u64, h: usize) -> Vec<f32> {
        let m = self.features;
        let mut rng = stream(seed, 0, h, "performer/features");
        let mut w: Vec<f32> = (0..m * d)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect();
        if self.orthogonal {
            for block in w.chunks_mut(d * d) {
                // Gram–Schmidt on the block's rows (f64 for accuracy), then each row rescaled to
                // the norm of a fresh Gaussian vector (a χ_d draw): marginally N(0, I) again.
                let basis = gram_schmidt(block, d);
                for (row, b) in block.chunks_exact_mut(d).zip(basis.chunks_exact(d)) {
                    let chi: f64 = (0..d)
                        .map(|_| (rng.sample::<f64, _>(StandardNormal)).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    for (x, y) in row.iter_mut().zip(b) {
                        *x = (chi * y) as f32;
                    }
                }
            }
        }
        w
    }

    /// The features `φ(s^{1/2}·x)` of the rows `x` (`n × d`) with the directions of head `h`,
    /// without the stabilising shifts: `E[φ(q)·φ(k)] = exp(s·q·k)`. For diagnostics and tests.
    pub fn features(&self, rows: &[f32], d: usize, seed: u64, h: usize) -> Vec<f32> {
        let root = resolve_scale(self.scale, d).sqrt();
        let x: Vec<f32> = rows.iter().map(|v| v * root).collect();
        let norm = 1.0 / (self.width() as f32).sqrt();
        let mut phi = self.log_features(&x, &self.directions(d, seed, h), d);
        for v in phi.iter_mut() {
            *v = norm * v.exp();
        }
        phi
    }

    /// Number of features per row (`m`, or `2m` for the hyperbolic map).
    fn width(&self) -> usize {
        match self.kernel {
            Kernel::Positive => self.features,
            Kernel::Hyperbolic => 2 * self.features,
        }
    }

    /// Log-features `ω·x − ‖x‖²/2` (both signs for the hyperbolic map) of the rows `x`
    /// (already scaled by `s^{1/2}`), `rows × width`.
    fn log_features(&self, x: &[f32], w: &[f32], d: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; x.len() / d * self.width()];
        self.log_features_into(x, w, d, &mut out);
        out
    }

    /// [`Self::log_features`] into `out` (`rows × width`, overwritten).
    fn log_features_into(&self, x: &[f32], w: &[f32], d: usize, out: &mut [f32]) {
        let (m, width) = (self.features, self.width());
        let rows = x.len() / d;
        // The projections land in the first m columns; the hyperbolic map mirrors them.
        matmul(
            MatMut::strided(out, rows, m, width),
            false,
            MatRef::new(x, rows, d),
            MatRef::new(w, m, d).t(),
            1.0,
        );
        for (o, xr) in out.chunks_exact_mut(width).zip(x.chunks_exact(d)) {
            let half_sq = 0.5 * dot(xr, xr);
            if self.kernel == Kernel::Hyperbolic {
                let (pos, neg) = o.split_at_mut(m);
                for (nv, pv) in neg.iter_mut().zip(pos.iter()) {
                    *nv = -pv - half_sq;
                }
            }
            for ov in o[..m].iter_mut() {
                *ov -= half_sq;
            }
        }
    }

    /// One tile of scaled rows `x` (`rows × d`) into features `φ` (`rows × width`): with
    /// `shift = Some(s)` every kept row is `e^(log φ − s)` and masked rows are 0; with `None`
    /// each row is shifted by its own maximum (queries). `w` holds the head's directions.
    fn tile_features(
        &self,
        src: &[f32],
        w: &[f32],
        xs: &mut [f32],
        phi: &mut [f32],
        shift: Option<f32>,
        kept: impl Fn(usize) -> bool,
    ) {
        let width = self.width();
        let d = src.len() / (phi.len() / width);
        let root = resolve_scale(self.scale, d).sqrt();
        crate::linalg::scaled_copy(xs, src, root);
        self.log_features_into(xs, w, d, phi);
        for (j, row) in phi.chunks_exact_mut(width).enumerate() {
            match shift {
                _ if !kept(j) => row.fill(0.0),
                Some(s) => {
                    exp_shifted_sum(row, s);
                }
                None => {
                    let m = row_max(row);
                    exp_shifted_sum(row, m);
                }
            }
        }
    }

    /// The key statistics of one head, `(φ(K)ᵀ V, φ(K)ᵀ 1, shift)`, streamed over tiles of
    /// [`TILE`] keys so that no `n × width` feature matrix is formed. The keys' shift is an
    /// online maximum: when a tile raises it, the sums so far are rescaled by `e^(old − new)`,
    /// so the result equals one shift by the maximum over all kept keys (which cancels in every
    /// ratio). The `1/√width` normalisation cancels too and is left out.
    fn key_stats(&self, x: &AttentionInputs<'_>, bh: usize, w: &[f32]) -> KeyStats {
        let Dims {
            heads, n_k, d, d_v, ..
        } = x.dims();
        let width = self.width();
        let root = resolve_scale(self.scale, d).sqrt();
        let keep = x.key_mask_row(bh / heads);
        let (kh, vh) = (x.k_head(bh), x.v_head(bh));
        let mut xs = vec![0.0f32; TILE * d];
        let mut phi = vec![0.0f32; TILE * width];
        let mut st = KeyStats {
            kv: vec![0.0f32; width * d_v],
            ksum: vec![0.0f32; width],
            shift: f32::NEG_INFINITY,
        };
        for start in (0..n_k).step_by(TILE) {
            let rows = TILE.min(n_k - start);
            let kept = |j: usize| keep.is_none_or(|m| m[start + j]);
            let (xs, phi) = (&mut xs[..rows * d], &mut phi[..rows * width]);
            crate::linalg::scaled_copy(xs, &kh[start * d..(start + rows) * d], root);
            self.log_features_into(xs, w, d, phi);
            let tile_max = phi
                .chunks_exact(width)
                .enumerate()
                .filter(|(j, _)| kept(*j))
                .map(|(_, r)| row_max(r))
                .fold(f32::NEG_INFINITY, f32::max);
            if tile_max == f32::NEG_INFINITY {
                continue;
            }
            if tile_max > st.shift {
                if st.shift > f32::NEG_INFINITY {
                    let f = (st.shift - tile_max).exp();
                    st.kv
                        .iter_mut()
                        .chain(st.ksum.iter_mut())
                        .for_each(|v| *v *= f);
                }
                st.shift = tile_max;
            }
            for (j, row) in phi.chunks_exact_mut(width).enumerate() {
                if kept(j) {
                    exp_shifted_sum(row, st.shift);
                    for (a, b) in st.ksum.iter_mut().zip(row.iter()) {
                        *a += *b;
                    }
                } else {
                    row.fill(0.0);
                }
            }
            matmul(
                MatMut::new(&mut st.kv, width, d_v),
                true,
                MatRef::new(phi, rows, width).t(),
                MatRef::new(&vh[start * d_v..(start + rows) * d_v], rows, d_v),
                1.0,
            );
        }
        st
    }

    /// Output rows of one query tile from its features `phi` (each row under its own shift):
    /// `out = φ KV / (φ · ksum)`, 0 where the denominator underflows. Returns the denominators.
    fn tile_output(&self, phi: &[f32], st: &KeyStats, d_v: usize, out: &mut [f32]) -> Vec<f32> {
        let width = self.width();
        let rows = phi.len() / width;
        matmul(
            MatMut::new(out, rows, d_v),
            false,
            MatRef::new(phi, rows, width),
            MatRef::new(&st.kv, width, d_v),
            1.0,
        );
        let mut dens = Vec::with_capacity(rows);
        for (orow, prow) in out.chunks_exact_mut(d_v).zip(phi.chunks_exact(width)) {
            let den = dot(prow, &st.ksum);
            if den > 0.0 {
                let inv = 1.0 / den;
                orow.iter_mut().for_each(|v| *v *= inv);
            } else {
                orow.fill(0.0);
            }
            dens.push(den);
        }
        dens
    }

    /// The forward of one head: key statistics, then query tiles (time linear in n, working set
    /// in cache).
    fn head_forward(&self, x: &AttentionInputs<'_>, bh: usize, w: &[f32], out: &mut [f32]) {
        let Dims { n_q, d, d_v, .. } = x.dims();
        let width = self.width();
        let st = self.key_stats(x, bh, w);
        let qh = x.q_head(bh);
        let mut xs = vec![0.0f32; TILE * d];
        let mut phi = vec![0.0f32; TILE * width];
        for start in (0..n_q).step_by(TILE) {
            let rows = TILE.min(n_q - start);
            let (xs, phi) = (&mut xs[..rows * d], &mut phi[..rows * width]);
            let src = &qh[start * d..(start + rows) * d];
            self.tile_features(src, w, xs, phi, None, |_| true);
            self.tile_output(phi, &st, d_v, &mut out[start * d_v..(start + rows) * d_v]);
        }
    }

    /// The backward of one head, streamed like the forward: key statistics; query tiles (which
    /// give dQ and accumulate `d(KV)`, `d(ksum)`); key tiles (which give dK and dV). `g` is the
    /// head's output gradient with masked query rows zeroed.
    fn head_backward(
        &self,
        x: &AttentionInputs<'_>,
        bh: usize,
        w: &[f32],
        g: &[f32],
        grads: HeadGrads<'_>,
    ) {
        let HeadGrads { dq, dk, dv } = grads;
        let Dims {
            heads,
            n_q,
            n_k,
            d,
            d_v,
            ..
        } = x.dims();
        let width = self.width();
        let root = resolve_scale(self.scale, d).sqrt();
        let st = self.key_stats(x, bh, w);
        let mut xs = vec![0.0f32; TILE * d];
        let mut phi = vec![0.0f32; TILE * width];
        let mut dphi = vec![0.0f32; TILE * width];
        let mut out = vec![0.0f32; TILE * d_v];
        let mut dnum = vec![0.0f32; TILE * d_v];
        let mut dkv = vec![0.0f32; width * d_v];
        let mut dksum = vec![0.0f32; width];
        let qh = x.q_head(bh);
        for start in (0..n_q).step_by(TILE) {
            let rows = TILE.min(n_q - start);
            let (xs, phi, dphi) = (
                &mut xs[..rows * d],
                &mut phi[..rows * width],
                &mut dphi[..rows * width],
            );
            let (out, dnum) = (&mut out[..rows * d_v], &mut dnum[..rows * d_v]);
            let src = &qh[start * d..(start + rows) * d];
            self.tile_features(src, w, xs, phi, None, |_| true);
            let dens = self.tile_output(phi, &st, d_v, out);
            // out = num / den: dnum = G / den, dden = −(G·out) / den.
            let gt = &g[start * d_v..(start + rows) * d_v];
            let mut dden = vec![0.0f32; rows];
            for (((dn, dd), (gr, or)), &den) in dnum
                .chunks_exact_mut(d_v)
                .zip(dden.iter_mut())
                .zip(gt.chunks_exact(d_v).zip(out.chunks_exact(d_v)))
                .zip(&dens)
            {
                if den > 0.0 {
                    let inv = 1.0 / den;
                    for (a, b) in dn.iter_mut().zip(gr) {
                        *a = b * inv;
                    }
                    *dd = -dot(gr, or) * inv;
                } else {
                    dn.fill(0.0);
                }
            }
            // num = φ(Q) KV, den = φ(Q) ksum.
            matmul(
                MatMut::new(dphi, rows, width),
                false,
                MatRef::new(dnum, rows, d_v),
                MatRef::new(&st.kv, width, d_v).t(),
                1.0,
            );
            for (row, dd) in dphi.chunks_exact_mut(width).zip(&dden) {
                for (a, k) in row.iter_mut().zip(&st.ksum) {
                    *a += dd * k;
                }
            }
            matmul(
                MatMut::new(&mut dkv, width, d_v),
                true,
                MatRef::new(phi, rows, width).t(),
                MatRef::new(dnum, rows, d_v),
                1.0,
            );
            for (row, dd) in phi.chunks_exact(width).zip(&dden) {
                for (a, p) in dksum.iter_mut().zip(row) {
                    *a += dd * p;
                }
            }
            let dx = feature_backward(self, dphi, phi, xs, w, d);
            crate::linalg::scaled_copy(&mut dq[start * d..(start + rows) * d], &dx, root);
        }
        // KV = φ(K)ᵀ V, ksum = φ(K)ᵀ 1; masked keys have zero features, hence zero dK and dV.
        let keep = x.key_mask_row(bh / heads);
        let (kh, vh) = (x.k_head(bh), x.v_head(bh));
        for start in (0..n_k).step_by(TILE) {
            let rows = TILE.min(n_k - start);
            let (xs, phi, dphi) = (
                &mut xs[..rows * d],
                &mut phi[..rows * width],
                &mut dphi[..rows * width],
            );
            let src = &kh[start * d..(start + rows) * d];
            let kept = |j: usize| keep.is_none_or(|m| m[start + j]);
            self.tile_features(src, w, xs, phi, Some(st.shift), kept);
            matmul(
                MatMut::new(&mut dv[start * d_v..(start + rows) * d_v], rows, d_v),
                false,
                MatRef::new(phi, rows, width),
                MatRef::new(&dkv, width, d_v),
                1.0,
            );
            matmul(
                MatMut::new(dphi, rows, width),
                false,
                MatRef::new(&vh[start * d_v..(start + rows) * d_v], rows, d_v),
                MatRef::new(&dkv, width, d_v).t(),
                1.0,
            );
            for row in dphi.chunks_exact_mut(width) {
                for (a, s) in row.iter_mut().zip(&dksum) {
                    *a += s;
                }
            }
            let dx = feature_backward(self, dphi, phi, xs, w, d);
            crate::linalg::scaled_copy(&mut dk[start * d..(start + rows) * d], &dx, root);
        }
    }

    fn all_directions(&self, dims: Dims, seed: u64) -> Vec<Vec<f32>> {
        (0..dims.heads)
            .into_par_iter()
            .map(|h| self.directions(dims.d, seed, h))
            .collect()
    }
}

/// Rows per tile of the streamed forward and backward: a tile's features stay in cache.
const TILE: usize = 256;

/// Key statistics of one head under one common shift.
struct KeyStats {
    /// `φ(K)ᵀ V` (`width × d_v`).
    kv: Vec<f32>,
    /// `φ(K)ᵀ 1` (`width`).
    ksum: Vec<f32>,
    /// The shift of every key feature (the maximum log-feature over kept keys; `−∞` when every
    /// key is masked).
    shift: f32,
}

/// `dx = Σ_i dφ_i φ_i (±ω_i − x)` for every row: the gradient of the (stabilised) features with
/// respect to their scaled inputs, the shifts held constant (they cancel in the output).
fn feature_backward(
    p: &Performer,
    dphi: &[f32],
    phi: &[f32],
    x: &[f32],
    w: &[f32],
    d: usize,
) -> Vec<f32> {
    let (m, width) = (p.features, p.width());
    let rows = x.len() / d;
    // a = dφ ⊙ φ, folded to m columns with the sign of ω (hyperbolic: a⁺ − a⁻).
    let mut a = vec![0.0f32; rows * m];
    let mut total = vec![0.0f32; rows];
    for (((ar, t), dr), fr) in a
        .chunks_exact_mut(m)
        .zip(total.iter_mut())
        .zip(dphi.chunks_exact(width))
        .zip(phi.chunks_exact(width))
    {
        // The products elementwise, their sum by `dot` (SIMD lanes; a running sum here was one
        // long dependency chain, a sixth of a training step at n = 2048).
        for ((av, dv), fv) in ar.iter_mut().zip(&dr[..m]).zip(&fr[..m]) {
            *av = dv * fv;
        }
        *t = dot(&dr[..m], &fr[..m]);
        if p.kernel == Kernel::Hyperbolic {
            for ((av, dv), fv) in ar.iter_mut().zip(&dr[m..]).zip(&fr[m..]) {
                *av -= dv * fv;
            }
            *t += dot(&dr[m..], &fr[m..]);
        }
    }
    let mut dx = product(MatRef::new(&a, rows, m), MatRef::new(w, m, d), 1.0);
    for ((dr, xr), t) in dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(&total) {
        for (dv, xv) in dr.iter_mut().zip(xr) {
            *dv -= t * xv;
        }
    }
    dx
}

impl Estimator for Performer {
    const INFO: MethodInfo = MethodInfo {
        budget: Some("features"),
        random: true,
        ..MethodInfo::new(
            "performer",
            "Performer FAVOR+: positive (orthogonal) random features, linear attention",
            "O(n m (d + d_v)) time, O(n m) memory",
        )
    };
    type Saved = PerformerSaved;

    fn memory(&self, s: &Sizes) -> Memory {
        let (t, m) = (TILE as u128, self.features as u128);
        let w = self.width() as u128;
        // Directions of every head; Gram–Schmidt keeps a d × d f64 basis per head being drawn.
        let dirs = s.heads * m * s.d
            + if self.orthogonal {
                s.threads * 2 * s.d * s.d
            } else {
                0
            };
        let stats = t * s.d + t * w + w * s.d_v + w;
        let forward = s.o() + dirs + s.threads * (stats + t * s.d + t * w + t);
        // The backward streams key statistics again, then query tiles with their gradients
        // and the feature backward's products.
        let head = stats + t * (s.d + 2 * w + 2 * s.d_v) + 2 * (w * s.d_v + w) + t * (m + s.d + 2);
        let backward = s.o() + s.grads() + dirs + s.threads * head;
        Memory::from_values(s, forward, s.o() + backward)
    }

    fn saved_bytes(saved: &PerformerSaved) -> usize {
        4 * saved.directions.iter().map(Vec::len).sum::<usize>()
    }

    fn forward_saved(
        &self,
        x: &AttentionInputs<'_>,
        seed: u64,
    ) -> Result<(Vec<f32>, PerformerSaved)> {
        let dims = x.dims();
        let Dims {
            heads, n_q, d_v, ..
        } = dims;
        let dirs = self.all_directions(dims, seed);
        let mut output = crate::linalg::par_zeroed(dims.out_len());
        output
            .par_chunks_mut(n_q * d_v)
            .enumerate()
            .for_each(|(bh, out)| self.head_forward(x, bh, &dirs[bh % heads], out));
        x.zero_masked_queries(&mut output);
        Ok((output, PerformerSaved { directions: dirs }))
    }

    fn backward_saved(
        &self,
        x: &AttentionInputs<'_>,
        _seed: u64,
        saved: &PerformerSaved,
        grad_output: &[f32],
    ) -> Result<Grads> {
        let dims = x.dims();
        let Dims {
            heads, n_q, d, d_v, ..
        } = dims;
        let dirs = &saved.directions;
        if dirs.len() != heads || dirs.iter().any(|h| h.len() != self.features * d) {
            return Err(Error::Saved {
                message: format!(
                    "holds directions for other sizes than {heads} heads of {} × {d}",
                    self.features
                ),
            });
        }
        let g = x.without_masked_queries(grad_output);
        let mut grads = Grads::zeros(x);
        grads.par_heads(dims).enumerate().for_each(|(bh, hg)| {
            let gh = &g[bh * n_q * d_v..(bh + 1) * n_q * d_v];
            self.head_backward(x, bh, &dirs[bh % heads], gh, hg);
        });
        Ok(grads)
    }
}
