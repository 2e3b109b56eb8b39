//! End-to-end tests of `randattn lra`: a suite runs what is missing and nothing twice, `plan`
//! prints the `train` commands that do the same runs, and `collect` builds the table (and
//! refuses what it cannot trust).

mod common;

use std::path::Path;
use std::process::Command;

use common::{TINY_RECALL, assert_fails, bin, stderr, summary_without_times as summary};

/// `randattn lra VERB` on the tiny recall suite with `methods` and `seeds` into `out`.
fn suite(verb: &str, out: &Path, methods: &str, seeds: &str) -> Command {
    let mut c = bin();
    c.args(["lra", verb, "--suite", "lra-lite", "--tasks", "recall"]);
    c.args(["--methods", methods, "--seeds", seeds, "--quiet"]);
    for o in TINY_RECALL
        .iter()
        .chain(&["train.steps=30", "train.eval_every=15"])
    {
        c.args(["--override", o]);
    }
    c.arg("--out").arg(out);
    c
}

fn collect_json(dirs: &[&Path]) -> serde_json::Value {
    let o = bin()
        .args(["lra", "collect"])
        .args(dirs)
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn a_suite_runs_what_is_missing_and_collect_tables_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("suite");
    let o = suite("run", &out, "exact,nystrom:landmarks=4", "0,1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for m in ["exact", "nystrom:landmarks=4"] {
        for s in [0, 1] {
            let run = out.join("recall").join(m).join(format!("seed-{s}"));
            for f in ["config.toml", "metrics.jsonl", "summary.json"] {
                assert!(run.join(f).exists(), "{} lacks {f}", run.display());
            }
        }
    }
    // Nothing left to do: a second run and the plan say so.
    let o = suite("run", &out, "exact,nystrom:landmarks=4", "0,1")
        .output()
        .unwrap();
    assert!(o.status.success() && stderr(&o).contains("0 runs to do, 4 already complete"));
    let o = suite("plan", &out, "exact,nystrom:landmarks=4", "0,1")
        .output()
        .unwrap();
    assert!(o.status.success() && o.stdout.is_empty(), "{}", stderr(&o));

    let table = collect_json(&[&out]);
    let results = table["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{table}");
    for (cell, attention) in results.iter().zip(["exact", "nystrom:landmarks=4"]) {
        assert_eq!(cell["task"], "recall");
        assert_eq!(cell["attention"], attention);
        assert_eq!(cell["seeds"], 2);
        let accs: Vec<f64> = [0, 1]
            .iter()
            .map(|s| {
                let p = out.join("recall").join(attention).join(format!("seed-{s}"));
                summary(&p)["test_acc"].as_f64().unwrap()
            })
            .collect();
        let mean = (accs[0] + accs[1]) / 2.0;
        assert!((cell["test_acc_mean"].as_f64().unwrap() - mean).abs() < 1e-12);
        // Two seeds: the sample standard deviation is |a − b| / √2.
        let std = (accs[0] - accs[1]).abs() / 2f64.sqrt();
        assert!((cell["test_acc_std"].as_f64().unwrap() - std).abs() < 1e-12);
        assert!(cell["took_off"].as_u64().unwrap() <= 2);
        // 4 fused pairs and the query.
        assert_eq!(cell["seq_len"], 5);
    }
    assert_eq!(table["chance"]["recall"], 0.25);
    assert_eq!(table["runs"], 4);
    let machines = table["machines"].as_array().unwrap();
    assert_eq!(machines.len(), 1, "{machines:?}");
    assert!(machines[0].as_str().unwrap().ends_with("threads"));
    assert!(table["majority"]["recall"].as_f64().unwrap() >= 0.25);
    let o = bin()
        .args(["lra", "collect", "--markdown"])
        .arg(&out)
        .output()
        .unwrap();
    let md = String::from_utf8_lossy(&o.stdout);
    assert!(md.contains("| attention | recall | average |"), "{md}");
    assert!(md.contains("| *chance* | 25.0 | 25.0 |"), "{md}");
    assert!(md.contains("| nystrom:landmarks=4 |"), "{md}");
}

