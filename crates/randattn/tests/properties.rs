//! Property tests over random shapes, masks and parameters, for every method of the catalog:
//! n, d, d_v, batch and heads from 1 up (odd sizes, cross-attention lengths), masks with
//! all-masked rows and batch elements, sample budgets from 1 to above the sequence length. For
//! each: forward and backward either succeed or return an error (never panic); a successful
//! output has the right length, is finite, and is zero on masked query rows; gradients are
//! finite; the same seed gives the same bits.

mod common;

use common::{BUDGET_PARAMS, Case, normal};
use proptest::prelude::*;
use randattn::{Attention, Method};

/// Every method, with the sample-budget parameter it has (if any) set to `budget`, and its conv
/// branch on where it has one and `conv` says so.
fn method(index: usize, budget: usize, conv: bool) -> Method {
    let catalog = Method::catalog();
    let info = &catalog[index % catalog.len()];
    let budget = budget.to_string();
    let mut settings: Vec<(&str, &str)> = info
        .params
        .iter()
        .filter(|p| BUDGET_PARAMS.contains(&p.name) || p.name == "samples")
        .map(|p| (p.name, budget.as_str()))
        .collect();
    if conv && info.params.iter().any(|p| p.name == "conv") {
        settings.push(("conv", "3"));
    }
    Method::parse(info.name, &settings).unwrap_or_else(|_| Method::from_name(info.name).unwrap())
}

fn masks(len: usize, seed: u64, keep: f64, what: &str) -> Vec<bool> {
    normal(len, 1.0, seed, what)
        .iter()
        .map(|z| {
            // Φ(z) < keep, by a rough threshold: keep = 0 masks all, 1 keeps all.
            (*z as f64) < (keep - 0.5) * 5.0
        })
        .collect()
}

proptest! {
    // 256 cases by default (seconds); PROPTEST_CASES=100000 for a long search.
    #[test]
    fn any_shape_mask_and_budget_is_an_answer_or_an_error_never_a_panic(
        index in 0usize..64,
        b in 1usize..=2, h in 1usize..=3, nq in 1usize..=33, nk_extra in 0usize..=8,
        cross in any::<bool>(), d in 1usize..=9, dv in 1usize..=7,
        budget in 1usize..=48, conv in any::<bool>(),
        key_keep in 0.0f64..=1.0, query_keep in 0.0f64..=1.0,
        seed in any::<u64>(),
    ) {
        let m = method(index, budget, conv);
        let nk = if cross { nq + nk_extra } else { nq };
        let mut case = Case::new((b, h, nq, nk, d, dv), seed);
        if m.info().needs_value_projection {
            case = case.with_projection(5, seed);
        }
        case.key_mask = Some(masks(b * nk, seed, key_keep, "key mask"));
        case.query_mask = Some(masks(b * nq, seed, query_keep, "query mask"));
        let x = case.inputs();
        let Ok(f) = m.forward(&x, seed) else {
            // An error is an answer (cross-attention where a method needs n_q = n_k, say).
            return Ok(());
        };
        prop_assert_eq!(f.output.len(), b * h * nq * dv);
        prop_assert!(f.output.iter().all(|v| v.is_finite()), "{} output not finite", m.spec());
        let qm = case.query_mask.as_ref().unwrap();
        for (row, out) in f.output.chunks(dv).enumerate() {
            let (bi, i) = (row / (h * nq), row % nq);
            if !qm[bi * nq + i] {
                prop_assert!(out.iter().all(|v| *v == 0.0), "{}: masked query row", m.spec());
            }
        }
        let again = m.forward(&x, seed).unwrap();
        prop_assert_eq!(&again.output, &f.output, "{}: same seed, other bits", m.spec());
        let g = normal(f.output.len(), 1.0, seed, "g");
        if let Ok(grads) = m.backward(&x, seed, &f.saved, &g) {
            let all = grads.dq.iter().chain(&grads.dk).chain(&grads.dv)
                .chain(grads.params.iter().flat_map(|p| &p.grad));
            prop_assert!(all.into_iter().all(|v| v.is_finite()), "{} gradient not finite", m.spec());
            prop_assert_eq!(grads.dq.len(), case.q.len());
            prop_assert_eq!(grads.dk.len(), case.k.len());
        }
    }
}
