//! `randattn bench`: median wall time, speed-up over `exact`, GFLOP/s and peak memory.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use randattn::workload::clustered;
use randattn::{Attention, AttentionInputs, Method};
use serde_json::json;

use crate::console::{mib, ms, progress, table};
use crate::{alloc, limits, parse_methods};

#[derive(Args)]
pub struct BenchArgs {
    /// Comma-separated method specs (`performer:features=64,lara`), or `all` (every method but the O(n²) f64 reference
    /// `exact-naive`, which must be named to run).
    #[arg(long, default_value = "all")]
    methods: String,
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_values_t = [512, 1024, 4096],
          value_parser = limits::size(limits::MAX_N))]
    n: Vec<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 1, value_parser = limits::size(limits::MAX_AXIS))]
    batch: usize,
    /// Heads.
    #[arg(long, default_value_t = 8, value_parser = limits::size(limits::MAX_AXIS))]
    heads: usize,
    /// Head dimension (of Q, K and V).
    #[arg(long, default_value_t = 64, value_parser = limits::size(limits::MAX_AXIS))]
    d: usize,
    /// Also time forward + backward.
    #[arg(long)]
    backward: bool,
    /// Minimum timed runs per measurement (after one warm-up); more are taken within ~2 s.
    #[arg(long, default_value_t = 5, value_parser = limits::size(10_000))]
    repeats: usize,
    /// Do not time `exact` as the speed-up baseline (unless it is named in --methods): for long
    /// sequences, where exact attention takes minutes. The speed-up column is then empty.
    #[arg(long)]
    no_baseline: bool,
    #[command(flatten)]
    common: crate::ReportArgs,
}

struct Timing {
    forward_ms: f64,
    backward_ms: Option<f64>,
    peak_extra_bytes: usize,
}

fn measure(m: &Method, x: &AttentionInputs<'_>, a: &BenchArgs) -> Result<Timing> {
    let budget = Duration::from_secs(2);
    // Peak memory of one forward (+ backward, with its all-ones output gradient), beyond the
    // inputs already allocated.
    let base = alloc::start();
    {
        let f = m.forward(x, a.common.seed)?;
        if a.backward {
            let g = vec![1.0f32; f.output.len()];
            drop(m.backward(x, a.common.seed, &f.saved, &g)?);
        }
    }
    let peak_extra_bytes = alloc::peak_since(base);
    let forward_ms = crate::console::median_ms(a.repeats, budget, || m.forward(x, a.common.seed));
    let backward_ms = if a.backward {
        let g = vec![1.0f32; x.dims().out_len()];
        let both = crate::console::median_ms(a.repeats, budget, || -> Result<()> {
            let f = m.forward(x, a.common.seed)?;
            m.backward(x, a.common.seed, &f.saved, &g)?;
            Ok(())
        });
        Some((both - forward_ms).max(0.0))
    } else {
        None
    };
    Ok(Timing {
        forward_ms,
        backward_ms,
        peak_extra_bytes,
    })
}

/// Whether `exact` itself is one of the comma-separated specs of `--methods`.
fn named_exact(list: &str) -> bool {
    list.split(',')
        .any(|s| s.trim() == "exact" || s.trim().starts_with("exact:"))
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let reuse = alloc::keep_freed_memory();
    let everything: Vec<&str> = Method::catalog()
        .iter()
        .map(|m| m.name)
        .filter(|n| *n != "exact-naive")
        .collect();
    let mut methods = parse_methods(&a.methods, &everything)?;
    if a.no_baseline && !named_exact(&a.methods) {
        methods.remove(0);
    }

    for &n in &a.n {
        // The workload (Q, K, V and X, as wide as V), with --backward the output gradient, and
        // the most demanding method's own needs.
        let dims = randattn::Dims {
            batch: a.batch,
            heads: a.heads,
            n_q: n,
            n_k: n,
            d: a.d,
            d_v: a.d,
        };
        limits::check_methods(
            &methods,
            dims,
            None,
            a.backward,
            1 + usize::from(a.backward),
            &format!(
                "bench at batch {} × heads {} × n {n} × d {}",
                a.batch, a.heads, a.d
            ),
        )?;
    }
    let bar = progress((a.n.len() * methods.len()) as u64, a.common.quiet);
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for &n in &a.n {
        let w = clustered(a.batch, a.heads, n, a.d, a.common.seed);
        let x = w.inputs()?;
        let mut exact_ms = f64::NAN;
        for m in &methods {
            bar.set_message(format!("{} n={n}", m.name()));
            let t = measure(m, &x, &a)?;
            if m.name() == "exact" {
                exact_ms = t.forward_ms;
            }
            let speedup = Some(exact_ms / t.forward_ms).filter(|s| s.is_finite());
            // Forward: Q Kᵀ and P V; backward: recomputed Q Kᵀ, dV, dP, dK, dQ.
            let pairs = (a.batch * a.heads * n * n) as f64;
            let fwd_flops = 2.0 * pairs * (2 * a.d) as f64;
            let bwd_flops = 2.0 * pairs * (5 * a.d) as f64;
            let is_exact = m.name().starts_with("exact");
            let gflops = is_exact.then(|| fwd_flops / t.forward_ms / 1e6);
            let gflops_bwd = t
                .backward_ms
                .filter(|_| is_exact)
                .map(|b| (fwd_flops + bwd_flops) / (t.forward_ms + b) / 1e6);
            let params = crate::params_json(m);
            rows.push(vec![
                m.name().to_string(),
                n.to_string(),
                ms(t.forward_ms),
                t.backward_ms.map_or("-".into(), ms),
                t.backward_ms.map_or("-".into(), |b| ms(t.forward_ms + b)),
                speedup.map_or("-".into(), |s| format!("{s:.2}x")),
                gflops.map_or("-".into(), |g| format!("{g:.1}")),
                gflops_bwd.map_or("-".into(), |g| format!("{g:.1}")),
                mib(t.peak_extra_bytes),
            ]);
            results.push(json!({
                "method": m.name(), "spec": m.spec(), "params": params, "batch": a.batch, "heads": a.heads, "n": n,
                "d": a.d, "forward_ms": t.forward_ms, "backward_ms": t.backward_ms,
                "speedup_vs_exact": speedup, "peak_extra_bytes": t.peak_extra_bytes,
                "gflops_forward": gflops, "gflops_forward_backward": gflops_bwd,
            }));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    crate::say!(
        a.common.json,
        "batch={} heads={} d={} threads={} (median ms; peak = bytes allocated beyond the inputs)",
        a.batch,
        a.heads,
        a.d,
        rayon::current_num_threads()
    );
    crate::say!(
        a.common.json,
        "allocator: {}",
        if reuse {
            "freed memory kept for reuse (glibc mmap/trim thresholds raised), as in a long-running process"
        } else {
            "system default (freed large blocks go back to the OS; every call re-faults its outputs)"
        }
    );
    crate::say_raw!(
        a.common.json,
        "{}",
        table(
            &[
                "method",
                "n",
                "fwd ms",
                "bwd ms",
                "fwd+bwd ms",
                "speedup",
                "GFLOP/s fwd",
                "GFLOP/s f+b",
                "peak MiB"
            ],
            &rows
        )
    );
    a.common
        .json
        .write(&json!({ "allocator_keeps_freed_memory": reuse, "results": results }))?;
    Ok(())
}
