//! The training loop: per-epoch shuffles from the seed, AdamW with a linear schedule, periodic
//! evaluation on fixed dev batches, the best-dev weights kept, and the test set evaluated with
//! the best-dev **and** the final weights.

use std::time::Instant;

use candle_core::{Device, Result, Tensor};
use rand::seq::SliceRandom;
use randattn::Method;
use randattn::rng::stream;
use randattn_tasks::{Example, Split, TaskSpec};

use crate::model::{Batch, LraModel, ModelConfig};
use crate::optim::{AdamW, clip_grad_norm, learning_rate};

/// How to train.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Examples per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps (linear), then linear decay to zero.
    pub warmup: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (none when `None`).
    pub clip: Option<f64>,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: usize,
    /// Dev batches per evaluation (a fixed set: the first ones).
    pub eval_batches: usize,
    /// Training examples (the first ones of the split).
    pub train_examples: usize,
    /// Test examples (the first ones; at most the split's size).
    pub test_examples: usize,
    /// Seed of every random draw.
    pub seed: u64,
}

/// One evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// Steps done.
    pub step: usize,
    /// Mean training loss and accuracy since the last evaluation.
    pub train_loss: f64,
    /// Training accuracy since the last evaluation.
    pub train_acc: f64,
    /// Dev loss and accuracy on the fixed dev batches.
    pub dev_loss: f64,
    /// Dev accuracy.
    pub dev_acc: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Seconds since the start.
    pub elapsed_s: f64,
    /// Training examples per second since the last evaluation.
    pub examples_per_s: f64,
}

/// Watches a run as it goes (progress bars, logs). Both hooks default to doing nothing.
pub trait Observer {
    /// After every optimiser step: the steps done and that step's training loss.
    fn step(&mut self, _done: usize, _loss: f64) {}
    /// After every evaluation.
    fn eval(&mut self, _metric: &Metric) {}
}

/// An observer that does nothing.
pub struct Silent;
impl Observer for Silent {}

/// Any closure of a [`Metric`] observes evaluations.
impl<F: FnMut(&Metric)> Observer for F {
    fn eval(&mut self, metric: &Metric) {
        self(metric)
    }
}

/// What a run ends with.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Every evaluation.
    pub metrics: Vec<Metric>,
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
    /// Trainable values.
    pub params: usize,
    /// Median wall time of an optimiser step (forward, backward, update), in ms.
    pub step_ms: f64,
    /// Training examples per second over the whole run (evaluations excluded).
    pub examples_per_s: f64,
    /// Wall time of the whole run in seconds, earlier sessions of a resumed run included.
    pub wall_s: f64,
    /// Test examples evaluated.
    pub test_examples: usize,
}

/// Pads `examples` into one batch (pad token `pad`; the mask marks tokens that are not `pad`,
/// as LRA does — for image tasks that also hides black pixels).
pub fn make_batch(examples: &[&Example], pad: u32) -> Result<Batch> {
    let n = examples
        .iter()
        .map(|e| e.tokens.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut tokens = vec![pad; examples.len() * n];
    for (row, e) in tokens.chunks_exact_mut(n).zip(examples) {
        row[..e.tokens.len()].copy_from_slice(&e.tokens);
    }
    let mask = tokens.iter().map(|t| *t != pad).collect();
    let lengths = examples.iter().map(|e| e.tokens.len()).collect();
    Ok(Batch {
        tokens: Tensor::from_vec(tokens, (examples.len(), n), &Device::Cpu)?,
        mask,
        lengths,
    })
}

fn labels(examples: &[&Example]) -> Result<Tensor> {
    let l: Vec<u32> = examples.iter().map(|e| e.label).collect();
    Tensor::from_vec(l, examples.len(), &Device::Cpu)
}

/// Mean loss and accuracy of `model` over `examples` in batches of `batch`.
pub fn evaluate(
    model: &LraModel,
    examples: &[Example],
    batch: usize,
    pad: u32,
    seed: u64,
) -> Result<(f64, f64)> {
    let (mut loss, mut correct) = (0.0f64, 0usize);
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let logits = model.forward(&make_batch(&refs, pad)?, None, seed)?;
        let y = labels(&refs)?;
        loss += candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64
            * chunk.len() as f64;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        correct += pred
            .iter()
            .zip(chunk)
            .filter(|(p, e)| **p == e.label)
            .count();
    }
    let n = examples.len().max(1) as f64;
    Ok((loss / n, correct as f64 / n))
}

