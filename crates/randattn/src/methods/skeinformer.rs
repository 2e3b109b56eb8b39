//! Skeinformer: attention by matrix sketching, and the V-Mean baseline.
//!
//! Chen, Zeng, Hakkani-Tur, Jin, Ji, Yang, *Sketching as a Tool for Understanding and
//! Accelerating Self-attention for Long Sequences*, NAACL 2022 (arXiv 2112.05359); official code
//! `github.com/pkuzengqi/Skeinformer`. Brief: `shared/papers/skeinformer.md` (§2.3 is the
//! algorithm below, §2.5 the ablations).
//!
//! # The estimator (the released algorithm)
//!
//! Per batch element, `d_p = min(budget, unmasked queries)` **pilot** query rows `J` are drawn
//! uniformly with replacement from the unmasked queries and shared by all heads. Per head:
//!
//! 1. their exact masked softmax rows `B_J` (and outputs `B_J V`);
//! 2. column weights `p_j ∝ ‖B_J[:, j]‖₂ · ‖v_j‖₂` (0 for masked columns);
//! 3. `d_c = min(budget, #{p_j > 0})` columns `J'` drawn **without** replacement from `p`
//!    (Gumbel-top-k, which has the law of sequential sampling without replacement);
//! 4. with `L = s·Q K_{J'}ᵀ`, `a_ik = exp(L_ik − max_k L_ik)` and the geometric mean of the row's
//!    sampled scores `g_i = exp(mean_k L_ik − max_k L_ik)`, **adaptive row normalisation**
//!    fills every unselected unmasked entry with `g_i`:
//!
//!    ```text
//!    R_i = (Σ_k a_ik v_{j'_k} + g_i · Σ_{j unmasked, ∉ J'} v_j) / (Σ_k a_ik + (m − d_c)·g_i)
//!    ```
//!
//!    with `m` the number of unmasked keys (not the padded length);
//! 5. **pilot reuse**: the rows in `J` are overwritten with their exact outputs.
//!
//! With `d_c = m` every column is kept and `R` is exact attention. Cost `O(n·d·(d_p + d_c))`
//! time (four `n × budget × d` products) and `O(n·d + budget·n)` memory; the pilot rows and
//! column weights are computed tile by tile, never as an `n × n` matrix.
//!
//! # Ablations (each changes one switch of the full method)
//!
//! - `columns=uniform`: `p_j` uniform over the unmasked columns (the pilot is then only used for
//!   reuse).
//! - `row_norm=simple`: softmax over the sampled columns only (no fill-in).
//! - `row_norm=exact`: the exact row sums, `R_i = Σ_k b_{i j'_k} v_{j'_k}`: **O(n²) time** (it
//!   runs the exact kernel on V restricted to the sampled columns), O(n·d) memory.
//! - `row_norm=none`: no heuristic normalisation — the sketch of the paper's Proposition 1,
//!   `R_i = Σ_k b_{i j'_k} v_{j'_k} / (d_c·p_{j'_k})` with importance weights and the exact
//!   softmax rows; O(n²) time like `exact`.
//! - `pilot_reuse=false`: the pilot rows keep their sketched output.
//!
//! Unlike the reference code, whose `simple` and `exact` ablations also drop pilot reuse (two
//! changes at once), each switch here changes only itself; and `vmean` is its own method.
//!
//! # Backward, masks, randomness, and where we differ from the reference
//!
//! Gradients flow through every computed value with the sampled pilots and columns held fixed
//! (saved by the forward): the exact pilot rows, the sampled scores, the geometric-mean fill and
//! the sum of the unselected values. Masked keys are never sampled and never counted; masked
//! queries are never pilots and output 0. Pilots of batch element `b` come from
//! `rng::stream(seed, b, 0, "skeinformer/pilots")`, the columns of head `(b, h)` from
//! `rng::stream(seed, b, h, "skeinformer/columns")`. The reference applies `exp` to raw logits
//! (here every exponent is shifted by the row maximum, which cancels in the ratio), and uses one
//! budget for the whole batch, `min(256, min_b m_b − 1)`; here each batch element gets its own.

use rand::Rng;
use rayon::prelude::*;

