//! The load generator runs a tiny scenario end to end against an in-process relay and
//! router: every message scheduled in the window is received and recorded. Asserts
//! correctness of the generator only, never performance.

use std::time::Duration;

use dchat_bench::driver::{run_step, Pattern, Recorder, Rng, Step};
use dchat_bench::systems::{connect, Target};
use dchat_relay::config::Config;
use dchat_relay::server::Relay;

fn tiny() -> Step {
    Step {
        rate: 200.0,
        warmup: Duration::from_millis(200),
        measure: Duration::from_secs(1),
        payload: 256,
        drain: Duration::from_secs(5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_second_direct_and_fanout_against_relay() {
    let dir = std::env::temp_dir().join(format!("dchat-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let relay = Relay::bind(Config::for_test(&dir)).await.unwrap().spawn();
    let target = Target::Relay(relay.ws_url());

    let rec = Recorder::new();
    let eps = connect(&target, 10, 4, 0, Duration::from_millis(50), &rec)
        .await
        .unwrap();
    let (mut seq, mut rng) = (0, Rng::new(7));
    let r = run_step(
        &eps,
        &rec,
        Pattern::Direct,
        tiny(),
        &mut seq,
        &mut rng,
        None,
    )
    .await;
    assert!(r.sent > 50, "{r:?}");
    assert_eq!(r.received, r.expected, "{r:?}");
    assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us, "{r:?}");
    assert_eq!(rec.errors.load(std::sync::atomic::Ordering::Relaxed), 0);

    // Two channels of 3 members: each message reaches the 2 other members.
    let rec = Recorder::new();
    let eps = connect(&target, 6, 4, 3, Duration::ZERO, &rec)
        .await
        .unwrap();
    let r = run_step(
        &eps,
        &rec,
        Pattern::Channel { members: 3 },
        tiny(),
        &mut seq,
        &mut rng,
        None,
    )
    .await;
    assert_eq!(r.expected, r.sent * 2, "{r:?}");
    assert_eq!(r.received, r.expected, "{r:?}");
    assert!(r.last_p99_us >= r.p50_us, "{r:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_second_against_bare_router() {
    let port = dchat_bench::procs::free_port().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    tokio::spawn(dchat_bench::router::serve(addr));
    dchat_bench::procs::wait_port("router", addr, Duration::from_secs(5))
        .await
        .unwrap();
    let rec = Recorder::new();
    let eps = connect(
        &Target::Router(format!("ws://{addr}/")),
        10,
        4,
        0,
        Duration::ZERO,
        &rec,
    )
    .await
    .unwrap();
    let (mut seq, mut rng) = (0, Rng::new(9));
    let r = run_step(
        &eps,
        &rec,
        Pattern::Direct,
        tiny(),
        &mut seq,
        &mut rng,
        None,
    )
    .await;
    assert!(r.sent > 50, "{r:?}");
    assert_eq!(r.received, r.expected, "{r:?}");
}

/// S5's flood at toy size: its sockets are closed by the relay at the handshake
/// deadline and reopened, the relay counts the timeouts, and the `/health` prober and
/// the metric reader work against the metrics port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_flood_is_closed_at_the_deadline_and_reopened() {
    use dchat_bench::flood::{self, Flood};
    let dir = std::env::temp_dir().join(format!("dchat-bench-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = Config::for_test(&dir);
    cfg.handshake_timeout = Duration::from_millis(300);
    let relay = Relay::bind(cfg).await.unwrap().spawn();
    let f = Flood::start(relay.addr, 10, 10).unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let prober = tokio::spawn(flood::probe_health(
        relay.metrics_addr,
        Duration::from_millis(50),
        rx,
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // Every socket closed at least twice: the flood reopens what the relay closes.
    while f.stats.closed.load(std::sync::atomic::Ordering::Relaxed) < 40 {
        assert!(std::time::Instant::now() < deadline, "{:?}", f.stats);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = f.stop();
    let _ = stop.send(true);
    let probes = prober.await.unwrap();
    assert_eq!(probes.failures, 0);
    assert!(!probes.latencies.is_empty());
    assert!(stats.opened.load(std::sync::atomic::Ordering::Relaxed) >= 40);
    assert_eq!(stats.open.load(std::sync::atomic::Ordering::Relaxed), 0);
    let (status, text) = flood::get(relay.metrics_addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let timeouts =
        flood::metric(&text, "dchat_handshake_timeouts_total{listener=\"client\"}").unwrap();
    assert!(timeouts >= 40.0, "{timeouts}");
    relay.drain().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
