//! `dchat`: command-line client of the relay (keygen, send, listen, fetch, profile, smoke,
//! handover) and its backup tool (`dchat backup create|list|verify|restore|delete`,
//! docs/backup.md).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::builder::BoolishValueParser;
use clap::{Parser, Subcommand};
use dchat_relay::backup::commands::{self as backup, Outcome, SourceSpec};
use dchat_relay::backup::s3::{S3Settings, Sse, UploadCheck};
use dchat_relay::backup::{BackupError, BackupPath};
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
        /// Key file (the same default as the commands that connect).
        #[arg(long, env = "DCHAT_KEY_FILE", default_value = "dchat.key")]
        key: PathBuf,
    },
    /// Sends a text message to a public key.
    Send {
        #[command(flatten)]
        conn: Conn,
        /// Recipient public key (64 hex digits).
        #[arg(value_parser = key_arg)]
        to: KeyHex,
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
        /// Most messages to print (and acknowledge), 1 to 1000; the rest stay pending.
        #[arg(long, default_value = "100", value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// Publishes (with --name) or shows (with --show KEY) a profile.
    Profile {
        #[command(flatten)]
        conn: Conn,
        /// Display name to publish.
        #[arg(long)]
        name: Option<String>,
        /// Public key (64 hex digits) whose profile to show.
        #[arg(long, value_parser = key_arg)]
        show: Option<KeyHex>,
    },
    /// Sends a message to itself through the relay; exit 0 only if it comes back in time.
    Smoke {
        /// Relay WebSocket URL.
        url: String,
        /// Time allowed for the round trip.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
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
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Backs up relay data to S3 (with an optional RDS snapshot), and lists, verifies,
    /// restores and deletes backups. Prints JSON; exit 0 on success, 1 on failure, 2 on
    /// bad usage. In a Kubernetes Job the result is also the termination message.
    Backup(Box<BackupArgs>),
}

#[derive(clap::Args)]
struct BackupArgs {
    #[command(subcommand)]
    cmd: BackupCmd,
    /// Where the Kubernetes termination message goes; written only if the file exists.
    #[arg(
        long,
        env = "DCHAT_TERMINATION_LOG",
        default_value = "/dev/termination-log",
        global = true,
        hide = true
    )]
    termination_log: PathBuf,
}

/// The S3 destination; every flag can also come from its environment variable.
/// Credentials come from the AWS default chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
/// IRSA web identity, profiles, instance metadata), never from flags.
#[derive(clap::Args)]
struct S3Args {
    /// Bucket.
    #[arg(long, env = "DCHAT_BACKUP_S3_BUCKET")]
    s3_bucket: String,
    /// Key prefix (may be empty): objects go to <prefix>/<namespace>/<cluster>/<backup>/.
    #[arg(long, env = "DCHAT_BACKUP_S3_PREFIX", default_value = "")]
    s3_prefix: String,
    /// Region (default: AWS_REGION).
    #[arg(long, env = "DCHAT_BACKUP_S3_REGION")]
    s3_region: Option<String>,
    /// Endpoint URL of an S3-compatible store (MinIO, moto); default: AWS.
    #[arg(long, env = "DCHAT_BACKUP_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Path-style addressing (endpoint/bucket/key), for S3-compatible stores.
    #[arg(
        long,
        env = "DCHAT_BACKUP_S3_FORCE_PATH_STYLE",
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    s3_force_path_style: bool,
    /// Server-side encryption: AES256 or aws:kms.
    #[arg(long, env = "DCHAT_BACKUP_SSE", default_value = "AES256")]
    sse: Sse,
    /// KMS key for --sse aws:kms (default: the bucket's key).
    #[arg(long, env = "DCHAT_BACKUP_KMS_KEY_ID")]
    kms_key_id: Option<String>,
}

impl S3Args {
    fn settings(&self) -> S3Settings {
        let opt = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        S3Settings {
            bucket: self.s3_bucket.clone(),
            prefix: self.s3_prefix.clone(),
            region: opt(&self.s3_region),
            endpoint: opt(&self.s3_endpoint),
            force_path_style: self.s3_force_path_style,
            sse: self.sse,
            kms_key_id: opt(&self.kms_key_id),
        }
    }
}

