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
use crate::matrix::{MatMut, MatRef, matmul, product};
use crate::segments::spread_segment_grads;

/// The gradients one head accumulates on its way back.
struct HeadBackward<'a, 'g> {
    h: &'a Head<'a>,
    lambda: f32,
    /// Sizes: queries, keys, head and value dims, proposals, samples.
    n_q: usize,
    n_k: usize,
    d: usize,
    d_v: usize,
    c: usize,
    j_n: usize,
    /// `∂L/∂[ω; q̃]` (`(j + c) × d`: `∂L/∂ω` on `∂L/∂q̃`), `∂L/∂x` (`n_q × d`), `∂L/∂y`
    /// (`n_k × d`), `∂L/∂μ` (`c × d`). `∂L/∂x` and `∂L/∂y` accumulate in the head's (zeroed)
    /// gradients of Q and K, scaled by `s^{1/2}` at the end.
    dstacked: Vec<f32>,
    dx: &'g mut [f32],
    dy: &'g mut [f32],
    dmu: Vec<f32>,
}

/// The gradient of `log α` and of `ℓ`'s other terms (stage 2's results).
struct LogWeightGrads {
    /// `∂L/∂z_j`.
    dz: Vec<f32>,
    /// `∂L/∂BH_j`.
    dbh: Vec<f32>,
    /// `∂L/∂L` (`j × c`), so far from `own_j`.
    dlmat: Vec<f32>,
}

/// The backward of one head: its output gradient `g` (masked query rows zeroed) in, the
/// gradients of Q, K (scaled back by `root = s^{1/2}`), V and — with given means — of the
/// proposal means (`dmu_out`, `c × d`; empty otherwise) out.
pub(super) fn head(
    h: &Head<'_>,
    lambda: f32,
    v: &[f32],
    g: &[f32],
    root: f32,
    out: HeadGrads<'_>,
    dmu_out: &mut [f32],
) {
    let (n_q, d) = (h.query_kept.len(), h.d());
    let (c, j_n) = (h.c, h.j_n());
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
        dstacked: vec![0.0f32; (j_n + c) * d],
        dx: out.dq,
        dy: out.dk,
        dmu: vec![0.0f32; c * d],
    };
    let (mut dlt, df) = b.output(g);
    let mut lw = b.log_weights(&mut dlt);
    b.query_side(&dlt);
    drop(dlt);
    b.balance(&mut lw);
    b.proposal_logits(&lw.dlmat);
    b.key_side(&df, &lw.dz, v, out.dv);
    b.samples();
    b.means(dmu_out);
    crate::linalg::scale_in_place(b.dx, root);
    crate::linalg::scale_in_place(b.dy, root);
}

impl HeadBackward<'_, '_> {
    /// `out = W F` (`W` is `n × j`): `dW = G Fᵀ`, `dF = Wᵀ G`; then `W = softmax_j(ℓ)` row by
    /// row: `dℓ = W ⊙ (dW − Σ_j W dW)`. Returns `dℓ` in the first `j` columns of an
    /// `n × (j + c)` buffer (the rest is for `∂L/∂t`, see [`Self::log_weights`]) and `dF`.
    fn output(&mut self, g: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (h, n_q, j_n, d_v, c) = (self.h, self.n_q, self.j_n, self.d_v, self.c);
        let width = j_n + c;
        let mut dlt = crate::linalg::zeroed(n_q * width);
        matmul(
            MatMut::strided(&mut dlt, n_q, j_n, width),
            false,
            MatRef::new(g, n_q, d_v),
            MatRef::new(&h.f, j_n, d_v).t(),
            1.0,
        );
        let mut df = vec![0.0f32; j_n * d_v];
        matmul(
            MatMut::new(&mut df, j_n, d_v),
            false,
            MatRef::strided(&h.wr, n_q, j_n, width).t(),
            MatRef::new(g, n_q, d_v),
            1.0,
        );
        for (drow, wrow) in dlt.chunks_exact_mut(width).zip(h.wr.chunks_exact(width)) {
            softmax_row_backward(&mut drow[..j_n], &wrow[..j_n]);
        }
        (dlt, df)
    }