use super::exact::{ExactSaved, exact_memory};
use crate::error::Result;
use crate::estimator::{Attention, Estimator, Grads, MethodInfo};
use crate::inputs::{AttentionInputs, Dims};
use crate::linalg::{dot, exp_shifted_sum, row_max, row_sum};
use crate::matrix::{MatMut, MatRef, matmul, product};
use crate::memory::{Memory, Sizes};
use crate::methods::exact::Exact;
use crate::params::{Auto, in_range, resolve_scale, scale_rule};
use crate::rng::stream;
use crate::sampling::gumbel_top_k;

mod backward;

/// Marks an unused slot in the pilot and column tables.
const NONE: u32 = u32::MAX;
/// Query rows per block of the sketched kernel.
const ROW_BLOCK: usize = 128;
/// Largest budget accepted.
pub const MAX_BUDGET: usize = 1 << 16;

crate::choice! {
    /// How the column weights are chosen.
    pub enum Columns {
        /// `p_j ∝ ‖B_J[:, j]‖·‖v_j‖` from the pilot rows (the paper).
        Importance = "importance",
        /// Uniform over the unmasked columns.
        Uniform = "uniform",
    }
}

crate::choice! {
    /// How the sampled scores are normalised.
    pub enum RowNorm {
        /// Geometric-mean fill of the unselected entries (the paper).
        Adaptive = "adaptive",
        /// Softmax over the sampled columns only.
        Simple = "simple",
        /// Exact row sums (O(n²)).
        Exact = "exact",
        /// Importance-weighted sketch with exact softmax rows (O(n²)).
        None = "none",
    }
}

crate::method_params! {
    /// Skeinformer `skeinformer`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Skeinformer {
        /// sub-sample size d: pilot rows and sampled columns
        pub budget: usize = 256,
            in_range(1, MAX_BUDGET as u64).note("capped by the sequence");
        /// column weights: pilot column norms times value norms, or uniform
        pub columns: Columns = Columns::Importance;
        /// row normalisation (exact and none are O(n^2) ablations)
        pub row_norm: RowNorm = RowNorm::Adaptive;
        /// overwrite the pilot rows with their exact outputs
        pub pilot_reuse: bool = true;
        /// softmax temperature s in softmax(s * Q K^T)
        pub scale: Auto<f32> = Auto::Auto, scale_rule();
    }
}

/// The random choices of one forward, held fixed by the backward.
#[derive(Debug, Clone)]
pub struct SkeinSaved {
    /// `[batch][p_max]` distinct pilot queries (sorted), [`NONE`] in unused slots.
    pilots: Vec<u32>,
    p_max: usize,
    /// `[batch·heads][c_max]` sampled columns (sorted), [`NONE`] in unused slots.
    columns: Vec<u32>,
    /// `[batch·heads][c_max]` the weights `1/(d_c·p_j)` of `row_norm=none` (else empty).
    weights: Vec<f32>,
    c_max: usize,
    /// With pilot reuse: the exact pilot rows' outputs and log-sum-exps, so the backward of
    /// those rows does not recompute them.
    pilot_rows: Option<ExactSaved>,
}

/// What the backward of one head's sketched rows accumulates over its row blocks: the gradients
/// of the sampled key and value rows, of `v_rest`, and reusable scratch.
struct SketchGrads {
    dk_cols: Vec<f32>,
    dv_cols: Vec<f32>,
    dv_rest: Vec<f32>,
    scratch: Vec<f32>,
}

/// The exact pilot rows of every head: outputs `[batch, heads, p_max, d_v]` and log-sum-exps
/// `[batch, heads, p_max]`.
type PilotRows = (Vec<f32>, Vec<f32>);

/// The exact pilot rows of one head.
struct PilotHead {
    /// `p_max × d_v` outputs `B_J V` (zero rows in unused slots).
    output: Vec<f32>,
    /// `p_max` log-sum-exps of the pilot rows' scaled logits, `+∞` for unused slots and rows
    /// with no unmasked key (the exact kernel's convention).
    lse: Vec<f32>,
    /// `Σ_t c_t · B_J[t, j]²` per column.
    col_sq: Vec<f32>,
}

/// The pilots and columns a forward draws, for diagnostics and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    /// Distinct pilot queries of each batch element, sorted.
    pub pilots: Vec<Vec<u32>>,
    /// How often each of those pilots was drawn (the column weights count repeats).
    pub pilot_draws: Vec<Vec<u32>>,
    /// Sampled columns of each head `[batch·heads]`, sorted.
    pub columns: Vec<Vec<u32>>,
    /// Column probabilities `p_j` of each head (normalised; 0 for masked columns).
    pub probabilities: Vec<Vec<f32>>,
}

