//! YOSO: attention as Bernoulli sampling with locality-sensitive hashing.
//!
//! Zeng, Xiong, Ravi, Acharya, Fung, Singh, *You Only Sample (Almost) Once: Linear Cost
//! Self-Attention Via Bernoulli Sampling*, ICML 2021 (arXiv 2111.09714); official code
//! `github.com/mlpen/YOSO`. Brief: `shared/papers/yoso.md`.
//!
//! # The estimator
//!
//! Softmax is replaced by a collision kernel. With `q̂, k̂` the L2-normalised rows and
//! `θ_ij = arccos(q̂_i·k̂_j)`, the weight of key `j` for query `i` is the probability that a
//! τ-bit random-hyperplane hash puts them in the same bucket,
//!
//! ```text
//! B_ij = (1 − θ_ij/π)^τ ,    Y_raw = (B ⊙ M) V ,    Y = rownormalise(Y_raw) [+ conv(V ⊙ mask)]
//! ```
//!
//! (`M` the mask, `rownormalise(y) = y / max(‖y‖₂, 10⁻¹²)`, which stands in for softmax's
//! row-sum normalisation; `B` has none).
//!
//! - [`Yoso`] (`yoso`) samples: `m` independent hashes `c_h`; keys scatter-add their V rows into
//!   bucket sums, each query reads its bucket: `Ŷ_raw,i = (1/m) Σ_h Σ_{j: c_h(k_j)=c_h(q_i)} v_j`.
//!   With SimHash, `E[Ŷ_raw] = Y_raw` exactly and each entry of the implied `B̂` has variance
//!   `B_ij(1 − B_ij)/m`; the fast hash is close to that. Cost `O(m·(n_q + n_k)·d_v)` plus hashing
//!   (`O(n·m·τ·d)` SimHash, `O(n·⌈m/⌊d_pad/τ⌋⌉·d_pad log d_pad)` fast). Memory: the codes,
//!   `4·m·(n_q + n_k)` bytes per head (saved for the backward), plus per worker thread one
//!   bucket-sum table of at most `4·max(n_k, 1024)·d_v` floats — `2^τ` rows while τ is small,
//!   one row per non-empty bucket (by sorting the codes) when `2^τ` would exceed that — so no
//!   `2^τ × d_v` table ever explodes memory (τ up to 30 is accepted).
//! - [`YosoE`] (`yoso-e`) computes the expectation `Y_raw = (B ⊙ M) V` exactly, blocked
//!   (`O(n_q·n_k·(d + d_v))` time, `O(n·d)` memory).
//! - `conv = w > 0` adds YOSO-C's branch: a depthwise convolution of the masked V along the
//!   sequence, one `w`-tap kernel per head shared by all features of the head (zero-padded,
//!   centred, cross-correlation as PyTorch's `Conv2d`), added after the normalisation.
//!
//! # Backward
//!
//! `G = ∂L/∂Y_raw` (through the output normalisation). Exactly, `dV = B̃ᵀ G`,
//! `dq̂_i = Σ_j (g_i·v_j) B'(x_ij) k̂_j` and symmetrically for `k̂_j`, with
//! `B'(x) = τ (1 − θ/π)^{τ−1} / (π sin θ)`, which is infinite at `x = ±1`. Three choices
//! (`backward`):
//!
//! - `surrogate-lsh` (the paper's default, `yoso` only): `B' ≈ (τ/2)·B`, with `B̂` from the
//!   **same hash codes** as the forward: `dQ̂ = (τ/2)·[(G Vᵀ) ⊙ B̂] K̂`, `dK̂` symmetric,
//!   `dV = B̂ᵀ G` — the exact gradient of the sampled forward with respect to V. Linear time:
//!   colliding pairs are walked bucket by bucket (cost ∝ collisions), switching to outer-product
//!   sums in large buckets so the worst case is `O(m·n·d·d_v)`.
//! - `surrogate-exact-b` (default of `yoso-e`; also allowed for `yoso`): the same formula with the
//!   exact `B`, O(n²). For `yoso`, `dV` stays the exact `B̂ᵀ G`.
//! - `true` (`yoso-e` only): the exact derivative, with `x` clamped to `±`
//!   [`expectation::SLOPE_CLAMP`] inside `B'` (see there).
//!
//! The surrogate is a lower bound of the true slope: `B'/B = τ / (sin θ (π − θ)) ≥ 0.5495 τ`.
//! All three then differentiate the input and output normalisations and the conv branch; the
//! conv kernel's gradient is returned as the parameter gradient `conv_weights` (`[heads, w]`).
//!
//! # Masks, randomness, conventions
//!
//! Masked keys are never inserted into a bucket (nor weighted in `yoso-e`); masked queries output
//! zero and pass no gradient. The hashes of head `(b, h)` come from
//! `rng::stream(seed, b, h, "yoso/hash")` and are shared by its queries and keys; they do not
//! depend on the thread count, and different seeds give independent hashes.
//!
//! Where we differ from the reference code on purpose: the padding mask is honoured (HF turns a
//! 0/1 mask into all ones); queries are hashed with their own codes (HF's SimHash path reused the
//! key codes); any `n` (the kernels skip the last `n mod 8` tokens), any `d` and `d_v` (the fast
//! hash pads to a power of two internally instead of requiring `d ∈ {32, 64, …}`); and a query
//! that collides with no key in any hash outputs zero and passes **no** gradient, where
//! `F.normalize` would pass `dY/10⁻¹²`.

