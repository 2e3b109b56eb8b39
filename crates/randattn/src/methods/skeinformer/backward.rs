//! Skeinformer's backward with the samples held fixed, stage by stage: the output gradient
//! split between the sketched rows and the reused pilot rows; the sketched rows (adaptive or
//! simple normalisation, block by block) or the exact-row ablations; the pilot rows through the
//! exact kernel.

use rayon::prelude::*;

use super::{
    NONE, ROW_BLOCK, RowNorm, SkeinSaved, Skeinformer, SketchGrads, SketchHead, gather_columns,
};
use crate::error::{Error, Result};
use crate::estimator::{Attention, Estimator, Grads, HeadGrads};
use crate::inputs::{AttentionInputs, Dims};
use crate::methods::vmean::mean_backward;
use crate::params::resolve_scale;

impl Skeinformer {
    /// The output gradient split by where it goes: masked queries pass nothing, and with pilot
    /// reuse the pilot rows' gradient goes to the exact path (returned over the pilot table,
    /// `[batch, heads, p_max, d_v]`) and is zeroed in the sketched one.
    pub(super) fn split_output_gradient<'g>(
        &self,
        x: &AttentionInputs<'_>,
        s: &SkeinSaved,
        grad_output: &'g [f32],
    ) -> (std::borrow::Cow<'g, [f32]>, Option<Vec<f32>>) {
        let Dims {
            heads, n_q, d_v, ..
        } = x.dims();
        let p_max = s.p_max;
        let mut g = x.without_masked_queries(grad_output);
        let g_pilot = (self.pilot_reuse && p_max > 0)
            .then(|| Skeinformer::pilot_rows(x, &s.pilots, p_max, &g, d_v).0);
        if self.pilot_reuse {
            for (bh, gh) in g.to_mut().chunks_exact_mut(n_q * d_v).enumerate() {
                let b = bh / heads;
                for &i in &s.pilots[b * p_max..(b + 1) * p_max] {
                    if i != NONE {
                        gh[i as usize * d_v..(i as usize + 1) * d_v].fill(0.0);
                    }
                }
            }
        }
        (g, g_pilot)
    }

    /// Adaptive or simple row normalisation: each head's sketched rows block by block
    /// ([`SketchHead::backward_block`]), scattered back to the sampled columns; heads whose
    /// sample is empty output the mean of V.
    pub(super) fn sketch_backward(
        &self,
        x: &AttentionInputs<'_>,
        s: &SkeinSaved,
        g: &[f32],
    ) -> Grads {
        let dims = x.dims();
        let Dims {
            heads, n_q, d, d_v, ..
        } = dims;
        let scale = resolve_scale(self.scale, d);
        let c_max = s.c_max;
        let mut grads = Grads::zeros(x);
        let empty: Vec<bool> = (0..dims.batch_heads())
            .map(|bh| {
                s.columns[bh * c_max..(bh + 1) * c_max]
                    .iter()
                    .all(|&j| j == NONE)
            })
            .collect();
        grads
            .par_heads(dims)
            .enumerate()
            .for_each(|(bh, HeadGrads { dq, dk, dv })| {
                if empty[bh] {
                    return;
                }
                let cols: Vec<u32> = s.columns[bh * c_max..(bh + 1) * c_max]
                    .iter()
                    .copied()
                    .filter(|&j| j != NONE)
                    .collect();
                let hc = gather_columns(x, bh, &cols);
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
                let c = cols.len();
                let mut acc = SketchGrads {
                    dk_cols: vec![0.0f32; c * d],
                    dv_cols: vec![0.0f32; c * d_v],
                    dv_rest: vec![0.0f32; d_v],
                    scratch: Vec::new(),
                };
                let gh = &g[bh * n_q * d_v..(bh + 1) * n_q * d_v];
                for (blk, (gb, dqb)) in gh
                    .chunks(ROW_BLOCK * d_v)
                    .zip(dq.chunks_mut(ROW_BLOCK * d))
                    .enumerate()
                {
                    head.backward_block(blk * ROW_BLOCK, gb, dqb, &mut acc);
                }
                let SketchGrads {
                    dk_cols,
                    dv_cols,
                    dv_rest,
                    ..
                } = acc;
                // v_rest = Σ_{unmasked} v_j − Σ_{sampled} v_j.
                let keep = x.key_mask_row(bh / heads);
                for (j, row) in dv.chunks_exact_mut(d_v).enumerate() {
                    if keep.is_none_or(|m| m[j]) {
                        for (a, b) in row.iter_mut().zip(&dv_rest) {
                            *a += *b;
                        }
                    }
                }
                for (slot, &j) in cols.iter().enumerate() {
                    let j = j as usize;
                    for (a, b) in dk[j * d..(j + 1) * d]
                        .iter_mut()
                        .zip(&dk_cols[slot * d..(slot + 1) * d])
                    {
                        *a += *b;
                    }
                    for ((a, b), r) in dv[j * d_v..(j + 1) * d_v]
                        .iter_mut()
                        .zip(&dv_cols[slot * d_v..(slot + 1) * d_v])
                        .zip(&dv_rest)
                    {
                        *a += *b - *r;
                    }
                }
            });
        // Heads whose sample is empty output the mean of V.
        mean_backward(x, g, &mut grads.dv, &|bh, i| {
            empty[bh] && x.query_kept(bh, i)
        });
        grads
    }

    /// Exact or no row normalisation (the O(n²) ablations): the exact kernel on the weighted
    /// sampled values `V' = w ⊙ V` (0 off the sample), then `dV = w ⊙ dV'`.
    pub(super) fn exact_rows_backward(
        &self,
        x: &AttentionInputs<'_>,
        s: &SkeinSaved,
        seed: u64,
        g: &[f32],
    ) -> Result<Grads> {
        let dims = x.dims();
        let Dims { n_k, d_v, .. } = dims;
        let c_max = s.c_max;
        let v = self.weighted_values(x, s);
        let sub = AttentionInputs::new(
            x.q(),
            dims.q_shape(),
            x.k(),
            dims.k_shape(),
            &v,
            dims.v_shape(),
        )?;
        let sub = Self::with_masks(x, sub, x.query_mask())?;
        let f = self.exact().forward(&sub, seed)?;
        let mut grads = self.exact().backward(&sub, seed, &f.saved, g)?;
        // V' = w ⊙ V on the sampled columns, 0 elsewhere.
        let mut dv = crate::linalg::par_zeroed(x.v().len());
        dv.par_chunks_mut(n_k * d_v)
            .zip(grads.dv.par_chunks(n_k * d_v))
            .enumerate()
            .for_each(|(bh, (out, dvp))| {
                for (slot, &j) in s.columns[bh * c_max..(bh + 1) * c_max].iter().enumerate() {
                    if j == NONE {
                        continue;
                    }
                    let j = j as usize;
                    let w = if s.weights.is_empty() {
                        1.0
                    } else {
                        s.weights[bh * c_max + slot]
                    };
                    for (o, a) in out[j * d_v..(j + 1) * d_v]
                        .iter_mut()
                        .zip(&dvp[j * d_v..(j + 1) * d_v])
                    {
                        *o = w * a;
                    }
                }
            });
        grads.dv = dv;
        Ok(grads)
    }

    /// Reused pilot rows: their exact softmax rows carry their own output gradient `g_pilot`
    /// (`[batch, heads, p_max, d_v]` over the pilot table); adds its Q, K and V gradients.
    pub(super) fn pilot_backward(
        &self,
        x: &AttentionInputs<'_>,
        s: &SkeinSaved,
        seed: u64,
        g_pilot: &[f32],
        grads: &mut Grads,
    ) -> Result<()> {
        let dims = x.dims();
        let Dims {
            batch,
            heads,
            n_q,
            d,
            ..
        } = dims;
        let p_max = s.p_max;
        let (q_pilot, slots) = Self::pilot_rows(x, &s.pilots, p_max, x.q(), d);
        let sub = AttentionInputs::new(
            &q_pilot,
            [batch, heads, p_max, d],
            x.k(),
            dims.k_shape(),
            x.v(),
            dims.v_shape(),
        )?;
        let sub = Self::with_masks(x, sub, Some(&slots))?;
        // The forward kept the pilot rows' outputs and log-sum-exps (whenever it reuses pilots).
        let Some(rows) = &s.pilot_rows else {
            return Err(Error::Saved {
                message: "holds no pilot rows, but this configuration reuses them".to_string(),
            });
        };
        let pg = self.exact().backward_saved(&sub, seed, rows, g_pilot)?;
        for (a, b) in grads.dk.iter_mut().zip(&pg.dk) {
            *a += *b;
        }
        for (a, b) in grads.dv.iter_mut().zip(&pg.dv) {
            *a += *b;
        }
        for (bh, (dq, rows)) in grads
            .dq
            .chunks_exact_mut(n_q * d)
            .zip(pg.dq.chunks_exact(p_max * d))
            .enumerate()
        {
            let b = bh / heads;
            for (row, &i) in rows
                .chunks_exact(d)
                .zip(&s.pilots[b * p_max..(b + 1) * p_max])
            {
                if i != NONE {
                    let i = i as usize;
                    for (a, r) in dq[i * d..(i + 1) * d].iter_mut().zip(row) {
                        *a += *r;
                    }
                }
            }
        }
        Ok(())
    }
}
