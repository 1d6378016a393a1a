//! The one error type of the storage layer.

use std::path::PathBuf;

/// Everything a store operation can fail with. Each variant names the operation or
/// object that failed; [`StoreError::metric_label`] gives a stable, low-cardinality label.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database could not be created or opened.
    #[error("opening embedded store {path}: {source}")]
    Open {
        /// The database directory.
        path: PathBuf,
        /// Why the engine refused it (I/O, corruption, version, locked by another process).
        #[source]
        source: fjall::Error,
    },
    /// The data directory was written by a pre-release build of the relay (it holds that
    /// build's database file). 0.1.0 is the first release; it reads no earlier layout.
    #[error(
        "data directory {dir} was written by a pre-release build of dchat-relay ({file}) \
         and is not supported: start the relay on an empty data directory"
    )]
    PreReleaseData {
        /// The data directory.
        dir: PathBuf,
        /// The file that gave it away.
        file: &'static str,
    },
    /// A filesystem operation outside the engine failed (e.g. creating the data directory).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An embedded-store operation failed.
    #[error("embedded store {op}: {source}")]
    Embedded {
        /// The operation, e.g. "write: commit".
        op: &'static str,
        /// The engine error.
        #[source]
        source: fjall::Error,
    },
    /// A stored record could not be decoded: the file is corrupt or was written by an
    /// incompatible version.
    #[error("corrupt record in {table}: {reason}")]
    Corrupt {
        /// The table the record was read from.
        table: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// A PostgreSQL statement failed.
    #[error("postgres {op}: {source}")]
    Postgres {
        /// The operation and table, e.g. "put: insert into messages".
        op: &'static str,
        /// The driver error (includes the server's SQLSTATE and message).
        #[source]
        source: tokio_postgres::Error,
    },
    /// No PostgreSQL connection could be obtained from the pool.
    #[error("postgres connection pool ({op}): {source}")]
    Pool {
        /// The operation that needed the connection.
        op: &'static str,
        /// The pool error (connect failure, timeout, closed pool).
        #[source]
        source: deadpool_postgres::PoolError,
    },
    /// Applying an embedded schema migration failed.
    #[error("postgres migration {version} ({name}): {source}")]
    Migration {
        /// Migration number.
        version: i32,
        /// Migration name.
        name: &'static str,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The database schema is newer than this binary understands.
    #[error("postgres schema version {found} is newer than the {supported} this relay supports")]
    SchemaTooNew {
        /// Highest migration recorded in the database.
        found: i32,
        /// Highest migration embedded in this binary.
        supported: i32,
    },
    /// A configuration value is unusable.
    #[error("store configuration {field}: {reason}")]
    Config {
        /// The setting, e.g. "DB_PORT" / "max_connections".
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// An argument failed validation before anything was written.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// `restore` was called on a store that already holds data.
    #[error("restore refused: the store is not empty ({what})")]
    NotEmpty {
        /// What was found, e.g. "3 messages".
        what: String,
    },
    /// A snapshot stream is malformed, truncated or of an unknown version.
    #[error("invalid snapshot: {reason}")]
    SnapshotInvalid {
        /// What was wrong (and where in the stream).
        reason: String,
    },
    /// A snapshot's SHA-256 trailer does not match its content.
    #[error("snapshot checksum mismatch: trailer says {expected}, content hashes to {actual}")]
    SnapshotChecksum {
        /// Hex digest recorded in the trailer.
        expected: String,
        /// Hex digest of the bytes actually read.
        actual: String,
    },
    /// Reading or writing the snapshot stream failed.
    #[error("snapshot {op}: {source}")]
    SnapshotIo {
        /// "read" or "write".
        op: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The embedded store's writer thread is gone (the store is shutting down or it
    /// panicked); no write was acknowledged.
    #[error("embedded store writer is not running ({op})")]
    WriterClosed {
        /// The operation that could not be queued or answered.
        op: &'static str,
    },
    /// A write was sent to PostgreSQL, the connection failed before its answer arrived,
    /// and asking again failed too: the write may or may not have been committed.
    #[error(
        "postgres {op}: outcome unknown, the connection failed after the write was sent: {reason}"
    )]
    OutcomeUnknown {
        /// The operation, e.g. "accept: insert into sent_ids".
        op: &'static str,
        /// The failures, first the one that left the outcome open.
        reason: String,
    },
    /// The store does not offer this operation (e.g. `accept` on a store that only one
    /// relay uses).
    #[error("store operation {op} is not supported by this backend")]
    Unsupported {
        /// The operation.
        op: &'static str,
    },
    /// A blocking worker task failed to complete.
    #[error("store task {op} failed: {reason}")]
    Task {
        /// The operation.
        op: &'static str,
        /// The join error.
        reason: String,
    },
}

impl StoreError {
    /// A stable label for metrics (`error` label of the storage counters).
    pub fn metric_label(&self) -> &'static str {
        match self {
            StoreError::Open { .. } => "open",
            StoreError::Io { .. } => "io",
            StoreError::PreReleaseData { .. } => "pre_release_data",
            StoreError::Embedded { .. } => "embedded",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::Postgres { .. } => "postgres",
            StoreError::Pool { .. } => "pool",
            StoreError::Migration { .. } => "migration",
            StoreError::SchemaTooNew { .. } => "schema_too_new",
            StoreError::Config { .. } => "config",
            StoreError::InvalidInput { .. } => "invalid_input",
            StoreError::NotEmpty { .. } => "not_empty",
            StoreError::SnapshotInvalid { .. } => "snapshot_invalid",
            StoreError::SnapshotChecksum { .. } => "snapshot_checksum",
            StoreError::SnapshotIo { .. } => "snapshot_io",
            StoreError::WriterClosed { .. } => "writer_closed",
            StoreError::Task { .. } => "task",
            StoreError::OutcomeUnknown { .. } => "outcome_unknown",
            StoreError::Unsupported { .. } => "unsupported",
        }
    }

    /// Whether the failed write may have been committed all the same: its statement
    /// reached PostgreSQL and the connection failed before the answer came back. A
    /// statement the server refused (an error with a SQLSTATE) was rolled back, and one
    /// that never got a connection was not sent: for those, and for every other error,
    /// nothing was written.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            StoreError::Postgres { source, .. } => source.as_db_error().is_none(),
            StoreError::OutcomeUnknown { .. } => true,
            _ => false,
        }
    }
}