mod buckets;
pub mod expectation;
pub mod hash;
mod lanes;
#[cfg(target_arch = "x86_64")]
mod rows;
#[cfg(target_arch = "x86_64")]
mod rows_avx2;

use rayon::prelude::*;

use crate::error::Result;
use crate::estimator::{Attention, Estimator, Grads, MethodInfo, TensorParam};
use crate::inputs::{AttentionInputs, Dims};
use crate::linalg::zeroed;
use crate::memory::{Memory, Sizes};
use crate::params::{Auto, Rule, auto, in_range, one_of};
use crate::rng::stream;

use super::conv;
pub use super::conv::{MAX_CONV, seeded_conv_weights};

use buckets::{Codes, Coefs, CumulationScratch, RowLayout, cumulate};
use expectation::{Head, Slope};
pub use hash::{HashFamily, LshHash, MAX_TAU, NO_CODE};

/// Row norms below this are clamped in `x / max(‖x‖, NORM_EPS)` (as `torch.nn.functional.normalize`).
pub const NORM_EPS: f32 = 1e-12;
/// Largest number of hashes accepted.
pub const MAX_HASHES: usize = 4096;
/// Range of the automatic code length `τ = ⌈log2 n_k⌉`.
pub const AUTO_TAU_RANGE: (u32, u32) = (4, 20);
/// Work is split into about this many tasks (heads × hash or key chunks). A constant rather
/// than the thread count, so the summation order — hence every bit of the result — does not
/// depend on the machine. With 8 or more heads each head is one task, accumulating straight into
/// its output (no per-chunk buffers).
const TASKS: usize = 8;

crate::choice! {
    /// Which backward pass a YOSO method runs.
    pub enum YosoBackward {
        /// `B' ≈ (τ/2) B̂` with the forward's hash codes; linear time (sampled `yoso` only).
        SurrogateLsh = "surrogate-lsh",
        /// `B' ≈ (τ/2) B` with the exact `B`; O(n²).
        SurrogateExactB = "surrogate-exact-b",
        /// The exact derivative of `B` (`yoso-e` only); O(n²).
        True = "true",
    }
}

/// The valid code lengths.
fn tau_rule() -> Rule<Auto<u32>> {
    auto(
        "ceil(log2 n_k) clamped to 4..=20",
        in_range(1, MAX_TAU as u64),
    )
}

/// The backward passes of `yoso`.
fn yoso_backward_rule() -> Rule<YosoBackward> {
    one_of(&[YosoBackward::SurrogateLsh, YosoBackward::SurrogateExactB]).hint(|_| {
        "; the sampled forward is piecewise constant in Q and K, use yoso-e for the exact \
         derivative of the expectation"
    })
}

/// The backward passes of `yoso-e`.
fn yoso_e_backward_rule() -> Rule<YosoBackward> {
    one_of(&[YosoBackward::SurrogateExactB, YosoBackward::True])
        .hint(|_| "; yoso-e has no hash codes, use surrogate-exact-b")
}

const CONV_WEIGHTS: TensorParam = TensorParam {
    name: "conv_weights",
    shape: "[heads, conv]",
    rank: 2,
};

crate::method_params! {
    /// The sampled LSH estimator `yoso`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Yoso {
        /// hash code length tau in bits; larger = sharper attention
        pub tau: Auto<u32> = Auto::Auto, tau_rule();
        /// number of independent hashes (samples) m
        pub m: usize = 32, in_range(1, MAX_HASHES as u64);
        /// hash family: Hadamard pseudo-rotation or Gaussian hyperplanes
        pub hash: HashFamily = HashFamily::Fast;
        /// L2-normalise output rows (false: raw estimate of B V)
        pub normalize: bool = true;
        /// YOSO-C: depthwise conv window on V along the sequence, added to the output
        pub conv: usize = 0, conv::window_rule();
        /// conv kernels [heads, conv], row-major; `auto` = seeded U(-1/sqrt(w), 1/sqrt(w))
        pub conv_weights: Auto<Vec<f32>> = Auto::Auto, conv::weights_rule();
        /// gradient: tau/2 surrogate with the forward's codes (linear) or with exact B (n^2)
        pub backward: YosoBackward = YosoBackward::SurrogateLsh, yoso_backward_rule();
    }
}

crate::method_params! {
    /// The expectation `yoso-e` (exact `B`, O(n²)). See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct YosoE {
        /// hash code length tau in bits; larger = sharper attention
        pub tau: Auto<u32> = Auto::Auto, tau_rule();
        /// L2-normalise output rows (false: raw estimate of B V)
        pub normalize: bool = true;
        /// YOSO-C: depthwise conv window on V along the sequence, added to the output
        pub conv: usize = 0, conv::window_rule();
        /// conv kernels [heads, conv], row-major; `auto` = seeded U(-1/sqrt(w), 1/sqrt(w))
        pub conv_weights: Auto<Vec<f32>> = Auto::Auto, conv::weights_rule();
        /// gradient: tau/2 surrogate with exact B, or the exact derivative
        pub backward: YosoBackward = YosoBackward::SurrogateExactB, yoso_e_backward_rule();
    }
}

/// The parameters shared by `yoso` and `yoso-e`, with the method's name for error messages.
struct Common<'a> {
    method: &'static str,
    tau: Auto<u32>,
    normalize: bool,
    conv: usize,
    conv_weights: &'a Auto<Vec<f32>>,
    backward: YosoBackward,
}