    /// `ℓ ⊃ z_j − own_j` and `log α`: `dα = dℓ / α` where `α` was not clamped, split into `BH`
    /// and `r` (the mean over proposals in `α` takes `λ/C` of every sample's `dα`). Then
    /// `r = softmax over kept queries of t = q̃ xᵀ`, a column softmax of the rows' last `c`
    /// entries: `dt = r ⊙ (dr − Σ_n r dr)`, left in those columns of `dlt`.
    fn log_weights(&self, dlt: &mut [f32]) -> LogWeightGrads {
        let (h, c, j_n) = (self.h, self.c, self.j_n);
        let mut dz = vec![0.0f32; j_n];
        let mut dbh = vec![0.0f32; j_n];
        log_weight_rows(
            dlt,
            &h.wr,
            &h.r_mean,
            &h.bh,
            self.lambda,
            h.reps,
            &mut dz,
            &mut dbh,
        );
        let mut dlmat = vec![0.0f32; j_n * c];
        for j in 0..j_n {
            dlmat[j * c + j / h.reps] -= dz[j];
        }
        LogWeightGrads { dz, dbh, dlmat }
    }

    /// The query side's two products, `ℓ ⊃ ω·x` and `t = q̃ xᵀ`, as one: with
    /// `D = [dℓ | dt]` (`n × (j + c)`), `d[ω; q̃] += Dᵀ x` and `dx += D [ω; q̃]`.
    fn query_side(&mut self, dlt: &[f32]) {
        let (h, n_q, d, width) = (self.h, self.n_q, self.d, self.j_n + self.c);
        matmul(
            MatMut::new(&mut self.dstacked, width, d),
            true,
            MatRef::new(dlt, n_q, width).t(),
            MatRef::new(&h.x, n_q, d),
            1.0,
        );
        matmul(
            MatMut::new(self.dx, n_q, d),
            true,
            MatRef::new(dlt, n_q, width),
            MatRef::new(&h.stacked, width, d),
            1.0,
        );
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
            MatMut::new(&mut self.dstacked[..j_n * d], j_n, d),
            true,
            MatRef::new(dlmat, j_n, c),
            MatRef::new(&h.mu, c, d),
            1.0,
        );
        matmul(
            MatMut::new(&mut self.dmu, c, d),
            true,
            MatRef::new(dlmat, j_n, c).t(),
            MatRef::new(h.omega(), j_n, d),
            1.0,
        );
        for cc in 0..c {
            let col: f32 = (0..j_n).map(|j| dlmat[j * c + cc]).sum();
            for t in 0..d {
                self.dmu[cc * d + t] -= col * h.mu[cc * d + t];
            }
        }
    }

    /// `F = softmax(A_k) V`, `z = LSE(A_k)`: `dA_k = P ⊙ (dF Vᵀ − dF·F + dz)` and `dV += Pᵀ dF`;
    /// then `A_k = ω yᵀ − ½‖y‖²`: `dω += dA y`, `dy += dAᵀ ω − (Σ_j dA) y`.
    fn key_side(&mut self, df: &[f32], dz: &[f32], v: &[f32], dv: &mut [f32]) {
        let (h, n_k, j_n, d, d_v) = (self.h, self.n_k, self.j_n, self.d, self.d_v);
        let mut dak = product(MatRef::new(df, j_n, d_v), MatRef::new(v, n_k, d_v).t(), 1.0);
        let mut col = vec![0.0f32; n_k];
        for (((row, p), (dfr, fr)), dzj) in dak
            .chunks_exact_mut(n_k)
            .zip(h.pk.chunks_exact(n_k))
            .zip(df.chunks_exact(d_v).zip(h.f.chunks_exact(d_v)))
            .zip(dz)
        {
            let shift = dzj - crate::linalg::dot(dfr, fr);
            key_row(row, p, shift, &mut col);
        }
        matmul(
            MatMut::new(dv, n_k, d_v),
            true,
            MatRef::new(&h.pk, j_n, n_k).t(),
            MatRef::new(df, j_n, d_v),
            1.0,
        );
        matmul(
            MatMut::new(&mut self.dstacked[..j_n * d], j_n, d),
            true,
            MatRef::new(&dak, j_n, n_k),
            MatRef::new(&h.y, n_k, d),
            1.0,
        );
        matmul(
            MatMut::new(self.dy, n_k, d),
            true,
            MatRef::new(&dak, j_n, n_k).t(),
            MatRef::new(h.omega(), j_n, d),
            1.0,
        );
        for ((dyr, yr), cm) in self
            .dy
            .chunks_exact_mut(d)
            .zip(h.y.chunks_exact(d))
            .zip(&col)
        {
            for (a, b) in dyr.iter_mut().zip(yr) {
                *a -= cm * b;
            }
        }
    }

    /// `ω_j = μ_{c(j)} ± ε`: `dμ_{c(j)} += dω_j`.
    fn samples(&mut self) {
        let (reps, d) = (self.h.reps, self.d);
        for j in 0..self.j_n {
            let cj = j / reps;
            for t in 0..d {
                self.dmu[cj * d + t] += self.dstacked[j * d + t];
            }
        }
    }

    /// `μ = q̃ + k̃`, segment means of the kept tokens: spreads `dμ` (and `dq̃`) over them. With
    /// given means (`dmu_out` not empty) they stand for `μ` and for `q̃` in `r`.
    fn means(&mut self, dmu_out: &mut [f32]) {
        let (h, d) = (self.h, self.d);
        let dq_land = &self.dstacked[self.j_n * d..];
        if !dmu_out.is_empty() {
            for ((o, a), b) in dmu_out.iter_mut().zip(&self.dmu).zip(dq_land) {
                *o = a + b;
            }
            return;
        }
        let dq_means: Vec<f32> = self.dmu.iter().zip(dq_land).map(|(a, b)| a + b).collect();
        spread_segment_grads(self.dx, d, &h.q_idx, &h.q_segs, &dq_means);
        spread_segment_grads(self.dy, d, &h.k_idx, &h.k_segs, &self.dmu);
    }
}

