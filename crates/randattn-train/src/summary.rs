//! `summary.json`, the record of a finished run: what `train` writes last (its presence means
//! the run finished) and what `lra collect` reads.

use serde::{Deserialize, Serialize};

/// One finished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The task.
    pub task: String,
    /// The attention, as a method spec.
    pub attention: String,
    /// The run's seed.
    pub seed: u64,
    /// Optimiser steps.
    pub steps: usize,
    /// Step of the best dev accuracy.
    pub best_step: usize,
    /// Best dev accuracy.
    pub best_dev_acc: f64,
    /// Test accuracy with the best-dev weights.
    pub test_acc: f64,
    /// Test accuracy with the final weights.
    pub test_acc_final: f64,
    /// The test set's majority-class rate.
    pub majority_acc: f64,
    /// Median optimiser step, in ms.
    pub step_ms: f64,
    /// Training examples per second (evaluations excluded).
    pub examples_per_s: f64,
    /// Peak resident memory of the process, in MiB (where the system tells it).
    pub peak_rss_mib: Option<f64>,
    /// Wall time of the run, resumed parts included, in seconds.
    pub wall_s: f64,
    /// Trainable values.
    pub params: usize,
    /// Test examples evaluated (absent in summaries written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_examples: Option<usize>,
    /// The machine the run finished on: CPU model, vector extension, threads (absent in
    /// summaries written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// When the run finished, RFC 3339 UTC (absent in summaries written before it was
    /// recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

impl Summary {
    /// Reads and checks `summary.json` at `path`.
    pub fn read(path: &std::path::Path) -> Result<Summary, crate::ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::ConfigError(format!("cannot read {}: {e}", path.display())))?;
        let s: Summary = serde_json::from_str(&text).map_err(|e| {
            crate::ConfigError(format!("{}: not a run summary: {e}", path.display()))
        })?;
        let rates = [s.best_dev_acc, s.test_acc, s.test_acc_final, s.majority_acc];
        if rates.iter().any(|a| !(0.0..=1.0).contains(a)) || !s.step_ms.is_finite() {
            return Err(crate::ConfigError(format!(
                "{}: accuracies must lie in [0, 1] and step_ms be finite",
                path.display()
            )));
        }
        Ok(s)
    }

    /// Writes it to `path` atomically (a temporary file, then a rename).
    pub fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)? + "\n";
        crate::atomic::write_atomic(path, text.as_bytes())
    }
}
