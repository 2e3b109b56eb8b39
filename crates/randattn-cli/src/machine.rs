//! The machine a measurement ran on, and the provenance block (`meta`) that every `--json`
//! output carries, so that a figure in a report can be traced to where and when it was measured.

use std::time::SystemTime;

use serde_json::{Value, json};

/// The CPU (Linux `/proc/cpuinfo`), its widest vector extension the kernels use, its cores and
/// the threads used: timings are only comparable on one machine.
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// `AVX-512`, `AVX2`, `SSE2` or the architecture.
    pub simd: &'static str,
    /// Cores (hardware threads) available to the process.
    pub cores: usize,
    /// Threads the kernels run on.
    pub threads: usize,
}

/// This machine.
pub fn machine() -> Machine {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_string();
    Machine {
        cpu,
        simd: simd(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        threads: rayon::current_num_threads(),
    }
}

impl Machine {
    /// `AMD EPYC (AVX-512), 2 threads` — what `summary.json` records.
    pub fn describe(&self) -> String {
        format!("{} ({}), {} threads", self.cpu, self.simd, self.threads)
    }
}

/// The widest vector extension the kernels use here.
#[cfg(target_arch = "x86_64")]
fn simd() -> &'static str {
    if std::arch::is_x86_feature_detected!("avx512f") {
        "AVX-512"
    } else if std::arch::is_x86_feature_detected!("avx2") {
        "AVX2"
    } else {
        "SSE2"
    }
}

/// The architecture, where there is no x86 extension to name.
#[cfg(not(target_arch = "x86_64"))]
fn simd() -> &'static str {
    std::env::consts::ARCH
}

/// Now, as an RFC 3339 UTC timestamp to the second.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// `{"tool", "version", "command", "measured_at", "machine": {"cpu", "simd", "cores",
/// "threads"}}`: added to every JSON output as its `meta` member.
pub fn meta() -> Value {
    let m = machine();
    let args: Vec<String> = std::env::args().skip(1).collect();
    json!({
        "tool": "randattn",
        "version": env!("CARGO_PKG_VERSION"),
        "command": format!("randattn {}", args.join(" ")),
        "measured_at": now(),
        "machine": { "cpu": m.cpu, "simd": m.simd, "cores": m.cores, "threads": m.threads },
    })
}
