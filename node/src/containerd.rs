//! What only containerd's own API knows about a container: its labels
//! (the CRI and `ctr run` copy the image's config labels into them, which
//! is how `shoal.dev/...` labels of an image reach the host), and, for a
//! CNCF wasm artifact image, the wasm itself: such an image is never
//! unpacked into a rootfs, so its layer is read from the content store.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use containerd_client::services::v1::{GetContainerRequest, GetImageRequest, ReadContentRequest};
use containerd_client::tonic::Request;
use containerd_client::with_namespace;
use serde_json::Value;

use crate::error::{Code, NodeError};
use shoal_images::{WASM_COMPONENT_LAYER, WASM_LAYER};

const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest manifest or index read from the content store.
const MAX_MANIFEST: usize = 4 << 20;

/// What containerd holds about one container.
#[derive(Debug, Default)]
pub(crate) struct ContainerRecord {
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// The image it was created from (empty for `ctr run --rootfs`).
    pub image: String,
}

async fn client(socket: &Path) -> Result<containerd_client::Client, NodeError> {
    containerd_client::Client::from_path(socket).await.map_err(|err| NodeError::Io {
        code: Code::UNAVAILABLE,
        what: format!("cannot connect to containerd at {}", socket.display()),
        source: std::io::Error::other(err),
    })
}

async fn within<T>(socket: &Path, work: impl Future<Output = Result<T, NodeError>>) -> Result<T, NodeError> {
    tokio::time::timeout(TIMEOUT, work).await.map_err(|_| {
        NodeError::Unavailable(format!("containerd at {} did not answer within {TIMEOUT:?}", socket.display()))
    })?
}

/// Container `id` of `namespace`: labels and image name.
pub(crate) async fn container(socket: &Path, namespace: &str, id: &str) -> Result<ContainerRecord, NodeError> {
    within(socket, async {
        let request = with_namespace!(GetContainerRequest { id: id.to_string() }, namespace);
        let response =
            client(socket).await?.containers().get(request).await.map_err(|status| NodeError::Containerd {
                code: Code::NOT_FOUND,
                what: format!("containerd does not know container {id}"),
                source: Box::new(status),
            })?;
        let container = response.into_inner().container.unwrap_or_default();
        Ok(ContainerRecord { labels: container.labels.into_iter().collect(), image: container.image })
    })
    .await
}

/// The wasm layer of `image` (a CNCF wasm artifact: a layer of media type
/// `application/wasm` or the component layer type), read from the content
/// store and checked against its digest.
pub(crate) async fn artifact_wasm(
    socket: &Path,
    namespace: &str,
    image: &str,
    max_bytes: u64,
) -> Result<(String, Vec<u8>), NodeError> {
    let client = within(socket, client(socket)).await?;
    let request = with_namespace!(GetImageRequest { name: image.to_string() }, namespace);
    let target = within(socket, async {
        client.images().get(request).await.map_err(|status| NodeError::Containerd {
            code: Code::NOT_FOUND,
            what: format!("containerd has no image {image}"),
            source: Box::new(status),
        })
    })
    .await?
    .into_inner()
    .image
    .and_then(|image| image.target)
    .ok_or_else(|| NodeError::InvalidArgument(format!("image {image} has no target descriptor")))?;

    let mut descriptor = (target.media_type, target.digest);
    // An index: take the manifest listed for wasm, else the first.
    for _ in 0..2 {
        let (media_type, digest) = &descriptor;
        if !media_type.contains("index") && !media_type.contains("manifest.list") {
            break;
        }
        let index: Value =
            serde_json::from_slice(&read(&client, namespace, digest, MAX_MANIFEST).await?).map_err(|err| {
                NodeError::Encoding {
                    code: Code::INVALID_ARGUMENT,
                    what: format!("image {image}: index {digest} is not JSON"),
                    source: err.into(),
                }
            })?;
        let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
        let chosen =
            manifests
                .iter()
                .find(|m| m["platform"]["architecture"] == "wasm")
                .or_else(|| manifests.first())
                .ok_or_else(|| NodeError::InvalidArgument(format!("image {image}: its index lists no manifest")))?;
        descriptor = (
            chosen["mediaType"].as_str().unwrap_or_default().to_string(),
            chosen["digest"].as_str().unwrap_or_default().to_string(),
        );
    }
    let manifest: Value = serde_json::from_slice(&read(&client, namespace, &descriptor.1, MAX_MANIFEST).await?)
        .map_err(|err| NodeError::Encoding {
            code: Code::INVALID_ARGUMENT,
            what: format!("image {image}: manifest {} is not JSON", descriptor.1),
            source: err.into(),
        })?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    let layer = layers
        .iter()
        .find(|layer| {
            let media_type = layer["mediaType"].as_str().unwrap_or_default();
            media_type == WASM_COMPONENT_LAYER || media_type == WASM_LAYER
        })
        .ok_or_else(|| {
            let types: Vec<&str> = layers.iter().filter_map(|l| l["mediaType"].as_str()).collect();
            NodeError::NotFound(format!(
                "image {image} has no wasm layer ({WASM_COMPONENT_LAYER} or {WASM_LAYER}); its layers: {types:?}"
            ))
        })?;
    let digest = layer["digest"].as_str().unwrap_or_default().to_string();
    // The manifest says how large the layer is: refused before a byte is read.
    if let Some(size) = layer["size"].as_u64().filter(|size| *size > max_bytes) {
        return Err(NodeError::InvalidArgument(format!(
            "image {image}: its wasm layer {digest} is {size} bytes, over the cap of {max_bytes} bytes"
        )));
    }
    let wasm = read(&client, namespace, &digest, usize::try_from(max_bytes).unwrap_or(usize::MAX)).await?;
    Ok((digest, wasm))
}

/// Read blob `digest` from the content store (at most `limit` bytes) and
/// check it against its sha256 digest.
async fn read(
    client: &containerd_client::Client,
    namespace: &str,
    digest: &str,
    limit: usize,
) -> Result<Vec<u8>, NodeError> {
    let Some(expected) = digest.strip_prefix("sha256:") else {
        return Err(NodeError::InvalidArgument(format!("unsupported digest {digest:?} (only sha256)")));
    };
    let request = with_namespace!(ReadContentRequest { digest: digest.to_string(), offset: 0, size: 0 }, namespace);
    let mut stream = client
        .content()
        .read(request)
        .await
        .map_err(|status| NodeError::Containerd {
            code: Code::NOT_FOUND,
            what: format!("cannot read {digest} from containerd's content store"),
            source: Box::new(status),
        })?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(|status| NodeError::Containerd {
        code: Code::UNAVAILABLE,
        what: format!("reading {digest} from the content store"),
        source: Box::new(status),
    })? {
        bytes.extend_from_slice(&chunk.data);
        if bytes.len() > limit {
            return Err(NodeError::InvalidArgument(format!("blob {digest} is larger than {limit} bytes")));
        }
    }
    if shoal::engine::sha256_hex(&bytes) != expected {
        return Err(NodeError::InvalidArgument(format!(
            "blob {digest} read from the content store does not match its digest"
        )));
    }
    Ok(bytes)
}
