//! Method parameters, declared once.
//!
//! Each method declares its parameters in one [`method_params!`](crate::method_params) block:
//! name, type, default, valid values ([`Rule`]) and help, all in one place per parameter. The
//! struct, its `Default`, text parsing (`--set name=value` and method specs), the listing of
//! `randattn methods` and range validation all derive from that block, so they cannot drift.
//! Rules that tie two parameters together stay in the method's `check`.

use std::fmt::Write as _;

use crate::error::{Error, Result};

/// A parameter whose value is either derived from the inputs (`auto`) or fixed by the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Auto<T> {
    /// Chosen from the inputs when the method runs (the documented rule of each parameter).
    #[default]
    Auto,
    /// Given.
    Fixed(T),
}

impl<T> Auto<T> {
    /// The fixed value, if any.
    pub fn fixed(self) -> Option<T> {
        match self {
            Auto::Auto => None,
            Auto::Fixed(v) => Some(v),
        }
    }

    /// The fixed value, or `auto()` for `auto`.
    pub fn or_else(self, auto: impl FnOnce() -> T) -> T {
        self.fixed().unwrap_or_else(auto)
    }

    /// A reference to the fixed value, if any.
    pub fn as_ref(&self) -> Auto<&T> {
        match self {
            Auto::Auto => Auto::Auto,
            Auto::Fixed(v) => Auto::Fixed(v),
        }
    }

    /// Whether the value is `auto`.
    pub fn is_auto(&self) -> bool {
        matches!(self, Auto::Auto)
    }
}

/// A type a parameter can have: how it reads and writes as text.
pub trait ParamValue: Clone + PartialEq + Send + Sync + 'static {
    /// Parses the text form (already trimmed); `None` if it is not a value of this type.
    fn from_text(text: &str) -> Option<Self>;
    /// The text form, which [`ParamValue::from_text`] reads back.
    fn to_text(&self) -> String;
    /// What any value of the type looks like (the valid range when no [`Rule`] narrows it).
    fn kind() -> String;
}

macro_rules! number_value {
    ($($ty:ty => $kind:literal),+) => {$(
        impl ParamValue for $ty {
            fn from_text(text: &str) -> Option<Self> {
                text.parse().ok()
            }
            fn to_text(&self) -> String {
                self.to_string()
            }
            fn kind() -> String {
                $kind.to_string()
            }
        }
    )+};
}
number_value!(usize => "an integer >= 0", u32 => "an integer >= 0", u64 => "an integer >= 0", f32 => "a number");

impl ParamValue for bool {
    fn from_text(text: &str) -> Option<Self> {
        text.parse().ok()
    }
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn kind() -> String {
        "`true` or `false`".to_string()
    }
}

/// Free text (a path, say).
impl ParamValue for String {
    fn from_text(text: &str) -> Option<Self> {
        Some(text.to_string())
    }
    fn to_text(&self) -> String {
        self.clone()
    }
    fn kind() -> String {
        "any text".to_string()
    }
}

/// A comma-separated list of numbers (YOSO's and Nyströmformer's `conv_weights`).
impl ParamValue for Vec<f32> {
    fn from_text(text: &str) -> Option<Self> {
        text.split(',').map(|w| w.trim().parse().ok()).collect()
    }
    fn to_text(&self) -> String {
        self.iter()
            .map(f32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
    fn kind() -> String {
        "comma-separated numbers".to_string()
    }
}

impl<T: ParamValue> ParamValue for Auto<T> {
    fn from_text(text: &str) -> Option<Self> {
        if text == "auto" {
            Some(Auto::Auto)
        } else {
            T::from_text(text).map(Auto::Fixed)
        }
    }
    fn to_text(&self) -> String {
        match self {
            Auto::Auto => "auto".to_string(),
            Auto::Fixed(v) => v.to_text(),
        }
    }
    fn kind() -> String {
        format!("`auto` or {}", T::kind())
    }
}

/// A parameter type with a fixed set of spellings (`kernel=positive|hyperbolic`).
pub trait Choice: Copy + PartialEq + Send + Sync + 'static {
    /// Every value with its spelling, in the order they are listed.
    const ALL: &'static [(Self, &'static str)];

    /// The spelling of this value.
    fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(v, _)| *v == self)
            .map_or("?", |(_, n)| n)
    }
}

