//! The registry: every method by name. The only file that knows the list of methods.
//!
//! Tests, benches, the CLI and the candle ops talk to [`Method`] (or any [`Attention`]), so a new
//! estimator is its file in `methods/`, one module line in `methods/mod.rs`, and one line in the
//! `methods!` list at the bottom of this file.

use crate::error::{Error, Result};
use crate::estimator::{Attention, Estimator, Forward, Grads, MethodInfo, Saved};
use crate::inputs::AttentionInputs;
use crate::methods::exact::{Exact, ExactNaive};
use crate::methods::informer::Informer;
use crate::methods::lara::Lara;
use crate::methods::linformer::Linformer;
use crate::methods::mca::Mca;
use crate::methods::nystrom::Nystrom;
use crate::methods::performer::Performer;
use crate::methods::ra::Ra;
use crate::methods::skeinformer::Skeinformer;
use crate::methods::vmean::VMean;
use crate::methods::yoso::{Yoso, YosoE};
use crate::params::{self, ParamInfo};

/// One method as `randattn methods` lists it: its description and its parameters with their
/// defaults, valid values and help.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodDescription {
    /// Name, summary, cost and capabilities.
    pub info: MethodInfo,
    /// The text parameters, in declaration order.
    pub params: Vec<ParamInfo>,
}

impl std::ops::Deref for MethodDescription {
    type Target = MethodInfo;
    fn deref(&self) -> &MethodInfo {
        &self.info
    }
}

fn describe<E: Estimator>() -> MethodDescription {
    MethodDescription {
        info: E::INFO,
        params: params::infos::<E>(),
    }
}

