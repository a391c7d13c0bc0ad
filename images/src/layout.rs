//! Reading an OCI image layout tarball (what `shoal image build` writes,
//! and what other tools export): every blob checked against its digest,
//! sizes capped before anything is read.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{Blob, CONFIG, INDEX, Image, LAYER, MANIFEST, PlatformImage, sha256_hex};

/// The most a layout tarball may hold in all (wasm images are small; a
/// hostile tarball must not fill the machine's memory).
const MAX_LAYOUT_BYTES: u64 = 2 << 30;

/// A layout tarball's blobs by digest and its top `index.json`.
pub(crate) struct Layout {
    path: PathBuf,
    blobs: BTreeMap<String, Vec<u8>>,
    top: Value,
}

impl Layout {
    /// Read the tarball at `path`.
    pub(crate) fn read(path: &Path) -> anyhow::Result<Layout> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut blobs = BTreeMap::new();
        let mut index_json = None;
        let mut total = 0u64;
        let mut archive = tar::Archive::new(file);
        for entry in archive.entries().with_context(|| format!("{} is not a tar archive", path.display()))? {
            let mut entry = entry.with_context(|| format!("{} is a damaged tar archive", path.display()))?;
            let name = entry.path()?.to_string_lossy().trim_start_matches("./").to_string();
            let wanted = name == "index.json" || name.starts_with("blobs/sha256/");
            if !wanted || !entry.header().entry_type().is_file() {
                continue;
            }
            total = total.saturating_add(entry.size());
            if total > MAX_LAYOUT_BYTES {
                bail!("{}: the layout holds more than {MAX_LAYOUT_BYTES} bytes", path.display());
            }
            let mut bytes = Vec::new();
            (&mut entry).take(MAX_LAYOUT_BYTES).read_to_end(&mut bytes)?;
            if name == "index.json" {
                index_json = Some(bytes);
            } else if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                if sha256_hex(&bytes) != hex {
                    bail!("{}: blob {hex} does not match its digest", path.display());
                }
                blobs.insert(format!("sha256:{hex}"), bytes);
            }
        }
        let layout = Layout { path: path.to_path_buf(), blobs, top: Value::Null };
        let index_json = index_json.ok_or_else(|| layout.bad("no index.json"))?;
        let top = serde_json::from_slice(&index_json).map_err(|err| layout.bad(&format!("index.json: {err}")))?;
        Ok(Layout { top, ..layout })
    }

    /// What is wrong with the layout, named with its path.
    pub(crate) fn bad(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!("{}: not an image layout Shoal can read: {what}", self.path.display())
    }

    /// The first image the layout lists (its descriptor).
    pub(crate) fn image(&self) -> anyhow::Result<&Value> {
        self.top["manifests"].get(0).ok_or_else(|| self.bad("index.json lists no image"))
    }

    /// The name the layout gives its image (empty when none).
    pub(crate) fn reference(&self) -> String {
        let annotations = &self.image().map(|image| image["annotations"].clone()).unwrap_or_default();
        ["io.containerd.image.name", "org.opencontainers.image.ref.name"]
            .iter()
            .filter_map(|key| annotations[key].as_str())
            .find(|name| name.contains('/') || name.contains(':'))
            .unwrap_or_default()
            .to_string()
    }

    /// The blob `descriptor` names (`media_type` when it names none).
    pub(crate) fn blob(&self, descriptor: &Value, media_type: &str) -> anyhow::Result<Blob> {
        let media_type = descriptor["mediaType"].as_str().unwrap_or(media_type).to_string();
        let digest = descriptor["digest"].as_str().ok_or_else(|| self.bad("a descriptor has no digest"))?;
        let bytes = self.blobs.get(digest).cloned().ok_or_else(|| self.bad(&format!("blob {digest} is missing")))?;
        Ok(Blob { digest: digest.to_string(), media_type, bytes })
    }

    /// The JSON of the blob `descriptor` names.
    pub(crate) fn json(&self, descriptor: &Value, media_type: &str) -> anyhow::Result<(Blob, Value)> {
        let blob = self.blob(descriptor, media_type)?;
        let value = serde_json::from_slice(&blob.bytes)
            .map_err(|err| self.bad(&format!("{} is not JSON: {err}", blob.digest)))?;
        Ok((blob, value))
    }
}

impl Image {
    /// Read an image layout tarball as [`Image::write_layout`] writes it:
    /// an index listing a manifest per platform, all over the same layers.
    pub fn read_layout(path: &Path) -> anyhow::Result<Image> {
        let layout = Layout::read(path)?;
        let (index, index_value) = layout.json(layout.image()?, INDEX)?;
        let entries = index_value["manifests"].as_array().filter(|entries| !entries.is_empty());
        let entries = entries.ok_or_else(|| layout.bad("the image index lists no manifest"))?;
        let mut platforms = Vec::with_capacity(entries.len());
        let mut layers: Option<Vec<Blob>> = None;
        for entry in entries {
            let architecture = entry["platform"]["architecture"].as_str().unwrap_or("").to_string();
            let (manifest, manifest_value) = layout.json(entry, MANIFEST)?;
            let config = layout.blob(&manifest_value["config"], CONFIG)?;
            let these = manifest_value["layers"].as_array().cloned().unwrap_or_default();
            let these = these.iter().map(|layer| layout.blob(layer, LAYER)).collect::<anyhow::Result<Vec<_>>>()?;
            if these.is_empty() {
                return Err(layout.bad(&format!("manifest {} has no layers", manifest.digest)));
            }
            let digests = |layers: &[Blob]| layers.iter().map(|layer| layer.digest.clone()).collect::<Vec<_>>();
            if layers.as_ref().is_some_and(|layers| digests(layers) != digests(&these)) {
                return Err(layout.bad("its manifests name different layers"));
            }
            layers = Some(these);
            platforms.push(PlatformImage { architecture, config, manifest });
        }
        let layers = layers.ok_or_else(|| layout.bad("the image index lists no manifest"))?;
        Ok(Image { reference: layout.reference(), layers, platforms, index })
    }
}
