//! LARA: linear randomized attention with multiple shared proposals.
//!
//! Zheng, Wang, Kong, *Linear Complexity Randomized Self-attention Mechanism*, ICML 2022
//! (arXiv 2204.04667). Brief: `shared/papers/lara.md` §4.
//!
//! # The estimator
//!
//! In scaled coordinates `x_n = s^{1/2} q_n`, `y_m = s^{1/2} k_m`, LARA draws one sample from each
//! of `C` Gaussian proposals `N(μ_c, I)` — `μ_c = q̃_c + k̃_c`, the means of `C` contiguous
//! segments of the unmasked queries and keys (uneven segments as in the brief: the first
//! `(s+1)C − n` have `s = ⌊n/C⌋` tokens, the rest `s+1`; with `n ≤ C` every token is a landmark) —
//! shares the samples `ω_c` among all queries, and combines them by self-normalised multiple
//! importance sampling, everything in log space:
//!
//! ```text
//! F_c = softmax_m(ω_c·y_m − ½‖y_m‖²) V ,   z_c = LSE_m(ω_c·y_m − ½‖y_m‖²)
//! ℓ_nc = log α_nc + ω_c·x_n + z_c − (ω_c·μ_c − ½‖μ_c‖²) ,   out_n = Σ_c softmax_c(ℓ_n·)_c F_c
//! α_nc = BH_c + λ (r_nc − mean_c r_nc),   BH_c = softmax_c'(ω_c·μ_c' − ½‖μ_c'‖²)_c ,
//! r_nc = softmax_n(q̃_c·x_n)   (over the unmasked queries)
//! ```
//!
//! with `α` clamped to `≥ 1e-8` before the log, as in the released code (`mis-opt`, the default,
//! `λ = 1`). `eval=true` uses `ω_c = μ_c` (deterministic); `antithetic=true` adds `μ_c − ε_c` to
//! every `μ_c + ε_c` (2C samples, each weighted half). Cost `O(C·(n_q + n_k)·d + C²·d)` time and
//! `O(C·n)` memory: no `n × n` buffer.
//!
//! Proposal means can be given (`[heads, C, d]`, scaled coordinates; then they also stand in for
//! `q̃` in `r`), so a model can learn them: the backward returns their gradient as the parameter
//! `proposal_means`.
//!
//! # Masks, randomness, backward, and where we differ from the reference
//!
//! Masked keys get `−∞` logits and are left out of the key landmarks; masked queries output 0 and
//! are left out of the query landmarks and of the softmax over queries in `r` (the reference keeps
//! padded queries there and zeroed pads in the segment means). The noise of head `(b, h)` comes
//! from `rng::stream(seed, b, h, "lara/noise")`; the backward redraws it from the seed and
//! differentiates the computed function exactly (a clamped `α` passes no gradient). The noise
//! variance is the paper's unit variance in scaled coordinates (see `ra` for the code's
//! narrower convention).

use rand::Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::estimator::{Estimator, Grads, MethodInfo, ParamGrad, TensorParam};
use crate::inputs::{AttentionInputs, Dims, check_finite};
use crate::linalg::{exp_shifted_sum, row_max, softmax_row};
use crate::matrix::{MatMut, MatRef, matmul, product, product_into};
use crate::memory::{Memory, Sizes};
use crate::params::{Auto, finite, in_range, param_error, resolve_scale, scale_rule};
use crate::rng::stream;
use crate::segments::{Larger, segment_means, segments};

mod backward;

/// Largest number of proposals accepted.
pub const MAX_PROPOSALS: usize = 4096;
/// Lower clamp of the MIS weights before the log (the released code's).
pub const ALPHA_MIN: f32 = 1e-8;

crate::method_params! {
    /// LARA `lara`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Lara {
        /// number of proposals C (one sample each)
        pub proposals: usize = 64,
            in_range(1, MAX_PROPOSALS as u64).note("capped by the unmasked tokens");
        /// weight of the query-softmax correction in the MIS weights
        pub lambda: f32 = 1.0, finite();
        /// antithetic samples mu +- eps (2C samples)
        pub antithetic: bool = false;
        /// evaluation mode: omega = mu (deterministic)
        pub eval: bool = false;
        /// softmax temperature s in softmax(s * Q K^T)
        pub scale: Auto<f32> = Auto::Auto, scale_rule();
    }
    extra {
        /// Given proposal means `[heads, C, d]` (scaled coordinates); `None` = segment means.
        pub proposal_means: Option<Vec<f32>> = None;
    }
}

/// What a LARA forward keeps for its backward: per head, its `O(C·d + n)` results — the samples
/// and means, `F`, `L`, `BH`, and the normalisers of its three softmaxes — from which the
/// backward rebuilds the `O(C·n)` matrices (two products and one pass each, no reductions, the
/// same operations as the forward, so the same bits) instead of running the forward again.
#[derive(Debug)]
pub struct LaraSaved {
    heads: Vec<Option<Small>>,
}

/// One head's small results (see [`LaraSaved`]).
#[derive(Debug)]
struct Small {
    /// Proposals `c_eff`, repetitions per proposal (samples `j_n = c·reps`).
    c: usize,
    reps: usize,
    /// Landmark segments (empty with given means).
    q_idx: Vec<u32>,
    k_idx: Vec<u32>,
    q_segs: Vec<std::ops::Range<usize>>,
    k_segs: Vec<std::ops::Range<usize>>,
    /// `μ`, `c × d`.
    mu: Vec<f32>,
    /// The samples `ω` (`j × d`) stacked on `q̃` (or the given means, `c × d`): the right
    /// factor of the one GEMM over the queries, `x [ω; q̃]ᵀ`.
    stacked: Vec<f32>,
    /// `F` (`j × d_v`).
    f: Vec<f32>,
    /// `L = ω μᵀ − ½‖μ‖²`, `j × c`; `BH` (`j`); `z_j − own_j` (`j`).
    l: Vec<f32>,
    bh: Vec<f32>,
    z_own: Vec<f32>,
    /// The key softmaxes' row maxima and inverse sums (`j` each).
    key_norm: Norms,
    /// The query softmaxes' column maxima and inverse sums (`c` each), and each query row's
    /// maximum and inverse total of `W` (`n_q` each).
    col_norm: Norms,
    row_norm: Norms,
}

