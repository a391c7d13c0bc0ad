//! Images made by other wasm tools, made into images every containerd
//! runs: `shoal image convert`.
//!
//! Other tools label wasm images with a wasm platform (`docker buildx
//! --platform wasi/wasm`: an index entry `wasi/wasm` and a config `os:
//! wasi`; runwasi's tooling: `wasip1/wasm`). containerd's CRI pulls only
//! the node's own platform (`linux/<arch>`: no index entry matches, so the
//! pull fails), and containerd 2.3 unpacks only layers whose config names
//! Linux. The layers stay as they are; what changes is the platform the
//! index and the configs say: one Linux config and manifest per
//! architecture, the original platform kept as the config label
//! [`crate::WASM_KIND_LABEL`]. A CNCF wasm artifact keeps its config (it
//! is never unpacked) and is listed for Linux.

use std::path::Path;

use anyhow::bail;
use serde_json::Value;

use crate::layout::Layout;
use crate::{Blob, CONFIG, INDEX, Image, LAYER, MANIFEST, PLATFORMS, WASM_CONFIG, WASM_KIND_LABEL, validate_reference};

/// Index media types (OCI's and Docker's manifest list).
const INDEXES: [&str; 2] = [INDEX, "application/vnd.docker.distribution.manifest.list.v2+json"];

impl Image {
    /// The image of the layout tarball at `path`, listed for Linux;
    /// `reference` names it (else the name the layout gives it). Returns
    /// the image and the platform it was made for.
    pub fn convert(path: &Path, reference: Option<&str>) -> anyhow::Result<(Image, String)> {
        let layout = Layout::read(path)?;
        let reference = match reference {
            Some(reference) => reference.to_string(),
            None => layout.reference(),
        };
        if reference.is_empty() {
            bail!("{}: the layout names its image by no full name: give one with --tag", path.display());
        }
        validate_reference(&reference)?;
        let manifest_descriptor = pick_manifest(&layout)?;
        let (_, manifest) = layout.json(&manifest_descriptor, MANIFEST)?;
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        let layers = layers.iter().map(|layer| layout.blob(layer, LAYER)).collect::<anyhow::Result<Vec<Blob>>>()?;
        if layers.is_empty() {
            return Err(layout.bad("its manifest has no layers"));
        }
        let (config, config_value) = layout.json(&manifest["config"], CONFIG)?;
        let was = format!(
            "{}/{}",
            config_value["os"].as_str().unwrap_or("unknown"),
            config_value["architecture"].as_str().unwrap_or("unknown")
        );
        let configs = if config.media_type == WASM_CONFIG {
            // Never unpacked: only the index's platforms matter.
            PLATFORMS.iter().map(|arch| (arch.to_string(), config.clone())).collect()
        } else {
            let kind = config_value["os"].as_str().unwrap_or("unknown").to_string();
            let mut configs = Vec::with_capacity(PLATFORMS.len());
            for arch in PLATFORMS {
                let mut linux = config_value.clone();
                linux["os"] = "linux".into();
                linux["architecture"] = arch.into();
                if kind != "linux" {
                    linux["config"]["Labels"][WASM_KIND_LABEL] = Value::from(kind.clone());
                }
                configs.push((arch.to_string(), Blob::new(CONFIG, serde_json::to_vec(&linux)?)));
            }
            configs
        };
        Ok((Image::assemble(&reference, layers, configs)?, was))
    }
}

