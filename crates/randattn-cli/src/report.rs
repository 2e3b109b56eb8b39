//! `randattn report`: an offline HTML page of charts (`DIR/index.html`, each chart also as
//! `DIR/<chart>.svg`) from the JSON the other commands write and training runs' metrics — and,
//! with `--quick` or when given nothing, from a small sweep it runs itself with those very
//! commands, their JSON kept in `DIR/data/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;
use randattn_report::Source;
use randattn_report::page::PageInfo;
use randattn_train::RunConfig;
use randattn_train::atomic::write_atomic;

use crate::console::progress;

#[derive(Args)]
pub struct ReportCmdArgs {
    /// A JSON output of `compare`, `bench`, `fidelity`, `mca-profile` or `lra collect` (or a
    /// PyTorch peer script's in `bench`'s format), a finished run's `metrics.jsonl`, or a folder
    /// searched for them; a folder of training runs (an `lra run` output) also gives the LRA
    /// matrix. Repeatable.
    #[arg(long = "from", value_name = "FILE_OR_DIR")]
    from: Vec<PathBuf>,
    /// Also run the built-in sweep (a few minutes): error vs budget on the clustered workload and
    /// a real MiniLM layer, time and memory vs n with backward, MCA's profile, and the
    /// pretrained model's fidelity when the model is present. The default when no --from is
    /// given.
    #[arg(long)]
    quick: bool,
    /// The real layer of the sweep's error-vs-budget chart: PREFIX-q/-k/-v.npy (as `compare
    /// --layer`) [default: fixtures/minilm/layer5 when it exists].
    #[arg(long, value_name = "PREFIX")]
    layer: Option<PathBuf>,
    /// Output folder: index.html, one .svg per chart, data/ with the sweep's JSON.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// The budgets the sweep gives a method's budget parameter.
fn sweep_budgets(param: &str) -> &'static [u32] {
    match param {
        "samples" => &[1, 2, 4, 8, 16],
        "factor" => &[1, 2, 3, 5, 8],
        _ => &[16, 32, 64, 128, 256],
    }
}

/// Method specs of the error-vs-budget sweep: exact, every method with a budget at each budget,
/// and the V-Mean floor.
fn sweep_methods() -> String {
    let mut specs = vec!["exact".to_string()];
    for m in randattn::Method::catalog() {
        if let Some(p) = m.budget {
            specs.extend(
                sweep_budgets(p)
                    .iter()
                    .map(|b| format!("{}:{p}={b}", m.name)),
            );
        }
    }
    specs.push("vmean".into());
    specs.join(",")
}

/// One command of the sweep: what it shows, and its arguments (`--json FILE --quiet` added).
struct Step {
    what: String,
    args: Vec<String>,
    json: PathBuf,
}

fn sweep(data: &Path, layer: Option<&Path>, notes: &mut Vec<String>) -> Vec<Step> {
    let methods = sweep_methods();
    let mut steps = Vec::new();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    for seed in 0..3 {
        steps.push(Step {
            what: format!("error vs budget, clustered workload, seed {seed}"),
            args: s(&[
                "compare",
                "--n",
                "1024",
                "--heads",
                "4",
                "--d",
                "64",
                "--methods",
            ])
            .into_iter()
            .chain([methods.clone(), "--seed".into(), seed.to_string()])
            .collect(),
            json: data.join(format!("compare-clustered-seed{seed}.json")),
        });
    }
    match layer {
        Some(l) => {
            for seed in 0..3 {
                steps.push(Step {
                    what: format!("error vs budget, layer {}, seed {seed}", l.display()),
                    args: vec![
                        "compare".into(),
                        "--layer".into(),
                        l.display().to_string(),
                        "--methods".into(),
                        methods.clone(),
                        "--seed".into(),
                        seed.to_string(),
                    ],
                    json: data.join(format!("compare-layer-seed{seed}.json")),
                });
            }
        }
        None => notes.push(
            "No real layer for the error-vs-budget sweep (fixtures/minilm/layer5 not found \
             here; give one with --layer PREFIX)."
                .into(),
        ),
    }
    steps.push(Step {
        what: "time and memory vs n, forward and backward".into(),
        args: s(&[
            "bench",
            "--n",
            "256,512,1024,2048,4096",
            "--heads",
            "4",
            "--d",
            "64",
            "--backward",
            "--repeats",
            "3",
        ]),
        json: data.join("bench.json"),
    });
    steps.push(Step {
        what: "MCA's profile".into(),
        args: s(&["mca-profile", "--seeds", "2"]),
        json: data.join("mca-profile.json"),
    });
    if randattn_nn::verify(&randattn_nn::cache_dir()).is_ok() {
        steps.push(Step {
            what: "fidelity on the pretrained MiniLM".into(),
            args: s(&["fidelity", "--seeds", "1", "--max-len", "128"]),
            json: data.join("fidelity.json"),
        });
    } else {
        notes.push(
            "The pretrained model is not here, so the fidelity charts are left out (`randattn \
             model fetch` gets it)."
                .into(),
        );
    }
    steps
}

