//! `PostgresStore::snapshot` and `PostgresStore::restore`: the PostgreSQL store in the
//! embedded store's snapshot format (docs/storage.md), which is what backups of a
//! PostgreSQL cluster are made of.

#[path = "support/postgres.rs"]
mod pg_support;
#[path = "support/tempdir.rs"]
mod tempdir;

use std::collections::BTreeMap;
use std::sync::Arc;

use dchat_relay::store::{
    AckKey, EmbeddedStore, PostgresStore, PublicKey, Store, StoreError, StoredMessage,
};
use tempdir::TempDir;

fn key(n: u8) -> PublicKey {
    let mut k = [0u8; 32];
    k[0] = n;
    k[31] = n.wrapping_mul(7);
    k
}

fn msg(recipient: u8, sender: u8, id: &str, channel: Option<&str>) -> StoredMessage {
    StoredMessage {
        recipient: key(recipient),
        sender: key(sender),
        id: id.to_string(),
        channel: channel.map(str::to_string),
        timestamp_ms: 1_700_000_000_000,
        expires_at_ms: i64::MAX / 2,
        kind: "text".into(),
        envelope: format!("envelope of {id}").into_bytes(),
    }
}

async fn fresh() -> PostgresStore {
    PostgresStore::connect(&pg_support::fresh_database(4).await)
        .await
        .expect("connect")
}

