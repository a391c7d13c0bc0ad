//! Secrets the host holds, as granted by `grants.secrets`.
//!
//! ```no_run
//! let token = shoal_sdk::secrets::get("api-token")?;
//! # Ok::<(), shoal_sdk::Error>(())
//! ```

use crate::Error;

/// The secret `name`.
pub fn get(name: &str) -> Result<Vec<u8>, Error> {
    crate::imports::shoal::runtime::secrets::get(name)
}
