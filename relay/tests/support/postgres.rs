//! A real PostgreSQL server for tests.
//!
//! Under `scripts/with-postgres.sh`, `DCHAT_TEST_DATABASE_URL` names a throwaway server
//! and that one is used. When the variable is unset (plain `cargo test`), the first test
//! that needs PostgreSQL starts a private server — initdb + pg_ctl from
//! `/usr/lib/postgresql/*/bin`, in a temp dir, on a free port, as the `postgres` user
//! when running as root — so PostgreSQL tests never silently skip. A watchdog process
//! stops that server and removes its directory once the test process has exited.
//!
//! Every test gets its own database ([`fresh_database`]), so tests run in parallel.
//!
//! Include with `#[path = "support/postgres.rs"] mod pg_support;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use dchat_relay::store::PostgresConfig;

/// Where the test server listens and who to connect as.
#[derive(Clone, Debug)]
pub struct PgServer {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// A database that exists on the server, used to create the per-test ones.
    pub admin_db: String,
}

impl PgServer {
    /// Settings for database `dbname` on this server.
    pub fn config(&self, dbname: &str, max_connections: usize) -> PostgresConfig {
        PostgresConfig {
            host: self.host.clone(),
            port: self.port,
            dbname: dbname.to_string(),
            user: self.user.clone(),
            password: self.password.clone(),
            max_connections,
        }
    }

    /// A libpq-style connection string for `dbname`.
    pub fn conn_str(&self, dbname: &str) -> String {
        let mut s = format!(
            "host={} port={} user={} dbname={}",
            self.host, self.port, self.user, dbname
        );
        if !self.password.is_empty() {
            s.push_str(&format!(" password={}", self.password));
        }
        s
    }
}

static SERVER: OnceLock<PgServer> = OnceLock::new();

/// The shared test server (started on first use when the environment has none).
pub fn server() -> &'static PgServer {
    SERVER.get_or_init(|| match std::env::var("DCHAT_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => parse_url(&url),
        _ => start_private_server(),
    })
}

/// Parses `postgres://user[:password]@host:port/dbname`.
fn parse_url(url: &str) -> PgServer {
    let cfg: tokio_postgres::Config = url
        .parse()
        .unwrap_or_else(|e| panic!("DCHAT_TEST_DATABASE_URL {url:?} is not a valid URL: {e}"));
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        other => panic!("DCHAT_TEST_DATABASE_URL: need a TCP host, got {other:?}"),
    };
    PgServer {
        host,
        port: cfg.get_ports().first().copied().unwrap_or(5432),
        user: cfg.get_user().unwrap_or("postgres").to_string(),
        password: cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default(),
        admin_db: cfg.get_dbname().unwrap_or("postgres").to_string(),
    }
}

fn pg_bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect(
            "PostgreSQL is not installed (/usr/lib/postgresql missing); run scripts/ensure-deps.sh",
        )
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    // Highest major version.
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
        .expect("no /usr/lib/postgresql/*/bin/initdb; run scripts/ensure-deps.sh")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary, as `postgres` when we are root (initdb refuses root).
fn pg_command(bin: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free local port")
}

fn start_private_server() -> PgServer {
    let bin = pg_bin_dir();
    let root = is_root();
    let dir = std::env::temp_dir().join(format!(
        "dchat-test-pg-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("create PostgreSQL temp dir");
    if root {
        let ok = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "chown postgres {}", dir.display());
    }
    let data = dir.join("data");
    let out = pg_command(&bin.join("initdb"), root)
        .arg("-D")
        .arg(&data)
        .args(["-U", "dchat", "--auth=trust", "-E", "UTF8", "--no-sync"])
        .stdout(Stdio::null())
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The watchdog outlives us: when this test process is gone (passed, failed or killed)
    // it stops the server and deletes the directory.
    let pg_ctl = bin.join("pg_ctl");
    let stop = if root {
        format!(
            "runuser -u postgres -- {} -D {} -m immediate stop",
            pg_ctl.display(),
            data.display()
        )
    } else {
        format!(
            "{} -D {} -m immediate stop",
            pg_ctl.display(),
            data.display()
        )
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display()
    );
    // Backgrounded by the shell, which exits at once: nothing to wait for, no zombie.
    let started = Command::new("sh")
        .arg("-c")
        .arg(format!("({script}) </dev/null >/dev/null 2>&1 &"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(started, "spawn PostgreSQL watchdog");

    let mut last_err = String::new();
    for _ in 0..5 {
        let port = free_port();
        let out = pg_command(&pg_ctl, root)
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .arg("-w")
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
                dir.display()
            ))
            .arg("start")
            .stdout(Stdio::null())
            .output()
            .expect("run pg_ctl start");
        if out.status.success() {
            eprintln!(
                "test PostgreSQL started on 127.0.0.1:{port} in {}",
                dir.display()
            );
            return PgServer {
                host: "127.0.0.1".into(),
                port,
                user: "dchat".into(),
                password: String::new(),
                admin_db: "postgres".into(),
            };
        }
        last_err = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
    }
    panic!("could not start a test PostgreSQL server: {last_err}");
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates an empty database for one test and returns settings for it.
pub async fn fresh_database(max_connections: usize) -> PostgresConfig {
    let srv = server();
    let name = format!(
        "t_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let client = admin_client(&srv.admin_db).await;
    client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    srv.config(&name, max_connections)
}

/// A plain connection to `dbname` on the test server, for assertions and sabotage.
pub async fn admin_client(dbname: &str) -> tokio_postgres::Client {
    let srv = server();
    let (client, conn) = tokio_postgres::connect(&srv.conn_str(dbname), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to test PostgreSQL {}:{}: {e}", srv.host, srv.port));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Relay storage settings pointing at a test database.
pub fn relay_storage(pg: &PostgresConfig) -> dchat_relay::config::StorageSettings {
    dchat_relay::config::StorageSettings::Postgres {
        host: pg.host.clone(),
        port: pg.port,
        dbname: pg.dbname.clone(),
        user: pg.user.clone(),
        password: pg.password.clone(),
        max_connections: pg.max_connections,
    }
}
