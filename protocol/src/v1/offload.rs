//! Offload requests and responses (issue 7): a device asks the coordinator's inference service
//! to run one of its models, and replicas advertise what they can take.
//!
//! ```text
//! edge/v1/{device}/offload/request    Request (binary), device -> coordinator (shared by replicas)
//! edge/v1/{device}/offload/response   Response (binary), coordinator -> device, QoS 0
//! edge/v1/coordinator/offload/{replica}  retained Capacity (JSON)
//! ```
//!
//! Binary, little-endian, compact (tensors dominate the size):
//!
//! ```text
//! Request:  "OQ" format:u8 correlation:u64 deadline_ms:u64 model:(u8 len, utf8)
//!           count:u8 tensor*count
//! Response: "OR" format:u8 correlation:u64 status:u8 queue_ms:u32 compute_ms:u32
//!           queue_depth:u32 then status ok: count:u8 tensor*count, else error:(u16 len, utf8)
//! tensor:   name:(u8 len, utf8) dtype:u8 (ONNX TensorProto code) rank:u8 dims:u32*rank
//!           data_len:u32 data
//! ```
//!
//! The tensors are [`WireTensor`]s (`tensor.rs`), the one tensor type of the protocol.
//!
//! Decoding never panics, refuses payloads over [`MAX_PAYLOAD_BYTES`], trailing bytes and, for
//! the dtypes it knows, data whose length does not match the shape. Requests are
//! latency-critical and sent at QoS 0 both ways: a lost one is a timeout, after which the agent
//! runs the model locally, so nothing here is deduplicated or retried.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::MAX_PAYLOAD_BYTES;
use super::tensor::WireTensor;

/// First bytes of a [`Request`].
pub const REQUEST_MAGIC: [u8; 2] = *b"OQ";
/// First bytes of a [`Response`].
pub const RESPONSE_MAGIC: [u8; 2] = *b"OR";
/// The only format this version writes and reads.
pub const FORMAT: u8 = 1;
/// Most dimensions of one tensor.
pub const MAX_RANK: usize = 8;

/// Why an offload payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("offload payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("offload payload truncated in {what}")]
    Truncated { what: &'static str },
    #[error("offload payload does not start with {expected:?}")]
    Magic { expected: &'static str },
    #[error("unsupported offload format {0}")]
    Format(u8),
    #[error("offload {what} is not utf-8")]
    Utf8 { what: &'static str },
    #[error("offload {what} too long: {len} (most {max})")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("offload tensor {name:?}: rank {rank} exceeds {MAX_RANK}")]
    Rank { name: String, rank: usize },
    #[error("offload tensor {name:?}: data is {got} bytes, shape {shape:?} needs {expected}")]
    DataLength {
        name: String,
        shape: Vec<u32>,
        expected: usize,
        got: usize,
    },
    #[error("offload tensor {name:?}: shape {shape:?} is too large")]
    ShapeOverflow { name: String, shape: Vec<u32> },
    #[error("unknown offload status {0}")]
    Status(u8),
    #[error("offload payload has {0} trailing bytes")]
    Trailing(usize),
}

/// Device -> coordinator: run `model` on `inputs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the device; echoed in the response.
    pub correlation_id: u64,
    /// Absolute deadline, Unix epoch milliseconds; 0 = none. A request still queued at its
    /// deadline is answered `expired` without running.
    pub deadline_ms: u64,
    /// The model's name as the device knows it (its pipeline path, e.g. `models/digits.onnx`).
    pub model: String,
    pub inputs: Vec<WireTensor>,
}

impl Request {
    /// True when the request has a deadline and `now_ms` is at or past it.
    /// A link probe: no model; a replica answers `ok` at once, without compute. `pad_bytes`
    /// of zeros ride along (one u8 tensor) so the probe can be the size of a real request.
    pub fn probe(correlation_id: u64, deadline_ms: u64, pad_bytes: usize) -> Request {
        let inputs = if pad_bytes == 0 {
            Vec::new()
        } else {
            vec![WireTensor {
                name: "pad".into(),
                dtype: 2,
                shape: vec![u32::try_from(pad_bytes).unwrap_or(u32::MAX)],
                data: vec![0; pad_bytes],
            }]
        };
        Request {
            correlation_id,
            deadline_ms,
            model: String::new(),
            inputs,
        }
    }

    /// A probe names no model (its inputs are padding).
    pub fn is_probe(&self) -> bool {
        self.model.is_empty()
    }

    pub fn expired(&self, now_ms: u64) -> bool {
        self.deadline_ms != 0 && now_ms >= self.deadline_ms
    }

    pub fn encode(&self) -> Result<Vec<u8>, OffloadError> {
        let mut out =
            Vec::with_capacity(64 + self.inputs.iter().map(|t| t.data.len()).sum::<usize>());
        out.extend_from_slice(&REQUEST_MAGIC);
        out.push(FORMAT);
        out.extend_from_slice(&self.correlation_id.to_le_bytes());
        out.extend_from_slice(&self.deadline_ms.to_le_bytes());
        put_str8(&mut out, &self.model, "model name")?;
        put_tensors(&mut out, &self.inputs)?;
        check_size(out.len())?;
        Ok(out)
    }

    pub fn decode(payload: &[u8]) -> Result<Request, OffloadError> {
        check_size(payload.len())?;
        let mut r = Reader::new(payload);
        r.magic(REQUEST_MAGIC, "OQ")?;
        let correlation_id = r.u64("correlation id")?;
        let deadline_ms = r.u64("deadline")?;
        let model = r.str8("model name")?;
        let inputs = r.tensors()?;
        r.end()?;
        Ok(Request {
            correlation_id,
            deadline_ms,
            model,
            inputs,
        })
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Status {
    /// Ran; the response carries the outputs.
    Ok = 0,
    /// The model refused the inputs or failed; the message says why.
    Error = 1,
    /// The queue was full; run it locally or try later.
    Overloaded = 2,
    /// The deadline passed before compute started.
    Expired = 3,
    /// This replica does not serve the model.
    UnknownModel = 4,
}

impl Status {
    pub fn from_u8(v: u8) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::Error,
            2 => Status::Overloaded,
            3 => Status::Expired,
            4 => Status::UnknownModel,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
            Status::Overloaded => "overloaded",
            Status::Expired => "expired",
            Status::UnknownModel => "unknown_model",
        }
    }
}

/// Coordinator -> device: the answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub correlation_id: u64,
    pub status: Status,
    /// Time between receipt and the start of compute.
    pub queue_ms: u32,
    pub compute_ms: u32,
    /// Requests waiting for a worker when this answer was made.
    pub queue_depth: u32,
    /// The outputs; only with [`Status::Ok`] (otherwise not encoded).
    pub outputs: Vec<WireTensor>,
    /// Why it failed; only without [`Status::Ok`] (otherwise not encoded).
    pub error: String,
}

