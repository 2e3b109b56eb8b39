//! Informer (ProbSparse) against exact attention in its limit, its backward against the naive
//! reference with the same active set, masks (which the reference code ignores), seeds and bad
//! input.
#![allow(clippy::needless_range_loop)] // index loops mirror the formulas

mod common;

use common::{Case, assert_close, normal, random_masks, run_in_pool};
use randattn::methods::exact::ExactNaive;
use randattn::methods::informer::Informer;
use randattn::{Attention, Method};

/// The expected forward and gradients for a given active set: exact attention (f64 reference)
/// on the active rows, the mean of the unmasked values on the lazy rows.
fn naive(case: &Case, active: &[Vec<u32>], g: &[f32]) -> (Vec<f32>, randattn::Grads) {
    let (b, h, nq, nk, _, dv) = case.shape;
    let x = case.inputs();
    let reference = ExactNaive::default();
    let fwd = reference.forward(&x, 0).unwrap();
    // Only the active rows' gradients go through softmax.
    let mut g_active = vec![0.0f32; g.len()];
    let mut out = vec![0.0f32; fwd.output.len()];
    for bh in 0..b * h {
        let bb = bh / h;
        let keep_k: Vec<bool> = (0..nk)
            .map(|j| case.key_mask.as_ref().is_none_or(|m| m[bb * nk + j]))
            .collect();
        let count = keep_k.iter().filter(|k| **k).count();
        let mut mean = vec![0.0f32; dv];
        for j in (0..nk).filter(|&j| keep_k[j]) {
            for c in 0..dv {
                mean[c] += case.v[(bh * nk + j) * dv + c] / count as f32;
            }
        }
        for i in 0..nq {
            let r = (bh * nq + i) * dv;
            if case.query_mask.as_ref().is_some_and(|m| !m[bb * nq + i]) {
                continue;
            }
            if active[bh].contains(&(i as u32)) {
                out[r..r + dv].copy_from_slice(&fwd.output[r..r + dv]);
                g_active[r..r + dv].copy_from_slice(&g[r..r + dv]);
            } else if count > 0 {
                out[r..r + dv].copy_from_slice(&mean);
            }
        }
    }
    let mut grads = reference.backward(&x, 0, &fwd.saved, &g_active).unwrap();
    // Lazy rows pass g_i / count to each unmasked value row.
    for bh in 0..b * h {
        let bb = bh / h;
        let keep_k: Vec<bool> = (0..nk)
            .map(|j| case.key_mask.as_ref().is_none_or(|m| m[bb * nk + j]))
            .collect();
        let count = keep_k.iter().filter(|k| **k).count();
        for i in 0..nq {
            let lazy = case.query_mask.as_ref().is_none_or(|m| m[bb * nq + i])
                && !active[bh].contains(&(i as u32));
            if !lazy || count == 0 {
                continue;
            }
            for j in (0..nk).filter(|&j| keep_k[j]) {
                for c in 0..dv {
                    grads.dv[(bh * nk + j) * dv + c] += g[(bh * nq + i) * dv + c] / count as f32;
                }
            }
        }
    }
    (out, grads)
}

fn check(case: &Case, method: &Informer, seed: u64, tol: f32) {
    let x = case.inputs();
    let active = method.active_queries(&x, seed).unwrap();
    let fwd = method.forward(&x, seed).unwrap();
    let g = normal(fwd.output.len(), 1.0, seed + 3, "g");
    let got = method.backward(&x, seed, &fwd.saved, &g).unwrap();
    let (want_out, want) = naive(case, &active, &g);
    let tag = format!("{:?} {method:?}", case.shape);
    assert_close(&format!("out {tag}"), &fwd.output, &want_out, tol);
    assert_close(&format!("dq {tag}"), &got.dq, &want.dq, tol);
    assert_close(&format!("dk {tag}"), &got.dk, &want.dk, tol);
    assert_close(&format!("dv {tag}"), &got.dv, &want.dv, tol);
}

