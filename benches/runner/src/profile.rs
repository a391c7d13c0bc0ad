//! Where a server's CPU per request goes: `perf record -e cpu-clock` on
//! the server while `wrk` loads it, each sampled function put in a part
//! (the kernel, the guest's code, wasmtime, hyper, tokio, malloc, ...),
//! and each part's share of the samples turned into µs per request with
//! the CPU the server used in the same run. Flat (self) samples only:
//! Shoal's release build has no frame pointers, so a part is what its own
//! functions ran, not what they called.

use std::process::{Command, Stdio};

use crate::peers::Server;

/// The parts, in the order they are shown.
pub const PARTS: [&str; 13] = [
    "kernel (TCP, system calls)",
    "guest code",
    "wasmtime",
    "hyper, http",
    "tokio",
    "malloc, free",
    "memcpy, memset",
    "tracing (log context)",
    "serde_json (usage record)",
    "prometheus (metrics)",
    "Shoal's own",
    "std, core, alloc",
    "other",
];

/// One server's CPU per request, by part (µs, in [`PARTS`]' order).
pub struct Breakdown {
    pub cpu_us: f64,
    pub parts: Vec<f64>,
}

/// Which part a sampled function is in: its object (`dso`), whether it is
/// the kernel's, and its name.
pub fn part_of(dso: &str, kernel: bool, symbol: &str) -> usize {
    let has = |needles: &[&str]| needles.iter().any(|needle| symbol.contains(needle));
    let part = if kernel {
        "kernel (TCP, system calls)"
    } else if dso.starts_with("libc") || dso.starts_with("ld-linux") {
        if has(&["malloc", "free", "realloc", "_int_", "tcache", "consolidate"]) {
            "malloc, free"
        } else if has(&["mem"]) {
            "memcpy, memset"
        } else {
            "other"
        }
    } else if symbol.starts_with("wasm[") || dso.ends_with(".cwasm") || dso.starts_with("[JIT]") {
        "guest code"
    } else if has(&["__rust_alloc", "__rdl_alloc", "__rust_dealloc", "__rdl_dealloc", "__rust_realloc", "alloc_shim"]) {
        "malloc, free"
    } else if has(&["tracing", "sharded_slab", "nu_ansi_term"]) {
        "tracing (log context)"
    } else if has(&["serde_json", "serde_core", "itoa", "ryu"]) {
        "serde_json (usage record)"
    } else if has(&["prometheus"]) {
        "prometheus (metrics)"
    } else if has(&["wasmtime", "cranelift", "trampoline", "component-trampolines"]) {
        "wasmtime"
    } else if has(&["hyper", "http::", "httparse", "h2::"]) {
        "hyper, http"
    } else if has(&["tokio", "mio::"]) {
        "tokio"
    } else if has(&["shoal"]) {
        "Shoal's own"
    } else if has(&["core::", "alloc::", "std::", "hashbrown"]) {
        "std, core, alloc"
    } else {
        "other"
    };
    PARTS.iter().position(|p| *p == part).unwrap_or(PARTS.len() - 1)
}

/// Load `server` with `connections` for `seconds` while `perf` samples
/// it, and split its CPU per request. `Err` says why there is no figure
/// (no `perf`, or it may not sample here).
pub fn breakdown(server: &Server, connections: u32, seconds: u64) -> anyhow::Result<Breakdown> {
    let data = std::env::temp_dir().join(format!("shoal-bench-profile-{}.data", server.pid()));
    let perf = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "4999", "-p", &server.pid().to_string(), "-o"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| anyhow::anyhow!("cannot start perf: {err}"))?;
    // perf attaches within milliseconds; the load starts after it.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let loaded = server.load("/hello", connections, seconds);
    let _ = Command::new("kill").args(["-INT", &perf.id().to_string()]).status();
    let recorded = perf.wait_with_output()?;
    let (_, cpu_us) = loaded?;
    anyhow::ensure!(
        recorded.status.success() || data.exists(),
        "perf record failed: {}",
        String::from_utf8_lossy(&recorded.stderr).trim()
    );
    let report = Command::new("perf")
        .args(["report", "--no-children", "--sort", "dso,sym", "--stdio", "-g", "none", "--percent-limit", "0", "-i"])
        .arg(&data)
        .output()?;
    let _ = std::fs::remove_file(&data);
    anyhow::ensure!(report.status.success(), "perf report failed: {}", String::from_utf8_lossy(&report.stderr).trim());
    let shares = shares(&String::from_utf8_lossy(&report.stdout));
    anyhow::ensure!(shares.iter().sum::<f64>() > 50.0, "perf report had no samples of the server");
    let total: f64 = shares.iter().sum();
    Ok(Breakdown { cpu_us, parts: shares.iter().map(|share| cpu_us * share / total).collect() })
}

/// Each part's share (percent) in a `perf report --sort dso,sym` listing.
fn shares(report: &str) -> Vec<f64> {
    let mut parts = vec![0.0; PARTS.len()];
    for line in report.lines() {
        let mut words = line.split_whitespace();
        let (Some(percent), Some(dso), Some(kind)) = (words.next(), words.next(), words.next()) else { continue };
        let Some(Ok(percent)) = percent.strip_suffix('%').map(str::parse::<f64>) else { continue };
        let symbol = words.collect::<Vec<_>>().join(" ");
        parts[part_of(dso, kind == "[k]", &symbol)] += percent;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_functions_fall_in_their_parts() {
        let report = "# Samples: 1K of event 'cpu-clock'\n\
            \x20   20.00%  [kernel.kallsyms]  [k] _raw_spin_unlock_irqrestore\n\
            \x20   10.00%  shoal              [.] wasm[0]::function[53]\n\
            \x20   10.00%  libc.so.6          [.] _int_free\n\
            \x20   10.00%  libc.so.6          [.] __memmove_avx512_unaligned_erms\n\
            \x20   10.00%  shoal              [.] <tracing::instrument::Instrumented<T> as core::future::future::Future>::poll\n\
            \x20   10.00%  shoal              [.] wasmtime::runtime::component::instance::Instance::options_memory_mut\n\
            \x20   10.00%  shoal              [.] <hyper::proto::h1::role::Server as hyper::proto::h1::Http1Transaction>::encode\n\
            \x20   10.00%  shoal              [.] shoal::metrics::Metrics::observe\n\
            \x20   10.00%  wasmtime           [.] tokio::runtime::scheduler::multi_thread::worker::Context::run\n";
        let shares = shares(report);
        let share = |part: &str| shares[PARTS.iter().position(|p| *p == part).unwrap()];
        assert_eq!(share("kernel (TCP, system calls)"), 20.0);
        assert_eq!(share("guest code"), 10.0);
        assert_eq!(share("malloc, free"), 10.0);
        assert_eq!(share("memcpy, memset"), 10.0);
        assert_eq!(share("tracing (log context)"), 10.0);
        assert_eq!(share("wasmtime"), 10.0);
        assert_eq!(share("hyper, http"), 10.0);
        assert_eq!(share("Shoal's own"), 10.0);
        assert_eq!(share("tokio"), 10.0);
        assert_eq!(shares.iter().sum::<f64>(), 100.0);
    }
}
