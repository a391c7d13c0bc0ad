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
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use sha2::{Digest as _, Sha256};

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

/// The static media type string for `text`, if it is one this module writes.
fn known_media_type(text: &str) -> Option<&'static str> {
    [MANIFEST, INDEX, CONFIG, LAYER, WASM_CONFIG, WASM_COMPONENT_LAYER, WASM_LAYER].into_iter().find(|t| *t == text)
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
    pub media_type: &'static str,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl Blob {
    fn new(media_type: &'static str, bytes: Vec<u8>) -> Blob {
        Blob { digest: format!("sha256:{}", sha256_hex(&bytes)), media_type, bytes }
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
    /// The layer holding the wasm.
    pub layer: Blob,
    /// The config and manifest of each platform (all over the one layer;
    /// several platforms may share one manifest).
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
    /// Every blob of the image, each once, layer first and index last.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut blobs = vec![&self.layer];
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
                Image::assemble(&spec.reference, layer, configs)
            }
            ImageFormat::WasmArtifact => {
                // Never unpacked, so its config keeps the artifact's own
                // platform; the index still lists Linux ones (the CRI
                // pulls only the node's platform).
                let (layer, config) = artifact_image(spec, kind, wasm)?;
                let configs = PLATFORMS.iter().map(|arch| (arch.to_string(), config.clone())).collect();
                Image::assemble(&spec.reference, layer, configs)
            }
        }
    }

    /// A manifest of `layer` per config, and an index listing each for
    /// its Linux architecture (configs that are the same share a manifest).
    fn assemble(reference: &str, layer: Blob, configs: Vec<(String, Blob)>) -> anyhow::Result<Image> {
        let mut platforms = Vec::with_capacity(configs.len());
        for (architecture, config) in configs {
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": config.descriptor(),
                "layers": [layer.descriptor()],
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
        Ok(Image { reference: reference.to_string(), layer, platforms, index })
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

    /// Read an image layout tarball written by [`Image::write_layout`]
    /// (one image: its index, a manifest and config per platform, one layer).
    pub fn read_layout(path: &Path) -> anyhow::Result<Image> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut blobs = BTreeMap::new();
        let mut index_json = None;
        let mut archive = tar::Archive::new(file);
        for entry in archive.entries().with_context(|| format!("{} is not a tar archive", path.display()))? {
            let mut entry = entry.with_context(|| format!("{} is a damaged tar archive", path.display()))?;
            let name = entry.path()?.to_string_lossy().trim_start_matches("./").to_string();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            if name == "index.json" {
                index_json = Some(bytes);
            } else if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                if sha256_hex(&bytes) != hex {
                    bail!("{}: blob {hex} does not match its digest", path.display());
                }
                blobs.insert(format!("sha256:{hex}"), bytes);
            }
        }
        let bad = |what: &str| anyhow::anyhow!("{}: not a Shoal image layout: {what}", path.display());
        let top: Value = serde_json::from_slice(&index_json.ok_or_else(|| bad("no index.json"))?)?;
        let entry = top["manifests"].get(0).ok_or_else(|| bad("index.json lists no image"))?;
        let reference = entry["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap_or("").to_string();
        let take = |descriptor: &Value, media_type: &'static str| -> anyhow::Result<Blob> {
            let media_type = descriptor["mediaType"].as_str().and_then(known_media_type).unwrap_or(media_type);
            let digest = descriptor["digest"].as_str().ok_or_else(|| bad("a descriptor has no digest"))?;
            let bytes = blobs.get(digest).cloned().ok_or_else(|| bad(&format!("blob {digest} is missing")))?;
            Ok(Blob { digest: digest.to_string(), media_type, bytes })
        };
        let index = take(entry, INDEX)?;
        let index_value: Value = serde_json::from_slice(&index.bytes)?;
        let entries = index_value["manifests"].as_array().filter(|entries| !entries.is_empty());
        let entries = entries.ok_or_else(|| bad("the image index lists no manifest"))?;
        let mut platforms = Vec::with_capacity(entries.len());
        let mut layer: Option<Blob> = None;
        for entry in entries {
            let architecture = entry["platform"]["architecture"].as_str().unwrap_or("").to_string();
            let manifest = take(entry, MANIFEST)?;
            let manifest_value: Value = serde_json::from_slice(&manifest.bytes)?;
            let config = take(&manifest_value["config"], CONFIG)?;
            let this_layer = take(&manifest_value["layers"][0], LAYER)?;
            if layer.as_ref().is_some_and(|layer| layer.digest != this_layer.digest) {
                bail!(bad("its manifests name different layers"));
            }
            layer = Some(this_layer);
            platforms.push(PlatformImage { architecture, config, manifest });
        }
        let layer = layer.ok_or_else(|| bad("the image index lists no manifest"))?;
        Ok(Image { reference, layer, platforms, index })
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

/// The node installer's image (what k8s/installer/daemonset.yaml runs): a
/// Linux image for this machine's architecture holding `install.sh` at
/// `/`, the two binaries it installs beside it, and a static busybox for
/// the shell and tools the script uses (`/bin/sh`, `cp`, `nsenter`, ...).
#[derive(Debug, Clone)]
pub struct InstallerSpec {
    /// The image's name, e.g. `registry.local:5000/shoal/installer:0.1.0`.
    pub reference: String,
    /// The folder holding `shoal` and `containerd-shim-shoal-v1`.
    pub bin_dir: PathBuf,
    /// A statically linked busybox (Debian's busybox-static: /bin/busybox).
    pub busybox: PathBuf,
}

/// The script the installer image runs.
const INSTALL_SH: &str = include_str!("../../k8s/installer/install.sh");

/// The busybox applets `install.sh` runs (its shell builtins aside).
const INSTALLER_APPLETS: [&str; 17] = [
    "sh", "cat", "chmod", "cmp", "cp", "dirname", "grep", "head", "mkdir", "mv", "nsenter", "rm", "sed", "sleep",
    "test", "tr", "[",
];

impl Image {
    /// Build the node installer's image (see [`InstallerSpec`]).
    pub fn installer(spec: &InstallerSpec) -> anyhow::Result<Image> {
        validate_reference(&spec.reference)?;
        let busybox = std::fs::read(&spec.busybox)
            .with_context(|| format!("cannot read busybox at {}", spec.busybox.display()))?;
        if busybox.get(..4) != Some(b"\x7fELF") {
            bail!("{} is not an executable (ELF) file", spec.busybox.display());
        }
        let mut builder = tar::Builder::new(Vec::new());
        append_mode(&mut builder, "install.sh", INSTALL_SH.as_bytes(), 0o755)?;
        for bin in ["shoal", "containerd-shim-shoal-v1"] {
            let path = spec.bin_dir.join(bin);
            let bytes = std::fs::read(&path).with_context(|| {
                format!("cannot read {} (build it first: cargo build --release --bins)", path.display())
            })?;
            append_mode(&mut builder, bin, &bytes, 0o755)?;
        }
        append_mode(&mut builder, "bin/busybox", &busybox, 0o755)?;
        for applet in INSTALLER_APPLETS {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            header.set_mtime(0);
            builder.append_link(&mut header, format!("bin/{applet}"), "busybox")?;
        }
        let layer = Blob::new(LAYER, builder.into_inner()?);
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let config = json!({
            "architecture": architecture,
            "os": "linux",
            "config": { "Entrypoint": ["/install.sh"], "Env": ["PATH=/bin"] },
            "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
            "history": [{ "created_by": "shoal image installer" }],
        });
        let config = Blob::new(CONFIG, serde_json::to_vec(&config)?);
        Image::assemble(&spec.reference, layer, vec![(architecture.to_string(), config)])
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
            assert_eq!(config["rootfs"]["diff_ids"][0], json!(image.layer.digest));
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
        assert_eq!(back.layer.media_type, WASM_LAYER, "a core module is application/wasm");
        assert_eq!(back.layer.bytes, std::fs::read(&wasm).unwrap());
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
