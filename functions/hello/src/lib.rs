//! The smallest Shoal HTTP function.

use shoal_sdk::http::{Handler, Request, Response};

struct Hello;

impl Handler for Hello {
    fn handle(request: Request) -> Response {
        let name = request.query_param("name").unwrap_or("world");
        Response::text(200, format!("hello, {name}\n"))
    }
}

shoal_sdk::export_http!(Hello);