impl Common<'_> {
    /// τ for these inputs.
    fn tau(&self, n_k: usize) -> u32 {
        self.tau.or_else(|| auto_tau(n_k))
    }

    /// The conv kernels for `heads` heads (`None` when conv is off); checks the self-attention
    /// shape and the weights' count.
    fn conv_kernels(&self, dims: Dims, seed: u64) -> Result<Option<Vec<f32>>> {
        conv::kernels(self.method, self.conv, self.conv_weights, dims, seed)
    }
}

/// `⌈log2 n_k⌉` clamped to [`AUTO_TAU_RANGE`].
pub fn auto_tau(n_k: usize) -> u32 {
    let log2 = usize::BITS - n_k.saturating_sub(1).leading_zeros();
    log2.clamp(AUTO_TAU_RANGE.0, AUTO_TAU_RANGE.1)
}

impl Yoso {
    fn common(&self) -> Common<'_> {
        Common {
            method: Self::INFO.name,
            tau: self.tau,
            normalize: self.normalize,
            conv: self.conv,
            conv_weights: &self.conv_weights,
            backward: self.backward,
        }
    }

    /// The deterministic method this estimator is unbiased for (with SimHash; approximately with
    /// the fast hash): `yoso-e` with the same τ, normalisation and conv branch.
    pub fn expectation(&self) -> YosoE {
        YosoE {
            tau: self.tau,
            normalize: self.normalize,
            conv: self.conv,
            conv_weights: self.conv_weights.clone(),
            backward: YosoBackward::SurrogateExactB,
        }
    }

    /// The hash functions of head `(b, h)` for these inputs and seed (the ones the forward uses).
    pub fn hasher(&self, dims: Dims, seed: u64, b: usize, h: usize) -> Result<LshHash> {
        self.validate()?;
        let tau = self.common().tau(dims.n_k);
        LshHash::draw(
            self.hash,
            dims.d,
            tau,
            self.m,
            &mut stream(seed, b, h, "yoso/hash"),
        )
    }
}

impl YosoE {
    fn common(&self) -> Common<'_> {
        Common {
            method: Self::INFO.name,
            tau: self.tau,
            normalize: self.normalize,
            conv: self.conv,
            conv_weights: &self.conv_weights,
            backward: self.backward,
        }
    }
}

/// What the backward of either YOSO method needs.
#[derive(Debug, Clone)]
pub struct YosoSaved {
    tau: u32,
    /// Hash-major codes per head (`[bh][m][n_q]`, `[bh][m][n_k]`); empty for `yoso-e`.
    q_codes: Vec<u32>,
    k_codes: Vec<u32>,
    m: usize,
    /// The attention branch of the output (after normalisation, before conv).
    attention: Vec<f32>,
    /// `‖Y_raw,i‖` per row (when normalising).
    norms: Vec<f32>,
    /// Conv kernels used, `[heads, w]`.
    conv_weights: Option<Vec<f32>>,
}

impl YosoSaved {
    fn bytes(&self) -> usize {
        4 * (self.q_codes.len()
            + self.k_codes.len()
            + self.attention.len()
            + self.norms.len()
            + self.conv_weights.as_ref().map_or(0, Vec::len))
    }
}

/// YOSO's memory: the output and its saved attention branch, the row norms; YOSO-E's
/// normalised copies of Q and K; with `m` hashes of `τ` bits (`Some((m, τ))`) the hash codes of every head
/// (saved), each thread's bucket index (a `2^τ`-slot table and a group of hashes' bucket ids
/// while `2^τ ≤ 4·max(n, 1024)`, else sorted keys) with at most `n` bucket sums of `w` values
/// (one per occupied bucket, over a group's hashes), and the partial sums of hash
/// chunks run in parallel; without (YOSO-E) each thread's collision-probability tiles. The
/// backward, with the output and saved state held, adds the gradients, the output gradient
/// through the normalisation, the normalised copies and per head its dense gradient rows.
fn yoso_memory(s: &Sizes, normalize: bool, conv: usize, hashes: Option<(usize, u32)>) -> Memory {
    let n = s.n_q.max(s.n_k);
    // YOSO-E normalises copies of Q and K; YOSO's hasher normalises each row as it hashes it.
    let copies = if normalize && hashes.is_none() {
        s.q() + s.k()
    } else {
        0
    };
    let conv = s.bh() * (conv as u128 + 1) + s.heads * conv as u128;
    let mut held = 2 * s.o() + s.bh() * s.n_q + conv;
    let (forward, work_b) = match hashes {
        Some((m, tau)) => {
            let m = m as u128;
            let slots = 1u128 << tau;
            let dense = slots
                <= (buckets::DENSE_SLOTS_PER_TOKEN as u128)
                    * n.max(buckets::DENSE_MIN_TOKENS as u128);
            // Dense: the slot array and a group's bucket ids; sorted: keys, ids and bounds.
            let index = if dense {
                slots + 2 * buckets::MAX_GROUP as u128 * n
            } else {
                10 * n
            };
            let chunks = (TASKS as u128).div_ceil(s.bh().max(1)).clamp(1, m);
            held += s.bh() * m * (s.n_q + s.n_k);
            // Codes of a head before they are merged, and a block's projections (≤ 32 bits).
            let hashing = s.threads * (2 * n * m + 64 * 32 * m);
            let table = s.threads * (index + n * (s.d_v + 1));
            let partials = s.parallel_heads() * chunks * s.n_q * s.d_v;
            let table_b = s.threads * (index + n * (s.d.max(s.d_v) + 1));
            let partials_b = s.parallel_heads() * chunks * n * (s.d + s.d_v + 1);
            (
                held + copies + hashing + table + partials,
                table_b + partials_b,
            )
        }
        None => {
            let tiles = s.threads * 3 * (expectation::QUERY_BLOCK * expectation::KEY_TILE) as u128;
            (held + copies + tiles, tiles)
        }
    };
    let per_head = n * (2 * s.d + s.d_v + 1);
    let backward = s.grads() + s.o() + copies + work_b + s.parallel_heads() * per_head;
    Memory::from_values(s, forward, held + backward)
}