/// Maxima and inverse sums of a set of softmaxes.
#[derive(Debug, Default)]
struct Norms {
    max: Vec<f32>,
    inv: Vec<f32>,
}

/// One head's forward as the backward needs it: the small results and the `O(C·n)` matrices.
struct Head<'a> {
    s: &'a Small,
    /// Scaled queries and keys, `n_q × d`, `n_k × d`.
    x: Vec<f32>,
    y: Vec<f32>,
    /// Key softmaxes `softmax_m(A_k)`, `j × n_k`.
    pk: Vec<f32>,
    /// One row per query, `j + c` wide: `W = softmax_j(ℓ)` in the first `j` columns, `r_nc` in
    /// the last `c` (zero for masked queries).
    wr: Vec<f32>,
    /// `mean_c r_nc` (`n_q`).
    r_mean: Vec<f32>,
    /// Kept queries.
    query_kept: Vec<bool>,
}

/// The backward reads the small results through the head (`h.f`, `h.mu`, ...).
impl std::ops::Deref for Head<'_> {
    type Target = Small;
    fn deref(&self) -> &Small {
        self.s
    }
}

impl Small {
    fn bytes(&self) -> usize {
        let floats = self.mu.len()
            + self.stacked.len()
            + self.f.len()
            + self.l.len()
            + self.bh.len()
            + self.z_own.len()
            + 2 * (self.key_norm.max.len() + self.col_norm.max.len() + self.row_norm.max.len());
        let ranges = self.q_segs.len() + self.k_segs.len();
        4 * (floats + self.q_idx.len() + self.k_idx.len())
            + ranges * std::mem::size_of::<std::ops::Range<usize>>()
    }
    fn j_n(&self) -> usize {
        self.c * self.reps
    }
    fn d(&self) -> usize {
        self.mu.len() / self.c
    }
    fn omega(&self) -> &[f32] {
        &self.stacked[..self.j_n() * self.d()]
    }
}

/// `α_j = (BH_j + λ (r_{c(j)} − mean_c r_c)) / reps` for one query row (`c(j) = j / reps`),
/// `lambda_reps = λ / reps`; inlined into the vectorised callers.
#[inline(always)]
fn alpha_row_inline(
    bh: &[f32],
    r: &[f32],
    r_mean: f32,
    lambda_reps: f32,
    reps: usize,
    alpha: &mut [f32],
) {
    {
        let inv_reps = 1.0 / reps as f32;
        if reps == 1 {
            for ((a, b), rv) in alpha.iter_mut().zip(bh).zip(r) {
                *a = b * inv_reps + lambda_reps * (rv - r_mean);
            }
        } else {
            for (j, (a, b)) in alpha.iter_mut().zip(bh).enumerate() {
                *a = b * inv_reps + lambda_reps * (r[j / reps] - r_mean);
            }
        }
    }
}

/// What every query row's weights share: `BH`, `z − own`, `λ / reps`, `1 / c` and `reps`.
struct RowShared<'a> {
    bh: &'a [f32],
    z_own: &'a [f32],
    lambda_reps: f32,
    inv_c: f32,
    reps: usize,
}

/// One query row's `mean_c r` and `W` (see [`weight_rows`]), from `s = ω·x` in `w` and the
/// normalised `r`; with `norm`, the row's maximum and inverse total that the forward recorded,
/// the same values without the two reductions. Returns the mean, the maximum and the inverse
/// total. Inlined into the vectorised callers.
#[inline(always)]
fn weight_row(
    w: &mut [f32],
    r: &[f32],
    p: &RowShared<'_>,
    alpha: &mut [f32],
    norm: Option<(f32, f32)>,
) -> (f32, f32, f32) {
    // Loops without reductions, and reductions with partial sums, so that each vectorises (a
    // float sum in a loop keeps the whole loop scalar).
    let mean = crate::linalg::sum_lanes(r) * p.inv_c;
    alpha_row_inline(p.bh, r, mean, p.lambda_reps, p.reps, alpha);
    // softmax_j(log α_j + s_j) = α_j e^{s_j − max s} / Σ: no logarithm needed. The largest s
    // keeps a term of at least α_min, so the sum stays a normal float.
    for (wv, zo) in w.iter_mut().zip(p.z_own) {
        *wv += zo;
    }
    let max = norm.map_or_else(|| crate::linalg::max_lanes(w), |n| n.0);
    unnormalised_weights(w, alpha, max);
    let inv_total = norm.map_or_else(|| 1.0 / crate::linalg::sum_lanes(w), |n| n.1);
    for v in w.iter_mut() {
        *v *= inv_total;
    }
    (mean, max, inv_total)
}

/// `w_j ← max(α_j, α_min)·e^{w_j − max}`: a row of `W` before its normalisation.
#[inline(always)]
fn unnormalised_weights(w: &mut [f32], alpha: &[f32], max: f32) {
    for (v, a) in w.iter_mut().zip(alpha) {
        *v = a.max(ALPHA_MIN) * crate::linalg::exp_approx(*v - max);
    }
}

/// Query rows [`weight_block`] takes at once.
const BLOCK: usize = 16;

