//! `dchat`: command-line client of the relay (keygen, send, listen, fetch, profile, smoke,
//! handover).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dchat_relay::client::{self, Client};
use dchat_relay::config::parse_duration;
use dchat_relay::protocol::{KeyHex, Kind};

/// Attempts of `dchat send` while the relay refuses the message as busy (backoff
/// 100 ms doubling: about 3 s in all).
const SEND_ATTEMPTS: u32 = 6;

#[derive(Parser)]
#[command(name = "dchat", version, about = "dchat relay client")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct Conn {
    /// Relay WebSocket URL, e.g. ws://localhost:7070/v1/ws
    #[arg(long, env = "DCHAT_URL", default_value = "ws://127.0.0.1:7070/v1/ws")]
    url: String,
    /// Key file written by `dchat keygen`.
    #[arg(long, env = "DCHAT_KEY_FILE", default_value = "dchat.key")]
    key: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Creates a new identity key file and prints its public key.
    Keygen {
        /// Where to write the secret key (refuses to overwrite).
        #[arg(long, default_value = "dchat.key")]
        out: PathBuf,
    },
    /// Prints the public key of a key file.
    Pubkey {
        /// Key file.
        #[arg(long, default_value = "dchat.key")]
        key: PathBuf,
    },
    /// Sends a text message to a public key.
    Send {
        #[command(flatten)]
        conn: Conn,
        /// Recipient public key (hex).
        to: String,
        /// Message text.
        text: String,
    },
    /// Prints incoming messages as JSON lines and acknowledges them.
    Listen {
        #[command(flatten)]
        conn: Conn,
    },
    /// Prints pending messages, acknowledges them, and exits.
    Fetch {
        #[command(flatten)]
        conn: Conn,
        /// Most messages to fetch.
        #[arg(long, default_value = "100")]
        limit: u32,
    },
    /// Publishes (with --name) or shows (with --show KEY) a profile.
    Profile {
        #[command(flatten)]
        conn: Conn,
        /// Display name to publish.
        #[arg(long)]
        name: Option<String>,
        /// Public key whose profile to show.
        #[arg(long)]
        show: Option<String>,
    },
    /// Sends a message to itself through the relay; exit 0 only if it comes back in time.
    Smoke {
        /// Relay WebSocket URL.
        url: String,
        /// Time allowed for the round trip.
        #[arg(long, default_value = "10s")]
        timeout: String,
    },
    /// Moves the stored messages of one relay (embedded store) into another before the
    /// first is scaled down: quiesces the old relay, then streams its snapshot into the
    /// new one's merge import. The admin token comes from DCHAT_ADMIN_TOKEN.
    Handover {
        /// Admin (metrics port) URL of the relay giving its messages away,
        /// e.g. http://chat-blue-0.chat-blue-headless:9090
        #[arg(long)]
        from: String,
        /// Admin URL of the relay receiving them.
        #[arg(long)]
        to: String,
        /// Time allowed for each step (quiesce, snapshot, import).
        #[arg(long, default_value = "5m")]
        timeout: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dchat: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dchat: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn key_arg(s: &str) -> anyhow::Result<KeyHex> {
    KeyHex::parse(s.trim()).map_err(|e| anyhow::anyhow!("public key {s:?}: {e}"))
}

async fn connect(conn: &Conn) -> anyhow::Result<Client> {
    let key = client::load_key(&conn.key)?;
    Client::connect(&conn.url, key)
        .await
        .with_context(|| format!("connecting to {}", conn.url))
}

fn print_delivery(d: &client::Delivery) -> anyhow::Result<()> {
    let text = String::from_utf8_lossy(&d.envelope.payload.0);
    let line = serde_json::json!({
        "from": d.envelope.from,
        "id": d.envelope.id,
        "channel": d.envelope.channel,
        "kind": d.envelope.kind,
        "ts": d.envelope.ts,
        "seq": d.seq,
        "text": text,
    });
    println!("{line}");
    Ok(())
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Keygen { out } => {
            let key = client::generate_key()?;
            client::save_key(&out, &key)?;
            println!("{}", client::public_key(&key));
        }
        Cmd::Pubkey { key } => {
            println!("{}", client::public_key(&client::load_key(&key)?));
        }
        Cmd::Send { conn, to, text } => {
            let to = key_arg(&to)?;
            let mut c = connect(&conn).await?;
            let env = c.envelope_to(to, Kind::Text, text.into_bytes());
            // A busy relay (`overloaded`, `storage_unavailable`) gets the same envelope
            // again after a backoff: about 3 s in all before giving up.
            let r = c.send_retrying(env, SEND_ATTEMPTS).await?;
            println!("{}", serde_json::json!({"status": r.status, "seq": r.seq}));
            c.close().await;
        }
        Cmd::Listen { conn } => loop {
            let mut c = connect(&conn).await?;
            // Wait for messages indefinitely; keep the connection alive with pings.
            c.set_timeout(Duration::from_secs(30));
            let end = loop {
                match c.next_delivery().await {
                    Ok(d) => {
                        print_delivery(&d)?;
                        c.ack(vec![d.ack_ref()]).await?;
                    }
                    Err(client::ClientError::Timeout(_)) => {
                        if let Err(e) = c.ping().await {
                            break e;
                        }
                    }
                    Err(e) => break e,
                }
            };
            match end {
                // The relay is draining: reconnect (to any relay behind the URL).
                client::ClientError::Closed { code: 1012, .. } => {
                    eprintln!("dchat: relay draining; reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                e => return Err(e.into()),
            }
        },
        Cmd::Fetch { conn, limit } => {
            let mut c = connect(&conn).await?;
            let (ds, more) = c.fetch(limit).await?;
            for d in &ds {
                print_delivery(d)?;
            }
            if !ds.is_empty() {
                c.ack(ds.iter().map(|d| d.ack_ref()).collect()).await?;
            }
            if more {
                eprintln!("dchat: more messages pending; run fetch again");
            }
            c.close().await;
        }
        Cmd::Profile { conn, name, show } => {
            let mut c = connect(&conn).await?;
            if let Some(name) = name {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                let updated = c.publish_profile(&name, None, now).await?;
                println!("{}", serde_json::json!({"updated": updated}));
            }
            let who = match show {
                Some(k) => key_arg(&k)?,
                None => c.key(),
            };
            match c.get_profile(who).await? {
                Some(p) => println!("{}", serde_json::to_string(&p.doc)?),
                None => anyhow::bail!("no profile published for {who}"),
            }
            c.close().await;
        }
        Cmd::Smoke { url, timeout } => {
            let within = parse_duration(&timeout).map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
            let took = client::smoke(&url, within)
                .await
                .with_context(|| format!("smoke test against {url} failed"))?;
            println!("smoke ok: round trip in {} ms", took.as_millis());
        }
        Cmd::Handover { from, to, timeout } => {
            let within = parse_duration(&timeout).map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
            let token = std::env::var("DCHAT_ADMIN_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!("DCHAT_ADMIN_TOKEN is not set (the relays' admin token)")
                })?;
            let report = dchat_relay::handover::handover(&from, &to, &token, within)
                .await
                .with_context(|| format!("handover from {from} to {to} failed"))?;
            println!(
                "{}",
                serde_json::json!({"handover": "ok", "from": from, "to": to, "imported": report.imported})
            );
        }
    }
    Ok(())
}
