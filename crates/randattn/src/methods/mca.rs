//! MCA: Monte-Carlo approximation of the value projection, with per-token sample budgets.
//!
//! Kim & Ko, *Fast Monte-Carlo Approximation of the Attention Mechanism*, AAAI 2022
//! (arXiv 2201.12854). Brief: `shared/papers/mca.md`.
//!
//! # The estimator
//!
//! MCA keeps the attention probabilities `A_h = softmax(s·Q_h K_hᵀ)` exact and approximates the
//! value projection `V_h[j] = x_j W_h + b_h` of every token `j` (`W_h` = columns `h·d_v..(h+1)·d_v`
//! of W_V, `d = d_model` input features) by Drineas–Kannan–Mahoney sampling: `r` indices
//! `k_1..k_r` drawn with replacement from `p_h`, and
//!
//! ```text
//! Ṽ_h[j] = (1/r) Σ_t x_j[k_t] W_h[k_t, :] / p_h(k_t) + b_h ,     E[Ṽ_h[j]] = V_h[j]
//! p_h(k) = ‖W_h[k, :]‖² / ‖W_h‖_F²                     (probs=weight, the paper's)
//! p_h(k) ∝ |x_j[k]| · ‖W_h[k, :]‖                       (probs=input-aware: per token, DKM-optimal)
//! ```
//!
//! with a budget per token driven by the most attention it receives:
//!
//! ```text
//! r_{h,j} = min(⌊(n_eff · max_i A_h[i, j] / α)²⌋, d)
//! ```
//!
//! `r ≥ d` computes the exact row, `r = 0` leaves the bias only. The output is `Ỹ_h = A_h Ṽ_h`
//! (exact product), and every query row satisfies `E‖Ỹ_i − Y_i‖ ≤ α·β·‖W_h‖_F`, `β` the mean
//! `‖x_j‖` over the unmasked tokens (the paper's Theorem 2; it ignores `r = 0` tokens, whose
//! bias-only value is biased).
//!
//! # Where this differs from the reference code, and why
//!
//! - `n_eff` is the number of **unmasked** tokens, not the padded length: with padding the
//!   reference's budgets, and with them the meaning of α, change with the amount of padding
//!   (and its FLOP figure counts padding positions, which get `r = 0` for free; brief §6.1).
//! - The column max runs over unmasked queries only (the reference includes padding queries):
//!   a query is left out when the query mask drops it or, for self-attention (`n_q = n_k`), when
//!   the key mask marks that token as padding. Masked keys get `r = 0`.
//! - Each token draws its own indices: a SplitMix64 sequence keyed by the token and by the
//!   head's `rng::stream(seed, b, h, "mca/samples")` (the reference shares one index stream per
//!   head, which correlates the tokens' errors).
//!
//! # Cost, diagnostics, backward
//!
//! The attention costs what exact attention costs (plus one blocked pass for the column maxima;
//! no `n × n` buffer). The value projection costs `Σ_j r_j·d_v` multiply-adds for the sampled
//! tokens plus one GEMM over the exact ones. [`Mca::forward_prepared`] returns the budgets, the
//! FLOP fraction (mean `r/d` over unmasked tokens, and over all positions as the paper counts
//! it) and the bound per (batch, head). The backward holds the sampled indices and their weights
//! `1/(r·p)` fixed — the probabilities are treated as constants, as the reference caches them
//! once per layer — which makes the gradients of X, W_V and b_V unbiased; dQ and dK are exact
//! for `A` with the sampled values, and dV is zero (the output does not read V). The gradients of
//! X, W_V and b_V are returned as the parameters `x`, `wv` and `bv`.

use rand_core::RngCore;
use rayon::prelude::*;

use super::exact::exact_memory;
use crate::error::{Error, Result};
use crate::estimator::{Attention, Estimator, Forward, Grads, MethodInfo, ParamGrad, Saved};
use crate::inputs::{AttentionInputs, Dims, ValueProjection};
use crate::linalg::{multiversion, zeroed};
use crate::matrix::{MatMut, MatRef, matmul, product};
use crate::memory::{Memory, Sizes};
use crate::methods::exact::Exact;
use crate::params::{Auto, Rule, param_error, positive, resolve_scale, scale_rule};
use crate::rng::{GOLDEN, mix64, stream};
use crate::sampling::build_alias;
use crate::tiles::{KEY_TILE, QUERY_BLOCK};

mod backward;

crate::choice! {
    /// Sampling distribution over the input features.
    pub enum Probs {
        /// `p_h(k) ∝ ‖W_h[k, :]‖²`, one distribution per head (the paper's).
        Weight = "weight",
        /// `p_h(k) ∝ |x_j[k]|·‖W_h[k, :]‖`, one per token (optimal for a single product).
        InputAware = "input-aware",
    }
}

crate::choice! {
    /// Whose draws a token uses.
    pub enum Draws {
        /// Every token draws its own indices (independent errors across tokens).
        Token = "token",
        /// One index stream per (batch, head); token `j` uses its first `r_j` draws, as the
        /// reference CUDA kernel does (each token still unbiased, errors correlated across
        /// tokens), which turns the sampled projection into blocked GEMMs.
        Shared = "shared",
    }
}

