//! The host library's error type: one enum, each variant naming the phase
//! and the subject, so a message says what failed, for which function, and
//! what to do about it. The admin API maps it to an HTTP status in one place
//! ([`Error::status`]).

use std::path::PathBuf;

/// `err` and its causes, `: `-separated, each cause once: one whose text
/// already ends the line (a Display that shows its source) is not repeated.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.ends_with(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// What can go wrong deploying, managing or reaching functions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The manifest is malformed or has an invalid value.
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },

    /// The bytes are not WebAssembly, or do not validate.
    #[error("function {function:?}: invalid wasm: {source:#}")]
    InvalidWasm {
        /// The function being deployed.
        function: String,
        /// What the parser, validator or compiler said.
        source: anyhow::Error,
    },

    /// A core module where a component is needed.
    #[error(
        "function {function:?}: this is a core wasm module, not a component; \
         HTTP functions are WASI 0.2 components (build with `--target wasm32-wasip2`)"
    )]
    NotAComponent {
        /// The function being deployed.
        function: String,
    },

    /// The component imports something the host does not provide.
    #[error("function {function:?}: cannot link: {source:#}")]
    Link {
        /// The function being deployed.
        function: String,
        /// The linker's error (names the missing import).
        source: anyhow::Error,
    },

    /// The component does not export `wasi:http/incoming-handler`.
    #[error(
        "function {function:?}: the component does not export `wasi:http/incoming-handler` \
         (an HTTP function targets the `wasi:http/proxy` world; a function without routes may \
         instead only receive messages through `shoal:runtime/events`)"
    )]
    MissingHandler {
        /// The function being deployed.
        function: String,
    },

    /// Trial instantiation failed.
    #[error("function {function:?}: cannot instantiate: {reason}")]
    InstantiateFailed {
        /// The function being deployed.
        function: String,
        /// The cause.
        reason: String,
    },

    /// The function limits ask for something this host cannot give.
    #[error("function {function:?}: {reason}")]
    LimitUnsupported {
        /// The function being deployed.
        function: String,
        /// What is unsupported.
        reason: String,
    },

    /// Two functions claim the same route.
    #[error("route {route} of function {function:?} already belongs to function {owner:?}")]
    RouteConflict {
        /// The route.
        route: String,
        /// The function being deployed.
        function: String,
        /// The function that has it.
        owner: String,
    },

    /// No function by that name is deployed.
    #[error("no function named {name:?} is deployed (see `shoal ls`)")]
    UnknownFunction {
        /// The name asked for.
        name: String,
    },

    /// The request to the admin API is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),

    /// Anything else (a host bug or an environment failure).
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl Error {
    /// The HTTP status the admin API answers this error with.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Error::UnknownFunction { .. } => StatusCode::NOT_FOUND,
            Error::RouteConflict { .. } => StatusCode::CONFLICT,
            Error::Io { .. } | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::Manifest(_)
            | Error::InvalidWasm { .. }
            | Error::NotAComponent { .. }
            | Error::Link { .. }
            | Error::MissingHandler { .. }
            | Error::InstantiateFailed { .. }
            | Error::LimitUnsupported { .. }
            | Error::BadRequest(_) => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    /// The error for an I/O failure on `path` (for `map_err`).
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
