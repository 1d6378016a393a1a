//! dchat relay: the WebSocket chat relay data plane deployed by dchat-operator.
#![forbid(unsafe_code)]
pub mod store;
