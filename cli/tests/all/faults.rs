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

#[test]
fn a_group_of_records_cut_short_by_a_full_disk_keeps_the_whole_ones_before_the_cut() {
    // The records of calls that end together go in one write; when the
    // disk fills part-way through it, the write says how far it got, the
    // whole records before that point are in the ledger (their calls are
    // billed and their responses complete), and the torn one is skipped.
    use shoal::metering::{CallStats, Ledger, UsageRecord};
    use shoal::outcome::Outcome;
    let record = |id: &str| -> Vec<u8> {
        let stats = CallStats::default();
        let record = UsageRecord::new(
            id,
            None,
            "default",
            "hello",
            "v1",
            std::time::SystemTime::now(),
            &stats,
            false,
            None,
            Outcome::Ok,
            200,
        );
        let mut line = Vec::new();
        Ledger::encode(&record, &mut line).unwrap();
        line
    };
    let disk = SmallDisk::mount("1m");
    let ledger = Ledger::open(&disk.path().join("usage"), Default::default()).unwrap();
    // The partition's first page, most of it still free.
    ledger.append_lines(record("alone")).unwrap();
    let _filler = disk.fill();

    let (mut lines, mut ends) = (Vec::new(), Vec::new());
    for i in 0..20 {
        lines.extend(record(&format!("grouped-{i}")));
        ends.push(lines.len());
    }
    let total = lines.len();
    let partial = ledger.append_lines(lines).expect_err("20 records do not fit in what is left of a page");
    assert_eq!(partial.error.kind(), std::io::ErrorKind::StorageFull, "{}", partial.error);
    let whole = ends.iter().filter(|end| **end <= partial.landed).count();
    assert!(0 < partial.landed && partial.landed < total, "{} of {total} bytes landed", partial.landed);
    assert!(whole > 0 && whole < 20, "{whole} whole records before the cut");

    let read: Vec<String> = ledger.records(None).unwrap().iter().map(|r| r.request_id.to_string()).collect();
    let expected: Vec<String> =
        std::iter::once("alone".to_string()).chain((0..whole).map(|i| format!("grouped-{i}"))).collect();
    assert_eq!(read, expected, "the whole records before the cut, and nothing of the torn one");
}

/// `kill -9` of a host under mixed load (key-value increments, plain
/// requests) while deploys go on: afterwards the deployed set is one of
/// the deployed manifests, whole; every acknowledged increment is in the
/// counter; every request a client saw complete has its usage record.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_under_load_during_deploys_loses_nothing_acknowledged_and_leaves_no_half_deploy() {
    use crate::support::{HostProcess, guest, write_manifest};
    let state = tempfile::tempdir().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    let entry = |name: &str, wasm: &str, route: &str, version: &str| {
        format!(
            "[[function]]\nname = \"{name}\"\nwasm = \"{}\"\nroutes = [\"{route}\"]\nversion = \"{version}\"\n\
             [function.grants]\nkeyvalue = [\"default:*\"]\n",
            guest(wasm).display()
        )
    };
    let kv = entry("kv", "kv", "/kv", "1");
    // Each deploy changes two functions at once: a half-applied one would
    // leave their versions apart.
    let sets = ["a", "b"].map(|version| {
        format!("{kv}{}{}", entry("hello", "hello", "/hello", version), entry("extra", "settings", "/extra", version))
    });
    let paths: Vec<_> = sets
        .iter()
        .enumerate()
        .map(|(n, text)| {
            let dir = manifests.path().join(format!("set-{n}"));
            std::fs::create_dir_all(&dir).unwrap();
            write_manifest(&dir, text)
        })
        .collect();
    let mut host = HostProcess::spawn(state.path(), Some(&paths[0]));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Load: increments, counted when acknowledged; plain requests, their
    // ids kept when complete.
    let client = reqwest::Client::new();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let (client, stop) = (client.clone(), stop.clone());
        let (incr, hello) = (host.url("/kv/incr?key=n"), host.url("/hello"));
        workers.spawn(async move {
            let (mut acked, mut completed) = (0u64, Vec::new());
            for _ in 0..5_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let url = if worker % 2 == 0 { &incr } else { &hello };
                let Ok(response) = client.get(url).send().await else { continue };
                let id = response.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
                if response.status() == 200 && response.text().await.is_ok() {
                    if worker % 2 == 0 {
                        acked += 1;
                    }
                    completed.extend(id);
                }
            }
            (acked, completed)
        });
    }
    // Deploys: one set, then the other, over and over.
    let deployer = {
        let (stop, state, paths) = (stop.clone(), state.path().to_path_buf(), paths.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 200 {
                let _ = std::process::Command::new(crate::support::shoal_bin())
                    .arg("--state-dir")
                    .arg(&state)
                    .arg("deploy")
                    .arg(&paths[(n + 1) % 2])
                    .output();
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    host.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let deploys = deployer.join().unwrap();
    let (mut acked, mut completed) = (0, Vec::new());
    while let Some(result) = workers.join_next().await {
        let (a, c) = result.unwrap();
        acked += a;
        completed.extend(c);
    }
    assert!(deploys >= 2 && acked > 10 && completed.len() > 20, "load ran: {deploys} deploys, {acked} acks");

    let host = HostProcess::spawn(state.path(), None);
    let listed = String::from_utf8_lossy(&host.cli(&["ls", "--json"]).stdout).into_owned();
    let functions: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let versions_of = |name: &str| -> Vec<String> {
        functions
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["name"] == name)
            .flat_map(|f| f["versions"].as_array().unwrap().iter().map(|v| v["version"].as_str().unwrap().to_string()))
            .collect()
    };
    let (hello, extra) = (versions_of("hello"), versions_of("extra"));
    assert!(hello.len() == 1 && hello == extra, "one deploy, whole: hello {hello:?}, extra {extra:?}");
    assert_eq!(versions_of("kv"), ["1"]);

    let counter: u64 = reqwest::get(host.url("/kv/get?key=n")).await.unwrap().text().await.unwrap().parse().unwrap();
    // An increment applied as the host died may not have been acknowledged.
    assert!((acked..=acked + 2).contains(&counter), "{acked} acknowledged increments, counter {counter}");
    let ledger = shoal::metering::Ledger::open(&state.path().join("usage"), Default::default()).unwrap();
    let recorded: std::collections::HashSet<String> =
        ledger.records(None).unwrap().into_iter().map(|record| record.request_id.into_owned()).collect();
    let missing: Vec<&String> = completed.iter().filter(|id| !recorded.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} completed requests have no record: {missing:?}",
        missing.len(),
        completed.len()
    );
}
