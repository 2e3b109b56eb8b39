//! Randomized Attention (RA): the unbiased, quadratic random-feature estimator of softmax attention.
//!
//! Zheng, Wang, Kong, *Linear Complexity Randomized Self-attention Mechanism*, ICML 2022
//! (arXiv 2204.04667). Brief: `shared/papers/lara.md` §1–§3.
//!
//! # The estimator
//!
//! In scaled coordinates `x = s^{1/2}·q`, `y_m = s^{1/2}·k_m` (so `x·y_m = s·q·k_m`), softmax
//! attention is an expectation over a per-query Gaussian mixture,
//!
//! ```text
//! softmax(s·q Kᵀ) V = E_{ω ~ p}[f(ω)],   p(ω) = Σ_m π_m N(ω; x + y_m, σ²I),   π = softmax(x·y),
//! f(ω) = Σ_m softmax_m(ω·y_m − ½‖y_m‖²) v_m ,
//! ```
//!
//! exactly when `σ = 1`. RA draws `S` samples per query — a component `m* ~ π`, then
//! `ω = x + y_{m*} + σ·ε`, `ε ~ N(0, I)` — and averages `f`. Unbiased with the paper's unit noise;
//! error `O(1/√S)`. Cost `O(n_q·n_k·d·S)` time (quadratic, like softmax) and `O(n·d·S)` memory:
//! the component draw and `f` both run tile by tile through the blocked exact kernel (`f` is exact
//! attention of the augmented query `[ω, 1]` over the keys `[y_m, −½‖y_m‖²]`).
//!
//! **Noise scale** (`noise`): `paper` (default) draws `ε` with unit variance in the scaled
//! coordinates above, which is what makes the identity — and so the unbiasedness — hold. The
//! released code draws unit noise on the *raw* vectors, i.e. `σ = s^{1/2}` (`d^{-1/4}` at the
//! default scale) in scaled coordinates: a narrower proposal for which the expectation above is
//! no longer softmax attention. `noise=code` reproduces it for comparison.
//!
//! # Masks, randomness, backward, and where we differ from the reference
//!
//! The reference accepts a padding mask and ignores it; here masked keys are never drawn as
//! components and never enter `f`, and masked queries output 0. The draws of head `(b, h)` come
//! from `rng::stream(seed, b, h, "ra/draws")`; the components and noise are saved, and the
//! backward holds them fixed (gradients flow through `q`, the drawn keys `k_{m*}`, and every key
//! and value inside `f`).

use rand::Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use super::exact::exact_memory;
use crate::error::{Error, Result};
use crate::estimator::{Attention, Estimator, Grads, MethodInfo};
use crate::inputs::{AttentionInputs, Dims};
use crate::linalg::{exp_shifted_sum, row_max, zeroed};
use crate::matrix::{MatMut, MatRef, matmul};
use crate::memory::{Memory, Sizes};
use crate::methods::exact::Exact;
use crate::params::{Auto, in_range, resolve_scale, scale_rule};
use crate::rng::stream;

/// Largest number of samples per query accepted.
pub const MAX_SAMPLES: usize = 1024;
/// Keys per tile and query rows per block of the component draw.
const KEY_TILE: usize = 512;
const ROW_BLOCK: usize = 128;
/// Marks a query with no component (masked query, or no unmasked key).
const NONE: u32 = u32::MAX;

crate::choice! {
    /// The noise-scale convention of the samples.
    pub enum Noise {
        /// Unit variance in scaled coordinates (the paper; unbiased).
        Paper = "paper",
        /// Unit variance on the raw vectors (the released code).
        Code = "code",
    }
}

crate::method_params! {
    /// Randomized Attention `ra`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Ra {
        /// samples S per query (error ~ 1/sqrt(S))
        pub samples: usize = 1, in_range(1, MAX_SAMPLES as u64);
        /// noise variance: unit in scaled coordinates (unbiased) or on raw vectors
        pub noise: Noise = Noise::Paper;
        /// softmax temperature s in softmax(s * Q K^T)
        pub scale: Auto<f32> = Auto::Auto, scale_rule();
    }
}

/// The draws of one forward: per head, `n_q·S` components and `n_q·S·d` noise vectors (already
/// multiplied by σ), sample `s` of query `i` at index `i·S + s`.
#[derive(Debug, Clone, PartialEq)]
pub struct Draws {
    /// Drawn key per sample (`u32::MAX` for masked queries).
    pub components: Vec<u32>,
    /// `σ·ε` per sample.
    pub noise: Vec<f32>,
}

/// The draws saved for the backward.
#[derive(Debug, Clone)]
pub struct RaSaved {
    draws: Draws,
}

