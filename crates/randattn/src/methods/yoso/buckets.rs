//! Buckets of one hash: the scatter-add / gather of the LSH cumulation, and the walk over
//! colliding (query, key) pairs used by the linear-time surrogate backward.
//!
//! Memory never grows with `2^τ` beyond `O(n)`: while `2^τ ≤ DENSE_SLOTS_PER_TOKEN ·
//! max(n, DENSE_MIN_TOKENS)` a slot array indexed by the code numbers each hash's occupied
//! buckets in order of first appearance (O(n + 2^τ) to build, O(1) lookups), and bucket sums are
//! compact, one row per occupied bucket, for a group of hashes at a time (at most `n` rows in
//! all). Above that — large τ, e.g. τ = 20 at n = 4096 — the codes of each hash are sorted
//! instead (O(n log n), binary-search lookups), again with one row per non-empty bucket:
//! `O(n·d_v)` floats whatever τ is, never the `m × 2^τ × d_v` tables of the reference kernels.

use std::ops::Range;

use crate::matrix::{MatMut, MatRef, matmul};
use crate::pages;

use super::hash::NO_CODE;

/// Dense slot arrays are used while `2^τ` is at most this many slots per token...
pub(crate) const DENSE_SLOTS_PER_TOKEN: usize = 4;
/// ... counting at least this many tokens (small heads still get the O(1) lookup).
pub(crate) const DENSE_MIN_TOKENS: usize = 1024;

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
    /// Fill positions while grouping.
    cursor: Vec<u32>,
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
            // The new bucket's id is picked by a select, not a branch (whether a code is new
            // is as unpredictable as the data); at most `n` buckets.
            let mut counts: Vec<u32> = std::mem::take(&mut self.bounds);
            counts.clear();
            counts.resize(n, 0);
            let mut next = 0u32;
            for &c in codes {
                if c == NO_CODE {
                    continue;
                }
                let slot = &mut self.slots[c as usize];
                let new = *slot == NO_CODE;
                let id = if new { next } else { *slot };
                *slot = id;
                next += u32::from(new);
                counts[id as usize] += 1;
            }
            counts.truncate(next as usize);
            let mut start = 0u32;
            for c in counts.iter_mut() {
                let size = *c;
                *c = start;
                start += size;
            }
            self.order.resize(start as usize, 0);
            let mut cursor = std::mem::take(&mut self.cursor);
            cursor.clear();
            cursor.extend_from_slice(&counts);
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
            self.cursor = cursor;
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
    #[inline(always)]
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
    bucket_of: Vec<u32>,
    grouped_ids: Vec<u32>,
    query_rows: Vec<f32>,
    key_rows: Vec<f32>,
    counts: Vec<usize>,
}

/// `out_i ← Σ_{h ∈ hashes} Σ_{j : c_h(src_j) = c_h(dst_i)} src_vals_j` (overwrites `out`).
///
/// `src_codes` (`m × n_src`) and `dst_codes` (`m × n_dst`) are hash-major; rows of `src_vals`
/// and `out` are `w` wide. Tokens with [`NO_CODE`] are skipped on both sides. Bucket ids are
/// resolved first; then, hash by hash, the source rows are scatter-added into compact bucket sums
/// and each destination row adds its bucket's sum. Cost `O(|hashes| · (n_src + n_dst) · w)`,
/// scratch `O(|hashes| · (n_src + n_dst) + n_src · w)`.
pub(crate) fn cumulate(
    codes: Codes<'_>,
    src_vals: &[f32],
    out: &mut [f32],
    w: usize,
    hashes: Range<usize>,
    scratch: &mut CumulationScratch,
) {
    let Codes {
        src: src_codes,
        dst: dst_codes,
        tau,
    } = codes;
    let n_src = src_vals.len() / w;
    let n_dst = out.len() / w;
    let slots = 1usize << tau;
    let src = &src_codes[hashes.start * n_src..hashes.end * n_src];
    let dst = &dst_codes[hashes.start * n_dst..hashes.end * n_dst];
    if slots <= DENSE_SLOTS_PER_TOKEN * n_src.max(DENSE_MIN_TOKENS) {
        compact_cumulate(src, dst, tau, src_vals, out, w, scratch);
        return;
    }
    // Sparse codes: compact bucket ids from sorting each hash's source codes.
    let mut src_ids = std::mem::take(&mut scratch.bucket_of);
    let mut dst_ids = std::mem::take(&mut scratch.grouped_ids);
    let mut counts = std::mem::take(&mut scratch.counts);
    src_ids.clear();
    dst_ids.clear();
    counts.clear();
    for (src, dst) in src.chunks_exact(n_src).zip(dst.chunks_exact(n_dst)) {
        let index = &mut scratch.index;
        index.build(src, tau);
        let index = &*index;
        src_ids.extend(
            src.iter()
                .map(|&c| index.lookup(c).map_or(NO_CODE, |b| b as u32)),
        );
        dst_ids.extend(
            dst.iter()
                .map(|&c| index.lookup(c).map_or(NO_CODE, |b| b as u32)),
        );
        counts.push(index.buckets());
    }
    let most = counts.iter().copied().max().unwrap_or(0);
    pages::refill_for_random_access(&mut scratch.bucket_sums, most * w, 0.0);
    let ids = BucketIds {
        src: &src_ids,
        dst: &dst_ids,
        counts: &counts,
        n_src,
        n_dst,
        accumulate: false,
    };
    scatter_gather(&ids, src_vals, out, w, &mut scratch.bucket_sums);
    scratch.bucket_of = src_ids;
    scratch.grouped_ids = dst_ids;
    scratch.counts = counts;
}

