//! Nyströmformer: the exact limit (one landmark per token), finite differences of the backward
//! through the pseudo-inverse iterations and the conv skip, masks, threads and bad input.

mod common;

use common::{Case, assert_close, normal, random_masks, rel_error, run_in_pool};
use randattn::methods::exact::ExactNaive;
use randattn::methods::nystrom::Nystrom;
use randattn::{Attention, Method};

#[test]
fn one_landmark_per_token_is_exact_attention_to_the_pseudo_inverses_accuracy() {
    // With m = n every segment is one token and Ŝ = S S⁺ S = S; what remains is the error of the
    // iterative pseudo-inverse, which falls as the iterations converge.
    let mut case = Case::new((2, 2, 20, 20, 8, 4), 3);
    for v in case.q.iter_mut().chain(case.k.iter_mut()) {
        *v *= 0.5; // a well-conditioned softmax matrix
    }
    let x = case.inputs();
    let exact = ExactNaive::default().forward(&x, 0).unwrap().output;
    let errs: Vec<f64> = [6, 12, 30]
        .iter()
        .map(|&iters| {
            let m = Nystrom {
                landmarks: 20,
                pinv_iters: iters,
                ..Nystrom::default()
            };
            rel_error(&m.forward(&x, 0).unwrap().output, &exact)
        })
        .collect();
    assert!(errs[2] < 1e-4, "converged error {errs:?}");
    assert!(errs[2] <= errs[0], "{errs:?}");
    // With masks: landmarks ≥ the unmasked tokens still give one token per segment.
    let mut masked = Case::new((3, 1, 17, 17, 8, 4), 4);
    for v in masked.q.iter_mut().chain(masked.k.iter_mut()) {
        *v *= 0.5;
    }
    random_masks(&mut masked, 2);
    masked.query_mask = masked.key_mask.clone();
    let x = masked.inputs();
    let exact = ExactNaive::default().forward(&x, 0).unwrap().output;
    let m = Nystrom {
        landmarks: 17,
        pinv_iters: 30,
        ..Nystrom::default()
    };
    assert_close(
        "masked limit",
        &m.forward(&x, 0).unwrap().output,
        &exact,
        1e-4,
    );
}

