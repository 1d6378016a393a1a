//! Three relays sharing one PostgreSQL database act as one service: live messages
//! cross relays through peer-link wake notices, and offline messages are picked up
//! on reconnect to any relay.

#[path = "support/postgres.rs"]
mod pg_support;

use std::time::Duration;

use dchat_relay::client::{generate_key, public_key, Client};
use dchat_relay::config::Config;
use dchat_relay::protocol::{Kind, SendStatus};
use dchat_relay::server::{Relay, RunningRelay};

async fn cluster_of_three() -> Vec<RunningRelay> {
    let pg = pg_support::fresh_database(4).await;
    let mut relays = Vec::new();
    for _ in 0..3 {
        let mut cfg = Config::for_test(std::env::temp_dir());
        cfg.storage = pg_support::relay_storage(&pg);
        relays.push(Relay::bind(cfg).await.unwrap());
    }
    let urls: Vec<String> = relays
        .iter()
        .map(|r| format!("ws://{}", r.local_addr()))
        .collect();
    for r in relays.iter_mut() {
        // Every relay gets the full list, itself included (as with DNS discovery):
        // the link to itself must be detected and dropped, leaving two links each.
        for u in &urls {
            r.add_peer(u.clone());
        }
    }
    let running: Vec<RunningRelay> = relays.into_iter().map(Relay::spawn).collect();
    // Wait until every relay has its two outgoing links up.
    for r in &running {
        for _ in 0..1500 {
            if r.shared.metrics.peer_links.get() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(r.shared.metrics.peer_links.get(), 2, "peer links not up");
    }
    running
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_act_as_one_service() {
    let relays = cluster_of_three().await;
    let (r1, r2, r3) = (&relays[0], &relays[1], &relays[2]);

    // Live: A on relay 1, B on relay 2.
    let mut a = Client::connect(&r1.ws_url(), generate_key().unwrap())
        .await
        .unwrap();
    let mut b = Client::connect(&r2.ws_url(), generate_key().unwrap())
        .await
        .unwrap();
    let s = a.send_text(b.key(), "across relays").await.unwrap();
    assert_eq!(
        s.status,
        SendStatus::Stored,
        "cross-relay goes via the shared store"
    );
    let d = b.next_delivery().await.unwrap();
    assert_eq!(d.envelope.payload.0, b"across relays");
    assert_eq!(d.envelope.from, Some(a.key()));
    assert_eq!(b.ack(vec![d.ack_ref()]).await.unwrap(), 1);
    assert!(r2.shared.metrics.peer_wakes_received.get() >= 1);

    // And back, B (relay 2) to A (relay 1), several in order.
    for i in 0..5 {
        b.send_text(a.key(), &format!("reply {i}")).await.unwrap();
    }
    for i in 0..5 {
        let d = a.next_delivery().await.unwrap();
        assert_eq!(d.envelope.payload.0, format!("reply {i}").as_bytes());
        a.ack(vec![d.ack_ref()]).await.unwrap();
    }

    // Offline: C is not connected anywhere; A sends via relay 1; C connects to relay 3.
    let ckey = generate_key().unwrap();
    let s = a
        .send_text(public_key(&ckey), "while you were away")
        .await
        .unwrap();
    assert_eq!(s.status, SendStatus::Stored);
    let mut c = Client::connect(&r3.ws_url(), ckey.clone()).await.unwrap();
    let d = c.next_delivery().await.unwrap();
    assert_eq!(d.envelope.payload.0, b"while you were away");
    c.ack(vec![d.ack_ref()]).await.unwrap();

    // Channels span relays: members on relays 2 and 3 get a post from relay 1.
    a.join("ops").await.unwrap();
    b.join("ops").await.unwrap();
    c.join("ops").await.unwrap();
    let env = a.envelope_channel("ops", Kind::Text, b"deploy at noon".to_vec());
    let s = a.send(env.clone()).await.unwrap();
    assert_eq!(s.stored, Some(2));
    assert_eq!(b.next_delivery().await.unwrap().envelope.id, env.id);
    assert_eq!(c.next_delivery().await.unwrap().envelope.id, env.id);

    for r in relays {
        let report = r.drain().await.unwrap();
        assert_eq!(report.abandoned_connections, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_are_discovered_through_dns() {
    let pg = pg_support::fresh_database(4).await;
    let storage = pg_support::relay_storage(&pg);
    let mut cfg = Config::for_test(std::env::temp_dir());
    cfg.storage = storage.clone();
    let r1 = Relay::bind(cfg).await.unwrap().spawn();
    // Relay 2 finds relay 1 by resolving a name (as with a headless Service).
    let mut cfg = Config::for_test(std::env::temp_dir());
    cfg.storage = storage;
    cfg.peer_dns = Some(format!("localhost:{}", r1.addr.port()));
    let r2 = Relay::bind(cfg).await.unwrap().spawn();
    for _ in 0..1500 {
        if r2.shared.metrics.peer_links.get() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(r2.shared.metrics.peer_links.get() >= 1, "no link from DNS");
    let mut a = Client::connect(&r2.ws_url(), generate_key().unwrap())
        .await
        .unwrap();
    let mut b = Client::connect(&r1.ws_url(), generate_key().unwrap())
        .await
        .unwrap();
    a.send_text(b.key(), "found you").await.unwrap();
    assert_eq!(
        b.next_delivery().await.unwrap().envelope.payload.0,
        b"found you"
    );
}
