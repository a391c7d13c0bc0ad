//! Misbehaves on purpose: its handler panics (a trap, seen from the host).

use shoal_sdk::http::{Handler, Request, Response};

struct Panic;

impl Handler for Panic {
    fn handle(request: Request) -> Response {
        panic!("panic requested by {}", request.path())
    }
}

shoal_sdk::export_http!(Panic);
