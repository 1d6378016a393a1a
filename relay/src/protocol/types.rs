//! Wire encodings of keys, signatures and binary blobs.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ed25519 public key, 32 bytes, written on the wire as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHex(pub [u8; 32]);

/// The value of every byte as a hex digit (either case); [`NOT_HEX`] for the others.
/// A table instead of a `match` on ranges: keys are random, so whether a digit is a
/// letter or a number cannot be predicted, and the `match`'s branches mispredicted
/// about every third digit (4–5 % of the relay's core in S2, where every `ack` reference
/// carries a key).
const HEX_VALUE: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};
/// [`HEX_VALUE`] of a byte that is not a hex digit: any of the high four bits set.
const NOT_HEX: u8 = 0xFF;

/// Exactly 64 hex digits as 32 bytes; `None` for anything else.
fn parse_64_hex(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    // No branch per digit: a non-digit is noticed once, at the end, by its high bits.
    let mut seen = 0u8;
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let (high, low) = (
            HEX_VALUE[usize::from(pair[0])],
            HEX_VALUE[usize::from(pair[1])],
        );
        seen |= high | low;
        *o = (high << 4) | (low & 0x0F);
    }
    (seen & 0xF0 == 0).then_some(out)
}

impl KeyHex {
    /// Parses 64 hex digits (either case).
    pub fn parse(s: &str) -> Result<KeyHex, String> {
        // Every routed message and every ack parses one or two keys: decode straight
        // into the array (hex::decode builds a Vec through an iterator, ~4× the work).
        // Anything that is not exactly 64 hex digits takes the general path below,
        // which produces the error message.
        if let Some(k) = parse_64_hex(s.as_bytes()) {
            return Ok(KeyHex(k));
        }
        let bytes = hex::decode(s).map_err(|e| format!("key is not hex: {e}"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("key must be 32 bytes, got {}", b.len()))?;
        Ok(KeyHex(arr))
    }

    /// Lowercase hex form.
    pub fn to_hex(&self) -> String {
        String::from(self.hex_digits().as_str())
    }

    /// The 64 lowercase hex digits in a stack buffer (no allocation; `hex::encode`
    /// builds its string one `char` at a time through an iterator).
    fn hex_digits(&self) -> HexDigits {
        HexDigits(hex_lower(&self.0))
    }
}

/// Lowercase hex digits of 32 bytes. Arithmetic instead of a table lookup per digit, so
/// that the compiler can work on many bytes at once (two keys per routed message).
pub(crate) fn hex_lower(bytes: &[u8; 32]) -> [u8; 64] {
    // 0..=9 -> '0'..='9'; 10..=15 -> 'a'..='f': the high bit of 9 - n says which.
    let digit = |n: u8| n + b'0' + ((9u8.wrapping_sub(n) >> 7) * (b'a' - b'0' - 10));
    let mut buf = [0u8; 64];
    for (pair, b) in buf.chunks_exact_mut(2).zip(bytes) {
        pair[0] = digit(b >> 4);
        pair[1] = digit(b & 15);
    }
    buf
}

/// Whether every byte is a digit of the standard base64 alphabet. Comparisons instead of
/// a table lookup, 16 bytes at a time, so that the compiler can check them together
/// (a 256-byte payload is 344 of them).
fn all_base64_digits(s: &[u8]) -> bool {
    let digit = |b: u8| {
        b.is_ascii_uppercase()
            | b.is_ascii_lowercase()
            | b.is_ascii_digit()
            | (b == b'+')
            | (b == b'/')
    };
    let (chunks, rest) = s.as_chunks::<16>();
    chunks
        .iter()
        .all(|c| c.iter().fold(true, |ok, &b| ok & digit(b)))
        && rest.iter().all(|&b| digit(b))
}

/// The hex form of a [`KeyHex`], ASCII by construction.
struct HexDigits([u8; 64]);

impl HexDigits {
    fn as_str(&self) -> &str {
        // Only hex digits are ever written into the buffer, so this never fails.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for KeyHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyHex({})", self.to_hex())
    }
}

impl std::fmt::Display for KeyHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hex_digits().as_str())
    }
}

impl Serialize for KeyHex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.hex_digits().as_str())
    }
}

impl<'de> Deserialize<'de> for KeyHex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<KeyHex, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        KeyHex::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An Ed25519 signature, 64 bytes, written as 128 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SigHex(pub [u8; 64]);

impl std::fmt::Debug for SigHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigHex({})", hex::encode(self.0))
    }
}

impl Serialize for SigHex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for SigHex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SigHex, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bytes = hex::decode(s.as_ref())
            .map_err(|e| serde::de::Error::custom(format!("sig is not hex: {e}")))?;
        let arr: [u8; 64] = bytes.try_into().map_err(|b: Vec<u8>| {
            serde::de::Error::custom(format!("sig must be 64 bytes, got {}", b.len()))
        })?;
        Ok(SigHex(arr))
    }
}

