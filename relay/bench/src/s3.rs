//! S3 durable offline (issue 3): senders store messages for recipients that are not
//! connected, a message counting as acknowledged only when its durable answer arrived;
//! then part of the recipients connect and drain their inboxes; optionally the server
//! is killed with SIGKILL during the load and every acknowledged message must still be
//! drained.
//!
//! The relay run uses real authenticated sessions (the WebSocket of
//! [`dchat_relay::client::connect_raw`], the protocol's Ed25519 challenge/response, frames
//! of [`dchat_relay::protocol`]): each sender keeps up to `window` `send` frames in flight,
//! writing the frames that are ready in one burst and one flush (one syscall per burst
//! rather than per frame, so the generator is not the bottleneck), and counts a message
//! when its `sent` answer (`stored`, or `duplicate` for a retry of a stored id) arrives —
//! the relay answers only after the store commit. Recipients drain through
//! [`dchat_relay::client::Client`]. After a lost connection a sender reconnects and
//! resends every unanswered message with the same id (what a client does; the relay
//! deduplicates). Recipients drain with `fetch` and `ack`. The Redis peer does the same
//! with `RPUSH` to one list per recipient (`appendfsync always`) and `LPOP` with a count.
//!
//! Message ids are `s3-<sender>-<n>`, so every drained message can be checked against
//! the plan: lost (acknowledged, not drained), duplicated (drained twice) or unexpected.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dchat_relay::client::{connect_raw, generate_key, public_key, Client};
use dchat_relay::protocol::{
    auth_message, decode_server_frame, Base64Bytes, ClientFrame, Envelope, KeyHex, Kind,
    SendStatus, ServerFrame, SigHex,
};
use ed25519_dalek::{Signer, SigningKey};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::procs::{self, ServerProc};
use crate::BenchError;

/// Largest `fetch` limit the protocol accepts; one fetch then takes a whole inbox of 100.
const FETCH_LIMIT: u32 = 1000;
/// Most message references one `ack` frame may carry (protocol limit).
const ACK_CHUNK: usize = 1024;
/// Pause between reconnect attempts while the relay restarts.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// Most frames a sender writes before one flush.
const BURST: usize = 64;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sizes of one S3 run.
#[derive(Clone, Debug)]
pub struct Params {
    /// Offline recipients (generated keys, never connected during the put phase).
    pub recipients: usize,
    /// Sending clients.
    pub senders: usize,
    /// Messages put in total (at least `drain_recipients × drain_per_recipient`).
    pub messages: usize,
    /// Sends in flight per sender (pipelined).
    pub window: usize,
    /// Payload bytes per message.
    pub payload: usize,
    /// Recipients that reconnect and drain in the timed phase (the first ones).
    pub drain_recipients: usize,
    /// Messages each of them receives (exactly).
    pub drain_per_recipient: usize,
    /// Recipients draining at the same time.
    pub drain_parallel: usize,
    /// Kill the server with SIGKILL during the put phase, restart it on the same data.
    pub kill: Option<KillAt>,
    /// Drain (untimed) and check every recipient after the timed drain, not only the
    /// timed ones. Always on with `kill`.
    pub verify_all: bool,
    /// Upper bound of each phase; a phase that does not finish in time fails the run.
    pub phase_timeout: Duration,
    /// Seed of the recipient assignment.
    pub seed: u64,
}

impl Params {
    /// Checks the sizes fit together.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |reason: String| BenchError::Run {
            what: "s3 parameters".into(),
            reason,
        };
        if self.senders == 0 || self.window == 0 || self.recipients == 0 {
            return Err(bad(
                "senders, window and recipients must be at least 1".into()
            ));
        }
        if self.drain_recipients > self.recipients {
            return Err(bad(format!(
                "--drain-recipients {} exceeds --recipients {}",
                self.drain_recipients, self.recipients
            )));
        }
        let drained = self.drain_recipients * self.drain_per_recipient;
        if self.messages < drained {
            return Err(bad(format!(
                "--messages {} is less than drain-recipients × drain-per-recipient = {drained}",
                self.messages
            )));
        }
        if self.messages > drained && self.recipients == self.drain_recipients {
            return Err(bad(
                "messages beyond the drained ones need recipients outside the drain set".into(),
            ));
        }
        Ok(())
    }
}

/// When to kill the server during the put phase.
#[derive(Clone, Copy, Debug)]
pub enum KillAt {
    /// This long after the first send.
    Secs(f64),
    /// As soon as this many messages were acknowledged.
    Acked(u64),
}

/// How to start the relay: the program and arguments (environment is set by the run).
#[derive(Clone, Debug)]
pub struct RelayLaunch {
    /// Executable (normally `dchat-relay`).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// CPU to pin the relay to (`taskset`).
    pub cpu: Option<usize>,
}

/// The relay's storage backend for a run.
#[derive(Clone, Debug)]
pub enum Backend {
    /// Embedded store in a fresh directory under `root` (removed afterwards).
    Embedded {
        /// Parent of the data directory; must be a disk, not tmpfs, for durable numbers.
        root: PathBuf,
    },
    /// A PostgreSQL server the caller started (with durable settings).
    Postgres(PgTarget),
}

/// Where the PostgreSQL server is.
#[derive(Clone, Debug)]
pub struct PgTarget {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database.
    pub dbname: String,
    /// User.
    pub user: String,
    /// Password (may be empty).
    pub password: String,
    /// `TRUNCATE messages` with `psql` before the run, so runs do not pile up.
    pub truncate: bool,
}

impl Backend {
    /// Name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Embedded { .. } => "relay-embedded",
            Backend::Postgres(_) => "relay-postgres",
        }
    }
}

