//! `randattn run`: one method on `.npy` inputs.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use randattn::{Attention, AttentionInputs, Method};

use randattn_cli::npy;

#[derive(Args)]
pub struct RunArgs {
    /// Method spec `NAME[:key=value]...`, e.g. `performer:features=64` (see `randattn methods`).
    #[arg(long)]
    method: String,
    /// Queries, float32 [batch, heads, n_q, d].
    #[arg(long)]
    q: PathBuf,
    /// Keys, float32 [batch, heads, n_k, d].
    #[arg(long)]
    k: PathBuf,
    /// Values, float32 [batch, heads, n_k, d_v]; may be left out when --x and --wv are given
    /// (then V = X·W_V + b_V).
    #[arg(long, required_unless_present = "x")]
    v: Option<PathBuf>,
    /// Layer input X, float32 [batch, n_k, d_model] (mca samples V = X·W_V + b_V from it).
    #[arg(long, requires = "wv")]
    x: Option<PathBuf>,
    /// Value projection W_V, float32 [d_model, heads·d_v] (head h = columns h·d_v..(h+1)·d_v).
    #[arg(long, requires = "x")]
    wv: Option<PathBuf>,
    /// Value bias b_V, float32 [heads·d_v].
    #[arg(long, requires = "wv")]
    bv: Option<PathBuf>,
    /// Key-padding mask [batch, n_k] (1 keep, 0 drop); bool, uint8, int64 or float32.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Query mask [batch, n_q] (0 rows output zeros); same dtypes as --mask.
    #[arg(long)]
    query_mask: Option<PathBuf>,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Method parameter, repeatable: `--set key=value` means the same as `:key=value` at the
    /// end of the spec.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    settings: Vec<String>,
    /// Tensor parameter from a float32 .npy file, repeatable: `--param e=E.npy --param f=F.npy`
    /// (linformer, [heads, k, n_k]), `proposal_means=M.npy` (lara, [heads, C, d]),
    /// `conv_weights=W.npy` (yoso, yoso-e, nystrom, [heads, conv]).
    #[arg(long = "param", value_name = "NAME=FILE")]
    params: Vec<String>,
    /// Output file, float32 [batch, heads, n_q, d_v].
    #[arg(long)]
    out: PathBuf,
    /// Gradient of the loss w.r.t. the output (same shape); runs the backward pass.
    #[arg(long, requires = "grads_dir")]
    grad_out: Option<PathBuf>,
    /// Directory that receives dq.npy, dk.npy, dv.npy and one NAME.npy per learnable parameter
    /// of the method (e.g. conv_weights.npy for yoso with conv > 0).
    #[arg(long, requires = "grad_out")]
    grads_dir: Option<PathBuf>,
}

fn shape4(shape: &[usize]) -> [usize; 4] {
    [shape[0], shape[1], shape[2], shape[3]]
}

