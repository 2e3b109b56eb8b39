//! The one shape every estimator has: a config with declared parameters, a forward that returns
//! what its backward needs, and a backward that reuses it.
//!
//! A method implements [`Estimator`] (its own typed saved state, its cross-parameter rules, its
//! capabilities); the checks every method needs — parameters valid, the saved state from this
//! method and these input sizes, the output gradient's shape — run once, in the [`Attention`]
//! implementation that every estimator gets.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::inputs::{AttentionInputs, Dims};
use crate::params::{self, Params};

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The attention output, `[batch, heads, n_q, d_v]` row-major.
    pub output: Vec<f32>,
    /// What the backward pass needs (softmax statistics, hash codes, sampled indices, ...).
    pub saved: Saved,
}

/// Gradients of a scalar loss with respect to the inputs, given the output gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads {
    /// `∂L/∂Q`, shape of Q.
    pub dq: Vec<f32>,
    /// `∂L/∂K`, shape of K.
    pub dk: Vec<f32>,
    /// `∂L/∂V`, shape of V.
    pub dv: Vec<f32>,
    /// Gradients of the method's own learnable parameters (e.g. YOSO-C's `conv_weights`), in a
    /// fixed order per method; empty for methods without any.
    pub params: Vec<ParamGrad>,
}

impl Grads {
    /// Zero gradients of the shapes of `x`'s Q, K and V, with no parameter gradients.
    pub fn zeros(x: &AttentionInputs<'_>) -> Grads {
        Grads {
            dq: crate::linalg::par_zeroed(x.q().len()),
            dk: crate::linalg::par_zeroed(x.k().len()),
            dv: crate::linalg::par_zeroed(x.v().len()),
            params: Vec::new(),
        }
    }

    /// The gradients of every (batch, head) in order, for a parallel loop over heads.
    pub fn par_heads(&mut self, dims: Dims) -> impl IndexedParallelIterator<Item = HeadGrads<'_>> {
        let Dims {
            n_q, n_k, d, d_v, ..
        } = dims;
        self.dq
            .par_chunks_mut(n_q * d)
            .zip(self.dk.par_chunks_mut(n_k * d))
            .zip(self.dv.par_chunks_mut(n_k * d_v))
            .map(|((dq, dk), dv)| HeadGrads { dq, dk, dv })
    }
}

/// The gradients of one (batch, head): `dq` is `n_q × d`, `dk` is `n_k × d`, `dv` is `n_k × d_v`.
#[derive(Debug)]
pub struct HeadGrads<'a> {
    /// `∂L/∂Q` of the head.
    pub dq: &'a mut [f32],
    /// `∂L/∂K` of the head.
    pub dk: &'a mut [f32],
    /// `∂L/∂V` of the head.
    pub dv: &'a mut [f32],
}

/// The gradient of one learnable parameter of a method.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGrad {
    /// The parameter's name (as in `--param`).
    pub name: &'static str,
    /// Its shape.
    pub shape: Vec<usize>,
    /// `∂L/∂parameter`, row-major.
    pub grad: Vec<f32>,
}

/// State saved by a forward pass for its backward pass. Opaque: only the method that made it can
/// read it, and it checks that it is handed back with inputs of the same sizes. Cloning shares
/// the state.
#[derive(Clone)]
pub struct Saved {
    method: &'static str,
    dims: Dims,
    bytes: usize,
    value_flop_fraction: Option<f64>,
    state: Arc<dyn Any + Send + Sync>,
}

impl fmt::Debug for Saved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Saved")
            .field("method", &self.method)
            .field("dims", &self.dims)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Saved {
    pub(crate) fn new<E: Estimator>(dims: Dims, state: E::Saved) -> Self {
        Saved {
            method: E::INFO.name,
            dims,
            bytes: E::saved_bytes(&state),
            value_flop_fraction: E::value_flop_fraction(&state),
            state: Arc::new(state),
        }
    }

    /// Name of the method whose forward produced this state.
    pub fn method(&self) -> &'static str {
        self.method
    }

    /// Bytes held (for memory reporting).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// For a method that samples the value projection: the share of the exact projection's
    /// FLOPs this forward spent (see [`Estimator::value_flop_fraction`]).
    pub fn value_flop_fraction(&self) -> Option<f64> {
        self.value_flop_fraction
    }

    /// The state, if it was made by `E`'s forward on inputs of sizes `dims`.
    fn get<E: Estimator>(&self, dims: Dims) -> Result<&E::Saved> {
        if self.method != E::INFO.name {
            return Err(Error::Saved {
                message: format!(
                    "comes from method `{}` but the backward of `{}` was called",
                    self.method,
                    E::INFO.name
                ),
            });
        }
        if self.dims != dims {
            return Err(Error::Saved {
                message: format!(
                    "was made for dims {:?} but the backward got inputs with dims {dims:?}",
                    self.dims
                ),
            });
        }
        self.state.downcast_ref().ok_or_else(|| Error::Saved {
            message: format!("does not come from a {} forward", E::INFO.name),
        })
    }
}