/// Lists spellings as "`a`, `b` or `c`".
fn either<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.into_iter().map(|n| format!("`{n}`")).collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// Declares a parameter enum with its spellings: `FromStr`, `Display` and [`ParamValue`] follow.
#[macro_export]
macro_rules! choice {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $crate::params::Choice for $name {
            const ALL: &'static [(Self, &'static str)] = &[$(($name::$variant, $text)),+];
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str($crate::params::Choice::name(*self))
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(text: &str) -> std::result::Result<Self, String> {
                <Self as $crate::params::ParamValue>::from_text(text.trim())
                    .ok_or_else(|| format!("`{text}` is not {}", <Self as $crate::params::ParamValue>::kind()))
            }
        }

        impl $crate::params::ParamValue for $name {
            fn from_text(text: &str) -> Option<Self> {
                <Self as $crate::params::Choice>::ALL
                    .iter()
                    .find(|(_, n)| *n == text)
                    .map(|(v, _)| *v)
            }
            fn to_text(&self) -> String {
                $crate::params::Choice::name(*self).to_string()
            }
            fn kind() -> String {
                $crate::params::choice_kind::<Self>()
            }
        }
    };
}

/// The valid range of a [`Choice`] type: "`a`, `b` or `c`".
pub fn choice_kind<C: Choice>() -> String {
    either(C::ALL.iter().map(|(_, n)| *n))
}

type Check<T> = Box<dyn Fn(&T) -> std::result::Result<(), String> + Send + Sync>;

/// The valid values of one parameter: a description (shown by `randattn methods` and in errors)
/// and the test that goes with it. The test may explain a refusal with a hint, appended to the
/// error message.
pub struct Rule<T> {
    text: String,
    check: Check<T>,
}

impl<T: ParamValue> Rule<T> {
    /// Every value of the type.
    pub fn any() -> Self {
        Rule {
            text: T::kind(),
            check: Box::new(|_| Ok(())),
        }
    }

    /// Values passing `ok`, described by `text`.
    pub fn new(text: &str, ok: impl Fn(&T) -> bool + Send + Sync + 'static) -> Self {
        Rule {
            text: text.to_string(),
            check: Box::new(move |v| if ok(v) { Ok(()) } else { Err(String::new()) }),
        }
    }

    /// Adds a remark to the description: "an integer in 1..=4096 (capped by the tokens)".
    pub fn note(mut self, remark: &str) -> Self {
        let _ = write!(self.text, " ({remark})");
        self
    }

    /// Adds an explanation to the error for values that fail the rule.
    pub fn hint(self, why: impl Fn(&T) -> &'static str + Send + Sync + 'static) -> Self {
        let check = self.check;
        Rule {
            text: self.text,
            check: Box::new(move |v| check(v).map_err(|_| why(v).to_string())),
        }
    }

