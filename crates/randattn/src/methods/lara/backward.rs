//! LARA's backward for one head, stage by stage in reverse order of the forward (all in scaled
//! coordinates `x = s^{1/2}·q`, `y = s^{1/2}·k`; the samples and proposals held fixed):
//!
//! 1. [`HeadBackward::output`]: `out = W F`, `W = softmax_j(ℓ)`;
//! 2. [`HeadBackward::log_weights`]: `ℓ_nj = log α_nj + ω_j·x_n + z_j − own_j`;
//! 3. [`HeadBackward::balance`]: `BH_j = softmax_c(L_j)[c(j)]`;
//! 4. [`HeadBackward::proposal_logits`]: `L = ω μᵀ − ½‖μ‖²`;
//! 5. [`HeadBackward::query_softmax`]: `r_c = softmax over kept queries of q̃_c·x`;
//! 6. [`HeadBackward::key_side`]: `F = softmax(A_k) V`, `z = LSE(A_k)`, `A_k = ω yᵀ − ½‖y‖²`;
//! 7. [`HeadBackward::samples`]: `ω_j = μ_{c(j)} ± ε`;
//! 8. [`HeadBackward::means`]: `μ = q̃ + k̃` (segment means), or the given means.

use super::{ALPHA_MIN, Head};
use crate::estimator::HeadGrads;
use crate::linalg::softmax_row_backward;
use crate::matrix::{MatMut, MatRef, matmul};

/// The gradients one head accumulates on its way back.
struct HeadBackward<'a> {
    h: &'a Head,
    lambda: f32,
    /// Sizes: queries, keys, head and value dims, proposals, samples.
    n_q: usize,
    n_k: usize,
    d: usize,
    d_v: usize,
    c: usize,
    j_n: usize,
    /// `∂L/∂ω` (`j × d`), `∂L/∂x` (`n_q × d`), `∂L/∂y` (`n_k × d`), `∂L/∂μ` and `∂L/∂q̃` (`c × d`).
    domega: Vec<f32>,
    dx: Vec<f32>,
    dy: Vec<f32>,
    dmu: Vec<f32>,
    dq_land: Vec<f32>,
}

/// The gradient of `log α` and of `ℓ`'s other terms (stage 2's results).
struct LogWeightGrads {
    /// `∂L/∂z_j`.
    dz: Vec<f32>,
    /// `∂L/∂BH_j`.
    dbh: Vec<f32>,
    /// `∂L/∂r` (`c × n_q`).
    dr: Vec<f32>,
    /// `∂L/∂L` (`j × c`), so far from `own_j`.
    dlmat: Vec<f32>,
}

/// The backward of one head: its output gradient `g` (masked query rows zeroed) in, the
/// gradients of Q, K (scaled back by `root = s^{1/2}`), V and — with given means — of the
/// proposal means (`dmu_out`, `c × d`; empty otherwise) out.
pub(super) fn head(
    h: &Head,
    lambda: f32,
    v: &[f32],
    g: &[f32],
    root: f32,
    out: HeadGrads<'_>,
    dmu_out: &mut [f32],
) {
    let (n_q, d) = (h.query_kept.len(), h.x.len() / h.query_kept.len());
    let (c, j_n) = (h.c, h.c * h.reps);
    let (n_k, d_v) = (h.y.len() / d, h.f.len() / j_n);
    let mut b = HeadBackward {
        h,
        lambda,
        n_q,
        n_k,
        d,
        d_v,
        c,
        j_n,
        domega: vec![0.0f32; j_n * d],
        dx: vec![0.0f32; n_q * d],
        dy: vec![0.0f32; n_k * d],
        dmu: vec![0.0f32; c * d],
        dq_land: vec![0.0f32; c * d],
    };
    let (dl, df) = b.output(g);
    let mut lw = b.log_weights(&dl);
    b.balance(&mut lw);
    b.proposal_logits(&lw.dlmat);
    b.query_softmax(&lw.dr);
    b.key_side(&df, &lw.dz, v, out.dv);
    b.samples();
    b.means(dmu_out);
    for (o, v) in out.dq.iter_mut().zip(&b.dx) {
        *o = root * v;
    }
    for (o, v) in out.dk.iter_mut().zip(&b.dy) {
        *o = root * v;
    }
}

