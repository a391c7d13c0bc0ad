//! Calling other deployed functions (granted by `grants.invoke`). The
//! callee runs under its own limits and grants; its usage is recorded as
//! its own request, linked to this one.
//!
//! ```no_run
//! let reply = shoal_sdk::invoke::get("greeter", "/greet?name=x")?;
//! assert_eq!(reply.status, 200);
//! # Ok::<(), shoal_sdk::Error>(())
//! ```

use crate::Error;
use crate::imports::shoal::runtime::{invoke, types};

/// The callee's answer.
pub use types::Response;

/// Call `function` with a request.
pub fn call(
    function: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Result<Response, Error> {
    let request = types::Request {
        method: method.to_string(),
        path: path.to_string(),
        headers: headers.iter().map(|(name, value)| (name.to_string(), value.to_vec())).collect(),
        body: body.to_vec(),
    };
    invoke::call(function, &request)
}

/// `GET path` on `function`.
pub fn get(function: &str, path: &str) -> Result<Response, Error> {
    call(function, "GET", path, &[], &[])
}