/// Bucket ids of the sources and destinations of several hashes (hash-major, [`NO_CODE`] for
/// tokens without a bucket) and the bucket count of each hash.
struct BucketIds<'a> {
    src: &'a [u32],
    dst: &'a [u32],
    counts: &'a [usize],
    n_src: usize,
    n_dst: usize,
    /// Add the first hash's sums to `out` too (instead of overwriting it).
    accumulate: bool,
}

/// [`cumulate`] for codes that index a slot array: bucket ids are numbered in order of first
/// appearance among the sources (through the `2^τ`-slot array, reset after each hash), so each
/// hash's bucket sums are a compact table of one row per occupied bucket, written in order the
/// first time a bucket is met. Hashes are taken in groups (up to [`MAX_GROUP`], as long as their
/// tables hold at most `n_src` rows together, the size of one hash's table when every source has
/// its own bucket): the values are read and the output written once per group rather than once
/// per hash — at n = 65536 the value rows and the output of a head are 16 MiB each, far beyond a
/// core's L2 cache, and streaming them again for every hash cost more than the random bucket
/// accesses.
fn compact_cumulate(
    src: &[u32],
    dst: &[u32],
    tau: u32,
    src_vals: &[f32],
    out: &mut [f32],
    w: usize,
    scratch: &mut CumulationScratch,
) {
    let n_src = src_vals.len() / w;
    let n_dst = out.len() / w;
    let mut slot_of = std::mem::take(&mut scratch.index.slots);
    let mut src_ids = std::mem::take(&mut scratch.bucket_of);
    let mut dst_ids = std::mem::take(&mut scratch.grouped_ids);
    let mut counts = std::mem::take(&mut scratch.counts);
    slot_of.clear();
    slot_of.resize(1usize << tau, NO_CODE);
    src_ids.clear();
    dst_ids.clear();
    counts.clear();
    let mut written = false;
    let mut flush = |src_ids: &[u32], dst_ids: &[u32], counts: &[usize], sums: &mut Vec<f32>| {
        let rows: usize = counts.iter().sum();
        if sums.len() < rows * w {
            // Sized once to the budget, the old table freed first (a growing `Vec` would double
            // its capacity and copy), on huge pages where offered: its rows are met at random.
            pages::refill_for_random_access(sums, n_src.max(rows) * w, 0.0);
        }
        let ids = BucketIds {
            src: src_ids,
            dst: dst_ids,
            counts,
            n_src,
            n_dst,
            accumulate: written,
        };
        grouped_scatter_gather(&ids, src_vals, out, w, sums);
        written = true;
    };
    for (src, dst) in src.chunks_exact(n_src).zip(dst.chunks_exact(n_dst)) {
        let (src_at, dst_at) = (src_ids.len(), dst_ids.len());
        let mut next = 0u32;
        src_ids.extend(src.iter().map(|&c| {
            if c == NO_CODE {
                return NO_CODE;
            }
            // A select, not a branch: whether a code is new is as unpredictable as the data.
            let slot = &mut slot_of[c as usize];
            let new = *slot == NO_CODE;
            let id = if new { next } else { *slot };
            *slot = id;
            next += u32::from(new);
            id
        }));
        look_up_and_reset(dst, src, &mut slot_of, &mut dst_ids);
        let rows: usize = counts.iter().sum();
        if !counts.is_empty() && rows + next as usize > n_src {
            // This hash would overflow the group's table budget: the group runs without it.
            flush(
                &src_ids[..src_at],
                &dst_ids[..dst_at],
                &counts,
                &mut scratch.bucket_sums,
            );
            src_ids.copy_within(src_at.., 0);
            src_ids.truncate(n_src);
            dst_ids.copy_within(dst_at.., 0);
            dst_ids.truncate(n_dst);
            counts.clear();
        }
        counts.push(next as usize);
        if counts.len() == MAX_GROUP {
            flush(&src_ids, &dst_ids, &counts, &mut scratch.bucket_sums);
            src_ids.clear();
            dst_ids.clear();
            counts.clear();
        }
    }
    if !counts.is_empty() {
        flush(&src_ids, &dst_ids, &counts, &mut scratch.bucket_sums);
    }
    scratch.index.slots = slot_of;
    scratch.bucket_of = src_ids;
    scratch.grouped_ids = dst_ids;
    scratch.counts = counts;
}

crate::linalg::multiversion! {
    /// Appends the bucket ids of one hash's destination codes `dst` to `ids` (`slot_of[c]`,
    /// [`NO_CODE`] for an unhashed token), then resets the slots of its source codes `src`. The
    /// codes of hashed tokens are below `slot_of.len()`, [`NO_CODE`] is not: the checked
    /// accesses stand in for the test, and the loops vectorise (gathers and scatters).
    fn look_up_and_reset(dst: &[u32], src: &[u32], slot_of: &mut [u32], ids: &mut Vec<u32>) {
        ids.extend(
            dst.iter()
                .map(|&c| slot_of.get(c as usize).copied().unwrap_or(NO_CODE)),
        );
        for &c in src {
            if let Some(slot) = slot_of.get_mut(c as usize) {
                *slot = NO_CODE;
            }
        }
    }
}

