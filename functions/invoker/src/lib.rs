//! - `GET /call?fn=F&path=P` invokes function F and relays its answer
//! - `GET /loop` invokes itself (`/loop`) until the host's nesting limit
//!   refuses, and relays that refusal (508)

use shoal_sdk::http::{Handler, Request, Response};

fn relay(result: Result<shoal_sdk::invoke::Response, shoal_sdk::Error>) -> Response {
    match result {
        Ok(reply) => Response::new(reply.status, reply.body),
        Err(err @ shoal_sdk::Error::Limited(_)) => Response::text(508, format!("{err}\n")),
        Err(err @ shoal_sdk::Error::Denied(_)) => Response::text(403, format!("{err}\n")),
        Err(err @ shoal_sdk::Error::NotFound(_)) => Response::text(404, format!("{err}\n")),
        Err(err) => Response::text(502, format!("{err}\n")),
    }
}

struct Invoker;

impl Handler for Invoker {
    fn handle(request: Request) -> Response {
        match request.path().rsplit('/').next().unwrap_or("") {
            "call" => {
                let function = request.query_param("fn").unwrap_or("hello");
                let path = request.query_param("path").unwrap_or("/");
                relay(shoal_sdk::invoke::get(function, path))
            }
            "loop" => relay(shoal_sdk::invoke::get("invoker", "/loop")),
            other => Response::text(404, format!("no route {other}\n")),
        }
    }
}

shoal_sdk::export_http!(Invoker);
