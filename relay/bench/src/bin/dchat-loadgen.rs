//! `dchat-loadgen`: the benchmark load generator of issue 3 (S1–S4), the handshake flood
//! of issue 23 (S5), the backup benchmark and the staging load test (`external`). Prints tables.
//!
//! Run it pinned to one core and let it start the servers pinned to the other, e.g.
//! `taskset -c 1 dchat-loadgen s1 --server-cpu 0`. See `docs/performance.md`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use dchat_bench::driver::{median_range, run_step, Pattern, Recorder, Rng, Step, StepResult};
use dchat_bench::procs::{self, ServerProc, ServerProcs};
use dchat_bench::s3::PgTarget;
use dchat_bench::systems::{connect, Target};

#[derive(Parser)]
#[command(about = "dchat relay load generator (benchmarks S1, S2, S3, S4, S5)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// S1: 1:1 online messages, rate stepped to saturation, for each system.
    S1(S1Args),
    /// S2: channel fan-out on the relay.
    S2(S2Args),
    /// S3: durable offline messages (embedded, PostgreSQL, Redis), drain, kill -9 check.
    S3(S3Args),
    /// S4: idle authenticated connections on the relay: RSS per connection, connects/s.
    S4(S4Args),
    /// Backup and restore of a relay filled with stored messages, through
    /// `dchat backup create|restore` and moto: time, peak RSS and CPU of each side.
    Backup(BackupArgs),
    /// Load test of a relay running elsewhere (e.g. staging): fails when p99 latency or
    /// the error rate is above its threshold.
    External(dchat_bench::external::ExternalArgs),
    /// S5: 1:1 messages between a few clients with and without a flood of sockets that
    /// never complete a handshake (silent and dripping): latency, /health, timeouts.
    S5(S5Args),
    /// Soak (issue 23): steady load with churn for 30 minutes; lost/duplicated, RSS, fds.
    Soak(dchat_bench::soak::SoakArgs),
    /// Runs the bare WebSocket router (used by S1 as the on-box limit).
    Router {
        /// Listen address (127.0.0.1 only for benchmarks).
        #[arg(long, default_value = "127.0.0.1:7171")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// CPU the servers are pinned to (taskset); the generator should be pinned elsewhere.
    #[arg(long)]
    server_cpu: Option<usize>,
    /// Warm-up seconds per step.
    #[arg(long, default_value = "10")]
    warmup: f64,
    /// Measurement seconds per step.
    #[arg(long, default_value = "60")]
    measure: f64,
    /// Repetitions (systems alternated between repetitions).
    #[arg(long, default_value = "3")]
    repeat: usize,
    /// Payload bytes.
    #[arg(long, default_value = "256")]
    payload: usize,
    /// The relay binary (default: `dchat-relay` next to this binary).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Concurrent handshakes while connecting.
    #[arg(long, default_value = "64")]
    parallel: usize,
    /// Longest time a relay client holds an acknowledgement back so that it can travel
    /// with the client's next frame (0: acknowledge each burst of deliveries at once).
    #[arg(long, default_value = "200")]
    ack_delay_ms: u64,
}

impl Common {
    fn ack_delay(&self) -> Duration {
        Duration::from_millis(self.ack_delay_ms)
    }
}

#[derive(Args)]
struct S1Args {
    #[command(flatten)]
    common: Common,
    /// Systems: relay, bare-router, nats-tcp, nats-ws, redis-pubsub.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "relay,bare-router,nats-tcp,nats-ws,redis-pubsub"
    )]
    systems: Vec<String>,
    /// Connected clients.
    #[arg(long, default_value = "2000")]
    clients: usize,
    /// Offered rates (msgs/s), stepped in order until a step misses p99 ≤ --p99-ms.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "5000,10000,20000,40000,60000,80000,100000,130000,160000,200000"
    )]
    rates: Vec<f64>,
    /// Latency bound for "msgs/s at p99 ≤ X".
    #[arg(long, default_value = "5")]
    p99_ms: f64,
    /// Rate whose p50/p99 are reported separately.
    #[arg(long, default_value = "20000")]
    report_rate: f64,
    /// Relay processes (system `relay`): more than one form a cluster on the PostgreSQL
    /// database of `--pg-host` (peers of each other); client `i` connects to relay
    /// `i % relays`, so a message crosses relays unless both ends share one.
    #[arg(long, default_value = "1")]
    relays: usize,
    #[command(flatten)]
    pg: PgArgs,
}

/// The PostgreSQL database the relays of S1 use (cluster mode).
#[derive(Args, Clone)]
struct PgArgs {
    /// PostgreSQL host: relays use this database instead of the embedded store, and
    /// its server's CPU time counts as the server's. Its relay tables are dropped
    /// before each start: use a scratch database.
    #[arg(long = "pg-host")]
    host: Option<String>,
    /// PostgreSQL port.
    #[arg(long = "pg-port", default_value = "5432")]
    port: u16,
    /// PostgreSQL database.
    #[arg(long = "pg-db", default_value = "dchat")]
    db: String,
    /// PostgreSQL user.
    #[arg(long = "pg-user", default_value = "dchat")]
    user: String,
    /// PostgreSQL password.
    #[arg(
        long = "pg-password",
        env = "PGPASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    password: String,
}

impl PgArgs {
    fn target(&self) -> Option<PgTarget> {
        self.host.as_ref().map(|host| PgTarget {
            host: host.clone(),
            port: self.port,
            dbname: self.db.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            truncate: false,
        })
    }
}

#[derive(Args)]
struct S2Args {
    #[command(flatten)]
    common: Common,
    /// Channels.
    #[arg(long, default_value = "10")]
    channels: usize,
    /// Members per channel.
    #[arg(long, default_value = "100")]
    members: usize,
    /// Offered channel messages per second (each fans out to members − 1).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "250,500,1000,1500,2000,2500,3000,4000"
    )]
    rates: Vec<f64>,
    /// Latency bound (p99 to the last member) a step must meet to count. Steps go on
    /// past a miss until one whose deliveries do not all arrive.
    #[arg(long, default_value = "5")]
    p99_ms: f64,
}

