//! What can go wrong when building a task's examples.

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Every error of the task library; none of them is a panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A task parameter out of range or in conflict with another.
    #[error("parameter `{param}` of task `{task}` must be {expected}, got {actual}")]
    Param {
        /// The task.
        task: &'static str,
        /// The parameter.
        param: &'static str,
        /// Its valid values.
        expected: String,
        /// The value given.
        actual: String,
    },
    /// A parameter the task does not have.
    #[error("task `{task}` has no parameter `{param}`; valid parameters: {valid}")]
    UnknownParam {
        /// The task.
        task: &'static str,
        /// The name given.
        param: String,
        /// The valid names.
        valid: String,
    },
    /// An unknown task name.
    #[error("unknown task `{name}`; valid tasks: {valid}")]
    UnknownTask {
        /// The name given.
        name: String,
        /// The valid names.
        valid: String,
    },
    /// Real data that is not installed.
    #[error("{what} not found at {path} ({cause}); install it with `{install}`")]
    Missing {
        /// What is missing.
        what: &'static str,
        /// Where it was looked for.
        path: String,
        /// The I/O error.
        cause: String,
        /// The command that installs it.
        install: &'static str,
    },
    /// Parameters under which the generator (almost) never produces an example.
    #[error(
        "task `{task}` found no {split} example in {candidates} candidates: its parameters leave \
         (almost) nothing to draw (an unreachable length window, say)"
    )]
    NoExample {
        /// The task.
        task: &'static str,
        /// The split.
        split: &'static str,
        /// Candidates drawn.
        candidates: usize,
    },
    /// A data file that does not have the expected format.
    #[error("{path}: {message}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl Error {
    pub(crate) fn param(
        task: &'static str,
        param: &'static str,
        expected: &str,
        actual: String,
    ) -> Self {
        Error::Param {
            task,
            param,
            expected: expected.to_string(),
            actual,
        }
    }
}

/// The shared parameter machinery reports in terms of methods; here they are tasks.
impl From<randattn::Error> for Error {
    fn from(e: randattn::Error) -> Self {
        match e {
            randattn::Error::Param {
                method,
                param,
                expected,
                actual,
            } => Error::Param {
                task: method,
                param,
                expected,
                actual,
            },
            randattn::Error::UnknownParam {
                method,
                param,
                valid,
            } => Error::UnknownParam {
                task: method,
                param,
                valid,
            },
            other => Error::Corrupt {
                path: String::new(),
                message: other.to_string(),
            },
        }
    }
}