crate::method_params! {
    /// MCA `mca`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Mca {
        /// error bound: r_j = min(floor((n_eff max_i A_ij / alpha)^2), d_model)
        pub alpha: f32 = 0.3, positive();
        /// p(k) ~ |row k of W_h|^2 (paper), or ~ |x_k| |row k of W_h| per token
        pub probs: Probs = Probs::Weight;
        /// independent draws per token, or one stream per head whose prefixes the tokens use
        /// (the reference's; blocked GEMMs, correlated errors)
        pub draws: Draws = Draws::Token,
            Rule::any().note("`shared` needs probs=weight");
        /// softmax temperature s in softmax(s * Q K^T)
        pub scale: Auto<f32> = Auto::Auto, scale_rule();
    }
}

/// What MCA computes once per weight matrix: each head's weights packed contiguously, their row
/// norms, Frobenius norms and (for `probs=weight`) alias tables of `p_h`.
#[derive(Debug, Clone)]
pub struct Prepared {
    d_model: usize,
    heads: usize,
    d_v: usize,
    /// `W_h`, `[heads, d_model, d_v]`.
    packed: Vec<f32>,
    /// `‖W_h[k, :]‖`, `[heads, d_model]`.
    norms: Vec<f32>,
    /// `‖W_h‖_F`, `[heads]`.
    frob: Vec<f32>,
    /// `p_h(k) = ‖W_h[k]‖² / ‖W_h‖_F²`, `[heads, d_model]`.
    p: Vec<f32>,
    /// `1/p_h(k)` (`+∞` where `p = 0`: never drawn), `[heads, d_model]`.
    inv_p: Vec<f32>,
    /// Alias tables of `p_h`, `[heads, d_model]`: the acceptance threshold (out of 2³²) in the
    /// high half, the alias in the low half.
    table: Vec<u64>,
}

impl Prepared {
    /// Prepares W_V `[d_model, heads·d_v]` (row-major) for sampling.
    pub fn new(wv: &[f32], d_model: usize, heads: usize, d_v: usize) -> Result<Prepared> {
        let cols = heads
            .checked_mul(d_v)
            .filter(|c| *c > 0 && d_model > 0)
            .ok_or_else(|| Error::shape("wv", "needs d_model, heads and d_v of at least 1"))?;
        if wv.len() != d_model * cols {
            return Err(Error::shape(
                "wv",
                format!(
                    "has {} elements but [d_model, heads·d_v] = [{d_model}, {cols}] needs {}",
                    wv.len(),
                    d_model * cols
                ),
            ));
        }
        crate::inputs::check_finite("wv", wv)?;
        let mut packed = vec![0.0f32; heads * d_model * d_v];
        for (h, ph) in packed.chunks_exact_mut(d_model * d_v).enumerate() {
            for (k, row) in ph.chunks_exact_mut(d_v).enumerate() {
                row.copy_from_slice(&wv[k * cols + h * d_v..k * cols + (h + 1) * d_v]);
            }
        }
        let sq: Vec<f64> = packed
            .chunks_exact(d_v)
            .map(|r| r.iter().map(|v| (*v as f64) * (*v as f64)).sum())
            .collect();
        let norms: Vec<f32> = sq.iter().map(|v| v.sqrt() as f32).collect();
        let mut frob = Vec::with_capacity(heads);
        let mut p = vec![0.0f32; heads * d_model];
        let mut threshold = vec![0u32; heads * d_model];
        let mut alias = vec![0u32; heads * d_model];
        for h in 0..heads {
            let sqh = &sq[h * d_model..(h + 1) * d_model];
            let total: f64 = sqh.iter().sum();
            frob.push(total.sqrt() as f32);
            if total > 0.0 {
                let probs: Vec<f64> = sqh.iter().map(|v| v / total).collect();
                for (a, b) in p[h * d_model..(h + 1) * d_model].iter_mut().zip(&probs) {
                    *a = *b as f32;
                }
                build_alias(
                    &probs,
                    &mut threshold[h * d_model..(h + 1) * d_model],
                    &mut alias[h * d_model..(h + 1) * d_model],
                );
            }
        }
        Ok(Prepared {
            d_model,
            heads,
            d_v,
            packed,
            norms,
            frob,
            inv_p: p.iter().map(|v| 1.0 / v).collect(),
            table: threshold
                .iter()
                .zip(&alias)
                .map(|(t, a)| ((*t as u64) << 32) | *a as u64)
                .collect(),
            p,
        })
    }

    /// `(d_model, heads, d_v)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.d_model, self.heads, self.d_v)
    }

    /// The paper's sampling probabilities `p_h`, `[heads, d_model]`.
    pub fn probabilities(&self) -> &[f32] {
        &self.p
    }

    /// `‖W_h‖_F` per head.
    pub fn frobenius(&self) -> &[f32] {
        &self.frob
    }

    fn head(&self, h: usize) -> &[f32] {
        &self.packed[h * self.d_model * self.d_v..(h + 1) * self.d_model * self.d_v]
    }
}

/// Budgets, FLOP fractions and bounds of one forward.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostics {
    /// `r_{h,j}`, `[batch, heads, n_k]` (0 for masked tokens).
    pub budgets: Vec<u32>,
    /// Mean `r/d_model` over the unmasked tokens, `[batch, heads]`: the fraction of the value
    /// projection's multiply-adds performed on real tokens.
    pub flop_fraction: Vec<f32>,
    /// Mean `r/d_model` over all `n_k` positions (padding counted, as the paper's code does).
    pub flop_fraction_padded: Vec<f32>,
    /// `α·β·‖W_h‖_F`, `[batch, heads]`.
    pub bound: Vec<f32>,
    /// `n_eff` per batch element.
    pub n_eff: Vec<usize>,
}