crate::linalg::multiversion! {
    /// The rows of [`HeadBackward::log_weights`]: for each query row, `dz += dℓ`;
    /// `da_j = dℓ_j / (α_j·reps)` where `α_j` was not clamped, 0 where it was; `dBH += da`;
    /// `dr_c = λ (Σ_{j: c(j)=c} da_j − mean share)` in the row's last `c` columns; then, over all
    /// rows, the query softmax's backward `dt = r ⊙ (dr − Σ_n r dr)` in place of `dr`.
    #[allow(clippy::too_many_arguments)]
    fn log_weight_rows(
        dlt: &mut [f32],
        wr: &[f32],
        r_mean: &[f32],
        bh: &[f32],
        lambda: f32,
        reps: usize,
        dz: &mut [f32],
        dbh: &mut [f32],
    ) {
        let j_n = bh.len();
        let width = dlt.len() / r_mean.len();
        let c = width - j_n;
        let (lambda_reps, inv_reps) = (lambda / reps as f32, 1.0 / reps as f32);
        let mut col = vec![0.0f32; c];
        let mut da = vec![0.0f32; j_n];
        for ((drow, wrrow), r_mean) in dlt.chunks_exact_mut(width).zip(wr.chunks_exact(width)).zip(r_mean) {
            super::alpha_row_inline(bh, &wrrow[j_n..], *r_mean, lambda_reps, reps, &mut da);
            let (dl, dr) = drow.split_at_mut(j_n);
            for (((a, g), z), b) in da.iter_mut().zip(dl.iter()).zip(dz.iter_mut()).zip(dbh.iter_mut()) {
                *z += g;
                let v = if *a > ALPHA_MIN { g / *a * inv_reps } else { 0.0 };
                *a = v;
                *b += v;
            }
            let share = lambda * crate::linalg::sum_lanes(&da) / c as f32;
            if reps == 1 {
                for (t, a) in dr.iter_mut().zip(&da) {
                    *t = lambda * a - share;
                }
            } else {
                dr.fill(-share);
                for (j, a) in da.iter().enumerate() {
                    dr[j / reps] += lambda * a;
                }
            }
            for ((s, t), r) in col.iter_mut().zip(dr.iter()).zip(&wrrow[j_n..]) {
                *s += t * r;
            }
        }
        for (drow, wrrow) in dlt.chunks_exact_mut(width).zip(wr.chunks_exact(width)) {
            for ((t, r), s) in drow[j_n..].iter_mut().zip(&wrrow[j_n..]).zip(&col) {
                *t = r * (*t - s);
            }
        }
    }
}

crate::linalg::multiversion! {
    /// One sample's row of the key softmax's backward: `dA = P ⊙ (dF Vᵀ + shift)` in place
    /// (`shift = dz_j − dF_j·F_j`), and its entries added to the column sums `col`.
    fn key_row(row: &mut [f32], p: &[f32], shift: f32, col: &mut [f32]) {
        for ((a, pv), s) in row.iter_mut().zip(p).zip(col.iter_mut()) {
            *a = pv * (*a + shift);
            *s += *a;
        }
    }
}