/// The rest of [`crate::linalg::sum_lanes`] for up to [`BLOCK`] rows at once: each row's
/// partial sums added in lane order from the empty sum, then its remainder's sum — one row's
/// additions wait on each other, the rows' do not.
#[inline(always)]
fn finish_sums(parts: &[[f32; 16]; BLOCK], rests: &[f32; BLOCK], out: &mut [f32; BLOCK]) {
    let empty: f32 = std::iter::empty::<f32>().sum();
    let mut total = [empty; BLOCK];
    for lane in 0..16 {
        for (t, p) in total.iter_mut().zip(parts) {
            *t += p[lane];
        }
    }
    for ((o, t), r) in out.iter_mut().zip(&total).zip(rests) {
        *o = t + r;
    }
}

/// [`weight_row`] (without known normalisers) for a block of up to [`BLOCK`] query rows — `w`
/// their `j`-wide rows of `ω·x`, `r` their `c`-wide rows of the query softmax before its
/// scaling — after scaling each row's `r` by the query softmax's inverse sums `inv`: the same
/// operations on the same values per row (so the same bits), in three passes over the block —
/// partial sums of `r` and the maxima of `w`, then `W`'s unnormalised entries and their partial
/// sums, then the scaling — so that the rows' horizontal sums run side by side instead of one
/// after another.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn weight_block(
    w: &mut [f32],
    r: &mut [f32],
    inv: &[f32],
    p: &RowShared<'_>,
    alpha: &mut [f32],
    means: &mut [f32],
    maxes: &mut [f32],
    invs: &mut [f32],
) {
    let (j_n, c) = (p.bh.len(), inv.len());
    let mut parts = [[0.0f32; 16]; BLOCK];
    let mut rests = [0.0f32; BLOCK];
    let mut sums = [0.0f32; BLOCK];
    for (k, (w, r)) in w
        .chunks_exact_mut(j_n)
        .zip(r.chunks_exact_mut(c))
        .enumerate()
    {
        for (v, i) in r.iter_mut().zip(inv) {
            *v *= i;
        }
        (parts[k], rests[k]) = crate::linalg::lane_partials(r);
        for (wv, zo) in w.iter_mut().zip(p.z_own) {
            *wv += zo;
        }
        maxes[k] = crate::linalg::max_lanes(w);
    }
    finish_sums(&parts, &rests, &mut sums);
    for (m, s) in means.iter_mut().zip(&sums) {
        *m = s * p.inv_c;
    }
    for (k, (w, r)) in w.chunks_exact_mut(j_n).zip(r.chunks_exact(c)).enumerate() {
        alpha_row_inline(p.bh, r, means[k], p.lambda_reps, p.reps, alpha);
        unnormalised_weights(w, alpha, maxes[k]);
        (parts[k], rests[k]) = crate::linalg::lane_partials(w);
    }
    finish_sums(&parts, &rests, &mut sums);
    for (i, s) in invs.iter_mut().zip(&sums) {
        *i = 1.0 / s;
    }
    for (w, i) in w.chunks_exact_mut(j_n).zip(invs.iter()) {
        for v in w {
            *v *= i;
        }
    }
}

/// Query rows the forward takes at once (a multiple of [`BLOCK`]): a chunk's `x ωᵀ` (64 KiB at
/// `j` = 64) becomes its rows of `W` and is multiplied by `F` while it is in cache, instead of
/// the whole `n_q × j` matrix going out to memory and being read back twice.
const QUERY_CHUNK: usize = 16 * BLOCK;

crate::linalg::multiversion! {
    /// The query softmax `r_c = softmax over kept queries of q̃_c·x`, in place over the
    /// `n_q × c` rows of `x q̃ᵀ` — its column statistics are vectors over `c` — left unscaled
    /// (`e^{a − max}`, zero for masked queries): returns the column maxima and inverse sums,
    /// which [`weight_rows`] applies.
    fn query_softmax(r: &mut [f32], query_kept: &[bool]) -> Norms {
        let c = r.len() / query_kept.len();
        let mut col_max = vec![f32::NEG_INFINITY; c];
        for (row, _) in r.chunks_exact(c).zip(query_kept).filter(|(_, k)| **k) {
            for (m, v) in col_max.iter_mut().zip(row) {
                *m = m.max(*v);
            }
        }
        let mut col_sum = vec![0.0f32; c];
        for (row, kept) in r.chunks_exact_mut(c).zip(query_kept) {
            if *kept {
                for ((v, m), s) in row.iter_mut().zip(&col_max).zip(col_sum.iter_mut()) {
                    *v = crate::linalg::exp_approx(*v - m);
                    *s += *v;
                }
            } else {
                row.fill(0.0);
            }
        }
        let inv = col_sum.iter().map(|s| 1.0 / s).collect();
        Norms { max: col_max, inv }
    }
}

crate::linalg::multiversion! {
    /// The per-query part of LARA's forward for some query rows: `w` their rows of `ω·x`
    /// (`j` wide), `r` their rows of [`query_softmax`] (`c` wide, scaled here by `inv`); each
    /// row's `W = softmax_j(ℓ)` (from `mean_c r`),
    /// `ℓ_j = ω_j·x + log max(α_j, α_min) + z_j − own_j`, replaces `w`, computed without a
    /// logarithm as `max(α_j, α_min)·e^{s_j − max s}` normalised (`s_j = ω_j·x + z_j − own_j`).
    /// Each row's maximum and inverse total go to `maxes` and `invs` for [`query_rows_again`].
    fn weight_rows(
        w: &mut [f32],
        r: &mut [f32],
        inv: &[f32],
        shared: &RowShared<'_>,
        alpha: &mut [f32],
        maxes: &mut [f32],
        invs: &mut [f32],
    ) {
        let (j_n, c) = (shared.bh.len(), inv.len());
        let mut means = [0.0f32; BLOCK];
        for (((w, r), maxes), invs) in w
            .chunks_mut(j_n * BLOCK)
            .zip(r.chunks_mut(c * BLOCK))
            .zip(maxes.chunks_mut(BLOCK))
            .zip(invs.chunks_mut(BLOCK))
        {
            let means = &mut means[..maxes.len()];
            weight_block(w, r, inv, shared, alpha, means, maxes, invs);
        }
    }
}

