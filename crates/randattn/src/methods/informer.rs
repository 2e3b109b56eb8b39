//! Informer's ProbSparse attention, the row-sampling baseline of the sketching family.
//!
//! Zhou et al., *Informer: Beyond Efficient Transformer for Long Sequence Time-Series
//! Forecasting*, AAAI 2021; as a sketching method in Chen et al., *Sketching as a Tool for
//! Understanding and Accelerating Self-attention for Long Sequences*, NAACL 2022. Brief:
//! `shared/papers/skeinformer.md` §3.2.
//!
//! # The estimator
//!
//! A query whose attention row is far from uniform matters more. Its sparsity is measured on
//! `U = c·⌈ln n_k⌉` keys drawn uniformly (with replacement) from the unmasked keys,
//!
//! ```text
//! M̄(q_i) = max_{j ∈ sample} s·q_i·k_j − mean_{j ∈ sample} s·q_i·k_j ,
//! ```
//!
//! and the `u = c·⌈ln n_q⌉` queries with the largest `M̄` (the "active" ones) get exact softmax
//! attention over all unmasked keys; every other ("lazy") query outputs the mean of the unmasked
//! value rows. Deterministic given the sample; cost `O(n_q·U·d + u·n_k·d)` time and `O(n·d)`
//! memory (the active rows go through the exact blocked kernel).
//!
//! # Backward
//!
//! With the sample and the active set held fixed (saved by the forward): active rows take the
//! exact softmax gradient; a lazy row passes `g_i / m` to each of the `m` unmasked value rows
//! and nothing to Q or K.
//!
//! # Masks and where we differ from the reference code
//!
//! The reference ignores the padding mask (its lazy rows average V over padding too, and its
//! active rows attend to padded keys); here keys are sampled only among unmasked keys, active
//! rows never attend to masked keys, lazy rows average the unmasked values, and masked queries
//! are never active and output 0. The reference divides the sample sum by `n_k` instead of `U`
//! (Informer2020 #257); we use the mean over the sample, as the formula says. The sample is drawn
//! per (batch, head) from `rng::stream(seed, b, h, "informer/sample")` and shared by blocks of 64
//! queries (each query's sample is still `U` uniform draws, and a block's scores are one small
//! GEMM), where the reference draws one per query and shares it across the batch and heads.
//! When a batch element has fewer unmasked
//! queries than `u`, all of them are active.

use rand::Rng;
use rayon::prelude::*;

use super::exact::exact_memory;
use crate::error::Result;
use crate::estimator::{Attention, Estimator, Grads, MethodInfo, Saved};
use crate::inputs::{AttentionInputs, Dims};
use crate::linalg::{row_max, row_sum};
use crate::matrix::{MatMut, MatRef, matmul};
use crate::memory::{Memory, Sizes};
use crate::methods::exact::Exact;
use crate::params::{Auto, at_least, auto, in_range, resolve_scale, scale_rule};
use crate::rng::stream;

/// Queries sharing one key sample when scoring sparsity.
const SAMPLE_BLOCK: usize = 64;

/// Marks an unused slot of the active-query table.
const NO_QUERY: u32 = u32::MAX;

crate::method_params! {
    /// ProbSparse attention `informer`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Informer {
        /// c: U = c*ceil(ln n_k) sampled keys per query, u = c*ceil(ln n_q) active queries
        pub factor: usize = 5, in_range(1, 1000);
        /// number of active queries (exact rows) per head
        pub u: Auto<usize> = Auto::Auto, auto("c*ceil(ln n_q)", at_least(1));
        /// softmax temperature s in softmax(s * Q K^T)
        pub scale: Auto<f32> = Auto::Auto, scale_rule();
    }
}

/// `⌈ln n⌉`, at least 1.
fn ceil_ln(n: usize) -> usize {
    ((n as f64).ln().ceil() as usize).max(1)
}

/// What the backward needs: the active queries of every head and the exact kernel's state on
/// them.
#[derive(Debug, Clone)]
pub struct InformerSaved {
    /// `[batch·heads][u_max]` active query indices, [`NO_QUERY`] in unused slots.
    active: Vec<u32>,
    u_max: usize,
    exact: Option<Box<Saved>>,
}