/// `x / max(‖x‖, NORM_EPS)` row by row; returns the normalised rows and the norms.
fn normalize_rows(x: &[f32], w: usize) -> (Vec<f32>, Vec<f32>) {
    let mut out = x.to_vec();
    let norms = normalize_rows_in_place(&mut out, w);
    (out, norms)
}

/// Rows per parallel task of the row-wise passes.
const ROW_TASK: usize = 512;

/// `x ← x / max(‖x‖, NORM_EPS)` row by row, in parallel; returns the norms.
fn normalize_rows_in_place(x: &mut [f32], w: usize) -> Vec<f32> {
    let mut norms = zeroed(x.len() / w);
    x.par_chunks_mut(ROW_TASK * w)
        .zip(norms.par_chunks_mut(ROW_TASK))
        .for_each(|(rows, norms)| {
            for (row, norm) in rows.chunks_exact_mut(w).zip(norms) {
                *norm = normalize_row(row);
            }
        });
    norms
}

/// `row ← row / max(‖row‖, NORM_EPS)`; returns `‖row‖`.
#[inline]
fn normalize_row(row: &mut [f32]) -> f32 {
    let norm = buckets::dot(row, row).sqrt();
    let inv = 1.0 / norm.max(NORM_EPS);
    for v in row.iter_mut() {
        *v *= inv;
    }
    norm
}

/// The end of one head's sampled forward, row by row while its sums are in cache: `raw ←
/// scale · raw`, normalised when `normalize` (each row's norm into `norms`), and copied into
/// `attention` (the state the backward keeps). The same operations in the same order as
/// [`finish_forward`]'s passes over all heads.
fn finish_head(
    raw: &mut [f32],
    attention: &mut [f32],
    norms: &mut [f32],
    w: usize,
    scale: f32,
    normalize: bool,
) {
    let rows = raw.chunks_exact_mut(w).zip(attention.chunks_exact_mut(w));
    for ((row, copy), norm) in rows.zip(norms) {
        for v in row.iter_mut() {
            *v *= scale;
        }
        if normalize {
            *norm = normalize_row(row);
        }
        copy.copy_from_slice(row);
    }
}

/// Backward of `y = x / max(‖x‖, ε)` in place: `dy ← (dy − y (y·dy)) / ‖x‖` (or `dy/ε` when
/// `‖x‖ ≤ ε`, the clamped branch). With `zero_at_zero`, rows whose `‖x‖` is exactly 0 pass no
/// gradient (see the module documentation).
fn normalize_backward(dy: &mut [f32], y: &[f32], norms: &[f32], w: usize, zero_at_zero: bool) {
    dy.par_chunks_mut(ROW_TASK * w)
        .zip(y.par_chunks(ROW_TASK * w))
        .zip(norms.par_chunks(ROW_TASK))
        .for_each(|((dy, y), norms)| {
            for ((g, y), &norm) in dy.chunks_exact_mut(w).zip(y.chunks_exact(w)).zip(norms) {
                normalize_backward_row(g, y, norm, zero_at_zero);
            }
        });
}

/// [`normalize_backward`] of one row.
#[inline]
fn normalize_backward_row(g: &mut [f32], y: &[f32], norm: f32, zero_at_zero: bool) {
    if norm > NORM_EPS {
        let proj = buckets::dot(g, y);
        let inv = 1.0 / norm;
        for (gv, yv) in g.iter_mut().zip(y) {
            *gv = (*gv - yv * proj) * inv;
        }
    } else if zero_at_zero && norm == 0.0 {
        g.fill(0.0);
    } else {
        for gv in g.iter_mut() {
            *gv /= NORM_EPS;
        }
    }
}

thread_local! {
    /// Per-thread bucket tables and index buffers of the cumulations and pair walks, reused across
    /// heads and calls so the hot loops neither allocate nor page-fault.
    static SCRATCH: std::cell::RefCell<CumulationScratch> =
        std::cell::RefCell::new(CumulationScratch::default());
}

/// Splits `m` hashes into chunks so that `heads × chunks ≈ TASKS`.
fn hash_chunks(m: usize, heads: usize) -> Vec<std::ops::Range<usize>> {
    let chunks = TASKS.div_ceil(heads).clamp(1, m);
    let per = m.div_ceil(chunks);
    (0..m)
        .step_by(per)
        .map(|h0| h0..(h0 + per).min(m))
        .collect()
}