/// The sampled indices of one token.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenSamples {
    /// `r ≥ d_model`: the exact row.
    Exact,
    /// Distinct sampled features and their weights `c_k = count_k/(r·p(k))`:
    /// `Ṽ[j] = Σ c_k x_j[k] W_h[k, :] + b_h` (empty for `r = 0`).
    Sampled(Vec<(u32, f32)>),
}

/// Sampled value rows and the samples behind them.
#[derive(Debug, Clone)]
pub struct SampledValues {
    /// `Ṽ`, `[batch, heads, n_k, d_v]`, bias included.
    pub values: Vec<f32>,
    heads: Vec<HeadSamples>,
}

impl SampledValues {
    /// The samples of token `j` of head `bh` (= batch · heads + head).
    pub fn token(&self, bh: usize, j: usize) -> TokenSamples {
        let hs = &self.heads[bh];
        if hs.is_exact[j] {
            return TokenSamples::Exact;
        }
        let mut merged: Vec<(u32, f32)> = Vec::new();
        hs.for_each_entry(j, |k, c| match merged.iter_mut().find(|e| e.0 == k) {
            Some(e) => e.1 += c,
            None => merged.push((k, c)),
        });
        TokenSamples::Sampled(merged)
    }

    fn bytes(&self) -> usize {
        4 * self.values.len()
            + self
                .heads
                .iter()
                .map(|h| {
                    5 * h.offsets.len()
                        + 8 * h.entries.len()
                        + 4 * h.exact.len()
                        + h.shared
                            .as_ref()
                            .map_or(0, |s| 4 * (2 * s.stream.len() + s.r.len()))
                })
                .sum::<usize>()
    }
}

/// The samples of one head. Per-token draws, CSR: token `j`'s entries are
/// `entries[offsets[j]..offsets[j+1]]`; shared draws: `shared`. Exact tokens are marked by
/// `is_exact` and listed in `exact`.
#[derive(Debug, Clone)]
struct HeadSamples {
    offsets: Vec<u32>,
    entries: Vec<(u32, f32)>,
    is_exact: Vec<bool>,
    exact: Vec<u32>,
    shared: Option<SharedStream>,
}

/// One head's shared index stream: token `j` uses draws `0..r[j]`, each with weight
/// `inv_p[k_t]/r[j]`.
#[derive(Debug, Clone)]
struct SharedStream {
    stream: Vec<u32>,
    inv_p: Vec<f32>,
    r: Vec<u32>,
}

impl HeadSamples {
    /// Calls `f(k, c)` for every sampled feature of token `j` (duplicates possible with shared
    /// draws; nothing for exact and zero-budget tokens).
    fn for_each_entry(&self, j: usize, mut f: impl FnMut(u32, f32)) {
        if self.is_exact[j] {
            return;
        }
        match &self.shared {
            None => {
                for &(k, c) in &self.entries[self.offsets[j] as usize..self.offsets[j + 1] as usize]
                {
                    f(k, c);
                }
            }
            Some(s) => {
                let r = s.r[j] as usize;
                let inv_r = 1.0 / r.max(1) as f32;
                for (&k, &ip) in s.stream[..r].iter().zip(&s.inv_p) {
                    f(k, ip * inv_r);
                }
            }
        }
    }
}

/// State saved for the backward.
#[derive(Debug, Clone)]
pub struct McaSaved {
    sampled: SampledValues,
    exact: Saved,
    /// Mean of [`Diagnostics::flop_fraction`].
    flop_fraction: f64,
}

fn projection<'a>(x: &AttentionInputs<'a>) -> Result<ValueProjection<'a>> {
    x.value_projection().ok_or_else(|| {
        Error::shape(
            "x",
            "is missing: mca samples the value projection, so it needs the layer input X and \
             W_V (AttentionInputs::with_value_projection; CLI: --x and --wv)",
        )
    })
}

/// Whether query `i` of batch `b` takes part in the column maxima.
fn query_counts(x: &AttentionInputs<'_>, b: usize, i: usize) -> bool {
    let dims = x.dims();
    x.query_mask_row(b).is_none_or(|m| m[i])
        && (dims.n_q != dims.n_k || x.key_mask_row(b).is_none_or(|m| m[i]))
}

impl Mca {
    /// Prepares W_V for this method (see [`Prepared::new`]).
    pub fn prepare(
        &self,
        wv: &[f32],
        d_model: usize,
        heads: usize,
        d_v: usize,
    ) -> Result<Prepared> {
        Prepared::new(wv, d_model, heads, d_v)
    }

    /// The exact value projection `X·W_V + b_V`, `[batch, n_k, heads·d_v]` (heads side by side,
    /// as a model computes it): one GEMM, split into row blocks over the thread pool. The
    /// yardstick for the sampled path's wall-clock.
    pub fn exact_projection(x: &AttentionInputs<'_>) -> Result<Vec<f32>> {
        let proj = projection(x)?;
        let Dims { heads, d_v, .. } = x.dims();
        let (d_model, cols) = (proj.d_model, heads * d_v);
        let mut out = zeroed(proj.x.len() / d_model * cols);
        const ROWS: usize = 64;
        out.par_chunks_mut(ROWS * cols)
            .zip(proj.x.par_chunks(ROWS * d_model))
            .for_each(|(o, xr)| {
                let rows = xr.len() / d_model;
                matmul(
                    MatMut::new(o, rows, cols),
                    false,
                    MatRef::new(xr, rows, d_model),
                    MatRef::new(proj.wv, d_model, cols),
                    1.0,
                );
                if let Some(bv) = proj.bv {
                    for row in o.chunks_exact_mut(cols) {
                        for (a, b) in row.iter_mut().zip(bv) {
                            *a += b;
                        }
                    }
                }
            });
        Ok(out)
    }

