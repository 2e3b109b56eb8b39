//! Buckets of one hash: the scatter-add / gather of the LSH cumulation, and the walk over
//! colliding (query, key) pairs used by the linear-time surrogate backward.
//!
//! A [`BucketIndex`] groups the tokens of one hash by code. Bucket sums are stored compactly,
//! one row per *non-empty* bucket, so memory is `O(n · d_v)` whatever `τ` is — never the
//! `2^τ × d_v` tables of the reference kernels. Codes are mapped to bucket ids through a dense
//! slot array when `2^τ ≤ DENSE_SLOTS_PER_TOKEN · max(n, DENSE_MIN_TOKENS)` (O(n + 2^τ) to build,
//! O(1) lookups), and otherwise by sorting the codes (O(n log n), binary-search lookups), which
//! keeps τ up to 30 at `O(n)` memory.

use std::ops::Range;

use crate::linalg::{Mat, gemm};

use super::hash::NO_CODE;

/// Dense slot arrays are used while `2^τ` is at most this many slots per token...
const DENSE_SLOTS_PER_TOKEN: usize = 4;
/// ... counting at least this many tokens (small heads still get the O(1) lookup).
const DENSE_MIN_TOKENS: usize = 1024;

/// Tokens of one hash grouped by bucket, plus the code → bucket lookup. Reused across hashes
/// (all buffers keep their capacity).
#[derive(Debug, Default)]
pub(crate) struct BucketIndex {
    /// Token indices, bucket by bucket.
    order: Vec<u32>,
    /// Bucket `b` holds `order[bounds[b]..bounds[b + 1]]`.
    bounds: Vec<u32>,
    /// Dense lookup: `slots[code]` is the bucket id of `code` or [`NO_CODE`].
    slots: Vec<u32>,
    /// Sorted lookup: the distinct codes, ascending (bucket id = position).
    distinct: Vec<u32>,
    /// Sorted path scratch: `code << 32 | token`.
    keyed: Vec<u64>,
    dense: bool,
    /// Per-query scratch of the pairwise walk.
    grouped: Vec<u32>,
    group_bounds: Vec<u32>,
}

impl BucketIndex {
    /// Groups the tokens whose `codes` are not [`NO_CODE`] by code (`codes` below `2^tau`).
    pub(crate) fn build(&mut self, codes: &[u32], tau: u32) {
        let n = codes.len();
        let slots = 1usize << tau;
        self.dense = slots <= DENSE_SLOTS_PER_TOKEN * n.max(DENSE_MIN_TOKENS);
        self.order.clear();
        self.bounds.clear();
        if self.dense {
            // Bucket ids in order of first appearance; counts then prefix sums.
            self.slots.clear();
            self.slots.resize(slots, NO_CODE);
            let mut counts: Vec<u32> = std::mem::take(&mut self.bounds);
            for &c in codes {
                if c == NO_CODE {
                    continue;
                }
                let slot = &mut self.slots[c as usize];
                if *slot == NO_CODE {
                    *slot = counts.len() as u32;
                    counts.push(0);
                }
                counts[*slot as usize] += 1;
            }
            let mut start = 0u32;
            for c in counts.iter_mut() {
                let size = *c;
                *c = start;
                start += size;
            }
            self.order.resize(start as usize, 0);
            let mut cursor = counts.clone();
            counts.push(start);
            for (j, &c) in codes.iter().enumerate() {
                if c == NO_CODE {
                    continue;
                }
                let b = self.slots[c as usize] as usize;
                self.order[cursor[b] as usize] = j as u32;
                cursor[b] += 1;
            }
            self.bounds = counts;
        } else {
            self.keyed.clear();
            self.keyed.extend(
                codes
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| **c != NO_CODE)
                    .map(|(j, c)| (u64::from(*c) << 32) | j as u64),
            );
            self.keyed.sort_unstable();
            self.distinct.clear();
            for (pos, &key) in self.keyed.iter().enumerate() {
                let code = (key >> 32) as u32;
                if self.distinct.last() != Some(&code) {
                    self.distinct.push(code);
                    self.bounds.push(pos as u32);
                }
                self.order.push(key as u32);
            }
            self.bounds.push(self.order.len() as u32);
        }
    }

    /// Number of non-empty buckets.
    pub(crate) fn buckets(&self) -> usize {
        self.bounds.len().saturating_sub(1)
    }

    /// Tokens of bucket `b`.
    pub(crate) fn members(&self, b: usize) -> &[u32] {
        &self.order[self.bounds[b] as usize..self.bounds[b + 1] as usize]
    }

    /// The bucket holding `code`, if any token has it.
    pub(crate) fn lookup(&self, code: u32) -> Option<usize> {
        if code == NO_CODE {
            return None;
        }
        if self.dense {
            let b = self.slots[code as usize];
            (b != NO_CODE).then_some(b as usize)
        } else {
            self.distinct.binary_search(&code).ok()
        }
    }
}

