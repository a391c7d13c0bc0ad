//! What only containerd's own API knows about a container: its labels.
//! The CRI and `ctr run` copy the image's config labels into them, which
//! is how `shoal.dev/...` labels of an image reach the host.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use containerd_client::services::v1::GetContainerRequest;
use containerd_client::tonic::Request;

use containerd_client::with_namespace;

const TIMEOUT: Duration = Duration::from_secs(5);

/// The labels of container `id` in `namespace`.
pub async fn container_labels(socket: &Path, namespace: &str, id: &str) -> Result<BTreeMap<String, String>, String> {
    let lookup = async {
        let client = containerd_client::Client::from_path(socket)
            .await
            .map_err(|err| format!("cannot connect to containerd at {}: {err}", socket.display()))?;
        let request = with_namespace!(GetContainerRequest { id: id.to_string() }, namespace);
        let response = client
            .containers()
            .get(request)
            .await
            .map_err(|status| format!("containerd does not know container {id}: {}", status.message()))?;
        let container = response.into_inner().container.unwrap_or_default();
        Ok(container.labels.into_iter().collect())
    };
    tokio::time::timeout(TIMEOUT, lookup)
        .await
        .map_err(|_| format!("containerd at {} did not answer within {TIMEOUT:?}", socket.display()))?
}
