//! Agent errors: each names the file, field or rule at fault.

use protocol_spec::Problem;

/// Everything that can go wrong on the device side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The state file or an input file is not what it should be.
    #[error("{0}")]
    Invalid(String),
    /// The CA refused the request.
    #[error("the CA refused: {0}")]
    Refused(Problem),
    /// The network or the server failed; a retry may succeed.
    #[error("transport: {0}")]
    Transport(String),
    /// The response did not verify against the pinned CA and the device's own key.
    #[error("response rejected: {0}")]
    Verify(String),
}

impl AgentError {
    /// Whether retrying the same request may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            AgentError::Transport(_) => true,
            AgentError::Refused(p) => p.kind.is_transient(),
            _ => false,
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        AgentError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
