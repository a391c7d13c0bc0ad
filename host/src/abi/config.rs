//! `wasi:config/store`: a function's configuration.

use super::bindings::wasi::config::store as config;
use super::{AbiCtxView, ConfigError};

/// The function's configuration: its environment (a pod's `env`, the
/// manifest's `[function.env]`), then its `config` grants, which win.
impl config::Host for AbiCtxView<'_> {
    async fn get(&mut self, key: String) -> Result<Option<String>, ConfigError> {
        self.state.admit("config.get")?;
        let caps = &self.state.caps;
        match caps.grants.config.get(&key).or_else(|| caps.env.get(&key)) {
            Some(value) => Ok(Some(value.clone())),
            None => Err(self.state.deny("config.get", format!("config key {key:?}")).into()),
        }
    }

    async fn get_all(&mut self) -> Result<Vec<(String, String)>, ConfigError> {
        self.state.admit("config.get-all")?;
        let caps = &self.state.caps;
        let mut all = caps.env.clone();
        all.extend(caps.grants.config.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(all.into_iter().collect())
    }

    fn convert_error(&mut self, err: ConfigError) -> wasmtime::Result<config::Error> {
        err.downcast()
    }
}