crate::linalg::multiversion! {
    /// [`weight_rows`] again, for the backward, from the normalisers it recorded: one pass per
    /// row with the same operations on the same values (so the same bits), without the column
    /// maxima and the row reductions.
    fn query_rows_again(
        wr: &mut [f32],
        query_kept: &[bool],
        shared: &RowShared<'_>,
        r_mean: &mut [f32],
        col: &Norms,
        row_norm: &Norms,
    ) {
        let j_n = shared.bh.len();
        let mut alpha = vec![0.0f32; j_n];
        let width = wr.len() / query_kept.len();
        for ((((row, kept), mean), max), inv_total) in wr
            .chunks_exact_mut(width)
            .zip(query_kept)
            .zip(r_mean.iter_mut())
            .zip(&row_norm.max)
            .zip(&row_norm.inv)
        {
            let (w, r) = row.split_at_mut(j_n);
            if *kept {
                for ((v, m), i) in r.iter_mut().zip(&col.max).zip(&col.inv) {
                    *v = crate::linalg::exp_approx(*v - m) * i;
                }
            } else {
                r.fill(0.0);
            }
            *mean = weight_row(w, r, shared, &mut alpha, Some((*max, *inv_total))).0;
        }
    }
}

/// A head's scaled queries and keys, which queries are kept, and the key mask row.
struct Scaled<'x> {
    x: Vec<f32>,
    y: Vec<f32>,
    query_kept: Vec<bool>,
    keep: Option<&'x [bool]>,
}

impl Lara {
    fn scaled<'x>(&self, x: &'x AttentionInputs<'_>, bh: usize) -> Scaled<'x> {
        let Dims { heads, n_q, d, .. } = x.dims();
        let root = resolve_scale(self.scale, d).sqrt();
        Scaled {
            x: crate::linalg::scaled(x.q_head(bh), root),
            y: crate::linalg::scaled(x.k_head(bh), root),
            query_kept: (0..n_q).map(|i| x.query_kept(bh, i)).collect(),
            keep: x.key_mask_row(bh / heads),
        }
    }

    fn row_shared<'a>(
        &self,
        bh: &'a [f32],
        z_own: &'a [f32],
        c: usize,
        reps: usize,
    ) -> RowShared<'a> {
        RowShared {
            bh,
            z_own,
            lambda_reps: self.lambda / reps as f32,
            inv_c: 1.0 / c as f32,
            reps,
        }
    }

    /// One head's forward into `out` (`n_q × d_v`, every element written), and its small
    /// results; `None` (and `out` untouched) when every query or every key is masked.
    fn head(
        &self,
        x: &AttentionInputs<'_>,
        bh: usize,
        seed: u64,
        out: &mut [std::mem::MaybeUninit<f32>],
    ) -> Option<Small> {
        let Dims {
            heads,
            n_q,
            n_k,
            d,
            d_v,
            ..
        } = x.dims();
        let (b, h) = (bh / heads, bh % heads);
        let Scaled {
            x: xs,
            y: ys,
            query_kept,
            keep,
        } = self.scaled(x, bh);
        let q_idx: Vec<u32> = (0..n_q as u32)
            .filter(|&i| query_kept[i as usize])
            .collect();
        let k_idx: Vec<u32> = (0..n_k as u32)
            .filter(|&j| keep.is_none_or(|m| m[j as usize]))
            .collect();
        if q_idx.is_empty() || k_idx.is_empty() {
            return None;
        }
        let (c, q_segs, k_segs, q_land, mu) = match &self.proposal_means {
            Some(means) => {
                let c = self.proposals;
                let mu = means[h * c * d..(h + 1) * c * d].to_vec();
                (c, Vec::new(), Vec::new(), mu.clone(), mu)
            }
            None => {
                let c = self.proposals.min(q_idx.len()).min(k_idx.len());
                let q_segs = segments(q_idx.len(), c, Larger::Last);
                let k_segs = segments(k_idx.len(), c, Larger::Last);
                let q_land = segment_means(&xs, d, &q_idx, &q_segs);
                let k_land = segment_means(&ys, d, &k_idx, &k_segs);
                let mu: Vec<f32> = q_land.iter().zip(&k_land).map(|(a, b)| a + b).collect();
                (c, q_segs, k_segs, q_land, mu)
            }
        };
        // Samples ω_j = μ_{c(j)} ± ε_{c(j)}, stacked on q̃.
        let reps = if self.antithetic && !self.eval { 2 } else { 1 };
        let j_n = c * reps;
        let mut stacked = vec![0.0f32; (j_n + c) * d];
        let mut rng = stream(seed, b, h, "lara/noise");
        for cc in 0..c {
            let eps: Vec<f32> = (0..d)
                .map(|_| rng.sample::<f32, _>(StandardNormal))
                .collect();
            for rep in 0..reps {
                let sign = if self.eval {
                    0.0
                } else if rep == 0 {
                    1.0
                } else {
                    -1.0
                };
                let row = &mut stacked[(cc * reps + rep) * d..(cc * reps + rep + 1) * d];
                for ((o, m), e) in row.iter_mut().zip(&mu[cc * d..(cc + 1) * d]).zip(&eps) {
                    *o = m + sign * e;
                }
            }
        }
        stacked[j_n * d..].copy_from_slice(&q_land);
        let omega = &stacked[..j_n * d];
        let (pk, key_norm, z, f) = key_side(omega, &ys, keep, x.v_head(bh), d, d_v);
        drop((pk, ys));
        // L = ω μᵀ − ½‖μ‖², BH_j = softmax_c(L_j)[c(j)].
        let half_mu = half_squared_norms(&mu, d);
        let mut l = product(MatRef::new(omega, j_n, d), MatRef::new(&mu, c, d).t(), 1.0);
        let mut bh_w = vec![0.0f32; j_n];
        for (j, row) in l.chunks_exact_mut(c).enumerate() {
            for (a, hm) in row.iter_mut().zip(&half_mu) {
                *a -= hm;
            }
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|a| (a - max).exp()).sum();
            bh_w[j] = (row[j / reps] - max).exp() / sum;
        }
        let z_own: Vec<f32> = (0..j_n).map(|j| z[j] - l[j * c + j / reps]).collect();
        // The query side: r from x q̃ᵀ over every query (its softmax runs over them), then
        // chunks of query rows — x ωᵀ, W, and the chunk's rows of the output W F.
        let shared = self.row_shared(&bh_w, &z_own, c, reps);
        let q_tilde = MatRef::new(&stacked[j_n * d..], c, d);
        let mut r = product(MatRef::new(&xs, n_q, d), q_tilde.t(), 1.0);
        let col_norm = query_softmax(&mut r, &query_kept);
        let mut row_norm = Norms {
            max: vec![0.0; n_q],
            inv: vec![0.0; n_q],
        };
        let mut alpha = vec![0.0f32; j_n];
        let mut w = vec![0.0f32; QUERY_CHUNK.min(n_q) * j_n];
        let omega_t = MatRef::new(omega, j_n, d).t();
        for start in (0..n_q).step_by(QUERY_CHUNK) {
            let end = (start + QUERY_CHUNK).min(n_q);
            let w = &mut w[..(end - start) * j_n];
            let x_rows = MatRef::new(&xs[start * d..end * d], end - start, d);
            matmul(
                MatMut::new(w, end - start, j_n),
                false,
                x_rows,
                omega_t,
                1.0,
            );
            weight_rows(
                w,
                &mut r[start * c..end * c],
                &col_norm.inv,
                &shared,
                &mut alpha,
                &mut row_norm.max[start..end],
                &mut row_norm.inv[start..end],
            );
            product_into(
                &mut out[start * d_v..end * d_v],
                MatRef::new(w, end - start, j_n),
                MatRef::new(&f, j_n, d_v),
                1.0,
            );
        }
        let small = Small {
            c,
            reps,
            q_idx,
            k_idx,
            q_segs,
            k_segs,
            mu,
            stacked,
            f,
            l,
            bh: bh_w,
            z_own,
            key_norm,
            col_norm,
            row_norm,
        };
        Some(small)
    }

    /// The head's `O(C·n)` matrices again, from its small results, for the backward.
    fn rebuild<'s>(&self, x: &AttentionInputs<'_>, bh: usize, s: &'s Small) -> Head<'s> {
        let Dims { n_q, d, .. } = x.dims();
        let Scaled {
            x: xs,
            y: ys,
            query_kept,
            keep,
        } = self.scaled(x, bh);
        let (pk, _, _) = key_softmaxes(s.omega(), &ys, keep, d, Some(&s.key_norm));
        let mut wr = query_product(&xs, &s.stacked, n_q, d);
        let mut r_mean = vec![0.0f32; n_q];
        query_rows_again(
            &mut wr,
            &query_kept,
            &self.row_shared(&s.bh, &s.z_own, s.c, s.reps),
            &mut r_mean,
            &s.col_norm,
            &s.row_norm,
        );
        Head {
            s,
            x: xs,
            y: ys,
            pk,
            wr,
            r_mean,
            query_kept,
        }
    }
}

