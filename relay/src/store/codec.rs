//! Byte encodings shared by the embedded tables and the snapshot stream.
//!
//! Hand-written and versioned rather than serde-derived so that the on-disk format is
//! explicit (documented in docs/storage.md) and decoding a damaged record is a typed
//! error, never a panic. All integers are big-endian so that byte-wise key order equals
//! numeric order.

use super::{PublicKey, StoredMessage};

/// Version byte at the start of every encoded message record.
const MESSAGE_RECORD_V1: u8 = 1;

/// Appends a length-prefixed (u32 BE) byte string.
pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Lengths are bounded by validation (ids, kinds, channels) or by the relay's frame
    // limit (envelopes), all far below u32::MAX.
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Encodes a message as a self-describing record.
pub(crate) fn encode_message(msg: &StoredMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        1 + 64 + 16 + 4 * 4 + msg.id.len() + msg.kind.len() + msg.envelope.len() + 1 + 64,
    );
    out.push(MESSAGE_RECORD_V1);
    out.extend_from_slice(&msg.recipient);
    out.extend_from_slice(&msg.sender);
    out.extend_from_slice(&msg.timestamp_ms.to_be_bytes());
    out.extend_from_slice(&msg.expires_at_ms.to_be_bytes());
    put_bytes(&mut out, msg.id.as_bytes());
    match &msg.channel {
        Some(c) => {
            out.push(1);
            put_bytes(&mut out, c.as_bytes());
        }
        None => out.push(0),
    }
    put_bytes(&mut out, msg.kind.as_bytes());
    put_bytes(&mut out, &msg.envelope);
    out
}

/// A cursor over a byte slice whose every read is bounds-checked.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// The next `n` bytes, or an error naming what was being read.
    pub(crate) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "truncated reading {what}: need {n} bytes at offset {}, record has {}",
                self.pos,
                self.buf.len()
            )),
        }
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(a))
    }

    pub(crate) fn i64(&mut self, what: &str) -> Result<i64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(i64::from_be_bytes(a))
    }

    pub(crate) fn key(&mut self, what: &str) -> Result<PublicKey, String> {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.take(32, what)?);
        Ok(k)
    }

    /// A u32-length-prefixed byte string.
    pub(crate) fn bytes(&mut self, what: &str) -> Result<&'a [u8], String> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    /// A u32-length-prefixed UTF-8 string.
    pub(crate) fn string(&mut self, what: &str) -> Result<String, String> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    /// Errors if bytes remain: a record longer than its fields is as suspect as a short one.
    pub(crate) fn finish(&self, what: &str) -> Result<(), String> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(format!(
                "{} trailing bytes after {what}",
                self.buf.len() - self.pos
            ))
        }
    }
}

/// Decodes a record written by [`encode_message`].
pub(crate) fn decode_message(buf: &[u8]) -> Result<StoredMessage, String> {
    let mut r = Reader::new(buf);
    let version = r.u8("record version")?;
    if version != MESSAGE_RECORD_V1 {
        return Err(format!("unknown message record version {version}"));
    }
    let recipient = r.key("recipient")?;
    let sender = r.key("sender")?;
    let timestamp_ms = r.i64("timestamp")?;
    let expires_at_ms = r.i64("expiry")?;
    let id = r.string("id")?;
    let channel = match r.u8("channel flag")? {
        0 => None,
        1 => Some(r.string("channel")?),
        other => return Err(format!("invalid channel flag {other}")),
    };
    let kind = r.string("kind")?;
    let envelope = r.bytes("envelope")?.to_vec();
    r.finish("message record")?;
    Ok(StoredMessage {
        recipient,
        sender,
        id,
        channel,
        timestamp_ms,
        expires_at_ms,
        kind,
        envelope,
    })
}

/// Maps an i64 to a u64 with the same order (flip the sign bit), so that negative
/// timestamps still sort before positive ones in a byte-ordered key.
pub(crate) fn order_i64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1u64 << 63)).to_be_bytes()
}

