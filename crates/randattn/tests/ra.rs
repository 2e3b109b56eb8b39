//! Randomized Attention: forward and backward against an f64 implementation with the same draws,
//! convergence to softmax attention at rate 1/√S with the paper's noise (and the bias of the
//! code's), component frequencies and bad input.
#![allow(clippy::needless_range_loop)] // index loops mirror the formulas

mod common;

use common::{
    Case, Loss, assert_close, check_qkv_gradients, log_log_slope, minilm, normal, random_masks,
    rel_error,
};
use randattn::methods::exact::ExactNaive;
use randattn::methods::ra::{Draws, Noise, Ra};
use randattn::{Attention, AttentionInputs, Method};

/// RA in f64 with given draws: the mean over samples of softmax_m(ω·y_m − ½‖y_m‖²) v_m.
fn naive(case: &Case, q: &[f32], k: &[f32], v: &[f32], draws: &Draws, s: usize) -> Vec<f64> {
    let (b, h, nq, nk, d, dv) = case.shape;
    let root = (1.0 / (d as f64).sqrt()).sqrt();
    let mut out = vec![0.0f64; b * h * nq * dv];
    for bh in 0..b * h {
        let bb = bh / h;
        for i in 0..nq {
            if case.query_mask.as_ref().is_some_and(|m| !m[bb * nq + i]) {
                continue;
            }
            for smp in 0..s {
                let idx = bh * nq * s + i * s + smp;
                let m = draws.components[idx];
                if m == u32::MAX {
                    continue;
                }
                let m = m as usize;
                let omega: Vec<f64> = (0..d)
                    .map(|c| {
                        root * (q[(bh * nq + i) * d + c] as f64 + k[(bh * nk + m) * d + c] as f64)
                            + draws.noise[idx * d + c] as f64
                    })
                    .collect();
                let logits: Vec<f64> = (0..nk)
                    .map(|j| {
                        if case.key_mask.as_ref().is_some_and(|mk| !mk[bb * nk + j]) {
                            return f64::NEG_INFINITY;
                        }
                        let y: Vec<f64> = (0..d)
                            .map(|c| root * k[(bh * nk + j) * d + c] as f64)
                            .collect();
                        let dotp: f64 = omega.iter().zip(&y).map(|(a, b)| a * b).sum();
                        dotp - 0.5 * y.iter().map(|a| a * a).sum::<f64>()
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                for j in 0..nk {
                    let p = (logits[j] - max).exp() / z / s as f64;
                    for c in 0..dv {
                        out[(bh * nq + i) * dv + c] += p * v[(bh * nk + j) * dv + c] as f64;
                    }
                }
            }
        }
    }
    out
}

#[test]
fn forward_and_backward_match_the_formula_with_the_same_draws() {
    let mut case = Case::new((2, 2, 7, 9, 4, 3), 3);
    random_masks(&mut case, 2);
    for (s, noise) in [(1, Noise::Paper), (3, Noise::Code)] {
        let ra = Ra {
            samples: s,
            noise,
            ..Ra::default()
        };
        let x = case.inputs();
        let draws = ra.draws(&x, 11).unwrap();
        let f = ra.forward(&x, 11).unwrap();
        let want = naive(&case, &case.q, &case.k, &case.v, &draws, s);
        let want32: Vec<f32> = want.iter().map(|v| *v as f32).collect();
        assert_close("out", &f.output, &want32, 1e-5);
        // The gradient of the naive function with the draws held fixed, by central differences.
        let g = normal(f.output.len(), 1.0, 4, "g");
        let grads = ra.backward(&x, 11, &f.saved, &g).unwrap();
        check_qkv_gradients(&format!("S={s}"), &case, &grads, |c| {
            let out = naive(&case, &c.q, &c.k, &c.v, &draws, s);
            let terms: Vec<f64> = out.iter().zip(&g).map(|(a, b)| a * *b as f64).collect();
            Loss {
                value: terms.iter().sum(),
                magnitude: terms.iter().map(|t| t * t).sum::<f64>().sqrt(),
            }
        });
    }
}

#[test]
fn converges_to_softmax_attention_at_rate_one_over_sqrt_samples_with_the_papers_noise() {
    // E[f(ω)] under the per-query mixture is exactly softmax attention when the noise has unit
    // variance in scaled coordinates: the relative error of the S-sample average falls like
    // S^(-1/2) (slope -0.5 ± 0.12 over S = 1, 4, 16, 64). With the released code's narrower noise
    // the expectation is another function: its error levels off at its bias (measured 0.39,
    // 0.23, 0.17 at S = 16, 64, 256, against the paper's 0.37, 0.19, 0.09), so at S = 256 it is
    // well above the paper's.
    let (q, s) = minilm("layer5-q.npy");
    let (k, _) = minilm("layer5-k.npy");
    let (v, _) = minilm("layer5-v.npy");
    let (want, _) = minilm("layer5-out.npy");
    let shape = [s[0], s[1], s[2], s[3]];
    let x = AttentionInputs::new(&q, shape, &k, shape, &v, shape).unwrap();
    let err = |samples: usize, noise: Noise| -> f64 {
        let ra = Ra {
            samples,
            noise,
            ..Ra::default()
        };
        rel_error(&ra.forward(&x, 0).unwrap().output, &want)
    };
    let ss = [1usize, 4, 16, 64];
    let errs: Vec<f64> = ss.iter().map(|&s| err(s, Noise::Paper)).collect();
    let points: Vec<(f64, f64)> = ss.iter().map(|s| *s as f64).zip(errs.clone()).collect();
    let slope = log_log_slope(&points);
    assert!(
        (slope + 0.5).abs() <= 0.12,
        "errors {errs:?}, slope {slope}"
    );
    let (paper, code) = (err(256, Noise::Paper), err(256, Noise::Code));
    assert!(
        code > 1.5 * paper,
        "S=256: code noise {code} vs paper {paper}"
    );
}

#[test]
fn components_follow_the_softmax_and_skip_masked_keys() {
    let mut case = Case::new((1, 1, 3, 6, 4, 2), 5);
    case.key_mask = Some(vec![true, false, true, true, false, true]);
    let ra = Ra {
        samples: 1024,
        ..Ra::default()
    };
    let x = case.inputs();
    let draws = ra.draws(&x, 1).unwrap();
    let probs = {
        // softmax over the kept keys, from the exact reference with one-hot values
        let mut one_hot = Case::new((1, 1, 3, 6, 4, 6), 5);
        one_hot.q = case.q.clone();
        one_hot.k = case.k.clone();
        one_hot.v = (0..36)
            .map(|i| if i / 6 == i % 6 { 1.0 } else { 0.0 })
            .collect();
        one_hot.key_mask = case.key_mask.clone();
        ExactNaive::default()
            .forward(&one_hot.inputs(), 0)
            .unwrap()
            .output
    };
    for i in 0..3 {
        let mut counts = [0usize; 6];
        for s in 0..1024 {
            counts[draws.components[i * 1024 + s] as usize] += 1;
        }
        assert_eq!(counts[1] + counts[4], 0, "masked key drawn");
        for j in 0..6 {
            let p = probs[i * 6 + j] as f64;
            let freq = counts[j] as f64 / 1024.0;
            let se = (p * (1.0 - p) / 1024.0).sqrt();
            assert!(
                (freq - p).abs() <= 5.0 * se + 1e-3,
                "query {i} key {j}: {freq} vs {p}"
            );
        }
    }
}

#[test]
fn bad_parameters_name_the_valid_values() {
    // Masks, garbage under them, threads and seeds: tests/contract.rs.
    for (k, v, needle) in [
        ("samples", "0", "parameter `samples`"),
        ("samples", "5000", "parameter `samples`"),
        ("noise", "wide", "`paper` or `code`"),
    ] {
        let err = Method::parse("ra", &[(k, v)]).unwrap_err().to_string();
        assert!(err.contains(needle), "{k}={v}: {err}");
    }
}
