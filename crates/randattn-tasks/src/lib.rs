//! # randattn-tasks
//!
//! Long-range classification tasks for training models with randattn's attention methods,
//! offline: seeded generators (ListOps and Pathfinder as the Long Range Arena makes them,
//! associative recall) and
//! loaders of real data shipped by Debian packages (Fashion-MNIST images, fortune-cookie text).
//! No candle, no models: each task yields `(tokens, label)` examples per split, plus the sizes a
//! model needs ([`TaskInfo`]).
//!
//! ```
//! use randattn_tasks::{Split, TaskSpec};
//!
//! let task = TaskSpec::parse("listops", &[("min_length", "20"), ("max_length", "60")])?;
//! let examples = task.examples(0, Split::Train, 0..4)?;
//! assert!(examples.iter().all(|e| e.tokens.len() > 20 && e.tokens.len() < 60 && e.label < 10));
//! # Ok::<(), randattn_tasks::Error>(())
//! ```

#![warn(missing_docs)]

pub mod error;
pub mod image;
pub mod listops;
pub mod pathfinder;
pub mod recall;
pub mod registry;
pub mod split;
pub mod task;
pub mod text;

pub use error::{Error, Result};
pub use registry::{TaskDescription, TaskSpec};
pub use split::Split;
pub use task::{Example, Task, TaskInfo};