impl Response {
    /// A refusal or failure (`status` other than ok) with its reason.
    pub fn failed(correlation_id: u64, status: Status, error: impl Into<String>) -> Response {
        Response {
            correlation_id,
            status,
            queue_ms: 0,
            compute_ms: 0,
            queue_depth: 0,
            outputs: Vec::new(),
            error: error.into(),
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, OffloadError> {
        let mut out =
            Vec::with_capacity(64 + self.outputs.iter().map(|t| t.data.len()).sum::<usize>());
        out.extend_from_slice(&RESPONSE_MAGIC);
        out.push(FORMAT);
        out.extend_from_slice(&self.correlation_id.to_le_bytes());
        out.push(self.status as u8);
        out.extend_from_slice(&self.queue_ms.to_le_bytes());
        out.extend_from_slice(&self.compute_ms.to_le_bytes());
        out.extend_from_slice(&self.queue_depth.to_le_bytes());
        if self.status == Status::Ok {
            put_tensors(&mut out, &self.outputs)?;
        } else {
            let len = u16::try_from(self.error.len()).map_err(|_| OffloadError::TooLong {
                what: "error message",
                len: self.error.len(),
                max: u16::MAX as usize,
            })?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(self.error.as_bytes());
        }
        check_size(out.len())?;
        Ok(out)
    }

    pub fn decode(payload: &[u8]) -> Result<Response, OffloadError> {
        check_size(payload.len())?;
        let mut r = Reader::new(payload);
        r.magic(RESPONSE_MAGIC, "OR")?;
        let correlation_id = r.u64("correlation id")?;
        let raw = r.u8("status")?;
        let status = Status::from_u8(raw).ok_or(OffloadError::Status(raw))?;
        let queue_ms = r.u32("queue_ms")?;
        let compute_ms = r.u32("compute_ms")?;
        let queue_depth = r.u32("queue_depth")?;
        let (outputs, error) = if status == Status::Ok {
            (r.tensors()?, String::new())
        } else {
            let len = r.u16("error length")? as usize;
            (Vec::new(), r.utf8(len, "error message")?)
        };
        r.end()?;
        Ok(Response {
            correlation_id,
            status,
            queue_ms,
            compute_ms,
            queue_depth,
            outputs,
            error,
        })
    }
}

/// A replica's retained capacity advert (JSON), refreshed every advertise interval and
/// cleared (empty retained payload) when the replica stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    pub replica: String,
    /// Worker threads running models.
    pub workers: u32,
    /// Requests waiting for a worker now.
    pub queue_depth: u32,
    /// Most requests waiting before new ones are answered `overloaded`.
    pub max_queue: u32,
    /// Model names served (as devices name them).
    pub models: Vec<String>,
    /// Moving average of compute time per model, milliseconds (absent before its first run).
    pub ewma_compute_ms: BTreeMap<String, f64>,
    /// When the advert was made, Unix epoch milliseconds.
    pub ts_ms: u64,
}

impl Capacity {
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings, numbers and a string-keyed map always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(payload: &[u8]) -> Result<Capacity, super::Error> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(super::Error::TooLarge {
                size: payload.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        Ok(serde_json::from_slice(payload)?)
    }
}

fn check_size(size: usize) -> Result<(), OffloadError> {
    if size > MAX_PAYLOAD_BYTES {
        return Err(OffloadError::TooLarge {
            size,
            limit: MAX_PAYLOAD_BYTES,
        });
    }
    Ok(())
}

fn put_str8(out: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), OffloadError> {
    let len = u8::try_from(s.len()).map_err(|_| OffloadError::TooLong {
        what,
        len: s.len(),
        max: u8::MAX as usize,
    })?;
    out.push(len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_tensors(out: &mut Vec<u8>, tensors: &[WireTensor]) -> Result<(), OffloadError> {
    let count = u8::try_from(tensors.len()).map_err(|_| OffloadError::TooLong {
        what: "tensor list",
        len: tensors.len(),
        max: u8::MAX as usize,
    })?;
    out.push(count);
    for t in tensors {
        t.check()?;
        put_str8(out, &t.name, "tensor name")?;
        out.push(t.dtype);
        // check() bounds the rank by MAX_RANK.
        out.push(t.shape.len() as u8);
        for d in &t.shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
        check_size(t.data.len())?;
        out.extend_from_slice(&(t.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&t.data);
    }
    Ok(())
}

/// A bounds-checked cursor: every read names what it was reading when the bytes ran out.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], OffloadError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(OffloadError::Truncated { what })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, OffloadError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, OffloadError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, OffloadError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, OffloadError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }

    fn utf8(&mut self, len: usize, what: &'static str) -> Result<String, OffloadError> {
        let b = self.take(len, what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| OffloadError::Utf8 { what })
    }

    fn str8(&mut self, what: &'static str) -> Result<String, OffloadError> {
        let len = self.u8(what)? as usize;
        self.utf8(len, what)
    }

    fn magic(&mut self, magic: [u8; 2], expected: &'static str) -> Result<(), OffloadError> {
        if self.buf.len() < 2 || self.buf[..2] != magic {
            return Err(OffloadError::Magic { expected });
        }
        self.pos = 2;
        let format = self.u8("format")?;
        if format != FORMAT {
            return Err(OffloadError::Format(format));
        }
        Ok(())
    }

    fn tensors(&mut self) -> Result<Vec<WireTensor>, OffloadError> {
        let count = self.u8("tensor count")? as usize;
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let name = self.str8("tensor name")?;
            let dtype = self.u8("tensor dtype")?;
            let rank = self.u8("tensor rank")? as usize;
            if rank > MAX_RANK {
                return Err(OffloadError::Rank { name, rank });
            }
            let mut shape = Vec::with_capacity(rank);
            for _ in 0..rank {
                shape.push(self.u32("tensor dims")?);
            }
            let len = self.u32("tensor data length")? as usize;
            let data = self.take(len, "tensor data")?.to_vec();
            let t = WireTensor {
                name,
                dtype,
                shape,
                data,
            };
            t.check()?;
            out.push(t);
        }
        Ok(out)
    }

    fn end(&self) -> Result<(), OffloadError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(OffloadError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            correlation_id: 0x0102_0304_0506_0708,
            deadline_ms: 1_700_000_000_123,
            model: "models/digits.onnx".into(),
            inputs: vec![
                WireTensor::from_f32("x", vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
                WireTensor {
                    name: "mask".into(),
                    dtype: 9,
                    shape: vec![2],
                    data: vec![0, 1],
                },
            ],
        }
    }

    #[test]
    fn request_round_trips() {
        let r = request();
        let bytes = r.encode().expect("encodes");
        assert_eq!(&bytes[..2], b"OQ");
        assert_eq!(Request::decode(&bytes).expect("decodes"), r);
        assert!(r.expired(r.deadline_ms));
        assert!(!r.expired(r.deadline_ms - 1));
        let none = Request {
            deadline_ms: 0,
            ..r
        };
        assert!(!none.expired(u64::MAX));
    }

    #[test]
    fn responses_round_trip() {
        let ok = Response {
            correlation_id: 7,
            status: Status::Ok,
            queue_ms: 3,
            compute_ms: 11,
            queue_depth: 2,
            outputs: vec![WireTensor::from_f32("y", vec![1, 2], &[0.5, -1.5])],
            error: String::new(),
        };
        let bytes = ok.encode().expect("encodes");
        let back = Response::decode(&bytes).expect("decodes");
        assert_eq!(back, ok);
        assert_eq!(back.outputs[0].to_f32(), Some(vec![0.5, -1.5]));
        for status in [
            Status::Error,
            Status::Overloaded,
            Status::Expired,
            Status::UnknownModel,
        ] {
            let r = Response::failed(9, status, "why ü");
            assert_eq!(
                Response::decode(&r.encode().expect("encodes")).expect("decodes"),
                r
            );
        }
    }

    #[test]
    fn every_truncation_is_refused_by_name() {
        let bytes = request().encode().expect("encodes");
        for n in 0..bytes.len() {
            let err = Request::decode(&bytes[..n]).expect_err("truncated refused");
            assert!(
                matches!(
                    err,
                    OffloadError::Truncated { .. } | OffloadError::Magic { .. }
                ),
                "{n}: {err}"
            );
        }
        let resp = Response::failed(1, Status::Error, "bad")
            .encode()
            .expect("encodes");
        for n in 0..resp.len() {
            assert!(Response::decode(&resp[..n]).is_err(), "{n}");
        }
    }

    #[test]
    fn garbage_and_oversize_are_refused() {
        assert!(matches!(
            Request::decode(b"hello world"),
            Err(OffloadError::Magic { .. })
        ));
        assert!(matches!(
            Request::decode(&vec![0u8; MAX_PAYLOAD_BYTES + 1]),
            Err(OffloadError::TooLarge { .. })
        ));
        let mut bytes = request().encode().expect("encodes");
        bytes[2] = 9;
        assert_eq!(Request::decode(&bytes), Err(OffloadError::Format(9)));
        let mut bytes = request().encode().expect("encodes");
        bytes.push(0);
        assert_eq!(Request::decode(&bytes), Err(OffloadError::Trailing(1)));
        // A response is not a request.
        let resp = Response::failed(1, Status::Error, "x")
            .encode()
            .expect("encodes");
        assert!(matches!(
            Request::decode(&resp),
            Err(OffloadError::Magic { expected: "OQ" })
        ));
        let mut resp = resp;
        resp[11] = 200;
        assert_eq!(Response::decode(&resp), Err(OffloadError::Status(200)));
        // Deterministic pseudo-random bytes after a valid header never panic.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut b = b"OQ\x01".to_vec();
            for _ in 0..(seed % 96) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                b.push(seed as u8);
            }
            let _ = Request::decode(&b);
        }
        let big = Request {
            inputs: vec![WireTensor {
                name: "x".into(),
                dtype: 2,
                shape: vec![MAX_PAYLOAD_BYTES as u32],
                data: vec![0; MAX_PAYLOAD_BYTES],
            }],
            ..request()
        };
        assert!(matches!(big.encode(), Err(OffloadError::TooLarge { .. })));
    }

