//! Exact softmax attention: the yardstick every estimator is measured against.
//!
//! `O = softmax(s · Q Kᵀ + M) V` with scale `s` (default `1/√d`) and `M_ij = −∞` for masked keys.
//! Rows whose query is masked, or that have no unmasked key, output zeros (never NaN).
//!
//! Two implementations:
//!
//! - [`ExactNaive`]: the obvious O(n²) reference, accumulating in f64, materialising each row of
//!   probabilities. It backs the tests of every fast kernel.
//! - [`Exact`]: the fast kernel, FlashAttention-style. Queries are split into blocks of
//!   [`QUERY_BLOCK`] rows, keys into tiles of [`KEY_TILE`]; each (batch, head, query block) is a
//!   rayon task that streams over the key tiles with an online softmax (running row maximum and
//!   denominator, rescaling the partial output when the maximum grows). Both products of a tile go
//!   through GEMM. Memory: inputs + output + one log-sum-exp per row + O(QUERY_BLOCK · KEY_TILE)
//!   scratch per thread — never an `n_q × n_k` matrix.
//!
//!   The backward pass (FlashAttention-2) recomputes each probability tile from the saved per-row
//!   log-sum-exp `L_i`: `P = exp(s·Q_i K_jᵀ − L_i)`, `dV_j += Pᵀ dO_i`, `dP = dO_i V_jᵀ`,
//!   `dS = P ∘ (dP − D_i)` with `D_i = rowsum(dO_i ∘ O_i)`, `dK_j += s·dSᵀ Q_i`,
//!   `dQ_i += s·dS K_j`. It is parallel over (batch, head, key chunk); when there are fewer heads
//!   than tasks, each key chunk accumulates dQ in its own buffer (O(n·d) scratch) and the chunks
//!   are summed in a fixed order, so results do not depend on the thread count.

use rayon::prelude::*;

use crate::error::Result;
use crate::estimator::{Estimator, Grads, MethodInfo};
use crate::inputs::{AttentionInputs, Dims};
use crate::linalg::{exp_shifted_sum, row_max, zeroed};
use crate::matrix::{MatMut, MatRef, matmul};
use crate::memory::{Memory, Sizes};
use crate::params::{Auto, resolve_scale, scale_rule};
pub use crate::tiles::{BACKWARD_KEY_TILE, BACKWARD_QUERY_BLOCK, KEY_TILE, QUERY_BLOCK};

/// The backward splits each head's keys into chunks until there are about this many tasks. A
/// constant rather than the thread count, so that the summation order (and thus every bit of dQ)
/// does not depend on the machine.
const BACKWARD_TASKS: usize = 16;

crate::method_params! {
    /// The obviously correct O(n²) reference: per query row, logits in f64, stable softmax,
    /// weighted sum of V rows. Forward and backward; O(n_k) scratch per row, O(n_q · n_k) in the
    /// backward.
    #[derive(Debug, Clone, PartialEq)]
    pub struct ExactNaive {
        /// softmax temperature s in softmax(s * Q K^T)
        pub scale: Auto<f32> = Auto::Auto, scale_rule();
    }
}

crate::method_params! {
    /// The fast exact kernel (blocked, streaming online softmax, GEMM tiles, rayon). See the
    /// module documentation for the algorithm and its memory bound.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Exact {
        /// softmax temperature s in softmax(s * Q K^T)
        pub scale: Auto<f32> = Auto::Auto, scale_rule();
    }
}

/// What the exact backward needs: per-row log-sum-exp of the scaled logits (`+∞` for rows with
/// no attended key or a masked query) and the output, for FlashAttention-2's `D = rowsum(dO∘O)`.
#[derive(Debug, Clone)]
pub struct ExactSaved {
    lse: Vec<f32>,
    output: Vec<f32>,
}

impl ExactSaved {
    /// A saved state from per-row log-sum-exps (`[batch, heads, n_q]`, the convention above)
    /// and outputs (`[batch, heads, n_q, d_v]`) computed elsewhere, e.g. by a method that runs
    /// exact attention on some of its rows.
    pub(crate) fn from_parts(lse: Vec<f32>, output: Vec<f32>) -> Self {
        ExactSaved { lse, output }
    }
}

// ---------------------------------------------------------------------------------------------
// Naive reference
// ---------------------------------------------------------------------------------------------