/// `x [ω; q̃]ᵀ` (`n_q × (j + c)`), for the backward's rebuild. The forward forms the same
/// entries in two products (`x q̃ᵀ`, then `x ωᵀ` chunk by chunk): each entry is the same
/// sum over `d` in the same order, so the same bits (checked by checksums of O, dQ, dK, dV).
fn query_product(xs: &[f32], stacked: &[f32], n_q: usize, d: usize) -> Vec<f32> {
    let width = stacked.len() / d;
    product(
        MatRef::new(xs, n_q, d),
        MatRef::new(stacked, width, d).t(),
        1.0,
    )
}

/// The key softmaxes shared by every sample `ω_j` (`j × d`, scaled coordinates):
/// `softmax_m(ω_j·y_m − ½‖y_m‖²)` (`j × n_k`, masked keys 0), their normalisers and
/// log-normalisers `z_j`; given the normalisers (`known`, from the forward), the same values
/// again without the reductions (and no `z`).
fn key_softmaxes(
    omega: &[f32],
    ys: &[f32],
    keep: Option<&[bool]>,
    d: usize,
    known: Option<&Norms>,
) -> (Vec<f32>, Norms, Vec<f32>) {
    let (j_n, n_k) = (omega.len() / d, ys.len() / d);
    let half_y = half_squared_norms(ys, d);
    let mut pk = product(MatRef::new(omega, j_n, d), MatRef::new(ys, n_k, d).t(), 1.0);
    let mut norms = Norms::default();
    let mut z = Vec::new();
    for (j, row) in pk.chunks_exact_mut(n_k).enumerate() {
        key_logits(row, &half_y, keep);
        let inv = match known {
            Some(k) => {
                exp_shifted_sum(row, k.max[j]);
                k.inv[j]
            }
            None => {
                let max = row_max(row);
                let sum = exp_shifted_sum(row, max);
                z.push(max + sum.ln());
                norms.max.push(max);
                norms.inv.push(1.0 / sum);
                1.0 / sum
            }
        };
        crate::linalg::scale_in_place(row, inv);
    }
    (pk, norms, z)
}