impl Skeinformer {
    fn exact(&self) -> Exact {
        Exact { scale: self.scale }
    }

    /// Draws the pilots of every batch element: distinct indices and their multiplicities.
    fn draw_pilots(&self, x: &AttentionInputs<'_>, seed: u64) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
        let Dims { batch, n_q, .. } = x.dims();
        (0..batch)
            .map(|b| {
                let eligible: Vec<u32> = (0..n_q as u32)
                    .filter(|&i| x.query_mask_row(b).is_none_or(|m| m[i as usize]))
                    .collect();
                let draws = self.budget.min(eligible.len());
                let mut rng = stream(seed, b, 0, "skeinformer/pilots");
                let mut counts = std::collections::BTreeMap::new();
                for _ in 0..draws {
                    let i = eligible[rng.random_range(0..eligible.len())];
                    *counts.entry(i).or_insert(0u32) += 1;
                }
                counts.into_iter().unzip()
            })
            .unzip()
    }

    /// All random choices of a forward with `seed`.
    pub fn samples(&self, x: &AttentionInputs<'_>, seed: u64) -> Result<Samples> {
        Ok(self.sample_with_pilots(x, seed)?.0)
    }

    /// The samples, and the exact pilot rows' outputs when they were computed (importance
    /// columns or pilot reuse): `[batch, heads, p_max, d_v]` over the pilot table
    /// `table(&samples.pilots)`.
    fn sample_with_pilots(
        &self,
        x: &AttentionInputs<'_>,
        seed: u64,
    ) -> Result<(Samples, Option<PilotRows>)> {
        self.validate()?;
        let dims = x.dims();
        let (pilots, pilot_draws) = self.draw_pilots(x, seed);
        let (_, p_max) = table(&pilots);
        let need_pilot_rows =
            p_max > 0 && (self.pilot_reuse || self.columns == Columns::Importance);
        // Per head: the exact pilot rows (outputs, log-sum-exps, weighted squared column sums),
        // then the column draw.
        let per_head: Vec<(Vec<u32>, Vec<f32>, Option<PilotHead>)> = (0..dims.batch_heads())
            .into_par_iter()
            .map(|bh| {
                let b = bh / dims.heads;
                let pilot = need_pilot_rows
                    .then(|| self.pilot_pass(x, bh, &pilots[b], &pilot_draws[b], p_max));
                let col_sq = pilot.as_ref().map(|p| p.col_sq.as_slice());
                let (cols, prob) = self.draw_columns(x, seed, bh, col_sq);
                (cols, prob, pilot)
            })
            .collect();
        let mut columns = Vec::with_capacity(per_head.len());
        let mut probabilities = Vec::with_capacity(per_head.len());
        let (mut pilot_out, mut pilot_lse) = (Vec::new(), Vec::new());
        for (cols, prob, pilot) in per_head {
            columns.push(cols);
            probabilities.push(prob);
            if let Some(p) = pilot {
                pilot_out.extend_from_slice(&p.output);
                pilot_lse.extend_from_slice(&p.lse);
            }
        }
        let pilot_rows = need_pilot_rows.then_some((pilot_out, pilot_lse));
        Ok((
            Samples {
                pilots,
                pilot_draws,
                columns,
                probabilities,
            },
            pilot_rows,
        ))
    }