    /// The budgets `r_{h,j}` (`[batch, heads, n_k]`) and `n_eff` per batch element.
    pub fn budgets(
        &self,
        x: &AttentionInputs<'_>,
        d_model: usize,
    ) -> Result<(Vec<u32>, Vec<usize>)> {
        self.validate()?;
        let Dims {
            batch,
            heads,
            n_q,
            n_k,
            d,
            ..
        } = x.dims();
        let scale = resolve_scale(self.scale, d);
        // Row log-sum-exps from the exact kernel, with a one-column V of zeros (negligible A·V).
        let zeros = vec![0.0f32; batch * heads * n_k];
        let mut probe = AttentionInputs::new(
            x.q(),
            [batch, heads, n_q, d],
            x.k(),
            [batch, heads, n_k, d],
            &zeros,
            [batch, heads, n_k, 1],
        )?;
        if let Some(m) = x.key_mask() {
            probe = probe.with_key_mask(m)?;
        }
        let exact = Exact { scale: self.scale };
        let (_, lse) = exact.forward_with_lse(&probe)?;
        let n_eff: Vec<usize> = (0..batch)
            .map(|b| {
                x.key_mask_row(b)
                    .map_or(n_k, |m| m.iter().filter(|k| **k).count())
            })
            .collect();
        let mut budgets = vec![0u32; batch * heads * n_k];
        budgets.par_chunks_mut(n_k).enumerate().for_each(|(bh, r)| {
            let b = bh / heads;
            let lse_h = &lse[bh * n_q..(bh + 1) * n_q];
            let log_max = column_log_max(x, bh, scale, lse_h);
            let keep = x.key_mask_row(b);
            for (j, (rj, lm)) in r.iter_mut().zip(&log_max).enumerate() {
                if keep.is_some_and(|m| !m[j]) || *lm == f32::NEG_INFINITY {
                    continue;
                }
                let v = n_eff[b] as f64 * (*lm as f64).exp() / self.alpha as f64;
                *rj = (v * v).floor().min(d_model as f64) as u32;
            }
        });
        Ok((budgets, n_eff))
    }

    /// Samples `Ṽ` for the given budgets (`[batch, heads, n_k]`, clamped to `d_model`).
    pub fn sample_values(
        &self,
        x: &AttentionInputs<'_>,
        prep: &Prepared,
        budgets: &[u32],
        seed: u64,
    ) -> Result<SampledValues> {
        self.validate()?;
        let proj = projection(x)?;
        let Dims {
            batch,
            heads,
            n_k,
            d_v,
            ..
        } = x.dims();
        if prep.dims() != (proj.d_model, heads, d_v) {
            return Err(Error::shape(
                "prepared",
                format!(
                    "was made for (d_model, heads, d_v) = {:?} but the inputs have {:?}",
                    prep.dims(),
                    (proj.d_model, heads, d_v)
                ),
            ));
        }
        if budgets.len() != batch * heads * n_k {
            return Err(Error::shape(
                "budgets",
                format!(
                    "has {} elements but [batch, heads, n_k] = [{batch}, {heads}, {n_k}] needs {}",
                    budgets.len(),
                    batch * heads * n_k
                ),
            ));
        }
        let mut values = zeroed(batch * heads * n_k * d_v);
        let head_samples: Vec<HeadSamples> = values
            .par_chunks_mut(n_k * d_v)
            .enumerate()
            .map(|(bh, vals)| {
                self.sample_head(
                    &proj,
                    prep,
                    &budgets[bh * n_k..(bh + 1) * n_k],
                    bh,
                    seed,
                    vals,
                )
            })
            .collect();
        Ok(SampledValues {
            values,
            heads: head_samples,
        })
    }

