//! Answers after `?ms=` milliseconds (default 100), sleeping in the host via
//! `wasi:clocks`, so it holds a concurrency slot without burning CPU.

use shoal_sdk::http::{Handler, Request, Response};
use shoal_sdk::wasi::clocks::monotonic_clock;

struct Slow;

impl Handler for Slow {
    fn handle(request: Request) -> Response {
        let ms: u64 = request.query_param("ms").and_then(|v| v.parse().ok()).unwrap_or(100);
        monotonic_clock::subscribe_duration(ms * 1_000_000).block();
        let tag = request.query_param("tag").unwrap_or("");
        Response::text(200, format!("slept {ms} ms {tag}\n"))
    }
}

shoal_sdk::export_http!(Slow);
