//! W1: hello-world HTTP. The same `hello` component under `wasmtime serve`
//! and Shoal (with and without fuel metering), native hyper as the ceiling;
//! and the same function written in JavaScript and Python under Shoal.

use serde_json::json;

use crate::Args;
use crate::peers::{Peer, Server, Tools};
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

pub fn run(tools: &Tools, args: &Args) -> anyhow::Result<Section> {
    eprintln!("W1: hello-world HTTP ({} runs x {} s per cell)", args.runs, args.duration);
    let mut cells = Vec::new();
    for peer in [
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
    ] {
        let server = Server::start(tools, peer)?;
        for &connections in &args.concurrency {
            let mut samples = Vec::new();
            for run in 0..args.runs {
                let cpu_before = server.cpu_seconds()?;
                let sample = wrk::run(&server.url("/hello"), connections, args.duration)?;
                let cpu_us = (server.cpu_seconds()? - cpu_before) * 1e6 / sample.requests.max(1) as f64;
                eprintln!(
                    "  {:<14} c={:<3} run {}: {:>9.0} req/s  p50 {:>8.1} µs  p99 {:>8.1} µs  {:>6.1} CPU-µs/req",
                    peer.name(),
                    connections,
                    run + 1,
                    sample.requests_per_second,
                    sample.p50_us,
                    sample.p99_us,
                    cpu_us
                );
                samples.push((sample, cpu_us));
            }
            let spread = |f: &dyn Fn(&(wrk::Sample, f64)) -> f64| Spread::of(samples.iter().map(f).collect());
            cells.push(Cell {
                peer,
                connections,
                rps: spread(&|(s, _)| s.requests_per_second),
                p50: spread(&|(s, _)| s.p50_us),
                p99: spread(&|(s, _)| s.p99_us),
                cpu_us: spread(&|(_, cpu)| *cpu),
                errors: samples.iter().map(|(s, _)| s.errors).sum(),
            });
        }
    }

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
    section.data = json!({
        "cells": cells.iter().map(|cell| json!({
            "peer": cell.peer.name(), "connections": cell.connections, "requests_per_second": cell.rps,
            "p50_us": cell.p50, "p99_us": cell.p99, "cpu_us_per_request": cell.cpu_us, "errors": cell.errors,
        })).collect::<Vec<_>>(),
        "ratios": ratios,
    });
    Ok(section)
}
