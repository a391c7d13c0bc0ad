//! `shoal image`: build, convert and push wasm-in-OCI images.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use crate::cli::parse_pair;

#[derive(Debug, Subcommand)]
pub(crate) enum ImageCommand {
    /// Make an OCI image layout tarball holding a .wasm, for
    /// `ctr images import` or `shoal image push`.
    Build {
        /// The .wasm file (a component, or a wasm32-wasip1 command module).
        wasm: PathBuf,
        /// The image's name, e.g. localhost:5000/hello:1.
        #[arg(long, short = 't')]
        tag: String,
        /// Where to write the tarball [default: <wasm file stem>.oci.tar].
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
        /// A config label, KEY=VALUE (repeatable): shoal.dev/limits.<field>,
        /// shoal.dev/grants.<capability>, shoal.dev/config.<key>.
        #[arg(long = "label", short = 'l', value_parser = parse_pair)]
        labels: Vec<(String, String)>,
        /// An environment variable of the image, NAME=VALUE (repeatable),
        /// e.g. SHOAL_HTTP_PORT=8080.
        #[arg(long = "env", short = 'e', value_parser = parse_pair)]
        env: Vec<(String, String)>,
        /// Build the CNCF wasm artifact layout (the wasm is the layer) for
        /// containerd 2.x, instead of a plain tar layer every containerd
        /// unpacks. Takes no --label or --env.
        #[arg(long)]
        artifact: bool,
    },
    /// Build the node installer's image (k8s/installer/daemonset.yaml):
    /// install.sh, `shoal` and `containerd-shim-shoal-v1`, and a static
    /// busybox for its shell, as an OCI layout tarball.
    Installer {
        /// The image's name (the DaemonSet names registry.local:5000/shoal/installer:0.1.0).
        #[arg(long, short = 't', default_value = "registry.local:5000/shoal/installer:0.1.0")]
        tag: String,
        /// Where to write the tarball.
        #[arg(long, short = 'o', default_value = "installer.oci.tar")]
        output: PathBuf,
        /// The folder with `shoal` and `containerd-shim-shoal-v1` [default: this binary's folder].
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// A statically linked busybox (Debian: apt install busybox-static).
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
    },
    /// Make an image built for a wasm platform by other tools (`docker
    /// buildx --platform wasi/wasm`, runwasi's `wasip1/wasm`) into one
    /// every containerd runs: the same layers, listed and configured for
    /// linux/amd64 and linux/arm64 (containerd's CRI pulls only the node's
    /// platform, and containerd 2.3 unpacks only Linux layers).
    Convert {
        /// The image as an OCI layout tarball (`docker buildx build
        /// --output type=oci,dest=app.tar`, or any tool's export).
        layout: PathBuf,
        /// The converted image's name [default: the one the layout gives].
        #[arg(long, short = 't')]
        tag: Option<String>,
        /// Where to write the converted tarball.
        #[arg(long, short = 'o')]
        output: PathBuf,
    },
    /// Push an image tarball made by `shoal image build` to its registry.
    /// Credentials: SHOAL_REGISTRY_USER and SHOAL_REGISTRY_PASSWORD.
    Push {
        /// The tarball.
        layout: PathBuf,
        /// Push under this name instead of the one it was built with.
        #[arg(long)]
        to: Option<String>,
        /// Plain HTTP (a registry on loopback without TLS).
        #[arg(long)]
        insecure: bool,
    },
}

/// `shoal image build`: write an OCI layout with the wasm.
pub(crate) fn image_build(
    wasm: PathBuf,
    tag: String,
    output: Option<PathBuf>,
    labels: Vec<(String, String)>,
    env: Vec<(String, String)>,
    artifact: bool,
) -> anyhow::Result<ExitCode> {
    let spec = shoal_images::ImageSpec {
        reference: tag,
        wasm: wasm.clone(),
        labels: labels.into_iter().collect(),
        env: env.into_iter().map(|(name, value)| format!("{name}={value}")).collect(),
        format: if artifact { shoal_images::ImageFormat::WasmArtifact } else { shoal_images::ImageFormat::Tar },
    };
    let image = shoal_images::Image::build(&spec)?;
    let output = output.unwrap_or_else(|| {
        let stem = wasm.file_stem().map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
        PathBuf::from(format!("{stem}.oci.tar"))
    });
    write_image(&image, &output)
}

/// Write `image` as an OCI layout tarball at `output` and say so.
pub(crate) fn write_image(image: &shoal_images::Image, output: &Path) -> anyhow::Result<ExitCode> {
    image.write_layout(output)?;
    writeln!(std::io::stdout(), "built {} ({}) -> {}", image.reference, image.index.digest, output.display())?;
    Ok(ExitCode::SUCCESS)
}

/// `shoal image push`: send a layout's image to a registry.
pub(crate) async fn image_push(layout: &Path, to: Option<String>, insecure: bool) -> anyhow::Result<ExitCode> {
    let image = shoal_images::Image::read_layout(layout)?;
    let name = to.clone().unwrap_or_else(|| image.reference.clone());
    eprintln!("pushing {name} ...");
    let digest = image.push(to.as_deref(), insecure).await?;
    writeln!(std::io::stdout(), "pushed {name}@{digest}")?;
    Ok(ExitCode::SUCCESS)
}
