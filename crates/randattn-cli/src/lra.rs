//! `randattn lra`: a suite of training runs (tasks × methods × seeds) — run what is missing,
//! print the `train` command of each missing run for other job runners, and collect finished
//! runs into the attention × task table.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use randattn::Method;
use randattn_tasks::Split;
use randattn_train::suite::{DEFAULT_METHODS, DEFAULT_SEEDS, run_state};
use randattn_train::{Collection, RunId, RunState, Suite, collect};
use serde_json::json;

use crate::{JsonArg, say};

#[derive(Subcommand)]
pub enum LraCommand {
    /// Run every (task, method, seed) of the suite not yet complete in --out (partial runs
    /// resume, finished ones are skipped), one `randattn train` process each.
    Run(SuiteArgs),
    /// Print one `randattn train` command line per run not yet complete in --out, for GNU
    /// parallel, a Slurm array or any batch system; `lra collect` reads the folders they fill.
    Plan(SuiteArgs),
    /// The attention × task table of the finished runs in DIR (test accuracy over seeds, chance
    /// and majority rows, average, step time and peak memory, take-off counts).
    Collect(CollectArgs),
}

#[derive(Args)]
pub struct SuiteArgs {
    /// The suite: `lra-lite` (sized for a CPU) or `lra` (the papers' sizes).
    #[arg(long)]
    suite: String,
    /// Tasks, comma-separated (default: all of the suite's).
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    /// Attention method specs, comma-separated (default: exact, yoso, yoso-e, skeinformer,
    /// nystrom, linformer, informer, performer, lara, vmean).
    #[arg(long)]
    methods: Option<String>,
    /// Seeds, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_SEEDS)]
    seeds: Vec<u64>,
    /// Change one value of every run's preset: section.key=value (repeatable; as `train
    /// --override`; e.g. train.steps=20 for a smoke run). Folders of runs made without the same
    /// overrides are reported as conflicts, never mixed in.
    #[arg(long = "override", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// The suite's folder: one `<task>/<method-spec>/seed-<s>/` per run.
    #[arg(long)]
    out: PathBuf,
    /// No progress bars (each run prints one line when it ends).
    #[arg(long)]
    quiet: bool,
    /// Runs trained at once (`lra run` only), each on its share of the cores (RAYON_NUM_THREADS
    /// = cores / jobs, unless set): a small model leaves cores idle, so two runs at a time on
    /// two cores finish a suite sooner. Results do not depend on the thread count.
    #[arg(long, default_value_t = 1, value_parser = crate::limits::size(256))]
    jobs: usize,
}

#[derive(Args)]
pub struct CollectArgs {
    /// Suite folders (several: merged, e.g. from different machines).
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    #[command(flatten)]
    json: JsonArg,
    /// Print the tables as Markdown (what the README holds).
    #[arg(long)]
    markdown: bool,
}

pub fn lra(cmd: LraCommand) -> Result<()> {
    match cmd {
        LraCommand::Run(a) => run(a),
        LraCommand::Plan(a) => plan(a),
        LraCommand::Collect(a) => collect_table(a),
    }
}

/// What to do about one run.
enum Todo {
    Start(Vec<String>),
    Resume(Vec<String>),
}

/// Where a suite stands in its folder.
struct Status {
    /// Runs not complete, each with the `train` arguments that do it.
    todo: Vec<(RunId, Todo)>,
    /// Runs already complete.
    complete: usize,
    /// Folders holding another configuration than the suite's (why, for each).
    conflicts: Vec<String>,
}

