//! `GET /fetch?url=http://host:port/path`: calls the URL (if granted) and
//! relays the answer; a refusal or failure is a 502 naming it.

use shoal_sdk::http::{Handler, Request, Response};

struct Fetch;

impl Handler for Fetch {
    fn handle(request: Request) -> Response {
        let url = request.query_param("url").unwrap_or("");
        match shoal_sdk::http::fetch("GET", url, &[]) {
            Ok((status, body)) => Response::new(status, body),
            Err(err) => Response::text(502, format!("fetch {url} failed: {err}\n")),
        }
    }
}

shoal_sdk::export_http!(Fetch);
