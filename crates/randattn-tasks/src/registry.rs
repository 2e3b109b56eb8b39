//! Every task by name: the only file that lists them.

use std::ops::Range;

use randattn::params::{self, ParamInfo};

use crate::error::{Error, Result};
use crate::image::Image;
use crate::listops::ListOps;
use crate::pathfinder::Pathfinder;
use crate::recall::Recall;
use crate::split::Split;
use crate::task::{Example, Task, TaskInfo};
use crate::text::Text;

/// A task as `randattn data --list` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskDescription {
    /// Name.
    pub name: &'static str,
    /// One-line description.
    pub summary: &'static str,
    /// Parameters with defaults, valid values and help.
    pub params: Vec<ParamInfo>,
}

macro_rules! tasks {
    ($($variant:ident($ty:ty)),+ $(,)?) => {
        /// Every task with its parameters. Parse one with [`TaskSpec::parse`].
        #[derive(Debug, Clone)]
        #[non_exhaustive]
        pub enum TaskSpec {
            $(
                #[doc = concat!("See [`", stringify!($ty), "`].")]
                $variant($ty),
            )+
        }

        impl TaskSpec {
            /// Every task, in listing order.
            pub fn catalog() -> Vec<TaskDescription> {
                vec![$(TaskDescription {
                    name: <$ty as Task>::NAME,
                    summary: <$ty as Task>::SUMMARY,
                    params: params::infos::<$ty>(),
                }),+]
            }

            /// The task called `name` with default parameters.
            pub fn from_name(name: &str) -> Result<TaskSpec> {
                $(
                    if name == <$ty as Task>::NAME {
                        return Ok(TaskSpec::$variant(<$ty>::default()));
                    }
                )+
                Err(Error::UnknownTask {
                    name: name.to_string(),
                    valid: [$(<$ty as Task>::NAME),+].join(", "),
                })
            }

            /// The task's name.
            pub fn name(&self) -> &'static str {
                match self { $(TaskSpec::$variant(_) => <$ty as Task>::NAME),+ }
            }

            /// Sets one parameter from text.
            pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
                let name = self.name();
                match self { $(TaskSpec::$variant(t) => params::set(name, t, key, value)?),+ }
                Ok(())
            }

            /// Current parameter values as text.
            pub fn params(&self) -> Vec<(&'static str, String)> {
                match self { $(TaskSpec::$variant(t) => params::values(t)),+ }
            }

            /// Checks every parameter and the rules between them.
            pub fn validate(&self) -> Result<()> {
                match self { $(TaskSpec::$variant(t) => t.validate()),+ }
            }

            /// The sizes a model needs.
            pub fn info(&self) -> TaskInfo {
                match self { $(TaskSpec::$variant(t) => t.info()),+ }
            }

            /// `[train, dev, test]` sizes (fixed for real data; the default set size for
            /// generated tasks).
            pub fn split_sizes(&self) -> Result<[usize; 3]> {
                match self { $(TaskSpec::$variant(t) => t.split_sizes()),+ }
            }

            /// Examples `range` of `split` (see [`Task::examples`]).
            pub fn examples(&self, seed: u64, split: Split, range: Range<usize>) -> Result<Vec<Example>> {
                match self { $(TaskSpec::$variant(t) => t.examples(seed, split, range)),+ }
            }

            /// [`Task::examples_within`]: at most `max_candidates` candidates per example.
            pub fn examples_within(&self, seed: u64, split: Split, range: Range<usize>, max_candidates: usize) -> Result<Vec<Example>> {
                match self { $(TaskSpec::$variant(t) => t.examples_within(seed, split, range, max_candidates)),+ }
            }
        }
    };
}

tasks! {
    ListOps(ListOps),
    Pathfinder(Pathfinder),
    Text(Text),
    Image(Image),
    Recall(Recall),
}

impl TaskSpec {
    /// A task from its name and `key=value` settings, validated.
    pub fn parse<S: AsRef<str>>(name: &str, settings: &[(S, S)]) -> Result<TaskSpec> {
        let mut task = TaskSpec::from_name(name.trim())?;
        for (k, v) in settings {
            task.set(k.as_ref().trim(), v.as_ref().trim())?;
        }
        task.validate()?;
        Ok(task)
    }
}
