//! Performer: the forward against an f64 implementation with the same directions, the kernel
//! estimate's unbiasedness and 1/√m error, orthogonal features' lower variance, finite
//! differences of the backward, masks, threads and bad input.
#![allow(clippy::needless_range_loop)] // index loops mirror the formulas

mod common;

use common::{
    Case, assert_close, check_qkv_gradients, dot_loss, log_log_slope, minilm, normal, random_masks,
};
use randattn::methods::performer::{Kernel, Performer};
use randattn::{Attention, Method};

/// f64 Performer with the method's own directions (no stabilisation needed in f64 here).
fn naive(p: &Performer, case: &Case, seed: u64) -> Vec<f32> {
    naive64(p, case, seed).iter().map(|v| *v as f32).collect()
}

fn naive64(p: &Performer, case: &Case, seed: u64) -> Vec<f64> {
    let (b, h, nq, nk, d, dv) = case.shape;
    let mut out = vec![0.0f64; b * h * nq * dv];
    for bh in 0..b * h {
        let head = bh % h;
        let fq = p.features(&case.q[bh * nq * d..(bh + 1) * nq * d], d, seed, head);
        let fk = p.features(&case.k[bh * nk * d..(bh + 1) * nk * d], d, seed, head);
        let width = fq.len() / nq;
        for i in 0..nq {
            if case
                .query_mask
                .as_ref()
                .is_some_and(|m| !m[(bh / h) * nq + i])
            {
                continue;
            }
            let (mut num, mut den) = (vec![0.0f64; dv], 0.0f64);
            for j in 0..nk {
                if case
                    .key_mask
                    .as_ref()
                    .is_some_and(|m| !m[(bh / h) * nk + j])
                {
                    continue;
                }
                let kij: f64 = (0..width)
                    .map(|t| fq[i * width + t] as f64 * fk[j * width + t] as f64)
                    .sum();
                den += kij;
                for c in 0..dv {
                    num[c] += kij * case.v[(bh * nk + j) * dv + c] as f64;
                }
            }
            for c in 0..dv {
                out[(bh * nq + i) * dv + c] = if den > 0.0 { num[c] / den } else { 0.0 };
            }
        }
    }
    out
}

#[test]
fn forward_matches_the_f64_formula_with_the_same_directions() {
    for (i, (kernel, orthogonal)) in [
        (Kernel::Positive, true),
        (Kernel::Positive, false),
        (Kernel::Hyperbolic, true),
    ]
    .into_iter()
    .enumerate()
    {
        let mut case = Case::new((2, 3, 21, 33, 16, 5), 10 + i as u64);
        random_masks(&mut case, i as u64);
        let p = Performer {
            features: 40,
            orthogonal,
            kernel,
            ..Performer::default()
        };
        let got = p.forward(&case.inputs(), 3).unwrap().output;
        assert_close(
            &format!("{kernel:?} {orthogonal}"),
            &got,
            &naive(&p, &case, 3),
            1e-4,
        );
    }
}

/// The forward streams keys and queries in tiles of 256 rows with an online key maximum: many
/// tiles, a first tile of masked keys only, and key norms growing along the sequence (so later
/// tiles raise the maximum and the sums so far are rescaled) must still give the formula.
#[test]
fn streamed_forward_matches_the_formula_across_tiles() {
    let (b, h, nq, nk, d) = (2, 2, 300, 700, 8);
    let mut case = Case::new((b, h, nq, nk, d, 3), 21);
    for (i, row) in case.k.chunks_exact_mut(d).enumerate() {
        let f = 0.3 + 1.5 * (i % nk) as f32 / nk as f32;
        row.iter_mut().for_each(|v| *v *= f);
    }
    let mut keep = vec![true; b * nk];
    keep[..300].fill(false); // batch 0: the first tile and part of the second masked
    for j in (nk..2 * nk).step_by(3) {
        keep[j] = false;
    }
    case.key_mask = Some(keep);
    for kernel in [Kernel::Positive, Kernel::Hyperbolic] {
        let p = Performer {
            features: 24,
            kernel,
            ..Performer::default()
        };
        let got = p.forward(&case.inputs(), 8).unwrap().output;
        assert_close(&format!("{kernel:?}"), &got, &naive(&p, &case, 8), 1e-4);
    }
}

