//! wasm-in-OCI images: `shoal image build` and `shoal image push`.
//!
//! An image is an OCI image layout (as a tarball) holding one plain tar
//! layer with the `.wasm` in it, and a config whose `Entrypoint` names
//! that file and whose `Labels` carry `shoal.dev/...` grants and limits.
//! A plain tar layer is what every containerd unpacks (1.6 refuses the
//! wasm artifact media types), so the same image runs through `ctr run`,
//! the CRI and a registry.
//!
//! The image's index lists one manifest per platform, `linux/amd64` and
//! `linux/arm64`, each with a config of that platform over the same
//! layer: wasm runs anywhere, containerd picks the manifest by the node's
//! platform, and containerd 2.3 unpacks only layers whose *config* names
//! a Linux platform (`os: wasip2` is fetched and never unpacked). The
//! wasm's own kind is the config label [`WASM_KIND_LABEL`].
//!
//! `--artifact` builds the CNCF wasm artifact layout instead: the wasm
//! itself is the one layer ([`WASM_COMPONENT_LAYER`] or [`WASM_LAYER`]),
//! under a `application/vnd.wasm.config.v0+json` config. containerd 2.x
//! stores such images without unpacking them; the node host reads the
//! layer from containerd's content store (see `node::containerd`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use sha2::{Digest as _, Sha256};

mod convert;
mod installer;
mod layout;

pub use installer::InstallerSpec;

/// The lowercase hex sha256 of `bytes` (an OCI digest without its `sha256:`).
fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Write `bytes` to `path` so that readers see either nothing or all of it
/// (a temporary file beside it, synced, renamed over it).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|err| err.error)?;
    Ok(())
}

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// The CNCF wasm artifact layer of a component.
pub const WASM_COMPONENT_LAYER: &str = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm";
/// The CNCF wasm artifact layer of a core module.
pub const WASM_LAYER: &str = "application/wasm";
/// The config label saying what the image's wasm is: `wasip2` (a
/// component) or `wasip1` (a core module).
pub const WASM_KIND_LABEL: &str = "dev.shoal.wasm.kind";

/// How the wasm is packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// A plain tar layer holding the file; the config names it as the
    /// Entrypoint. Every containerd unpacks it.
    #[default]
    Tar,
    /// The CNCF wasm artifact layout: the wasm is the layer.
    WasmArtifact,
}

/// The platforms an image is listed for.
pub const PLATFORMS: [&str; 2] = ["amd64", "arm64"];

/// What goes into an image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The image's name, e.g. `localhost:5000/hello:1`.
    pub reference: String,
    /// The `.wasm` file.
    pub wasm: PathBuf,
    /// Config labels (`shoal.dev/...` grants and limits, or any other).
    pub labels: BTreeMap<String, String>,
    /// Environment variables of the image config (`NAME=value`).
    pub env: Vec<String>,
    /// Plain tar layer, or the CNCF wasm artifact layout.
    pub format: ImageFormat,
}

/// A blob of the layout.
#[derive(Debug, Clone)]
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    /// The media type it is referenced with.
    pub media_type: String,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl Blob {
    fn new(media_type: &str, bytes: Vec<u8>) -> Blob {
        Blob { digest: format!("sha256:{}", sha256_hex(&bytes)), media_type: media_type.to_string(), bytes }
    }

    fn descriptor(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len() })
    }
}

/// An image in memory: the blobs from the layer up to the index.
#[derive(Debug, Clone)]
pub struct Image {
    /// Its name.
    pub reference: String,
    /// Its layers (Shoal's own images: one, holding the wasm).
    pub layers: Vec<Blob>,
    /// The config and manifest of each platform (all over the same
    /// layers; several platforms may share one manifest).
    pub platforms: Vec<PlatformImage>,
    /// The image index listing the manifest per platform.
    pub index: Blob,
}

/// One platform's entry of an image.
#[derive(Debug, Clone)]
pub struct PlatformImage {
    /// Its architecture (the OS is Linux).
    pub architecture: String,
    /// The image config.
    pub config: Blob,
    /// The image manifest.
    pub manifest: Blob,
}

impl Image {
    /// Every blob of the image, each once, layers first and index last.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut blobs: Vec<&Blob> = self.layers.iter().collect();
        for platform in &self.platforms {
            for blob in [&platform.config, &platform.manifest] {
                if !blobs.iter().any(|seen| seen.digest == blob.digest) {
                    blobs.push(blob);
                }
            }
        }
        blobs.push(&self.index);
        blobs
    }
}