/// `½‖y_m‖²` of every `d`-wide row of `ys`, each row's squares added one after another in
/// coordinate order (the sum `Iterator::sum` forms), four rows at a time in four registers: one
/// row's additions wait on each other, several rows' do not.
fn half_squared_norms(ys: &[f32], d: usize) -> Vec<f32> {
    let d = d.max(1);
    let mut out = Vec::with_capacity(ys.len() / d);
    let mut blocks = ys.chunks_exact(4 * d);
    for block in &mut blocks {
        let (r0, rest) = block.split_at(d);
        let (r1, rest) = rest.split_at(d);
        let (r2, r3) = rest.split_at(d);
        let (mut a0, mut a1, mut a2, mut a3) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
        for (((v0, v1), v2), v3) in r0.iter().zip(r1).zip(r2).zip(r3) {
            a0 += v0 * v0;
            a1 += v1 * v1;
            a2 += v2 * v2;
            a3 += v3 * v3;
        }
        out.extend([0.5 * a0, 0.5 * a1, 0.5 * a2, 0.5 * a3]);
    }
    for row in blocks.remainder().chunks_exact(d) {
        let mut acc = 0.0f32;
        for v in row {
            acc += v * v;
        }
        out.push(0.5 * acc);
    }
    out
}

crate::linalg::multiversion! {
    /// One key softmax's logits from its row of `ω_j Yᵀ`: `a_m − ½‖y_m‖²`, `−∞` at masked keys
    /// (the unmasked case a loop of its own, so that it vectorises).
    fn key_logits(row: &mut [f32], half_y: &[f32], keep: Option<&[bool]>) {
        match keep {
            None => {
                for (a, h) in row.iter_mut().zip(half_y) {
                    *a -= h;
                }
            }
            Some(mask) => {
                for ((a, h), k) in row.iter_mut().zip(half_y).zip(mask) {
                    *a = if *k { *a - h } else { f32::NEG_INFINITY };
                }
            }
        }
    }
}

/// [`key_softmaxes`], and `F = softmax · V` (`j × d_v`).
fn key_side(
    omega: &[f32],
    ys: &[f32],
    keep: Option<&[bool]>,
    v: &[f32],
    d: usize,
    d_v: usize,
) -> (Vec<f32>, Norms, Vec<f32>, Vec<f32>) {
    let (pk, norms, z) = key_softmaxes(omega, ys, keep, d, None);
    let (j_n, n_k) = (omega.len() / d, ys.len() / d);
    let f = product(MatRef::new(&pk, j_n, n_k), MatRef::new(v, n_k, d_v), 1.0);
    (pk, norms, z, f)
}

impl Lara {
    /// The self-normalised multiple-importance-sampling estimator at the heart of RA and LARA,
    /// with samples and weights chosen by the caller:
    ///
    /// ```text
    /// out_n = Σ_j softmax_j(a_nj + ω_j·x_n + z_j) f(ω_j),
    /// f(ω) = softmax_m(ω·y_m − ½‖y_m‖²) V,   z_j = LSE_m(ω_j·y_m − ½‖y_m‖²)
    /// ```
    ///
    /// in scaled coordinates (`x = s^{1/2} q`, `y = s^{1/2} k`, `s` = this config's scale).
    /// `samples` are the `ω_j`, `[batch, heads, J, d]`; `log_weights` are
    /// `a_nj = log α_nj + log N(ω_j; 0, I) − log q_j(ω_j)` for proposals `q_j` and MIS weights
    /// `α` (constants in `j` cancel), `[batch, heads, n_q, J]`; `−∞` switches a sample off for a
    /// query. LARA is this with its Gaussian proposals, `a_nj = log α_nj − ω_j·μ_j + ½‖μ_j‖²`.
    /// The brief's special cases: RA (`J = n`, `ω_n` drawn from query `n`'s own mixture,
    /// `a_nj = 0` for `j = n` and `−∞` otherwise) and RFA, i.e. Performer's positive features
    /// (`q_j = N(0, I)`, constant `α`: `a` constant). Masked keys are left out; masked queries and
    /// queries with every weight `−∞` output 0.
    pub fn estimate_with_samples(
        &self,
        x: &AttentionInputs<'_>,
        samples: &[f32],
        log_weights: &[f32],
    ) -> Result<Vec<f32>> {
        self.validate()?;
        let dims = x.dims();
        let Dims {
            heads, n_q, d, d_v, ..
        } = dims;
        let bhs = dims.batch_heads();
        if samples.is_empty() || !samples.len().is_multiple_of(bhs * d) {
            return Err(Error::shape(
                "samples",
                format!(
                    "has {} values, not a positive multiple of batch·heads·d = {}",
                    samples.len(),
                    bhs * d
                ),
            ));
        }
        let j_n = samples.len() / (bhs * d);
        if log_weights.len() != bhs * n_q * j_n {
            return Err(Error::shape(
                "log_weights",
                format!(
                    "has {} values but [batch·heads, n_q, J] = [{bhs}, {n_q}, {j_n}] needs {}",
                    log_weights.len(),
                    bhs * n_q * j_n
                ),
            ));
        }
        check_finite("samples", samples)?;
        if let Some((index, &value)) = log_weights
            .iter()
            .enumerate()
            .find(|(_, a)| a.is_nan() || **a == f32::INFINITY)
        {
            return Err(Error::NonFinite {
                arg: "log_weights",
                index,
                value,
            });
        }
        let root = resolve_scale(self.scale, d).sqrt();
        let mut output = crate::linalg::par_zeroed(dims.out_len());
        output
            .par_chunks_mut(n_q * d_v)
            .enumerate()
            .for_each(|(bh, out)| {
                let keep = x.key_mask_row(bh / heads);
                if keep.is_some_and(|m| !m.contains(&true)) {
                    return;
                }
                let xs = crate::linalg::scaled(x.q_head(bh), root);
                let ys = crate::linalg::scaled(x.k_head(bh), root);
                let omega = &samples[bh * j_n * d..(bh + 1) * j_n * d];
                let (_, _, z, f) = key_side(omega, &ys, keep, x.v_head(bh), d, d_v);
                let mut w = product(
                    MatRef::new(&xs, n_q, d),
                    MatRef::new(omega, j_n, d).t(),
                    1.0,
                );
                let a = &log_weights[bh * n_q * j_n..(bh + 1) * n_q * j_n];
                for (wrow, arow) in w.chunks_exact_mut(j_n).zip(a.chunks_exact(j_n)) {
                    for ((wv, av), zv) in wrow.iter_mut().zip(arow).zip(&z) {
                        *wv += av + zv;
                    }
                    if wrow.iter().all(|v| *v == f32::NEG_INFINITY) {
                        wrow.fill(0.0);
                    } else {
                        softmax_row(wrow);
                    }
                }
                matmul(
                    MatMut::new(out, n_q, d_v),
                    false,
                    MatRef::new(&w, n_q, j_n),
                    MatRef::new(&f, j_n, d_v),
                    1.0,
                );
            });
        x.zero_masked_queries(&mut output);
        Ok(output)
    }
}

