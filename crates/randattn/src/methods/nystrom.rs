//! Nyströmformer: softmax attention through a Nyström approximation with segment-mean landmarks.
//!
//! Xiong, Zeng, Chakraborty, Tan, Fung, Li, Singh, *Nyströmformer: A Nyström-Based Algorithm for
//! Approximating Self-Attention*, AAAI 2021; a baseline of Skeinformer (NAACL 2022). Brief:
//! `shared/papers/skeinformer.md` §3.3.
//!
//! # The estimator
//!
//! With `Q̃`, `K̃` the `m` landmarks (means of `m` contiguous segments of the unmasked queries and
//! of the unmasked keys),
//!
//! ```text
//! Ŝ V = softmax(s·Q K̃ᵀ) · (softmax(s·Q̃ K̃ᵀ))⁺ · (softmax(s·Q̃ Kᵀ + M) V)
//! ```
//!
//! evaluated right to left, so nothing larger than `n × m` is formed: `O(n·m·(d + d_v) + m³)`
//! time, `O(n·m)` memory. The pseudo-inverse `(·)⁺` is the iterative Moore–Penrose method of
//! Razavi et al. (`pinv_iters` steps of `Z ← ¼ Z (13I − A Z (15I − A Z (7I − A Z)))`), started
//! from `Z₀ = Aᵀ / (‖A‖₁ ‖A‖_∞)` with `‖A‖_∞ = 1` (A is row-stochastic) **per matrix** — the
//! reference normalises by the largest column sum over the whole batch and all heads, which
//! couples unrelated heads. Deterministic.
//!
//! With `m` equal to the number of tokens every segment is one token, `Ŝ = S S⁺ S = S`, and the
//! output is exact attention up to the pseudo-inverse's convergence.
//!
//! `conv = w > 0` adds the depthwise convolution skip on the masked V of the original
//! Nyströmformer configs (Skeinformer's configs omit it).
//!
//! # Backward, masks, and where we differ from the reference
//!
//! The backward differentiates the computed function exactly: the three softmaxes, the segment
//! means, the conv skip and every pinv iteration, including the data-dependent scale of `Z₀`.
//! Masked keys are excluded from the key landmarks and from the third kernel; masked queries are
//! excluded from the query landmarks and output 0. The reference zeroes padded rows but keeps
//! them in the segment means (diluting them) and needs `n` divisible by `m`; here segments are
//! formed over the unmasked tokens, their sizes differing by at most one, and `m` is capped by
//! the number of unmasked queries and keys.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::estimator::{Estimator, Grads, MethodInfo, TensorParam};
use crate::inputs::{AttentionInputs, Dims};
use crate::linalg::{softmax_row, softmax_row_backward};
use crate::matrix::{MatMut, MatRef, matmul, product};
use crate::memory::{Memory, Sizes};
use crate::params::{Auto, in_range, resolve_scale, scale_rule};
use crate::pinv::{Pinv, pinv};
use crate::segments::{Larger, segment_means, segments};

mod backward;

use super::conv;

/// Largest landmark count accepted.
pub const MAX_LANDMARKS: usize = 4096;
/// Largest number of pseudo-inverse iterations accepted.
pub const MAX_PINV_ITERS: usize = 100;

crate::method_params! {
    /// Nyströmformer `nystrom`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Nystrom {
        /// number of landmarks m (segment means of queries and keys)
        pub landmarks: usize = 64,
            in_range(1, MAX_LANDMARKS as u64).note("capped by the unmasked tokens");
        /// iterations of the Moore-Penrose pseudo-inverse
        pub pinv_iters: usize = 6, in_range(1, MAX_PINV_ITERS as u64);
        /// depthwise conv window on V along the sequence, added to the output
        pub conv: usize = 0, conv::window_rule();
        /// conv kernels [heads, conv], row-major; `auto` = seeded
        pub conv_weights: Auto<Vec<f32>> = Auto::Auto, conv::weights_rule();
        /// softmax temperature s in softmax(s * Q K^T)
        pub scale: Auto<f32> = Auto::Auto, scale_rule();
    }
}

/// What the backward needs beyond the inputs: the conv kernels used and, per head, the
/// `O(T·m² + m·d_v)` products of the forward that need no `n`-long work to keep (the
/// pseudo-inverse's iterates, `K3 V` and `Z (K3 V)`), so the backward recomputes only the two
/// `n × m` kernels (keeping those would be `O(n·m)` per head).
#[derive(Debug, Clone)]
pub struct NystromSaved {
    conv_weights: Option<Vec<f32>>,
    heads: Vec<Option<Small>>,
}

/// The small products of one head (see [`NystromSaved`]).
#[derive(Debug, Clone)]
struct Small {
    pinv: Pinv,
    /// K3 V and Z (K3 V), `m × d_v`.
    w: Vec<f32>,
    y: Vec<f32>,
}

