//! One behavioural suite for both storage backends.
//!
//! Every `async fn` below takes a [`Harness`] and is run twice by `backend_suite!`:
//! once against the embedded store in a temp dir (`store_embedded::*`) and once against
//! a real PostgreSQL database of its own (`store_postgres::*`). Backend-specific
//! behaviour (snapshots, crash recovery of the embedded file, migrations and pool
//! recovery for PostgreSQL) follows in their own modules.

#[path = "support/postgres.rs"]
mod pg_support;
#[path = "support/tempdir.rs"]
mod tempdir;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use dchat_relay::store::{
    self, Acceptance, AckKey, Pending, PostgresConfig, PublicKey, PutOutcome, SendRecord, Store,
    StoreConfig, StoreError, StoredMessage,
};
use tempdir::TempDir;

/// Where one test's data lives; `open` gives a new handle on the same data, which is
/// how the restart tests reopen (embedded) or reconnect (PostgreSQL).
enum Harness {
    Embedded(TempDir),
    Postgres(PostgresConfig),
}

impl Harness {
    fn embedded() -> Harness {
        Harness::Embedded(TempDir::new("store-test"))
    }

    async fn postgres() -> Harness {
        Harness::Postgres(pg_support::fresh_database(8).await)
    }

    fn config(&self) -> StoreConfig {
        match self {
            Harness::Embedded(d) => StoreConfig::Embedded {
                dir: d.path().to_path_buf(),
                options: store::EmbeddedOptions::default(),
            },
            Harness::Postgres(c) => StoreConfig::Postgres(c.clone()),
        }
    }

    async fn open(&self) -> Arc<dyn Store> {
        store::open(&self.config()).await.expect("open store")
    }
}

/// Ack keys named by (sender, id) only.
fn by_id(keys: &[(PublicKey, &str)]) -> Vec<AckKey> {
    keys.iter().map(|(s, id)| AckKey::new(*s, *id)).collect()
}

fn key(n: u8) -> PublicKey {
    let mut k = [0u8; 32];
    k[0] = n;
    k[31] = n.wrapping_mul(7);
    k
}

const FAR: i64 = 4_000_000_000_000;

fn msg(recipient: u8, sender: u8, id: &str) -> StoredMessage {
    StoredMessage {
        recipient: key(recipient),
        sender: key(sender),
        id: id.to_string(),
        channel: None,
        timestamp_ms: 1_700_000_000_000,
        expires_at_ms: FAR,
        kind: "text".into(),
        envelope: format!("envelope of {id} from {sender} to {recipient}").into_bytes(),
    }
}

fn seq_of(o: PutOutcome) -> u64 {
    match o {
        PutOutcome::Stored { seq } => seq,
        PutOutcome::Duplicate => panic!("expected Stored, got Duplicate"),
    }
}

async fn all_pending(s: &dyn Store, recipient: u8) -> Vec<Pending> {
    s.pending(&key(recipient), 0, 100_000, 0).await.unwrap()
}

fn ids(p: &[Pending]) -> Vec<&str> {
    p.iter().map(|p| p.message.id.as_str()).collect()
}

// ---------------------------------------------------------------------------------
// The shared behaviour.

async fn put_then_pending_returns_the_message(h: &Harness) {
    let s = h.open().await;
    let mut m = msg(1, 2, "a");
    m.channel = Some("general".into());
    m.kind = "image".into();
    let seq = seq_of(s.put(m.clone()).await.unwrap());
    assert!(seq >= 1);
    let p = all_pending(&*s, 1).await;
    assert_eq!(p, vec![Pending { seq, message: m }]);
    assert!(
        all_pending(&*s, 2).await.is_empty(),
        "sender has nothing pending"
    );
    assert_eq!(s.stats().await.unwrap().pending_messages, 1);
}

async fn same_id_twice_is_a_duplicate(h: &Harness) {
    let s = h.open().await;
    let first = seq_of(s.put(msg(1, 2, "x")).await.unwrap());
    let mut changed = msg(1, 2, "x");
    changed.envelope = b"a different body".to_vec();
    assert_eq!(s.put(changed).await.unwrap(), PutOutcome::Duplicate);
    // The dedup key is (recipient, sender, id): other senders/recipients may reuse ids.
    let other_sender = seq_of(s.put(msg(1, 3, "x")).await.unwrap());
    let other_recipient = seq_of(s.put(msg(4, 2, "x")).await.unwrap());
    assert_ne!(first, other_sender);
    assert_ne!(other_sender, other_recipient);
    let p = all_pending(&*s, 1).await;
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].seq, first);
    assert_eq!(p[0].message, msg(1, 2, "x"), "the first copy is kept");
}

async fn pending_is_in_seq_order_with_cursor_and_limit(h: &Harness) {
    let s = h.open().await;
    let mut expected = Vec::new();
    for i in 0..12 {
        let sender = if i % 3 == 0 { 5 } else { 6 };
        let id = format!("m{i:02}");
        let seq = seq_of(s.put(msg(1, sender, &id)).await.unwrap());
        expected.push((seq, id));
    }
    let all = all_pending(&*s, 1).await;
    let got: Vec<(u64, String)> = all.iter().map(|p| (p.seq, p.message.id.clone())).collect();
    assert_eq!(got, expected, "ascending seq = insertion order");
    // Per-sender order is preserved.
    let from5: Vec<&str> = all
        .iter()
        .filter(|p| p.message.sender == key(5))
        .map(|p| p.message.id.as_str())
        .collect();
    assert_eq!(from5, ["m00", "m03", "m06", "m09"]);
    // Paging with after_seq + limit walks the same list.
    let mut paged = Vec::new();
    let mut cursor = 0;
    loop {
        let page = s.pending(&key(1), cursor, 5, 0).await.unwrap();
        assert!(page.len() <= 5);
        let Some(last) = page.last() else { break };
        cursor = last.seq;
        paged.extend(page.into_iter().map(|p| (p.seq, p.message.id)));
    }
    assert_eq!(paged, expected);
    assert!(s
        .pending(&key(1), u64::MAX, 10, 0)
        .await
        .unwrap()
        .is_empty());
    assert!(s.pending(&key(1), 0, 0, 0).await.unwrap().is_empty());
}

