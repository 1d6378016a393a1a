//! Wire encodings of keys, signatures and binary blobs.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ed25519 public key, 32 bytes, written on the wire as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHex(pub [u8; 32]);

impl KeyHex {
    /// Parses 64 hex digits (either case).
    pub fn parse(s: &str) -> Result<KeyHex, String> {
        let bytes = hex::decode(s).map_err(|e| format!("key is not hex: {e}"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("key must be 32 bytes, got {}", b.len()))?;
        Ok(KeyHex(arr))
    }

    /// Lowercase hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for KeyHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyHex({})", self.to_hex())
    }
}

impl std::fmt::Display for KeyHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for KeyHex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
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