/// Runs the sweep's steps, each as a process of this very binary.
fn run_sweep(steps: &[Step], quiet: bool) -> Result<()> {
    let exe = crate::lra::self_executable()?;
    let bar = progress(steps.len() as u64, quiet);
    for st in steps {
        bar.set_message(st.what.clone());
        let out = Command::new(&exe)
            .args(&st.args)
            .arg("--json")
            .arg(&st.json)
            .arg("--quiet")
            .output()
            .with_context(|| format!("cannot run the sweep step: {}", st.what))?;
        if !out.status.success() {
            bail!(
                "sweep step `{}` failed ({}): {}",
                st.args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Everything the sources found so far, and what was passed over.
#[derive(Default)]
struct Found {
    sources: Vec<Source>,
    skipped: Vec<String>,
    run_roots: Vec<PathBuf>,
}

/// A finished training run in `dir` (`summary.json` beside `metrics.jsonl`): its metrics.
fn training_run(dir: &Path) -> Result<Source> {
    let metrics = dir.join("metrics.jsonl");
    let config = RunConfig::parse(
        &std::fs::read_to_string(dir.join("config.toml"))
            .with_context(|| format!("cannot read {}/config.toml", dir.display()))?,
        &[],
    )
    .map_err(|e| anyhow::anyhow!("{}/config.toml: {e}", dir.display()))?;
    let text = std::fs::read_to_string(&metrics)
        .with_context(|| format!("cannot read {}", metrics.display()))?;
    Ok(randattn_report::parse_metrics(
        &metrics.display().to_string(),
        &text,
        &config.task.name,
        &config.model.attention,
        config.train.seed,
    )?)
}

/// Adds the file at `path`: an error when the user named it, a note when a folder held it.
fn add_file(path: &Path, named: bool, found: &mut Found) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let result = if name == "metrics.jsonl" {
        let dir = path.parent().unwrap_or(Path::new("."));
        if !dir.join("summary.json").exists() {
            if named {
                bail!(
                    "{}: the run has not finished (no summary.json beside it)",
                    path.display()
                );
            }
            return Ok(());
        }
        // A run of a suite (`<root>/<task>/<method>/seed-<s>`): its suite goes into the matrix.
        let in_suite = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("seed-"));
        if let Some(root) = dir.ancestors().nth(3).filter(|_| in_suite) {
            let root = root.to_path_buf();
            if !found.run_roots.iter().any(|r| same_file(r, &root)) {
                found.run_roots.push(root);
            }
        }
        training_run(dir)
    } else if name.ends_with(".json") {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        randattn_report::parse_json(&path.display().to_string(), &text).map_err(Into::into)
    } else if named {
        bail!(
            "{}: give a .json output of randattn, a metrics.jsonl or a folder",
            path.display()
        )
    } else {
        return Ok(());
    };
    match result {
        Ok(s) => found.sources.push(s),
        Err(e) if named => return Err(e),
        Err(_) if name == "summary.json" || name == "manifest.json" => {}
        Err(e) => found.skipped.push(format!("{e:#}")),
    }
    Ok(())
}

/// Whether `a` and `b` name one existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Walks `dir` (hidden folders, `target` and `skip` left out).
fn add_dir(dir: &Path, skip: &Path, found: &mut Found) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || name == "target" || same_file(&p, skip) {
            continue;
        }
        if p.is_dir() {
            add_dir(&p, skip, found)?;
        } else {
            add_file(&p, false, found)?;
        }
    }
    Ok(())
}