/// Tag byte after the recipient in an inbox key: a pending message.
pub(crate) const INBOX_MESSAGE: u8 = 0;
/// Tag byte after the recipient in an inbox key: a dedup entry.
pub(crate) const INBOX_DEDUP: u8 = 1;

/// Inbox key of a pending message: recipient ‖ 0x00 ‖ seq. A recipient's messages are
/// contiguous and in seq order, so `pending` is one range scan.
pub(crate) fn message_key(recipient: &PublicKey, seq: u64) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[..32].copy_from_slice(recipient);
    k[32] = INBOX_MESSAGE;
    k[33..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Inbox key of a dedup entry: recipient ‖ 0x01 ‖ sender ‖ id. It sits next to the
/// recipient's messages, so a put dirties one neighbourhood of the tree, not two. The
/// id is last, so its variable length cannot make two distinct triples encode equally.
pub(crate) fn dedup_key(recipient: &PublicKey, sender: &PublicKey, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(65 + id.len());
    k.extend_from_slice(recipient);
    k.push(INBOX_DEDUP);
    k.extend_from_slice(sender);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Splits a dedup key back into (recipient, sender, id).
pub(crate) fn split_dedup_key(k: &[u8]) -> Result<(PublicKey, PublicKey, String), String> {
    let mut r = Reader::new(k);
    let recipient = r.key("dedup recipient")?;
    if r.u8("dedup tag")? != INBOX_DEDUP {
        return Err("not a dedup key".into());
    }
    let sender = r.key("dedup sender")?;
    let id = String::from_utf8(k[65..].to_vec()).map_err(|_| "dedup id is not UTF-8")?;
    Ok((recipient, sender, id))
}

/// Value of the dedup table: seq ‖ expires_at_ms. The entry outlives an acknowledged
/// message until its expiry, so a late retry of the same id is still a duplicate.
pub(crate) fn dedup_value(seq: u64, expires_at_ms: i64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&seq.to_be_bytes());
    v[8..].copy_from_slice(&expires_at_ms.to_be_bytes());
    v
}

/// Parses a dedup value into (seq, expires_at_ms).
pub(crate) fn split_dedup_value(v: &[u8]) -> Result<(u64, i64), String> {
    let mut r = Reader::new(v);
    let seq = r.u64("dedup seq")?;
    let exp = r.i64("dedup expiry")?;
    r.finish("dedup value")?;
    Ok((seq, exp))
}

/// Key of the expiry index: ordered(expires_at_ms) ‖ seq, so a range scan up to `now`
/// finds exactly the expired entries.
pub(crate) fn expiry_key(expires_at_ms: i64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&order_i64(expires_at_ms));
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Key of the membership table: u16 BE name length ‖ name ‖ member. The length prefix
/// makes "ab"+key and "a"+"b…" distinct and lets a prefix range list one channel.
pub(crate) fn member_key(channel: &str, member: &PublicKey) -> Vec<u8> {
    let mut k = channel_prefix(channel);
    k.extend_from_slice(member);
    k
}

/// The prefix of all membership keys of `channel`.
pub(crate) fn channel_prefix(channel: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + channel.len() + 32);
    // Channel names are validated to at most 256 bytes.
    k.extend_from_slice(&(channel.len() as u16).to_be_bytes());
    k.extend_from_slice(channel.as_bytes());
    k
}

/// Splits a membership key into (channel, member).
pub(crate) fn split_member_key(k: &[u8]) -> Result<(String, PublicKey), String> {
    let mut r = Reader::new(k);
    let n = {
        let b = r.take(2, "channel name length")?;
        u16::from_be_bytes([b[0], b[1]]) as usize
    };
    let name = r.take(n, "channel name")?;
    let name = String::from_utf8(name.to_vec()).map_err(|_| "channel name is not UTF-8")?;
    let member = r.key("member")?;
    r.finish("membership key")?;
    Ok((name, member))
}