impl Image {
    /// Build the image for `spec`.
    pub fn build(spec: &ImageSpec) -> anyhow::Result<Image> {
        let wasm = std::fs::read(&spec.wasm).with_context(|| format!("cannot read {}", spec.wasm.display()))?;
        let kind = if wasmparser::Parser::is_component(&wasm) {
            "wasip2"
        } else if wasmparser::Parser::is_core_wasm(&wasm) {
            "wasip1"
        } else {
            bail!("{} is not a WebAssembly binary (bad magic number or version)", spec.wasm.display());
        };
        let file_name = spec
            .wasm
            .file_name()
            .and_then(|name| name.to_str())
            .filter(|name| !name.is_empty())
            .context("the wasm path has no file name")?
            .to_string();
        for key in spec.labels.keys() {
            if key.is_empty() || key.contains(char::is_whitespace) {
                bail!("invalid label name {key:?}");
            }
        }
        validate_reference(&spec.reference)?;

        match spec.format {
            ImageFormat::Tar => {
                let layer = Blob::new(LAYER, layer_tar(&file_name, &wasm)?);
                let configs = PLATFORMS
                    .iter()
                    .map(|arch| Ok((arch.to_string(), tar_config(spec, &file_name, kind, arch, &layer)?)))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Image::assemble(&spec.reference, vec![layer], configs)
            }
            ImageFormat::WasmArtifact => {
                // Never unpacked, so its config keeps the artifact's own
                // platform; the index still lists Linux ones (the CRI
                // pulls only the node's platform).
                let (layer, config) = artifact_image(spec, kind, wasm)?;
                let configs = PLATFORMS.iter().map(|arch| (arch.to_string(), config.clone())).collect();
                Image::assemble(&spec.reference, vec![layer], configs)
            }
        }
    }