impl Informer {
    fn exact(&self) -> Exact {
        Exact { scale: self.scale }
    }

    /// Active queries of head `bh` (sorted), as the forward with `seed` chooses them.
    fn select(&self, x: &AttentionInputs<'_>, seed: u64, bh: usize) -> Vec<u32> {
        let Dims {
            heads, n_q, n_k, d, ..
        } = x.dims();
        let (b, h) = (bh / heads, bh % heads);
        let kept: Vec<u32> = (0..n_k as u32)
            .filter(|&j| x.key_mask_row(b).is_none_or(|m| m[j as usize]))
            .collect();
        let eligible: Vec<u32> = (0..n_q as u32)
            .filter(|&i| x.query_mask_row(b).is_none_or(|m| m[i as usize]))
            .collect();
        if kept.is_empty() || eligible.is_empty() {
            return Vec::new();
        }
        let u = self
            .u
            .or_else(|| self.factor * ceil_ln(n_q))
            .min(eligible.len());
        if u == eligible.len() {
            return eligible;
        }
        let samples = self.factor * ceil_ln(n_k);
        let scale = resolve_scale(self.scale, d);
        let (q, k) = (x.q_head(bh), x.k_head(bh));
        let mut rng = stream(seed, b, h, "informer/sample");
        // Each block of queries shares one sample of U keys (each query's sample is still U keys
        // drawn uniformly with replacement), so the scores of a block are one small GEMM over
        // gathered rows instead of U random row reads per query.
        let mut sparsity: Vec<(f32, u32)> = Vec::with_capacity(eligible.len());
        let mut sample = vec![0.0f32; samples * d];
        let mut q_blk = vec![0.0f32; SAMPLE_BLOCK * d];
        let mut scores = vec![0.0f32; SAMPLE_BLOCK * samples];
        for blk in eligible.chunks(SAMPLE_BLOCK) {
            for row in sample.chunks_exact_mut(d) {
                let j = kept[rng.random_range(0..kept.len())] as usize;
                row.copy_from_slice(&k[j * d..(j + 1) * d]);
            }
            for (row, &i) in q_blk.chunks_exact_mut(d).zip(blk) {
                row.copy_from_slice(&q[i as usize * d..(i as usize + 1) * d]);
            }
            let rows = blk.len();
            matmul(
                MatMut::new(&mut scores, rows, samples),
                false,
                MatRef::new(&q_blk, rows, d),
                MatRef::new(&sample, samples, d).t(),
                scale,
            );
            for (row, &i) in scores.chunks_exact(samples).zip(blk) {
                sparsity.push((row_max(row) - row_sum(row) / samples as f32, i));
            }
        }
        // Largest sparsity first; ties by index, so the choice never depends on sort internals.
        let by_sparsity = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        sparsity.select_nth_unstable_by(u - 1, by_sparsity);
        let mut active: Vec<u32> = sparsity[..u].iter().map(|(_, i)| *i).collect();
        active.sort_unstable();
        active
    }

    /// The active (exact) queries of every head `[batch·heads]`, as the forward with `seed`
    /// chooses them: a diagnostic, and what tests use to check the backward.
    pub fn active_queries(&self, x: &AttentionInputs<'_>, seed: u64) -> Result<Vec<Vec<u32>>> {
        self.validate()?;
        Ok((0..x.dims().batch_heads())
            .into_par_iter()
            .map(|bh| self.select(x, seed, bh))
            .collect())
    }
}

/// Rows of the active queries gathered into `[batch·heads, u_max, w]` (zero rows in unused
/// slots) from `rows` (`[batch·heads, n_rows, w]`).
fn gather_active(
    x: &AttentionInputs<'_>,
    active: &[u32],
    u_max: usize,
    rows: &[f32],
    w: usize,
    n_rows: usize,
) -> Vec<f32> {
    let bhs = x.dims().batch_heads();
    let mut out = vec![0.0f32; bhs * u_max * w];
    out.par_chunks_mut(u_max * w)
        .zip(active.par_chunks(u_max))
        .enumerate()
        .for_each(|(bh, (dst, idx))| {
            for (row, &i) in dst.chunks_exact_mut(w).zip(idx) {
                if i != NO_QUERY {
                    let at = (bh * n_rows + i as usize) * w;
                    row.copy_from_slice(&rows[at..at + w]);
                }
            }
        });
    out
}