    /// One head: exact tokens by one GEMM, sampled tokens by a sparse-times-dense product with
    /// their distinct sampled features, then the bias. `bh` is the (batch, head) index.
    fn sample_head(
        &self,
        proj: &ValueProjection<'_>,
        prep: &Prepared,
        budgets: &[u32],
        bh: usize,
        seed: u64,
        vals: &mut [f32],
    ) -> HeadSamples {
        let (d_model, heads, d_v) = prep.dims();
        let (b, h) = (bh / heads, bh % heads);
        let n_k = budgets.len();
        let xb = &proj.x[b * n_k * d_model..(b + 1) * n_k * d_model];
        let w = prep.head(h);
        let mut hs = HeadSamples {
            offsets: Vec::with_capacity(n_k + 1),
            entries: Vec::new(),
            is_exact: vec![false; n_k],
            exact: Vec::new(),
            shared: None,
        };
        let mut distinct = Distinct {
            counts: vec![0u32; d_model],
            drawn: vec![0u32; d_model + 1],
        };
        let mut raw: Vec<u64> = Vec::with_capacity(d_model);
        let mut cdf = vec![0.0f64; d_model];
        let table = &prep.table[h * d_model..(h + 1) * d_model];
        let inv_p = &prep.inv_p[h * d_model..(h + 1) * d_model];
        let sampler = HeadSampler { table, inv_p, w };
        let norms = &prep.norms[h * d_model..(h + 1) * d_model];
        let head_key = stream(seed, b, h, "mca/samples").next_u64();
        if self.draws == Draws::Shared {
            for (j, &r) in budgets.iter().enumerate() {
                if r as usize >= d_model {
                    hs.is_exact[j] = true;
                    hs.exact.push(j as u32);
                }
            }
            if prep.frob[h] > 0.0 {
                hs.shared = Some(shared_rows(head_key, budgets, xb, w, table, inv_p, vals));
            }
        }
        for (j, &r) in budgets.iter().enumerate() {
            if self.draws == Draws::Shared {
                break;
            }
            let r = r.min(d_model as u32);
            hs.offsets.push(hs.entries.len() as u32);
            if r as usize == d_model {
                hs.is_exact[j] = true;
                hs.exact.push(j as u32);
                continue;
            }
            if r == 0 || prep.frob[h] == 0.0 {
                continue;
            }
            let xj = &xb[j * d_model..(j + 1) * d_model];
            let key = token_key(head_key, j);
            let start = hs.entries.len();
            match self.probs {
                Probs::Weight => {
                    weight_token(
                        key,
                        r as usize,
                        &sampler,
                        xj,
                        &mut distinct,
                        &mut hs.entries,
                        &mut vals[j * d_v..(j + 1) * d_v],
                    );
                    continue;
                }
                Probs::InputAware => {
                    let mut total = 0.0f64;
                    for ((c, xv), nv) in cdf.iter_mut().zip(xj).zip(norms) {
                        total += (xv.abs() * nv) as f64;
                        *c = total;
                    }
                    if total > 0.0 {
                        // The last feature with positive weight: rounding at u → 1 must not
                        // land on a zero-weight one.
                        let last = (0..d_model)
                            .rev()
                            .find(|&k| xj[k] != 0.0 && norms[k] > 0.0)
                            .unwrap_or(d_model - 1);
                        let Distinct { counts, drawn } = &mut distinct;
                        let mut unique = 0usize;
                        token_draws(key, r as usize, &mut raw);
                        for &u in &raw {
                            let target = (u >> 11) as f64 * (total / (1u64 << 53) as f64);
                            let k = cdf.partition_point(|c| *c <= target).min(last);
                            drawn[unique] = k as u32;
                            unique += (counts[k] == 0) as usize;
                            counts[k] += 1;
                        }
                        for &k in &drawn[..unique] {
                            let pk = (xj[k as usize].abs() * norms[k as usize]) as f64 / total;
                            let c = (counts[k as usize] as f64 / (r as f64 * pk)) as f32;
                            hs.entries.push((k, c));
                            counts[k as usize] = 0;
                        }
                    }
                }
            }
            sparse_row(
                &hs.entries[start..],
                xj,
                w,
                &mut vals[j * d_v..(j + 1) * d_v],
            );
        }
        hs.offsets.resize(n_k + 1, hs.entries.len() as u32);
        // Exact tokens: gather their rows of X and do one GEMM.
        if !hs.exact.is_empty() {
            let ne = hs.exact.len();
            let mut xe = vec![0.0f32; ne * d_model];
            for (row, &j) in xe.chunks_exact_mut(d_model).zip(&hs.exact) {
                row.copy_from_slice(&xb[j as usize * d_model..(j as usize + 1) * d_model]);
            }
            let ve = product(
                MatRef::new(&xe, ne, d_model),
                MatRef::new(w, d_model, d_v),
                1.0,
            );
            for (row, &j) in ve.chunks_exact(d_v).zip(&hs.exact) {
                vals[j as usize * d_v..(j as usize + 1) * d_v].copy_from_slice(row);
            }
        }
        if let Some(bv) = proj.bv {
            let bh = &bv[h * d_v..(h + 1) * d_v];
            for row in vals.chunks_exact_mut(d_v) {
                for (o, bb) in row.iter_mut().zip(bh) {
                    *o += bb;
                }
            }
        }
        hs
    }

    /// The forward with a prepared W_V, returning the diagnostics too.
    pub fn forward_prepared(
        &self,
        x: &AttentionInputs<'_>,
        prep: &Prepared,
        seed: u64,
    ) -> Result<(Forward, Diagnostics)> {
        self.validate()?;
        let (output, saved, diagnostics) = self.forward_state(x, prep, seed)?;
        let forward = Forward {
            output,
            saved: Saved::new::<Mca>(x.dims(), saved),
        };
        Ok((forward, diagnostics))
    }

