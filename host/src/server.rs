//! A Shoal host that serves: [`RunningHost::start`] builds the [`Host`],
//! restores the persisted functions, binds the listeners and starts the
//! tasks — the HTTP trigger, the admin API, the event trigger, idle
//! reclaim and ledger syncing. [`RunningHost::shutdown`] is the graceful
//! path (SIGTERM): stop accepting, let requests finish, run `destroy` on
//! every instance, sync the ledger.
//!
//! This is the top of the house: it depends on the triggers and the admin
//! API, which depend on [`Host`], never the other way round.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::Error;
use crate::host::{Host, HostConfig};
use crate::metering::{Ledger, SYNC_INTERVAL};
use crate::registry::DeployItem;

/// Make every file and socket this process creates from now on its own
/// user's alone (umask 077): the key-value store and the usage ledger hold
/// every tenant's state and bills, and the admin socket deploys functions.
/// For the binaries (`shoal serve`, `shoal node`) to call first: a umask is
/// the whole process's.
pub fn private_files() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

impl RunningHost {
    /// Build a host and start serving.
    pub async fn start(config: HostConfig) -> Result<RunningHost, Error> {
        RunningHost::start_with(config, Vec::new()).await
    }

    /// Build a host, restore what it persisted, deploy `items` (a
    /// manifest's functions), and only then say it is ready: `/readyz`
    /// answers "ready" once every function given is served. If the deploy
    /// fails, the host is shut down again and the error returned.
    pub async fn start_with(config: HostConfig, items: Vec<DeployItem>) -> Result<RunningHost, Error> {
        let host = Host::build(&config).await?;

        let listener = match config.listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|err| anyhow::anyhow!("cannot listen on {addr}: {err}"))?,
            ),
            None => None,
        };
        let http_addr =
            listener.as_ref().map(tokio::net::TcpListener::local_addr).transpose().map_err(anyhow::Error::from)?;
        let admin_listener = match &config.admin_socket {
            Some(path) => Some(bind_unix(path)?),
            None => None,
        };

        let restored = host.registry().restore().await?;
        if !restored.is_empty() {
            tracing::info!(versions = restored.len(), "restored deployed functions");
        }

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        if let Some(listener) = listener {
            tasks.spawn(crate::trigger::http::serve(listener, host.clone(), shutdown_rx.clone()));
        }
        if let Some(listener) = admin_listener {
            tasks.spawn(crate::admin::serve(listener, host.clone(), shutdown_rx.clone()));
        }
        tasks.spawn(reap_idle(host.clone(), shutdown_rx.clone()));
        // Registered here, not in the task: a deploy right after `start`
        // already waits for its subscriptions.
        let changes = host.registry().changes();
        tasks.spawn(crate::trigger::events::serve(
            host.clone(),
            host.services().broker.clone(),
            changes,
            shutdown_rx.clone(),
        ));
        if let Some(ledger) = host.ledger() {
            tasks.spawn(sync_ledger(ledger.clone(), shutdown_rx.clone()));
        }
        let running = RunningHost {
            host,
            http_addr,
            admin_socket: config.admin_socket,
            shutdown_tx,
            tasks,
            drain_timeout: config.drain_timeout,
        };
        if !items.is_empty()
            && let Err(err) = running.host.registry().deploy(items).await
        {
            running.shutdown().await;
            return Err(err);
        }
        running.host.set_ready(true);
        Ok(running)
    }
}

fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    }
    // A socket file left by a host that died is stale; one that answers
    // belongs to a live host, which we must not steal from.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::Internal(anyhow::anyhow!(
                "another Shoal host is already serving the admin socket {}",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    tokio::net::UnixListener::bind(path)
        .map_err(|err| Error::Internal(anyhow::anyhow!("cannot bind admin socket {}: {err}", path.display())))
}

/// Destroy idle instances as they pass their `idle_timeout`, never on a
/// fixed tick: sleep until the first idle one does, but no longer than the
/// shortest `idle_timeout` of a function with instances (one released from
/// now on expires no sooner than that), or until the deployed functions
/// change or a pool makes an instance. With no instance anywhere (every
/// function never called or scaled to zero) it sleeps until one is made:
/// each wake-up of an idle host cost 0.4-1.5 ms of CPU in the slow hours
/// of this machine (benchmark W8). Requests that find an instance never
/// wake it.
async fn reap_idle(host: Arc<Host>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let now = Instant::now();
        let pools = host.registry().pools();
        for pool in &pools {
            let reaped = pool.reap_idle(now);
            if reaped > 0 {
                tracing::debug!(function = pool.function().name(), reaped, "scaled down idle instances");
            }
        }
        let first_idle = pools.iter().filter_map(|pool| pool.next_expiry()).min();
        let next_released =
            pools.iter().filter(|pool| pool.has_instances()).map(|pool| now + pool.idle_timeout()).min();
        let next = first_idle.into_iter().chain(next_released).min();
        drop(pools);
        let due = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = due => {}
            _ = host.registry().reaper_woken() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// `fsync` the ledger [`SYNC_INTERVAL`] after the first record appended
/// since the last sync; an idle host is never woken for it.
async fn sync_ledger(ledger: Arc<Ledger>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = ledger.appended() => {}
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(SYNC_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        let ledger = ledger.clone();
        let result = tokio::task::spawn_blocking(move || ledger.sync()).await;
        if let Ok(Err(err)) = result {
            tracing::error!(error = %err, "cannot sync the usage ledger");
        }
    }
}

/// A host that is serving.
pub struct RunningHost {
    host: Arc<Host>,
    http_addr: Option<SocketAddr>,
    admin_socket: Option<PathBuf>,
    shutdown_tx: watch::Sender<bool>,
    tasks: JoinSet<()>,
    drain_timeout: Duration,
}

impl RunningHost {
    /// The shared host state.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// The address the HTTP trigger is bound to.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The admin socket, if any.
    pub fn admin_socket(&self) -> Option<&std::path::Path> {
        self.admin_socket.as_deref()
    }

    /// Graceful stop: refuse new connections, let requests finish, run
    /// `destroy` on every instance, sync the ledger.
    pub async fn shutdown(mut self) {
        self.host.set_ready(false);
        let _ = self.shutdown_tx.send(true);
        let drain_timeout = self.drain_timeout;
        // Listeners stop at once; open connections finish within the drain time.
        let _ = tokio::time::timeout(drain_timeout, async { while self.tasks.join_next().await.is_some() {} }).await;
        self.tasks.abort_all();
        self.host.registry().drain_all(drain_timeout).await;
        // An instance goes back before its record is written (with its
        // group's, a moment later): the last group goes to the ledger
        // before the ledger's last `fsync`.
        self.host.dispatcher().flush_records();
        if let Some(ledger) = self.host.ledger()
            && let Err(err) = ledger.sync()
        {
            tracing::error!(error = %err, "cannot sync the usage ledger");
        }
        if let Some(path) = &self.admin_socket {
            let _ = std::fs::remove_file(path);
        }
    }
}
