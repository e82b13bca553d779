//! The one error type of the core. No pyo3 here: the binding layer maps [`ErrorKind`] to Python
//! exceptions in exactly one place (`bindings::error`).

use std::fmt;

/// Which server a connectivity error is about; named in the message so an operator knows where to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The PostgreSQL database (the source of truth).
    Postgres,
    /// The Redis cache.
    Redis,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Postgres => "PostgreSQL",
            Backend::Redis => "Redis",
        })
    }
}

/// What went wrong, in the terms a caller acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad settings: unknown mode, missing or malformed connection string, unreadable CA file.
    Config,
    /// A value of the right type that PostgreSQL would refuse (the README, "Errors").
    Validation,
    /// A value of the wrong type (a number where a string belongs, a list that is not a list).
    InvalidType,
    /// The conversation id belongs to another user (docs/design.md, "Ownership").
    Ownership,
    /// The server cannot be reached or dropped the connection.
    Unavailable(Backend),
    /// The server was reached and refused the operation.
    Database(Backend),
    /// A local file could not be read or written.
    Io,
    /// The manager was used after `close()`.
    Closed,
}

/// The error type of every fallible operation in the core.
///
/// Boxed so that `Result<T, Error>` stays one word wide on the happy path. Messages never hold a
/// password: connection strings are only ever shown through [`crate::config`]'s redacted forms.
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// An error of `kind` with a message for humans.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error(Box::new(Inner { kind, message: message.into(), source: None }))
    }

    /// Attaches the lower-level cause (kept for `source()`, shown after the message).
    #[must_use]
    pub fn with_source(mut self, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        self.0.source = Some(source.into());
        self
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    pub(crate) fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Validation, message)
    }

    /// A value of the wrong type (the binding layer's type checks).
    #[must_use]
    pub fn invalid_type(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidType, message)
    }

    /// What went wrong.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The message without the cause.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// True when a server could not be reached: the caller may fall back or retry later.
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(self.0.kind, ErrorKind::Unavailable(_))
    }

    /// True for bad input (either kind): nothing was stored.
    #[must_use]
    pub fn is_invalid_input(&self) -> bool {
        matches!(self.0.kind, ErrorKind::Validation | ErrorKind::InvalidType)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.0.kind)
            .field("message", &self.0.message)
            .field("source", &self.0.source)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.message)?;
        if let Some(source) = &self.0.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The core's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_appends_the_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let err = Error::new(ErrorKind::Unavailable(Backend::Postgres), "PostgreSQL is unavailable").with_source(io);
        assert_eq!(err.to_string(), "PostgreSQL is unavailable: connection refused");
        assert!(err.is_unavailable());
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn error_is_one_pointer_wide() {
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
    }
}
