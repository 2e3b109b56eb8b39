//! The attention × task matrix of a suite's finished runs: test accuracy over seeds (mean,
//! sample standard deviation), the chance and majority-class rates, the average over tasks, the
//! cost (median step time, peak memory) and, where a task is a known seed lottery, how many seeds
//! took off.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{ConfigError, RunConfig};
use crate::suite::DEFAULT_METHODS;
use crate::summary::Summary;

/// The tasks on which a seed may never leave chance (Pathfinder: LRA #37, `lra-harness.md` §4;
/// Recall: the plateau before the matching circuit forms), so that the matrix counts the seeds
/// that took off.
pub const TAKE_OFF_TASKS: [&str; 2] = ["pathfinder", "recall"];

/// The order tasks are reported in (others follow, by name).
const TASK_ORDER: [&str; 5] = ["listops", "pathfinder", "image", "text", "recall"];

/// One (task, attention) cell.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    /// The task.
    pub task: String,
    /// The attention (method spec).
    pub attention: String,
    /// Finished seeds.
    pub seeds: usize,
    /// Mean test accuracy with the best-dev weights.
    pub test_acc_mean: f64,
    /// Its sample standard deviation over seeds (none with one seed).
    pub test_acc_std: Option<f64>,
    /// Mean test accuracy with the final weights.
    pub test_acc_final_mean: f64,
    /// Mean best dev accuracy.
    pub best_dev_acc_mean: f64,
    /// Median over seeds of the runs' median step time, in ms.
    pub step_ms: f64,
    /// Median over seeds of the runs' peak resident memory, in MiB.
    pub peak_rss_mib: Option<f64>,
    /// Seeds whose test accuracy rose clearly above the majority-class rate (tasks in
    /// [`TAKE_OFF_TASKS`] only): by more than three binomial standard errors of the test set.
    pub took_off: Option<usize>,
    /// The longest sequence of the task as configured (the length the step time is at).
    pub seq_len: usize,
}

/// Everything `collect` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Collection {
    /// Every cell, tasks in report order, attentions in [`DEFAULT_METHODS`] order then by name.
    pub results: Vec<Cell>,
    /// Chance accuracy (1 / classes) per task.
    pub chance: BTreeMap<String, f64>,
    /// Mean majority-class rate of the test sets per task.
    pub majority: BTreeMap<String, f64>,
    /// Mean over tasks of each attention's mean test accuracy, for attentions with a result in
    /// every task found.
    pub average: BTreeMap<String, f64>,
    /// The tasks found, in report order.
    pub tasks: Vec<String>,
    /// The attentions found, in report order.
    pub attentions: Vec<String>,
    /// Finished runs found.
    pub runs: usize,
    /// Their wall time added up, in seconds.
    pub wall_s_total: f64,
    /// The machines they finished on (as `summary.json` names them), each once.
    pub machines: Vec<String>,
}

/// Whether a run took off: its test accuracy exceeds the majority rate by more than three
/// binomial standard errors of a test set of `n` examples.
pub fn took_off(test_acc: f64, majority: f64, n: usize) -> bool {
    let se = (majority * (1.0 - majority) / n.max(1) as f64).sqrt();
    test_acc > majority + 3.0 * se
}

/// One finished run as found on disk.
struct Found {
    summary: Summary,
    seq_len: usize,
    classes: usize,
    test_examples: usize,
    path: PathBuf,
}

/// The finished runs under `root`: every `<task>/<method-spec>/seed-<s>/summary.json`.
fn find(root: &Path) -> Result<Vec<Found>, ConfigError> {
    let list = |dir: &Path| -> Result<Vec<PathBuf>, ConfigError> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        v.sort();
        Ok(v)
    };
    let mut found = Vec::new();
    for task_dir in list(root)? {
        for method_dir in list(&task_dir)? {
            for run_dir in list(&method_dir)? {
                let name = run_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let path = run_dir.join("summary.json");
                if !name.starts_with("seed-") || !path.exists() {
                    continue;
                }
                let summary = Summary::read(&path)?;
                let config_path = run_dir.join("config.toml");
                let config = std::fs::read_to_string(&config_path)
                    .map_err(|e| ConfigError(format!("cannot read {}: {e}", config_path.display())))
                    .and_then(|t| RunConfig::parse(&t, &[]))
                    .map_err(|e| ConfigError(format!("{}: {e}", config_path.display())))?;
                if config.task.name != summary.task || config.train.seed != summary.seed {
                    return Err(ConfigError(format!(
                        "{}: the summary ({} seed {}) does not match config.toml ({} seed {})",
                        run_dir.display(),
                        summary.task,
                        summary.seed,
                        config.task.name,
                        config.train.seed
                    )));
                }
                let info = config.task_spec()?.info();
                found.push(Found {
                    test_examples: summary.test_examples.unwrap_or(config.train.test_examples),
                    summary,
                    seq_len: info.max_len,
                    classes: info.classes,
                    path: run_dir,
                });
            }
        }
    }
    Ok(found)
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    let n = x.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        x[n / 2]
    } else {
        0.5 * (x[n / 2 - 1] + x[n / 2])
    }
}

