//! `POST /publish?topic=T[&count=N]`: publishes the body N times (default 1)
//! and reports how many were accepted before any refusal.

use shoal_sdk::http::{Handler, Request, Response};

struct Publisher;

impl Handler for Publisher {
    fn handle(request: Request) -> Response {
        let topic = request.query_param("topic").unwrap_or("orders");
        let count: u32 = request.query_param("count").and_then(|v| v.parse().ok()).unwrap_or(1);
        for sent in 0..count {
            if let Err(err) = shoal_sdk::pubsub::publish(topic, request.body()) {
                let status = match err {
                    shoal_sdk::Error::Denied(_) => 403,
                    shoal_sdk::Error::Limited(_) => 429,
                    _ => 502,
                };
                return Response::text(status, format!("published {sent}, then {err}\n"));
            }
        }
        Response::text(202, format!("published {count}\n"))
    }
}

shoal_sdk::export_http!(Publisher);