/// Scratch of one cumulation task.
#[derive(Debug, Default)]
pub(crate) struct CumulationScratch {
    index: BucketIndex,
    bucket_sums: Vec<f32>,
    gathered: Vec<f32>,
}

/// For each hash `h` in `hashes`: `out_i += Σ_{j : c_h(src_j) = c_h(dst_i)} src_vals_j`.
///
/// `src_codes` (`m × n_src`) and `dst_codes` (`m × n_dst`) are hash-major; rows of `src_vals`
/// and `out` are `w` wide. Tokens with [`NO_CODE`] are skipped on both sides. Cost
/// `O(|hashes| · (n_src + n_dst) · w)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cumulate(
    src_codes: &[u32],
    src_vals: &[f32],
    dst_codes: &[u32],
    out: &mut [f32],
    w: usize,
    hashes: Range<usize>,
    tau: u32,
    scratch: &mut CumulationScratch,
) {
    let n_src = src_vals.len() / w;
    let n_dst = out.len() / w;
    for h in hashes {
        let src = &src_codes[h * n_src..(h + 1) * n_src];
        let dst = &dst_codes[h * n_dst..(h + 1) * n_dst];
        scratch.index.build(src, tau);
        let sums = &mut scratch.bucket_sums;
        sums.clear();
        sums.resize(scratch.index.buckets() * w, 0.0);
        for (b, sum) in sums.chunks_exact_mut(w).enumerate() {
            for &j in scratch.index.members(b) {
                add_assign(sum, &src_vals[j as usize * w..(j as usize + 1) * w]);
            }
        }
        for (&c, o) in dst.iter().zip(out.chunks_exact_mut(w)) {
            if let Some(b) = scratch.index.lookup(c) {
                add_assign(o, &sums[b * w..(b + 1) * w]);
            }
        }
    }
}

/// Inputs of the pairwise walk for one head.
pub(crate) struct PairInputs<'a> {
    /// Normalised queries `n_q × d`.
    pub q: &'a [f32],
    /// Normalised keys `n_k × d`.
    pub k: &'a [f32],
    /// Output gradient before the output normalisation, `n_q × d_v`.
    pub g: &'a [f32],
    /// Values `n_k × d_v`.
    pub v: &'a [f32],
    /// Hash-major codes of the queries (`m × n_q`) and keys (`m × n_k`).
    pub q_codes: &'a [u32],
    pub k_codes: &'a [u32],
    pub d: usize,
    pub d_v: usize,
    pub tau: u32,
}