/// A relay's admin API (embedded store).
#[derive(clap::Args)]
struct AdminArgs {
    /// Admin (metrics port) URL of the relay, e.g. http://chat-blue-0.chat-blue-headless:9090
    #[arg(long)]
    admin_url: Option<String>,
    /// File holding the admin token (default: the DCHAT_ADMIN_TOKEN environment variable).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreArg {
    /// The embedded store of one relay, through --admin-url.
    Embedded,
    /// The relays' PostgreSQL database, from DB_HOST, DB_PORT, DB_NAME, DB_USER, DB_PASSWORD.
    Postgres,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ListFormat {
    /// One manifest per line, as JSON.
    Json,
    /// A table.
    Table,
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Streams a consistent snapshot into S3, verifies the object, optionally takes an
    /// RDS snapshot, then writes manifest.json and prints it.
    Create {
        #[command(flatten)]
        s3: S3Args,
        /// Namespace of the DchatCluster.
        #[arg(long)]
        namespace: String,
        /// DchatCluster name.
        #[arg(long)]
        cluster: String,
        /// The DchatCluster's metadata.uid.
        #[arg(long)]
        cluster_uid: String,
        /// Backup name.
        #[arg(long)]
        backup: String,
        /// Version of the relays whose data this is.
        #[arg(long)]
        relay_version: String,
        /// Where the data is.
        #[arg(long, value_enum)]
        source: StoreArg,
        #[command(flatten)]
        admin: AdminArgs,
        /// RDS DB instance to take a manual snapshot of (tagged with the backup).
        #[arg(long)]
        rds_instance: Option<String>,
        /// RDS region (default: the S3 region).
        #[arg(long)]
        rds_region: Option<String>,
        /// How long to wait for the RDS snapshot to become available.
        #[arg(long, default_value = "60m")]
        rds_timeout: String,
        /// First part of the RDS snapshot identifier
        /// (<prefix>-<namespace>-<cluster>-<backup>-<hash>), e.g. the prefix an IAM
        /// policy allows.
        #[arg(
            long,
            env = "DCHAT_BACKUP_RDS_SNAPSHOT_PREFIX",
            default_value = "dchat"
        )]
        rds_snapshot_prefix: String,
        /// How the uploaded object is verified: checksum (S3's composite SHA-256; read
        /// back if S3 reports none) or reread (always read back and hash).
        #[arg(long, default_value = "checksum")]
        upload_check: UploadCheck,
    },
    /// Lists the backups in the bucket (from their manifests).
    List {
        #[command(flatten)]
        s3: S3Args,
        /// Only this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only this cluster (needs --namespace).
        #[arg(long)]
        cluster: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "json")]
        output: ListFormat,
    },
    /// Downloads a backup, checks its SHA-256, size and counts against the manifest,
    /// restores it into a scratch embedded store and compares the counts.
    Verify {
        #[command(flatten)]
        s3: S3Args,
        /// NAMESPACE/CLUSTER/BACKUP.
        #[arg(long)]
        backup_path: String,
        /// Where the scratch store is made (and removed again).
        #[arg(long, env = "DCHAT_BACKUP_SCRATCH_DIR")]
        scratch_dir: Option<PathBuf>,
    },
    /// Restores a backup into an empty store (embedded via --admin-url, or PostgreSQL
    /// via DB_*), verified before the store commits it.
    Restore {
        #[command(flatten)]
        s3: S3Args,
        /// NAMESPACE/CLUSTER/BACKUP.
        #[arg(long)]
        backup_path: String,
        /// The store to restore into.
        #[arg(long, value_enum)]
        target: StoreArg,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Deletes a backup: its RDS snapshot (only if tagged as this backup's), data.dchat,
    /// manifest.json and incomplete uploads. Deleting what is gone succeeds.
    Delete {
        #[command(flatten)]
        s3: S3Args,
        /// NAMESPACE/CLUSTER/BACKUP.
        #[arg(long)]
        backup_path: String,
        /// RDS snapshot to delete besides the one the manifest names.
        #[arg(long)]
        rds_snapshot: Option<String>,
        /// RDS region (default: the S3 region).
        #[arg(long)]
        rds_region: Option<String>,
    },
}

/// The part of clap's error that says what is wrong — its first paragraph, on one line
/// (e.g. `the following required arguments were not provided: --s3-bucket <S3_BUCKET>`),
/// without the usage and help lines after it.
fn usage_error_message(rendered: &str) -> String {
    let words: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let msg = words.join(" ");
    let msg = msg.trim_start_matches("error: ").trim();
    if msg.is_empty() {
        "invalid arguments".to_string()
    } else {
        msg.to_string()
    }
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // A Job started with a missing or bad flag still reports why.
            let is_backup = std::env::args().nth(1).as_deref() == Some("backup");
            if is_backup && e.use_stderr() {
                let path = std::env::var_os("DCHAT_TERMINATION_LOG")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/dev/termination-log"));
                let msg = usage_error_message(&e.to_string());
                backup::write_termination_message(&path, &backup::error_json(&msg, "InvalidInput"));
            }
            e.exit();
        }
    };
    if let Cmd::Backup(args) = cli.cmd {
        return run_backup(*args);
    }
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
            eprintln!("dchat: {}", error_chain(&e));
            std::process::ExitCode::from(1)
        }
    }
}

