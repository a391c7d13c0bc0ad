//! CPU-bound work: `fib(?n=)` computed the slow, recursive way.

use shoal_sdk::http::{Handler, Request, Response};

fn fib(n: u32) -> u64 {
    if n < 2 { n as u64 } else { fib(n - 1) + fib(n - 2) }
}

struct Fib;

impl Handler for Fib {
    fn handle(request: Request) -> Response {
        let n: u32 = request.query_param("n").and_then(|v| v.parse().ok()).unwrap_or(20);
        // black_box: keep the optimizer from folding a constant argument.
        let value = fib(std::hint::black_box(n));
        Response::text(200, format!("fib({n}) = {value}\n"))
    }
}

shoal_sdk::export_http!(Fib);
