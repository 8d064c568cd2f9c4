//! Compact binary envelope for bulk payloads (model updates, artifact chunks).
//!
//! Layout, all integers big-endian:
//! ```text
//! magic "EB" | version u8 | class u8 | seq u64 | created_ms u64
//! | id_len u8 | id | device_len u8 | device | kind_len u8 | kind | body_len u32 | body
//! ```
//! A JSON envelope always starts with `{`, so the first byte tells the two apart.

use super::{Class, Error, MAX_PAYLOAD_BYTES, VERSION, validate_device_id, validate_message_id};

pub const MAGIC: &[u8; 2] = b"EB";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryEnvelope {
    pub id: String,
    pub device: String,
    pub class: Class,
    pub seq: u64,
    pub created_ms: u64,
    /// What the body is (e.g. `fl-update`, `chunk`); at most 255 bytes.
    pub kind: String,
    pub body: Vec<u8>,
}

/// True if `payload` looks like a binary envelope rather than JSON.
pub fn is_binary(payload: &[u8]) -> bool {
    payload.starts_with(MAGIC)
}

impl BinaryEnvelope {
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let too_long = |s: &str| s.len() > u8::MAX as usize;
        if too_long(&self.id) || too_long(&self.device) || too_long(&self.kind) {
            return Err(Error::Binary("id, device or kind longer than 255 bytes"));
        }
        let mut out = Vec::with_capacity(32 + self.id.len() + self.device.len() + self.body.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(self.class.index() as u8);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        for s in [&self.id, &self.device, &self.kind] {
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
        let len = u32::try_from(self.body.len()).map_err(|_| Error::Binary("body over 4 GiB"))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.body);
        if out.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::TooLarge {
                size: out.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        Ok(out)
    }

    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::TooLarge {
                size: payload.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        let mut r = Reader(payload);
        if r.take(2)? != MAGIC {
            return Err(Error::Binary("bad magic"));
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(Error::Version(version));
        }
        let class = Class::from_index(r.u8()?).ok_or(Error::Binary("unknown class"))?;
        let seq = r.u64()?;
        let created_ms = r.u64()?;
        let id = r.short_str()?;
        let device = r.short_str()?;
        let kind = r.short_str()?;
        let len = r.u32()? as usize;
        let body = r.take(len)?.to_vec();
        if !r.0.is_empty() {
            return Err(Error::Binary("trailing bytes"));
        }
        validate_message_id(&id)?;
        validate_device_id(&device)?;
        Ok(BinaryEnvelope {
            id,
            device,
            class,
            seq,
            created_ms,
            kind,
            body,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.0.len() < n {
            return Err(Error::Binary("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, Error> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
    fn short_str(&mut self) -> Result<String, Error> {
        let n = self.u8()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| Error::Binary("string is not utf-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BinaryEnvelope {
        BinaryEnvelope {
            id: "00000000000000010000000000000002".into(),
            device: "d1".into(),
            class: Class::Model,
            seq: 2,
            created_ms: 99,
            kind: "fl-update".into(),
            body: (0..=255u8).collect(),
        }
    }

    #[test]
    fn roundtrip() {
        let bytes = sample().encode().expect("encodes");
        assert!(is_binary(&bytes));
        assert_eq!(BinaryEnvelope::decode(&bytes).expect("decodes"), sample());
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let bytes = sample().encode().expect("encodes");
        for n in 0..bytes.len() {
            assert!(BinaryEnvelope::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(BinaryEnvelope::decode(&extra).is_err());
        // Flip every byte of the header once; decode must never panic.
        for i in 0..40.min(bytes.len()) {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = BinaryEnvelope::decode(&b);
        }
    }
}
