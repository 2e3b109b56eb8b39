//! The properties the fuzz targets check, one function per target, shared by the targets
//! (`fuzz_targets/`, run with `cargo +nightly fuzz run TARGET`) and by the stable test that
//! replays the committed corpora (`crates/randattn-cli/tests/fuzz_corpus.rs`). Each takes any
//! bytes; a panic is a finding.

use candle_core::{DType, Device, Var};
use randattn::Method;
use randattn_cli::npy;
use randattn_tasks::{Split, TaskSpec};
use randattn_train::{RunConfig, checkpoint};

/// Method specs and `--set` settings (the first line the spec, then `key=value` lines): parsed
/// or refused; a parsed spec written back parses to the same spec.
pub fn method_spec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (spec, settings) = text.split_once('\n').unwrap_or((text, ""));
    let settings: Vec<(&str, &str)> = settings.lines().filter_map(|l| l.split_once('=')).collect();
    if let Ok(m) = Method::parse(spec, &settings) {
        let written = m.spec();
        let again = Method::from_spec(&written).expect("a written spec parses");
        assert_eq!(again.spec(), written, "spec round trip");
    }
    let _ = Method::list_from_specs(text);
}

/// Training configurations (TOML, then a line `---`, then one override per line): a
/// configuration or a clear error; a resolved configuration parses to itself.
pub fn train_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml, overrides) = text.split_once("\n---\n").unwrap_or((text, ""));
    let overrides: Vec<String> = overrides.lines().map(str::to_string).collect();
    if let Ok(c) = RunConfig::parse(toml, &overrides) {
        let again = RunConfig::parse(&c.to_toml(), &[]).expect("a resolved config parses");
        assert_eq!(again, c, "config round trip");
        let _ = c.memory_estimate();
    }
}

/// Task names and parameters (the name, then `key=value` lines): a task or a clear error; a
/// generated task (ListOps, Pathfinder, Recall) with sequences of at most 2048 tokens makes two
/// examples of each split that
/// fit its declared length and vocabulary, or says why it cannot.
pub fn task_params(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.lines();
    let name = lines.next().unwrap_or("");
    let settings: Vec<(&str, &str)> = lines.filter_map(|l| l.split_once('=')).collect();
    if let Ok(t) = TaskSpec::parse(name, &settings) {
        let info = t.info();
        let _ = t.params();
        // The generated tasks' examples come from their parameters (worth fuzzing); image and
        // text read fixed data files, slow to load at every input. A small candidate budget:
        // parameters that rarely produce an example are a quick error, not seconds per input.
        if info.max_len <= 2048 && ["listops", "pathfinder", "recall"].contains(&name) {
            for split in [Split::Train, Split::Test] {
                let Ok(examples) = t.examples_within(7, split, 0..2, 200) else {
                    continue;
                };
                for e in examples {
                    assert!(e.tokens.len() <= info.max_len, "longer than max_len");
                    assert!(
                        e.tokens.iter().all(|&tok| (tok as usize) < info.vocab),
                        "vocab"
                    );
                    assert!((e.label as usize) < info.classes, "label");
                }
            }
        }
    }
}

/// Training checkpoints (any file): the state of this model, or a clear error.
pub fn checkpoint(data: &[u8]) {
    let path = std::env::temp_dir().join(format!(
        "randattn-fuzz-{}-{:?}.safetensors",
        std::process::id(),
        std::thread::current().id()
    ));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = checkpoint::step_of(&path);
    let names = vec!["a".to_string(), "b".to_string()];
    let vars = vec![
        Var::zeros((2, 3), DType::F32, &Device::Cpu).expect("a variable"),
        Var::zeros(4, DType::F32, &Device::Cpu).expect("a variable"),
    ];
    let _ = checkpoint::load(&path, &names, &vars);
    let _ = std::fs::remove_file(&path);
}

/// `.npy` files (any bytes): an array or a clear error; an array converts to float32 or a mask
/// or says why not, and a float32 array written back reads back the same.
pub fn npy(data: &[u8]) {
    let Ok(array) = npy::parse(data) else {
        return;
    };
    let rank = array.shape.len();
    let _ = array.clone().into_mask("mask");
    if let Ok((values, shape)) = array.into_f32(rank, "x") {
        assert_eq!(
            values.len(),
            shape.iter().product::<usize>(),
            "payload size"
        );
        let again = npy::parse(&npy::encode_f32(&values, &shape)).expect("a written array parses");
        let (back, back_shape) = again.into_f32(rank, "x").expect("float32 of that rank");
        assert_eq!(back_shape, shape, "shape round trip");
        assert!(
            back.iter()
                .zip(&values)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "values round trip"
        );
    }
}