impl Estimator for Lara {
    const INFO: MethodInfo = MethodInfo {
        budget: Some("proposals"),
        random: true,
        tensor_params: &[TensorParam {
            name: "proposal_means",
            shape: "[heads, C, d]",
            rank: 3,
        }],
        ..MethodInfo::new(
            "lara",
            "LARA: shared Gaussian proposals at segment means, multiple importance sampling",
            "O(C (n_q + n_k) d + C^2 d) time, O(C n) memory",
        )
    };
    type Saved = LaraSaved;

    fn memory(&self, s: &Sizes) -> Memory {
        let c = self.proposals as u128;
        let j = c * if self.antithetic { 2 } else { 1 };
        // Per head: scaled queries and keys, the samples, proposal log-densities, query
        // responsibilities, the importance weights (n_q × J twice), key-side features and sums.
        let head = (s.n_q + s.n_k) * s.d
            + j * (s.d + c + s.n_k + s.d_v + 1)
            + c * s.n_q
            + s.n_q
            + 2 * s.n_q * j
            + 2 * c * s.d;
        let means = s.heads * c * s.d;
        // Kept for the backward, every head: μ, [ω; q̃], F, L, BH, z − own, the normalisers,
        // the kept indices and the segment ranges (16 bytes each).
        let small = c * s.d
            + (j + c) * s.d
            + j * (s.d_v + c + 2)
            + 2 * (j + c + s.n_q)
            + s.n_q
            + s.n_k
            + 8 * c;
        let saved = s.bh() * small;
        let forward = s.o() + means + saved + s.parallel_heads() * head;
        // Per head backward: the rebuilt matrices (bounded by the forward's head) and the
        // gradients' products (those of Q and K accumulate in the outputs).
        let back_head =
            head + j * (s.d + s.d_v + c + 2) + 4 * c * s.d + s.n_q * j + 4 * c * s.n_q + j * s.n_k;
        let given = if self.proposal_means.is_some() {
            s.bh() * c * s.d + means
        } else {
            0
        };
        let backward = s.o() + s.grads() + means + saved + given + s.parallel_heads() * back_head;
        Memory::from_values(s, forward, s.o() + backward)
    }

    fn check(&self) -> Result<()> {
        if let Some(m) = &self.proposal_means
            && m.iter().any(|v| !v.is_finite())
        {
            return Err(param_error(
                Self::INFO.name,
                "proposals",
                "finite given proposal means",
                "given proposal means with non-finite values".to_string(),
            ));
        }
        Ok(())
    }

    fn store_tensor(&mut self, _name: &str, data: Vec<f32>, shape: &[usize]) -> Result<()> {
        self.proposals = shape[1];
        self.proposal_means = Some(data);
        Ok(())
    }

    fn forward_saved(&self, x: &AttentionInputs<'_>, seed: u64) -> Result<(Vec<f32>, LaraSaved)> {
        let dims = x.dims();
        self.check_means(dims)?;
        let Dims { n_q, d_v, .. } = dims;
        let len = dims.out_len();
        // Every head's block is written once, by its last product (or zeroes): no zeroing first.
        let mut output: Vec<f32> = Vec::with_capacity(len);
        let heads = output.spare_capacity_mut()[..len]
            .par_chunks_mut(n_q * d_v)
            .enumerate()
            .map(|(bh, out)| {
                let small = self.head(x, bh, seed, out);
                if small.is_none() {
                    out.fill(std::mem::MaybeUninit::new(0.0));
                }
                small
            })
            .collect();
        // SAFETY: each of the `len / (n_q·d_v)` blocks above was filled, by zeroes or by
        // `product_into`, which writes every element.
        unsafe { output.set_len(len) };
        x.zero_masked_queries(&mut output);
        Ok((output, LaraSaved { heads }))
    }

    fn saved_bytes(saved: &LaraSaved) -> usize {
        saved.heads.iter().flatten().map(Small::bytes).sum()
    }

    fn backward_saved(
        &self,
        x: &AttentionInputs<'_>,
        _seed: u64,
        saved: &LaraSaved,
        grad_output: &[f32],
    ) -> Result<Grads> {
        let dims = x.dims();
        self.check_means(dims)?;
        let Dims {
            heads, n_q, d, d_v, ..
        } = dims;
        let root = resolve_scale(self.scale, d).sqrt();
        let g = x.without_masked_queries(grad_output);
        let bhs = dims.batch_heads();
        let mut grads = Grads::zeros(x);
        let c_given = self.proposal_means.as_ref().map(|_| self.proposals);
        let mut dmu_parts = vec![
            0.0f32;
            if c_given.is_some() {
                bhs * self.proposals * d
            } else {
                0
            }
        ];
        let mu_chunk = if c_given.is_some() {
            self.proposals * d
        } else {
            0
        };
        let dmu_iter: Vec<&mut [f32]> = if mu_chunk > 0 {
            dmu_parts.chunks_mut(mu_chunk).collect()
        } else {
            (0..bhs).map(|_| &mut [][..]).collect()
        };
        grads
            .par_heads(dims)
            .zip(dmu_iter.into_par_iter())
            .enumerate()
            .for_each(|(bh, (hg, dmu_out))| {
                if let Some(small) = &saved.heads[bh] {
                    let h = self.rebuild(x, bh, small);
                    let gh = &g[bh * n_q * d_v..(bh + 1) * n_q * d_v];
                    backward::head(&h, self.lambda, x.v_head(bh), gh, root, hg, dmu_out);
                }
            });
        if let Some(c) = c_given {
            let mut grad = vec![0.0f32; heads * c * d];
            for (bh, part) in dmu_parts.chunks_exact(c * d).enumerate() {
                let h = bh % heads;
                for (a, b) in grad[h * c * d..(h + 1) * c * d].iter_mut().zip(part) {
                    *a += *b;
                }
            }
            grads.params.push(ParamGrad {
                name: "proposal_means",
                shape: vec![heads, c, d],
                grad,
            });
        }
        Ok(grads)
    }
}

