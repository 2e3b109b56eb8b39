//! The `randattn` binary's own library: the parts of its input handling worth testing and fuzzing
//! on their own (the `.npy` reader, the valid ranges of arguments and the memory guard). The rest
//! of the command lives in the binary (`main.rs`), thin over the `randattn`, `-nn`, `-tasks` and
//! `-train` crates.

pub mod limits;
pub mod npy;
