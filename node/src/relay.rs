//! containerd's ttrpc connections, relayed frame by frame to the task
//! service, so that a connection can be stopped between two frames and
//! handed to another host process (`shoal node --upgrade`).
//!
//! containerd treats a closed shim connection as a dead shim: its tasks
//! would be reported as exited. So the connections themselves must outlive
//! the process that accepted them. The ttrpc crate owns the sockets it
//! serves, and a connection it owns cannot be taken back from it; so the
//! host accepts containerd's connections itself and gives the ttrpc server
//! an in-memory pipe per connection (`Listener::new`). A relay task copies
//! whole frames between the two and keeps, per stream id, the requests not
//! yet answered. Hand-written because no crate relays ttrpc: the framing is
//! a 10-byte header (length, stream id, type, flags), see ttrpc's
//! `proto::MessageHeader`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use containerd_shim_protos::protobuf::Message as _;
use containerd_shim_protos::ttrpc;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// A ttrpc frame's header length.
const HEADER: usize = ttrpc::proto::MESSAGE_HEADER_LENGTH;
/// The largest frame ttrpc sends or accepts (its own limit).
const MAX_FRAME: usize = ttrpc::proto::MESSAGE_LENGTH_MAX;
/// Buffer of the in-memory pipe to the ttrpc server (its most, not
/// allocated up front: the pipe grows as frames pass).
const PIPE_BYTES: usize = 64 << 10;
/// What a relay's buffer of answers starts with. ttrpc's answers are a
/// few hundred bytes; a longer one grows the buffer as it is read. Every
/// pod keeps at least one connection open for its whole life, so what
/// starts here is paid per pod (64 KiB up front was ≈ half of a pod's
/// heap in the host).
const ANSWER_BUFFER_BYTES: usize = 1 << 10;
/// Connections accepted but not yet taken by the ttrpc server.
const BACKLOG: usize = 64;

/// What a relay is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Frames flow both ways.
    Open,
    /// containerd's requests wait in the socket; answers still flow.
    Hold,
    /// Stop at the next frame boundary and give the connection back.
    Detach,
}

/// A connection taken out of its relay between two frames: the socket,
/// the requests the server had not answered (each a whole frame, to be
/// sent again to the next server), and the start of a request already
/// read from containerd but not yet whole.
#[derive(Debug)]
pub(crate) struct Detached {
    pub socket: OwnedFd,
    pub replay: Vec<Vec<u8>>,
    pub partial: Vec<u8>,
}

/// A request the server has not answered yet.
struct Pending {
    frame: Vec<u8>,
    /// `Wait` blocks until a task ends (`WaitSandbox` until a pod stops);
    /// these are the calls replayed to the next host instead of being
    /// waited for.
    long_poll: bool,
}

struct Relay {
    phase: watch::Sender<Phase>,
    pending: Mutex<HashMap<u32, Pending>>,
}

impl Relay {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Pending>> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Requests under way that are not long polls.
    fn busy(&self) -> usize {
        self.lock().values().filter(|pending| !pending.long_poll).count()
    }
}

/// A relay and its task, which ends with what is left of the connection.
type Running = (Arc<Relay>, JoinHandle<Option<Detached>>);

/// Every relayed connection of the host, and the way to the ttrpc server.
pub(crate) struct Relays {
    relays: Mutex<Vec<Running>>,
    to_server: mpsc::Sender<std::io::Result<DuplexStream>>,
}

