//! Layer normalisation with a fused forward **and** backward.
//!
//! `y = (x − μ)/√(σ² + ε) · γ + β` over the last dimension, μ and σ² the row's mean and (biased)
//! variance. candle-nn's `LayerNorm` runs contiguous inputs through a fused kernel that has no
//! backward: gradients silently stop at it, and a model built from it trains only the layers
//! after its last normalisation. This op is fused both ways. With `x̂ = (x − μ)·r`,
//! `r = 1/√(σ² + ε)` and `g = dy·γ`:
//!
//! `dx = r · (g − mean(g) − x̂ · mean(g·x̂))`, `dγ = Σ_rows dy·x̂`, `dβ = Σ_rows dy`.
//!
//! Rows run in parallel; the parameter gradients sum fixed blocks of rows in a fixed order, so the
//! result does not depend on the thread count.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, bail};
use candle_nn::{Init, VarBuilder};
use randattn_nn::op::slice;
use rayon::prelude::*;

/// Rows per block of the parameter-gradient reduction.
const BLOCK_ROWS: usize = 64;

/// A layer normalisation over the last dimension with learned scale and shift.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

/// `LayerNorm` of width `size` with variables `weight` (ones) and `bias` (zeros) under `vb`.
pub fn layer_norm(size: usize, eps: f32, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get_with_hints(size, "weight", Init::Const(1.0))?,
        bias: vb.get_with_hints(size, "bias", Init::Const(0.0))?,
        eps,
    })
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() != DType::F32 {
            bail!("layer norm: f32 only, got {:?}", x.dtype());
        }
        x.contiguous()?
            .apply_op3(&self.weight, &self.bias, Op { eps: self.eps })
    }
}

struct Op {
    eps: f32,
}

/// Mean and `1/√(σ² + ε)` of one row.
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let w = row.len() as f32;
    let mean = row.iter().sum::<f32>() / w;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / w;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for Op {
    fn name(&self) -> &'static str {
        "randattn-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = (
            slice(s1, l1, "layer norm input")?,
            slice(s2, l2, "layer norm weight")?,
            slice(s3, l3, "layer norm bias")?,
        );
        let w = gamma.len();
        if w == 0 || l1.shape().dims().last() != Some(&w) || beta.len() != w {
            bail!(
                "layer norm: input {:?} does not end in the width {w} of its weights",
                l1.shape()
            );
        }
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(w)
            .zip(x.par_chunks(w))
            .for_each(|(yr, xr)| {
                let (mean, r) = moments(xr, self.eps);
                for (((o, &v), &g), &b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                    *o = (v - mean) * r * g + b;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (xd, gamma, dy) = (flat(x)?, flat(weight)?, flat(grad)?);
        let w = gamma.len();
        let mut dx = vec![0.0f32; xd.len()];
        let block = BLOCK_ROWS * w;
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(block)
            .zip(xd.par_chunks(block).zip(dy.par_chunks(block)))
            .map(|(dxb, (xb, dyb))| {
                let (mut dg, mut db) = (vec![0.0f32; w], vec![0.0f32; w]);
                let mut xhat = vec![0.0f32; w];
                for ((dxr, xr), dyr) in dxb.chunks_mut(w).zip(xb.chunks(w)).zip(dyb.chunks(w)) {
                    let (mean, r) = moments(xr, self.eps);
                    let (mut mg, mut mgx) = (0.0f32, 0.0f32);
                    for j in 0..w {
                        xhat[j] = (xr[j] - mean) * r;
                        let g = dyr[j] * gamma[j];
                        mg += g;
                        mgx += g * xhat[j];
                        dg[j] += dyr[j] * xhat[j];
                        db[j] += dyr[j];
                    }
                    let (mg, mgx) = (mg / w as f32, mgx / w as f32);
                    for j in 0..w {
                        dxr[j] = r * (dyr[j] * gamma[j] - mg - xhat[j] * mgx);
                    }
                }
                (dg, db)
            })
            .collect();
        let (mut dg, mut db) = (vec![0.0f32; w], vec![0.0f32; w]);
        for (pg, pb) in &partial {
            for j in 0..w {
                dg[j] += pg[j];
                db[j] += pb[j];
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dg, w, dev)?),
            Some(Tensor::from_vec(db, w, dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Every gradient of `sum(c ⊙ LN(x))` against central differences (f64 reference of the
    /// same formula would hide an error in the formula; differences of the op itself do not).
    #[test]
    fn gradients_match_central_differences_and_the_unfused_formula() {
        let dev = Device::Cpu;
        let (rows, w) = (70, 12); // more rows than one reduction block
        let vals = |n: usize, s: u64| -> Vec<f32> {
            (0..n)
                .map(|i| (((i as u64 * 2654435761 + s) % 1000) as f32 / 500.0 - 1.0) * 2.0)
                .collect()
        };
        let x = Var::from_vec(vals(rows * w, 1), (rows, w), &dev).unwrap();
        let gamma = Var::from_vec(vals(w, 7), w, &dev).unwrap();
        let beta = Var::from_vec(vals(w, 9), w, &dev).unwrap();
        let c = Tensor::from_vec(vals(rows * w, 3), (rows, w), &dev).unwrap();
        let ln = LayerNorm {
            weight: gamma.as_tensor().clone(),
            bias: beta.as_tensor().clone(),
            eps: 1e-5,
        };
        let loss = |t: &Tensor| (t * &c).unwrap().sum_all().unwrap();
        let y = ln.forward(x.as_tensor()).unwrap();
        // The unfused formula through candle's own differentiable ops.
        let mean = x.as_tensor().mean_keepdim(1).unwrap();
        let xc = x.as_tensor().broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(1).unwrap();
        let reference = xc
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(gamma.as_tensor())
            .unwrap()
            .broadcast_add(beta.as_tensor())
            .unwrap();
        let diff = (&y - &reference).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        let grads = loss(&y).backward().unwrap();
        let ref_grads = loss(&reference).backward().unwrap();
        for (name, var) in [("x", &x), ("weight", &gamma), ("bias", &beta)] {
            let g = grads.get(var).expect(name).flatten_all().unwrap();
            let r = ref_grads.get(var).unwrap().flatten_all().unwrap();
            let g = g.to_vec1::<f32>().unwrap();
            let r = r.to_vec1::<f32>().unwrap();
            let scale = r.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (a, b) in g.iter().zip(&r) {
                // Both are f32 sums of at most `rows` terms: a few ulps of the largest entry.
                assert!((a - b).abs() <= 1e-5 * scale.max(1.0), "{name}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_width_mismatch_is_an_error() {
        let dev = Device::Cpu;
        let ln = LayerNorm {
            weight: Tensor::ones(4, DType::F32, &dev).unwrap(),
            bias: Tensor::zeros(4, DType::F32, &dev).unwrap(),
            eps: 1e-5,
        };
        let x = Tensor::ones((2, 5), DType::F32, &dev).unwrap();
        assert!(ln.forward(&x).is_err());
    }
}
