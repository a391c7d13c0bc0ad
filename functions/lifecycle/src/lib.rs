//! Makes its lifecycle visible: `start` and `destroy` print a line each, and
//! every response shows whether `start` ran and how many requests this
//! instance has served.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shoal_sdk::http::{Handler, Request, Response};

static STARTED: AtomicBool = AtomicBool::new(false);
static SERVED: AtomicU64 = AtomicU64::new(0);

struct Lifecycle;

impl shoal_sdk::Lifecycle for Lifecycle {
    fn start() -> Result<(), String> {
        STARTED.store(true, Ordering::SeqCst);
        println!("lifecycle: start");
        Ok(())
    }

    fn destroy() {
        println!("lifecycle: destroy after {} requests", SERVED.load(Ordering::SeqCst));
    }
}

impl Handler for Lifecycle {
    fn handle(_request: Request) -> Response {
        let served = SERVED.fetch_add(1, Ordering::SeqCst) + 1;
        let started = STARTED.load(Ordering::SeqCst);
        println!("lifecycle: request {served}");
        Response::json(200, format!("{{\"started\":{started},\"served\":{served}}}"))
    }
}

shoal_sdk::export_http!(Lifecycle);
shoal_sdk::export_lifecycle!(Lifecycle);
