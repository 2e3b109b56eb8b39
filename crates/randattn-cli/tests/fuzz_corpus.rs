//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`, grown and minimised by
//! `cargo +nightly fuzz run` / `cmin`) through the same checks the fuzz targets run
//! (`fuzz/checks.rs`), on stable Rust and in seconds: every input that ever reached new code
//! still gives an answer or a clear error, never a panic.

#[path = "../../../fuzz/checks.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{target}: {} panics", path.display());
        count += 1;
    }
    assert!(
        count > 10,
        "{target}: only {count} inputs in {}",
        dir.display()
    );
}

#[test]
fn method_spec_corpus() {
    replay("method_spec", checks::method_spec);
}

#[test]
fn train_config_corpus() {
    replay("train_config", checks::train_config);
}

#[test]
fn task_params_corpus() {
    replay("task_params", checks::task_params);
}

#[test]
fn checkpoint_corpus() {
    replay("checkpoint", checks::checkpoint);
}

#[test]
fn npy_corpus() {
    replay("npy", checks::npy);
}