    /// The output, the saved state and the diagnostics (parameters already validated).
    fn forward_state(
        &self,
        x: &AttentionInputs<'_>,
        prep: &Prepared,
        seed: u64,
    ) -> Result<(Vec<f32>, McaSaved, Diagnostics)> {
        let proj = projection(x)?;
        let dims = x.dims();
        let Dims {
            batch, heads, n_k, ..
        } = dims;
        let d_model = proj.d_model;
        let (budgets, n_eff) = self.budgets(x, d_model)?;
        let sampled = self.sample_values(x, prep, &budgets, seed)?;
        let inner = self.with_values(x, &sampled.values)?;
        let exact = Exact { scale: self.scale };
        let fwd = exact.forward(&inner, seed)?;
        // Diagnostics.
        let mut flop_fraction = vec![0.0f32; batch * heads];
        let mut flop_fraction_padded = vec![0.0f32; batch * heads];
        let mut bound = vec![0.0f32; batch * heads];
        for (b, &ne) in n_eff.iter().enumerate() {
            let keep = x.key_mask_row(b);
            let xb = &proj.x[b * n_k * d_model..(b + 1) * n_k * d_model];
            let beta = xb
                .chunks_exact(d_model)
                .enumerate()
                .filter(|(j, _)| keep.is_none_or(|m| m[*j]))
                .map(|(_, r)| {
                    r.iter()
                        .map(|v| (*v as f64) * (*v as f64))
                        .sum::<f64>()
                        .sqrt()
                })
                .sum::<f64>()
                / ne.max(1) as f64;
            for h in 0..heads {
                let bh = b * heads + h;
                let r = &budgets[bh * n_k..(bh + 1) * n_k];
                let total: f64 = r.iter().map(|v| *v as f64).sum();
                flop_fraction[bh] = (total / (ne.max(1) * d_model) as f64) as f32;
                flop_fraction_padded[bh] = (total / (n_k * d_model) as f64) as f32;
                bound[bh] = (self.alpha as f64 * beta * prep.frob[h] as f64) as f32;
            }
        }
        let diagnostics = Diagnostics {
            budgets,
            flop_fraction,
            flop_fraction_padded,
            bound,
            n_eff,
        };
        let f = &diagnostics.flop_fraction;
        let saved = McaSaved {
            sampled,
            exact: fwd.saved,
            flop_fraction: f.iter().map(|v| *v as f64).sum::<f64>() / f.len().max(1) as f64,
        };
        Ok((fwd.output, saved, diagnostics))
    }

    /// The inputs with V replaced by `values` (same Q, K, masks).
    fn with_values<'a>(
        &self,
        x: &AttentionInputs<'a>,
        values: &'a [f32],
    ) -> Result<AttentionInputs<'a>> {
        let d = x.dims();
        let mut inner =
            AttentionInputs::new(x.q(), d.q_shape(), x.k(), d.k_shape(), values, d.v_shape())?;
        if let Some(m) = x.key_mask() {
            inner = inner.with_key_mask(m)?;
        }
        if let Some(m) = x.query_mask() {
            inner = inner.with_query_mask(m)?;
        }
        Ok(inner)
    }
}

