//! Valid ranges of the numeric arguments, and the memory guard that refuses a request the
//! machine cannot hold before anything is allocated (instead of an abort in the allocator).

use anyhow::{Result, bail};

/// Longest sequence the workload commands accept (16 Mi tokens; memory decides below that).
pub const MAX_N: u64 = 1 << 24;
/// Most heads, batch entries and head dimensions accepted.
pub const MAX_AXIS: u64 = 1 << 16;

/// A positive size up to `max`, for clap (`0`, negative, non-numeric and too-large values are
/// errors naming the valid range).
pub fn size(max: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=max)
}

/// Bytes of memory the system can still give (Linux `MemAvailable`), if known.
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The bytes of `tensors` float32 tensors of `elements` values each, saturating.
pub fn tensor_bytes(elements: [usize; 4], tensors: usize) -> u128 {
    elements.iter().map(|&e| e as u128).product::<u128>() * 4 * tensors as u128
}

fn gib(bytes: u128) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u128 << 30) as f64)
}

/// The sizes of a call on `dims` in the current pool (`d_model`: X's width, if known).
fn sizes(dims: randattn::Dims, d_model: Option<usize>) -> randattn::Sizes {
    let mut sizes = randattn::Sizes::new(dims, rayon::current_num_threads());
    if let Some(w) = d_model {
        sizes.d_model = w as u128;
    }
    sizes
}

/// A method's own bytes: its forward's, or its forward and backward's.
fn own_need(method: &randattn::Method, sizes: &randattn::Sizes, backward: bool) -> u128 {
    let e = method.memory(sizes);
    if backward {
        e.forward_backward
    } else {
        e.forward
    }
}

/// Refuses running each of `methods` on inputs of `dims` (with the backward when `backward`)
/// when the inputs, `extra_tensors` more output-sized tensors the command keeps, and the most
/// demanding method's own estimate ([`randattn::Method::memory`]: output, saved state,
/// gradients, scratch) exceed the memory available now. `d_model` is the width of the value
/// projection's input for methods that sample it.
pub fn check_methods(
    methods: &[randattn::Method],
    dims: randattn::Dims,
    d_model: Option<usize>,
    backward: bool,
    extra_tensors: usize,
    what: &str,
) -> Result<()> {
    let sizes = sizes(dims, d_model);
    let (method, name) = methods
        .iter()
        .map(|m| (own_need(m, &sizes, backward), m.spec()))
        .max()
        .unwrap_or_default();
    let tensors = 4 * (sizes.q() + sizes.k() + sizes.v() + extra_tensors as u128 * sizes.o());
    check_memory(tensors + method, &format!("{what} (with {name})"))
}

/// [`check_methods`] for one method whose inputs are already in memory (they are not counted
/// again).
pub fn check_method_beside_inputs(
    method: &randattn::Method,
    dims: randattn::Dims,
    d_model: Option<usize>,
    backward: bool,
    extra_tensors: usize,
    what: &str,
) -> Result<()> {
    let sizes = sizes(dims, d_model);
    let own = own_need(method, &sizes, backward);
    check_memory(own + 4 * extra_tensors as u128 * sizes.o(), what)
}

/// Refuses `needed` bytes for `what` when they exceed the memory available now.
pub fn check_memory(needed: u128, what: &str) -> Result<()> {
    check_memory_against(needed, what, available_bytes())
}

fn check_memory_against(needed: u128, what: &str, available: Option<u64>) -> Result<()> {
    if let Some(avail) = available
        && needed > avail as u128
    {
        bail!(
            "{what} needs at least {} of memory, more than the {} available; use a smaller \
             size",
            gib(needed),
            gib(avail as u128)
        );
    }
    Ok(())
}

/// Makes a panic print one line and the process exit with code 70 (an internal error), never a
/// backtrace meant for developers; `RUST_BACKTRACE=1` still shows it.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            default(info);
        }
        let at = info
            .location()
            .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        eprintln!(
            "internal error: {what}{at}. This is a bug in randattn: please report it with the \
             command line (RUST_BACKTRACE=1 shows where it happened)"
        );
        std::process::exit(70);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_guard_names_the_need_and_the_limit() {
        let need = tensor_bytes([1, 8, 100_000_000, 64], 4);
        let err = check_memory_against(need, "bench at n = 100000000", Some(8 << 30))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs at least 762.9 GiB"), "{err}");
        assert!(err.contains("8.0 GiB available"), "{err}");
        assert!(check_memory_against(1 << 20, "x", Some(8 << 30)).is_ok());
        assert!(check_memory_against(need, "x", None).is_ok());
    }
}
