//! The real `dchat-relay` and `dchat` binaries as processes: configuration errors, a
//! pre-release data directory, the default data directory, SIGTERM drain, kill -9 durability, and the smoke command.

#[path = "support/process.rs"]
mod process;
#[path = "support/tempdir.rs"]
mod tempdir;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
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
    // One JSON object per line, with the members docs/cli.md lists.
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let mut members: Vec<&str> = line
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    members.sort_unstable();
    assert_eq!(
        members,
        ["channel", "from", "id", "kind", "seq", "text", "ts"]
    );
    assert_eq!(line["text"], "hello bob");
    assert!(line["seq"].is_u64() && line["channel"].is_null(), "{line}");
    // Fetch acknowledged it: a second fetch is empty.
    let out = run(&["fetch", "--key", "bob.key"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hello bob"));

    // `--limit` bounds what is printed and acknowledged (the relay delivers all three
    // right after `welcome`); the rest stays pending for the next fetch.
    for i in 0..3 {
        let out = run(&["send", "--key", "alice.key", &bob, &format!("batch {i}")]);
        assert!(out.status.success());
    }
    let out = run(&["fetch", "--key", "bob.key", "--limit", "2"]);
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(printed.lines().count(), 2, "{printed}");
    assert!(
        printed.contains("batch 0") && printed.contains("batch 1"),
        "{printed}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("more messages pending"));
    let out = run(&["fetch", "--key", "bob.key"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(printed.lines().count(), 1, "{printed}");
    assert!(printed.contains("batch 2"), "{printed}");

    // Malformed arguments are usage errors (exit 2), before anything is sent.
    for args in [
        &["send", "--key", "alice.key", "not-a-key", "x"][..],
        &["fetch", "--key", "bob.key", "--limit", "0"],
        &["profile", "--key", "bob.key", "--show", "abc"],
        &["smoke", "ws://127.0.0.1:1/v1/ws", "--timeout", "soon"],
    ] {
        assert_eq!(run(args).status.code(), Some(2), "{args:?}");
    }
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

/// Output that cannot be written, a server that never answers the upgrade and a refused
/// connection each end the command with exit 1 and one clear line — never a panic, a
/// hang, or a message lost.
#[test]
fn cli_failures_are_clear_and_lose_nothing() {
    let dir = TempDir::new("proc-cli-fail");
    let p = spawn(relay_cmd(dir.path()));
    let run = |args: &[&str], stdout: Stdio| {
        Command::new(CLI)
            .current_dir(dir.path())
            .env("DCHAT_URL", url(&p))
            .args(args)
            .stdout(stdout)
            .output()
            .unwrap()
    };
    let keygen = |name: &str| -> String {
        let out = run(&["keygen", "--out", name], Stdio::piped());
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    keygen("alice.key");
    let bob = keygen("bob.key");
    let out = run(
        &["send", "--key", "alice.key", &bob, "kept"],
        Stdio::piped(),
    );
    assert!(out.status.success());
    // stdout is a full disk: fetch fails, and acknowledges nothing it could not print.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = run(&["fetch", "--key", "bob.key"], Stdio::from(full));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("dchat: writing to stdout"), "{stderr}");
    let out = run(&["fetch", "--key", "bob.key"], Stdio::piped());
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept"));

    // `dchat send` to alice's key through `url`: exit code and stderr.
    let send_via = |url: &str| {
        let out = Command::new(CLI)
            .current_dir(dir.path())
            .args(["send", "--url", url, "--key", "alice.key", &bob, "x"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // A server that accepts the connection and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let started = std::time::Instant::now();
    let (code, stderr) = send_via(&format!("ws://{}/v1/ws", silent.local_addr().unwrap()));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("timed out waiting for the WebSocket handshake"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(silent);

    // A refused connection: its cause once, not three times.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("ws://{}/v1/ws", closed.local_addr().unwrap());
    drop(closed);
    let (code, stderr) = send_via(&closed_url);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.matches("Connection refused").count(), 1, "{stderr}");
}

/// `dchat ARGS --help`, with no `DCHAT_*` variables set (their values would show up).
fn cli_help(args: &[&str]) -> String {
    let out = Command::new(CLI)
        .args(args)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success(), "dchat {args:?} --help");
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands a help text lists under `Commands:` (without `help`).
fn help_commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// What the reference must name for one command: its flags (`--name`), positional
/// arguments (`NAME`), environment variables and non-empty defaults.
fn help_terms(help: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut in_args = false;
    for line in help.lines() {
        let t = line.trim_start();
        if line.starts_with("Arguments:") {
            in_args = true;
            continue;
        }
        if !line.starts_with(' ') {
            in_args = false;
        }
        if in_args && t.starts_with('<') {
            terms.push(t[1..t.find('>').unwrap()].to_string());
        }
        if t.starts_with('-') {
            for word in t.split([' ', ',', '[', '=']) {
                if let Some(flag) = word.strip_prefix("--") {
                    if !flag.is_empty() && flag != "help" && flag != "version" {
                        terms.push(format!("--{flag}"));
                    }
                }
            }
        }
        for (open, what) in [("[env: ", "env"), ("[default: ", "default")] {
            let mut rest = t;
            while let Some(at) = rest.find(open) {
                rest = &rest[at + open.len()..];
                let end = rest.find(if what == "env" { '=' } else { ']' }).unwrap();
                let value = &rest[..end];
                if value != "\"\"" {
                    terms.push(value.to_string());
                }
            }
        }
    }
    terms
}

/// The `## ...` section of `doc` whose heading is `heading`.
fn doc_section<'a>(doc: &'a str, heading: &str) -> Option<&'a str> {
    let start = doc.find(&format!("\n## {heading}\n"))? + 1;
    let body = &doc[start..];
    let end = body[3..].find("\n## ").map_or(body.len(), |e| e + 3);
    Some(&body[..end])
}

/// docs/cli.md documents every command of `dchat --help` with every flag, positional
/// argument, environment variable and default its help shows (the `backup` commands:
/// docs/backup.md), and no command that does not exist, so the two cannot drift.
#[test]
fn cli_reference_names_every_command_flag_and_variable() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cli_md = std::fs::read_to_string(root.join("docs/cli.md")).unwrap();
    let backup_md = std::fs::read_to_string(root.join("docs/backup.md")).unwrap();
    let commands = help_commands(&cli_help(&[]));
    assert!(commands.len() >= 8, "{commands:?}");
    let mut missing = Vec::new();
    for cmd in &commands {
        let help = cli_help(&[cmd]);
        let subcommands = help_commands(&help);
        if subcommands.is_empty() {
            let Some(section) = doc_section(&cli_md, &format!("`dchat {cmd}`")) else {
                missing.push(format!("docs/cli.md: no section `dchat {cmd}`"));
                continue;
            };
            for term in help_terms(&help) {
                if !section.contains(&term) {
                    missing.push(format!("docs/cli.md `dchat {cmd}`: {term}"));
                }
            }
        } else {
            assert_eq!(cmd, "backup", "only `backup` has subcommands");
            for sub in subcommands {
                let help = cli_help(&[cmd, &sub]);
                if !backup_md.contains(&format!("dchat backup {sub}")) {
                    missing.push(format!("docs/backup.md: dchat backup {sub}"));
                }
                for term in help_terms(&help) {
                    if !backup_md.contains(&term) {
                        missing.push(format!("docs/backup.md `dchat backup {sub}`: {term}"));
                    }
                }
            }
        }
    }
    // And nothing documented that the binary does not have.
    for heading in cli_md.lines().filter_map(|l| l.strip_prefix("## `dchat ")) {
        let name = heading.trim_end_matches('`');
        if !commands.iter().any(|c| c == name) {
            missing.push(format!(
                "docs/cli.md documents `dchat {name}`, which does not exist"
            ));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}