/// The active queries' slots in use for each batch element (the same for all its heads).
fn active_slots(active: &[u32], heads: usize, u_max: usize, batch: usize) -> Vec<bool> {
    (0..batch)
        .flat_map(|b| {
            let first = &active[b * heads * u_max..(b * heads + 1) * u_max];
            first.iter().map(|&i| i != NO_QUERY).collect::<Vec<_>>()
        })
        .collect()
}

impl Estimator for Informer {
    const INFO: MethodInfo = MethodInfo {
        budget: Some("factor"),
        random: true,
        ..MethodInfo::new(
            "informer",
            "Informer ProbSparse: exact rows for the top-u sparse queries, mean of V elsewhere",
            "O(n c ln(n) d) time, O(n d) memory",
        )
    };
    type Saved = InformerSaved;

    fn memory(&self, s: &Sizes) -> Memory {
        let n_q = s.n_q as usize;
        let u = self.u.or_else(|| self.factor * ceil_ln(n_q)).min(n_q) as u128;
        let samples = (self.factor * ceil_ln(s.n_k as usize)) as u128;
        let block = SAMPLE_BLOCK as u128;
        // Selection: per head the kept keys, the eligible queries with their sparsity and the
        // sampled keys' scores; the active queries of every head.
        let select = 2 * s.bh() * u
            + s.threads * (s.n_k + 3 * s.n_q + samples * s.d + block * (s.d + samples));
        let inner = exact_memory(&s.with(u, s.n_k, s.d, s.d_v));
        let (inner_f, inner_fb) = inner.values(s);
        let forward = s.o() + select + s.bh() * (u * s.d + u) + inner_f + s.threads * s.d_v;
        let backward = s.grads() + s.bh() * u * (s.d + s.d_v + 1) + (inner_fb - inner_f);
        Memory::from_values(s, forward, forward + backward)
    }

    fn saved_bytes(s: &InformerSaved) -> usize {
        4 * s.active.len() + s.exact.as_ref().map_or(0, |e| e.bytes())
    }

    fn forward_saved(
        &self,
        x: &AttentionInputs<'_>,
        seed: u64,
    ) -> Result<(Vec<f32>, InformerSaved)> {
        let selected = self.active_queries(x, seed)?;
        let dims = x.dims();
        let Dims {
            batch,
            heads,
            n_q,
            d,
            d_v,
            ..
        } = dims;
        let u_max = selected.iter().map(Vec::len).max().unwrap_or(0);
        let mut active = vec![NO_QUERY; dims.batch_heads() * u_max];
        for (slots, sel) in active.chunks_exact_mut(u_max.max(1)).zip(&selected) {
            slots[..sel.len()].copy_from_slice(sel);
        }
        // Lazy rows: the mean of the unmasked values; masked queries: 0.
        let mut output = crate::linalg::par_zeroed(dims.out_len());
        output
            .par_chunks_mut(n_q * d_v)
            .enumerate()
            .for_each(|(bh, out)| {
                let b = bh / heads;
                let (mean, _) = x.unmasked_value_mean(bh);
                for (i, row) in out.chunks_exact_mut(d_v).enumerate() {
                    if x.query_mask_row(b).is_none_or(|m| m[i]) {
                        row.copy_from_slice(&mean);
                    }
                }
            });
        let exact = if u_max > 0 {
            // Active rows: exact attention through the blocked kernel, on the gathered queries.
            let q_active = gather_active(x, &active, u_max, x.q(), d, n_q);
            let slots = active_slots(&active, heads, u_max, batch);
            let mut sub = AttentionInputs::new(
                &q_active,
                [batch, heads, u_max, d],
                x.k(),
                dims.k_shape(),
                x.v(),
                dims.v_shape(),
            )?
            .with_query_mask(&slots)?;
            if let Some(m) = x.key_mask() {
                sub = sub.with_key_mask(m)?;
            }
            let fwd = self.exact().forward(&sub, seed)?;
            output
                .par_chunks_mut(n_q * d_v)
                .zip(fwd.output.par_chunks(u_max * d_v))
                .zip(active.par_chunks(u_max))
                .for_each(|((out, rows), idx)| {
                    for (row, &i) in rows.chunks_exact(d_v).zip(idx) {
                        if i != NO_QUERY {
                            let i = i as usize;
                            out[i * d_v..(i + 1) * d_v].copy_from_slice(row);
                        }
                    }
                });
            Some(Box::new(fwd.saved))
        } else {
            None
        };
        Ok((
            output,
            InformerSaved {
                active,
                u_max,
                exact,
            },
        ))
    }