crate::linalg::multiversion! {
    /// The scatter-add and gather of [`compact_cumulate`] for a group of hashes at once: each
    /// value row is added to its bucket in every hash of the group (copied, the first time a
    /// bucket is met: ids are numbered in that order), then each output row reads its bucket in
    /// every hash, in hash order (so the sums are those of one hash at a time, bit for bit).
    fn grouped_scatter_gather(
        ids: &BucketIds<'_>,
        src_vals: &[f32],
        out: &mut [f32],
        w: usize,
        sums: &mut [f32],
    ) {
        let group = ids.counts.len();
        let mut offsets = [0usize; MAX_GROUP];
        let mut fresh = [0u32; MAX_GROUP];
        let mut at = 0;
        for (o, c) in offsets.iter_mut().zip(ids.counts) {
            *o = at;
            at += c * w;
        }
        let zero = std::hint::black_box(0.0f32);
        let neg_zero = std::hint::black_box(-0.0f32);
        let ahead = if at * 4 > PREFETCH_TABLE_BYTES {
            PREFETCH_AHEAD
        } else {
            0
        };
        let offsets = &offsets[..group];
        for (j, v) in src_vals.chunks_exact(w).enumerate() {
            if ahead > 0 && j + ahead < ids.n_src {
                prefetch_buckets(&ids.src[j + ahead..], ids.n_src, offsets, w, sums);
            }
            for (g, (&offset, fresh)) in offsets.iter().zip(&mut fresh).enumerate() {
                let b = ids.src[g * ids.n_src + j];
                if b == NO_CODE {
                    continue;
                }
                let row = offset + b as usize * w;
                let t = &mut sums[row..row + w];
                let new = b == *fresh;
                *fresh += u32::from(new);
                start_or_add_row(t, v, new);
            }
        }
        for (i, o) in out.chunks_exact_mut(w).enumerate() {
            if ahead > 0 && i + ahead < ids.n_dst {
                prefetch_buckets(&ids.dst[i + ahead..], ids.n_dst, offsets, w, sums);
            }
            for (g, &offset) in offsets.iter().enumerate() {
                let b = ids.dst[g * ids.n_dst + i];
                if g == 0 && !ids.accumulate {
                    if b == NO_CODE {
                        zero_row(o, zero);
                    } else {
                        let row = offset + b as usize * w;
                        copy_row(o, &sums[row..row + w], neg_zero);
                    }
                } else if b != NO_CODE {
                    let row = offset + b as usize * w;
                    add_row(o, &sums[row..row + w]);
                }
            }
        }
    }
}

/// [`grouped_scatter_gather`] prefetches bucket rows when a group's bucket sums take more than
/// this many bytes, more than a core's share of a last-level cache usually holds. Below it the
/// rows come from L2 or L3, whose latency out-of-order execution hides, and the prefetches only
/// cost instructions. On a 2-core AMD EPYC (32 MiB L3), 8 rows ahead, interleaved runs: the
/// forward at n = 65536 (14 MiB of sums per group) 16–19% faster (median ratios 0.81–0.84), at
/// n = 16384 (4 MiB) not faster (1.06–1.09); 4 or 16 rows ahead, or only the scatter's or
/// only the gather's rows, or only each row's first line, were slower than 8 rows of both.
const PREFETCH_TABLE_BYTES: usize = 8 << 20;
/// How many value or output rows ahead the bucket rows are prefetched.
const PREFETCH_AHEAD: usize = 8;

/// Prefetches, in every hash of a group, the bucket row of the token whose ids are
/// `ids[g * stride]` (`offsets` the hashes' first floats in `sums`, rows `w` wide).
#[inline(always)]
fn prefetch_buckets(ids: &[u32], stride: usize, offsets: &[usize], w: usize, sums: &[f32]) {
    for (g, &offset) in offsets.iter().enumerate() {
        let b = ids[g * stride];
        if b != NO_CODE {
            let row = offset + b as usize * w;
            prefetch_row(&sums[row..row + w]);
        }
    }
}

/// Most hashes [`compact_cumulate`] takes at once (on an Intel Xeon at n = 65536, without the
/// row budget, groups of 2–4 ran 1.5–1.9× faster than one hash at a time, groups of 8 slower
/// than 4).
pub(crate) const MAX_GROUP: usize = 4;