/// Where the suite of `a` stands in its folder.
fn status(a: &SuiteArgs) -> Result<Status> {
    let suite = Suite::named(&a.suite)?;
    for o in &a.overrides {
        let key = o.split('=').next().unwrap_or("").trim();
        if key == "model.attention" || key == "train.seed" || key == "task.name" {
            bail!("--override {key}: a suite sets it per run; use --methods, --seeds or --tasks");
        }
    }
    let methods = match &a.methods {
        Some(list) => Method::list_from_specs(list).context("--methods")?,
        None => Method::list_from_specs(&DEFAULT_METHODS.join(","))?,
    };
    let runs = suite.runs(&a.tasks, &methods, &a.seeds)?;
    let (mut todo, mut complete, mut conflicts) = (Vec::new(), 0, Vec::new());
    for run in runs {
        let dir = run.dir(&a.out);
        let out = dir.to_string_lossy().into_owned();
        match run_state(&dir, &suite.config(&run, &a.overrides)?) {
            RunState::Complete => complete += 1,
            RunState::Conflict(why) => conflicts.push(why),
            RunState::Partial => {
                let args = ["train", "--task", &run.task, "--out", &out, "--resume"];
                todo.push((run.clone(), Todo::Resume(strings(&args))));
            }
            RunState::Missing => {
                let seed = run.seed.to_string();
                let mut args = strings(&[
                    "train",
                    "--suite",
                    suite.name,
                    "--task",
                    &run.task,
                    "--attention",
                    &run.attention,
                    "--seed",
                    &seed,
                    "--out",
                    &out,
                ]);
                for o in &a.overrides {
                    args.push("--override".into());
                    args.push(o.clone());
                }
                todo.push((run.clone(), Todo::Start(args)));
            }
        }
    }
    Ok(Status {
        todo,
        complete,
        conflicts,
    })
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `arg` quoted for a POSIX shell where it needs it.
fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-+=:,./@%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn plan(a: SuiteArgs) -> Result<()> {
    let Status {
        todo,
        complete,
        conflicts,
    } = status(&a)?;
    for (_, t) in &todo {
        let (Todo::Start(args) | Todo::Resume(args)) = t;
        let mut line: Vec<String> = std::iter::once("randattn".to_string())
            .chain(args.iter().map(|s| shell_quote(s)))
            .collect();
        line.push("--quiet".into());
        println!("{}", line.join(" "));
    }
    eprintln!(
        "{} runs to do ({} to resume), {complete} complete, {} in conflict",
        todo.len(),
        todo.iter()
            .filter(|(_, t)| matches!(t, Todo::Resume(_)))
            .count(),
        conflicts.len()
    );
    for c in &conflicts {
        eprintln!("conflict: {c}");
    }
    if conflicts.is_empty() {
        Ok(())
    } else {
        bail!("{} run folders conflict with the suite", conflicts.len())
    }
}

/// The executable every run of the suite starts: this very binary. On Linux that is
/// `/proc/self/exe`, which names the running file even after it was replaced on disk (a
/// rebuild or an upgrade during a day-long suite: its path then reads "… (deleted)"), so a
/// suite's runs all use one build.
pub(crate) fn self_executable() -> Result<std::path::PathBuf> {
    let proc_exe = std::path::Path::new("/proc/self/exe");
    if cfg!(target_os = "linux") && proc_exe.exists() {
        return Ok(proc_exe.to_path_buf());
    }
    std::env::current_exe().context("cannot find the randattn executable")
}

/// Every task the suite still has to run gets one example drawn before the first run starts, so
/// a data set that is not installed (the real-data tasks read Debian packages) or a task setting
/// that cannot work is an error now, naming every such task, not hours later when its turn
/// comes.
fn check_task_data(a: &SuiteArgs, todo: &[(RunId, Todo)]) -> Result<()> {
    let suite = Suite::named(&a.suite)?;
    let mut seen = BTreeSet::new();
    let mut problems = Vec::new();
    for (run, _) in todo {
        if !seen.insert(run.task.as_str()) {
            continue;
        }
        let spec = suite.config(run, &a.overrides)?.task_spec()?;
        if let Err(e) = spec.examples(0, Split::Dev, 0..1) {
            problems.push(format!("\n  {}: {e}", run.task));
        }
    }
    if !problems.is_empty() {
        bail!(
            "{} of the suite's tasks cannot run (nothing was started):{}",
            problems.len(),
            problems.concat()
        );
    }
    Ok(())
}

fn run(a: SuiteArgs) -> Result<()> {
    let Status {
        todo,
        complete,
        conflicts,
    } = status(&a)?;
    for c in &conflicts {
        eprintln!("conflict (skipped): {c}");
    }
    check_task_data(&a, &todo)?;
    let exe = self_executable()?;
    let total = todo.len();
    eprintln!(
        "suite {}: {total} runs to do, {complete} already complete, into {}",
        a.suite,
        a.out.display()
    );
    // Each run's share of the cores, unless the user chose the threads: from the jobs asked
    // for, not those left, so that a run records the same threads whenever it was started.
    let threads = (a.jobs > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none())
        .then(|| (rayon::current_num_threads() / a.jobs).max(1));
    let jobs = a.jobs.min(total.max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(Vec::new());
    let started = std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some((run, t)) = todo.get(i) else {
                            return Ok(());
                        };
                        if !run_one(&a, &exe, run, t, i, total, threads)? {
                            failed
                                .lock()
                                .expect("no worker panics holding it")
                                .push(run.dir(&a.out));
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("a suite worker panicked")?;
        }
        Ok(())
    });
    started?;
    let mut failed = failed.into_inner().expect("no worker panics holding it");
    failed.sort();
    if !failed.is_empty() || !conflicts.is_empty() {
        let mut what = Vec::new();
        if !failed.is_empty() {
            what.push(format!(
                "{} runs failed (`randattn lra run` again retries them):{}",
                failed.len(),
                failed
                    .iter()
                    .map(|p| format!("\n  {}", p.display()))
                    .collect::<String>()
            ));
        }
        if !conflicts.is_empty() {
            what.push(format!(
                "{} run folders conflict with the suite and were skipped (each listed above with \
                 what to do)",
                conflicts.len()
            ));
        }
        bail!("{}", what.join("\n"));
    }
    eprintln!("suite {}: every run complete", a.suite);
    Ok(())
}