impl HeadBackward<'_> {
    /// `out = W F` (`W` is `n × j`): `dW = G Fᵀ`, `dF = Wᵀ G`; then `W = softmax_j(ℓ)` row by
    /// row: `dℓ = W ⊙ (dW − Σ_j W dW)`. Adds `ℓ ⊃ ω·x` to `dω` and `dx`; returns `(dℓ, dF)`.
    fn output(&mut self, g: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (h, n_q, j_n, d_v, d) = (self.h, self.n_q, self.j_n, self.d_v, self.d);
        let mut dw = vec![0.0f32; n_q * j_n];
        matmul(
            MatMut::new(&mut dw, n_q, j_n),
            false,
            MatRef::new(g, n_q, d_v),
            MatRef::new(&h.f, j_n, d_v).t(),
            1.0,
        );
        let mut df = vec![0.0f32; j_n * d_v];
        matmul(
            MatMut::new(&mut df, j_n, d_v),
            false,
            MatRef::new(&h.w, n_q, j_n).t(),
            MatRef::new(g, n_q, d_v),
            1.0,
        );
        for (dr_, wr) in dw.chunks_exact_mut(j_n).zip(h.w.chunks_exact(j_n)) {
            softmax_row_backward(dr_, wr);
        }
        let dl = dw;
        // ℓ ⊃ ω·x: dω += dℓᵀ x, dx += dℓ ω.
        matmul(
            MatMut::new(&mut self.domega, j_n, d),
            true,
            MatRef::new(&dl, n_q, j_n).t(),
            MatRef::new(&h.x, n_q, d),
            1.0,
        );
        matmul(
            MatMut::new(&mut self.dx, n_q, d),
            true,
            MatRef::new(&dl, n_q, j_n),
            MatRef::new(&h.omega, j_n, d),
            1.0,
        );
        (dl, df)
    }

    /// `ℓ ⊃ z_j − own_j` and `log α`: `dα = dℓ / α` where `α` was not clamped, split into `BH`
    /// and `r` (the mean over proposals in `α` takes `λ/C` of every sample's `dα`).
    fn log_weights(&self, dl: &[f32]) -> LogWeightGrads {
        let (h, n_q, c, j_n) = (self.h, self.n_q, self.c, self.j_n);
        let reps = h.reps;
        let mut dz = vec![0.0f32; j_n];
        let mut dlmat = vec![0.0f32; j_n * c];
        let mut dbh = vec![0.0f32; j_n];
        // dR is [c, n_q]; it is gathered per query in a [n_q, c] buffer (contiguous per query, the
        // same additions in the same order) and transposed once: the strided updates missed the
        // cache on every access.
        let mut dr_t = vec![0.0f32; n_q * c];
        for ((drow, arow), dr_row) in dl
            .chunks_exact(j_n)
            .zip(h.alpha.chunks_exact(j_n))
            .zip(dr_t.chunks_exact_mut(c))
        {
            let mut mean_share = 0.0f32;
            for j in 0..j_n {
                dz[j] += drow[j];
                let a = arow[j];
                if a <= ALPHA_MIN {
                    continue;
                }
                let da = drow[j] / a / reps as f32;
                dbh[j] += da;
                dr_row[j / reps] += self.lambda * da;
                mean_share += self.lambda * da / c as f32;
            }
            for v in dr_row.iter_mut() {
                *v -= mean_share;
            }
        }
        let mut dr = vec![0.0f32; c * n_q];
        for (n, dr_row) in dr_t.chunks_exact(c).enumerate() {
            for (cc, v) in dr_row.iter().enumerate() {
                dr[cc * n_q + n] = *v;
            }
        }
        for j in 0..j_n {
            dlmat[j * c + j / reps] -= dz[j];
        }
        LogWeightGrads { dz, dbh, dr, dlmat }
    }

    /// `BH_j = softmax_c(L_j)[c(j)]`: adds `dBH_j · BH_j (δ − p)` to `dL_j`.
    fn balance(&self, lw: &mut LogWeightGrads) {
        let (h, c, j_n) = (self.h, self.c, self.j_n);
        for j in 0..j_n {
            let cj = j / h.reps;
            let row = &h.l[j * c..(j + 1) * c];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|a| (a - max).exp()).sum();
            for (cc, l) in row.iter().enumerate() {
                let p = (l - max).exp() / sum;
                let ind = if cc == cj { 1.0 } else { 0.0 };
                lw.dlmat[j * c + cc] += lw.dbh[j] * h.bh[j] * (ind - p);
            }
        }
    }

    /// `L = ω μᵀ − ½‖μ‖²`: `dω += dL μ`; `dμ += dLᵀ ω − (Σ_j dL) μ`.
    fn proposal_logits(&mut self, dlmat: &[f32]) {
        let (h, c, j_n, d) = (self.h, self.c, self.j_n, self.d);
        matmul(
            MatMut::new(&mut self.domega, j_n, d),
            true,
            MatRef::new(dlmat, j_n, c),
            MatRef::new(&h.mu, c, d),
            1.0,
        );
        matmul(
            MatMut::new(&mut self.dmu, c, d),
            true,
            MatRef::new(dlmat, j_n, c).t(),
            MatRef::new(&h.omega, j_n, d),
            1.0,
        );
        for cc in 0..c {
            let col: f32 = (0..j_n).map(|j| dlmat[j * c + cc]).sum();
            for t in 0..d {
                self.dmu[cc * d + t] -= col * h.mu[cc * d + t];
            }
        }
    }

    /// `r = softmax over kept queries of q̃ xᵀ`: `dq̃ = dT x`, `dx += dTᵀ q̃`.
    fn query_softmax(&mut self, dr: &[f32]) {
        let (h, n_q, c, d) = (self.h, self.n_q, self.c, self.d);
        let mut dt = vec![0.0f32; c * n_q];
        for cc in 0..c {
            let dt_c = &mut dt[cc * n_q..(cc + 1) * n_q];
            dt_c.copy_from_slice(&dr[cc * n_q..(cc + 1) * n_q]);
            softmax_row_backward(dt_c, &h.r[cc * n_q..(cc + 1) * n_q]);
            for (t, kept) in dt_c.iter_mut().zip(&h.query_kept) {
                if !kept {
                    *t = 0.0;
                }
            }
        }
        matmul(
            MatMut::new(&mut self.dq_land, c, d),
            false,
            MatRef::new(&dt, c, n_q),
            MatRef::new(&h.x, n_q, d),
            1.0,
        );
        matmul(
            MatMut::new(&mut self.dx, n_q, d),
            true,
            MatRef::new(&dt, c, n_q).t(),
            MatRef::new(&h.q_land, c, d),
            1.0,
        );
    }

    /// `F = softmax(A_k) V`, `z = LSE(A_k)`: `dA_k = P ⊙ (dF Vᵀ − dF·F + dz)` and `dV += Pᵀ dF`;
    /// then `A_k = ω yᵀ − ½‖y‖²`: `dω += dA y`, `dy += dAᵀ ω − (Σ_j dA) y`.
    fn key_side(&mut self, df: &[f32], dz: &[f32], v: &[f32], dv: &mut [f32]) {
        let (h, n_k, j_n, d, d_v) = (self.h, self.n_k, self.j_n, self.d, self.d_v);
        let mut dak = vec![0.0f32; j_n * n_k];
        matmul(
            MatMut::new(&mut dak, j_n, n_k),
            false,
            MatRef::new(df, j_n, d_v),
            MatRef::new(v, n_k, d_v).t(),
            1.0,
        );
        for j in 0..j_n {
            let dff: f32 = df[j * d_v..(j + 1) * d_v]
                .iter()
                .zip(&h.f[j * d_v..(j + 1) * d_v])
                .map(|(a, b)| a * b)
                .sum();
            for m in 0..n_k {
                let p = h.pk[j * n_k + m];
                dak[j * n_k + m] = p * (dak[j * n_k + m] - dff + dz[j]);
            }
        }
        matmul(
            MatMut::new(dv, n_k, d_v),
            true,
            MatRef::new(&h.pk, j_n, n_k).t(),
            MatRef::new(df, j_n, d_v),
            1.0,
        );
        matmul(
            MatMut::new(&mut self.domega, j_n, d),
            true,
            MatRef::new(&dak, j_n, n_k),
            MatRef::new(&h.y, n_k, d),
            1.0,
        );
        matmul(
            MatMut::new(&mut self.dy, n_k, d),
            true,
            MatRef::new(&dak, j_n, n_k).t(),
            MatRef::new(&h.omega, j_n, d),
            1.0,
        );
        for m in 0..n_k {
            let col: f32 = (0..j_n).map(|j| dak[j * n_k + m]).sum();
            for t in 0..d {
                self.dy[m * d + t] -= col * h.y[m * d + t];
            }
        }
    }

    /// `ω_j = μ_{c(j)} ± ε`: `dμ_{c(j)} += dω_j`.
    fn samples(&mut self) {
        let (reps, d) = (self.h.reps, self.d);
        for j in 0..self.j_n {
            let cj = j / reps;
            for t in 0..d {
                self.dmu[cj * d + t] += self.domega[j * d + t];
            }
        }
    }

    /// `μ = q̃ + k̃`, segment means of the kept tokens: spreads `dμ` (and `dq̃`) over them. With
    /// given means (`dmu_out` not empty) they stand for `μ` and for `q̃` in `r`.
    fn means(&mut self, dmu_out: &mut [f32]) {
        let (h, d) = (self.h, self.d);
        if !dmu_out.is_empty() {
            for ((o, a), b) in dmu_out.iter_mut().zip(&self.dmu).zip(&self.dq_land) {
                *o = a + b;
            }
            return;
        }
        for (cc, seg) in h.q_segs.iter().enumerate() {
            let inv = 1.0 / seg.len() as f32;
            for &i in &h.q_idx[seg.clone()] {
                for t in 0..d {
                    self.dx[i as usize * d + t] +=
                        (self.dmu[cc * d + t] + self.dq_land[cc * d + t]) * inv;
                }
            }
        }
        for (cc, seg) in h.k_segs.iter().enumerate() {
            let inv = 1.0 / seg.len() as f32;
            for &m in &h.k_idx[seg.clone()] {
                for t in 0..d {
                    self.dy[m as usize * d + t] += self.dmu[cc * d + t] * inv;
                }
            }
        }
    }
}
