//! Load generator for the dchat relay benchmarks of issue 3 (see `docs/performance.md`).
//!
//! - [`driver`]: open-loop Poisson dispatcher, latency recorder (HDR histogram), step results.
//! - [`systems`]: one load client per system under test (relay, bare router, NATS, Redis).
//! - [`router`]: the bare tokio WebSocket key→sender router, the on-box limit.
//! - [`procs`]: server processes pinned with `taskset`, CPU and memory sampling.
//! - [`s3`]: S3 durable offline: pipelined durable sends to offline recipients, drain,
//!   optional kill -9 of the server with a check that no acknowledged message is lost.
//! - [`backup`]: `dchat backup create` and `restore` of a filled relay through moto:
//!   wall time, peak RSS and CPU of the tool, the relay and moto.
//! - [`external`]: a short load test of a relay running elsewhere (staging), judged
//!   against p99 latency and error-rate thresholds.
//! - [`flood`]: S5's sockets that never complete a handshake, the `/health` prober.
//! - [`soak`]: the relay for half an hour at half its S1 capacity with reconnecting and
//!   offline clients: lost and duplicated messages, RSS and file descriptors over time.
#![forbid(unsafe_code)]

pub mod backup;
pub mod driver;
pub mod external;
pub mod flood;
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
