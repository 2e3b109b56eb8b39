//! V-Mean `vmean`: every query outputs the mean of the unmasked value rows — Skeinformer's
//! adaptive row normalisation with zero samples, and the floor every sketching method must beat
//! (Chen et al., NAACL 2022, brief `shared/papers/skeinformer.md`). Deterministic, `O(n·d_v)`
//! time and memory; masked queries output 0; its gradient reaches V only.

use rayon::prelude::*;

use crate::error::Result;
use crate::estimator::{Estimator, Grads, MethodInfo};
use crate::inputs::{AttentionInputs, Dims};
use crate::memory::{Memory, Sizes};

crate::method_params! {
    /// V-Mean `vmean`. See the module documentation.
    #[derive(Debug, Clone, PartialEq)]
    pub struct VMean {}
}

/// `dV += mask ⊙ (Σ_{i kept} g_i) / m` for every head: the backward of outputting the mean of the
/// unmasked values on the rows where `row_kept(bh, i)`.
pub(crate) fn mean_backward(
    x: &AttentionInputs<'_>,
    g: &[f32],
    dv: &mut [f32],
    row_kept: &(dyn Fn(usize, usize) -> bool + Sync),
) {
    let Dims {
        heads,
        n_q,
        n_k,
        d_v,
        ..
    } = x.dims();
    dv.par_chunks_mut(n_k * d_v)
        .enumerate()
        .for_each(|(bh, dv)| {
            let keep = x.key_mask_row(bh / heads);
            let count = keep.map_or(n_k, |m| m.iter().filter(|k| **k).count());
            if count == 0 {
                return;
            }
            let mut g_sum = vec![0.0f32; d_v];
            for (i, gi) in g[bh * n_q * d_v..(bh + 1) * n_q * d_v]
                .chunks_exact(d_v)
                .enumerate()
            {
                if row_kept(bh, i) {
                    for (a, b) in g_sum.iter_mut().zip(gi) {
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
}

impl Estimator for VMean {
    const INFO: MethodInfo = MethodInfo::new(
        "vmean",
        "V-Mean: every query outputs the mean of the unmasked values (sketching floor)",
        "O(n d_v) time and memory",
    );
    type Saved = ();

    fn memory(&self, s: &Sizes) -> Memory {
        let small = s.threads * s.d_v;
        Memory::from_values(s, s.o() + small, s.o() + s.grads() + small)
    }

    fn forward_saved(&self, x: &AttentionInputs<'_>, _seed: u64) -> Result<(Vec<f32>, ())> {
        let dims = x.dims();
        let Dims { n_q, d_v, .. } = dims;
        let mut output = crate::linalg::par_zeroed(dims.out_len());
        output
            .par_chunks_mut(n_q * d_v)
            .enumerate()
            .for_each(|(bh, out)| {
                let (mean, _) = x.unmasked_value_mean(bh);
                for (i, row) in out.chunks_exact_mut(d_v).enumerate() {
                    if x.query_kept(bh, i) {
                        row.copy_from_slice(&mean);
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
        let mut grads = Grads::zeros(x);
        mean_backward(x, grad_output, &mut grads.dv, &|bh, i| x.query_kept(bh, i));
        Ok(grads)
    }
}