/// Opaque bytes written as standard base64 (RFC 4648, with padding).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Base64Bytes(pub Vec<u8>);

impl std::fmt::Debug for Base64Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Base64Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for Base64Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Base64Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Base64Bytes, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Base64Bytes)
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// The value of every byte as a base64 digit (standard alphabet); [`NOT_B64`] for the
/// others, `=` included.
const B64_VALUE: [u8; 256] = {
    let mut table = [NOT_B64; 256];
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut i = 0;
    while i < 64 {
        table[alphabet[i] as usize] = i as u8;
        i += 1;
    }
    table
};
/// [`B64_VALUE`] of a byte that is not a base64 digit: the high bit set.
const NOT_B64: u8 = 0x80;

/// Whether `s` is exactly what [`Base64Bytes`] accepts: standard base64 (RFC 4648 §4)
/// with padding, canonical (no whitespace, unused bits of the last digit zero). Decides
/// as `base64`'s `STANDARD` engine does, without decoding.
pub fn is_canonical_base64(s: &[u8]) -> bool {
    if !s.len().is_multiple_of(4) {
        return false;
    }
    let Some((body, last)) = s.split_last_chunk::<4>() else {
        // Empty: zero bytes.
        return true;
    };
    let [a, b, c, d] = last.map(|x| B64_VALUE[usize::from(x)]);
    let tail_ok = match last {
        // One byte in the last group: the second digit's low four bits are unused.
        [_, _, b'=', b'='] => (a | b) & NOT_B64 == 0 && b & 0x0F == 0,
        // Two bytes: the third digit's low two bits are unused.
        [_, _, _, b'='] => (a | b | c) & NOT_B64 == 0 && c & 0x03 == 0,
        _ => (a | b | c | d) & NOT_B64 == 0,
    };
    tail_ok && all_base64_digits(body)
}

/// Opaque bytes kept as the standard base64 text they arrived in, checked to be what
/// [`Base64Bytes`] accepts (see [`is_canonical_base64`]) but not decoded.
///
/// The relay forwards message payloads without looking inside: decoding every payload
/// only to encode it again for the `deliver` frame cost ~10 % of the relay's
/// instructions per routed message. Canonical base64 has exactly one text per byte
/// string, so the text forwarded is byte for byte what encoding the decoded bytes
/// would give.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Base64Text(String);

impl Base64Text {
    /// The text, if it is canonical standard base64 with padding.
    pub fn new(text: String) -> Option<Base64Text> {
        is_canonical_base64(text.as_bytes()).then_some(Base64Text(text))
    }

    /// The base64 text of `bytes`.
    pub fn encode(bytes: &[u8]) -> Base64Text {
        Base64Text(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// The base64 text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The bytes it encodes.
    pub fn decode(&self) -> Base64Bytes {
        // Checked canonical on construction, so decoding cannot fail.
        Base64Bytes(
            base64::engine::general_purpose::STANDARD
                .decode(self.0.as_bytes())
                .unwrap_or_default(),
        )
    }
}

impl From<&Base64Bytes> for Base64Text {
    fn from(b: &Base64Bytes) -> Base64Text {
        Base64Text::encode(&b.0)
    }
}

impl std::fmt::Debug for Base64Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Base64Text({} characters)", self.0.len())
    }
}

