//! Reads configuration and secrets.
//!
//! - `GET /` greets with config `greeting` and shows the length of secret `api-token`
//! - `GET /config?key=K`, `GET /secret?name=N` read one (403 when not granted)
//! - `GET /env?name=N` reads an environment variable (404 when unset)
//! - `GET /file?path=P` reads a file; `GET /write?path=P&bytes=N` writes N
//!   bytes to one (500 naming the error when the filesystem refuses)

use shoal_sdk::http::{Handler, Request, Response};

struct Settings;

impl Handler for Settings {
    fn handle(request: Request) -> Response {
        match request.path().rsplit('/').next().unwrap_or("") {
            "config" => match shoal_sdk::config::get(request.query_param("key").unwrap_or("")) {
                Ok(Some(value)) => Response::text(200, value),
                Ok(None) => Response::text(404, "unset\n"),
                Err(err) => Response::text(403, format!("{err}\n")),
            },
            "secret" => match shoal_sdk::secrets::get(request.query_param("name").unwrap_or("")) {
                Ok(secret) => Response::new(200, secret),
                Err(err @ shoal_sdk::Error::NotFound(_)) => Response::text(404, format!("{err}\n")),
                Err(err) => Response::text(403, format!("{err}\n")),
            },
            "env" => match std::env::var(request.query_param("name").unwrap_or("")) {
                Ok(value) => Response::text(200, value),
                Err(err) => Response::text(404, format!("{err}\n")),
            },
            "file" => match std::fs::read(request.query_param("path").unwrap_or("")) {
                Ok(bytes) => Response::new(200, bytes),
                Err(err) => Response::text(500, format!("cannot read: {err}\n")),
            },
            "write" => {
                let path = request.query_param("path").unwrap_or("");
                let bytes: usize = request.query_param("bytes").and_then(|n| n.parse().ok()).unwrap_or(1);
                match std::fs::write(path, vec![b'x'; bytes]) {
                    Ok(()) => Response::text(200, format!("wrote {bytes} bytes\n")),
                    Err(err) => Response::text(500, format!("cannot write: {err}\n")),
                }
            }
            _ => {
                let greeting = shoal_sdk::config::get("greeting").ok().flatten().unwrap_or_else(|| "hello".into());
                let token = shoal_sdk::secrets::get("api-token").map(|t| t.len()).unwrap_or(0);
                Response::text(200, format!("{greeting}; api-token has {token} bytes\n"))
            }
        }
    }
}

shoal_sdk::export_http!(Settings);
