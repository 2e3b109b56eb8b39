//! The documents a report is built from: the JSON that `compare`, `bench`, `fidelity`,
//! `mca-profile` and `lra collect` write (`--json`), PyTorch peer scripts' JSON in `bench`'s
//! format, and training runs' `metrics.jsonl`. Each keeps the path it came from, so every figure
//! on the page can be traced to its file.
//!
//! A document says what it is in its `meta.command` (every `--json` output since the report
//! exists); older files and peer scripts' are recognised by their fields.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::ReportError;

/// Where and when a document was measured (`meta` of every `--json` output).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Meta {
    /// The command line that wrote it.
    #[serde(default)]
    pub command: Option<String>,
    /// randattn's version.
    #[serde(default)]
    pub version: Option<String>,
    /// RFC 3339 UTC.
    #[serde(default)]
    pub measured_at: Option<String>,
    /// The machine.
    #[serde(default)]
    pub machine: Option<Machine>,
}

/// The machine a document was measured on.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Machine {
    /// CPU model.
    #[serde(default)]
    pub cpu: String,
    /// Widest vector extension used.
    #[serde(default)]
    pub simd: String,
    /// Cores available.
    #[serde(default)]
    pub cores: usize,
    /// Threads used.
    #[serde(default)]
    pub threads: usize,
}

impl Machine {
    /// `AMD EPYC, AVX-512, 2 cores, 2 threads`.
    pub fn describe(&self) -> String {
        format!(
            "{}, {}, {} cores, {} threads",
            self.cpu, self.simd, self.cores, self.threads
        )
    }
}

/// A method's parameters as the JSON gives them (`"features": "64"`).
pub type Params = BTreeMap<String, Value>;

/// The value of parameter `name` as a number, if it is one.
pub fn param_number(params: &Params, name: &str) -> Option<f64> {
    match params.get(name)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// What `compare` measured on.
#[derive(Debug, Clone, Deserialize)]
pub struct Workload {
    /// `clustered` or `layer`.
    pub kind: String,
    /// A description (the layer's file prefix).
    pub source: String,
}

/// One row of `compare --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompareRow {
    /// Method name.
    pub method: String,
    /// Method spec.
    #[serde(default)]
    pub spec: String,
    /// Its parameters.
    #[serde(default)]
    pub params: Params,
    /// Sequence length.
    pub n: usize,
    /// Seed (absent in files written before it was recorded).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Relative error against exact (none for methods with another kernel).
    pub rel_error: Option<f64>,
    /// Median forward time, ms.
    pub forward_ms: f64,
}

/// `compare --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Compare {
    /// The workload (absent in files written before it was recorded: the built-in one).
    #[serde(default)]
    pub workload: Option<Workload>,
    /// Every (method, n) row.
    pub results: Vec<CompareRow>,
}

impl Compare {
    /// What it measured on, in words.
    pub fn workload_name(&self) -> String {
        match &self.workload {
            Some(w) if w.kind == "layer" => format!("real layer {}", w.source),
            Some(w) => w.source.clone(),
            None => "built-in clustered workload".to_string(),
        }
    }
}

/// One row of `bench --json` (or a peer script's, such as `bench/peers/torch_sdpa.py`).
#[derive(Debug, Clone, Deserialize)]
pub struct BenchRow {
    /// Method name (`torch-sdpa` for the PyTorch peer).
    pub method: String,
    /// Method spec.
    #[serde(default)]
    pub spec: Option<String>,
    /// Sequence length.
    pub n: usize,
    /// Batch.
    #[serde(default)]
    pub batch: usize,
    /// Heads.
    #[serde(default)]
    pub heads: usize,
    /// Head dimension.
    #[serde(default)]
    pub d: usize,
    /// Median forward, ms.
    pub forward_ms: f64,
    /// Median backward (forward + backward minus forward), ms, when measured.
    #[serde(default)]
    pub backward_ms: Option<f64>,
    /// Peak memory beyond the inputs, bytes, when measured.
    #[serde(default)]
    pub peak_extra_bytes: Option<f64>,
}

