//! W1: hello-world HTTP. The same `hello` component under `wasmtime serve`
//! and Shoal (with and without fuel metering), native hyper as the ceiling;
//! and the same function written in JavaScript and Python under Shoal.

use anyhow::Context;
use serde_json::json;

use crate::Args;
use crate::peers::{Peer, Server, Tools, turns};
use crate::report::{Section, Spread, verdict};
use crate::wrk;

struct Cell {
    peer: Peer,
    connections: u32,
    rps: Spread,
    p50: Spread,
    p99: Spread,
    cpu_us: Spread,
    errors: u64,
}

/// The peers whose CPU per request is split by part, side by side.
const PROFILED: [Peer; 4] = [Peer::WasmtimeServeReuse, Peer::Shoal, Peer::WasmtimeServeP3, Peer::ShoalP3Plain];

pub fn run(tools: &Tools, args: &Args) -> anyhow::Result<Section> {
    eprintln!("W1: hello-world HTTP ({} runs x {} s per cell)", args.runs, args.duration);
    let mut cells = Vec::new();
    // Split at 16 connections (or the middle level asked for).
    let profiled_at = if args.concurrency.contains(&16) { 16 } else { args.concurrency[args.concurrency.len() / 2] };
    let mut breakdowns: Vec<(Peer, Result<crate::profile::Breakdown, String>)> = Vec::new();
    let peers = [
        Peer::Native,
        Peer::WasmtimeServe,
        Peer::WasmtimeServeReuse,
        Peer::Shoal,
        Peer::ShoalNoFuel,
        Peer::ShoalJs,
        Peer::ShoalPython,
        Peer::ShoalGo,
        Peer::ShoalP3,
        Peer::WasmtimeServeP3,
        Peer::ShoalP3Plain,
    ];
    // Every server is up for the whole workload and the peers take turns
    // ([`turns`]), at each concurrency level in order.
    let mut servers = Vec::new();
    for peer in peers {
        servers.push(Server::start(tools, peer).with_context(|| format!("starting {}", peer.name()))?);
    }
    // Each peer's samples at each level, [peer][level].
    let mut samples: Vec<Vec<Vec<(wrk::Sample, f64)>>> =
        peers.iter().map(|_| args.concurrency.iter().map(|_| Vec::new()).collect()).collect();
    for (level, &connections) in args.concurrency.iter().enumerate() {
        for (run, i) in turns(args.runs, peers.len()) {
            let (sample, cpu_us) = servers[i].load("/hello", connections, args.duration)?;
            eprintln!(
                "  {:<14} c={:<3} run {}: {:>9.0} req/s  p50 {:>8.1} µs  p99 {:>8.1} µs  {:>6.1} CPU-µs/req",
                peers[i].name(),
                connections,
                run + 1,
                sample.requests_per_second,
                sample.p50_us,
                sample.p99_us,
                cpu_us
            );
            samples[i][level].push((sample, cpu_us));
        }
    }
    for (peer, levels) in peers.iter().zip(samples) {
        for (&connections, samples) in args.concurrency.iter().zip(levels) {
            let spread = |f: &dyn Fn(&(wrk::Sample, f64)) -> f64| Spread::of(samples.iter().map(f).collect());
            cells.push(Cell {
                peer: *peer,
                connections,
                rps: spread(&|(s, _)| s.requests_per_second),
                p50: spread(&|(s, _)| s.p50_us),
                p99: spread(&|(s, _)| s.p99_us),
                cpu_us: spread(&|(_, cpu)| *cpu),
                errors: samples.iter().map(|(s, _)| s.errors).sum(),
            });
        }
    }
    for (peer, server) in peers.iter().zip(&servers) {
        if PROFILED.iter().any(|profiled| profiled.name() == peer.name()) {
            eprintln!("  {:<14} c={profiled_at:<3} under perf: CPU per request by part", peer.name());
            let split = crate::profile::breakdown(server, profiled_at, args.duration).map_err(|err| format!("{err:#}"));
            breakdowns.push((*peer, split));
        }
    }
    drop(servers);

    let mut section = Section::new(
        "w1",
        "hello-world HTTP (wrk on CPU 1, server on CPU 0)",
        &["peer", "conns", "req/s (median, min–max)", "p50 µs", "p99 µs", "server CPU-µs/req", "errors"],
    );
    for cell in &cells {
        section.row(vec![
            cell.peer.name().to_string(),
            cell.connections.to_string(),
            cell.rps.show(0),
            format!("{:.0}", cell.p50.median),
            format!("{:.0}", cell.p99.median),
            format!("{:.1}", cell.cpu_us.median),
            cell.errors.to_string(),
        ]);
    }
    let cell = |peer: Peer, c: u32| cells.iter().find(|cell| cell.peer.name() == peer.name() && cell.connections == c);
    let rps = |peer: Peer, c: u32| cell(peer, c).map(|cell| cell.rps.median);
    let cpu = |peer: Peer, c: u32| cell(peer, c).map(|cell| cell.cpu_us.median);
    let mut ratios = Vec::new();
    for &c in &args.concurrency {
        if let (Some(shoal), Some(floor), Some(native)) =
            (cpu(Peer::Shoal, c), cpu(Peer::WasmtimeServeReuse, c), cpu(Peer::Native, c))
        {
            if let (Some(ours), Some(theirs)) = (rps(Peer::Shoal, c), rps(Peer::WasmtimeServeReuse, c)) {
                section.note(format!(
                    "c={c}: Shoal {:.2}× the req/s of `wasmtime serve` reusing instances, at {shoal:.1} against \
                     {floor:.1} server CPU-µs per request (round 3's target, ≥ 1.0× and ≤ its CPU: {})",
                    ours / theirs,
                    verdict(ours >= theirs && shoal <= floor)
                ));
            }
            section.note(format!(
                "c={c}: server CPU per request: Shoal {shoal:.1} µs (target ≤ 15: {}), `wasmtime serve` reusing \
                 instances {floor:.1} µs (the upstream host for this guest, nothing metered, recorded or logged), \
                 native {native:.1} µs; Shoal's own work {:.1} µs over that floor",
                verdict(shoal <= 15.0),
                shoal - floor
            ));
        }
        let (Some(shoal), Some(native), Some(serve), Some(unmetered)) =
            (rps(Peer::Shoal, c), rps(Peer::Native, c), rps(Peer::WasmtimeServe, c), rps(Peer::ShoalNoFuel, c))
        else {
            continue;
        };
        let (vs_native, vs_serve, metering) = (shoal / native, shoal / serve, 1.0 - shoal / unmetered);
        section.note(format!(
            "c={c}: Shoal/native {vs_native:.2}× (target ≥ 0.7×: {}), Shoal/`wasmtime serve` {vs_serve:.2}× \
             (target ≥ 1.5×: {}), fuel metering costs {:.1}% of throughput (target ≤ 5%: {})",
            verdict(vs_native >= 0.7),
            verdict(vs_serve >= 1.5),
            metering * 100.0,
            verdict(metering <= 0.05)
        ));
        let (js, python) = (rps(Peer::ShoalJs, c).unwrap_or(0.0), rps(Peer::ShoalPython, c).unwrap_or(0.0));
        let (go, p3) = (rps(Peer::ShoalGo, c).unwrap_or(0.0), rps(Peer::ShoalP3, c).unwrap_or(0.0));
        section.note(format!(
            "c={c}: the same function in JavaScript {:.2}×, in Python {:.2}× and in Go {:.2}× the Rust one's \
             req/s; a Rust hello written for WASI 0.3 (functions/hello-p3, fuel metered too) {:.2}×",
            js / shoal,
            python / shoal,
            go / shoal,
            p3 / shoal
        ));
        if let (Some(shoal_p3), Some(serve_p3), Some(shoal_cpu), Some(serve_cpu)) = (
            rps(Peer::ShoalP3Plain, c),
            rps(Peer::WasmtimeServeP3, c),
            cpu(Peer::ShoalP3Plain, c),
            cpu(Peer::WasmtimeServeP3, c),
        ) {
            section.note(format!(
                "c={c}: WASI 0.3 hello (functions/hello-p3-plain), each host with its defaults for 0.3 (16 \
                 requests at once per instance; Shoal fuel-metered and recorded): Shoal {:.2}× `wasmtime serve`'s \
                 req/s (target ≥ 1.0×: {}), {shoal_cpu:.1} against {serve_cpu:.1} server CPU-µs/req (target ≤: {})",
                shoal_p3 / serve_p3,
                verdict(shoal_p3 >= serve_p3),
                verdict(shoal_cpu <= serve_cpu)
            ));
        }
        ratios.push(json!({ "connections": c, "shoal_vs_native": vs_native, "shoal_vs_wasmtime_serve": vs_serve,
            "metering_cost": metering, "js_vs_rust": js / shoal, "python_vs_rust": python / shoal,
            "go_vs_rust": go / shoal, "wasi_0_3_vs_0_2": p3 / shoal }));
    }
    breakdown_table(&mut section, &breakdowns, profiled_at);
    section.data = json!({
        "cells": cells.iter().map(|cell| json!({
            "peer": cell.peer.name(), "connections": cell.connections, "requests_per_second": cell.rps,
            "p50_us": cell.p50, "p99_us": cell.p99, "cpu_us_per_request": cell.cpu_us, "errors": cell.errors,
        })).collect::<Vec<_>>(),
        "ratios": ratios,
        "cpu_by_part": breakdowns.iter().map(|(peer, split)| match split {
            Ok(split) => json!({ "peer": peer.name(), "connections": profiled_at, "cpu_us_per_request": split.cpu_us,
                "parts": crate::profile::PARTS.iter().zip(&split.parts)
                    .map(|(part, us)| json!({ "part": part, "us": us })).collect::<Vec<_>>() }),
            Err(why) => json!({ "peer": peer.name(), "error": why }),
        }).collect::<Vec<_>>(),
    });
    Ok(section)
}