async fn ack_removes_and_a_retry_after_ack_stays_a_duplicate(h: &Harness) {
    let s = h.open().await;
    for id in ["a", "b", "c"] {
        s.put(msg(1, 2, id)).await.unwrap();
    }
    let acked = s
        .ack(&key(1), by_id(&[(key(2), "a"), (key(2), "c")]))
        .await
        .unwrap();
    assert_eq!(acked, 2);
    assert_eq!(ids(&all_pending(&*s, 1).await), ["b"]);
    // Acking again, an unknown id, or as another recipient removes nothing.
    assert_eq!(s.ack(&key(1), by_id(&[(key(2), "a")])).await.unwrap(), 0);
    assert_eq!(s.ack(&key(1), by_id(&[(key(2), "zz")])).await.unwrap(), 0);
    assert_eq!(s.ack(&key(9), by_id(&[(key(2), "b")])).await.unwrap(), 0);
    assert_eq!(s.ack(&key(1), by_id(&[])).await.unwrap(), 0);
    assert_eq!(
        s.ack(&key(1), by_id(&[(key(2), "nul\0"), (key(2), "")]))
            .await
            .unwrap(),
        0,
        "ids that can never be stored match nothing"
    );
    // Not even one far beyond any key the store can hold: it matches nothing, and the
    // store goes on working.
    let huge = "x".repeat(70_000);
    assert_eq!(
        s.ack(&key(1), by_id(&[(key(2), huge.as_str()), (key(2), "zz")]))
            .await
            .unwrap(),
        0
    );
    s.put(msg(1, 2, "after-huge")).await.unwrap();
    assert_eq!(
        s.ack(&key(1), by_id(&[(key(2), "after-huge")]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(ids(&all_pending(&*s, 1).await), ["b"]);
    // The sender retrying an id the recipient already acknowledged must not redeliver it.
    assert_eq!(s.put(msg(1, 2, "a")).await.unwrap(), PutOutcome::Duplicate);
    assert!(ids(&all_pending(&*s, 1).await) == ["b"]);
    assert_eq!(s.stats().await.unwrap().pending_messages, 1);
}

async fn quoted_acks_remove_what_was_read_and_nothing_expiry_removed(h: &Harness) {
    // The relay quotes the read of a message it delivered from storage in its ack, so a
    // store may skip looking the id up. An expiry pass between the read and the ack must
    // still win: the expired message is not counted again, and its id is not marked
    // acknowledged (a later message with that id is new, not a duplicate).
    let s = h.open().await;
    s.put(msg(1, 2, "kept")).await.unwrap();
    let mut short = msg(1, 2, "short");
    short.expires_at_ms = 1_000;
    s.put(short).await.unwrap();
    let read = s.pending(&key(1), 0, 10, 500).await.unwrap();
    assert_eq!(ids(&read), ["kept", "short"]);
    let quoted: Vec<AckKey> = read
        .iter()
        .map(|p| AckKey {
            sender: p.message.sender,
            id: p.message.id.clone(),
            read_as: Some(p.read_as()),
        })
        .collect();
    assert_eq!(s.expire(2_000).await.unwrap(), 1);
    assert_eq!(
        s.ack(&key(1), quoted).await.unwrap(),
        1,
        "only the unexpired one"
    );
    assert!(all_pending(&*s, 1).await.is_empty());
    assert_eq!(s.stats().await.unwrap().pending_messages, 0);
    assert_eq!(
        s.put(msg(1, 2, "kept")).await.unwrap(),
        PutOutcome::Duplicate,
        "an acknowledged id stays a duplicate"
    );
    assert!(matches!(
        s.put(msg(1, 2, "short")).await.unwrap(),
        PutOutcome::Stored { .. }
    ));
    assert_eq!(ids(&all_pending(&*s, 1).await), ["short"]);
    assert_eq!(s.stats().await.unwrap().pending_messages, 1);
}

/// The acks of one message from both paths (quoting the read, then by id) remove it
/// once, and its later expiry counts nothing: whatever an ack leaves behind must read
/// as acknowledged everywhere.
async fn a_message_acknowledged_by_quote_is_gone_for_every_path(h: &Harness) {
    let s = h.open().await;
    for (id, exp) in [("a", 1_000), ("b", 1_000), ("c", 5_000)] {
        let mut m = msg(1, 2, id);
        m.expires_at_ms = exp;
        s.put(m).await.unwrap();
    }
    let read = s.pending(&key(1), 0, 10, 0).await.unwrap();
    let quote = |p: &Pending| AckKey {
        sender: p.message.sender,
        id: p.message.id.clone(),
        read_as: Some(p.read_as()),
    };
    assert_eq!(s.ack(&key(1), vec![quote(&read[0])]).await.unwrap(), 1);
    // In one call: a quoted ack, then the same message by id.
    assert_eq!(
        s.ack(
            &key(1),
            [vec![quote(&read[2])], by_id(&[(key(2), "c")])].concat()
        )
        .await
        .unwrap(),
        1
    );
    assert_eq!(s.ack(&key(1), by_id(&[(key(2), "a")])).await.unwrap(), 0);
    assert_eq!(ids(&all_pending(&*s, 1).await), ["b"]);
    assert_eq!(s.stats().await.unwrap().pending_messages, 1);
    assert_eq!(s.put(msg(1, 2, "a")).await.unwrap(), PutOutcome::Duplicate);
    assert_eq!(
        s.expire(1_000).await.unwrap(),
        1,
        "only b was still pending"
    );
    assert_eq!(s.expire(5_000).await.unwrap(), 0, "c was acknowledged");
    assert_eq!(s.stats().await.unwrap().pending_messages, 0);
    assert!(all_pending(&*s, 1).await.is_empty());
}

async fn expire_removes_due_messages_only(h: &Harness) {
    let s = h.open().await;
    for (id, exp) in [("e100", 100), ("e200", 200), ("e300", 300), ("e250", 250)] {
        let mut m = msg(1, 2, id);
        m.expires_at_ms = exp;
        s.put(m).await.unwrap();
    }
    // pending never returns expired messages, even before the sweep ran.
    assert_eq!(
        ids(&s.pending(&key(1), 0, 10, 150).await.unwrap()),
        ["e200", "e300", "e250"]
    );
    // An acknowledged message is not counted again when it expires.
    assert_eq!(s.ack(&key(1), by_id(&[(key(2), "e250")])).await.unwrap(), 1);
    assert_eq!(s.expire(200).await.unwrap(), 2, "expires_at <= now is due");
    assert_eq!(ids(&all_pending(&*s, 1).await), ["e300"]);
    assert_eq!(s.expire(200).await.unwrap(), 0);
    assert_eq!(s.expire(260).await.unwrap(), 0, "e250 was acknowledged");
    // Once expired, the id may be used again (its dedup entry went with it).
    let mut again = msg(1, 2, "e100");
    again.expires_at_ms = 1_000;
    assert!(matches!(
        s.put(again).await.unwrap(),
        PutOutcome::Stored { .. }
    ));
    assert_eq!(s.expire(1_000).await.unwrap(), 2);
    assert!(all_pending(&*s, 1).await.is_empty());
    assert_eq!(s.stats().await.unwrap().pending_messages, 0);
}

async fn expire_clears_a_backlog_larger_than_one_chunk(h: &Harness) {
    // Both backends expire in chunks of 5,000; 6,000 due entries need two rounds.
    let s = h.open().await;
    for batch in 0..6 {
        let msgs = (0..1000)
            .map(|i| {
                let mut m = msg((i % 7) as u8, 2, &format!("b{batch}-{i}"));
                m.expires_at_ms = 10 + i64::from(batch);
                m
            })
            .collect();
        s.put_many(msgs).await.unwrap();
    }
    s.put(msg(1, 2, "keeper")).await.unwrap();
    assert_eq!(s.ack(&key(0), by_id(&[(key(2), "b0-0")])).await.unwrap(), 1);
    assert_eq!(
        s.expire(100).await.unwrap(),
        5_999,
        "all but the acknowledged one"
    );
    assert_eq!(ids(&all_pending(&*s, 1).await), ["keeper"]);
    assert_eq!(s.stats().await.unwrap().pending_messages, 1);
}

async fn profiles_newer_wins(h: &Harness) {
    let s = h.open().await;
    assert_eq!(s.get_profile(&key(1)).await.unwrap(), None);
    assert!(s.put_profile(&key(1), b"v10".to_vec(), 10).await.unwrap());
    assert_eq!(s.get_profile(&key(1)).await.unwrap(), Some(b"v10".to_vec()));
    assert!(!s.put_profile(&key(1), b"v5".to_vec(), 5).await.unwrap());
    assert!(!s.put_profile(&key(1), b"v10b".to_vec(), 10).await.unwrap());
    assert_eq!(s.get_profile(&key(1)).await.unwrap(), Some(b"v10".to_vec()));
    assert!(s.put_profile(&key(1), b"v20".to_vec(), 20).await.unwrap());
    assert_eq!(s.get_profile(&key(1)).await.unwrap(), Some(b"v20".to_vec()));
    assert!(s.put_profile(&key(2), Vec::new(), -1).await.unwrap());
    assert_eq!(s.get_profile(&key(2)).await.unwrap(), Some(Vec::new()));
    assert_eq!(s.stats().await.unwrap().profiles, 2);
}

async fn channel_membership_is_persistent_and_exact(h: &Harness) {
    let s = h.open().await;
    for k in [3, 1, 2] {
        s.join_channel("ch", &key(k)).await.unwrap();
    }
    s.join_channel("ch", &key(1)).await.unwrap(); // idempotent
    s.join_channel("c", &key(4)).await.unwrap(); // a prefix of "ch" must not leak
    s.join_channel("ch2", &key(2)).await.unwrap();
    assert_eq!(
        s.channel_members("ch").await.unwrap(),
        vec![key(1), key(2), key(3)]
    );
    assert_eq!(s.channel_members("c").await.unwrap(), vec![key(4)]);
    assert_eq!(s.stats().await.unwrap().channels, 3);
    s.leave_channel("ch", &key(2)).await.unwrap();
    s.leave_channel("ch", &key(9)).await.unwrap(); // not a member: fine
    assert_eq!(s.channel_members("ch").await.unwrap(), vec![key(1), key(3)]);
    assert_eq!(s.channel_members("ch2").await.unwrap(), vec![key(2)]);
    s.leave_channel("ch2", &key(2)).await.unwrap();
    assert!(s.channel_members("ch2").await.unwrap().is_empty());
    assert!(s.channel_members("nobody").await.unwrap().is_empty());
    assert_eq!(s.stats().await.unwrap().channels, 2);
}

async fn put_many_reports_an_outcome_per_input(h: &Harness) {
    let s = h.open().await;
    s.put(msg(1, 2, "old")).await.unwrap();
    let out = s
        .put_many(vec![
            msg(1, 2, "n1"),
            msg(3, 2, "n1"),
            msg(1, 2, "old"),
            msg(4, 2, "n2"),
            msg(3, 2, "n1"), // duplicate of an earlier element of the same batch
        ])
        .await
        .unwrap();
    assert_eq!(out.len(), 5);
    assert_eq!(out[2], PutOutcome::Duplicate);
    assert_eq!(out[4], PutOutcome::Duplicate);
    let seqs: Vec<u64> = [out[0], out[1], out[3]].into_iter().map(seq_of).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "input order = seq order: {seqs:?}"
    );
    assert_eq!(ids(&all_pending(&*s, 1).await), ["old", "n1"]);
    assert_eq!(ids(&all_pending(&*s, 3).await), ["n1"]);
    assert_eq!(ids(&all_pending(&*s, 4).await), ["n2"]);
    assert!(s.put_many(Vec::new()).await.unwrap().is_empty());
}

async fn everything_survives_a_restart(h: &Harness) {
    let s = h.open().await;
    let mut seqs = BTreeMap::new();
    for id in ["r1", "r2", "r3"] {
        seqs.insert(id, seq_of(s.put(msg(1, 2, id)).await.unwrap()));
    }
    s.ack(&key(1), by_id(&[(key(2), "r2")])).await.unwrap();
    s.put_profile(&key(1), b"me".to_vec(), 7).await.unwrap();
    s.join_channel("ch", &key(1)).await.unwrap();
    s.flush().await.unwrap();
    drop(s);

    let s = h.open().await;
    let p = all_pending(&*s, 1).await;
    assert_eq!(ids(&p), ["r1", "r3"]);
    assert_eq!(p[0].seq, seqs["r1"]);
    assert_eq!(p[1].seq, seqs["r3"]);
    assert_eq!(p[1].message, msg(1, 2, "r3"));
    // Dedup holds across the restart, for pending and acknowledged ids alike.
    assert_eq!(s.put(msg(1, 2, "r1")).await.unwrap(), PutOutcome::Duplicate);
    assert_eq!(s.put(msg(1, 2, "r2")).await.unwrap(), PutOutcome::Duplicate);
    assert_eq!(s.get_profile(&key(1)).await.unwrap(), Some(b"me".to_vec()));
    assert_eq!(s.channel_members("ch").await.unwrap(), vec![key(1)]);
    // Sequence numbers keep increasing after the restart.
    let next = seq_of(s.put(msg(1, 2, "r4")).await.unwrap());
    assert!(next > seqs["r3"]);
}

async fn concurrent_puts_are_all_durable_with_distinct_seqs(h: &Harness) {
    const TASKS: u8 = 32;
    const PER_TASK: usize = 25;
    let s = h.open().await;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..PER_TASK {
                // Each task writes to its own recipient so per-recipient order is checkable.
                let o = s.put(msg(100 + t, t, &format!("c{i}"))).await.unwrap();
                seqs.push(seq_of(o));
            }
            seqs
        }));
    }
    let mut all = HashSet::new();
    let mut per_task = Vec::new();
    for h in handles {
        let seqs = h.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one task's puts in order"
        );
        all.extend(seqs.iter().copied());
        per_task.push(seqs);
    }
    assert_eq!(all.len(), TASKS as usize * PER_TASK, "all seqs distinct");
    drop(s);

    let s = h.open().await;
    for t in 0..TASKS {
        let p = all_pending(&*s, 100 + t).await;
        let seqs: Vec<u64> = p.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, per_task[t as usize], "task {t} durable after reopen");
    }
    assert_eq!(
        s.stats().await.unwrap().pending_messages,
        (TASKS as usize * PER_TASK) as u64
    );
}

