//! A small, synchronous view of `wasi:http/incoming-handler`.
//!
//! [`Handler::handle`] gets the whole request and returns the whole
//! response. A body that cannot be read whole — over [`MAX_BODY_BYTES`], or
//! cut off by the host (past the function's `max_request_bytes`) or the
//! client — never reaches the handler: the SDK answers 413 or 400 itself,
//! so a handler never acts on half a body. Functions that stream
//! can implement the raw `wasi:http` export through [`crate::wasi`] instead.

use std::io::{Read as _, Write as _};

use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// Request bodies larger than this are refused (413) before the handler.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// An incoming HTTP request, read whole.
#[derive(Debug, Clone)]
pub struct Request {
    method: String,
    path_with_query: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Request {
    /// The method, e.g. `GET`.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The path without the query, e.g. `/hello`.
    pub fn path(&self) -> &str {
        self.path_with_query.split_once('?').map_or(self.path_with_query.as_str(), |(path, _)| path)
    }

    /// The raw query string without `?`, if any.
    pub fn query(&self) -> Option<&str> {
        self.path_with_query.split_once('?').map(|(_, query)| query)
    }

    /// The value of query parameter `name` (no percent-decoding).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query()?
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    }

    /// The first value of header `name` (case-insensitive), if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }

    /// The request body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The whole request, or the response to send instead when its body
    /// could not be read whole.
    fn read(request: IncomingRequest) -> Result<Request, Response> {
        let method = match request.method() {
            Method::Get => "GET".to_string(),
            Method::Head => "HEAD".to_string(),
            Method::Post => "POST".to_string(),
            Method::Put => "PUT".to_string(),
            Method::Delete => "DELETE".to_string(),
            Method::Connect => "CONNECT".to_string(),
            Method::Options => "OPTIONS".to_string(),
            Method::Trace => "TRACE".to_string(),
            Method::Patch => "PATCH".to_string(),
            Method::Other(other) => other,
        };
        let path_with_query = request.path_with_query().unwrap_or_else(|| "/".to_string());
        let headers = request.headers().entries();
        let mut body = Vec::new();
        if let Ok(incoming) = request.consume() {
            if let Ok(stream) = incoming.stream() {
                let read = stream.take(MAX_BODY_BYTES as u64 + 1).read_to_end(&mut body);
                if let Err(err) = read {
                    return Err(Response::text(400, format!("the request body could not be read whole: {err}\n")));
                }
                if body.len() > MAX_BODY_BYTES {
                    return Err(Response::text(413, format!("request bodies are at most {MAX_BODY_BYTES} bytes\n")));
                }
            }
            let _ = IncomingBody::finish(incoming);
        }
        Ok(Request { method, path_with_query, headers, body })
    }
}

/// An HTTP response, sent whole.
#[derive(Debug, Clone)]
pub struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Response {
    /// A response with the given status and body and no headers.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response { status, headers: Vec::new(), body: body.into() }
    }

    /// A `text/plain; charset=utf-8` response.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::new(status, body.into()).with_header("content-type", "text/plain; charset=utf-8")
    }

    /// An `application/json` response from already-serialized JSON.
    pub fn json(status: u16, body: impl Into<String>) -> Response {
        Response::new(status, body.into()).with_header("content-type", "application/json")
    }

    /// Add a header.
    pub fn with_header(mut self, name: &str, value: impl AsRef<[u8]>) -> Response {
        self.headers.push((name.to_string(), value.as_ref().to_vec()));
        self
    }

    fn send(self, out: ResponseOutparam) {
        let headers = Fields::new();
        for (name, value) in &self.headers {
            // A header the host refuses (forbidden or malformed) is dropped,
            // not fatal: the rest of the response still goes out.
            let _ = headers.append(name, value);
        }
        let response = OutgoingResponse::new(headers);
        let _ = response.set_status_code(self.status);
        let Ok(body) = response.body() else {
            ResponseOutparam::set(out, Ok(response));
            return;
        };
        ResponseOutparam::set(out, Ok(response));
        if let Ok(mut stream) = body.write() {
            // `write_all` goes through `blocking-write-and-flush` in chunks of
            // at most 4 KiB, the largest write WASI promises to accept.
            for chunk in self.body.chunks(4096) {
                if stream.write_all(chunk).is_err() {
                    break;
                }
            }
            let _ = stream.flush();
        }
        let _ = OutgoingBody::finish(body, None);
    }
}

/// An HTTP function: one call per request.
pub trait Handler {
    /// Answer one request.
    fn handle(request: Request) -> Response;
}

#[doc(hidden)]
pub fn __dispatch<H: Handler>(request: IncomingRequest, out: ResponseOutparam) {
    match Request::read(request) {
        Ok(request) => H::handle(request).send(out),
        Err(refusal) => refusal.send(out),
    }
}

/// Export a type's [`Handler`] as this component's `wasi:http/incoming-handler`.
#[macro_export]
macro_rules! export_http {
    ($ty:ident) => {
        const _: () = {
            struct __ShoalHttp;
            impl $crate::wasi::exports::http::incoming_handler::Guest for __ShoalHttp {
                fn handle(
                    request: $crate::wasi::http::types::IncomingRequest,
                    out: $crate::wasi::http::types::ResponseOutparam,
                ) {
                    $crate::http::__dispatch::<$ty>(request, out)
                }
            }
    $crate::wasi::http::proxy::export!(__ShoalHttp with_types_in $crate::wasi);
        };
    };
}

/// Outbound HTTP through `wasi:http/outgoing-handler`: allowed only to the
/// `host:port` authorities in the function's `grants.outbound_http`.
///
/// `url` is `http://host:port/path?query`. Returns the status and body, or
/// a description of the failure (`HttpRequestDenied` when not granted).
pub fn fetch(method: &str, url: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{OutgoingRequest, Scheme};

    let (scheme, rest) = match url.split_once("://") {
        Some(("http", rest)) => (Scheme::Http, rest),
        Some(("https", rest)) => (Scheme::Https, rest),
        _ => return Err(format!("unsupported URL {url:?}: use http:// or https://")),
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    let method = match method {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        other => Method::Other(other.to_string()),
    };
    request.set_method(&method).map_err(|()| "invalid method".to_string())?;
    request.set_scheme(Some(&scheme)).map_err(|()| "invalid scheme".to_string())?;
    request.set_authority(Some(authority)).map_err(|()| format!("invalid authority {authority:?}"))?;
    request.set_path_with_query(Some(path)).map_err(|()| format!("invalid path {path:?}"))?;
    let outgoing = request.body().map_err(|()| "request body unavailable".to_string())?;
    {
        let mut stream = outgoing.write().map_err(|()| "request body unwritable".to_string())?;
        for chunk in body.chunks(4096) {
            stream.write_all(chunk).map_err(|err| err.to_string())?;
        }
    }
    OutgoingBody::finish(outgoing, None).map_err(|err| format!("{err:?}"))?;
    let future = outgoing_handler::handle(request, None).map_err(|err| format!("{err:?}"))?;
    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(format!("{code:?}")),
        Some(Err(())) | None => return Err("no response".to_string()),
    };
    let status = response.status();
    let mut bytes = Vec::new();
    if let Ok(incoming) = response.consume() {
        if let Ok(stream) = incoming.stream() {
            let _ = stream.take(MAX_BODY_BYTES as u64).read_to_end(&mut bytes);
        }
        let _ = IncomingBody::finish(incoming);
    }
    Ok((status, bytes))
}
