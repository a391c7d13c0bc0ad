//! A misbehaving neighbour does not disturb other functions.

use std::time::Duration;

use crate::support::{HostProcess, TestHost, manifest_entry, spec, write_manifest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_keeps_answering_correctly_while_neighbours_spin_and_allocate() {
    let host = TestHost::start().await;
    let mut spin = spec("endless", "endless", "/endless");
    spin.limits.timeout = Duration::from_millis(500);
    let mut bomb = spec("membomb", "membomb", "/bomb");
    bomb.limits.memory_bytes = 64 << 20;
    host.deploy(vec![spec("hello", "hello", "/hello"), spin, bomb]).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut troublemakers = Vec::new();
    for path in ["/endless", "/endless", "/bomb"] {
        let client = host.client.clone();
        let url = host.url(path);
        let stop = stop.clone();
        troublemakers.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                statuses.push(client.get(&url).send().await.unwrap().status().as_u16());
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..100 {
        let reply = host.get(&format!("/hello?name=n{i}")).await;
        assert_eq!((reply.status, reply.body), (200, format!("hello, n{i}\n")));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in troublemakers {
        let statuses = task.await.unwrap();
        assert!(!statuses.is_empty());
        assert!(statuses.iter().all(|&s| s == 504 || s == 503), "{statuses:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_bound_request_finishes_while_many_connections_keep_sending_short_ones() {
    // A host with one CPU (one worker thread), 63 connections sending
    // `hello` back to back, and one request computing fib(33) (about 90 ms
    // of CPU). Short requests go ahead of a CPU-bound call's slices, but
    // they do not take the whole thread: the call gets a share of it and
    // answers within its 6 s timeout: here in 0.3-0.5 s, and in 1.4-2.0 s
    // beside busy loops or a build on both CPUs; 9-10 s before its slices
    // had a floor.
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        state.path(),
        &format!(
            "{}{}[function.limits]\ntimeout_ms = 6000\n",
            manifest_entry("hello", "hello", "/hello"),
            manifest_entry("fib", "fib", "/fib")
        ),
    );
    let host = HostProcess::spawn_on_one_cpu(state.path(), Some(&manifest));
    let client = reqwest::Client::new();
    for path in ["/hello", "/fib?n=1"] {
        assert_eq!(client.get(host.url(path)).send().await.unwrap().status(), 200, "{path}");
    }

    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    // Set while fib computes: the short requests answered then.
    let hog_running = std::sync::Arc::new(AtomicBool::new(false));
    let started = std::time::Instant::now();
    let load: Vec<_> = (0..63)
        .map(|_| {
            let (client, url) = (client.clone(), host.url("/hello?name=load"));
            let (stop, hog_running) = (stop.clone(), hog_running.clone());
            tokio::spawn(async move {
                let (mut answered, mut other) = (0u32, Vec::new());
                // Bounded: the test ends its load long before this.
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                    match client.get(&url).send().await {
                        Ok(reply) if reply.status() == 200 => {
                            answered += u32::from(hog_running.load(Ordering::Relaxed));
                        }
                        Ok(reply) => other.push(reply.status().to_string()),
                        Err(err) => other.push(err.to_string()),
                    }
                }
                (answered, other)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let hog_started = std::time::Instant::now();
    hog_running.store(true, Ordering::Relaxed);
    let reply = client.get(host.url("/fib?n=33")).send().await.unwrap();
    hog_running.store(false, Ordering::Relaxed);
    let hog_took = hog_started.elapsed();
    let (status, body) = (reply.status().as_u16(), reply.text().await.unwrap());
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for task in load {
        let (count, other) = task.await.unwrap();
        assert!(other.is_empty(), "the short requests are all answered: {other:?}");
        answered += count;
    }
    assert_eq!((status, body.as_str()), (200, "fib(33) = 3524578\n"), "after {hog_took:?}");
    // The load was real: short requests kept being answered while fib
    // computed (about 1,200 here in 0.3 s).
    assert!(answered > 200, "{answered} short requests answered while fib computed for {hog_took:?}");
    eprintln!("fib(33) answered after {hog_took:?} beside {answered} short requests");
}