async fn invalid_input_is_a_typed_error_and_writes_nothing(h: &Harness) {
    let s = h.open().await;
    let cases: Vec<(StoredMessage, &str)> = vec![
        (msg(1, 2, ""), "id"),
        (
            msg(1, 2, &"x".repeat(store::MAX_MESSAGE_ID_BYTES + 1)),
            "id",
        ),
        (msg(1, 2, "nul\0id"), "id"),
        (
            StoredMessage {
                channel: Some("c".repeat(store::MAX_CHANNEL_NAME_BYTES + 1)),
                ..msg(1, 2, "ok")
            },
            "channel",
        ),
        (
            StoredMessage {
                kind: "k".repeat(store::MAX_KIND_BYTES + 1),
                ..msg(1, 2, "ok")
            },
            "kind",
        ),
    ];
    for (m, field) in cases {
        match s.put(m.clone()).await {
            Err(StoreError::InvalidInput { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected InvalidInput({field}), got {other:?}"),
        }
        // A batch with one bad message is refused as a whole.
        let r = s.put_many(vec![msg(1, 2, "good"), m]).await;
        assert!(matches!(r, Err(StoreError::InvalidInput { .. })), "{r:?}");
    }
    let e = s.join_channel("", &key(1)).await.unwrap_err();
    assert_eq!(e.metric_label(), "invalid_input");
    assert!(all_pending(&*s, 1).await.is_empty());
    assert_eq!(s.stats().await.unwrap().channels, 0);
}

async fn check_flush_and_stats(h: &Harness) {
    let s = h.open().await;
    s.check().await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(s.stats().await.unwrap(), Default::default());
    s.put(msg(1, 2, "a")).await.unwrap();
    s.put_profile(&key(1), b"p".to_vec(), 1).await.unwrap();
    s.join_channel("x", &key(1)).await.unwrap();
    let st = s.stats().await.unwrap();
    assert_eq!((st.pending_messages, st.profiles, st.channels), (1, 1, 1));
}

macro_rules! backend_suite {
    ($($name:ident),* $(,)?) => {
        mod store_embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Harness::embedded()).await;
                }
            )*
        }
        mod store_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Harness::postgres().await).await;
                }
            )*
        }
    };
}