impl Relays {
    /// The relays, and the listener to give the ttrpc server.
    pub(crate) fn new() -> (Arc<Relays>, ttrpc::asynchronous::transport::Listener) {
        let (to_server, incoming) = mpsc::channel(BACKLOG);
        let incoming = futures_util::stream::unfold(incoming, |mut incoming| async move {
            incoming.recv().await.map(|pipe| (pipe, incoming))
        });
        let relays = Arc::new(Relays { relays: Mutex::new(Vec::new()), to_server });
        (relays, ttrpc::asynchronous::transport::Listener::new(Box::pin(incoming)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Running>> {
        self.relays.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Relay a connection from containerd; `carried` is what a previous
    /// host left of it (requests to send again, a partial frame).
    pub(crate) async fn relay(
        &self,
        socket: UnixStream,
        carried: Option<(Vec<Vec<u8>>, Vec<u8>)>,
    ) -> std::io::Result<()> {
        let (server_end, relay_end) = tokio::io::duplex(PIPE_BYTES);
        self.to_server.send(Ok(server_end)).await.map_err(|_| std::io::Error::other("the task service has stopped"))?;
        let relay = Arc::new(Relay { phase: watch::Sender::new(Phase::Open), pending: Mutex::new(HashMap::new()) });
        let (replay, partial) = carried.unwrap_or_default();
        let task = tokio::spawn(run(relay.clone(), socket, relay_end, replay, partial));
        let mut relays = self.lock();
        relays.retain(|(_, task)| !task.is_finished());
        relays.push((relay, task));
        Ok(())
    }

    /// Stop reading containerd's requests (answers still flow).
    pub(crate) fn hold(&self) {
        for (relay, _) in self.lock().iter() {
            relay.phase.send_replace(Phase::Hold);
        }
    }

    /// Read containerd's requests again.
    pub(crate) fn resume(&self) {
        for (relay, _) in self.lock().iter() {
            relay.phase.send_replace(Phase::Open);
        }
    }

    /// Requests under way, long polls (`Wait`) aside.
    pub(crate) fn busy(&self) -> usize {
        self.lock().iter().filter(|(_, task)| !task.is_finished()).map(|(relay, _)| relay.busy()).sum()
    }

    /// Take every connection out of its relay (after [`Relays::hold`] and
    /// once [`Relays::busy`] is 0). Connections containerd closed meanwhile
    /// are left out.
    pub(crate) async fn detach(&self) -> Vec<Detached> {
        let relays: Vec<_> = std::mem::take(&mut *self.lock());
        let mut detached = Vec::new();
        for (relay, task) in relays {
            relay.phase.send_replace(Phase::Detach);
            match task.await {
                Ok(Some(connection)) => detached.push(connection),
                Ok(None) => {}
                Err(err) => tracing::warn!(error = %err, "a ttrpc relay failed"),
            }
        }
        detached
    }
}

/// A frame longer than ttrpc allows: the connection is closed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("a ttrpc frame of {length} bytes is over ttrpc's limit of {}", MAX_FRAME)]
struct FrameTooLarge {
    length: usize,
}

/// The length of the whole frame at the start of `buf`, once it is all
/// there.
fn whole_frame(buf: &[u8]) -> Result<Option<usize>, FrameTooLarge> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if length > MAX_FRAME {
        return Err(FrameTooLarge { length });
    }
    Ok((buf.len() >= HEADER + length).then_some(HEADER + length))
}

fn stream_id(frame: &[u8]) -> u32 {
    u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]])
}

fn frame_type(frame: &[u8]) -> u8 {
    frame[8]
}

/// Whether a request frame is a task's `Wait` or a pod's `WaitSandbox`.
fn is_long_poll(frame: &[u8]) -> bool {
    ttrpc::proto::Request::parse_from_bytes(&frame[HEADER..])
        .is_ok_and(|request| request.method == "Wait" || request.method == "WaitSandbox")
}

/// Note a request from containerd.
fn track(relay: &Relay, frame: &[u8]) {
    if frame_type(frame) == ttrpc::proto::MESSAGE_TYPE_REQUEST {
        let pending = Pending { frame: frame.to_vec(), long_poll: is_long_poll(frame) };
        relay.lock().insert(stream_id(frame), pending);
    }
}