/// `out ← Σ_{h} T_h[c_h(dst)]` over all `m` hashes, split over hash chunks run in parallel and
/// summed in a fixed order.
fn parallel_cumulate(
    codes: Codes<'_>,
    src_vals: &[f32],
    out: &mut [f32],
    w: usize,
    m: usize,
    heads: usize,
) {
    let chunks = hash_chunks(m, heads);
    if chunks.len() == 1 {
        SCRATCH.with_borrow_mut(|scratch| cumulate(codes, src_vals, out, w, 0..m, scratch));
        return;
    }
    let partials: Vec<Vec<f32>> = chunks
        .into_par_iter()
        .map(|hashes| {
            let mut part = vec![0.0f32; out.len()];
            SCRATCH.with_borrow_mut(|scratch| {
                cumulate(codes, src_vals, &mut part, w, hashes, scratch)
            });
            part
        })
        .collect();
    out.copy_from_slice(&partials[0]);
    for p in &partials[1..] {
        buckets::add_assign(out, p);
    }
}

/// The attention branch is done: normalise it, save it, add conv, zero masked queries.
fn finish_forward(
    x: &AttentionInputs<'_>,
    common: &Common<'_>,
    mut raw: Vec<f32>,
    conv_weights: Option<Vec<f32>>,
    tau: u32,
    codes: (Vec<u32>, Vec<u32>, usize),
) -> (Vec<f32>, YosoSaved) {
    let d_v = x.dims().d_v;
    let norms = if common.normalize {
        normalize_rows_in_place(&mut raw, d_v)
    } else {
        Vec::new()
    };
    let attention = raw.clone();
    assemble_forward(x, raw, attention, norms, conv_weights, tau, codes)
}

/// The output and saved state from the normalised attention branch (`output` and `attention`
/// equal): add conv to the output, zero its masked queries.
fn assemble_forward(
    x: &AttentionInputs<'_>,
    mut output: Vec<f32>,
    attention: Vec<f32>,
    norms: Vec<f32>,
    conv_weights: Option<Vec<f32>>,
    tau: u32,
    codes: (Vec<u32>, Vec<u32>, usize),
) -> (Vec<f32>, YosoSaved) {
    if let Some(w) = &conv_weights {
        conv::add_forward(x, &mut output, w);
    }
    x.zero_masked_queries(&mut output);
    let saved = YosoSaved {
        tau,
        q_codes: codes.0,
        k_codes: codes.1,
        m: codes.2,
        attention,
        norms,
        conv_weights,
    };
    (output, saved)
}

impl Estimator for Yoso {
    const INFO: MethodInfo = MethodInfo {
        budget: Some("m"),
        random: true,
        approximates_softmax: false,
        tensor_params: &[CONV_WEIGHTS],
        ..MethodInfo::new(
            "yoso",
            "YOSO: LSH Bernoulli-sampled attention with bucket scatter/gather (ICML 2021)",
            "O(n m d_v + hashing) time, O(n m) memory; linear-time surrogate backward",
        )
    };
    type Saved = YosoSaved;

    fn memory(&self, s: &Sizes) -> Memory {
        yoso_memory(
            s,
            self.normalize,
            self.conv,
            Some((self.m, self.tau.or_else(|| auto_tau(s.n_k as usize)))),
        )
    }

    fn saved_bytes(s: &YosoSaved) -> usize {
        s.bytes()
    }

    fn check(&self) -> Result<()> {
        conv::check(Self::INFO.name, self.conv, &self.conv_weights)
    }

    fn store_tensor(&mut self, _name: &str, data: Vec<f32>, _shape: &[usize]) -> Result<()> {
        self.conv_weights = Auto::Fixed(data);
        Ok(())
    }

    fn expectation(&self) -> Option<Box<dyn Attention + Send + Sync>> {
        Some(Box::new(Yoso::expectation(self)))
    }

    fn forward_saved(&self, x: &AttentionInputs<'_>, seed: u64) -> Result<(Vec<f32>, YosoSaved)> {
        let common = self.common();
        let dims = x.dims();
        let Dims {
            heads,
            n_q,
            n_k,
            d_v,
            ..
        } = dims;
        let conv_weights = common.conv_kernels(dims, seed)?;
        let tau = common.tau(n_k);
        let m = self.m;
        let bhs = dims.batch_heads();
        let mut q_codes = crate::linalg::par_filled(bhs * m * n_q, 0u32);
        let mut k_codes = crate::linalg::par_filled(bhs * m * n_k, 0u32);
        // Every row is written by the cumulation before it is read.
        let mut raw = crate::linalg::par_zeroed(dims.out_len());
        let mut attention = crate::linalg::par_zeroed(dims.out_len());
        let mut norms = zeroed(bhs * n_q);
        raw.par_chunks_mut(n_q * d_v)
            .zip(attention.par_chunks_mut(n_q * d_v))
            .zip(norms.par_chunks_mut(n_q))
            .zip(q_codes.par_chunks_mut(m * n_q))
            .zip(k_codes.par_chunks_mut(m * n_k))
            .enumerate()
            .try_for_each(|(bh, ((((out, att), norms), qc), kc))| -> Result<()> {
                let b = bh / heads;
                // Drawn inside the task: one head's hash functions live at a time.
                let hasher = self.hasher(dims, seed, b, bh % heads)?;
                rayon::join(
                    || hasher.codes(x.q_head(bh), x.query_mask_row(b), qc),
                    || hasher.codes(x.k_head(bh), x.key_mask_row(b), kc),
                );
                let codes = Codes {
                    src: kc,
                    dst: qc,
                    tau,
                };
                parallel_cumulate(codes, x.v_head(bh), out, d_v, m, bhs);
                finish_head(out, att, norms, d_v, 1.0 / m as f32, common.normalize);
                Ok(())
            })?;
        if !common.normalize {
            norms = Vec::new();
        }
        Ok(assemble_forward(
            x,
            raw,
            attention,
            norms,
            conv_weights,
            tau,
            (q_codes, k_codes, m),
        ))
    }

