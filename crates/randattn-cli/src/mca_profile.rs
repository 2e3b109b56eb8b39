//! `randattn mca-profile`: what MCA saves and costs on one layer, α by α — relative output
//! error, FLOP fraction on real tokens (and padded, as the paper counts), the bound, and the
//! wall-clock of the sampled value projection against the exact GEMM projection.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use randattn::methods::exact::Exact;
use randattn::methods::mca::{Draws, Mca, Probs};
use randattn::workload::{Workload, clustered};
use randattn::{Attention, AttentionInputs, Dims, Estimator};
use serde_json::json;

use crate::alloc;
use crate::console::{median_ms, ms, progress, table};
use randattn_cli::npy;

#[derive(Args)]
pub struct McaProfileArgs {
    /// Values of α.
    #[arg(long, value_delimiter = ',', default_values_t = [0.1, 0.2, 0.3, 0.5, 1.0])]
    alphas: Vec<f32>,
    /// Sampling distribution: `weight` (the paper's) or `input-aware`.
    #[arg(long, default_value = "weight")]
    probs: Probs,
    /// Draws to profile: `token`, `shared` or both (comma-separated; shared needs probs=weight).
    #[arg(long, value_delimiter = ',', default_values = ["token", "shared"])]
    draws: Vec<Draws>,
    /// Seeds averaged for the error.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Queries [batch, heads, n, d] of a real layer (with --k, --x, --wv); default: the built-in
    /// clustered workload at n = 512, 12 heads of 32 (d_model = 384, MiniLM's sizes).
    #[arg(long, requires_all = ["k", "x", "wv"])]
    q: Option<PathBuf>,
    /// Keys [batch, heads, n, d].
    #[arg(long)]
    k: Option<PathBuf>,
    /// Layer input X [batch, n, d_model].
    #[arg(long)]
    x: Option<PathBuf>,
    /// W_V [d_model, heads·d_v].
    #[arg(long)]
    wv: Option<PathBuf>,
    /// b_V [heads·d_v].
    #[arg(long)]
    bv: Option<PathBuf>,
    /// Key-padding mask [batch, n] (1 keep); bool, uint8, int64 or float32.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Sequence length of the built-in workload.
    #[arg(long, default_value_t = 512, value_parser = randattn_cli::limits::size(randattn_cli::limits::MAX_N))]
    n: usize,
    #[command(flatten)]
    common: crate::ReportArgs,
}

/// A layer's tensors, owned.
struct Layer {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    x: Vec<f32>,
    wv: Vec<f32>,
    bv: Option<Vec<f32>>,
    mask: Option<Vec<bool>>,
    shape: [usize; 4],
    d_model: usize,
    source: String,
}

impl Layer {
    fn load(a: &McaProfileArgs) -> Result<Layer> {
        let (Some(qp), Some(kp), Some(xp), Some(wp)) = (&a.q, &a.k, &a.x, &a.wv) else {
            // Q, K, V, X (d_model = 384 = 12 × 32), the exact reference, the exact
            // projection and MCA's own needs (at its worst-case budgets).
            let dims = Dims {
                batch: 1,
                heads: 12,
                n_q: a.n,
                n_k: a.n,
                d: 32,
                d_v: 32,
            };
            randattn_cli::limits::check_methods(
                &[randattn::Method::from(Mca::default())],
                dims,
                Some(384),
                false,
                3,
                &format!("mca-profile at n {}", a.n),
            )?;
            let w: Workload = clustered(1, 12, a.n, 32, a.common.seed);
            let Dims {
                batch,
                heads,
                n_k,
                d,
                ..
            } = w.dims;
            return Ok(Layer {
                shape: [batch, heads, n_k, d],
                d_model: w.d_model,
                q: w.q,
                k: w.k,
                v: w.v,
                x: w.x,
                wv: w.wv,
                bv: Some(w.bv),
                mask: None,
                source: format!("built-in clustered workload, n={}", a.n),
            });
        };
        let (q, qs) = npy::read_f32(qp, 4, "q")?;
        let (k, ks) = npy::read_f32(kp, 4, "k")?;
        let (x, xs) = npy::read_f32(xp, 3, "x")?;
        let (wv, ws) = npy::read_f32(wp, 2, "wv")?;
        let bv =
            a.bv.as_ref()
                .map(|p| npy::read_f32(p, 1, "bv").map(|(b, _)| b))
                .transpose()?;
        let mask = a
            .mask
            .as_ref()
            .map(|p| npy::read_mask(p, "mask").map(|(m, _)| m))
            .transpose()?;
        if qs != ks || xs[0] != qs[0] || xs[1] != qs[2] || ws[0] != xs[2] {
            bail!(
                "shapes do not fit self-attention: q {qs:?}, k {ks:?}, x {xs:?}, wv {ws:?} \
                 (need q = k = [batch, heads, n, d], x = [batch, n, d_model], wv = [d_model, heads·d_v])"
            );
        }
        let heads = qs[1];
        if !ws[1].is_multiple_of(heads) {
            bail!("wv has {} columns, not a multiple of {heads} heads", ws[1]);
        }
        let shape = [qs[0], heads, qs[2], qs[3]];
        let v =
            randattn::inputs::project_values(&x, [xs[0], xs[1], xs[2]], &wv, bv.as_deref(), heads)?;
        let layer = Layer {
            q,
            k,
            v,
            x,
            wv,
            bv,
            mask,
            shape,
            d_model: xs[2],
            source: format!("{} and the matching k, x, wv", qp.display()),
        };
        Ok(layer)
    }