crate::linalg::multiversion! {
    /// The scatter-add and gather of [`cumulate`] for sorted codes, hash by hash, whole rows at
    /// a time.
    fn scatter_gather(
        ids: &BucketIds<'_>,
        src_vals: &[f32],
        out: &mut [f32],
        w: usize,
        sums: &mut [f32],
    ) {
        let hashes = ids.src.len() / ids.n_src;
        let zero = std::hint::black_box(0.0f32);
        let neg_zero = std::hint::black_box(-0.0f32);
        for h in 0..hashes {
            let src = &ids.src[h * ids.n_src..(h + 1) * ids.n_src];
            let dst = &ids.dst[h * ids.n_dst..(h + 1) * ids.n_dst];
            sums[..ids.counts[h] * w].fill(0.0);
            for (v, &b) in src_vals.chunks_exact(w).zip(src) {
                if b != NO_CODE {
                    add_row(&mut sums[b as usize * w..(b as usize + 1) * w], v);
                }
            }
            if h == 0 && !ids.accumulate {
                // The first hash writes every output row, so `out` is never read before it is
                // written (fresh pages then fault once, not twice).
                for (o, &b) in out.chunks_exact_mut(w).zip(dst) {
                    if b != NO_CODE {
                        copy_row(o, &sums[b as usize * w..(b as usize + 1) * w], neg_zero);
                    } else {
                        zero_row(o, zero);
                    }
                }
                continue;
            }
            for (o, &b) in out.chunks_exact_mut(w).zip(dst) {
                if b != NO_CODE {
                    add_row(o, &sums[b as usize * w..(b as usize + 1) * w]);
                }
            }
        }
    }
}

/// `a ← zero` with inline vector stores. `zero` is 0 passed through `black_box`: with a literal
/// 0 the compiler turns the loop into a `memset` call per row, which measured slower than the
/// whole scatter-add.
#[inline(always)]
fn zero_row(a: &mut [f32], zero: f32) {
    for x in a.iter_mut() {
        *x = zero;
    }
}

/// `a ← b` if `start`, else `a ← a + b`, without a branch (whether a bucket is met for the
/// first time is as unpredictable as the data): `a ← s + b` with `s` either `a` or −0.0
/// (`−0 + b = b` bit for bit, signed zeros included), picked by a bit mask.
#[inline(always)]
fn start_or_add_row(a: &mut [f32], b: &[f32], start: bool) {
    // Through `black_box`, or the compiler turns the mask back into a branch on `start`.
    let keep = std::hint::black_box(u32::from(start).wrapping_sub(1));
    let neg_zero = (-0.0f32).to_bits() & !keep;
    map_row(a, b, |x, y| {
        f32::from_bits((x.to_bits() & keep) | neg_zero) + y
    });
}

/// `a ← b + neg_zero` for rows of equal length: a copy with inline vector moves. `neg_zero` is
/// −0.0 passed through `black_box` (`x + (−0) = x` bit for bit, signed zeros included): a plain
/// copy loop becomes a `memcpy` call per row, which at 64-float rows cost more than the copy
/// (7% of a forward's samples at n = 4096).
#[inline(always)]
fn copy_row(a: &mut [f32], b: &[f32], neg_zero: f32) {
    map_row(a, b, |_, y| y + neg_zero);
}

/// `a_l ← f(a_l, b_l)` for rows of equal length, sixteen floats at a time (inlined into each
/// kernel, so it compiles to that kernel's vector instructions).
#[inline(always)]
fn map_row(a: &mut [f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    let mut ac = a.chunks_exact_mut(16);
    let mut bc = b.chunks_exact(16);
    for (x, y) in (&mut ac).zip(&mut bc) {
        for l in 0..16 {
            x[l] = f(x[l], y[l]);
        }
    }
    for (x, y) in ac.into_remainder().iter_mut().zip(bc.remainder()) {
        *x = f(*x, *y);
    }
}

/// Asks the CPU to bring `row` into the cache (every 64-byte line), ahead of its use.
#[inline(always)]
fn prefetch_row(row: &[f32]) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16) {
        // SAFETY: prefetching is a hint; the address is that of a live slice.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
}

/// `a += b` for rows of equal length, sixteen floats at a time.
#[inline(always)]
fn add_row(a: &mut [f32], b: &[f32]) {
    map_row(a, b, |x, y| x + y);
}

/// Hash codes of the two sides of a cumulation or pair walk, hash-major (`[m][n]` each), and
/// their length τ: `src` is the side put into buckets (whose values are summed), `dst` the side
/// that reads its buckets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Codes<'a> {
    pub src: &'a [u32],
    pub dst: &'a [u32],
    pub tau: u32,
}

/// The weights of the surrogate backward's pair walk: `s = coef·(g_i·v_j)` moves dq and dk,
/// `dv_coef` scales `g_i` into `dv_j`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coefs {
    pub coef: f32,
    pub dv_coef: f32,
}

