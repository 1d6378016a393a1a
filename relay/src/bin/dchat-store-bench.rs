//! Store micro-benchmark: durable put throughput with N concurrent writers (each put
//! acknowledged only after its commit is durable) and drain throughput (pending + ack),
//! for the embedded and PostgreSQL backends. Prints tables; asserts nothing.
//!
//! ```text
//! dchat-store-bench [--backend embedded|postgres|both] [--writers 1,16,64,256]
//!                   [--messages 20000] [--payload 256] [--recipients 10000]
//!                   [--drain-recipients 1000] [--drain-per-recipient 100]
//!                   [--drain-tasks 16] [--pg-connections 32] [--dir PATH]
//! ```
//!
//! PostgreSQL settings come from `DCHAT_TEST_DATABASE_URL` (as exported by
//! `scripts/with-postgres.sh`) or `DB_HOST`/`DB_PORT`/`DB_NAME`/`DB_USER`/`DB_PASSWORD`.
//! The benchmark creates a scratch database `dchat_bench_<pid>` next to the configured
//! one (so the role needs CREATEDB) and drops it afterwards. The embedded store is
//! created in a scratch directory under `--dir` (default: the current directory, so
//! fsync hits the real disk rather than a tmpfs).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dchat_relay::store::{
    AckKey, EmbeddedStore, PostgresConfig, PostgresStore, PublicKey, PutOutcome, Store, StoreError,
    StoredMessage,
};

/// Benchmark parameters.
#[derive(Clone, Debug)]
struct Args {
    backends: Vec<Backend>,
    writers: Vec<usize>,
    messages: usize,
    payload: usize,
    recipients: usize,
    drain_recipients: usize,
    drain_per_recipient: usize,
    drain_tasks: usize,
    /// Whether the drain's acks quote what `pending` returned (as the relay's do for
    /// messages it delivered from storage) or name (sender, id) only.
    quoted_acks: bool,
    pg_connections: usize,
    dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Embedded,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Postgres => "postgres",
        }
    }
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("argument {flag}: {reason}")]
    Arg { flag: String, reason: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("postgres admin connection: {0}")]
    Admin(#[from] tokio_postgres::Error),
    #[error(
        "PostgreSQL not configured: set DCHAT_TEST_DATABASE_URL or DB_HOST/DB_PORT/DB_NAME/DB_USER"
    )]
    NoPostgres,
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("benchmark task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("unexpected result: {0}")]
    Unexpected(String),
}

fn parse_args() -> Result<Args, BenchError> {
    let mut a = Args {
        backends: vec![Backend::Embedded, Backend::Postgres],
        writers: vec![1, 16, 64, 256],
        messages: 20_000,
        payload: 256,
        recipients: 10_000,
        drain_recipients: 1_000,
        drain_per_recipient: 100,
        drain_tasks: 16,
        quoted_acks: true,
        pg_connections: 32,
        dir: PathBuf::from("."),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{}", USAGE);
            std::process::exit(0);
        }
        let value = it.next().ok_or_else(|| BenchError::Arg {
            flag: flag.clone(),
            reason: "missing value".into(),
        })?;
        let num = |v: &str| -> Result<usize, BenchError> {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| BenchError::Arg {
                    flag: flag.clone(),
                    reason: format!("{v:?} is not a positive integer"),
                })
        };
        match flag.as_str() {
            "--backend" => {
                a.backends = match value.as_str() {
                    "embedded" => vec![Backend::Embedded],
                    "postgres" => vec![Backend::Postgres],
                    "both" => vec![Backend::Embedded, Backend::Postgres],
                    other => {
                        return Err(BenchError::Arg {
                            flag,
                            reason: format!("{other:?}: expected embedded, postgres or both"),
                        })
                    }
                }
            }
            "--writers" => {
                a.writers = value.split(',').map(num).collect::<Result<_, _>>()?;
            }
            "--messages" => a.messages = num(&value)?,
            "--payload" => a.payload = num(&value)?,
            "--recipients" => a.recipients = num(&value)?,
            "--drain-recipients" => a.drain_recipients = num(&value)?,
            "--drain-per-recipient" => a.drain_per_recipient = num(&value)?,
            "--drain-tasks" => a.drain_tasks = num(&value)?,
            "--drain-acks" => {
                a.quoted_acks = match value.as_str() {
                    "quoted" => true,
                    "by-id" => false,
                    other => {
                        return Err(BenchError::Arg {
                            flag,
                            reason: format!("{other:?}: expected quoted or by-id"),
                        })
                    }
                }
            }
            "--pg-connections" => a.pg_connections = num(&value)?,
            "--dir" => a.dir = PathBuf::from(value),
            _ => {
                return Err(BenchError::Arg {
                    flag,
                    reason: format!("unknown flag\n{USAGE}"),
                })
            }
        }
    }
    Ok(a)
}