    fn inputs(&self) -> Result<AttentionInputs<'_>> {
        let [b, h, n, _] = self.shape;
        let d_v = self.wv.len() / self.d_model / h;
        let mut x = AttentionInputs::new(
            &self.q,
            self.shape,
            &self.k,
            self.shape,
            &self.v,
            [b, h, n, d_v],
        )?
        .with_value_projection(
            &self.x,
            [b, n, self.d_model],
            &self.wv,
            [self.d_model, h * d_v],
            self.bv.as_deref(),
        )?;
        if let Some(m) = &self.mask {
            x = x.with_key_mask(m)?;
        }
        Ok(x)
    }
}

pub fn mca_profile(a: McaProfileArgs) -> Result<()> {
    let reuse = alloc::keep_freed_memory();
    let probs = a.probs;
    if a.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let layer = Layer::load(&a)?;
    let x = layer.inputs()?;
    let dims = x.dims();
    let reference = Exact::default().forward(&x, 0)?.output;
    let budget = Duration::from_secs(1);
    let exact_ms = median_ms(5, budget, || Mca::exact_projection(&x));
    let mut rows = Vec::new();
    let mut results = Vec::new();
    let modes = a.draws.clone();
    let bar = progress((a.alphas.len() * modes.len()) as u64, a.common.quiet);
    for (&alpha, &draws) in a
        .alphas
        .iter()
        .flat_map(|al| modes.iter().map(move |m| (al, m)))
    {
        let mca = Mca {
            alpha,
            probs,
            draws,
            ..Mca::default()
        };
        mca.validate()?;
        let prep = mca.prepare(&layer.wv, layer.d_model, dims.heads, dims.d_v)?;
        let mut err = 0.0;
        let mut diag = None;
        for seed in 0..a.seeds {
            let (f, dg) = mca.forward_prepared(&x, &prep, a.common.seed + seed)?;
            err += randattn::linalg::relative_error(&f.output, &reference) / a.seeds as f64;
            diag = Some(dg);
        }
        let diag = diag.expect("at least one seed");
        let mean = |v: &[f32]| v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        let (frac, frac_padded) = (mean(&diag.flop_fraction), mean(&diag.flop_fraction_padded));
        let budgets_ms = median_ms(5, budget, || mca.budgets(&x, layer.d_model));
        let sampled_ms = median_ms(5, budget, || {
            mca.sample_values(&x, &prep, &diag.budgets, a.common.seed)
        });
        let exact_tokens = diag
            .budgets
            .iter()
            .filter(|r| **r as usize >= layer.d_model)
            .count() as f64
            / diag.budgets.len() as f64;
        let draws_name = draws.to_string();
        rows.push(vec![
            format!("{alpha}"),
            draws_name.clone(),
            format!("{err:.3}"),
            format!("{frac:.3}"),
            format!("{frac_padded:.3}"),
            format!("{:.0}%", 100.0 * exact_tokens),
            format!("{:.2}", mean(&diag.bound)),
            ms(sampled_ms),
            ms(exact_ms),
            format!("{:.2}x", exact_ms / sampled_ms),
            ms(budgets_ms),
        ]);
        results.push(json!({
            "alpha": alpha, "draws": draws_name, "rel_error": err, "flop_fraction": frac,
            "flop_fraction_padded": frac_padded, "exact_token_share": exact_tokens,
            "mean_bound": mean(&diag.bound), "sampled_projection_ms": sampled_ms,
            "exact_projection_ms": exact_ms, "budget_pass_ms": budgets_ms,
        }));
        bar.inc(1);
    }
    bar.finish_and_clear();
    crate::say!(
        a.common.json,
        "{}: batch={} heads={} n={} d={} d_model={} probs={} threads={}",
        layer.source,
        dims.batch,
        dims.heads,
        dims.n_k,
        dims.d,
        layer.d_model,
        a.probs,
        rayon::current_num_threads()
    );
    crate::say!(
        a.common.json,
        "rel_error of the attention output vs exact (mean of {} seeds); flops = mean r/d_model on \
         real tokens (padded: over all positions, as the paper counts); times are medians in ms: \
         the sampled value projection (given the budgets) vs the exact GEMM X·W_V + b_V, and the \
         extra pass over the attention that finds the budgets",
        a.seeds
    );
    crate::say_raw!(
        a.common.json,
        "{}",
        table(
            &[
                "alpha",
                "draws",
                "rel_error",
                "flops",
                "flops padded",
                "exact tokens",
                "bound",
                "sampled ms",
                "GEMM ms",
                "speed-up",
                "budget ms"
            ],
            &rows
        )
    );
    a.common.json.write(
        &json!({ "source": layer.source, "allocator_keeps_freed_memory": reuse,
                     "results": results }),
    )?;
    Ok(())
}
