//! MCA's backward beyond the exact kernel: with `Ṽ = X·W_V + b_V` sampled per token (each
//! token's features `k` with weights `c_k`, or all of them for exact tokens), the gradient
//! `dṼ` of the sampled values flows to
//!
//! - [`bias_grad`]: `db_h = Σ_{b,j} dṼ[b,h,j]`;
//! - [`weight_grad`]: `dW_h = Σ_b [X_Eᵀ dṼ_E + Σ_sampled c_k x_j[k] e_k dṼ_j]`;
//! - [`input_grad`]: `dX[b, j] = Σ_h (exact: W_h dṼ_j ; sampled: c_k ⟨W_h[k], dṼ_j⟩ at k)`,
//!
//! all with the forward's samples held fixed.

use rayon::prelude::*;

use super::SampledValues;
use crate::inputs::{Dims, ValueProjection};
use crate::linalg::zeroed;
use crate::matrix::{MatMut, MatRef, matmul};

/// `db_h = Σ_{b,j} dṼ[b,h,j]`, `[heads·d_v]`.
pub(super) fn bias_grad(dvt: &[f32], dims: Dims) -> Vec<f32> {
    let Dims {
        heads, n_k, d_v, ..
    } = dims;
    let cols = heads * d_v;
    let mut dbv = vec![0.0f32; cols];
    for (bh, head) in dvt.chunks_exact(n_k * d_v).enumerate() {
        let h = bh % heads;
        for row in head.chunks_exact(d_v) {
            for (a, v) in dbv[h * d_v..(h + 1) * d_v].iter_mut().zip(row) {
                *a += v;
            }
        }
    }
    dbv
}

/// `dW_h = Σ_b [X_Eᵀ dṼ_E + Σ_sampled c_k x_j[k] e_k dṼ_j]` over the exact tokens `E` and the
/// sampled ones, one task per head; `[d_model, heads·d_v]`.
pub(super) fn weight_grad(
    proj: &ValueProjection<'_>,
    sampled: &SampledValues,
    dvt: &[f32],
    dims: Dims,
) -> Vec<f32> {
    let Dims {
        batch,
        heads,
        n_k,
        d_v,
        ..
    } = dims;
    let (d_model, cols) = (proj.d_model, heads * d_v);
    let dw_heads: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let mut dw = vec![0.0f32; d_model * d_v];
            for b in 0..batch {
                let bh = b * heads + h;
                let hs = &sampled.heads[bh];
                let xb = &proj.x[b * n_k * d_model..(b + 1) * n_k * d_model];
                let gh = &dvt[bh * n_k * d_v..(bh + 1) * n_k * d_v];
                if !hs.exact.is_empty() {
                    let ne = hs.exact.len();
                    let mut xe = vec![0.0f32; ne * d_model];
                    let mut ge = vec![0.0f32; ne * d_v];
                    for ((xr, gr), &j) in xe
                        .chunks_exact_mut(d_model)
                        .zip(ge.chunks_exact_mut(d_v))
                        .zip(&hs.exact)
                    {
                        let j = j as usize;
                        xr.copy_from_slice(&xb[j * d_model..(j + 1) * d_model]);
                        gr.copy_from_slice(&gh[j * d_v..(j + 1) * d_v]);
                    }
                    matmul(
                        MatMut::new(&mut dw, d_model, d_v),
                        true,
                        MatRef::new(&xe, ne, d_model).t(),
                        MatRef::new(&ge, ne, d_v),
                        1.0,
                    );
                }
                for j in 0..n_k {
                    let gj = &gh[j * d_v..(j + 1) * d_v];
                    hs.for_each_entry(j, |k, c| {
                        let s = c * xb[j * d_model + k as usize];
                        for (a, gv) in dw[k as usize * d_v..(k as usize + 1) * d_v]
                            .iter_mut()
                            .zip(gj)
                        {
                            *a += s * gv;
                        }
                    });
                }
            }
            dw
        })
        .collect();
    let mut dwv = vec![0.0f32; d_model * cols];
    for (h, dw) in dw_heads.iter().enumerate() {
        for (k, row) in dw.chunks_exact(d_v).enumerate() {
            dwv[k * cols + h * d_v..k * cols + (h + 1) * d_v].copy_from_slice(row);
        }
    }
    dwv
}

/// `dX[b, j] = Σ_h (exact: W_h dṼ_j ; sampled: c_k ⟨W_h[k], dṼ_j⟩ at k)`, one task per (batch,
/// block of tokens), heads in order; `[batch, n_k, d_model]`.
pub(super) fn input_grad(
    proj: &ValueProjection<'_>,
    sampled: &SampledValues,
    dvt: &[f32],
    dims: Dims,
) -> Vec<f32> {
    let Dims {
        heads, n_k, d_v, ..
    } = dims;
    let (d_model, cols) = (proj.d_model, heads * d_v);
    let prep_w = |h: usize| -> Vec<f32> {
        let mut w = vec![0.0f32; d_model * d_v];
        for (k, row) in w.chunks_exact_mut(d_v).enumerate() {
            row.copy_from_slice(&proj.wv[k * cols + h * d_v..k * cols + (h + 1) * d_v]);
        }
        w
    };
    let packed: Vec<Vec<f32>> = (0..heads).into_par_iter().map(prep_w).collect();
    let mut dx = zeroed(proj.x.len());
    const BLOCK: usize = 64;
    dx.par_chunks_mut(n_k * d_model)
        .enumerate()
        .for_each(|(b, dx_b)| {
            dx_b.par_chunks_mut(BLOCK * d_model)
                .enumerate()
                .for_each(|(blk, dxb)| {
                    let t0 = blk * BLOCK;
                    let rows = dxb.len() / d_model;
                    let mut dense = vec![0.0f32; rows * d_model];
                    for (h, w) in packed.iter().enumerate() {
                        let bh = b * heads + h;
                        let hs = &sampled.heads[bh];
                        let gh = &dvt[bh * n_k * d_v..(bh + 1) * n_k * d_v];
                        matmul(
                            MatMut::new(&mut dense, rows, d_model),
                            false,
                            MatRef::new(&gh[t0 * d_v..(t0 + rows) * d_v], rows, d_v),
                            MatRef::new(w, d_model, d_v).t(),
                            1.0,
                        );
                        for (i, (dxr, dr)) in dxb
                            .chunks_exact_mut(d_model)
                            .zip(dense.chunks_exact(d_model))
                            .enumerate()
                        {
                            if hs.is_exact[t0 + i] {
                                for (a, v) in dxr.iter_mut().zip(dr) {
                                    *a += v;
                                }
                            } else {
                                hs.for_each_entry(t0 + i, |k, c| {
                                    dxr[k as usize] += c * dr[k as usize];
                                });
                            }
                        }
                    }
                });
        });
    dx
}
