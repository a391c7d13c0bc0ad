//! Running `wrk` (pinned to CPU 1) and reading its report.

use std::process::Command;

/// One load run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sample {
    /// Completed requests.
    pub requests: u64,
    /// Requests per second.
    pub requests_per_second: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// Non-2xx/3xx answers plus socket errors.
    pub errors: u64,
}

/// `wrk -t1 -c<connections> -d<seconds>s --latency <url>` on CPU 1.
pub fn run(url: &str, connections: u32, seconds: u64) -> anyhow::Result<Sample> {
    let output = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency", url])
        .output()?;
    anyhow::ensure!(output.status.success(), "wrk failed: {}", String::from_utf8_lossy(&output.stderr));
    parse(&String::from_utf8_lossy(&output.stdout))
}

fn parse(text: &str) -> anyhow::Result<Sample> {
    let mut sample = Sample { requests: 0, requests_per_second: 0.0, p50_us: 0.0, p99_us: 0.0, errors: 0 };
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => sample.requests_per_second = value.parse()?,
            ["50%", value] => sample.p50_us = duration_us(value)?,
            ["99%", value] => sample.p99_us = duration_us(value)?,
            [count, "requests", "in", ..] => sample.requests = count.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", count] => sample.errors += count.parse::<u64>()?,
            ["Socket", "errors:", rest @ ..] => {
                sample.errors += rest
                    .chunks(2)
                    .filter_map(|pair| pair.get(1))
                    .filter_map(|n| n.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    anyhow::ensure!(sample.requests > 0, "no requests completed:\n{text}");
    Ok(sample)
}

/// `812.00us`, `1.20ms`, `2.00s` → µs.
fn duration_us(text: &str) -> anyhow::Result<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e6)
    } else {
        anyhow::bail!("unexpected duration {text:?}")
    };
    Ok(number.parse::<f64>()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrk_report_is_read() {
        let text = "Running 5s test @ http://127.0.0.1:1/hello\n  1 threads and 16 connections\n\
            Latency Distribution\n     50%  812.00us\n     75%    1.01ms\n     90%    1.20ms\n     99%    2.50ms\n\
            50000 requests in 5.00s, 6.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n\
            Non-2xx or 3xx responses: 3\nRequests/sec:  10000.50\nTransfer/sec:      1.20MB\n";
        let sample = parse(text).unwrap();
        assert_eq!(sample.requests, 50000);
        assert_eq!(sample.requests_per_second, 10000.5);
        assert_eq!(sample.p50_us, 812.0);
        assert_eq!(sample.p99_us, 2500.0);
        assert_eq!(sample.errors, 6);
    }
}