impl Ra {
    fn root(&self, d: usize) -> f32 {
        resolve_scale(self.scale, d).sqrt()
    }

    /// The components and noise a forward with `seed` draws, for every head.
    pub fn draws(&self, x: &AttentionInputs<'_>, seed: u64) -> Result<Draws> {
        self.validate()?;
        let Dims { heads, n_q, d, .. } = x.dims();
        let s = self.samples;
        let sigma = match self.noise {
            Noise::Paper => 1.0,
            Noise::Code => self.root(d),
        };
        let bhs = x.dims().batch_heads();
        let per_head: Vec<(Vec<u32>, Vec<f32>)> = (0..bhs)
            .into_par_iter()
            .map(|bh| {
                let mut rng = stream(seed, bh / heads, bh % heads, "ra/draws");
                let u: Vec<f32> = (0..n_q * s).map(|_| rng.random::<f32>()).collect();
                let noise: Vec<f32> = (0..n_q * s * d)
                    .map(|_| sigma * rng.sample::<f32, _>(StandardNormal))
                    .collect();
                (self.components(x, bh, &u), noise)
            })
            .collect();
        let mut draws = Draws {
            components: Vec::with_capacity(bhs * n_q * s),
            noise: Vec::with_capacity(bhs * n_q * s * d),
        };
        for (c, e) in per_head {
            draws.components.extend(c);
            draws.noise.extend(e);
        }
        Ok(draws)
    }

    /// Component `m* ~ softmax(s·q Kᵀ)` of every sample of head `bh`, by inverse CDF with the
    /// uniforms `u` (`n_q·S`), tile by tile (never an `n_q × n_k` matrix).
    fn components(&self, x: &AttentionInputs<'_>, bh: usize, u: &[f32]) -> Vec<u32> {
        let Dims {
            heads, n_q, n_k, d, ..
        } = x.dims();
        let s = self.samples;
        let b = bh / heads;
        let keep = x.key_mask_row(b);
        let scale = resolve_scale(self.scale, d);
        let (q, k) = (x.q_head(bh), x.k_head(bh));
        let mut out = vec![NONE; n_q * s];
        // Pass 1: row log-sum-exps. Pass 2: probabilities tile by tile; a sample whose uniform
        // falls in a tile's mass is resolved by a scan of that tile only.
        let mut lse_max = vec![f32::NEG_INFINITY; n_q];
        let mut lse_sum = vec![0.0f32; n_q];
        let mut cum = vec![0.0f32; n_q];
        let mut tile = vec![0.0f32; n_q.min(ROW_BLOCK) * KEY_TILE.min(n_k)];
        for pass in 0..2 {
            for r0 in (0..n_q).step_by(ROW_BLOCK) {
                let rows = ROW_BLOCK.min(n_q - r0);
                for c0 in (0..n_k).step_by(KEY_TILE) {
                    let cols = KEY_TILE.min(n_k - c0);
                    let t = &mut tile[..rows * cols];
                    matmul(
                        MatMut::new(t, rows, cols),
                        false,
                        MatRef::new(&q[r0 * d..(r0 + rows) * d], rows, d),
                        MatRef::new(&k[c0 * d..(c0 + cols) * d], cols, d).t(),
                        scale,
                    );
                    for (r, row) in t.chunks_exact_mut(cols).enumerate() {
                        let i = r0 + r;
                        if !x.query_kept(bh, i) {
                            continue;
                        }
                        if let Some(keep) = keep {
                            for (l, kept) in row.iter_mut().zip(&keep[c0..c0 + cols]) {
                                if !kept {
                                    *l = f32::NEG_INFINITY;
                                }
                            }
                        }
                        if pass == 0 {
                            let m_new = lse_max[i].max(row_max(row));
                            if m_new == f32::NEG_INFINITY {
                                continue;
                            }
                            lse_sum[i] = lse_sum[i] * (lse_max[i] - m_new).exp()
                                + exp_shifted_sum(row, m_new);
                            lse_max[i] = m_new;
                            continue;
                        }
                        if lse_sum[i] == 0.0 {
                            continue; // no unmasked key
                        }
                        let lse = lse_max[i] + lse_sum[i].ln();
                        let mass = exp_shifted_sum(row, lse);
                        let (before, after) = (cum[i], cum[i] + mass);
                        for (smp, o) in out[i * s..(i + 1) * s].iter_mut().enumerate() {
                            let target = u[i * s + smp];
                            if *o != NONE || target >= after {
                                continue;
                            }
                            let mut acc = before;
                            let mut pick = None;
                            for (jj, p) in row.iter().enumerate() {
                                if *p > 0.0 {
                                    pick = Some(jj);
                                    acc += p;
                                    if target < acc {
                                        break;
                                    }
                                }
                            }
                            if let Some(jj) = pick {
                                *o = (c0 + jj) as u32;
                            }
                        }
                        cum[i] = after;
                    }
                }
            }
        }
        // Rounding can leave a uniform above the final cumulative sum: take the last unmasked key.
        let last = (0..n_k).rev().find(|&j| keep.is_none_or(|m| m[j]));
        for i in 0..n_q {
            if !x.query_kept(bh, i) || lse_sum[i] == 0.0 {
                continue;
            }
            for o in out[i * s..(i + 1) * s].iter_mut() {
                if *o == NONE {
                    *o = last.expect("a kept key exists") as u32;
                }
            }
        }
        out
    }

