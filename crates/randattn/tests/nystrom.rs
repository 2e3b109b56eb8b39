//! Nyströmformer: the exact limit (one landmark per token), finite differences of the backward
//! through the pseudo-inverse iterations and the conv skip, and bad input.

mod common;

use common::{
    Case, assert_close, assert_derivative, check_qkv_gradients, dot_loss, normal, random_masks,
    rel_error,
};
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
    let loss = |c: &Case, m: &Nystrom| dot_loss(&m.forward(&c.inputs(), 0).unwrap().output, &g);
    check_qkv_gradients("nystrom", &case, &grads, |c| loss(c, &method));
    for t in 0..weights.len() {
        let what = format!("conv {t}");
        assert_derivative(&what, grads.params[0].grad[t] as f64, weights[t], |v| {
            let mut w = weights.clone();
            w[t] = v;
            let bumped = Nystrom {
                conv_weights: randattn::Auto::Fixed(w),
                ..method.clone()
            };
            loss(&case, &bumped)
        });
    }
}

#[test]
fn bad_input_is_an_error() {
    // Masks, garbage under them, threads and seeds: tests/contract.rs.
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