/// Trains one run of the suite in its own `randattn train` process (`threads`: its rayon
/// threads, `None` for the default) and waits for it; whether it succeeded.
fn run_one(
    a: &SuiteArgs,
    exe: &std::path::Path,
    run: &RunId,
    todo: &Todo,
    i: usize,
    total: usize,
    threads: Option<usize>,
) -> Result<bool> {
    let (verb, args) = match todo {
        Todo::Start(args) => ("start", args),
        Todo::Resume(args) => ("resume", args),
    };
    eprintln!(
        "[{}/{total}] {verb} {} with {}, seed {}",
        i + 1,
        run.task,
        run.attention,
        run.seed
    );
    // A process per run: its peak memory is its own, and a crash loses only that run.
    let mut cmd = Command::new(exe);
    cmd.args(args);
    if let Some(t) = threads {
        cmd.env("RAYON_NUM_THREADS", t.to_string());
    }
    // The run dies with the suite: a suite killed and started again never finds its old run
    // still writing (the run folder's lock would refuse it anyway).
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // `ps` and `pkill -f` see the runs under the suite's own name, not /proc/self/exe.
        cmd.arg0(
            std::env::args_os()
                .next()
                .unwrap_or_else(|| "randattn".into()),
        );
        let suite = std::process::id() as libc::pid_t;
        // SAFETY: prctl, getppid and _exit are async-signal-safe and touch no memory of the
        // parent. (The death signal follows the thread that starts the run; that thread waits
        // for the run, so it outlives it unless the whole suite dies.)
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // The suite died before the request took: the run must not outlive it.
                if libc::getppid() != suite {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    if a.quiet {
        cmd.arg("--quiet");
    }
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    if !status.success() {
        eprintln!(
            "[{}/{total}] failed ({status}): {} — the suite goes on",
            i + 1,
            run.dir(&a.out).display()
        );
    }
    Ok(status.success())
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

/// The accuracy table: one row per attention, one column per task, then the average.
fn accuracy_rows(c: &Collection) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for (name, rates) in [("chance", &c.chance), ("majority class", &c.majority)] {
        let mut row = vec![format!("*{name}*")];
        row.extend(
            c.tasks
                .iter()
                .map(|t| rates.get(t).map_or("—".into(), |r| pct(*r))),
        );
        let all: Vec<f64> = c
            .tasks
            .iter()
            .filter_map(|t| rates.get(t))
            .copied()
            .collect();
        row.push(pct(all.iter().sum::<f64>() / all.len().max(1) as f64));
        rows.push(row);
    }
    for a in &c.attentions {
        let mut row = vec![a.clone()];
        for t in &c.tasks {
            row.push(match c.cell(t, a) {
                None => "—".into(),
                Some(cell) => {
                    let spread = cell
                        .test_acc_std
                        .map_or(String::new(), |s| format!(" ± {}", pct(s)));
                    let seeds = match cell.took_off {
                        Some(k) => format!(" ({k}/{} up)", cell.seeds),
                        None => format!(" ({})", cell.seeds),
                    };
                    format!("{}{spread}{seeds}", pct(cell.test_acc_mean))
                }
            });
        }
        row.push(c.average.get(a).map_or("—".into(), |v| pct(*v)));
        rows.push(row);
    }
    rows
}

/// The cost table: per attention and task, the median step time and peak memory.
fn cost_rows(c: &Collection) -> Vec<Vec<String>> {
    c.attentions
        .iter()
        .map(|a| {
            let mut row = vec![a.clone()];
            for t in &c.tasks {
                row.push(c.cell(t, a).map_or("—".into(), |cell| {
                    let mem = cell
                        .peak_rss_mib
                        .map_or(String::new(), |m| format!(" · {m:.0} MiB"));
                    format!("{:.0} ms{mem}", cell.step_ms)
                }));
            }
            row
        })
        .collect()
}

fn markdown(header: &[String], rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n", header.join(" | "));
    out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    for r in rows {
        out.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    out
}

fn collect_table(a: CollectArgs) -> Result<()> {
    for d in &a.dirs {
        if !d.is_dir() {
            bail!("{} is not a folder", d.display());
        }
    }
    let c = collect(&a.dirs)?;
    if c.results.is_empty() {
        bail!(
            "no finished runs (`<task>/<method-spec>/seed-<s>/summary.json`) under {}",
            a.dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    a.json.write(&json!({
        "results": c.results, "chance": c.chance, "majority": c.majority, "average": c.average,
        "runs": c.runs, "wall_s_total": c.wall_s_total, "machines": c.machines,
    }))?;
    if a.json.to_stdout() && !a.markdown {
        return Ok(());
    }
    let mut acc_header = vec!["attention".to_string()];
    acc_header.extend(c.tasks.iter().cloned());
    acc_header.push("average".into());
    let mut cost_header = vec!["attention".to_string()];
    cost_header.extend(c.tasks.iter().map(|t| {
        let n = c
            .results
            .iter()
            .filter(|x| &x.task == t)
            .map(|x| x.seq_len)
            .max();
        format!("{t} (n = {})", n.unwrap_or(0))
    }));
    let (acc, cost) = (accuracy_rows(&c), cost_rows(&c));
    let legend = "Test accuracy (%) with the best-dev weights: mean ± sample standard deviation \
                  over seeds, (seeds); on pathfinder and recall (k/n up): k of n seeds rose \
                  above the majority class by more than 3 binomial standard errors.";
    let machines = if c.machines.is_empty() {
        "machines not recorded".to_string()
    } else {
        c.machines.join("; ")
    };
    let cost_legend = format!(
        "Median training step (batch of the task's preset) and peak resident memory of the run, \
         median over seeds. {} runs, {:.1} hours of wall time in all, on: {machines}.",
        c.runs,
        c.wall_s_total / 3600.0
    );
    if a.markdown {
        say!(
            a.json,
            "{}\n{legend}\n\n{}\n{cost_legend}",
            markdown(&acc_header, &acc),
            markdown(&cost_header, &cost)
        );
    } else {
        let h: Vec<&str> = acc_header.iter().map(String::as_str).collect();
        let hc: Vec<&str> = cost_header.iter().map(String::as_str).collect();
        say!(
            a.json,
            "{}{legend}\n\n{}{cost_legend}",
            crate::console::table(&h, &acc),
            crate::console::table(&hc, &cost)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_leaves_specs_alone_and_quotes_the_rest() {
        assert_eq!(
            shell_quote("performer:features=64"),
            "performer:features=64"
        );
        assert_eq!(shell_quote("runs/a b"), "'runs/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn markdown_tables_have_a_rule_per_column() {
        let t = markdown(&["a".into(), "b".into()], &[vec!["1".into(), "2".into()]]);
        assert_eq!(t, "| a | b |\n|---|---|\n| 1 | 2 |\n");
    }
}
