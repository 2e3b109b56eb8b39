//! A training run's whole state in one safetensors file: the weights, AdamW's moments, the
//! best-dev weights, and the counters (step, epoch, position in the epoch, best step and
//! accuracy). Written to a temporary file and renamed, so a crash never leaves a broken one.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
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
    let tmp = crate::atomic::temporary(path);
    let written = candle_core::safetensors::save(&tensors, &tmp).and_then(|()| {
        std::fs::File::open(&tmp)?.sync_all()?;
        Ok(std::fs::rename(&tmp, path)?)
    });
    if written.is_err() {
        // A full disk or a read-only folder: the previous checkpoint stays, with no debris.
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(|e| candle_core::Error::Msg(format!("cannot write {}: {e}", path.display())))
}

/// Maps the checkpoint at `path` without reading it: a file of any size (a corrupt one, another
/// model's) costs no memory until a tensor of the expected name and shape is copied out of it.
fn open(path: &Path) -> Result<MmapedSafetensors> {
    // SAFETY: checkpoints are only ever replaced whole (written to a temporary file, then
    // renamed over), never changed in place, and one process at a time holds a run folder (its
    // lock), so the mapped bytes do not change while they are read.
    unsafe { MmapedSafetensors::new(path) }
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
}

/// The tensor `name` of `file` (`None` if it has none), checked to be float64 with a length in
/// `lens` before it is read.
fn counters_of(
    file: &MmapedSafetensors,
    path: &Path,
    name: &str,
    lens: RangeInclusive<usize>,
) -> Result<Option<Vec<f64>>> {
    let Ok(view) = file.get(name) else {
        return Ok(None);
    };
    if view.dtype() != safetensors::Dtype::F64
        || view.shape().len() != 1
        || !lens.contains(&view.shape()[0])
    {
        bail!(
            "{}: {name} is {:?} of shape {:?}, not a training checkpoint's",
            path.display(),
            view.dtype(),
            view.shape()
        );
    }
    Ok(Some(file.load(name, &Device::Cpu)?.to_vec1::<f64>()?))
}

/// The steps done in the checkpoint at `path`.
pub fn step_of(path: &Path) -> Result<usize> {
    let file = open(path)?;
    match counters_of(&file, path, "counters", 6..=6)? {
        Some(c) => Ok(c[0] as usize),
        None => bail!(
            "{}: not a training checkpoint (no counters)",
            path.display()
        ),
    }
}

/// Reads the state from `path` into `vars` (named `names`; the same model) and returns the rest.
/// Each tensor's name, type and shape are checked before it is read.
pub fn load(path: &Path, names: &[String], vars: &[Var]) -> Result<State> {
    let file = open(path)?;
    let Some(c) = counters_of(&file, path, "counters", 6..=6)? else {
        bail!(
            "{}: not a training checkpoint (no counters)",
            path.display()
        );
    };
    if c[5] as usize != vars.len() {
        bail!(
            "{}: a checkpoint of another model ({} variables, this one has {})",
            path.display(),
            c[5],
            vars.len()
        );
    }
    let take = |name: String, like: &Tensor| -> Result<Tensor> {
        let Ok(view) = file.get(&name) else {
            bail!("{}: {name} is missing", path.display());
        };
        if view.shape() != like.dims() || view.dtype() != safetensors::Dtype::F32 {
            bail!(
                "{}: {name} is {:?} of shape {:?}, expected F32 of shape {:?}",
                path.display(),
                view.dtype(),
                view.shape(),
                like.dims()
            );
        }
        file.load(&name, &Device::Cpu)
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
    let elapsed_s = counters_of(&file, path, "elapsed_s", 1..=1)?.map_or(0.0, |e| e[0]);
    let step_times = counters_of(&file, path, "step_times", 0..=c[0] as usize)?.unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn vars(shapes: &[&[usize]]) -> (Vec<String>, Vec<Var>) {
        let names = (0..shapes.len()).map(|i| format!("v{i}")).collect();
        let vars = shapes
            .iter()
            .map(|s| Var::ones(*s, DType::F32, &Device::Cpu).unwrap())
            .collect();
        (names, vars)
    }

    fn write(path: &Path, names: &[String], vars: &[Var], step: usize, step_times: &[f64]) {
        let moments: Vec<_> = vars
            .iter()
            .map(|v| (v.as_tensor().clone(), v.as_tensor().clone()))
            .collect();
        let state = StateRef {
            names,
            vars,
            moments: &moments,
            step,
            epoch: 1,
            cursor: 2,
            best: None,
            elapsed_s: 1.5,
            step_times,
        };
        save(path, &state).unwrap();
    }

    #[test]
    fn a_checkpoint_round_trips_and_foreign_files_are_refused_before_reading() {
        let dir = std::env::temp_dir().join(format!("randattn-ckpt-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("checkpoint.safetensors");
        let (names, saved) = vars(&[&[2, 3], &[4]]);
        write(&path, &names, &saved, 3, &[0.1, 0.2, 0.3]);
        assert_eq!(step_of(&path).unwrap(), 3);
        let (_, fresh) = vars(&[&[2, 3], &[4]]);
        let state = load(&path, &names, &fresh).unwrap();
        assert_eq!((state.step, state.epoch, state.cursor), (3, 1, 2));
        assert_eq!(
            (state.elapsed_s, state.step_times),
            (1.5, vec![0.1, 0.2, 0.3])
        );

        // Another model: same count of variables, other shapes.
        let (_, other) = vars(&[&[3, 2], &[4]]);
        let err = load(&path, &names, &other).err().unwrap().to_string();
        assert!(
            err.contains("weight.v0 is F32 of shape [2, 3], expected F32 of shape [3, 2]"),
            "{err}"
        );
        // Another count of variables.
        let (names3, three) = vars(&[&[2, 3], &[4], &[1]]);
        let err = load(&path, &names3, &three).err().unwrap().to_string();
        assert!(err.contains("a checkpoint of another model"), "{err}");

        // More step times than steps: a corrupt file, refused.
        write(&path, &names, &saved, 2, &[0.1, 0.2, 0.3]);
        let err = load(&path, &names, &fresh).err().unwrap().to_string();
        assert!(err.contains("step_times"), "{err}");

        for junk in [&b""[..], b"not a checkpoint at all", &[0xff; 64]] {
            std::fs::write(&path, junk).unwrap();
            let err = step_of(&path).unwrap_err().to_string();
            assert!(err.contains("checkpoint.safetensors"), "{err}");
            assert!(load(&path, &names, &fresh).is_err());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
