//! Suites of runs: one preset per task, a list of attention methods, a list of seeds, and one
//! folder per run, `<root>/<task>/<method-spec>/seed-<s>/`, holding `train`'s outputs. A run is
//! complete when its `summary.json` exists, partial when it has started (a `config.toml`), and
//! missing otherwise; running a suite again runs only what is not complete.

use std::path::{Path, PathBuf};

use randattn::Method;

use crate::config::{ConfigError, PRESETS, RunConfig};

/// A named set of per-task presets.
#[derive(Debug, Clone, Copy)]
pub struct Suite {
    /// The suite's name (`lra`, `lra-lite`).
    pub name: &'static str,
    /// One line on what it is for.
    pub summary: &'static str,
    /// `(task, preset TOML)`, in the order the suite runs and reports them.
    pub presets: &'static [(&'static str, &'static str)],
}

/// The `lra-lite` presets (`configs/lra-lite/`): sized so that one run takes at most 15 minutes
/// on two cores with the slowest linear method; the sizes are justified in each file.
pub const LITE_PRESETS: [(&str, &str); 5] = [
    (
        "listops",
        include_str!("../../../configs/lra-lite/listops.toml"),
    ),
    (
        "pathfinder",
        include_str!("../../../configs/lra-lite/pathfinder.toml"),
    ),
    (
        "image",
        include_str!("../../../configs/lra-lite/image.toml"),
    ),
    ("text", include_str!("../../../configs/lra-lite/text.toml")),
    (
        "recall",
        include_str!("../../../configs/lra-lite/recall.toml"),
    ),
];

/// Every suite.
pub const SUITES: [Suite; 2] = [
    Suite {
        name: "lra",
        summary: "the papers' sizes (configs/*.toml): ListOps 500-2000, Pathfinder-32 hard, \
                  Image 1024, Text up to 4K bytes; tens of CPU-hours per run",
        presets: &PRESETS,
    },
    Suite {
        name: "lra-lite",
        summary: "the five tasks sized for a CPU (configs/lra-lite/): at most 15 minutes per \
                  run on two cores",
        presets: &LITE_PRESETS,
    },
];

/// The methods a suite runs unless told otherwise: softmax, every softmax approximation the
/// papers compare, and V-Mean as the floor.
pub const DEFAULT_METHODS: [&str; 10] = [
    "exact",
    "yoso",
    "yoso-e",
    "skeinformer",
    "nystrom",
    "linformer",
    "informer",
    "performer",
    "lara",
    "vmean",
];

/// The seeds a suite runs unless told otherwise.
pub const DEFAULT_SEEDS: [u64; 3] = [0, 1, 2];

impl Suite {
    /// The suite called `name`.
    pub fn named(name: &str) -> Result<&'static Suite, ConfigError> {
        SUITES.iter().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = SUITES.iter().map(|s| s.name).collect();
            ConfigError(format!(
                "unknown suite `{name}`; suites: {}",
                names.join(", ")
            ))
        })
    }

    /// Its tasks, in order.
    pub fn tasks(&self) -> Vec<&'static str> {
        self.presets.iter().map(|(t, _)| *t).collect()
    }

    /// The preset of `task`.
    pub fn preset(&self, task: &str) -> Result<&'static str, ConfigError> {
        self.presets
            .iter()
            .find(|(t, _)| *t == task)
            .map(|(_, text)| *text)
            .ok_or_else(|| {
                ConfigError(format!(
                    "suite `{}` has no task `{task}`; its tasks: {}",
                    self.name,
                    self.tasks().join(", ")
                ))
            })
    }

    /// The resolved configuration of one run: the task's preset with `overrides`
    /// (`section.key=value`, as `train --override` takes them), then the attention and seed.
    pub fn config(&self, run: &RunId, overrides: &[String]) -> Result<RunConfig, ConfigError> {
        let mut all = overrides.to_vec();
        all.push(format!("model.attention=\"{}\"", run.attention));
        all.push(format!("train.seed={}", run.seed));
        RunConfig::parse(self.preset(&run.task)?, &all)
    }

    /// Every run of `tasks` × `methods` × `seeds` (all of the suite's tasks when `tasks` is
    /// empty), seed-major — the first seed of every cell comes first, so that a suite stopped
    /// early already fills the whole table once. Method specs are written canonically (the same
    /// method always gets the same folder).
    pub fn runs(
        &self,
        tasks: &[String],
        methods: &[Method],
        seeds: &[u64],
    ) -> Result<Vec<RunId>, ConfigError> {
        let tasks: Vec<String> = if tasks.is_empty() {
            self.tasks().iter().map(|t| t.to_string()).collect()
        } else {
            for t in tasks {
                self.preset(t)?;
            }
            tasks.to_vec()
        };
        if methods.is_empty() || seeds.is_empty() {
            return Err(ConfigError(
                "a suite needs at least one method and one seed".into(),
            ));
        }
        let mut runs = Vec::new();
        for &seed in seeds {
            for task in &tasks {
                for m in methods {
                    runs.push(RunId {
                        task: task.clone(),
                        attention: m.spec(),
                        seed,
                    });
                }
            }
        }
        runs.dedup();
        Ok(runs)
    }
}