    /// The description of the valid values.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// An integer parameter type, for [`in_range`] and [`at_least`].
pub trait Integer: ParamValue + Copy {
    /// The value as `u64` (saturating).
    fn to_u64(self) -> u64;
}
impl Integer for u32 {
    fn to_u64(self) -> u64 {
        self.into()
    }
}
impl Integer for u64 {
    fn to_u64(self) -> u64 {
        self
    }
}
impl Integer for usize {
    fn to_u64(self) -> u64 {
        u64::try_from(self).unwrap_or(u64::MAX)
    }
}

/// Integers in `lo..=hi`.
pub fn in_range<T: Integer>(lo: u64, hi: u64) -> Rule<T> {
    Rule::new(&format!("an integer in {lo}..={hi}"), move |v: &T| {
        (lo..=hi).contains(&v.to_u64())
    })
}

/// Integers `>= lo`.
pub fn at_least<T: Integer>(lo: u64) -> Rule<T> {
    Rule::new(&format!("an integer >= {lo}"), move |v: &T| {
        v.to_u64() >= lo
    })
}

/// Finite numbers `> 0`.
pub fn positive() -> Rule<f32> {
    Rule::new("a finite number > 0", |v: &f32| v.is_finite() && *v > 0.0)
}

/// Finite numbers.
pub fn finite() -> Rule<f32> {
    Rule::new("a finite number", |v: &f32| v.is_finite())
}

/// Some values of a [`Choice`] type.
pub fn one_of<C: Choice + ParamValue>(allowed: &'static [C]) -> Rule<C> {
    Rule::new(&either(allowed.iter().map(|c| c.name())), move |v: &C| {
        allowed.contains(v)
    })
}

/// `auto` (derived as `how` says) or a value passing `fixed`.
pub fn auto<T: ParamValue>(how: &str, fixed: Rule<T>) -> Rule<Auto<T>> {
    let text = format!("`auto` ({how}) or {}", fixed.text);
    let check = fixed.check;
    Rule {
        text,
        check: Box::new(move |v| match v {
            Auto::Auto => Ok(()),
            Auto::Fixed(x) => check(x),
        }),
    }
}

/// The softmax-scale parameter every softmax method has.
pub fn scale_rule() -> Rule<Auto<f32>> {
    auto("1/sqrt(d)", positive())
}

/// The softmax scale actually used: the configured one, or `1/√d`.
pub fn resolve_scale(scale: Auto<f32>, d: usize) -> f32 {
    scale.or_else(|| 1.0 / (d as f32).sqrt())
}

type Getter<C> = Box<dyn Fn(&C) -> String + Send + Sync>;
type Setter<C> = Box<dyn Fn(&mut C, &str) -> bool + Send + Sync>;
type Checker<C> = Box<dyn Fn(&C) -> std::result::Result<(), String> + Send + Sync>;

/// One declared parameter of the method config `C`.
pub struct Param<C> {
    name: &'static str,
    help: &'static str,
    range: String,
    get: Getter<C>,
    set: Setter<C>,
    check: Checker<C>,
}

impl<C: 'static> Param<C> {
    /// A parameter stored in the field that `field`/`field_mut` reach, valid per `rule`.
    pub fn new<T: ParamValue>(
        name: &'static str,
        help: &'static str,
        field: fn(&C) -> &T,
        field_mut: fn(&mut C) -> &mut T,
        rule: Rule<T>,
    ) -> Self {
        let check = rule.check;
        Param {
            name,
            help: help.trim(),
            range: rule.text,
            get: Box::new(move |c| field(c).to_text()),
            set: Box::new(move |c, text| match T::from_text(text) {
                Some(v) => {
                    *field_mut(c) = v;
                    true
                }
                None => false,
            }),
            check: Box::new(move |c| check(field(c))),
        }
    }
}

/// Description of one parameter, as listed by `randattn methods`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Name used in a method spec (`name:key=value`) and with `--set key=value`.
    pub name: &'static str,
    /// Default value, as text.
    pub default: String,
    /// Valid values.
    pub range: String,
    /// What it does.
    pub help: &'static str,
}

/// A config whose parameters are declared with [`method_params!`](crate::method_params).
pub trait Params: Default + Sized + 'static {
    /// The declared parameters, in declaration order.
    fn table() -> &'static [Param<Self>];
}

/// Sets parameter `name` of `config` from text; `method` names the method in errors.
pub fn set<C: Params>(method: &'static str, config: &mut C, name: &str, value: &str) -> Result<()> {
    let table = C::table();
    let Some(p) = table.iter().find(|p| p.name == name) else {
        return Err(Error::UnknownParam {
            method,
            param: name.to_string(),
            valid: if table.is_empty() {
                "none".to_string()
            } else {
                table.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
            },
        });
    };
    if (p.set)(config, value.trim()) {
        Ok(())
    } else {
        Err(Error::Param {
            method,
            param: p.name,
            expected: p.range.clone(),
            actual: format!("`{value}`"),
        })
    }
}