    /// Column probabilities of head `bh` (normalised) and the sampled columns (sorted).
    fn draw_columns(
        &self,
        x: &AttentionInputs<'_>,
        seed: u64,
        bh: usize,
        col_sq: Option<&[f32]>,
    ) -> (Vec<u32>, Vec<f32>) {
        let Dims {
            heads, n_k, d_v, ..
        } = x.dims();
        let (b, h) = (bh / heads, bh % heads);
        let keep = x.key_mask_row(b);
        let mut prob = vec![0.0f32; n_k];
        // Importance weights come from the pilot rows; with no pilot row (every query of this
        // batch element masked, so every output row is zero anyway) the draw is uniform.
        match (self.columns, col_sq) {
            (Columns::Uniform, _) | (Columns::Importance, None) => {
                for (j, p) in prob.iter_mut().enumerate() {
                    if keep.is_none_or(|m| m[j]) {
                        *p = 1.0;
                    }
                }
            }
            (Columns::Importance, Some(col_sq)) => {
                let v = x.v_head(bh);
                for (j, p) in prob.iter_mut().enumerate() {
                    if keep.is_none_or(|m| m[j]) {
                        let vj = &v[j * d_v..(j + 1) * d_v];
                        *p = col_sq[j].sqrt() * dot(vj, vj).sqrt();
                    }
                }
            }
        }
        let total: f64 = prob.iter().map(|p| *p as f64).sum();
        if total > 0.0 {
            for p in prob.iter_mut() {
                *p = (*p as f64 / total) as f32;
            }
        }
        let mut rng = stream(seed, b, h, "skeinformer/columns");
        let chosen = gumbel_top_k(&prob, self.budget, &mut rng);
        (chosen, prob)
    }

