//! Misbehaves on purpose: its handler panics (a trap, seen from the host);
//! on `/…/exit?code=N` it ends the whole instance with `exit(N)`; on
//! `/…/flood?lines=N` it writes N lines to stdout as fast as it can.

use shoal_sdk::http::{Handler, Request, Response};

struct Panic;

impl Handler for Panic {
    fn handle(request: Request) -> Response {
        if request.path().ends_with("/flood") {
            let lines: u32 = request.query_param("lines").and_then(|lines| lines.parse().ok()).unwrap_or(1000);
            for line in 0..lines {
                println!("flood line {line}");
            }
            return Response::text(200, format!("wrote {lines} lines\n"));
        }
        if request.path().ends_with("/exit") {
            let code = request.query_param("code").and_then(|code| code.parse().ok()).unwrap_or(3);
            std::process::exit(code);
        }
        panic!("panic requested by {}", request.path())
    }
}

shoal_sdk::export_http!(Panic);
