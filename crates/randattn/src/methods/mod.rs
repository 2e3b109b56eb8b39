//! The estimators, one file per method family.

pub mod exact;
pub mod informer;
pub mod skeinformer;
pub mod yoso;
