//! Server processes for the benchmarks: started pinned to a CPU with `taskset`, bound to
//! 127.0.0.1 only, killed when dropped; CPU time and RSS read from `/proc`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::BenchError;

/// A running server process (killed on drop) and its scratch directory (removed on drop).
pub struct ServerProc {
    child: Child,
    /// Process id (for CPU and RSS sampling).
    pub pid: u32,
    dir: PathBuf,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl ServerProc {
    /// The scratch directory of this server.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the process with SIGKILL and waits for it (crash tests).
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// A fresh scratch directory under the system temp dir.
pub fn scratch_dir(tag: &str) -> Result<PathBuf, BenchError> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("dchat-bench-{}-{tag}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| BenchError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    Ok(dir)
}

/// A free 127.0.0.1 port (bound and released; fine for a benchmark).
pub fn free_port() -> Result<u16, BenchError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|source| BenchError::Io {
        what: "finding a free port".into(),
        source,
    })?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|source| BenchError::Io {
            what: "finding a free port".into(),
            source,
        })
}

/// Starts `program args` (with `envs`) pinned to `cpu` when given; output is discarded
/// except stderr, which goes to `dir/stderr.log`.
pub fn spawn(
    what: &str,
    cpu: Option<usize>,
    program: &Path,
    args: &[String],
    envs: &[(String, String)],
    dir: PathBuf,
) -> Result<ServerProc, BenchError> {
    let err = |reason: String| BenchError::Server {
        what: what.to_string(),
        reason,
    };
    let program = &resolve_program(program).map_err(err)?;
    let mut cmd = match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(program);
            cmd
        }
        None => Command::new(program),
    };
    let log = std::fs::File::create(dir.join("stderr.log"))
        .map_err(|e| err(format!("creating its log: {e}")))?;
    cmd.args(args)
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| err(format!("starting {}: {e}", program.display())))?;
    let pid = child.id().ok_or_else(|| err("exited at once".into()))?;
    Ok(ServerProc { child, pid, dir })
}

/// `program` as the child will find it: the server runs in its scratch directory, so a
/// relative path (`target/release/dchat-relay`) is made absolute here, and one that names
/// no file is refused now rather than as a server that never listens. A bare name
/// (`redis-server`) is left to the `PATH` search.
fn resolve_program(program: &Path) -> Result<PathBuf, String> {
    if program.components().count() < 2 {
        return Ok(program.to_path_buf());
    }
    let absolute = std::path::absolute(program)
        .map_err(|e| format!("resolving {}: {e}", program.display()))?;
    if !absolute.is_file() {
        return Err(format!("{}: no such file", absolute.display()));
    }
    Ok(absolute)
}

/// Waits until `addr` accepts TCP connections.
pub async fn wait_port(what: &str, addr: SocketAddr, within: Duration) -> Result<(), BenchError> {
    let deadline = Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Server {
                what: what.to_string(),
                reason: format!("not listening on {addr} after {within:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The processes whose CPU time a step reports as the server's.
#[derive(Clone, Debug, Default)]
pub struct ServerProcs {
    /// The server processes (a relay, several relays of a cluster, a router, ...).
    pub pids: Vec<u32>,
    /// Also every process named `postgres` (the server the relays use and its
    /// backends, when it runs on this machine).
    pub postgres: bool,
}

impl ServerProcs {
    /// Just the process `pid`.
    pub fn one(pid: u32) -> ServerProcs {
        ServerProcs {
            pids: vec![pid],
            postgres: false,
        }
    }

    /// Their user+system CPU time so far.
    pub fn cpu_time(&self) -> Duration {
        let mut total: Duration = self.pids.iter().map(|p| cpu_time(Some(*p))).sum();
        if self.postgres {
            total += postgres_pids()
                .into_iter()
                .map(|p| cpu_time(Some(p)))
                .sum::<Duration>();
        }
        total
    }
}

/// Every process whose command name is `postgres` (server and backends).
fn postgres_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end() == "postgres")
        })
        .collect()
}

/// User+system CPU time of `pid` (this process when `None`); zero if unreadable.
pub fn cpu_time(pid: Option<u32>) -> Duration {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let Ok(s) = std::fs::read_to_string(path) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = s.rsplit(')').next() else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // rest starts at field 3 (state); utime = field 14 → index 11.
    let total = ticks(11) + ticks(12);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(total * 10)
}

/// Resident set size of `pid` in KiB (0 if unreadable).
pub fn rss_kib(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_program_path_survives_the_change_of_directory() {
        let dir = scratch_dir("resolve").unwrap();
        let program = dir.join("server");
        std::fs::write(&program, b"").unwrap();
        let relative = program
            .strip_prefix(std::env::current_dir().unwrap())
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| {
                // The temp dir is not under the working directory: climb to the root.
                let up = std::env::current_dir().unwrap().components().count() - 1;
                let mut path: PathBuf = std::iter::repeat_n("..", up).collect();
                path.push(program.strip_prefix("/").unwrap());
                path
            });
        assert!(relative.is_relative());
        let resolved = resolve_program(&relative).unwrap();
        assert!(resolved.is_absolute(), "{}", resolved.display());
        assert!(resolved.is_file());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_program_path_that_names_no_file_is_refused_and_a_bare_name_is_left_to_path() {
        let missing = Path::new("target/no-such-dir/dchat-relay");
        let error = resolve_program(missing).unwrap_err();
        assert!(
            error.contains("no-such-dir/dchat-relay: no such file"),
            "{error}"
        );
        assert_eq!(
            resolve_program(Path::new("redis-server")).unwrap(),
            Path::new("redis-server")
        );
    }
}
