//! Misbehaves on purpose: `start` spins forever, so it must be cut off by
//! the function's `start_timeout_ms`.

use shoal_sdk::http::{Handler, Request, Response};

struct SlowStart;

impl shoal_sdk::Lifecycle for SlowStart {
    fn start() -> Result<(), String> {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    fn destroy() {}
}

impl Handler for SlowStart {
    fn handle(_request: Request) -> Response {
        Response::text(200, "unreachable: start never finishes\n")
    }
}

shoal_sdk::export_http!(SlowStart);
shoal_sdk::export_lifecycle!(SlowStart);