/// φ(q)·φ(k) for every seed, and the target exp(s q·k), for 24 real (q, k) pairs of MiniLM
/// layer 5 with their directions kept and their norms set to `‖x‖ = 0.6` after the `s^{1/2}`
/// scaling. The relative variance of one estimate is `(exp(‖x + y‖²) − 1)/m`: with the raw
/// norms (‖x + y‖² of 10–30) a few hundred draws could not show anything, while here the
/// theory is testable.
fn kernel_estimates(p: &Performer, seeds: u64) -> (Vec<Vec<f64>>, Vec<f64>) {
    let (mut q, s) = minilm("layer5-q.npy");
    let (mut k, _) = minilm("layer5-k.npy");
    let (n, d) = (s[2], s[3]);
    let target_norm = 0.6 * (d as f32).powf(0.25); // ‖x‖ = 0.6 after x = q / d^{1/4}
    for row in q.chunks_exact_mut(d).chain(k.chunks_exact_mut(d)) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        for v in row.iter_mut() {
            *v *= target_norm / norm;
        }
    }
    let pairs: Vec<(usize, usize)> = (0..24).map(|t| (t * 17 % n, (t * 29 + 5) % n)).collect();
    let scale = 1.0 / (d as f64).sqrt();
    let target: Vec<f64> = pairs
        .iter()
        .map(|&(i, j)| {
            let dotp: f64 = (0..d)
                .map(|c| q[i * d + c] as f64 * k[j * d + c] as f64)
                .sum();
            (scale * dotp).exp()
        })
        .collect();
    let qs: Vec<f32> = pairs
        .iter()
        .flat_map(|&(i, _)| q[i * d..(i + 1) * d].to_vec())
        .collect();
    let ks: Vec<f32> = pairs
        .iter()
        .flat_map(|&(_, j)| k[j * d..(j + 1) * d].to_vec())
        .collect();
    let estimates = (0..seeds)
        .map(|seed| {
            let fq = p.features(&qs, d, seed, 0);
            let fk = p.features(&ks, d, seed, 0);
            let w = fq.len() / pairs.len();
            (0..pairs.len())
                .map(|t| {
                    (0..w)
                        .map(|c| fq[t * w + c] as f64 * fk[t * w + c] as f64)
                        .sum::<f64>()
                })
                .collect()
        })
        .collect();
    (estimates, target)
}

#[test]
fn features_estimate_the_softmax_kernel_without_bias_at_rate_one_over_sqrt_m() {
    // E[φ(q)·φ(k)] = exp(s q·k): the mean over 400 seeds lies within 5 standard errors of the
    // target for every pair (i.i.d. directions), and the RMS relative error of one draw falls
    // like m^(-1/2) (log-log slope -0.5 ± 0.1 over m = 16, 64, 256).
    let iid = |m: usize| Performer {
        features: m,
        orthogonal: false,
        ..Performer::default()
    };
    let (est, target) = kernel_estimates(&iid(16), 400);
    for t in 0..target.len() {
        let xs: Vec<f64> = est.iter().map(|e| e[t]).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len() - 1) as f64;
        let se = (var / xs.len() as f64).sqrt();
        assert!(
            (mean - target[t]).abs() <= 5.0 * se + 1e-6 * target[t],
            "pair {t}: mean {mean} vs exp(s q.k) {}, se {se}",
            target[t]
        );
    }
    let ms = [16usize, 64, 256];
    let rms: Vec<f64> = ms
        .iter()
        .map(|&m| {
            let (est, target) = kernel_estimates(&iid(m), 60);
            let sq: f64 = est
                .iter()
                .flat_map(|e| e.iter().zip(&target).map(|(x, y)| ((x - y) / y).powi(2)))
                .sum();
            (sq / (est.len() * target.len()) as f64).sqrt()
        })
        .collect();
    let points: Vec<(f64, f64)> = ms.iter().map(|m| *m as f64).zip(rms.clone()).collect();
    let slope = log_log_slope(&points);
    assert!(
        (slope + 0.5).abs() <= 0.1,
        "RMS errors {rms:?}, slope {slope}"
    );
}