#[test]
fn backward_matches_finite_differences_through_the_pseudo_inverse_and_conv() {
    let mut case = Case::new((1, 2, 11, 11, 4, 3), 8);
    random_masks(&mut case, 5);
    let weights = randattn::methods::yoso::seeded_conv_weights(2, 3, 1);
    let method = Nystrom {
        landmarks: 4,
        pinv_iters: 6,
        conv: 3,
        conv_weights: randattn::Auto::Fixed(weights.clone()),
        ..Nystrom::default()
    };
    let x = case.inputs();
    let g = normal(2 * 11 * 3, 1.0, 6, "g");
    let f = method.forward(&x, 0).unwrap();
    let grads = method.backward(&x, 0, &f.saved, &g).unwrap();
    let loss = |c: &Case, m: &Nystrom| -> f64 {
        let out = m.forward(&c.inputs(), 0).unwrap().output;
        out.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    fn field(c: &mut Case, which: usize) -> &mut Vec<f32> {
        match which {
            0 => &mut c.q,
            1 => &mut c.k,
            _ => &mut c.v,
        }
    }
    let eps = 1e-2f32;
    let close = |an: f32, fd: f64, what: &str| {
        assert!(
            (an as f64 - fd).abs() <= 1e-2 * (1.0 + fd.abs()),
            "{what}: analytic {an} vs finite difference {fd}"
        );
    };
    for which in 0..3 {
        for idx in 0..field(&mut Case::new(case.shape, 8), which).len() {
            let mut c = Case::new(case.shape, 8);
            c.key_mask = case.key_mask.clone();
            c.query_mask = case.query_mask.clone();
            let base = field(&mut c, which)[idx];
            field(&mut c, which)[idx] = base + eps;
            let plus = loss(&c, &method);
            field(&mut c, which)[idx] = base - eps;
            let minus = loss(&c, &method);
            let an = [&grads.dq, &grads.dk, &grads.dv][which][idx];
            close(
                an,
                (plus - minus) / (2.0 * eps as f64),
                &format!("tensor {which}[{idx}]"),
            );
        }
    }
    for t in 0..weights.len() {
        let (mut wp, mut wm) = (weights.clone(), weights.clone());
        wp[t] += eps;
        wm[t] -= eps;
        let mp = Nystrom {
            conv_weights: randattn::Auto::Fixed(wp),
            ..method.clone()
        };
        let mm = Nystrom {
            conv_weights: randattn::Auto::Fixed(wm),
            ..method.clone()
        };
        let fd = (loss(&case, &mp) - loss(&case, &mm)) / (2.0 * eps as f64);
        close(grads.params[0].grad[t], fd, &format!("conv {t}"));
    }
}

#[test]
fn padding_is_excluded_and_masked_rows_are_zero() {
    let mut case = Case::new((3, 2, 50, 50, 8, 4), 9);
    random_masks(&mut case, 9);
    let method = Method::parse::<&str>("nystrom", &[("landmarks", "7")]).unwrap();
    let x = case.inputs();
    let f = method.forward(&x, 0).unwrap();
    let (km, qm) = (
        case.key_mask.clone().unwrap(),
        case.query_mask.clone().unwrap(),
    );
    for (idx, o) in f.output.iter().enumerate() {
        let (bh, i) = (idx / (50 * 4), (idx / 4) % 50);
        assert!(o.is_finite());
        if bh / 2 == 1 || !qm[(bh / 2) * 50 + i] {
            assert_eq!(*o, 0.0);
        }
    }
    // Garbage at masked keys and masked queries changes nothing.
    let mut other = Case::new(case.shape, 9);
    other.key_mask = case.key_mask.clone();
    other.query_mask = case.query_mask.clone();
    for bh in 0..6 {
        for t in 0..50 {
            if !km[(bh / 2) * 50 + t] {
                other.k[(bh * 50 + t) * 8..(bh * 50 + t + 1) * 8].fill(40.0);
                other.v[(bh * 50 + t) * 4..(bh * 50 + t + 1) * 4].fill(-1e3);
            }
            if !qm[(bh / 2) * 50 + t] {
                other.q[(bh * 50 + t) * 8..(bh * 50 + t + 1) * 8].fill(-7.0);
            }
        }
    }
    let f2 = method.forward(&other.inputs(), 0).unwrap();
    assert_close("padding", &f2.output, &f.output, 1e-5);
    let g = normal(f.output.len(), 1.0, 1, "g");
    let grads = method.backward(&x, 0, &f.saved, &g).unwrap();
    assert!(
        grads
            .dq
            .iter()
            .chain(&grads.dk)
            .chain(&grads.dv)
            .all(|v| v.is_finite())
    );
    assert!(grads.dk[2 * 50 * 8..4 * 50 * 8].iter().all(|v| *v == 0.0));
}

#[test]
fn same_output_at_any_thread_count_and_bad_input() {
    let w = randattn::workload::clustered(1, 3, 333, 16, 2);
    let s = w.dims.q_shape();
    let x = randattn::AttentionInputs::new(&w.q, s, &w.k, s, &w.v, s).unwrap();
    let g = normal(w.q.len(), 1.0, 2, "g");
    let method = Method::parse::<&str>("nystrom", &[("conv", "5")]).unwrap();
    let run = |threads: usize| run_in_pool(&method, &x, 4, &g, threads);
    let one = run(1);
    assert_eq!(run(2), one);
    assert_eq!(run(3), one);
    for (k, v, needle) in [
        ("landmarks", "0", "parameter `landmarks`"),
        ("pinv_iters", "0", "parameter `pinv_iters`"),
        ("pinv_iters", "101", "parameter `pinv_iters`"),
        ("conv", "2", "parameter `conv`"),
        ("budget", "3", "has no parameter `budget`"),
    ] {
        let err = Method::parse("nystrom", &[(k, v)]).unwrap_err().to_string();
        assert!(err.contains(needle), "{k}={v}: {err}");
    }
    let cross = Case::new((1, 1, 4, 6, 2, 2), 1);
    let conv = Method::parse("nystrom", &[("conv", "3")]).unwrap();
    assert!(conv.forward(&cross.inputs(), 0).is_err());
    assert!(
        Method::parse::<&str>("nystrom", &[])
            .unwrap()
            .forward(&cross.inputs(), 0)
            .is_ok()
    );
}
