//! Helpers shared by the binary's end-to-end tests.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// The `randattn` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_randattn"))
}

/// Its standard error, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts that the command failed with exit code 2 and a message containing `needle`.
pub fn assert_fails(o: Output, needle: &str) {
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "exit code; stderr: {err}");
    assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
}

/// Overrides that shrink a recall run to a fraction of a second: 4 pairs, width 16, a few
/// hundred examples.
pub const TINY_RECALL: [&str; 9] = [
    "task.params.pairs=4",
    "task.params.keys=8",
    "task.params.values=4",
    "model.width=16",
    "model.ffn=32",
    "model.classifier_hidden=16",
    "train.train_examples=256",
    "train.test_examples=64",
    "train.eval_batches=2",
];

/// A tiny recall training run into `out` (fast enough for a test).
pub fn tiny_train_steps(out: &Path, seed: &str, steps: &str, eval_every: &str) -> Command {
    let mut c = bin();
    c.args(["train", "--task", "recall", "--quiet", "--seed", seed]);
    c.args(["--steps", steps, "--eval-every", eval_every]);
    c.args(["--attention", "nystrom:landmarks=4"]);
    for o in TINY_RECALL
        .iter()
        .chain(&["train.lr=3e-3", "train.warmup=4"])
    {
        c.args(["--override", o]);
    }
    c.arg("--out").arg(out);
    c
}

/// A run's `metrics.jsonl` without the wall-time fields (the rest is reproducible).
pub fn metrics_without_times(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| !["elapsed_s", "examples_per_s"].contains(&k.as_str()));
            v
        })
        .collect()
}

/// A run's `summary.json` without the wall-time and memory fields (the rest is reproducible).
pub fn summary_without_times(dir: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    for k in [
        "wall_s",
        "step_ms",
        "examples_per_s",
        "peak_rss_mib",
        "finished_at",
    ] {
        v.as_object_mut().unwrap().remove(k);
    }
    v
}