/// One run of a suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunId {
    /// The task.
    pub task: String,
    /// The attention, as a canonical method spec.
    pub attention: String,
    /// The seed.
    pub seed: u64,
}

impl RunId {
    /// Its folder under `root`: `<root>/<task>/<method-spec>/seed-<s>`.
    pub fn dir(&self, root: &Path) -> PathBuf {
        root.join(&self.task)
            .join(&self.attention)
            .join(format!("seed-{}", self.seed))
    }
}

/// How far a run's folder is.
#[derive(Debug, Clone, PartialEq)]
pub enum RunState {
    /// Nothing there yet.
    Missing,
    /// Started and not finished: `train --resume` continues it.
    Partial,
    /// `summary.json` is there.
    Complete,
    /// The folder holds a run of another configuration (the preset changed since, or another
    /// suite wrote it): the message says what differs.
    Conflict(String),
}

/// The state of the run `expected` in `dir`.
pub fn run_state(dir: &Path, expected: &RunConfig) -> RunState {
    let config = dir.join("config.toml");
    if !config.exists() {
        // Outputs without the configuration that made them: neither a run to start there (train
        // refuses a folder that holds one) nor one to resume (its settings are unknown).
        let outputs: Vec<&str> = ["summary.json", "metrics.jsonl", "checkpoint.safetensors"]
            .into_iter()
            .filter(|f| dir.join(f).exists())
            .collect();
        return if outputs.is_empty() {
            RunState::Missing
        } else {
            RunState::Conflict(format!(
                "{} has {} but no config.toml: not a run the suite can start or resume; move it \
                 away",
                dir.display(),
                outputs.join(", ")
            ))
        };
    }
    let found = match std::fs::read_to_string(&config)
        .map_err(|e| e.to_string())
        .and_then(|t| RunConfig::parse(&t, &[]).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => return RunState::Conflict(format!("{}: {e}", config.display())),
    };
    if let Some(diff) = first_difference(&found, expected) {
        return RunState::Conflict(format!(
            "{} holds a run with {diff}; move it away, or run it with the configuration it has",
            dir.display()
        ));
    }
    if dir.join("summary.json").exists() {
        RunState::Complete
    } else {
        RunState::Partial
    }
}