pub fn report(a: ReportCmdArgs) -> Result<()> {
    let mut found = Found::default();
    // The matrix this report derives from training runs is written to data/lra-collect.json;
    // a --from folder that holds the output folder must not read an earlier copy of it back.
    let own = a.out.join("data").join("lra-collect.json");
    for f in &a.from {
        if f.is_dir() {
            add_dir(f, &own, &mut found)?;
        } else if f.exists() {
            add_file(f, true, &mut found)?;
        } else {
            bail!("--from {}: no such file or folder", f.display());
        }
    }
    let data = a.out.join("data");
    std::fs::create_dir_all(&data)
        .with_context(|| format!("cannot create the output folder {}", data.display()))?;
    let mut notes = Vec::new();
    // A suite's runs: the matrix `lra collect` prints, kept as data/ JSON like any source.
    if !found.run_roots.is_empty() {
        let c = randattn_train::collect(&found.run_roots).map_err(|e| anyhow::anyhow!("{e}"))?;
        // The collection as `lra collect --json` writes it, with a `meta` naming the folders.
        let mut value = serde_json::to_value(&c)?;
        let roots: Vec<String> = found
            .run_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        value["meta"] = serde_json::json!({
            "command": format!("randattn lra collect {}", roots.join(" ")),
            "version": env!("CARGO_PKG_VERSION"),
        });
        let path = data.join("lra-collect.json");
        let text = serde_json::to_string_pretty(&value)? + "\n";
        write_atomic(&path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        found.sources.push(randattn_report::parse_json(
            &path.display().to_string(),
            &text,
        )?);
    }
    if a.quick || a.from.is_empty() {
        let layer = a.layer.clone().or_else(|| {
            let default = PathBuf::from("fixtures/minilm/layer5");
            Path::new("fixtures/minilm/layer5-q.npy")
                .exists()
                .then_some(default)
        });
        let steps = sweep(&data, layer.as_deref(), &mut notes);
        run_sweep(&steps, a.quiet)?;
        for st in &steps {
            add_file(&st.json, true, &mut found)?;
        }
    }
    if !found.skipped.is_empty() {
        notes.push(format!(
            "{} file(s) in the given folders are not randattn outputs and were passed over.",
            found.skipped.len()
        ));
    }
    let charts = randattn_report::build(&found.sources)?;
    if charts.is_empty() {
        bail!(
            "nothing to chart in {} source file(s): give outputs of `compare`, `bench`, \
             `fidelity`, `mca-profile`, `lra collect` or training runs (or --quick)",
            found.sources.len()
        );
    }
    let info = PageInfo {
        generated_at: crate::machine::now(),
        command: format!(
            "randattn {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        version: env!("CARGO_PKG_VERSION").into(),
        notes,
    };
    for c in &charts {
        let path = a.out.join(format!("{}.svg", c.id));
        write_atomic(&path, c.svg.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let index = a.out.join("index.html");
    let html = randattn_report::page::html(&charts, &found.sources, &info);
    write_atomic(&index, html.as_bytes())
        .with_context(|| format!("cannot write {}", index.display()))?;
    println!(
        "{}: {} charts from {} source file(s)",
        index.display(),
        charts.len(),
        found.sources.len()
    );
    for n in &info.notes {
        println!("note: {n}");
    }
    Ok(())
}