const USAGE: &str = "usage: dchat-store-bench [--backend embedded|postgres|both] \
[--writers 1,16,64,256] [--messages N] [--payload BYTES] [--recipients N] \
[--drain-recipients N] [--drain-per-recipient N] [--drain-tasks N] [--drain-acks quoted|by-id] \
[--pg-connections N] [--dir PATH]";

/// PostgreSQL settings from the environment, if any.
fn pg_from_env(max_connections: usize) -> Option<PostgresConfig> {
    if let Ok(url) = std::env::var("DCHAT_TEST_DATABASE_URL") {
        let cfg: tokio_postgres::Config = url.parse().ok()?;
        let host = match cfg.get_hosts().first()? {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(_) => return None,
        };
        return Some(PostgresConfig {
            host,
            port: cfg.get_ports().first().copied().unwrap_or(5432),
            dbname: cfg.get_dbname().unwrap_or("postgres").to_string(),
            user: cfg.get_user().unwrap_or("postgres").to_string(),
            password: cfg
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default(),
            max_connections,
        });
    }
    let host = std::env::var("DB_HOST").ok()?;
    Some(PostgresConfig {
        host,
        port: std::env::var("DB_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(5432),
        dbname: std::env::var("DB_NAME").unwrap_or_else(|_| "dchat".into()),
        user: std::env::var("DB_USER").unwrap_or_else(|_| "dchat".into()),
        password: std::env::var("DB_PASSWORD").unwrap_or_default(),
        max_connections,
    })
}

fn conn_str(c: &PostgresConfig, dbname: &str) -> String {
    let mut s = format!(
        "host={} port={} user={} dbname={}",
        c.host, c.port, c.user, dbname
    );
    if !c.password.is_empty() {
        s.push_str(&format!(" password={}", c.password));
    }
    s
}

async fn admin(c: &PostgresConfig) -> Result<tokio_postgres::Client, BenchError> {
    let (client, conn) =
        tokio_postgres::connect(&conn_str(c, &c.dbname), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A fresh, empty store of `backend` and what to clean up afterwards.
enum Scratch {
    Embedded(PathBuf),
    Postgres(PostgresConfig, String),
}

impl Scratch {
    async fn open(&self) -> Result<Arc<dyn Store>, BenchError> {
        Ok(match self {
            Scratch::Embedded(dir) => Arc::new(EmbeddedStore::open(dir)?),
            Scratch::Postgres(base, db) => Arc::new(
                PostgresStore::connect(&PostgresConfig {
                    dbname: db.clone(),
                    ..base.clone()
                })
                .await?,
            ),
        })
    }

    async fn cleanup(self) -> Result<(), BenchError> {
        match self {
            Scratch::Embedded(dir) => {
                std::fs::remove_dir_all(&dir).map_err(|source| BenchError::Io {
                    op: "removing",
                    path: dir,
                    source,
                })
            }
            Scratch::Postgres(base, db) => {
                admin(&base)
                    .await?
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                    .await?;
                Ok(())
            }
        }
    }
}

async fn scratch(backend: Backend, args: &Args, n: usize) -> Result<Scratch, BenchError> {
    let name = format!("dchat_bench_{}_{n}", std::process::id());
    match backend {
        Backend::Embedded => {
            let dir = args.dir.join(name);
            let _ = std::fs::remove_dir_all(&dir);
            Ok(Scratch::Embedded(dir))
        }
        Backend::Postgres => {
            let base = pg_from_env(args.pg_connections).ok_or(BenchError::NoPostgres)?;
            admin(&base)
                .await?
                .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .await?;
            Ok(Scratch::Postgres(base, name))
        }
    }
}

/// Deterministic pseudo-random numbers (xorshift64*); no need for a rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn key(n: u64) -> PublicKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&n.to_be_bytes());
    k[31] = 0xD;
    k
}

fn message(recipient: u64, sender: u64, id: String, payload: usize) -> StoredMessage {
    StoredMessage {
        recipient: key(recipient),
        sender: key(1_000_000 + sender),
        id,
        channel: None,
        timestamp_ms: 1_700_000_000_000,
        expires_at_ms: i64::MAX,
        kind: "text".into(),
        envelope: vec![0x5A; payload],
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One put run: `writers` tasks share `messages` puts; returns (msgs/s, p50, p99).
async fn put_run(
    store: Arc<dyn Store>,
    args: &Args,
    writers: usize,
) -> Result<(f64, Duration, Duration), BenchError> {
    let per_writer = args.messages.div_ceil(writers);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let store = store.clone();
        let (payload, recipients) = (args.payload, args.recipients as u64);
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1));
            let mut lat = Vec::with_capacity(per_writer);
            for i in 0..per_writer {
                let m = message(
                    rng.next() % recipients,
                    w as u64,
                    format!("w{w}-{i}"),
                    payload,
                );
                let t = Instant::now();
                let out = store.put(m).await?;
                lat.push(t.elapsed());
                if out == PutOutcome::Duplicate {
                    return Err(BenchError::Unexpected("duplicate on a fresh id".into()));
                }
            }
            Ok::<_, BenchError>(lat)
        }));
    }
    let mut lat = Vec::with_capacity(per_writer * writers);
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed();
    lat.sort_unstable();
    Ok((
        lat.len() as f64 / elapsed.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    ))
}

