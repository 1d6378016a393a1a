//! Three relays sharing one PostgreSQL database act as one service: live messages
//! cross relays through peer-link wake notices, and offline messages are picked up
//! on reconnect to any relay.

#[path = "support/postgres.rs"]
mod pg_support;

use std::time::Duration;

use dchat_relay::client::{generate_key, public_key, Client, ClientError};
use dchat_relay::config::Config;
use dchat_relay::protocol::{ErrorCode, Kind, SendStatus};
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

// ---- Exactly-once across relays (issue 23, part 0) ----
//
// Relays A, B and C share one database. Clients reconnect to whichever relay the
// Service picks, so a retry through another relay than the first attempt is the normal
// case after a failover or a drain: the answer and the deliveries must not depend on
// which relay a retry reaches.

/// After every earlier answer of the test, nothing more reaches `r`: a `fetch` writes
/// the pushes already queued for the session (the pump takes them first) and every
/// stored message not yet in flight on it, so an empty answer means no further copy.
async fn assert_no_more_deliveries(r: &mut Client, what: &str) {
    let (extra, more) = r.fetch(100).await.unwrap();
    let ids: Vec<&str> = extra.iter().map(|d| d.envelope.id.as_str()).collect();
    assert!(
        extra.is_empty() && !more,
        "{what}: unexpected further deliveries {ids:?}"
    );
}

