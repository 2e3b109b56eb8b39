//! Linformer: the exact limit (k = n, E = F = I), finite differences of every gradient including
//! dE and dF, masks, seeds, and the comparison with Skeinformer at equal budget.

mod common;

use common::{
    Case, assert_close, assert_derivative, check_qkv_gradients, dot_loss, minilm, normal, rel_error,
};
use rand::Rng;
use randattn::methods::exact::ExactNaive;
use randattn::methods::linformer::{Linformer, Projections};
use randattn::rng::stream;
use randattn::{Attention, AttentionInputs, Method};

fn identity_projections(heads: usize, n: usize) -> Projections {
    let mut e = vec![0.0f32; heads * n * n];
    for h in 0..heads {
        for i in 0..n {
            e[h * n * n + i * n + i] = 1.0;
        }
    }
    Projections { e: e.clone(), f: e }
}

#[test]
fn identity_projections_of_full_length_give_exact_attention() {
    let case = Case::new((2, 3, 19, 23, 8, 5), 1);
    let x = case.inputs();
    let method = Linformer::new(23).with_projections(identity_projections(3, 23));
    let g = normal(x.dims().out_len(), 1.0, 2, "g");
    let f = method.forward(&x, 0).unwrap();
    let got = method.backward(&x, 0, &f.saved, &g).unwrap();
    let reference = ExactNaive::default();
    let fr = reference.forward(&x, 0).unwrap();
    let want = reference.backward(&x, 0, &fr.saved, &g).unwrap();
    assert_close("out", &f.output, &fr.output, 1e-5);
    assert_close("dq", &got.dq, &want.dq, 1e-5);
    assert_close("dk", &got.dk, &want.dk, 1e-5);
    assert_close("dv", &got.dv, &want.dv, 1e-5);
}

#[test]
fn every_gradient_matches_finite_differences() {
    let (b, h, n, d, dv, k) = (2, 2, 9, 4, 3, 5);
    let mut case = Case::new((b, h, n, n, d, dv), 4);
    let mut r = stream(2, 0, 0, "mask");
    case.key_mask = Some((0..b * n).map(|_| r.random_bool(0.7)).collect());
    case.query_mask = Some((0..b * n).map(|_| r.random_bool(0.8)).collect());
    let p = Projections {
        e: normal(h * k * n, 0.5, 5, "e"),
        f: normal(h * k * n, 0.5, 6, "f"),
    };
    let method = Linformer::new(k).with_projections(p.clone());
    let x = case.inputs();
    let g = normal(x.dims().out_len(), 1.0, 7, "g");
    let f = method.forward(&x, 0).unwrap();
    let grads = method.backward(&x, 0, &f.saved, &g).unwrap();
    let loss = |c: &Case, m: &Linformer| dot_loss(&m.forward(&c.inputs(), 0).unwrap().output, &g);
    check_qkv_gradients("linformer", &case, &grads, |c| loss(c, &method));
    for (which, name) in [(0, "e"), (1, "f")] {
        let grad = &grads.params[which];
        assert_eq!((grad.name, grad.shape.clone()), (name, vec![h, k, n]));
        let given = if which == 0 { &p.e } else { &p.f };
        for idx in 0..h * k * n {
            let what = format!("{name}[{idx}]");
            assert_derivative(&what, grad.grad[idx] as f64, given[idx], |v| {
                let mut q = p.clone();
                let t = if which == 0 { &mut q.e } else { &mut q.f };
                t[idx] = v;
                loss(&case, &Linformer::new(k).with_projections(q))
            });
        }
    }
}

