//! One error type for the library. Every variant says which file, row, key or tensor is at fault, so the
//! command line can print it as a single line and exit non-zero.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration key is unknown, has the wrong type or an impossible value.
    #[error("config: {0}")]
    Config(String),
    /// A file could not be read or written, or its content as a whole is malformed.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// One data row is malformed. `row` is the 1-based line of a JSON Lines file or the 1-based element of a JSON array.
    #[error("{}: row {row}: {msg}", path.display())]
    Row { path: PathBuf, row: usize, msg: String },
    /// The model folder, its config or one of its tensors does not fit what the engine supports.
    #[error("model {}: {msg}", path.display())]
    Model { path: PathBuf, msg: String },
    /// A model or data set named by hub ID cannot be found, reached or downloaded; `id` is the repository (or
    /// its file) and the message says what to do.
    #[error("{id}: {msg}")]
    Hub { id: String, msg: String },
    /// Training cannot go on (a non-finite loss, an empty data set after filtering, ...).
    #[error("{0}")]
    Train(String),
    /// Stopped by SIGINT or SIGTERM after a checkpoint was written.
    #[error("interrupted after step {step}; checkpoint in {}; resume with --set resume_from_checkpoint=true", checkpoint.display())]
    Interrupted { step: usize, checkpoint: PathBuf },
    /// Stopped by SIGINT or SIGTERM where there is no checkpoint to write (before the first optimizer step, or
    /// in a command that does not train); the text says during what and what was kept.
    #[error("interrupted {0}")]
    StoppedEarly(String),
}

impl Error {
    /// Whether the user stopped the run (exit code 130), rather than it failing.
    pub fn is_interruption(&self) -> bool {
        matches!(self, Error::Interrupted { .. } | Error::StoppedEarly(_))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::File { path: path.into(), msg: msg.to_string() }
    }
    pub fn model(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Model { path: path.into(), msg: msg.to_string() }
    }
}