/// The manifest of the layout's image: the image itself, or, from an
/// index, the entry for a wasm platform, else the first that is no
/// attestation.
fn pick_manifest(layout: &Layout) -> anyhow::Result<Value> {
    let mut descriptor = layout.image()?.clone();
    for _ in 0..2 {
        let media_type = descriptor["mediaType"].as_str().unwrap_or(MANIFEST).to_string();
        if !INDEXES.contains(&media_type.as_str()) {
            return Ok(descriptor);
        }
        let (_, index) = layout.json(&descriptor, &media_type)?;
        let entries = index["manifests"].as_array().cloned().unwrap_or_default();
        let images: Vec<&Value> = entries
            .iter()
            .filter(|entry| entry["annotations"]["vnd.docker.reference.type"] != "attestation-manifest")
            .filter(|entry| entry["platform"]["os"] != "unknown")
            .collect();
        descriptor = images
            .iter()
            .find(|entry| entry["platform"]["architecture"] == "wasm")
            .or_else(|| images.first())
            .map(|entry| (*entry).clone())
            .ok_or_else(|| layout.bad("its index lists no image"))?;
    }
    Err(layout.bad("indexes nest too deep"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{append, sha256_hex};

    /// A layout as `docker buildx --platform wasi/wasm --output type=oci`
    /// writes one: an index with a `wasi/wasm` entry and an attestation.
    fn buildx_layout(dir: &Path) -> (std::path::PathBuf, Blob) {
        let layer = Blob::new(LAYER, b"a tar layer holding app.wasm".to_vec());
        let config = Blob::new(
            CONFIG,
            serde_json::to_vec(&json!({
                "os": "wasi", "architecture": "wasm",
                "config": { "Entrypoint": ["/app.wasm"], "Labels": { "org.example": "yes" } },
                "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
            }))
            .unwrap(),
        );
        let manifest = Blob::new(
            MANIFEST,
            serde_json::to_vec(&json!({ "schemaVersion": 2, "mediaType": MANIFEST,
                "config": config.descriptor(), "layers": [layer.descriptor()] }))
            .unwrap(),
        );
        let mut wasi = manifest.descriptor();
        wasi["platform"] = json!({ "os": "wasi", "architecture": "wasm" });
        let mut attestation = manifest.descriptor();
        attestation["platform"] = json!({ "os": "unknown", "architecture": "unknown" });
        attestation["annotations"] = json!({ "vnd.docker.reference.type": "attestation-manifest" });
        let index = Blob::new(
            INDEX,
            serde_json::to_vec(&json!({ "schemaVersion": 2, "mediaType": INDEX, "manifests": [attestation, wasi] }))
                .unwrap(),
        );
        let mut top = index.descriptor();
        top["annotations"] = json!({ "org.opencontainers.image.ref.name": "latest" });
        let mut builder = tar::Builder::new(Vec::new());
        append(&mut builder, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        append(
            &mut builder,
            "index.json",
            &serde_json::to_vec(&json!({ "schemaVersion": 2, "manifests": [top] })).unwrap(),
        )
        .unwrap();
        for blob in [&layer, &config, &manifest, &index] {
            append(&mut builder, &format!("blobs/sha256/{}", sha256_hex(&blob.bytes)), &blob.bytes).unwrap();
        }
        let path = dir.join("buildx.tar");
        std::fs::write(&path, builder.into_inner().unwrap()).unwrap();
        (path, layer)
    }

    #[test]
    fn a_wasi_wasm_image_of_another_tool_is_listed_for_linux_over_its_own_layers() {
        let dir = tempfile::tempdir().unwrap();
        let (path, layer) = buildx_layout(dir.path());
        let err = Image::convert(&path, None).unwrap_err().to_string();
        assert!(err.contains("give one with --tag"), "a bare tag is no name: {err}");

        let (image, was) = Image::convert(&path, Some("localhost:5000/app:1")).unwrap();
        assert_eq!(was, "wasi/wasm");
        assert_eq!(image.layers.len(), 1);
        assert_eq!(image.layers[0].digest, layer.digest, "the layers stay as they are");
        let index: Value = serde_json::from_slice(&image.index.bytes).unwrap();
        let listed: Vec<&Value> = index["manifests"].as_array().unwrap().iter().map(|m| &m["platform"]).collect();
        assert_eq!(
            listed,
            [&json!({"architecture": "amd64", "os": "linux"}), &json!({"architecture": "arm64", "os": "linux"})]
        );
        for platform in &image.platforms {
            let config: Value = serde_json::from_slice(&platform.config.bytes).unwrap();
            assert_eq!(
                (config["os"].as_str(), config["architecture"].as_str()),
                (Some("linux"), Some(platform.architecture.as_str()))
            );
            assert_eq!(config["config"]["Entrypoint"][0], "/app.wasm");
            assert_eq!(config["config"]["Labels"]["org.example"], "yes");
            assert_eq!(config["config"]["Labels"][WASM_KIND_LABEL], "wasi");
        }
        // What it writes reads back as a Shoal image (for `shoal image push`).
        let out = dir.path().join("converted.tar");
        image.write_layout(&out).unwrap();
        let back = Image::read_layout(&out).unwrap();
        assert_eq!(
            (back.reference.as_str(), back.index.digest.as_str()),
            ("localhost:5000/app:1", image.index.digest.as_str())
        );
    }
}
