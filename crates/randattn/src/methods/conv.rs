//! The depthwise convolution skip on V shared by YOSO-C and Nyströmformer: one `w`-tap kernel per
//! head, shared by all features of the head, applied along the sequence to the masked values
//! (zero-padded, centred, cross-correlation as PyTorch's `Conv2d(H, H, (w, 1), groups=H)`), and
//! added to the attention output. Its kernels are a learnable parameter (`conv_weights`), whose
//! gradient the backward returns.

use rand::Rng;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::estimator::ParamGrad;
use crate::inputs::{AttentionInputs, Dims};
use crate::linalg::dot;
use crate::params::{Auto, Rule, auto, param_error};
use crate::rng::stream;

/// Largest conv window accepted.
pub const MAX_CONV: usize = 255;

/// What the given kernels must be.
const WEIGHTS_TEXT: &str = "heads*conv comma-separated finite numbers";

/// The valid windows of `conv`.
pub(crate) fn window_rule() -> Rule<usize> {
    Rule::new("0 (off) or an odd integer in 1..=255", |c: &usize| {
        *c == 0 || (*c <= MAX_CONV && c % 2 == 1)
    })
}

/// The valid values of `conv_weights`.
pub(crate) fn weights_rule() -> Rule<Auto<Vec<f32>>> {
    auto(
        "seeded",
        Rule::new(WEIGHTS_TEXT, |w: &Vec<f32>| {
            !w.is_empty() && w.iter().all(|x| x.is_finite())
        }),
    )
}

/// Checks that given kernels go with the window.
pub(crate) fn check(method: &'static str, conv: usize, weights: &Auto<Vec<f32>>) -> Result<()> {
    if let Auto::Fixed(w) = weights {
        if conv == 0 {
            return Err(param_error(
                method,
                "conv_weights",
                WEIGHTS_TEXT,
                format!(
                    "{} weights with conv=0 (set conv to the window width)",
                    w.len()
                ),
            ));
        }
        if w.len() % conv != 0 {
            return Err(param_error(
                method,
                "conv_weights",
                WEIGHTS_TEXT,
                format!("{} values (conv={conv})", w.len()),
            ));
        }
    }
    Ok(())
}

/// The kernels for these inputs (`None` when the skip is off); checks the self-attention shape
/// and the number of weights.
pub(crate) fn kernels(
    method: &'static str,
    conv: usize,
    weights: &Auto<Vec<f32>>,
    dims: Dims,
    seed: u64,
) -> Result<Option<Vec<f32>>> {
    if conv == 0 {
        return Ok(None);
    }
    if dims.n_q != dims.n_k {
        return Err(Error::shape(
            "q",
            format!(
                "has {} rows but k has {}: the conv branch (conv={conv}) adds conv(V) to the \
                 output row by row, so it needs self-attention (n_q = n_k)",
                dims.n_q, dims.n_k
            ),
        ));
    }
    match weights {
        Auto::Fixed(w) if w.len() != dims.heads * conv => Err(param_error(
            method,
            "conv_weights",
            WEIGHTS_TEXT,
            format!(
                "{} values, but heads * conv = {} * {conv} = {} are needed",
                w.len(),
                dims.heads,
                dims.heads * conv
            ),
        )),
        Auto::Fixed(w) => Ok(Some(w.clone())),
        Auto::Auto => Ok(Some(seeded_conv_weights(dims.heads, conv, seed))),
    }
}

