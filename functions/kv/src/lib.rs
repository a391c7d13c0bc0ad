//! Key-value through the Runtime ABI.
//!
//! Routes match the last path segment (the host passes the full path):
//!
//! - `GET /incr?key=K[&by=N]` adds to a counter and shows it
//! - `GET /get?key=K`, `PUT /set?key=K` (body is the value), `DELETE /del?key=K`
//! - `GET /keys` lists the keys this function may see
//! - `GET /bench?op=get|set&n=N&key=K` runs the operation N times and
//!   reports the time per operation as the guest's clock saw it (the
//!   benchmark suite's W3; `set` writes a 16-byte value)
//!
//! Every route takes `&bucket=B` (default `default`). Refusals come back as
//! error values and are shown with a status: 403 denied, 422 limited.

use shoal_sdk::http::{Handler, Request, Response};
use shoal_sdk::kv;

fn refusal(err: kv::Error) -> Response {
    let status = match err {
        kv::Error::AccessDenied => 403,
        kv::Error::NoSuchStore => 404,
        kv::Error::Other(_) => 422,
    };
    Response::text(status, format!("{err}\n"))
}

fn serve(request: &Request) -> Result<Response, kv::Error> {
    let bucket = kv::open(request.query_param("bucket").unwrap_or("default"))?;
    let key = request.query_param("key").unwrap_or("");
    Ok(match request.path().rsplit('/').next().unwrap_or("") {
        "incr" => {
            let by = request.query_param("by").and_then(|v| v.parse().ok()).unwrap_or(1);
            Response::text(200, format!("{key}={}\n", bucket.increment(key, by)?))
        }
        "get" => match bucket.get(key)? {
            Some(value) => Response::new(200, value),
            None => Response::text(404, format!("no value at {key}\n")),
        },
        "set" => {
            bucket.set(key, request.body())?;
            Response::text(200, format!("stored {} bytes at {key}\n", request.body().len()))
        }
        "del" => {
            bucket.delete(key)?;
            Response::text(200, format!("deleted {key}\n"))
        }
        "keys" => Response::text(200, bucket.keys()?.join("\n")),
        "bench" => {
            let n: u32 = request.query_param("n").and_then(|v| v.parse().ok()).unwrap_or(100).max(1);
            let op = request.query_param("op").unwrap_or("get");
            let value = [7u8; 16];
            bucket.set(key, &value)?;
            let started = std::time::Instant::now();
            for _ in 0..n {
                match op {
                    "set" => bucket.set(key, &value)?,
                    _ => drop(std::hint::black_box(bucket.get(key)?)),
                }
            }
            let per_op_ns = started.elapsed().as_nanos() / u128::from(n);
            Response::text(200, format!("op={op} n={n} ns_per_op={per_op_ns}\n"))
        }
        other => Response::text(404, format!("no route {other}\n")),
    })
}

struct Kv;

impl Handler for Kv {
    fn handle(request: Request) -> Response {
        serve(&request).unwrap_or_else(refusal)
    }
}

shoal_sdk::export_http!(Kv);
