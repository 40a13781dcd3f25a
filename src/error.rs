//! The library's error type. Every variant names what is wrong and where (file, tensor, key), so the
//! CLI can print it as one line.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or does not hold what it should.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },

    /// A tensor in a checkpoint is missing, or has the wrong shape or dtype.
    #[error("{}: tensor `{name}`: {msg}", path.display())]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },

    /// A model configuration (config.json or GGUF metadata) is incomplete or inconsistent.
    #[error("{}: config: {msg}", path.display())]
    Config { path: PathBuf, msg: String },

    /// An asset (registry package) could not be fetched or verified.
    #[error("asset `{name}`: {msg}")]
    Asset { name: String, msg: String },

    /// A request the caller made does not fit (bad option, unknown name, ...).
    #[error("{0}")]
    Invalid(String),

    #[error("{}", first_line(.0))]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The first line of an error message: candle appends a backtrace to its errors when
/// RUST_BACKTRACE is set, and a user-facing error is one line.
pub fn first_line(e: &impl std::fmt::Display) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or("").trim_end().to_string()
}

impl Error {
    pub fn file(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.as_ref().to_path_buf(),
            msg: first_line(&msg),
        }
    }

    pub fn tensor(path: impl AsRef<Path>, name: &str, msg: impl std::fmt::Display) -> Self {
        Error::Tensor {
            path: path.as_ref().to_path_buf(),
            name: name.to_string(),
            msg: first_line(&msg),
        }
    }

    pub fn config(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::Config {
            path: path.as_ref().to_path_buf(),
            msg: first_line(&msg),
        }
    }

    pub fn invalid(msg: impl std::fmt::Display) -> Self {
        Error::Invalid(msg.to_string())
    }
}

/// Attach a file path to any error that does not carry one yet.
pub trait WithPath<T> {
    fn with_path(self, path: &Path) -> Result<T>;
}

impl<T, E: std::fmt::Display> WithPath<T> for std::result::Result<T, E> {
    fn with_path(self, path: &Path) -> Result<T> {
        self.map_err(|e| Error::file(path, e))
    }
}
