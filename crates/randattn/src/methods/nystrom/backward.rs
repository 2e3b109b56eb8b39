//! Nyströmformer's backward for one head, stage by stage in reverse order of the forward
//! `out = K1 · Z · (K3 · V)` with `K1 = softmax(s Q K̃ᵀ)`, `K2 = softmax(s Q̃ K̃ᵀ)`,
//! `Z = pinv(K2)`, `K3 = softmax(s Q̃ Kᵀ + M)` and landmarks `Q̃`, `K̃` (segment means):
//!
//! 1. [`products`]: the three products, to `dK1`, `dK2` (through the pseudo-inverse), `dK3`, `dV`;
//! 2. [`logits`]: the three softmaxes and the logits, to `dQ`, `dK` and the landmarks' gradients;
//! 3. [`landmarks`]: the segment means, to the queries and keys they average.

use super::{Head, softmax_backward};
use crate::estimator::HeadGrads;
use crate::inputs::AttentionInputs;
use crate::matrix::{MatMut, MatRef, matmul, product};
use crate::pinv::pinv_backward;
use crate::segments::spread_segment_grads;

/// The gradients of the three kernels: `dK1` (`n_q × m`), `dK2` (`m × m`), `dK3` (`m × n_k`).
struct KernelGrads {
    dk1: Vec<f32>,
    dk2: Vec<f32>,
    dk3: Vec<f32>,
}

/// The backward of head `bh` given its output gradient `g` (masked query rows zeroed): adds to
/// its `dq`, `dk`, `dv`.
pub(super) fn head(
    h: &Head<'_>,
    x: &AttentionInputs<'_>,
    bh: usize,
    g: &[f32],
    scale: f32,
    grads: HeadGrads<'_>,
) {
    let HeadGrads { dq, dk, dv } = grads;
    let mut kg = products(h, x.v_head(bh), g, dv);
    softmax_backward(&mut kg.dk1, &h.k1, h.m);
    softmax_backward(&mut kg.dk2, &h.k2, h.m);
    softmax_backward(&mut kg.dk3, &h.k3, x.dims().n_k);
    let (dq_land, dk_land) = logits(h, x, bh, &kg, scale, dq, dk);
    landmarks(h, &dq_land, &dk_land, dq, dk);
}

/// `out = K1 Y`: `dK1 = G Yᵀ`, `dY = K1ᵀ G`; `Y = Z W`: `dZ = dY Wᵀ`, `dW = Zᵀ dY`;
/// `W = K3 V`: `dK3 = dW Vᵀ`, `dV += K3ᵀ dW`; `Z = pinv(K2)`.
fn products(h: &Head<'_>, v: &[f32], g: &[f32], dv: &mut [f32]) -> KernelGrads {
    let m = h.m;
    let d_v = h.small.w.len() / m;
    let (n_q, n_k) = (h.k1.len() / m, h.k3.len() / m);
    let z = h.small.pinv.iterates.last().expect("Z is there");
    let dk1 = product(
        MatRef::new(g, n_q, d_v),
        MatRef::new(&h.small.y, m, d_v).t(),
        1.0,
    );
    let dy = product(
        MatRef::new(&h.k1, n_q, m).t(),
        MatRef::new(g, n_q, d_v),
        1.0,
    );
    let dz = product(
        MatRef::new(&dy, m, d_v),
        MatRef::new(&h.small.w, m, d_v).t(),
        1.0,
    );
    let dw = product(MatRef::new(z, m, m).t(), MatRef::new(&dy, m, d_v), 1.0);
    let dk3 = product(MatRef::new(&dw, m, d_v), MatRef::new(v, n_k, d_v).t(), 1.0);
    matmul(
        MatMut::new(dv, n_k, d_v),
        true,
        MatRef::new(&h.k3, m, n_k).t(),
        MatRef::new(&dw, m, d_v),
        1.0,
    );
    let dk2 = pinv_backward(&h.k2, m, &h.small.pinv, &dz);
    KernelGrads { dk1, dk2, dk3 }
}

/// The logits `L1 = s Q K̃ᵀ`, `L2 = s Q̃ K̃ᵀ`, `L3 = s Q̃ Kᵀ` (masked columns have zero
/// probability, hence zero gradient): adds to `dq`, `dk`; returns `(dQ̃, dK̃)`.
fn logits(
    h: &Head<'_>,
    x: &AttentionInputs<'_>,
    bh: usize,
    kg: &KernelGrads,
    scale: f32,
    dq: &mut [f32],
    dk: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let m = h.m;
    let (q, k) = (x.q_head(bh), x.k_head(bh));
    let d = h.q_land.len() / m;
    let (n_q, n_k) = (q.len() / d, k.len() / d);
    let KernelGrads { dk1, dk2, dk3 } = kg;
    let mut dq_land = vec![0.0f32; m * d];
    let mut dk_land = vec![0.0f32; m * d];
    matmul(
        MatMut::new(dq, n_q, d),
        true,
        MatRef::new(dk1, n_q, m),
        MatRef::new(&h.k_land, m, d),
        scale,
    );
    matmul(
        MatMut::new(&mut dk_land, m, d),
        true,
        MatRef::new(dk1, n_q, m).t(),
        MatRef::new(q, n_q, d),
        scale,
    );
    matmul(
        MatMut::new(&mut dq_land, m, d),
        true,
        MatRef::new(dk2, m, m),
        MatRef::new(&h.k_land, m, d),
        scale,
    );
    matmul(
        MatMut::new(&mut dk_land, m, d),
        true,
        MatRef::new(dk2, m, m).t(),
        MatRef::new(&h.q_land, m, d),
        scale,
    );
    matmul(
        MatMut::new(&mut dq_land, m, d),
        true,
        MatRef::new(dk3, m, n_k),
        MatRef::new(k, n_k, d),
        scale,
    );
    matmul(
        MatMut::new(dk, n_k, d),
        true,
        MatRef::new(dk3, m, n_k).t(),
        MatRef::new(&h.q_land, m, d),
        scale,
    );
    (dq_land, dk_land)
}

/// The landmarks are segment means of the kept queries and keys: each landmark's gradient is
/// shared out over its segment.
fn landmarks(h: &Head<'_>, dq_land: &[f32], dk_land: &[f32], dq: &mut [f32], dk: &mut [f32]) {
    let d = h.q_land.len() / h.m;
    spread_segment_grads(dq, d, &h.q_idx, &h.q_segs, dq_land);
    spread_segment_grads(dk, d, &h.k_idx, &h.k_segs, dk_land);
}
