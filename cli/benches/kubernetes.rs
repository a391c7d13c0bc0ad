//! W7 of the benchmark suite: the kubelet's path through a real containerd's
//! CRI (RunPodSandbox + CreateContainer + StartContainer) to a pod's first
//! HTTP response, and the memory the node's Shoal host adds per pod.
//!
//! Run by `shoal-bench` (see benches/), never by the tests; it reuses the
//! integration tests' containerd, registry and CRI fixtures. Environment:
//! `SHOAL_BENCH_OUT` (where the JSON goes, required), `SHOAL_BENCH_PODS`
//! (pods started one after another, default 10), `SHOAL_BENCH_CONTAINERD`
//! (`2.3`: containerd 2.3.4 with the Sandbox API, the default; `2.3-pause`:
//! 2.3.4 with pause containers; `1.6`: Debian's 1.6.20),
//! `SHOAL_BENCH_IDLE_TIMEOUT_S` (when set, each pod is given that
//! `idle_timeout_s` and the host's RSS is read a second time once the
//! pod's instance has scaled to zero: what a pod costs without its
//! instance, and what its instance costs), `SHOAL_BENCH_WRAP_BIN` (a
//! program for containerd's shim to start instead of `shoal`, which must
//! exec it with the same arguments: `benches/heap-profile-node.sh` uses it
//! to run the node host under heaptrack).

#![allow(clippy::unwrap_used, reason = "a fixture failure should stop the benchmark with its message")]

use shoal_testing::{cluster, support};

use std::time::{Duration, Instant};

use serde_json::json;

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

/// Where a process's resident memory is, in KiB, from its smaps: malloc's
/// main heap (`[heap]`), anonymous memory inside reservations of 1 GiB or
/// more (wasmtime's instance pool and code), the other anonymous memory
/// (thread stacks, malloc's per-thread arenas), and file pages; and its
/// thread count.
fn memory_kinds(pid: i32) -> serde_json::Value {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut heap, mut reserved, mut anon, mut file) = (0u64, 0u64, 0u64, 0u64);
    let mut kind = "";
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            let name = words.nth(4).unwrap_or("");
            kind = match name {
                "[heap]" => "heap",
                "" if end - start >= 1 << 30 => "reserved",
                "" | "[stack]" => "anon",
                name if name.starts_with('[') => "other",
                _ => "file",
            };
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|kib| kib.parse().ok()).unwrap_or(0);
            match kind {
                "heap" => heap += kib,
                "reserved" => reserved += kib,
                "anon" => anon += kib,
                "file" => file += kib,
                _ => {}
            }
        }
    }
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
    json!({ "heap_kib": heap, "reserved_kib": reserved, "other_anon_kib": anon, "file_kib": file, "threads": threads })
}