/// Softmax probabilities of query row `i` of head `bh` in f64 (all zeros if the query is masked
/// or no key is kept).
fn naive_probs(x: &AttentionInputs<'_>, bh: usize, i: usize, scale: f64) -> Vec<f64> {
    let Dims { heads, n_k, d, .. } = x.dims();
    let b = bh / heads;
    let mut p = vec![0.0f64; n_k];
    if x.query_mask_row(b).is_some_and(|m| !m[i]) {
        return p;
    }
    let q = &x.q_head(bh)[i * d..(i + 1) * d];
    let k = x.k_head(bh);
    let keep = x.key_mask_row(b);
    let mut max = f64::NEG_INFINITY;
    for j in 0..n_k {
        if keep.is_some_and(|m| !m[j]) {
            p[j] = f64::NEG_INFINITY;
            continue;
        }
        let dot: f64 = q
            .iter()
            .zip(&k[j * d..(j + 1) * d])
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        p[j] = scale * dot;
        max = max.max(p[j]);
    }
    if max == f64::NEG_INFINITY {
        return vec![0.0; n_k];
    }
    let mut z = 0.0;
    for pj in p.iter_mut() {
        *pj = (*pj - max).exp();
        z += *pj;
    }
    for pj in p.iter_mut() {
        *pj /= z;
    }
    p
}

impl Estimator for ExactNaive {
    const INFO: MethodInfo = MethodInfo::new(
        "exact-naive",
        "exact softmax attention, obvious O(n^2) reference in f64",
        "O(n_q n_k d) time, O(n_q n_k) backward memory",
    );
    type Saved = ();

    fn memory(&self, s: &Sizes) -> Memory {
        // Per row an f64 probability row; per head the backward's f64 dK, dV and a few rows.
        let forward = s.o() + s.threads * 2 * s.n_k;
        let head = 2 * s.n_k * (s.d + s.d_v) + 4 * s.n_k + 2 * s.d;
        Memory::from_values(s, forward, s.o() + s.grads() + s.threads * head)
    }

    fn forward_saved(&self, x: &AttentionInputs<'_>, _seed: u64) -> Result<(Vec<f32>, ())> {
        let dims = x.dims();
        let Dims { n_q, d, d_v, .. } = dims;
        let scale = resolve_scale(self.scale, d) as f64;
        let mut output = crate::linalg::par_zeroed(dims.out_len());
        output
            .par_chunks_mut(n_q * d_v)
            .enumerate()
            .for_each(|(bh, out)| {
                let v = x.v_head(bh);
                for i in 0..n_q {
                    let p = naive_probs(x, bh, i, scale);
                    for (c, o) in out[i * d_v..(i + 1) * d_v].iter_mut().enumerate() {
                        *o = p
                            .iter()
                            .enumerate()
                            .map(|(j, pj)| pj * v[j * d_v + c] as f64)
                            .sum::<f64>() as f32;
                    }
                }
            });
        Ok((output, ()))
    }

    fn backward_saved(
        &self,
        x: &AttentionInputs<'_>,
        _seed: u64,
        _saved: &(),
        grad_output: &[f32],
    ) -> Result<Grads> {
        let dims = x.dims();
        let Dims {
            n_q, n_k, d, d_v, ..
        } = dims;
        let scale = resolve_scale(self.scale, d) as f64;
        let mut grads = Grads::zeros(x);
        grads
            .dq
            .par_chunks_mut(n_q * d)
            .zip(grads.dk.par_chunks_mut(n_k * d))
            .zip(grads.dv.par_chunks_mut(n_k * d_v))
            .enumerate()
            .for_each(|(bh, ((dq, dk), dv))| {
                let (q, k, v) = (x.q_head(bh), x.k_head(bh), x.v_head(bh));
                let g = &grad_output[bh * n_q * d_v..(bh + 1) * n_q * d_v];
                let (mut dk64, mut dv64) = (vec![0.0f64; n_k * d], vec![0.0f64; n_k * d_v]);
                for i in 0..n_q {
                    let p = naive_probs(x, bh, i, scale);
                    let gi = &g[i * d_v..(i + 1) * d_v];
                    // dP_ij = dO_i · v_j ; dS_ij = P_ij (dP_ij − Σ_l P_il dP_il)
                    let dp: Vec<f64> = (0..n_k)
                        .map(|j| {
                            gi.iter()
                                .zip(&v[j * d_v..(j + 1) * d_v])
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum()
                        })
                        .collect();
                    let mean: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    let mut dqi = vec![0.0f64; d];
                    for j in 0..n_k {
                        if p[j] == 0.0 {
                            continue;
                        }
                        let ds = p[j] * (dp[j] - mean);
                        for c in 0..d {
                            dqi[c] += scale * ds * k[j * d + c] as f64;
                            dk64[j * d + c] += scale * ds * q[i * d + c] as f64;
                        }
                        for c in 0..d_v {
                            dv64[j * d_v + c] += p[j] * gi[c] as f64;
                        }
                    }
                    for (o, v) in dq[i * d..(i + 1) * d].iter_mut().zip(&dqi) {
                        *o = *v as f32;
                    }
                }
                for (o, v) in dk.iter_mut().zip(&dk64) {
                    *o = *v as f32;
                }
                for (o, v) in dv.iter_mut().zip(&dv64) {
                    *o = *v as f32;
                }
            });
        Ok(grads)
    }
}

