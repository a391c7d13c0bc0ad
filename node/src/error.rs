//! The node's one error type, and its one mapping to ttrpc codes.
//!
//! Each variant says what kind of failure it is, so containerd (and, through
//! it, the kubelet) sees a code it acts on: a bad bundle or annotation is
//! `INVALID_ARGUMENT`, a container or image content that is missing is
//! `NOT_FOUND`, a second Create of an id is `ALREADY_EXISTS`, a call out of
//! order is `FAILED_PRECONDITION`, a feature Shoal does not have is
//! `UNIMPLEMENTED`, containerd being unreachable is `UNAVAILABLE`, and a
//! failure of the node itself (mounts, namespaces, sockets) is `INTERNAL`.
//!
//! A failure the node found itself is one of the first variants, a message
//! of its code. A failure of something the node called keeps that error as
//! its [`source`](std::error::Error::source): one variant per kind of cause
//! (I/O, a system call, containerd, wasmtime, the Shoal host, an encoding,
//! a blocking job, the hand-over, a manifest), each with `what` the node
//! was doing and, where one cause may mean different things, the `code` the
//! call site chose. Its text is `what: cause`.

use containerd_shim_protos::ttrpc;
pub(crate) use containerd_shim_protos::ttrpc::Code;

/// Why a task call failed. The text names the subject and the reason.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The bundle, its annotations or the request are invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// A container, exec or piece of image content does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The container already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The call does not fit the container's state (start twice, delete
    /// while running).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something Shoal does not do (a terminal, say).
    #[error("{0}")]
    Unimplemented(String),
    /// containerd could not be asked.
    #[error("{0}")]
    Unavailable(String),
    /// The node failed at something it needed (a mount, a namespace, a
    /// socket, a task).
    #[error("{0}")]
    Internal(String),
    /// The wasm, its manifest or its deploy was refused by the host.
    #[error("{entry}: {source}")]
    Deploy {
        /// The entrypoint or image the wasm came from.
        entry: String,
        /// What the host said.
        source: shoal::Error,
    },
    /// The node policy file is refused: every container is, until it is
    /// fixed.
    #[error(transparent)]
    Policy(std::sync::Arc<crate::policy::PolicyError>),
    /// A file, FIFO, socket, descriptor or thread could not be had.
    #[error("{what}: {source}")]
    Io {
        /// What containerd is told.
        code: Code,
        /// What the node was doing.
        what: String,
        /// What the call said.
        source: std::io::Error,
    },
    /// A system call the node made through nix or containerd's shim
    /// library failed (a mount, a namespace, an ioctl socket).
    #[error("{what}: {source}")]
    Os {
        /// What containerd is told.
        code: Code,
        /// What the node was doing.
        what: String,
        /// The errno, or the shim library's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// containerd answered a call with an error (the text is its message).
    #[error("{what}: {}", .source.message())]
    Containerd {
        /// What containerd is told.
        code: Code,
        /// What the node asked.
        what: String,
        /// containerd's status (boxed, as the source is too: a status is
        /// large).
        source: Box<tonic::Status>,
    },
    /// wasmtime could not compile, adapt or link a program (the text is
    /// the whole chain of its error).
    #[error("{what}: {source:#}")]
    Wasm {
        /// What containerd is told.
        code: Code,
        /// What the node was doing.
        what: String,
        /// What wasmtime (or the component tooling) said (a
        /// `wasmtime::Error` as an `anyhow::Error`, which keeps its chain).
        source: anyhow::Error,
    },
    /// The Shoal host refused: a name, a function spec, a call on a
    /// deployed function.
    #[error("{what}: {source}")]
    Host {
        /// What containerd is told.
        code: Code,
        /// What the node was doing.
        what: String,
        /// The host's error ([`shoal::Error`], a manifest's name or spec
        /// error).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Bytes that do not decode as what they should be (JSON, protobuf, an
    /// OCI spec), or a value that does not encode.
    #[error("{what}: {source}")]
    Encoding {
        /// What containerd is told.
        code: Code,
        /// What the bytes are.
        what: String,
        /// What the decoder or encoder said.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A blocking job (on tokio's blocking pool) that did not finish.
    #[error("{what}: {source}")]
    Blocking {
        /// The job.
        what: String,
        /// How it ended (a panic, a cancellation).
        source: tokio::task::JoinError,
    },
    /// A hand-over's snapshot cannot be taken up (a descriptor it names is
    /// missing): the hand-over's own error.
    #[error(transparent)]
    Handover(Box<dyn std::error::Error + Send + Sync>),
    /// A pod's settings do not make a valid manifest.
    #[error(transparent)]
    Manifest(Box<shoal::manifest::ManifestCause>),
    /// Another failure, met while doing `what`.
    #[error("{what}: {source}")]
    Context {
        /// What the node was doing.
        what: String,
        /// The failure (its code is this error's).
        source: Box<NodeError>,
    },
}

impl NodeError {
    /// The ttrpc code containerd gets for this error.
    pub fn code(&self) -> Code {
        match self {
            NodeError::InvalidArgument(_) | NodeError::Manifest(_) => Code::INVALID_ARGUMENT,
            NodeError::NotFound(_) => Code::NOT_FOUND,
            NodeError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            NodeError::FailedPrecondition(_) | NodeError::Policy(_) => Code::FAILED_PRECONDITION,
            NodeError::Unimplemented(_) => Code::UNIMPLEMENTED,
            NodeError::Unavailable(_) => Code::UNAVAILABLE,
            NodeError::Deploy { source, .. } => match source {
                shoal::Error::RouteConflict { .. } => Code::ALREADY_EXISTS,
                shoal::Error::UnknownFunction { .. } => Code::NOT_FOUND,
                shoal::Error::Io { .. } | shoal::Error::Internal(_) => Code::INTERNAL,
                _ => Code::INVALID_ARGUMENT,
            },
            NodeError::Io { code, .. }
            | NodeError::Os { code, .. }
            | NodeError::Containerd { code, .. }
            | NodeError::Wasm { code, .. }
            | NodeError::Host { code, .. }
            | NodeError::Encoding { code, .. } => *code,
            NodeError::Internal(_) | NodeError::Blocking { .. } | NodeError::Handover(_) => Code::INTERNAL,
            NodeError::Context { source, .. } => source.code(),
        }
    }

    /// The same failure (and code), met while doing `what`: its text is
    /// prefixed with `what`.
    pub fn context(self, what: impl std::fmt::Display) -> NodeError {
        NodeError::Context { what: what.to_string(), source: Box::new(self) }
    }

    /// Prefix the message with the container it is about.
    pub fn for_container(self, id: &str) -> ttrpc::Error {
        let code = self.code();
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, format!("shoal: container {id}: {self}")))
    }
}