    fn backward_saved(
        &self,
        x: &AttentionInputs<'_>,
        _seed: u64,
        saved: &YosoSaved,
        grad_output: &[f32],
    ) -> Result<Grads> {
        backward(x, &self.common(), saved, grad_output)
    }
}

impl Estimator for YosoE {
    const INFO: MethodInfo = MethodInfo {
        random: false,
        approximates_softmax: false,
        tensor_params: &[CONV_WEIGHTS],
        ..MethodInfo::new(
            "yoso-e",
            "YOSO-E: the expectation of YOSO, B = (1 - arccos(q.k)/pi)^tau, exact and blocked",
            "O(n_q n_k (d + d_v)) time, O(n d) memory",
        )
    };
    type Saved = YosoSaved;

    fn memory(&self, s: &Sizes) -> Memory {
        yoso_memory(s, self.normalize, self.conv, None)
    }

    fn saved_bytes(s: &YosoSaved) -> usize {
        s.bytes()
    }

    fn check(&self) -> Result<()> {
        conv::check(Self::INFO.name, self.conv, &self.conv_weights)
    }

    fn store_tensor(&mut self, _name: &str, data: Vec<f32>, _shape: &[usize]) -> Result<()> {
        self.conv_weights = Auto::Fixed(data);
        Ok(())
    }

    fn uses_seed(&self) -> bool {
        self.conv > 0 && self.conv_weights.is_auto()
    }

    fn forward_saved(&self, x: &AttentionInputs<'_>, seed: u64) -> Result<(Vec<f32>, YosoSaved)> {
        let common = self.common();
        let dims = x.dims();
        let Dims {
            heads,
            n_q,
            n_k,
            d,
            d_v,
            ..
        } = dims;
        let conv_weights = common.conv_kernels(dims, seed)?;
        let tau = common.tau(n_k);
        let (qn, _) = normalize_rows(x.q(), d);
        let (kn, _) = normalize_rows(x.k(), d);
        let mut raw = zeroed(dims.out_len());
        raw.par_chunks_mut(n_q * d_v)
            .enumerate()
            .for_each(|(bh, out_h)| {
                let b = bh / heads;
                let head = Head {
                    q: &qn[bh * n_q * d..(bh + 1) * n_q * d],
                    k: &kn[bh * n_k * d..(bh + 1) * n_k * d],
                    v: x.v_head(bh),
                    keep: x.key_mask_row(b),
                    d,
                    d_v,
                    tau,
                };
                let query_keep = x.query_mask_row(b);
                out_h
                    .par_chunks_mut(expectation::QUERY_BLOCK * d_v)
                    .enumerate()
                    .for_each(|(blk, out)| {
                        let r0 = blk * expectation::QUERY_BLOCK;
                        let rows = out.len() / d_v;
                        if query_keep.is_some_and(|m| m[r0..r0 + rows].iter().all(|k| !k)) {
                            out.fill(0.0);
                            return;
                        }
                        let mut scratch = Vec::new();
                        head.forward_block(&head.q[r0 * d..(r0 + rows) * d], out, &mut scratch);
                    });
            });
        x.zero_masked_queries(&mut raw);
        Ok(finish_forward(
            x,
            &common,
            raw,
            conv_weights,
            tau,
            (Vec::new(), Vec::new(), 0),
        ))
    }

    fn backward_saved(
        &self,
        x: &AttentionInputs<'_>,
        _seed: u64,
        saved: &YosoSaved,
        grad_output: &[f32],
    ) -> Result<Grads> {
        backward(x, &self.common(), saved, grad_output)
    }
}

/// The backward of both methods.
fn backward(
    x: &AttentionInputs<'_>,
    common: &Common<'_>,
    s: &YosoSaved,
    grad_output: &[f32],
) -> Result<Grads> {
    let dims = x.dims();
    let Dims {
        n_q, n_k, d, d_v, ..
    } = dims;
    let bhs = dims.batch_heads();

    // The conv branch sees the gradient of the whole output (masked query rows carry nothing).
    let g_total = s.conv_weights.is_some().then(|| {
        let mut g = grad_output.to_vec();
        x.zero_masked_queries(&mut g);
        g
    });
    let sampled = !s.q_codes.is_empty();
    let mut grads = if sampled && common.backward == YosoBackward::SurrogateLsh {
        // Every element is written once by its head (no zero fill needed).
        let mut grads = Grads::zeros(x);
        grads
            .dq
            .par_chunks_mut(n_q * d)
            .zip(grads.dk.par_chunks_mut(n_k * d))
            .zip(grads.dv.par_chunks_mut(n_k * d_v))
            .enumerate()
            .for_each(|(bh, ((dq, dk), dv))| {
                let head = LshHead {
                    x,
                    saved: s,
                    normalize: common.normalize,
                    grad_output: &grad_output[bh * n_q * d_v..(bh + 1) * n_q * d_v],
                    bh,
                };
                head.backward(bhs, dq, dk, dv);
            });
        grads
    } else {
        exact_b_backward_all(x, common, s, grad_output)
    };
    if let (Some(w), Some(g_total)) = (&s.conv_weights, &g_total) {
        grads
            .params
            .push(conv::add_backward(x, g_total, &mut grads.dv, w));
    }
    Ok(grads)
}

