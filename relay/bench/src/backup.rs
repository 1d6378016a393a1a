//! Backup and restore of a large store (issue 20): the processes of
//! `dchat-loadgen backup` and what it measures of them.
//!
//! - [`Relay`]: a relay process on the embedded store (a data directory on disk) or on
//!   PostgreSQL, with its admin API on the metrics port.
//! - [`Moto`]: a private moto server (the S3 API emulator of the tests) with one bucket.
//! - [`run_tool`]: runs one `dchat backup …` process and measures its wall time, its peak
//!   RSS (`VmHWM`) and CPU time, and the RSS and CPU time of other processes (the relay,
//!   moto) over the same interval.
//!
//! The fill itself (messages to offline recipients through the relay's client protocol)
//! is [`crate::s3::fill`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::procs::{self, ServerProc};
use crate::s3::PgTarget;
use crate::BenchError;

/// The admin token of every relay the benchmark starts (at least 16 characters).
pub const ADMIN_TOKEN: &str = "dchat-bench-backup-admin-token";
/// The region given to `dchat backup` (moto accepts any).
pub const REGION: &str = "us-east-1";
/// How often [`run_tool`] samples `/proc`.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// The programs and where they run.
#[derive(Clone, Debug)]
pub struct Tools {
    /// `dchat-relay`.
    pub relay: PathBuf,
    /// `dchat` (the backup command).
    pub dchat: PathBuf,
    /// `moto_server`.
    pub moto: PathBuf,
    /// CPU the relays are pinned to (`taskset`), if any.
    pub server_cpu: Option<usize>,
    /// CPU `dchat` and moto are pinned to, if any.
    pub tool_cpu: Option<usize>,
}

/// Where a relay keeps its data.
#[derive(Clone, Debug)]
pub enum StoreAt {
    /// The embedded store, in a new directory under this one (removed with the relay).
    Embedded(PathBuf),
    /// A PostgreSQL database.
    Postgres(PgTarget),
}