impl From<NodeError> for ttrpc::Error {
    fn from(error: NodeError) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(error.code(), format!("shoal: {error}")))
    }
}

/// A background task (blocking work) that did not finish.
pub(crate) fn task_failed(what: &str) -> impl FnOnce(tokio::task::JoinError) -> NodeError + '_ {
    move |source| NodeError::Blocking { what: what.to_string(), source }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::sync::Arc;

    use super::*;
    use crate::policy::PolicyError;

    #[test]
    fn each_kind_of_failure_maps_to_the_code_containerd_acts_on() {
        let cases = [
            (NodeError::InvalidArgument("x".into()), Code::INVALID_ARGUMENT),
            (NodeError::NotFound("x".into()), Code::NOT_FOUND),
            (NodeError::AlreadyExists("x".into()), Code::ALREADY_EXISTS),
            (NodeError::FailedPrecondition("x".into()), Code::FAILED_PRECONDITION),
            (NodeError::Unimplemented("x".into()), Code::UNIMPLEMENTED),
            (NodeError::Unavailable("x".into()), Code::UNAVAILABLE),
            (NodeError::Internal("x".into()), Code::INTERNAL),
            (NodeError::Policy(Arc::new(PolicyError::TooLarge { file: "p".into() })), Code::FAILED_PRECONDITION),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error:?}");
        }
        let conflict = shoal::Error::RouteConflict { route: "/".into(), function: "a".into(), owner: "b".into() };
        assert_eq!(NodeError::Deploy { entry: "/app.wasm".into(), source: conflict }.code(), Code::ALREADY_EXISTS);
        let bad = shoal::Error::NotAComponent { function: "a".into() };
        let error = NodeError::Deploy { entry: "/app.wasm".into(), source: bad };
        assert_eq!(error.code(), Code::INVALID_ARGUMENT);
        let ttrpc::Error::RpcStatus(status) = error.for_container("c1") else { panic!("a status") };
        assert!(status.message.starts_with("shoal: container c1: /app.wasm: function \"a\""), "{}", status.message);
    }

    /// Every error of a cause down the chain from `error`, as text.
    fn chain(error: &(dyn std::error::Error + 'static)) -> Vec<String> {
        std::iter::successors(Some(error), |error| std::error::Error::source(*error)).map(ToString::to_string).collect()
    }

    #[test]
    fn a_cause_is_kept_as_the_source_and_said_once_after_what_failed() {
        let io = NodeError::Io {
            code: Code::NOT_FOUND,
            what: "cannot open the network namespace /run/netns/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(io.code(), Code::NOT_FOUND);
        assert_eq!(
            chain(&io),
            ["cannot open the network namespace /run/netns/x: entity not found", "entity not found"]
        );
        assert!(io.source().is_some_and(<dyn std::error::Error>::is::<std::io::Error>));

        let os = NodeError::Os {
            code: Code::INTERNAL,
            what: "cannot create a network namespace".into(),
            source: nix::errno::Errno::EPERM.into(),
        };
        assert_eq!(os.to_string(), format!("cannot create a network namespace: {}", nix::errno::Errno::EPERM));
        assert!(os.source().is_some_and(|source| source.downcast_ref() == Some(&nix::errno::Errno::EPERM)));

        // containerd's message, not the status's whole Debug-like text.
        let status = NodeError::Containerd {
            code: Code::NOT_FOUND,
            what: "containerd has no image app:1".into(),
            source: Box::new(tonic::Status::not_found("image \"app:1\": not found")),
        };
        assert_eq!(status.to_string(), "containerd has no image app:1: image \"app:1\": not found");
        assert!(status.source().is_some_and(<dyn std::error::Error>::is::<Box<tonic::Status>>));

        // wasmtime's whole chain, as `{:#}` said it.
        let wasm = wasmtime::Error::msg("unknown import").context("cannot instantiate");
        let said = format!("{wasm:#}");
        let error = NodeError::Wasm {
            code: Code::INVALID_ARGUMENT,
            what: "cannot link the component".into(),
            source: wasm.into(),
        };
        assert_eq!(error.to_string(), format!("cannot link the component: {said}"));
        assert_eq!(chain(&error)[1..], ["cannot instantiate", "unknown import"]);
    }

    #[test]
    fn a_context_prefixes_the_text_and_keeps_the_code_and_the_cause() {
        let conflict = shoal::Error::RouteConflict { route: "/".into(), function: "a".into(), owner: "b".into() };
        let error = NodeError::Deploy { entry: "/app.wasm".into(), source: conflict }.context("container c1");
        assert_eq!(error.code(), Code::ALREADY_EXISTS);
        let said = chain(&error);
        assert_eq!(said[0], format!("container c1: {}", said[1]));
        assert!(said[1].starts_with("/app.wasm: route / of function \"a\""), "{said:?}");
        let policy =
            NodeError::Policy(Arc::new(PolicyError::TooLarge { file: "p".into() })).context("the entrypoint /a.wasm");
        assert_eq!(policy.code(), Code::FAILED_PRECONDITION);
        let manifest = NodeError::Manifest(Box::new(shoal::manifest::ManifestCause::NoFunctions));
        assert_eq!((manifest.code(), manifest.to_string()), (Code::INVALID_ARGUMENT, "no [[function]] entries".into()));
        let handover = NodeError::Handover(std::io::Error::other("the hand-over lacks descriptor 3").into());
        assert_eq!(
            (handover.code(), handover.to_string()),
            (Code::INTERNAL, "the hand-over lacks descriptor 3".into())
        );
    }
}