macro_rules! methods {
    ($($variant:ident($ty:ty)),+ $(,)?) => {
        /// Every estimator, each with its config. Parse one from a spec with
        /// [`Method::from_spec`]; list them with [`Method::catalog`].
        #[derive(Debug, Clone)]
        #[non_exhaustive]
        pub enum Method {
            $(
                #[doc = concat!("See [`", stringify!($ty), "`].")]
                $variant($ty),
            )+
        }

        $(
            impl From<$ty> for Method {
                fn from(config: $ty) -> Method {
                    Method::$variant(config)
                }
            }
        )+

        impl Method {
            /// Descriptions of every method, in the order `randattn methods` prints them.
            pub fn catalog() -> Vec<MethodDescription> {
                vec![$(describe::<$ty>()),+]
            }

            /// The method called `name`, with default parameters.
            pub fn from_name(name: &str) -> Result<Method> {
                $(
                    if name == <$ty as Estimator>::INFO.name {
                        return Ok(Method::$variant(<$ty>::default()));
                    }
                )+
                Err(Error::UnknownMethod {
                    name: name.to_string(),
                    valid: [$(<$ty as Estimator>::INFO.name),+].join(", "),
                })
            }

            /// This method's description and capabilities.
            pub fn info(&self) -> MethodInfo {
                match self { $(Method::$variant(_) => <$ty as Estimator>::INFO),+ }
            }

            /// Sets one parameter from text (does not check rules between parameters: that is
            /// [`Method::validate`]).
            pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
                let method = self.name();
                match self { $(Method::$variant(c) => params::set(method, c, name, value)),+ }
            }

            /// Current parameter values as text, in declaration order.
            pub fn params(&self) -> Vec<(&'static str, String)> {
                match self { $(Method::$variant(c) => params::values(c)),+ }
            }

            /// Checks every parameter and the rules between them.
            pub fn validate(&self) -> Result<()> {
                match self { $(Method::$variant(c) => c.validate()),+ }
            }

            /// The method this one estimates by sampling, if any (`yoso` → `yoso-e`).
            pub fn expectation(&self) -> Option<Box<dyn Attention + Send + Sync>> {
                match self { $(Method::$variant(c) => Estimator::expectation(c)),+ }
            }

            /// Whether this configuration's output depends on the seed (see
            /// [`Estimator::uses_seed`]).
            pub fn uses_seed(&self) -> bool {
                match self { $(Method::$variant(c) => c.uses_seed()),+ }
            }

            /// The memory a forward, and a forward then a backward, need beyond their inputs
            /// on inputs of sizes `s` (an estimate from the method's buffers: see
            /// [`crate::memory`]). [`Sizes::new`](crate::memory::Sizes::new) makes `s` from
            /// the inputs' [`Dims`](crate::Dims) and the thread count.
            pub fn memory(&self, s: &crate::memory::Sizes) -> crate::memory::Memory {
                match self { $(Method::$variant(c) => c.memory(s)),+ }
            }

            fn store_tensor(&mut self, name: &str, data: Vec<f32>, shape: &[usize]) -> Result<()> {
                match self { $(Method::$variant(c) => c.store_tensor(name, data, shape)),+ }
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
    /// The method's tensor parameters (learnable, too large for text) with their ranks, as
    /// `(name, rank)`: see [`MethodInfo::tensor_params`] for their shapes.
    pub fn tensor_params(&self) -> Vec<(&'static str, usize)> {
        self.info()
            .tensor_params
            .iter()
            .map(|t| (t.name, t.rank))
            .collect()
    }

    /// The rank of tensor parameter `name`, or an error listing the valid names.
    pub fn tensor_rank(&self, name: &str) -> Result<usize> {
        let info = self.info();
        match info.tensor_params.iter().find(|t| t.name == name) {
            Some(t) => Ok(t.rank),
            None => Err(Error::UnknownParam {
                method: info.name,
                param: name.to_string(),
                valid: if info.tensor_params.is_empty() {
                    "none (this method has no tensor parameters)".to_string()
                } else {
                    let names: Vec<&str> = info.tensor_params.iter().map(|t| t.name).collect();
                    names.join(", ")
                },
            }),
        }
    }

    /// Sets a tensor parameter (see [`MethodInfo::tensor_params`]) from its row-major data and
    /// shape. Linformer's `e`/`f` also set `k = shape[1]` and LARA's `proposal_means` set
    /// `proposals = shape[1]`; whether the sizes fit the inputs is checked by the forward.
    pub fn set_tensor(&mut self, name: &str, data: Vec<f32>, shape: &[usize]) -> Result<()> {
        let rank = self.tensor_rank(name)?;
        let count: usize = shape.iter().product();
        if shape.len() != rank || count != data.len() || count == 0 {
            return Err(Error::shape(
                "param",
                format!(
                    "`{name}` of {} must be a non-empty rank-{rank} tensor, got shape {shape:?} with {} values",
                    self.name(),
                    data.len()
                ),
            ));
        }
        crate::inputs::check_finite("param", &data)?;
        self.store_tensor(name, data, shape)
    }

    /// The method's name as used in method specs.
    pub fn name(&self) -> &'static str {
        self.info().name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_budget_is_a_count_parameter_of_its_method() {
        let mut with_budget = 0;
        for info in Method::catalog() {
            let Some(budget) = info.budget else { continue };
            with_budget += 1;
            let p = info.params.iter().find(|p| p.name == budget);
            let p = p.unwrap_or_else(|| panic!("{}: budget `{budget}` is no parameter", info.name));
            assert!(
                p.default.parse::<u64>().is_ok(),
                "{}: {}",
                info.name,
                p.default
            );
            // A budget of 8 is valid for every method that has one.
            Method::parse(info.name, &[(budget, "8")]).unwrap();
        }
        assert!(with_budget >= 8, "{with_budget} methods with a budget");
    }

    #[test]
    fn every_catalogued_method_parses_with_defaults_and_lists_its_params() {
        for info in Method::catalog() {
            let m = Method::parse::<&str>(info.name, &[]).unwrap();
            assert_eq!(m.name(), info.name);
            let names: Vec<_> = m.params().iter().map(|(n, _)| *n).collect();
            let listed: Vec<_> = info.params.iter().map(|p| p.name).collect();
            assert_eq!(names, listed, "{}", info.name);
            let defaults: Vec<_> = info.params.iter().map(|p| p.default.clone()).collect();
            let values: Vec<_> = m.params().into_iter().map(|(_, v)| v).collect();
            assert_eq!(defaults, values, "{}", info.name);
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

    #[test]
    fn capabilities_are_declared_not_guessed_from_names() {
        for info in Method::catalog() {
            assert_eq!(
                info.needs_value_projection,
                info.name == "mca",
                "{}",
                info.name
            );
            let m = Method::from_name(info.name).unwrap();
            assert_eq!(
                m.expectation().is_some(),
                info.name == "yoso",
                "{}",
                info.name
            );
        }
    }
}