impl Small {
    fn values(&self) -> usize {
        self.pinv.iterates.iter().map(Vec::len).sum::<usize>() + self.w.len() + self.y.len()
    }
}

/// Softmax backward in place, row by row (`cols` wide): see [`softmax_row_backward`].
fn softmax_backward(dp: &mut [f32], p: &[f32], cols: usize) {
    for (d, p) in dp.chunks_exact_mut(cols).zip(p.chunks_exact(cols)) {
        softmax_row_backward(d, p);
    }
}

/// One head's approximation, with everything its backward needs.
struct Head<'a> {
    m: usize,
    q_idx: Vec<u32>,
    k_idx: Vec<u32>,
    q_segs: Vec<std::ops::Range<usize>>,
    k_segs: Vec<std::ops::Range<usize>>,
    q_land: Vec<f32>,
    k_land: Vec<f32>,
    /// softmax(s Q K̃ᵀ), `n_q × m`.
    k1: Vec<f32>,
    /// softmax(s Q̃ K̃ᵀ), `m × m`.
    k2: Vec<f32>,
    /// softmax(s Q̃ Kᵀ + M), `m × n_k`.
    k3: Vec<f32>,
    small: std::borrow::Cow<'a, Small>,
}

impl Nystrom {
    /// The landmark count of the heads of batch `b`: capped by its unmasked queries and keys.
    fn landmarks_of(&self, x: &AttentionInputs<'_>, b: usize) -> usize {
        let Dims { n_q, n_k, .. } = x.dims();
        let kept = |mask: Option<&[bool]>, n: usize| {
            mask.map_or(n, |mk| mk.iter().filter(|&&k| k).count())
        };
        self.landmarks
            .min(kept(x.query_mask_row(b), n_q))
            .min(kept(x.key_mask_row(b), n_k))
    }

