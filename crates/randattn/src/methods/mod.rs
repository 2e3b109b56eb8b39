//! The estimators, one file per method family.

pub mod exact;
pub mod yoso;