/// Preloads `drain_recipients × drain_per_recipient` messages, then drains them with
/// `drain_tasks` tasks (pending + ack per recipient). Returns (messages drained, msgs/s).
async fn drain_run(store: Arc<dyn Store>, args: &Args) -> Result<(u64, f64), BenchError> {
    for r in 0..args.drain_recipients as u64 {
        let batch = (0..args.drain_per_recipient)
            .map(|i| message(r, i as u64 % 100, format!("d{r}-{i}"), args.payload))
            .collect();
        store.put_many(batch).await?;
    }
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.drain_tasks {
        let (store, next) = (store.clone(), next.clone());
        let (recipients, per) = (args.drain_recipients as u64, args.drain_per_recipient);
        let quoted = args.quoted_acks;
        tasks.push(tokio::spawn(async move {
            let mut drained = 0u64;
            loop {
                let r = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if r >= recipients {
                    return Ok::<_, BenchError>(drained);
                }
                let page = store.pending(&key(r), 0, per, 0).await?;
                let keys: Vec<AckKey> = page
                    .iter()
                    .map(|p| AckKey {
                        sender: p.message.sender,
                        id: p.message.id.clone(),
                        read_as: quoted.then(|| p.read_as()),
                    })
                    .collect();
                drained += store.ack(&key(r), keys).await?;
            }
        }));
    }
    let mut drained = 0;
    for t in tasks {
        drained += t.await??;
    }
    let elapsed = start.elapsed();
    let expected = (args.drain_recipients * args.drain_per_recipient) as u64;
    if drained != expected {
        return Err(BenchError::Unexpected(format!(
            "drained {drained} of {expected} messages"
        )));
    }
    Ok((drained, drained as f64 / elapsed.as_secs_f64()))
}

async fn run(args: Args) -> Result<(), BenchError> {
    println!(
        "dchat-store-bench: {} puts per run, {} B envelopes, {} recipients; drain {} x {} with {} tasks",
        args.messages,
        args.payload,
        args.recipients,
        args.drain_recipients,
        args.drain_per_recipient,
        args.drain_tasks
    );
    let mut put_rows = Vec::new();
    let mut drain_rows = Vec::new();
    let mut n = 0;
    for &backend in &args.backends {
        if backend == Backend::Postgres && pg_from_env(1).is_none() {
            if args.backends.len() > 1 {
                eprintln!("skipping postgres: {}", BenchError::NoPostgres);
                continue;
            }
            return Err(BenchError::NoPostgres);
        }
        for &writers in &args.writers {
            n += 1;
            let s = scratch(backend, &args, n).await?;
            let store = s.open().await?;
            let (rate, p50, p99) = put_run(store.clone(), &args, writers).await?;
            drop(store);
            s.cleanup().await?;
            eprintln!("{} writers={writers}: {rate:.0} msg/s", backend.name());
            put_rows.push((backend, writers, rate, p50, p99));
        }
        n += 1;
        let s = scratch(backend, &args, n).await?;
        let store = s.open().await?;
        let (drained, rate) = drain_run(store.clone(), &args).await?;
        drop(store);
        s.cleanup().await?;
        drain_rows.push((backend, drained, rate));
    }

    println!();
    println!("Durable put (acknowledged after commit/fsync)");
    println!(
        "| backend  | writers | acked msg/s | p50 put ms | p99 put ms |\n|----------|--------:|------------:|-----------:|-----------:|"
    );
    for (b, w, rate, p50, p99) in &put_rows {
        println!(
            "| {:<8} | {w:>7} | {rate:>11.0} | {:>10.2} | {:>10.2} |",
            b.name(),
            ms(*p50),
            ms(*p99)
        );
    }
    println!();
    println!("Drain (pending + ack per recipient)");
    println!("| backend  | messages | drained msg/s |\n|----------|---------:|--------------:|");
    for (b, drained, rate) in &drain_rows {
        println!("| {:<8} | {drained:>8} | {rate:>13.0} |", b.name());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dchat-store-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dchat-store-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
