//! Misbehaves on purpose: its handler never returns.

use shoal_sdk::http::{Handler, Request, Response};

struct Spin;

impl Handler for Spin {
    fn handle(_request: Request) -> Response {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }
}

shoal_sdk::export_http!(Spin);