#[derive(Args)]
struct S3Args {
    /// CPU the servers are pinned to (taskset); the generator should be pinned elsewhere.
    #[arg(long)]
    server_cpu: Option<usize>,
    /// The relay binary (default: `dchat-relay` next to this binary).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Systems: embedded, postgres (needs --pg-host), redis.
    #[arg(long, value_delimiter = ',', default_value = "embedded,redis")]
    systems: Vec<String>,
    /// Repetitions (systems alternated between repetitions).
    #[arg(long, default_value = "3")]
    repeat: usize,
    /// Offline recipients.
    #[arg(long, default_value = "10000")]
    recipients: usize,
    /// Sending clients.
    #[arg(long, default_value = "100")]
    senders: usize,
    /// Messages put in total.
    #[arg(long, default_value = "200000")]
    messages: usize,
    /// Sends in flight per sender (pipelined).
    #[arg(long, default_value = "64")]
    window: usize,
    /// Payload bytes.
    #[arg(long, default_value = "256")]
    payload: usize,
    /// Recipients that reconnect and drain (timed).
    #[arg(long, default_value = "1000")]
    drain_recipients: usize,
    /// Messages each drain recipient receives.
    #[arg(long, default_value = "100")]
    drain_per_recipient: usize,
    /// Recipients draining at the same time.
    #[arg(long, default_value = "64")]
    drain_parallel: usize,
    /// Kill the relay with SIGKILL this many seconds into the put phase, restart it on
    /// the same data, and check that no acknowledged message is lost.
    #[arg(long, conflicts_with = "kill_after_acked")]
    kill_after: Option<f64>,
    /// Like --kill-after, once this many messages were acknowledged.
    #[arg(long)]
    kill_after_acked: Option<u64>,
    /// Also drain and check every other recipient after the timed drain (always with a kill).
    #[arg(long)]
    verify_all: bool,
    /// Upper bound per phase, seconds.
    #[arg(long, default_value = "900")]
    phase_timeout: u64,
    /// Parent directory of the embedded store's data directory (a disk, not tmpfs).
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// PostgreSQL host (a server with fsync=on that you started).
    #[arg(long)]
    pg_host: Option<String>,
    /// PostgreSQL port.
    #[arg(long, default_value = "5432")]
    pg_port: u16,
    /// PostgreSQL database.
    #[arg(long, default_value = "dchat")]
    pg_db: String,
    /// PostgreSQL user.
    #[arg(long, default_value = "dchat")]
    pg_user: String,
    /// PostgreSQL password.
    #[arg(long, env = "PGPASSWORD", default_value = "", hide_env_values = true)]
    pg_password: String,
    /// `TRUNCATE messages` (psql) before each PostgreSQL run.
    #[arg(long)]
    pg_truncate: bool,
}

#[derive(Args)]
struct BackupArgs {
    /// Stored messages the source relay is filled with.
    #[arg(long, default_value = "1000000")]
    messages: usize,
    /// Offline recipients the messages are spread over (at random).
    #[arg(long, default_value = "100000")]
    recipients: usize,
    /// Sending clients of the fill.
    #[arg(long, default_value = "100")]
    senders: usize,
    /// Sends in flight per sender during the fill.
    #[arg(long, default_value = "64")]
    window: usize,
    /// Payload bytes per message (random, so incompressible).
    #[arg(long, default_value = "256")]
    payload: usize,
    /// Stores backed up and restored: embedded, postgres (needs --pg-host). Each
    /// repetition runs them in turn, in reverse order on odd repetitions.
    #[arg(long, value_delimiter = ',', default_value = "embedded")]
    stores: Vec<String>,
    /// Repetitions of create + restore (the source is filled once).
    #[arg(long, default_value = "3")]
    repeat: usize,
    /// Recipients whose restored inboxes are drained and checked against what was sent.
    #[arg(long, default_value = "1000")]
    check_recipients: usize,
    /// Parent directory of the relays' data directories (a disk, not tmpfs).
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// The relay binary (default: `dchat-relay` next to this binary).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// The `dchat` binary (default: `dchat` next to this binary).
    #[arg(long)]
    dchat_bin: Option<PathBuf>,
    /// moto's server (default: the repository's `.venv/bin/moto_server`, installed by
    /// scripts/ensure-deps.sh).
    #[arg(long)]
    moto_bin: Option<PathBuf>,
    /// CPU the relays are pinned to (taskset).
    #[arg(long)]
    server_cpu: Option<usize>,
    /// CPU `dchat` and moto are pinned to (taskset).
    #[arg(long)]
    tool_cpu: Option<usize>,
    /// Before each measured command, wait until the 1-minute load average is below
    /// this (0: do not wait); the load is reported with each row.
    #[arg(long, default_value = "1.5")]
    wait_load: f64,
    /// Longest wait for --wait-load, seconds; then it measures anyway.
    #[arg(long, default_value = "1800")]
    wait_load_max: u64,
    /// Upper bound of the fill and of the check, seconds.
    #[arg(long, default_value = "1800")]
    phase_timeout: u64,
    /// PostgreSQL of the `postgres` store: the relay tables of --pg-db are dropped and
    /// filled; restores go into the database `<pg-db>_restore`, dropped and created
    /// before each one. Use a scratch server.
    #[command(flatten)]
    pg: PgArgs,
}

#[derive(Args)]
struct S4Args {
    #[command(flatten)]
    common: Common,
    /// Idle authenticated connections.
    #[arg(long, default_value = "10000")]
    connections: usize,
}

#[derive(Args)]
struct S5Args {
    #[command(flatten)]
    common: Common,
    /// Connected clients exchanging messages.
    #[arg(long, default_value = "200")]
    clients: usize,
    /// Offered messages per second (Poisson, random sender to random other client).
    #[arg(long, default_value = "2000")]
    rate: f64,
    /// Silent sockets in the flood (connect, send nothing; reopened when closed).
    #[arg(long, default_value = "5000")]
    silent: usize,
    /// Dripping sockets in the flood (one byte of a request head a second).
    #[arg(long, default_value = "5000")]
    dripping: usize,
    /// The relay's DCHAT_HANDSHAKE_TIMEOUT.
    #[arg(long, default_value = "10s")]
    handshake_timeout: String,
    /// The relay's DCHAT_MAX_HANDSHAKES (default: room for the whole flood, so that
    /// every hostile socket holds a descriptor until its deadline).
    #[arg(long, default_value = "12000")]
    max_handshakes: usize,
    /// Interval of the /health probes on the metrics port.
    #[arg(long, default_value = "100")]
    health_every_ms: u64,
    /// Send the flood to this address instead of the measured relay (to attribute its
    /// cost: e.g. a second relay on the same core, so that only the machine is shared).
    #[arg(long)]
    flood_target: Option<std::net::SocketAddr>,
}

/// The relay's allocator (see relay/src/main.rs), so that the generator's own CPU share
/// and the bare router (served by this binary) are measured under the same allocator.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Router { listen } => {
            // The router gets the same runtime shape as the relay (multi-thread; one
            // worker when pinned to one core).
            std::thread::spawn(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(dchat_bench::router::serve(listen))?;
                Ok(())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("router thread panicked"))??;
            Ok(())
        }
        Cmd::S1(a) => s1(a).await,
        Cmd::S2(a) => s2(a).await,
        Cmd::S3(a) => s3(a).await,
        Cmd::S4(a) => s4(a).await,
        Cmd::Backup(a) => backup(a).await,
        Cmd::External(a) => Ok(dchat_bench::external::main(a).await?),
        Cmd::S5(a) => s5(a).await,
        Cmd::Soak(a) => dchat_bench::soak::main(a).await,
    }
}

fn relay_bin(c: &Common) -> anyhow::Result<PathBuf> {
    default_relay_bin(c.relay_bin.as_ref())
}