/// One state change as written to the embedded store's commit log (`dchat.wal`):
/// replaying the records after the last durable redb commit, in order, on that commit's
/// state reproduces exactly what the writer had applied and acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LogOp {
    /// A message stored under `seq` (duplicates change nothing and are not logged).
    Put { seq: u64, msg: StoredMessage },
    /// An acknowledgement of `keys` (sender, id) by `recipient`.
    Ack {
        recipient: PublicKey,
        keys: Vec<(PublicKey, String)>,
    },
    /// One expiry chunk.
    Expire { now_ms: i64, max_entries: u64 },
    /// A profile that replaced the stored one.
    Profile {
        key: PublicKey,
        updated_ms: i64,
        blob: Vec<u8>,
    },
    /// A join (`join`) or leave of `channel`.
    Membership {
        channel: String,
        member: PublicKey,
        join: bool,
    },
}

const LOG_PUT: u8 = 1;
const LOG_ACK: u8 = 2;
const LOG_EXPIRE: u8 = 3;
const LOG_PROFILE: u8 = 4;
const LOG_MEMBERSHIP: u8 = 5;

#[cfg(test)] // written only by the old engine's test writer and the codec tests
/// Appends the body of a log record for `op` to `out`.
pub(crate) fn encode_log_op(out: &mut Vec<u8>, op: &LogOp) {
    match op {
        LogOp::Put { seq, msg } => encode_log_put(out, *seq, msg),
        LogOp::Ack { recipient, keys } => encode_log_ack(out, recipient, keys),
        LogOp::Expire {
            now_ms,
            max_entries,
        } => {
            out.push(LOG_EXPIRE);
            out.extend_from_slice(&now_ms.to_be_bytes());
            out.extend_from_slice(&max_entries.to_be_bytes());
        }
        LogOp::Profile {
            key,
            updated_ms,
            blob,
        } => {
            out.push(LOG_PROFILE);
            out.extend_from_slice(key);
            out.extend_from_slice(&updated_ms.to_be_bytes());
            put_bytes(out, blob);
        }
        LogOp::Membership {
            channel,
            member,
            join,
        } => {
            out.push(LOG_MEMBERSHIP);
            out.push(u8::from(*join));
            out.extend_from_slice(member);
            put_bytes(out, channel.as_bytes());
        }
    }
}

#[cfg(test)] // written only by the old engine's test writer and the codec tests
/// The body of a [`LogOp::Put`], without building the op (the writer's hot path).
pub(crate) fn encode_log_put(out: &mut Vec<u8>, seq: u64, msg: &StoredMessage) {
    out.push(LOG_PUT);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&encode_message(msg));
}

#[cfg(test)] // written only by the old engine's test writer and the codec tests
/// The body of a [`LogOp::Ack`], without building the op.
pub(crate) fn encode_log_ack(
    out: &mut Vec<u8>,
    recipient: &PublicKey,
    keys: &[(PublicKey, String)],
) {
    out.push(LOG_ACK);
    out.extend_from_slice(recipient);
    // Acks are bounded by the protocol's batch limit, far below u32::MAX.
    out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
    for (sender, id) in keys {
        out.extend_from_slice(sender);
        put_bytes(out, id.as_bytes());
    }
}

/// Decodes a body written by [`encode_log_op`].
pub(crate) fn decode_log_op(body: &[u8]) -> Result<LogOp, String> {
    let mut r = Reader::new(body);
    let op = match r.u8("log op tag")? {
        LOG_PUT => {
            let seq = r.u64("log put seq")?;
            let rest = r.take(body.len() - 9, "log put message")?;
            let msg = decode_message(rest)?;
            LogOp::Put { seq, msg }
        }
        LOG_ACK => {
            let recipient = r.key("log ack recipient")?;
            let n = r.u32("log ack count")? as usize;
            // Each key takes at least 36 bytes: a corrupt count cannot allocate much.
            let mut keys = Vec::with_capacity(n.min(body.len() / 36));
            for _ in 0..n {
                let sender = r.key("log ack sender")?;
                let id = r.string("log ack id")?;
                keys.push((sender, id));
            }
            LogOp::Ack { recipient, keys }
        }
        LOG_EXPIRE => LogOp::Expire {
            now_ms: r.i64("log expire now")?,
            max_entries: r.u64("log expire chunk")?,
        },
        LOG_PROFILE => LogOp::Profile {
            key: r.key("log profile key")?,
            updated_ms: r.i64("log profile updated")?,
            blob: r.bytes("log profile blob")?.to_vec(),
        },
        LOG_MEMBERSHIP => {
            let join = match r.u8("log membership flag")? {
                0 => false,
                1 => true,
                other => return Err(format!("invalid membership flag {other}")),
            };
            let member = r.key("log membership member")?;
            let channel = r.string("log membership channel")?;
            LogOp::Membership {
                channel,
                member,
                join,
            }
        }
        other => return Err(format!("unknown log op tag {other}")),
    };
    r.finish("log record")?;
    Ok(op)
}

