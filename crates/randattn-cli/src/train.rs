//! `randattn train`: one training run of the LRA model with any attention, into a folder.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use randattn_train::{Metric, Observer, RunConfig, train};
use serde_json::json;

use crate::report::progress;

#[derive(Args)]
pub struct TrainArgs {
    /// Task (its preset in configs/ is the starting configuration).
    #[arg(long)]
    task: String,
    /// A TOML configuration instead of the task's preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Attention method spec (same as --override model.attention=SPEC).
    #[arg(long)]
    attention: Option<String>,
    /// Change one value: section.key=value (repeatable; task.params.KEY for task parameters).
    #[arg(long = "override", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Seed (same as --override train.seed=S).
    #[arg(long)]
    seed: Option<u64>,
    /// Steps (same as --override train.steps=N).
    #[arg(long)]
    steps: Option<usize>,
    /// Batch size (same as --override train.batch=B).
    #[arg(long)]
    batch: Option<usize>,
    /// Steps between evaluations (same as --override train.eval_every=K).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Output folder: config.toml, metrics.jsonl, checkpoint.safetensors, summary.json.
    #[arg(long)]
    out: PathBuf,
    /// Continue the interrupted run in --out (from its config.toml and last checkpoint).
    #[arg(long, conflicts_with_all = ["config", "attention", "overrides", "seed", "steps", "batch", "eval_every"])]
    resume: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Progress on a terminal and one JSON line per evaluation.
struct Watch {
    bar: indicatif::ProgressBar,
    metrics: std::fs::File,
    last_dev: Option<f64>,
    error: Option<std::io::Error>,
}

impl Observer for Watch {
    fn step(&mut self, done: usize, loss: f64) {
        self.bar.set_position(done as u64);
        let dev = self
            .last_dev
            .map_or_else(String::new, |a| format!(" dev acc {a:.3}"));
        self.bar.set_message(format!("loss {loss:.3}{dev}"));
    }

    fn eval(&mut self, m: &Metric) {
        self.last_dev = Some(m.dev_acc);
        let line = json!({
            "step": m.step, "train_loss": m.train_loss, "train_acc": m.train_acc,
            "dev_loss": m.dev_loss, "dev_acc": m.dev_acc, "lr": m.lr,
            "elapsed_s": m.elapsed_s, "examples_per_s": m.examples_per_s,
        });
        if let Err(e) = writeln!(self.metrics, "{line}") {
            self.error.get_or_insert(e);
        }
    }
}

/// Peak resident memory in MiB (Linux `VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn run(a: TrainArgs) -> Result<()> {
    let checkpoint = a.out.join("checkpoint.safetensors");
    let config = if a.resume {
        if a.out.join("summary.json").exists() {
            println!(
                "{}: the run is finished (summary.json); nothing to resume",
                a.out.display()
            );
            return Ok(());
        }
        let path = a.out.join("config.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("--resume: cannot read {}", path.display()))?;
        let config = RunConfig::parse(&text, &[])?;
        if config.task.name != a.task {
            bail!(
                "--resume: {} holds a {} run, not {}",
                a.out.display(),
                config.task.name,
                a.task
            );
        }
        // Keep the evaluations the checkpoint covers; later ones are redone.
        let done = if checkpoint.exists() {
            randattn_train::checkpoint::step_of(&checkpoint)?
        } else {
            0
        };
        let metrics = a.out.join("metrics.jsonl");
        let kept: Vec<String> = std::fs::read_to_string(&metrics)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= done)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&metrics, kept.concat())?;
        config
    } else {
        let text = match &a.config {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?,
            None => RunConfig::preset(&a.task)?,
        };
        let mut overrides = vec![format!("task.name={}", a.task)];
        if let Some(s) = &a.attention {
            overrides.push(format!("model.attention=\"{s}\""));
        }
        for (key, value) in [
            ("train.seed", a.seed.map(|v| v.to_string())),
            ("train.steps", a.steps.map(|v| v.to_string())),
            ("train.batch", a.batch.map(|v| v.to_string())),
            ("train.eval_every", a.eval_every.map(|v| v.to_string())),
        ] {
            if let Some(v) = value {
                overrides.push(format!("{key}={v}"));
            }
        }
        overrides.extend(a.overrides.iter().cloned());
        let config = RunConfig::parse(&text, &overrides)?;
        if ["summary.json", "metrics.jsonl", "checkpoint.safetensors"]
            .iter()
            .any(|f| a.out.join(f).exists())
        {
            bail!(
                "{} already holds a run; choose another --out, or continue it with --resume",
                a.out.display()
            );
        }
        std::fs::create_dir_all(&a.out)
            .with_context(|| format!("cannot create {}", a.out.display()))?;
        std::fs::write(a.out.join("config.toml"), config.to_toml())?;
        config
    };
    let task = config.task_spec()?;
    let attention = config.attention()?;
    // A training run is a long-running process: keep freed memory for reuse instead of mapping
    // every large activation afresh (measured: halves the step time at n = 2048).
    crate::alloc::keep_freed_memory();
    let metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(a.out.join("metrics.jsonl"))?;
    let steps = config.train.steps as u64;
    let mut watch = Watch {
        bar: {
            let bar = progress(steps, a.quiet);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len} {elapsed} (eta {eta}) {msg}",
                )
                .expect("valid template"),
            );
            bar
        },
        metrics,
        last_dev: None,
        error: None,
    };
    let started = Instant::now();
    let s = train(
        &task,
        config.model_config(&task),
        &attention,
        &config.train_config(),
        &mut watch,
        Some(&checkpoint),
    )?;
    watch.bar.finish_and_clear();
    if let Some(e) = watch.error {
        return Err(e).context("cannot write metrics.jsonl");
    }
    let summary = json!({
        "task": config.task.name, "attention": attention.spec(), "seed": config.train.seed,
        "steps": config.train.steps, "best_step": s.best_step, "best_dev_acc": s.best_dev_acc,
        "test_acc": s.test_acc, "test_acc_final": s.test_acc_final,
        "majority_acc": s.majority_acc, "step_ms": s.step_ms,
        "examples_per_s": s.examples_per_s, "peak_rss_mib": peak_rss_mib(),
        "wall_s": started.elapsed().as_secs_f64(), "params": s.params,
    });
    // Written last, and atomically: its presence means the run finished.
    let tmp = a.out.join("summary.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&summary)? + "\n")?;
    std::fs::rename(&tmp, a.out.join("summary.json"))?;
    println!(
        "{} with {}: best dev {:.4} at step {}, test {:.4} (final weights {:.4}), majority {:.4}; \
         {:.1} ms/step, {} parameters",
        config.task.name,
        attention.spec(),
        s.best_dev_acc,
        s.best_step,
        s.test_acc,
        s.test_acc_final,
        s.majority_acc,
        s.step_ms,
        s.params
    );
    Ok(())
}