/// Every parameter's current value as text, in declaration order.
pub fn values<C: Params>(config: &C) -> Vec<(&'static str, String)> {
    C::table()
        .iter()
        .map(|p| (p.name, (p.get)(config)))
        .collect()
}

/// Checks every parameter against its rule.
pub fn check<C: Params>(method: &'static str, config: &C) -> Result<()> {
    for p in C::table() {
        if let Err(hint) = (p.check)(config) {
            return Err(Error::Param {
                method,
                param: p.name,
                expected: p.range.clone(),
                actual: format!("{}{hint}", (p.get)(config)),
            });
        }
    }
    Ok(())
}

/// The listing of every parameter, defaults read from `C::default()`.
pub fn infos<C: Params>() -> Vec<ParamInfo> {
    let defaults = C::default();
    C::table()
        .iter()
        .map(|p| ParamInfo {
            name: p.name,
            default: (p.get)(&defaults),
            range: p.range.clone(),
            help: p.help,
        })
        .collect()
}

/// Error for a parameter value that breaks a rule tying it to another parameter.
pub fn param_error(
    method: &'static str,
    param: &'static str,
    expected: &str,
    actual: String,
) -> Error {
    Error::Param {
        method,
        param,
        expected: expected.to_string(),
        actual,
    }
}

