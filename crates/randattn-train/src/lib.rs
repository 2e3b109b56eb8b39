//! # randattn-train
//!
//! Training small long-range classifiers with any randattn attention method: the LRA model
//! ([`model`]), AdamW with a linear schedule ([`optim`]) and the training loop ([`trainer`]);
//! suites of runs over tasks, methods and seeds ([`suite`]) and their results table
//! ([`collect`]).
//! Every random draw — initial weights, data order, dropout, each layer's attention samples —
//! comes from the run's seed.

#![warn(missing_docs)]

pub mod atomic;
pub mod checkpoint;
pub mod collect;
pub mod config;
pub mod gelu;
pub mod layer_norm;
pub mod model;
pub mod optim;
pub mod suite;
pub mod summary;
pub mod trainer;

pub use collect::{Cell, Collection, collect};
pub use config::{ConfigError, RunConfig};
pub use model::{LraModel, ModelConfig, Pooling};
pub use suite::{RunId, RunState, Suite};
pub use summary::Summary;
pub use trainer::{Metric, Observer, RunSummary, Silent, TrainConfig, train};

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The task could not make its examples.
    #[error(transparent)]
    Task(#[from] randattn_tasks::Error),
    /// The model failed (bad sizes, or an attention error).
    #[error(transparent)]
    Model(#[from] candle_core::Error),
}
