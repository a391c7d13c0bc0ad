//! Looks for data another instance left in the memory it was given.
//!
//! - `GET /write?mb=N&tag=T` grows linear memory by N MiB and fills the new
//!   pages with the marker `SHOAL-MARKER:T:` (repeated);
//! - `GET /look?mb=N` grows linear memory by N MiB and scans the new pages
//!   (which a fresh instance must see zeroed) for any marker, answering
//!   `found T` or `clean`.
//!
//! Each request works on pages its own instance never touched before, so
//! with `max_requests_per_instance = 1` every request gets memory the host
//! handed it fresh — or, when a slot kept its memory resident, recycled.

use shoal_sdk::http::{Handler, Request, Response};

const PREFIX: &[u8] = b"SHOAL-MARKER:";
const PAGE: usize = 64 << 10;

struct Marker;

/// `mb` MiB of fresh linear memory, as a byte slice.
fn fresh(mb: usize) -> Option<&'static mut [u8]> {
    let pages = mb * 16;
    let first = core::arch::wasm32::memory_grow(0, pages);
    if first == usize::MAX {
        return None;
    }
    // SAFETY: `memory_grow` just added these pages to linear memory; nothing
    // else (the allocator included) knows of them, and they live as long as
    // the instance.
    Some(unsafe { core::slice::from_raw_parts_mut((first * PAGE) as *mut u8, pages * PAGE) })
}

impl Handler for Marker {
    fn handle(request: Request) -> Response {
        let mb: usize = request.query_param("mb").and_then(|v| v.parse().ok()).unwrap_or(4).min(256);
        let Some(memory) = fresh(mb) else { return Response::text(507, "cannot grow memory\n") };
        match request.path().rsplit('/').next().unwrap_or("") {
            "write" => {
                let tag = request.query_param("tag").unwrap_or("none");
                let mut marker = PREFIX.to_vec();
                marker.extend_from_slice(tag.as_bytes());
                marker.push(b':');
                for chunk in memory.chunks_mut(marker.len()) {
                    chunk.copy_from_slice(&marker[..chunk.len()]);
                }
                Response::text(200, format!("wrote {mb} MiB of {}\n", String::from_utf8_lossy(&marker)))
            }
            "look" => {
                let found = memory.windows(PREFIX.len()).position(|window| window == PREFIX);
                match found {
                    Some(at) => {
                        let rest = &memory[at + PREFIX.len()..];
                        let end = rest.iter().position(|byte| *byte == b':').unwrap_or(0).min(64);
                        Response::text(200, format!("found {}\n", String::from_utf8_lossy(&rest[..end])))
                    }
                    None if memory.iter().all(|byte| *byte == 0) => Response::text(200, "clean\n"),
                    None => Response::text(200, "dirty: not zeroed\n"),
                }
            }
            other => Response::text(404, format!("no route {other}\n")),
        }
    }
}

shoal_sdk::export_http!(Marker);
