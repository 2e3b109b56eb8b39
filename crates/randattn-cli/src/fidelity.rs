//! `randattn fidelity`: every softmax-approximating method swapped into every layer of the
//! pretrained MiniLM — how far its sentence embeddings and attention outputs move, and its time.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use randattn::Method;
use randattn_nn::model::{DEFAULT_MAX_LEN, SentenceEmbedder, cache_dir};
use serde_json::json;

use crate::console::{progress, table};

/// The built-in corpus: six paragraphs written for this project (about 200 tokens each, near
/// the model card's 256-token maximum, so attention is non-trivial).
const CORPUS: &str = include_str!("corpus.txt");

#[derive(Args)]
pub struct FidelityArgs {
    /// Methods, comma-separated, each optionally with settings: `performer:features=64`,
    /// `mca:alpha=0.3:draws=shared`; `all` = every softmax-approximating method with defaults.
    #[arg(long, default_value = "all")]
    methods: String,
    /// Text file, one input per line (default: the built-in corpus).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Maximum tokens per input (256 = the model card's; at most 512).
    #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
    max_len: usize,
    /// Seeds averaged per method.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    #[command(flatten)]
    json: crate::JsonArg,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn fidelity(a: FidelityArgs) -> Result<()> {
    if a.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let text = match &a.corpus {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?
        }
        None => CORPUS.to_string(),
    };
    let inputs: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if inputs.is_empty() {
        bail!("the corpus has no non-empty lines");
    }
    let mut skipped = Vec::new();
    let methods: Vec<Method> = if a.methods.trim() == "all" {
        Method::catalog()
            .iter()
            .filter(|m| !m.name.starts_with("exact"))
            .filter_map(|m| {
                if m.approximates_softmax {
                    Some(Method::from_name(m.name))
                } else {
                    skipped.push(m.name);
                    None
                }
            })
            .collect::<randattn::Result<_>>()?
    } else {
        Method::list_from_specs(&a.methods).context("--methods")?
    };
    for m in &methods {
        if !m.info().approximates_softmax {
            bail!(
                "{} computes a different kernel than softmax (models are trained with it); \
                 swapping it into a softmax-trained model measures nothing",
                m.name()
            );
        }
    }
    let mut embedder =
        SentenceEmbedder::load(&cache_dir(), Method::from_name("exact")?, a.max_len)?;
    let token_ids: Vec<Vec<u32>> = inputs
        .iter()
        .map(|s| embedder.tokenize(s))
        .collect::<Result<_, _>>()?;
    let tokens: Vec<usize> = token_ids.iter().map(Vec::len).collect();
    // The exact reference.
    let started = Instant::now();
    let reference: Vec<_> = token_ids
        .iter()
        .map(|ids| embedder.embed_ids(ids, 0))
        .collect::<Result<_, _>>()?;
    let exact_s = started.elapsed().as_secs_f64();
    let layers = reference[0].traces.len();
    let mut rows = vec![vec![
        "exact".to_string(),
        "1.00000".to_string(),
        "1.00000".to_string(),
        "0".to_string(),
        format!("{exact_s:.2}"),
        "1.00x".to_string(),
        "scale=auto".to_string(),
    ]];
    let mut results = Vec::new();
    let bar = progress(methods.len() as u64, a.quiet);
    for m in &methods {
        bar.set_message(m.name().to_string());
        embedder.model.set_method(m);
        let (mut cos_sum, mut cos_min, mut secs) = (0.0f64, f64::INFINITY, 0.0f64);
        let mut layer_err = vec![0.0f64; layers];
        let mut flops: Option<f64> = None;
        for seed in 0..a.seeds {
            let started = Instant::now();
            let outs: Vec<_> = token_ids
                .iter()
                .map(|ids| embedder.embed_ids(ids, seed))
                .collect::<Result<_, _>>()?;
            secs += started.elapsed().as_secs_f64() / a.seeds as f64;
            for (o, r) in outs.iter().zip(&reference) {
                let c = randattn::linalg::cosine(&o.embedding, &r.embedding);
                cos_sum += c;
                cos_min = cos_min.min(c);
                for (l, (t, rt)) in o.traces.iter().zip(&r.traces).enumerate() {
                    if let Some(f) = t.flop_fraction {
                        *flops.get_or_insert(0.0) +=
                            f / (a.seeds as f64 * inputs.len() as f64 * layers as f64);
                    }
                    let got = t.heads_output.flatten_all()?.to_vec1::<f32>()?;
                    let want = rt.heads_output.flatten_all()?.to_vec1::<f32>()?;
                    layer_err[l] += randattn::linalg::relative_error(&got, &want)
                        / (a.seeds as f64 * inputs.len() as f64);
                }
            }
        }
        let cos_mean = cos_sum / (a.seeds as f64 * inputs.len() as f64);
        let mut params: Vec<String> = m.params().iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(f) = flops {
            params.push(format!("(flops {f:.3})"));
        }
        rows.push(vec![
            m.name().to_string(),
            format!("{cos_mean:.5}"),
            format!("{cos_min:.5}"),
            layer_err
                .iter()
                .map(|e| format!("{e:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            format!("{secs:.2}"),
            format!("{:.2}x", exact_s / secs),
            params.join(" "),
        ]);
        let pmap = crate::params_json(m);
        results.push(json!({
            "method": m.name(), "spec": m.spec(), "params": pmap, "cosine_mean": cos_mean, "cosine_min": cos_min,
            "layer_rel_error": layer_err, "seconds": secs, "exact_seconds": exact_s,
            "mca_flop_fraction": flops,
        }));
        bar.inc(1);
    }
    bar.finish_and_clear();
    crate::say!(
        a.json,
        "all-MiniLM-L6-v2, every layer's attention swapped; {} inputs of {}–{} tokens (max {}), \
         {} seed(s), threads={}",
        inputs.len(),
        tokens.iter().min().unwrap_or(&0),
        tokens.iter().max().unwrap_or(&0),
        a.max_len,
        a.seeds,
        rayon::current_num_threads()
    );
    crate::say!(
        a.json,
        "cosine of sentence embeddings vs exact (mean, min); per-layer relative error of the \
         attention output (layers 0..{}, errors propagate); seconds to embed the corpus",
        layers - 1
    );
    crate::say_raw!(
        a.json,
        "{}",
        table(
            &[
                "method",
                "cos mean",
                "cos min",
                "layer rel. error",
                "seconds",
                "speed",
                "params"
            ],
            &rows
        )
    );
    if !skipped.is_empty() {
        crate::say!(
            a.json,
            "not run: {} — a different kernel than softmax (LSH collision probability); a model \
             must be trained with it, so swapping it into this softmax-trained model measures nothing",
            skipped.join(", ")
        );
    }
    a.json.write(
        &json!({ "model": "all-MiniLM-L6-v2", "tokens": tokens, "seeds": a.seeds,
                     "results": results }),
    )?;
    Ok(())
}
