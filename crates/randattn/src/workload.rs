//! Seeded synthetic workloads with realistically peaked attention.
//!
//! Random i.i.d. Q/K give nearly uniform attention, on which every estimator looks good; trained
//! layers have clustered keys, queries that sit near a few of those clusters, and a handful of
//! "heavy" tokens that every query attends to. [`clustered`] mimics that structure so the default
//! `randattn compare` table says something about real use.

use rand::Rng;
use rand_distr::StandardNormal;

use crate::inputs::Dims;
use crate::rng::stream;

/// Q, K, V (and an optional key mask) owned, with their sizes.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Sizes (self-attention: `n_q = n_k`, `d_v = d`).
    pub dims: Dims,
    /// `[batch, heads, n, d]`.
    pub q: Vec<f32>,
    /// `[batch, heads, n, d]`.
    pub k: Vec<f32>,
    /// `[batch, heads, n, d]`.
    pub v: Vec<f32>,
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
/// gives them a logit of about 4. V is standard normal.
///
/// Calibrated against the real MiniLM layers in `shared/fixtures/minilm` (n = 512): there the
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
    let (mut q, mut k, mut v) = (vec![0.0f32; len], vec![0.0f32; len], vec![0.0f32; len]);
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
                    let e3: f32 = rng.sample(StandardNormal);
                    k[row + c] = if heavy { 1.6 * global[c] } else { centre[c] } + noise * e1;
                    q[row + c] = centre[c] + 0.5 * global[c] + noise * e2;
                    v[row + c] = e3;
                }
            }
        }
    }
    Workload { dims, q, k, v }
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
