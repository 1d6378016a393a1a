//! Relay configuration: command-line flags with environment fallbacks and defaults.
//!
//! Values are taken as strings by clap and validated here, so an invalid value yields
//! a [`ConfigError`] that names the environment variable (the name operators set).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::store::EmbeddedOptions;

/// Flags and environment variables of `dchat-relay` (see `docs/relay.md`).
#[derive(Parser, Debug, Clone)]
#[command(name = "dchat-relay", version, about = "dchat WebSocket chat relay")]
pub struct Cli {
    /// Client WebSocket + HTTP listen address.
    #[arg(long, env = "DCHAT_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: String,
    /// Metrics and admin API listen address.
    #[arg(long, env = "DCHAT_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: String,
    /// Directory of the embedded store (used when DB_HOST is unset).
    #[arg(long, env = "DCHAT_DATA_DIR", default_value = "./dchat-data")]
    pub data_dir: PathBuf,
    /// Embedded store: MiB of memory for recently stored messages before they are
    /// written to sorted files (8..=65536; peak use about twice this).
    #[arg(long, env = "DCHAT_STORE_WRITE_BUFFER_MB", default_value = "128")]
    pub store_write_buffer_mb: String,
    /// PostgreSQL host; setting it selects the PostgreSQL store.
    #[arg(long, env = "DB_HOST")]
    pub db_host: Option<String>,
    /// PostgreSQL port.
    #[arg(long, env = "DB_PORT", default_value = "5432")]
    pub db_port: String,
    /// PostgreSQL database name.
    #[arg(long, env = "DB_NAME", default_value = "dchat")]
    pub db_name: String,
    /// PostgreSQL user.
    #[arg(long, env = "DB_USER", default_value = "dchat")]
    pub db_user: String,
    /// PostgreSQL password.
    #[arg(long, env = "DB_PASSWORD", default_value = "", hide_env_values = true)]
    pub db_password: String,
    /// PostgreSQL connection pool size.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value = "16")]
    pub db_max_connections: String,
    /// Largest accepted WebSocket text frame in bytes (1024..=16777216).
    #[arg(long, env = "DCHAT_MAX_MESSAGE_BYTES", default_value = "262144")]
    pub max_message_bytes: String,
    /// How long stored messages wait for their recipient (e.g. 720h, 30d, 90s).
    #[arg(long, env = "DCHAT_MESSAGE_TTL", default_value = "720h")]
    pub message_ttl: String,
    /// Peer relay WebSocket base URLs, comma-separated (ws://host:7070).
    #[arg(long, env = "DCHAT_PEERS", default_value = "")]
    pub peers: String,
    /// DNS name of the headless Service listing all relays (`name`: peers on this relay's
    /// own port, or `name:port`), re-resolved every 10 s.
    #[arg(long, env = "DCHAT_PEER_DNS", default_value = "")]
    pub peer_dns: String,
    /// Bearer token of the admin API; the admin API is disabled when empty.
    #[arg(
        long,
        env = "DCHAT_ADMIN_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub admin_token: String,
    /// Blockchain RPC URL (reserved for on-chain identity lookups; validated, not used yet).
    #[arg(long, env = "DCHAT_CHAIN_RPC", default_value = "")]
    pub chain_rpc: String,
    /// Sustained requests per second per connection.
    #[arg(long, env = "DCHAT_RATE_PER_SEC", default_value = "200")]
    pub rate_per_sec: String,
    /// Token bucket size per connection.
    #[arg(long, env = "DCHAT_RATE_BURST", default_value = "400")]
    pub rate_burst: String,
    /// Maximum concurrent client connections.
    #[arg(long, env = "DCHAT_MAX_CONNECTIONS", default_value = "100000")]
    pub max_connections: String,
    /// Time a new TCP connection (on either port) has to send a complete HTTP request
    /// head, and an HTTP keep-alive connection to send its next one; closed after it.
    #[arg(long, env = "DCHAT_HANDSHAKE_TIMEOUT", default_value = "10s")]
    pub handshake_timeout: String,
    /// Connections per port that are not (yet) WebSockets: waiting for their request,
    /// or plain HTTP. Beyond it the longest-waiting one is closed to make room.
    #[arg(long, env = "DCHAT_MAX_HANDSHAKES", default_value = "1024")]
    pub max_handshakes: String,
    /// Listen backlog of both ports: connections the kernel completes and queues until
    /// the relay accepts them (capped by the kernel at `net.core.somaxconn`).
    #[arg(long, env = "DCHAT_LISTEN_BACKLOG", default_value = "4096")]
    pub listen_backlog: String,
    /// Close connections silent for this long.
    #[arg(long, env = "DCHAT_IDLE_TIMEOUT", default_value = "120s")]
    pub idle_timeout: String,
    /// Time a new connection has to authenticate (challenge lifetime).
    #[arg(long, env = "DCHAT_AUTH_TIMEOUT", default_value = "10s")]
    pub auth_timeout: String,
    /// Close a client whose socket accepts no data for this long (slow reader).
    #[arg(long, env = "DCHAT_WRITE_TIMEOUT", default_value = "10s")]
    pub write_timeout: String,
    /// How long a sender waits for room in the full queue of a connected recipient
    /// before storing the message for it instead (backpressure; 0s stores at once).
    #[arg(long, env = "DCHAT_PUSH_WAIT", default_value = "250ms")]
    pub push_wait: String,
    /// Refuse new sends (error `overloaded`, retryable) while tasks wait this long to
    /// be scheduled, or while storing copies for recipients that fell behind takes this
    /// long: load shedding past saturation (0s never sheds).
    #[arg(long, env = "DCHAT_SHED_DELAY", default_value = "250ms")]
    pub shed_delay: String,
    /// Total time allowed for a drain after SIGTERM (keep below the pod's grace period).
    #[arg(long, env = "DCHAT_DRAIN_TIMEOUT", default_value = "25s")]
    pub drain_timeout: String,
    /// Time between readiness turning false and closing connections (lets load balancers see it).
    #[arg(long, env = "DCHAT_DRAIN_DELAY", default_value = "0s")]
    pub drain_delay: String,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log: String,
    /// Log format: text or json.
    #[arg(long, env = "DCHAT_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

impl Cli {
    /// Parses flags only, ignoring the environment (tests and embedding, where the
    /// process environment, e.g. `DB_HOST` from a test script, must not leak in).
    pub fn parse_without_env<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let cmd = Cli::command().mut_args(|a| a.env(None));
        Cli::from_arg_matches(&cmd.try_get_matches_from(args)?)
    }
}

