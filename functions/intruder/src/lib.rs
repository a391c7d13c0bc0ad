//! Tries every capability without the grant for it and reports, one line
//! each, what came back: every attempt must be an error value, and the
//! function must keep running to report them all.

use shoal_sdk::http::{Handler, Request, Response};

struct Intruder;

impl Handler for Intruder {
    fn handle(_request: Request) -> Response {
        let mut report = Vec::new();
        let mut line = |capability: &str, outcome: String| report.push(format!("{capability}: {outcome}"));
        line(
            "kv.open",
            match shoal_sdk::kv::open("vault") {
                Ok(_) => "ALLOWED".into(),
                Err(err) => format!("refused ({err})"),
            },
        );
        line(
            "kv.get",
            match shoal_sdk::kv::open("default").and_then(|b| b.get("theirs/secret")) {
                Ok(_) => "ALLOWED".into(),
                Err(err) => format!("refused ({err})"),
            },
        );
        line(
            "pubsub.publish",
            match shoal_sdk::pubsub::publish("payments", b"x") {
                Ok(()) => "ALLOWED".into(),
                Err(err) => format!("refused ({err})"),
            },
        );
        line(
            "invoke.call",
            match shoal_sdk::invoke::get("hello", "/") {
                Ok(_) => "ALLOWED".into(),
                Err(err) => format!("refused ({err})"),
            },
        );
        line(
            "config.get",
            match shoal_sdk::config::get("db-password") {
                Ok(_) => "ALLOWED".into(),
                Err(err) => format!("refused ({err})"),
            },
        );
        line(
            "secrets.get",
            match shoal_sdk::secrets::get("api-token") {
                Ok(_) => "ALLOWED".into(),
                Err(err) => format!("refused ({err})"),
            },
        );
        line(
            "http.outgoing",
            match shoal_sdk::http::fetch("GET", "http://127.0.0.1:9/", &[]) {
                Ok(_) => "ALLOWED".into(),
                Err(err) => format!("refused ({err})"),
            },
        );
        Response::text(200, report.join("\n") + "\n")
    }
}

shoal_sdk::export_http!(Intruder);