/// The first key whose value differs between two configurations, as `key = found (the suite
/// says expected)`.
fn first_difference(found: &RunConfig, expected: &RunConfig) -> Option<String> {
    let (a, b) = (
        toml::Table::try_from(found).ok()?,
        toml::Table::try_from(expected).ok()?,
    );
    fn walk(prefix: &str, a: &toml::Table, b: &toml::Table) -> Option<String> {
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match (a.get(k), b.get(k)) {
                (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                    if let Some(d) = walk(&path, x, y) {
                        return Some(d);
                    }
                }
                (x, y) if x != y => {
                    let show =
                        |v: Option<&toml::Value>| v.map_or("(none)".into(), |v| v.to_string());
                    return Some(format!("{path} = {} (the suite says {})", show(x), show(y)));
                }
                _ => {}
            }
        }
        None
    }
    walk("", &a, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_suite_preset_parses_and_names_its_task() {
        for suite in SUITES {
            for (task, text) in suite.presets {
                let c = RunConfig::parse(text, &[]).unwrap_or_else(|e| panic!("{task}: {e}"));
                assert_eq!(c.task.name, *task, "suite {}", suite.name);
            }
        }
    }

    #[test]
    fn runs_are_seed_major_with_canonical_specs_and_bad_names_are_errors() {
        let lite = Suite::named("lra-lite").unwrap();
        let methods = Method::list_from_specs("exact,performer:features=256").unwrap();
        let runs = lite
            .runs(&["recall".into(), "listops".into()], &methods, &[3, 4])
            .unwrap();
        let ids: Vec<String> = runs
            .iter()
            .map(|r| format!("{}/{}/{}", r.task, r.attention, r.seed))
            .collect();
        let p = methods[1].spec();
        assert_eq!(
            ids,
            [
                "recall/exact/3".to_string(),
                format!("recall/{p}/3"),
                "listops/exact/3".into(),
                format!("listops/{p}/3"),
                "recall/exact/4".into(),
                format!("recall/{p}/4"),
                "listops/exact/4".into(),
                format!("listops/{p}/4"),
            ]
        );
        assert_eq!(
            runs[1].dir(Path::new("r")),
            Path::new("r").join("recall").join(&p).join("seed-3")
        );
        let err = lite.runs(&["imdb".into()], &methods, &[0]).unwrap_err();
        assert!(err.to_string().contains("no task `imdb`"), "{err}");
        let err = Suite::named("lra-full").unwrap_err();
        assert!(err.to_string().contains("suites: lra, lra-lite"), "{err}");
        assert!(lite.runs(&[], &[], &[0]).is_err());
    }

    #[test]
    fn run_state_sees_missing_partial_complete_and_conflicting_folders() {
        let root = std::env::temp_dir().join(format!("randattn-suite-{}", std::process::id()));
        let lite = Suite::named("lra-lite").unwrap();
        let run = RunId {
            task: "recall".into(),
            attention: "exact".into(),
            seed: 1,
        };
        let dir = run.dir(&root);
        let config = lite.config(&run, &[]).unwrap();
        assert_eq!(run_state(&dir, &config), RunState::Missing);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(run_state(&dir, &config), RunState::Missing);
        // A checkpoint whose configuration is gone can be neither started over nor resumed.
        std::fs::write(dir.join("checkpoint.safetensors"), "x").unwrap();
        match run_state(&dir, &config) {
            RunState::Conflict(m) => assert!(
                m.contains("has checkpoint.safetensors but no config.toml") && m.contains("move"),
                "{m}"
            ),
            s => panic!("{s:?}"),
        }
        std::fs::remove_file(dir.join("checkpoint.safetensors")).unwrap();
        std::fs::write(dir.join("config.toml"), config.to_toml()).unwrap();
        assert_eq!(run_state(&dir, &config), RunState::Partial);
        std::fs::write(dir.join("summary.json"), "{}").unwrap();
        assert_eq!(run_state(&dir, &config), RunState::Complete);
        let other = lite
            .config(
                &RunId {
                    seed: 2,
                    ..run.clone()
                },
                &[],
            )
            .unwrap();
        match run_state(&dir, &other) {
            RunState::Conflict(m) => {
                assert!(m.contains("train.seed = 1 (the suite says 2)"), "{m}")
            }
            s => panic!("{s:?}"),
        }
        std::fs::write(dir.join("config.toml"), "[task]\nname = 1\n").unwrap();
        assert!(matches!(run_state(&dir, &config), RunState::Conflict(_)));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
