//! Handing a running node host over to a new process (`shoal node
//! --upgrade`): what passes between the two, and how.
//!
//! The old host starts the new binary with one end of a socket pair as a
//! descriptor it inherits (`--adopt-fd`). Over it:
//!
//! 1. the new host says hello (it runs, and understood its arguments);
//! 2. the old host stops at a frame boundary on every containerd
//!    connection, lets its functions finish their requests and run
//!    `destroy`, closes its state, and sends a [`Snapshot`] with the
//!    descriptors it names (listeners, network namespaces, containerd's
//!    connections) attached with `SCM_RIGHTS`;
//! 3. the new host rebuilds every container from it and answers with its
//!    verdict. On success the old host exits; on failure (or if the new
//!    host dies) the old host adopts its own snapshot again.
//!
//! Messages are a 4-byte big-endian length and JSON; descriptors follow
//! the snapshot in batches, each attached to one byte.

use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The largest message (a snapshot of many containers is well below).
const MAX_MESSAGE: usize = 64 << 20;
/// Descriptors per `sendmsg` (the kernel takes at most 253).
const FDS_PER_MESSAGE: usize = 200;

/// A container as the old host left it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SavedContainer {
    /// containerd's `CreateTaskRequest` (protobuf), replayed to rebuild it.
    pub request: Vec<u8>,
    /// The function name it was given.
    pub function: String,
    /// Its mounted rootfs (the mount stays; it is not mounted again).
    pub rootfs: Option<PathBuf>,
    pub state: SavedState,
    /// Index in the snapshot's descriptors of its network namespace.
    pub netns: Option<usize>,
    /// Index of its pod listener (a running HTTP function).
    pub listener: Option<usize>,
    /// Indexes of its stdout and stderr FIFOs, as opened.
    pub output: [Option<usize>; 2],
    /// An HTTP function's spec as resolved when it was created (image
    /// labels, annotations, the policy then): adopted as it is.
    #[serde(default)]
    pub spec: Option<shoal::manifest::FunctionSpec>,
    /// The sha256 of its wasm, kept in the node's wasm store.
    #[serde(default)]
    pub digest: Option<String>,
}

/// A pod sandbox the old host owned (containerd's Sandbox API).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SavedSandbox {
    /// containerd's `CreateSandboxRequest` (protobuf), replayed to rebuild it.
    pub request: Vec<u8>,
    pub created_at: SystemTime,
    /// Whether `StartSandbox` came.
    pub started: bool,
    /// The status and time it stopped with, once `StopSandbox` came.
    pub stopped: Option<(u32, SystemTime)>,
    /// Index in the snapshot's descriptors of its network namespace.
    pub netns: Option<usize>,
}

/// A task's state across the hand-over.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum SavedState {
    Created,
    Running,
    Paused,
    Stopped { status: u32, at: SystemTime },
}

/// One of containerd's connections, stopped between two frames.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SavedConnection {
    /// Index of the socket in the snapshot's descriptors.
    pub socket: usize,
    /// Requests the old host had not answered (`Wait`s), whole frames.
    pub replay: Vec<Vec<u8>>,
    /// The start of a request not yet whole.
    pub partial: Vec<u8>,
}

/// Everything the next host needs; the descriptors travel beside it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    /// The pods whose sandboxes the host owns (adopted before containers,
    /// which find their pod's namespace there; absent from a host before
    /// the Sandbox API).
    #[serde(default)]
    pub sandboxes: Vec<SavedSandbox>,
    /// Pause-container sandboxes first: an app container finds its pod's
    /// namespace there.
    pub containers: Vec<SavedContainer>,
    pub connections: Vec<SavedConnection>,
    /// Index of the ttrpc socket containerd connects to.
    pub task_listener: usize,
    /// Index of the socket `shoal node --upgrade` talks to.
    pub control_listener: usize,
}

/// A hand-over that cannot be made or taken: a descriptor that cannot be
/// copied or is missing, a request that cannot be encoded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoverError {
    /// A descriptor could not be duplicated for the snapshot.
    #[error("cannot duplicate {what}: {source}")]
    Duplicate { what: String, source: std::io::Error },
    /// The snapshot names a descriptor that did not come with it (or was
    /// taken already).
    #[error("the hand-over lacks descriptor {index}")]
    MissingDescriptor { index: usize },
    /// containerd's request for a pod or container could not be encoded.
    #[error("cannot encode the request of {what}: {source}")]
    Encode { what: String, source: containerd_shim_protos::protobuf::Error },
}

