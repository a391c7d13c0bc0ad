//! `hello, <name>` over `wasi:http/handler@0.3.0` and nothing else: no
//! Runtime ABI, so `wasmtime serve` runs it as Shoal does (benchmark W1
//! compares the two hosts on it).

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::{wit_bindgen, wit_future, wit_stream};

wasip3::http::service::export!(HelloP3Plain);

struct HelloP3Plain;

impl wasip3::exports::http::handler::Guest for HelloP3Plain {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let target = request.get_path_with_query().unwrap_or_default();
        let name = target
            .split_once('?')
            .and_then(|(_, query)| query.split('&').find_map(|pair| pair.strip_prefix("name=")))
            .unwrap_or("world");
        let body = format!("hello, {name}\n");
        let (mut body_tx, body_rx) = wit_stream::new();
        let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
        drop(trailers_tx);
        let headers = Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())])
            .map_err(|_| ErrorCode::InternalError(Some("headers".to_string())))?;
        let (response, _sent) = Response::new(headers, Some(body_rx), trailers_rx);
        wit_bindgen::spawn_local(async move {
            body_tx.write_all(body.into_bytes()).await;
        });
        Ok(response)
    }
}
