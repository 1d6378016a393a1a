//! dchat relay: the WebSocket chat relay data plane deployed by dchat-operator.
//!
//! Layout (after mini-redis), each module with its files:
//! - [`protocol`]: wire protocol v1: frames and their JSON codec (`frame.rs`), keys and
//!   blobs (`types.rs`), error and close codes (`error.rs`), signature rules.
//! - [`server`]: the relay process: [`server::Relay`], [`server::Shared`] and the drain
//!   (`mod.rs`); accepting connections, the handshake deadline and the bound on
//!   connections that are not WebSockets (`accept.rs`, `handshake.rs`); the HTTP
//!   routes and admin API (`http.rs`, `admin.rs`); per client
//!   `connection.rs` (socket, rate limit, handshake, close), `session.rs` (event loop,
//!   request dispatch), `delivery.rs` (in-flight window, live pushes, stored-message
//!   pump, acks), `send.rs` (the `send` request), `requests.rs` (join/leave, profiles);
//!   `fan_out.rs` (channel fan-out, stored copies, wake-ups), `router.rs` (live
//!   sessions and their queues, recent ids), `overload.rs`, `limits.rs`.
//! - [`store`]: the [`store::Store`] trait (`mod.rs`); the embedded store (`embedded/`:
//!   the store in `mod.rs`, group commit in `writer.rs`, write operations in `batch.rs`,
//!   keyspaces in `tables.rs`, its snapshots in `snapshot.rs`); byte encodings
//!   (`codec.rs`), the snapshot stream format (`snapshot.rs`), PostgreSQL
//!   (`postgres.rs`), [`store::StoreError`] (`error.rs`).
//! - [`cluster`]: peer links that make several relays act as one service. The server
//!   depends on it, not the reverse: it wakes sessions through
//!   [`cluster::LocalSessions`].
//! - [`client`]: the Rust client library used by the `dchat` CLI, tests and benchmarks.
//! - [`backup`]: backups to S3 and RDS snapshots, and restores (`dchat backup`).
//! - [`handover`]: moves a relay's stored messages to another relay (blue-green slot handover).
//! - [`config`], [`metrics`], [`shutdown`], [`fd_limit`] (the open-file limit).
#![forbid(unsafe_code)]

pub mod backup;
pub mod client;
pub mod cluster;
pub mod config;
pub mod fd_limit;
pub mod handover;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod shutdown;
pub mod store;