/// An error and its causes on one line, each cause once: an error whose message already
/// quotes its source (tungstenite's `IO error: …` around the OS error) is not followed
/// by that source again.
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Writes one line of a command's result to stdout. A failed write (a closed pipe, a
/// full disk) is an error of the command, so nothing printed after it is acknowledged.
fn emit(line: impl std::fmt::Display) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// A public key argument; a bad one is a usage error (exit 2), as clap reports it.
fn key_arg(s: &str) -> Result<KeyHex, String> {
    KeyHex::parse(s.trim())
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
    emit(line)
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Keygen { out } => {
            let key = client::generate_key()?;
            client::save_key(&out, &key)?;
            emit(client::public_key(&key))?;
        }
        Cmd::Pubkey { key } => {
            emit(client::public_key(&client::load_key(&key)?))?;
        }
        Cmd::Send { conn, to, text } => {
            let mut c = connect(&conn).await?;
            let env = c.envelope_to(to, Kind::Text, text.into_bytes());
            // A busy relay (`overloaded`, `storage_unavailable`) gets the same envelope
            // again after a backoff: about 3 s in all before giving up.
            let r = c.send_retrying(env, SEND_ATTEMPTS).await?;
            emit(serde_json::json!({"status": r.status, "seq": r.seq}))?;
            c.close().await;
        }
        Cmd::Listen { conn } => loop {
            let mut c = connect(&conn).await?;
            // Wait for messages indefinitely; keep the connection alive with pings, at
            // least twice per idle timeout the relay announced.
            let idle = c.limits().idle_timeout_secs;
            c.set_timeout(listen_ping_interval(idle));
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
            // The relay delivers stored messages right after `welcome` too (up to its
            // in-flight window), so the answer may bring more than `limit`: the ones
            // beyond it are neither printed nor acknowledged and stay pending.
            let (mut ds, more) = c.fetch(limit).await?;
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            let more = more || ds.len() > limit;
            ds.truncate(limit);
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
                emit(serde_json::json!({"updated": updated}))?;
            }
            let who = show.unwrap_or_else(|| c.key());
            match c.get_profile(who).await? {
                Some(p) => emit(serde_json::to_string(&p.doc)?)?,
                None => anyhow::bail!("no profile published for {who}"),
            }
            c.close().await;
        }
        Cmd::Smoke { url, timeout } => {
            let took = client::smoke(&url, timeout)
                .await
                .with_context(|| format!("smoke test against {url} failed"))?;
            emit(format_args!(
                "smoke ok: round trip in {} ms",
                took.as_millis()
            ))?;
        }
        // `main` runs `dchat backup` itself (its own runtime, logging and exit codes).
        Cmd::Backup(_) => anyhow::bail!("dchat backup is dispatched before the client commands"),
        Cmd::Handover { from, to, timeout } => {
            let token = std::env::var("DCHAT_ADMIN_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!("DCHAT_ADMIN_TOKEN is not set (the relays' admin token)")
                })?;
            let report = dchat_relay::handover::handover(&from, &to, &token, timeout)
                .await
                .with_context(|| format!("handover from {from} to {to} failed"))?;
            emit(
                serde_json::json!({"handover": "ok", "from": from, "to": to, "imported": report.imported}),
            )?;
        }
    }
    Ok(())
}