/// Copy frames until containerd or the server closes (`None`), or until
/// told to detach at a frame boundary.
async fn run(
    relay: Arc<Relay>,
    socket: UnixStream,
    inner: DuplexStream,
    replay: Vec<Vec<u8>>,
    partial: Vec<u8>,
) -> Option<Detached> {
    let (mut from_containerd, mut to_containerd) = socket.into_split();
    let (mut from_server, mut to_server) = tokio::io::split(inner);
    for frame in &replay {
        track(&relay, frame);
        if to_server.write_all(frame).await.is_err() {
            return None;
        }
    }
    let mut up = BytesMut::from(&partial[..]);
    let mut down = BytesMut::with_capacity(ANSWER_BUFFER_BYTES);
    let mut phase = relay.phase.subscribe();
    loop {
        let now = *phase.borrow_and_update();
        if now == Phase::Detach && down.is_empty() {
            break;
        }
        tokio::select! {
            read = from_containerd.read_buf(&mut up), if now == Phase::Open => {
                match read {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
                loop {
                    match whole_frame(&up) {
                        Ok(Some(length)) => {
                            let frame = up.split_to(length);
                            track(&relay, &frame);
                            if to_server.write_all(&frame).await.is_err() {
                                return None;
                            }
                        }
                        Ok(None) => break,
                        Err(why) => {
                            tracing::warn!("closing a containerd connection: {why}");
                            return None;
                        }
                    }
                }
            }
            read = from_server.read_buf(&mut down) => {
                match read {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
                while let Ok(Some(length)) = whole_frame(&down) {
                    let frame = down.split_to(length);
                    if frame_type(&frame) == ttrpc::proto::MESSAGE_TYPE_RESPONSE {
                        relay.lock().remove(&stream_id(&frame));
                    }
                    if to_containerd.write_all(&frame).await.is_err() {
                        return None;
                    }
                }
                down.reserve(HEADER);
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
        }
    }
    let socket = from_containerd.reunite(to_containerd).ok()?.into_std().ok()?;
    let mut pending: Vec<(u32, Vec<u8>)> = relay.lock().drain().map(|(id, pending)| (id, pending.frame)).collect();
    pending.sort_by_key(|(id, _)| *id);
    let replay = pending.into_iter().map(|(_, frame)| frame).collect();
    Some(Detached { socket: OwnedFd::from(socket), replay, partial: up.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::api::{StateRequest, StateResponse, WaitRequest, WaitResponse};
    use containerd_shim_protos::shim_async::{Client, Task, TaskClient, create_task};
    use containerd_shim_protos::ttrpc::r#async::TtrpcContext;

    /// A task service that tells which server answered (by `pid`), and
    /// answers `Wait` once `exit` says a status.
    struct Answering {
        pid: u32,
        exit: watch::Receiver<Option<u32>>,
        /// What `State` says the task's stdout is (any length).
        stdout: String,
    }

    #[async_trait::async_trait]
    impl Task for Answering {
        async fn state(&self, _: &TtrpcContext, _: StateRequest) -> ttrpc::Result<StateResponse> {
            Ok(StateResponse { pid: self.pid, stdout: self.stdout.clone(), ..Default::default() })
        }

        async fn wait(&self, _: &TtrpcContext, _: WaitRequest) -> ttrpc::Result<WaitResponse> {
            let mut exit = self.exit.clone();
            let status = exit.wait_for(Option::is_some).await.map(|status| status.unwrap_or_default());
            Ok(WaitResponse { exit_status: status.unwrap_or(255), ..Default::default() })
        }
    }

    async fn server(pid: u32, exit: watch::Receiver<Option<u32>>) -> (Arc<Relays>, ttrpc::asynchronous::Server) {
        server_saying(pid, exit, String::new()).await
    }

    async fn server_saying(
        pid: u32,
        exit: watch::Receiver<Option<u32>>,
        stdout: String,
    ) -> (Arc<Relays>, ttrpc::asynchronous::Server) {
        let (relays, incoming) = Relays::new();
        let mut server = ttrpc::asynchronous::Server::new()
            .add_listener(incoming)
            .register_service(create_task(Arc::new(Answering { pid, exit, stdout })));
        server.start().await.unwrap();
        (relays, server)
    }

    #[tokio::test]
    async fn a_connection_moves_to_another_server_between_frames_and_its_waiting_call_is_answered_there() {
        let (_never_sent, never) = watch::channel(None);
        let (old, _old_server) = server(1, never).await;
        let (ours, theirs) = UnixStream::pair().unwrap();
        old.relay(theirs, None).await.unwrap();
        let client = TaskClient::new(Client::new(ours.into()));
        let ctx = || ttrpc::context::Context::default();
        assert_eq!(client.state(ctx(), &StateRequest::new()).await.unwrap().pid, 1);
        let waiting = {
            let client = client.clone();
            tokio::spawn(async move { client.wait(ttrpc::context::Context::default(), &WaitRequest::new()).await })
        };
        // The Wait has reached the old server.
        for _ in 0..1000 {
            if old.lock().iter().any(|(relay, _)| !relay.lock().is_empty()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }

        old.hold();
        assert_eq!(old.busy(), 0, "a Wait does not keep a hand-over waiting");
        let mut detached = old.detach().await;
        assert_eq!(detached.len(), 1);
        let connection = detached.remove(0);
        assert_eq!(connection.replay.len(), 1, "the Wait is carried over");

        let (exit, exits) = watch::channel(None);
        let (new, _new_server) = server(2, exits).await;
        let socket = std::os::unix::net::UnixStream::from(connection.socket);
        new.relay(UnixStream::from_std(socket).unwrap(), Some((connection.replay, connection.partial))).await.unwrap();
        assert_eq!(
            client.state(ctx(), &StateRequest::new()).await.unwrap().pid,
            2,
            "the same connection, served by the new server"
        );
        assert!(!waiting.is_finished());
        exit.send_replace(Some(42));
        let answered = tokio::time::timeout(std::time::Duration::from_secs(10), waiting).await.unwrap().unwrap();
        assert_eq!(answered.unwrap().exit_status, 42, "the Wait sent to the old server is answered by the new one");
    }

    #[tokio::test]
    async fn answers_far_longer_than_the_relays_first_buffer_reach_containerd_whole() {
        let (_never_sent, never) = watch::channel(None);
        let long = "x".repeat(300 * ANSWER_BUFFER_BYTES);
        let (relays, _server) = server_saying(1, never, long.clone()).await;
        let (ours, theirs) = UnixStream::pair().unwrap();
        relays.relay(theirs, None).await.unwrap();
        let client = TaskClient::new(Client::new(ours.into()));
        for _ in 0..3 {
            let answer = client.state(ttrpc::context::Context::default(), &StateRequest::new()).await.unwrap();
            assert_eq!((answer.pid, answer.stdout.len()), (1, long.len()));
            assert_eq!(answer.stdout, long);
        }
    }

    fn frame(id: u32, kind: u8, body: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&id.to_be_bytes());
        frame.push(kind);
        frame.push(0);
        frame.extend_from_slice(body);
        frame
    }

    #[test]
    fn frames_are_told_whole_only_when_all_their_bytes_are_there() {
        let request = ttrpc::proto::Request {
            service: "containerd.task.v2.Task".into(),
            method: "Wait".into(),
            ..Default::default()
        };
        let body = request.write_to_bytes().unwrap();
        let whole = frame(7, ttrpc::proto::MESSAGE_TYPE_REQUEST, &body);
        assert_eq!(whole_frame(&whole[..HEADER - 1]), Ok(None));
        assert_eq!(whole_frame(&whole[..whole.len() - 1]), Ok(None));
        assert_eq!(whole_frame(&whole), Ok(Some(whole.len())));
        assert_eq!(stream_id(&whole), 7);
        assert!(is_long_poll(&whole));
        let state = ttrpc::proto::Request { method: "State".into(), ..Default::default() };
        assert!(!is_long_poll(&frame(9, 1, &state.write_to_bytes().unwrap())));
        let mut huge = frame(1, 1, b"");
        huge[..4].copy_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert!(whole_frame(&huge).is_err());
    }
}
