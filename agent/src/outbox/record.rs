//! On-disk encoding of one outbox record (versioned, so old stores stay readable).
//!
//! `version u8 (1) | created_ms u64 | expires_ms u64 (0 = never) | topic_len u16 | topic | body`

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub topic: String,
    /// JSON body; the uplink wraps it in the wire envelope when sending.
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record truncated")]
    Truncated,
    #[error("unknown record version {0}")]
    Version(u8),
    #[error("topic is not utf-8")]
    Topic,
}

const VERSION: u8 = 1;
const HEADER: usize = 1 + 8 + 8 + 2;

impl Record {
    pub fn charge(&self) -> u64 {
        super::accounting::charge(self.topic.len(), self.body.len())
    }

    pub fn encode(&self) -> Vec<u8> {
        let topic = &self.topic.as_bytes()[..self.topic.len().min(u16::MAX as usize)];
        let mut out = Vec::with_capacity(HEADER + topic.len() + self.body.len());
        out.push(VERSION);
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        out.extend_from_slice(topic);
        out.extend_from_slice(&self.body);
        out
    }

    pub fn decode(b: &[u8]) -> Result<Record, RecordError> {
        if b.len() < HEADER {
            return Err(RecordError::Truncated);
        }
        if b[0] != VERSION {
            return Err(RecordError::Version(b[0]));
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(a)
        };
        let created_ms = u64_at(1);
        let expires = u64_at(9);
        let topic_len = u16::from_be_bytes([b[17], b[18]]) as usize;
        let rest = &b[HEADER..];
        if rest.len() < topic_len {
            return Err(RecordError::Truncated);
        }
        let topic = std::str::from_utf8(&rest[..topic_len])
            .map_err(|_| RecordError::Topic)?
            .to_owned();
        Ok(Record {
            created_ms,
            expires_ms: (expires != 0).then_some(expires),
            topic,
            body: rest[topic_len..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_truncation() {
        let r = Record {
            created_ms: 5,
            expires_ms: Some(9),
            topic: "edge/v1/d/data/x".into(),
            body: b"{}".to_vec(),
        };
        let enc = r.encode();
        assert_eq!(Record::decode(&enc).expect("decodes"), r);
        for n in 0..HEADER + r.topic.len() {
            assert!(Record::decode(&enc[..n]).is_err(), "prefix {n}");
        }
        let never = Record {
            expires_ms: None,
            ..r
        };
        assert_eq!(
            Record::decode(&never.encode()).expect("decodes").expires_ms,
            None
        );
    }
}