    /// The exact softmax rows of the pilots of head `bh` (each drawn `draws[t]` times): their
    /// outputs `B_J V` and the weighted squared column sums `Σ_t c_t · B_J[t, j]²`. One product
    /// `Q_J Kᵀ` kept as a `pilots × n_k` block (the `O(budget·n)` memory of the method), so the
    /// logits are computed once.
    fn pilot_pass(
        &self,
        x: &AttentionInputs<'_>,
        bh: usize,
        pilots: &[u32],
        draws: &[u32],
        p_max: usize,
    ) -> PilotHead {
        let Dims {
            heads, n_k, d, d_v, ..
        } = x.dims();
        let keep = x.key_mask_row(bh / heads);
        let scale = resolve_scale(self.scale, d);
        let (q, k, v) = (x.q_head(bh), x.k_head(bh), x.v_head(bh));
        let p = pilots.len();
        let mut output = vec![0.0f32; p_max * d_v];
        let mut col_sq = vec![0.0f32; n_k];
        let mut lse = vec![f32::INFINITY; p_max];
        if p == 0 {
            return PilotHead {
                output,
                lse,
                col_sq,
            };
        }
        let q_pilot: Vec<f32> = pilots
            .iter()
            .flat_map(|&i| q[i as usize * d..(i as usize + 1) * d].iter().copied())
            .collect();
        let mut probs = product(
            MatRef::new(&q_pilot, p, d),
            MatRef::new(k, n_k, d).t(),
            scale,
        );
        for ((row, &c), l) in probs.chunks_exact_mut(n_k).zip(draws).zip(lse.iter_mut()) {
            if let Some(keep) = keep {
                for (x, kept) in row.iter_mut().zip(keep) {
                    if !kept {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            let max = row_max(row);
            if max == f32::NEG_INFINITY {
                row.fill(0.0); // no unmasked key: the row outputs 0
                continue;
            }
            let sum = exp_shifted_sum(row, max);
            *l = max + sum.ln();
            normalise_and_square(row, 1.0 / sum, c as f32, &mut col_sq);
        }
        matmul(
            MatMut::new(&mut output, p, d_v),
            false,
            MatRef::new(&probs, p, n_k),
            MatRef::new(v, n_k, d_v),
            1.0,
        );
        PilotHead {
            output,
            lse,
            col_sq,
        }
    }
}

crate::linalg::multiversion! {
    /// One pilot row: `b ← b · inv` (the softmax normalisation) and `col_sq += c · b²`.
    fn normalise_and_square(row: &mut [f32], inv: f32, c: f32, col_sq: &mut [f32]) {
        for (b, acc) in row.iter_mut().zip(col_sq.iter_mut()) {
            *b *= inv;
            *acc += c * *b * *b;
        }
    }
}

crate::linalg::multiversion! {
    /// Adaptive row normalisation of a block of sketched rows `out` (`rows × d_v`, holding
    /// `Σ_k a_ik v_k`): `out_i ← (out_i + g_i · v_rest) / den_i`.
    fn fill_and_normalise(out: &mut [f32], v_rest: &[f32], g: &[f32], den: &[f32]) {
        for ((o, g), den) in out.chunks_exact_mut(v_rest.len()).zip(g).zip(den) {
            let inv = 1.0 / den;
            for (ov, u) in o.iter_mut().zip(v_rest) {
                *ov = (*ov + g * u) * inv;
            }
        }
    }
}

/// The sketched rows of one head (adaptive or simple normalisation).
struct SketchHead<'a> {
    q: &'a [f32],
    /// Sampled keys and values, `c × d` and `c × d_v`.
    k_cols: &'a [f32],
    v_cols: &'a [f32],
    /// Sum of the unmasked values outside the sample (adaptive only).
    v_rest: &'a [f32],
    /// Number of unmasked columns outside the sample.
    fill: f32,
    adaptive: bool,
    d: usize,
    d_v: usize,
    scale: f32,
}

impl SketchHead<'_> {
    fn columns(&self) -> usize {
        self.k_cols.len() / self.d
    }

    /// For the rows `r0..r0 + rows`: the scores `a` (in `s`, shifted by each row's maximum),
    /// the fill `g` and the row sums `D`; returns nothing, fills `g` and `den`.
    fn scores(&self, r0: usize, rows: usize, s: &mut [f32], g: &mut [f32], den: &mut [f32]) {
        let (d, c) = (self.d, self.columns());
        matmul(
            MatMut::new(s, rows, c),
            false,
            MatRef::new(&self.q[r0 * d..(r0 + rows) * d], rows, d),
            MatRef::new(self.k_cols, c, d).t(),
            self.scale,
        );
        for ((row, g), den) in s.chunks_exact_mut(c).zip(g.iter_mut()).zip(den.iter_mut()) {
            let max = row_max(row);
            let mean = row_sum(row) / c as f32;
            let sum = exp_shifted_sum(row, max);
            *g = if self.adaptive {
                (mean - max).exp()
            } else {
                0.0
            };
            *den = sum + self.fill * *g;
        }
    }

    /// `out` (`rows × d_v`) ← the sketched output of the rows `r0..r0 + rows`.
    fn forward_block(&self, r0: usize, out: &mut [f32], scratch: &mut Vec<f32>) {
        let (c, d_v) = (self.columns(), self.d_v);
        let rows = out.len() / d_v;
        scratch.resize(rows * (c + 2), 0.0);
        let (s, rest) = scratch.split_at_mut(rows * c);
        let (g, den) = rest.split_at_mut(rows);
        self.scores(r0, rows, s, g, den);
        matmul(
            MatMut::new(out, rows, d_v),
            false,
            MatRef::new(s, rows, c),
            MatRef::new(self.v_cols, c, d_v),
            1.0,
        );
        fill_and_normalise(out, self.v_rest, g, den);
    }

    /// Backward of the rows `r0..r0 + rows` given their output gradient `grad`: adds to `dq`
    /// (those rows) and to the head's accumulators `acc`.
    fn backward_block(&self, r0: usize, grad: &[f32], dq: &mut [f32], acc: &mut SketchGrads) {
        let SketchGrads {
            dk_cols,
            dv_cols,
            dv_rest,
            scratch,
        } = acc;
        let (c, d, d_v) = (self.columns(), self.d, self.d_v);
        let rows = grad.len() / d_v;
        scratch.resize(rows * (2 * c + 2 + 2 * d_v), 0.0);
        let (s, rest) = scratch.split_at_mut(rows * c);
        let (ds, rest) = rest.split_at_mut(rows * c);
        let (g, rest) = rest.split_at_mut(rows);
        let (den, rest) = rest.split_at_mut(rows);
        let (out, dn) = rest.split_at_mut(rows * d_v);
        self.scores(r0, rows, s, g, den);
        matmul(
            MatMut::new(out, rows, d_v),
            false,
            MatRef::new(s, rows, c),
            MatRef::new(self.v_cols, c, d_v),
            1.0,
        );
        // R = N / D with N = a·V_c + g·v_rest: dN = G / D, dD = −(G·R) / D.
        let mut d_den = vec![0.0f32; rows];
        for r in 0..rows {
            let o = &mut out[r * d_v..(r + 1) * d_v];
            let inv = 1.0 / den[r];
            for (ov, u) in o.iter_mut().zip(self.v_rest) {
                *ov = (*ov + g[r] * u) * inv;
            }
            let gr = &grad[r * d_v..(r + 1) * d_v];
            d_den[r] = -dot(gr, o) * inv;
            for (dnv, gv) in dn[r * d_v..(r + 1) * d_v].iter_mut().zip(gr) {
                *dnv = gv * inv;
            }
        }
        // dA = dN V_cᵀ + dD; dL = a ⊙ dA (+ the geometric-mean fill's share, g/c each).
        matmul(
            MatMut::new(ds, rows, c),
            false,
            MatRef::new(dn, rows, d_v),
            MatRef::new(self.v_cols, c, d_v).t(),
            1.0,
        );
        for r in 0..rows {
            let fill_share = if self.adaptive {
                let dg = dot(&dn[r * d_v..(r + 1) * d_v], self.v_rest) + self.fill * d_den[r];
                dg * g[r] / c as f32
            } else {
                0.0
            };
            for (dsv, a) in ds[r * c..(r + 1) * c]
                .iter_mut()
                .zip(&s[r * c..(r + 1) * c])
            {
                *dsv = a * (*dsv + d_den[r]) + fill_share;
            }
            if self.adaptive {
                for (acc, dnv) in dv_rest.iter_mut().zip(&dn[r * d_v..(r + 1) * d_v]) {
                    *acc += g[r] * dnv;
                }
            }
        }
        let q_blk = &self.q[r0 * d..(r0 + rows) * d];
        matmul(
            MatMut::new(dq, rows, d),
            true,
            MatRef::new(ds, rows, c),
            MatRef::new(self.k_cols, c, d),
            self.scale,
        );
        matmul(
            MatMut::new(dk_cols, c, d),
            true,
            MatRef::new(ds, rows, c).t(),
            MatRef::new(q_blk, rows, d),
            self.scale,
        );
        matmul(
            MatMut::new(dv_cols, c, d_v),
            true,
            MatRef::new(s, rows, c).t(),
            MatRef::new(dn, rows, d_v),
            1.0,
        );
    }
}

/// Sampled keys and values of one head gathered contiguously, with the sum of the unmasked
/// values outside the sample and their count.
struct HeadColumns {
    k_cols: Vec<f32>,
    v_cols: Vec<f32>,
    v_rest: Vec<f32>,
    fill: f32,
}

fn gather_columns(x: &AttentionInputs<'_>, bh: usize, cols: &[u32]) -> HeadColumns {
    let Dims { heads, d, d_v, .. } = x.dims();
    let keep = x.key_mask_row(bh / heads);
    let (k, v) = (x.k_head(bh), x.v_head(bh));
    let mut k_cols = Vec::with_capacity(cols.len() * d);
    let mut v_cols = Vec::with_capacity(cols.len() * d_v);
    for &j in cols {
        let j = j as usize;
        k_cols.extend_from_slice(&k[j * d..(j + 1) * d]);
        v_cols.extend_from_slice(&v[j * d_v..(j + 1) * d_v]);
    }
    let mut v_rest = vec![0.0f32; d_v];
    let mut unmasked = 0usize;
    for (j, row) in v.chunks_exact(d_v).enumerate() {
        if keep.is_none_or(|m| m[j]) {
            unmasked += 1;
            for (a, b) in v_rest.iter_mut().zip(row) {
                *a += *b;
            }
        }
    }
    for row in v_cols.chunks_exact(d_v) {
        for (a, b) in v_rest.iter_mut().zip(row) {
            *a -= *b;
        }
    }
    HeadColumns {
        k_cols,
        v_cols,
        v_rest,
        fill: (unmasked - cols.len()) as f32,
    }
}

/// Pads per-group index lists into one table of `width` slots per group ([`NONE`] fills).
fn table(lists: &[Vec<u32>]) -> (Vec<u32>, usize) {
    let width = lists.iter().map(Vec::len).max().unwrap_or(0);
    let mut t = vec![NONE; lists.len() * width];
    for (slots, l) in t.chunks_exact_mut(width.max(1)).zip(lists) {
        slots[..l.len()].copy_from_slice(l);
    }
    (t, width)
}

impl Skeinformer {
    /// The pilot rows as a sub-problem for the exact kernel: queries gathered into
    /// `[batch, heads, p_max, d]` and the mask of used slots. `rows` is Q or an output gradient.
    fn pilot_rows(
        x: &AttentionInputs<'_>,
        pilots: &[u32],
        p_max: usize,
        rows: &[f32],
        w: usize,
    ) -> (Vec<f32>, Vec<bool>) {
        let Dims {
            batch, heads, n_q, ..
        } = x.dims();
        let mut out = vec![0.0f32; batch * heads * p_max * w];
        for (bh, dst) in out.chunks_exact_mut(p_max * w).enumerate() {
            let b = bh / heads;
            for (row, &i) in dst
                .chunks_exact_mut(w)
                .zip(&pilots[b * p_max..(b + 1) * p_max])
            {
                if i != NONE {
                    let at = (bh * n_q + i as usize) * w;
                    row.copy_from_slice(&rows[at..at + w]);
                }
            }
        }
        let slots = pilots.iter().map(|&i| i != NONE).collect();
        (out, slots)
    }