/// A running relay (killed, and its embedded data directory removed, on drop).
pub struct Relay {
    proc_: ServerProc,
    /// Its client WebSocket URL.
    pub ws_url: String,
    /// Its admin API (`http://127.0.0.1:<metrics port>`).
    pub admin_url: String,
    data_dir: Option<PathBuf>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(d) = &self.data_dir {
            // Kill first: the store must not be written while its files go.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &self.proc_.pid.to_string()])
                .status();
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Relay {
    /// Starts a relay on `store` and waits until both its ports accept connections.
    pub async fn start(tools: &Tools, store: &StoreAt, tag: &str) -> Result<Relay, BenchError> {
        let port = procs::free_port()?;
        let mport = procs::free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let maddr: SocketAddr = ([127, 0, 0, 1], mport).into();
        let mut env: Vec<(String, String)> = [
            ("DCHAT_LISTEN", addr.to_string()),
            ("DCHAT_METRICS_LISTEN", maddr.to_string()),
            ("DCHAT_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
            // The fill sends far above a phone's rate; the limiter is not under test.
            ("DCHAT_RATE_PER_SEC", "1000000".into()),
            ("DCHAT_RATE_BURST", "1000000".into()),
            ("RUST_LOG", "warn".into()),
            // A single relay: nothing inherited may add peers.
            ("DCHAT_PEERS", String::new()),
            ("DCHAT_PEER_DNS", String::new()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut data_dir = None;
        match store {
            StoreAt::Embedded(root) => {
                let d = root.join(format!(
                    "dchat-backup-bench-{}-{tag}-{}",
                    std::process::id(),
                    port
                ));
                std::fs::create_dir_all(&d).map_err(|source| BenchError::Io {
                    what: format!("creating {}", d.display()),
                    source,
                })?;
                env.push(("DCHAT_DATA_DIR".into(), d.display().to_string()));
                // An inherited DB_HOST (scripts/with-postgres.sh) would select PostgreSQL.
                env.push(("DB_HOST".into(), String::new()));
                data_dir = Some(d);
            }
            StoreAt::Postgres(pg) => env.extend(pg_env(pg)),
        }
        let dir = procs::scratch_dir(&format!("backup-relay-{tag}"))?;
        let proc_ = procs::spawn(
            &format!("relay {tag}"),
            tools.server_cpu,
            &tools.relay,
            &[],
            &env,
            dir,
        )?;
        let relay = Relay {
            proc_,
            ws_url: format!("ws://{addr}/v1/ws"),
            admin_url: format!("http://{maddr}"),
            data_dir,
        };
        procs::wait_port("relay", addr, Duration::from_secs(120)).await?;
        procs::wait_port("relay admin", maddr, Duration::from_secs(30)).await?;
        Ok(relay)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc_.pid
    }

    /// `GET /admin/stats`.
    pub async fn stats(&self) -> Result<serde_json::Value, BenchError> {
        let admin = dchat_relay::backup::source::Admin::new(&self.admin_url, ADMIN_TOKEN.into())
            .map_err(|e| BenchError::Server {
                what: "relay admin".into(),
                reason: e.to_string(),
            })?;
        admin.stats().await.map_err(|e| BenchError::Server {
            what: "relay admin".into(),
            reason: e.to_string(),
        })
    }

    /// The store's pending messages, from `/admin/stats`.
    pub async fn pending_messages(&self) -> Result<u64, BenchError> {
        let stats = self.stats().await?;
        stats["store"]["pending_messages"]
            .as_u64()
            .ok_or_else(|| BenchError::Server {
                what: "relay admin".into(),
                reason: format!("/admin/stats has no store.pending_messages: {stats}"),
            })
    }

    /// Bytes under its embedded data directory (0 on PostgreSQL).
    pub fn data_bytes(&self) -> u64 {
        self.data_dir.as_deref().map(dir_bytes).unwrap_or(0)
    }

    /// Waits until the relay is idle — less than 3 % of a core over one second, e.g.
    /// after the fill, when the store may still be flushing and compacting — for at
    /// most `within`. Returns how long it waited.
    pub async fn settle(&self, within: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let c0 = procs::cpu_time(Some(self.pid()));
            tokio::time::sleep(Duration::from_secs(1)).await;
            let used = procs::cpu_time(Some(self.pid())).saturating_sub(c0);
            if used < Duration::from_millis(30) || t0.elapsed() >= within {
                return t0.elapsed();
            }
        }
    }
}

/// `DB_*` of a PostgreSQL database, as the relays and `dchat backup` read them.
pub fn pg_env(pg: &PgTarget) -> Vec<(String, String)> {
    vec![
        ("DB_HOST".into(), pg.host.clone()),
        ("DB_PORT".into(), pg.port.to_string()),
        ("DB_NAME".into(), pg.dbname.clone()),
        ("DB_USER".into(), pg.user.clone()),
        ("DB_PASSWORD".into(), pg.password.clone()),
    ]
}

/// Runs one SQL statement with `psql` on `pg` (outside a transaction, so `CREATE
/// DATABASE` works); returns its unaligned, tuples-only output.
pub fn psql(pg: &PgTarget, sql: &str) -> Result<String, BenchError> {
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
            "-qAt",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", &pg.password)
        .output()
        .map_err(|source| BenchError::Io {
            what: "running psql".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(BenchError::Server {
            what: "postgres".into(),
            reason: format!("{sql}: {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Total size of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A private moto server with one bucket (killed on drop; its spooled objects are
/// unlinked temporary files, gone with the process).
pub struct Moto {
    proc_: ServerProc,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The bucket created for the run.
    pub bucket: String,
}

impl Moto {
    /// Starts `tools.moto` on a free port, waits until it answers, creates a bucket.
    pub async fn start(tools: &Tools) -> Result<Moto, BenchError> {
        let port = procs::free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let dir = procs::scratch_dir("moto")?;
        let env = vec![("TMPDIR".to_string(), dir.display().to_string())];
        let args: Vec<String> = vec![
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        let proc_ = procs::spawn("moto", tools.tool_cpu, &tools.moto, &args, &env, dir)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http(addr, "GET", "/moto-api/").await {
                break;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Server {
                    what: "moto".into(),
                    reason: format!(
                        "{} does not answer on {addr} after 60 s",
                        tools.moto.display()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let bucket = format!("dchat-bench-{}", std::process::id());
        match http(addr, "PUT", &format!("/{bucket}")).await {
            Ok((200, _)) => {}
            Ok((status, body)) => {
                return Err(BenchError::Server {
                    what: "moto".into(),
                    reason: format!(
                        "creating bucket {bucket}: HTTP {status}: {}",
                        String::from_utf8_lossy(&body)
                    ),
                })
            }
            Err(reason) => {
                return Err(BenchError::Server {
                    what: "moto".into(),
                    reason: format!("creating bucket {bucket}: {reason}"),
                })
            }
        }
        Ok(Moto {
            proc_,
            endpoint: format!("http://{addr}"),
            bucket,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc_.pid
    }

    /// The S3 flags of `dchat backup` for this bucket (path-style, key prefix `bench`).
    pub fn s3_flags(&self) -> Vec<String> {
        [
            "--s3-bucket",
            &self.bucket,
            "--s3-prefix",
            "bench",
            "--s3-region",
            REGION,
            "--s3-endpoint",
            &self.endpoint,
            "--s3-force-path-style",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// One plain HTTP/1.1 request without a body (moto only); returns status and body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
    let run = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("not an HTTP answer: {:?}", text.lines().next()))?;
        let body = match buf.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => buf[i + 4..].to_vec(),
            None => Vec::new(),
        };
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}

/// Memory and CPU of one process over an operation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// RSS when the operation started, KiB.
    pub start_kib: u64,
    /// Peak RSS during the operation, KiB: `VmHWM` after resetting it at the start
    /// (`/proc/<pid>/clear_refs`), or the largest `VmRSS` sampled every 10 ms where the
    /// reset is not allowed — whichever is larger.
    pub peak_kib: u64,
    /// User + system CPU seconds during the operation.
    pub cpu_secs: f64,
}

/// What one `dchat` run did and cost.
#[derive(Clone, Debug, Default)]
pub struct ToolRun {
    /// Exit code (-1: killed by a signal).
    pub code: i32,
    /// Spawn to exit, seconds.
    pub secs: f64,
    /// Its stdout (the manifest or report, one line of JSON).
    pub stdout: String,
    /// Its stderr (logs, the error).
    pub stderr: String,
    /// The `dchat` process: its peak RSS is its `VmHWM`, the last one read before it
    /// exited (read every 10 ms).
    pub tool: Usage,
    /// The watched processes, in the order given.
    pub others: Vec<Usage>,
}

impl ToolRun {
    /// Its stdout as JSON, or an error naming the run.
    pub fn json(&self, what: &str) -> Result<serde_json::Value, BenchError> {
        if self.code != 0 {
            return Err(BenchError::Run {
                what: what.into(),
                reason: format!("dchat exited with {}: {}", self.code, self.stderr.trim()),
            });
        }
        serde_json::from_str(self.stdout.trim()).map_err(|e| BenchError::Run {
            what: what.into(),
            reason: format!("stdout is not JSON ({e}): {}", self.stdout.trim()),
        })
    }
}

/// One `/proc/<pid>/status` field in KiB (0 if unreadable).
fn status_kib(pid: u32, field: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The state letter of `pid` (`R`, `S`, `Z`, …), `None` when it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')').next()?.trim_start().chars().next()
}

/// Peak-RSS and CPU tracking of a process that outlives the operation.
struct Tracked {
    pid: u32,
    start_kib: u64,
    hwm_reset: bool,
    sampled_peak: u64,
    cpu0: Duration,
}

impl Tracked {
    fn start(pid: u32) -> Tracked {
        let start_kib = procs::rss_kib(pid);
        // "5" resets the peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0; allowed for
        // one's own processes).
        let hwm_reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
        Tracked {
            pid,
            start_kib,
            hwm_reset,
            sampled_peak: start_kib,
            cpu0: procs::cpu_time(Some(pid)),
        }
    }

    fn sample(&mut self) {
        self.sampled_peak = self.sampled_peak.max(procs::rss_kib(self.pid));
    }

    fn finish(mut self) -> Usage {
        self.sample();
        let hwm = if self.hwm_reset {
            status_kib(self.pid, "VmHWM:")
        } else {
            0
        };
        Usage {
            start_kib: self.start_kib,
            peak_kib: hwm.max(self.sampled_peak),
            cpu_secs: procs::cpu_time(Some(self.pid))
                .saturating_sub(self.cpu0)
                .as_secs_f64(),
        }
    }
}

/// Runs `dchat args` (with `env` on top of the S3 emulator's credentials) pinned to
/// `tools.tool_cpu`, measuring it and the processes `watch` until it exits.
pub async fn run_tool(
    tools: &Tools,
    args: Vec<String>,
    env: Vec<(String, String)>,
    watch: Vec<u32>,
) -> Result<ToolRun, BenchError> {
    let tools = tools.clone();
    tokio::task::spawn_blocking(move || run_tool_blocking(&tools, &args, &env, &watch))
        .await
        .map_err(|e| BenchError::Run {
            what: "dchat".into(),
            reason: e.to_string(),
        })?
}

fn run_tool_blocking(
    tools: &Tools,
    args: &[String],
    env: &[(String, String)],
    watch: &[u32],
) -> Result<ToolRun, BenchError> {
    let io = |what: &str, source: std::io::Error| BenchError::Io {
        what: what.to_string(),
        source,
    };
    let dir = procs::scratch_dir("dchat")?;
    let out_path = dir.join("stdout");
    let err_path = dir.join("stderr");
    let term = dir.join("termination-log");
    let stdout = std::fs::File::create(&out_path).map_err(|e| io("creating dchat's stdout", e))?;
    let stderr = std::fs::File::create(&err_path).map_err(|e| io("creating dchat's stderr", e))?;
    let mut cmd = match tools.tool_cpu {
        Some(c) => {
            let mut cmd = std::process::Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(&tools.dchat);
            cmd
        }
        None => std::process::Command::new(&tools.dchat),
    };
    cmd.args(args)
        // Only these credentials and no other AWS configuration of the caller.
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_ENDPOINT_URL_S3")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("DCHAT_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("DCHAT_TERMINATION_LOG", &term)
        .env("RUST_LOG", "warn")
        // A PostgreSQL source or target gets its DB_* in `env`.
        .env_remove("DB_HOST")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let mut others: Vec<Tracked> = watch.iter().map(|&p| Tracked::start(p)).collect();
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| io(&format!("starting {}", tools.dchat.display()), e))?;
    let pid = child.id();
    let mut hwm = 0u64;
    let mut cpu = Duration::ZERO;
    // Sample until it is a zombie (it exited but is not reaped yet: its CPU times are
    // still readable, its memory is gone), then reap it.
    let end = loop {
        match proc_state(pid) {
            Some('Z') | None => break t0.elapsed(),
            Some(_) => {}
        }
        hwm = hwm.max(status_kib(pid, "VmHWM:"));
        cpu = cpu.max(procs::cpu_time(Some(pid)));
        for o in &mut others {
            o.sample();
        }
        std::thread::sleep(SAMPLE_EVERY);
    };
    cpu = cpu.max(procs::cpu_time(Some(pid)));
    let status = child.wait().map_err(|e| io("waiting for dchat", e))?;
    let run = ToolRun {
        code: status.code().unwrap_or(-1),
        secs: end.as_secs_f64(),
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        tool: Usage {
            start_kib: 0,
            peak_kib: hwm,
            cpu_secs: cpu.as_secs_f64(),
        },
        others: others.into_iter().map(Tracked::finish).collect(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(run)
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Waits until the 1-minute load average is below `max` (a quiet machine), for at most
/// `within`; reports progress on stderr. Returns the load average when it stopped
/// waiting.
pub async fn wait_quiet(max: f64, within: Duration) -> f64 {
    let t0 = Instant::now();
    let mut told = None::<Instant>;
    loop {
        let load = load_average();
        if max <= 0.0 || load < max {
            return load;
        }
        if t0.elapsed() >= within {
            eprintln!(
                "backup: load average still {load:.2} ≥ {max} after {} s; measuring anyway",
                within.as_secs()
            );
            return load;
        }
        if told.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
            eprintln!("backup: waiting for load average {load:.2} < {max}");
            told = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampler reads this process's own state and memory.
    #[test]
    fn proc_fields_of_a_live_process() {
        let me = std::process::id();
        assert!(matches!(proc_state(me), Some('R' | 'S')));
        assert!(status_kib(me, "VmHWM:") > 0);
        assert_eq!(proc_state(u32::MAX), None);
    }
}