/// For each hash in `hashes` and each colliding pair `(i, j)`: with `s = coef · (g_i · v_j)`,
/// `dq_i += s · k_j` and `dk_j += s · q_i` — i.e. `dQ += coef·[(G Vᵀ) ⊙ C] K` and
/// `dK += coef·[(G Vᵀ) ⊙ C]ᵀ Q` with `C_ij` the number of hashes in which `i` and `j` collide,
/// without ever forming an `n_q × n_k` matrix.
///
/// Each bucket with `a` queries and `b` keys is processed the cheaper of two ways: pair by pair
/// (`a·b·(d_v + 2d)` multiply-adds) or through the `d_v × d` outer-product sums
/// `Σ_j v_j k_jᵀ` and `Σ_i g_i q_iᵀ` (`2(a + b)·d·d_v`, small GEMMs). So the cost is
/// proportional to the number of collisions when buckets are small and never exceeds
/// `O(|hashes| · (n_q + n_k) · d · d_v)` when they are large (e.g. many identical tokens).
pub(crate) fn colliding_pairs(
    x: &PairInputs<'_>,
    hashes: Range<usize>,
    coef: f32,
    dq: &mut [f32],
    dk: &mut [f32],
    scratch: &mut CumulationScratch,
) {
    let (d, d_v) = (x.d, x.d_v);
    let n_q = x.q.len() / d;
    let n_k = x.k.len() / d;
    let mut dq_row = vec![0.0f32; d];
    for h in hashes {
        let kc = &x.k_codes[h * n_k..(h + 1) * n_k];
        let qc = &x.q_codes[h * n_q..(h + 1) * n_q];
        let index = &mut scratch.index;
        index.build(kc, x.tau);
        // Group the queries by the key bucket they fall in (queries in no key bucket drop out).
        let nb = index.buckets();
        let mut group_bounds = std::mem::take(&mut index.group_bounds);
        let mut grouped = std::mem::take(&mut index.grouped);
        group_bounds.clear();
        group_bounds.resize(nb + 1, 0);
        let bucket_of: Vec<Option<usize>> = qc.iter().map(|&c| index.lookup(c)).collect();
        for b in bucket_of.iter().flatten() {
            group_bounds[b + 1] += 1;
        }
        for b in 0..nb {
            group_bounds[b + 1] += group_bounds[b];
        }
        grouped.clear();
        grouped.resize(group_bounds[nb] as usize, 0);
        let mut cursor = group_bounds.clone();
        for (i, b) in bucket_of.iter().enumerate() {
            if let Some(b) = b {
                grouped[cursor[*b] as usize] = i as u32;
                cursor[*b] += 1;
            }
        }
        for b in 0..nb {
            let queries = &grouped[group_bounds[b] as usize..group_bounds[b + 1] as usize];
            if queries.is_empty() {
                continue;
            }
            let keys = index.members(b);
            let (a, bk) = (queries.len(), keys.len());
            if a * bk * (d_v + 2 * d) <= 2 * (a + bk) * d * d_v {
                for &i in queries {
                    let i = i as usize;
                    let gi = &x.g[i * d_v..(i + 1) * d_v];
                    let qi = &x.q[i * d..(i + 1) * d];
                    dq_row.fill(0.0);
                    for &j in keys {
                        let j = j as usize;
                        let s = coef * dot(gi, &x.v[j * d_v..(j + 1) * d_v]);
                        axpy(&mut dq_row, s, &x.k[j * d..(j + 1) * d]);
                        axpy(&mut dk[j * d..(j + 1) * d], s, qi);
                    }
                    add_assign(&mut dq[i * d..(i + 1) * d], &dq_row);
                }
            } else {
                outer_bucket(x, queries, keys, coef, dq, dk, &mut scratch.gathered);
            }
        }
        index.group_bounds = group_bounds;
        index.grouped = grouped;
    }
}

/// One large bucket through its outer-product sums: `dQ_a += coef·G_a (V_bᵀ K_b)` and
/// `dK_b += coef·V_b (G_aᵀ Q_a)`.
fn outer_bucket(
    x: &PairInputs<'_>,
    queries: &[u32],
    keys: &[u32],
    coef: f32,
    dq: &mut [f32],
    dk: &mut [f32],
    buf: &mut Vec<f32>,
) {
    let (d, d_v) = (x.d, x.d_v);
    let (a, b) = (queries.len(), keys.len());
    let gather = |src: &[f32], w: usize, idx: &[u32], dst: &mut [f32]| {
        for (row, &i) in dst.chunks_exact_mut(w).zip(idx) {
            row.copy_from_slice(&src[i as usize * w..(i as usize + 1) * w]);
        }
    };
    buf.clear();
    buf.resize(a * (d + d_v) + b * (d + d_v) + d_v * d + a.max(b) * d, 0.0);
    let (qa, rest) = buf.split_at_mut(a * d);
    let (ga, rest) = rest.split_at_mut(a * d_v);
    let (kb, rest) = rest.split_at_mut(b * d);
    let (vb, rest) = rest.split_at_mut(b * d_v);
    let (t, out) = rest.split_at_mut(d_v * d);
    gather(x.q, d, queries, qa);
    gather(x.g, d_v, queries, ga);
    gather(x.k, d, keys, kb);
    gather(x.v, d_v, keys, vb);
    // dQ_a = coef · G_a (V_bᵀ K_b)
    gemm(
        d_v,
        d,
        b,
        t,
        d,
        Mat::cols(vb, d_v),
        Mat::rows(kb, d),
        1.0,
        false,
    );
    gemm(
        a,
        d,
        d_v,
        out,
        d,
        Mat::rows(ga, d_v),
        Mat::rows(t, d),
        coef,
        false,
    );
    for (row, &i) in out.chunks_exact(d).zip(queries) {
        add_assign(&mut dq[i as usize * d..(i as usize + 1) * d], row);
    }
    // dK_b = coef · V_b (G_aᵀ Q_a)
    gemm(
        d_v,
        d,
        a,
        t,
        d,
        Mat::cols(ga, d_v),
        Mat::rows(qa, d),
        1.0,
        false,
    );
    gemm(
        b,
        d,
        d_v,
        out,
        d,
        Mat::rows(vb, d_v),
        Mat::rows(t, d),
        coef,
        false,
    );
    for (row, &j) in out.chunks_exact(d).zip(keys) {
        add_assign(&mut dk[j as usize * d..(j as usize + 1) * d], row);
    }
}