/// The backward passes through the exact `B` (`surrogate-exact-b` for both methods, `true` for
/// `yoso-e`): O(n²), blocked; `yoso` keeps `dV = B̂ᵀ G` from its hash codes.
fn exact_b_backward_all(
    x: &AttentionInputs<'_>,
    common: &Common<'_>,
    s: &YosoSaved,
    grad_output: &[f32],
) -> Grads {
    let Dims {
        heads,
        n_q,
        n_k,
        d,
        d_v,
        ..
    } = x.dims();
    let bhs = x.dims().batch_heads();
    let tau = s.tau;
    // G = ∂L/∂Y_raw: masked query rows carry nothing, then through the output normalisation.
    let mut g = grad_output.to_vec();
    x.zero_masked_queries(&mut g);
    if common.normalize {
        normalize_backward(&mut g, &s.attention, &s.norms, d_v, true);
    }
    let (qn, q_norms) = normalize_rows(x.q(), d);
    let (kn, k_norms) = normalize_rows(x.k(), d);
    let mut grads = Grads::zeros(x);
    let sampled = !s.q_codes.is_empty();
    grads
        .dq
        .par_chunks_mut(n_q * d)
        .zip(grads.dk.par_chunks_mut(n_k * d))
        .zip(grads.dv.par_chunks_mut(n_k * d_v))
        .enumerate()
        .for_each(|(bh, ((dq, dk), dv))| {
            let head = Head {
                q: &qn[bh * n_q * d..(bh + 1) * n_q * d],
                k: &kn[bh * n_k * d..(bh + 1) * n_k * d],
                v: x.v_head(bh),
                keep: x.key_mask_row(bh / heads),
                d,
                d_v,
                tau,
            };
            let g = &g[bh * n_q * d_v..(bh + 1) * n_q * d_v];
            if sampled {
                let m = s.m;
                let qc = &s.q_codes[bh * m * n_q..(bh + 1) * m * n_q];
                let kc = &s.k_codes[bh * m * n_k..(bh + 1) * m * n_k];
                // dV = B̂ᵀ G: the cumulation with the roles of queries and keys swapped.
                let codes = Codes {
                    src: qc,
                    dst: kc,
                    tau,
                };
                parallel_cumulate(codes, g, dv, d_v, m, bhs);
                let inv = 1.0 / m as f32;
                for v in dv.iter_mut() {
                    *v *= inv;
                }
                exact_b_backward(&head, g, Slope::Surrogate, bhs, dq, dk, None);
            } else {
                let slope = match common.backward {
                    YosoBackward::True => Slope::True,
                    _ => Slope::Surrogate,
                };
                exact_b_backward(&head, g, slope, bhs, dq, dk, Some(dv));
            }
        });
    normalize_backward(&mut grads.dq, &qn, &q_norms, d, false);
    normalize_backward(&mut grads.dk, &kn, &k_norms, d, false);
    grads
}

/// One head of the surrogate-lsh backward, straight from the inputs.
struct LshHead<'a> {
    x: &'a AttentionInputs<'a>,
    saved: &'a YosoSaved,
    normalize: bool,
    /// This head's output gradient.
    grad_output: &'a [f32],
    bh: usize,
}

