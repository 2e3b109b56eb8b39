//! `randattn compare`: the main job. Every method on the built-in clustered workload: relative
//! error of the output vs `exact`, forward time and speed-up.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use randattn::workload::clustered;
use randattn::{Attention, Method};
use serde_json::json;

use crate::report::{median_ms, ms, progress, table};
use crate::{limits, parse_methods};

/// Longest sequence at which the O(n²) f64 reference is run.
const NAIVE_MAX_N: usize = 2048;

#[derive(Args)]
pub struct CompareArgs {
    /// Sequence lengths (default 1024 and 4096; 256 with --quick).
    #[arg(long, value_delimiter = ',', value_parser = limits::size(limits::MAX_N))]
    n: Vec<usize>,
    /// A small, fast run (n=256, 4 heads, d=32) for smoke tests and CI.
    #[arg(long)]
    quick: bool,
    /// Comma-separated method specs (`performer:features=64,lara:proposals=16`), or `all`.
    #[arg(long, default_value = "all")]
    methods: String,
    /// Batch size.
    #[arg(long, default_value_t = 1, value_parser = limits::size(limits::MAX_AXIS))]
    batch: usize,
    /// Heads (default 8; 4 with --quick).
    #[arg(long, value_parser = limits::size(limits::MAX_AXIS))]
    heads: Option<usize>,
    /// Head dimension (default 64; 32 with --quick).
    #[arg(long, value_parser = limits::size(limits::MAX_AXIS))]
    d: Option<usize>,
    #[command(flatten)]
    common: crate::ReportArgs,
}

pub fn compare(a: CompareArgs) -> Result<()> {
    let ns = if !a.n.is_empty() {
        a.n.clone()
    } else if a.quick {
        vec![256]
    } else {
        vec![1024, 4096]
    };
    let heads = a.heads.unwrap_or(if a.quick { 4 } else { 8 });
    let d = a.d.unwrap_or(if a.quick { 32 } else { 64 });
    let all: Vec<&str> = Method::catalog().iter().map(|m| m.name).collect();
    let methods = parse_methods(&a.methods, &all)?;
    let (runs, budget) = if a.quick {
        (1, Duration::ZERO)
    } else {
        (3, Duration::from_secs(1))
    };
    for &n in &ns {
        // The workload (Q, K, V and X), the exact output kept for the errors, and the most
        // demanding method's forward.
        let dims = randattn::Dims {
            batch: a.batch,
            heads,
            n_q: n,
            n_k: n,
            d,
            d_v: d,
        };
        limits::check_methods(
            &methods,
            dims,
            None,
            false,
            2,
            &format!(
                "compare at batch {} × heads {heads} × n {n} × d {d}",
                a.batch
            ),
        )?;
    }

    let bar = progress((ns.len() * methods.len()) as u64, a.common.quiet);
    let mut rows = Vec::new();
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    for &n in &ns {
        let w = clustered(a.batch, heads, n, d, a.common.seed);
        let x = w.inputs()?;
        let reference = methods[0].forward(&x, a.common.seed)?.output;
        let mut exact_ms = f64::NAN;
        for m in &methods {
            bar.set_message(format!("{} n={n}", m.name()));
            if m.name() == "exact-naive" && n > NAIVE_MAX_N {
                skipped.push(format!(
                    "exact-naive at n={n} (O(n^2) f64 reference, run only up to n={NAIVE_MAX_N})"
                ));
                bar.inc(1);
                continue;
            }
            let out = m.forward(&x, a.common.seed)?.output;
            // A method with another kernel (YOSO) has no approximation error against softmax;
            // the sampled one is measured against its own expectation instead.
            let err = m
                .info()
                .approximates_softmax
                .then(|| randattn::linalg::relative_error(&out, &reference));
            let err_vs_expectation = match m.expectation() {
                Some(e) => {
                    let e = e.forward(&x, a.common.seed)?.output;
                    Some(randattn::linalg::relative_error(&out, &e))
                }
                None => None,
            };
            let t = median_ms(runs, budget, || m.forward(&x, a.common.seed));
            if m.name() == "exact" {
                exact_ms = t;
            }
            let speedup = exact_ms / t;
            let params: Vec<String> = m.params().iter().map(|(k, v)| format!("{k}={v}")).collect();
            rows.push(vec![
                m.name().to_string(),
                n.to_string(),
                err.map_or_else(|| "-".to_string(), |e| format!("{e:.2e}")),
                err_vs_expectation.map_or_else(|| "-".to_string(), |e| format!("{e:.2e}")),
                ms(t),
                format!("{speedup:.2}x"),
                params.join(" "),
            ]);
            let params: serde_json::Map<String, serde_json::Value> = m
                .params()
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            results.push(json!({
                "method": m.name(), "spec": m.spec(), "params": params, "n": n, "rel_error": err,
                "rel_error_vs_expectation": err_vs_expectation,
                "forward_ms": t, "speedup_vs_exact": speedup,
            }));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    crate::say!(
        a.common.json,
        "workload: clustered (peaked attention), batch={} heads={heads} d={d} seed={} threads={}",
        a.batch,
        a.common.seed,
        rayon::current_num_threads()
    );
    crate::say!(
        a.common.json,
        "rel_error = ||O - O_exact||_F / ||O_exact||_F; forward time is the median in ms"
    );
    crate::say!(
        a.common.json,
        "vs_expect = error against the method's own expectation (yoso vs yoso-e with the same tau)"
    );
    crate::say_raw!(
        a.common.json,
        "{}",
        table(
            &[
                "method",
                "n",
                "rel_error",
                "vs_expect",
                "fwd ms",
                "speedup",
                "params"
            ],
            &rows
        )
    );
    let other_kernels: Vec<&str> = methods
        .iter()
        .filter(|m| !m.info().approximates_softmax)
        .map(|m| m.name())
        .collect();
    if !other_kernels.is_empty() {
        crate::say!(
            a.common.json,
            "{}: a different kernel (LSH collision probability, not softmax), used in models \
             trained with it; their distance to softmax is not an approximation error (rel_error -)",
            other_kernels.join(", ")
        );
    }
    for s in &skipped {
        crate::say!(a.common.json, "skipped: {s}");
    }
    a.common.json.write(&json!({ "results": results }))?;
    Ok(())
}
