//! One TOML file holds a run: the task and its parameters, the model, the training. Presets for
//! every task live in the repository's `configs/`; `section.key=value` overrides change one
//! value and reject keys that do not exist, listing the valid ones.

use std::collections::BTreeMap;

use randattn::Method;
use randattn_tasks::TaskSpec;
use serde::{Deserialize, Serialize};

use crate::model::{ModelConfig, Pooling};
use crate::trainer::TrainConfig;

/// The presets of the papers' sizes, by task name (the files in `configs/`; the `lra` suite).
pub const PRESETS: [(&str, &str); 5] = [
    ("listops", include_str!("../../../configs/listops.toml")),
    (
        "pathfinder",
        include_str!("../../../configs/pathfinder.toml"),
    ),
    ("image", include_str!("../../../configs/image.toml")),
    ("text", include_str!("../../../configs/text.toml")),
    ("recall", include_str!("../../../configs/recall.toml")),
];

/// `[task]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    /// The task's name.
    pub name: String,
    /// Its parameters (as `randattn data --set` takes them).
    #[serde(default)]
    pub params: BTreeMap<String, toml::Value>,
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The attention, as a method spec (`performer:features=64`).
    pub attention: String,
    /// Blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
    /// Feed-forward hidden size.
    pub ffn: usize,
    /// Classifier hidden size.
    pub classifier_hidden: usize,
    /// `mean` or `last`.
    pub pooling: String,
    /// Dropout probability.
    pub dropout: f64,
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimiser steps.
    pub steps: usize,
    /// Examples per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = none).
    pub clip: f64,
    /// Steps between evaluations.
    pub eval_every: usize,
    /// Dev batches per evaluation.
    pub eval_batches: usize,
    /// Training examples used.
    pub train_examples: usize,
    /// Test examples used.
    pub test_examples: usize,
    /// Seed of every random draw.
    pub seed: u64,
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// `[task]`.
    pub task: TaskSection,
    /// `[model]`.
    pub model: ModelSection,
    /// `[train]`.
    pub train: TrainSection,
}

/// A configuration problem, with the message a user needs.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The valid keys of each section, for error messages.
fn valid_keys(section: &str) -> &'static str {
    match section {
        "task" => "name, params.<task parameter>",
        "model" => "attention, layers, width, heads, ffn, classifier_hidden, pooling, dropout",
        "train" => {
            "steps, batch, lr, warmup, weight_decay, clip, eval_every, eval_batches, \
             train_examples, test_examples, seed"
        }
        _ => "sections task, model, train",
    }
}

/// A value as TOML reads it (`3`, `1e-4`, `true`, `"x"`), else as a string.
fn parse_value(text: &str) -> toml::Value {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|t| t.get("v").cloned())
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

/// `table` with `overrides` (`section.key=value`) applied.
fn apply_overrides(
    mut table: toml::Table,
    overrides: &[String],
) -> Result<toml::Table, ConfigError> {
    for o in overrides {
        let Some((path, value)) = o.split_once('=') else {
            return Err(ConfigError(format!(
                "--override expects section.key=value, got `{o}`"
            )));
        };
        let parts: Vec<&str> = path.trim().split('.').collect();
        let (section, key) = match parts.as_slice() {
            [s, k] => (*s, vec![*k]),
            [s, "params", k] if *s == "task" => (*s, vec!["params", *k]),
            _ => {
                return Err(ConfigError(format!(
                    "--override `{path}`: expected section.key (sections task, model, train)"
                )));
            }
        };
        let known = match section {
            "task" => key[0] == "name" || key[0] == "params",
            "model" | "train" => valid_keys(section).split(", ").any(|k| k == key[0]),
            _ => false,
        };
        if !known {
            return Err(ConfigError(format!(
                "--override `{path}`: unknown key; valid keys of [{section}]: {}",
                valid_keys(section)
            )));
        }
        let mut t = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| ConfigError(format!("[{section}] is not a table")))?;
        for k in &key[..key.len() - 1] {
            t = t
                .entry(k.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| ConfigError(format!("{section}.{k} is not a table")))?;
        }
        t.insert(key[key.len() - 1].to_string(), parse_value(value.trim()));
    }
    Ok(table)
}