backend_suite!(
    put_then_pending_returns_the_message,
    same_id_twice_is_a_duplicate,
    pending_is_in_seq_order_with_cursor_and_limit,
    ack_removes_and_a_retry_after_ack_stays_a_duplicate,
    quoted_acks_remove_what_was_read_and_nothing_expiry_removed,
    a_message_acknowledged_by_quote_is_gone_for_every_path,
    expire_removes_due_messages_only,
    expire_clears_a_backlog_larger_than_one_chunk,
    profiles_newer_wins,
    channel_membership_is_persistent_and_exact,
    put_many_reports_an_outcome_per_input,
    everything_survives_a_restart,
    concurrent_puts_are_all_durable_with_distinct_seqs,
    invalid_input_is_a_typed_error_and_writes_nothing,
    check_flush_and_stats,
);

// ---------------------------------------------------------------------------------
// Embedded only: snapshot/restore, damaged files, kill -9.

mod store_embedded_snapshot {
    use super::*;
    use dchat_relay::store::EmbeddedStore;
    use sha2::{Digest, Sha256};

    /// r1: a, b (acknowledged), c from sender 2; r2: d (channel copy) from sender 3;
    /// two profiles; three memberships in two channels.
    async fn populate(s: &EmbeddedStore) {
        for id in ["a", "b", "c"] {
            s.put(msg(1, 2, id)).await.unwrap();
        }
        let mut d = msg(2, 3, "d");
        d.channel = Some("room".into());
        s.put(d).await.unwrap();
        assert_eq!(s.ack(&key(1), by_id(&[(key(2), "b")])).await.unwrap(), 1);
        s.put_profile(&key(1), b"profile one".to_vec(), 5)
            .await
            .unwrap();
        s.put_profile(&key(2), b"profile two".to_vec(), 6)
            .await
            .unwrap();
        s.join_channel("room", &key(2)).await.unwrap();
        s.join_channel("room", &key(3)).await.unwrap();
        s.join_channel("lobby", &key(1)).await.unwrap();
    }

    fn snapshot_of(s: &EmbeddedStore) -> (Vec<u8>, dchat_relay::store::SnapshotSummary) {
        let mut out = Vec::new();
        let summary = s.snapshot(&mut out).unwrap();
        (out, summary)
    }

