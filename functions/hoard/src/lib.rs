//! Keeps `?mb=` MiB (default 64) of touched memory in its instance, so the
//! host's memory accounting and scale-to-zero reclaim can be observed.

use std::sync::Mutex;

use shoal_sdk::http::{Handler, Request, Response};

static HOARD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

struct Hoard;

impl Handler for Hoard {
    fn handle(request: Request) -> Response {
        let mb: usize = request.query_param("mb").and_then(|v| v.parse().ok()).unwrap_or(64);
        let mut hoard = HOARD.lock().unwrap_or_else(|poison| poison.into_inner());
        while hoard.len() < mb {
            hoard.push(vec![0x5A; 1 << 20]);
        }
        Response::text(200, format!("holding {} MiB\n", hoard.len()))
    }
}

shoal_sdk::export_http!(Hoard);