    /// The approximation of head `bh`; `None` when it has no unmasked query or key. With
    /// `small` (the forward's, for the same inputs) the pseudo-inverse and `K3 V` are not
    /// recomputed.
    fn head<'a>(
        &self,
        x: &AttentionInputs<'_>,
        bh: usize,
        small: Option<&'a Small>,
    ) -> Option<Head<'a>> {
        let Dims {
            heads,
            n_q,
            n_k,
            d,
            d_v,
            ..
        } = x.dims();
        let b = bh / heads;
        let scale = resolve_scale(self.scale, d);
        let keep = x.key_mask_row(b);
        let q_idx: Vec<u32> = (0..n_q as u32)
            .filter(|&i| x.query_mask_row(b).is_none_or(|mk| mk[i as usize]))
            .collect();
        let k_idx: Vec<u32> = (0..n_k as u32)
            .filter(|&j| keep.is_none_or(|mk| mk[j as usize]))
            .collect();
        let m = self.landmarks.min(q_idx.len()).min(k_idx.len());
        if m == 0 {
            return None;
        }
        let (q, k, v) = (x.q_head(bh), x.k_head(bh), x.v_head(bh));
        let q_segs = segments(q_idx.len(), m, Larger::First);
        let k_segs = segments(k_idx.len(), m, Larger::First);
        let q_land = segment_means(q, d, &q_idx, &q_segs);
        let k_land = segment_means(k, d, &k_idx, &k_segs);
        let mut k1 = product(
            MatRef::new(q, n_q, d),
            MatRef::new(&k_land, m, d).t(),
            scale,
        );
        k1.chunks_exact_mut(m).for_each(softmax_row);
        let mut k2 = product(
            MatRef::new(&q_land, m, d),
            MatRef::new(&k_land, m, d).t(),
            scale,
        );
        k2.chunks_exact_mut(m).for_each(softmax_row);
        let mut k3 = product(
            MatRef::new(&q_land, m, d),
            MatRef::new(k, n_k, d).t(),
            scale,
        );
        for row in k3.chunks_exact_mut(n_k) {
            if let Some(keep) = keep {
                for (x, kept) in row.iter_mut().zip(keep) {
                    if !kept {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            softmax_row(row);
        }
        let small = match small {
            Some(small) => std::borrow::Cow::Borrowed(small),
            None => {
                let pinv = pinv(&k2, m, self.pinv_iters);
                let w = product(MatRef::new(&k3, m, n_k), MatRef::new(v, n_k, d_v), 1.0);
                let mut y = vec![0.0f32; m * d_v];
                let z = pinv.iterates.last().expect("Z is there");
                matmul(
                    MatMut::new(&mut y, m, d_v),
                    false,
                    MatRef::new(z, m, m),
                    MatRef::new(&w, m, d_v),
                    1.0,
                );
                std::borrow::Cow::Owned(Small { pinv, w, y })
            }
        };
        Some(Head {
            m,
            q_idx,
            k_idx,
            q_segs,
            k_segs,
            q_land,
            k_land,
            k1,
            k2,
            k3,
            small,
        })
    }
}

impl Estimator for Nystrom {
    const INFO: MethodInfo = MethodInfo {
        budget: Some("landmarks"),
        random: false,
        tensor_params: &[TensorParam {
            name: "conv_weights",
            shape: "[heads, conv]",
            rank: 2,
        }],
        ..MethodInfo::new(
            "nystrom",
            "Nystromformer: segment-mean landmarks and an iterative pseudo-inverse",
            "O(n m (d + d_v) + m^3) time, O(n m) memory",
        )
    };
    type Saved = NystromSaved;

    fn memory(&self, s: &Sizes) -> Memory {
        let m = (self.landmarks as u128).min(s.n_q).min(s.n_k);
        let iters = self.pinv_iters as u128;
        let conv = s.bh() * (self.conv as u128 + 1) + s.heads * self.conv as u128;
        // Per head: kept indices, landmarks, the three softmax kernels, the pseudo-inverse's
        // iterates and work matrices, K3·V and Z·(K3·V).
        let head = 2 * (s.n_q + s.n_k)
            + 2 * m * s.d
            + s.n_q * m
            + m * s.n_k
            + m * m * (iters + 6)
            + 2 * m * s.d_v;
        // Kept for the backward: every head's pseudo-inverse iterates, K3·V and Z·(K3·V).
        let saved = s.bh() * (m * m * (iters + 1) + 2 * m * s.d_v);
        let forward = s.o() + conv + saved + s.parallel_heads() * head;
        // Backward: the head again, then the gradients of the kernels, of the pseudo-inverse
        // (every iterate's) and of the landmarks.
        let back_head =
            head + s.n_q * m + m * s.n_k + m * m * (iters + 12) + 2 * m * s.d_v + 2 * m * s.d;
        let backward = s.o() + s.grads() + conv + saved + s.parallel_heads() * back_head;
        Memory::from_values(s, forward, s.o() + conv + backward)
    }

    fn saved_bytes(s: &NystromSaved) -> usize {
        4 * (s.conv_weights.as_ref().map_or(0, Vec::len)
            + s.heads.iter().flatten().map(Small::values).sum::<usize>())
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

    fn forward_saved(
        &self,
        x: &AttentionInputs<'_>,
        seed: u64,
    ) -> Result<(Vec<f32>, NystromSaved)> {
        let dims = x.dims();
        let Dims { n_q, d_v, .. } = dims;
        let conv_weights =
            conv::kernels(Self::INFO.name, self.conv, &self.conv_weights, dims, seed)?;
        let mut output = crate::linalg::par_zeroed(dims.out_len());
        let heads = output
            .par_chunks_mut(n_q * d_v)
            .enumerate()
            .map(|(bh, out)| {
                let h = self.head(x, bh, None)?;
                matmul(
                    MatMut::new(out, n_q, d_v),
                    false,
                    MatRef::new(&h.k1, n_q, h.m),
                    MatRef::new(&h.small.y, h.m, d_v),
                    1.0,
                );
                Some(h.small.into_owned())
            })
            .collect();
        if let Some(w) = &conv_weights {
            conv::add_forward(x, &mut output, w);
        }
        x.zero_masked_queries(&mut output);
        Ok((
            output,
            NystromSaved {
                conv_weights,
                heads,
            },
        ))
    }

    fn backward_saved(
        &self,
        x: &AttentionInputs<'_>,
        _seed: u64,
        s: &NystromSaved,
        grad_output: &[f32],
    ) -> Result<Grads> {
        let dims = x.dims();
        let Dims { n_q, d, d_v, .. } = dims;
        let bhs = dims.batch * dims.heads;
        let fits = |bh: usize, h: &Option<Small>| {
            let m = self.landmarks_of(x, bh / dims.heads);
            match h {
                None => m == 0,
                Some(h) => {
                    h.w.len() == m * d_v
                        && h.y.len() == m * d_v
                        && h.pinv.iterates.len() == self.pinv_iters + 1
                        && h.pinv.iterates.iter().all(|z| z.len() == m * m)
                }
            }
        };
        if s.heads.len() != bhs || s.heads.iter().enumerate().any(|(bh, h)| !fits(bh, h)) {
            return Err(Error::Saved {
                message: format!(
                    "holds products for other inputs than these {bhs} heads (landmarks, masks)"
                ),
            });
        }
        let scale = resolve_scale(self.scale, d);
        let g = x.without_masked_queries(grad_output);
        let mut grads = Grads::zeros(x);
        grads.par_heads(dims).enumerate().for_each(|(bh, hg)| {
            if let Some(h) = self.head(x, bh, s.heads[bh].as_ref()) {
                let gh = &g[bh * n_q * d_v..(bh + 1) * n_q * d_v];
                backward::head(&h, x, bh, gh, scale, hg);
            }
        });
        if let Some(w) = &s.conv_weights {
            grads
                .params
                .push(conv::add_backward(x, &g, &mut grads.dv, w));
        }
        Ok(grads)
    }
}