/// Fetches and acknowledges until nothing is left; returns every delivery seen.
async fn receive_everything(r: &mut Client) -> Vec<dchat_relay::client::Delivery> {
    let mut all = Vec::new();
    loop {
        let (batch, more) = r.fetch(1000).await.unwrap();
        if batch.is_empty() && !more {
            return all;
        }
        if !batch.is_empty() {
            r.ack(batch.iter().map(|d| d.ack_ref()).collect())
                .await
                .unwrap();
        }
        all.extend(batch);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_message_retried_through_the_recipients_relay_before_its_ack_is_a_duplicate() {
    let relays = cluster_of_three().await;
    let (ra, rb) = (&relays[0], &relays[1]);
    let skey = generate_key().unwrap();
    let mut s_a = Client::connect(&ra.ws_url(), skey.clone()).await.unwrap();
    let mut r = Client::connect(&rb.ws_url(), generate_key().unwrap())
        .await
        .unwrap();
    let env = s_a.envelope_to(r.key(), Kind::Text, b"exactly once".to_vec());
    assert_eq!(
        s_a.send(env.clone()).await.unwrap().status,
        SendStatus::Stored
    );
    let d = r.next_delivery().await.unwrap();
    assert_eq!(d.envelope.id, env.id);

    // The sender's retry reaches B, where the recipient holds the copy unacknowledged.
    let mut s_b = Client::connect(&rb.ws_url(), skey).await.unwrap();
    assert_eq!(
        s_b.send(env.clone()).await.unwrap().status,
        SendStatus::Duplicate,
        "retry via the recipient's relay before the ack"
    );
    assert_eq!(r.ack(vec![d.ack_ref()]).await.unwrap(), 1);
    assert_no_more_deliveries(&mut r, "after the retry via B").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_message_retried_after_its_ack_is_a_duplicate_through_every_relay() {
    let relays = cluster_of_three().await;
    let (ra, rb, rc) = (&relays[0], &relays[1], &relays[2]);
    let skey = generate_key().unwrap();
    let mut s_a = Client::connect(&ra.ws_url(), skey.clone()).await.unwrap();
    let mut r = Client::connect(&rb.ws_url(), generate_key().unwrap())
        .await
        .unwrap();
    let env = s_a.envelope_to(r.key(), Kind::Text, b"exactly once".to_vec());
    assert_eq!(
        s_a.send(env.clone()).await.unwrap().status,
        SendStatus::Stored
    );
    let d = r.next_delivery().await.unwrap();
    assert_eq!(d.envelope.id, env.id);
    assert_eq!(r.ack(vec![d.ack_ref()]).await.unwrap(), 1);

    for (name, relay) in [("A", ra), ("B", rb), ("C", rc)] {
        let mut s = Client::connect(&relay.ws_url(), skey.clone())
            .await
            .unwrap();
        assert_eq!(
            s.send(env.clone()).await.unwrap().status,
            SendStatus::Duplicate,
            "retry via {name} after the ack"
        );
        assert_no_more_deliveries(&mut r, &format!("after the retry via {name}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_message_retried_through_another_relay_is_a_duplicate() {
    let relays = cluster_of_three().await;
    let (ra, rb, rc) = (&relays[0], &relays[1], &relays[2]);
    let skey = generate_key().unwrap();
    let mut s_a = Client::connect(&ra.ws_url(), skey.clone()).await.unwrap();
    let mut r = Client::connect(&ra.ws_url(), generate_key().unwrap())
        .await
        .unwrap();
    let env = s_a.envelope_to(r.key(), Kind::Text, b"pushed live".to_vec());
    assert_eq!(
        s_a.send(env.clone()).await.unwrap().status,
        SendStatus::Delivered,
        "both on A: pushed live, never stored"
    );
    let d = r.next_delivery().await.unwrap();
    assert_eq!(d.envelope.id, env.id);

    // Before the ack (the copy is only in A's memory) and after it.
    let mut s_b = Client::connect(&rb.ws_url(), skey.clone()).await.unwrap();
    assert_eq!(
        s_b.send(env.clone()).await.unwrap().status,
        SendStatus::Duplicate,
        "retry via B before the ack"
    );
    assert_eq!(r.ack(vec![d.ack_ref()]).await.unwrap(), 1);
    assert_no_more_deliveries(&mut r, "after the retry via B").await;
    for (name, relay) in [("B", rb), ("C", rc), ("A", ra)] {
        let mut s = Client::connect(&relay.ws_url(), skey.clone())
            .await
            .unwrap();
        assert_eq!(
            s.send(env.clone()).await.unwrap().status,
            SendStatus::Duplicate,
            "retry via {name} after the ack"
        );
        assert_no_more_deliveries(&mut r, &format!("after the retry via {name}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_through_two_relays_at_once_is_accepted_once() {
    let relays = cluster_of_three().await;
    let (ra, rb) = (&relays[0], &relays[1]);
    let skey = generate_key().unwrap();
    let mut s_a = Client::connect(&ra.ws_url(), skey.clone()).await.unwrap();
    let mut s_b = Client::connect(&rb.ws_url(), skey).await.unwrap();
    // The recipient is on B: B would push it live, A would store it.
    let mut r = Client::connect(&rb.ws_url(), generate_key().unwrap())
        .await
        .unwrap();
    const ROUNDS: usize = 8;
    let mut ids = Vec::new();
    for round in 0..ROUNDS {
        let env = s_a.envelope_to(r.key(), Kind::Text, format!("race {round}").into_bytes());
        let (via_a, via_b) = tokio::join!(s_a.send(env.clone()), s_b.send(env.clone()));
        let mut statuses = [via_a.unwrap().status, via_b.unwrap().status];
        statuses.sort_by_key(|s| *s == SendStatus::Duplicate);
        assert!(
            matches!(statuses[0], SendStatus::Delivered | SendStatus::Stored)
                && statuses[1] == SendStatus::Duplicate,
            "round {round}: answers {statuses:?}, expected one delivered/stored and one duplicate"
        );
        ids.push(env.id);
    }
    let got = receive_everything(&mut r).await;
    let mut seen: Vec<&str> = got.iter().map(|d| d.envelope.id.as_str()).collect();
    seen.sort_unstable();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(seen, want, "every id delivered exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_message_retried_through_another_relay_is_a_duplicate_for_every_member() {
    let relays = cluster_of_three().await;
    let (ra, rb, rc) = (&relays[0], &relays[1], &relays[2]);
    let skey = generate_key().unwrap();
    let mut s_a = Client::connect(&ra.ws_url(), skey.clone()).await.unwrap();
    let mut members = Vec::new();
    for relay in [ra, rb, rc] {
        let mut m = Client::connect(&relay.ws_url(), generate_key().unwrap())
            .await
            .unwrap();
        m.join("once").await.unwrap();
        members.push(m);
    }
    s_a.join("once").await.unwrap();
    let env = s_a.envelope_channel("once", Kind::Text, b"to all, once".to_vec());
    let first = s_a.send(env.clone()).await.unwrap();
    assert_eq!(first.status, SendStatus::Fanout);
    assert_eq!((first.delivered, first.stored), (Some(1), Some(2)));
    for m in members.iter_mut() {
        let d = m.next_delivery().await.unwrap();
        assert_eq!(d.envelope.id, env.id);
        assert_eq!(m.ack(vec![d.ack_ref()]).await.unwrap(), 1);
    }
    for (name, relay) in [("B", rb), ("C", rc), ("A", ra)] {
        let mut s = Client::connect(&relay.ws_url(), skey.clone())
            .await
            .unwrap();
        assert_eq!(
            s.send(env.clone()).await.unwrap().status,
            SendStatus::Duplicate,
            "channel retry via {name}"
        );
        for (i, m) in members.iter_mut().enumerate() {
            assert_no_more_deliveries(m, &format!("member {i} after the retry via {name}")).await;
        }
    }
}

/// On PostgreSQL every send is recorded in the database before it is pushed or
/// stored, so while the database is unreachable every send fails with
/// `storage_unavailable` — also one to a recipient connected to the same relay, which
/// gets nothing — and it fails at once instead of waiting for the pool (30 s): the
/// client's 5 s answer timeout would fail the test otherwise. Once the database is
/// back, the same envelope goes through as a first attempt (it was never recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_database_is_down_sends_fail_at_once_also_to_a_recipient_on_the_same_relay() {
    let pg = pg_support::fresh_database(4).await;
    let mut cfg = Config::for_test(std::env::temp_dir());
    cfg.storage = pg_support::relay_storage(&pg);
    let relay = Relay::bind(cfg).await.unwrap().spawn();
    let mut a = Client::connect(&relay.ws_url(), generate_key().unwrap())
        .await
        .unwrap();
    let mut b = Client::connect(&relay.ws_url(), generate_key().unwrap())
        .await
        .unwrap();
    let live = a.send_text(b.key(), "before").await.unwrap();
    assert_eq!(live.status, SendStatus::Delivered);
    let d = b.next_delivery().await.unwrap();
    b.ack(vec![d.ack_ref()]).await.unwrap();

    // The outage: the database refuses connections and the relay's are cut.
    let admin = pg_support::admin_client(&pg_support::server().admin_db).await;
    let db = &pg.dbname;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" WITH ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}';"
        ))
        .await
        .unwrap();
    a.set_timeout(Duration::from_secs(5));
    let env = a.envelope_to(b.key(), Kind::Text, b"during".to_vec());
    match a.send(env.clone()).await {
        Err(ClientError::Relay {
            code: ErrorCode::StorageUnavailable,
            ..
        }) => {}
        other => panic!("a send during the outage: {other:?}"),
    }

    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" WITH ALLOW_CONNECTIONS true"
        ))
        .await
        .unwrap();
    let again = a.send(env.clone()).await.unwrap();
    assert_eq!(again.status, SendStatus::Delivered, "not recorded before");
    // The first delivery B gets is the retry: the refused attempt was never pushed.
    let d = b.next_delivery().await.unwrap();
    assert_eq!(d.envelope.id, env.id);
    assert_eq!(b.ack(vec![d.ack_ref()]).await.unwrap(), 1);
    b.ping().await.unwrap();
    relay.drain().await.unwrap();
}
