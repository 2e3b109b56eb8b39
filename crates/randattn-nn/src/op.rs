//! candle custom ops that run a randattn estimator forward and backward.
//!
//! [`attention`] applies any [`Method`] that reads V to Q, K, V tensors `[batch, heads, n, d]`;
//! [`value_projection_attention`] applies a method that samples the value projection (MCA) to
//! Q, K and the layer input X with W_V and b_V ([`mca`] for MCA itself). Each call builds one op that keeps
//! the forward's saved state (sampled indices, hash codes, softmax statistics), so candle's
//! `backward()` calls the core backward with the same samples. The method's own parameters
//! (YOSO-C kernels, LARA proposal means, Linformer projections) are configuration here, not
//! tensors: their gradients are not propagated (a model that trains Linformer's projections uses
//! [`crate::linformer`]).

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use randattn::methods::mca::Mca;
use randattn::{Attention, AttentionInputs, Method, Saved};

/// The contiguous f32 data of a storage with its layout (for the CPU side of custom ops).
pub fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("randattn: {what} must be f32, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("randattn: {what} must be contiguous (call .contiguous() first)"),
    }
}

fn dims4(l: &Layout, what: &str) -> Result<[usize; 4]> {
    match l.shape().dims() {
        &[a, b, c, d] => Ok([a, b, c, d]),
        other => bail!("randattn: {what} must be [batch, heads, n, d], got shape {other:?}"),
    }
}

fn core_err(e: randattn::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("randattn: {e}"))
}

/// Masks owned by an op.
#[derive(Debug, Clone, Default)]
pub struct Masks {
    /// `[batch, n_k]`, `true` = attend.
    pub key: Option<Vec<bool>>,
    /// `[batch, n_q]`, `false` rows output zero.
    pub query: Option<Vec<bool>>,
}

impl Masks {
    fn apply<'a>(&'a self, mut x: AttentionInputs<'a>) -> Result<AttentionInputs<'a>> {
        if let Some(m) = &self.key {
            x = x.with_key_mask(m).map_err(core_err)?;
        }
        if let Some(m) = &self.query {
            x = x.with_query_mask(m).map_err(core_err)?;
        }
        Ok(x)
    }
}

struct AttentionOp {
    method: Method,
    seed: u64,
    masks: Masks,
    saved: Mutex<Option<Saved>>,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "randattn-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            slice(s1, l1, "q")?,
            slice(s2, l2, "k")?,
            slice(s3, l3, "v")?,
        );
        let x = AttentionInputs::new(q, dims4(l1, "q")?, k, dims4(l2, "k")?, v, dims4(l3, "v")?)
            .map_err(core_err)?;
        let x = self.masks.apply(x)?;
        let f = self.method.forward(&x, self.seed).map_err(core_err)?;
        *self.saved.lock().expect("op lock") = Some(f.saved);
        Ok((
            CpuStorage::F32(f.output),
            Shape::from(x.dims().out_shape().to_vec()),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().expect("op lock");
        let Some(saved) = saved.as_ref() else {
            bail!("randattn: backward before forward");
        };
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (qd, kd, vd, gd) = (flat(q)?, flat(k)?, flat(v)?, flat(grad)?);
        let shape = |t: &Tensor| -> Result<[usize; 4]> { dims4(t.layout(), "tensor") };
        let x = AttentionInputs::new(&qd, shape(q)?, &kd, shape(k)?, &vd, shape(v)?)
            .map_err(core_err)?;
        let x = self.masks.apply(x)?;
        let g = self
            .method
            .backward(&x, self.seed, saved, &gd)
            .map_err(core_err)?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(g.dq, q.shape(), dev)?),
            Some(Tensor::from_vec(g.dk, k.shape(), dev)?),
            Some(Tensor::from_vec(g.dv, v.shape(), dev)?),
        ))
    }
}