pub fn run(a: RunArgs) -> Result<()> {
    let mut method = Method::parse(&a.method, &crate::parse_settings(&a.settings)?)?;
    for p in &a.params {
        let Some((name, file)) = p.split_once('=') else {
            bail!("--param expects NAME=FILE.npy, got `{p}`");
        };
        let name = name.trim();
        let rank = method.tensor_rank(name)?;
        let (data, shape) = npy::read_f32(std::path::Path::new(file.trim()), rank, name)?;
        method.set_tensor(name, data, &shape)?;
    }
    method.validate()?;
    let (q, qs) = npy::read_f32(&a.q, 4, "q")?;
    let (k, ks) = npy::read_f32(&a.k, 4, "k")?;
    let projection = match (&a.x, &a.wv) {
        (Some(xp), Some(wp)) => {
            let (x, xs) = npy::read_f32(xp, 3, "x")?;
            let (wv, ws) = npy::read_f32(wp, 2, "wv")?;
            let bv =
                a.bv.as_ref()
                    .map(|p| npy::read_f32(p, 1, "bv").map(|(b, _)| b))
                    .transpose()?;
            Some((x, [xs[0], xs[1], xs[2]], wv, [ws[0], ws[1]], bv))
        }
        _ => None,
    };
    if method.info().needs_value_projection && projection.is_none() {
        bail!(
            "method {} samples the value projection: give the layer input --x and --wv (and --bv)",
            method.name()
        );
    }
    let (v, vs) = match (&a.v, &projection) {
        (Some(path), _) => {
            let (v, vs) = npy::read_f32(path, 4, "v")?;
            (v, shape4(&vs))
        }
        (None, Some((x, xs, wv, ws, bv))) => {
            if ws[0] != xs[2] {
                bail!(
                    "wv has shape {ws:?} but x has d_model {} (shape {xs:?})",
                    xs[2]
                );
            }
            let v = randattn::inputs::project_values(x, *xs, wv, bv.as_deref(), qs[1])?;
            let d_v = ws[1] / qs[1];
            (v, [xs[0], qs[1], xs[1], d_v])
        }
        (None, None) => bail!("give --v, or --x and --wv to compute V = X·W_V + b_V"),
    };
    let mut inputs = AttentionInputs::new(&q, shape4(&qs), &k, shape4(&ks), &v, vs)?;
    if let Some((x, xs, wv, ws, bv)) = &projection {
        inputs = inputs.with_value_projection(x, *xs, wv, *ws, bv.as_deref())?;
    }
    let key_mask = a
        .mask
        .as_ref()
        .map(|p| read_mask(p, "mask", [qs[0], ks[2]]))
        .transpose()?;
    let query_mask = a
        .query_mask
        .as_ref()
        .map(|p| read_mask(p, "query mask", [qs[0], qs[2]]))
        .transpose()?;
    if let Some(m) = &key_mask {
        inputs = inputs.with_key_mask(m)?;
    }
    if let Some(m) = &query_mask {
        inputs = inputs.with_query_mask(m)?;
    }
    // The inputs are read; the method's own needs (and, with --grad-out, the output gradient)
    // must fit beside them.
    randattn_cli::limits::check_method_beside_inputs(
        &method,
        inputs.dims(),
        projection.as_ref().map(|p| p.1[2]),
        a.grad_out.is_some(),
        usize::from(a.grad_out.is_some()),
        &format!("{} on these inputs", method.name()),
    )?;
    let fwd = method.forward(&inputs, a.seed)?;
    let out_shape = inputs.dims().out_shape();
    npy::write_f32(&a.out, &fwd.output, &out_shape)?;
    if let (Some(g_path), Some(dir)) = (&a.grad_out, &a.grads_dir) {
        let (g, gs) = npy::read_f32(g_path, 4, "grad-out")?;
        if gs != out_shape {
            bail!(
                "{}: grad-out has shape {gs:?} but the output has shape {out_shape:?}",
                g_path.display()
            );
        }
        let grads = method.backward(&inputs, a.seed, &fwd.saved, &g)?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        npy::write_f32(&dir.join("dq.npy"), &grads.dq, &qs)?;
        npy::write_f32(&dir.join("dk.npy"), &grads.dk, &ks)?;
        npy::write_f32(&dir.join("dv.npy"), &grads.dv, &vs)?;
        // MCA's gradients of X, W_V and b_V come as the parameters x, wv, bv.
        for p in &grads.params {
            npy::write_f32(&dir.join(format!("{}.npy", p.name)), &p.grad, &p.shape)?;
        }
    }
    Ok(())
}

fn read_mask(path: &std::path::Path, what: &str, want: [usize; 2]) -> Result<Vec<bool>> {
    let (m, shape) = npy::read_mask(path, what)?;
    if shape != want {
        bail!(
            "{}: {what} has shape {shape:?} but must be [batch, n] = {want:?}",
            path.display()
        );
    }
    Ok(m)
}
