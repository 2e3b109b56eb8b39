//! Helpers shared by the integration tests: random cases with masks, closeness checks.
#![allow(dead_code)] // each test binary uses a subset

use rand::Rng;
use rand_distr::StandardNormal;
use randattn::rng::stream;
use randattn::{Attention, AttentionInputs, Grads};

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

/// A float32 C-order `.npy` file of the MiniLM fixtures (`fixtures/minilm` in the
/// repository): its data and shape.
pub fn minilm(name: &str) -> (Vec<f32>, Vec<usize>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/minilm")
        .join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "missing fixture {} ({e}; fixtures/minilm is part of the repository)",
            path.display()
        )
    });
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{name}: not an npy file");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(
        header.contains("'<f4'") && header.contains("False"),
        "{name}: {header}"
    );
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape_text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data: Vec<f32> = bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>(), "{name}");
    (data, shape)
}

/// Relative Frobenius error `‖a − b‖ / ‖b‖`.
pub fn rel_error(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Random key (70% kept) and query (80% kept) masks; batch element 1, if any, attends to nothing.
pub fn random_masks(case: &mut Case, seed: u64) {
    let (b, _, nq, nk, _, _) = case.shape;
    let mut r = stream(seed, 0, 0, "masks");
    let mut km: Vec<bool> = (0..b * nk).map(|_| r.random_bool(0.7)).collect();
    let qm: Vec<bool> = (0..b * nq).map(|_| r.random_bool(0.8)).collect();
    if b > 1 {
        km[nk..2 * nk].fill(false); // batch element 1 attends to nothing
    }
    case.key_mask = Some(km);
    case.query_mask = Some(qm);
}

/// Forward and backward of `method` on `x` with `seed`, in a pool of `threads` threads.
pub fn run_in_pool(
    method: &(dyn Attention + Sync),
    x: &AttentionInputs<'_>,
    seed: u64,
    grad_output: &[f32],
    threads: usize,
) -> (Vec<f32>, Grads) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let f = method.forward(x, seed).unwrap();
        let grads = method.backward(x, seed, &f.saved, grad_output).unwrap();
        (f.output, grads)
    })
}
