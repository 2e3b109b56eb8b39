//! The estimators, one file per method family.

mod conv;
pub mod exact;
pub mod informer;
pub mod lara;
pub mod linformer;
pub mod mca;
pub mod nystrom;
pub mod performer;
pub mod ra;
pub mod skeinformer;
pub mod vmean;
pub mod yoso;
