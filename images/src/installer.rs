//! The node installer's image.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::{Blob, CONFIG, Image, LAYER, append_mode, linux_architecture, validate_reference};

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
        let architecture = linux_architecture();
        let config = json!({
            "architecture": architecture,
            "os": "linux",
            "config": { "Entrypoint": ["/install.sh"], "Env": ["PATH=/bin"] },
            "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
            "history": [{ "created_by": "shoal image installer" }],
        });
        let config = Blob::new(CONFIG, serde_json::to_vec(&config)?);
        Image::assemble(&spec.reference, vec![layer], vec![(architecture.to_string(), config)])
    }
}
