//! The iterative Moore–Penrose pseudo-inverse of Nyströmformer and its backward: a fixed number
//! of cubically convergent steps from a scaled transpose, so the approximation is differentiable
//! step by step (no SVD, no data-dependent branches but the start's scale).

use crate::matrix::{MatMut, MatRef, matmul};

/// `I·c − a` for a square `m × m` matrix, in place.
fn shift_identity(a: &mut [f32], m: usize, c: f32) {
    for v in a.iter_mut() {
        *v = -*v;
    }
    for i in 0..m {
        a[i * m + i] += c;
    }
}

/// The intermediates of one step from `z`: `az = a z`, `x1 = 7I − az`, `x2 = 15I − az x1`,
/// `x3 = 13I − az x2` (the next iterate is `¼ z x3`).
fn pinv_step(a: &[f32], z: &[f32], m: usize, [az, x1, x2, x3]: [&mut Vec<f32>; 4]) {
    matmul(
        MatMut::new(az, m, m),
        false,
        MatRef::new(a, m, m),
        MatRef::new(z, m, m),
        1.0,
    );
    x1.copy_from_slice(az);
    shift_identity(x1, m, 7.0);
    matmul(
        MatMut::new(x2, m, m),
        false,
        MatRef::new(az, m, m),
        MatRef::new(x1, m, m),
        1.0,
    );
    shift_identity(x2, m, 15.0);
    matmul(
        MatMut::new(x3, m, m),
        false,
        MatRef::new(az, m, m),
        MatRef::new(x2, m, m),
        1.0,
    );
    shift_identity(x3, m, 13.0);
}

/// The iterates `Z₀ … Z_T` of the Moore–Penrose iteration for `a` (`m × m`), and the scale `c`
/// of `Z₀ = aᵀ / c` (the largest column sum) with its column.
#[derive(Debug, Clone)]
pub struct Pinv {
    /// `Z₀ … Z_T`, each `m × m`.
    pub iterates: Vec<Vec<f32>>,
    c: f32,
    col_max: (usize, f32),
}

/// The iteration of Razavi et al. (Nyströmformer’s `iterative_inv`) for `a` (`m × m`):
/// `Z_{t+1} = ¼ Z_t (13I − A Z_t (15I − A Z_t (7I − A Z_t)))` from `Z₀ = aᵀ / c`, `iters` steps.
pub fn pinv(a: &[f32], m: usize, iters: usize) -> Pinv {
    // ‖a‖_∞ (the largest row sum) is 1 for the row-stochastic softmax kernel, so only the largest
    // column sum scales Z₀ — which also keeps the start differentiable (rows tie at 1 exactly).
    let mut col_sums = vec![0.0f32; m];
    for row in a.chunks_exact(m) {
        for (cs, v) in col_sums.iter_mut().zip(row) {
            *cs += v.abs();
        }
    }
    let col_max =
        col_sums
            .iter()
            .copied()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (j, v)| {
                if v > best.1 { (j, v) } else { best }
            });
    let c = col_max.1;
    let mut z = vec![0.0f32; m * m];
    for i in 0..m {
        for j in 0..m {
            z[i * m + j] = a[j * m + i] / c;
        }
    }
    let mut iterates = vec![z];
    let (mut az, mut x1, mut x2, mut x3) = (
        vec![0.0f32; m * m],
        vec![0.0f32; m * m],
        vec![0.0f32; m * m],
        vec![0.0f32; m * m],
    );
    for _ in 0..iters {
        let z = iterates.last().expect("Z₀ is there");
        pinv_step(a, z, m, [&mut az, &mut x1, &mut x2, &mut x3]);
        let mut next = vec![0.0f32; m * m];
        matmul(
            MatMut::new(&mut next, m, m),
            false,
            MatRef::new(z, m, m),
            MatRef::new(&x3, m, m),
            0.25,
        );
        iterates.push(next);
    }
    Pinv {
        iterates,
        c,
        col_max,
    }
}

