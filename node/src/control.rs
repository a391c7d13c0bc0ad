//! The control socket beside the task socket (`<socket>.upgrade`): who
//! may ask (this host's own user), what they may ask (`upgrade`), and the
//! asking side, `shoal node --upgrade`.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use crate::control_socket;
use shoal::Error;

/// A connection to the task or control socket that is not served.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// The peer's credentials cannot be read.
    #[error("cannot tell who is asking: {0}")]
    UnknownPeer(#[source] std::io::Error),
    /// The peer runs as another user.
    #[error("uid {peer} is not this host's uid {me}")]
    OtherUser { peer: u32, me: u32 },
    /// The control socket was sent something other than an upgrade request.
    #[error("unknown request {0:?}")]
    UnknownRequest(String),
}

/// Whether the peer of `stream` runs as this host's own user: `Err` says
/// who it is.
pub(crate) fn same_user(stream: &UnixStream) -> Result<(), Refusal> {
    let peer = stream.peer_cred().map_err(Refusal::UnknownPeer)?;
    let me = nix::unistd::geteuid().as_raw();
    if peer.uid() != me {
        return Err(Refusal::OtherUser { peer: peer.uid(), me });
    }
    Ok(())
}

/// An upgrade request: `upgrade`, or `upgrade end-programs-after=<ms>`
/// (programs and execs still running that long are ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// How long running programs and execs may take to end before they
    /// are ended; `None`: a running one refuses the upgrade.
    pub end_programs_after: Option<Duration>,
}

impl UpgradeRequest {
    fn line(&self) -> String {
        match self.end_programs_after {
            None => "upgrade\n".to_string(),
            Some(after) => format!("upgrade end-programs-after={}\n", after.as_millis()),
        }
    }

    fn parse(line: &str) -> Option<UpgradeRequest> {
        let mut words = line.split_whitespace();
        if words.next() != Some("upgrade") {
            return None;
        }
        let end_programs_after = match words.next() {
            None => None,
            Some(word) => Some(Duration::from_millis(word.strip_prefix("end-programs-after=")?.parse().ok()?)),
        };
        words.next().is_none().then_some(UpgradeRequest { end_programs_after })
    }
}

/// Read an upgrade request from a peer of this host's own user.
pub(crate) async fn upgrade_request(stream: UnixStream) -> Result<(UnixStream, UpgradeRequest), Refusal> {
    let refused = same_user(&stream);
    let mut stream = tokio::io::BufReader::new(stream);
    if let Err(why) = refused {
        let me = nix::unistd::geteuid().as_raw();
        let _ = stream.get_mut().write_all(format!("error: only uid {me} may upgrade this host\n").as_bytes()).await;
        return Err(why);
    }
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut limited = (&mut stream).take(64);
        limited.read_line(&mut line).await
    })
    .await;
    match read.ok().and_then(Result::ok).and_then(|_| UpgradeRequest::parse(&line)) {
        Some(request) => Ok((stream.into_inner(), request)),
        None => {
            let _ =
                stream.get_mut().write_all(b"error: the only request is `upgrade [end-programs-after=<ms>]`\n").await;
            Err(Refusal::UnknownRequest(line.trim().to_string()))
        }
    }
}

/// `shoal node --upgrade`: ask the host behind `socket` to hand over to
/// the binary now installed where it was started from; print its progress.
/// The last line says how it ended; `None` when no host runs there (a
/// socket file left by a host that died) and `skip_stale` says to pass.
pub async fn upgrade(socket: &Path, request: UpgradeRequest, skip_stale: bool) -> Result<Option<String>, Error> {
    let control = control_socket(socket);
    let stream = match UnixStream::connect(&control).await {
        Ok(stream) => stream,
        Err(err) if skip_stale && err.kind() == std::io::ErrorKind::ConnectionRefused => {
            println!("{}: no host runs there (left by a host that ended); skipped", socket.display());
            return Ok(None);
        }
        Err(err) => return Err(anyhow::anyhow!("no node host answers at {}: {err}", control.display()).into()),
    };
    let (read, mut write) = stream.into_split();
    write.write_all(request.line().as_bytes()).await.map_err(anyhow::Error::from)?;
    let mut lines = tokio::io::BufReader::new(read).lines();
    let mut last = String::new();
    while let Some(line) = lines.next_line().await.map_err(anyhow::Error::from)? {
        println!("{}: {line}", socket.display());
        last = line;
    }
    match last.strip_prefix("error: ") {
        Some(why) => Err(anyhow::anyhow!("{}: {why}", socket.display()).into()),
        None if last.starts_with("upgraded") => Ok(Some(last)),
        None => {
            Err(anyhow::anyhow!("{}: the host closed the connection before the hand-over ended", socket.display())
                .into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_request_says_how_long_programs_may_take_to_end() {
        let plain = UpgradeRequest { end_programs_after: None };
        let bounded = UpgradeRequest { end_programs_after: Some(Duration::from_secs(60)) };
        for request in [plain, bounded] {
            assert_eq!(UpgradeRequest::parse(&request.line()), Some(request));
        }
        assert_eq!(bounded.line(), "upgrade end-programs-after=60000\n");
        for refused in
            ["", "upgrades", "upgrade now", "upgrade end-programs-after=soon", "upgrade end-programs-after=1 x"]
        {
            assert_eq!(UpgradeRequest::parse(refused), None, "{refused:?}");
        }
    }
}