/// Results of one run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// System name.
    pub system: String,
    /// Messages planned.
    pub messages: u64,
    /// Messages acknowledged (durable answer received).
    pub acked: u64,
    /// First send to last acknowledgement, seconds.
    pub put_secs: f64,
    /// Acknowledged messages per second over the put phase.
    pub acked_per_sec: f64,
    /// Acknowledgement latency (send written → answer read), µs: p50, p99, max.
    pub ack_p50_us: f64,
    /// See `ack_p50_us`.
    pub ack_p99_us: f64,
    /// See `ack_p50_us`.
    pub ack_max_us: f64,
    /// Server CPU (one core = 1.0) during the put phase, when measured.
    pub server_cpu: Option<f64>,
    /// This generator's CPU (one core = 1.0) during the put phase.
    pub gen_cpu: f64,
    /// Answers with status `duplicate` (retries of stored ids after a reconnect).
    pub duplicate_answers: u64,
    /// Error frames or failed sends seen by senders.
    pub errors: u64,
    /// Sender reconnections (after the kill).
    pub reconnects: u64,
    /// Acknowledged messages when the server was killed (kill runs only).
    pub acked_at_kill: Option<u64>,
    /// Seconds from the kill until the restarted server accepted connections.
    pub restart_secs: Option<f64>,
    /// Messages drained in the timed phase.
    pub drained: u64,
    /// Timed drain duration (connect, fetch, ack of every drain recipient), seconds.
    pub drain_secs: f64,
    /// Drained messages per second.
    pub drained_per_sec: f64,
    /// Server CPU (one core = 1.0) during the timed drain, when measured.
    pub drain_server_cpu: Option<f64>,
    /// This generator's CPU during the timed drain.
    pub drain_gen_cpu: f64,
    /// Recipients whose inbox was checked against the plan.
    pub verified_recipients: u64,
    /// Acknowledged messages to those recipients.
    pub verified_acked: u64,
    /// Acknowledged messages that were not drained.
    pub lost: u64,
    /// Extra copies drained of one message.
    pub duplicates: u64,
    /// Drained messages that were not in the plan for that recipient.
    pub unexpected: u64,
}

impl Report {
    /// True when nothing acknowledged was lost, nothing duplicated or unexpected.
    pub fn consistent(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.unexpected == 0
    }
}

/// Which recipient every message of every sender goes to: each of the first
/// `drain_recipients` gets exactly `drain_per_recipient`, the rest are spread at random
/// over the other recipients; the order is shuffled.
pub struct Plan {
    /// `to[s][n]`: recipient index of message `n` of sender `s`.
    pub to: Vec<Vec<u32>>,
}

impl Plan {
    /// Builds the plan for `p`.
    pub fn new(p: &Params) -> Plan {
        let mut rng = crate::driver::Rng::new(p.seed);
        let drained = p.drain_recipients * p.drain_per_recipient;
        let mut all: Vec<u32> = Vec::with_capacity(p.messages);
        for r in 0..p.drain_recipients {
            all.extend(std::iter::repeat_n(r as u32, p.drain_per_recipient));
        }
        let others = p.recipients - p.drain_recipients;
        for _ in drained..p.messages {
            let r = p.drain_recipients + (rng.next_u64() as usize) % others.max(1);
            all.push(r as u32);
        }
        // Fisher–Yates.
        for i in (1..all.len()).rev() {
            let j = (rng.next_u64() as usize) % (i + 1);
            all.swap(i, j);
        }
        let mut to = vec![Vec::new(); p.senders];
        for (i, r) in all.into_iter().enumerate() {
            to[i % p.senders].push(r);
        }
        Plan { to }
    }
}

/// The id of message `n` of sender `s`.
pub fn message_id(s: usize, n: usize) -> String {
    format!("s3-{s}-{n}")
}

/// Parses an id made by [`message_id`].
pub fn parse_id(id: &str) -> Option<(usize, usize)> {
    let rest = id.strip_prefix("s3-")?;
    let (s, n) = rest.split_once('-')?;
    Some((s.parse().ok()?, n.parse().ok()?))
}

const NOT_SENT: u8 = 0;
const IN_FLIGHT: u8 = 1;
const ACKED: u8 = 2;

/// Per-sender bookkeeping shared by its writer and reader tasks.
struct SenderState {
    state: Vec<u8>,
    sent_at: Vec<Option<Instant>>,
    acked: usize,
    hist: Histogram<u64>,
    duplicates: u64,
    errors: u64,
    last_ack: Option<Instant>,
}

/// Everything the senders share.
struct PutShared {
    url: String,
    recipients: Vec<KeyHex>,
    payload: Vec<u8>,
    /// Each message gets its own random payload of `payload.len()` bytes (derived from
    /// its sender and number, so a resend carries the same bytes) instead of `payload`.
    random_payload: bool,
    window: usize,
    acked: AtomicU64,
    reconnects: AtomicU64,
    deadline: Instant,
}

/// Fresh bookkeeping for each sender of `plan`, nothing sent yet.
fn sender_states(plan: &Plan) -> Vec<Arc<Mutex<SenderState>>> {
    plan.to
        .iter()
        .map(|to| {
            Arc::new(Mutex::new(SenderState {
                state: vec![NOT_SENT; to.len()],
                sent_at: vec![None; to.len()],
                acked: 0,
                hist: new_hist(),
                duplicates: 0,
                errors: 0,
                last_ack: None,
            }))
        })
        .collect()
}

/// Folds the senders' bookkeeping into the put-phase figures of `report`: acked count,
/// answers, the acknowledgement latency histogram, the put time (first send to last
/// acknowledgement) and the generator's CPU share over it.
fn put_figures(
    states: &[Arc<Mutex<SenderState>>],
    t0: Instant,
    gen0: std::time::Duration,
    report: &mut Report,
) {
    let mut hist = new_hist();
    let mut last = t0;
    for st in states {
        let s = st.lock().unwrap_or_else(|e| e.into_inner());
        report.acked += s.acked as u64;
        report.duplicate_answers += s.duplicates;
        report.errors += s.errors;
        let _ = hist.add(&s.hist);
        if let Some(t) = s.last_ack {
            last = last.max(t);
        }
    }
    report.put_secs = last.duration_since(t0).as_secs_f64();
    report.gen_cpu =
        procs::cpu_time(None).saturating_sub(gen0).as_secs_f64() / report.put_secs.max(1e-9);
    report.acked_per_sec = report.acked as f64 / report.put_secs.max(1e-9);
    report.ack_p50_us = hist.value_at_quantile(0.5) as f64;
    report.ack_p99_us = hist.value_at_quantile(0.99) as f64;
    report.ack_max_us = hist.max() as f64;
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 10 min, 3 significant digits; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Connects and authenticates (challenge, signed `auth`, `welcome`), as
/// [`Client::connect`] does but keeping the raw WebSocket for batched writes.
pub(crate) async fn connect_sender(url: &str, key: &SigningKey) -> Result<Ws, String> {
    let mut ws = connect_raw(url).await.map_err(|e| e.to_string())?;
    let next = async |ws: &mut Ws, what: &str| -> Result<ServerFrame, String> {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(t.as_str()).map_err(|e| format!("{what}: {e}"))
                }
                Some(Ok(Message::Close(_))) | None => return Err(format!("closed before {what}")),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("{what}: {e}")),
            }
        }
    };
    let nonce = match next(&mut ws, "challenge").await? {
        ServerFrame::Challenge { nonce, .. } => nonce,
        other => return Err(format!("expected challenge, got {other:?}")),
    };
    let auth = ClientFrame::Auth {
        key: public_key(key),
        sig: SigHex(key.sign(&auth_message(&nonce.0)).to_bytes()),
    };
    let text = serde_json::to_string(&auth).map_err(|e| e.to_string())?;
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|e| e.to_string())?;
    match next(&mut ws, "welcome").await? {
        ServerFrame::Welcome { .. } => Ok(ws),
        other => Err(format!("expected welcome, got {other:?}")),
    }
}

