//! `shoal:runtime/secrets`: the host's secret store, or a pod's own
//! Secret volumes.

use std::path::PathBuf;

use wasmtime::component::Accessor;

use super::bindings::shoal::runtime::{secrets, types};
use super::concurrent_bindings::shoal::runtime::secrets_async;
use super::{Abi, AbiCtxView, AbiState, ShoalError};
use crate::manifest::VolumeKind;

/// Where a secret is found, as far as the function's grants tell without
/// reading a file.
enum Lookup {
    /// Answered already (from the host's store, or refused).
    Done(Result<Vec<u8>, ShoalError>),
    /// In one of the pod's Secret volumes (these host directories), if any
    /// has the key.
    Volumes(Vec<PathBuf>),
}

/// A function a pod made reads the pod's own Secret volumes (a key of any
/// of them, by name) and nothing of the host's; any other function reads
/// the host's secret store, within its `secrets` grant.
fn look_up(state: &AbiState, name: &str) -> Lookup {
    if let Err(refusal) = state.admit("secrets.get") {
        return Lookup::Done(Err(refusal.into()));
    }
    let caps = &state.caps;
    if caps.pod_secrets {
        let volumes: Vec<_> =
            caps.grants.files.iter().filter(|grant| grant.kind == VolumeKind::Secret).map(|g| g.host.clone()).collect();
        if volumes.is_empty() {
            let what = format!("secret {name:?} (the pod mounts no Secret volume)");
            return Lookup::Done(Err(state.deny("secrets.get", what).into()));
        }
        return Lookup::Volumes(volumes);
    }
    if !caps.grants.secrets.contains(name) {
        return Lookup::Done(Err(state.deny("secrets.get", format!("secret {name:?}")).into()));
    }
    Lookup::Done(match state.services.secrets.get(name) {
        Some(secret) => Ok(secret),
        None => Err(types::Error::NotFound(format!("the host has no secret {name:?}")).into()),
    })
}

/// Key `name` of the pod's Secret volumes `volumes`, read off the async
/// threads.
async fn read_from(volumes: Vec<PathBuf>, name: String) -> Result<Vec<u8>, ShoalError> {
    let key = name.clone();
    let found = tokio::task::spawn_blocking(move || read_secret_volumes(&volumes, &key))
        .await
        .map_err(|err| types::Error::Backend(format!("reading the secret failed: {err}")))?;
    match found {
        Ok(Some(secret)) => Ok(secret),
        Ok(None) => Err(types::Error::NotFound(format!("no Secret volume of the pod has a key {name:?}")).into()),
        Err(err) => Err(types::Error::Backend(err.to_string()).into()),
    }
}

impl secrets::Host for AbiCtxView<'_> {
    async fn get(&mut self, name: String) -> Result<Vec<u8>, ShoalError> {
        match look_up(self.state, &name) {
            Lookup::Done(answer) => answer,
            Lookup::Volumes(volumes) => read_from(volumes, name).await,
        }
    }
}

impl secrets_async::Host for AbiCtxView<'_> {}

impl<T: Send> secrets_async::HostWithStore<T> for Abi {
    /// Checked while the store is the calling request's; a Secret volume
    /// is read outside it.
    async fn get(accessor: &Accessor<T, Self>, name: String) -> Result<Vec<u8>, ShoalError> {
        match accessor.with(|mut access| look_up(access.get().state, &name)) {
            Lookup::Done(answer) => answer,
            Lookup::Volumes(volumes) => read_from(volumes, name).await,
        }
    }
}

/// The largest secret read (a Kubernetes Secret holds at most 1 MiB).
const MAX_SECRET_BYTES: u64 = 1 << 20;

/// Why a secret of a pod's Secret volumes could not be read.
#[derive(Debug, thiserror::Error)]
enum SecretReadError {
    #[error("cannot open the Secret volume {}: {source}", volume.display())]
    Volume { volume: std::path::PathBuf, source: std::io::Error },
    #[error("cannot open secret {name:?}: {source}")]
    Open { name: String, source: std::io::Error },
    #[error("secret {name:?} is not a regular file")]
    NotAFile { name: String },
    #[error("secret {name:?} is over {MAX_SECRET_BYTES} bytes")]
    TooLarge { name: String },
    #[error("cannot read secret {name:?}: {source}")]
    Read { name: String, source: std::io::Error },
}

/// Key `name` of the first Secret volume (a host directory) that has it,
/// opened inside the volume: a key is one plain file name, and cap-std
/// refuses every path (or symlink) that leads out of the volume.
fn read_secret_volumes(volumes: &[std::path::PathBuf], name: &str) -> Result<Option<Vec<u8>>, SecretReadError> {
    use std::io::Read as _;
    let plain = !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\0']);
    if !plain {
        return Ok(None);
    }
    let named = || name.to_string();
    for volume in volumes {
        let dir = cap_std::fs::Dir::open_ambient_dir(volume, cap_std::ambient_authority())
            .map_err(|source| SecretReadError::Volume { volume: volume.clone(), source })?;
        let file = match dir.open(name) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(SecretReadError::Open { name: named(), source }),
        };
        let metadata = file.metadata().map_err(|source| SecretReadError::Open { name: named(), source })?;
        if !metadata.is_file() {
            return Err(SecretReadError::NotAFile { name: named() });
        }
        if metadata.len() > MAX_SECRET_BYTES {
            return Err(SecretReadError::TooLarge { name: named() });
        }
        let mut bytes = Vec::new();
        file.take(MAX_SECRET_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| SecretReadError::Read { name: named(), source })?;
        return Ok(Some(bytes));
    }
    Ok(None)
}
