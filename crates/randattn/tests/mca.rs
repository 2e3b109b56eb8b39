//! MCA: the AMM estimator's mean and variance against Drineas–Kannan–Mahoney's formulas, the
//! paper's per-row bound on real MiniLM layers and on synthetic data, α → 0, the budget formula
//! at its boundaries and under masks, the backward against the dense formula with the same
//! samples, threads and bad input.
#![allow(clippy::needless_range_loop)] // index loops mirror the formulas

mod common;

use common::{Case, assert_close, minilm, normal, random_masks, run_in_pool};
use randattn::methods::exact::ExactNaive;
use randattn::methods::mca::{Draws, Mca, Prepared, Probs, TokenSamples};
use randattn::{Attention, AttentionInputs, Method};

/// Q, K from a [`Case`], and X, W_V, b_V with V = X·W_V + b_V.
struct McaCase {
    case: Case,
    x: Vec<f32>,
    wv: Vec<f32>,
    bv: Vec<f32>,
    d_model: usize,
}

impl McaCase {
    fn synthetic(shape: (usize, usize, usize, usize, usize), d_model: usize, seed: u64) -> Self {
        let (b, h, n, d, dv) = shape;
        let mut case = Case::new((b, h, n, n, d, dv), seed);
        let x = normal(b * n * d_model, 1.0, seed, "x");
        // Uneven feature scales, so that p(k) is far from uniform.
        let mut wv = normal(d_model * h * dv, 0.3, seed, "wv");
        for (k, row) in wv.chunks_exact_mut(h * dv).enumerate() {
            let f = 0.2 + 2.0 * ((k * 7) % d_model) as f32 / d_model as f32;
            row.iter_mut().for_each(|v| *v *= f);
        }
        let bv = normal(h * dv, 0.5, seed, "bv");
        case.v = project(&x, &wv, &bv, (b, h, n, d_model, dv));
        McaCase {
            case,
            x,
            wv,
            bv,
            d_model,
        }
    }

    /// MiniLM layer `l`: real X, W_V, b_V, Q, K (n = 512, d_model = 384, 12 heads of 32).
    fn minilm(l: usize) -> Self {
        let (q, _) = minilm(&format!("layer{l}-q.npy"));
        let (k, _) = minilm(&format!("layer{l}-k.npy"));
        let (v, _) = minilm(&format!("layer{l}-v.npy"));
        let (x, _) = minilm(&format!("layer{l}-x.npy"));
        let (wv, _) = minilm(&format!("layer{l}-wv.npy"));
        let (bv, _) = minilm(&format!("layer{l}-bv.npy"));
        let mut case = Case::new((1, 12, 512, 512, 32, 32), 0);
        (case.q, case.k, case.v) = (q, k, v);
        McaCase {
            case,
            x,
            wv,
            bv,
            d_model: 384,
        }
    }

    fn inputs(&self) -> AttentionInputs<'_> {
        let (b, h, _, n, _, dv) = self.case.shape;
        self.case
            .inputs()
            .with_value_projection(
                &self.x,
                [b, n, self.d_model],
                &self.wv,
                [self.d_model, h * dv],
                Some(&self.bv),
            )
            .unwrap()
    }

    fn prepared(&self) -> Prepared {
        let (_, h, _, _, _, dv) = self.case.shape;
        Prepared::new(&self.wv, self.d_model, h, dv).unwrap()
    }
}

