//! Receives messages: each is kept in bucket `inbox` under `msg/<id>`, and
//! `deliveries` counts every delivery (redeliveries included). A payload
//! starting with `fail-once` is refused on its first attempt, to show
//! redelivery. `GET /` shows the inbox.

use shoal_sdk::events::{Message, Subscriber};
use shoal_sdk::http::{Handler, Request, Response};
use shoal_sdk::kv;

struct Inbox;

impl Subscriber for Inbox {
    fn on_message(message: Message) -> Result<(), String> {
        let inbox = kv::open("inbox").map_err(|err| err.to_string())?;
        inbox.increment("deliveries", 1).map_err(|err| err.to_string())?;
        println!("subscriber: {} attempt {} on {}", message.id, message.attempt, message.topic);
        if message.payload.starts_with(b"fail-once") && message.attempt == 1 {
            return Err("refusing the first attempt on purpose".to_string());
        }
        inbox.set(&format!("msg/{}", message.id), &message.payload).map_err(|err| err.to_string())
    }
}

impl Handler for Inbox {
    fn handle(_request: Request) -> Response {
        let listing = (|| -> Result<String, kv::Error> {
            let inbox = kv::open("inbox")?;
            let deliveries = inbox.get("deliveries")?.map(|v| String::from_utf8_lossy(&v).into_owned());
            let mut lines = vec![format!("deliveries={}", deliveries.unwrap_or_else(|| "0".into()))];
            for key in inbox.keys()?.into_iter().filter(|key| key.starts_with("msg/")) {
                let payload = inbox.get(&key)?.unwrap_or_default();
                lines.push(format!("{key}={}", String::from_utf8_lossy(&payload)));
            }
            Ok(lines.join("\n") + "\n")
        })();
        match listing {
            Ok(text) => Response::text(200, text),
            Err(err) => Response::text(500, format!("{err}\n")),
        }
    }
}

shoal_sdk::export_http!(Inbox);
shoal_sdk::export_subscriber!(Inbox);
