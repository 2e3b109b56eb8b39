//! A full disk and a read-only output folder: clear errors (exit code 2), earlier results left
//! intact, and — once there is room again — a run that resumes to the figures it would have had.
//!
//! The test needs a small file system of its own: it re-runs itself inside a private mount
//! namespace (`unshare --map-root-user --mount`, no privileges needed where unprivileged user
//! namespaces are allowed, as on Debian and Ubuntu) and mounts a 2 MiB tmpfs there. Where
//! namespaces are not allowed it says so and checks nothing.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::{
    assert_fails, bin, metrics_without_times, stderr, summary_without_times, tiny_train_steps,
};

const INSIDE: &str = "RANDATTN_TEST_IN_NAMESPACE";

fn mount(args: &[&str]) {
    let o = Command::new("mount").args(args).output().unwrap();
    assert!(o.status.success(), "mount {args:?}: {}", stderr(&o));
}

/// Fills the file system of `dir` up to `spare` bytes, with the file `dir/filler`.
fn fill(dir: &Path, spare: u64) {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    drop(f);
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len.saturating_sub(spare)).unwrap();
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn a_full_disk_or_a_read_only_folder_is_a_clear_error_and_loses_nothing() {
    if std::env::var_os(INSIDE).is_none() {
        let me = std::env::current_exe().unwrap();
        let o = Command::new("unshare")
            .args(["--map-root-user", "--mount", "--"])
            .arg(&me)
            .args([
                "--exact",
                "a_full_disk_or_a_read_only_folder_is_a_clear_error_and_loses_nothing",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(INSIDE, "1")
            .output();
        match o {
            Ok(o) if o.status.success() => {
                assert!(
                    String::from_utf8_lossy(&o.stdout).contains("1 passed"),
                    "the test did not run inside the namespace: {}",
                    String::from_utf8_lossy(&o.stdout)
                );
            }
            Ok(o) if stderr(&o).starts_with("unshare:") => {
                eprintln!(
                    "skipped: this machine allows no private mount namespace ({})",
                    stderr(&o).trim()
                );
            }
            Ok(o) => panic!(
                "inside the namespace:\n{}\n{}",
                String::from_utf8_lossy(&o.stdout),
                stderr(&o)
            ),
            Err(e) => eprintln!("skipped: cannot run unshare ({e})"),
        }
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    mount(&[
        "-t",
        "tmpfs",
        "-o",
        "size=2m",
        "tmpfs",
        disk.to_str().unwrap(),
    ]);

    // The reference: run `b` uninterrupted, on a disk with room.
    let reference = dir.path().join("reference");
    let o = tiny_train_steps(&reference, "5", "200", "50")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // A finished run `a`, then a disk with 16 KiB left: run `b` writes its configuration and
    // first metrics, and its first checkpoint does not fit.
    let a = disk.join("a");
    let o = tiny_train_steps(&a, "4", "100", "50").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let a_summary = std::fs::read(a.join("summary.json")).unwrap();
    let a_files = files(&a);
    fill(&disk, 16 << 10);
    let b = disk.join("b");
    assert_fails(
        tiny_train_steps(&b, "5", "200", "50").output().unwrap(),
        "No space left on device",
    );
    // What was written is whole, and nothing else is there (no temporary file).
    assert_eq!(files(&b), [".lock", "config.toml", "metrics.jsonl"]);
    assert!(
        std::fs::read_to_string(b.join("config.toml"))
            .unwrap()
            .contains("[train]")
    );
    assert_eq!(std::fs::read(a.join("summary.json")).unwrap(), a_summary);
    assert_eq!(files(&a), a_files);

    // Room again: `b` resumes and ends as the uninterrupted run.
    std::fs::remove_file(disk.join("filler")).unwrap();
    let o = bin()
        .args(["train", "--task", "recall", "--resume", "--quiet", "--out"])
        .arg(&b)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(summary_without_times(&b), summary_without_times(&reference));
    assert_eq!(metrics_without_times(&b), metrics_without_times(&reference));

    // A suite with one finished run, then the folder read-only: the missing run fails clearly,
    // the finished one stays, and `collect` still reads it.
    let suite = |seeds: &str| {
        let mut c = bin();
        c.args(["lra", "run", "--suite", "lra-lite", "--tasks", "recall"]);
        c.args(["--methods", "exact", "--seeds", seeds, "--quiet"]);
        for o in common::TINY_RECALL
            .iter()
            .chain(&["train.steps=30", "train.eval_every=15"])
        {
            c.args(["--override", o]);
        }
        c.arg("--out").arg(disk.join("suite"));
        c
    };
    let o = suite("0").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let finished = disk.join("suite/recall/exact/seed-0/summary.json");
    let kept = std::fs::read(&finished).unwrap();
    mount(&["-o", "remount,ro", disk.to_str().unwrap()]);
    let o = suite("0,1").output().unwrap();
    assert_fails(o, "1 runs failed");
    let o = suite("0,1").output().unwrap();
    assert!(
        stderr(&o).contains("Read-only file system"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&finished).unwrap(), kept);
    let o = bin()
        .args(["lra", "collect"])
        .arg(disk.join("suite"))
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let table: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(table["runs"], 1, "{table}");
    // A new run and a finished one in the read-only folder.
    assert_fails(
        tiny_train_steps(&disk.join("c"), "1", "10", "5")
            .output()
            .unwrap(),
        "Read-only file system",
    );
    let o = bin()
        .args(["train", "--task", "recall", "--resume", "--quiet", "--out"])
        .arg(&a)
        .output()
        .unwrap();
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("nothing to resume"),
        "{}",
        stderr(&o)
    );
}
