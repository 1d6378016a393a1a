//! Load generator for the dchat relay benchmarks of issue 3 (see `docs/performance.md`).
//!
//! - [`driver`]: open-loop Poisson dispatcher, latency recorder (HDR histogram), step results.
//! - [`systems`]: one load client per system under test (relay, bare router, NATS, Redis).
//! - [`router`]: the bare tokio WebSocket key→sender router, the on-box limit.
//! - [`procs`]: server processes pinned with `taskset`, CPU and memory sampling.
//! - [`s3`]: S3 durable offline: pipelined durable sends to offline recipients, drain,
//!   optional kill -9 of the server with a check that no acknowledged message is lost.
//! - [`soak`]: the relay for half an hour at half its S1 capacity with reconnecting and
//!   offline clients: lost and duplicated messages, RSS and file descriptors over time.
#![forbid(unsafe_code)]

pub mod driver;
pub mod procs;
pub mod router;
pub mod s3;
pub mod soak;
pub mod systems;

/// Errors of the load generator.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A load client could not connect or subscribe.
    #[error("{system}: connecting client {index}: {reason}")]
    Connect {
        /// System under test.
        system: &'static str,
        /// Client index.
        index: usize,
        /// Cause.
        reason: String,
    },
    /// Starting or talking to a server process failed.
    #[error("server {what}: {reason}")]
    Server {
        /// Which server.
        what: String,
        /// Cause.
        reason: String,
    },
    /// A benchmark phase failed or did not finish in time.
    #[error("{what}: {reason}")]
    Run {
        /// What was running.
        what: String,
        /// Cause.
        reason: String,
    },
    /// Local I/O (temp dirs, /proc).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}
