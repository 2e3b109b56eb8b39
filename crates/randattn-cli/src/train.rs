//! `randattn train`: one training run of the LRA model with any attention, into a folder.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use randattn_train::atomic::write_atomic;
use randattn_train::{Metric, Observer, RunConfig, Suite, Summary, train};
use serde_json::json;

use crate::console::progress;

#[derive(Args)]
pub struct TrainArgs {
    /// Task (its preset in the suite is the starting configuration).
    #[arg(long)]
    task: String,
    /// Suite whose preset of the task to start from: `lra` (the papers' sizes, configs/) or
    /// `lra-lite` (sized for a CPU, configs/lra-lite/).
    #[arg(long, default_value = "lra")]
    suite: String,
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
    #[arg(long, conflicts_with_all = ["config", "suite", "attention", "overrides", "seed", "steps", "batch", "eval_every"])]
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

/// Takes the run folder's lock (`<out>/.lock`, an exclusive `flock` held until the process
/// ends, even when it is killed): two processes never write one run — a resumed suite and a
/// run still going from before, say.
fn lock_run(out: &Path) -> Result<std::fs::File> {
    let path = out.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        let held = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if held != 0 {
            bail!(
                "{}: another randattn process is writing this run (it holds {}); wait for it \
                 or stop it",
                out.display(),
                path.display()
            );
        }
    }
    remove_debris(out);
    Ok(file)
}

/// Removes the temporary files a killed writer left in a run folder (ours end in `.tmp`; the
/// safetensors writer's start with `.tmp`). Called with the folder's lock held, so no live
/// writer owns them.
fn remove_debris(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if (name.starts_with(".tmp") || name.ends_with(".tmp"))
            && entry.file_type().is_ok_and(|t| t.is_file())
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let (config, _lock) = if a.resume {
        if !a.out.join("config.toml").exists() {
            bail!(
                "--resume: {} holds no run (no config.toml)",
                a.out.display()
            );
        }
        // A finished run has nothing to write: say so even where the folder is read-only.
        if a.out.join("summary.json").exists() {
            println!(
                "{}: the run is finished (summary.json); nothing to resume",
                a.out.display()
            );
            return Ok(());
        }
        let lock = lock_run(&a.out)?;
        let config = match resume_config(&a.out)? {
            None => {
                println!(
                    "{}: the run is finished (summary.json); nothing to resume",
                    a.out.display()
                );
                return Ok(());
            }
            Some(c) if c.task.name != a.task => bail!(
                "--resume: {} holds a {} run, not {}",
                a.out.display(),
                c.task.name,
                a.task
            ),
            Some(c) => {
                fits(&c)?;
                c
            }
        };
        (config, lock)
    } else {
        let text = match &a.config {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?,
            None => Suite::named(&a.suite)?.preset(&a.task)?.to_string(),
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
        fits(&config)?;
        std::fs::create_dir_all(&a.out)
            .with_context(|| format!("cannot create {}", a.out.display()))?;
        let lock = lock_run(&a.out)?;
        begin(&config, &a.out)?;
        (config, lock)
    };
    let s = execute(&config, &a.out, a.quiet)?;
    println!("{}", describe(&s));
    Ok(())
}

/// Refuses a run the machine's memory cannot hold, before anything is written or allocated.
fn fits(config: &RunConfig) -> Result<()> {
    randattn_cli::limits::check_memory(
        config.memory_estimate()?,
        &format!(
            "training {} with batch {} (width {}, {} layers)",
            config.task.name, config.train.batch, config.model.width, config.model.layers
        ),
    )
}

/// One line on a finished run.
pub fn describe(s: &Summary) -> String {
    format!(
        "{} with {} (seed {}): best dev {:.4} at step {}, test {:.4} (final weights {:.4}), \
         majority {:.4}; {:.1} ms/step, {:.0} s, {} parameters",
        s.task,
        s.attention,
        s.seed,
        s.best_dev_acc,
        s.best_step,
        s.test_acc,
        s.test_acc_final,
        s.majority_acc,
        s.step_ms,
        s.wall_s,
        s.params
    )
}

/// Starts a run in `out`: refuses a folder that already holds one, writes the resolved
/// `config.toml`.
pub fn begin(config: &RunConfig, out: &Path) -> Result<()> {
    if ["summary.json", "metrics.jsonl", "checkpoint.safetensors"]
        .iter()
        .any(|f| out.join(f).exists())
    {
        bail!(
            "{} already holds a run; choose another --out, or continue it with --resume",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let path = out.join("config.toml");
    write_atomic(&path, config.to_toml().as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The configuration of the interrupted run in `out`, with `metrics.jsonl` cut back to the
/// evaluations its checkpoint covers (later ones are redone); `None` when the run finished.
pub fn resume_config(out: &Path) -> Result<Option<RunConfig>> {
    if out.join("summary.json").exists() {
        return Ok(None);
    }
    let path = out.join("config.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("--resume: cannot read {}", path.display()))?;
    let config = RunConfig::parse(&text, &[])?;
    let checkpoint = out.join("checkpoint.safetensors");
    let done = if checkpoint.exists() {
        randattn_train::checkpoint::step_of(&checkpoint)?
    } else {
        0
    };
    let metrics = out.join("metrics.jsonl");
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
    write_atomic(&metrics, kept.concat().as_bytes())
        .with_context(|| format!("cannot write {}", metrics.display()))?;
    Ok(Some(config))
}

/// Trains the run whose `config.toml` is in `out` (from its checkpoint, if there is one) and
/// writes `metrics.jsonl`, the checkpoint and, last, `summary.json`.
pub fn execute(config: &RunConfig, out: &Path, quiet: bool) -> Result<Summary> {
    let task = config.task_spec()?;
    let attention = config.attention()?;
    // A training run is a long-running process: keep freed memory for reuse instead of mapping
    // every large activation afresh (measured: halves the step time at n = 2048).
    crate::alloc::keep_freed_memory();
    let metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("metrics.jsonl"))?;
    let steps = config.train.steps as u64;
    let mut watch = Watch {
        bar: {
            let bar = progress(steps, quiet);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix}{bar:30} step {pos}/{len} {elapsed} (eta {eta}) {msg}",
                )
                .expect("valid template"),
            );
            bar
        },
        metrics,
        last_dev: None,
        error: None,
    };
    let s = train(
        &task,
        config.model_config(&task),
        &attention,
        &config.train_config(),
        &mut watch,
        Some(&out.join("checkpoint.safetensors")),
    )?;
    watch.bar.finish_and_clear();
    if let Some(e) = watch.error {
        return Err(e).context("cannot write metrics.jsonl");
    }
    let summary = Summary {
        task: config.task.name.clone(),
        attention: attention.spec(),
        seed: config.train.seed,
        steps: config.train.steps,
        best_step: s.best_step,
        best_dev_acc: s.best_dev_acc,
        test_acc: s.test_acc,
        test_acc_final: s.test_acc_final,
        majority_acc: s.majority_acc,
        step_ms: s.step_ms,
        examples_per_s: s.examples_per_s,
        peak_rss_mib: peak_rss_mib(),
        wall_s: s.wall_s,
        params: s.params,
        test_examples: Some(s.test_examples),
        machine: Some(crate::machine::machine().describe()),
        finished_at: Some(crate::machine::now()),
    };
    // Written last, and atomically: its presence means the run finished.
    summary
        .write(&out.join("summary.json"))
        .context("cannot write summary.json")?;
    Ok(summary)
}
