//! A misbehaving neighbour does not disturb other functions.

use std::time::Duration;

use crate::support::{TestHost, spec};

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
