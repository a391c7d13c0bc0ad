//! Network namespaces: hold a pod's, make a fresh one, bind a listener
//! inside one.
//!
//! A socket belongs to the namespace of the thread that created it, for
//! life. So binding happens on a short-lived OS thread that enters the
//! namespace with `setns(2)`; the listener is then served by the host's
//! ordinary tokio runtime, whose threads never change namespace.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::sched::CloneFlags;

use crate::error::{Code, NodeError};

/// Open a namespace file (`/var/run/netns/cni-...`, `/proc/<pid>/ns/net`);
/// holding the descriptor keeps the namespace alive.
pub(crate) fn open(path: &Path) -> Result<OwnedFd, NodeError> {
    std::fs::File::open(path).map(OwnedFd::from).map_err(|source| NodeError::Io {
        code: if source.kind() == std::io::ErrorKind::NotFound { Code::NOT_FOUND } else { Code::INTERNAL },
        what: format!("cannot open the network namespace {}", path.display()),
        source,
    })
}

/// A new network namespace with its loopback interface up (what a
/// container gets from `ctr run` without `--net-host`).
pub(crate) fn create() -> Result<OwnedFd, NodeError> {
    on_thread(|| {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|errno| NodeError::Os {
            code: Code::INTERNAL,
            what: "cannot create a network namespace".to_string(),
            source: errno.into(),
        })?;
        let fd = open(Path::new("/proc/thread-self/ns/net"))?;
        loopback_up()?;
        Ok(fd)
    })
}

/// Bind a TCP listener at `addr` inside `netns` (the node's own
/// namespace when `None`).
pub(crate) fn bind(netns: Option<&OwnedFd>, addr: SocketAddr) -> Result<TcpListener, NodeError> {
    let Some(netns) = netns else {
        return bind_here(addr);
    };
    let fd = netns.try_clone().map_err(|source| NodeError::Io {
        code: Code::INTERNAL,
        what: "cannot duplicate the namespace descriptor".to_string(),
        source,
    })?;
    on_thread(move || {
        nix::sched::setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| NodeError::Os {
            code: Code::INTERNAL,
            what: "cannot enter the pod's network namespace".to_string(),
            source: errno.into(),
        })?;
        bind_here(addr)
    })
}

fn bind_here(addr: SocketAddr) -> Result<TcpListener, NodeError> {
    let listener = TcpListener::bind(addr).map_err(|source| NodeError::Io {
        code: if source.kind() == std::io::ErrorKind::AddrInUse { Code::ALREADY_EXISTS } else { Code::INTERNAL },
        what: format!("cannot listen on {addr}"),
        source,
    })?;
    listener.set_nonblocking(true).map_err(|source| NodeError::Io {
        code: Code::INTERNAL,
        what: "cannot make the listener non-blocking".to_string(),
        source,
    })?;
    Ok(listener)
}

/// Run `work` on a fresh OS thread (whose namespace changes die with it).
fn on_thread<T: Send + 'static>(work: impl FnOnce() -> Result<T, NodeError> + Send + 'static) -> Result<T, NodeError> {
    std::thread::Builder::new()
        .name("shoal-netns".into())
        .spawn(work)
        .map_err(|source| NodeError::Io { code: Code::INTERNAL, what: "cannot start a thread".to_string(), source })?
        .join()
        .map_err(|_| NodeError::Internal("the namespace thread panicked".to_string()))?
}

/// `ip link set lo up`, by the two ioctls it amounts to. Hand-written: a
/// netlink crate for one flag on one interface is more code than this.
fn loopback_up() -> Result<(), NodeError> {
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| NodeError::Os {
        code: Code::INTERNAL,
        what: "cannot open a socket to configure lo".to_string(),
        source: errno.into(),
    })?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes ifru_flags of the
    // ifreq we own; the socket descriptor is valid for the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(NodeError::Io {
            code: Code::INTERNAL,
            what: "cannot read lo's flags".to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the union's flags member was just written by the kernel.
    unsafe { request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS only reads the ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(NodeError::Io {
            code: Code::INTERNAL,
            what: "cannot bring lo up".to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
