//! Deploying through Shoal's admin API (HTTP/1.1 + JSON on a Unix socket),
//! and making distinct variants of one wasm.
//!
//! The client is a few lines on std rather than the host crate's own
//! client: linking the host would compile wasmtime a second time in this
//! workspace, and cold-start figures must not include a CLI process start.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use serde_json::{Value, json};

/// A Shoal host's admin API.
pub struct Admin {
    socket: PathBuf,
    /// A deployed spec (from the host's registry.json), used as the
    /// template for new functions so the runner never restates the spec
    /// format.
    template: Value,
}

/// A function to deploy: name, route, wasm and limit overrides (spec JSON
/// field names, durations in ms).
pub struct Deploy<'a> {
    pub name: String,
    pub wasm: &'a [u8],
    pub limits: Value,
}

impl Admin {
    /// Connect to the host whose state directory is `state_dir`; it must
    /// already have one function deployed (its spec is the template).
    pub fn new(socket: PathBuf, state_dir: &Path) -> anyhow::Result<Admin> {
        Admin::with_template(socket, state_dir, None)
    }

    /// [`Admin::new`] with the spec of the deployed function `name` as the
    /// template (its grants and limits), or the first one's for `None`.
    pub fn with_template(socket: PathBuf, state_dir: &Path, name: Option<&str>) -> anyhow::Result<Admin> {
        let registry = state_dir.join("registry.json");
        let text = std::fs::read(&registry).with_context(|| format!("reading {}", registry.display()))?;
        let registry: Value = serde_json::from_slice(&text)?;
        let functions = registry["functions"].as_array().cloned().unwrap_or_default();
        let template = functions
            .iter()
            .map(|function| &function["spec"])
            .find(|spec| name.is_none_or(|name| spec["name"] == name))
            .cloned()
            .unwrap_or(Value::Null);
        anyhow::ensure!(
            template.is_object(),
            "{} holds no deployed function{}",
            state_dir.display(),
            name.map(|name| format!(" named {name}")).unwrap_or_default()
        );
        Ok(Admin { socket, template })
    }

    fn request(&self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut stream =
            UnixStream::connect(&self.socket).with_context(|| format!("connecting to {}", self.socket.display()))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        stream.write_all(body)?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply)?;
        let split = reply.windows(4).position(|w| w == b"\r\n\r\n").context("admin reply without headers")?;
        let head = String::from_utf8_lossy(&reply[..split]).into_owned();
        let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).context("admin reply status")?;
        Ok((status, reply[split + 4..].to_vec()))
    }

    /// Deploy `functions` in one request (one registry write); each gets the
    /// route `/<name>`.
    pub fn deploy(&self, functions: &[Deploy]) -> anyhow::Result<()> {
        let functions: Vec<Value> = functions
            .iter()
            .map(|function| {
                let mut spec = self.template.clone();
                spec["name"] = json!(function.name);
                spec["version"] = Value::Null;
                spec["routes"] = json!([{ "host": null, "prefix": format!("/{}", function.name) }]);
                if let (Some(limits), Some(overrides)) = (spec["limits"].as_object_mut(), function.limits.as_object()) {
                    limits.extend(overrides.clone());
                }
                json!({ "spec": spec, "wasm_base64": base64::engine::general_purpose::STANDARD.encode(function.wasm) })
            })
            .collect();
        let body = serde_json::to_vec(&json!({ "functions": functions }))?;
        let (status, reply) = self.request("POST", "/v1/functions", &body)?;
        anyhow::ensure!(status == 200, "deploy answered {status}: {}", String::from_utf8_lossy(&reply));
        Ok(())
    }

    fn list(&self) -> anyhow::Result<Vec<Value>> {
        let (status, reply) = self.request("GET", "/v1/functions", b"")?;
        anyhow::ensure!(status == 200, "list answered {status}");
        let list: Value = serde_json::from_slice(&reply)?;
        Ok(list.as_array().cloned().unwrap_or_default())
    }

    /// Live instances across every function.
    pub fn total_live(&self) -> anyhow::Result<u64> {
        let list = self.list()?;
        let versions = list.iter().filter_map(|f| f["versions"].as_array()).flatten();
        Ok(versions.filter_map(|v| v["stats"]["live"].as_u64()).sum())
    }

    /// Live instances of `function` (all versions).
    pub fn live_instances(&self, function: &str) -> anyhow::Result<u64> {
        let list = self.list()?;
        let entry = list.iter().find(|f| f["name"] == function);
        let versions =
            entry.and_then(|f| f["versions"].as_array()).with_context(|| format!("no function {function}"))?;
        Ok(versions.iter().filter_map(|v| v["stats"]["live"].as_u64()).sum())
    }

    /// Versions still served from Winch's code (Cranelift's not in place yet).
    pub fn baseline_versions(&self) -> anyhow::Result<usize> {
        let list = self.list()?;
        Ok(list.iter().filter_map(|f| f["versions"].as_array()).flatten().filter(|v| v["code"] == "baseline").count())
    }

    /// Whose code `function`'s first version runs (`optimized`, `baseline`...).
    pub fn code(&self, function: &str) -> anyhow::Result<String> {
        let list = self.list()?;
        let entry = list.iter().find(|f| f["name"] == function);
        let code =
            entry.and_then(|f| f["versions"][0]["code"].as_str()).with_context(|| format!("no function {function}"))?;
        Ok(code.to_string())
    }
}

/// `wasm` with one more custom section carrying `tag`: a distinct binary
/// (its own digest, so its own compilation) that behaves the same. Custom
/// sections may appear anywhere in a component or module.
pub fn variant(wasm: &[u8], tag: &str) -> Vec<u8> {
    let name = b"shoal-bench-variant";
    let mut payload = Vec::new();
    leb128(&mut payload, name.len() as u64);
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut out = wasm.to_vec();
    out.push(0);
    leb128(&mut out, payload.len() as u64);
    out.extend_from_slice(&payload);
    out
}

fn leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_ends_with_a_custom_section_naming_its_tag() {
        let out = variant(b"\0asm\x0d\0\x01\0", "v1");
        assert_eq!(&out[..8], b"\0asm\x0d\0\x01\0");
        assert_eq!(out[8], 0, "custom section id");
        assert_eq!(out[9] as usize, out.len() - 10, "section size covers the rest");
        assert_eq!(out[10] as usize, "shoal-bench-variant".len());
        assert!(out.ends_with(b"shoal-bench-variantv1"));
        assert_ne!(variant(b"\0asm", "a"), variant(b"\0asm", "b"));
    }

    #[test]
    fn leb128_encodes_multi_byte_lengths() {
        let mut out = Vec::new();
        leb128(&mut out, 624_485);
        assert_eq!(out, [0xe5, 0x8e, 0x26]);
    }
}