    /// The augmented sub-problem `f(ω) = softmax([ω, 1]·[y, −½‖y‖²]ᵀ) V` for every sample:
    /// queries `[batch, heads, n_q·S, d+1]`, keys `[batch, heads, n_k, d+1]`, sample query mask.
    fn augmented(&self, x: &AttentionInputs<'_>, draws: &Draws) -> (Vec<f32>, Vec<f32>, Vec<bool>) {
        let Dims {
            batch,
            heads,
            n_q,
            n_k,
            d,
            ..
        } = x.dims();
        let s = self.samples;
        let root = self.root(d);
        let da = d + 1;
        let bhs = batch * heads;
        let mut qa = crate::linalg::par_zeroed(bhs * n_q * s * da);
        qa.par_chunks_mut(n_q * s * da)
            .enumerate()
            .for_each(|(bh, qa)| {
                let (q, k) = (x.q_head(bh), x.k_head(bh));
                for (idx, row) in qa.chunks_exact_mut(da).enumerate() {
                    let i = idx / s;
                    let m = draws.components[bh * n_q * s + idx];
                    if m == NONE {
                        continue;
                    }
                    let m = m as usize;
                    let eps = &draws.noise[(bh * n_q * s + idx) * d..(bh * n_q * s + idx + 1) * d];
                    for c in 0..d {
                        row[c] = root * (q[i * d + c] + k[m * d + c]) + eps[c];
                    }
                    row[d] = 1.0;
                }
            });
        let mut ka = crate::linalg::par_zeroed(bhs * n_k * da);
        ka.par_chunks_mut(n_k * da)
            .enumerate()
            .for_each(|(bh, ka)| {
                let k = x.k_head(bh);
                for (row, kr) in ka.chunks_exact_mut(da).zip(k.chunks_exact(d)) {
                    let mut sq = 0.0f32;
                    for (o, v) in row[..d].iter_mut().zip(kr) {
                        *o = root * v;
                        sq += *o * *o;
                    }
                    row[d] = -0.5 * sq;
                }
            });
        let mask: Vec<bool> = (0..batch)
            .flat_map(|b| {
                (0..n_q * s).map(move |idx| x.query_mask_row(b).is_none_or(|m| m[idx / s]))
            })
            .collect();
        (qa, ka, mask)
    }

    fn sub_inputs<'a>(
        &self,
        x: &AttentionInputs<'a>,
        qa: &'a [f32],
        ka: &'a [f32],
        mask: &'a [bool],
    ) -> Result<AttentionInputs<'a>> {
        let Dims {
            batch,
            heads,
            n_q,
            n_k,
            d,
            d_v,
        } = x.dims();
        let mut sub = AttentionInputs::new(
            qa,
            [batch, heads, n_q * self.samples, d + 1],
            ka,
            [batch, heads, n_k, d + 1],
            x.v(),
            [batch, heads, n_k, d_v],
        )?
        .with_query_mask(mask)?;
        if let Some(m) = x.key_mask() {
            sub = sub.with_key_mask(m)?;
        }
        Ok(sub)
    }
}

impl Estimator for Ra {
    const INFO: MethodInfo = MethodInfo {
        budget: Some("samples"),
        random: true,
        ..MethodInfo::new(
            "ra",
            "Randomized Attention: unbiased per-query Gaussian-mixture random features",
            "O(n_q n_k d S) time (quadratic), O(n d S) memory",
        )
    };
    type Saved = RaSaved;

    fn memory(&self, s: &Sizes) -> Memory {
        let sm = self.samples as u128;
        let da = s.d + 1;
        let rows = s.bh() * s.n_q * sm;
        // Draws (per head, then merged), the augmented queries and keys, the inner exact
        // attention over n_q·S rows; per head the inverse-CDF pass over key tiles.
        let draws = 2 * rows * (1 + s.d);
        let augmented = rows * da + s.bh() * s.n_k * da + s.batch * (s.n_q * sm + s.n_k);
        let (inner_f, inner_fb) = exact_memory(&s.with(s.n_q * sm, s.n_k, da, s.d_v)).values(s);
        let head = 2 * s.n_q * sm * (1 + s.d) + 3 * s.n_q + (ROW_BLOCK * KEY_TILE) as u128;
        let forward = s.o() + draws + augmented + inner_f + s.threads * head;
        let backward =
            rows * (1 + s.d) + augmented + inner_fb + s.o() + rows * s.d_v + s.q() + s.k();
        Memory::from_values(s, forward, s.o() + backward)
    }