/// `[b, h, n, dv]` values `X·W_h + b_h`, in f64; `sizes` is `(b, h, n, d_model, dv)`.
fn project(
    x: &[f32],
    wv: &[f32],
    bv: &[f32],
    sizes: (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    let (b, h, n, d_model, dv) = sizes;
    let mut v = vec![0.0f32; b * h * n * dv];
    for bb in 0..b {
        for hh in 0..h {
            for j in 0..n {
                for c in 0..dv {
                    let mut s = bv[hh * dv + c] as f64;
                    for k in 0..d_model {
                        s += x[(bb * n + j) * d_model + k] as f64
                            * wv[k * h * dv + hh * dv + c] as f64;
                    }
                    v[((bb * h + hh) * n + j) * dv + c] = s as f32;
                }
            }
        }
    }
    v
}

/// Over many seeds, one MiniLM token's sampled value (bias removed) has mean `x·W_h` and mean
/// squared error `(1/r)(‖x‖²‖W_h‖_F² − ‖x W_h‖²)` (weight probabilities) or
/// `(1/r)((Σ_k |x_k|‖W_h[k]‖)² − ‖x W_h‖²)` (input-aware), at every budget: the `1/√r` rate.
#[test]
fn amm_estimator_is_unbiased_with_the_predicted_variance() {
    let mc = McaCase::minilm(5);
    let x = mc.inputs();
    let prep = mc.prepared();
    let (h, j, d_model, dv) = (3, 100, 384, 32);
    let xj = &mc.x[j * d_model..(j + 1) * d_model];
    let wrow = |k: usize| -> Vec<f64> {
        (0..dv)
            .map(|c| mc.wv[k * 12 * dv + h * dv + c] as f64)
            .collect()
    };
    let exact: Vec<f64> = (0..dv)
        .map(|c| (0..d_model).map(|k| xj[k] as f64 * wrow(k)[c]).sum())
        .collect();
    let x2: f64 = xj.iter().map(|v| (*v as f64).powi(2)).sum();
    let f2: f64 = (prep.frobenius()[h] as f64).powi(2);
    let y2: f64 = exact.iter().map(|v| v * v).sum();
    let l1: f64 = (0..d_model)
        .map(|k| (xj[k] as f64).abs() * wrow(k).iter().map(|v| v * v).sum::<f64>().sqrt())
        .sum();
    let seeds = 400u64;
    for (probs, draws) in [
        (Probs::Weight, Draws::Token),
        (Probs::InputAware, Draws::Token),
        (Probs::Weight, Draws::Shared),
    ] {
        let mca = Mca {
            probs,
            draws,
            ..Mca::default()
        };
        for r in [4u32, 16, 64] {
            let mut budgets = vec![0u32; 12 * 512];
            budgets[h * 512 + j] = r;
            let (mut mean, mut mse) = (vec![0.0f64; dv], 0.0f64);
            for seed in 0..seeds {
                let s = mca.sample_values(&x, &prep, &budgets, seed).unwrap();
                let row = &s.values[(h * 512 + j) * dv..(h * 512 + j + 1) * dv];
                for c in 0..dv {
                    let e = row[c] as f64 - mc.bv[h * dv + c] as f64;
                    mean[c] += e / seeds as f64;
                    mse += (e - exact[c]).powi(2) / seeds as f64;
                }
            }
            let theory = match probs {
                Probs::Weight => (x2 * f2 - y2) / r as f64,
                Probs::InputAware => (l1 * l1 - y2) / r as f64,
            };
            assert!(
                (mse / theory - 1.0).abs() < 0.2,
                "{probs:?} {draws:?} r={r}: mean squared error {mse} vs theory {theory}"
            );
            let bias2: f64 = mean.iter().zip(&exact).map(|(m, e)| (m - e).powi(2)).sum();
            assert!(
                bias2 < 3.0 * theory / seeds as f64,
                "{probs:?} {draws:?} r={r}: squared error of the mean {bias2} vs variance/seeds {}",
                theory / seeds as f64
            );
        }
    }
}

/// Per-row mean error (over seeds) of every head on MiniLM layers 0 and 5, against the model's
/// exact attention output, is below α·β·‖W_h‖_F, for several α; also on synthetic data with
/// masks (against the exact attention of the exact values).
#[test]
fn per_row_mean_error_is_below_the_bound() {
    let seeds = 6u64;
    for l in [0usize, 5] {
        let mc = McaCase::minilm(l);
        let x = mc.inputs();
        let prep = mc.prepared();
        let (want, _) = minilm(&format!("layer{l}-out.npy"));
        for (alpha, draws) in [
            (0.3f32, Draws::Token),
            (1.0, Draws::Token),
            (1.0, Draws::Shared),
        ] {
            let mca = Mca {
                alpha,
                draws,
                ..Mca::default()
            };
            let mut err = vec![0.0f64; 12 * 512];
            let mut bound = Vec::new();
            for seed in 0..seeds {
                let (f, diag) = mca.forward_prepared(&x, &prep, seed).unwrap();
                bound = diag.bound.clone();
                for (e, (g, w)) in err
                    .iter_mut()
                    .zip(f.output.chunks_exact(32).zip(want.chunks_exact(32)))
                {
                    let d2: f64 = g
                        .iter()
                        .zip(w)
                        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                        .sum();
                    *e += d2.sqrt() / seeds as f64;
                }
            }
            for h in 0..12 {
                let worst = err[h * 512..(h + 1) * 512]
                    .iter()
                    .cloned()
                    .fold(0.0, f64::max);
                assert!(
                    worst <= bound[h] as f64,
                    "layer {l} alpha {alpha} {draws:?} head {h}: worst row error {worst} > bound {}",
                    bound[h]
                );
            }
        }
    }
    let mut mc = McaCase::synthetic((2, 3, 40, 8, 5), 64, 3);
    random_masks(&mut mc.case, 2);
    let x = mc.inputs();
    let want = ExactNaive::default().forward(&x, 0).unwrap().output;
    let mca = Mca {
        alpha: 0.5,
        ..Mca::default()
    };
    let mut err = vec![0.0f64; want.len() / 5];
    let mut bound = Vec::new();
    for seed in 0..20 {
        let (f, diag) = mca.forward_prepared(&x, &mc.prepared(), seed).unwrap();
        bound = diag.bound.clone();
        for (e, (g, w)) in err
            .iter_mut()
            .zip(f.output.chunks_exact(5).zip(want.chunks_exact(5)))
        {
            let d2: f64 = g
                .iter()
                .zip(w)
                .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                .sum();
            *e += d2.sqrt() / 20.0;
        }
    }
    for (row, e) in err.iter().enumerate() {
        let bh = row / 40;
        if bh / 3 == 1 {
            continue; // batch element 1 attends to nothing: zero output, zero error
        }
        assert!(
            *e <= bound[bh] as f64,
            "synthetic row {row}: {e} > {}",
            bound[bh]
        );
    }
}

/// α → 0 gives every token r = d_model, hence the exact output and FLOP fraction 1.
#[test]
fn tiny_alpha_gives_the_exact_output() {
    let mc = McaCase::minilm(2);
    let x = mc.inputs();
    let (want, _) = minilm("layer2-out.npy");
    let mca = Mca {
        alpha: 1e-6,
        ..Mca::default()
    };
    let (f, diag) = mca.forward_prepared(&x, &mc.prepared(), 1).unwrap();
    assert!(diag.budgets.iter().all(|r| *r == 384));
    assert!(diag.flop_fraction.iter().all(|v| (*v - 1.0).abs() < 1e-6));
    assert_close("alpha 1e-6", &f.output, &want, 1e-4);
}

/// The budgets equal `min(⌊(n_eff · max_i A_ij / α)²⌋, d)` computed in f64 (max over queries
/// that are neither query-masked nor padding), with both boundary values present; masked tokens
/// get 0 and count neither in n_eff nor in the FLOP fraction.
#[test]
fn budgets_follow_the_formula_at_its_boundaries_and_under_masks() {
    let (b, h, n, d, dv, d_model) = (2, 2, 30, 6, 3, 16);
    let mut mc = McaCase::synthetic((b, h, n, d, dv), d_model, 9);
    for v in mc.case.q.iter_mut() {
        *v *= 2.5; // peaked attention: some tokens exact, some at zero
    }
    let mut km = vec![true; b * n];
    for j in [3, 4, 17, 29] {
        km[j] = false;
    }
    km[n + 5] = false;
    let mut qm = vec![true; b * n];
    qm[7] = false;
    qm[n + 11] = false;
    mc.case.key_mask = Some(km.clone());
    mc.case.query_mask = Some(qm.clone());
    let x = mc.inputs();
    let alpha = 0.8f32;
    let mca = Mca {
        alpha,
        ..Mca::default()
    };
    let (_, diag) = mca.forward_prepared(&x, &mc.prepared(), 0).unwrap();
    let (mut zeros, mut full) = (0, 0);
    for bb in 0..b {
        let n_eff = km[bb * n..(bb + 1) * n].iter().filter(|k| **k).count();
        assert_eq!(diag.n_eff[bb], n_eff);
        for hh in 0..h {
            let bh = bb * h + hh;
            let logits = |i: usize, j: usize| -> f64 {
                (0..d)
                    .map(|t| {
                        mc.case.q[(bh * n + i) * d + t] as f64
                            * mc.case.k[(bh * n + j) * d + t] as f64
                    })
                    .sum::<f64>()
                    / (d as f64).sqrt()
            };
            let mut colmax = vec![0.0f64; n];
            for i in 0..n {
                if !qm[bb * n + i] || !km[bb * n + i] {
                    continue;
                }
                let row: Vec<f64> = (0..n)
                    .map(|j| {
                        if km[bb * n + j] {
                            logits(i, j)
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
                for j in 0..n {
                    colmax[j] = colmax[j].max((row[j] - m).exp() / z);
                }
            }
            let mut total = 0.0f64;
            for j in 0..n {
                let got = diag.budgets[bh * n + j];
                total += got as f64;
                if !km[bb * n + j] {
                    assert_eq!(got, 0, "masked token {j} of head {bh}");
                    continue;
                }
                let v = (n_eff as f64 * colmax[j] / alpha as f64).powi(2);
                let want = v.floor().min(d_model as f64) as u32;
                let near_integer = (v - v.round()).abs() < 1e-3 * v.max(1.0);
                assert!(
                    got == want || (near_integer && got.abs_diff(want) <= 1),
                    "head {bh} token {j}: r = {got}, formula {want} ({v})"
                );
                zeros += (got == 0) as usize;
                full += (got as usize == d_model) as usize;
            }
            let frac = total / (n_eff * d_model) as f64;
            assert!((diag.flop_fraction[bh] as f64 - frac).abs() < 1e-6);
            let padded = total / (n * d_model) as f64;
            assert!((diag.flop_fraction_padded[bh] as f64 - padded).abs() < 1e-6);
        }
    }
    assert!(
        zeros > 0 && full > 0,
        "r = 0: {zeros} tokens, r = d: {full}"
    );
}

/// Forward and every gradient against the dense formula with the same samples:
/// `Ṽ_h = (X ⊙ M_h) W_h + b_h`, `M_h[j, k] = c_k` for sampled tokens (1 for exact ones),
/// `dX = Σ_h (dṼ_h W_hᵀ) ⊙ M_h`, `dW_h = (X ⊙ M_h)ᵀ dṼ_h`, `db_h = Σ_j dṼ_h[j]`, and dQ, dK
/// from the naive exact backward on the sampled values.
#[test]
fn backward_matches_the_dense_formula_with_the_same_samples() {
    for (probs, draws) in [
        (Probs::Weight, Draws::Token),
        (Probs::InputAware, Draws::Token),
        (Probs::Weight, Draws::Shared),
    ] {
        let (b, h, n, d, dv, d_model) = (2, 2, 23, 4, 3, 12);
        let mut mc = McaCase::synthetic((b, h, n, d, dv), d_model, 5);
        for v in mc.case.q.iter_mut() {
            *v *= 2.0;
        }
        random_masks(&mut mc.case, 6);
        let x = mc.inputs();
        let mca = Mca {
            alpha: 0.7,
            probs,
            draws,
            ..Mca::default()
        };
        let prep = mc.prepared();
        let (f, diag) = mca.forward_prepared(&x, &prep, 11).unwrap();
        let s = mca.sample_values(&x, &prep, &diag.budgets, 11).unwrap();
        // The dense weights M.
        let mut m = vec![0.0f64; b * h * n * d_model];
        let mut kinds = [0usize; 3];
        for bh in 0..b * h {
            for j in 0..n {
                let row = &mut m[(bh * n + j) * d_model..(bh * n + j + 1) * d_model];
                match s.token(bh, j) {
                    TokenSamples::Exact => {
                        row.fill(1.0);
                        kinds[0] += 1;
                    }
                    TokenSamples::Sampled(e) => {
                        for &(k, c) in &e {
                            row[k as usize] = c as f64;
                        }
                        kinds[if e.is_empty() { 2 } else { 1 }] += 1;
                    }
                }
            }
        }
        assert!(
            kinds.iter().all(|c| *c > 0),
            "{probs:?}: token kinds {kinds:?}"
        );
        let vt = |bh: usize, j: usize, c: usize| -> f64 {
            let (bb, hh) = (bh / h, bh % h);
            mc.bv[hh * dv + c] as f64
                + (0..d_model)
                    .map(|k| {
                        m[(bh * n + j) * d_model + k]
                            * mc.x[(bb * n + j) * d_model + k] as f64
                            * mc.wv[k * h * dv + hh * dv + c] as f64
                    })
                    .sum::<f64>()
        };
        let want_v: Vec<f32> = (0..b * h * n * dv)
            .map(|idx| vt(idx / (n * dv), (idx / dv) % n, idx % dv) as f32)
            .collect();
        assert_close("sampled values", &s.values, &want_v, 1e-5);
        let mut inner = Case::new(mc.case.shape, 0);
        inner.q.clone_from(&mc.case.q);
        inner.k.clone_from(&mc.case.k);
        inner.v.clone_from(&s.values);
        inner.key_mask.clone_from(&mc.case.key_mask);
        inner.query_mask.clone_from(&mc.case.query_mask);
        let naive = ExactNaive::default();
        let nf = naive.forward(&inner.inputs(), 0).unwrap();
        assert_close("output", &f.output, &nf.output, 1e-5);
        let g = normal(f.output.len(), 1.0, 4, "g");
        let grads = mca.backward(&x, 11, &f.saved, &g).unwrap();
        let ng = naive.backward(&inner.inputs(), 0, &nf.saved, &g).unwrap();
        assert_close("dq", &grads.dq, &ng.dq, 1e-4);
        assert_close("dk", &grads.dk, &ng.dk, 1e-4);
        assert!(grads.dv.iter().all(|v| *v == 0.0));
        let dvt = &ng.dv; // ∂L/∂Ṽ
        let mut dx = vec![0.0f64; mc.x.len()];
        let mut dw = vec![0.0f64; mc.wv.len()];
        let mut db = vec![0.0f64; h * dv];
        for bh in 0..b * h {
            let (bb, hh) = (bh / h, bh % h);
            for j in 0..n {
                for c in 0..dv {
                    let gv = dvt[(bh * n + j) * dv + c] as f64;
                    db[hh * dv + c] += gv;
                    for k in 0..d_model {
                        let mk = m[(bh * n + j) * d_model + k];
                        let w = mc.wv[k * h * dv + hh * dv + c] as f64;
                        let xv = mc.x[(bb * n + j) * d_model + k] as f64;
                        dx[(bb * n + j) * d_model + k] += mk * w * gv;
                        dw[k * h * dv + hh * dv + c] += mk * xv * gv;
                    }
                }
            }
        }
        let param = |name: &str| -> &Vec<f32> {
            &grads.params.iter().find(|p| p.name == name).unwrap().grad
        };
        let f32s = |v: &[f64]| -> Vec<f32> { v.iter().map(|a| *a as f32).collect() };
        assert_close("dx", param("x"), &f32s(&dx), 1e-4);
        assert_close("dwv", param("wv"), &f32s(&dw), 1e-4);
        assert_close("dbv", param("bv"), &f32s(&db), 1e-4);
    }
}

#[test]
fn masks_threads_and_bad_input() {
    let mut mc = McaCase::synthetic((3, 2, 50, 8, 4), 40, 7);
    random_masks(&mut mc.case, 7);
    let x = mc.inputs();
    let mca = Mca::default();
    let g = normal(x.dims().out_len(), 1.0, 1, "g");
    let (out1, g1) = run_in_pool(&mca, &x, 5, &g, 1);
    for threads in [2, 3] {
        let (out, gr) = run_in_pool(&mca, &x, 5, &g, threads);
        assert_eq!(out, out1, "{threads} threads");
        assert_eq!(gr, g1, "{threads} threads");
    }
    let shared = Mca {
        draws: Draws::Shared,
        ..Mca::default()
    };
    let (s1, sg1) = run_in_pool(&shared, &x, 5, &g, 1);
    let (s3, sg3) = run_in_pool(&shared, &x, 5, &g, 3);
    assert_eq!((s1, sg1), (s3, sg3), "shared draws, 1 vs 3 threads");
    assert!(out1.iter().all(|v| v.is_finite()));
    // Batch element 1 attends to nothing: zero output, zero gradients of Q and K there.
    let per_b = 2 * 50 * 4;
    assert!(out1[per_b..2 * per_b].iter().all(|v| *v == 0.0));
    let other = mca.forward(&x, 6).unwrap().output;
    assert_ne!(other, out1, "another seed, other samples");
    // Through the Method enum.
    let m = Method::parse("mca", &[("alpha", "0.5"), ("probs", "input-aware")]).unwrap();
    assert!(m.forward(&x, 1).is_ok());

    // Zero rows of W_V (probability 0: never drawn) and a head whose W_h is zero (values are
    // the bias): finite outputs, equal to exact attention of the exact values at α → 0.
    let mut zero = McaCase::synthetic((1, 2, 30, 4, 3), 16, 8);
    for (k, row) in zero.wv.chunks_exact_mut(6).enumerate() {
        if k % 3 == 0 {
            row.fill(0.0);
        }
        row[3..].fill(0.0);
    }
    zero.case.v = project(&zero.x, &zero.wv, &zero.bv, (1, 2, 30, 16, 3));
    let xz = zero.inputs();
    for probs in [Probs::Weight, Probs::InputAware] {
        for seed in 0..20 {
            let m = Mca {
                alpha: 2.0,
                probs,
                ..Mca::default()
            };
            let out = m.forward(&xz, seed).unwrap().output;
            assert!(out.iter().all(|v| v.is_finite()), "{probs:?} seed {seed}");
        }
    }
    let tiny = Mca {
        alpha: 1e-6,
        ..Mca::default()
    };
    let want = ExactNaive::default().forward(&xz, 0).unwrap().output;
    assert_close(
        "zero rows",
        &tiny.forward(&xz, 0).unwrap().output,
        &want,
        1e-5,
    );

    // Missing projection, mismatched shapes, non-finite values, bad parameters.
    let plain = mc.case.inputs();
    let err = mca.forward(&plain, 0).unwrap_err().to_string();
    assert!(err.contains("--x") && err.contains("W_V"), "{err}");
    let (b, h, _, n, _, dv) = mc.case.shape;
    let base = || mc.case.inputs();
    let e = base()
        .with_value_projection(
            &mc.x[..b * (n - 1) * 40],
            [b, n - 1, 40],
            &mc.wv,
            [40, h * dv],
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("x has shape") || e.starts_with("x"), "{e}");
    let e = base()
        .with_value_projection(
            &mc.x,
            [b, n, 40],
            &mc.wv[..40 * h * dv - 40],
            [40, h * dv - 1],
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("wv"), "{e}");
    let e = base()
        .with_value_projection(&mc.x, [b, n, 40], &mc.wv, [40, h * dv], Some(&mc.bv[1..]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bv"), "{e}");
    let mut bad = mc.x.clone();
    bad[17] = f32::NAN;
    let e = base()
        .with_value_projection(&bad, [b, n, 40], &mc.wv, [40, h * dv], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("x contains a non-finite"), "{e}");
    for (alpha, text) in [
        ("0", "alpha"),
        ("-1", "alpha"),
        ("nan", "alpha"),
        ("inf", "alpha"),
    ] {
        let e = Method::parse("mca", &[("alpha", alpha)])
            .unwrap_err()
            .to_string();
        assert!(e.contains(text) && e.contains("> 0"), "{alpha}: {e}");
    }
    let e = Method::parse("mca", &[("probs", "uniform")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("input-aware"), "{e}");
    let other_prep = Prepared::new(&mc.wv[..40 * 4], 40, 1, 4).unwrap();
    let e = mca
        .forward_prepared(&x, &other_prep, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("prepared"), "{e}");
}