/// The descriptors a [`Snapshot`] names by index: added by the old host,
/// taken (each once) by whichever host adopts the snapshot.
#[derive(Debug, Default)]
pub(crate) struct Descriptors(Vec<Option<OwnedFd>>);

impl Descriptors {
    /// Add `fd`; its index.
    pub(crate) fn add(&mut self, fd: OwnedFd) -> usize {
        self.0.push(Some(fd));
        self.0.len() - 1
    }

    /// A second descriptor of `fd` added; its index.
    pub(crate) fn add_copy(&mut self, fd: &OwnedFd, what: impl Into<String>) -> Result<usize, HandoverError> {
        let copy = fd.try_clone().map_err(|source| HandoverError::Duplicate { what: what.into(), source })?;
        Ok(self.add(copy))
    }

    /// Take the descriptor at `index` (it can be taken once).
    pub(crate) fn take(&mut self, index: usize) -> Result<OwnedFd, HandoverError> {
        self.0.get_mut(index).and_then(Option::take).ok_or(HandoverError::MissingDescriptor { index })
    }

    /// [`Descriptors::take`], for an index that may be absent.
    pub(crate) fn take_some(&mut self, index: Option<usize>) -> Result<Option<OwnedFd>, HandoverError> {
        index.map(|index| self.take(index)).transpose()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// What the new host says.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Said {
    /// It started and waits for the snapshot.
    Hello { pid: u32, version: String },
    /// It serves everything it was given.
    Serving { pid: u32 },
    /// It could not; it has let go of the state and exits.
    Failed { error: String },
}

/// One end of the hand-over's socket pair.
pub(crate) struct Link {
    stream: UnixStream,
}

impl Link {
    /// A pair: the old host's end, and the end the new host inherits.
    pub(crate) fn pair() -> std::io::Result<(Link, OwnedFd)> {
        let (ours, theirs) = UnixStream::pair()?;
        Ok((Link { stream: ours }, OwnedFd::from(theirs)))
    }

    /// The new host's end, inherited as descriptor `fd`.
    ///
    /// # Safety
    /// `fd` must be an open socket this process owns and uses nowhere else.
    pub(crate) unsafe fn inherited(fd: RawFd) -> std::io::Result<Link> {
        // SAFETY: the caller guarantees the descriptor is ours alone.
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        // It was inherited without close-on-exec; set it now.
        nix::fcntl::fcntl(&stream, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
            .map_err(std::io::Error::from)?;
        Ok(Link { stream })
    }

    /// Wait at most `timeout` for each later read.
    pub(crate) fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    pub(crate) fn say(&mut self, said: &Said) -> std::io::Result<()> {
        self.send_json(said)
    }

    pub(crate) fn hear(&mut self) -> std::io::Result<Said> {
        self.recv_json()
    }

    /// Send the snapshot and its descriptors (all still there: none taken).
    pub(crate) fn send_snapshot(&mut self, snapshot: &Snapshot, fds: &Descriptors) -> std::io::Result<()> {
        let raw = fds
            .0
            .iter()
            .map(|fd| fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd))
            .collect::<Option<Vec<RawFd>>>()
            .ok_or_else(|| std::io::Error::other("a descriptor of the snapshot was taken before it was sent"))?;
        self.send_json(&(snapshot, fds.len()))?;
        for raw in raw.chunks(FDS_PER_MESSAGE) {
            let rights = [nix::sys::socket::ControlMessage::ScmRights(raw)];
            let byte = [0u8];
            let iov = [std::io::IoSlice::new(&byte)];
            nix::sys::socket::sendmsg::<()>(
                self.stream.as_raw_fd(),
                &iov,
                &rights,
                nix::sys::socket::MsgFlags::empty(),
                None,
            )
            .map_err(std::io::Error::from)?;
        }
        Ok(())
    }

