//! The real `dchat-relay` and `dchat` binaries as processes: configuration errors, a
//! pre-release data directory, the default data directory, SIGTERM drain, kill -9 durability, and the smoke command.

#[path = "support/process.rs"]
mod process;
#[path = "support/tempdir.rs"]
mod tempdir;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dchat_relay::client::{generate_key, public_key, Client, ClientError};
use dchat_relay::protocol::SendStatus;
use process::{relay_cmd, spawn, url};
use tempdir::TempDir;

const CLI: &str = env!("CARGO_BIN_EXE_dchat");

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..600 {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("relay did not exit");
}

async fn ready_status(addr: SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    String::from_utf8_lossy(&buf)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn invalid_configuration_exits_2_naming_the_setting() {
    let dir = TempDir::new("proc-cfg");
    for (var, val) in [
        ("DCHAT_MESSAGE_TTL", "forever"),
        ("DCHAT_MAX_MESSAGE_BYTES", "-1"),
        ("DCHAT_PEERS", "not-a-url"),
        ("DCHAT_SHED_DELAY", "11s"),
        ("DCHAT_HANDSHAKE_TIMEOUT", "soon"),
        ("DCHAT_MAX_HANDSHAKES", "0"),
        ("DB_PORT", "99999"),
    ] {
        let mut cmd = relay_cmd(dir.path());
        cmd.env(var, val);
        if var == "DB_PORT" {
            cmd.env("DB_HOST", "db.invalid");
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var), "{var}: {err}");
    }
}

