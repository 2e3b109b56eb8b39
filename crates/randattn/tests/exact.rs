//! The fast exact kernel against the naive f64 reference, and the reference against finite
//! differences.
#![allow(clippy::needless_range_loop)] // index loops mirror the formulas

mod common;

use common::{Case, assert_close, check_qkv_gradients, dot_loss, normal};
use rand::Rng;
use randattn::methods::exact::{Exact, ExactNaive, KEY_TILE, QUERY_BLOCK};
use randattn::rng::stream;
use randattn::{Attention, AttentionInputs, Error, Grads, Method};

fn fwd_bwd(m: &dyn Attention, x: &AttentionInputs<'_>, g: &[f32]) -> (Vec<f32>, Grads) {
    let f = m.forward(x, 0).unwrap();
    let grads = m.backward(x, 0, &f.saved, g).unwrap();
    (f.output, grads)
}

fn check_against_naive(case: &Case, tol: f32) {
    let x = case.inputs();
    let g = normal(x.dims().out_len(), 1.0, 99, "grad");
    let (o_fast, g_fast) = fwd_bwd(&Exact::default(), &x, &g);
    let (o_ref, g_ref) = fwd_bwd(&ExactNaive::default(), &x, &g);
    let tag = format!("{:?}", case.shape);
    assert_close(&format!("out {tag}"), &o_fast, &o_ref, tol);
    assert_close(&format!("dq {tag}"), &g_fast.dq, &g_ref.dq, tol);
    assert_close(&format!("dk {tag}"), &g_fast.dk, &g_ref.dk, tol);
    assert_close(&format!("dv {tag}"), &g_fast.dv, &g_ref.dv, tol);
}

#[test]
fn fast_matches_naive_over_many_shapes() {
    let shapes = [
        (1, 1, 1, 1, 1, 1),
        (2, 3, 1, 7, 5, 3),
        (1, 2, 7, 1, 3, 4),
        (1, 2, 65, 63, 17, 9),
        (1, 1, 130, 129, 1, 2),
        (1, 1, 257, 300, 64, 64),
        (1, 2, 300, 1030, 64, 64),
        (2, 1, 100, 513, 160, 40),
        (1, 3, 64, 256, 32, 32),
        (3, 2, 33, 45, 96, 7),
        (1, 1, 200, 130, 48, 48),
    ];
    for (i, shape) in shapes.into_iter().enumerate() {
        check_against_naive(&Case::new(shape, i as u64), 2e-5);
    }
    for d in [2, 8, 31, 64, 100, 128, 159, 160] {
        check_against_naive(&Case::new((1, 1, 70, 90, d, 16), d as u64), 2e-5);
    }
}

