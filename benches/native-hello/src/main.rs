//! A native hyper server answering what the benchmark guests answer:
//! `/hello?name=` and `/fib?n=`, on the address given as the first argument.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').filter_map(|pair| pair.split_once('=')).find(|(key, _)| *key == name).map(|(_, value)| value)
}

fn fib(n: u32) -> u64 {
    if n < 2 { n as u64 } else { fib(n - 1) + fib(n - 2) }
}

async fn answer(request: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let query = request.uri().query();
    let body = match request.uri().path() {
        "/fib" => {
            let n: u32 = query_param(query, "n").and_then(|v| v.parse().ok()).unwrap_or(20);
            format!("fib({n}) = {}\n", fib(std::hint::black_box(n)))
        }
        _ => format!("hello, {}\n", query_param(query, "name").unwrap_or("world")),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert("content-type", "text/plain; charset=utf-8".parse().expect("static header"));
    Ok(response)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8090".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("native-hello listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(answer);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