impl Serialize for Base64Text {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Base64Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Base64Text, D::Error> {
        let s = String::deserialize(d)?;
        if is_canonical_base64(s.as_bytes()) {
            return Ok(Base64Text(s));
        }
        // The error names what is wrong exactly as `Base64Bytes` does.
        match base64::engine::general_purpose::STANDARD.decode(s.as_bytes()) {
            Err(e) => Err(serde::de::Error::custom(format!("invalid base64: {e}"))),
            Ok(_) => Err(serde::de::Error::custom("invalid base64")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte value at the first, a middle and the last position of an otherwise
    /// valid key: accepted exactly when the hex crate accepts it, with its value.
    #[test]
    fn key_digits_agree_with_the_hex_crate_for_every_byte() {
        let base = b"0123456789abcdefABCDEF0123456789abcdefABCDEF0123456789abcdef0123";
        for b in 0..=255u8 {
            for pos in [0, 1, 31, 62, 63] {
                let mut s = *base;
                s[pos] = b;
                let expected = hex::decode(s)
                    .ok()
                    .and_then(|v| <[u8; 32]>::try_from(v).ok());
                assert_eq!(parse_64_hex(&s), expected, "byte {b:#04x} at {pos}");
            }
        }
    }

    #[test]
    fn key_parse_matches_hex_crate_and_keeps_errors() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 37 + 11) as u8);
        let lower = hex::encode(bytes);
        assert_eq!(KeyHex::parse(&lower), Ok(KeyHex(bytes)));
        assert_eq!(KeyHex::parse(&lower.to_uppercase()), Ok(KeyHex(bytes)));
        let mut mixed = lower.clone();
        mixed.replace_range(0..2, &lower[0..2].to_uppercase());
        assert_eq!(KeyHex::parse(&mixed), Ok(KeyHex(bytes)));
        // Errors come from the general path, with the same wording as before.
        let bad = format!("{}zz", &lower[..62]);
        assert!(KeyHex::parse(&bad)
            .unwrap_err()
            .starts_with("key is not hex"));
        assert_eq!(
            KeyHex::parse(&lower[..62]).unwrap_err(),
            "key must be 32 bytes, got 31"
        );
        assert!(KeyHex::parse(&lower[..63])
            .unwrap_err()
            .starts_with("key is not hex"));
        assert!(KeyHex::parse("").is_err());
        // Non-ASCII of the right byte length is refused, not mis-decoded.
        let non_ascii = format!("{}é", &lower[..62]);
        assert_eq!(non_ascii.len(), 64);
        assert!(KeyHex::parse(&non_ascii).is_err());
        for b in 0..=255u8 {
            let s = format!("{}{:02x}", &lower[..62], b);
            assert_eq!(KeyHex::parse(&s).map(|k| k.0[31]), Ok(b));
        }
    }

    #[test]
    fn key_hex_forms_match_hex_crate() {
        for seed in 0..64u8 {
            let bytes: [u8; 32] =
                std::array::from_fn(|i| (i as u8).wrapping_mul(73) ^ seed.wrapping_mul(29));
            let key = KeyHex(bytes);
            let expected = hex::encode(bytes);
            assert_eq!(key.to_hex(), expected);
            assert_eq!(key.to_string(), expected);
            assert_eq!(
                serde_json::to_string(&key).unwrap(),
                format!("\"{expected}\"")
            );
            assert_eq!(KeyHex::parse(&key.to_hex()), Ok(key));
        }
    }
    /// Every string of up to 8 characters over an alphabet that covers each rule
    /// (digits with and without unused bits, padding, URL-safe and foreign bytes) is
    /// accepted exactly when the base64 crate's STANDARD engine decodes it.
    #[test]
    fn canonical_base64_check_agrees_with_the_base64_crate() {
        use base64::Engine as _;
        let alphabet: &[u8] = b"ABEQ/+=-\xc3 ";
        let strings = |len: u32, prefix: &'static [u8]| {
            (0..alphabet.len().pow(len)).map(move |mut i| {
                let mut s = prefix.to_vec();
                for _ in 0..len {
                    s.push(alphabet[i % alphabet.len()]);
                    i /= alphabet.len();
                }
                s
            })
        };
        let mut checked = 0;
        let all = (0..=5)
            .flat_map(|len| strings(len, b""))
            .chain(strings(4, b"QUJD"));
        for s in all {
            let expected = base64::engine::general_purpose::STANDARD.decode(&s).is_ok();
            assert_eq!(
                is_canonical_base64(&s),
                expected,
                "{:?}",
                String::from_utf8_lossy(&s)
            );
            checked += 1;
        }
        assert!(checked > 1000);
        // Every byte value in every position of a valid text.
        for b in 0..=255u8 {
            for pos in 0..8 {
                let mut s = *b"QUJDRA==";
                s[pos] = b;
                let expected = base64::engine::general_purpose::STANDARD.decode(s).is_ok();
                assert_eq!(is_canonical_base64(&s), expected, "byte {b:#04x} at {pos}");
            }
        }
    }

    #[test]
    fn base64_text_round_trips_and_refuses_like_base64_bytes() {
        for len in 0..70usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 89 + 7) as u8).collect();
            let text = Base64Text::encode(&bytes);
            assert_eq!(
                Base64Text::new(text.as_str().to_string()),
                Some(text.clone())
            );
            assert_eq!(text.decode(), Base64Bytes(bytes.clone()));
            let json = serde_json::to_string(&Base64Bytes(bytes)).unwrap();
            assert_eq!(serde_json::to_string(&text).unwrap(), json);
            assert_eq!(serde_json::from_str::<Base64Text>(&json).unwrap(), text);
        }
        for bad in ["\"aGk\"", "\"aGl=\"", "\"aG k=\"", "\"-_==\"", "\"====\""] {
            let want = serde_json::from_str::<Base64Bytes>(bad)
                .unwrap_err()
                .to_string();
            let got = serde_json::from_str::<Base64Text>(bad)
                .unwrap_err()
                .to_string();
            assert_eq!(got, want, "{bad}");
        }
    }
}
