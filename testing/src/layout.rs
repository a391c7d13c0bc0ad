//! OCI image layouts written the way other tools (or an attacker) write
//! them, byte by byte: for images `shoal image build` would never make.

use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// A file of a layer.
#[derive(Clone, Copy)]
pub enum Entry<'a> {
    /// A regular file with these bytes.
    File(&'a [u8]),
    /// A character device (major, minor).
    CharDevice(u32, u32),
    /// A block device (major, minor).
    BlockDevice(u32, u32),
    /// A FIFO (named pipe).
    Fifo,
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({ "mediaType": media_type, "digest": digest(bytes), "size": bytes.len() })
}

fn tar_file(builder: &mut tar::Builder<Vec<u8>>, name: &str, bytes: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, name, bytes).unwrap();
}

/// A layout tarball at `out` of image `reference`: one tar layer of
/// `entries`, the image config `config` (its `rootfs` filled in), and,
/// when `platform` is given, an index listing the manifest for it (else
/// the layout names the manifest itself).
pub fn write_image(
    reference: &str,
    entries: &[(&str, Entry<'_>)],
    mut config: Value,
    platform: Option<Value>,
    out: &Path,
) {
    let mut layer = tar::Builder::new(Vec::new());
    for (path, entry) in entries {
        let (kind, device, bytes) = match entry {
            Entry::File(bytes) => {
                tar_file(&mut layer, path, bytes);
                continue;
            }
            Entry::CharDevice(major, minor) => (tar::EntryType::Char, (*major, *minor), b"" as &[u8]),
            Entry::BlockDevice(major, minor) => (tar::EntryType::Block, (*major, *minor), b"" as &[u8]),
            Entry::Fifo => (tar::EntryType::Fifo, (0, 0), b"" as &[u8]),
        };
        let mut header = tar::Header::new_gnu();
        header.set_size(0);
        header.set_mode(0o666);
        header.set_entry_type(kind);
        header.set_device_major(device.0).unwrap();
        header.set_device_minor(device.1).unwrap();
        layer.append_data(&mut header, path, bytes).unwrap();
    }
    let layer = layer.into_inner().unwrap();
    config["rootfs"] = json!({ "type": "layers", "diff_ids": [digest(&layer)] });
    let config = serde_json::to_vec(&config).unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", &layer)],
    }))
    .unwrap();
    let mut blobs = vec![layer, config, manifest.clone()];
    let top = match platform {
        None => descriptor("application/vnd.oci.image.manifest.v1+json", &manifest),
        Some(platform) => {
            let mut entry = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
            entry["platform"] = platform;
            let index = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [entry],
            }))
            .unwrap();
            blobs.push(index.clone());
            descriptor("application/vnd.oci.image.index.v1+json", &index)
        }
    };
    write_layout(out, reference, top, blobs.iter().map(Vec::as_slice));
}

/// This machine's architecture in OCI's names.
pub fn architecture() -> &'static str {
    if cfg!(target_arch = "aarch64") { "arm64" } else { "amd64" }
}

/// A CNCF wasm artifact layout tarball at `out` of image `reference`:
/// `wasm` (any bytes: an attacker's too) is the one layer, listed for
/// `linux/amd64` and `linux/arm64`.
pub fn write_artifact(reference: &str, wasm: &[u8], out: &Path) {
    let config =
        serde_json::to_vec(&json!({ "architecture": "wasm", "os": "wasip2", "layerDigests": [digest(wasm)] })).unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.wasm.config.v0+json", &config),
        "layers": [descriptor("application/wasm", wasm)],
    }))
    .unwrap();
    let entries: Vec<Value> = ["amd64", "arm64"]
        .iter()
        .map(|arch| {
            let mut entry = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
            entry["platform"] = json!({ "os": "linux", "architecture": arch });
            entry
        })
        .collect();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))
    .unwrap();
    let top = descriptor("application/vnd.oci.image.index.v1+json", &index);
    write_layout(out, reference, top, [wasm, &config, &manifest, &index]);
}

/// An OCI layout tarball at `out`: `top` (named `reference`) in its
/// index.json, and `blobs` under blobs/sha256.
fn write_layout<'a>(out: &Path, reference: &str, mut top: Value, blobs: impl IntoIterator<Item = &'a [u8]>) {
    top["annotations"] =
        json!({ "io.containerd.image.name": reference, "org.opencontainers.image.ref.name": reference });
    let mut layout = tar::Builder::new(Vec::new());
    tar_file(&mut layout, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    tar_file(
        &mut layout,
        "index.json",
        &serde_json::to_vec(&json!({ "schemaVersion": 2, "manifests": [top] })).unwrap(),
    );
    for blob in blobs {
        tar_file(&mut layout, &format!("blobs/sha256/{}", digest(blob).trim_start_matches("sha256:")), blob);
    }
    std::fs::write(out, layout.into_inner().unwrap()).unwrap();
}