fn default_relay_bin(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().context("locating this binary")?;
    Ok(me.with_file_name("dchat-relay"))
}

/// Starts one system pinned to `cpu`; returns the process and its target.
async fn start(system: &str, c: &Common) -> anyhow::Result<(ServerProc, Target)> {
    let port = procs::free_port()?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let dir = procs::scratch_dir(system)?;
    let (proc_, target, wait) = match system {
        "relay" => {
            let envs = relay_env(port, &dir)?;
            let p = procs::spawn("relay", c.server_cpu, &relay_bin(c)?, &[], &envs, dir)?;
            (p, Target::Relay(format!("ws://{addr}/v1/ws")), addr)
        }
        "bare-router" => {
            let me = std::env::current_exe().context("locating this binary")?;
            let args = vec!["router".to_string(), "--listen".into(), addr.to_string()];
            let p = procs::spawn("bare-router", c.server_cpu, &me, &args, &[], dir)?;
            (p, Target::Router(format!("ws://{addr}/")), addr)
        }
        "nats-tcp" | "nats-ws" => {
            let wport = procs::free_port()?;
            let conf = dir.join("nats.conf");
            std::fs::write(
                &conf,
                format!(
                    "listen: 127.0.0.1:{port}\nmax_payload: 1048576\nwebsocket {{\n  host: 127.0.0.1\n  port: {wport}\n  no_tls: true\n}}\n"
                ),
            )?;
            let args = vec!["-c".to_string(), conf.display().to_string()];
            let p = procs::spawn(
                system,
                c.server_cpu,
                &PathBuf::from("nats-server"),
                &args,
                &[],
                dir,
            )?;
            if system == "nats-ws" {
                let waddr: std::net::SocketAddr = format!("127.0.0.1:{wport}").parse()?;
                procs::wait_port(system, addr, Duration::from_secs(20)).await?;
                (p, Target::Nats(format!("ws://{waddr}")), waddr)
            } else {
                (p, Target::Nats(format!("nats://{addr}")), addr)
            }
        }
        "redis-pubsub" => {
            let args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxclients",
                "20000",
                "--protected-mode",
                "yes",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let p = procs::spawn(
                system,
                c.server_cpu,
                &PathBuf::from("redis-server"),
                &args,
                &[],
                dir,
            )?;
            (p, Target::Redis(format!("redis://{addr}/")), addr)
        }
        other => anyhow::bail!(
            "unknown system {other:?} (relay, bare-router, nats-tcp, nats-ws, redis-pubsub)"
        ),
    };
    procs::wait_port(system, wait, Duration::from_secs(30)).await?;
    Ok((proc_, target))
}

