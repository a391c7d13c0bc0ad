//! Secrets the host holds for functions: a file per secret in a folder
//! given to the host (`--secrets-dir`), else an environment variable
//! `SHOAL_SECRET_<NAME>` (uppercase, `-` and `.` as `_`).

use std::path::PathBuf;

/// Where secrets come from.
#[derive(Debug, Clone, Default)]
pub struct SecretStore {
    dir: Option<PathBuf>,
}

/// The environment variable prefix for secrets.
pub const ENV_PREFIX: &str = "SHOAL_SECRET_";

impl SecretStore {
    /// Secrets from `dir` (if any), then from the environment.
    pub fn new(dir: Option<PathBuf>) -> SecretStore {
        SecretStore { dir }
    }

    /// The secret `name`, if the host has it.
    pub fn get(&self, name: &str) -> Option<Vec<u8>> {
        let plain = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !name.starts_with('.');
        if !plain {
            return None;
        }
        if let Some(dir) = &self.dir
            && let Ok(bytes) = std::fs::read(dir.join(name))
        {
            return Some(bytes);
        }
        let var = format!("{ENV_PREFIX}{}", name.to_ascii_uppercase().replace(['-', '.'], "_"));
        std::env::var_os(var).map(std::ffi::OsString::into_encoded_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_files_and_names_cannot_escape_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api-token"), b"s3cret").unwrap();
        let store = SecretStore::new(Some(dir.path().to_path_buf()));
        assert_eq!(store.get("api-token").as_deref(), Some(&b"s3cret"[..]));
        assert_eq!(store.get("../etc/passwd"), None);
        assert_eq!(store.get("missing-secret-name"), None);
    }
}
