//! Helpers shared by the binary's end-to-end tests.

#![allow(dead_code)]

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
