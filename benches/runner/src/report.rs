//! The results table: markdown for the README, JSON for tools.

use std::path::Path;

use serde::Serialize;

use crate::wrk::Sample;

/// One W1 load run with the server's CPU cost.
pub struct W1Sample {
    pub sample: Sample,
    pub cpu_us_per_request: f64,
}

/// Median, min and max of a figure over runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        let median = if values.is_empty() { 0.0 } else { values[values.len() / 2] };
        Spread { median, min: values.first().copied().unwrap_or(0.0), max: values.last().copied().unwrap_or(0.0) }
    }
}

/// One cell of W1.
#[derive(Debug, Clone, Serialize)]
pub struct W1Row {
    pub peer: String,
    pub connections: u32,
    pub requests_per_second: Spread,
    pub p50_us: Spread,
    pub p99_us: Spread,
    pub cpu_us_per_request: Spread,
    pub errors: u64,
}

/// Everything measured in one run of the suite.
#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub machine: String,
    pub w1: Vec<W1Row>,
}

impl Report {
    pub fn new(machine: &str) -> Report {
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .unwrap_or_default();
        Report { date, machine: machine.to_string(), w1: Vec::new() }
    }

    pub fn add_w1(&mut self, peer: &str, connections: u32, samples: &[W1Sample]) {
        let spread = |f: &dyn Fn(&W1Sample) -> f64| Spread::of(samples.iter().map(f).collect());
        self.w1.push(W1Row {
            peer: peer.to_string(),
            connections,
            requests_per_second: spread(&|s| s.sample.requests_per_second),
            p50_us: spread(&|s| s.sample.p50_us),
            p99_us: spread(&|s| s.sample.p99_us),
            cpu_us_per_request: spread(&|s| s.cpu_us_per_request),
            errors: samples.iter().map(|s| s.sample.errors).sum(),
        });
    }

    fn rps(&self, peer: &str, connections: u32) -> Option<f64> {
        self.w1.iter().find(|r| r.peer == peer && r.connections == connections).map(|r| r.requests_per_second.median)
    }

    pub fn markdown(&self) -> String {
        let mut md = format!(
            "### W1 — hello-world HTTP\n\n{} · {}\n\n\
             | peer | conns | req/s (median, min–max) | p50 µs | p99 µs | server CPU-µs/req | errors |\n\
             |---|---:|---:|---:|---:|---:|---:|\n",
            self.date, self.machine
        );
        for row in &self.w1 {
            md.push_str(&format!(
                "| {} | {} | {:.0} ({:.0}–{:.0}) | {:.0} | {:.0} | {:.1} | {} |\n",
                row.peer,
                row.connections,
                row.requests_per_second.median,
                row.requests_per_second.min,
                row.requests_per_second.max,
                row.p50_us.median,
                row.p99_us.median,
                row.cpu_us_per_request.median,
                row.errors
            ));
        }
        md.push_str("\n| conns | shoal / native | shoal / wasmtime serve |\n|---:|---:|---:|\n");
        let mut levels: Vec<u32> = self.w1.iter().map(|r| r.connections).collect();
        levels.sort_unstable();
        levels.dedup();
        for c in levels {
            let ratio = |peer: &str| match (self.rps("shoal", c), self.rps(peer, c)) {
                (Some(shoal), Some(other)) if other > 0.0 => format!("{:.2}×", shoal / other),
                _ => "–".to_string(),
            };
            md.push_str(&format!("| {c} | {} | {} |\n", ratio("native-hyper"), ratio("wasmtime-serve")));
        }
        md
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("latest.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("latest.md"), self.markdown())?;
        Ok(())
    }
}