impl BenchRow {
    /// The label a chart gives it: the spec, or the method name.
    pub fn label(&self) -> &str {
        self.spec.as_deref().unwrap_or(&self.method)
    }
}

/// `bench --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Bench {
    /// Every (method, n) row.
    pub results: Vec<BenchRow>,
}

/// One row of `fidelity --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct FidelityRow {
    /// Method name.
    pub method: String,
    /// Method spec.
    #[serde(default)]
    pub spec: String,
    /// Mean cosine of sentence embeddings against exact.
    pub cosine_mean: f64,
    /// Smallest cosine.
    pub cosine_min: f64,
    /// Relative error of each layer's attention output.
    pub layer_rel_error: Vec<f64>,
    /// MCA's FLOP fraction of the value projection.
    #[serde(default)]
    pub mca_flop_fraction: Option<f64>,
}

/// `fidelity --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Fidelity {
    /// The model.
    #[serde(default)]
    pub model: String,
    /// Every method's row.
    pub results: Vec<FidelityRow>,
}

/// One row of `mca-profile --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct McaRow {
    /// The error target α.
    pub alpha: f64,
    /// `token` or `shared`.
    pub draws: String,
    /// Relative error of the attention output.
    pub rel_error: f64,
    /// FLOP fraction of the value projection on real tokens.
    pub flop_fraction: f64,
}

/// `mca-profile --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct McaProfile {
    /// The layer profiled.
    #[serde(default)]
    pub source: String,
    /// Every (α, draws) row.
    pub results: Vec<McaRow>,
}

/// One cell of `lra collect --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct LraCell {
    /// Task.
    pub task: String,
    /// Attention (method spec).
    pub attention: String,
    /// Finished seeds.
    pub seeds: usize,
    /// Mean test accuracy (best-dev weights).
    pub test_acc_mean: f64,
    /// Its standard deviation over seeds.
    #[serde(default)]
    pub test_acc_std: Option<f64>,
    /// Median step time, ms.
    pub step_ms: f64,
    /// Peak resident memory, MiB.
    #[serde(default)]
    pub peak_rss_mib: Option<f64>,
    /// Seeds that took off (Pathfinder, Recall).
    #[serde(default)]
    pub took_off: Option<usize>,
}

/// `lra collect --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct LraMatrix {
    /// Every (task, attention) cell.
    pub results: Vec<LraCell>,
    /// Chance rate per task.
    pub chance: BTreeMap<String, f64>,
    /// Majority-class rate per task.
    pub majority: BTreeMap<String, f64>,
    /// Runs found.
    #[serde(default)]
    pub runs: usize,
    /// Their wall time, s.
    #[serde(default)]
    pub wall_s_total: f64,
    /// Machines they ran on.
    #[serde(default)]
    pub machines: Vec<String>,
}

/// One evaluation of a training run (`metrics.jsonl`).
#[derive(Debug, Clone, Deserialize)]
pub struct Metric {
    /// Step.
    pub step: usize,
    /// Dev accuracy.
    pub dev_acc: f64,
    /// Training loss.
    #[serde(default)]
    pub train_loss: f64,
}

/// A training run's evaluations, with what it trained.
#[derive(Debug, Clone)]
pub struct TrainingRun {
    /// Task.
    pub task: String,
    /// Attention (method spec).
    pub attention: String,
    /// Seed.
    pub seed: u64,
    /// Evaluations in step order.
    pub metrics: Vec<Metric>,
}

/// A parsed document.
#[derive(Debug, Clone)]
pub enum Body {
    /// `compare --json`.
    Compare(Compare),
    /// `bench --json` or a peer's.
    Bench(Bench),
    /// `fidelity --json`.
    Fidelity(Fidelity),
    /// `mca-profile --json`.
    McaProfile(McaProfile),
    /// `lra collect --json`.
    Lra(LraMatrix),
    /// A training run's `metrics.jsonl`.
    Run(TrainingRun),
}