/// An invalid setting; `setting` is the environment variable name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {setting}={value:?}: {reason}")]
pub struct ConfigError {
    /// Environment variable name of the setting.
    pub setting: &'static str,
    /// The rejected value (secrets are never echoed).
    pub value: String,
    /// Why it was rejected.
    pub reason: String,
}

fn bad(setting: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Where messages are stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageSettings {
    /// Embedded store in this directory (single relay).
    Embedded {
        /// Data directory.
        dir: PathBuf,
        /// Engine tuning (`DCHAT_STORE_WRITE_BUFFER_MB`).
        options: EmbeddedOptions,
    },
    /// Shared PostgreSQL database (cluster).
    Postgres {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
        /// Database name.
        dbname: String,
        /// User name.
        user: String,
        /// Password (never logged).
        password: String,
        /// Pool size.
        max_connections: usize,
    },
}

/// Validated relay configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Client listener address.
    pub listen: SocketAddr,
    /// Metrics/admin listener address.
    pub metrics_listen: SocketAddr,
    /// Storage backend.
    pub storage: StorageSettings,
    /// Largest accepted frame in bytes.
    pub max_message_bytes: usize,
    /// Lifetime of stored messages.
    pub message_ttl: Duration,
    /// Static peer base URLs (ws://host:port).
    pub peers: Vec<String>,
    /// Headless-service DNS name and port, if any.
    pub peer_dns: Option<String>,
    /// Admin bearer token; `None` disables the admin API.
    pub admin_token: Option<String>,
    /// Reserved chain RPC URL.
    pub chain_rpc: Option<String>,
    /// Token bucket refill rate per connection.
    pub rate_per_sec: u32,
    /// Token bucket size per connection.
    pub rate_burst: u32,
    /// Connection cap.
    pub max_connections: usize,
    /// Deadline for a request head: from accept to the first one, and on a keep-alive
    /// connection from one response to the next request (see `server::accept`).
    pub handshake_timeout: Duration,
    /// Connections per listener that are not WebSockets (see `server::handshake`).
    pub max_handshakes: usize,
    /// Listen backlog of both listeners.
    pub listen_backlog: u32,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Authentication deadline / challenge lifetime.
    pub auth_timeout: Duration,
    /// Slow-reader write timeout.
    pub write_timeout: Duration,
    /// Drain grace period.
    pub drain_grace: Duration,
    /// Delay between readiness false and closing connections.
    pub drain_delay: Duration,
    /// Log filter.
    pub log: String,
    /// Emit JSON logs.
    pub log_json: bool,
    /// Deliveries in flight per connection.
    pub max_inflight: usize,
    /// Queued outbound pushes per connection; a sender waits up to `push_wait` for
    /// room in a full queue, then falls back to storage.
    pub outbound_queue: usize,
    /// Longest wait of a sender for room in a recipient's full queue.
    pub push_wait: Duration,
    /// Scheduling delay at which new sends are refused (zero: never); see
    /// `server::overload`.
    pub shed_delay: Duration,
}

