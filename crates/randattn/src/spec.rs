//! The one way to name a configured method in text: `NAME[:key=value[:key=value]...]`.
//!
//! `performer:features=64:kernel=hyperbolic` is Performer with 64 features and the hyperbolic
//! feature map, every other parameter at its default. The CLI takes this grammar wherever it
//! takes a method (`run --method`, `embed --attention`, `compare`/`bench`/`fidelity --methods`),
//! lists of specs are comma-separated, and [`Method::spec`] writes it back, so a spec read from a
//! results file names exactly the method that produced them.
//!
//! A value may itself hold commas (YOSO's `conv_weights=0.1,0.2,0.3`): in a list, an item that
//! does not start with a letter continues the previous item's value, since every method name
//! starts with a letter and no list value does.

use crate::error::{Error, Result};
use crate::registry::Method;

impl Method {
    /// Parses `NAME[:key=value]...` into a validated method. Keys and values are trimmed; a key
    /// given twice keeps the last value.
    pub fn from_spec(spec: &str) -> Result<Method> {
        Self::parse(spec, &[] as &[(&str, &str)])
    }

    /// Like [`Method::from_spec`], then applies `settings` (the CLI's `--set key=value`, which
    /// therefore means exactly the same as `:key=value` at the end of the spec), then validates.
    /// A plain name is a spec, so `Method::parse("exact", &[("scale", "0.5")])` works too.
    pub fn parse<S: AsRef<str>>(spec: &str, settings: &[(S, S)]) -> Result<Method> {
        let mut parts = spec.split(':');
        let name = parts.next().unwrap_or_default().trim();
        let mut method = Method::from_name(name)?;
        for part in parts {
            let (key, value) = split_setting(spec, part)?;
            method.set(key, value)?;
        }
        for (k, v) in settings {
            method.set(k.as_ref().trim(), v.as_ref().trim())?;
        }
        method.validate()?;
        Ok(method)
    }

    /// Parses a comma-separated list of specs (see the module documentation for commas inside
    /// values). Empty items are ignored; an empty list is an error.
    pub fn list_from_specs(list: &str) -> Result<Vec<Method>> {
        split_spec_list(list)?
            .iter()
            .map(|s| Method::from_spec(s))
            .collect()
    }

    /// The spec of this method: its name followed by every parameter that differs from the
    /// default, in declaration order (`performer:features=64`; `exact` for the defaults).
    /// [`Method::from_spec`] of it gives back an equal configuration.
    pub fn spec(&self) -> String {
        let defaults = Method::from_name(self.name())
            .map(|m| m.params())
            .unwrap_or_default();
        let mut spec = self.name().to_string();
        for (key, value) in self.params() {
            if !defaults.iter().any(|(k, v)| *k == key && *v == value) {
                spec.push(':');
                spec.push_str(key);
                spec.push('=');
                spec.push_str(&value);
            }
        }
        spec
    }
}

/// Splits a comma-separated list of specs, keeping commas inside values with their spec.
pub fn split_spec_list(list: &str) -> Result<Vec<String>> {
    let mut specs: Vec<String> = Vec::new();
    for item in list.split(',') {
        let trimmed = item.trim();
        let continues_value = !trimmed.is_empty()
            && !trimmed.starts_with(|c: char| c.is_ascii_alphabetic())
            && specs.last().is_some_and(|s| s.contains('='));
        match specs.last_mut() {
            Some(last) if continues_value => {
                last.push(',');
                last.push_str(trimmed);
            }
            _ if trimmed.is_empty() => {}
            _ => specs.push(trimmed.to_string()),
        }
    }
    if specs.is_empty() {
        return Err(Error::Spec {
            spec: list.to_string(),
            message: "the list names no method".to_string(),
        });
    }
    Ok(specs)
}

fn split_setting<'a>(spec: &str, part: &'a str) -> Result<(&'a str, &'a str)> {
    match part.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim(), v.trim())),
        _ => Err(Error::Spec {
            spec: spec.to_string(),
            message: format!("`{part}` is not key=value"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_sets_parameters_and_writes_back_only_the_changed_ones() {
        let m = Method::from_spec("performer:features=64:kernel=hyperbolic").unwrap();
        assert_eq!(m.spec(), "performer:features=64:kernel=hyperbolic");
        let set =
            Method::parse("performer", &[("features", "64"), ("kernel", "hyperbolic")]).unwrap();
        assert_eq!(set.params(), m.params());
        assert_eq!(Method::from_spec("exact").unwrap().spec(), "exact");
        assert_eq!(
            Method::from_spec(" mca : alpha = 0.5 ").unwrap().spec(),
            "mca:alpha=0.5"
        );
        for info in Method::catalog() {
            let m = Method::from_spec(info.name).unwrap();
            assert_eq!(m.spec(), info.name);
        }
    }

    #[test]
    fn lists_keep_commas_inside_values() {
        let specs =
            split_spec_list("exact, yoso:conv=3:conv_weights=0.5,-1,2e-1 ,performer").unwrap();
        assert_eq!(
            specs,
            ["exact", "yoso:conv=3:conv_weights=0.5,-1,2e-1", "performer"]
        );
        let methods = Method::list_from_specs("exact,nystrom:landmarks=8,,lara").unwrap();
        let names: Vec<_> = methods.iter().map(|m| m.spec()).collect();
        assert_eq!(names, ["exact", "nystrom:landmarks=8", "lara"]);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let err = Method::from_spec("performer:features")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "method spec `performer:features`: `features` is not key=value"
        );
        let err = Method::from_spec("performer:=3").unwrap_err().to_string();
        assert!(err.contains("`=3` is not key=value"), "{err}");
        let err = Method::from_spec("perfomer:features=3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown method `perfomer`"), "{err}");
        let err = Method::from_spec("performer:features=0")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("parameter `features` of method `performer`"),
            "{err}"
        );
        let err = Method::list_from_specs(" , ").unwrap_err().to_string();
        assert!(err.contains("names no method"), "{err}");
    }
}
