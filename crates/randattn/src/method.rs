//! The one shape every estimator has: a validated config, `forward` and `backward`.
//!
//! Tests, benches, the CLI and (later) the candle ops only ever talk to [`Attention`] and
//! [`Method`], so a new estimator plugs in by adding its config type to the `methods!` list at
//! the bottom of this file.

use crate::error::{Error, Result};
use crate::inputs::{AttentionInputs, Dims};
use crate::methods::exact::{Exact, ExactNaive};
use crate::methods::informer::{Informer, InformerSaved};
use crate::methods::lara::{Lara, LaraSaved};
use crate::methods::linformer::{Linformer, LinformerSaved};
use crate::methods::mca::{Mca, McaSaved};
use crate::methods::nystrom::{Nystrom, NystromSaved};
use crate::methods::performer::{Performer, PerformerSaved};
use crate::methods::ra::{Ra, RaSaved};
use crate::methods::skeinformer::{SkeinSaved, Skeinformer, VMean};
use crate::methods::yoso::{Yoso, YosoE, YosoSaved};

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

/// The gradient of one learnable parameter of a method.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGrad {
    /// The parameter's name (as in `--set`).
    pub name: &'static str,
    /// Its shape.
    pub shape: Vec<usize>,
    /// `∂L/∂parameter`, row-major.
    pub grad: Vec<f32>,
}

/// State saved by a forward pass for its backward pass. Opaque: only the method that made it can
/// read it, and it checks that it is handed back with inputs of the same sizes.
#[derive(Debug, Clone)]
pub struct Saved {
    pub(crate) method: &'static str,
    pub(crate) dims: Dims,
    pub(crate) state: SavedState,
}

/// Per-method saved data.
#[derive(Debug, Clone)]
pub(crate) enum SavedState {
    /// Nothing beyond the inputs (the naive reference recomputes everything).
    Nothing,
    /// Exact attention: per-row log-sum-exp of the scaled logits (`+∞` for rows with no
    /// attended key or a masked query) and the output, for FlashAttention-2's `D = rowsum(dO∘O)`.
    Exact { lse: Vec<f32>, output: Vec<f32> },
    /// YOSO and YOSO-E: hash codes, the normalised attention branch, row norms, conv kernels.
    Yoso(Box<YosoSaved>),
    /// Informer: the active queries and the exact kernel's state on them.
    Informer(InformerSaved),
    /// Skeinformer: the sampled pilots and columns.
    Skeinformer(SkeinSaved),
    /// Nyströmformer: the conv kernels used.
    Nystrom(NystromSaved),
    /// Linformer: the projections used.
    Linformer(LinformerSaved),
    /// Performer: nothing (the directions are redrawn from the seed).
    Performer(PerformerSaved),
    /// RA: the components and noise drawn.
    Ra(RaSaved),
    /// LARA: nothing (the noise is redrawn from the seed).
    Lara(LaraSaved),
    /// MCA: the sampled values and their samples, and the exact kernel's state.
    Mca(Box<McaSaved>),
}

impl Saved {
    pub(crate) fn new(method: &'static str, dims: Dims, state: SavedState) -> Self {
        Saved {
            method,
            dims,
            state,
        }
    }