/// Parses durations like `90s`, `15m`, `720h`, `30d`, `250ms` and sums of them such as
/// `1h30m` (the form the operator's `DchatCluster` schema allows); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let n: u64 = s.parse().map_err(|_| "duration too large".to_string())?;
        return Ok(Duration::from_secs(n));
    }
    let mut total_ms: u64 = 0;
    let mut rest = s;
    loop {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| "expected a number followed by ms, s, m, h or d".to_string())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let mult_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err("expected a unit after the number (ms, s, m, h or d)".to_string()),
            other => return Err(format!("unknown unit {other:?} (use ms, s, m, h or d)")),
        };
        total_ms = n
            .checked_mul(mult_ms)
            .and_then(|part| total_ms.checked_add(part))
            .ok_or_else(|| "duration too large".to_string())?;
        rest = &rest[unit_len..];
        if rest.is_empty() {
            return Ok(Duration::from_millis(total_ms));
        }
    }
}

/// Upper bound of `DCHAT_PUSH_WAIT`: a sender that waits reads nothing from its own
/// client meanwhile, so longer waits would look like a stalled relay to it.
const MAX_PUSH_WAIT: Duration = Duration::from_secs(10);
/// Upper bound of `DCHAT_SHED_DELAY`: a relay whose tasks wait longer than this is not
/// serving anyone.
const MAX_SHED_DELAY: Duration = Duration::from_secs(10);

fn duration(setting: &'static str, v: &str, min: Duration) -> Result<Duration, ConfigError> {
    let d = parse_duration(v).map_err(|e| bad(setting, v, e))?;
    if d < min {
        return Err(bad(setting, v, format!("must be at least {min:?}")));
    }
    Ok(d)
}

/// A duration from zero up to `max`.
fn duration_at_most(
    setting: &'static str,
    v: &str,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let d = duration(setting, v, Duration::ZERO)?;
    if d > max {
        return Err(bad(setting, v, format!("must be at most {max:?}")));
    }
    Ok(d)
}

fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy>(
    setting: &'static str,
    v: &str,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    let n: T = v
        .trim()
        .parse()
        .map_err(|_| bad(setting, v, "not a number"))?;
    if n < min || n > max {
        return Err(bad(setting, v, format!("must be between {min} and {max}")));
    }
    Ok(n)
}

fn addr(setting: &'static str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.trim()
        .parse()
        .map_err(|e| bad(setting, v, format!("expected ip:port: {e}")))
}

fn ws_url(setting: &'static str, v: &str) -> Result<String, ConfigError> {
    let v = v.trim().trim_end_matches('/');
    // Peer links stay inside the cluster network; TLS is not supported on them.
    let rest = v
        .strip_prefix("ws://")
        .ok_or_else(|| bad(setting, v, "peer URLs must start with ws://"))?;
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(bad(setting, v, "peer URL has no host"));
    }
    Ok(v.to_string())
}