impl LshHead<'_> {
    /// Writes this head's `dq`, `dk` and `dv`: fills the walk's rows (normalised q̂ and k̂, the
    /// output gradient through the output normalisation, V), walks every hash (split into
    /// chunks summed in a fixed order when there are few heads), then differentiates the input
    /// normalisations.
    fn backward(&self, heads_total: usize, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let Dims { d, d_v, .. } = self.x.dims();
        let layout = RowLayout { d, d_v };
        let chunks = hash_chunks(self.saved.m, heads_total);
        if chunks.len() == 1 {
            SCRATCH.with_borrow_mut(|scratch| {
                self.walk(scratch, layout, 0..self.saved.m);
                self.read_out(scratch, layout, dq, dk, dv);
            });
        } else {
            let parts: Vec<[Vec<f32>; 3]> = chunks
                .into_par_iter()
                .map(|hashes| {
                    let mut part = [
                        vec![0.0f32; dq.len()],
                        vec![0.0f32; dk.len()],
                        vec![0.0f32; dv.len()],
                    ];
                    let [pq, pk, pv] = &mut part;
                    SCRATCH.with_borrow_mut(|scratch| {
                        self.walk(scratch, layout, hashes);
                        self.read_out(scratch, layout, pq, pk, pv);
                    });
                    part
                })
                .collect();
            dq.copy_from_slice(&parts[0][0]);
            dk.copy_from_slice(&parts[0][1]);
            dv.copy_from_slice(&parts[0][2]);
            for [pq, pk, pv] in &parts[1..] {
                buckets::add_assign(dq, pq);
                buckets::add_assign(dk, pk);
                buckets::add_assign(dv, pv);
            }
        }
        project_normalized(dq, self.x.q_head(self.bh), d);
        project_normalized(dk, self.x.k_head(self.bh), d);
    }

    /// Fills the rows and walks `hashes`.
    fn walk(
        &self,
        scratch: &mut CumulationScratch,
        layout: RowLayout,
        hashes: std::ops::Range<usize>,
    ) {
        let (x, s, bh) = (self.x, self.saved, self.bh);
        let Dims {
            heads,
            n_q,
            n_k,
            d,
            d_v,
            ..
        } = x.dims();
        let query_keep = x.query_mask_row(bh / heads);
        let (query_rows, key_rows) = scratch.pair_rows(layout, n_q, n_k);
        for (i, (row, q)) in query_rows
            .chunks_exact_mut(layout.query_stride())
            .zip(x.q_head(bh).chunks_exact(d))
            .enumerate()
        {
            normalized_into(&mut row[..d], q);
            if query_keep.is_some_and(|k| !k[i]) {
                continue; // masked queries pass no gradient (their g stays 0)
            }
            let g = &mut row[d..d + d_v];
            g.copy_from_slice(&self.grad_output[i * d_v..(i + 1) * d_v]);
            if self.normalize {
                let r = bh * n_q + i;
                normalize_backward_row(g, &s.attention[r * d_v..(r + 1) * d_v], s.norms[r], true);
            }
        }
        for ((row, k), v) in key_rows
            .chunks_exact_mut(layout.key_stride())
            .zip(x.k_head(bh).chunks_exact(d))
            .zip(x.v_head(bh).chunks_exact(d_v))
        {
            normalized_into(&mut row[..d], k);
            row[d..d + d_v].copy_from_slice(v);
        }
        let m = s.m;
        let inv = 1.0 / m as f32;
        let codes = Codes {
            src: &s.k_codes[bh * m * n_k..(bh + 1) * m * n_k],
            dst: &s.q_codes[bh * m * n_q..(bh + 1) * m * n_q],
            tau: s.tau,
        };
        let coefs = Coefs {
            coef: 0.5 * s.tau as f32 * inv,
            dv_coef: inv,
        };
        buckets::walk_prepared(scratch, layout, codes, hashes, coefs);
    }

    /// Copies the accumulated `dq̂`, `dk̂` and `dV` out of the rows (overwriting the slices).
    fn read_out(
        &self,
        scratch: &CumulationScratch,
        layout: RowLayout,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let (query_rows, key_rows) = scratch.walked_rows();
        for (out, row) in dq
            .chunks_exact_mut(layout.d)
            .zip(query_rows.chunks_exact(layout.query_stride()))
        {
            out.copy_from_slice(layout.dq(row));
        }
        for ((dk, dv), row) in dk
            .chunks_exact_mut(layout.d)
            .zip(dv.chunks_exact_mut(layout.d_v))
            .zip(key_rows.chunks_exact(layout.key_stride()))
        {
            dk.copy_from_slice(layout.dk(row));
            dv.copy_from_slice(layout.dv(row));
        }
    }
}

/// `out ← x / max(‖x‖, NORM_EPS)`.
fn normalized_into(out: &mut [f32], x: &[f32]) {
    let inv = 1.0 / buckets::dot(x, x).sqrt().max(NORM_EPS);
    for (o, v) in out.iter_mut().zip(x) {
        *o = v * inv;
    }
}

/// Backward of the row normalisation of `x` (`n × w`, raw rows) applied in place to `grad`:
/// `grad ← (grad − x̂ (x̂·grad)) / ‖x‖`, or `grad/ε` on the clamped branch.
fn project_normalized(grad: &mut [f32], x: &[f32], w: usize) {
    let mut unit = vec![0.0f32; w];
    for (g, row) in grad.chunks_exact_mut(w).zip(x.chunks_exact(w)) {
        let norm = buckets::dot(row, row).sqrt();
        normalized_into(&mut unit, row);
        normalize_backward_row(g, &unit, norm, false);
    }
}

/// The blocked exact-`B` backward of one head, parallel over key chunks: each chunk owns its
/// slice of dK̂ (and dV) and a private dQ̂, summed in a fixed order.
fn exact_b_backward(
    head: &Head<'_>,
    g: &[f32],
    slope: Slope,
    heads: usize,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: Option<&mut [f32]>,
) {
    let (d, d_v) = (head.d, head.d_v);
    let n_k = head.k.len() / d;
    let tiles = n_k.div_ceil(expectation::KEY_TILE);
    let chunks = TASKS.div_ceil(heads).clamp(1, tiles);
    let chunk_keys = tiles.div_ceil(chunks) * expectation::KEY_TILE;
    let run = |c: usize, dk_c: &mut [f32], dv_c: Option<&mut [f32]>| {
        let mut dq_c = zeroed(dq.len());
        expectation::backward_chunk(head, g, slope, c * chunk_keys, &mut dq_c, dk_c, dv_c);
        dq_c
    };
    let partial_dq: Vec<Vec<f32>> = match dv {
        Some(dv) => dk
            .par_chunks_mut(chunk_keys * d)
            .zip(dv.par_chunks_mut(chunk_keys * d_v))
            .enumerate()
            .map(|(c, (dk_c, dv_c))| run(c, dk_c, Some(dv_c)))
            .collect(),
        None => dk
            .par_chunks_mut(chunk_keys * d)
            .enumerate()
            .map(|(c, dk_c)| run(c, dk_c, None))
            .collect(),
    };
    for p in &partial_dq {
        buckets::add_assign(dq, p);
    }
}
