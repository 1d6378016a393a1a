//! S5's hostile connections and probes: sockets that never complete a request head
//! (silent ones, and ones that send one byte of a head a second), each reopened as soon
//! as the relay closes it so that the flood stays at full size for the whole run; a
//! `/health` prober; reading counters from `/metrics`.
//!
//! The flood runs on a thread and runtime of its own, so that its 10,000 tasks do not
//! queue in front of the load clients' tasks on the generator's runtime (it still shares
//! the generator's CPU when the process is pinned).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::BenchError;

/// The start of a WebSocket upgrade request; a dripping socket sends one byte of it a
/// second and never reaches its end.
const HEAD: &[u8] =
    b"GET /v1/ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";

/// Pause before reconnecting after a failed connect (e.g. a full accept queue).
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// Counters of a running flood.
#[derive(Debug, Default)]
pub struct FloodStats {
    /// Connections opened (reconnections included).
    pub opened: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections the relay closed.
    pub closed: AtomicU64,
    /// Failed connects.
    pub connect_errors: AtomicU64,
}

/// A running flood; [`Flood::stop`] ends it.
pub struct Flood {
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
    /// Its counters.
    pub stats: Arc<FloodStats>,
}

impl Flood {
    /// Starts `silent` silent and `dripping` dripping sockets against `addr`.
    pub fn start(addr: SocketAddr, silent: usize, dripping: usize) -> Result<Flood, BenchError> {
        let (stop, rx) = watch::channel(false);
        let stats = Arc::new(FloodStats::default());
        let st = stats.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| BenchError::Io {
                what: "starting the flood's runtime".into(),
                source,
            })?;
        let thread = std::thread::Builder::new()
            .name("loadgen-flood".into())
            .spawn(move || {
                rt.block_on(async move {
                    let tasks: Vec<_> = (0..silent + dripping)
                        .map(|i| tokio::spawn(hostile(addr, i >= silent, st.clone(), rx.clone())))
                        .collect();
                    for t in tasks {
                        let _ = t.await;
                    }
                });
            })
            .map_err(|source| BenchError::Io {
                what: "starting the flood's thread".into(),
                source,
            })?;
        Ok(Flood {
            stop,
            thread,
            stats,
        })
    }

    /// Closes every socket and waits for the flood's thread.
    pub fn stop(self) -> Arc<FloodStats> {
        let _ = self.stop.send(true);
        let _ = self.thread.join();
        self.stats
    }
}

/// One hostile socket, reopened whenever the relay closes it, until `stop`.
async fn hostile(
    addr: SocketAddr,
    drip: bool,
    st: Arc<FloodStats>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let s = tokio::select! {
            _ = stop.changed() => return,
            s = TcpStream::connect(addr) => s,
        };
        let Ok(s) = s else {
            st.connect_errors.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(RECONNECT_PAUSE) => continue,
            }
        };
        st.opened.fetch_add(1, Ordering::Relaxed);
        st.open.fetch_add(1, Ordering::Relaxed);
        let closed = tokio::select! {
            _ = stop.changed() => false,
            () = until_closed(s, drip) => true,
        };
        st.open.fetch_sub(1, Ordering::Relaxed);
        if !closed {
            return;
        }
        st.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits until the relay closes `s` (end of stream, reset, or a failed write), sending
/// one byte of [`HEAD`] a second when `drip`.
pub async fn until_closed(s: TcpStream, drip: bool) {
    let (mut r, mut w) = s.into_split();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sent = 0;
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = tick.tick(), if drip && sent < HEAD.len() => {
                if w.write_all(&HEAD[sent..=sent]).await.is_err() {
                    return;
                }
                sent += 1;
            }
        }
    }
}

/// `GET path` on a fresh connection: the status and the whole response.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), BenchError> {
    let err = |reason: String| BenchError::Run {
        what: format!("GET {path} on {addr}"),
        reason,
    };
    let once = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| err(e.to_string()))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| err(e.to_string()))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .await
            .map_err(|e| err(e.to_string()))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| err(format!("no status line in {text:?}")))?;
        Ok((status, text))
    };
    tokio::time::timeout(Duration::from_secs(10), once)
        .await
        .map_err(|_| err("no answer within 10 s".into()))?
}

/// The value of the series `series` (name with labels, e.g.
/// `dchat_handshake_timeouts_total{listener="client"}`) in a Prometheus exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// What the `/health` prober saw.
#[derive(Debug, Default, Clone)]
pub struct HealthProbes {
    /// Latency of each answered probe.
    pub latencies: Vec<Duration>,
    /// Probes that failed or were not answered 200.
    pub failures: u64,
}

impl HealthProbes {
    /// The `q` quantile of the latencies (zero when there are none).
    pub fn quantile(&self, q: f64) -> Duration {
        let mut v = self.latencies.clone();
        v.sort();
        match v.len() {
            0 => Duration::ZERO,
            n => v[((n - 1) as f64 * q).round() as usize],
        }
    }
}

/// Asks `/health` on `addr` every `every` (a fresh connection each time) until `stop`.
pub async fn probe_health(
    addr: SocketAddr,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> HealthProbes {
    let mut out = HealthProbes::default();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.changed() => return out,
            _ = tick.tick() => {}
        }
        let t0 = Instant::now();
        match get(addr, "/health").await {
            Ok((200, _)) => out.latencies.push(t0.elapsed()),
            _ => out.failures += 1,
        }
    }
}
