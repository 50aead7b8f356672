//! One error type for the library: every variant names the file or thing at fault and,
//! where there is one, what the user can do about it.

use std::path::PathBuf;

/// Errors raised by the scoring core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An image could not be read or decoded.
    #[error("image {origin}: {reason}")]
    Image { origin: String, reason: String },
    /// A model bundle is missing, malformed, or does not match its manifest.
    #[error("bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    /// Pretrained weights are missing or could not be converted.
    #[error("weights {path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    /// A data set folder is missing or has no usable images.
    #[error("data set {path}: {reason}")]
    Dataset { path: PathBuf, reason: String },
    /// A signature is missing, made by an untrusted key, or does not verify.
    #[error("{path}: {error}")]
    Signature {
        path: PathBuf,
        error: crate::signing::SignatureError,
    },
    /// A bundle's golden frames do not score as its manifest says.
    #[error("bundle {path}: self-test failed: {reason}")]
    SelfTest { path: PathBuf, reason: String },
    /// A configuration value is out of range.
    #[error("invalid setting: {0}")]
    Config(String),
    /// File system error on a named path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Tensor computation failed (shape mismatch, device error).
    #[error("tensor computation: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}
