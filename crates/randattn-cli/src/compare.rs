//! `randattn compare`: the main job. Every method on the built-in clustered workload (or a real
//! layer from `.npy` files): relative error of the output vs `exact`, forward time and speed-up.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use randattn::workload::clustered;
use randattn::{Attention, AttentionInputs, Method};
use serde_json::json;

use crate::console::{median_ms, ms, progress, table};
use crate::layer::Layer;
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
    /// A real layer instead of the built-in workload: PREFIX-q.npy, PREFIX-k.npy, PREFIX-v.npy
    /// ([batch, heads, n, d]) and, where present, PREFIX-mask.npy and PREFIX-x/-wv/-bv.npy (MCA
    /// needs them), e.g. `fixtures/minilm/layer5`.
    #[arg(long, value_name = "PREFIX", conflicts_with_all = ["n", "quick", "batch", "heads", "d"])]
    layer: Option<PathBuf>,
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

/// One method's figures on one input.
pub struct Measured {
    /// The table row.
    pub row: Vec<String>,
    /// The JSON record.
    pub json: serde_json::Value,
}

/// Every method of `methods` (exact first) on `x`: error against the first method's output and
/// against the method's own expectation, the median forward time over `runs` runs (and at least
/// `budget` of time) and the speed-up over exact.
pub fn measure(
    x: &AttentionInputs<'_>,
    methods: &[Method],
    seed: u64,
    runs: usize,
    budget: Duration,
    mut progress: impl FnMut(&Method),
) -> Result<Vec<Measured>> {
    let n = x.dims().n_k;
    let reference = methods[0].forward(x, seed)?.output;
    let mut exact_ms = f64::NAN;
    let mut out = Vec::with_capacity(methods.len());
    for m in methods {
        progress(m);
        let o = m.forward(x, seed)?.output;
        // A method with another kernel (YOSO) has no approximation error against softmax; the
        // sampled one is measured against its own expectation instead.
        let err = m
            .info()
            .approximates_softmax
            .then(|| randattn::linalg::relative_error(&o, &reference));
        let err_vs_expectation = match m.expectation() {
            Some(e) => {
                let e = e.forward(x, seed)?.output;
                Some(randattn::linalg::relative_error(&o, &e))
            }
            None => None,
        };
        let t = median_ms(runs, budget, || m.forward(x, seed));
        if m.name() == "exact" {
            exact_ms = t;
        }
        let speedup = exact_ms / t;
        let params: Vec<String> = m.params().iter().map(|(k, v)| format!("{k}={v}")).collect();
        let row = vec![
            m.name().to_string(),
            n.to_string(),
            err.map_or_else(|| "-".to_string(), |e| format!("{e:.2e}")),
            err_vs_expectation.map_or_else(|| "-".to_string(), |e| format!("{e:.2e}")),
            ms(t),
            format!("{speedup:.2}x"),
            params.join(" "),
        ];
        let params = crate::params_json(m);
        let json = json!({
            "method": m.name(), "spec": m.spec(), "params": params, "n": n, "seed": seed,
            "rel_error": err, "rel_error_vs_expectation": err_vs_expectation,
            "forward_ms": t, "speedup_vs_exact": speedup,
        });
        out.push(Measured { row, json });
    }
    Ok(out)
}

pub fn compare(a: CompareArgs) -> Result<()> {
    let layer = a.layer.as_deref().map(Layer::read).transpose()?;
    let ns = if let Some(l) = &layer {
        vec![l.dims().n_k]
    } else if !a.n.is_empty() {
        a.n.clone()
    } else if a.quick {
        vec![256]
    } else {
        vec![1024, 4096]
    };
    let heads = a.heads.unwrap_or(if a.quick { 4 } else { 8 });
    let d = a.d.unwrap_or(if a.quick { 32 } else { 64 });
    let all: Vec<&str> = Method::catalog().iter().map(|m| m.name).collect();
    let mut methods = parse_methods(&a.methods, &all)?;
    let mut skipped = Vec::new();
    if let Some(l) = layer.as_ref().filter(|l| !l.has_value_projection()) {
        methods.retain(|m| {
            let keep = !m.info().needs_value_projection;
            if !keep {
                skipped.push(format!(
                    "{} (samples the value projection: needs {}-x.npy and -wv.npy)",
                    m.name(),
                    l.source
                ));
            }
            keep
        });
    }
    let (runs, budget) = if a.quick {
        (1, Duration::ZERO)
    } else {
        (3, Duration::from_secs(1))
    };
    for &n in &ns {
        // The workload (Q, K, V and X), the exact output kept for the errors, and the most
        // demanding method's forward.
        let dims = match &layer {
            Some(l) => l.dims(),
            None => randattn::Dims {
                batch: a.batch,
                heads,
                n_q: n,
                n_k: n,
                d,
                d_v: d,
            },
        };
        limits::check_methods(
            &methods,
            dims,
            None,
            false,
            2,
            &format!(
                "compare at batch {} × heads {} × n {n} × d {}",
                dims.batch, dims.heads, dims.d
            ),
        )?;
    }

    let bar = progress((ns.len() * methods.len()) as u64, a.common.quiet);
    let mut rows = Vec::new();
    let mut results = Vec::new();
    let seed = a.common.seed;
    for &n in &ns {
        let workload;
        let x = match &layer {
            Some(l) => l.inputs()?,
            None => {
                workload = clustered(a.batch, heads, n, d, seed);
                workload.inputs()?
            }
        };
        // The O(n²) f64 reference only up to NAIVE_MAX_N.
        let run: Vec<Method> = methods
            .iter()
            .filter(|m| {
                let keep = m.name() != "exact-naive" || n <= NAIVE_MAX_N;
                if !keep {
                    skipped.push(format!(
                        "exact-naive at n={n} (O(n^2) f64 reference, run only up to n={NAIVE_MAX_N})"
                    ));
                    bar.inc(1);
                }
                keep
            })
            .cloned()
            .collect();
        for r in measure(&x, &run, seed, runs, budget, |m| {
            bar.set_message(format!("{} n={n}", m.name()));
            bar.inc(1);
        })? {
            rows.push(r.row);
            results.push(r.json);
        }
    }
    bar.finish_and_clear();
    let workload = match &layer {
        Some(l) => {
            let dm = l.dims();
            crate::say!(
                a.common.json,
                "workload: layer {} (batch={} heads={} n={} d={}{}), seed={seed} threads={}",
                l.source,
                dm.batch,
                dm.heads,
                dm.n_k,
                dm.d,
                if l.masked() { ", masked" } else { "" },
                rayon::current_num_threads()
            );
            json!({"kind": "layer", "source": l.source, "batch": dm.batch, "heads": dm.heads,
                   "d": dm.d, "seed": seed})
        }
        None => {
            crate::say!(
                a.common.json,
                "workload: clustered (peaked attention), batch={} heads={heads} d={d} seed={seed} threads={}",
                a.batch,
                rayon::current_num_threads()
            );
            json!({"kind": "clustered", "source": "built-in clustered workload", "batch": a.batch,
                   "heads": heads, "d": d, "seed": seed})
        }
    };
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
    a.common
        .json
        .write(&json!({ "workload": workload, "results": results }))?;
    Ok(())
}