    fn backward_saved(
        &self,
        x: &AttentionInputs<'_>,
        seed: u64,
        s: &InformerSaved,
        grad_output: &[f32],
    ) -> Result<Grads> {
        let dims = x.dims();
        let Dims {
            batch,
            heads,
            n_q,
            n_k,
            d,
            d_v,
        } = dims;
        let u_max = s.u_max;
        let mut grads = Grads::zeros(x);
        if let Some(exact_saved) = &s.exact {
            let q_active = gather_active(x, &s.active, u_max, x.q(), d, n_q);
            let g_active = gather_active(x, &s.active, u_max, grad_output, d_v, n_q);
            let slots = active_slots(&s.active, heads, u_max, batch);
            let mut sub = AttentionInputs::new(
                &q_active,
                [batch, heads, u_max, d],
                x.k(),
                dims.k_shape(),
                x.v(),
                dims.v_shape(),
            )?
            .with_query_mask(&slots)?;
            if let Some(m) = x.key_mask() {
                sub = sub.with_key_mask(m)?;
            }
            let sub_grads = self.exact().backward(&sub, seed, exact_saved, &g_active)?;
            grads.dk = sub_grads.dk;
            grads.dv = sub_grads.dv;
            grads
                .dq
                .par_chunks_mut(n_q * d)
                .zip(sub_grads.dq.par_chunks(u_max * d))
                .zip(s.active.par_chunks(u_max))
                .for_each(|((dq, rows), idx)| {
                    for (row, &i) in rows.chunks_exact(d).zip(idx) {
                        if i != NO_QUERY {
                            let i = i as usize;
                            dq[i * d..(i + 1) * d].copy_from_slice(row);
                        }
                    }
                });
        }
        // Lazy rows: each passes g_i / m to every unmasked value row.
        grads
            .dv
            .par_chunks_mut(n_k * d_v)
            .enumerate()
            .for_each(|(bh, dv)| {
                let b = bh / heads;
                let keep = x.key_mask_row(b);
                let count = keep.map_or(n_k, |m| m.iter().filter(|k| **k).count());
                if count == 0 {
                    return;
                }
                let idx = &s.active[bh * u_max..(bh + 1) * u_max];
                let mut g_sum = vec![0.0f32; d_v];
                for (i, g) in grad_output[bh * n_q * d_v..(bh + 1) * n_q * d_v]
                    .chunks_exact(d_v)
                    .enumerate()
                {
                    let lazy = x.query_mask_row(b).is_none_or(|m| m[i])
                        && idx
                            .binary_search_by(|&a| {
                                // Unused slots (NO_QUERY) sort last.
                                a.cmp(&(i as u32))
                            })
                            .is_err();
                    if lazy {
                        for (a, b) in g_sum.iter_mut().zip(g) {
                            *a += *b;
                        }
                    }
                }
                let inv = 1.0 / count as f32;
                for (j, row) in dv.chunks_exact_mut(d_v).enumerate() {
                    if keep.is_none_or(|m| m[j]) {
                        for (a, b) in row.iter_mut().zip(&g_sum) {
                            *a += *b * inv;
                        }
                    }
                }
            });
        Ok(grads)
    }
}