/// The key of token `j`'s draws within a head.
fn token_key(head_key: u64, j: usize) -> u64 {
    mix64(head_key ^ mix64((j as u64).wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// Tokens per block of the shared-draw GEMMs.
const SHARED_BLOCK: usize = 32;

/// The sampled tokens of one head with one shared stream `k_0, k_1, …` (token `j` uses its
/// first `r_j` draws): `Z[t] = W[k_t]/p(k_t)`, then for blocks of tokens sorted by budget the
/// gathered `Xs[i, t] = x_{j_i}[k_t]·[t < r_{j_i}]` times `Z` in one GEMM, each row divided by
/// its `r`. Writes the rows into `vals` and returns the stream.
fn shared_rows(
    key: u64,
    budgets: &[u32],
    xb: &[f32],
    w: &[f32],
    table: &[u64],
    inv_p: &[f32],
    vals: &mut [f32],
) -> SharedStream {
    let d_model = table.len();
    let d_v = w.len() / d_model;
    let r: Vec<u32> = budgets
        .iter()
        .map(|&r| if r as usize >= d_model { 0 } else { r })
        .collect();
    let longest = r.iter().copied().max().unwrap_or(0) as usize;
    let stream: Vec<u32> = (1..=longest as u64)
        .map(|t| {
            let u = mix64(key.wrapping_add(t.wrapping_mul(GOLDEN)));
            let i = (((u >> 32) * d_model as u64) >> 32) as usize;
            let e = table[i];
            let keep = ((u as u32) < (e >> 32) as u32) as usize;
            (keep * i + (1 - keep) * (e as u32) as usize) as u32
        })
        .collect();
    let ip: Vec<f32> = stream.iter().map(|&k| inv_p[k as usize]).collect();
    let mut z = vec![0.0f32; longest * d_v];
    for ((row, &k), &c) in z.chunks_exact_mut(d_v).zip(&stream).zip(&ip) {
        for (o, wv) in row
            .iter_mut()
            .zip(&w[k as usize * d_v..(k as usize + 1) * d_v])
        {
            *o = wv * c;
        }
    }
    let mut order: Vec<u32> = (0..r.len() as u32).filter(|&j| r[j as usize] > 0).collect();
    order.sort_by_key(|&j| std::cmp::Reverse(r[j as usize]));
    let mut xs = vec![0.0f32; SHARED_BLOCK * longest];
    let mut out = vec![0.0f32; SHARED_BLOCK * d_v];
    for blk in order.chunks(SHARED_BLOCK) {
        let width = r[blk[0] as usize] as usize;
        let rows = blk.len();
        for (row, &j) in xs.chunks_exact_mut(width).zip(blk) {
            let (j, rj) = (j as usize, r[j as usize] as usize);
            let xj = &xb[j * d_model..(j + 1) * d_model];
            for (o, &k) in row[..rj].iter_mut().zip(&stream) {
                *o = xj[k as usize];
            }
            row[rj..].fill(0.0);
        }
        matmul(
            MatMut::new(&mut out, rows, d_v),
            false,
            MatRef::new(&xs, rows, width),
            MatRef::new(&z, width, d_v),
            1.0,
        );
        for (o, &j) in out.chunks_exact(d_v).zip(blk) {
            let inv = 1.0 / r[j as usize] as f32;
            for (a, b) in vals[j as usize * d_v..(j as usize + 1) * d_v]
                .iter_mut()
                .zip(o)
            {
                *a = b * inv;
            }
        }
    }
    SharedStream {
        stream,
        inv_p: ip,
        r,
    }
}

/// A head's alias table of `p_h`, its `1/p_h` and its weights `W_h` (`d_model × d_v`).
#[derive(Clone, Copy)]
struct HeadSampler<'a> {
    table: &'a [u64],
    inv_p: &'a [f32],
    w: &'a [f32],
}

/// Scratch for merging repeated draws: a count per feature and the distinct features drawn.
struct Distinct {
    counts: Vec<u32>,
    drawn: Vec<u32>,
}

multiversion! {
    /// One token with per-token draws from its head's alias table, all in one vectorised body:
    /// `r` draws (SplitMix64 sequence; branch-free select, since the accept test is a coin flip
    /// no predictor can learn), their distinct features and weights `count/(r·p)` appended to
    /// `entries`, and `out += Σ c·x[k]·W[k, :]`.
    fn weight_token(
        key: u64,
        r: usize,
        sampler: &HeadSampler<'_>,
        x: &[f32],
        distinct: &mut Distinct,
        entries: &mut Vec<(u32, f32)>,
        out: &mut [f32],
    ) {
        let HeadSampler { table, inv_p, w } = *sampler;
        let Distinct { counts, drawn } = distinct;
        let d = table.len() as u64;
        let mut unique = 0usize;
        for t in 1..=r as u64 {
            let u = mix64(key.wrapping_add(t.wrapping_mul(GOLDEN)));
            let i = (((u >> 32) * d) >> 32) as usize;
            let e = table[i];
            let keep = ((u as u32) < (e >> 32) as u32) as usize;
            let k = keep * i + (1 - keep) * (e as u32) as usize;
            drawn[unique] = k as u32;
            unique += (counts[k] == 0) as usize;
            counts[k] += 1;
        }
        let start = entries.len();
        let inv_r = 1.0 / r as f32;
        for &k in &drawn[..unique] {
            let c = counts[k as usize] as f32 * inv_r * inv_p[k as usize];
            entries.push((k, c));
            counts[k as usize] = 0;
        }
        sparse_row_body(&entries[start..], x, w, out);
    }
}

/// `r` draws of token `key`: the SplitMix64 sequence started at `key` (counter-based, so the
/// loop vectorises; every token has its own independent stream).
fn token_draws(key: u64, r: usize, out: &mut Vec<u64>) {
    out.clear();
    out.extend((1..=r as u64).map(|i| mix64(key.wrapping_add(i.wrapping_mul(GOLDEN)))));
}

multiversion! {
    /// `out += Σ c·x[k]·W[k, :]` over the entries `(k, c)` (W row-major, `out.len()` columns).
    fn sparse_row(entries: &[(u32, f32)], x: &[f32], w: &[f32], out: &mut [f32]) {
        sparse_row_body(entries, x, w, out);
    }
}

/// [`sparse_row`]'s body, sixteen columns at a time so that the accumulator stays in
/// registers (inlined into the vectorised callers).
#[inline(always)]
fn sparse_row_body(entries: &[(u32, f32)], x: &[f32], w: &[f32], out: &mut [f32]) {
    let d_v = out.len();
    let mut c0 = 0;
    while c0 + 16 <= d_v {
        let mut acc = [0.0f32; 16];
        for &(k, c) in entries {
            let s = c * x[k as usize];
            let wr = &w[k as usize * d_v + c0..k as usize * d_v + c0 + 16];
            for (a, wv) in acc.iter_mut().zip(wr) {
                *a += s * wv;
            }
        }
        for (o, a) in out[c0..c0 + 16].iter_mut().zip(&acc) {
            *o += a;
        }
        c0 += 16;
    }
    if c0 < d_v {
        for &(k, c) in entries {
            let s = c * x[k as usize];
            let wr = &w[k as usize * d_v + c0..(k as usize + 1) * d_v];
            for (o, wv) in out[c0..].iter_mut().zip(wr) {
                *o += s * wv;
            }
        }
    }
}

multiversion! {
    /// `out = max(out, row − l)` elementwise (NaN-free inputs; written as a compare so that it
    /// vectorises to a packed max).
    fn column_max_update(out: &mut [f32], row: &[f32], l: f32) {
        for (o, v) in out.iter_mut().zip(row) {
            let c = v - l;
            *o = if c > *o { c } else { *o };
        }
    }
}

/// `max_i (s·q_i·k_j − lse_i)` over the counted queries of head `bh`, for every key `j`
/// (`−∞` for masked keys or when no query counts): the log of the column maximum of `A`.
/// Blocked over query blocks and key tiles; no `n_q × n_k` buffer.
fn column_log_max(x: &AttentionInputs<'_>, bh: usize, scale: f32, lse: &[f32]) -> Vec<f32> {
    let Dims {
        heads, n_q, n_k, d, ..
    } = x.dims();
    let b = bh / heads;
    let (q, k) = (x.q_head(bh), x.k_head(bh));
    let keep = x.key_mask_row(b);
    let mut out = vec![f32::NEG_INFINITY; n_k];
    let mut s = vec![0.0f32; QUERY_BLOCK * KEY_TILE];
    for q0 in (0..n_q).step_by(QUERY_BLOCK) {
        let rows = QUERY_BLOCK.min(n_q - q0);
        let counted: Vec<usize> = (0..rows)
            .filter(|&i| query_counts(x, b, q0 + i) && lse[q0 + i].is_finite())
            .collect();
        if counted.is_empty() {
            continue;
        }
        for k0 in (0..n_k).step_by(KEY_TILE) {
            let cols = KEY_TILE.min(n_k - k0);
            matmul(
                MatMut::new(&mut s, rows, cols),
                false,
                MatRef::new(&q[q0 * d..(q0 + rows) * d], rows, d),
                MatRef::new(&k[k0 * d..(k0 + cols) * d], cols, d).t(),
                scale,
            );
            for &i in &counted {
                column_max_update(
                    &mut out[k0..k0 + cols],
                    &s[i * cols..(i + 1) * cols],
                    lse[q0 + i],
                );
            }
        }
    }
    if let Some(m) = keep {
        for (o, kept) in out.iter_mut().zip(m) {
            if !kept {
                *o = f32::NEG_INFINITY;
            }
        }
    }
    out
}

impl Estimator for Mca {
    const INFO: MethodInfo = MethodInfo {
        random: true,
        needs_value_projection: true,
        ..MethodInfo::new(
            "mca",
            "Monte-Carlo Attention: exact softmax, value projection sampled per token \
                  (needs X and W_V: run --x --wv [--bv])",
            "O(n^2 d) attention + sum_j r_j d_v sampled projection, no n x n buffer",
        )
    };
    type Saved = McaSaved;

    fn memory(&self, s: &Sizes) -> Memory {
        let dm = s.d_model;
        // W_V packed per head with its alias tables; budgets; the sampled values and, at
        // worst (every token's budget reaching d_model), d_model (index, weight) entries per
        // token; per head the draw's counts and cumulative sums and the exact tokens' rows.
        let prepared = s.heads * dm * s.d_v + 4 * s.heads * dm;
        let sampled = s.v() + 2 * s.bh() * s.n_k * dm + 3 * s.bh() * s.n_k + 2 * s.bh() * s.n_k;
        let head = 6 * dm + s.n_k * (dm + s.d_v) + 2 * s.n_k;
        let (inner_f, inner_fb) = exact_memory(s).values(s);
        let forward = prepared + sampled + s.parallel_heads() * head + inner_f + 3 * s.bh();
        // Backward: the inner exact backward, dX, dW_V, db_V, per head the dense products of
        // the sampled rows.
        let x = s.batch * s.n_k * dm;
        let back_head = 2 * dm * s.d_v + s.n_k * (dm + s.d_v) + SHARED_BLOCK as u128 * dm;
        let backward = (inner_fb - inner_f)
            + x
            + s.heads * dm * s.d_v * 2
            + s.heads * s.d_v
            + s.parallel_heads() * back_head;
        Memory::from_values(s, forward, forward + backward)
    }

    fn check(&self) -> Result<()> {
        if self.draws == Draws::Shared && self.probs == Probs::InputAware {
            return Err(param_error(
                Self::INFO.name,
                "draws",
                "`token`, or `shared` (with probs=weight)",
                "`shared` with probs=input-aware (a per-token distribution cannot share draws)"
                    .to_string(),
            ));
        }
        Ok(())
    }

    fn saved_bytes(s: &McaSaved) -> usize {
        s.sampled.bytes() + s.exact.bytes()
    }

    fn value_flop_fraction(s: &McaSaved) -> Option<f64> {
        Some(s.flop_fraction)
    }

    fn forward_saved(&self, x: &AttentionInputs<'_>, seed: u64) -> Result<(Vec<f32>, McaSaved)> {
        let proj = projection(x)?;
        let dims = x.dims();
        let prep = Prepared::new(proj.wv, proj.d_model, dims.heads, dims.d_v)?;
        let (output, saved, _) = self.forward_state(x, &prep, seed)?;
        Ok((output, saved))
    }

    fn backward_saved(
        &self,
        x: &AttentionInputs<'_>,
        seed: u64,
        st: &McaSaved,
        grad_output: &[f32],
    ) -> Result<Grads> {
        let proj = projection(x)?;
        let dims = x.dims();
        let Dims {
            batch,
            heads,
            n_k,
            d_v,
            ..
        } = dims;
        let d_model = proj.d_model;
        let cols = heads * d_v;
        let inner = self.with_values(x, &st.sampled.values)?;
        let exact = Exact { scale: self.scale };
        let g = exact.backward(&inner, seed, &st.exact, grad_output)?;
        let dvt = &g.dv; // ∂L/∂Ṽ, [batch, heads, n_k, d_v]
        let dbv = backward::bias_grad(dvt, dims);
        let dwv = backward::weight_grad(&proj, &st.sampled, dvt, dims);
        let dx = backward::input_grad(&proj, &st.sampled, dvt, dims);
        let mut params = vec![
            ParamGrad {
                name: "x",
                shape: vec![batch, n_k, d_model],
                grad: dx,
            },
            ParamGrad {
                name: "wv",
                shape: vec![d_model, cols],
                grad: dwv,
            },
        ];
        if proj.bv.is_some() {
            params.push(ParamGrad {
                name: "bv",
                shape: vec![cols],
                grad: dbv,
            });
        }
        Ok(Grads {
            dq: g.dq,
            dk: g.dk,
            dv: zeroed(x.v().len()),
            params,
        })
    }
}
