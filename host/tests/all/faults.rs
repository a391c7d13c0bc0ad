//! Faults with the real parts: the state directory's filesystem runs full
//! (a small tmpfs) and comes back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal::manifest::KeyGrant;

use crate::support::{Reply, TestHost, eventually, spec};

/// A tmpfs of `size` mounted at a fresh directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let options = format!("size={size}");
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .unwrap();
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fill the disk with 64 KiB files, then 4 KiB ones, until it is
    /// full; their paths.
    fn fill(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for size in [64 << 10, 4 << 10] {
            loop {
                let path = self.path().join(format!("filler-{}", uuid_like(files.len())));
                if std::fs::write(&path, vec![0u8; size]).is_err() {
                    let _ = std::fs::remove_file(&path);
                    break;
                }
                files.push(path);
            }
        }
        files
    }
}

/// A file name no earlier fill used.
fn uuid_like(n: usize) -> String {
    format!("{n}-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test]
async fn a_full_state_disk_refuses_what_it_cannot_record_and_recovers_without_a_restart() {
    let disk = SmallDisk::mount("32m");
    let host = TestHost::start_with(Some(disk.path().to_path_buf())).await;
    let mut kv = spec("kv", "kv", "/kv");
    kv.grants.keyvalue = vec![KeyGrant::parse("default:*").unwrap()];
    host.deploy(vec![spec("hello", "hello", "/hello"), kv]).await;
    let put = |path: &str, bytes: usize| {
        let request = host.client.put(host.url(path)).body(vec![b'x'; bytes]);
        async move { Reply::read(request.send().await.unwrap()).await }
    };
    assert_eq!(put("/kv/set?key=before", 100).await.status, 200);
    let mut served = 1;

    // Nearly full: a large key-value write fails with an error value that
    // says why; requests (and their small records) still go through.
    let mut filler = disk.fill();
    for path in filler.drain(..2) {
        std::fs::remove_file(path).unwrap();
    }
    let refused = put("/kv/set?key=big", 900 << 10).await;
    served += 1;
    assert_eq!(refused.status, 422, "an error value, not a trap: {}", refused.body);
    assert!(refused.body.contains("No space left on device"), "{}", refused.body);
    assert_eq!(host.get("/hello").await.status, 200);
    served += 1;

    // Full: a request whose record cannot be written is not served.
    filler.extend(disk.fill());
    // (The ledger's last page may still take a few records.)
    let (mut refusal, mut cut_off) = (None, 0);
    for _ in 0..40 {
        // (A request whose record failed has its response cut off: an
        // error here, not counted as served.)
        let Ok(response) = host.client.get(host.url("/hello")).send().await else { continue };
        if response.status() != 200 {
            refusal = Some(Reply::read(response).await);
            break;
        }
        if response.text().await.is_ok() {
            served += 1;
        } else {
            cut_off += 1;
        }
    }
    let refusal = refusal.expect("requests are refused while the ledger cannot be written");
    assert!(cut_off <= 1, "only the request whose record failed is cut off");
    assert_eq!(refusal.status, 503);
    assert_eq!(refusal.error_kind(), Some("ledger_unavailable"));
    assert!(refusal.body.contains("No space left on device"), "{}", refusal.body);
    assert_eq!(refusal.header("retry-after"), Some("1"));
    let metrics = host.get("/metrics").await.body;
    assert!(!metrics.contains("shoal_ledger_write_errors_total 0"), "{metrics}");

    // Room again: service resumes by itself.
    for path in filler {
        std::fs::remove_file(path).unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || async { host.get("/hello").await.status == 200 }).await);
    served += 1;
    let after = put("/kv/set?key=after", 900 << 10).await;
    assert_eq!(after.status, 200, "{}", after.body);
    served += 1;
    assert_eq!(host.get("/kv/get?key=before").await.body, "x".repeat(100), "what was acknowledged is there");
    served += 1;

    // Every response a client saw complete has its record, once.
    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let ok = records.iter().filter(|record| record.status == 200 || record.status == 422).count();
    assert_eq!(ok, served, "{records:#?}");
}
