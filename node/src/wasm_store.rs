//! The wasm of every running container, kept by digest in the node host's
//! state directory.
//!
//! A container's wasm is read once, when it is created: from its rootfs,
//! or from containerd's content store by the image's name. Either may
//! change later (a tenant pushes its tag again, an image is removed), and
//! a host that takes the node over (`shoal node --upgrade`, or the old host
//! taking it back when the new one failed) must serve exactly the code the
//! container was created with. So the bytes are kept here under their
//! sha256, the snapshot names the digest, and the adopting host reads them
//! back and checks them against it. A file is written once per digest
//! (plain rename, no sync: a crash ends the pods anyway) and removed when
//! the last container using it is deleted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Code, NodeError};

/// Wasm bytes by digest, with how many containers use each.
pub(crate) struct WasmStore {
    dir: PathBuf,
    users: Mutex<HashMap<String, usize>>,
}

impl WasmStore {
    /// A store in `dir` (made on first use).
    pub(crate) fn new(dir: &Path) -> WasmStore {
        WasmStore { dir: dir.to_path_buf(), users: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.users.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path(&self, digest: &str) -> Result<PathBuf, NodeError> {
        if digest.len() != 64 || !digest.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err(NodeError::Internal(format!("{digest:?} is not a sha256 digest")));
        }
        Ok(self.dir.join(format!("{digest}.wasm")))
    }

    /// Keep `wasm` (of sha256 `digest`) for one more container.
    pub(crate) fn keep(&self, digest: &str, wasm: &[u8]) -> Result<(), NodeError> {
        let path = self.path(digest)?;
        let mut users = self.lock();
        if !path.is_file() {
            std::fs::create_dir_all(&self.dir).map_err(|source| NodeError::Io {
                code: Code::INTERNAL,
                what: format!("cannot create {}", self.dir.display()),
                source,
            })?;
            let written = tempfile::NamedTempFile::new_in(&self.dir)
                .and_then(|mut tmp| std::io::Write::write_all(&mut tmp, wasm).map(|()| tmp))
                .and_then(|tmp| tmp.persist(&path).map_err(|err| err.error));
            written.map_err(|source| NodeError::Io {
                code: Code::INTERNAL,
                what: format!("cannot keep the wasm {}", path.display()),
                source,
            })?;
        }
        *users.entry(digest.to_string()).or_default() += 1;
        Ok(())
    }

    /// Remove every kept wasm: a host that starts afresh (no container
    /// handed over) has no container using any, whatever a host before it
    /// (that crashed) left.
    pub(crate) fn clear(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        self.lock().clear();
    }

    /// One more container uses the wasm of `digest`, already kept (a
    /// container taken over from another host process).
    pub(crate) fn count(&self, digest: &str) {
        *self.lock().entry(digest.to_string()).or_default() += 1;
    }

    /// One container less uses the wasm of `digest`: the last one's going
    /// removes the file.
    pub(crate) fn release(&self, digest: &str) {
        let Ok(path) = self.path(digest) else { return };
        let mut users = self.lock();
        let Some(count) = users.get_mut(digest) else { return };
        *count -= 1;
        if *count == 0 {
            users.remove(digest);
            if let Err(err) = std::fs::remove_file(&path)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %err, "cannot remove a container's kept wasm");
            }
        }
    }

    /// The wasm kept under `digest`, at most `max_bytes`, checked against
    /// the digest.
    pub(crate) fn read(&self, digest: &str, max_bytes: u64) -> Result<Vec<u8>, NodeError> {
        use std::io::Read as _;
        let path = self.path(digest)?;
        let file = std::fs::File::open(&path).map_err(|source| NodeError::Io {
            code: Code::NOT_FOUND,
            what: format!("the kept wasm {} is gone", path.display()),
            source,
        })?;
        let mut wasm = Vec::new();
        file.take(max_bytes + 1).read_to_end(&mut wasm).map_err(|source| NodeError::Io {
            code: Code::INTERNAL,
            what: format!("cannot read the kept wasm {}", path.display()),
            source,
        })?;
        if wasm.len() as u64 > max_bytes {
            return Err(NodeError::InvalidArgument(format!(
                "the kept wasm {} is over {max_bytes} bytes",
                path.display()
            )));
        }
        if shoal::engine::sha256_hex(&wasm) != digest {
            return Err(NodeError::Internal(format!("the kept wasm {} does not match its digest", path.display())));
        }
        Ok(wasm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_wasm_reads_back_checked_and_goes_with_its_last_user() {
        let dir = tempfile::tempdir().unwrap();
        let store = WasmStore::new(&dir.path().join("wasm"));
        let wasm = b"\0asm\x0d\0\x01\0".to_vec();
        let digest = shoal::engine::sha256_hex(&wasm);
        store.keep(&digest, &wasm).unwrap();
        store.keep(&digest, &wasm).unwrap();
        assert_eq!(store.read(&digest, 1024).unwrap(), wasm);
        assert!(store.read(&digest, 4).unwrap_err().to_string().contains("over 4 bytes"));
        store.release(&digest);
        assert_eq!(store.read(&digest, 1024).unwrap(), wasm, "one user left");
        store.release(&digest);
        assert!(
            matches!(store.read(&digest, 1024).map_err(|err| err.code()), Err(Code::NOT_FOUND)),
            "gone with the last user"
        );

        // Bytes changed behind the store's back are refused.
        store.keep(&digest, &wasm).unwrap();
        std::fs::write(dir.path().join("wasm").join(format!("{digest}.wasm")), b"garbage").unwrap();
        assert!(store.read(&digest, 1024).unwrap_err().to_string().contains("does not match its digest"));
        assert!(store.keep("../../etc/passwd", b"x").is_err(), "a digest is a digest");
    }
}