/// A document with where it came from.
#[derive(Debug, Clone)]
pub struct Source {
    /// Its path (as given).
    pub path: String,
    /// Its `meta`, when it has one.
    pub meta: Option<Meta>,
    /// Its contents.
    pub body: Body,
}

impl Source {
    /// What kind of document it is, in words.
    pub fn kind(&self) -> &'static str {
        match &self.body {
            Body::Compare(_) => "compare",
            Body::Bench(_) => "bench",
            Body::Fidelity(_) => "fidelity",
            Body::McaProfile(_) => "mca-profile",
            Body::Lra(_) => "lra collect",
            Body::Run(_) => "training run",
        }
    }
}

fn bad(path: &str, what: impl std::fmt::Display) -> ReportError {
    ReportError::Input(format!("{path}: {what}"))
}

fn typed<T: serde::de::DeserializeOwned>(
    path: &str,
    value: Value,
    kind: &str,
) -> Result<T, ReportError> {
    serde_json::from_value(value)
        .map_err(|e| bad(path, format!("not a valid `{kind}` document: {e}")))
}

/// Which command wrote `value`: from `meta.command`, else from the fields of its first result.
fn command_of(value: &Value) -> Option<&'static str> {
    if let Some(cmd) = value.pointer("/meta/command").and_then(Value::as_str) {
        let words: Vec<&str> = cmd.split_whitespace().skip(1).take(2).collect();
        match words.as_slice() {
            ["compare", ..] => return Some("compare"),
            ["bench", ..] => return Some("bench"),
            ["fidelity", ..] => return Some("fidelity"),
            ["mca-profile", ..] => return Some("mca-profile"),
            ["lra", "collect"] => return Some("lra collect"),
            _ => {}
        }
    }
    if value.get("chance").is_some() && value.get("majority").is_some() {
        return Some("lra collect");
    }
    let first = value.get("results")?.as_array()?.first()?;
    let has = |k: &str| first.get(k).is_some();
    if has("cosine_mean") {
        Some("fidelity")
    } else if has("alpha") && has("flop_fraction") {
        Some("mca-profile")
    } else if has("backward_ms") || has("peak_extra_bytes") {
        Some("bench")
    } else if has("rel_error") && has("forward_ms") {
        Some("compare")
    } else {
        None
    }
}

/// Parses a JSON document written by one of randattn's commands (or a peer script in `bench`'s
/// format). `path` names it in errors and on the page.
pub fn parse_json(path: &str, text: &str) -> Result<Source, ReportError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| bad(path, format!("not JSON: {e}")))?;
    let meta = match value.get("meta") {
        Some(m) => Some(typed::<Meta>(path, m.clone(), "meta")?),
        None => None,
    };
    let Some(kind) = command_of(&value) else {
        return Err(bad(
            path,
            "not a JSON output of `randattn compare`, `bench`, `fidelity`, `mca-profile` or \
             `lra collect` (nor a peer script's in `bench`'s format)",
        ));
    };
    let body = match kind {
        "compare" => Body::Compare(typed(path, value, kind)?),
        "bench" => Body::Bench(typed(path, value, kind)?),
        "fidelity" => Body::Fidelity(typed(path, value, kind)?),
        "mca-profile" => Body::McaProfile(typed(path, value, kind)?),
        _ => Body::Lra(typed(path, value, kind)?),
    };
    check_finite(path, &body)?;
    Ok(Source {
        path: path.to_string(),
        meta,
        body,
    })
}

/// Parses a training run's `metrics.jsonl` (one evaluation per line), for the run of `task` with
/// `attention` and `seed`.
pub fn parse_metrics(
    path: &str,
    text: &str,
    task: &str,
    attention: &str,
    seed: u64,
) -> Result<Source, ReportError> {
    let mut metrics = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let m: Metric = serde_json::from_str(line).map_err(|e| {
            bad(
                path,
                format!("line {}: not an evaluation record: {e}", i + 1),
            )
        })?;
        if !m.dev_acc.is_finite() || !(0.0..=1.0).contains(&m.dev_acc) {
            return Err(bad(
                path,
                format!("line {}: dev_acc {} is not in [0, 1]", i + 1, m.dev_acc),
            ));
        }
        metrics.push(m);
    }
    metrics.sort_by_key(|m| m.step);
    Ok(Source {
        path: path.to_string(),
        meta: None,
        body: Body::Run(TrainingRun {
            task: task.to_string(),
            attention: attention.to_string(),
            seed,
            metrics,
        }),
    })
}

