//! Hand-written decoders for the two frames of the message hot path, `send` and `ack`,
//! in the exact shape clients write them: one JSON object without whitespace, the
//! frame's keys in the order `type` first, plain strings (no escapes), keys as 64 hex
//! digits, `ts` as a plain integer.
//!
//! They take a *subset* of what the general decoder ([`decode_client_frame`]) accepts
//! and give the same frame for it; anything else — another shape, an escape, a
//! duplicate or unknown key, `null`, `media`, whitespace, an error of any kind — makes
//! them return `None`, and the general decoder decides (and words the error). serde's
//! derived decoder matches every key by string comparison and copies every string; on
//! a 256-byte message the general path took about half of the relay's user-space
//! instructions per routed message.
//!
//! [`decode_client_frame`]: super::decode_client_frame

use super::frame::{AckRef, Kind, RelayEnvelope};
use super::types::{Base64Text, KeyHex};

/// A position in the frame text.
struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// Consumes `lit` if the text continues with it.
    fn eat(&mut self, lit: &str) -> bool {
        let hit = self.bytes()[self.at..].starts_with(lit.as_bytes());
        if hit {
            self.at += lit.len();
        }
        hit
    }

    /// The next byte, consumed.
    fn next(&mut self) -> Option<u8> {
        let b = *self.bytes().get(self.at)?;
        self.at += 1;
        Some(b)
    }

    /// A JSON string without escapes or control characters (what serde_json decodes to
    /// the same text), without its quotes.
    fn plain_str(&mut self) -> Option<&'a str> {
        if !self.eat("\"") {
            return None;
        }
        let start = self.at;
        let rest = &self.bytes()[start..];
        let len = string_end(rest)?;
        if rest[len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        // Both ends are at ASCII bytes, so they are character boundaries.
        self.text.get(start..start + len)
    }

    /// A key: a string of exactly 64 hex digits.
    fn key(&mut self) -> Option<KeyHex> {
        let s = self.plain_str()?;
        if s.len() != 64 {
            return None;
        }
        KeyHex::parse(s).ok()
    }

    /// An integer as serde_json reads an `i64`: `-?(0|[1-9][0-9]*)`, in range, and
    /// followed by neither a fraction nor an exponent (those would make it a float).
    fn int(&mut self) -> Option<i64> {
        let negative = self.eat("-");
        let start = self.at;
        let digits = self.bytes()[start..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 || digits > 19 || (digits > 1 && self.bytes()[start] == b'0') {
            return None;
        }
        if matches!(self.bytes().get(start + digits), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        self.at = start + digits;
        let magnitude: u64 = self.text.get(start..start + digits)?.parse().ok()?;
        if negative {
            // serde_json reads `-0` as a float (negative zero), not as an integer.
            if magnitude == 0 {
                return None;
            }
            0i64.checked_sub_unsigned(magnitude)
        } else {
            i64::try_from(magnitude).ok()
        }
    }
}

/// The index of the first byte that ends or escapes a JSON string: `"`, `\`, or a
/// control character. Checks 16 bytes at a time for any of them (which the compiler
/// does in a few instructions) and looks for the exact one only in the chunk that has
/// it; a payload is a few hundred bytes.
fn string_end(bytes: &[u8]) -> Option<usize> {
    let special = |b: u8| (b == b'"') | (b == b'\\') | (b < 0x20);
    let (chunks, _) = bytes.as_chunks::<16>();
    let clean = chunks
        .iter()
        .take_while(|c| !c.iter().fold(false, |hit, &b| hit | special(b)))
        .count();
    let from = clean * 16;
    bytes[from..]
        .iter()
        .position(|&b| special(b))
        .map(|i| from + i)
}

/// Starts of a `send` and an `ack` frame in the shape taken here.
const SEND_HEAD: &str = r#"{"type":"send","envelope":{"#;
const ACK_HEAD: &str = r#"{"type":"ack","messages":["#;

/// A `send` frame's envelope, if `text` is a send in the shape described in the module
/// documentation; `None` otherwise (the general decoder decides then).
pub fn send(text: &str) -> Option<RelayEnvelope> {
    let mut c = Cursor { text, at: 0 };
    if !c.eat(SEND_HEAD) {
        return None;
    }
    let (mut id, mut from, mut to, mut channel, mut ts, mut kind, mut payload) =
        (None, None, None, None, None, None, None);
    loop {
        let key = c.plain_str()?;
        if !c.eat(":") {
            return None;
        }
        // A key seen twice is an error for serde: left to it.
        match key {
            "id" if id.is_none() => id = Some(c.plain_str()?),
            "from" if from.is_none() => from = Some(c.key()?),
            "to" if to.is_none() => to = Some(c.key()?),
            "channel" if channel.is_none() => channel = Some(c.plain_str()?),
            "ts" if ts.is_none() => ts = Some(c.int()?),
            "kind" if kind.is_none() => {
                let name = c.plain_str()?;
                kind = Some(Kind::ALL.into_iter().find(|k| k.as_str() == name)?);
            }
            "payload" if payload.is_none() => payload = Some(c.plain_str()?),
            _ => return None,
        }
        match c.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    if !c.eat("}") || c.at != text.len() {
        return None;
    }
    Some(RelayEnvelope {
        id: id?.to_string(),
        from,
        to,
        channel: channel.map(str::to_string),
        ts: ts?,
        kind: kind?,
        // Checked here, once: an invalid payload is the general decoder's to refuse.
        payload: Base64Text::new(payload?.to_string())?,
        media: None,
    })
}

/// An `ack` frame's references and `quiet` flag, if `text` is an ack in the shape
/// described in the module documentation (`quiet`, if present, after `messages`);
/// `None` otherwise.
pub fn ack(text: &str) -> Option<(Vec<AckRef>, bool)> {
    let mut c = Cursor { text, at: 0 };
    if !c.eat(ACK_HEAD) {
        return None;
    }
    let mut refs = Vec::new();
    if !c.eat("]") {
        loop {
            if !c.eat("{") {
                return None;
            }
            let (mut from, mut id) = (None, None);
            loop {
                match c.plain_str()? {
                    "from" if from.is_none() && c.eat(":") => from = Some(c.key()?),
                    "id" if id.is_none() && c.eat(":") => id = Some(c.plain_str()?),
                    _ => return None,
                }
                match c.next()? {
                    b',' => continue,
                    b'}' => break,
                    _ => return None,
                }
            }
            refs.push(AckRef {
                from: from?,
                id: id?.to_string(),
            });
            match c.next()? {
                b',' => continue,
                b']' => break,
                _ => return None,
            }
        }
    }
    let quiet = if c.eat(r#","quiet":true"#) {
        true
    } else {
        // `"quiet":false` is the default spelled out.
        c.eat(r#","quiet":false"#);
        false
    };
    if !c.eat("}") || c.at != text.len() {
        return None;
    }
    Some((refs, quiet))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdefABCDEF0123456789abcdef0123456789abcdef0123456789";

    #[test]
    fn takes_the_canonical_send() {
        let t = format!(
            r#"{{"type":"send","envelope":{{"id":"m-1","to":"{KEY}","ts":-17,"kind":"image","payload":"aGk="}}}}"#
        );
        let env = send(&t).unwrap();
        assert_eq!(env.id, "m-1");
        assert_eq!(env.to, Some(KeyHex::parse(KEY).unwrap()));
        assert_eq!(
            (env.ts, env.kind, env.payload.as_str()),
            (-17, Kind::Image, "aGk=")
        );
        assert_eq!((env.from, env.channel, env.media), (None, None, None));
    }

    #[test]
    fn leaves_everything_else_to_the_general_decoder() {
        let ok = r#""id":"m","channel":"c","ts":1,"kind":"text","payload":"""#;
        assert!(send(&format!(r#"{{"type":"send","envelope":{{{ok}}}}}"#)).is_some());
        for env in [
            r#""id":"m\"","channel":"c","ts":1,"kind":"text","payload":"""#,
            r#""id":"m","channel":"c","ts":01,"kind":"text","payload":"""#,
            r#""id":"m","channel":"c","ts":1.0,"kind":"text","payload":"""#,
            r#""id":"m","channel":"c","ts":1e3,"kind":"text","payload":"""#,
            r#""id":"m","channel":"c","ts":9223372036854775808,"kind":"text","payload":"""#,
            r#""id":"m","channel":"c","ts":1,"kind":"Text","payload":"""#,
            r#""id":"m","channel":"c","ts":1,"kind":"text","payload":"aGk""#,
            r#""id":"m","channel":"c","ts":1,"kind":"text","payload":"aGl=""#,
            r#""id":"m","channel":"c","ts":1,"kind":"text""#,
            r#""id":"m","id":"n","channel":"c","ts":1,"kind":"text","payload":"""#,
            r#""id":"m","channel":null,"ts":1,"kind":"text","payload":"""#,
            r#""id":"m","channel":"c","ts":1,"kind":"text","payload":"","x":1"#,
            r#""id":"m","channel":"c","ts":1,"kind":"text","payload":"","media":null"#,
            r#""id":"m", "channel":"c","ts":1,"kind":"text","payload":"""#,
            r#""id":"m","to":"0123","ts":1,"kind":"text","payload":"""#,
        ] {
            assert!(
                send(&format!(r#"{{"type":"send","envelope":{{{env}}}}}"#)).is_none(),
                "{env}"
            );
        }
        let frame = format!(r#"{{"type":"send","envelope":{{{ok}}}}}"#);
        assert!(send(&format!("{frame} ")).is_none());
        assert!(send(&frame[..frame.len() - 1]).is_none());
        assert!(send(&format!(r#"{{"envelope":{{{ok}}},"type":"send"}}"#)).is_none());
    }

    #[test]
    fn ints_read_as_serde_json_reads_i64() {
        for t in [
            "0",
            "-0",
            "7",
            "-7",
            "9223372036854775807",
            "-9223372036854775808",
        ] {
            let mut c = Cursor { text: t, at: 0 };
            assert_eq!(c.int(), serde_json::from_str::<i64>(t).ok(), "{t}");
        }
        for t in [
            "",
            "-",
            "00",
            "-01",
            "9223372036854775808",
            "-9223372036854775809",
            "1.5",
            "1e2",
            "99999999999999999999",
        ] {
            let mut c = Cursor { text: t, at: 0 };
            assert_eq!(c.int(), None, "{t}");
        }
    }

    #[test]
    fn takes_the_canonical_ack() {
        let t = format!(
            r#"{{"type":"ack","messages":[{{"from":"{KEY}","id":"a"}},{{"id":"b","from":"{KEY}"}}],"quiet":true}}"#
        );
        let (refs, quiet) = ack(&t).unwrap();
        assert!(quiet);
        assert_eq!(
            refs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            ack(r#"{"type":"ack","messages":[]}"#),
            Some((vec![], false))
        );
        assert_eq!(
            ack(r#"{"type":"ack","messages":[],"quiet":false}"#),
            Some((vec![], false))
        );
        for bad in [
            r#"{"type":"ack","messages":[],"quiet":1}"#,
            r#"{"type":"ack","messages":[],"quiet":true,"quiet":true}"#,
            r#"{"type":"ack","messages":[{}]}"#,
            r#"{"type":"ack","messages":[{"id":"a"}]}"#,
            r#"{"type":"ack","messages":[,]}"#,
            r#"{"type":"ack","messages":[]} "#,
        ] {
            assert_eq!(ack(bad), None, "{bad}");
        }
    }
}

/// The hand-written paths against serde on frames built from shuffled, repeated,
/// foreign and malformed members.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::protocol::frame::ClientFrame;
    use proptest::prelude::*;

    fn member() -> impl Strategy<Value = String> {
        let key = "[0-9a-fA-F]{64}".prop_map(|k| format!("\"{k}\""));
        let value = prop_oneof![
            key.clone(),
            Just("null".to_string()),
            Just("\"\"".to_string()),
            "[ -~]{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            "\\PC{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            Just(r#""a\u0062c""#.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            Just("-0".to_string()),
            Just("01".to_string()),
            Just("1.5".to_string()),
            Just("2e3".to_string()),
            Just("9223372036854775808".to_string()),
            Just("-9223372036854775809".to_string()),
            proptest::sample::select(vec![
                "\"text\"",
                "\"video\"",
                "\"Text\"",
                "\"aGk=\"",
                "\"aGk\"",
                "\"aGl=\"",
                "\"QUJD\"",
                "\"QQ==\"",
                "\"-_==\""
            ])
            .prop_map(str::to_string),
            Just("{}".to_string()),
            Just("[]".to_string()),
            Just("true".to_string()),
        ];
        let name = proptest::sample::select(vec![
            "id", "from", "to", "channel", "ts", "kind", "payload", "media", "x", "quiet",
        ]);
        (name, value).prop_map(|(n, v)| format!("\"{n}\":{v}"))
    }

    fn send_frame() -> impl Strategy<Value = String> {
        let good = vec![
            r#""id":"m1""#.to_string(),
            format!(r#""to":"{}""#, "ab".repeat(32)),
            r#""ts":1"#.to_string(),
            r#""kind":"text""#.to_string(),
            r#""payload":"aGk=""#.to_string(),
        ];
        (
            Just(good).prop_shuffle(),
            proptest::collection::vec((0usize..6, member()), 0..3),
            any::<bool>(),
        )
            .prop_map(|(mut members, extra, drop_one)| {
                for (at, m) in extra {
                    members.insert(at.min(members.len()), m);
                }
                if drop_one {
                    members.pop();
                }
                format!(r#"{{"type":"send","envelope":{{{}}}}}"#, members.join(","))
            })
    }

    fn ack_frame() -> impl Strategy<Value = String> {
        let reference = prop_oneof![
            ("[0-9a-f]{64}", "[ -~]{0,8}").prop_map(|(k, id)| format!(
                r#"{{"from":"{k}","id":{}}}"#,
                serde_json::to_string(&id).unwrap()
            )),
            ("[0-9a-f]{64}", "[ -~]{0,8}").prop_map(|(k, id)| format!(
                r#"{{"id":{},"from":"{k}"}}"#,
                serde_json::to_string(&id).unwrap()
            )),
            member().prop_map(|m| format!("{{{m}}}")),
        ];
        let tail = proptest::sample::select(vec![
            "",
            r#","quiet":true"#,
            r#","quiet":false"#,
            r#","quiet":null"#,
            r#","x":1"#,
        ]);
        (proptest::collection::vec(reference, 0..4), tail).prop_map(|(refs, tail)| {
            format!(r#"{{"type":"ack","messages":[{}]{tail}}}"#, refs.join(","))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

        /// What the hand-written `send` path takes, serde decodes to the same envelope.
        #[test]
        fn send_agrees_with_serde(s in send_frame()) {
            if let Some(env) = send(&s) {
                match serde_json::from_str::<ClientFrame>(&s) {
                    Ok(ClientFrame::Send { envelope }) => prop_assert_eq!(env, envelope.into()),
                    other => prop_assert!(false, "scan took {} but serde gave {:?}", s, other),
                }
            }
        }

        /// What the hand-written `ack` path takes, serde decodes to the same frame.
        #[test]
        fn ack_agrees_with_serde(s in ack_frame()) {
            if let Some((messages, quiet)) = ack(&s) {
                prop_assert_eq!(serde_json::from_str::<ClientFrame>(&s).ok(), Some(ClientFrame::Ack { messages, quiet }));
            }
        }

        /// Valid frames as clients write them take the hand-written paths.
        #[test]
        fn canonical_frames_take_the_hand_written_paths(to in "[0-9a-f]{64}", id in "[ -!#-\\[\\]-~]{1,20}", ts in any::<i64>(), payload in proptest::collection::vec(any::<u8>(), 0..40)) {
            let env = crate::protocol::Envelope {
                id: id.clone(),
                from: None,
                to: Some(KeyHex::parse(&to).unwrap()),
                channel: None,
                ts,
                kind: Kind::Audio,
                payload: crate::protocol::Base64Bytes(payload),
                media: None,
            };
            let text = ClientFrame::Send { envelope: env.clone() }.to_json().unwrap();
            prop_assert_eq!(send(&text), Some(env.into()));
            let refs = vec![AckRef { from: KeyHex::parse(&to).unwrap(), id }];
            let text = ClientFrame::Ack { messages: refs.clone(), quiet: true }.to_json().unwrap();
            prop_assert_eq!(ack(&text), Some((refs, true)));
        }
    }
}