    /// Receive a snapshot and its descriptors.
    pub(crate) fn recv_snapshot(&mut self) -> std::io::Result<(Snapshot, Descriptors)> {
        let (snapshot, count): (Snapshot, usize) = self.recv_json()?;
        let mut fds = Vec::with_capacity(count);
        while fds.len() < count {
            let mut byte = [0u8];
            let mut iov = [std::io::IoSliceMut::new(&mut byte)];
            let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
            let message = nix::sys::socket::recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            if message.bytes == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the old host went away"));
            }
            let before = fds.len();
            for control in message.cmsgs().map_err(std::io::Error::from)? {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(received) = control {
                    // SAFETY: the kernel just installed these descriptors
                    // in this process for us; nothing else owns them.
                    fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            if fds.len() == before {
                return Err(std::io::Error::other("a descriptor batch came without descriptors"));
            }
        }
        if fds.len() != count {
            return Err(std::io::Error::other(format!("expected {count} descriptors, got {}", fds.len())));
        }
        Ok((snapshot, Descriptors(fds.into_iter().map(Some).collect())))
    }

    fn send_json(&mut self, value: &impl Serialize) -> std::io::Result<()> {
        let body = serde_json::to_vec(value).map_err(std::io::Error::other)?;
        let length = u32::try_from(body.len()).map_err(std::io::Error::other)?;
        self.stream.write_all(&length.to_be_bytes())?;
        self.stream.write_all(&body)
    }

    /// Read exactly one message (never past it: the descriptors that may
    /// follow must be read with `recvmsg`, or the kernel drops them).
    fn recv_json<T: for<'de> Deserialize<'de>>(&mut self) -> std::io::Result<T> {
        let mut length = [0u8; 4];
        self.stream.read_exact(&mut length)?;
        let length = u32::from_be_bytes(length) as usize;
        if length > MAX_MESSAGE {
            return Err(std::io::Error::other(format!("a hand-over message of {length} bytes is over {MAX_MESSAGE}")));
        }
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body)?;
        serde_json::from_slice(&body).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_and_its_descriptors_cross_the_link() {
        let (mut old, theirs) = Link::pair().unwrap();
        // SAFETY: `theirs` is a fresh socket handed over whole.
        let mut new = unsafe { Link::inherited(std::os::fd::IntoRawFd::into_raw_fd(theirs)) }.unwrap();
        new.say(&Said::Hello { pid: 1, version: "x".into() }).unwrap();
        assert!(matches!(old.hear().unwrap(), Said::Hello { pid: 1, .. }));
        // More descriptors than one message carries, each a pipe whose
        // other end tells it apart.
        let mut ends = Vec::new();
        let mut sent = Descriptors::default();
        for _ in 0..(FDS_PER_MESSAGE + 5) {
            let (read, write) = nix::unistd::pipe().unwrap();
            sent.add(write);
            ends.push(read);
        }
        let snapshot = Snapshot {
            sandboxes: vec![SavedSandbox {
                request: vec![4, 5],
                created_at: SystemTime::UNIX_EPOCH,
                started: true,
                stopped: None,
                netns: Some(2),
            }],
            containers: vec![SavedContainer {
                request: vec![1, 2, 3],
                function: "f".into(),
                rootfs: None,
                state: SavedState::Stopped { status: 137, at: SystemTime::UNIX_EPOCH },
                netns: Some(3),
                listener: None,
                output: [None, None],
                spec: None,
                digest: None,
            }],
            connections: vec![],
            task_listener: 0,
            control_listener: 1,
        };
        old.send_snapshot(&snapshot, &sent).unwrap();
        let (got, mut fds) = new.recv_snapshot().unwrap();
        assert_eq!(got.sandboxes[0].request, vec![4, 5]);
        assert_eq!((got.sandboxes[0].started, got.sandboxes[0].netns), (true, Some(2)));
        assert_eq!(got.containers[0].request, vec![1, 2, 3]);
        assert_eq!(got.containers[0].state, SavedState::Stopped { status: 137, at: SystemTime::UNIX_EPOCH });
        assert_eq!(fds.len(), sent.len());
        for (n, end) in ends.iter().enumerate() {
            let mut file = std::fs::File::from(fds.take(n).unwrap());
            file.write_all(&[n as u8]).unwrap();
            let mut byte = [0u8];
            nix::unistd::read(end, &mut byte).unwrap();
            assert_eq!(byte[0], n as u8, "descriptor {n} arrived in order");
        }
        assert!(fds.take(0).is_err(), "a descriptor is taken once");
    }
}
