//! Seeded synthetic workloads with realistically peaked attention.
//!
//! Random i.i.d. Q/K give nearly uniform attention, on which every estimator looks good; trained
//! layers have clustered keys, queries that sit near a few of those clusters, and a handful of
//! "heavy" tokens that every query attends to. [`clustered`] mimics that structure so the default
//! `randattn compare` table says something about real use.

use rand::Rng;
use rand_distr::StandardNormal;

use crate::error::Result;
use crate::inputs::{AttentionInputs, Dims};
use crate::rng::stream;

/// Q, K, V owned, with their sizes, and the layer input and value projection behind V.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Sizes (self-attention: `n_q = n_k`, `d_v = d`).
    pub dims: Dims,
    /// `[batch, heads, n, d]`.
    pub q: Vec<f32>,
    /// `[batch, heads, n, d]`.
    pub k: Vec<f32>,
    /// `[batch, heads, n, d]`: `X·W_V + b_V` split into heads.
    pub v: Vec<f32>,
    /// The layer input X, `[batch, n, d_model]`.
    pub x: Vec<f32>,
    /// W_V, `[d_model, heads·d]`.
    pub wv: Vec<f32>,
    /// b_V, `[heads·d]`.
    pub bv: Vec<f32>,
    /// `d_model = heads·d`.
    pub d_model: usize,
}

impl Workload {
    /// The inputs, with the value projection attached (so MCA can run on them too).
    pub fn inputs(&self) -> Result<AttentionInputs<'_>> {
        let Dims {
            batch,
            heads,
            n_k,
            d,
            ..
        } = self.dims;
        let shape = [batch, heads, n_k, d];
        AttentionInputs::new(&self.q, shape, &self.k, shape, &self.v, shape)?.with_value_projection(
            &self.x,
            [batch, n_k, self.d_model],
            &self.wv,
            [self.d_model, heads * d],
            Some(&self.bv),
        )
    }
}

/// Number of heavy tokens per head.
const HEAVY_TOKENS: usize = 4;

/// Clustered self-attention workload.
///
/// Per (batch, head): `C = clamp(n/64, 4, 32)` cluster centres of norm `R` with
/// `R² = 5·√d`, so that a query at its centre has a logit of about 5 (at scale `1/√d`) against
/// keys of its cluster and about 0 against others; every token belongs to a random cluster; keys
/// are centre + isotropic noise of norm ≈ 0.9R; queries are centre + half a shared global
/// direction `g` + the same noise; four "heavy" keys are `1.6·g` + noise, so every query
/// gives them a logit of about 4. V is `X·W_V + b_V` with X standard normal `[batch, n, d_model]`
/// (`d_model = heads·d`, rows of norm about `√d_model`, like LayerNorm outputs), W_V Gaussian
/// with log-normal input-feature scales (as trained weights have: some features matter more, so
/// MCA's sampling probabilities are not uniform) normalised to unit-variance values, and b_V
/// small: each value row is marginally close to standard normal.
///
/// Calibrated against the real MiniLM layers in `fixtures/minilm` (n = 512): there the
/// mean largest attention weight of a row is 0.10–0.24 (50–120× uniform) with an effective
/// support (exp of the row entropy) of 80–270 keys; this workload gives 0.11 and about 60.
pub fn clustered(batch: usize, heads: usize, n: usize, d: usize, seed: u64) -> Workload {
    let dims = Dims {
        batch,
        heads,
        n_q: n,
        n_k: n,
        d,
        d_v: d,
    };
    let len = batch * heads * n * d;
    let (mut q, mut k) = (vec![0.0f32; len], vec![0.0f32; len]);
    let radius = (5.0 * (d as f32).sqrt()).sqrt();
    let noise = 0.9 * radius / (d as f32).sqrt();
    let clusters = (n / 64).clamp(4, 32);
    for b in 0..batch {
        for h in 0..heads {
            let mut rng = stream(seed, b, h, "workload/clustered");
            let direction = |rng: &mut crate::rng::StreamRng| -> Vec<f32> {
                let x: Vec<f32> = (0..d).map(|_| rng.sample(StandardNormal)).collect();
                let norm = x.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
                x.into_iter().map(|a| a * radius / norm).collect()
            };
            let centres: Vec<Vec<f32>> = (0..clusters).map(|_| direction(&mut rng)).collect();
            let global = direction(&mut rng);
            let off = (b * heads + h) * n * d;
            for i in 0..n {
                let centre = &centres[rng.random_range(0..clusters)];
                let heavy = i < HEAVY_TOKENS.min(n / 8);
                let row = off + i * d;
                for c in 0..d {
                    let e1: f32 = rng.sample(StandardNormal);
                    let e2: f32 = rng.sample(StandardNormal);
                    k[row + c] = if heavy { 1.6 * global[c] } else { centre[c] } + noise * e1;
                    q[row + c] = centre[c] + 0.5 * global[c] + noise * e2;
                }
            }
        }
    }
    let d_model = heads * d;
    let cols = heads * d;
    let mut rng = stream(seed, 0, 0, "workload/projection");
    let scales: Vec<f32> = (0..d_model)
        .map(|_| (0.7 * rng.sample::<f32, _>(StandardNormal)).exp())
        .collect();
    let norm = (scales.iter().map(|s| s * s).sum::<f32>()).sqrt();
    let mut wv = vec![0.0f32; d_model * cols];
    for (row, s) in wv.chunks_exact_mut(cols).zip(&scales) {
        for w in row.iter_mut() {
            *w = s / norm * rng.sample::<f32, _>(StandardNormal);
        }
    }
    let bv: Vec<f32> = (0..cols)
        .map(|_| 0.1 * rng.sample::<f32, _>(StandardNormal))
        .collect();
    let mut x = vec![0.0f32; batch * n * d_model];
    for (b, xb) in x.chunks_exact_mut(n * d_model).enumerate() {
        let mut rng = stream(seed, b, 0, "workload/x");
        for v in xb.iter_mut() {
            *v = rng.sample(StandardNormal);
        }
    }
    let v = crate::inputs::project_values(&x, [batch, n, d_model], &wv, Some(&bv), heads)
        .expect("the workload's shapes are consistent");
    Workload {
        dims,
        q,
        k,
        v,
        x,
        wv,
        bv,
        d_model,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_seeded_and_peaked() {
        let a = clustered(1, 2, 256, 32, 3);
        let b = clustered(1, 2, 256, 32, 3);
        assert_eq!(a.q, b.q);
        assert_ne!(a.q, clustered(1, 2, 256, 32, 4).q);
        // Peakedness: the largest softmax weight of a row is far above uniform (1/n).
        let (n, d) = (256, 32);
        let scale = 1.0 / (d as f32).sqrt();
        let mut mean_top = 0.0;
        for i in 0..n {
            let logits: Vec<f32> = (0..n)
                .map(|j| scale * (0..d).map(|c| a.q[i * d + c] * a.k[j * d + c]).sum::<f32>())
                .collect();
            let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = logits.iter().map(|l| (l - m).exp()).sum();
            mean_top += 1.0 / z / n as f32;
        }
        assert!(mean_top > 25.0 / n as f32, "mean top weight {mean_top}");
    }
}