/// `a += b`, elementwise.
#[inline]
pub(crate) fn add_assign(a: &mut [f32], b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += *y;
    }
}

/// `a += s · b`, elementwise.
#[inline]
fn axpy(a: &mut [f32], s: f32, b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += s * *y;
    }
}

/// Dot product with eight partial sums, so that it vectorises.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_index(codes: &[u32], tau: u32) {
        let mut idx = BucketIndex::default();
        idx.build(codes, tau);
        let mut seen = vec![false; codes.len()];
        for b in 0..idx.buckets() {
            let members = idx.members(b);
            assert!(!members.is_empty());
            let code = codes[members[0] as usize];
            assert_eq!(idx.lookup(code), Some(b));
            for &j in members {
                assert_eq!(codes[j as usize], code);
                assert!(!seen[j as usize]);
                seen[j as usize] = true;
            }
        }
        for (j, &c) in codes.iter().enumerate() {
            assert_eq!(seen[j], c != NO_CODE);
        }
        assert_eq!(idx.lookup(NO_CODE), None);
    }

    #[test]
    fn dense_and_sorted_indices_group_every_hashed_token_once() {
        let codes: Vec<u32> = (0..300u32)
            .map(|i| if i % 7 == 3 { NO_CODE } else { (i * 37) % 50 })
            .collect();
        check_index(&codes, 6); // dense
        let wide: Vec<u32> = codes
            .iter()
            .map(|&c| if c == NO_CODE { c } else { c * 20_000 + 7 })
            .collect();
        check_index(&wide, 20); // sorted: 2^20 slots for 300 tokens
        let mut idx = BucketIndex::default();
        idx.build(&wide, 20);
        assert!(!idx.dense);
        assert_eq!(idx.lookup(5), None);
    }

    #[test]
    fn the_two_bucket_strategies_agree() {
        // One bucket big enough for the outer-product path vs the same pairs walked one by one.
        let (d, d_v, n) = (3, 2, 200);
        let f = |i: usize, s: f32| ((i as f32) * s).sin();
        let q: Vec<f32> = (0..n * d).map(|i| f(i, 0.3)).collect();
        let k: Vec<f32> = (0..n * d).map(|i| f(i, 0.7)).collect();
        let g: Vec<f32> = (0..n * d_v).map(|i| f(i, 1.1)).collect();
        let v: Vec<f32> = (0..n * d_v).map(|i| f(i, 1.9)).collect();
        let codes = vec![5u32; n];
        let x = PairInputs {
            q: &q,
            k: &k,
            g: &g,
            v: &v,
            q_codes: &codes,
            k_codes: &codes,
            d,
            d_v,
            tau: 4,
        };
        let (mut dq, mut dk) = (vec![0.0; n * d], vec![0.0; n * d]);
        colliding_pairs(&x, 0..1, 0.5, &mut dq, &mut dk, &mut Default::default());
        for i in 0..n {
            for c in 0..d {
                let (mut wq, mut wk) = (0.0f64, 0.0f64);
                for j in 0..n {
                    let s = 0.5
                        * (0..d_v)
                            .map(|l| g[i * d_v + l] * v[j * d_v + l])
                            .sum::<f32>();
                    wq += (s * k[j * d + c]) as f64;
                    let s2 = 0.5
                        * (0..d_v)
                            .map(|l| g[j * d_v + l] * v[i * d_v + l])
                            .sum::<f32>();
                    wk += (s2 * q[j * d + c]) as f64;
                }
                assert!((dq[i * d + c] as f64 - wq).abs() < 1e-3, "dq {i} {c}");
                assert!((dk[i * d + c] as f64 - wk).abs() < 1e-3, "dk {i} {c}");
            }
        }
    }
}
