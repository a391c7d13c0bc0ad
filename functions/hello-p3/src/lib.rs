//! A WASI 0.3 HTTP function (`wasi:http/handler@0.3.0`, async Rust with
//! the `wasip3` bindings) that reaches the Runtime ABI as the 0.2 ones do:
//!
//! | request | answer |
//! |---|---|
//! | `GET …?name=x` | `hello, x` |
//! | `POST …/count` | increments `hits` in bucket `default` (key-value) |
//! | `GET …/keys` | the keys of bucket `default` it may see, one per line |
//! | `POST …/count-sync` | the same through the synchronous `wasi:keyvalue` |
//! | `GET …/greeting` | the `greeting` config value |
//! | `POST …/publish?msg=m` | publishes `m` on topic `orders` |
//! | `GET …/secret?name=s` | the length of secret `s` (never its bytes) |
//! | `GET …/invoke?fn=f` | invokes function `f` at `/` and answers its body |
//! | `GET …/sleep/<ms>` | waits on `wasi:clocks` (other requests run meanwhile) |
//! | `GET …/spin/<n>` | computes for `n` rounds (fuel, timeouts) |
//! | `GET …/sized?name=x` | `hello, x` with its `content-length` set |
//! | `GET …/stream/<kib>` | `kib` KiB (at most 64 MiB) in writes of 16 KiB, the n-th all of letter n mod 26 |
//!
//! Requests share an instance (16 at once by default). Key-value, publish,
//! secrets and invoke are made through their async imports
//! (`keyvalue-async`, `pubsub-async`, `secrets-async`, `invoke-async`):
//! while one waits on Redis or a commit, the instance's other requests
//! run. `wasi:config` is synchronous (it answers from memory); the
//! synchronous `wasi:keyvalue` stays callable, and the instance's other
//! requests wait for it (`count-sync`).

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::{wit_bindgen, wit_future, wit_stream};

mod abi {
    wit_bindgen::generate!({
        path: "../../abi/wit",
        world: "shoal:runtime/async-imports",
        generate_all,
    });
}

use abi::shoal::runtime::{invoke_async, keyvalue_async, pubsub_async, secrets_async, types};
use abi::wasi::config::store as config;
use abi::wasi::keyvalue::{atomics, store};

wasip3::http::service::export!(HelloP3);

struct HelloP3;

/// A text response, its body written by a task of its own (the handler
/// returns the response first; the body streams after).
fn text(status: u16, body: String) -> Response {
    respond(status, body, false)
}

/// A text response; with `sized`, its `content-length` set.
fn respond(status: u16, body: String, sized: bool) -> Response {
    let (mut body_tx, body_rx) = wit_stream::new();
    let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
    drop(trailers_tx);
    let mut fields = vec![("content-type".to_string(), b"text/plain".to_vec())];
    if sized {
        fields.push(("content-length".to_string(), body.len().to_string().into_bytes()));
    }
    let headers = Fields::from_list(&fields).expect("valid headers");
    let (response, _sent) = Response::new(headers, Some(body_rx), trailers_rx);
    let _ = response.set_status_code(status);
    wit_bindgen::spawn_local(async move {
        body_tx.write_all(body.into_bytes()).await;
    });
    response
}

/// `kib` KiB of text written 16 KiB at a time, the n-th write all of
/// `a` + n mod 26: a body that waits for its client as it streams.
fn stream(kib: usize) -> Response {
    const PIECE: usize = 16 << 10;
    let (mut body_tx, body_rx) = wit_stream::new();
    let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
    drop(trailers_tx);
    let headers = Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())]).expect("valid headers");
    let (response, _sent) = Response::new(headers, Some(body_rx), trailers_rx);
    wit_bindgen::spawn_local(async move {
        let mut left = kib.min(64 << 10) << 10;
        let mut letter = 0u8;
        while left > 0 {
            let piece = left.min(PIECE);
            // What is left unwritten: the client is gone.
            if !body_tx.write_all(vec![b'a' + letter; piece]).await.is_empty() {
                return;
            }
            left -= piece;
            letter = (letter + 1) % 26;
        }
    });
    response
}