impl Lara {
    fn check_means(&self, dims: Dims) -> Result<()> {
        if let Some(m) = &self.proposal_means {
            let want = dims.heads * self.proposals * dims.d;
            if m.len() != want {
                return Err(Error::shape(
                    "proposal_means",
                    format!(
                        "has {} values but [heads, proposals, d] = [{}, {}, {}] needs {want}",
                        m.len(),
                        dims.heads,
                        self.proposals,
                        dims.d
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of query rows gets the bits that one row at a time gets: `W`, the scaled `r`, the
    /// means, maxima and inverse totals (a full block and a partial one, `reps` 1 and 2, rows of
    /// zeros as masked queries have, and a width with a remainder past the sixteen lanes); and
    /// [`weight_rows`] over several blocks gets the same `W`, maxima and inverse totals.
    #[test]
    fn weight_blocks_are_weight_rows() {
        for (rows, c, reps) in [(BLOCK, 64, 1), (BLOCK + 3, 64, 2), (5, 21, 1)] {
            let j_n = c * reps;
            let value = |i: usize, salt: usize| ((i * 7919 + salt) % 613) as f32 / 97.0 - 3.0;
            let w: Vec<f32> = (0..rows * j_n).map(|i| value(i, 1)).collect();
            let mut r: Vec<f32> = (0..rows * c).map(|i| value(i, 5)).collect();
            r[2 * c..3 * c].fill(0.0);
            let inv: Vec<f32> = (0..c).map(|i| 0.5 + value(i, 2).abs()).collect();
            let bh: Vec<f32> = (0..j_n).map(|i| value(i, 3).abs() / 7.0).collect();
            let z_own: Vec<f32> = (0..j_n).map(|i| value(i, 4)).collect();
            let shared = RowShared {
                bh: &bh,
                z_own: &z_own,
                lambda_reps: 0.7 / reps as f32,
                inv_c: 1.0 / c as f32,
                reps,
            };
            let mut alpha = vec![0.0f32; j_n];
            let (mut w_one, mut r_one) = (w.clone(), r.clone());
            let mut want = Vec::new();
            for (w, r) in w_one.chunks_exact_mut(j_n).zip(r_one.chunks_exact_mut(c)) {
                for (v, i) in r.iter_mut().zip(&inv) {
                    *v *= i;
                }
                want.push(weight_row(w, r, &shared, &mut alpha, None));
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let (mut w_block, mut r_block) = (w.clone(), r.clone());
            let (mut means, mut maxes, mut invs) =
                (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
            for ((((w, r), m), x), t) in w_block
                .chunks_mut(j_n * BLOCK)
                .zip(r_block.chunks_mut(c * BLOCK))
                .zip(means.chunks_mut(BLOCK))
                .zip(maxes.chunks_mut(BLOCK))
                .zip(invs.chunks_mut(BLOCK))
            {
                weight_block(w, r, &inv, &shared, &mut alpha, m, x, t);
            }
            assert_eq!(
                bits(&w_block),
                bits(&w_one),
                "{rows} rows, c = {c}, reps = {reps}"
            );
            assert_eq!(
                bits(&r_block),
                bits(&r_one),
                "{rows} rows, c = {c}, reps = {reps}"
            );
            for (k, (m, x, t)) in want.iter().enumerate() {
                assert_eq!(
                    [m.to_bits(), x.to_bits(), t.to_bits()],
                    [means[k].to_bits(), maxes[k].to_bits(), invs[k].to_bits()],
                    "row {k} of {rows}"
                );
            }
            let (mut w_rows, mut r_rows) = (w.clone(), r.clone());
            weight_rows(
                &mut w_rows,
                &mut r_rows,
                &inv,
                &shared,
                &mut alpha,
                &mut maxes,
                &mut invs,
            );
            assert_eq!(bits(&w_rows), bits(&w_one), "weight_rows, {rows} rows");
            for (k, (_, x, t)) in want.iter().enumerate() {
                assert_eq!(
                    [x.to_bits(), t.to_bits()],
                    [maxes[k].to_bits(), invs[k].to_bits()]
                );
            }
        }
    }

    /// Four rows at a time add each row's squares in the order one row alone does: the same bits
    /// as the iterator sum, for every row count (remainders included) and width.
    #[test]
    fn half_squared_norms_are_the_plain_sums() {
        for (rows, d) in [
            (0, 8),
            (1, 1),
            (3, 5),
            (4, 64),
            (7, 64),
            (13, 17),
            (64, 128),
        ] {
            let ys: Vec<f32> = (0..rows * d)
                .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
                .collect();
            let want: Vec<u32> = ys
                .chunks_exact(d)
                .map(|r| (0.5 * r.iter().map(|v| v * v).sum::<f32>()).to_bits())
                .collect();
            let got: Vec<u32> = half_squared_norms(&ys, d)
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(got, want, "{rows} rows of {d}");
        }
    }
}