    /// V restricted to the sampled columns of each head, each scaled by its weight (1 for
    /// `row_norm=exact`, `1/(d_c·p_j)` for `none`): the exact kernel on it gives those rows.
    fn weighted_values(&self, x: &AttentionInputs<'_>, s: &SkeinSaved) -> Vec<f32> {
        let Dims { n_k, d_v, .. } = x.dims();
        let mut v = crate::linalg::par_zeroed(x.v().len());
        v.par_chunks_mut(n_k * d_v)
            .enumerate()
            .for_each(|(bh, out)| {
                let src = x.v_head(bh);
                for (slot, &j) in s.columns[bh * s.c_max..(bh + 1) * s.c_max]
                    .iter()
                    .enumerate()
                {
                    if j == NONE {
                        continue;
                    }
                    let j = j as usize;
                    let w = if s.weights.is_empty() {
                        1.0
                    } else {
                        s.weights[bh * s.c_max + slot]
                    };
                    for (o, a) in out[j * d_v..(j + 1) * d_v]
                        .iter_mut()
                        .zip(&src[j * d_v..(j + 1) * d_v])
                    {
                        *o = w * a;
                    }
                }
            });
        v
    }

    fn with_masks<'a>(
        x: &AttentionInputs<'a>,
        sub: AttentionInputs<'a>,
        query_mask: Option<&'a [bool]>,
    ) -> Result<AttentionInputs<'a>> {
        let mut sub = sub;
        if let Some(m) = x.key_mask() {
            sub = sub.with_key_mask(m)?;
        }
        if let Some(m) = query_mask {
            sub = sub.with_query_mask(m)?;
        }
        Ok(sub)
    }
}

