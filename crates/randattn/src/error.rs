//! The error type shared by every estimator.
//!
//! Messages name the argument, what was expected and what was found, so that a user reading
//! `q has shape [2, 4, 128, 64] but k has head dim 32` knows which tensor to fix.

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong when calling an estimator. No estimator panics on bad input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor's shape or length does not match what the call needs.
    #[error("{arg} {message}")]
    Shape {
        /// The argument at fault (`q`, `k`, `v`, `key_mask`, `grad_output`, ...).
        arg: &'static str,
        /// What is wrong, with expected and actual values.
        message: String,
    },
    /// A tensor holds NaN or ±Inf.
    #[error("{arg} contains a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        /// The argument at fault.
        arg: &'static str,
        /// Flat (row-major) index of the first non-finite element.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// A method parameter is out of its valid range or cannot be parsed.
    #[error("parameter `{param}` of method `{method}` must be {expected}, got {actual}")]
    Param {
        /// Method name as listed by `randattn methods`.
        method: &'static str,
        /// Parameter name.
        param: &'static str,
        /// Valid range or form.
        expected: String,
        /// The value supplied.
        actual: String,
    },
    /// A parameter name the method does not have.
    #[error("method `{method}` has no parameter `{param}`; valid parameters: {valid}")]
    UnknownParam {
        /// Method name.
        method: &'static str,
        /// The name supplied.
        param: String,
        /// Comma-separated list of valid names (or "none").
        valid: String,
    },
    /// A method name that does not exist.
    #[error("unknown method `{name}`; valid methods: {valid}")]
    UnknownMethod {
        /// The name supplied.
        name: String,
        /// Comma-separated list of valid names.
        valid: String,
    },
    /// A method spec (`NAME[:key=value]...`) that is not well formed.
    #[error("method spec `{spec}`: {message}")]
    Spec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        message: String,
    },
    /// The `saved` state handed to a backward pass does not come from this method's forward on
    /// these inputs.
    #[error("saved state {message}")]
    Saved {
        /// What does not match.
        message: String,
    },
}

impl Error {
    pub(crate) fn shape(arg: &'static str, message: impl Into<String>) -> Self {
        Error::Shape {
            arg,
            message: message.into(),
        }
    }
}