#[test]
fn forward_and_backward_match_the_reference_with_the_same_active_set() {
    for (i, shape) in [
        (1, 2, 300, 300, 32, 16),
        (2, 3, 97, 130, 17, 5),
        (3, 1, 64, 40, 8, 8),
        (1, 1, 1, 1, 4, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let mut case = Case::new(shape, 40 + i as u64);
        if i % 2 == 0 {
            random_masks(&mut case, i as u64);
        }
        check(&case, &Informer::default(), 7 + i as u64, 2e-5);
        let few = Informer {
            u: randattn::Auto::Fixed(3),
            factor: 2,
            ..Informer::default()
        };
        check(&case, &few, 9, 2e-5);
    }
}

#[test]
fn with_every_query_active_it_is_exact_attention() {
    // u ≥ n_q: every (unmasked) query is active, so the output and all gradients are exact.
    let mut case = Case::new((3, 2, 70, 90, 16, 8), 5);
    random_masks(&mut case, 5);
    let x = case.inputs();
    let all = Informer {
        u: randattn::Auto::Fixed(70),
        ..Informer::default()
    };
    let g = normal(x.dims().out_len(), 1.0, 2, "g");
    let f = all.forward(&x, 1).unwrap();
    let got = all.backward(&x, 1, &f.saved, &g).unwrap();
    let reference = ExactNaive::default();
    let fr = reference.forward(&x, 0).unwrap();
    let want = reference.backward(&x, 0, &fr.saved, &g).unwrap();
    assert_close("out", &f.output, &fr.output, 2e-5);
    assert_close("dq", &got.dq, &want.dq, 2e-5);
    assert_close("dk", &got.dk, &want.dk, 2e-5);
    assert_close("dv", &got.dv, &want.dv, 2e-5);
}

#[test]
fn padding_is_honoured_unlike_the_reference_code() {
    // Values and keys at masked positions must not matter (the reference averages padding into
    // the lazy rows and lets active rows attend to it); masked queries output 0 and are never
    // active.
    let mut case = Case::new((2, 2, 80, 80, 16, 4), 11);
    random_masks(&mut case, 3);
    let method = Informer::default();
    let x = case.inputs();
    let f = method.forward(&x, 2).unwrap();
    let active = method.active_queries(&x, 2).unwrap();
    let (km, qm) = (
        case.key_mask.clone().unwrap(),
        case.query_mask.clone().unwrap(),
    );
    for (bh, act) in active.iter().enumerate() {
        for &i in act {
            assert!(qm[(bh / 2) * 80 + i as usize], "masked query {i} active");
        }
    }
    for (idx, v) in f.output.iter().enumerate() {
        let (bh, i) = (idx / (80 * 4), (idx / 4) % 80);
        if !qm[(bh / 2) * 80 + i] || bh / 2 == 1 {
            assert_eq!(*v, 0.0, "masked query or all-masked batch");
        }
    }
    let mut other = Case::new(case.shape, 11);
    other.key_mask = case.key_mask.clone();
    other.query_mask = case.query_mask.clone();
    // Overwrite masked key and value rows with garbage.
    for bh in 0..4 {
        for j in 0..80 {
            if !km[(bh / 2) * 80 + j] {
                for c in 0..16 {
                    other.k[(bh * 80 + j) * 16 + c] = 50.0;
                }
                for c in 0..4 {
                    other.v[(bh * 80 + j) * 4 + c] = -1e3;
                }
            }
        }
    }
    let f2 = method.forward(&other.inputs(), 2).unwrap();
    assert_eq!(f.output, f2.output);
}

#[test]
fn queries_with_flat_attention_are_never_active_while_peaked_ones_remain() {
    // A zero query has the same logit against every key, so its sparsity is exactly 0; a query
    // aligned with a few keys has a positive one. With u = the number of peaked queries, the
    // active set is exactly those.
    let (n, d) = (128, 16);
    let mut case = Case::new((1, 1, n, n, d, 4), 2);
    for i in 0..n {
        for c in 0..d {
            case.q[i * d + c] = if i % 4 == 0 {
                4.0 * case.k[i * d + c]
            } else {
                0.0
            };
        }
    }
    let peaked = Informer {
        u: randattn::Auto::Fixed(n / 4),
        ..Informer::default()
    };
    let active = peaked.active_queries(&case.inputs(), 0).unwrap();
    let want: Vec<u32> = (0..n as u32).filter(|i| i % 4 == 0).collect();
    assert_eq!(active[0], want);
}

#[test]
fn same_seed_same_output_at_any_thread_count() {
    let w = randattn::workload::clustered(2, 3, 500, 24, 1);
    let s = w.dims.q_shape();
    let x = randattn::AttentionInputs::new(&w.q, s, &w.k, s, &w.v, s).unwrap();
    let g = normal(w.q.len(), 1.0, 2, "g");
    let method = Method::parse::<&str>("informer", &[]).unwrap();
    let run = |threads: usize, seed: u64| run_in_pool(&method, &x, seed, &g, threads);
    let (o1, g1) = run(1, 4);
    for t in [2, 3] {
        assert_eq!(run(t, 4), (o1.clone(), g1.clone()));
    }
    let informer = Informer::default();
    assert_ne!(
        informer.active_queries(&x, 4).unwrap(),
        informer.active_queries(&x, 5).unwrap(),
        "another seed draws another key sample"
    );
}

#[test]
fn bad_parameters_are_errors() {
    for (k, v, needle) in [
        ("factor", "0", "parameter `factor`"),
        ("factor", "1001", "parameter `factor`"),
        ("u", "0", "parameter `u`"),
        ("u", "-2", "parameter `u`"),
        ("scale", "0", "parameter `scale`"),
        ("k", "3", "has no parameter `k`"),
    ] {
        let err = Method::parse("informer", &[(k, v)])
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{k}={v}: {err}");
    }
    let case = Case::new((1, 1, 4, 4, 2, 2), 1);
    let x = case.inputs();
    let m = Method::parse::<&str>("informer", &[]).unwrap();
    let f = m.forward(&x, 0).unwrap();
    assert!(m.backward(&x, 0, &f.saved, &[0.0; 3]).is_err());
    let other = Method::parse::<&str>("exact", &[])
        .unwrap()
        .forward(&x, 0)
        .unwrap();
    assert!(m.backward(&x, 0, &other.saved, &[0.0; 8]).is_err());
}