    fn saved_bytes(s: &RaSaved) -> usize {
        4 * (s.draws.components.len() + s.draws.noise.len())
    }

    fn forward_saved(&self, x: &AttentionInputs<'_>, seed: u64) -> Result<(Vec<f32>, RaSaved)> {
        let draws = self.draws(x, seed)?;
        let dims = x.dims();
        let (d_v, s) = (dims.d_v, self.samples);
        let (qa, ka, mask) = self.augmented(x, &draws);
        let sub = self.sub_inputs(x, &qa, &ka, &mask)?;
        let f = Exact {
            scale: Auto::Fixed(1.0),
        }
        .forward(&sub, seed)?
        .output;
        let mut output = crate::linalg::par_zeroed(dims.out_len());
        let inv = 1.0 / s as f32;
        output
            .par_chunks_mut(d_v)
            .zip(f.par_chunks(s * d_v))
            .for_each(|(o, fs)| {
                for row in fs.chunks_exact(d_v) {
                    for (a, b) in o.iter_mut().zip(row) {
                        *a += b * inv;
                    }
                }
            });
        x.zero_masked_queries(&mut output);
        Ok((output, RaSaved { draws }))
    }

    fn backward_saved(
        &self,
        x: &AttentionInputs<'_>,
        seed: u64,
        saved_draws: &RaSaved,
        grad_output: &[f32],
    ) -> Result<Grads> {
        let dims = x.dims();
        let Dims {
            n_q, n_k, d, d_v, ..
        } = dims;
        let s = self.samples;
        let draws = &saved_draws.draws;
        if draws.components.len() != dims.batch_heads() * n_q * s {
            return Err(Error::Saved {
                message: format!("holds draws for another sample count than samples={s}"),
            });
        }
        let root = self.root(d);
        let (qa, ka, mask) = self.augmented(x, draws);
        let sub = self.sub_inputs(x, &qa, &ka, &mask)?;
        let exact = Exact {
            scale: Auto::Fixed(1.0),
        };
        let f = exact.forward(&sub, seed)?;
        // Each sample row carries G / S.
        let g = x.without_masked_queries(grad_output);
        let inv = 1.0 / s as f32;
        // Each output row's gradient repeated for its S samples (sized up front: a collect
        // through flat_map grows by doubling, up to twice this).
        let mut g_rows = Vec::with_capacity(g.len() * s);
        for row in g.chunks_exact(d_v) {
            for _ in 0..s {
                g_rows.extend(row.iter().map(|v| v * inv));
            }
        }
        let sub_grads = exact.backward(&sub, seed, &f.saved, &g_rows)?;
        let da = d + 1;
        let mut grads = Grads {
            dq: zeroed(x.q().len()),
            dk: zeroed(x.k().len()),
            dv: sub_grads.dv,
            params: Vec::new(),
        };
        grads
            .dq
            .par_chunks_mut(n_q * d)
            .zip(grads.dk.par_chunks_mut(n_k * d))
            .enumerate()
            .for_each(|(bh, (dq, dk))| {
                let k = x.k_head(bh);
                // Keys [y, −½‖y‖²]: dy = dK'[:d] − dK'[d]·y.
                for (j, (dkr, kr)) in dk.chunks_exact_mut(d).zip(k.chunks_exact(d)).enumerate() {
                    let dka = &sub_grads.dk[(bh * n_k + j) * da..(bh * n_k + j + 1) * da];
                    for c in 0..d {
                        dkr[c] = root * (dka[c] - dka[d] * root * kr[c]);
                    }
                }
                // ω = y_q + y_{m*} + σε: dω flows to the query and the drawn key.
                for idx in 0..n_q * s {
                    let m = draws.components[bh * n_q * s + idx];
                    if m == NONE {
                        continue;
                    }
                    let domega =
                        &sub_grads.dq[(bh * n_q * s + idx) * da..(bh * n_q * s + idx) * da + d];
                    let i = idx / s;
                    for (a, b) in dq[i * d..(i + 1) * d].iter_mut().zip(domega) {
                        *a += root * b;
                    }
                    let m = m as usize;
                    for (a, b) in dk[m * d..(m + 1) * d].iter_mut().zip(domega) {
                        *a += root * b;
                    }
                }
            });
        Ok(grads)
    }
}
