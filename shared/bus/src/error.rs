//! The one error type that crosses the wire.
//!
//! Every service maps its own errors to a [`Code`] through a single `code()`
//! and the serve loop writes the wire form: the NATS micro-service headers
//! `Nats-Service-Error-Code` (the numeric code) and `Nats-Service-Error` (the
//! message). Clients read them back into the same [`Error`], so a caller
//! matches on codes, never on text.

use std::fmt;

/// The class of a failure; the numbers are those of `berth.v1.Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// The request is malformed or names something invalid.
    InvalidArgument,
    /// The caller may not do this.
    PermissionDenied,
    /// The named object does not exist.
    NotFound,
    /// An object with that id exists already.
    AlreadyExists,
    /// The object's state does not allow the operation.
    FailedPrecondition,
    /// Something unexpected failed inside the service.
    Internal,
    /// The service is not running or cannot reach what it needs.
    Unavailable,
    /// The operation did not finish in time.
    DeadlineExceeded,
}

impl Code {
    /// Every code, in wire order.
    pub const ALL: [Code; 8] = [
        Code::InvalidArgument,
        Code::PermissionDenied,
        Code::NotFound,
        Code::AlreadyExists,
        Code::FailedPrecondition,
        Code::Internal,
        Code::Unavailable,
        Code::DeadlineExceeded,
    ];

    /// The numeric wire value (`Nats-Service-Error-Code`).
    pub fn as_u16(self) -> u16 {
        match self {
            Code::InvalidArgument => 400,
            Code::PermissionDenied => 403,
            Code::NotFound => 404,
            Code::AlreadyExists => 409,
            Code::FailedPrecondition => 412,
            Code::Internal => 500,
            Code::Unavailable => 503,
            Code::DeadlineExceeded => 504,
        }
    }

    /// The code for a wire value; unknown values are `Internal`.
    pub fn from_u16(value: u16) -> Code {
        Code::ALL
            .into_iter()
            .find(|code| code.as_u16() == value)
            .unwrap_or(Code::Internal)
    }

    /// The code's name as logs and `--json` output show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid-argument",
            Code::PermissionDenied => "permission-denied",
            Code::NotFound => "not-found",
            Code::AlreadyExists => "already-exists",
            Code::FailedPrecondition => "failed-precondition",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DeadlineExceeded => "deadline-exceeded",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure with its class and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// The class.
    pub code: Code,
    /// What went wrong, naming the object.
    pub message: String,
}

impl Error {
    /// An error of class `code`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }

    /// `InvalidArgument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// `NotFound`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    /// `AlreadyExists`.
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(Code::AlreadyExists, message)
    }

    /// `FailedPrecondition`.
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }

    /// `Internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    /// `Unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, message)
    }

    /// An error of class `code` whose message is `err` and its causes, each
    /// said once (`cannot mount …: permission denied`): a service's own
    /// error as it crosses the wire, where the caller has nothing else to
    /// read the causes from.
    pub fn with_causes(code: Code, err: &dyn std::error::Error) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::new(code, message)
    }
}

impl From<heed::Error> for Error {
    fn from(err: heed::Error) -> Self {
        Error::internal(format!("database: {err}"))
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::internal(format!("io: {err}"))
    }
}

impl From<prost::DecodeError> for Error {
    fn from(err: prost::DecodeError) -> Self {
        Error::invalid(format!("malformed message: {err}"))
    }
}

/// A result whose error crosses the wire.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_said_once_after_the_error() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot open blob")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::other("disk gone"));
        let wire = Error::with_causes(Code::Internal, &err);
        assert_eq!(wire.message, "cannot open blob: disk gone");
        assert_eq!(wire.code, Code::Internal);
    }

    #[test]
    fn codes_round_trip_through_their_wire_values() {
        for code in Code::ALL {
            assert_eq!(Code::from_u16(code.as_u16()), code);
        }
        assert_eq!(Code::from_u16(999), Code::Internal);
    }
}