#[test]
fn padding_never_contributes_and_seeds_draw_new_projections() {
    let mut case = Case::new((2, 2, 30, 30, 8, 4), 5);
    let mut r = stream(5, 0, 0, "mask");
    let km: Vec<bool> = (0..60).map(|_| r.random_bool(0.6)).collect();
    case.key_mask = Some(km.clone());
    let method = Method::parse("linformer", &[("k", "16")]).unwrap();
    let x = case.inputs();
    let f = method.forward(&x, 3).unwrap();
    let mut other = Case::new(case.shape, 5);
    other.key_mask = case.key_mask.clone();
    for bh in 0..4 {
        for j in 0..30 {
            if !km[(bh / 2) * 30 + j] {
                other.k[(bh * 30 + j) * 8..(bh * 30 + j + 1) * 8].fill(9.0);
                other.v[(bh * 30 + j) * 4..(bh * 30 + j + 1) * 4].fill(-50.0);
            }
        }
    }
    assert_eq!(method.forward(&other.inputs(), 3).unwrap().output, f.output);
    // The seeded projections are cached, not redrawn: same seed, same bits, also after another
    // seed; another seed gives other projections.
    let f4 = method.forward(&x, 4).unwrap();
    assert_ne!(f4.output, f.output);
    assert_eq!(method.forward(&x, 3).unwrap().output, f.output);
    let fresh = Method::parse("linformer", &[("k", "16")]).unwrap();
    assert_eq!(fresh.forward(&x, 3).unwrap().output, f.output);
    let g = normal(f.output.len(), 1.0, 1, "g");
    let grads = method.backward(&x, 3, &f.saved, &g).unwrap();
    for (j, kept) in km.iter().enumerate() {
        let (b, t) = (j / 30, j % 30);
        if !kept {
            for h in 0..2 {
                let row = ((b * 2 + h) * 30 + t) * 8;
                assert!(grads.dk[row..row + 8].iter().all(|v| *v == 0.0));
            }
        }
    }
}

#[test]
fn skeinformer_is_more_accurate_than_random_projections_at_equal_budget() {
    // The paper's claim about Linformer as a sketch: with untrained N(0, 1/k) projections its
    // error is far above importance sampling's at the same k = d, on real and synthetic
    // attention, for every seed.
    let (q, s) = minilm("layer5-q.npy");
    let (k, _) = minilm("layer5-k.npy");
    let (v, _) = minilm("layer5-v.npy");
    let (want, _) = minilm("layer5-out.npy");
    let shape = [s[0], s[1], s[2], s[3]];
    let real = AttentionInputs::new(&q, shape, &k, shape, &v, shape).unwrap();
    let w = randattn::workload::clustered(1, 4, 512, 32, 2);
    let ws = w.dims.q_shape();
    let synthetic = AttentionInputs::new(&w.q, ws, &w.k, ws, &w.v, ws).unwrap();
    let synthetic_exact = ExactNaive::default().forward(&synthetic, 0).unwrap().output;
    for budget in ["64", "128"] {
        let skein = Method::parse("skeinformer", &[("budget", budget)]).unwrap();
        let lin = Method::parse("linformer", &[("k", budget)]).unwrap();
        for seed in 0..3 {
            for (what, x, exact) in [
                ("minilm layer 5", &real, &want),
                ("clustered", &synthetic, &synthetic_exact),
            ] {
                let es = rel_error(&skein.forward(x, seed).unwrap().output, exact);
                let el = rel_error(&lin.forward(x, seed).unwrap().output, exact);
                assert!(
                    es < el,
                    "{what}, budget {budget}, seed {seed}: skeinformer {es:.3} vs linformer {el:.3}"
                );
            }
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    for (k, v, needle) in [
        ("k", "0", "parameter `k`"),
        ("k", "70000", "parameter `k`"),
        ("landmarks", "3", "has no parameter `landmarks`"),
    ] {
        let err = Method::parse("linformer", &[(k, v)])
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{k}={v}: {err}");
    }
    let case = Case::new((1, 2, 5, 6, 3, 2), 1);
    let wrong = Linformer::new(4).with_projections(identity_projections(2, 6));
    let err = wrong.forward(&case.inputs(), 0).unwrap_err().to_string();
    assert!(err.contains("[heads, k, n_k] = [2, 4, 6]"), "{err}");
}
