//! Unit tests of the embedded store's internals: one batch's staging, chunked restore.

use std::path::PathBuf;

use super::batch::Writer;
use super::tables::{split_dedup_record, Table, Tables, RESTORE_MARKER};
use super::writer::lock;
use super::{EmbeddedOptions, EmbeddedStore, STORE_DIR_NAME};
use crate::store::codec::{dedup_key, message_key};
use crate::store::snapshot::{is_message_key, seq_of_message_key};
use crate::store::{AckKey, PutOutcome, Store, StoreError, StoredMessage};

fn temp_dir(label: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("dchat-emb-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn msg(recipient: u8, id: &str) -> StoredMessage {
    StoredMessage {
        recipient: [recipient; 32],
        sender: [9; 32],
        id: id.into(),
        channel: None,
        timestamp_ms: 1,
        expires_at_ms: 4_000_000_000_000,
        kind: "text".into(),
        envelope: id.as_bytes().to_vec(),
    }
}

fn read_pending(tables: &Tables, recipient: u8) -> Vec<u64> {
    tables
        .ks(Table::Inbox)
        .prefix([recipient; 32])
        .map(|g| g.into_inner().unwrap())
        .filter(|(k, _)| is_message_key(k))
        .map(|(k, _)| seq_of_message_key(&k).unwrap())
        .collect()
}

/// Writes to one key twice in one batch (a put and the ack of the same message,
/// a restore marker set and cleared) share the batch's seqno in fjall: the later
/// write must win, in memory and after the journal is replayed.
#[test]
fn the_last_write_to_a_key_in_one_batch_wins() {
    let dir = temp_dir("last-write");
    {
        let tables = Tables::open(&dir, &EmbeddedOptions::default()).unwrap();
        let counters = tables.init().unwrap();
        let mut w = Writer::new(&tables, counters);
        assert_eq!(w.put(&msg(1, "a")).unwrap(), PutOutcome::Stored { seq: 1 });
        assert_eq!(w.put(&msg(1, "b")).unwrap(), PutOutcome::Stored { seq: 2 });
        assert_eq!(w.ack(&[1; 32], &[AckKey::new([9; 32], "a")]).unwrap(), 1);
        assert_eq!(w.put(&msg(1, "a")).unwrap(), PutOutcome::Duplicate);
        // Acked again in the same batch: it is gone now.
        assert_eq!(w.ack(&[1; 32], &[AckKey::new([9; 32], "a")]).unwrap(), 0);
        // Only what the writer reads back is staged: the two dedup entries and the
        // removal of the acknowledged message (not the messages written).
        assert!(w.staged[Table::Expiry as usize].is_empty());
        let inbox = &w.staged[Table::Inbox as usize];
        assert_eq!(inbox.len(), 3);
        assert_eq!(
            inbox.get(message_key(&[1; 32], 1).as_slice()),
            Some(&None),
            "the removal is staged"
        );
        assert!(inbox.iter().all(|(k, v)| !is_message_key(k) || v.is_none()));
        w.insert(Table::Meta, RESTORE_MARKER.as_bytes(), &1u64.to_be_bytes());
        w.remove(Table::Meta, RESTORE_MARKER.as_bytes());
        let counters = w.commit().unwrap();
        assert_eq!(counters.pending, 1);
        assert_eq!(read_pending(&tables, 1), vec![2]);
        assert_eq!(tables.meta_u64(RESTORE_MARKER).unwrap(), None);
    }
    // Reopened: the journal replays the batch the same way.
    let tables = Tables::open(&dir, &EmbeddedOptions::default()).unwrap();
    let counters = tables.init().unwrap();
    assert_eq!((counters.next_seq, counters.pending), (3, 1));
    assert_eq!(read_pending(&tables, 1), vec![2]);
    // The ack removed the message and left the dedup entry as the put wrote it.
    let dk = dedup_key(&[1; 32], &[9; 32], "a");
    let v = tables.ks(Table::Inbox).get(&dk).unwrap().unwrap();
    assert_eq!(
        split_dedup_record(&v).unwrap(),
        (1, 4_000_000_000_000, true)
    );
    let w = Writer::new(&tables, counters);
    assert!(!w.still_pending(&[1; 32], 1, true).unwrap());
    assert!(w.still_pending(&[1; 32], 2, true).unwrap());
    drop(w);
    drop(tables);
    let _ = std::fs::remove_dir_all(&dir);
}

fn snapshot_of(n: usize) -> Vec<u8> {
    let dir = temp_dir("snap-src");
    let store = EmbeddedStore::open(&dir).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let msgs = (0..n)
        .map(|i| msg((i % 5) as u8, &format!("m{i}")))
        .collect();
    rt.block_on(store.put_many(msgs)).unwrap();
    let mut out = Vec::new();
    store.snapshot(&mut out).unwrap();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// A restore larger than one chunk that fails verification at the end leaves the
/// store empty, although chunks were committed on the way.
#[test]
fn a_failed_chunked_restore_leaves_the_store_empty() {
    let mut snap = snapshot_of(40);
    let last = snap.len() - 1;
    snap[last] ^= 0xFF; // the checksum trailer: detected only after every record
    let dir = temp_dir("restore-fail");
    let store = EmbeddedStore::open(&dir).unwrap();
    let err = store.restore(&mut snap.as_slice()).unwrap_err();
    assert!(
        matches!(err, StoreError::SnapshotChecksum { .. }),
        "{err:?}"
    );
    assert_eq!(read_pending(&store.tables, 0), Vec::<u64>::new());
    assert!(store.tables.ks(Table::Inbox).is_empty().unwrap());
    assert!(store.tables.ks(Table::Expiry).is_empty().unwrap());
    assert_eq!(store.tables.meta_u64("pending_count").unwrap(), Some(0));
    assert_eq!(store.tables.meta_u64(RESTORE_MARKER).unwrap(), None);
    // And a good stream restores afterwards.
    snap[last] ^= 0xFF;
    let summary = store.restore(&mut snap.as_slice()).unwrap();
    assert_eq!(summary.messages, 40);
    assert_eq!(read_pending(&store.tables, 0).len(), 8);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A restore interrupted by a crash (its marker still set) is rolled back at open.
#[test]
fn an_interrupted_restore_is_rolled_back_at_open() {
    let dir = temp_dir("restore-crash");
    {
        let path = dir.join(STORE_DIR_NAME);
        let tables = Tables::open(&path, &EmbeddedOptions::default()).unwrap();
        let counters = tables.init().unwrap();
        let mut w = Writer::new(&tables, counters);
        w.insert(Table::Meta, RESTORE_MARKER.as_bytes(), &1u64.to_be_bytes());
        w.insert_message(5, &msg(1, "half"), &dedup_key(&[1; 32], &[9; 32], "half"));
        w.counters.next_seq = 6;
        w.commit().unwrap();
    }
    let store = EmbeddedStore::open(&dir).unwrap();
    assert!(store.tables.ks(Table::Inbox).is_empty().unwrap());
    assert!(store.tables.ks(Table::Expiry).is_empty().unwrap());
    assert_eq!(store.tables.meta_u64(RESTORE_MARKER).unwrap(), None);
    let c = lock(&store.engine, "test").unwrap().counters;
    assert_eq!((c.next_seq, c.pending), (6, 0), "seqs never go back");
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