    /// Name of the method whose forward produced this state.
    pub fn method(&self) -> &'static str {
        self.method
    }

    /// Bytes held (for memory reporting).
    pub fn bytes(&self) -> usize {
        match &self.state {
            SavedState::Nothing => 0,
            SavedState::Exact { lse, output } => 4 * (lse.len() + output.len()),
            SavedState::Yoso(s) => s.bytes(),
            SavedState::Informer(s) => s.bytes(),
            SavedState::Skeinformer(s) => s.bytes(),
            SavedState::Nystrom(s) => s.bytes(),
            SavedState::Linformer(s) => s.bytes(),
            SavedState::Performer(_) => 0,
            SavedState::Ra(s) => s.bytes(),
            SavedState::Lara(_) => 0,
            SavedState::Mca(s) => s.bytes(),
        }
    }

    pub(crate) fn check(&self, method: &'static str, dims: Dims) -> Result<&SavedState> {
        if self.method != method {
            return Err(Error::Saved {
                message: format!(
                    "comes from method `{}` but the backward of `{method}` was called",
                    self.method
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
        Ok(&self.state)
    }
}

/// Forward and backward of one estimator. Implemented by every method config and by [`Method`].
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

/// Description of one parameter, as listed by `randattn methods`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamInfo {
    /// Name used with `--set name=value`.
    pub name: &'static str,
    /// Default value, as text.
    pub default: &'static str,
    /// Valid values.
    pub range: &'static str,
    /// What it does.
    pub help: &'static str,
}

/// Description of one method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodInfo {
    /// Name used with `--method`.
    pub name: &'static str,
    /// One-line description.
    pub summary: &'static str,
    /// Time and memory cost.
    pub cost: &'static str,
    /// Whether the output depends on the seed.
    pub random: bool,
    /// Whether the method approximates softmax attention (vs. a different kernel).
    pub approximates_softmax: bool,
    /// Its parameters.
    pub params: &'static [ParamInfo],
}

/// What every method config provides beyond [`Attention`].
pub trait MethodConfig: Attention + Default + Clone + std::fmt::Debug {
    /// The method's description and parameters.
    const INFO: MethodInfo;
    /// Sets one parameter from text (`--set name=value`); does not validate cross-parameter
    /// constraints (that is [`MethodConfig::validate`]).
    fn set(&mut self, name: &str, value: &str) -> Result<()>;
    /// Current parameter values, as text, in the order of `INFO.params`.
    fn params(&self) -> Vec<(&'static str, String)>;
    /// Checks every parameter's range.
    fn validate(&self) -> Result<()>;
}

/// Error for a parameter name the method does not have.
pub(crate) fn unknown_param(info: &MethodInfo, name: &str) -> Error {
    let valid: Vec<&str> = info.params.iter().map(|p| p.name).collect();
    Error::UnknownParam {
        method: info.name,
        param: name.to_string(),
        valid: if valid.is_empty() {
            "none".to_string()
        } else {
            valid.join(", ")
        },
    }
}

/// Parses a parameter value, turning a parse failure into an error quoting the valid range.
pub(crate) fn parse_value<T: std::str::FromStr>(
    info: &MethodInfo,
    param: &'static str,
    value: &str,
) -> Result<T> {
    value
        .trim()
        .parse()
        .map_err(|_| param_error(info, param, format!("`{value}`")))
}

/// Error for a parameter value out of range, quoting the range listed in `info`.
pub(crate) fn param_error(info: &MethodInfo, param: &'static str, actual: String) -> Error {
    Error::Param {
        method: info.name,
        param,
        expected: info
            .params
            .iter()
            .find(|p| p.name == param)
            .map_or("a valid value", |p| p.range)
            .to_string(),
        actual,
    }
}

macro_rules! methods {
    ($($variant:ident($ty:ty)),+ $(,)?) => {
        /// Every estimator, each with its config. Parse one from a name and `name=value` pairs
        /// with [`Method::parse`]; list them with [`Method::catalog`].
        #[derive(Debug, Clone)]
        #[non_exhaustive]
        pub enum Method {
            $(
                #[doc = concat!("See [`", stringify!($ty), "`].")]
                $variant($ty),
            )+
        }

        impl Method {
            /// Descriptions of every method, in the order `randattn methods` prints them.
            pub fn catalog() -> Vec<MethodInfo> {
                vec![$(<$ty as MethodConfig>::INFO),+]
            }

            /// The method called `name`, with default parameters.
            pub fn from_name(name: &str) -> Result<Method> {
                $(
                    if name == <$ty as MethodConfig>::INFO.name {
                        return Ok(Method::$variant(<$ty>::default()));
                    }
                )+
                Err(Error::UnknownMethod {
                    name: name.to_string(),
                    valid: Self::catalog().iter().map(|m| m.name).collect::<Vec<_>>().join(", "),
                })
            }

            /// This method's description.
            pub fn info(&self) -> MethodInfo {
                match self { $(Method::$variant(_) => <$ty as MethodConfig>::INFO),+ }
            }

            /// Sets one parameter from text.
            pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
                match self { $(Method::$variant(c) => c.set(name, value)),+ }
            }

            /// Current parameter values as text.
            pub fn params(&self) -> Vec<(&'static str, String)> {
                match self { $(Method::$variant(c) => c.params()),+ }
            }

            /// Checks every parameter.
            pub fn validate(&self) -> Result<()> {
                match self { $(Method::$variant(c) => c.validate()),+ }
            }
        }

        impl Attention for Method {
            fn forward(&self, inputs: &AttentionInputs<'_>, seed: u64) -> Result<Forward> {
                match self { $(Method::$variant(c) => c.forward(inputs, seed)),+ }
            }

            fn backward(
                &self,
                inputs: &AttentionInputs<'_>,
                seed: u64,
                saved: &Saved,
                grad_output: &[f32],
            ) -> Result<Grads> {
                match self { $(Method::$variant(c) => c.backward(inputs, seed, saved, grad_output)),+ }
            }
        }
    };
}

// One line per method.
methods! {
    ExactNaive(ExactNaive),
    Exact(Exact),
    Yoso(Yoso),
    YosoE(YosoE),
    Informer(Informer),
    Skeinformer(Skeinformer),
    VMean(VMean),
    Nystrom(Nystrom),
    Linformer(Linformer),
    Performer(Performer),
    Ra(Ra),
    Lara(Lara),
    Mca(Mca),
}

impl Method {
    /// The method's tensor parameters (learnable, too large for `--set`) and their ranks:
    /// YOSO's and Nyströmformer's `conv_weights` `[heads, conv]`, Linformer's `e` and `f`
    /// `[heads, k, n_k]`, LARA's `proposal_means` `[heads, proposals, d]`.
    pub fn tensor_params(&self) -> &'static [(&'static str, usize)] {
        match self {
            Method::Yoso(_) | Method::YosoE(_) | Method::Nystrom(_) => &[("conv_weights", 2)],
            Method::Linformer(_) => &[("e", 3), ("f", 3)],
            Method::Lara(_) => &[("proposal_means", 3)],
            _ => &[],
        }
    }

    /// The rank of tensor parameter `name`, or an error listing the valid names.
    pub fn tensor_rank(&self, name: &str) -> Result<usize> {
        match self.tensor_params().iter().find(|(n, _)| *n == name) {
            Some(&(_, rank)) => Ok(rank),
            None => {
                let valid: Vec<&str> = self.tensor_params().iter().map(|(n, _)| *n).collect();
                Err(Error::UnknownParam {
                    method: self.info().name,
                    param: name.to_string(),
                    valid: if valid.is_empty() {
                        "none (this method has no tensor parameters)".to_string()
                    } else {
                        valid.join(", ")
                    },
                })
            }
        }
    }

    /// Sets a tensor parameter (see [`Self::tensor_params`]) from its row-major data and shape.
    /// Linformer's `e`/`f` also set `k = shape[1]` and LARA's `proposal_means` set
    /// `proposals = shape[1]`; whether the sizes fit the inputs is checked by the forward.
    pub fn set_tensor(&mut self, name: &str, data: Vec<f32>, shape: &[usize]) -> Result<()> {
        let info = self.info();
        let rank = self.tensor_rank(name)?;
        let count: usize = shape.iter().product();
        if shape.len() != rank || count != data.len() || count == 0 {
            return Err(Error::shape(
                "param",
                format!(
                    "`{name}` of {} must be a non-empty rank-{rank} tensor, got shape {shape:?} with {} values",
                    info.name,
                    data.len()
                ),
            ));
        }
        crate::inputs::check_finite("param", &data)?;
        match self {
            Method::Yoso(c) => c.conv_weights = Some(data),
            Method::YosoE(c) => c.conv_weights = Some(data),
            Method::Nystrom(c) => c.conv_weights = Some(data),
            Method::Linformer(c) => {
                let mut p =
                    c.projections
                        .take()
                        .unwrap_or(crate::methods::linformer::Projections {
                            e: Vec::new(),
                            f: Vec::new(),
                        });
                if name == "e" {
                    p.e = data;
                } else {
                    p.f = data;
                }
                c.k = shape[1];
                c.projections = Some(p);
            }
            Method::Lara(c) => {
                c.proposals = shape[1];
                c.proposal_means = Some(data);
            }
            _ => unreachable!("tensor_params lists only the methods above"),
        }
        Ok(())
    }

    /// The method's name as used with `--method`.
    pub fn name(&self) -> &'static str {
        self.info().name
    }

    /// Builds a method from its name and `name=value` settings, then validates it.
    pub fn parse<S: AsRef<str>>(name: &str, settings: &[(S, S)]) -> Result<Method> {
        let mut method = Method::from_name(name)?;
        for (k, v) in settings {
            method.set(k.as_ref(), v.as_ref())?;
        }
        method.validate()?;
        Ok(method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalogued_method_parses_with_defaults_and_lists_its_params() {
        for info in Method::catalog() {
            let m = Method::parse::<&str>(info.name, &[]).unwrap();
            assert_eq!(m.name(), info.name);
            let names: Vec<_> = m.params().iter().map(|(n, _)| *n).collect();
            let listed: Vec<_> = info.params.iter().map(|p| p.name).collect();
            assert_eq!(names, listed, "{}", info.name);
        }
    }

    #[test]
    fn unknown_names_and_params_list_the_valid_ones() {
        let err = Method::from_name("softmax").unwrap_err().to_string();
        assert!(
            err.contains("unknown method `softmax`") && err.contains("exact-naive, exact"),
            "{err}"
        );
        let err = Method::parse("exact", &[("temperature", "2")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "method `exact` has no parameter `temperature`; valid parameters: scale"
        );
        let err = Method::parse("exact", &[("scale", "-1")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("parameter `scale` of method `exact` must be"),
            "{err}"
        );
        let err = Method::parse("exact", &[("scale", "abc")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("got `abc`"), "{err}");
    }
}
