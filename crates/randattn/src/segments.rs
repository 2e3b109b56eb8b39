//! Splitting a sequence into contiguous segments of nearly equal size: the landmarks of
//! Nyströmformer and the proposal means of LARA are means over such segments.

use std::ops::Range;

/// Which segments get one extra item when the length does not divide evenly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Larger {
    /// The first `len mod parts` segments (Nyströmformer's convention).
    First,
    /// The last `len mod parts` segments (LARA's: the first `(s+1)·parts − len` segments have
    /// `s = ⌊len/parts⌋` items, the rest `s + 1`).
    Last,
}

/// `len` items split into `parts` contiguous segments whose sizes differ by at most one, in
/// order; the extra items go to the segments `larger` names. Segments are empty when
/// `parts > len`.
pub fn segments(len: usize, parts: usize, larger: Larger) -> Vec<Range<usize>> {
    let (base, extra) = (len / parts, len % parts);
    let mut start = 0;
    (0..parts)
        .map(|s| {
            let big = match larger {
                Larger::First => s < extra,
                Larger::Last => s >= parts - extra,
            };
            let size = base + usize::from(big);
            let r = start..start + size;
            start += size;
            r
        })
        .collect()
}

crate::linalg::multiversion! {
    /// Means of the rows `idx[seg]` of `rows` (each `w` wide), one row per segment of `segs`
    /// (zeros for an empty segment).
    pub fn segment_means(rows: &[f32], w: usize, idx: &[u32], segs: &[Range<usize>]) -> Vec<f32> {
        let mut out = vec![0.0f32; segs.len() * w];
        for (o, seg) in out.chunks_exact_mut(w).zip(segs) {
            let inv = 1.0 / seg.len() as f32;
            for &i in &idx[seg.clone()] {
                let row = &rows[i as usize * w..(i as usize + 1) * w];
                for (a, b) in o.iter_mut().zip(row) {
                    *a += *b * inv;
                }
            }
        }
        out
    }
}

crate::linalg::multiversion! {
    /// The backward of [`segment_means`]: adds `grads[s] / |seg_s|` (`grads` is one `w`-wide
    /// row per segment) to every row `idx[seg_s]` of `rows`.
    pub fn spread_segment_grads(rows: &mut [f32], w: usize, idx: &[u32], segs: &[Range<usize>], grads: &[f32]) {
        for (seg, grad) in segs.iter().zip(grads.chunks_exact(w)) {
            let inv = 1.0 / seg.len() as f32;
            for &i in &idx[seg.clone()] {
                let row = &mut rows[i as usize * w..(i as usize + 1) * w];
                for (a, b) in row.iter_mut().zip(grad) {
                    *a += *b * inv;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_sequence_in_order_with_sizes_differing_by_one() {
        for len in 0..40 {
            for parts in 1..12 {
                for larger in [Larger::First, Larger::Last] {
                    let segs = segments(len, parts, larger);
                    assert_eq!(segs.len(), parts);
                    assert_eq!(segs[0].start, 0);
                    assert_eq!(segs[parts - 1].end, len);
                    for w in segs.windows(2) {
                        assert_eq!(w[0].end, w[1].start);
                    }
                    let sizes: Vec<usize> = segs.iter().map(|s| s.len()).collect();
                    let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                    assert!(hi - lo <= 1, "{sizes:?}");
                    let mut sorted = sizes.clone();
                    match larger {
                        Larger::First => sorted.sort_by(|a, b| b.cmp(a)),
                        Larger::Last => sorted.sort(),
                    }
                    assert_eq!(sizes, sorted, "{larger:?} {len}/{parts}");
                }
            }
        }
        assert_eq!(segments(7, 3, Larger::First), [0..3, 3..5, 5..7]);
        assert_eq!(segments(7, 3, Larger::Last), [0..2, 2..4, 4..7]);
    }
}