#[test]
fn masks_including_all_masked_rows_and_batches() {
    for (i, shape) in [
        (3, 2, 70, 300, 16, 8),
        (2, 1, 5, 9, 4, 4),
        (2, 2, 130, 1100, 8, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let (b, _, nq, nk, _, _) = shape;
        let mut case = Case::new(shape, 10 + i as u64);
        let mut r = stream(i as u64, 0, 0, "mask");
        let mut km: Vec<bool> = (0..b * nk).map(|_| r.random_bool(0.6)).collect();
        // Batch element 1 attends to nothing; in batch 0 a whole key tile is masked (when long).
        km[nk..2 * nk].fill(false);
        if nk > 2 * KEY_TILE {
            km[KEY_TILE..2 * KEY_TILE].fill(false);
        }
        let mut qm: Vec<bool> = (0..b * nq).map(|_| r.random_bool(0.7)).collect();
        qm[..nq.min(QUERY_BLOCK)].fill(false); // a whole query block masked
        case.key_mask = Some(km.clone());
        case.query_mask = Some(qm.clone());
        check_against_naive(&case, 2e-5);

        let x = case.inputs();
        let f = Exact::default().forward(&x, 0).unwrap();
        let (h, dv) = (shape.1, shape.5);
        for bb in 0..b {
            for hh in 0..h {
                for q in 0..nq {
                    let row = &f.output[((bb * h + hh) * nq + q) * dv..][..dv];
                    if bb == 1 || !qm[bb * nq + q] {
                        assert!(row.iter().all(|x| *x == 0.0), "masked row must be zero");
                    }
                }
            }
        }
        // No gradient flows into masked keys.
        let g = vec![1.0; x.dims().out_len()];
        let grads = Exact::default().backward(&x, 0, &f.saved, &g).unwrap();
        let d = shape.4;
        for bb in 0..b {
            for hh in 0..h {
                for j in 0..nk {
                    if !km[bb * nk + j] {
                        let off = ((bb * h + hh) * nk + j) * d;
                        assert!(grads.dk[off..off + d].iter().all(|x| *x == 0.0));
                    }
                }
            }
        }
    }
}

#[test]
fn logits_of_1e4_stay_finite_and_correct() {
    // Logits of ±1e4 (scale 1, |q·k| = 1e4): softmax is nearly one-hot.
    let (nq, nk, d) = (9, 300, 4);
    let mut case = Case::new((1, 1, nq, nk, d, 3), 5);
    for (i, x) in case.q.iter_mut().enumerate() {
        *x = if i % d == 0 { 100.0 } else { 0.0 };
    }
    for (j, row) in case.k.chunks_exact_mut(d).enumerate() {
        row.fill(0.0);
        row[0] = if j % 3 == 0 {
            100.0
        } else if j % 3 == 1 {
            -100.0
        } else {
            99.99
        };
    }
    let x = case.inputs();
    let g = normal(nq * 3, 1.0, 1, "g");
    for m in [
        Method::parse("exact", &[("scale", "1")]).unwrap(),
        Method::parse("exact-naive", &[("scale", "1")]).unwrap(),
    ] {
        let (o, grads) = fwd_bwd(&m, &x, &g);
        assert!(
            o.iter()
                .chain(&grads.dq)
                .chain(&grads.dk)
                .chain(&grads.dv)
                .all(|v| v.is_finite())
        );
        // Every query's output is the mean of the V rows of keys j ≡ 0 (mod 3): e^-1 ≈ 0 weight
        // on the 99.99 keys (logit 9999 vs 10000).
        let winners: Vec<usize> = (0..nk).filter(|j| j % 3 == 0).collect();
        let e = (-1.0f64).exp();
        let runner: Vec<usize> = (0..nk).filter(|j| j % 3 == 2).collect();
        let z = winners.len() as f64 + e * runner.len() as f64;
        for c in 0..3 {
            let want = (winners
                .iter()
                .map(|j| case.v[j * 3 + c] as f64)
                .sum::<f64>()
                + e * runner.iter().map(|j| case.v[j * 3 + c] as f64).sum::<f64>())
                / z;
            assert!((o[c] as f64 - want).abs() < 1e-3, "{} vs {want}", o[c]);
        }
    }
    let mut neg = case;
    for x in neg.q.iter_mut() {
        *x = -*x;
    }
    let x = neg.inputs();
    let o = Exact {
        scale: randattn::Auto::Fixed(1.0),
    }
    .forward(&x, 0)
    .unwrap()
    .output;
    assert!(o.iter().all(|v| v.is_finite()));
}

#[test]
fn naive_backward_matches_finite_differences() {
    let case = Case::new((1, 2, 5, 6, 3, 2), 42);
    let mut masked = Case::new((1, 2, 5, 6, 3, 2), 43);
    masked.key_mask = Some(vec![true, false, true, true, false, true]);
    for case in [case, masked] {
        let x = case.inputs();
        let g = normal(x.dims().out_len(), 1.0, 7, "g");
        let m = ExactNaive::default();
        let (_, grads) = fwd_bwd(&m, &x, &g);
        check_qkv_gradients("exact-naive", &case, &grads, |c| {
            dot_loss(&m.forward(&c.inputs(), 0).unwrap().output, &g)
        });
    }
}

#[test]
fn identical_results_at_any_thread_count() {
    let case = Case::new((1, 1, 300, 700, 24, 16), 3);
    let x = case.inputs();
    let g = normal(x.dims().out_len(), 1.0, 8, "g");
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| fwd_bwd(&Exact::default(), &x, &g))
    };
    let (o1, g1) = run(1);
    for t in [2, 3, 5] {
        let (o, gr) = run(t);
        assert_eq!(o, o1);
        assert_eq!(gr, g1);
    }
}

#[test]
fn bad_backward_calls_are_errors() {
    let case = Case::new((1, 1, 4, 4, 2, 2), 1);
    let x = case.inputs();
    let f = Exact::default().forward(&x, 0).unwrap();
    let err = Exact::default()
        .backward(&x, 0, &f.saved, &[0.0; 3])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("grad_output has 3 elements but the output has shape [1, 1, 4, 2]"),
        "{err}"
    );
    let mut g = vec![0.0; 8];
    g[2] = f32::INFINITY;
    assert!(matches!(
        Exact::default().backward(&x, 0, &f.saved, &g),
        Err(Error::NonFinite {
            arg: "grad_output",
            ..
        })
    ));
    let naive = ExactNaive::default().forward(&x, 0).unwrap();
    let err = Exact::default()
        .backward(&x, 0, &naive.saved, &[0.0; 8])
        .unwrap_err();
    assert!(
        err.to_string().contains("comes from method `exact-naive`"),
        "{err}"
    );
    let other = Case::new((1, 1, 5, 4, 2, 2), 1);
    let err = Exact::default()
        .backward(&other.inputs(), 0, &f.saved, &[0.0; 10])
        .unwrap_err();
    assert!(err.to_string().contains("was made for dims"), "{err}");
    let bad = Exact {
        scale: randattn::Auto::Fixed(f32::NAN),
    };
    assert!(matches!(
        bad.forward(&x, 0),
        Err(Error::Param { param: "scale", .. })
    ));
}