/// Times, errors and accuracies must be finite and not negative: a chart of NaN is no chart.
fn check_finite(path: &str, body: &Body) -> Result<(), ReportError> {
    let ok = |x: f64| x.is_finite() && x >= 0.0;
    let bad_value = match body {
        Body::Compare(c) => c
            .results
            .iter()
            .any(|r| !ok(r.forward_ms) || r.rel_error.is_some_and(|e| !ok(e))),
        Body::Bench(b) => b.results.iter().any(|r| {
            !ok(r.forward_ms)
                || r.backward_ms.is_some_and(|t| !ok(t))
                || r.peak_extra_bytes.is_some_and(|t| !ok(t))
        }),
        Body::Fidelity(f) => f
            .results
            .iter()
            .any(|r| !r.cosine_mean.is_finite() || r.layer_rel_error.iter().any(|&e| !ok(e))),
        Body::McaProfile(m) => m
            .results
            .iter()
            .any(|r| !ok(r.rel_error) || !ok(r.flop_fraction) || !ok(r.alpha)),
        Body::Lra(l) => l
            .results
            .iter()
            .any(|c| !ok(c.test_acc_mean) || !ok(c.step_ms)),
        Body::Run(_) => false,
    };
    if bad_value {
        return Err(bad(
            path,
            "holds a negative, NaN or infinite time, error or accuracy",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_documents_with_and_without_meta() {
        let compare = r#"{"results": [{"method": "exact", "spec": "exact", "params": {}, "n": 256,
            "rel_error": 0.0, "rel_error_vs_expectation": null, "forward_ms": 0.3,
            "speedup_vs_exact": 1.0}]}"#;
        assert_eq!(parse_json("c.json", compare).unwrap().kind(), "compare");
        let peer = r#"{"results": [{"method": "torch-sdpa", "params": {}, "batch": 1, "heads": 8,
            "n": 1024, "d": 64, "forward_ms": 12.0, "backward_ms": null,
            "speedup_vs_exact": null, "peak_extra_bytes": null}]}"#;
        assert_eq!(parse_json("p.json", peer).unwrap().kind(), "bench");
        let with_meta = r#"{"meta": {"command": "randattn lra collect results", "machine":
            {"cpu": "X", "simd": "AVX2", "cores": 2, "threads": 2}}, "results": [],
            "chance": {}, "majority": {}}"#;
        let s = parse_json("l.json", with_meta).unwrap();
        assert_eq!(s.kind(), "lra collect");
        assert_eq!(s.meta.unwrap().machine.unwrap().simd, "AVX2");
    }

    #[test]
    fn refuses_what_it_cannot_chart_with_the_file_named() {
        for (text, want) in [
            ("{", "not JSON"),
            (r#"{"results": [{"x": 1}]}"#, "not a JSON output"),
            (
                r#"{"results": [{"method": "exact", "n": 4, "rel_error": null}]}"#,
                "not a JSON output",
            ),
            (
                r#"{"results": [{"method": "exact", "n": 4, "rel_error": -1.0, "forward_ms": 1.0}]}"#,
                "negative, NaN",
            ),
            (
                r#"{"meta": {"command": "randattn compare"}, "results": [{"method": 3}]}"#,
                "not a valid `compare` document",
            ),
        ] {
            let err = parse_json("f.json", text).unwrap_err().to_string();
            assert!(err.contains("f.json") && err.contains(want), "{err}");
        }
        let err = parse_metrics("m.jsonl", "{\"step\": 1, \"dev_acc\": 2.0}", "t", "a", 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("[0, 1]"), "{err}");
    }
}
