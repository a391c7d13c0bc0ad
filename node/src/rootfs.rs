//! Reading a file out of a container's rootfs as the container would see
//! it, and never anything else.
//!
//! An image is written by whoever built it: its entrypoint may be a symlink
//! to `/dev/zero`, to `../../../../etc/shadow`, to a FIFO that never
//! answers, or a file of many gigabytes. So the path is resolved by the
//! kernel with the rootfs as `/` (`openat2` with `RESOLVE_IN_ROOT`: `..`
//! stops at the root and absolute symlinks start there, exactly as inside
//! the container), opened non-blocking (a FIFO cannot stall the open), must
//! be a regular file, and is read only up to a cap checked before and while
//! reading.

use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};

use crate::error::{Code, NodeError};

/// Make the mounted rootfs at `target` `nodev` and `nosuid`, whatever
/// containerd's mount options said: a device node in an image then opens
/// as nothing (`EACCES`) even for the host's root, and no set-id bit
/// means anything. It is remounted as a bind of itself, which changes the
/// mount's own flags and keeps the others (read-only, noexec, atime).
pub(crate) fn harden(target: &Path) -> Result<(), NodeError> {
    use nix::mount::MsFlags;
    use nix::sys::statvfs::{FsFlags, statvfs};
    let failed = |what: &str, errno: Errno| NodeError::Os {
        code: Code::INTERNAL,
        what: format!("cannot {what} the rootfs {} nodev,nosuid", target.display()),
        source: errno.into(),
    };
    let current = statvfs(target).map_err(|err| failed("read the mount flags of", err))?.flags();
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    for (has, keep) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(has) {
            flags |= keep;
        }
    }
    nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|err| failed("remount", err))
}

/// The largest wasm file read out of a rootfs unless configured otherwise.
pub const DEFAULT_MAX_WASM_BYTES: u64 = 256 << 20;

/// Read `path` (as the container names it; absolute or relative to `/`)
/// from the container whose root is `root`, refusing anything but a
/// regular file of at most `max_bytes`.
pub(crate) fn read_inside(root: &Path, path: &str, max_bytes: u64) -> Result<Vec<u8>, NodeError> {
    let dir =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(root).map_err(
            |source| NodeError::Io {
                code: Code::INTERNAL,
                what: format!("cannot open the rootfs {}", root.display()),
                source,
            },
        )?;
    let relative = path.trim_start_matches('/');
    let relative = if relative.is_empty() { "." } else { relative };
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = openat2(&dir, relative, how).map_err(|errno| match errno {
        Errno::ENOENT | Errno::ENOTDIR => NodeError::NotFound(format!("{path} is not in the image's rootfs")),
        Errno::ELOOP => NodeError::InvalidArgument(format!("{path} is a loop of symbolic links")),
        Errno::EACCES | Errno::EPERM => NodeError::Os {
            code: Code::INVALID_ARGUMENT,
            what: format!("{path} cannot be read from the image's rootfs"),
            source: errno.into(),
        },
        errno => NodeError::Os {
            code: Code::INTERNAL,
            what: format!("cannot open {path} in the image's rootfs"),
            source: errno.into(),
        },
    })?;
    let mut file = File::from(fd);
    let metadata = file.metadata().map_err(|source| NodeError::Io {
        code: Code::INTERNAL,
        what: format!("cannot stat {path} in the image's rootfs"),
        source,
    })?;
    let kind = metadata.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(NodeError::InvalidArgument(format!("{path} in the image's rootfs is {what}, not a regular file")));
    }
    let too_large =
        |size: u64| NodeError::InvalidArgument(format!("{path} is {size} bytes, over the cap of {max_bytes} bytes"));
    if metadata.len() > max_bytes {
        return Err(too_large(metadata.len()));
    }
    // The size may change under us (an image's files are not ours): read
    // one byte past the cap at most.
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    (&mut file).take(max_bytes + 1).read_to_end(&mut bytes).map_err(|source| NodeError::Io {
        code: Code::INTERNAL,
        what: format!("cannot read {path} from the image's rootfs"),
        source,
    })?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// Run `read_inside` on another thread, so a read that would block
    /// fails the test instead of hanging it.
    fn read(root: &Path, path: &str, max_bytes: u64) -> Result<Vec<u8>, NodeError> {
        let (root, path) = (root.to_path_buf(), path.to_string());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read_inside(&root, &path, max_bytes));
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("the read returns instead of blocking")
    }

    fn message(result: Result<Vec<u8>, NodeError>) -> String {
        result.expect_err("refused").to_string()
    }

    #[test]
    fn the_entrypoint_is_read_as_the_container_sees_it() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("opt/app")).unwrap();
        std::fs::write(root.path().join("opt/app/app.wasm"), b"\0asm-like").unwrap();
        // An absolute symlink inside the image means the image's own path.
        symlink("/opt/app/app.wasm", root.path().join("app.wasm")).unwrap();
        assert_eq!(read(root.path(), "/app.wasm", 1024).unwrap(), b"\0asm-like");
        assert_eq!(read(root.path(), "opt/app/app.wasm", 1024).unwrap(), b"\0asm-like");
    }

    #[test]
    fn symlinks_out_of_the_rootfs_never_reach_the_nodes_files() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret.wasm");
        std::fs::write(&secret, b"another tenant's file").unwrap();
        symlink("/dev/zero", root.path().join("zero.wasm")).unwrap();
        symlink("../../../../../../dev/urandom", root.path().join("random.wasm")).unwrap();
        symlink(&secret, root.path().join("secret.wasm")).unwrap();
        for path in ["/zero.wasm", "/random.wasm", "/secret.wasm", "/../../../../dev/zero"] {
            let error = read(root.path(), path, 1 << 20).expect_err("refused");
            assert!(matches!(error, NodeError::NotFound(_)), "{path}: {error:?}");
            assert!(error.to_string().contains("is not in the image's rootfs"), "{error}");
        }
    }

    #[test]
    fn fifos_directories_loops_and_oversized_files_are_refused_by_name() {
        let root = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&root.path().join("fifo.wasm"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::create_dir(root.path().join("dir.wasm")).unwrap();
        symlink("/loop-b", root.path().join("loop-a")).unwrap();
        symlink("/loop-a", root.path().join("loop-b")).unwrap();
        std::fs::write(root.path().join("big.wasm"), vec![0u8; 4096]).unwrap();

        assert!(message(read(root.path(), "/fifo.wasm", 1024)).contains("/fifo.wasm in the image's rootfs is a FIFO"));
        assert!(message(read(root.path(), "/dir.wasm", 1024)).contains("is a directory, not a regular file"));
        assert!(message(read(root.path(), "/loop-a", 1024)).contains("loop of symbolic links"));
        assert!(
            message(read(root.path(), "/big.wasm", 1024)).contains("/big.wasm is 4096 bytes, over the cap of 1024")
        );
        assert_eq!(read(root.path(), "/big.wasm", 4096).unwrap().len(), 4096);
    }
}