/// Inputs of the pairwise walk for one head (tests drive the walk through these).
#[cfg(test)]
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
/// `dq_i += s · k_j`, `dk_j += s · q_i` and `dv_j += dv_coef · g_i` — i.e.
/// `dQ += coef·[(G Vᵀ) ⊙ C] K`, `dK += coef·[(G Vᵀ) ⊙ C]ᵀ Q` and `dV += dv_coef·Cᵀ G` with `C_ij`
/// the number of hashes in which `i` and `j` collide, without ever forming an `n_q × n_k`
/// matrix. (Accumulating `dV` here, on key rows the walk touches anyway, replaces a separate
/// cumulation pass with its own random row accesses.)
///
/// Each bucket with `a` queries and `b` keys is processed the cheaper of two ways: pair by pair
/// (`a·b·2(d + d_v)` multiply-adds) or through the `d_v × d` outer-product sums
/// `Σ_j v_j k_jᵀ` and `Σ_i g_i q_iᵀ` (`2(a + b)·d·d_v`, small GEMMs). So the cost is
/// proportional to the number of collisions when buckets are small and never exceeds
/// `O(|hashes| · (n_q + n_k) · d · d_v)` when they are large (e.g. many identical tokens).
#[cfg(test)]
pub(crate) fn colliding_pairs(
    x: &PairInputs<'_>,
    hashes: Range<usize>,
    coefs: Coefs,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    scratch: &mut CumulationScratch,
) {
    let (d, d_v) = (x.d, x.d_v);
    let n_q = x.q.len() / d;
    let n_k = x.k.len() / d;
    let layout = RowLayout { d, d_v };
    let (query_rows, key_rows) = scratch.pair_rows(layout, n_q, n_k);
    for ((row, q), g) in query_rows
        .chunks_exact_mut(layout.query_stride())
        .zip(x.q.chunks_exact(d))
        .zip(x.g.chunks_exact(d_v))
    {
        row[..d].copy_from_slice(q);
        row[d..d + d_v].copy_from_slice(g);
    }
    for ((row, k), v) in key_rows
        .chunks_exact_mut(layout.key_stride())
        .zip(x.k.chunks_exact(d))
        .zip(x.v.chunks_exact(d_v))
    {
        row[..d].copy_from_slice(k);
        row[d..d + d_v].copy_from_slice(v);
    }
    let codes = Codes {
        src: x.k_codes,
        dst: x.q_codes,
        tau: x.tau,
    };
    walk_prepared(scratch, layout, codes, hashes, coefs);
    let (query_rows, key_rows) = (&scratch.query_rows, &scratch.key_rows);
    for (out, row) in dq
        .chunks_exact_mut(d)
        .zip(query_rows.chunks_exact(layout.query_stride()))
    {
        add_assign(out, layout.dq(row));
    }
    for ((dk, dv), row) in dk
        .chunks_exact_mut(d)
        .zip(dv.chunks_exact_mut(d_v))
        .zip(key_rows.chunks_exact(layout.key_stride()))
    {
        add_assign(dk, layout.dk(row));
        add_assign(dv, layout.dv(row));
    }
}

/// The rows of the pair walk: everything one side of a pair touches, contiguous —
/// `[q̂_i | g_i | dq_i]` per query and `[k̂_j | v_j | dk_j | dv_j]` per key. A pair then misses on
/// two places instead of seven, and the CPU's adjacent-line prefetch brings the rest.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowLayout {
    pub d: usize,
    pub d_v: usize,
}

impl RowLayout {
    pub(crate) fn query_stride(self) -> usize {
        2 * self.d + self.d_v
    }
    pub(crate) fn key_stride(self) -> usize {
        2 * self.d + 2 * self.d_v
    }
    /// The accumulated `dq̂` of a query row.
    pub(crate) fn dq(self, row: &[f32]) -> &[f32] {
        &row[self.d + self.d_v..]
    }
    /// The accumulated `dk̂` of a key row.
    pub(crate) fn dk(self, row: &[f32]) -> &[f32] {
        &row[self.d + self.d_v..2 * self.d + self.d_v]
    }
    /// The accumulated `dV` of a key row.
    pub(crate) fn dv(self, row: &[f32]) -> &[f32] {
        &row[2 * self.d + self.d_v..]
    }
}

impl CumulationScratch {
    /// The pair-walk rows for `n_q` queries and `n_k` keys, accumulators zeroed; the caller fills
    /// the `[q̂ | g]` and `[k̂ | v]` parts.
    pub(crate) fn pair_rows(
        &mut self,
        layout: RowLayout,
        n_q: usize,
        n_k: usize,
    ) -> (&mut [f32], &mut [f32]) {
        // Walked at random rows (bucket members): on huge pages where offered.
        pages::refill_for_random_access(&mut self.query_rows, n_q * layout.query_stride(), 0.0);
        pages::refill_for_random_access(&mut self.key_rows, n_k * layout.key_stride(), 0.0);
        (&mut self.query_rows, &mut self.key_rows)
    }

    /// The pair-walk rows after [`walk_prepared`].
    pub(crate) fn walked_rows(&self) -> (&[f32], &[f32]) {
        (&self.query_rows, &self.key_rows)
    }
}

