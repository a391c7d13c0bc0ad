//! Configuration values the manifest gives the function (`grants.config`).
//!
//! ```no_run
//! let greeting = shoal_sdk::config::get("greeting")?.unwrap_or_else(|| "hello".into());
//! # Ok::<(), shoal_sdk::config::Error>(())
//! ```

use crate::imports::wasi::config::store;

/// Why configuration could not be read (`Upstream` names a key that was
/// not granted).
pub use store::Error;

/// The value of `key`.
pub fn get(key: &str) -> Result<Option<String>, Error> {
    store::get(key)
}

/// Every key and value given to the function.
pub fn all() -> Result<Vec<(String, String)>, Error> {
    store::get_all()
}