/// A data directory written by a pre-release build (its `dchat.redb`) is refused at
/// startup with one message saying so, exit code 2, and nothing written beside it.
#[test]
fn a_data_directory_of_a_pre_release_build_exits_2() {
    let dir = TempDir::new("proc-pre-release");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("dchat.redb"), b"written by a development build").unwrap();
    let out = relay_cmd(dir.path())
        .env("DCHAT_DATA_DIR", &data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    for part in [
        "dchat-relay: ",
        data.to_str().unwrap(),
        "dchat.redb",
        "written by a pre-release build of dchat-relay",
        "not supported",
    ] {
        assert_eq!(lines[0].matches(part).count(), 1, "{part:?} once: {err}");
    }
    let mut left: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(left, ["dchat.redb"], "nothing created beside it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_kill_9() {
    let dir = TempDir::new("proc-kill");
    // No data dir set: the default ./dchat-data under the working directory is used.
    let p = spawn(relay_cmd(dir.path()));
    let bkey = generate_key().unwrap();
    let mut a = Client::connect(&url(&p), generate_key().unwrap())
        .await
        .unwrap();
    for i in 0..20 {
        let s = a
            .send_text(public_key(&bkey), &format!("durable {i}"))
            .await
            .unwrap();
        assert_eq!(s.status, SendStatus::Stored);
    }
    let mut p = p;
    p.child.kill().unwrap(); // SIGKILL: no drain, no flush
    p.child.wait().unwrap();
    assert!(dir.path().join("dchat-data").is_dir());

    let p2 = spawn(relay_cmd(dir.path()));
    let mut b = Client::connect(&url(&p2), bkey).await.unwrap();
    let mut texts = Vec::new();
    for _ in 0..20 {
        let d = b.next_delivery().await.unwrap();
        texts.push(String::from_utf8(d.envelope.payload.0).unwrap());
    }
    let want: Vec<String> = (0..20).map(|i| format!("durable {i}")).collect();
    assert_eq!(texts, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_readiness_first_closes_clients_and_keeps_messages() {
    let dir = TempDir::new("proc-drain");
    let data = dir.path().join("data");
    let mut cmd = relay_cmd(dir.path());
    cmd.env("DCHAT_DATA_DIR", &data)
        .env("DCHAT_DRAIN_DELAY", "2s")
        .env("DCHAT_DRAIN_TIMEOUT", "10s");
    let mut p = spawn(cmd);
    assert_eq!(ready_status(p.addr).await, Some(200));
    let bkey = generate_key().unwrap();
    let ckey = generate_key().unwrap();
    let mut a = Client::connect(&url(&p), generate_key().unwrap())
        .await
        .unwrap();
    let mut b = Client::connect(&url(&p), bkey.clone()).await.unwrap();
    b.set_timeout(Duration::from_secs(30));
    assert_eq!(
        a.send_text(b.key(), "live, unacked").await.unwrap().status,
        SendStatus::Delivered
    );
    let live = b.next_delivery().await.unwrap();
    assert_eq!(
        a.send_text(public_key(&ckey), "stored")
            .await
            .unwrap()
            .status,
        SendStatus::Stored
    );

    let pid = p.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Readiness turns false while the drain delay keeps connections open.
    let mut saw_unready = false;
    for _ in 0..500 {
        match ready_status(p.addr).await {
            Some(503) => {
                saw_unready = true;
                break;
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            None => break,
        }
    }
    assert!(saw_unready, "/ready never reported 503 during drain");
    match b.next_delivery().await {
        Err(ClientError::Closed { code, reason }) => {
            assert_eq!(code, 1012);
            assert!(reason.contains("reconnect"), "{reason}");
        }
        other => panic!("expected drain close, got {other:?}"),
    }
    let status = wait_exit(&mut p.child);
    assert!(status.success(), "{status:?}");
    let _ = p.metrics;

    let mut cmd = relay_cmd(dir.path());
    cmd.env("DCHAT_DATA_DIR", &data);
    let p2 = spawn(cmd);
    let mut b = Client::connect(&url(&p2), bkey).await.unwrap();
    let again = b.next_delivery().await.unwrap();
    assert_eq!(again.envelope.id, live.envelope.id);
    let mut c = Client::connect(&url(&p2), ckey).await.unwrap();
    assert_eq!(
        c.next_delivery().await.unwrap().envelope.payload.0,
        b"stored"
    );
}

#[test]
fn smoke_command_succeeds_against_a_relay_and_fails_without_one() {
    let dir = TempDir::new("proc-smoke");
    let p = spawn(relay_cmd(dir.path()));
    let out = Command::new(CLI)
        .args(["smoke", &url(&p), "--timeout", "10s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("smoke ok"));
    drop(p);
    // Nothing listens on a just-freed ephemeral port... use port 1 which is never a relay.
    let out = Command::new(CLI)
        .args(["smoke", "ws://127.0.0.1:1/v1/ws", "--timeout", "2s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn cli_keygen_send_and_fetch() {
    let dir = TempDir::new("proc-cli");
    let p = spawn(relay_cmd(dir.path()));
    let keygen = |name: &str| -> String {
        let out = Command::new(CLI)
            .current_dir(dir.path())
            .args(["keygen", "--out", name])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let _alice = keygen("alice.key");
    let bob = keygen("bob.key");
    let run = |args: &[&str]| {
        Command::new(CLI)
            .current_dir(dir.path())
            .env("DCHAT_URL", url(&p))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["send", "--key", "alice.key", &bob, "hello bob"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("stored"));
    let out = run(&["fetch", "--key", "bob.key"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hello bob"), "{text}");
    // Fetch acknowledged it: a second fetch is empty.
    let out = run(&["fetch", "--key", "bob.key"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hello bob"));
    // `listen` prints deliveries as they arrive.
    let mut listener = Command::new(CLI)
        .current_dir(dir.path())
        .env("DCHAT_URL", url(&p))
        .args(["listen", "--key", "bob.key"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = listener.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut got = String::new();
    for i in 0..50 {
        // Until the listener is connected, messages are stored and delivered on connect.
        let out = run(&["send", "--key", "alice.key", &bob, &format!("live {i}")]);
        assert!(out.status.success());
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            got = line;
            break;
        }
    }
    let _ = listener.kill();
    let _ = listener.wait();
    assert!(got.contains("live "), "listen printed {got:?}");
    let out = run(&["profile", "--key", "bob.key", "--name", "Bob"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"name\":\"Bob\""));
}