/// The environment of a benchmarked relay listening on `port` with scratch dir `dir`.
fn relay_env(port: u16, dir: &std::path::Path) -> anyhow::Result<Vec<(String, String)>> {
    let mport = procs::free_port()?;
    Ok([
        ("DCHAT_LISTEN", format!("127.0.0.1:{port}")),
        ("DCHAT_METRICS_LISTEN", format!("127.0.0.1:{mport}")),
        ("DCHAT_DATA_DIR", dir.join("data").display().to_string()),
        // Load clients send far above a phone's rate; the limiter is not under test.
        ("DCHAT_RATE_PER_SEC", "1000000".into()),
        ("DCHAT_RATE_BURST", "1000000".into()),
        ("RUST_LOG", "warn".into()),
        // Nothing inherited may add peers or select a database the run did not ask for.
        ("DCHAT_PEERS", String::new()),
        ("DB_HOST", String::new()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect())
}

/// Starts `n` relays on the PostgreSQL database `pg` (its relay tables dropped first),
/// each a peer of the others, pinned like every server.
async fn start_relay_cluster(
    c: &Common,
    n: usize,
    pg: &PgTarget,
) -> anyhow::Result<(Vec<ServerProc>, Target)> {
    dchat_bench::s3::reset_pg(pg)?;
    let ports: Vec<u16> = (0..n.max(1))
        .map(|_| procs::free_port())
        .collect::<Result<_, _>>()?;
    let mut procs_ = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let dir = procs::scratch_dir(&format!("relay{i}"))?;
        let mut envs = relay_env(*port, &dir)?;
        let peers: Vec<String> = ports
            .iter()
            .filter(|p| *p != port)
            .map(|p| format!("ws://127.0.0.1:{p}"))
            .collect();
        envs.extend([
            ("DCHAT_PEERS".to_string(), peers.join(",")),
            ("DB_HOST".to_string(), pg.host.clone()),
            ("DB_PORT".to_string(), pg.port.to_string()),
            ("DB_NAME".to_string(), pg.dbname.clone()),
            ("DB_USER".to_string(), pg.user.clone()),
            ("DB_PASSWORD".to_string(), pg.password.clone()),
        ]);
        procs_.push(procs::spawn(
            "relay",
            c.server_cpu,
            &relay_bin(c)?,
            &[],
            &envs,
            dir,
        )?);
    }
    let mut urls = Vec::new();
    for port in &ports {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        procs::wait_port("relay", addr, Duration::from_secs(30)).await?;
        urls.push(format!("ws://{addr}/v1/ws"));
    }
    Ok((procs_, Target::RelayCluster(urls)))
}

fn step(c: &Common, rate: f64) -> Step {
    Step {
        rate,
        warmup: Duration::from_secs_f64(c.warmup),
        measure: Duration::from_secs_f64(c.measure),
        payload: c.payload,
        drain: Duration::from_secs(3),
    }
}

fn fmt_cpu(r: &StepResult) -> String {
    match r.server_cpu {
        Some(s) if r.delivered_per_sec > 0.0 => format!(
            "{:.0}% / {:.0}% / {:.1}",
            s * 100.0,
            r.gen_cpu * 100.0,
            s * 1e6 / r.delivered_per_sec
        ),
        _ => format!("- / {:.0}% / -", r.gen_cpu * 100.0),
    }
}

async fn s1(a: S1Args) -> anyhow::Result<()> {
    let c = &a.common;
    // results[system][rep] = steps
    let mut all: Vec<(String, Vec<Vec<StepResult>>)> =
        a.systems.iter().map(|s| (s.clone(), Vec::new())).collect();
    let mut seq = 0u64;
    let mut rng = Rng::new(0x5eed);
    let pg = a.pg.target();
    if a.relays > 1 && pg.is_none() {
        anyhow::bail!("--relays above 1 needs --pg-host (a cluster shares one database)");
    }
    println!(
        "# S1 1:1 online: {} clients, {} B payload, warm-up {} s, measure {} s, {} repetitions, relay ack delay {} ms{}",
        a.clients,
        c.payload,
        c.warmup,
        c.measure,
        c.repeat,
        c.ack_delay_ms,
        match &pg {
            Some(pg) => format!(
                "; relay: {} process(es) on PostgreSQL {}:{} (server cpu includes postgres)",
                a.relays, pg.host, pg.port
            ),
            None => String::new(),
        }
    );
    println!("| system | rep | offered/s | delivered/s | p50 µs | p99 µs | p99.9 µs | max µs | dispatch late p99 µs | server cpu / gen cpu / server µs per msg | relay sent→stored | errors |");
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for rep in 0..c.repeat {
        // Alternate the order between repetitions.
        let order: Vec<usize> = if rep % 2 == 0 {
            (0..all.len()).collect()
        } else {
            (0..all.len()).rev().collect()
        };
        for si in order {
            let system = all[si].0.clone();
            let (procs_, target) = match &pg {
                Some(pg) if system == "relay" => start_relay_cluster(c, a.relays, pg).await?,
                _ => {
                    let (p, t) = start(&system, c).await?;
                    (vec![p], t)
                }
            };
            let server = ServerProcs {
                pids: procs_.iter().map(|p| p.pid).collect(),
                postgres: pg.is_some() && system == "relay",
            };
            let rec = Recorder::new();
            let t0 = Instant::now();
            let eps = connect(&target, a.clients, c.parallel, 0, c.ack_delay(), &rec).await?;
            eprintln!(
                "{system}: {} clients connected in {:.1} s",
                eps.len(),
                t0.elapsed().as_secs_f64()
            );
            let mut steps = Vec::new();
            for &rate in &a.rates {
                let stored0 = rec.stored.load(Ordering::Relaxed);
                let r = run_step(
                    &eps,
                    &rec,
                    Pattern::Direct,
                    step(c, rate),
                    &mut seq,
                    &mut rng,
                    Some(server.clone()),
                )
                .await;
                println!(
                    "| {system} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
                    rep + 1, r.offered, r.delivered_per_sec, r.p50_us, r.p99_us, r.p999_us, r.max_us, r.dispatch_late_p99_us, fmt_cpu(&r),
                    rec.stored.load(Ordering::Relaxed) - stored0,
                    rec.errors.load(Ordering::Relaxed)
                );
                let ok = r.meets(a.p99_ms);
                steps.push(r);
                if !ok && rate >= a.report_rate {
                    break;
                }
                // Let queues empty between steps.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            all[si].1.push(steps);
            drop(eps);
            drop(procs_);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    println!();
    println!("# S1 summary (median (min–max) over repetitions)");
    println!(
        "| system | max delivered/s with p99 ≤ {} ms | p50 µs at {:.0}/s | p99 µs at {:.0}/s |",
        a.p99_ms, a.report_rate, a.report_rate
    );
    println!("|---|--:|--:|--:|");
    for (system, reps) in &all {
        let best: Vec<f64> = reps
            .iter()
            .map(|steps| {
                steps
                    .iter()
                    .filter(|r| r.meets(a.p99_ms))
                    .map(|r| r.delivered_per_sec)
                    .fold(0.0, f64::max)
            })
            .collect();
        let at = |f: fn(&StepResult) -> f64| -> Vec<f64> {
            reps.iter()
                .filter_map(|steps| {
                    steps
                        .iter()
                        .find(|r| (r.offered - a.report_rate).abs() < 1.0)
                        .map(f)
                })
                .collect()
        };
        let (b, b0, b1) = median_range(&best);
        let (p50, p50a, p50b) = median_range(&at(|r| r.p50_us));
        let (p99, p99a, p99b) = median_range(&at(|r| r.p99_us));
        println!("| {system} | {b:.0} ({b0:.0}–{b1:.0}) | {p50:.0} ({p50a:.0}–{p50b:.0}) | {p99:.0} ({p99a:.0}–{p99b:.0}) |");
    }
    Ok(())
}

async fn s2(a: S2Args) -> anyhow::Result<()> {
    let c = &a.common;
    let n = a.channels * a.members;
    let mut seq = 0u64;
    let mut rng = Rng::new(0xfa40);
    println!(
        "# S2 fan-out: {} channels × {} members, {} B payload, warm-up {} s, measure {} s, relay ack delay {} ms",
        a.channels, a.members, c.payload, c.warmup, c.measure, c.ack_delay_ms
    );
    println!("| rep | channel msgs/s offered | deliveries/s | p50 µs | p99 µs | p99 to last member µs | server cpu / gen cpu / server µs per delivery | errors |");
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|");
    // Per repetition: (largest step meeting the latency bound, largest step sustained).
    let mut best = Vec::new();
    let mut sustained = Vec::new();
    for rep in 0..c.repeat {
        let (proc_, target) = start("relay", c).await?;
        let rec = Recorder::new();
        let eps = connect(&target, n, c.parallel, a.members, c.ack_delay(), &rec).await?;
        let (mut b, mut kept_up) = (0.0f64, 0.0f64);
        for &rate in &a.rates {
            let r = run_step(
                &eps,
                &rec,
                Pattern::Channel { members: a.members },
                step(c, rate),
                &mut seq,
                &mut rng,
                Some(ServerProcs::one(proc_.pid)),
            )
            .await;
            println!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
                rep + 1,
                r.offered,
                r.delivered_per_sec,
                r.p50_us,
                r.p99_us,
                r.last_p99_us,
                fmt_cpu(&r),
                rec.errors.load(Ordering::Relaxed)
            );
            // Stepping goes on past a latency miss (a stall in the window decides those
            // at low load) and stops at the first step whose deliveries did not all
            // arrive: the relay no longer keeps up.
            if r.received < r.expected {
                break;
            }
            kept_up = kept_up.max(r.delivered_per_sec);
            if r.last_p99_us <= a.p99_ms * 1000.0 {
                b = b.max(r.delivered_per_sec);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        best.push(b);
        sustained.push(kept_up);
        drop(eps);
        drop(proc_);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (m, lo, hi) = median_range(&best);
    let (sm, slo, shi) = median_range(&sustained);
    println!();
    println!(
        "S2 max deliveries/s with p99 to last member ≤ {} ms: {m:.0} ({lo:.0}–{hi:.0})",
        a.p99_ms
    );
    println!("S2 max deliveries/s sustained (every delivery arrived): {sm:.0} ({slo:.0}–{shi:.0})");
    Ok(())
}

async fn s3(a: S3Args) -> anyhow::Result<()> {
    use dchat_bench::s3::{self, Backend, KillAt, Params, PgTarget, RelayLaunch, Report};
    let kill = match (a.kill_after, a.kill_after_acked) {
        (Some(s), _) => Some(KillAt::Secs(s)),
        (None, Some(n)) => Some(KillAt::Acked(n)),
        (None, None) => None,
    };
    let p = Params {
        recipients: a.recipients,
        senders: a.senders,
        messages: a.messages,
        window: a.window,
        payload: a.payload,
        drain_recipients: a.drain_recipients,
        drain_per_recipient: a.drain_per_recipient,
        drain_parallel: a.drain_parallel,
        kill,
        verify_all: a.verify_all,
        phase_timeout: Duration::from_secs(a.phase_timeout),
        seed: 0x53,
    };
    p.validate()?;
    let launch = RelayLaunch {
        program: default_relay_bin(a.relay_bin.as_ref())?,
        args: Vec::new(),
        env: Vec::new(),
        cpu: a.server_cpu,
    };
    let root = match &a.data_root {
        Some(r) => r.clone(),
        None => std::env::temp_dir(),
    };
    for s in &a.systems {
        match s.as_str() {
            "embedded" | "redis" => {}
            "postgres" if a.pg_host.is_some() => {}
            "postgres" => anyhow::bail!("system postgres needs --pg-host"),
            other => anyhow::bail!("unknown system {other:?} (embedded, postgres, redis)"),
        }
    }
    println!(
        "# S3 durable offline: {} recipients, {} senders × window {}, {} messages of {} B; drain {} × {} ({} at a time){}",
        p.recipients,
        p.senders,
        p.window,
        p.messages,
        p.payload,
        p.drain_recipients,
        p.drain_per_recipient,
        p.drain_parallel,
        match kill {
            Some(KillAt::Secs(s)) => format!("; relay kill -9 after {s} s"),
            Some(KillAt::Acked(n)) => format!("; relay kill -9 after {n} acked"),
            None => String::new(),
        }
    );
    println!(
        "embedded data under {} on {}",
        root.display(),
        s3::fs_type(&root)
    );
    println!("| system | rep | acked | put s | acked msgs/s | ack p50 ms | ack p99 ms | server cpu | server µs/msg | gen cpu | drained | drain s | drained msgs/s | drain server cpu / gen cpu | kill: acked before / restart s / reconnects | checked recipients / acked msgs | lost | dup | unexpected | send errors |");
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let mut all: Vec<(String, Vec<Report>)> =
        a.systems.iter().map(|s| (s.clone(), Vec::new())).collect();
    let mut inconsistent = 0u64;
    for rep in 0..a.repeat {
        let order: Vec<usize> = if rep % 2 == 0 {
            (0..all.len()).collect()
        } else {
            (0..all.len()).rev().collect()
        };
        for si in order {
            let system = all[si].0.clone();
            let r = match system.as_str() {
                "redis" => s3::run_redis(a.server_cpu, &p).await?,
                "postgres" => {
                    let pg = PgTarget {
                        host: a.pg_host.clone().unwrap_or_default(),
                        port: a.pg_port,
                        dbname: a.pg_db.clone(),
                        user: a.pg_user.clone(),
                        password: a.pg_password.clone(),
                        truncate: a.pg_truncate,
                    };
                    s3::run_relay(&launch, &Backend::Postgres(pg), &p).await?
                }
                _ => {
                    let b = Backend::Embedded { root: root.clone() };
                    s3::run_relay(&launch, &b, &p).await?
                }
            };
            let dcpu = r
                .drain_server_cpu
                .map(|c| format!("{:.0}%", c * 100.0))
                .unwrap_or_else(|| "-".into());
            let kill_col = match (r.acked_at_kill, r.restart_secs) {
                (Some(k), Some(s)) => format!("{k} / {s:.2} / {}", r.reconnects),
                _ => "-".into(),
            };
            let (cpu, per) = match r.server_cpu {
                Some(c) if r.acked_per_sec > 0.0 => (
                    format!("{:.0}%", c * 100.0),
                    format!("{:.1}", c * 1e6 / r.acked_per_sec),
                ),
                _ => ("-".into(), "-".into()),
            };
            println!(
                "| {} | {} | {} | {:.2} | {:.0} | {:.2} | {:.2} | {cpu} | {per} | {:.0}% | {} | {:.2} | {:.0} | {dcpu} / {:.0}% | {kill_col} | {} / {} | {} | {} | {} | {} |",
                r.system,
                rep + 1,
                r.acked,
                r.put_secs,
                r.acked_per_sec,
                r.ack_p50_us / 1000.0,
                r.ack_p99_us / 1000.0,
                r.gen_cpu * 100.0,
                r.drained,
                r.drain_secs,
                r.drained_per_sec,
                r.drain_gen_cpu * 100.0,
                r.verified_recipients,
                r.verified_acked,
                r.lost,
                r.duplicates,
                r.unexpected,
                r.errors
            );
            if !r.consistent() {
                inconsistent += 1;
            }
            all[si].1.push(r);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    println!();
    println!("# S3 summary (median (min–max) over repetitions)");
    println!("| system | acked msgs/s | ack p99 ms | drained msgs/s | lost (all runs) |");
    println!("|---|--:|--:|--:|--:|");
    for (_, reps) in &all {
        let Some(first) = reps.first() else { continue };
        let col = |f: fn(&Report) -> f64| median_range(&reps.iter().map(f).collect::<Vec<_>>());
        let (ap, ap0, ap1) = col(|r| r.acked_per_sec);
        let (l, l0, l1) = col(|r| r.ack_p99_us / 1000.0);
        let (dp, dp0, dp1) = col(|r| r.drained_per_sec);
        let lost: u64 = reps.iter().map(|r| r.lost).sum();
        println!(
            "| {} | {ap:.0} ({ap0:.0}–{ap1:.0}) | {l:.1} ({l0:.1}–{l1:.1}) | {dp:.0} ({dp0:.0}–{dp1:.0}) | {lost} |",
            first.system
        );
    }
    if inconsistent > 0 {
        anyhow::bail!(
            "{inconsistent} run(s) lost, duplicated or invented acknowledged messages (see the lost/dup/unexpected columns)"
        );
    }
    Ok(())
}

async fn s4(a: S4Args) -> anyhow::Result<()> {
    let c = &a.common;
    println!(
        "# S4 idle scale: {} authenticated connections, {} handshakes in parallel",
        a.connections, c.parallel
    );
    println!("| rep | connections | connects/s | relay RSS before MiB | after MiB | KiB per connection |");
    println!("|--:|--:|--:|--:|--:|--:|");
    let mut per = Vec::new();
    let mut rates = Vec::new();
    for rep in 0..c.repeat {
        let (proc_, target) = start("relay", c).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = procs::rss_kib(proc_.pid);
        let rec = Recorder::new();
        let t0 = Instant::now();
        let eps = connect(&target, a.connections, c.parallel, 0, c.ack_delay(), &rec).await?;
        let secs = t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = procs::rss_kib(proc_.pid);
        let kib = after.saturating_sub(before) as f64 / eps.len().max(1) as f64;
        let rate = eps.len() as f64 / secs;
        println!(
            "| {} | {} | {rate:.0} | {:.1} | {:.1} | {kib:.1} |",
            rep + 1,
            eps.len(),
            before as f64 / 1024.0,
            after as f64 / 1024.0
        );
        per.push(kib);
        rates.push(rate);
        drop(eps);
        drop(proc_);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (k, k0, k1) = median_range(&per);
    let (r, r0, r1) = median_range(&rates);
    println!();
    println!(
        "S4: {k:.1} ({k0:.1}–{k1:.1}) KiB per idle connection; {r:.0} ({r0:.0}–{r1:.0}) connects/s"
    );
    let _ = Arc::new(());
    Ok(())
}

/// One measured `dchat backup` command of `dchat-loadgen backup`.
struct BackupRow {
    rep: usize,
    store: String,
    command: &'static str,
    load: f64,
    run: dchat_bench::backup::ToolRun,
    /// The backup object's size.
    bytes: u64,
    /// The relay that serves or receives the data (the embedded store only).
    relay: Option<dchat_bench::backup::Usage>,
    moto: dchat_bench::backup::Usage,
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn backup(a: BackupArgs) -> anyhow::Result<()> {
    use dchat_bench::backup::{self as bk, Moto, Relay, StoreAt, Tools};
    use dchat_bench::s3::{self, Params};

    let here = std::env::current_exe().context("locating this binary")?;
    let tools = Tools {
        relay: default_relay_bin(a.relay_bin.as_ref())?,
        dchat: a
            .dchat_bin
            .clone()
            .unwrap_or_else(|| here.with_file_name("dchat")),
        moto: a.moto_bin.clone().unwrap_or_else(|| {
            let p = PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../.venv/bin/moto_server"
            ));
            std::fs::canonicalize(&p).unwrap_or(p)
        }),
        server_cpu: a.server_cpu,
        tool_cpu: a.tool_cpu,
    };
    for (what, path, hint) in [
        (
            "relay",
            &tools.relay,
            "cargo build --release -p dchat-relay -p dchat-bench",
        ),
        (
            "dchat",
            &tools.dchat,
            "cargo build --release -p dchat-relay -p dchat-bench",
        ),
        (
            "moto",
            &tools.moto,
            "run scripts/ensure-deps.sh or give --moto-bin",
        ),
    ] {
        anyhow::ensure!(
            path.exists(),
            "{what}: {} not found ({hint})",
            path.display()
        );
    }
    let pg = a.pg.target();
    for s in &a.stores {
        match s.as_str() {
            "embedded" => {}
            "postgres" if pg.is_some() => {}
            "postgres" => anyhow::bail!("store postgres needs --pg-host"),
            other => anyhow::bail!("unknown store {other:?} (embedded, postgres)"),
        }
    }
    let root = a.data_root.clone().unwrap_or_else(std::env::temp_dir);
    let p = Params {
        recipients: a.recipients,
        senders: a.senders,
        messages: a.messages,
        window: a.window,
        payload: a.payload,
        drain_recipients: 0,
        drain_per_recipient: 0,
        drain_parallel: 64,
        kill: None,
        verify_all: false,
        phase_timeout: Duration::from_secs(a.phase_timeout),
        seed: 0xb4c0,
    };
    p.validate()?;
    let timeout = Duration::from_secs(a.phase_timeout);
    let wait_max = Duration::from_secs(a.wait_load_max);
    let cpu = |c: Option<usize>| c.map_or_else(|| "any".to_string(), |c| c.to_string());
    println!(
        "# Backup and restore: {} messages of {} B (random) to {} offline recipients, {} repetition(s)",
        p.messages, p.payload, p.recipients, a.repeat
    );
    println!(
        "relays on CPU {}, dchat and moto on CPU {}; embedded data under {} on {}; moto {}",
        cpu(a.server_cpu),
        cpu(a.tool_cpu),
        root.display(),
        s3::fs_type(&root),
        tools.moto.display()
    );

    // Fill each store once; every repetition backs up the same data.
    struct Source {
        store: String,
        filled: s3::Filled,
        relay: Option<Relay>,
        pg: Option<s3::PgTarget>,
    }
    let mut sources = Vec::new();
    for store in &a.stores {
        let (at, src_pg) = match (store.as_str(), &pg) {
            ("postgres", Some(pg)) => {
                s3::reset_pg(pg)?;
                (StoreAt::Postgres(pg.clone()), Some(pg.clone()))
            }
            _ => (StoreAt::Embedded(root.clone()), None),
        };
        let relay = Relay::start(&tools, &at, "source").await?;
        let filled = s3::fill(&relay.ws_url, &p, Some(relay.pid())).await?;
        let idle = relay.settle(Duration::from_secs(300)).await;
        let pending = relay.pending_messages().await?;
        anyhow::ensure!(
            pending == p.messages as u64,
            "{store}: the filled relay holds {pending} messages, not {}",
            p.messages
        );
        let r = &filled.report;
        println!(
            "fill, {store}: {} messages acknowledged in {:.1} s ({:.0} msgs/s, ack p99 {:.1} ms); relay idle {:.0} s later, RSS {:.0} MiB{}",
            r.acked,
            r.put_secs,
            r.acked_per_sec,
            r.ack_p99_us / 1000.0,
            idle.as_secs_f64(),
            mib(procs::rss_kib(relay.pid())),
            match relay.data_bytes() {
                0 => String::new(),
                b => format!(", data directory {:.0} MiB", b as f64 / 1048576.0),
            }
        );
        // `dchat` reads PostgreSQL directly: that relay has done its part.
        let relay = if src_pg.is_some() { None } else { Some(relay) };
        sources.push(Source {
            store: store.clone(),
            filled,
            relay,
            pg: src_pg,
        });
    }

    println!();
    println!("| rep | store | command | load | s | MiB/s | msgs/s | dchat peak RSS MiB | dchat CPU s | relay RSS MiB start → peak | relay CPU s | moto RSS MiB start → peak | moto CPU s |");
    println!("|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let print_row = |r: &BackupRow| {
        let mibs = r.bytes as f64 / 1048576.0 / r.run.secs.max(1e-9);
        let (relay_mem, relay_cpu) = match r.relay {
            Some(u) => (
                format!("{:.0} → {:.0}", mib(u.start_kib), mib(u.peak_kib)),
                format!("{:.1}", u.cpu_secs),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {} | {:.2} | {:.1} | {mibs:.1} | {:.0} | {:.1} | {:.1} | {relay_mem} | {relay_cpu} | {:.0} → {:.0} | {:.1} |",
            r.rep,
            r.store,
            r.command,
            r.load,
            r.run.secs,
            p.messages as f64 / r.run.secs.max(1e-9),
            mib(r.run.tool.peak_kib),
            r.run.tool.cpu_secs,
            mib(r.moto.start_kib),
            mib(r.moto.peak_kib),
            r.moto.cpu_secs
        );
    };
    let mut rows: Vec<BackupRow> = Vec::new();
    let mut checks: Vec<String> = Vec::new();
    let mut failed = 0usize;
    for rep in 1..=a.repeat {
        let order: Vec<usize> = if rep % 2 == 1 {
            (0..sources.len()).collect()
        } else {
            (0..sources.len()).rev().collect()
        };
        for si in order {
            let src = &sources[si];
            let name = format!("{}-{rep}", src.store);
            let moto = Moto::start(&tools).await?;

            // create
            let mut args = strs(&["backup", "create"]);
            args.extend(moto.s3_flags());
            args.extend(strs(&[
                "--namespace",
                "bench",
                "--cluster",
                "c",
                "--cluster-uid",
                "bench",
                "--backup",
                &name,
                "--relay-version",
                "bench",
            ]));
            let (env, watch) = match (&src.relay, &src.pg) {
                (Some(r), _) => {
                    args.extend(strs(&["--source", "embedded", "--admin-url", &r.admin_url]));
                    (Vec::new(), vec![r.pid(), moto.pid()])
                }
                (None, Some(pg)) => {
                    args.extend(strs(&["--source", "postgres"]));
                    (bk::pg_env(pg), vec![moto.pid()])
                }
                (None, None) => anyhow::bail!("{}: no source", src.store),
            };
            let load = bk::wait_quiet(a.wait_load, wait_max).await;
            let run = bk::run_tool(&tools, args, env, watch).await?;
            let m = run.json(&format!("backup create {name}"))?;
            let bytes = m["sizeBytes"].as_u64().unwrap_or(0);
            anyhow::ensure!(
                m["counts"]["messages"].as_u64() == Some(p.messages as u64),
                "backup create {name}: the manifest counts {} messages, not {}",
                m["counts"]["messages"],
                p.messages
            );
            let row = BackupRow {
                rep,
                store: src.store.clone(),
                command: "create",
                load,
                relay: src.relay.as_ref().map(|_| run.others[0]),
                moto: run.others.last().copied().unwrap_or_default(),
                run,
                bytes,
            };
            print_row(&row);
            rows.push(row);

            // restore, into a new relay or a new database
            let mut args = strs(&["backup", "restore"]);
            args.extend(moto.s3_flags());
            args.extend(strs(&["--backup-path", &format!("bench/c/{name}")]));
            let (target, target_pg, env, watch) = match &src.pg {
                None => {
                    let t =
                        Relay::start(&tools, &StoreAt::Embedded(root.clone()), "target").await?;
                    t.settle(Duration::from_secs(30)).await;
                    args.extend(strs(&["--target", "embedded", "--admin-url", &t.admin_url]));
                    let watch = vec![t.pid(), moto.pid()];
                    (Some(t), None, Vec::new(), watch)
                }
                Some(pg) => {
                    let tpg = s3::PgTarget {
                        dbname: format!("{}_restore", pg.dbname),
                        ..pg.clone()
                    };
                    bk::psql(
                        pg,
                        &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", tpg.dbname),
                    )?;
                    bk::psql(pg, &format!("CREATE DATABASE {}", tpg.dbname))?;
                    args.extend(strs(&["--target", "postgres"]));
                    let env = bk::pg_env(&tpg);
                    (None, Some(tpg), env, vec![moto.pid()])
                }
            };
            let load = bk::wait_quiet(a.wait_load, wait_max).await;
            let run = bk::run_tool(&tools, args, env, watch).await?;
            let report = run.json(&format!("backup restore {name}"))?;
            anyhow::ensure!(
                report["counts"]["messages"].as_u64() == Some(p.messages as u64),
                "backup restore {name}: restored {} messages, not {}",
                report["counts"]["messages"],
                p.messages
            );
            let row = BackupRow {
                rep,
                store: src.store.clone(),
                command: "restore",
                load,
                relay: target.as_ref().map(|_| run.others[0]),
                moto: run.others.last().copied().unwrap_or_default(),
                run,
                bytes,
            };
            print_row(&row);
            rows.push(row);
            drop(moto);

            // check what the restored store holds: its count, and a sample of inboxes
            // against what was sent
            let checker = match (target, target_pg) {
                (Some(t), _) => t,
                (None, Some(tpg)) => Relay::start(&tools, &StoreAt::Postgres(tpg), "check").await?,
                (None, None) => anyhow::bail!("{name}: no restore target"),
            };
            let pending = checker.pending_messages().await?;
            let c = src
                .filled
                .check(&checker.ws_url, a.check_recipients, 64, timeout)
                .await?;
            let ok = pending == p.messages as u64
                && c.consistent()
                && c.verified_acked == c.drained
                && c.drained > 0;
            if !ok {
                failed += 1;
            }
            let line = format!(
                "| {rep} | {} | {pending} | {} / {} | {} | {} | {} | {} |",
                src.store,
                c.verified_recipients,
                c.drained,
                c.lost,
                c.duplicates,
                c.unexpected,
                if ok { "ok" } else { "FAILED" }
            );
            eprintln!("backup: check {line}");
            checks.push(line);
            drop(checker);
        }
    }

    println!();
    println!(
        "# Restored stores (pending messages from /admin/stats; the first {} recipients' inboxes drained and compared with what was sent)",
        a.check_recipients
    );
    println!("| rep | store | pending messages | recipients / messages checked | lost | dup | unexpected | |");
    println!("|--:|---|--:|--:|--:|--:|--:|---|");
    for l in &checks {
        println!("{l}");
    }

    println!();
    println!(
        "# Summary: median (min–max) over {} repetition(s); {} messages",
        a.repeat, p.messages
    );
    println!("| store | command | object MiB | s | MiB/s | dchat peak RSS MiB | relay peak RSS MiB | moto peak RSS MiB |");
    println!("|---|---|--:|--:|--:|--:|--:|--:|");
    for src in &sources {
        for command in ["create", "restore"] {
            let rs: Vec<&BackupRow> = rows
                .iter()
                .filter(|r| r.store == src.store && r.command == command)
                .collect();
            let Some(first) = rs.first() else { continue };
            let col = |f: &dyn Fn(&BackupRow) -> f64| {
                let (m, lo, hi) = median_range(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
                if rs.len() == 1 {
                    format!("{m:.1}")
                } else {
                    format!("{m:.1} ({lo:.1}–{hi:.1})")
                }
            };
            let relay = if first.relay.is_some() {
                col(&|r| r.relay.map_or(0.0, |u| mib(u.peak_kib)))
            } else {
                "-".into()
            };
            println!(
                "| {} | {command} | {:.0} | {} | {} | {} | {relay} | {} |",
                src.store,
                first.bytes as f64 / 1048576.0,
                col(&|r| r.run.secs),
                col(&|r| r.bytes as f64 / 1048576.0 / r.run.secs.max(1e-9)),
                col(&|r| mib(r.run.tool.peak_kib)),
                col(&|r| mib(r.moto.peak_kib)),
            );
        }
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} restored store(s) did not hold what was backed up (see the checks)"
        );
    }
    Ok(())
}

/// One S5 run: a fresh relay, the clients, optionally the flood, one rate step.
struct S5Run {
    step: StepResult,
    health: dchat_bench::flood::HealthProbes,
    /// Counter increases over the step: timeouts, evictions, refusals (client port).
    timeouts: f64,
    evicted: f64,
    rejected: f64,
    /// Flood sockets open when the step ended (0 without a flood).
    hostile_open: u64,
    errors: u64,
}

async fn s5_run(a: &S5Args, flood: bool, seq: &mut u64, rng: &mut Rng) -> anyhow::Result<S5Run> {
    use dchat_bench::flood::{self, Flood};
    let c = &a.common;
    let port = procs::free_port()?;
    let mport = procs::free_port()?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let maddr: std::net::SocketAddr = format!("127.0.0.1:{mport}").parse()?;
    let dir = procs::scratch_dir("relay")?;
    let mut envs = relay_env(port, &dir)?;
    envs.retain(|(k, _)| k != "DCHAT_METRICS_LISTEN");
    envs.extend([
        ("DCHAT_METRICS_LISTEN".to_string(), maddr.to_string()),
        (
            "DCHAT_HANDSHAKE_TIMEOUT".to_string(),
            a.handshake_timeout.clone(),
        ),
        (
            "DCHAT_MAX_HANDSHAKES".to_string(),
            a.max_handshakes.to_string(),
        ),
    ]);
    let proc_ = procs::spawn("relay", c.server_cpu, &relay_bin(c)?, &[], &envs, dir)?;
    procs::wait_port("relay", addr, Duration::from_secs(30)).await?;
    procs::wait_port("relay metrics", maddr, Duration::from_secs(30)).await?;
    let rec = Recorder::new();
    let target = Target::Relay(format!("ws://{addr}/v1/ws"));
    let eps = connect(&target, a.clients, c.parallel, 0, c.ack_delay(), &rec).await?;
    let flood = if flood {
        let f = Flood::start(a.flood_target.unwrap_or(addr), a.silent, a.dripping)?;
        // The step's warm-up starts once every hostile socket has been opened once.
        let want = (a.silent + a.dripping) as u64;
        let t0 = Instant::now();
        while f.stats.opened.load(Ordering::Relaxed) < want {
            if t0.elapsed() > Duration::from_secs(120) {
                anyhow::bail!(
                    "the flood opened only {} of {want} sockets in 120 s",
                    f.stats.opened.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(f)
    } else {
        None
    };
    let counters = |text: &str| -> [f64; 3] {
        [
            "dchat_handshake_timeouts_total",
            "dchat_handshakes_evicted_total",
            "dchat_handshakes_rejected_total",
        ]
        .map(|n| flood::metric(text, &format!("{n}{{listener=\"client\"}}")).unwrap_or(0.0))
    };
    let before = counters(&flood::get(maddr, "/metrics").await?.1);
    let (stop_probe, probe_rx) = tokio::sync::watch::channel(false);
    let prober = tokio::spawn(flood::probe_health(
        maddr,
        Duration::from_millis(a.health_every_ms.max(1)),
        probe_rx,
    ));
    let step = run_step(
        &eps,
        &rec,
        Pattern::Direct,
        step(c, a.rate),
        seq,
        rng,
        Some(ServerProcs::one(proc_.pid)),
    )
    .await;
    let _ = stop_probe.send(true);
    let health = prober.await?;
    let after = counters(&flood::get(maddr, "/metrics").await?.1);
    let hostile_open = match flood {
        Some(f) => {
            let open = f.stats.open.load(Ordering::Relaxed);
            f.stop();
            open
        }
        None => 0,
    };
    let errors = rec.errors.load(Ordering::Relaxed);
    drop(eps);
    drop(proc_);
    Ok(S5Run {
        step,
        health,
        timeouts: after[0] - before[0],
        evicted: after[1] - before[1],
        rejected: after[2] - before[2],
        hostile_open,
        errors,
    })
}

async fn s5(a: S5Args) -> anyhow::Result<()> {
    let c = &a.common;
    // Both ends of every hostile socket are on this machine: this process needs a
    // descriptor per socket (the relay raises its own limit).
    let raised = dchat_relay::fd_limit::raise_to_hard().context("raising the open-file limit")?;
    let need = (a.silent + a.dripping + a.clients) as u64 + 256;
    if raised.now.is_some_and(|l| l < need) {
        anyhow::bail!(
            "S5 needs {need} open files; the limit is {:?} (ulimit -Hn)",
            raised.now
        );
    }
    println!(
        "# S5 handshake flood: {} clients, {} msgs/s offered, {} B payload; flood {} silent + {} dripping sockets (reopened when closed); relay DCHAT_HANDSHAKE_TIMEOUT={} DCHAT_MAX_HANDSHAKES={}; warm-up {} s, measure {} s, {} repetitions; /health on the metrics port every {} ms",
        a.clients, a.rate, c.payload, a.silent, a.dripping, a.handshake_timeout, a.max_handshakes, c.warmup, c.measure, c.repeat, a.health_every_ms
    );
    println!("| flood | rep | delivered/s | p50 µs | p99 µs | p99.9 µs | max µs | server cpu | handshake timeouts | evicted | rejected | hostile open at end | /health answered | /health p50 ms | p99 ms | max ms | errors |");
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let (mut seq, mut rng) = (0u64, Rng::new(0x55));
    let mut p99 = [Vec::new(), Vec::new()];
    let mut p50 = [Vec::new(), Vec::new()];
    let mut health_p99 = [Vec::new(), Vec::new()];
    for rep in 0..c.repeat {
        let order = if rep % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for flood in order {
            let r = s5_run(&a, flood, &mut seq, &mut rng).await?;
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {} | {} of {} | {:.2} | {:.2} | {:.2} | {} |",
                if flood { "yes" } else { "no" },
                rep + 1,
                r.step.delivered_per_sec,
                r.step.p50_us,
                r.step.p99_us,
                r.step.p999_us,
                r.step.max_us,
                r.step.server_cpu.map(|s| format!("{:.0}%", s * 100.0)).unwrap_or_else(|| "-".into()),
                r.timeouts,
                r.evicted,
                r.rejected,
                r.hostile_open,
                r.health.latencies.len(),
                r.health.latencies.len() as u64 + r.health.failures,
                ms(r.health.quantile(0.5)),
                ms(r.health.quantile(0.99)),
                ms(r.health.quantile(1.0)),
                r.errors + r.step.expected.saturating_sub(r.step.received),
            );
            let i = usize::from(flood);
            p99[i].push(r.step.p99_us);
            p50[i].push(r.step.p50_us);
            health_p99[i].push(ms(r.health.quantile(0.99)));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    println!();
    println!("# S5 summary (median (min–max) over repetitions)");
    println!("| flood | p50 µs | p99 µs | /health p99 ms |");
    println!("|---|--:|--:|--:|");
    for (i, name) in ["no", "yes"].iter().enumerate() {
        let (a50, a50l, a50h) = median_range(&p50[i]);
        let (a99, a99l, a99h) = median_range(&p99[i]);
        let (h, hl, hh) = median_range(&health_p99[i]);
        println!("| {name} | {a50:.0} ({a50l:.0}–{a50h:.0}) | {a99:.0} ({a99l:.0}–{a99h:.0}) | {h:.2} ({hl:.2}–{hh:.2}) |");
    }
    let ratio = median_range(&p99[1]).0 / median_range(&p99[0]).0.max(1.0);
    println!();
    println!("S5: message p99 with the flood is {ratio:.2}× the p99 without it");
    Ok(())
}