/// `method` applied to Q, K, V (`[batch, heads, n, d]`, f32, on the CPU), differentiable through
/// the core backward with the forward's samples. `seed` fixes every random draw.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    method: &Method,
    seed: u64,
    masks: &Masks,
) -> Result<Tensor> {
    if method.info().needs_value_projection {
        bail!(
            "randattn: {} samples the value projection: use randattn_nn::op::mca (or \
             value_projection_attention) with X and W_V",
            method.name()
        );
    }
    let op = AttentionOp {
        method: method.clone(),
        seed,
        masks: masks.clone(),
        saved: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// A method that samples the value projection ([`randattn::MethodInfo::needs_value_projection`]),
/// on Q, K and the layer's X, W_V, b_V.
struct ProjectionOp {
    method: Method,
    seed: u64,
    masks: Masks,
    /// `(batch, heads, n, d_h, d_model, d_v)`.
    sizes: (usize, usize, usize, usize, usize, usize),
    saved: Mutex<Option<Saved>>,
    /// The forward's share of the exact projection's FLOPs, for the caller.
    flop_fraction: Arc<Mutex<Option<f64>>>,
}

impl ProjectionOp {
    /// Q, K (packed `[2, b, h, n, d]`), X `[b, n, d_model]`, W_V with b_V as its last row
    /// `[d_model + 1, heads·d_v]`, viewed as core inputs (V is zeros: MCA never reads it).
    fn with_inputs<T>(
        &self,
        qk: &[f32],
        x: &[f32],
        wvb: &[f32],
        zeros: &[f32],
        f: impl FnOnce(AttentionInputs<'_>) -> Result<T>,
    ) -> Result<T> {
        let (b, h, n, d, d_model, d_v) = self.sizes;
        let half = b * h * n * d;
        let cols = h * d_v;
        let inputs = AttentionInputs::new(
            &qk[..half],
            [b, h, n, d],
            &qk[half..],
            [b, h, n, d],
            zeros,
            [b, h, n, d_v],
        )
        .map_err(core_err)?
        .with_value_projection(
            x,
            [b, n, d_model],
            &wvb[..d_model * cols],
            [d_model, cols],
            Some(&wvb[d_model * cols..]),
        )
        .map_err(core_err)?;
        f(self.masks.apply(inputs)?)
    }
}

impl CustomOp3 for ProjectionOp {
    fn name(&self) -> &'static str {
        "randattn-value-projection"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (qk, x, wvb) = (
            slice(s1, l1, "q/k")?,
            slice(s2, l2, "x")?,
            slice(s3, l3, "wv")?,
        );
        let (b, h, n, _, _, d_v) = self.sizes;
        let zeros = vec![0.0f32; b * h * n * d_v];
        let f = self.with_inputs(qk, x, wvb, &zeros, |inp| {
            self.method.forward(&inp, self.seed).map_err(core_err)
        })?;
        *self.flop_fraction.lock().expect("op lock") = f.saved.value_flop_fraction();
        *self.saved.lock().expect("op lock") = Some(f.saved);
        Ok((CpuStorage::F32(f.output), Shape::from(vec![b, h, n, d_v])))
    }

    fn bwd(
        &self,
        qk: &Tensor,
        x: &Tensor,
        wvb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().expect("op lock");
        let Some(saved) = saved.as_ref() else {
            bail!("randattn: backward before forward");
        };
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (qkd, xd, wd, gd) = (flat(qk)?, flat(x)?, flat(wvb)?, flat(grad)?);
        let (b, h, n, _, _, d_v) = self.sizes;
        let zeros = vec![0.0f32; b * h * n * d_v];
        let g = self.with_inputs(&qkd, &xd, &wd, &zeros, |inp| {
            self.method
                .backward(&inp, self.seed, saved, &gd)
                .map_err(core_err)
        })?;
        let param = |name: &str| -> Result<Vec<f32>> {
            match g.params.iter().find(|p| p.name == name) {
                Some(p) => Ok(p.grad.clone()),
                None => bail!(
                    "randattn: the {} backward returned no `{name}` gradient",
                    self.method.name()
                ),
            }
        };
        let mut dqk = g.dq.clone();
        dqk.extend_from_slice(&g.dk);
        let mut dwvb = param("wv")?;
        dwvb.extend(param("bv")?);
        let dev = qk.device();
        Ok((
            Some(Tensor::from_vec(dqk, qk.shape(), dev)?),
            Some(Tensor::from_vec(param("x")?, x.shape(), dev)?),
            Some(Tensor::from_vec(dwvb, wvb.shape(), dev)?),
        ))
    }
}

/// A layer's value projection as candle tensors: the layer input X (`[batch, n, d_model]`),
/// W_V (`[d_model, heads·d_v]`, the orientation `V = X·W_V + b_V`) and b_V (`[heads·d_v]`).
#[derive(Debug, Clone, Copy)]
pub struct ValueLayer<'a> {
    /// The layer input X.
    pub x: &'a Tensor,
    /// The value weights W_V.
    pub wv: &'a Tensor,
    /// The value bias b_V.
    pub bv: &'a Tensor,
}

/// MCA on Q, K (`[batch, heads, n, d]`) and the layer's value projection: differentiable with
/// respect to Q, K, X, W_V and b_V, with the forward's samples held fixed.
pub fn mca(
    q: &Tensor,
    k: &Tensor,
    layer: &ValueLayer<'_>,
    mca: &Mca,
    seed: u64,
    masks: &Masks,
) -> Result<Tensor> {
    Ok(value_projection_attention(q, k, layer, &Method::from(mca.clone()), seed, masks)?.0)
}

/// Any method that samples the value projection (`method.info().needs_value_projection`, e.g.
/// MCA) on Q, K (`[batch, heads, n, d]`) and the layer's value projection: differentiable with
/// respect to Q, K, X, W_V and b_V, with the forward's samples held fixed. Also returns the
/// forward's share of the exact projection's FLOPs.
pub fn value_projection_attention(
    q: &Tensor,
    k: &Tensor,
    layer: &ValueLayer<'_>,
    method: &Method,
    seed: u64,
    masks: &Masks,
) -> Result<(Tensor, Option<f64>)> {
    if !method.info().needs_value_projection {
        bail!(
            "randattn: {} reads V, not the value projection: use randattn_nn::op::attention",
            method.name()
        );
    }
    let ValueLayer { x, wv, bv } = *layer;
    let (b, h, n, d) = q.dims4()?;
    let (_, _, d_model) = x.dims3()?;
    let (_, cols) = wv.dims2()?;
    if !cols.is_multiple_of(h) {
        bail!("randattn: wv has {cols} columns, not a multiple of {h} heads");
    }
    let qk = Tensor::stack(&[q, k], 0)?.contiguous()?;
    let wvb = Tensor::cat(&[wv, &bv.unsqueeze(0)?], 0)?.contiguous()?;
    let op = ProjectionOp {
        method: method.clone(),
        seed,
        masks: masks.clone(),
        sizes: (b, h, n, d, d_model, cols / h),
        saved: Mutex::new(None),
        flop_fraction: Arc::new(Mutex::new(None)),
    };
    let sink = op.flop_fraction.clone();
    let out = qk.apply_op3(&x.contiguous()?, &wvb, op)?;
    let flop_fraction = sink.lock().expect("op lock").take();
    Ok((out, flop_fraction))
}