/// The walk of [`colliding_pairs`] over rows already in `scratch` (see
/// [`CumulationScratch::pair_rows`]): accumulates into their `dq`, `dk` and `dv` parts.
pub(crate) fn walk_prepared(
    scratch: &mut CumulationScratch,
    layout: RowLayout,
    codes: Codes<'_>,
    hashes: Range<usize>,
    coefs: Coefs,
) {
    let Codes {
        src: k_codes,
        dst: q_codes,
        tau,
    } = codes;
    let n_q = scratch.query_rows.len() / layout.query_stride();
    let n_k = scratch.key_rows.len() / layout.key_stride();
    let mut query_rows = std::mem::take(&mut scratch.query_rows);
    let mut key_rows = std::mem::take(&mut scratch.key_rows);
    let mut rows = PairRows {
        queries: &mut query_rows,
        keys: &mut key_rows,
        d: layout.d,
        d_v: layout.d_v,
        q_stride: layout.query_stride(),
        k_stride: layout.key_stride(),
    };
    for h in hashes {
        let kc = &k_codes[h * n_k..(h + 1) * n_k];
        let qc = &q_codes[h * n_q..(h + 1) * n_q];
        let index = &mut scratch.index;
        index.build(kc, tau);
        // Group the queries by the key bucket they fall in (queries in no key bucket drop out).
        let nb = index.buckets();
        let mut group_bounds = std::mem::take(&mut index.group_bounds);
        let mut grouped = std::mem::take(&mut index.grouped);
        let mut cursor = std::mem::take(&mut index.cursor);
        let bucket_of = &mut scratch.bucket_of;
        bucket_of.clear();
        bucket_of.extend(
            qc.iter()
                .map(|&c| index.lookup(c).map_or(NO_CODE, |b| b as u32)),
        );
        group_bounds.clear();
        group_bounds.resize(nb + 1, 0);
        for &b in bucket_of.iter() {
            if b != NO_CODE {
                group_bounds[b as usize + 1] += 1;
            }
        }
        for b in 0..nb {
            group_bounds[b + 1] += group_bounds[b];
        }
        grouped.clear();
        grouped.resize(group_bounds[nb] as usize, 0);
        cursor.clear();
        cursor.extend_from_slice(&group_bounds);
        for (i, &b) in bucket_of.iter().enumerate() {
            if b != NO_CODE {
                grouped[cursor[b as usize] as usize] = i as u32;
                cursor[b as usize] += 1;
            }
        }
        walk_buckets(
            &mut rows,
            index,
            &grouped,
            &group_bounds,
            coefs,
            &mut scratch.gathered,
        );
        index.group_bounds = group_bounds;
        index.grouped = grouped;
        index.cursor = cursor;
    }
    scratch.query_rows = query_rows;
    scratch.key_rows = key_rows;
}

/// The interleaved rows of one pair walk: `[q̂ | g | dq]` per query, `[k̂ | v | dk | dv]` per key.
struct PairRows<'a> {
    queries: &'a mut [f32],
    keys: &'a mut [f32],
    d: usize,
    d_v: usize,
    q_stride: usize,
    k_stride: usize,
}

crate::linalg::multiversion! {
    /// The pairs of every bucket of one hash (queries grouped by bucket in `grouped`).
    fn walk_buckets(
        rows: &mut PairRows<'_>,
        index: &BucketIndex,
        grouped: &[u32],
        group_bounds: &[u32],
        coefs: Coefs,
        gathered: &mut Vec<f32>,
    ) {
        let Coefs { coef, dv_coef } = coefs;
        let (d, d_v, qs, ks) = (rows.d, rows.d_v, rows.q_stride, rows.k_stride);
        for b in 0..index.buckets() {
            // The next bucket's rows are random rows of arrays far larger than the cache (at
            // n = 65536 a head's pair rows are 112 MiB): fetch them while this one is walked.
            if b + 1 < index.buckets() {
                let next = &grouped[group_bounds[b + 1] as usize..group_bounds[b + 2] as usize];
                if !next.is_empty() {
                    for &i in next {
                        prefetch_row(&rows.queries[i as usize * qs..(i as usize + 1) * qs]);
                    }
                    for &j in index.members(b + 1) {
                        prefetch_row(&rows.keys[j as usize * ks..(j as usize + 1) * ks]);
                    }
                }
            }
            let queries = &grouped[group_bounds[b] as usize..group_bounds[b + 1] as usize];
            if queries.is_empty() {
                continue;
            }
            let keys = index.members(b);
            let (a, bk) = (queries.len(), keys.len());
            if d <= PAIR_ROW_MAX && a * bk * (2 * d_v + 2 * d) <= 2 * (a + bk) * d * d_v {
                for &i in queries {
                    let i = i as usize;
                    let (qg, dq_i) = rows.queries[i * qs..(i + 1) * qs].split_at_mut(d + d_v);
                    let (qi, gi) = qg.split_at(d);
                    for &j in keys {
                        let j = j as usize;
                        let (kv, grads) = rows.keys[j * ks..(j + 1) * ks].split_at_mut(d + d_v);
                        let (kj, vj) = kv.split_at(d);
                        let (dk_j, dv_j) = grads.split_at_mut(d);
                        let s = coef * dot(gi, vj);
                        axpy(dq_i, s, kj);
                        axpy(dk_j, s, qi);
                        axpy(dv_j, dv_coef, gi);
                    }
                }
            } else {
                outer_bucket(rows, queries, keys, coefs, gathered);
            }
        }
    }
}

/// Longest head dimension walked pair by pair with a stack row (longer ones use outer products).
const PAIR_ROW_MAX: usize = 256;