impl RunConfig {
    /// Parses `text` after applying `overrides` (`section.key=value`), then checks everything:
    /// unknown keys, types, ranges, the task's parameters and the attention spec.
    pub fn parse(text: &str, overrides: &[String]) -> Result<RunConfig, ConfigError> {
        let base: toml::Table = text
            .parse()
            .map_err(|e| ConfigError(format!("config is not valid TOML: {e}")))?;
        let table = apply_overrides(base.clone(), overrides)?;
        let config: RunConfig = match table.try_into() {
            Ok(c) => c,
            Err(e) => {
                let e: toml::de::Error = e;
                // Name the override at fault, if one is.
                for o in overrides {
                    let one = apply_overrides(base.clone(), std::slice::from_ref(o))?;
                    if let Err(e1) = one.try_into::<RunConfig>() {
                        return Err(ConfigError(format!("--override `{o}`: {}", e1.message())));
                    }
                }
                return Err(ConfigError(format!("config: {}", e.message())));
            }
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let t = &self.train;
        for (name, value) in [
            ("steps", t.steps),
            ("batch", t.batch),
            ("eval_every", t.eval_every),
            ("eval_batches", t.eval_batches),
            ("train_examples", t.train_examples),
            ("test_examples", t.test_examples),
        ] {
            if value == 0 {
                return Err(ConfigError(format!(
                    "train.{name} must be at least 1, got 0"
                )));
            }
        }
        let lr_ok = t.lr.is_finite() && t.lr > 0.0;
        let decay_ok = t.weight_decay.is_finite() && t.weight_decay >= 0.0;
        if !(lr_ok && decay_ok) {
            return Err(ConfigError(format!(
                "train.lr must be a finite number > 0 and train.weight_decay >= 0, got {} and {}",
                t.lr, t.weight_decay
            )));
        }
        if !(t.clip.is_finite() && t.clip >= 0.0) {
            return Err(ConfigError(format!(
                "train.clip must be >= 0 (0 = none), got {}",
                t.clip
            )));
        }
        for (name, value, max) in [
            ("steps", t.steps, 1 << 30),
            ("batch", t.batch, 1 << 16),
            ("eval_every", t.eval_every, 1 << 30),
            ("eval_batches", t.eval_batches, 1 << 20),
            ("train_examples", t.train_examples, 1 << 26),
            ("test_examples", t.test_examples, 1 << 26),
        ] {
            if value > max {
                return Err(ConfigError(format!(
                    "train.{name} must be at most {max}, got {value}"
                )));
            }
        }
        let m = &self.model;
        for (name, value, max) in [
            ("layers", m.layers, 64),
            ("width", m.width, 1 << 14),
            ("heads", m.heads, 1 << 10),
            ("ffn", m.ffn, 1 << 16),
            ("classifier_hidden", m.classifier_hidden, 1 << 16),
        ] {
            if value > max {
                return Err(ConfigError(format!(
                    "model.{name} must be at most {max}, got {value}"
                )));
            }
        }
        if m.classifier_hidden == 0 {
            return Err(ConfigError(
                "model.classifier_hidden must be at least 1, got 0".into(),
            ));
        }
        if m.layers == 0
            || m.width == 0
            || m.heads == 0
            || !m.width.is_multiple_of(m.heads)
            || m.ffn == 0
        {
            return Err(ConfigError(format!(
                "model: layers, ffn >= 1 and width a multiple of heads >= 1, got layers {}, width {}, heads {}, ffn {}",
                m.layers, m.width, m.heads, m.ffn
            )));
        }
        if !(0.0..1.0).contains(&m.dropout) {
            return Err(ConfigError(format!(
                "model.dropout must be in [0, 1), got {}",
                m.dropout
            )));
        }
        m.pooling
            .parse::<Pooling>()
            .map_err(|e| ConfigError(format!("model.pooling: {e}")))?;
        self.attention()?;
        self.task_spec()?;
        Ok(())
    }

    /// The task with its parameters.
    pub fn task_spec(&self) -> Result<TaskSpec, ConfigError> {
        let settings: Vec<(String, String)> = self
            .task
            .params
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect();
        TaskSpec::parse(&self.task.name, &settings).map_err(|e| ConfigError(e.to_string()))
    }

    /// The attention method.
    pub fn attention(&self) -> Result<Method, ConfigError> {
        Method::from_spec(&self.model.attention)
            .map_err(|e| ConfigError(format!("model.attention: {e}")))
    }

    /// The model's sizes for `task`.
    pub fn model_config(&self, task: &TaskSpec) -> ModelConfig {
        let info = task.info();
        ModelConfig {
            layers: self.model.layers,
            width: self.model.width,
            heads: self.model.heads,
            ffn: self.model.ffn,
            classifier_hidden: self.model.classifier_hidden,
            pooling: self.model.pooling.parse().unwrap_or(Pooling::Mean),
            dropout: self.model.dropout as f32,
            ..ModelConfig::lra(info.vocab, info.max_len, info.classes)
        }
    }

    /// A lower bound of the memory a training run needs, in bytes: the examples, the
    /// activations one step keeps for its backward (per layer about 12 width-sized and 2
    /// FFN-sized values per token, the attention's own state excluded), and the weights (Linformer's
    /// projections included) with
    /// their gradients, AdamW moments and best-dev copy. For refusing a run the machine cannot
    /// hold before it starts.
    pub fn memory_estimate(&self) -> Result<u128, ConfigError> {
        let task = self.task_spec()?;
        let n = task.info().max_len as u128;
        let (m, t) = (&self.model, &self.train);
        let (w, f, l) = (m.width as u128, m.ffn as u128, m.layers as u128);
        let examples = (t.train_examples + t.test_examples) as u128 * n * 4;
        let activations = t.batch as u128 * n * (l * (12 * w + 2 * f) + 2 * w) * 4;
        let vocab = task.info().vocab as u128;
        // Linformer's trainable E and F: [heads, k, max_len] each, per layer.
        let projections = match self.attention()? {
            Method::Linformer(lin) => l * 2 * m.heads as u128 * lin.k as u128 * n,
            _ => 0,
        };
        let weights = (vocab + n) * w
            + l * (4 * w * w + 2 * w * f)
            + w * m.classifier_hidden as u128
            + projections;
        Ok(examples + activations + weights * 4 * 5)
    }

    /// The training settings.
    pub fn train_config(&self) -> TrainConfig {
        let t = &self.train;
        TrainConfig {
            steps: t.steps,
            batch: t.batch,
            lr: t.lr,
            warmup: t.warmup,
            weight_decay: t.weight_decay,
            clip: (t.clip > 0.0).then_some(t.clip),
            eval_every: t.eval_every,
            eval_batches: t.eval_batches,
            train_examples: t.train_examples,
            test_examples: t.test_examples,
            seed: t.seed,
        }
    }

    /// The resolved configuration as TOML (what re-runs the run exactly).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_round_trips() {
        for (name, text) in PRESETS {
            let c = RunConfig::parse(text, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(c.task.name, name);
            assert_eq!(RunConfig::parse(&c.to_toml(), &[]).unwrap(), c);
        }
    }

    #[test]
    fn overrides_change_one_value_and_reject_unknown_keys() {
        let text = PRESETS[0].1;
        let c = RunConfig::parse(
            text,
            &[
                "train.steps=7".into(),
                "model.attention=performer:features=16".into(),
                "task.params.max_length=900".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.steps, 7);
        assert_eq!(c.model.attention, "performer:features=16");
        assert_eq!(
            c.task_spec().unwrap().params()[1],
            ("max_length", "900".to_string())
        );
        for (o, needle) in [
            (
                "train.stepz=3",
                "unknown key; valid keys of [train]: steps, batch",
            ),
            (
                "optim.lr=3",
                "unknown key; valid keys of [optim]: sections task, model, train",
            ),
            ("train.steps=0", "train.steps must be at least 1, got 0"),
            (
                "train.batch=70000",
                "train.batch must be at most 65536, got 70000",
            ),
            ("model.layers=65", "model.layers must be at most 64, got 65"),
            (
                "model.classifier_hidden=0",
                "model.classifier_hidden must be at least 1",
            ),
            ("train.steps=many", "train.steps"),
            (
                "model.attention=performer:features",
                "model.attention: method spec",
            ),
            ("model.pooling=max", "model.pooling"),
            (
                "task.params.max_args=1",
                "parameter `max_args` of task `listops`",
            ),
            ("steps", "expects section.key=value"),
        ] {
            let err = RunConfig::parse(text, &[o.to_string()])
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{o}: {err}");
        }
        let err = RunConfig::parse("[task]\nname = 'listops'\nextra = 1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `extra`"), "{err}");
    }
}
