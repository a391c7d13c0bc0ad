//! The node's one error type, and its one mapping to ttrpc codes.
//!
//! Each variant says what kind of failure it is, so containerd (and, through
//! it, the kubelet) sees a code it acts on: a bad bundle or annotation is
//! `INVALID_ARGUMENT`, a container or image content that is missing is
//! `NOT_FOUND`, a second Create of an id is `ALREADY_EXISTS`, a call out of
//! order is `FAILED_PRECONDITION`, a feature Shoal does not have is
//! `UNIMPLEMENTED`, containerd being unreachable is `UNAVAILABLE`, and a
//! failure of the node itself (mounts, namespaces, sockets) is `INTERNAL`.

use containerd_shim_protos::ttrpc::{self, Code};

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
    /// The node failed at something it needed (a mount, a namespace, a
    /// socket, a task).
    #[error("{0}")]
    Internal(String),
}

impl NodeError {
    /// The ttrpc code containerd gets for this error.
    pub fn code(&self) -> Code {
        match self {
            NodeError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
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
            NodeError::Internal(_) => Code::INTERNAL,
        }
    }

    /// The same kind of failure, its message prefixed with `prefix`.
    pub fn context(self, prefix: impl std::fmt::Display) -> NodeError {
        let prefixed = |message: String| format!("{prefix}: {message}");
        match self {
            NodeError::InvalidArgument(message) => NodeError::InvalidArgument(prefixed(message)),
            NodeError::NotFound(message) => NodeError::NotFound(prefixed(message)),
            NodeError::AlreadyExists(message) => NodeError::AlreadyExists(prefixed(message)),
            NodeError::FailedPrecondition(message) => NodeError::FailedPrecondition(prefixed(message)),
            NodeError::Unimplemented(message) => NodeError::Unimplemented(prefixed(message)),
            NodeError::Unavailable(message) => NodeError::Unavailable(prefixed(message)),
            NodeError::Deploy { entry, source } => NodeError::Deploy { entry: prefixed(entry), source },
            NodeError::Policy(source) => NodeError::FailedPrecondition(prefixed(source.to_string())),
            NodeError::Internal(message) => NodeError::Internal(prefixed(message)),
        }
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
    move |err| NodeError::Internal(format!("{what}: {err}"))
}

#[cfg(test)]
mod tests {
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
}
