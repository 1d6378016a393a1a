//! The soak (issue 23) for a few seconds at toy size against a relay process: with
//! reconnecting and offline clients every accepted message arrives exactly once, stored
//! messages come back with their recipients, the relay is sampled every second — and a
//! message a client drops on purpose is reported lost. Asserts correctness only, never
//! speed or memory.
//!
//! The relay process is this test executable re-run with the ignored test
//! [`child_relay`] selected (as in `s3_smoke.rs`): always built from the current sources.

use std::path::PathBuf;
use std::time::Duration;

use dchat_bench::s3::{Backend, PgTarget, RelayLaunch};
use dchat_bench::soak::{run, verdicts, Params, Report};

/// Set in the child's environment; without it `child_relay` returns at once.
const CHILD_ENV: &str = "DCHAT_SOAK_SMOKE_CHILD";

fn launch() -> RelayLaunch {
    RelayLaunch {
        program: std::env::current_exe().unwrap(),
        args: ["child_relay", "--exact", "--ignored", "--test-threads=1"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        env: vec![(CHILD_ENV.into(), "1".into())],
        cpu: None,
    }
}

/// 40 clients, 200 msgs/s for 4 s; 4 reconnects a second; 8 clients offline, 1 s each.
fn params() -> Params {
    Params {
        clients: 40,
        rate: 200.0,
        duration: Duration::from_secs(4),
        interval: Duration::from_secs(1),
        warmup: Duration::from_secs(1),
        reconnect_per_sec: 0.1,
        offline_fraction: 0.2,
        offline_for: Duration::from_secs(1),
        payload: 64,
        ack_delay: Duration::from_millis(50),
        parallel: 8,
        final_timeout: Duration::from_secs(60),
        seed: 7,
        drop_one_delivery: false,
    }
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dchat-soak-smoke-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn soak(backend: &Backend, p: &Params) -> Report {
    let mut rows = 0;
    let r = run(&launch(), backend, p, |_| rows += 1).await.unwrap();
    assert_eq!(rows, r.rows.len());
    r
}

/// Every accepted message arrived exactly once, through the churn.
fn assert_clean(r: &Report) {
    let (t, x) = (&r.tally, &r.totals);
    assert!(t.written > 400, "about 800 messages were sent: {r:#?}");
    assert_eq!(t.accepted, t.written, "{r:#?}");
    assert_eq!((t.refused, t.unanswered), (0, 0), "{r:#?}");
    assert_eq!(t.lost, 0, "{r:#?}");
    assert_eq!(t.received, t.accepted, "{r:#?}");
    assert_eq!((x.duplicated, x.unexpected), (0, 0), "{r:#?}");
    assert_eq!(x.received, t.received, "{r:#?}");
    // The churn happened, and offline recipients got their stored messages.
    assert!(x.reconnects > 0, "{r:#?}");
    assert!(x.stored > 0 && x.received_stored > 0, "{r:#?}");
    assert_eq!(r.unfinished_clients, 0, "{r:#?}");
    assert!(!r.failed(), "{r:#?}");
    // One sample a second, each with the relay's memory and descriptors.
    assert!(r.rows.len() >= 3, "{r:#?}");
    assert!(
        r.rows.iter().all(|row| row.rss_kib > 0 && row.fds > 0),
        "{r:#?}"
    );
    let v = verdicts(r);
    assert_eq!(v[0].pass, Some(true), "{v:?}");
    assert_eq!(v[1].pass, Some(true), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_loses_and_duplicates_nothing_through_churn() {
    let root = scratch("plain");
    let r = soak(&Backend::Embedded { root: root.clone() }, &params()).await;
    assert_clean(&r);
    // The data directory is removed after the run.
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&root);
}

/// The loss detector end to end: a client acknowledges one delivery without recording
/// it, and the run reports exactly that message lost and fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_reports_a_dropped_message_as_lost() {
    let root = scratch("drop");
    let mut p = params();
    p.duration = Duration::from_secs(2);
    p.drop_one_delivery = true;
    let r = soak(&Backend::Embedded { root: root.clone() }, &p).await;
    assert_eq!(r.tally.lost, 1, "{r:#?}");
    assert_eq!(r.tally.received + 1, r.tally.accepted, "{r:#?}");
    assert!(r.failed());
    let lost = &verdicts(&r)[0];
    assert_eq!(lost.pass, Some(false), "{lost:?}");
    assert!(lost.line().contains("FAIL"), "{}", lost.line());
    let _ = std::fs::remove_dir_all(&root);
}

/// The PostgreSQL store when a test server is configured (`scripts/with-postgres.sh`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_on_postgres_loses_nothing() {
    let Ok(url) = std::env::var("DCHAT_TEST_DATABASE_URL") else {
        eprintln!("DCHAT_TEST_DATABASE_URL not set: PostgreSQL variant skipped");
        return;
    };
    // postgres://user@host:port/db, as scripts/with-postgres.sh exports it.
    let rest = url.strip_prefix("postgres://").unwrap();
    let (user, rest) = rest.split_once('@').unwrap();
    let (hostport, dbname) = rest.split_once('/').unwrap();
    let (host, port) = hostport.split_once(':').unwrap();
    let pg = PgTarget {
        host: host.into(),
        port: port.parse().unwrap(),
        dbname: dbname.into(),
        user: user.into(),
        password: String::new(),
        truncate: false,
    };
    let r = soak(&Backend::Postgres(pg), &params()).await;
    assert_clean(&r);
}

/// The relay process of the tests above. Configured entirely by the environment the
/// soak sets, like `dchat-relay`.
#[test]
#[ignore = "child process of the soak smoke tests"]
fn child_relay() {
    use clap::Parser;
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let cli = dchat_relay::config::Cli::try_parse_from(["dchat-relay"]).unwrap();
    let cfg = dchat_relay::config::Config::from_cli(&cli).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let relay = dchat_relay::server::Relay::bind(cfg).await.unwrap();
        // Runs until killed: the soak ends it with SIGKILL.
        relay.run(std::future::pending()).await.unwrap();
    });
}