/// Gradient of `a` given the gradient `dz_last` of the last iterate (every step recomputed from
/// the kept iterates, so memory stays `O(T·m²)`).
pub fn pinv_backward(a: &[f32], m: usize, p: &Pinv, dz_last: &[f32]) -> Vec<f32> {
    let mut da = vec![0.0f32; m * m];
    let mut dz = dz_last.to_vec();
    let (mut az, mut x1, mut x2, mut x3) = (
        vec![0.0f32; m * m],
        vec![0.0f32; m * m],
        vec![0.0f32; m * m],
        vec![0.0f32; m * m],
    );
    let (mut dx1, mut dx2, mut dx3, mut daz, mut dz_prev) = (
        vec![0.0f32; m * m],
        vec![0.0f32; m * m],
        vec![0.0f32; m * m],
        vec![0.0f32; m * m],
        vec![0.0f32; m * m],
    );
    for z in p.iterates[..p.iterates.len() - 1].iter().rev() {
        // Recompute the step's intermediates.
        pinv_step(a, z, m, [&mut az, &mut x1, &mut x2, &mut x3]);
        // z' = ¼ z x3
        matmul(
            MatMut::new(&mut dz_prev, m, m),
            false,
            MatRef::new(&dz, m, m),
            MatRef::new(&x3, m, m).t(),
            0.25,
        );
        matmul(
            MatMut::new(&mut dx3, m, m),
            false,
            MatRef::new(z, m, m).t(),
            MatRef::new(&dz, m, m),
            0.25,
        );
        // x3 = 13I − az x2
        matmul(
            MatMut::new(&mut daz, m, m),
            false,
            MatRef::new(&dx3, m, m),
            MatRef::new(&x2, m, m).t(),
            -1.0,
        );
        matmul(
            MatMut::new(&mut dx2, m, m),
            false,
            MatRef::new(&az, m, m).t(),
            MatRef::new(&dx3, m, m),
            -1.0,
        );
        // x2 = 15I − az x1
        matmul(
            MatMut::new(&mut daz, m, m),
            true,
            MatRef::new(&dx2, m, m),
            MatRef::new(&x1, m, m).t(),
            -1.0,
        );
        matmul(
            MatMut::new(&mut dx1, m, m),
            false,
            MatRef::new(&az, m, m).t(),
            MatRef::new(&dx2, m, m),
            -1.0,
        );
        // x1 = 7I − az
        for (a, b) in daz.iter_mut().zip(&dx1) {
            *a -= *b;
        }
        // az = a z
        matmul(
            MatMut::new(&mut da, m, m),
            true,
            MatRef::new(&daz, m, m),
            MatRef::new(z, m, m).t(),
            1.0,
        );
        matmul(
            MatMut::new(&mut dz_prev, m, m),
            true,
            MatRef::new(a, m, m).t(),
            MatRef::new(&daz, m, m),
            1.0,
        );
        std::mem::swap(&mut dz, &mut dz_prev);
    }
    // Z₀ = aᵀ / c with c = the largest column sum of |a| (a ≥ 0 here).
    let mut dc = 0.0f32;
    for i in 0..m {
        for j in 0..m {
            da[j * m + i] += dz[i * m + j] / p.c;
            dc -= dz[i * m + j] * a[j * m + i] / (p.c * p.c);
        }
    }
    let jc = p.col_max.0;
    for i in 0..m {
        da[i * m + jc] += dc;
    }
    da
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::softmax_row;

    #[test]
    fn pinv_iterates_converge_and_their_backward_matches_finite_differences() {
        let m = 5;
        // A row-stochastic matrix, as the softmax kernel is.
        let mut a: Vec<f32> = (0..m * m)
            .map(|i| ((i * 7 % 11) as f32 * 0.37).sin() * 2.0)
            .collect();
        a.chunks_exact_mut(m).for_each(softmax_row);
        let p = pinv(&a, m, 20);
        let z = p.iterates.last().unwrap();
        let mut az = vec![0.0f32; m * m];
        matmul(
            MatMut::new(&mut az, m, m),
            false,
            MatRef::new(&a, m, m),
            MatRef::new(z, m, m),
            1.0,
        );
        for i in 0..m {
            for j in 0..m {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((az[i * m + j] - want).abs() < 1e-3, "A Z ≠ I at {i},{j}");
            }
        }
        // L = Σ Z_T ⊙ R for a few iteration counts (few iterations: Z₀'s scale matters).
        let r: Vec<f32> = (0..m * m)
            .map(|i| ((i * 5 % 13) as f32 * 0.71).cos())
            .collect();
        for iters in [0, 1, 2, 6] {
            let p = pinv(&a, m, iters);
            let da = pinv_backward(&a, m, &p, &r);
            let loss = |a: &[f32]| -> f64 {
                let p = pinv(a, m, iters);
                let z = p.iterates.last().unwrap();
                z.iter().zip(&r).map(|(x, y)| *x as f64 * *y as f64).sum()
            };
            let scale = da.iter().fold(0.0f32, |s, v| s.max(v.abs())) as f64;
            let eps = 1e-3f32;
            for idx in 0..m * m {
                let (mut ap, mut am) = (a.clone(), a.clone());
                ap[idx] += eps;
                am[idx] -= eps;
                let fd = (loss(&ap) - loss(&am)) / (2.0 * eps as f64);
                assert!(
                    (da[idx] as f64 - fd).abs() <= 2e-2 * scale,
                    "iters {iters} entry {idx}: analytic {} vs finite difference {fd}",
                    da[idx]
                );
            }
        }
    }
}
