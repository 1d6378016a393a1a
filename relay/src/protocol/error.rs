//! Stable error codes of protocol v1 and the WebSocket close codes they map to.

use serde::{Deserialize, Serialize};

/// A typed protocol error code. The snake_case string form is part of the wire
/// protocol and never changes meaning; new codes may be added, so clients must
/// accept codes they do not know (they decode as [`ErrorCode::Unknown`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The text frame is not valid JSON or does not match the frame schema.
    BadFrame,
    /// The frame's `type` is not one this protocol version knows.
    UnknownType,
    /// A request other than `auth` (or `ping`) arrived before authentication.
    NotAuthenticated,
    /// `auth` arrived on an already authenticated connection.
    AlreadyAuthenticated,
    /// The signature over the challenge did not verify for the given key.
    AuthFailed,
    /// The challenge expired (or was already used) before a valid `auth` arrived.
    ChallengeExpired,
    /// The frame is larger than the relay's maximum frame size.
    FrameTooLarge,
    /// A binary WebSocket frame arrived; protocol v1 uses text frames only.
    BinaryFrame,
    /// A text frame was not valid UTF-8.
    InvalidUtf8,
    /// The connection exceeded its request rate (token bucket).
    RateLimited,
    /// The envelope is syntactically valid JSON but violates a rule (ids, keys, sizes).
    InvalidEnvelope,
    /// The envelope's `from` is not the authenticated key.
    SenderMismatch,
    /// The requested object (profile) does not exist.
    NotFound,
    /// A channel send from a key that has not joined the channel.
    NotMember,
    /// The profile signature or contents are invalid.
    InvalidProfile,
    /// The relay could not read or write its storage; retry later.
    StorageUnavailable,
    /// The relay is overloaded and refused this send; retry it (same id) after a backoff.
    Overloaded,
    /// The client did not read its frames fast enough and is disconnected.
    SlowConsumer,
    /// The connection was idle (or unauthenticated) for too long.
    IdleTimeout,
    /// The relay is shutting down; reconnect (to any relay of the service).
    Draining,
    /// Another connection authenticated with the same key on this relay.
    Replaced,
    /// An unexpected server-side failure.
    Internal,
    /// A code this client version does not know (forward compatibility).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// All codes the server emits, for documentation and metric pre-registration.
    pub const ALL: [ErrorCode; 22] = [
        ErrorCode::BadFrame,
        ErrorCode::UnknownType,
        ErrorCode::NotAuthenticated,
        ErrorCode::AlreadyAuthenticated,
        ErrorCode::AuthFailed,
        ErrorCode::ChallengeExpired,
        ErrorCode::FrameTooLarge,
        ErrorCode::BinaryFrame,
        ErrorCode::InvalidUtf8,
        ErrorCode::RateLimited,
        ErrorCode::InvalidEnvelope,
        ErrorCode::SenderMismatch,
        ErrorCode::NotFound,
        ErrorCode::NotMember,
        ErrorCode::InvalidProfile,
        ErrorCode::StorageUnavailable,
        ErrorCode::Overloaded,
        ErrorCode::SlowConsumer,
        ErrorCode::IdleTimeout,
        ErrorCode::Draining,
        ErrorCode::Replaced,
        ErrorCode::Internal,
    ];

    /// The stable wire string (also the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::ChallengeExpired => "challenge_expired",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::BinaryFrame => "binary_frame",
            ErrorCode::InvalidUtf8 => "invalid_utf8",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::InvalidEnvelope => "invalid_envelope",
            ErrorCode::SenderMismatch => "sender_mismatch",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NotMember => "not_member",
            ErrorCode::InvalidProfile => "invalid_profile",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::Draining => "draining",
            ErrorCode::Replaced => "replaced",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// Whether a request refused with this code may succeed if sent again unchanged
    /// after a backoff (the relay was busy, not the request wrong).
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::Overloaded | ErrorCode::StorageUnavailable)
    }

    /// The WebSocket close code used when this error ends the connection.
    /// 1xxx codes are the RFC 6455 ones; 4xxx are application codes of dchat.
    pub fn close_code(self) -> u16 {
        match self {
            ErrorCode::FrameTooLarge => 1009,
            ErrorCode::InvalidUtf8 => 1007,
            ErrorCode::BinaryFrame => 1003,
            ErrorCode::Draining => 1012,
            ErrorCode::Internal | ErrorCode::StorageUnavailable => 1011,
            ErrorCode::AuthFailed => 4001,
            ErrorCode::ChallengeExpired => 4002,
            ErrorCode::NotAuthenticated => 4003,
            ErrorCode::IdleTimeout => 4004,
            ErrorCode::Replaced => 4005,
            ErrorCode::RateLimited => 4008,
            ErrorCode::SlowConsumer => 4009,
            _ => 4000,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_strings_match_serde() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, code);
        }
        let unknown: ErrorCode = serde_json::from_str("\"from_the_future\"").unwrap();
        assert_eq!(unknown, ErrorCode::Unknown);
    }

    #[test]
    fn only_busy_relays_ask_for_a_retry() {
        let retryable: Vec<_> = ErrorCode::ALL
            .into_iter()
            .filter(|c| c.is_retryable())
            .collect();
        assert_eq!(
            retryable,
            [ErrorCode::StorageUnavailable, ErrorCode::Overloaded]
        );
    }

    #[test]
    fn draining_closes_with_service_restart() {
        assert_eq!(ErrorCode::Draining.close_code(), 1012);
        assert_eq!(ErrorCode::FrameTooLarge.close_code(), 1009);
    }
}
