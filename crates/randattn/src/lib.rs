//! # randattn
//!
//! Randomized approximations of transformer self-attention on CPU — YOSO, Monte-Carlo
//! Attention, RA/LARA and Skeinformer, with their baselines — behind one API, and the exact
//! softmax kernel they are measured against.
//!
//! Every method is a config struct gathered in [`Method`] and implements [`Attention`] (through
//! [`Estimator`]); a method spec such as `performer:features=64` names a configured one:
//!
//! ```
//! use randattn::{Attention, AttentionInputs, Method};
//!
//! let (b, h, n, d) = (1, 2, 5, 4);
//! let q: Vec<f32> = (0..b * h * n * d).map(|i| (i as f32 * 0.1).sin()).collect();
//! let inputs = AttentionInputs::new(&q, [b, h, n, d], &q, [b, h, n, d], &q, [b, h, n, d])?;
//! let method = Method::parse("exact", &[("scale", "0.5")])?;
//! let fwd = method.forward(&inputs, 0)?;
//! let grads = method.backward(&inputs, 0, &fwd.saved, &vec![1.0; fwd.output.len()])?;
//! assert_eq!(grads.dq.len(), q.len());
//! # Ok::<(), randattn::Error>(())
//! ```
//!
//! Inputs are row-major f32: Q `[batch, heads, n_q, d]`, K `[batch, heads, n_k, d]`,
//! V `[batch, heads, n_k, d_v]`; an optional key-padding mask `[batch, n_k]` and query mask
//! `[batch, n_q]` (`true` = keep). Bad input is an [`Error`], never a panic or a silent NaN.

#![warn(missing_docs)]

pub mod counting;
pub mod error;
pub mod estimator;
pub mod inputs;
pub mod linalg;
pub mod matrix;
pub mod memory;
pub mod methods;
mod pages;
pub mod params;
pub mod pinv;
pub mod registry;
pub mod rng;
pub mod sampling;
pub mod segments;
pub mod spec;
pub mod tiles;
pub mod workload;

pub use error::{Error, Result};
pub use estimator::{
    Attention, Estimator, Forward, Grads, HeadGrads, MethodInfo, ParamGrad, Saved, TensorParam,
};
pub use inputs::{AttentionInputs, Dims, ValueProjection};
pub use memory::{Memory, Sizes};
pub use params::{Auto, ParamInfo};
pub use registry::{Method, MethodDescription};
