//! Misbehaves on purpose: its `start` hook traps, so no instance ever serves.

use shoal_sdk::http::{Handler, Request, Response};

struct TrapStart;

impl shoal_sdk::Lifecycle for TrapStart {
    fn start() -> Result<(), String> {
        std::process::abort()
    }

    fn destroy() {}
}

impl Handler for TrapStart {
    fn handle(_request: Request) -> Response {
        Response::text(200, "unreachable: start always traps\n")
    }
}

shoal_sdk::export_http!(TrapStart);
shoal_sdk::export_lifecycle!(TrapStart);