    #[test]
    fn data_length_mismatch_is_refused() {
        let mut r = request();
        r.inputs[0].data.pop();
        assert!(matches!(r.encode(), Err(OffloadError::DataLength { .. })));
        // Also on decode: patch the encoded shape of a valid request.
        let good = request().encode().expect("encodes");
        let mut bad = good.clone();
        // Header 3 + ids 16 + model 1+18 + count 1 + name 1+1 + dtype 1 + rank 1 = first dim.
        let dim = 3 + 16 + 19 + 1 + 2 + 2;
        assert_eq!(
            u32::from_le_bytes(bad[dim..dim + 4].try_into().expect("4")),
            2
        );
        bad[dim] = 3;
        match Request::decode(&bad) {
            Err(OffloadError::DataLength {
                name,
                expected,
                got,
                ..
            }) => {
                assert_eq!((name.as_str(), expected, got), ("x", 36, 24));
            }
            other => panic!("{other:?}"),
        }
        // Unknown dtype codes are passed through unchecked.
        let odd = WireTensor {
            name: "s".into(),
            dtype: 8,
            shape: vec![3],
            data: vec![1, 2],
        };
        assert_eq!(odd.check(), Ok(()));
    }

    #[test]
    fn capacity_round_trips() {
        let c = Capacity {
            replica: "r1".into(),
            workers: 2,
            queue_depth: 0,
            max_queue: 64,
            models: vec!["models/digits.onnx".into()],
            ewma_compute_ms: [("models/digits.onnx".to_owned(), 0.25)].into(),
            ts_ms: 5,
        };
        assert_eq!(Capacity::from_json(&c.to_json()).expect("parses"), c);
        assert!(Capacity::from_json(b"{}").is_err());
    }
}
