//! Misbehaves on purpose: `destroy` spins forever, so it must be cut off by
//! the function's `destroy_timeout_ms`.

use shoal_sdk::http::{Handler, Request, Response};

struct SlowDestroy;

impl shoal_sdk::Lifecycle for SlowDestroy {
    fn start() -> Result<(), String> {
        println!("slow-destroy: start");
        Ok(())
    }

    fn destroy() {
        println!("slow-destroy: destroy begins");
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }
}

impl Handler for SlowDestroy {
    fn handle(_request: Request) -> Response {
        Response::text(200, "ok\n")
    }
}

shoal_sdk::export_http!(SlowDestroy);
shoal_sdk::export_lifecycle!(SlowDestroy);