impl Estimator for Skeinformer {
    const INFO: MethodInfo = MethodInfo {
        budget: Some("budget"),
        random: true,
        ..MethodInfo::new(
            "skeinformer",
            "Skeinformer: pilot rows, importance column sampling, adaptive row norm, pilot reuse",
            "O(n budget d) time, O(n d + budget n) memory (row_norm=exact|none: O(n^2 d) time)",
        )
    };
    type Saved = SkeinSaved;

    fn memory(&self, s: &Sizes) -> Memory {
        let c = (self.budget as u128).min(s.n_k);
        let rows = ROW_BLOCK as u128;
        // Samples of every head (pilots, columns, column probabilities), the exact pilot rows'
        // outputs, the saved tables; per head the pilots' n_k-wide probability block and the
        // gathered columns, per row block the sketched scores.
        let samples = s.bh() * (s.n_k + 6 * c) + 2 * s.bh() * c * s.d_v;
        let head = c * s.n_k + 3 * s.n_k + 2 * c * s.d + 2 * c * s.d_v + 3 * rows * (c + 1);
        let exact_rows = matches!(self.row_norm, RowNorm::Exact | RowNorm::None);
        let inner = exact_memory(s).values(s);
        let forward =
            s.o() + samples + s.threads * head + if exact_rows { s.v() + inner.0 } else { 0 };
        // Backward: the output gradient split (pilot rows apart), gradients of the sketch
        // and of the pilot rows, and per head the pilots' block again with the columns'.
        let backward = s.o()
            + s.bh() * c * s.d_v
            + 2 * s.grads()
            + s.threads * (head + c * (s.d + s.d_v))
            + if exact_rows { s.v() + inner.1 } else { 0 };
        Memory::from_values(s, forward, forward + backward)
    }

    fn saved_bytes(s: &SkeinSaved) -> usize {
        4 * (s.pilots.len() + s.columns.len() + s.weights.len())
            + s.pilot_rows.as_ref().map_or(0, Exact::saved_bytes)
    }

