//! What the admin commands print: `shoal ls`, `shoal usage` and `shoal
//! breakers`, as tables or JSON.

use std::io::Write as _;
use std::process::ExitCode;

use shoal::admin::Client;
use shoal::metering::UsageQuery;

/// `shoal ls`: the deployed functions, a line per version.
pub(super) async fn list(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let functions = client.list().await?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&functions)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<24} {:<14} {:>6} {:>5} {:>5} {:>5} {:<9}  ROUTES",
        "NAME", "VERSION", "WEIGHT", "LIVE", "IDLE", "BUSY", "CODE"
    )?;
    for function in functions {
        for version in &function.versions {
            writeln!(
                out,
                "{:<24} {:<14} {:>6} {:>5} {:>5} {:>5} {:<9}  {}",
                function.name,
                version.version,
                version.weight,
                version.stats.live,
                version.stats.idle,
                version.stats.busy,
                version.code,
                function.routes.join(" ")
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `shoal usage`: per-function (or per-tenant) totals from the ledger.
pub(super) async fn usage(client: &Client, query: &UsageQuery, json: bool) -> anyhow::Result<ExitCode> {
    let summaries = client.usage(query).await?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&summaries)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<20} {:<24} {:>9} {:>7} {:>6} {:>11} {:>11} {:>14} {:>12}",
        "TENANT", "FUNCTION", "REQUESTS", "ERRORS", "COLD", "BILLED_MS", "CPU_MS", "FUEL", "GB_SECONDS"
    )?;
    for s in summaries {
        writeln!(
            out,
            "{:<20} {:<24} {:>9} {:>7} {:>6} {:>11} {:>11.1} {:>14} {:>12.6}",
            s.tenant,
            s.function,
            s.requests,
            s.errors,
            s.cold_starts,
            s.billed_ms,
            s.cpu_us as f64 / 1000.0,
            s.fuel,
            s.gb_seconds
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `shoal breakers`: every circuit breaker, a line per target.
pub(super) async fn breakers(client: &Client, function: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let mut views = client.breakers().await?;
    views.retain(|view| function.is_none_or(|function| view.function == function));
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&views)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<24} {:<32} {:<9} {:>8} {:>8} {:>10} {:>14} {:>8}",
        "FUNCTION", "TARGET", "STATE", "IN_A_ROW", "RECENT", "PROBE_IN", "SHORT_CIRCUIT", "RETRIES"
    )?;
    for view in views {
        let probe_in = match view.state {
            shoal::resilience::BreakerState::Open => format!("{:.1}s", view.retry_in_ms as f64 / 1000.0),
            _ => "-".to_string(),
        };
        writeln!(
            out,
            "{:<24} {:<32} {:<9} {:>8} {:>8} {:>10} {:>14} {:>8}",
            view.function,
            view.target,
            view.state.to_string(),
            view.consecutive_failures,
            format!("{}/{}", view.recent_failures, view.recent_calls),
            probe_in,
            view.short_circuited,
            view.retries
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
