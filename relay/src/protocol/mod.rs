//! Wire protocol v1: frame types, their JSON codec, error codes and signature rules.
//! `docs/protocol.md` is the normative description; this module implements it.

pub mod error;
pub mod frame;
mod scan;
pub mod types;

pub use error::ErrorCode;
pub use frame::{
    auth_message, decode_client_frame, decode_request, decode_server_frame, encode_deliver,
    encode_live_deliver, profile_message, verify_signature, AckRef, Base64Payload, ClientFrame,
    DecodeError, Envelope, EnvelopeError, EnvelopeOf, FrameHint, Kind, Limits, MediaRef,
    ProfileDoc, RelayEnvelope, Request, SendStatus, ServerFrame, FEATURE_QUIET_ACK, MAX_ACK_BATCH,
    PROTOCOL_VERSION,
};
pub use types::{Base64Bytes, Base64Text, KeyHex, SigHex};
