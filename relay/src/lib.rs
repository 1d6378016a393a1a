//! dchat relay: the WebSocket chat relay data plane deployed by dchat-operator.
//!
//! Layout (after mini-redis):
//! - [`protocol`]: wire frames, JSON codec, error codes, signature rules (protocol v1).
//! - [`server`]: listeners, connection handler, routing, HTTP health/ready, admin API.
//! - [`store`]: the storage trait with the embedded and PostgreSQL backends.
//! - [`cluster`]: peer links that make several relays act as one service.
//! - [`client`]: the Rust client library used by the `dchat` CLI, tests and benchmarks.
//! - [`backup`]: backups to S3 and RDS snapshots, and restores (`dchat backup`).
//! - [`handover`]: moves a relay's stored messages to another relay (blue-green slot handover).
//! - [`config`], [`metrics`], [`shutdown`].
#![forbid(unsafe_code)]

pub mod backup;
pub mod client;
pub mod cluster;
pub mod config;
pub mod handover;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod shutdown;
pub mod store;