    fn forward_saved(&self, x: &AttentionInputs<'_>, seed: u64) -> Result<(Vec<f32>, SkeinSaved)> {
        let (samples, pilot_rows) = self.sample_with_pilots(x, seed)?;
        let dims = x.dims();
        let Dims {
            heads, n_q, d, d_v, ..
        } = dims;
        let (pilots, p_max) = table(&samples.pilots);
        let (columns, c_max) = table(&samples.columns);
        let weights = if self.row_norm == RowNorm::None {
            let mut w = vec![0.0f32; columns.len()];
            for (bh, (ws, cols)) in w
                .chunks_exact_mut(c_max.max(1))
                .zip(&samples.columns)
                .enumerate()
            {
                for (wv, &j) in ws.iter_mut().zip(cols) {
                    *wv = 1.0 / (cols.len() as f32 * samples.probabilities[bh][j as usize]);
                }
            }
            w
        } else {
            Vec::new()
        };
        let mut saved = SkeinSaved {
            pilots,
            p_max,
            columns,
            weights,
            c_max,
            pilot_rows: None,
        };
        let scale = resolve_scale(self.scale, d);
        let mut output = match self.row_norm {
            RowNorm::Adaptive | RowNorm::Simple => {
                let mut output = crate::linalg::par_zeroed(dims.out_len());
                output
                    .par_chunks_mut(n_q * d_v)
                    .enumerate()
                    .for_each(|(bh, out)| {
                        let cols = &samples.columns[bh];
                        if cols.is_empty() {
                            // No column with weight: the zero-sample limit, the mean of V.
                            let (mean, _) = x.unmasked_value_mean(bh);
                            for row in out.chunks_exact_mut(d_v) {
                                row.copy_from_slice(&mean);
                            }
                            return;
                        }
                        let hc = gather_columns(x, bh, cols);
                        let head = SketchHead {
                            q: x.q_head(bh),
                            k_cols: &hc.k_cols,
                            v_cols: &hc.v_cols,
                            v_rest: &hc.v_rest,
                            fill: hc.fill,
                            adaptive: self.row_norm == RowNorm::Adaptive,
                            d,
                            d_v,
                            scale,
                        };
                        let mut scratch = Vec::new();
                        for (blk, o) in out.chunks_mut(ROW_BLOCK * d_v).enumerate() {
                            head.forward_block(blk * ROW_BLOCK, o, &mut scratch);
                        }
                    });
                output
            }
            RowNorm::Exact | RowNorm::None => {
                let v = self.weighted_values(x, &saved);
                let sub = AttentionInputs::new(
                    x.q(),
                    dims.q_shape(),
                    x.k(),
                    dims.k_shape(),
                    &v,
                    dims.v_shape(),
                )?;
                let sub = Self::with_masks(x, sub, x.query_mask())?;
                self.exact().forward(&sub, seed)?.output
            }
        };
        if let (true, Some((exact_rows, _))) = (self.pilot_reuse, &pilot_rows) {
            output
                .par_chunks_mut(n_q * d_v)
                .zip(exact_rows.par_chunks(p_max * d_v))
                .enumerate()
                .for_each(|(bh, (out, rows))| {
                    let b = bh / heads;
                    for (row, &i) in rows
                        .chunks_exact(d_v)
                        .zip(&saved.pilots[b * p_max..(b + 1) * p_max])
                    {
                        if i != NONE {
                            let i = i as usize;
                            out[i * d_v..(i + 1) * d_v].copy_from_slice(row);
                        }
                    }
                });
        }
        x.zero_masked_queries(&mut output);
        if self.pilot_reuse {
            saved.pilot_rows = pilot_rows.map(|(out, lse)| ExactSaved::from_parts(lse, out));
        }
        Ok((output, saved))
    }

    fn backward_saved(
        &self,
        x: &AttentionInputs<'_>,
        seed: u64,
        s: &SkeinSaved,
        grad_output: &[f32],
    ) -> Result<Grads> {
        let (g, g_pilot) = self.split_output_gradient(x, s, grad_output);
        let mut grads = match self.row_norm {
            RowNorm::Adaptive | RowNorm::Simple => self.sketch_backward(x, s, &g),
            RowNorm::Exact | RowNorm::None => self.exact_rows_backward(x, s, seed, &g)?,
        };
        if let Some(g_pilot) = g_pilot {
            self.pilot_backward(x, s, seed, &g_pilot, &mut grads)?;
        }
        Ok(grads)
    }
}