#[test]
fn orthogonal_features_have_lower_variance_than_iid_ones() {
    let var = |orthogonal: bool| -> f64 {
        let p = Performer {
            features: 64,
            orthogonal,
            ..Performer::default()
        };
        let (est, target) = kernel_estimates(&p, 150);
        est.iter()
            .flat_map(|e| e.iter().zip(&target).map(|(x, y)| ((x - y) / y).powi(2)))
            .sum::<f64>()
            / (est.len() * target.len()) as f64
    };
    let (orf, iid) = (var(true), var(false));
    assert!(orf < iid, "orthogonal MSE {orf} vs i.i.d. {iid}");
}

#[test]
fn backward_matches_finite_differences() {
    for kernel in [Kernel::Positive, Kernel::Hyperbolic] {
        let mut case = Case::new((2, 2, 7, 9, 4, 3), 6);
        random_masks(&mut case, 4);
        let p = Performer {
            features: 12,
            kernel,
            ..Performer::default()
        };
        let x = case.inputs();
        let g = normal(x.dims().out_len(), 1.0, 3, "g");
        let f = p.forward(&x, 5).unwrap();
        let grads = p.backward(&x, 5, &f.saved, &g).unwrap();
        check_qkv_gradients(&format!("{kernel:?}"), &case, &grads, |c| {
            dot_loss(&p.forward(&c.inputs(), 5).unwrap().output, &g)
        });
    }
}

/// The streamed backward across many tiles (the finite-difference test above fits in one):
/// the directional derivative of `⟨G, out⟩` along a random direction of Q, K and V, by central
/// differences of the f64 formula, equals `⟨grad, direction⟩`.
#[test]
fn streamed_backward_matches_directional_derivatives_across_tiles() {
    let (b, h, nq, nk, d, dv) = (1, 2, 300, 600, 8, 3);
    let mut case = Case::new((b, h, nq, nk, d, dv), 31);
    for v in case.q.iter_mut().chain(case.k.iter_mut()) {
        *v *= 0.7;
    }
    let mut keep = vec![true; nk];
    keep[..280].fill(false);
    case.key_mask = Some(keep);
    let mut qkeep = vec![true; nq];
    qkeep[10..20].fill(false);
    case.query_mask = Some(qkeep);
    for kernel in [Kernel::Positive, Kernel::Hyperbolic] {
        let p = Performer {
            features: 16,
            kernel,
            ..Performer::default()
        };
        let x = case.inputs();
        let g = normal(x.dims().out_len(), 1.0, 3, "g");
        let f = p.forward(&x, 5).unwrap();
        let grads = p.backward(&x, 5, &f.saved, &g).unwrap();
        for which in 0..3 {
            let len = [case.q.len(), case.k.len(), case.v.len()][which];
            let dir = normal(len, 1.0, 40 + which as u64, "direction");
            let an: f64 = [&grads.dq, &grads.dk, &grads.dv][which]
                .iter()
                .zip(&dir)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            let eps = 1e-3f32;
            let loss_at = |t: f32| -> f64 {
                let mut c = Case::new(case.shape, 31);
                c.q.clone_from(&case.q);
                c.k.clone_from(&case.k);
                c.key_mask.clone_from(&case.key_mask);
                c.query_mask.clone_from(&case.query_mask);
                let field = [&mut c.q, &mut c.k, &mut c.v][which].as_mut_slice();
                for (a, u) in field.iter_mut().zip(&dir) {
                    *a += t * u;
                }
                naive64(&p, &c, 5)
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a * *b as f64)
                    .sum()
            };
            let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
            assert!(
                (an - fd).abs() <= 1e-3 * (1.0 + fd.abs()),
                "{kernel:?} tensor {which}: analytic {an} vs finite difference {fd}"
            );
        }
    }
}

#[test]
fn bad_parameters_name_the_valid_values() {
    // Masks, garbage under them, threads and seeds: tests/contract.rs.
    for (k, v, needle) in [
        ("features", "0", "parameter `features`"),
        ("kernel", "relu", "`positive` or `hyperbolic`"),
        ("orthogonal", "yes", "parameter `orthogonal`"),
    ] {
        let err = Method::parse("performer", &[(k, v)])
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{k}={v}: {err}");
    }
}