/// How often `listen` pings an idle connection: every 30 s, or at half the relay's idle
/// timeout when that is shorter (0 means the relay announced none).
fn listen_ping_interval(idle_timeout_secs: u64) -> Duration {
    let half = Duration::from_millis(idle_timeout_secs.saturating_mul(500));
    if idle_timeout_secs == 0 {
        LISTEN_PING
    } else {
        LISTEN_PING.min(half).max(Duration::from_millis(100))
    }
}

/// `listen`'s ping interval when the relay's idle timeout allows it.
const LISTEN_PING: Duration = Duration::from_secs(30);

/// Runs a `dchat backup` command: logs go to stderr (`RUST_LOG`, default info for the
/// relay's own messages), the result to stdout and the termination log.
fn run_backup(args: BackupArgs) -> std::process::ExitCode {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn,dchat_relay=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Two workers: hashing the parts runs while the previous part uploads.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dchat: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let outcome = rt.block_on(backup_command(args.cmd));
    let mut code = outcome.code;
    if !outcome.stdout.is_empty() {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if let Err(e) = out
            .write_all(outcome.stdout.as_bytes())
            .and_then(|()| out.flush())
        {
            // The result is in the termination message too; the exit code says the
            // printed copy was lost.
            eprintln!("dchat: writing to stdout: {e}");
            code = code.max(1);
        }
    }
    if let Some(message) = &outcome.termination {
        backup::write_termination_message(&args.termination_log, message);
    }
    std::process::ExitCode::from(code)
}

fn backup_path(s: &str) -> Result<BackupPath, BackupError> {
    Ok(BackupPath::parse("--backup-path", s)?)
}

fn invalid(field: &str, reason: impl Into<String>) -> BackupError {
    BackupError::Input(dchat_relay::backup::manifest::ManifestError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    })
}

/// Builds the store a command reads or writes from its flags and the environment.
fn store_spec(store: StoreArg, admin: &AdminArgs, flag: &str) -> Result<SourceSpec, BackupError> {
    use dchat_relay::backup::source;
    match store {
        StoreArg::Embedded => {
            let Some(url) = admin.admin_url.as_deref().filter(|u| !u.trim().is_empty()) else {
                return Err(invalid(
                    "--admin-url",
                    format!("is required with {flag} embedded"),
                ));
            };
            let token = source::admin_token(admin.admin_token_file.as_deref())?;
            Ok(SourceSpec::Embedded {
                admin_url: url.trim().to_string(),
                token,
            })
        }
        StoreArg::Postgres => Ok(SourceSpec::Postgres(source::postgres_from_env()?)),
    }
}

fn failed(e: BackupError) -> Outcome {
    eprintln!("dchat: {e}");
    Outcome::failed(&e)
}

fn json_line(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| backup::error_json(&e.to_string(), "Internal"))
}