/// Forward and backward of one estimator. Every [`Estimator`] and [`crate::Method`] implement it.
pub trait Attention {
    /// Computes the attention output. `seed` selects every random draw (ignored by
    /// deterministic methods); the same seed gives the same output at any thread count.
    fn forward(&self, inputs: &AttentionInputs<'_>, seed: u64) -> Result<Forward>;

    /// Gradients of the inputs given `grad_output` (`[batch, heads, n_q, d_v]`) and the `saved`
    /// state of the forward pass on the same inputs and seed; random draws are reused, not redrawn.
    fn backward(
        &self,
        inputs: &AttentionInputs<'_>,
        seed: u64,
        saved: &Saved,
        grad_output: &[f32],
    ) -> Result<Grads>;
}

/// A tensor parameter: learnable, too large for text (`run --param NAME=FILE.npy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorParam {
    /// Its name.
    pub name: &'static str,
    /// Its shape, in words (`[heads, k, n_k]`).
    pub shape: &'static str,
    /// Its rank.
    pub rank: usize,
}

/// What a method is, beyond its parameters: listed by `randattn methods`, and the capability
/// flags that the CLI and `randattn-nn` read instead of checking names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodInfo {
    /// Name used in method specs.
    pub name: &'static str,
    /// One-line description.
    pub summary: &'static str,
    /// Time and memory cost.
    pub cost: &'static str,
    /// Whether the output depends on the seed.
    pub random: bool,
    /// Whether the method approximates softmax attention (vs. a different kernel).
    pub approximates_softmax: bool,
    /// Whether the forward needs the layer input X and value projection W_V attached to the
    /// inputs ([`AttentionInputs::with_value_projection`]) rather than V alone.
    pub needs_value_projection: bool,
    /// The tensor parameters it accepts.
    pub tensor_params: &'static [TensorParam],
    /// The parameter that sets how much the method spends (samples, features, landmarks,
    /// projected rows): the x-axis of an error-vs-budget sweep. `None` for methods without one
    /// (exact, V-Mean, YOSO-E) and for MCA, whose `alpha` is an error target, not a count.
    pub budget: Option<&'static str>,
}

impl MethodInfo {
    /// A method with no tensor parameters that reads V (fill in the rest with struct update).
    pub const fn new(name: &'static str, summary: &'static str, cost: &'static str) -> Self {
        MethodInfo {
            name,
            summary,
            cost,
            random: false,
            approximates_softmax: true,
            needs_value_projection: false,
            tensor_params: &[],
            budget: None,
        }
    }
}

/// An estimator: what one method file implements. See the crate documentation of `methods`
/// for how a new one is added.
pub trait Estimator: Params + Clone + fmt::Debug + Send + Sync {
    /// The method's description and capabilities.
    const INFO: MethodInfo;

    /// What its forward hands to its backward.
    type Saved: fmt::Debug + Send + Sync + 'static;

    /// What a forward, and a forward followed by a backward, allocate beyond their inputs on
    /// inputs of sizes `s` (see [`crate::memory`]).
    fn memory(&self, s: &crate::memory::Sizes) -> crate::memory::Memory;
    /// Rules that tie parameters together (each parameter's own range is checked from its
    /// declaration before this runs).
    fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Checks every parameter, then [`Estimator::check`].
    fn validate(&self) -> Result<()> {
        params::check(Self::INFO.name, self)?;
        self.check()
    }

    /// The output and the saved state. Called with validated parameters.
    fn forward_saved(&self, x: &AttentionInputs<'_>, seed: u64) -> Result<(Vec<f32>, Self::Saved)>;

    /// The gradients, given the forward's state on inputs of the same sizes and an output
    /// gradient of the output's shape. Called with validated parameters.
    fn backward_saved(
        &self,
        x: &AttentionInputs<'_>,
        seed: u64,
        saved: &Self::Saved,
        grad_output: &[f32],
    ) -> Result<Grads>;

    /// Bytes held by a saved state (for memory reporting).
    fn saved_bytes(_saved: &Self::Saved) -> usize {
        0
    }

    /// For a method that samples the value projection: the share of the exact projection
    /// `X·W_V`'s FLOPs its forward spent (mean over batch and heads), from its saved state.
    fn value_flop_fraction(_saved: &Self::Saved) -> Option<f64> {
        None
    }

    /// Stores tensor parameter `name` (one of [`MethodInfo::tensor_params`], rank and values
    /// already checked).
    fn store_tensor(&mut self, name: &str, _data: Vec<f32>, _shape: &[usize]) -> Result<()> {
        Err(Error::UnknownParam {
            method: Self::INFO.name,
            param: name.to_string(),
            valid: "none (this method has no tensor parameters)".to_string(),
        })
    }

    /// Whether this configuration's output depends on the seed: the method samples
    /// ([`MethodInfo::random`]), or a parameter left at `auto` is drawn from the seed (the conv
    /// kernels of `yoso-e` and `nystrom`, initialised as PyTorch would).
    fn uses_seed(&self) -> bool {
        Self::INFO.random
    }

    /// The method this one estimates by sampling, if any (`yoso` → `yoso-e` with the same
    /// parameters): what its sampling error is measured against.
    fn expectation(&self) -> Option<Box<dyn Attention + Send + Sync>> {
        None
    }
}

impl<E: Estimator> Attention for E {
    fn forward(&self, x: &AttentionInputs<'_>, seed: u64) -> Result<Forward> {
        self.validate()?;
        let (output, saved) = self.forward_saved(x, seed)?;
        Ok(Forward {
            output,
            saved: Saved::new::<E>(x.dims(), saved),
        })
    }

    fn backward(
        &self,
        x: &AttentionInputs<'_>,
        seed: u64,
        saved: &Saved,
        grad_output: &[f32],
    ) -> Result<Grads> {
        self.validate()?;
        let state = saved.get::<E>(x.dims())?;
        x.check_grad_output(grad_output)?;
        self.backward_saved(x, seed, state, grad_output)
    }
}