/// The table of CPU per request by part, one column per profiled peer, in
/// µs (a run of its own under `perf`, so its total differs a little from
/// the cells above).
fn breakdown_table(
    section: &mut Section,
    breakdowns: &[(Peer, Result<crate::profile::Breakdown, String>)],
    connections: u32,
) {
    let measured: Vec<_> = breakdowns.iter().filter_map(|(peer, split)| Some((peer, split.as_ref().ok()?))).collect();
    for (peer, split) in breakdowns {
        if let Err(why) = split {
            section.note(format!("{}: no CPU split by part: {why}", peer.name()));
        }
    }
    if measured.is_empty() {
        return;
    }
    let mut header = vec!["part".to_string()];
    header.extend(measured.iter().map(|(peer, _)| format!("{} µs", peer.name())));
    let mut rows: Vec<Vec<String>> = crate::profile::PARTS
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let mut row = vec![part.to_string()];
            row.extend(measured.iter().map(|(_, split)| format!("{:.1}", split.parts[i])));
            row
        })
        .collect();
    let mut total = vec!["server CPU per request".to_string()];
    total.extend(measured.iter().map(|(_, split)| format!("{:.1}", split.cpu_us)));
    rows.push(total);
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    section.table(
        format!(
            "Where the server's CPU per request goes at c={connections} (`perf record -e cpu-clock` during a run \
             of its own; each sampled function's own time, by the part it is in):"
        ),
        &header,
        rows,
    );
}