/// Declares a config struct and its parameters in one place (a method's, or a task's in
/// `randattn-tasks`).
///
/// ```ignore
/// method_params! {
///     /// Performer `performer`.
///     #[derive(Debug, Clone, PartialEq)]
///     pub struct Performer {
///         /// number of random directions m
///         pub features: usize = 256, in_range(1, 65536);
///         /// orthogonal random features (blocks of d orthogonal directions)
///         pub orthogonal: bool = true;
///     }
///     // fields that are not text parameters (tensors), with their defaults:
///     extra {
///         /// given projections
///         pub projections: Option<Projections> = None;
///     }
/// }
/// ```
///
/// Each parameter's doc comment is its help text; the rule (after the default) is optional
/// and defaults to every value of the type.
#[macro_export]
macro_rules! method_params {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                #[doc = $help:literal]
                $(#[doc = $more:literal])*
                pub $field:ident : $ty:ty = $default:expr $(, $rule:expr)? ;
            )*
        }
        $(
            extra {
                $(
                    $(#[$emeta:meta])*
                    $evis:vis $efield:ident : $ety:ty = $edefault:expr ;
                )*
            }
        )?
    ) => {
        $(#[$meta])*
        pub struct $name {
            $(
                #[doc = $help]
                $(#[doc = $more])*
                pub $field: $ty,
            )*
            $($(
                $(#[$emeta])*
                $evis $efield: $ety,
            )*)?
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    $($field: $default,)*
                    $($($efield: $edefault,)*)?
                }
            }
        }

        impl $crate::params::Params for $name {
            fn table() -> &'static [$crate::params::Param<Self>] {
                static TABLE: std::sync::OnceLock<Vec<$crate::params::Param<$name>>> =
                    std::sync::OnceLock::new();
                TABLE.get_or_init(|| {
                    vec![$(
                        $crate::params::Param::new(
                            stringify!($field),
                            concat!($help $(, $more)*),
                            |c: &$name| &c.$field,
                            |c: &mut $name| &mut c.$field,
                            $crate::method_params!(@rule $ty $(, $rule)?),
                        ),
                    )*]
                })
            }
        }
    };
    (@rule $ty:ty) => { $crate::params::Rule::<$ty>::any() };
    (@rule $ty:ty, $rule:expr) => { $rule };
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::choice! {
        /// A test choice.
        pub enum Colour {
            /// red
            Red = "red",
            /// dark blue
            DarkBlue = "dark-blue",
            /// green
            Green = "green",
        }
    }

    crate::method_params! {
        /// A test config.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Toy {
            /// how many
            pub count: usize = 4, in_range(1, 10);
            /// a temperature
            /// (and a second doc line)
            pub scale: Auto<f32> = Auto::Auto, scale_rule();
            /// which colour
            pub colour: Colour = Colour::Red, one_of(&[Colour::Red, Colour::Green]).hint(|_| "; not blue");
            /// on or off
            pub flag: bool = false;
        }
        extra {
            /// not a text parameter
            pub data: Option<Vec<f32>> = None;
        }
    }

    #[test]
    fn declarations_give_defaults_parsing_listing_and_validation() {
        let t = Toy::default();
        assert_eq!(
            (t.count, t.scale, t.colour, t.flag, t.data),
            (4, Auto::Auto, Colour::Red, false, None)
        );
        let infos = infos::<Toy>();
        let listed: Vec<_> = infos
            .iter()
            .map(|p| (p.name, p.default.as_str(), p.range.as_str(), p.help))
            .collect();
        assert_eq!(
            listed,
            [
                ("count", "4", "an integer in 1..=10", "how many"),
                (
                    "scale",
                    "auto",
                    "`auto` (1/sqrt(d)) or a finite number > 0",
                    "a temperature (and a second doc line)"
                ),
                ("colour", "red", "`red` or `green`", "which colour"),
                ("flag", "false", "`true` or `false`", "on or off"),
            ]
        );
        let mut t = Toy::default();
        set("toy", &mut t, "count", " 7 ").unwrap();
        set("toy", &mut t, "scale", "0.5").unwrap();
        set("toy", &mut t, "colour", "green").unwrap();
        assert_eq!(
            (t.count, t.scale, t.colour),
            (7, Auto::Fixed(0.5), Colour::Green)
        );
        assert_eq!(
            values(&t),
            [
                ("count", "7".to_string()),
                ("scale", "0.5".into()),
                ("colour", "green".into()),
                ("flag", "false".into())
            ]
        );
        check("toy", &t).unwrap();

        let err = set("toy", &mut t, "count", "many").unwrap_err().to_string();
        assert_eq!(
            err,
            "parameter `count` of method `toy` must be an integer in 1..=10, got `many`"
        );
        let err = set("toy", &mut t, "size", "1").unwrap_err().to_string();
        assert_eq!(
            err,
            "method `toy` has no parameter `size`; valid parameters: count, scale, colour, flag"
        );
        set("toy", &mut t, "count", "11").unwrap();
        let err = check("toy", &t).unwrap_err().to_string();
        assert_eq!(
            err,
            "parameter `count` of method `toy` must be an integer in 1..=10, got 11"
        );
        t.count = 1;
        set("toy", &mut t, "colour", "dark-blue").unwrap();
        let err = check("toy", &t).unwrap_err().to_string();
        assert_eq!(
            err,
            "parameter `colour` of method `toy` must be `red` or `green`, got dark-blue; not blue"
        );
        t.colour = Colour::Red;
        t.scale = Auto::Fixed(-1.0);
        assert!(check("toy", &t).is_err());
        assert_eq!("dark-blue".parse::<Colour>(), Ok(Colour::DarkBlue));
        assert_eq!(Colour::DarkBlue.to_string(), "dark-blue");
        assert!(
            "blue"
                .parse::<Colour>()
                .unwrap_err()
                .contains("`red`, `dark-blue` or `green`")
        );
    }

    #[test]
    fn auto_and_lists_round_trip_as_text() {
        for text in ["auto", "3"] {
            assert_eq!(Auto::<u32>::from_text(text).unwrap().to_text(), text);
        }
        assert_eq!(Auto::<u32>::from_text("x"), None);
        let w = Vec::<f32>::from_text("0.5, -1,2e-1").unwrap();
        assert_eq!(w, [0.5, -1.0, 0.2]);
        assert_eq!(Vec::<f32>::from_text(&w.to_text()).unwrap(), w);
        assert_eq!(Vec::<f32>::from_text("1,,2"), None);
        assert_eq!(resolve_scale(Auto::Auto, 16), 0.25);
        assert_eq!(resolve_scale(Auto::Fixed(2.0), 16), 2.0);
    }
}