/// [`connect_sender`], retrying while the server is down, until `deadline`.
async fn connect_retry(url: &str, key: &SigningKey, deadline: Instant) -> Result<Ws, BenchError> {
    loop {
        match connect_sender(url, key).await {
            Ok(ws) => return Ok(ws),
            Err(e) if Instant::now() >= deadline => {
                return Err(BenchError::Run {
                    what: "connecting to the relay".into(),
                    reason: e,
                })
            }
            Err(_) => tokio::time::sleep(RECONNECT_PAUSE).await,
        }
    }
}

/// Sends the queued message numbers, at most `window` unanswered at a time; frames that
/// are ready go out in one burst with one flush.
async fn write_loop(
    mut w: futures::stream::SplitSink<Ws, Message>,
    mut todo: mpsc::UnboundedReceiver<usize>,
    sem: Arc<Semaphore>,
    st: Arc<Mutex<SenderState>>,
    shared: Arc<PutShared>,
    sender: usize,
    to: Arc<Vec<u32>>,
) {
    let frame = |n: usize| -> Option<String> {
        let env = Envelope {
            id: message_id(sender, n),
            from: None,
            to: Some(shared.recipients[to[n] as usize]),
            channel: None,
            ts: now_ms(),
            kind: Kind::Text,
            payload: Base64Bytes(if shared.random_payload {
                random_bytes(sender, n, shared.payload.len())
            } else {
                shared.payload.clone()
            }),
            media: None,
        };
        serde_json::to_string(&ClientFrame::Send { envelope: env }).ok()
    };
    while let Some(first) = todo.recv().await {
        let Ok(permit) = sem.acquire().await else {
            return;
        };
        permit.forget();
        let mut burst = vec![first];
        while burst.len() < BURST {
            let Ok(permit) = sem.try_acquire() else {
                break;
            };
            match todo.try_recv() {
                Ok(n) => {
                    permit.forget();
                    burst.push(n);
                }
                Err(_) => break,
            }
        }
        let mut texts = Vec::with_capacity(burst.len());
        {
            let now = Instant::now();
            let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
            for n in burst {
                if s.state[n] == ACKED {
                    sem.add_permits(1);
                    continue;
                }
                s.state[n] = IN_FLIGHT;
                s.sent_at[n] = Some(now);
                texts.push(n);
            }
        }
        for n in texts {
            let Some(text) = frame(n) else {
                return;
            };
            if w.feed(Message::Text(text.into())).await.is_err() {
                // The reader sees the connection end too and triggers the reconnect.
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
}

/// How a connection of a sender ended.
enum ReadEnd {
    /// Every message of this sender is acknowledged.
    Done,
    /// The connection was lost; reconnect and resend what is unanswered.
    Lost,
}

/// Reads answers: `sent` acknowledges, an error frame naming a message queues it again.
async fn read_loop(
    mut r: futures::stream::SplitStream<Ws>,
    todo: mpsc::UnboundedSender<usize>,
    sem: Arc<Semaphore>,
    st: Arc<Mutex<SenderState>>,
    shared: Arc<PutShared>,
) -> ReadEnd {
    loop {
        let frame: ServerFrame = match r.next().await {
            Some(Ok(Message::Text(t))) => match decode_server_frame(t.as_str()) {
                Ok(f) => f,
                Err(_) => {
                    st.lock().unwrap_or_else(|e| e.into_inner()).errors += 1;
                    continue;
                }
            },
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return ReadEnd::Lost,
            Some(Ok(_)) => continue,
        };
        match frame {
            ServerFrame::Sent { id, status, .. } => {
                let Some((_, n)) = parse_id(&id) else {
                    continue;
                };
                let now = Instant::now();
                let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                if n < s.state.len() && s.state[n] != ACKED {
                    s.state[n] = ACKED;
                    s.acked += 1;
                    s.last_ack = Some(now);
                    if status == SendStatus::Duplicate {
                        s.duplicates += 1;
                    }
                    if let Some(t) = s.sent_at[n] {
                        let us = now.duration_since(t).as_micros() as u64;
                        let _ = s.hist.record(us.max(1));
                    }
                    shared.acked.fetch_add(1, Ordering::Relaxed);
                }
                sem.add_permits(1);
                if s.acked == s.state.len() {
                    return ReadEnd::Done;
                }
            }
            // The relay ends the connection; the close frame that follows is `Lost`.
            ServerFrame::Error { close: Some(_), .. } => {}
            ServerFrame::Error { reference, .. } => {
                let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                s.errors += 1;
                if let Some((_, n)) = reference.as_deref().and_then(parse_id) {
                    if n < s.state.len() && s.state[n] != ACKED {
                        // Not stored (e.g. storage unavailable): send it again.
                        sem.add_permits(1);
                        let _ = todo.send(n);
                    }
                }
            }
            _ => {}
        }
    }
}

/// One sender: connect, pipeline its messages, reconnect and resend after a lost
/// connection, until all are acknowledged or the deadline passes.
async fn run_sender(
    shared: Arc<PutShared>,
    sender: usize,
    key: SigningKey,
    to: Arc<Vec<u32>>,
    st: Arc<Mutex<SenderState>>,
) -> Result<(), BenchError> {
    let mut first = true;
    loop {
        let todo_list: Vec<usize> = {
            let s = st.lock().unwrap_or_else(|e| e.into_inner());
            (0..s.state.len())
                .filter(|&n| s.state[n] != ACKED)
                .collect()
        };
        if todo_list.is_empty() {
            return Ok(());
        }
        if !first {
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let ws = connect_retry(&shared.url, &key, shared.deadline).await?;
        let (w, r) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        for n in todo_list {
            let _ = tx.send(n);
        }
        let sem = Arc::new(Semaphore::new(shared.window));
        let writer = tokio::spawn(write_loop(
            w,
            rx,
            sem.clone(),
            st.clone(),
            shared.clone(),
            sender,
            to.clone(),
        ));
        let remaining = shared.deadline.saturating_duration_since(Instant::now());
        let end =
            tokio::time::timeout(remaining, read_loop(r, tx, sem, st.clone(), shared.clone()))
                .await;
        writer.abort();
        match end {
            Ok(ReadEnd::Done) => return Ok(()),
            Ok(ReadEnd::Lost) => continue,
            Err(_) => {
                let s = st.lock().unwrap_or_else(|e| e.into_inner());
                return Err(BenchError::Run {
                    what: format!("sender {sender}"),
                    reason: format!(
                        "put phase timed out with {} of {} messages acknowledged",
                        s.acked,
                        s.state.len()
                    ),
                });
            }
        }
    }
}

/// `len` pseudo-random bytes, the same for the same message (`sender`, `n`): incompressible
/// like the end-to-end encrypted payloads of real clients.
fn random_bytes(sender: usize, n: usize, len: usize) -> Vec<u8> {
    let mut rng =
        crate::driver::Rng::new(((sender as u64) << 40) ^ (n as u64) ^ 0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A running relay of an S3 run: restartable on the same data and ports.
struct RelayInstance {
    launch: RelayLaunch,
    env: Vec<(String, String)>,
    addr: std::net::SocketAddr,
    proc_: Option<ServerProc>,
}

impl RelayInstance {
    async fn start(&mut self) -> Result<(), BenchError> {
        let dir = procs::scratch_dir("s3-relay")?;
        let p = procs::spawn(
            "relay",
            self.launch.cpu,
            &self.launch.program,
            &self.launch.args,
            &self.env,
            dir,
        )?;
        self.proc_ = Some(p);
        procs::wait_port("relay", self.addr, Duration::from_secs(60)).await
    }

    fn pid(&self) -> Option<u32> {
        self.proc_.as_ref().map(|p| p.pid)
    }

    async fn kill9(&mut self) {
        if let Some(mut p) = self.proc_.take() {
            p.kill9().await;
        }
    }
}

/// Runs S3 against the relay on `backend`. Fails (with the report printed by the caller)
/// only for setup errors and phase timeouts; lost messages are in the report.
pub async fn run_relay(
    launch: &RelayLaunch,
    backend: &Backend,
    p: &Params,
) -> Result<Report, BenchError> {
    p.validate()?;
    let port = procs::free_port()?;
    let mport = procs::free_port()?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut env: Vec<(String, String)> = vec![
        ("DCHAT_LISTEN".into(), addr.to_string()),
        ("DCHAT_METRICS_LISTEN".into(), format!("127.0.0.1:{mport}")),
        // Load clients send far above a phone's rate; the limiter is not under test.
        ("DCHAT_RATE_PER_SEC".into(), "1000000".into()),
        ("DCHAT_RATE_BURST".into(), "1000000".into()),
        ("RUST_LOG".into(), "warn".into()),
        // Single relay: nothing inherited from the caller's environment may add peers.
        ("DCHAT_PEERS".into(), String::new()),
        ("DCHAT_PEER_DNS".into(), String::new()),
    ];
    let mut data_dir = None;
    match backend {
        Backend::Embedded { root } => {
            let d = root.join(format!("dchat-s3-data-{}-{}", std::process::id(), now_ms()));
            std::fs::create_dir_all(&d).map_err(|source| BenchError::Io {
                what: format!("creating {}", d.display()),
                source,
            })?;
            env.push(("DCHAT_DATA_DIR".into(), d.display().to_string()));
            // An inherited DB_HOST (e.g. from scripts/with-postgres.sh) would select
            // PostgreSQL; empty means the embedded store.
            env.push(("DB_HOST".into(), String::new()));
            data_dir = Some(d);
        }
        Backend::Postgres(pg) => {
            if pg.truncate {
                truncate_pg(pg)?;
            }
            env.extend([
                ("DB_HOST".into(), pg.host.clone()),
                ("DB_PORT".into(), pg.port.to_string()),
                ("DB_NAME".into(), pg.dbname.clone()),
                ("DB_USER".into(), pg.user.clone()),
                ("DB_PASSWORD".into(), pg.password.clone()),
            ]);
        }
    }
    env.extend(launch.env.iter().cloned());
    let mut relay = RelayInstance {
        launch: launch.clone(),
        env,
        addr,
        proc_: None,
    };
    let result = async {
        relay.start().await?;
        let url = format!("ws://{addr}/v1/ws");
        run_relay_phases(&url, &mut relay, backend.name(), p).await
    }
    .await;
    relay.kill9().await;
    if let Some(d) = data_dir {
        let _ = std::fs::remove_dir_all(d);
    }
    result
}

fn truncate_pg(pg: &PgTarget) -> Result<(), BenchError> {
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            &pg.host,
            "-p",
            &pg.port.to_string(),
            "-U",
            &pg.user,
            "-d",
            &pg.dbname,
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            "TRUNCATE messages",
        ])
        .env("PGPASSWORD", &pg.password)
        .output()
        .map_err(|source| BenchError::Io {
            what: "running psql to truncate messages".into(),
            source,
        })?;
    // A fresh database has no table yet (the relay creates it): nothing to truncate.
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !stderr.contains("does not exist") {
        return Err(BenchError::Server {
            what: "postgres".into(),
            reason: format!("TRUNCATE messages failed: {}", stderr.trim()),
        });
    }
    Ok(())
}

/// Drops the relay's tables with `psql`, so that the next relay started on `pg` creates
/// its schema afresh (the relay has no migrations between unreleased layouts, and an A/B
/// comparison of two relay builds must not share rows). Only for a scratch database.
pub fn reset_pg(pg: &PgTarget) -> Result<(), BenchError> {
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            &pg.host,
            "-p",
            &pg.port.to_string(),
            "-U",
            &pg.user,
            "-d",
            &pg.dbname,
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            "DROP TABLE IF EXISTS messages, sent_ids, profiles, channel_members, \
             dchat_schema_migrations CASCADE",
        ])
        .env("PGPASSWORD", &pg.password)
        .output()
        .map_err(|source| BenchError::Io {
            what: "running psql to drop the relay's tables".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(BenchError::Server {
            what: "postgres".into(),
            reason: format!(
                "dropping the relay's tables failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

async fn run_relay_phases(
    url: &str,
    relay: &mut RelayInstance,
    system: &str,
    p: &Params,
) -> Result<Report, BenchError> {
    let plan = Plan::new(p);
    let keys = gen_keys("recipient", p.recipients)?;
    let sender_keys = gen_keys("sender", p.senders)?;
    let shared = Arc::new(PutShared {
        url: url.to_string(),
        recipients: keys.iter().map(public_key).collect(),
        payload: vec![b's'; p.payload],
        random_payload: false,
        window: p.window,
        acked: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        deadline: Instant::now() + p.phase_timeout,
    });
    let states: Vec<Arc<Mutex<SenderState>>> = sender_states(&plan);
    let mut report = Report {
        system: system.to_string(),
        messages: p.messages as u64,
        ..Report::default()
    };

    // Put phase.
    let cpu0 = relay.pid().map(|pid| procs::cpu_time(Some(pid)));
    let gen0 = procs::cpu_time(None);
    let t0 = Instant::now();
    let all_sent = spawn_senders(&shared, &plan, &sender_keys, &states);
    let done = AtomicBool::new(false);
    let senders = async {
        let res = all_sent.await;
        done.store(true, Ordering::Release);
        res
    };
    let killer = async {
        let Some(at) = p.kill else {
            return Ok::<_, BenchError>(None);
        };
        loop {
            if done.load(Ordering::Acquire) {
                return Ok(None);
            }
            let due = match at {
                KillAt::Secs(s) => t0.elapsed().as_secs_f64() >= s,
                KillAt::Acked(n) => shared.acked.load(Ordering::Relaxed) >= n,
            };
            if due {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        relay.kill9().await;
        let acked_at_kill = shared.acked.load(Ordering::Relaxed);
        let k0 = Instant::now();
        relay.start().await?;
        Ok(Some((acked_at_kill, k0.elapsed().as_secs_f64())))
    };
    let (sent_res, kill_res) = tokio::join!(senders, killer);
    let killed = kill_res?;
    sent_res?;
    put_figures(&states, t0, gen0, &mut report);
    report.reconnects = shared.reconnects.load(Ordering::Relaxed);
    if let Some((a, r)) = killed {
        report.acked_at_kill = Some(a);
        report.restart_secs = Some(r);
    } else if let (Some(c0), Some(pid)) = (cpu0, relay.pid()) {
        let used = procs::cpu_time(Some(pid)).saturating_sub(c0);
        report.server_cpu = Some(used.as_secs_f64() / report.put_secs.max(1e-9));
    }

    // Drain phase: the first drain_recipients reconnect and drain, timed.
    let deadline = Instant::now() + p.phase_timeout;
    let dcpu0 = relay.pid().map(|pid| (pid, procs::cpu_time(Some(pid))));
    let dgen0 = procs::cpu_time(None);
    let t1 = Instant::now();
    let timed = drain_relay(url, &keys[..p.drain_recipients], p.drain_parallel, deadline).await?;
    report.drain_secs = t1.elapsed().as_secs_f64();
    report.drain_gen_cpu =
        procs::cpu_time(None).saturating_sub(dgen0).as_secs_f64() / report.drain_secs.max(1e-9);
    report.drain_server_cpu = dcpu0.map(|(pid, c0)| {
        procs::cpu_time(Some(pid)).saturating_sub(c0).as_secs_f64() / report.drain_secs.max(1e-9)
    });
    report.drained = timed.iter().map(|d| d.len() as u64).sum();
    report.drained_per_sec = report.drained as f64 / report.drain_secs.max(1e-9);
    let mut inboxes: Vec<Vec<(KeyHex, String)>> = timed;
    if p.verify_all || p.kill.is_some() {
        let deadline = Instant::now() + p.phase_timeout;
        let rest =
            drain_relay(url, &keys[p.drain_recipients..], p.drain_parallel, deadline).await?;
        inboxes.extend(rest);
    }
    let sender_pubs: Vec<KeyHex> = sender_keys.iter().map(public_key).collect();
    verify(&mut report, &plan, &states, &inboxes, Some(&sender_pubs));
    Ok(report)
}

/// Starts one task per sender of `plan`; the returned future ends when every sender is
/// done, with the first error.
fn spawn_senders(
    shared: &Arc<PutShared>,
    plan: &Plan,
    sender_keys: &[SigningKey],
    states: &[Arc<Mutex<SenderState>>],
) -> impl std::future::Future<Output = Result<(), BenchError>> {
    let handles: Vec<_> = plan
        .to
        .iter()
        .enumerate()
        .map(|(s, to)| {
            tokio::spawn(run_sender(
                shared.clone(),
                s,
                sender_keys[s].clone(),
                Arc::new(to.clone()),
                states[s].clone(),
            ))
        })
        .collect();
    async move {
        let mut res = Ok(());
        for h in handles {
            let r = h.await.map_err(|e| BenchError::Run {
                what: "sender task".into(),
                reason: e.to_string(),
            });
            if let Err(e) = r.and_then(|r| r) {
                if res.is_ok() {
                    res = Err(e);
                }
            }
        }
        res
    }
}

/// What [`fill`] stored in a relay: the plan, the keys and the acknowledgements — enough
/// to check any recipient's inbox later, in that relay or in another one restored from
/// its backup.
pub struct Filled {
    plan: Plan,
    recipients: Vec<SigningKey>,
    sender_pubs: Vec<KeyHex>,
    states: Vec<Arc<Mutex<SenderState>>>,
    /// The put phase's figures (acknowledged, put seconds and rate, ack latency, CPU).
    pub report: Report,
}

/// The put phase of S3 alone: `p.messages` messages to `p.recipients` offline recipients
/// (spread at random; `drain_*` of `p` should be 0), pipelined by `p.senders` senders,
/// each message with its own random payload of `p.payload` bytes (incompressible, like
/// end-to-end encrypted content). `relay_pid` is measured for the CPU column. Fails
/// unless every message was acknowledged (stored durably) within `p.phase_timeout`.
pub async fn fill(url: &str, p: &Params, relay_pid: Option<u32>) -> Result<Filled, BenchError> {
    p.validate()?;
    let plan = Plan::new(p);
    let recipients = gen_keys("recipient", p.recipients)?;
    let sender_keys = gen_keys("sender", p.senders)?;
    let shared = Arc::new(PutShared {
        url: url.to_string(),
        recipients: recipients.iter().map(public_key).collect(),
        payload: vec![0; p.payload],
        random_payload: true,
        window: p.window,
        acked: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        deadline: Instant::now() + p.phase_timeout,
    });
    let states = sender_states(&plan);
    let mut report = Report {
        system: "relay".into(),
        messages: p.messages as u64,
        ..Report::default()
    };
    let cpu0 = relay_pid.map(|pid| (pid, procs::cpu_time(Some(pid))));
    let gen0 = procs::cpu_time(None);
    let t0 = Instant::now();
    spawn_senders(&shared, &plan, &sender_keys, &states).await?;
    put_figures(&states, t0, gen0, &mut report);
    report.reconnects = shared.reconnects.load(Ordering::Relaxed);
    if let Some((pid, c0)) = cpu0 {
        let used = procs::cpu_time(Some(pid)).saturating_sub(c0);
        report.server_cpu = Some(used.as_secs_f64() / report.put_secs.max(1e-9));
    }
    if report.acked != p.messages as u64 {
        return Err(BenchError::Run {
            what: "fill".into(),
            reason: format!("{} of {} messages acknowledged", report.acked, p.messages),
        });
    }
    Ok(Filled {
        plan,
        recipients,
        sender_pubs: sender_keys.iter().map(public_key).collect(),
        states,
        report,
    })
}

impl Filled {
    /// Recipients the messages were spread over.
    pub fn recipients(&self) -> usize {
        self.recipients.len()
    }

    /// Drains (fetch and ack) the inboxes of the first `n` recipients from the relay at
    /// `url`, `parallel` at a time, and checks them against the plan: every message
    /// there, once, from its sender, nothing else. The report has `drained`,
    /// `verified_recipients`, `verified_acked`, `lost`, `duplicates` and `unexpected`.
    pub async fn check(
        &self,
        url: &str,
        n: usize,
        parallel: usize,
        timeout: Duration,
    ) -> Result<Report, BenchError> {
        let n = n.min(self.recipients.len());
        let deadline = Instant::now() + timeout;
        let inboxes = drain_relay(url, &self.recipients[..n], parallel, deadline).await?;
        let mut r = Report {
            system: "relay".into(),
            drained: inboxes.iter().map(|d| d.len() as u64).sum(),
            ..Report::default()
        };
        verify(
            &mut r,
            &self.plan,
            &self.states,
            &inboxes,
            Some(&self.sender_pubs),
        );
        Ok(r)
    }
}

fn gen_keys(what: &str, n: usize) -> Result<Vec<SigningKey>, BenchError> {
    (0..n)
        .map(|i| {
            generate_key().map_err(|e| BenchError::Run {
                what: format!("{what} {i} key"),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Connects every key, fetches and acknowledges until its inbox is empty; returns the
/// (sender, id) of every message drained, per key, in key order.
async fn drain_relay(
    url: &str,
    keys: &[SigningKey],
    parallel: usize,
    deadline: Instant,
) -> Result<Vec<Vec<(KeyHex, String)>>, BenchError> {
    let jobs = keys.iter().enumerate().map(|(i, k)| async move {
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(remaining, drain_one(url, k.clone()))
            .await
            .map_err(|_| BenchError::Run {
                what: format!("draining recipient {i}"),
                reason: "drain phase timed out".into(),
            })?
            .map_err(|e| BenchError::Run {
                what: format!("draining recipient {i}"),
                reason: e.to_string(),
            })
    });
    let out: Vec<Result<Vec<(KeyHex, String)>, BenchError>> = futures::stream::iter(jobs)
        .buffered(parallel.max(1))
        .collect()
        .await;
    out.into_iter().collect()
}

async fn drain_one(
    url: &str,
    key: SigningKey,
) -> Result<Vec<(KeyHex, String)>, dchat_relay::client::ClientError> {
    let mut c = Client::connect(url, key).await?;
    let mut got = Vec::new();
    loop {
        let (ds, more) = c.fetch(FETCH_LIMIT).await?;
        if ds.is_empty() && !more {
            break;
        }
        let refs: Vec<_> = ds.iter().map(|d| d.ack_ref()).collect();
        got.extend(
            ds.into_iter()
                .map(|d| (d.envelope.from.unwrap_or(KeyHex([0; 32])), d.envelope.id)),
        );
        // Quiet: the next fetch is answered after these acks are applied (a connection's
        // frames are handled in order), so waiting for an answer would only add a round trip.
        for chunk in refs.chunks(ACK_CHUNK) {
            c.ack_quiet(chunk.to_vec()).await?;
        }
    }
    c.close().await;
    Ok(got)
}

/// Compares what was drained with the plan: `inboxes[r]` are the messages drained for
/// recipient `r` (in recipient order from 0). `sender_keys` checks the `from` field
/// when given (the relay run); Redis values carry no sender key.
fn verify(
    report: &mut Report,
    plan: &Plan,
    states: &[Arc<Mutex<SenderState>>],
    inboxes: &[Vec<(KeyHex, String)>],
    sender_keys: Option<&[KeyHex]>,
) {
    let n = inboxes.len();
    // expected[r]: acknowledged (sender, n) to recipient r, for the checked recipients.
    let mut expected: Vec<HashMap<(usize, usize), u32>> = vec![HashMap::new(); n];
    for (s, to) in plan.to.iter().enumerate() {
        let st = states[s].lock().unwrap_or_else(|e| e.into_inner());
        for (m, &r) in to.iter().enumerate() {
            let r = r as usize;
            if r < n {
                // 0 = planned but not acknowledged, 1 = acknowledged.
                expected[r].insert((s, m), u32::from(st.state[m] == ACKED));
            }
        }
    }
    report.verified_recipients = n as u64;
    for (r, inbox) in inboxes.iter().enumerate() {
        let exp = &expected[r];
        report.verified_acked += exp.values().filter(|&&a| a == 1).count() as u64;
        let mut seen: HashMap<(usize, usize), u32> = HashMap::new();
        for (from, id) in inbox {
            let from_ok = |s: usize| sender_keys.is_none_or(|keys| keys.get(s) == Some(from));
            match parse_id(id) {
                Some(k) if exp.contains_key(&k) && from_ok(k.0) => *seen.entry(k).or_default() += 1,
                _ => report.unexpected += 1,
            }
        }
        for (k, &acked) in exp {
            let c = seen.get(k).copied().unwrap_or(0);
            if acked == 1 && c == 0 {
                report.lost += 1;
            }
            report.duplicates += u64::from(c.saturating_sub(1));
        }
    }
}

/// Runs S3 against Redis (`appendfsync always`) pinned to `cpu`: `RPUSH` per recipient
/// list, drain with `LPOP key count`.
pub async fn run_redis(cpu: Option<usize>, p: &Params) -> Result<Report, BenchError> {
    p.validate()?;
    if p.kill.is_some() {
        return Err(BenchError::Run {
            what: "redis".into(),
            reason: "the kill -9 check is for the relay only".into(),
        });
    }
    let port = procs::free_port()?;
    let dir = procs::scratch_dir("s3-redis")?;
    let args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--dir",
        &dir.display().to_string(),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--maxclients",
        "20000",
        "--protected-mode",
        "yes",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let proc_ = procs::spawn("redis", cpu, Path::new("redis-server"), &args, &[], dir)?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    procs::wait_port("redis", addr, Duration::from_secs(30)).await?;
    let client =
        redis::Client::open(format!("redis://{addr}/")).map_err(|e| BenchError::Server {
            what: "redis".into(),
            reason: e.to_string(),
        })?;
    let plan = Plan::new(p);
    let states: Vec<Arc<Mutex<SenderState>>> = sender_states(&plan);
    let mut report = Report {
        system: "redis-rpush".into(),
        messages: p.messages as u64,
        ..Report::default()
    };
    let deadline = Instant::now() + p.phase_timeout;
    let cpu0 = procs::cpu_time(Some(proc_.pid));
    let gen0 = procs::cpu_time(None);
    let t0 = Instant::now();
    let handles: Vec<_> = plan
        .to
        .iter()
        .enumerate()
        .map(|(s, to)| {
            let client = client.clone();
            let to = to.clone();
            let st = states[s].clone();
            let payload = vec![b's'; p.payload];
            let window = p.window;
            tokio::spawn(
                async move { redis_sender(client, s, to, st, payload, window, deadline).await },
            )
        })
        .collect();
    for h in handles {
        h.await.map_err(|e| BenchError::Run {
            what: "redis sender task".into(),
            reason: e.to_string(),
        })??;
    }
    put_figures(&states, t0, gen0, &mut report);
    let used = procs::cpu_time(Some(proc_.pid)).saturating_sub(cpu0);
    report.server_cpu = Some(used.as_secs_f64() / report.put_secs.max(1e-9));

    let deadline = Instant::now() + p.phase_timeout;
    let dcpu0 = procs::cpu_time(Some(proc_.pid));
    let dgen0 = procs::cpu_time(None);
    let t1 = Instant::now();
    let timed = redis_drain(&client, 0..p.drain_recipients, p.drain_parallel, deadline).await?;
    report.drain_secs = t1.elapsed().as_secs_f64();
    report.drain_gen_cpu =
        procs::cpu_time(None).saturating_sub(dgen0).as_secs_f64() / report.drain_secs.max(1e-9);
    report.drain_server_cpu = Some(
        procs::cpu_time(Some(proc_.pid))
            .saturating_sub(dcpu0)
            .as_secs_f64()
            / report.drain_secs.max(1e-9),
    );
    report.drained = timed.iter().map(|d| d.len() as u64).sum();
    report.drained_per_sec = report.drained as f64 / report.drain_secs.max(1e-9);
    let mut inboxes = timed;
    if p.verify_all {
        let rest = redis_drain(
            &client,
            p.drain_recipients..p.recipients,
            p.drain_parallel,
            Instant::now() + p.phase_timeout,
        )
        .await?;
        inboxes.extend(rest);
    }
    verify(&mut report, &plan, &states, &inboxes, None);
    drop(proc_);
    Ok(report)
}

fn redis_key(r: usize) -> String {
    format!("s3:inbox:{r}")
}

async fn redis_sender(
    client: redis::Client,
    sender: usize,
    to: Vec<u32>,
    st: Arc<Mutex<SenderState>>,
    payload: Vec<u8>,
    window: usize,
    deadline: Instant,
) -> Result<(), BenchError> {
    let err = |reason: String| BenchError::Run {
        what: format!("redis sender {sender}"),
        reason,
    };
    let con = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut next = 0usize;
    let mut done = 0usize;
    while done < to.len() {
        while inflight.len() < window && next < to.len() {
            let n = next;
            next += 1;
            // Value: id ‖ 0x00 ‖ payload, so the drain can check what it got.
            let mut v = message_id(sender, n).into_bytes();
            v.push(0);
            v.extend_from_slice(&payload);
            let key = redis_key(to[n] as usize);
            let mut con = con.clone();
            let started = Instant::now();
            inflight.push(async move {
                let r: redis::RedisResult<i64> = redis::cmd("RPUSH")
                    .arg(key)
                    .arg(v)
                    .query_async(&mut con)
                    .await;
                (n, started, r)
            });
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((n, started, r))) = tokio::time::timeout(remaining, inflight.next()).await
        else {
            return Err(err("put phase timed out".into()));
        };
        r.map_err(|e| err(format!("RPUSH: {e}")))?;
        let now = Instant::now();
        let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
        s.state[n] = ACKED;
        s.acked += 1;
        s.last_ack = Some(now);
        let _ = s
            .hist
            .record((now.duration_since(started).as_micros() as u64).max(1));
        done += 1;
    }
    Ok(())
}

async fn redis_drain(
    client: &redis::Client,
    recipients: std::ops::Range<usize>,
    parallel: usize,
    deadline: Instant,
) -> Result<Vec<Vec<(KeyHex, String)>>, BenchError> {
    let jobs = recipients.map(|r| {
        let client = client.clone();
        async move {
            let err = |reason: String| BenchError::Run {
                what: format!("redis drain of recipient {r}"),
                reason,
            };
            let run = async {
                let mut con = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| err(e.to_string()))?;
                let mut got = Vec::new();
                loop {
                    let vals: Option<Vec<Vec<u8>>> = redis::cmd("LPOP")
                        .arg(redis_key(r))
                        .arg(FETCH_LIMIT)
                        .query_async(&mut con)
                        .await
                        .map_err(|e| err(format!("LPOP: {e}")))?;
                    let Some(vals) = vals else { break };
                    if vals.is_empty() {
                        break;
                    }
                    for v in vals {
                        let id_end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
                        let id = String::from_utf8_lossy(&v[..id_end]).into_owned();
                        got.push((KeyHex([0; 32]), id));
                    }
                }
                Ok::<_, BenchError>(got)
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            tokio::time::timeout(remaining, run)
                .await
                .map_err(|_| err("drain phase timed out".into()))?
        }
    });
    let out: Vec<Result<_, BenchError>> = futures::stream::iter(jobs)
        .buffered(parallel.max(1))
        .collect()
        .await;
    out.into_iter().collect()
}

/// The filesystem type holding `path` (from /proc/mounts, longest mount prefix), so the
/// output can show the data is on a disk and not on tmpfs.
pub fn fs_type(path: &Path) -> String {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return "unknown".into();
    };
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        if path.starts_with(f[1]) && best.as_ref().is_none_or(|(l, _)| f[1].len() > *l) {
            best = Some((f[1].len(), format!("{} ({})", f[2], f[0])));
        }
    }
    best.map(|b| b.1).unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            recipients: 20,
            senders: 3,
            messages: 100,
            window: 4,
            payload: 8,
            drain_recipients: 5,
            drain_per_recipient: 10,
            drain_parallel: 2,
            kill: None,
            verify_all: true,
            phase_timeout: Duration::from_secs(1),
            seed: 1,
        }
    }

    #[test]
    fn plan_gives_each_drain_recipient_exactly_its_share() {
        let p = params();
        let plan = Plan::new(&p);
        let mut per = vec![0usize; p.recipients];
        for to in &plan.to {
            for &r in to {
                per[r as usize] += 1;
            }
        }
        assert_eq!(per.iter().sum::<usize>(), 100);
        assert!(per[..5].iter().all(|&n| n == 10), "{per:?}");
        assert_eq!(per[5..].iter().sum::<usize>(), 50);
        // Round-robin over senders.
        assert_eq!(
            plan.to.iter().map(Vec::len).collect::<Vec<_>>(),
            [34, 33, 33]
        );
    }

    #[test]
    fn ids_roundtrip_and_bad_ones_are_rejected() {
        assert_eq!(parse_id(&message_id(12, 345)), Some((12, 345)));
        assert_eq!(parse_id("s3-1"), None);
        assert_eq!(parse_id("x-1-2"), None);
        assert_eq!(parse_id("s3-a-2"), None);
    }

    #[test]
    fn invalid_sizes_are_refused() {
        let mut p = params();
        p.messages = 40;
        assert!(p.validate().unwrap_err().to_string().contains("--messages"));
        let mut p = params();
        p.drain_recipients = 21;
        assert!(p.validate().is_err());
        assert!(params().validate().is_ok());
    }

    /// The checker counts a missing acknowledged message as lost, a second copy as a
    /// duplicate and a foreign or wrongly attributed one as unexpected; an unacknowledged
    /// message may be missing.
    #[test]
    fn verify_finds_lost_duplicate_and_unexpected_messages() {
        let p = params();
        let plan = Plan::new(&p);
        let states: Vec<Arc<Mutex<SenderState>>> = plan
            .to
            .iter()
            .map(|to| {
                Arc::new(Mutex::new(SenderState {
                    state: vec![ACKED; to.len()],
                    sent_at: vec![None; to.len()],
                    acked: to.len(),
                    hist: new_hist(),
                    duplicates: 0,
                    errors: 0,
                    last_ack: None,
                }))
            })
            .collect();
        let keys: Vec<KeyHex> = (0..3u8).map(|i| KeyHex([i; 32])).collect();
        let mut inboxes: Vec<Vec<(KeyHex, String)>> = vec![Vec::new(); p.recipients];
        for (s, to) in plan.to.iter().enumerate() {
            for (n, &r) in to.iter().enumerate() {
                inboxes[r as usize].push((keys[s], message_id(s, n)));
            }
        }
        let check = |inboxes: &[Vec<(KeyHex, String)>]| {
            let mut r = Report::default();
            verify(&mut r, &plan, &states, inboxes, Some(&keys));
            r
        };
        let r = check(&inboxes);
        assert_eq!(
            (r.verified_acked, r.lost, r.duplicates, r.unexpected),
            (100, 0, 0, 0)
        );
        assert!(r.consistent());

        let mut bad = inboxes.clone();
        let gone = bad[0].pop().unwrap();
        let copy = bad[1][0].clone();
        bad[1].push(copy);
        bad[2].push((keys[0], "s3-0-99999".into()));
        // Right id, wrong sender key.
        let (_, id) = bad[3][0].clone();
        bad[3][0] = (KeyHex([9; 32]), id);
        let r = check(&bad);
        assert_eq!((r.lost, r.duplicates, r.unexpected), (2, 1, 2), "{r:?}");
        assert!(!r.consistent());

        // A message never acknowledged may be missing without counting as lost.
        let (s, n) = parse_id(&gone.1).unwrap();
        states[s].lock().unwrap().state[n] = IN_FLIGHT;
        let mut partial = inboxes.clone();
        partial[0].pop();
        let r = check(&partial);
        assert_eq!((r.verified_acked, r.lost), (99, 0));
    }
}