/// A store with every kind of record: pending messages (some of a channel), the dedup
/// entries of acknowledged ones, profiles and memberships; ids whose byte order differs
/// from their length order.
async fn populated() -> PostgresStore {
    let s = fresh().await;
    for (r, snd, id, ch) in [
        (2, 1, "b", None),
        (1, 3, "a", Some("room")),
        (1, 3, "ab", None),
        (1, 3, "Z", None),
        (3, 1, "acked-1", None),
        (3, 2, "acked-2", None),
        (1, 1, "é", Some("room")),
    ] {
        s.put(msg(r, snd, id, ch)).await.unwrap();
    }
    let n = s
        .ack(
            &key(3),
            vec![
                AckKey::new(key(1), "acked-1"),
                AckKey::new(key(2), "acked-2"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(n, 2);
    s.put_profile(&key(1), b"profile one".to_vec(), 10)
        .await
        .unwrap();
    s.put_profile(&key(2), vec![], 20).await.unwrap();
    for (ch, m) in [("room", 1), ("room", 2), ("b", 3), ("aa", 1)] {
        s.join_channel(ch, &key(m)).await.unwrap();
    }
    s
}

async fn snapshot(s: &PostgresStore) -> Vec<u8> {
    let mut out = Vec::new();
    s.snapshot(&mut out).await.expect("snapshot");
    out
}

#[tokio::test]
async fn a_snapshot_restores_into_postgres_and_embedded_with_the_same_bytes() {
    let s = populated().await;
    let bytes = snapshot(&s).await;

    // Into another database: everything comes back, and its snapshot is the same bytes.
    let copy = fresh().await;
    let summary = copy
        .restore(std::io::Cursor::new(bytes.clone()))
        .await
        .unwrap();
    assert_eq!(
        (
            summary.messages,
            summary.tombstones,
            summary.profiles,
            summary.memberships
        ),
        (5, 2, 2, 4)
    );
    assert_eq!(snapshot(&copy).await, bytes);
    let pending = copy.pending(&key(1), 0, 100, 0).await.unwrap();
    let ids: Vec<_> = pending.iter().map(|p| p.message.id.as_str()).collect();
    assert_eq!(ids, ["a", "ab", "Z", "é"]);
    assert_eq!(pending[0].message, msg(1, 3, "a", Some("room")));
    assert_eq!(
        copy.get_profile(&key(1)).await.unwrap().unwrap(),
        b"profile one"
    );
    assert_eq!(
        copy.channel_members("room").await.unwrap(),
        vec![key(1), key(2)]
    );
    // Acknowledged messages stay duplicates.
    assert_eq!(
        copy.put(msg(3, 1, "acked-1", None)).await.unwrap(),
        dchat_relay::store::PutOutcome::Duplicate
    );
    // Seqs continue after the restored ones.
    let max = pending.iter().map(|p| p.seq).max().unwrap();
    match copy.put(msg(9, 9, "new", None)).await.unwrap() {
        dchat_relay::store::PutOutcome::Stored { seq } => assert!(seq > max, "{seq} <= {max}"),
        other => panic!("{other:?}"),
    }

    // Into the embedded store: the same content, and its snapshot is the same bytes.
    let dir = TempDir::new("pg-snapshot");
    let embedded = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let e = embedded.clone();
    let input = bytes.clone();
    let restored = tokio::task::spawn_blocking(move || e.restore(&mut &input[..]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restored.sha256, summary.sha256);
    let e = embedded.clone();
    let again = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        e.snapshot(&mut out).map(|_| out)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(again, bytes);
}

#[tokio::test]
async fn restore_refuses_a_database_with_data_and_changes_nothing() {
    let s = populated().await;
    let bytes = snapshot(&s).await;
    let e = s
        .restore(std::io::Cursor::new(bytes.clone()))
        .await
        .unwrap_err();
    match &e {
        StoreError::NotEmpty { what } => {
            assert!(what.contains("5 messages"), "{what}");
            assert!(what.contains("2 acknowledged"), "{what}");
            assert!(what.contains("2 profiles"), "{what}");
            assert!(what.contains("4 channel memberships"), "{what}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(snapshot(&s).await, bytes);
}

#[tokio::test]
async fn a_damaged_or_truncated_stream_leaves_the_database_empty() {
    let s = populated().await;
    let bytes = snapshot(&s).await;
    let target = fresh().await;
    let empty = snapshot(&target).await;
    // Every truncation point in the header and the trailer, a sample in between.
    let cuts: Vec<usize> = (0..bytes.len())
        .filter(|&i| i < 60 || i + 40 > bytes.len() || i % 17 == 0)
        .collect();
    for cut in cuts {
        let e = target
            .restore(std::io::Cursor::new(bytes[..cut].to_vec()))
            .await
            .unwrap_err();
        assert!(
            matches!(e, StoreError::SnapshotInvalid { .. }),
            "cut at {cut}: {e}"
        );
    }
    for at in (0..bytes.len()).step_by(13) {
        let mut bad = bytes.clone();
        bad[at] ^= 0x20;
        assert!(
            target.restore(std::io::Cursor::new(bad)).await.is_err(),
            "flip at {at}"
        );
    }
    let mut extra = bytes.clone();
    extra.push(0);
    assert!(target.restore(std::io::Cursor::new(extra)).await.is_err());
    assert_eq!(
        snapshot(&target).await,
        empty,
        "a refused restore left data behind"
    );
    // And the intact stream still restores.
    target.restore(std::io::Cursor::new(bytes)).await.unwrap();
}

#[tokio::test]
async fn a_snapshot_taken_while_relays_write_is_an_exact_cut() {
    let db = pg_support::fresh_database(12).await;
    let s = Arc::new(PostgresStore::connect(&db).await.unwrap());
    let writers: Vec<_> = (0..8u8)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..150 {
                    s.put(msg(100 + w, w, &format!("{i:04}"), None))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let mut snaps = Vec::new();
    for _ in 0..4 {
        tokio::time::sleep(std::time::Duration::from_millis(40)).await;
        snaps.push(snapshot(&s).await);
    }
    for w in writers {
        w.await.unwrap();
    }
    snaps.push(snapshot(&s).await);
    for (n, bytes) in snaps.into_iter().enumerate() {
        // The header's counts match the records (restore checks), and each writer's
        // messages are a prefix of what it wrote: nothing committed after an earlier
        // one is in without it.
        let copy = fresh().await;
        copy.restore(std::io::Cursor::new(bytes)).await.unwrap();
        let mut per_writer: BTreeMap<u8, Vec<String>> = BTreeMap::new();
        for w in 0..8u8 {
            let got = copy.pending(&key(100 + w), 0, 1000, 0).await.unwrap();
            per_writer.insert(w, got.into_iter().map(|p| p.message.id).collect());
        }
        for (w, ids) in per_writer {
            let want: Vec<String> = (0..ids.len()).map(|i| format!("{i:04}")).collect();
            assert_eq!(ids, want, "snapshot {n}: writer {w} is not a prefix");
        }
    }
}
