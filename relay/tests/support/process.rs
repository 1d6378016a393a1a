//! The real `dchat-relay` binary as a child process: a clean environment, and the
//! ports it printed in its "started" line.
//!
//! Include with `#[path = "support/process.rs"] mod process;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const RELAY: &str = env!("CARGO_BIN_EXE_dchat-relay");

/// A running relay process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay command with a clean environment (no DB_* from test scripts leaking in).
pub fn relay_cmd(cwd: &Path) -> Command {
    let mut c = Command::new(RELAY);
    c.current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DCHAT_LISTEN", "127.0.0.1:0")
        .env("DCHAT_METRICS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info");
    c
}

/// Spawns the relay and waits for its "started" log line to learn the ports.
pub fn spawn(mut cmd: Command) -> Proc {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains("dchat-relay started") {
                let field = |name: &str| -> SocketAddr {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(&format!("{name}=")))
                        .unwrap()
                        .parse()
                        .unwrap()
                };
                let _ = tx.send((field("listen"), field("metrics")));
                sent = true;
            }
        }
    });
    let (addr, metrics) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("relay printed its listen address");
    Proc {
        child,
        addr,
        metrics,
    }
}

/// The client WebSocket URL of `p`.
pub fn url(p: &Proc) -> String {
    format!("ws://{}/v1/ws", p.addr)
}
