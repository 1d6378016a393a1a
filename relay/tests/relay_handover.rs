//! Blue-green slot handover on the embedded store: `POST /admin/quiesce` on the old
//! relay, its snapshot merged into the new one (`POST /admin/import`), driven by
//! `dchat_relay::handover` exactly as `dchat handover` runs it in the operator's Job.

#[path = "support/postgres.rs"]
mod pg_support;
#[path = "support/relay.rs"]
mod relay_support;
#[path = "support/tempdir.rs"]
mod tempdir;

use std::time::Duration;

use dchat_relay::client::{generate_key, public_key, Client, ClientError};
use dchat_relay::handover::{handover, HandoverError};
use dchat_relay::protocol::Kind;
use relay_support::{http, start, TestRelay};

const TOKEN: &str = "handover-admin-token-0123456789";
const STEP: Duration = Duration::from_secs(10);

async fn relay() -> TestRelay {
    start(|c| c.admin_token = Some(TOKEN.into())).await
}

fn admin(r: &TestRelay) -> String {
    format!("http://{}", r.relay.metrics_addr)
}

async fn texts(c: &mut Client, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let d = c.next_delivery().await.unwrap();
        c.ack(vec![d.ack_ref()]).await.unwrap();
        out.push(String::from_utf8(d.envelope.payload.0).unwrap());
    }
    out
}

#[tokio::test]
async fn handover_moves_undelivered_messages_to_the_new_slot_once() {
    let old = relay().await;
    let new = relay().await;
    let offline = generate_key().unwrap();
    let online = generate_key().unwrap();

    // Before the switch: messages for an offline user stored on the old slot, a client
    // still connected there, a profile and a channel membership.
    let mut sender = old.client().await;
    for i in 0..3 {
        sender
            .send_text(public_key(&offline), &format!("old-{i}"))
            .await
            .unwrap();
    }
    sender.publish_profile("sender", None, 1_000).await.unwrap();
    sender.join("ops").await.unwrap();
    let sender_key = sender.key();

    // After the switch: the same recipient got a message on the new slot, and another
    // recipient is connected there, waiting.
    let mut late = new.client().await;
    late.send_text(public_key(&offline), "new-0").await.unwrap();
    let mut waiting = new.client_as(&online).await;
    sender
        .send_text(public_key(&online), "old-live")
        .await
        .unwrap();
    // `online` is not connected to the old relay, so that message was stored there.
    // A channel on the new relay whose member list is cached before the handover.
    late.join("ops").await.unwrap();
    let post = late.envelope_channel("ops", Kind::Text, b"before".to_vec());
    assert_eq!(late.send(post).await.unwrap().stored.unwrap_or(0), 0);

    let report = handover(&admin(&old), &admin(&new), TOKEN, STEP)
        .await
        .unwrap();
    // The imported membership counts at once: the old relay's member, offline here,
    // gets a stored copy of the next post.
    let post = late.envelope_channel("ops", Kind::Text, b"after".to_vec());
    assert_eq!(late.send(post).await.unwrap().stored, Some(1));
    assert_eq!(report.imported_messages(), 4, "{:?}", report.imported);
    assert_eq!(report.imported["duplicates"], 0);
    assert_eq!(report.imported["profiles_updated"], 1);
    assert_eq!(report.imported["snapshot"]["memberships"], 1);

    // The old relay no longer serves: its client was closed with the drain code, it is
    // not ready, and it refuses new clients.
    match sender.next_delivery().await {
        Err(ClientError::Closed { code: 1012, .. }) => {}
        other => panic!("old relay's client not closed for reconnect: {other:?}"),
    }
    assert_eq!(
        http(old.relay.addr, "GET", "/ready", None, b"")
            .await
            .status,
        503
    );
    assert!(Client::connect(&old.url(), generate_key().unwrap())
        .await
        .is_err());

    // A recipient already connected to the new relay gets the imported message pushed.
    assert_eq!(texts(&mut waiting, 1).await, ["old-live"]);
    // The offline recipient gets everything on the new slot, the handed-over messages
    // in their original order.
    let mut rcpt = new.client_as(&offline).await;
    let got = texts(&mut rcpt, 4).await;
    assert_eq!(got[0], "new-0");
    assert_eq!(got[1..], ["old-0", "old-1", "old-2"]);
    // Profile and membership came along.
    let p = rcpt.get_profile(sender_key).await.unwrap().unwrap();
    assert_eq!(p.doc.name, "sender");

    // A second run (the Job retried) imports nothing again: the delivered messages are
    // remembered as acknowledged, so nobody gets a duplicate.
    let again = handover(&admin(&old), &admin(&new), TOKEN, STEP)
        .await
        .unwrap();
    assert_eq!(again.imported_messages(), 0);
    assert_eq!(again.imported["duplicates"], 4);
    let (more, _) = rcpt.fetch(10).await.unwrap();
    assert!(more.is_empty(), "duplicates delivered: {}", more.len());
}

