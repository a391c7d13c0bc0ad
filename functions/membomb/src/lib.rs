//! Misbehaves on purpose: allocates (and touches) memory until it is stopped.

use shoal_sdk::http::{Handler, Request, Response};

struct MemBomb;

impl Handler for MemBomb {
    fn handle(_request: Request) -> Response {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![0xA5; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

shoal_sdk::export_http!(MemBomb);