/// The sample standard deviation (n − 1), none for fewer than two values.
fn sample_std(x: &[f64]) -> Option<f64> {
    (x.len() >= 2).then(|| {
        let m = mean(x);
        (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
    })
}

fn rank(order: &[&str], name: &str) -> (usize, String) {
    let i = order.iter().position(|o| *o == name).unwrap_or(order.len());
    (i, name.to_string())
}

/// Collects every finished run under `roots` (folders that `lra run`, or `train` commands from
/// `lra plan`, wrote into). The same run found twice is an error, not a double count.
pub fn collect(roots: &[PathBuf]) -> Result<Collection, ConfigError> {
    let mut runs: Vec<Found> = Vec::new();
    for root in roots {
        runs.extend(find(root)?);
    }
    let total_runs = runs.len();
    let wall_s_total = runs.iter().map(|r| r.summary.wall_s).sum();
    let mut machines: Vec<String> = runs
        .iter()
        .filter_map(|r| r.summary.machine.clone())
        .collect();
    machines.sort();
    machines.dedup();
    let mut cells: BTreeMap<(String, String), Vec<Found>> = BTreeMap::new();
    for r in runs {
        let key = (r.summary.task.clone(), r.summary.attention.clone());
        let same = cells.entry(key).or_default();
        if let Some(twin) = same.iter().find(|o| o.summary.seed == r.summary.seed) {
            return Err(ConfigError(format!(
                "the same run ({} with {}, seed {}) is in {} and in {}",
                r.summary.task,
                r.summary.attention,
                r.summary.seed,
                twin.path.display(),
                r.path.display()
            )));
        }
        same.push(r);
    }
    let mut tasks: Vec<String> = cells.keys().map(|(t, _)| t.clone()).collect();
    tasks.sort_by_key(|t| rank(&TASK_ORDER, t));
    tasks.dedup();
    let mut attentions: Vec<String> = cells.keys().map(|(_, a)| a.clone()).collect();
    attentions.sort_by_key(|a| rank(&DEFAULT_METHODS, a));
    attentions.dedup();
    let (mut chance, mut majority) = (BTreeMap::new(), BTreeMap::new());
    let mut majority_of: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut results = Vec::new();
    for ((task, attention), runs) in &cells {
        let get = |f: fn(&Summary) -> f64| runs.iter().map(|r| f(&r.summary)).collect::<Vec<_>>();
        let test = get(|s| s.test_acc);
        chance.insert(task.clone(), 1.0 / runs[0].classes.max(1) as f64);
        majority_of
            .entry(task.clone())
            .or_default()
            .extend(get(|s| s.majority_acc));
        let rss: Vec<f64> = runs.iter().filter_map(|r| r.summary.peak_rss_mib).collect();
        results.push(Cell {
            task: task.clone(),
            attention: attention.clone(),
            seeds: runs.len(),
            test_acc_mean: mean(&test),
            test_acc_std: sample_std(&test),
            test_acc_final_mean: mean(&get(|s| s.test_acc_final)),
            best_dev_acc_mean: mean(&get(|s| s.best_dev_acc)),
            step_ms: median(get(|s| s.step_ms)),
            peak_rss_mib: (!rss.is_empty()).then(|| median(rss)),
            took_off: TAKE_OFF_TASKS.contains(&task.as_str()).then(|| {
                runs.iter()
                    .filter(|r| {
                        took_off(r.summary.test_acc, r.summary.majority_acc, r.test_examples)
                    })
                    .count()
            }),
            seq_len: runs.iter().map(|r| r.seq_len).max().unwrap_or(0),
        });
    }
    for (task, m) in majority_of {
        majority.insert(task, mean(&m));
    }
    results.sort_by_key(|c| (rank_of(&tasks, &c.task), rank_of(&attentions, &c.attention)));
    let mut average = BTreeMap::new();
    for a in &attentions {
        let accs: Vec<f64> = results
            .iter()
            .filter(|c| &c.attention == a)
            .map(|c| c.test_acc_mean)
            .collect();
        if accs.len() == tasks.len() {
            average.insert(a.clone(), mean(&accs));
        }
    }
    Ok(Collection {
        results,
        chance,
        majority,
        average,
        tasks,
        attentions,
        runs: total_runs,
        wall_s_total,
        machines,
    })
}

fn rank_of(list: &[String], name: &str) -> usize {
    list.iter().position(|x| x == name).unwrap_or(usize::MAX)
}

impl Collection {
    /// The cell of `task` and `attention`, if any run finished there.
    pub fn cell(&self, task: &str, attention: &str) -> Option<&Cell> {
        self.results
            .iter()
            .find(|c| c.task == task && c.attention == attention)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_are_the_textbook_ones() {
        assert_eq!(mean(&[1.0, 2.0, 6.0]), 3.0);
        assert_eq!(median(vec![5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        // Sample variance of 1, 2, 6: ((−2)² + (−1)² + 3²) / 2 = 7.
        assert!((sample_std(&[1.0, 2.0, 6.0]).unwrap() - 7f64.sqrt()).abs() < 1e-12);
        assert_eq!(sample_std(&[0.4]), None);
    }

    #[test]
    fn take_off_is_three_standard_errors_above_the_majority_rate() {
        // Majority 0.5 on 400 examples: one standard error is 0.025, the bar 0.575.
        assert!(!took_off(0.57, 0.5, 400));
        assert!(took_off(0.58, 0.5, 400));
        // Chance-level runs on a balanced two-class task do not take off.
        assert!(!took_off(0.5, 0.5, 20_000));
    }
}