    /// A manifest of `layers` per config, and an index listing each for
    /// its Linux architecture (configs that are the same share a manifest).
    fn assemble(reference: &str, layers: Vec<Blob>, configs: Vec<(String, Blob)>) -> anyhow::Result<Image> {
        let mut platforms = Vec::with_capacity(configs.len());
        let descriptors: Vec<Value> = layers.iter().map(Blob::descriptor).collect();
        for (architecture, config) in configs {
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": config.descriptor(),
                "layers": descriptors,
            });
            let manifest = Blob::new(MANIFEST, serde_json::to_vec(&manifest)?);
            platforms.push(PlatformImage { architecture, config, manifest });
        }
        let entries: Vec<Value> = platforms
            .iter()
            .map(|platform| {
                let mut descriptor = platform.manifest.descriptor();
                descriptor["platform"] = json!({ "architecture": platform.architecture, "os": "linux" });
                descriptor
            })
            .collect();
        let index = json!({ "schemaVersion": 2, "mediaType": INDEX, "manifests": entries });
        let index = Blob::new(INDEX, serde_json::to_vec(&index)?);
        Ok(Image { reference: reference.to_string(), layers, platforms, index })
    }

    /// Write the OCI image layout as a tarball (what `ctr images import`
    /// reads).
    pub fn write_layout(&self, path: &Path) -> anyhow::Result<()> {
        let mut top = self.index.descriptor();
        top["annotations"] = json!({
            "org.opencontainers.image.ref.name": self.reference,
            "io.containerd.image.name": self.reference,
        });
        let index_json = serde_json::to_vec(&json!({ "schemaVersion": 2, "mediaType": INDEX, "manifests": [top] }))?;
        let mut builder = tar::Builder::new(Vec::new());
        append(&mut builder, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        append(&mut builder, "index.json", &index_json)?;
        for blob in self.blobs() {
            let hex = blob.digest.trim_start_matches("sha256:");
            append(&mut builder, &format!("blobs/sha256/{hex}"), &blob.bytes)?;
        }
        let bytes = builder.into_inner()?;
        write_atomically(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Push the image to its registry (`reference` overrides the name it
    /// was built with). `insecure`: plain HTTP, for a registry on loopback.
    pub async fn push(&self, reference: Option<&str>, insecure: bool) -> anyhow::Result<String> {
        use oci_client::client::{ClientConfig, ClientProtocol};
        use oci_client::secrets::RegistryAuth;
        use oci_client::{Client, Reference, RegistryOperation};

        // reqwest is built without a default TLS provider; pick ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let name = reference.unwrap_or(&self.reference);
        let target: Reference = name.parse().with_context(|| format!("invalid image name {name:?}"))?;
        let protocol = if insecure {
            ClientProtocol::HttpsExcept(vec![target.registry().to_string()])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig { protocol, ..Default::default() });
        let auth = match (std::env::var("SHOAL_REGISTRY_USER"), std::env::var("SHOAL_REGISTRY_PASSWORD")) {
            (Ok(user), Ok(password)) => RegistryAuth::Basic(user, password),
            _ => RegistryAuth::Anonymous,
        };
        client
            .auth(&target, &auth, RegistryOperation::Push)
            .await
            .with_context(|| format!("cannot authenticate to {}", target.registry()))?;
        let blobs = self.blobs();
        for blob in blobs.iter().filter(|blob| blob.media_type != MANIFEST && blob.media_type != INDEX) {
            client
                .push_blob(&target, blob.bytes.clone(), &blob.digest)
                .await
                .with_context(|| format!("cannot push blob {} to {name}", blob.digest))?;
        }
        for manifest in blobs.iter().filter(|blob| blob.media_type == MANIFEST) {
            let by_digest = target.clone_with_digest(manifest.digest.clone());
            client
                .push_manifest_raw(&by_digest, manifest.bytes.clone(), MANIFEST.parse()?)
                .await
                .with_context(|| format!("cannot push manifest {} to {name}", manifest.digest))?;
        }
        client
            .push_manifest_raw(&target, self.index.bytes.clone(), INDEX.parse()?)
            .await
            .with_context(|| format!("cannot push the index to {name}"))?;
        Ok(self.index.digest.clone())
    }
}

/// The plain-tar layout's config for Linux on `architecture`: the file in
/// `layer` named by the Entrypoint, labels (and the wasm's kind) and
/// environment.
fn tar_config(spec: &ImageSpec, file_name: &str, kind: &str, architecture: &str, layer: &Blob) -> anyhow::Result<Blob> {
    let mut labels = spec.labels.clone();
    labels.insert(WASM_KIND_LABEL.to_string(), kind.to_string());
    let config = json!({
        "architecture": architecture,
        "os": "linux",
        "config": {
            "Entrypoint": [format!("/{file_name}")],
            "Env": spec.env,
            "Labels": labels,
        },
        "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
        "history": [{ "created_by": format!("shoal image build {file_name}") }],
    });
    Ok(Blob::new(CONFIG, serde_json::to_vec(&config)?))
}

/// The CNCF wasm artifact layout: the wasm is the layer. Its config has no
/// labels or environment, so grants and limits come from annotations.
fn artifact_image(spec: &ImageSpec, kind: &str, wasm: Vec<u8>) -> anyhow::Result<(Blob, Blob)> {
    if !spec.labels.is_empty() || !spec.env.is_empty() {
        bail!(
            "a wasm artifact image has no config labels or environment: drop --label/--env and set \
             shoal.dev/... annotations on the pod instead (or build the default tar layout)"
        );
    }
    let media_type = if kind == "wasip2" { WASM_COMPONENT_LAYER } else { WASM_LAYER };
    let layer = Blob::new(media_type, wasm);
    let config = json!({
        "architecture": "wasm",
        "os": kind,
        "layerDigests": [layer.digest],
    });
    Ok((layer, Blob::new(WASM_CONFIG, serde_json::to_vec(&config)?)))
}

/// This machine's architecture in OCI's (Go's) names.
fn linux_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn validate_reference(reference: &str) -> anyhow::Result<()> {
    reference
        .parse::<oci_client::Reference>()
        .map(|_| ())
        .with_context(|| format!("invalid image name {reference:?} (e.g. localhost:5000/hello:1)"))
}

fn layer_tar(file_name: &str, wasm: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    append(&mut builder, file_name, wasm)?;
    Ok(builder.into_inner()?)
}

fn append(builder: &mut tar::Builder<Vec<u8>>, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    append_mode(builder, name, bytes, 0o644)
}

fn append_mode(builder: &mut tar::Builder<Vec<u8>>, name: &str, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, name, bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wasm_file(dir: &Path) -> PathBuf {
        let path = dir.join("tiny.wasm");
        std::fs::write(&path, wat::parse_str("(module (func (export \"_start\")))").unwrap()).unwrap();
        path
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// An image layout with bytes changed anywhere (a hostile or
            /// broken tarball given to `image push`) reads back as the
            /// same image, or fails with an error — never a panic, and
            /// never content whose digest does not match.
            #[test]
            fn fuzz_a_damaged_layout_reads_back_whole_or_fails_cleanly(
                edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                truncate in prop::option::of(any::<prop::sample::Index>()),
            ) {
                let dir = tempfile::tempdir().unwrap();
                let spec = ImageSpec {
                    reference: "localhost:5000/tiny:1".into(),
                    wasm: wasm_file(dir.path()),
                    labels: Default::default(),
                    env: Vec::new(),
                    format: ImageFormat::Tar,
                };
                let image = Image::build(&spec).unwrap();
                let out = dir.path().join("tiny.tar");
                image.write_layout(&out).unwrap();
                let mut bytes = std::fs::read(&out).unwrap();
                for (at, value) in &edits {
                    let at = at.index(bytes.len());
                    bytes[at] = *value;
                }
                if let Some(cut) = truncate {
                    bytes.truncate(cut.index(bytes.len()));
                }
                std::fs::write(&out, &bytes).unwrap();
                if let Ok(back) = Image::read_layout(&out) {
                    for blob in back.blobs() {
                        prop_assert_eq!(format!("sha256:{}", sha256_hex(&blob.bytes)), blob.digest.clone());
                    }
                }
            }
        }
    }

    #[test]
    fn a_built_layout_reads_back_with_matching_digests() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ImageSpec {
            reference: "localhost:5000/tiny:1".into(),
            wasm: wasm_file(dir.path()),
            labels: [("shoal.dev/limits.timeout_ms".to_string(), "100".to_string())].into(),
            env: vec!["SHOAL_HTTP_PORT=9000".into()],
            format: ImageFormat::Tar,
        };
        let image = Image::build(&spec).unwrap();
        let out = dir.path().join("tiny.tar");
        image.write_layout(&out).unwrap();
        let back = Image::read_layout(&out).unwrap();
        assert_eq!(back.reference, "localhost:5000/tiny:1");
        assert_eq!(back.index.digest, image.index.digest);
        let architectures: Vec<&str> = back.platforms.iter().map(|p| p.architecture.as_str()).collect();
        assert_eq!(architectures, PLATFORMS);
        for platform in &back.platforms {
            // containerd 2.3 unpacks only layers whose config is Linux's.
            let config: Value = serde_json::from_slice(&platform.config.bytes).unwrap();
            assert_eq!(config["os"], "linux");
            assert_eq!(config["architecture"], platform.architecture);
            assert_eq!(config["config"]["Entrypoint"][0], "/tiny.wasm");
            assert_eq!(config["config"]["Labels"]["shoal.dev/limits.timeout_ms"], "100");
            assert_eq!(config["config"]["Labels"][WASM_KIND_LABEL], "wasip1");
            assert_eq!(config["rootfs"]["diff_ids"][0], json!(image.layers[0].digest));
        }
        let index: Value = serde_json::from_slice(&back.index.bytes).unwrap();
        for (entry, platform) in index["manifests"].as_array().unwrap().iter().zip(&back.platforms) {
            assert_eq!(entry["platform"], json!({ "architecture": platform.architecture, "os": "linux" }));
            assert_eq!(entry["digest"], json!(platform.manifest.digest));
        }
    }

    #[test]
    fn building_from_a_file_that_is_not_wasm_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.wasm");
        std::fs::write(&path, b"hello").unwrap();
        let spec = ImageSpec {
            reference: "localhost/x:1".into(),
            wasm: path,
            labels: BTreeMap::new(),
            env: Vec::new(),
            format: ImageFormat::Tar,
        };
        let err = Image::build(&spec).unwrap_err().to_string();
        assert!(err.contains("not a WebAssembly binary"), "{err}");
    }

    #[test]
    fn an_artifact_image_carries_the_wasm_itself_as_its_layer() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = wasm_file(dir.path());
        let spec = ImageSpec {
            reference: "localhost:5000/tiny:2".into(),
            wasm: wasm.clone(),
            labels: BTreeMap::new(),
            env: Vec::new(),
            format: ImageFormat::WasmArtifact,
        };
        let image = Image::build(&spec).unwrap();
        let out = dir.path().join("tiny.tar");
        image.write_layout(&out).unwrap();
        let back = Image::read_layout(&out).unwrap();
        assert_eq!(back.layers[0].media_type, WASM_LAYER, "a core module is application/wasm");
        assert_eq!(back.layers[0].bytes, std::fs::read(&wasm).unwrap());
        assert_eq!(back.platforms.len(), PLATFORMS.len());
        for platform in &back.platforms {
            assert_eq!(platform.config.media_type, WASM_CONFIG);
            let manifest: Value = serde_json::from_slice(&platform.manifest.bytes).unwrap();
            assert_eq!(manifest["config"]["mediaType"], WASM_CONFIG);
        }

        let labelled = ImageSpec { labels: [("a".to_string(), "b".to_string())].into(), ..spec };
        let err = Image::build(&labelled).unwrap_err().to_string();
        assert!(err.contains("no config labels"), "{err}");
    }
}