/// FNV-1a (64-bit) of `bytes`: detects torn or stale commit-log records (not an
/// integrity guarantee against tampering; the log never leaves the data directory).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredMessage {
        StoredMessage {
            recipient: [1; 32],
            sender: [2; 32],
            id: "m-1".into(),
            channel: Some("general".into()),
            timestamp_ms: -5,
            expires_at_ms: 1_000,
            kind: "text".into(),
            envelope: vec![9, 8, 7],
        }
    }

    #[test]
    fn message_roundtrip_and_truncation_is_an_error() {
        let m = sample();
        let enc = encode_message(&m);
        assert_eq!(decode_message(&enc).unwrap(), m);
        for cut in 0..enc.len() {
            assert!(decode_message(&enc[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = enc.clone();
        longer.push(0);
        assert!(decode_message(&longer).unwrap_err().contains("trailing"));
    }

    #[test]
    fn inbox_keys_group_by_recipient_and_roundtrip() {
        let (r, s) = ([1; 32], [2; 32]);
        let d = dedup_key(&r, &s, "x");
        assert_eq!(split_dedup_key(&d).unwrap(), (r, s, "x".to_string()));
        // Messages of one recipient sort by seq and before its dedup entries, and
        // everything of recipient r sorts before anything of the next recipient.
        assert!(message_key(&r, 1).as_slice() < message_key(&r, 256).as_slice());
        assert!(message_key(&r, u64::MAX).as_slice() < d.as_slice());
        assert!(d.as_slice() < message_key(&[3; 32], 0).as_slice());
        assert!(split_dedup_key(&message_key(&r, 1)).is_err());
    }

    #[test]
    fn log_ops_roundtrip_and_damage_is_an_error() {
        let ops = [
            LogOp::Put {
                seq: 42,
                msg: sample(),
            },
            LogOp::Ack {
                recipient: [1; 32],
                keys: vec![([2; 32], "a".into()), ([3; 32], "bb".into())],
            },
            LogOp::Expire {
                now_ms: -7,
                max_entries: 5000,
            },
            LogOp::Profile {
                key: [4; 32],
                updated_ms: 9,
                blob: vec![1, 2, 3],
            },
            LogOp::Membership {
                channel: "general".into(),
                member: [5; 32],
                join: false,
            },
        ];
        for op in ops {
            let mut body = Vec::new();
            encode_log_op(&mut body, &op);
            assert_eq!(decode_log_op(&body).unwrap(), op);
            for cut in 0..body.len() {
                assert!(decode_log_op(&body[..cut]).is_err(), "{op:?} cut at {cut}");
            }
            body.push(0);
            assert!(decode_log_op(&body).is_err());
        }
        assert!(decode_log_op(&[99]).unwrap_err().contains("unknown"));
        assert_ne!(fnv1a64(b"ab"), fnv1a64(b"ba"));
    }

    #[test]
    fn ordered_i64_preserves_order() {
        let vals = [i64::MIN, -1, 0, 1, i64::MAX];
        for w in vals.windows(2) {
            assert!(order_i64(w[0]) < order_i64(w[1]));
        }
    }

    #[test]
    fn member_keys_roundtrip_and_do_not_collide() {
        let k = member_key("ab", &[3; 32]);
        assert_eq!(split_member_key(&k).unwrap(), ("ab".to_string(), [3; 32]));
        assert!(!member_key("a", &[3; 32]).starts_with(&channel_prefix("ab")));
    }
}