/// The conv kernels used when none are given: `U(−1/√w, 1/√w)` (PyTorch's default
/// initialisation of the reference's `Conv2d`), head `h` drawn from
/// `rng::stream(seed, 0, h, "conv/weights")`. Row-major `[heads, w]`.
pub fn seeded_conv_weights(heads: usize, w: usize, seed: u64) -> Vec<f32> {
    let bound = 1.0 / (w as f32).sqrt();
    (0..heads)
        .flat_map(|h| {
            let mut rng = stream(seed, 0, h, "conv/weights");
            (0..w)
                .map(move |_| rng.random_range(-bound..bound))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `out += conv(V ⊙ mask)` for every head (`weights` is `[heads, w]`).
pub(crate) fn add_forward(x: &AttentionInputs<'_>, out: &mut [f32], weights: &[f32]) {
    let Dims {
        heads, n_q, d_v, ..
    } = x.dims();
    let w = weights.len() / heads;
    out.par_chunks_mut(n_q * d_v)
        .enumerate()
        .for_each(|(bh, out)| {
            let h = bh % heads;
            let kernel = &weights[h * w..(h + 1) * w];
            head_forward(out, x.v_head(bh), x.key_mask_row(bh / heads), kernel, d_v);
        });
}

/// Backward of [`add_forward`] given the gradient of the whole output: adds to `dv` and returns
/// the kernels' gradient (summed over the batch in a fixed order).
pub(crate) fn add_backward(
    x: &AttentionInputs<'_>,
    grad_output: &[f32],
    dv: &mut [f32],
    weights: &[f32],
) -> ParamGrad {
    let Dims {
        heads,
        n_q,
        n_k,
        d_v,
        ..
    } = x.dims();
    let bhs = x.dims().batch_heads();
    let w = weights.len() / heads;
    let mut per_head = vec![0.0f32; bhs * w];
    dv.par_chunks_mut(n_k * d_v)
        .zip(per_head.par_chunks_mut(w))
        .enumerate()
        .for_each(|(bh, (dv, dw))| {
            let h = bh % heads;
            head_backward(
                &grad_output[bh * n_q * d_v..(bh + 1) * n_q * d_v],
                x.v_head(bh),
                x.key_mask_row(bh / heads),
                &weights[h * w..(h + 1) * w],
                d_v,
                dv,
                dw,
            );
        });
    let mut grad = vec![0.0f32; heads * w];
    for (bh, part) in per_head.chunks_exact(w).enumerate() {
        let h = bh % heads;
        for (a, b) in grad[h * w..(h + 1) * w].iter_mut().zip(part) {
            *a += *b;
        }
    }
    ParamGrad {
        name: "conv_weights",
        shape: vec![heads, w],
        grad,
    }
}

/// `out += conv(V ⊙ mask)` for one head (`out` is `n × d_v`).
fn head_forward(out: &mut [f32], v: &[f32], keep: Option<&[bool]>, kernel: &[f32], d_v: usize) {
    let n = v.len() / d_v;
    let half = kernel.len() / 2;
    for (i, o) in out.chunks_exact_mut(d_v).enumerate() {
        for (t, &wt) in kernel.iter().enumerate() {
            let Some(j) = (i + t).checked_sub(half).filter(|j| *j < n) else {
                continue;
            };
            if keep.is_some_and(|k| !k[j]) {
                continue;
            }
            for (ov, vv) in o.iter_mut().zip(&v[j * d_v..(j + 1) * d_v]) {
                *ov += wt * vv;
            }
        }
    }
}

/// Backward of [`head_forward`]: adds to `dv` and to the kernel gradient `dw`.
fn head_backward(
    g: &[f32],
    v: &[f32],
    keep: Option<&[bool]>,
    kernel: &[f32],
    d_v: usize,
    dv: &mut [f32],
    dw: &mut [f32],
) {
    let n = v.len() / d_v;
    let half = kernel.len() / 2;
    for (i, gi) in g.chunks_exact(d_v).enumerate() {
        for (t, (&wt, dwt)) in kernel.iter().zip(dw.iter_mut()).enumerate() {
            let Some(j) = (i + t).checked_sub(half).filter(|j| *j < n) else {
                continue;
            };
            if keep.is_some_and(|k| !k[j]) {
                continue;
            }
            *dwt += dot(gi, &v[j * d_v..(j + 1) * d_v]);
            for (dvv, gv) in dv[j * d_v..(j + 1) * d_v].iter_mut().zip(gi) {
                *dvv += wt * gv;
            }
        }
    }
}