/// One large bucket through its outer-product sums: `dQ_a += coef·G_a (V_bᵀ K_b)` and
/// `dK_b += coef·V_b (G_aᵀ Q_a)`.
fn outer_bucket(
    rows: &mut PairRows<'_>,
    queries: &[u32],
    keys: &[u32],
    coefs: Coefs,
    buf: &mut Vec<f32>,
) {
    let Coefs { coef, dv_coef } = coefs;
    let (d, d_v, qs, ks) = (rows.d, rows.d_v, rows.q_stride, rows.k_stride);
    let (a, b) = (queries.len(), keys.len());
    // Copies columns `from..from + w` of the listed rows (`stride` apart) into a dense matrix.
    let gather =
        |src: &[f32], stride: usize, from: usize, w: usize, idx: &[u32], dst: &mut [f32]| {
            for (row, &i) in dst.chunks_exact_mut(w).zip(idx) {
                let at = i as usize * stride + from;
                row.copy_from_slice(&src[at..at + w]);
            }
        };
    buf.clear();
    buf.resize(a * (d + d_v) + b * (d + d_v) + d_v * d + a.max(b) * d, 0.0);
    let (qa, rest) = buf.split_at_mut(a * d);
    let (ga, rest) = rest.split_at_mut(a * d_v);
    let (kb, rest) = rest.split_at_mut(b * d);
    let (vb, rest) = rest.split_at_mut(b * d_v);
    let (t, out) = rest.split_at_mut(d_v * d);
    gather(rows.queries, qs, 0, d, queries, qa);
    gather(rows.queries, qs, d, d_v, queries, ga);
    gather(rows.keys, ks, 0, d, keys, kb);
    gather(rows.keys, ks, d, d_v, keys, vb);
    // dQ_a = coef · G_a (V_bᵀ K_b)
    matmul(
        MatMut::new(t, d_v, d),
        false,
        MatRef::new(vb, b, d_v).t(),
        MatRef::new(kb, b, d),
        1.0,
    );
    matmul(
        MatMut::new(out, a, d),
        false,
        MatRef::new(ga, a, d_v),
        MatRef::new(t, d_v, d),
        coef,
    );
    for (row, &i) in out.chunks_exact(d).zip(queries) {
        let at = i as usize * qs + d + d_v;
        add_assign(&mut rows.queries[at..at + d], row);
    }
    // dK_b = coef · V_b (G_aᵀ Q_a)
    matmul(
        MatMut::new(t, d_v, d),
        false,
        MatRef::new(ga, a, d_v).t(),
        MatRef::new(qa, a, d),
        1.0,
    );
    matmul(
        MatMut::new(out, b, d),
        false,
        MatRef::new(vb, b, d_v),
        MatRef::new(t, d_v, d),
        coef,
    );
    for (row, &j) in out.chunks_exact(d).zip(keys) {
        let at = j as usize * ks + d + d_v;
        add_assign(&mut rows.keys[at..at + d], row);
    }
    // dV_b += dv_coef · Σ_a g_a, the same for every key of the bucket.
    let g_sum = &mut t[..d_v];
    g_sum.fill(0.0);
    for g in ga.chunks_exact(d_v) {
        add_assign(g_sum, g);
    }
    for &j in keys {
        let at = j as usize * ks + 2 * d + d_v;
        axpy(&mut rows.keys[at..at + d_v], dv_coef, g_sum);
    }
}

/// `a += b`, elementwise.
#[inline(always)]
pub(crate) fn add_assign(a: &mut [f32], b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += *y;
    }
}

/// `a += s · b`, elementwise.
#[inline(always)]
fn axpy(a: &mut [f32], s: f32, b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += s * *y;
    }
}