// ---------------------------------------------------------------------------------------------
// Fast kernel
// ---------------------------------------------------------------------------------------------

/// How a key tile meets the key mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TileMask {
    AllKept,
    AllMasked,
    Mixed,
}

fn tile_mask(keep: Option<&[bool]>, range: std::ops::Range<usize>) -> TileMask {
    match keep {
        None => TileMask::AllKept,
        Some(m) => {
            let kept = m[range.clone()].iter().filter(|k| **k).count();
            if kept == range.len() {
                TileMask::AllKept
            } else if kept == 0 {
                TileMask::AllMasked
            } else {
                TileMask::Mixed
            }
        }
    }
}

/// `s ← scale · Q_blk K_tileᵀ`, then −∞ in masked key columns. `s` is `rows × cols`, contiguous,
/// for `rows` queries and `cols` keys.
fn logits_tile(
    s: &mut [f32],
    q_blk: MatRef<'_>,
    k_tile: MatRef<'_>,
    scale: f32,
    keep: Option<&[bool]>,
    mask: TileMask,
) {
    let (rows, cols) = (q_blk.rows(), k_tile.rows());
    matmul(MatMut::new(s, rows, cols), false, q_blk, k_tile.t(), scale);
    if mask == TileMask::Mixed {
        let keep = keep.expect("mixed tiles come from a mask");
        for row in s[..rows * cols].chunks_exact_mut(cols) {
            for (x, k) in row.iter_mut().zip(keep) {
                if !k {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
}

thread_local! {
    /// Per-thread scratch of [`HeadForward::block`] (logit tile, running maxima and
    /// denominators), reused across blocks so the hot loop neither allocates nor page-faults.
    static FORWARD_SCRATCH: std::cell::RefCell<Vec<f32>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Everything the forward of one head needs, borrowed.
struct HeadForward<'a> {
    k: &'a [f32],
    v: &'a [f32],
    keep: Option<&'a [bool]>,
    dims: Dims,
    scale: f32,
}

impl HeadForward<'_> {
    /// Forward of one query block: writes `out` (`rows × d_v`) and `lse` (`rows`).
    fn block(&self, q_blk: &[f32], query_keep: Option<&[bool]>, out: &mut [f32], lse: &mut [f32]) {
        let Dims { n_k, d_v, .. } = self.dims;
        let rows = lse.len();
        out.fill(0.0);
        if query_keep.is_some_and(|m| m.iter().all(|k| !k)) {
            lse.fill(f32::INFINITY);
            return;
        }
        FORWARD_SCRATCH.with_borrow_mut(|scratch| {
            let tile = KEY_TILE.min(n_k);
            scratch.clear();
            scratch.resize(rows * (tile + 2), 0.0);
            let (s, running) = scratch.split_at_mut(rows * tile);
            let (row_max_run, denom) = running.split_at_mut(rows);
            row_max_run.fill(f32::NEG_INFINITY);
            self.stream_tiles(q_blk, out, s, row_max_run, denom);
            for r in 0..rows {
                let o = &mut out[r * d_v..(r + 1) * d_v];
                if denom[r] > 0.0 && query_keep.is_none_or(|m| m[r]) {
                    let inv = 1.0 / denom[r];
                    for x in o.iter_mut() {
                        *x *= inv;
                    }
                    lse[r] = row_max_run[r] + denom[r].ln();
                } else {
                    o.fill(0.0);
                    lse[r] = f32::INFINITY;
                }
            }
        });
    }

    /// The online softmax over all key tiles: accumulates the unnormalised output in `out`, the
    /// running row maxima and the softmax denominators.
    fn stream_tiles(
        &self,
        q_blk: &[f32],
        out: &mut [f32],
        s: &mut [f32],
        row_max_run: &mut [f32],
        denom: &mut [f32],
    ) {
        let Dims { n_k, d, d_v, .. } = self.dims;
        let rows = denom.len();
        for c0 in (0..n_k).step_by(KEY_TILE) {
            let c1 = (c0 + KEY_TILE).min(n_k);
            let cols = c1 - c0;
            let mask = tile_mask(self.keep, c0..c1);
            if mask == TileMask::AllMasked {
                continue;
            }
            let tile_keep = self.keep.map(|m| &m[c0..c1]);
            let s = &mut s[..rows * cols];
            let k_tile = &self.k[c0 * d..c1 * d];
            let (q_blk, k_tile) = (MatRef::new(q_blk, rows, d), MatRef::new(k_tile, cols, d));
            logits_tile(s, q_blk, k_tile, self.scale, tile_keep, mask);
            for (r, srow) in s.chunks_exact_mut(cols).enumerate() {
                let m_old = row_max_run[r];
                let m_new = m_old.max(row_max(srow));
                if m_new == f32::NEG_INFINITY {
                    srow.fill(0.0);
                    continue;
                }
                let correction = (m_old - m_new).exp();
                denom[r] = denom[r] * correction + exp_shifted_sum(srow, m_new);
                if correction != 1.0 {
                    for o in &mut out[r * d_v..(r + 1) * d_v] {
                        *o *= correction;
                    }
                }
                row_max_run[r] = m_new;
            }
            let v_tile = MatRef::new(&self.v[c0 * d_v..c1 * d_v], cols, d_v);
            // out (rows × d_v) += P (rows × cols) · V_tile (cols × d_v)
            matmul(
                MatMut::new(out, rows, d_v),
                true,
                MatRef::new(s, rows, cols),
                v_tile,
                1.0,
            );
        }
    }
}

impl Exact {
    /// Forward pass returning the output and the per-row log-sum-exp of the scaled logits
    /// (`[batch, heads, n_q]`, `+∞` for rows that output zeros).
    pub fn forward_with_lse(&self, x: &AttentionInputs<'_>) -> Result<(Vec<f32>, Vec<f32>)> {
        self.validate()?;
        let dims = x.dims();
        let Dims {
            heads, n_q, d, d_v, ..
        } = dims;
        let scale = resolve_scale(self.scale, d);
        let mut output = zeroed(dims.out_len());
        let mut lse = vec![0.0f32; dims.batch_heads() * n_q];
        output
            .par_chunks_mut(n_q * d_v)
            .zip(lse.par_chunks_mut(n_q))
            .enumerate()
            .for_each(|(bh, (out_h, lse_h))| {
                let b = bh / heads;
                let q = x.q_head(bh);
                let query_keep = x.query_mask_row(b);
                let head = HeadForward {
                    k: x.k_head(bh),
                    v: x.v_head(bh),
                    keep: x.key_mask_row(b),
                    dims,
                    scale,
                };
                out_h
                    .par_chunks_mut(QUERY_BLOCK * d_v)
                    .zip(lse_h.par_chunks_mut(QUERY_BLOCK))
                    .enumerate()
                    .for_each(|(blk, (out, lse))| {
                        let r0 = blk * QUERY_BLOCK;
                        let rows = lse.len();
                        head.block(
                            &q[r0 * d..(r0 + rows) * d],
                            query_keep.map(|m| &m[r0..r0 + rows]),
                            out,
                            lse,
                        );
                    });
            });
        Ok((output, lse))
    }
}

/// Everything the backward of one head needs, borrowed.
struct HeadBackward<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    grad_out: &'a [f32],
    lse: &'a [f32],
    /// `D_i = rowsum(dO_i ∘ O_i)`.
    delta: &'a [f32],
    keep: Option<&'a [bool]>,
    dims: Dims,
    scale: f32,
}

impl HeadBackward<'_> {
    /// Gradients for the keys `k0..k0 + dk.len()/d`: writes `dk`, `dv` of those keys and adds
    /// their contribution to `dq` (all query rows).
    fn run_chunk(&self, k0: usize, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let Dims { n_q, d, d_v, .. } = self.dims;
        let n_keys = dk.len() / d;
        let tile = BACKWARD_KEY_TILE.min(n_keys);
        let mut p = vec![0.0f32; BACKWARD_QUERY_BLOCK * tile];
        let mut dp = vec![0.0f32; BACKWARD_QUERY_BLOCK * tile];
        for t0 in (0..n_keys).step_by(BACKWARD_KEY_TILE) {
            let t1 = (t0 + BACKWARD_KEY_TILE).min(n_keys);
            let (c0, c1) = (k0 + t0, k0 + t1);
            let cols = c1 - c0;
            let mask = tile_mask(self.keep, c0..c1);
            if mask == TileMask::AllMasked {
                continue;
            }
            let tile_keep = self.keep.map(|m| &m[c0..c1]);
            let k_tile = &self.k[c0 * d..c1 * d];
            let v_tile = &self.v[c0 * d_v..c1 * d_v];
            let dk_tile = &mut dk[t0 * d..t1 * d];
            let dv_tile = &mut dv[t0 * d_v..t1 * d_v];
            for r0 in (0..n_q).step_by(BACKWARD_QUERY_BLOCK) {
                let r1 = (r0 + BACKWARD_QUERY_BLOCK).min(n_q);
                let rows = r1 - r0;
                let lse = &self.lse[r0..r1];
                if lse.iter().all(|l| *l == f32::INFINITY) {
                    continue;
                }
                let q_blk = &self.q[r0 * d..r1 * d];
                let g_blk = &self.grad_out[r0 * d_v..r1 * d_v];
                let p = &mut p[..rows * cols];
                let dp = &mut dp[..rows * cols];
                let (q_m, k_m) = (MatRef::new(q_blk, rows, d), MatRef::new(k_tile, cols, d));
                logits_tile(p, q_m, k_m, self.scale, tile_keep, mask);
                for (prow, l) in p.chunks_exact_mut(cols).zip(lse) {
                    exp_shifted_sum(prow, *l);
                }
                // dV_j += Pᵀ dO_i
                matmul(
                    MatMut::new(dv_tile, cols, d_v),
                    true,
                    MatRef::new(p, rows, cols).t(),
                    MatRef::new(g_blk, rows, d_v),
                    1.0,
                );
                // dP = dO_i V_jᵀ, then dS = P ∘ (dP − D_i) in place of dP.
                matmul(
                    MatMut::new(dp, rows, cols),
                    false,
                    MatRef::new(g_blk, rows, d_v),
                    MatRef::new(v_tile, cols, d_v).t(),
                    1.0,
                );
                tile_softmax_backward(dp, p, &self.delta[r0..r1]);
                // dK_j += s · dSᵀ Q_i ; dQ_i += s · dS K_j
                matmul(
                    MatMut::new(dk_tile, cols, d),
                    true,
                    MatRef::new(dp, rows, cols).t(),
                    MatRef::new(q_blk, rows, d),
                    self.scale,
                );
                matmul(
                    MatMut::new(&mut dq[r0 * d..r1 * d], rows, d),
                    true,
                    MatRef::new(dp, rows, cols),
                    MatRef::new(k_tile, cols, d),
                    self.scale,
                );
            }
        }
    }
}

crate::linalg::multiversion! {
    /// `dS = P ∘ (dP − D_i)` in place of `dP` over a tile of `delta.len()` rows.
    fn tile_softmax_backward(dp: &mut [f32], p: &[f32], delta: &[f32]) {
        let cols = dp.len() / delta.len();
        for ((dsrow, prow), delta) in dp.chunks_exact_mut(cols).zip(p.chunks_exact(cols)).zip(delta) {
            for (ds, p) in dsrow.iter_mut().zip(prow) {
                *ds = *p * (*ds - *delta);
            }
        }
    }
}

/// The exact kernel's memory on sizes `s` (also the inner attention of Linformer, Informer,
/// RA, MCA and Skeinformer's exact row norms): output, saved output and log-sum-exps, each
/// thread's streaming tile; then gradients, `D = rowsum(dO ∘ O)`, the per-chunk partial dQ of
/// heads split over key chunks, and each thread's probability and gradient tiles.
pub(crate) fn exact_memory(s: &Sizes) -> Memory {
    let lse = s.bh() * s.n_q;
    let forward = 2 * s.o() + lse + s.threads * (QUERY_BLOCK as u128) * (KEY_TILE as u128 + 2);
    let tile = BACKWARD_KEY_TILE as u128;
    let key_tiles = s.n_k.div_ceil(tile).max(1);
    let chunks = (BACKWARD_TASKS as u128)
        .div_ceil(s.bh().max(1))
        .clamp(1, key_tiles);
    let chunks = s.n_k.div_ceil(key_tiles.div_ceil(chunks) * tile);
    let partial = if chunks > 1 { chunks * s.q() } else { 0 };
    let backward =
        s.grads() + lse + partial + s.threads * 2 * (BACKWARD_QUERY_BLOCK as u128) * tile;
    Memory::from_values(s, forward, forward + backward)
}

impl Estimator for Exact {
    const INFO: MethodInfo = MethodInfo::new(
        "exact",
        "exact softmax attention, fast blocked streaming kernel (FlashAttention-2 style)",
        "O(n_q n_k d) time, O(n d) memory",
    );
    type Saved = ExactSaved;

    fn memory(&self, s: &Sizes) -> Memory {
        exact_memory(s)
    }

    fn forward_saved(&self, x: &AttentionInputs<'_>, _seed: u64) -> Result<(Vec<f32>, ExactSaved)> {
        let (output, lse) = self.forward_with_lse(x)?;
        let saved = ExactSaved {
            lse,
            output: output.clone(),
        };
        Ok((output, saved))
    }

    fn saved_bytes(saved: &ExactSaved) -> usize {
        4 * (saved.lse.len() + saved.output.len())
    }

    fn backward_saved(
        &self,
        x: &AttentionInputs<'_>,
        _seed: u64,
        saved: &ExactSaved,
        grad_output: &[f32],
    ) -> Result<Grads> {
        let ExactSaved { lse, output } = saved;
        let dims = x.dims();
        let Dims {
            heads,
            n_q,
            n_k,
            d,
            d_v,
            ..
        } = dims;
        let bhs = dims.batch_heads();
        let scale = resolve_scale(self.scale, d);

        let delta: Vec<f32> = grad_output
            .par_chunks(d_v)
            .zip(output.par_chunks(d_v))
            .map(|(g, o)| g.iter().zip(o).map(|(a, b)| a * b).sum())
            .collect();

        // Split each head's keys into chunks (whole backward tiles) until there are about
        // BACKWARD_TASKS tasks; a chunk count independent of the machine keeps dQ reproducible.
        let key_tiles = n_k.div_ceil(BACKWARD_KEY_TILE);
        let chunks = BACKWARD_TASKS.div_ceil(bhs).clamp(1, key_tiles);
        let chunk_keys = key_tiles.div_ceil(chunks) * BACKWARD_KEY_TILE;
        let chunks = n_k.div_ceil(chunk_keys);

        let mut grads = Grads::zeros(x);
        // With one chunk per head the chunk accumulates straight into dq.
        let mut dq_partial = if chunks > 1 {
            zeroed(bhs * chunks * n_q * d)
        } else {
            Vec::new()
        };
        let dq_target: &mut [f32] = if chunks > 1 {
            &mut dq_partial
        } else {
            &mut grads.dq
        };
        dq_target
            .par_chunks_mut(chunks * n_q * d)
            .zip(grads.dk.par_chunks_mut(n_k * d))
            .zip(grads.dv.par_chunks_mut(n_k * d_v))
            .enumerate()
            .for_each(|(bh, ((dq_h, dk_h), dv_h))| {
                let head = HeadBackward {
                    q: x.q_head(bh),
                    k: x.k_head(bh),
                    v: x.v_head(bh),
                    grad_out: &grad_output[bh * n_q * d_v..(bh + 1) * n_q * d_v],
                    lse: &lse[bh * n_q..(bh + 1) * n_q],
                    delta: &delta[bh * n_q..(bh + 1) * n_q],
                    keep: x.key_mask_row(bh / heads),
                    dims,
                    scale,
                };
                dq_h.par_chunks_mut(n_q * d)
                    .zip(dk_h.par_chunks_mut(chunk_keys * d))
                    .zip(dv_h.par_chunks_mut(chunk_keys * d_v))
                    .enumerate()
                    .for_each(|(c, ((dq_c, dk_c), dv_c))| {
                        head.run_chunk(c * chunk_keys, dq_c, dk_c, dv_c);
                    });
            });
        if chunks > 1 {
            grads
                .dq
                .par_chunks_mut(n_q * d)
                .zip(dq_partial.par_chunks(chunks * n_q * d))
                .for_each(|(dq, parts)| {
                    for part in parts.chunks_exact(n_q * d) {
                        for (a, b) in dq.iter_mut().zip(part) {
                            *a += *b;
                        }
                    }
                });
        }
        Ok(grads)
    }
}