fn main() {
    let out = std::env::var_os("SHOAL_BENCH_OUT").expect("SHOAL_BENCH_OUT names the JSON output file");
    let pods: usize = std::env::var("SHOAL_BENCH_PODS").ok().and_then(|n| n.parse().ok()).unwrap_or(10);
    let which = std::env::var("SHOAL_BENCH_CONTAINERD").unwrap_or_else(|_| "2.3".to_string());
    let options = match which.as_str() {
        "2.3" => cluster::ContainerdOptions::default(),
        "2.3-pause" => cluster::ContainerdOptions { sandboxer: cluster::Sandboxer::PodSandbox, ..Default::default() },
        "1.6" => cluster::ContainerdOptions { release: cluster::Release::V1_6, ..Default::default() },
        other => panic!("SHOAL_BENCH_CONTAINERD={other:?}: say 2.3, 2.3-pause or 1.6"),
    };
    let wrapper = std::env::var("SHOAL_BENCH_WRAP_BIN").ok();
    let env: Vec<(&str, &str)> = wrapper.iter().map(|wrapper| ("SHOAL_BIN", wrapper.as_str())).collect();
    let options = cluster::ContainerdOptions { env: &env, ..options };
    let idle_timeout_s: Option<u64> = std::env::var("SHOAL_BENCH_IDLE_TIMEOUT_S").ok().map(|s| s.parse().unwrap());
    let idle_annotation = idle_timeout_s.map(|s| s.to_string());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let result = runtime.block_on(async move {
        let (_registry, containerd, mut cri, image) =
            cluster::cri_node_with(options, &support::guest("hello"), "hello", &[]).await;
        let mut records = Vec::new();
        let mut started = Vec::new();
        for i in 0..pods {
            let begin = Instant::now();
            let annotations: Vec<(&str, &str)> =
                idle_annotation.iter().map(|s| ("shoal.dev/limits.idle_timeout_s", s.as_str())).collect();
            let pod = cri.run_pod(&containerd.log_dir, &format!("bench-{i}"), &image, &annotations, 64 << 20).await;
            let api_ms = begin.elapsed().as_secs_f64() * 1e3;
            let [sandbox_ms, create_ms, start_ms] = pod.call_times.map(|time| time.as_secs_f64() * 1e3);
            let deadline = begin + Duration::from_secs(30);
            loop {
                if let Ok((200, _)) = cluster::get_in_netns(&pod.netns, "127.0.0.1:8080", "/") {
                    break;
                }
                assert!(Instant::now() < deadline, "pod {i} never answered; host log:\n{}", containerd.host_log());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let first_response_ms = begin.elapsed().as_secs_f64() * 1e3;
            // Let freed memory settle before reading the host's RSS.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let hosts = containerd.node_hosts();
            assert_eq!(hosts.len(), 1, "one Shoal host serves every pod");
            let host_rss_kib = rss_kib(hosts[0]);
            let host_memory = memory_kinds(hosts[0]);
            let containerd_rss_kib = containerd.pid().map_or(0, rss_kib);
            eprintln!(
                "pod {i}: CRI calls {api_ms:.1} ms, first response {first_response_ms:.1} ms, host RSS {host_rss_kib} KiB"
            );
            let mut record = json!({
                "pod": i, "cri_ms": api_ms, "first_response_ms": first_response_ms,
                "run_pod_sandbox_ms": sandbox_ms, "create_container_ms": create_ms, "start_container_ms": start_ms,
                "host_rss_kib": host_rss_kib, "containerd_rss_kib": containerd_rss_kib, "host_memory": host_memory,
                "shim_processes": containerd.shim_processes(),
            });
            if let Some(idle) = idle_timeout_s {
                // Past the idle timeout (the host reaps at the instant it
                // passes), with time for the freed memory to settle.
                tokio::time::sleep(Duration::from_secs(idle) + Duration::from_millis(700)).await;
                record["host_rss_idle_kib"] = json!(rss_kib(hosts[0]));
            }
            records.push(record);
            started.push(pod);
        }
        // The node host's own account of each app container's Task
        // Create (its "app timings" and "created" log lines), in order.
        let log = containerd.host_log();
        let field = |line: &str, key: &str| -> Option<f64> {
            let at = line.find(&format!(" {key}="))? + key.len() + 2;
            line[at..].split_whitespace().next()?.parse().ok()
        };
        let mut phases = Vec::new();
        let mut sandbox_phases = Vec::new();
        let mut pending: Option<(String, serde_json::Value)> = None;
        for line in log.lines() {
            if line.contains("pod sandbox created") || line.contains("pod sandbox started") {
                let key = if line.contains("created") { "sandbox_create_ms" } else { "sandbox_start_ms" };
                sandbox_phases.push((key, field(line, "took_us").map(|us| us / 1e3)));
                continue;
            }
            let container = line.split(" container=").nth(1).and_then(|rest| rest.split_whitespace().next());
            let Some(container) = container else { continue };
            if line.contains("app timings") {
                let ms = |key: &str| field(line, key).map(|us| us / 1e3);
                pending = Some((
                    container.to_string(),
                    json!({ "labels_ms": ms("labels_us"), "read_ms": ms("read_us"), "deploy_ms": ms("deploy_us") }),
                ));
            } else if line.contains("create timings") {
                if let Some((id, phase)) = pending.as_mut()
                    && id == container
                {
                    phase["mount_ms"] = json!(field(line, "mount_us").map(|us| us / 1e3));
                }
            } else if line.contains(" created ")
                && let Some((id, mut phase)) = pending.take()
                && id == container
            {
                phase["task_create_ms"] = json!(field(line, "took_us").map(|us| us / 1e3));
                phases.push(phase);
            }
        }
        for (record, phase) in records.iter_mut().zip(phases) {
            record["host"] = phase;
        }
        // The Sandbox API's calls, when the host owns the pods' sandboxes.
        let creates = sandbox_phases.iter().filter(|(key, _)| *key == "sandbox_create_ms").map(|(_, ms)| *ms);
        let starts = sandbox_phases.iter().filter(|(key, _)| *key == "sandbox_start_ms").map(|(_, ms)| *ms);
        for ((record, create), start) in records.iter_mut().zip(creates).zip(starts) {
            record["host"]["sandbox_create_ms"] = json!(create);
            record["host"]["sandbox_start_ms"] = json!(start);
        }
        for pod in &started {
            cri.remove_pod(pod).await;
        }
        json!({ "containerd": which, "pods": records })
    });
    std::fs::write(&out, serde_json::to_vec_pretty(&result).unwrap()).unwrap();
}