#[tokio::test]
async fn import_applies_nothing_from_a_damaged_stream() {
    let old = relay().await;
    let new = relay().await;
    let rcpt = generate_key().unwrap();
    let mut c = old.client().await;
    for i in 0..5 {
        c.send_text(public_key(&rcpt), &format!("m{i}"))
            .await
            .unwrap();
    }
    let snap = http(
        old.relay.metrics_addr,
        "GET",
        "/admin/snapshot",
        Some(TOKEN),
        b"",
    )
    .await;
    assert_eq!(snap.status, 200);
    let m = new.relay.metrics_addr;
    let truncated = &snap.body[..snap.body.len() - 40];
    let r = http(m, "POST", "/admin/import", Some(TOKEN), truncated).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let mut flipped = snap.body.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    let r = http(m, "POST", "/admin/import", Some(TOKEN), &flipped).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let stats = http(m, "GET", "/admin/stats", Some(TOKEN), b"").await;
    let v: serde_json::Value = serde_json::from_slice(&stats.body).unwrap();
    assert_eq!(v["store"]["pending_messages"], 0, "partial import applied");
    // The intact stream still imports, into a store that is not empty.
    let mut other = new.client().await;
    other.send_text(public_key(&rcpt), "here").await.unwrap();
    let r = http(m, "POST", "/admin/import", Some(TOKEN), &snap.body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["imported"]["imported"], 5);
}

#[tokio::test]
async fn handover_errors_name_the_step_and_leave_the_data_in_place() {
    let old = relay().await;
    let new = relay().await;
    let rcpt = generate_key().unwrap();
    let mut c = old.client().await;
    c.send_text(public_key(&rcpt), "keep me").await.unwrap();

    let wrong = handover(&admin(&old), &admin(&new), "not-the-token-xxxxxxxx", STEP)
        .await
        .unwrap_err();
    match &wrong {
        HandoverError::Refused { step, status, .. } => {
            assert_eq!((*step, *status), ("quiesce", 401), "{wrong}");
        }
        e => panic!("unexpected: {e}"),
    }
    // The wrong token did not quiesce the old relay.
    assert_eq!(
        http(old.relay.addr, "GET", "/ready", None, b"")
            .await
            .status,
        200
    );

    let no_admin = start(|_| {}).await;
    let e = handover(&admin(&old), &admin(&no_admin), TOKEN, STEP)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            HandoverError::Refused {
                step: "import",
                status: 404,
                ..
            }
        ),
        "{e}"
    );
    // The message is still on the old relay, which can hand it over once fixed.
    let ok = handover(&admin(&old), &admin(&new), TOKEN, STEP)
        .await
        .unwrap();
    assert_eq!(ok.imported_messages(), 1);

    let e = handover(&admin(&new), &format!("{}/", admin(&new)), TOKEN, STEP)
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("--to: "), "{e}");
    assert_eq!(
        http(new.relay.addr, "GET", "/ready", None, b"")
            .await
            .status,
        200,
        "a handover onto itself does not quiesce the relay"
    );
    let e = handover("https://x:9090", &admin(&new), TOKEN, STEP)
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("--from: "), "{e}");
    let e = handover("http://127.0.0.1:1", &admin(&new), TOKEN, STEP)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            HandoverError::Transport {
                step: "quiesce",
                ..
            }
        ),
        "{e}"
    );
}

/// Old and new slot on one PostgreSQL database, as a blue-green switch runs them: the old
/// relay drains at scale-down and the new one delivers everything the old one accepted —
/// stored messages for offline users and unacknowledged live ones alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_postgres_slot_switch_loses_nothing_without_a_handover() {
    use dchat_relay::config::Config;
    use dchat_relay::server::Relay;

    let pg = pg_support::fresh_database(4).await;
    let relay_on_db = || {
        let mut cfg = Config::for_test(std::env::temp_dir());
        cfg.storage = pg_support::relay_storage(&pg);
        cfg
    };
    let old = Relay::bind(relay_on_db()).await.unwrap().spawn();
    let offline = generate_key().unwrap();
    let live = generate_key().unwrap();
    let mut sender = Client::connect(&old.ws_url(), generate_key().unwrap())
        .await
        .unwrap();
    let mut reader = Client::connect(&old.ws_url(), live.clone()).await.unwrap();
    for i in 0..3 {
        sender
            .send_text(public_key(&offline), &format!("stored-{i}"))
            .await
            .unwrap();
    }
    sender
        .send_text(public_key(&live), "pushed, never acked")
        .await
        .unwrap();
    let pushed = reader.next_delivery().await.unwrap();

    // The switch: the new slot starts on the same database, the old one drains.
    let new = Relay::bind(relay_on_db()).await.unwrap().spawn();
    let report = old.drain().await.unwrap();
    assert!(report.flushed);

    let mut rcpt = Client::connect(&new.ws_url(), offline.clone())
        .await
        .unwrap();
    let got = texts(&mut rcpt, 3).await;
    assert_eq!(got, ["stored-0", "stored-1", "stored-2"]);
    let mut reader = Client::connect(&new.ws_url(), live).await.unwrap();
    let again = reader.next_delivery().await.unwrap();
    assert_eq!(again.envelope.id, pushed.envelope.id);
    new.drain().await.unwrap();
}