async fn backup_command(cmd: BackupCmd) -> Outcome {
    match cmd {
        BackupCmd::Create {
            s3,
            namespace,
            cluster,
            cluster_uid,
            backup: name,
            relay_version,
            source,
            admin,
            rds_instance,
            rds_region,
            rds_timeout,
            rds_snapshot_prefix,
            upload_check,
        } => {
            let opts = (|| {
                let path = BackupPath::new(
                    &namespace,
                    &cluster,
                    &name,
                    ["--namespace", "--cluster", "--backup"],
                )?;
                let source = store_spec(source, &admin, "--source")?;
                let rds = match rds_instance.filter(|i| !i.trim().is_empty()) {
                    Some(instance) => Some(backup::RdsSpec {
                        instance: instance.trim().to_string(),
                        region: rds_region.filter(|r| !r.trim().is_empty()),
                        timeout: parse_duration(&rds_timeout)
                            .map_err(|e| invalid("--rds-timeout", e.to_string()))?,
                        snapshot_prefix: {
                            let p = rds_snapshot_prefix.trim();
                            dchat_relay::backup::rds::validate_prefix(p)
                                .map_err(|e| invalid("--rds-snapshot-prefix", e))?;
                            p.to_string()
                        },
                    }),
                    None => None,
                };
                Ok::<_, BackupError>(backup::CreateOptions {
                    path,
                    cluster_uid,
                    relay_version,
                    source,
                    rds,
                    upload_check,
                })
            })();
            let opts = match opts {
                Ok(o) => o,
                Err(e) => return failed(e),
            };
            match backup::create(&s3.settings(), opts).await {
                Ok(manifest) => Outcome::reported(manifest.to_line()),
                Err(e) => failed(e),
            }
        }
        BackupCmd::List {
            s3,
            namespace,
            cluster,
            output,
        } => {
            let filter = backup::ListFilter { namespace, cluster };
            match backup::list(&s3.settings(), &filter).await {
                Ok((manifests, bad)) => {
                    for b in bad {
                        eprintln!("dchat: skipped: {b}");
                    }
                    let stdout = match output {
                        ListFormat::Table => backup::table(&manifests),
                        ListFormat::Json => manifests.iter().map(|m| m.to_line() + "\n").collect(),
                    };
                    Outcome {
                        stdout,
                        termination: None,
                        code: 0,
                    }
                }
                Err(e) => failed(e),
            }
        }
        BackupCmd::Verify {
            s3,
            backup_path: p,
            scratch_dir,
        } => {
            let path = match backup_path(&p) {
                Ok(p) => p,
                Err(e) => return failed(e),
            };
            let scratch = scratch_dir.unwrap_or_else(std::env::temp_dir);
            let report = backup::verify(&s3.settings(), &path, &scratch).await;
            if let Some(e) = &report.error {
                eprintln!("dchat: verify {path} failed: {e}");
            }
            let line = json_line(&report);
            Outcome {
                stdout: format!("{line}\n"),
                termination: Some(line),
                code: if report.ok { 0 } else { 1 },
            }
        }
        BackupCmd::Restore {
            s3,
            backup_path: p,
            target,
            admin,
        } => {
            let run = async {
                let path = backup_path(&p)?;
                let target = store_spec(target, &admin, "--target")?;
                backup::restore(&s3.settings(), &path, &target).await
            };
            match run.await {
                Ok(report) => Outcome::reported(json_line(&report)),
                Err(e) => failed(e),
            }
        }
        BackupCmd::Delete {
            s3,
            backup_path: p,
            rds_snapshot,
            rds_region,
        } => {
            let run = async {
                let path = backup_path(&p)?;
                backup::delete(
                    &s3.settings(),
                    &path,
                    rds_snapshot.as_deref(),
                    rds_region.as_deref(),
                )
                .await
            };
            match run.await {
                Ok(report) => Outcome::reported(json_line(&report)),
                Err(e) => failed(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_pings_within_the_relays_idle_timeout() {
        assert_eq!(listen_ping_interval(120), Duration::from_secs(30));
        assert_eq!(listen_ping_interval(3), Duration::from_millis(1500));
        assert_eq!(listen_ping_interval(0), Duration::from_secs(30));
    }

    #[test]
    fn a_usage_error_is_clap_first_paragraph_on_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  \
                        --s3-bucket <S3_BUCKET>\n\nUsage: dchat backup verify\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_error_message(rendered),
            "the following required arguments were not provided: --s3-bucket <S3_BUCKET>"
        );
        assert_eq!(usage_error_message(""), "invalid arguments");
    }

    #[test]
    fn an_error_chain_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = anyhow::Error::new(io)
            .context("IO error: refused")
            .context("connecting");
        assert_eq!(error_chain(&e), "connecting: IO error: refused");
    }
}
