//! A pod the CRI would not run, with containerd's status kept.

/// A CRI call of [`Cri::try_run_pod`](super::Cri::try_run_pod) that containerd refused: the call,
/// and its status (the [`std::error::Error::source`]).
#[derive(Debug)]
pub struct PodRefused {
    /// The CRI call: `RunPodSandbox`, `CreateContainer` or `StartContainer`.
    pub call: &'static str,
    /// What containerd answered.
    pub status: tonic::Status,
}

impl PodRefused {
    pub(super) fn by(call: &'static str) -> impl FnOnce(tonic::Status) -> PodRefused {
        move |status| PodRefused { call, status }
    }

    /// Whether the refusal's message says `text` (what a test asserts).
    pub fn contains(&self, text: &str) -> bool {
        self.to_string().contains(text)
    }
}

impl std::fmt::Display for PodRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.call, self.status.message())
    }
}

impl std::error::Error for PodRefused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.status)
    }
}
