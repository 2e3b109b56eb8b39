//! Helpers shared by the integration tests: random cases with masks, closeness checks.
#![allow(dead_code)] // each test binary uses a subset

use rand::Rng;
use rand_distr::StandardNormal;
use randattn::AttentionInputs;
use randattn::rng::stream;

/// One attention problem: `(batch, heads, n_q, n_k, d, d_v)`, standard normal Q, K, V.
pub struct Case {
    pub shape: (usize, usize, usize, usize, usize, usize), // b, h, n_q, n_k, d, d_v
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub key_mask: Option<Vec<bool>>,
    pub query_mask: Option<Vec<bool>>,
}

pub fn normal(len: usize, scale: f32, seed: u64, what: &str) -> Vec<f32> {
    let mut r = stream(seed, 0, 0, what);
    (0..len)
        .map(|_| scale * r.sample::<f32, _>(StandardNormal))
        .collect()
}

impl Case {
    pub fn new(shape: (usize, usize, usize, usize, usize, usize), seed: u64) -> Case {
        let (b, h, nq, nk, d, dv) = shape;
        Case {
            shape,
            q: normal(b * h * nq * d, 1.0, seed, "q"),
            k: normal(b * h * nk * d, 1.0, seed, "k"),
            v: normal(b * h * nk * dv, 1.0, seed, "v"),
            key_mask: None,
            query_mask: None,
        }
    }
    pub fn inputs(&self) -> AttentionInputs<'_> {
        let (b, h, nq, nk, d, dv) = self.shape;
        let mut x = AttentionInputs::new(
            &self.q,
            [b, h, nq, d],
            &self.k,
            [b, h, nk, d],
            &self.v,
            [b, h, nk, dv],
        )
        .unwrap();
        if let Some(m) = &self.key_mask {
            x = x.with_key_mask(m).unwrap();
        }
        if let Some(m) = &self.query_mask {
            x = x.with_query_mask(m).unwrap();
        }
        x
    }
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}[{i}] = {g}");
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: got {g}, want {w} (tol {tol} x {scale})"
        );
    }
}