impl Config {
    /// Validates parsed flags/env into a configuration.
    pub fn from_cli(cli: &Cli) -> Result<Config, ConfigError> {
        let storage = match cli.db_host.as_deref().map(str::trim) {
            Some(host) if !host.is_empty() => StorageSettings::Postgres {
                host: host.to_string(),
                port: number("DB_PORT", &cli.db_port, 1u16, u16::MAX)?,
                dbname: non_empty("DB_NAME", &cli.db_name)?,
                user: non_empty("DB_USER", &cli.db_user)?,
                password: cli.db_password.clone(),
                max_connections: number("DB_MAX_CONNECTIONS", &cli.db_max_connections, 1, 1000)?,
            },
            _ => {
                if cli.data_dir.as_os_str().is_empty() {
                    return Err(bad("DCHAT_DATA_DIR", "", "must not be empty"));
                }
                let mb: u64 = number(
                    "DCHAT_STORE_WRITE_BUFFER_MB",
                    &cli.store_write_buffer_mb,
                    8,
                    65_536,
                )?;
                StorageSettings::Embedded {
                    dir: cli.data_dir.clone(),
                    options: EmbeddedOptions {
                        write_buffer_bytes: mb << 20,
                    },
                }
            }
        };
        let peers = cli
            .peers
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| ws_url("DCHAT_PEERS", p))
            .collect::<Result<Vec<_>, _>>()?;
        let listen = addr("DCHAT_LISTEN", &cli.listen)?;
        let peer_dns = match cli.peer_dns.trim() {
            "" => None,
            v => {
                // `name` (the headless Service; peers listen on our own port) or `name:port`.
                let (host, port) = match v.rsplit_once(':') {
                    Some((h, p)) => (
                        h,
                        p.parse::<u16>()
                            .map_err(|_| bad("DCHAT_PEER_DNS", v, "port must be 1-65535"))?,
                    ),
                    None => (v, listen.port()),
                };
                if host.is_empty() || port == 0 || host.contains(char::is_whitespace) {
                    return Err(bad(
                        "DCHAT_PEER_DNS",
                        v,
                        "expected the headless Service name, optionally with :port",
                    ));
                }
                Some(format!("{host}:{port}"))
            }
        };
        let chain_rpc = match cli.chain_rpc.trim() {
            "" => None,
            v if v.starts_with("http://")
                || v.starts_with("https://")
                || v.starts_with("ws://")
                || v.starts_with("wss://") =>
            {
                Some(v.to_string())
            }
            v => {
                return Err(bad(
                    "DCHAT_CHAIN_RPC",
                    v,
                    "must be an http(s):// or ws(s):// URL",
                ))
            }
        };
        let admin_token = match cli.admin_token.as_str() {
            "" => None,
            t if t.len() < 16 => {
                return Err(bad(
                    "DCHAT_ADMIN_TOKEN",
                    "<redacted>",
                    "must be at least 16 characters",
                ))
            }
            t => Some(t.to_string()),
        };
        let log_json = match cli.log_format.as_str() {
            "text" => false,
            "json" => true,
            v => return Err(bad("DCHAT_LOG_FORMAT", v, "must be text or json")),
        };
        if tracing_subscriber::EnvFilter::try_new(&cli.log).is_err() {
            return Err(bad("RUST_LOG", &cli.log, "not a valid log filter"));
        }
        Ok(Config {
            listen,
            metrics_listen: addr("DCHAT_METRICS_LISTEN", &cli.metrics_listen)?,
            storage,
            max_message_bytes: number(
                "DCHAT_MAX_MESSAGE_BYTES",
                &cli.max_message_bytes,
                1024usize,
                16 * 1024 * 1024,
            )?,
            message_ttl: duration(
                "DCHAT_MESSAGE_TTL",
                &cli.message_ttl,
                Duration::from_secs(1),
            )?,
            peers,
            peer_dns,
            admin_token,
            chain_rpc,
            rate_per_sec: number("DCHAT_RATE_PER_SEC", &cli.rate_per_sec, 1u32, 1_000_000)?,
            rate_burst: number("DCHAT_RATE_BURST", &cli.rate_burst, 1u32, 1_000_000)?,
            max_connections: number(
                "DCHAT_MAX_CONNECTIONS",
                &cli.max_connections,
                1usize,
                10_000_000,
            )?,
            handshake_timeout: duration(
                "DCHAT_HANDSHAKE_TIMEOUT",
                &cli.handshake_timeout,
                Duration::from_millis(100),
            )?,
            max_handshakes: number(
                "DCHAT_MAX_HANDSHAKES",
                &cli.max_handshakes,
                1usize,
                1_000_000,
            )?,
            listen_backlog: number("DCHAT_LISTEN_BACKLOG", &cli.listen_backlog, 1u32, 65_535)?,
            idle_timeout: duration(
                "DCHAT_IDLE_TIMEOUT",
                &cli.idle_timeout,
                Duration::from_secs(1),
            )?,
            auth_timeout: duration(
                "DCHAT_AUTH_TIMEOUT",
                &cli.auth_timeout,
                Duration::from_millis(100),
            )?,
            write_timeout: duration(
                "DCHAT_WRITE_TIMEOUT",
                &cli.write_timeout,
                Duration::from_millis(100),
            )?,
            drain_grace: duration(
                "DCHAT_DRAIN_TIMEOUT",
                &cli.drain_timeout,
                Duration::from_secs(1),
            )?,
            drain_delay: duration("DCHAT_DRAIN_DELAY", &cli.drain_delay, Duration::ZERO)?,
            log: cli.log.clone(),
            log_json,
            max_inflight: 256,
            outbound_queue: 128,
            push_wait: duration_at_most("DCHAT_PUSH_WAIT", &cli.push_wait, MAX_PUSH_WAIT)?,
            shed_delay: duration_at_most("DCHAT_SHED_DELAY", &cli.shed_delay, MAX_SHED_DELAY)?,
        })
    }

    /// A configuration for tests and embedding: ephemeral ports on 127.0.0.1,
    /// embedded store in `dir`, defaults elsewhere. Ignores the environment. Panics only
    /// if the built-in defaults fail validation, which is a bug caught by the unit tests.
    pub fn for_test(dir: impl Into<PathBuf>) -> Config {
        let cli = Cli::parse_without_env([
            "dchat-relay",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .unwrap_or_else(|e| panic!("default flags: {e}"));
        let mut cfg = Config::from_cli(&cli).unwrap_or_else(|e| panic!("default config: {e}"));
        cfg.storage = StorageSettings::Embedded {
            dir: dir.into(),
            options: EmbeddedOptions::default(),
        };
        cfg.log = "info".into();
        // Many test relays share one loaded machine (debug builds, parallel tests), where
        // a scheduling delay says nothing about the relay; the shedding tests turn it on.
        cfg.shed_delay = Duration::ZERO;
        cfg
    }
}

fn non_empty(setting: &'static str, v: &str) -> Result<String, ConfigError> {
    if v.trim().is_empty() {
        return Err(bad(setting, v, "must not be empty"));
    }
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["dchat-relay"];
        all.extend_from_slice(args);
        Config::from_cli(&Cli::parse_without_env(all).unwrap())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("720h"), Ok(Duration::from_secs(720 * 3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5 weeks").is_err());
        assert_eq!(
            parse_duration("1h30m"),
            Ok(Duration::from_secs(3600 + 30 * 60))
        );
        assert_eq!(
            parse_duration("1m30s500ms"),
            Ok(Duration::from_millis(90_500))
        );
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1h30").is_err());
        assert!(parse_duration("1h-30m").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    /// `flag` defaults to `default`, takes `0s`, and refuses `11s` and a non-duration
    /// with an error naming `setting`.
    fn assert_bounded_duration(
        flag: &str,
        setting: &str,
        default: Duration,
        get: fn(&Config) -> Duration,
    ) {
        assert_eq!(get(&parse(&[]).unwrap()), default);
        assert_eq!(get(&parse(&[flag, "0s"]).unwrap()), Duration::ZERO);
        assert_eq!(parse(&[flag, "11s"]).unwrap_err().setting, setting);
        assert_eq!(parse(&[flag, "soon"]).unwrap_err().setting, setting);
    }

    #[test]
    fn shed_delay_is_bounded() {
        assert_bounded_duration(
            "--shed-delay",
            "DCHAT_SHED_DELAY",
            Duration::from_millis(250),
            |c| c.shed_delay,
        );
    }

    #[test]
    fn push_wait_is_bounded() {
        assert_bounded_duration(
            "--push-wait",
            "DCHAT_PUSH_WAIT",
            Duration::from_millis(250),
            |c| c.push_wait,
        );
    }

    #[test]
    fn invalid_values_name_the_setting() {
        let e = parse(&["--message-ttl", "soon"]).unwrap_err();
        assert_eq!(e.setting, "DCHAT_MESSAGE_TTL");
        let e = parse(&["--max-message-bytes", "12"]).unwrap_err();
        assert_eq!(e.setting, "DCHAT_MAX_MESSAGE_BYTES");
        let e = parse(&["--listen", "nowhere"]).unwrap_err();
        assert_eq!(e.setting, "DCHAT_LISTEN");
        let e = parse(&["--peers", "http://a:1"]).unwrap_err();
        assert_eq!(e.setting, "DCHAT_PEERS");
        let e = parse(&["--db-host", "pg", "--db-port", "0"]).unwrap_err();
        assert_eq!(e.setting, "DB_PORT");
        let e = parse(&["--store-write-buffer-mb", "4"]).unwrap_err();
        assert_eq!(e.setting, "DCHAT_STORE_WRITE_BUFFER_MB");
        assert!(e.to_string().contains("between 8 and 65536"), "{e}");
        let e = parse(&["--store-write-buffer-mb", "lots"]).unwrap_err();
        assert_eq!(e.setting, "DCHAT_STORE_WRITE_BUFFER_MB");
        let e = parse(&["--handshake-timeout", "50ms"]).unwrap_err();
        assert_eq!(e.setting, "DCHAT_HANDSHAKE_TIMEOUT");
        let e = parse(&["--handshake-timeout", "soon"]).unwrap_err();
        assert_eq!(e.setting, "DCHAT_HANDSHAKE_TIMEOUT");
        let e = parse(&["--max-handshakes", "0"]).unwrap_err();
        assert_eq!(e.setting, "DCHAT_MAX_HANDSHAKES");
        let e = parse(&["--admin-token", "short"]).unwrap_err();
        assert_eq!(e.setting, "DCHAT_ADMIN_TOKEN");
        assert!(!e.to_string().contains("short"), "secret echoed: {e}");
    }

    #[test]
    fn write_buffer_is_given_in_mib() {
        let c = parse(&["--store-write-buffer-mb", "64"]).unwrap();
        let StorageSettings::Embedded { options, .. } = c.storage else {
            panic!("embedded store expected");
        };
        assert_eq!(options.write_buffer_bytes, 64 << 20);
    }

    #[test]
    fn defaults_select_embedded_store() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.storage,
            StorageSettings::Embedded {
                dir: PathBuf::from("./dchat-data"),
                options: EmbeddedOptions::default(),
            }
        );
        assert_eq!(c.listen.port(), 7070);
        assert_eq!(c.metrics_listen.port(), 9090);
        assert_eq!(c.max_message_bytes, 262_144);
        assert_eq!(c.message_ttl, Duration::from_secs(720 * 3600));
        assert!(c.admin_token.is_none());
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.max_handshakes, 1024);
        assert_eq!(c.listen_backlog, 4096);
    }

    #[test]
    fn db_host_selects_postgres_and_peers_parse() {
        let c = parse(&[
            "--db-host",
            "pg.svc",
            "--db-port",
            "6543",
            "--peers",
            "ws://a:7070, ws://b:7070/",
        ])
        .unwrap();
        assert!(matches!(
            c.storage,
            StorageSettings::Postgres { port: 6543, .. }
        ));
        assert_eq!(c.peers, vec!["ws://a:7070", "ws://b:7070"]);
    }
}
