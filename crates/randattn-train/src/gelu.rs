//! GELU (tanh form) with a fused forward and backward, elementwise in parallel.
//!
//! `y = ½·x·(1 + tanh u)`, `u = √(2/π)·(x + 0.044715·x³)`;
//! `dy/dx = ½·(1 + t) + ½·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)` with `t = tanh u`.
//!
//! candle's `gelu` builds its backward from a dozen elementwise tensors (powers, tanh, products),
//! each a fresh buffer; in the LRA model's step that was the largest cost outside the GEMMs. This
//! op reads x once and writes once in each direction. Same formula as candle's `gelu` (tested).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use randattn_nn::op::slice;
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044_715;
/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `(1 + tanh u, 1 − tanh u)` through one `exp`, each without cancellation; |u| ≥ 15 gives
/// ±1 to f32 precision.
#[inline]
fn one_plus_minus_tanh(u: f32) -> (f32, f32) {
    let e = (2.0 * u.clamp(-15.0, 15.0)).exp();
    let r = 2.0 / (e + 1.0);
    (e * r, r)
}

/// GELU of `x` (f32), differentiable.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "randattn-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "gelu input")?;
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(yc, xc)| {
                for (o, &v) in yc.iter_mut().zip(xc) {
                    let (p, _) = one_plus_minus_tanh(SQRT_2_OVER_PI * (v + CUBIC * v * v * v));
                    *o = 0.5 * v * p;
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let x = arg.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0.0f32; x.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(dc, (xc, gc))| {
                for ((d, &v), &gv) in dc.iter_mut().zip(xc).zip(gc) {
                    let (p, m) = one_plus_minus_tanh(SQRT_2_OVER_PI * (v + CUBIC * v * v * v));
                    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * v * v);
                    *d = gv * (0.5 * p + 0.5 * v * p * m * du);
                }
            });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candles_gelu_forward_and_backward() {
        let xs: Vec<f32> = (0..40_001)
            .map(|i| (i as f32 - 20_000.0) / 1000.0)
            .collect();
        let x = Var::from_vec(xs, 40_001, &Device::Cpu).unwrap();
        let c = Tensor::from_vec(
            (0..40_001)
                .map(|i| ((i % 7) as f32 - 3.0) / 3.0)
                .collect::<Vec<f32>>(),
            40_001,
            &Device::Cpu,
        )
        .unwrap();
        let ours = gelu(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().gelu().unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                // f32 evaluations of one formula through different tanh routes: a few ulps.
                assert!(
                    (p - q).abs() <= 2e-6 * q.abs().max(1.0),
                    "{what}[{i}]: {p} vs {q}"
                );
            }
        };
        close(&ours, &theirs, "forward");
        let g1 = (ours * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &c)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(g1.get(&x).unwrap(), g2.get(&x).unwrap(), "gradient");
    }
}