#[test]
fn plan_prints_train_commands_that_do_the_same_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (planned, ran) = (dir.path().join("planned"), dir.path().join("ran"));
    // A run started and interrupted before its first checkpoint is planned as a resume.
    let o = suite("run", &ran, "exact", "5").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let partial = planned.join("recall").join("exact").join("seed-6");
    std::fs::create_dir_all(&partial).unwrap();
    let o = suite("plan", &planned, "exact", "5,6").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let plan = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = plan.lines().collect();
    assert_eq!(lines.len(), 2, "{plan}");
    assert!(
        lines[0].starts_with(
            "randattn train --suite lra-lite --task recall --attention exact --seed 5"
        )
    );
    // (An empty folder is a missing run; the second is a fresh start too.)
    assert!(lines[1].contains("--seed 6"), "{plan}");
    for line in &lines {
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        let o = bin().args(&args).output().unwrap();
        assert!(o.status.success(), "{line}: {}", stderr(&o));
    }
    let seed5 = |root: &Path| root.join("recall").join("exact").join("seed-5");
    assert_eq!(summary(&seed5(&planned)), summary(&seed5(&ran)));

    // A started run (config.toml, no summary) is resumed, not restarted.
    let resumed = dir.path().join("resumed");
    let run7 = resumed.join("recall").join("exact").join("seed-7");
    let o = suite("run", &resumed, "exact", "7").output().unwrap();
    assert!(o.status.success());
    std::fs::remove_file(run7.join("summary.json")).unwrap();
    let o = suite("plan", &resumed, "exact", "7").output().unwrap();
    let plan = String::from_utf8_lossy(&o.stdout);
    assert!(plan.contains("--resume --quiet"), "{plan}");
    assert!(stderr(&o).contains("1 runs to do (1 to resume)"));
    let o = suite("run", &resumed, "exact", "7").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(run7.join("summary.json").exists());
}

/// A suite whose real-data tasks cannot find their data says so for each of them before it
/// starts anything (not when each task's turn comes, hours into the suite).
#[test]
fn missing_data_stops_a_suite_before_its_first_run() {
    let dir = tempfile::tempdir().unwrap();
    let (out, empty) = (dir.path().join("s"), dir.path().join("nothing-here"));
    std::fs::create_dir(&empty).unwrap();
    let o = bin()
        .args(["lra", "run", "--suite", "lra-lite", "--tasks", "image,text"])
        .args([
            "--methods",
            "exact",
            "--seeds",
            "0",
            "--quiet",
            "--override",
        ])
        .arg(format!("task.params.dir={}", empty.display()))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_fails(o, "2 of the suite's tasks cannot run (nothing was started)");
    for needle in [
        "image: ",
        "apt-get install dataset-fashion-mnist",
        "text: ",
        "apt-get install fortunes",
    ] {
        assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
    }
    assert!(!out.join("image").exists() && !out.join("text").exists());
}

/// A folder holding a checkpoint without the configuration that made it is a conflict the
/// suite names (with what to do), not a run it starts, fails and "retries" forever.
#[test]
fn a_checkpoint_without_its_configuration_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    let run = out.join("recall").join("exact").join("seed-0");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("checkpoint.safetensors"), "not a checkpoint").unwrap();
    let o = suite("run", &out, "exact", "0").output().unwrap();
    let err = stderr(&o);
    assert_fails(o, "1 run folders conflict with the suite and were skipped");
    assert!(
        err.contains("has checkpoint.safetensors but no config.toml") && !err.contains("retries"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&run).unwrap().count(),
        1,
        "the folder was touched"
    );
}

#[test]
fn conflicts_bad_suites_and_untrustworthy_results_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    let o = suite("run", &out, "exact", "0").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // Other settings than the folder's run: a conflict, not a silent mix.
    let mut c = suite("plan", &out, "exact", "0");
    c.args(["--override", "train.lr=0.5"]);
    assert_fails(c.output().unwrap(), "holds a run with train.lr");
    let mut c = suite("run", &out, "exact", "0");
    c.args(["--override", "train.seed=3"]);
    assert_fails(c.output().unwrap(), "use --methods, --seeds or --tasks");
    let o = bin()
        .args(["lra", "plan", "--suite", "lra-huge", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_fails(o, "unknown suite `lra-huge`; suites: lra, lra-lite");
    let o = bin()
        .args([
            "lra", "plan", "--suite", "lra-lite", "--tasks", "imdb", "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert_fails(o, "no task `imdb`");
    let o = bin()
        .args([
            "lra",
            "plan",
            "--suite",
            "lra-lite",
            "--methods",
            "exakt",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert_fails(o, "exakt");

    // The same run in two merged folders would count twice.
    let copy = dir.path().join("copy");
    let run = out.join("recall").join("exact").join("seed-0");
    let twin = copy.join("recall").join("exact").join("seed-0");
    std::fs::create_dir_all(&twin).unwrap();
    for f in ["config.toml", "summary.json"] {
        std::fs::copy(run.join(f), twin.join(f)).unwrap();
    }
    let o = bin()
        .args(["lra", "collect"])
        .arg(&out)
        .arg(&copy)
        .output()
        .unwrap();
    assert_fails(o, "the same run (recall with exact, seed 0) is in");
    // A corrupt summary names its file.
    std::fs::write(twin.join("summary.json"), "{\"task\": \"recall\"").unwrap();
    let o = bin().args(["lra", "collect"]).arg(&copy).output().unwrap();
    assert_fails(o, "not a run summary");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = bin().args(["lra", "collect"]).arg(&empty).output().unwrap();
    assert_fails(o, "no finished runs");
}
