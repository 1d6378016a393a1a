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
    self, Pending, PostgresConfig, PublicKey, PutOutcome, Store, StoreConfig, StoreError,
    StoredMessage,
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
            },
            Harness::Postgres(c) => StoreConfig::Postgres(c.clone()),
        }
    }

    async fn open(&self) -> Arc<dyn Store> {
        store::open(&self.config()).await.expect("open store")
    }
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
        .ack(&key(1), &[(key(2), "a".into()), (key(2), "c".into())])
        .await
        .unwrap();
    assert_eq!(acked, 2);
    assert_eq!(ids(&all_pending(&*s, 1).await), ["b"]);
    // Acking again, an unknown id, or as another recipient removes nothing.
    assert_eq!(s.ack(&key(1), &[(key(2), "a".into())]).await.unwrap(), 0);
    assert_eq!(s.ack(&key(1), &[(key(2), "zz".into())]).await.unwrap(), 0);
    assert_eq!(s.ack(&key(9), &[(key(2), "b".into())]).await.unwrap(), 0);
    assert_eq!(s.ack(&key(1), &[]).await.unwrap(), 0);
    assert_eq!(ids(&all_pending(&*s, 1).await), ["b"]);
    // The sender retrying an id the recipient already acknowledged must not redeliver it.
    assert_eq!(s.put(msg(1, 2, "a")).await.unwrap(), PutOutcome::Duplicate);
    assert!(ids(&all_pending(&*s, 1).await) == ["b"]);
    assert_eq!(s.stats().await.unwrap().pending_messages, 1);
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
    assert_eq!(s.ack(&key(1), &[(key(2), "e250".into())]).await.unwrap(), 1);
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
    s.ack(&key(1), &[(key(2), "r2".into())]).await.unwrap();
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
    expire_removes_due_messages_only,
    profiles_newer_wins,
    channel_membership_is_persistent_and_exact,
    put_many_reports_an_outcome_per_input,
    everything_survives_a_restart,
    concurrent_puts_are_all_durable_with_distinct_seqs,
    invalid_input_is_a_typed_error_and_writes_nothing,
    check_flush_and_stats,
);