pub(crate) use crate::linalg::dot;

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

    /// Hash-major codes of `m` hashes of `n_src` and `n_dst` tokens with `τ = 8`: hashes with
    /// few buckets, hashes whose buckets are almost all distinct, and unhashed tokens.
    fn mixed_codes(m: usize, n_src: usize, n_dst: usize) -> (Vec<u32>, Vec<u32>) {
        let code = |h: usize, i: usize, side: usize| -> u32 {
            let x = (i * 31 + h * 17 + side * 7) % 97;
            if x % 11 == 4 {
                NO_CODE
            } else if h % 3 == 1 {
                (x % 5) as u32 // few buckets
            } else {
                ((i * 13 + h) % 256) as u32 // mostly one token per bucket
            }
        };
        let src = (0..m * n_src)
            .map(|t| code(t / n_src, t % n_src, 0))
            .collect();
        let dst = (0..m * n_dst)
            .map(|t| code(t / n_dst, t % n_dst, 1))
            .collect();
        (src, dst)
    }

    /// Codes `c` mapped one to one onto codes of more than 22 bits: the sorted path.
    fn wide(c: &[u32]) -> Vec<u32> {
        c.iter()
            .map(|&c| if c == NO_CODE { c } else { c * 3001 + 11 })
            .collect()
    }

    /// `cumulate` against its definition, and the compact (grouped) path against the sorted one
    /// bit for bit: 7 hashes (groups of 4 and partial ones), hashes whose buckets are almost all
    /// distinct (the group's row budget forces a flush) or few, unhashed tokens on both sides,
    /// more destinations than sources, a range of hashes not starting at 0.
    #[test]
    fn cumulation_matches_its_definition_in_any_grouping() {
        let (n_src, n_dst, w, m, tau) = (90, 130, 5, 7, 8);
        let (src, dst) = mixed_codes(m, n_src, n_dst);
        let vals: Vec<f32> = (0..n_src * w).map(|i| ((i as f32) * 0.37).sin()).collect();
        let (src_wide, dst_wide) = (wide(&src), wide(&dst));
        let mut scratch = CumulationScratch::default();
        for hashes in [0..m, 2..m, 3..4] {
            let mut out = vec![f32::NAN; n_dst * w];
            let codes = Codes {
                src: &src,
                dst: &dst,
                tau,
            };
            cumulate(codes, &vals, &mut out, w, hashes.clone(), &mut scratch);
            for i in 0..n_dst {
                for c in 0..w {
                    let want: f64 = hashes
                        .clone()
                        .flat_map(|h| (0..n_src).map(move |j| (h, j)))
                        .filter(|&(h, j)| {
                            let (a, b) = (dst[h * n_dst + i], src[h * n_src + j]);
                            a != NO_CODE && a == b
                        })
                        .map(|(_, j)| vals[j * w + c] as f64)
                        .sum();
                    assert!(
                        (out[i * w + c] as f64 - want).abs() < 1e-4,
                        "{hashes:?} {i} {c}"
                    );
                }
            }
            let mut sorted = vec![f32::NAN; n_dst * w];
            let codes = Codes {
                src: &src_wide,
                dst: &dst_wide,
                tau: 22,
            };
            cumulate(codes, &vals, &mut sorted, w, hashes.clone(), &mut scratch);
            assert_eq!(
                out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                sorted.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{hashes:?}"
            );
        }
    }

    /// Rows so wide that a group's bucket sums exceed [`PREFETCH_TABLE_BYTES`] (bucket rows are
    /// prefetched): the compact path still gives the sorted path's sums, bit for bit.
    #[test]
    fn cumulation_with_prefetched_buckets_matches_the_sorted_path() {
        let (n_src, n_dst, m, tau) = (90, 130, 4, 8);
        let (src, dst) = mixed_codes(m, n_src, n_dst);
        let buckets = src[..n_src].iter().filter(|&&c| c != NO_CODE).count();
        let w = PREFETCH_TABLE_BYTES.div_ceil(4 * buckets / 2) + 3;
        let vals: Vec<f32> = (0..n_src * w).map(|i| ((i as f32) * 0.37).sin()).collect();
        let mut scratch = CumulationScratch::default();
        let mut compact = vec![f32::NAN; n_dst * w];
        let codes = Codes {
            src: &src,
            dst: &dst,
            tau,
        };
        cumulate(codes, &vals, &mut compact, w, 0..m, &mut scratch);
        let (src_wide, dst_wide) = (wide(&src), wide(&dst));
        let mut sorted = vec![f32::NAN; n_dst * w];
        let codes = Codes {
            src: &src_wide,
            dst: &dst_wide,
            tau: 22,
        };
        cumulate(codes, &vals, &mut sorted, w, 0..m, &mut scratch);
        assert!(
            compact
                .iter()
                .zip(&sorted)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
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
        // One bucket big enough for the outer-product path vs the same pairs summed naively.
        let (d, d_v, n) = (3, 2, 200);
        let f = |i: usize, s: f32| ((i as f32) * s).sin();
        let q: Vec<f32> = (0..n * d).map(|i| f(i, 0.3)).collect();
        let k: Vec<f32> = (0..n * d).map(|i| f(i, 0.7)).collect();
        let g: Vec<f32> = (0..n * d_v).map(|i| f(i, 1.1)).collect();
        let v: Vec<f32> = (0..n * d_v).map(|i| f(i, 1.9)).collect();
        for n_in_bucket in [n, 3] {
            // Tokens past `n_in_bucket` sit in another bucket of one (pairs with themselves).
            let codes: Vec<u32> = (0..n as u32)
                .map(|i| if (i as usize) < n_in_bucket { 5 } else { 6 + i })
                .collect();
            let x = PairInputs {
                q: &q,
                k: &k,
                g: &g,
                v: &v,
                q_codes: &codes,
                k_codes: &codes,
                d,
                d_v,
                tau: 9,
            };
            let (mut dq, mut dk, mut dv) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; n * d_v]);
            let mut scratch = CumulationScratch::default();
            let coefs = Coefs {
                coef: 0.5,
                dv_coef: 0.25,
            };
            colliding_pairs(&x, 0..1, coefs, &mut dq, &mut dk, &mut dv, &mut scratch);
            let together = |i: usize, j: usize| codes[i] == codes[j];
            let s = |i: usize, j: usize| {
                0.5 * (0..d_v)
                    .map(|l| g[i * d_v + l] * v[j * d_v + l])
                    .sum::<f32>() as f64
            };
            for i in 0..n {
                for c in 0..d {
                    let wq: f64 = (0..n)
                        .filter(|&j| together(i, j))
                        .map(|j| s(i, j) * k[j * d + c] as f64)
                        .sum();
                    let wk: f64 = (0..n)
                        .filter(|&j| together(j, i))
                        .map(|j| s(j, i) * q[j * d + c] as f64)
                        .sum();
                    assert!((dq[i * d + c] as f64 - wq).abs() < 1e-3, "dq {i} {c}");
                    assert!((dk[i * d + c] as f64 - wk).abs() < 1e-3, "dk {i} {c}");
                }
                for c in 0..d_v {
                    let wv: f64 = (0..n)
                        .filter(|&j| together(j, i))
                        .map(|j| 0.25 * g[j * d_v + c] as f64)
                        .sum();
                    assert!((dv[i * d_v + c] as f64 - wv).abs() < 1e-3, "dv {i} {c}");
                }
            }
        }
    }
}