    fn assert_empty_after_failed_restore(s: &EmbeddedStore, what: &str) {
        let rt = tokio::runtime::Handle::current();
        let st = tokio::task::block_in_place(|| rt.block_on(s.stats())).unwrap();
        assert_eq!(st, Default::default(), "{what}: store must stay empty");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshot_restore_roundtrip_preserves_everything() {
        let dir_a = TempDir::new("snap-a");
        let a = EmbeddedStore::open(dir_a.path()).unwrap();
        populate(&a).await;
        let (snap, summary) = snapshot_of(&a);

        assert_eq!(summary.format_version, store::SNAPSHOT_FORMAT_VERSION);
        assert_eq!(
            (
                summary.messages,
                summary.tombstones,
                summary.profiles,
                summary.memberships
            ),
            (3, 1, 2, 3)
        );
        assert_eq!(summary.bytes, snap.len() as u64);
        assert_eq!(&snap[..8], b"DCHATSNP");
        let body = &snap[..snap.len() - 32];
        assert_eq!(summary.sha256, hex::encode(Sha256::digest(body)));
        assert_eq!(&snap[snap.len() - 32..], Sha256::digest(body).as_slice());

        let dir_b = TempDir::new("snap-b");
        let b = EmbeddedStore::open(dir_b.path()).unwrap();
        let restored = b.restore(&mut snap.as_slice()).unwrap();
        assert_eq!(restored, summary);

        for r in [1, 2] {
            assert_eq!(all_pending(&b, r).await, all_pending(&a, r).await);
        }
        assert_eq!(ids(&all_pending(&b, 1).await), ["a", "c"]);
        assert_eq!(
            all_pending(&b, 2).await[0].message.channel.as_deref(),
            Some("room")
        );
        for k in [1, 2, 3] {
            assert_eq!(
                b.get_profile(&key(k)).await.unwrap(),
                a.get_profile(&key(k)).await.unwrap()
            );
        }
        assert_eq!(
            b.channel_members("room").await.unwrap(),
            vec![key(2), key(3)]
        );
        assert_eq!(b.channel_members("lobby").await.unwrap(), vec![key(1)]);
        assert_eq!(b.stats().await.unwrap(), a.stats().await.unwrap());
        // Same content, same deterministic order: the restored store snapshots identically.
        assert_eq!(snapshot_of(&b).0, snap);

        // Dedup came along, including the acknowledged id (tombstone).
        assert_eq!(b.put(msg(1, 2, "a")).await.unwrap(), PutOutcome::Duplicate);
        assert_eq!(b.put(msg(1, 2, "b")).await.unwrap(), PutOutcome::Duplicate);
        let max_old = all_pending(&a, 2).await[0].seq;
        assert!(seq_of(b.put(msg(1, 2, "e")).await.unwrap()) > max_old);

        // And the restored data is durable.
        drop(b);
        let b = EmbeddedStore::open(dir_b.path()).unwrap();
        assert_eq!(ids(&all_pending(&b, 1).await), ["a", "c", "e"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restore_refuses_a_non_empty_store() {
        let dir_a = TempDir::new("snap-ne-a");
        let a = EmbeddedStore::open(dir_a.path()).unwrap();
        populate(&a).await;
        let (snap, _) = snapshot_of(&a);

        let dir_b = TempDir::new("snap-ne-b");
        let b = EmbeddedStore::open(dir_b.path()).unwrap();
        b.join_channel("only", &key(7)).await.unwrap();
        match b.restore(&mut snap.as_slice()) {
            Err(StoreError::NotEmpty { what }) => assert!(what.contains("membership"), "{what}"),
            other => panic!("expected NotEmpty, got {other:?}"),
        }
        assert_eq!(b.channel_members("only").await.unwrap(), vec![key(7)]);
        assert!(all_pending(&b, 1).await.is_empty());
        // Restoring into the source itself is refused too.
        assert!(matches!(
            a.restore(&mut snap.as_slice()),
            Err(StoreError::NotEmpty { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_or_truncated_snapshots_are_rejected_and_change_nothing() {
        let dir_a = TempDir::new("snap-bad-a");
        let a = EmbeddedStore::open(dir_a.path()).unwrap();
        populate(&a).await;
        let (snap, _) = snapshot_of(&a);
        let dir_b = TempDir::new("snap-bad-b");
        let b = EmbeddedStore::open(dir_b.path()).unwrap();

        // Every single flipped bit position (one per byte) is caught.
        for i in 0..snap.len() {
            let mut bad = snap.clone();
            bad[i] ^= 0x40;
            let err = b.restore(&mut bad.as_slice()).unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::SnapshotChecksum { .. } | StoreError::SnapshotInvalid { .. }
                ),
                "byte {i}: {err:?}"
            );
            if i >= snap.len() - 32 {
                assert!(
                    matches!(err, StoreError::SnapshotChecksum { .. }),
                    "trailer byte {i}: {err:?}"
                );
            }
        }
        assert_empty_after_failed_restore(&b, "flipped bytes");

        // Every truncation is caught.
        for len in 0..snap.len() {
            let err = b.restore(&mut &snap[..len]).unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::SnapshotInvalid { .. } | StoreError::SnapshotChecksum { .. }
                ),
                "truncated to {len}: {err:?}"
            );
        }
        assert_empty_after_failed_restore(&b, "truncations");

        let mut longer = snap.clone();
        longer.extend_from_slice(b"junk");
        assert!(matches!(
            b.restore(&mut longer.as_slice()),
            Err(StoreError::SnapshotInvalid { .. })
        ));
        let err =
            b.restore(&mut &b"not a snapshot at all, just some text....................."[..]);
        match err {
            Err(StoreError::SnapshotInvalid { reason }) => assert!(reason.contains("magic")),
            other => panic!("{other:?}"),
        }
        let mut v2 = snap.clone();
        v2[11] = 2; // format version 2
        match b.restore(&mut v2.as_slice()) {
            Err(StoreError::SnapshotInvalid { reason }) => {
                assert!(reason.contains("format version 2"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_empty_after_failed_restore(&b, "junk");

        // After all that, the intact snapshot still restores into the same store.
        let restored = b.restore(&mut snap.as_slice()).unwrap();
        assert_eq!(restored.messages, 3);
        assert_eq!(ids(&all_pending(&b, 1).await), ["a", "c"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshot_during_writes_is_a_consistent_cut() {
        let dir_a = TempDir::new("snap-live-a");
        let a = Arc::new(EmbeddedStore::open(dir_a.path()).unwrap());
        let mut writers = Vec::new();
        for t in 0..8u8 {
            let a = a.clone();
            writers.push(tokio::spawn(async move {
                for i in 0..150 {
                    a.put(msg(t, 200, &format!("w{i}"))).await.unwrap();
                }
            }));
        }
        // Take snapshots while the writers run (blocking, as the admin API will).
        let snaps = {
            let a = a.clone();
            tokio::task::spawn_blocking(move || {
                (0..5)
                    .map(|_| {
                        let mut out = Vec::new();
                        let s = a.snapshot(&mut out).unwrap();
                        (out, s)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap()
        };
        for w in writers {
            w.await.unwrap();
        }
        for (n, (snap, summary)) in snaps.into_iter().enumerate() {
            let dir = TempDir::new("snap-live-b");
            let b = EmbeddedStore::open(dir.path()).unwrap();
            b.restore(&mut snap.as_slice()).unwrap();
            // Seqs are handed out in commit order, so a consistent cut holds exactly
            // seqs 1..next_seq and nothing else.
            let mut seqs: Vec<u64> = Vec::new();
            for t in 0..8u8 {
                let p = all_pending(&b, t).await;
                let ids: Vec<String> = p.iter().map(|p| p.message.id.clone()).collect();
                let want: Vec<String> = (0..ids.len()).map(|i| format!("w{i}")).collect();
                assert_eq!(ids, want, "snapshot {n}: writer {t} is a prefix");
                seqs.extend(p.iter().map(|p| p.seq));
            }
            seqs.sort_unstable();
            let want: Vec<u64> = (1..summary.next_seq).collect();
            assert_eq!(seqs, want, "snapshot {n}");
            assert_eq!(summary.messages, seqs.len() as u64);
        }
    }

    /// A data directory written by a pre-release build (it holds `dchat.redb`) is
    /// refused with its own error, and nothing is created beside the old file.
    #[test]
    fn a_data_directory_of_a_pre_release_build_is_refused() {
        let dir = TempDir::new("pre-release");
        std::fs::write(dir.path().join("dchat.redb"), vec![0xA5; 64 * 1024]).unwrap();
        let err = EmbeddedStore::open(dir.path()).unwrap_err();
        match &err {
            StoreError::PreReleaseData { dir: d, file } => {
                assert_eq!(d, dir.path());
                assert_eq!(*file, "dchat.redb");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(err.metric_label(), "pre_release_data");
        assert!(err.to_string().contains("pre-release build"), "{err}");
        assert!(!dir.path().join(store::STORE_DIR_NAME).exists());
        assert!(
            dir.path().join("dchat.redb").exists(),
            "the file is untouched"
        );
    }

    #[test]
    fn a_corrupt_database_is_a_typed_error() {
        let dir = TempDir::new("corrupt-store");
        {
            EmbeddedStore::open(dir.path()).unwrap();
        }
        let marker = dir.path().join(store::STORE_DIR_NAME).join("version");
        assert!(marker.exists(), "the engine keeps a version marker");
        std::fs::write(&marker, vec![0xA5; 64]).unwrap();
        let err = EmbeddedStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        assert_eq!(err.metric_label(), "open");
        assert!(err.to_string().contains("dchat.store"), "{err}");

        let file = TempDir::new("not-a-dir");
        let blocker = file.path().join("data");
        std::fs::write(&blocker, b"x").unwrap();
        let err = EmbeddedStore::open(&blocker).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("creating data directory"), "{err}");
    }

    /// A second handle on a directory in use is refused instead of corrupting it.
    #[test]
    fn a_store_in_use_is_refused() {
        let dir = TempDir::new("locked");
        let _first = EmbeddedStore::open(dir.path()).unwrap();
        let err = EmbeddedStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    }
}

mod store_embedded_crash {
    //! kill -9 of a process in the middle of concurrent writes loses nothing it had
    //! acknowledged. The test binary re-runs itself as the writer process.
    use super::*;
    use dchat_relay::store::EmbeddedStore;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    const DIR_ENV: &str = "DCHAT_STORE_CRASH_DIR";

    /// The child: writes forever from 8 tasks, printing each acknowledged put.
    /// `cargo test -- --ignored` (the e2e run) also reaches it; without the directory the
    /// parent hands over it is not the crash child and does nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "run by kill9_loses_no_acknowledged_write as a child process"]
    async fn crash_child_writer() {
        let Ok(dir) = std::env::var(DIR_ENV) else {
            return;
        };
        let s = Arc::new(EmbeddedStore::open(std::path::Path::new(&dir)).unwrap());
        let mut tasks = Vec::new();
        for t in 0..8u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let id = format!("k{i}");
                    let seq = seq_of(s.put(msg(t, 1, &id)).await.unwrap());
                    println!("ACK {t} {id} {seq}");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill9_loses_no_acknowledged_write() {
        let dir = TempDir::new("crash");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "store_embedded_crash::crash_child_writer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut acked: Vec<(u8, String, u64)> = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let mut f = line.split_whitespace();
            if f.next() != Some("ACK") {
                continue;
            }
            let t: u8 = f.next().unwrap().parse().unwrap();
            let id = f.next().unwrap().to_string();
            let seq: u64 = f.next().unwrap().parse().unwrap();
            acked.push((t, id, seq));
            if acked.len() >= 400 {
                break;
            }
        }
        child.kill().unwrap(); // SIGKILL, mid-write
        child.wait().unwrap();
        assert!(acked.len() >= 400, "child stopped early");

        let s = EmbeddedStore::open(dir.path()).unwrap();
        let mut pending = BTreeMap::new();
        for t in 0..8u8 {
            for p in all_pending(&s, t).await {
                pending.insert((t, p.message.id.clone()), p.seq);
            }
        }
        for (t, id, seq) in &acked {
            assert_eq!(
                pending.get(&(*t, id.clone())),
                Some(seq),
                "acknowledged put {t}/{id} (seq {seq}) lost after kill -9"
            );
        }
        // The store is usable after the crash.
        assert!(matches!(
            s.put(msg(0, 1, "after-crash")).await.unwrap(),
            PutOutcome::Stored { .. }
        ));
    }

    const LOG_DIR_ENV: &str = "DCHAT_STORE_LOG_CRASH_DIR";

    /// The child of `kill9_keeps_every_kind_of_change`: one of each write, then it
    /// waits to be killed (no clean close, so only the journal holds them).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "run by kill9_keeps_every_kind_of_change as a child process"]
    async fn log_crash_child() {
        let Ok(dir) = std::env::var(LOG_DIR_ENV) else {
            return;
        };
        let s = EmbeddedStore::open(std::path::Path::new(&dir)).unwrap();
        let mut many: Vec<StoredMessage> = (0..20).map(|i| msg(1, 2, &format!("m{i}"))).collect();
        many.push(msg(3, 2, "other"));
        s.put_many(many).await.unwrap();
        let keys: Vec<_> = (0..10)
            .map(|i| AckKey::new(key(2), format!("m{i}")))
            .collect();
        assert_eq!(s.ack(&key(1), keys).await.unwrap(), 10);
        assert!(s.put_profile(&key(4), b"p".to_vec(), 7).await.unwrap());
        s.join_channel("room", &key(4)).await.unwrap();
        s.join_channel("room", &key(5)).await.unwrap();
        s.leave_channel("room", &key(5)).await.unwrap();
        let mut late = msg(6, 2, "expired");
        late.expires_at_ms = 10;
        s.put(late).await.unwrap();
        assert_eq!(s.expire(100).await.unwrap(), 1);
        println!("DONE");
        std::thread::sleep(std::time::Duration::from_secs(60));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill9_keeps_every_kind_of_change() {
        let dir = TempDir::new("log-crash");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "store_embedded_crash::log_crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(LOG_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // libtest prints the test name before it on the same line.
        let done = BufReader::new(stdout)
            .lines()
            .map(|l| l.unwrap())
            .any(|l| l.contains("DONE"));
        child.kill().unwrap(); // SIGKILL: no clean close
        child.wait().unwrap();
        assert!(done, "child finished its writes");

        let s = EmbeddedStore::open(dir.path()).unwrap();
        let p = all_pending(&s, 1).await;
        assert_eq!(
            ids(&p),
            (10..20).map(|i| format!("m{i}")).collect::<Vec<_>>(),
            "puts and acks replayed"
        );
        // Seqs as first assigned: m0..m19 got 1..=20, "other" 21, "expired" 22.
        assert_eq!(
            p.iter().map(|p| p.seq).collect::<Vec<_>>(),
            (11..=20).collect::<Vec<_>>()
        );
        assert_eq!(ids(&all_pending(&s, 3).await), ["other"]);
        assert!(all_pending(&s, 6).await.is_empty(), "expire replayed");
        assert_eq!(s.get_profile(&key(4)).await.unwrap(), Some(b"p".to_vec()));
        assert_eq!(s.channel_members("room").await.unwrap(), vec![key(4)]);
        // Dedup survived too: an acknowledged id is still a duplicate.
        assert_eq!(s.put(msg(1, 2, "m0")).await.unwrap(), PutOutcome::Duplicate);
        assert_eq!(seq_of(s.put(msg(1, 2, "new")).await.unwrap()), 23);
        let st = s.stats().await.unwrap();
        assert_eq!((st.pending_messages, st.profiles, st.channels), (12, 1, 1));
    }

    /// A torn or damaged tail of the journal (what a power cut mid-write leaves) is
    /// where recovery stops, not an error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_after_the_journal_is_ignored() {
        let dir = TempDir::new("log-garbage");
        {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            s.put(msg(1, 2, "kept")).await.unwrap();
        }
        let journals: Vec<_> = std::fs::read_dir(dir.path().join(store::STORE_DIR_NAME))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
            .collect();
        assert!(!journals.is_empty(), "no journal file found");
        for j in &journals {
            let mut bytes = std::fs::read(j).unwrap();
            bytes.extend_from_slice(&[0x01, 0x00, 0x00, 0x00, 0x09, 1, 2, 3]);
            bytes.extend(std::iter::repeat_n(0xA5, 300));
            std::fs::write(j, &bytes).unwrap();
        }
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(ids(&all_pending(&s, 1).await), ["kept"]);
        assert_eq!(seq_of(s.put(msg(1, 2, "next")).await.unwrap()), 2);
    }
}

/// Only a store shared by several relays decides which sends are duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_does_not_record_sends() {
    let h = Harness::embedded();
    let s = h.open().await;
    assert!(!s.records_sends());
    assert!(matches!(
        s.accept(vec![store_postgres_specific::send(2, "a", &[])])
            .await,
        Err(StoreError::Unsupported { op: "accept" })
    ));
}

// ---------------------------------------------------------------------------------
// PostgreSQL only: migrations, several relays on one database, failures.

mod store_postgres_specific {
    use super::*;
    use dchat_relay::store::PostgresStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relays_starting_together_migrate_once() {
        let cfg = pg_support::fresh_database(2).await;
        let mut joins = Vec::new();
        for _ in 0..6 {
            let cfg = cfg.clone();
            joins.push(tokio::spawn(
                async move { PostgresStore::connect(&cfg).await },
            ));
        }
        for j in joins {
            j.await.unwrap().unwrap();
        }
        let admin = pg_support::admin_client(&cfg.dbname).await;
        let rows = admin
            .query(
                "SELECT version, name FROM dchat_schema_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap();
        let got: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(got, vec![(1, "init".to_string())]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relays_sharing_a_database_see_one_store_with_global_seqs() {
        let cfg = pg_support::fresh_database(4).await;
        let a: Arc<dyn Store> = Arc::new(PostgresStore::connect(&cfg).await.unwrap());
        let b: Arc<dyn Store> = Arc::new(PostgresStore::connect(&cfg).await.unwrap());
        let mut joins = Vec::new();
        for (n, s) in [a.clone(), b.clone()].into_iter().enumerate() {
            joins.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..40 {
                    seqs.push(seq_of(
                        s.put(msg(1, n as u8 + 10, &format!("g{i}"))).await.unwrap(),
                    ));
                }
                seqs
            }));
        }
        let mut all = HashSet::new();
        for j in joins {
            all.extend(j.await.unwrap());
        }
        assert_eq!(all.len(), 80, "seqs are unique across relays");
        // A put through one relay is a duplicate through the other.
        assert_eq!(
            b.put(msg(1, 10, "g0")).await.unwrap(),
            PutOutcome::Duplicate
        );
        // Either relay sees all of it.
        assert_eq!(all_pending(&*a, 1).await.len(), 80);
        assert_eq!(all_pending(&*a, 1).await, all_pending(&*b, 1).await);
        assert_eq!(b.ack(&key(1), by_id(&[(key(11), "g5")])).await.unwrap(), 1);
        assert_eq!(all_pending(&*a, 1).await.len(), 79);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pool_recovers_after_the_server_drops_connections() {
        let cfg = pg_support::fresh_database(3).await;
        let s = PostgresStore::connect(&cfg).await.unwrap();
        s.put(msg(1, 2, "before")).await.unwrap();
        let admin = pg_support::admin_client(&cfg.dbname).await;
        let killed: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(killed >= 1, "the store's connection was terminated");
        // No panic, and the next operations work on fresh connections.
        s.put(msg(1, 2, "after")).await.unwrap();
        s.check().await.unwrap();
        assert_eq!(ids(&all_pending(&s, 1).await), ["before", "after"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connect_errors_are_typed_and_name_the_setting() {
        let srv = pg_support::server();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(); // closed again when the listener drops
        let err = PostgresStore::connect(&srv.config("dchat", 1).clone_with_port(port))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Pool { .. }), "{err:?}");
        assert_eq!(err.metric_label(), "pool");

        let mut bad = srv.config("dchat", 1);
        bad.port = 0;
        match PostgresStore::connect(&bad).await.unwrap_err() {
            StoreError::Config { field, .. } => assert_eq!(field, "DB_PORT"),
            other => panic!("{other:?}"),
        }
        let mut bad = srv.config("dchat", 0);
        bad.host = "127.0.0.1".into();
        match PostgresStore::connect(&bad).await.unwrap_err() {
            StoreError::Config { field, .. } => assert_eq!(field, "max_connections"),
            other => panic!("{other:?}"),
        }
        // The password never shows up in Debug output (it is logged with the config).
        let mut secret = srv.config("dchat", 1);
        secret.password = "hunter2-secret".into();
        assert!(!format!("{secret:?}").contains("hunter2"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_newer_schema_is_refused() {
        let cfg = pg_support::fresh_database(2).await;
        PostgresStore::connect(&cfg).await.unwrap();
        let admin = pg_support::admin_client(&cfg.dbname).await;
        admin
            .execute(
                "INSERT INTO dchat_schema_migrations (version, name) VALUES (999, 'future')",
                &[],
            )
            .await
            .unwrap();
        match PostgresStore::connect(&cfg).await.unwrap_err() {
            StoreError::SchemaTooNew { found, supported } => {
                assert_eq!((found, supported), (999, 1))
            }
            other => panic!("{other:?}"),
        }
    }

    /// A send of `id` from `sender` with a copy for each of `to` (none: pushed live).
    pub(super) fn send(sender: u8, id: &str, to: &[u8]) -> SendRecord {
        SendRecord {
            sender: key(sender),
            id: id.to_string(),
            expires_at_ms: FAR,
            copies: to.iter().map(|r| msg(*r, sender, id)).collect(),
        }
    }

    fn accepted_seqs(a: &Acceptance) -> Vec<u64> {
        match a {
            Acceptance::Accepted(copies) => copies.iter().map(|o| seq_of(*o)).collect(),
            Acceptance::Duplicate => panic!("expected Accepted, got Duplicate"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn accept_records_each_send_once_and_stores_the_copies_of_the_first() {
        let cfg = pg_support::fresh_database(4).await;
        let s = PostgresStore::connect(&cfg).await.unwrap();
        assert!(s.records_sends());
        let got = s
            .accept(vec![
                send(2, "a", &[1]),
                send(2, "live", &[]),
                send(2, "a", &[3]),
                send(5, "a", &[1, 3]),
            ])
            .await
            .unwrap();
        let a = accepted_seqs(&got[0]);
        assert_eq!(got[1], Acceptance::Accepted(vec![]), "a live send, no copy");
        assert_eq!(got[2], Acceptance::Duplicate, "the same (sender, id) twice");
        let fan = accepted_seqs(&got[3]);
        assert!(a[0] < fan[0] && fan[0] < fan[1], "seqs in input order");
        assert_eq!(ids(&all_pending(&s, 1).await), ["a", "a"]);
        assert_eq!(
            all_pending(&s, 3).await.len(),
            1,
            "only the winner's copies"
        );

        // A later send of a recorded id is a duplicate, with or without copies, also
        // after the copy was acknowledged, and writes nothing.
        assert_eq!(s.ack(&key(1), by_id(&[(key(2), "a")])).await.unwrap(), 1);
        let again = s
            .accept(vec![send(2, "a", &[1]), send(2, "live", &[4])])
            .await
            .unwrap();
        assert_eq!(again, [Acceptance::Duplicate, Acceptance::Duplicate]);
        assert!(all_pending(&s, 4).await.is_empty());
        // Another relay on the same database knows them too.
        let other = PostgresStore::connect(&cfg).await.unwrap();
        assert_eq!(
            other.accept(vec![send(2, "live", &[])]).await.unwrap(),
            [Acceptance::Duplicate]
        );
        // Invalid input is refused before anything is written.
        let mut bad = send(2, "bad", &[1]);
        bad.copies[0].id = "not-bad".into();
        assert!(matches!(
            s.accept(vec![send(2, "fine", &[]), bad]).await,
            Err(StoreError::InvalidInput {
                field: "copies",
                ..
            })
        ));
        assert!(matches!(
            s.accept(vec![send(2, "", &[])]).await,
            Err(StoreError::InvalidInput { field: "id", .. })
        ));
        assert_eq!(
            s.accept(vec![send(2, "fine", &[])]).await.unwrap(),
            [Acceptance::Accepted(vec![])]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relays_accepting_the_same_sends_at_once_accept_each_exactly_once() {
        let cfg = pg_support::fresh_database(8).await;
        let relays: Vec<Arc<dyn Store>> = vec![
            Arc::new(PostgresStore::connect(&cfg).await.unwrap()),
            Arc::new(PostgresStore::connect(&cfg).await.unwrap()),
        ];
        const IDS: usize = 200;
        let mut joins = Vec::new();
        // Four tasks per relay, each sending every id (half with a copy, half live), in
        // different orders, so the same ids race inside one batch and across relays.
        for (n, store) in relays.iter().enumerate() {
            for t in 0..4usize {
                let store = store.clone();
                joins.push(tokio::spawn(async move {
                    let mut order: Vec<usize> = (0..IDS).collect();
                    order.rotate_left((n * 4 + t) * 37 % IDS);
                    if t % 2 == 1 {
                        order.reverse();
                    }
                    let mut won = Vec::new();
                    for chunk in order.chunks(16) {
                        let sends = chunk
                            .iter()
                            .map(|i| {
                                let to: &[u8] = if i % 2 == 0 { &[1] } else { &[] };
                                send(2, &format!("r{i}"), to)
                            })
                            .collect();
                        let got = store.accept(sends).await.unwrap();
                        for (i, a) in chunk.iter().zip(got) {
                            if matches!(a, Acceptance::Accepted(_)) {
                                won.push(*i);
                            }
                        }
                    }
                    won
                }));
            }
        }
        let mut won = Vec::new();
        for j in joins {
            won.extend(j.await.unwrap());
        }
        won.sort_unstable();
        assert_eq!(
            won,
            (0..IDS).collect::<Vec<_>>(),
            "each id accepted exactly once"
        );
        assert_eq!(all_pending(&*relays[0], 1).await.len(), IDS / 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_stays_recorded_until_it_expires() {
        let cfg = pg_support::fresh_database(4).await;
        let s = PostgresStore::connect(&cfg).await.unwrap();
        let mut early = send(2, "e", &[]);
        early.expires_at_ms = 100;
        let mut late = send(2, "l", &[1]);
        late.expires_at_ms = 300;
        late.copies[0].expires_at_ms = 300;
        s.accept(vec![early.clone(), late.clone()]).await.unwrap();
        assert_eq!(s.expire(99).await.unwrap(), 0);
        assert_eq!(
            s.accept(vec![early.clone(), late.clone()]).await.unwrap(),
            [Acceptance::Duplicate, Acceptance::Duplicate],
            "recorded until the expiry"
        );
        assert_eq!(
            s.expire(100).await.unwrap(),
            0,
            "no pending message was due"
        );
        assert!(matches!(
            s.accept(vec![early, late.clone()]).await.unwrap()[..],
            [Acceptance::Accepted(_), Acceptance::Duplicate]
        ));
        assert_eq!(s.expire(300).await.unwrap(), 1, "the copy of l");
        assert!(matches!(
            s.accept(vec![late]).await.unwrap()[..],
            [Acceptance::Accepted(_)]
        ));
        // Expiry works in chunks: a backlog larger than one is cleared.
        let many: Vec<SendRecord> = (0..6_000)
            .map(|i| {
                let mut r = send(3, &format!("x{i}"), &[]);
                r.expires_at_ms = 1_000;
                r
            })
            .collect();
        s.accept(many.clone()).await.unwrap();
        s.expire(1_000).await.unwrap();
        let admin = pg_support::admin_client(&cfg.dbname).await;
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM sent_ids WHERE expires_at_ms <= 1000",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0);
        assert!(s
            .accept(many)
            .await
            .unwrap()
            .iter()
            .all(|a| matches!(a, Acceptance::Accepted(_))));
    }

    /// A writer that lost its connection after sending the statement repeats it with
    /// the same attempts: what its first try committed is recognised as its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repeating_an_attempt_finds_what_it_committed() {
        let cfg = pg_support::fresh_database(4).await;
        let s = PostgresStore::connect(&cfg).await.unwrap();
        let first = s
            .accept_as(vec![send(2, "c", &[1]), send(2, "l", &[])], vec![7, 8])
            .await
            .unwrap();
        accepted_seqs(&first[0]);
        // The repeat: both are still this attempt's; the copy was already stored.
        assert_eq!(
            s.accept_as(vec![send(2, "c", &[1]), send(2, "l", &[])], vec![7, 8])
                .await
                .unwrap(),
            [
                Acceptance::Accepted(vec![PutOutcome::Duplicate]),
                Acceptance::Accepted(vec![])
            ]
        );
        // Any other attempt is a duplicate.
        assert_eq!(
            s.accept_as(vec![send(2, "c", &[1]), send(2, "l", &[])], vec![9, 7])
                .await
                .unwrap(),
            [Acceptance::Duplicate, Acceptance::Duplicate]
        );
        assert_eq!(all_pending(&s, 1).await.len(), 1);
    }

    trait WithPort {
        fn clone_with_port(&self, port: u16) -> PostgresConfig;
    }
    impl WithPort for PostgresConfig {
        fn clone_with_port(&self, port: u16) -> PostgresConfig {
            PostgresConfig {
                port,
                ..self.clone()
            }
        }
    }
}