/// Trains `model_config` with `attention` on `task` and evaluates it; `observer` sees every step
/// and evaluation. With `checkpoint`, the run's whole state (weights, optimiser moments, step,
/// data position, best-dev weights) is saved there after every evaluation (atomically: a
/// temporary file, then a rename), and a run that finds a checkpoint there continues from it —
/// ending exactly as the run would have uninterrupted, since every random draw is a function of
/// the seed, the step and the data position.
pub fn train(
    task: &TaskSpec,
    model_config: ModelConfig,
    attention: &Method,
    config: &TrainConfig,
    observer: &mut dyn Observer,
    checkpoint: Option<&std::path::Path>,
) -> std::result::Result<RunSummary, crate::Error> {
    let info = task.info();
    let sizes = task.split_sizes()?;
    let seed = config.seed;
    let train_set = task.examples(
        seed,
        Split::Train,
        0..config.train_examples.min(sizes[0]).max(1),
    )?;
    let dev_set = task.examples(
        seed,
        Split::Dev,
        0..(config.eval_batches * config.batch).min(sizes[1]).max(1),
    )?;
    let test_set = task.examples(
        seed,
        Split::Test,
        0..config.test_examples.min(sizes[2]).max(1),
    )?;
    let model = LraModel::new(model_config, attention, seed)?;
    let named = model.named_vars();
    let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
    let vars: Vec<candle_core::Var> = named.into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(vars.clone(), (0.9, 0.999), 1e-6, config.weight_decay)?;
    let started = Instant::now();
    let mut order: Vec<usize> = Vec::new();
    let mut cursor = usize::MAX;
    let mut epoch = 0usize;
    let (mut run_loss, mut run_correct, mut run_seen) = (0.0f64, 0usize, 0usize);
    let mut metrics = Vec::new();
    let mut best: Option<(f64, usize, Vec<Tensor>)> = None;
    let mut step_times = Vec::with_capacity(config.steps);
    let mut since_eval = 0.0f64;
    let mut first_step = 0;
    let mut earlier_s = 0.0;
    if let Some(path) = checkpoint.filter(|p| p.exists()) {
        let state = crate::checkpoint::load(path, &names, &vars)?;
        earlier_s = state.elapsed_s;
        step_times = state.step_times;
        for (i, (m, v)) in state.moments.into_iter().enumerate() {
            opt.moments[i] = (m, v);
        }
        opt.t = state.step;
        first_step = state.step;
        epoch = state.epoch;
        cursor = state.cursor;
        if epoch > 0 {
            order = (0..train_set.len()).collect();
            order.shuffle(&mut stream(seed, epoch - 1, 0, "train/order"));
        }
        best = state.best;
    }
    for step in first_step..config.steps {
        let step_started = Instant::now();
        // The next batch of a shuffled epoch (a new permutation from the seed per epoch).
        let mut picked = Vec::with_capacity(config.batch);
        while picked.len() < config.batch {
            if cursor >= order.len() {
                order = (0..train_set.len()).collect();
                order.shuffle(&mut stream(seed, epoch, 0, "train/order"));
                epoch += 1;
                cursor = 0;
            }
            picked.push(&train_set[order[cursor]]);
            cursor += 1;
        }
        let batch = make_batch(&picked, info.pad)?;
        let logits = model.forward(&batch, Some((seed, step as u64)), 0)?;
        let y = labels(&picked)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        run_loss += loss.to_scalar::<f32>()? as f64 * picked.len() as f64;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        run_correct += pred
            .iter()
            .zip(&picked)
            .filter(|(p, e)| **p == e.label)
            .count();
        run_seen += picked.len();
        let mut grads = loss.backward()?;
        if let Some(max) = config.clip {
            clip_grad_norm(&mut grads, &vars, max)?;
        }
        let lr = learning_rate(step, config.steps, config.warmup, config.lr);
        opt.step(&grads, lr)?;
        let done = step + 1;
        let took = step_started.elapsed().as_secs_f64();
        step_times.push(took);
        since_eval += took;
        observer.step(done, loss.to_scalar::<f32>()? as f64);
        if done % config.eval_every.max(1) == 0 || done == config.steps {
            let (dev_loss, dev_acc) = evaluate(&model, &dev_set, config.batch, info.pad, seed)?;
            let m = Metric {
                step: done,
                train_loss: run_loss / run_seen.max(1) as f64,
                train_acc: run_correct as f64 / run_seen.max(1) as f64,
                dev_loss,
                dev_acc,
                lr,
                elapsed_s: earlier_s + started.elapsed().as_secs_f64(),
                examples_per_s: run_seen as f64 / since_eval.max(1e-9),
            };
            (run_loss, run_correct, run_seen) = (0.0, 0, 0);
            since_eval = 0.0;
            if best.as_ref().is_none_or(|(acc, _, _)| dev_acc > *acc) {
                let weights = vars
                    .iter()
                    .map(|v| v.as_tensor().copy())
                    .collect::<Result<_>>()?;
                best = Some((dev_acc, done, weights));
            }
            // The evaluation is reported before the checkpoint that covers it is written: a run
            // killed between the two resumes from the previous checkpoint and redoes this
            // evaluation (its line is dropped then), instead of losing it.
            observer.eval(&m);
            if let Some(path) = checkpoint {
                crate::checkpoint::save(
                    path,
                    &crate::checkpoint::StateRef {
                        names: &names,
                        vars: &vars,
                        moments: &opt.moments,
                        step: done,
                        epoch,
                        cursor,
                        best: best.as_ref(),
                        elapsed_s: earlier_s + started.elapsed().as_secs_f64(),
                        step_times: &step_times,
                    },
                )?;
            }
            metrics.push(m);
        }
    }
    let (_, test_acc_final) = evaluate(&model, &test_set, config.batch, info.pad, seed)?;
    let Some((best_dev_acc, best_step, weights)) = best else {
        // Every run evaluates at its last step, and a checkpoint is only written after an
        // evaluation: only an inconsistent checkpoint gets here.
        return Err(candle_core::Error::Msg(
            "the run has no evaluation to take the best weights from (its checkpoint records \
             none: remove checkpoint.safetensors to start the run again)"
                .to_string(),
        )
        .into());
    };
    for (v, w) in vars.iter().zip(&weights) {
        v.set(w)?;
    }
    let (_, test_acc) = evaluate(&model, &test_set, config.batch, info.pad, seed)?;
    let mut hist = vec![0usize; info.classes];
    for e in &test_set {
        hist[e.label as usize] += 1;
    }
    let majority_acc = *hist.iter().max().unwrap_or(&0) as f64 / test_set.len() as f64;
    let wall_s = earlier_s + started.elapsed().as_secs_f64();
    let total: f64 = step_times.iter().sum();
    step_times.sort_by(f64::total_cmp);
    let step_ms = 1e3 * step_times.get(step_times.len() / 2).copied().unwrap_or(0.0);
    Ok(RunSummary {
        metrics,
        best_step,
        best_dev_acc,
        test_acc,
        test_acc_final,
        majority_acc,
        params: model.parameter_count(),
        step_ms,
        examples_per_s: (step_times.len() * config.batch) as f64 / total.max(1e-9),
        wall_s,
        test_examples: test_set.len(),
    })
}
