//! A training run's whole state in one safetensors file: the weights, AdamW's moments, the
//! best-dev weights, and the counters (step, epoch, position in the epoch, best step and
//! accuracy). Written to a temporary file and renamed, so a crash never leaves a broken one.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Result, Tensor, Var, bail};

/// What [`save`] writes, borrowed from the running trainer.
pub struct StateRef<'a> {
    /// The variables' names.
    pub names: &'a [String],
    /// The model's variables, in the order of `names`.
    pub vars: &'a [Var],
    /// AdamW's first and second moments, one pair per variable.
    pub moments: &'a [(Tensor, Tensor)],
    /// Steps done.
    pub step: usize,
    /// Epochs started (shuffles drawn).
    pub epoch: usize,
    /// Position in the current epoch's order.
    pub cursor: usize,
    /// Best dev accuracy, its step and the weights then.
    pub best: Option<&'a (f64, usize, Vec<Tensor>)>,
    /// Seconds the run has taken so far (earlier sessions included).
    pub elapsed_s: f64,
    /// Every optimiser step's wall time so far, in seconds (for the run's median).
    pub step_times: &'a [f64],
}

/// What [`load`] gives back (the weights are set into the variables directly).
pub struct State {
    /// AdamW's moments.
    pub moments: Vec<(Tensor, Tensor)>,
    /// Steps done.
    pub step: usize,
    /// Epochs started.
    pub epoch: usize,
    /// Position in the current epoch.
    pub cursor: usize,
    /// Best dev accuracy, its step and weights.
    pub best: Option<(f64, usize, Vec<Tensor>)>,
    /// Seconds the run had taken (0 in checkpoints written before this was recorded).
    pub elapsed_s: f64,
    /// The step times recorded so far (empty in older checkpoints).
    pub step_times: Vec<f64>,
}

/// Writes the state to `path` atomically.
pub fn save(path: &Path, s: &StateRef<'_>) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for ((name, var), (m, v)) in s.names.iter().zip(s.vars).zip(s.moments) {
        tensors.insert(format!("weight.{name}"), var.as_tensor().clone());
        tensors.insert(format!("moment1.{name}"), m.clone());
        tensors.insert(format!("moment2.{name}"), v.clone());
    }
    let (best_acc, best_step) = match s.best {
        Some((acc, step, weights)) => {
            for (name, w) in s.names.iter().zip(weights) {
                tensors.insert(format!("best.{name}"), w.clone());
            }
            (*acc, *step as f64)
        }
        None => (-1.0, 0.0),
    };
    let counters = [
        s.step as f64,
        s.epoch as f64,
        s.cursor as f64,
        best_step,
        best_acc,
        s.vars.len() as f64,
    ];
    tensors.insert(
        "counters".to_string(),
        Tensor::from_vec(counters.to_vec(), 6, &Device::Cpu)?,
    );
    tensors.insert(
        "elapsed_s".to_string(),
        Tensor::from_vec(vec![s.elapsed_s], 1, &Device::Cpu)?,
    );
    if !s.step_times.is_empty() {
        tensors.insert(
            "step_times".to_string(),
            Tensor::from_vec(s.step_times.to_vec(), s.step_times.len(), &Device::Cpu)?,
        );
    }
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The steps done in the checkpoint at `path`.
pub fn step_of(path: &Path) -> Result<usize> {
    let t = candle_core::safetensors::load(path, &Device::Cpu)?;
    match t.get("counters") {
        Some(c) => Ok(c.to_vec1::<f64>()?.first().copied().unwrap_or(0.0) as usize),
        None => bail!(
            "{}: not a training checkpoint (no counters)",
            path.display()
        ),
    }
}

/// Reads the state from `path` into `vars` (named `names`; the same model) and returns the rest.
pub fn load(path: &Path, names: &[String], vars: &[Var]) -> Result<State> {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu)?;
    let Some(counters) = t.remove("counters") else {
        bail!(
            "{}: not a training checkpoint (no counters)",
            path.display()
        );
    };
    let c = counters.to_vec1::<f64>()?;
    if c.len() != 6 || c[5] as usize != vars.len() {
        bail!(
            "{}: a checkpoint of another model ({} variables, this one has {})",
            path.display(),
            c.get(5).copied().unwrap_or(0.0),
            vars.len()
        );
    }
    let mut take = |name: String, like: &Tensor| -> Result<Tensor> {
        match t.remove(&name) {
            Some(x) if x.shape() == like.shape() => Ok(x),
            Some(x) => bail!(
                "{}: {name} has shape {:?}, expected {:?}",
                path.display(),
                x.shape(),
                like.shape()
            ),
            None => bail!("{}: {name} is missing", path.display()),
        }
    };
    let mut moments = Vec::with_capacity(vars.len());
    let mut best_weights = Vec::new();
    for (name, var) in names.iter().zip(vars) {
        let w = take(format!("weight.{name}"), var.as_tensor())?;
        moments.push((
            take(format!("moment1.{name}"), var.as_tensor())?,
            take(format!("moment2.{name}"), var.as_tensor())?,
        ));
        if c[4] >= 0.0 {
            best_weights.push(take(format!("best.{name}"), var.as_tensor())?);
        }
        var.set(&w)?;
    }
    let elapsed_s = match t.remove("elapsed_s") {
        Some(e) => e.to_vec1::<f64>()?.first().copied().unwrap_or(0.0),
        None => 0.0,
    };
    let step_times = match t.remove("step_times") {
        Some(e) => e.to_vec1::<f64>()?,
        None => Vec::new(),
    };
    Ok(State {
        elapsed_s,
        step_times,
        moments,
        step: c[0] as usize,
        epoch: c[1] as usize,
        cursor: c[2] as usize,
        best: (c[4] >= 0.0).then_some((c[4], c[3] as usize, best_weights)),
    })
}
