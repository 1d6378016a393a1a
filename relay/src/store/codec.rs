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