fn refused(error: &types::Error) -> (u16, String) {
    let (status, what) = match error {
        types::Error::Denied(why) => (403, why),
        types::Error::Limited(why) => (429, why),
        types::Error::NotFound(why) => (404, why),
        types::Error::Backend(why) => (502, why),
    };
    (status, format!("refused: {what}\n"))
}

fn query<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

async fn count() -> (u16, String) {
    match keyvalue_async::increment("default".into(), "hits".into(), 1).await {
        Ok(hits) => (200, format!("{hits}\n")),
        Err(err) => refused(&err),
    }
}

async fn keys() -> (u16, String) {
    let (mut listed, mut cursor) = (String::new(), None);
    loop {
        match keyvalue_async::list_keys("default".into(), cursor).await {
            Ok(page) => {
                for key in page.keys {
                    listed.push_str(&key);
                    listed.push('\n');
                }
                match page.cursor {
                    Some(next) => cursor = Some(next),
                    None => return (200, listed),
                }
            }
            Err(err) => return refused(&err),
        }
    }
}

fn count_sync() -> (u16, String) {
    let bucket = match store::open("default") {
        Ok(bucket) => bucket,
        Err(err) => return (403, format!("refused: {err:?}\n")),
    };
    match atomics::increment(&bucket, "hits", 1) {
        Ok(hits) => (200, format!("{hits}\n")),
        Err(err) => (403, format!("refused: {err:?}\n")),
    }
}

fn greeting() -> (u16, String) {
    match config::get("greeting") {
        Ok(Some(value)) => (200, format!("{value}\n")),
        Ok(None) => (404, "no greeting\n".to_string()),
        Err(err) => (403, format!("refused: {err:?}\n")),
    }
}

async fn publish(message: &str) -> (u16, String) {
    match pubsub_async::publish("orders".into(), message.as_bytes().to_vec()).await {
        Ok(()) => (202, "published\n".to_string()),
        Err(err) => refused(&err),
    }
}

async fn secret(name: &str) -> (u16, String) {
    match secrets_async::get(name.to_string()).await {
        Ok(secret) => (200, format!("secret {name} has {} bytes\n", secret.len())),
        Err(err) => refused(&err),
    }
}

async fn call(function: &str) -> (u16, String) {
    let request = types::Request { method: "GET".into(), path: "/".into(), headers: Vec::new(), body: Vec::new() };
    match invoke_async::call(function.to_string(), request).await {
        Ok(response) => (response.status, String::from_utf8_lossy(&response.body).into_owned()),
        Err(err) => refused(&err),
    }
}

impl wasip3::exports::http::handler::Guest for HelloP3 {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let target = request.get_path_with_query().unwrap_or_default();
        let (path, query_string) = target.split_once('?').unwrap_or((&target, ""));
        let mut segments = path.rsplit('/');
        let (last, before) = (segments.next().unwrap_or(""), segments.next().unwrap_or(""));
        if before == "stream" {
            return Ok(stream(last.parse().unwrap_or(0)));
        }
        if last == "sized" {
            return Ok(respond(200, format!("hello, {}\n", query(query_string, "name").unwrap_or("world")), true));
        }
        let (status, body) = match (before, last) {
            (_, "count") => count().await,
            (_, "count-sync") => count_sync(),
            (_, "keys") => keys().await,
            (_, "greeting") => greeting(),
            (_, "publish") => publish(query(query_string, "msg").unwrap_or("")).await,
            (_, "secret") => secret(query(query_string, "name").unwrap_or("")).await,
            (_, "invoke") => call(query(query_string, "fn").unwrap_or("")).await,
            ("sleep", ms) => {
                let ms: u64 = ms.parse().unwrap_or(0);
                wasip3::clocks::monotonic_clock::wait_for(ms * 1_000_000).await;
                (200, format!("slept {ms} ms\n"))
            }
            ("spin", rounds) => {
                let rounds: u64 = rounds.parse().unwrap_or(0);
                let mut x = 0u64;
                for i in 0..rounds {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                }
                (200, format!("spun {rounds}: {x}\n"))
            }
            _ => (200, format!("hello, {}\n", query(query_string, "name").unwrap_or("world"))),
        };
        Ok(text(status, body))
    }
}
