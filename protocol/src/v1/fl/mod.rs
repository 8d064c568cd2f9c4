//! Federated learning on the wire: signed round orders that carry the global weights, and the
//! devices' compressed updates.
//!
//! ```text
//! coordinator                                               agent
//!   RoundMessage (binary, signed, retained) --fl/round-->   verify, apply weights to the model,
//!                                                           train if ordered, encode the delta
//!               <--fl/update--  BinaryEnvelope{kind fl-update, body = Update} via the outbox
//! ```
//!
//! Round messages are signed with the same ed25519 keys as deployments: new weights change what
//! a device's inference stage answers, so they need the same trust as new code. Updates are not
//! signed (the broker's authentication names the device); the coordinator validates every one
//! against the round it claims (task, round, length, finite values) before it counts.

pub mod chunks;
pub mod codec;

use ed25519_dalek::{Signature, Signer};
use serde::{Deserialize, Serialize};

use super::deploy::{SigningKey, TrustedKeys, key_id};
use super::{MAX_PAYLOAD_BYTES, validate_message_id};
pub use chunks::{FetchRequest, UpdatePart, WeightChunk, WeightsBlob};
pub use codec::{Codec, CodecError};

/// Binary envelope `kind` of an update.
pub const UPDATE_KIND: &str = "fl-update";

const ROUND_MAGIC: &[u8; 2] = b"FR";
const UPDATE_MAGIC: &[u8; 2] = b"FU";
const FORMAT: u8 = 1;

/// Errors from encoding, verifying and decoding federated-learning messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlError {
    #[error("malformed round message: {0}")]
    Round(String),
    #[error("round message is signed by unknown key {key_id}")]
    UnknownKey { key_id: String },
    #[error("bad signature on round message by key {key_id}")]
    BadSignature { key_id: String },
    #[error("malformed update: {0}")]
    Update(String),
    #[error("weight chunk: {0}")]
    Chunk(String),
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
}

/// One named weight tensor of the model (an ONNX initializer), row-major.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<u32>,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().map(|&d| d as usize).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Total number of weights in `params`.
pub fn weight_count(params: &[ParamSpec]) -> usize {
    params.iter().map(ParamSpec::len).sum()
}

/// Hyperparameters and deadline of one round's local training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainOrder {
    /// Wall-clock deadline (ms since the Unix epoch) after which the update is late (see the
    /// coordinator's late-update rule); the device still sends it.
    pub deadline_ms: u64,
    pub epochs: u32,
    pub lr: f32,
    pub batch_size: u32,
    /// FedProx proximal term (0 = FedAvg's plain local SGD).
    pub mu: f32,
    pub codec: Codec,
    /// Seed for shuffling and stochastic rounding (the coordinator derives one per device
    /// and round, so a run can be replayed).
    pub seed: u64,
    /// Train on at most this many of the newest samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_samples: Option<u32>,
}

impl TrainOrder {
    /// The hyperparameters a trainer module takes (the JSON object of the `trainer` world's
    /// `train` call, `modules/wit/trainer.wit`).
    pub fn trainer_params(&self) -> String {
        serde_json::json!({
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "mu": self.mu,
            "seed": self.seed,
        })
        .to_string()
    }
}

/// The signed JSON header of a round message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundHeader {
    /// Task id (message-id charset).
    pub task: String,
    /// The device this message is for: a device refuses one addressed to another (a copy
    /// moved to its topic).
    pub device: String,
    /// Round number, from 1. The weights are the global model *before* this round.
    pub round: u32,
    /// Version of the global weights carried (0 = the task's initial model; +1 per
    /// aggregation).
    pub version: u32,
    /// Name of the model the weights patch (as the device's pipeline names it, e.g.
    /// `models/digits.onnx`).
    pub model: String,
    /// The weight tensors, in the order their values follow the header.
    pub params: Vec<ParamSpec>,
    pub issued_ms: u64,
    /// Present when this device is selected to train in this round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainOrder>,
    /// The task has ended: apply these final weights and drop the task's local state.
    #[serde(default)]
    pub done: bool,
    /// When the task trains only the model's last layers: [`frozen_digest`] of the layers in
    /// front, as the task's initial model has them. A device whose model differs there would
    /// train the head on other features than the coordinator evaluates, so it refuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<String>,
    /// Present when the weights are too many for the message ([`chunks::MAX_INLINE_WEIGHTS`]):
    /// the message carries none, and the device fetches them in chunks this describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<WeightsBlob>,
}

/// SHA-256 (hex) over the frozen tensors' values in order, each as its length (u64 LE) and
/// its f32s (LE): what a round names in [`RoundHeader::frozen`].
pub fn frozen_digest<'a>(tensors: impl IntoIterator<Item = &'a [f32]>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for t in tensors {
        h.update((t.len() as u64).to_le_bytes());
        for v in t {
            h.update(v.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

impl RoundHeader {
    fn validate(&self) -> Result<(), FlError> {
        let bad = |m: String| Err(FlError::Round(m));
        if validate_message_id(&self.task).is_err() {
            return bad(format!("invalid task id {:?}", self.task));
        }
        if self.model.is_empty() || self.model.len() > 255 {
            return bad("model name must be 1-255 bytes".into());
        }
        if self.params.is_empty() {
            return bad("no params".into());
        }
        for p in &self.params {
            if p.name.is_empty() || p.shape.is_empty() || p.is_empty() {
                return bad(format!("param {:?} has an empty name or shape", p.name));
            }
        }
        if let Some(blob) = &self.blob {
            blob.validate(weight_count(&self.params))?;
        }
        if let Some(t) = &self.train {
            if t.epochs == 0 || t.batch_size == 0 || !(t.lr.is_finite() && t.lr > 0.0) {
                return bad("train order needs epochs >= 1, batch_size >= 1 and lr > 0".into());
            }
            if !(t.mu.is_finite() && t.mu >= 0.0) {
                return bad(format!("invalid mu {}", t.mu));
            }
        }
        Ok(())
    }
}

/// A verified round message.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundMessage {
    pub header: RoundHeader,
    /// All weights, `params` concatenated in order. Empty as decoded when the header names a
    /// blob: the device fills them from the fetched chunks.
    pub weights: Vec<f32>,
}

impl RoundMessage {
    /// The weights split per param, in header order.
    pub fn tensors(&self) -> Vec<(&ParamSpec, &[f32])> {
        let mut out = Vec::with_capacity(self.header.params.len());
        let mut at = 0;
        for p in &self.header.params {
            out.push((p, &self.weights[at..at + p.len()]));
            at += p.len();
        }
        out
    }
}

/// Serialises and signs a round message:
/// `"FR" | format u8 | key_id_len u8 | key_id | header_len u32 | header JSON | n u32 | n x f32
/// | ed25519 signature (64) over everything before it` (integers little-endian). With a
/// [`RoundHeader::blob`], `weights` must be empty (n = 0): they travel in chunks.
pub fn encode_round(
    header: &RoundHeader,
    weights: &[f32],
    key: &SigningKey,
) -> Result<Vec<u8>, FlError> {
    header.validate()?;
    if header.blob.is_some() {
        if !weights.is_empty() {
            return Err(FlError::Round(
                "a round message with a blob carries no weights".into(),
            ));
        }
    } else if weight_count(&header.params) != weights.len() {
        return Err(FlError::Round(format!(
            "params declare {} weights, {} given",
            weight_count(&header.params),
            weights.len()
        )));
    }
    if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
        return Err(FlError::Round(format!("non-finite global weight at {i}")));
    }
    let json = serde_json::to_vec(header).map_err(|e| FlError::Round(e.to_string()))?;
    let kid = key_id(&key.verifying_key());
    let mut out = Vec::with_capacity(16 + kid.len() + json.len() + weights.len() * 4 + 64);
    out.extend_from_slice(ROUND_MAGIC);
    out.push(FORMAT);
    out.push(kid.len() as u8);
    out.extend_from_slice(kid.as_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&(weights.len() as u32).to_le_bytes());
    for w in weights {
        out.extend_from_slice(&w.to_le_bytes());
    }
    let sig = key.sign(&out);
    out.extend_from_slice(&sig.to_bytes());
    if out.len() > MAX_PAYLOAD_BYTES {
        return Err(FlError::TooLarge {
            what: "round message",
            size: out.len(),
            limit: MAX_PAYLOAD_BYTES,
        });
    }
    Ok(out)
}

struct Cursor<'a> {
    buf: &'a [u8],
    err: fn(String) -> FlError,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FlError> {
        if self.buf.len() < n {
            return Err((self.err)(format!("truncated at {what}")));
        }
        let (h, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(h)
    }

    fn u8(&mut self, what: &str) -> Result<u8, FlError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, FlError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn f32(&mut self, what: &str) -> Result<f32, FlError> {
        Ok(f32::from_bits(self.u32(what)?))
    }

    fn str(&mut self, len: usize, what: &str) -> Result<&'a str, FlError> {
        std::str::from_utf8(self.take(len, what)?)
            .map_err(|_| (self.err)(format!("{what} is not utf-8")))
    }
}

/// The start every binary FL body shares (updates, update parts, weight chunks):
/// `magic (2) | format u8 | task_len u8 | task`.
fn begin(magic: &[u8; 2], task: &str, capacity: usize) -> Vec<u8> {
    let task = &task.as_bytes()[..task.len().min(255)];
    let mut out = Vec::with_capacity(4 + task.len() + capacity);
    out.extend_from_slice(magic);
    out.push(FORMAT);
    out.push(task.len() as u8);
    out.extend_from_slice(task);
    out
}

/// Reads what [`begin`] wrote: a cursor after it and the task id (checked), or `err` naming
/// what is wrong (`what` is the format's name, e.g. "an update").
fn open<'a>(
    body: &'a [u8],
    magic: &[u8; 2],
    what: &str,
    err: fn(String) -> FlError,
) -> Result<(Cursor<'a>, String), FlError> {
    if !body.starts_with(magic) {
        return Err(err(format!("not {what}")));
    }
    let mut c = Cursor {
        buf: &body[2..],
        err,
    };
    if c.u8("format")? != FORMAT {
        return Err(err("unsupported format".into()));
    }
    let tlen = c.u8("task length")? as usize;
    let task = c.str(tlen, "task")?.to_owned();
    if validate_message_id(&task).is_err() {
        return Err(err(format!("invalid task id {task:?}")));
    }
    Ok((c, task))
}

/// Verifies a round message's signature against `trusted`, then its structure (the header's
/// params must account for exactly the weights carried, all finite).
pub fn decode_round(payload: &[u8], trusted: &TrustedKeys) -> Result<RoundMessage, FlError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(FlError::TooLarge {
            what: "round message",
            size: payload.len(),
            limit: MAX_PAYLOAD_BYTES,
        });
    }
    let err = FlError::Round;
    if payload.len() < 4 + 64 || &payload[..2] != ROUND_MAGIC {
        return Err(err("not a round message".into()));
    }
    let (signed, sig) = payload.split_at(payload.len() - 64);
    let mut c = Cursor {
        buf: &signed[2..],
        err,
    };
    if c.u8("format")? != FORMAT {
        return Err(err("unsupported format".into()));
    }
    let kid_len = c.u8("key id length")? as usize;
    let kid = c.str(kid_len, "key id")?.to_owned();
    let key = trusted.get(&kid).ok_or_else(|| FlError::UnknownKey {
        key_id: kid.clone(),
    })?;
    let sig = Signature::from_bytes(sig.try_into().map_err(|_| err("signature".into()))?);
    key.verify_strict(signed, &sig)
        .map_err(|_| FlError::BadSignature {
            key_id: kid.clone(),
        })?;
    let hlen = c.u32("header length")? as usize;
    let header: RoundHeader =
        serde_json::from_slice(c.take(hlen, "header")?).map_err(|e| err(format!("header: {e}")))?;
    header.validate()?;
    let n = c.u32("weight count")? as usize;
    let inline = if header.blob.is_some() {
        0
    } else {
        weight_count(&header.params)
    };
    if n != inline {
        return Err(err(format!(
            "the message carries {n} weights, expected {inline} (params declare {}{})",
            weight_count(&header.params),
            if header.blob.is_some() {
                ", in chunks"
            } else {
                ""
            }
        )));
    }
    let bytes = c.take(n * 4, "weights")?;
    if !c.buf.is_empty() {
        return Err(err(format!("{} bytes after the weights", c.buf.len())));
    }
    let weights: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
        return Err(err(format!("non-finite weight at {i}")));
    }
    Ok(RoundMessage { header, weights })
}

/// A device's update for one round, the body of a binary envelope of kind [`UPDATE_KIND`].
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub task: String,
    pub round: u32,
    /// Global version the device trained from.
    pub base_version: u32,
    /// Samples the local training used (FedAvg's weight).
    pub samples: u32,
    /// Mean training loss and accuracy of the last local epoch.
    pub loss: f32,
    pub accuracy: f32,
    pub train_ms: u32,
    /// The weight delta (new local - global), encoded by [`codec::encode`].
    pub payload: Vec<u8>,
}

impl Update {
    /// `"FU" | format u8 | task_len u8 | task | round u32 | base_version u32 | samples u32 |
    /// loss f32 | accuracy f32 | train_ms u32 | payload` (little-endian; 24 bytes + task id).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = begin(UPDATE_MAGIC, &self.task, 24 + self.payload.len());
        for v in [self.round, self.base_version, self.samples] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.loss.to_le_bytes());
        out.extend_from_slice(&self.accuracy.to_le_bytes());
        out.extend_from_slice(&self.train_ms.to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// Decodes the header; the payload is checked later by [`codec::decode`] against the
    /// round's weight count.
    pub fn decode(body: &[u8]) -> Result<Update, FlError> {
        let err = FlError::Update;
        if body.len() > chunks::MAX_UPDATE_BYTES {
            return Err(FlError::TooLarge {
                what: "update",
                size: body.len(),
                limit: chunks::MAX_UPDATE_BYTES,
            });
        }
        let (mut c, task) = open(body, UPDATE_MAGIC, "an update", err)?;
        let round = c.u32("round")?;
        let base_version = c.u32("base version")?;
        let samples = c.u32("samples")?;
        let loss = c.f32("loss")?;
        let accuracy = c.f32("accuracy")?;
        let train_ms = c.u32("train_ms")?;
        if samples == 0 {
            return Err(err("update trained on 0 samples".into()));
        }
        Ok(Update {
            task,
            round,
            base_version,
            samples,
            loss,
            accuracy,
            train_ms,
            payload: c.buf.to_vec(),
        })
    }
}

/// Binary envelope `kind` of a failure report: the device was selected but could not train.
pub const FAILURE_KIND: &str = "fl-failure";

/// Longest failure reason carried, in bytes (a longer one is cut at a char boundary).
pub const MAX_FAILURE_REASON: usize = 1024;

/// What a failed training step was up against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The model cannot be trained as given (unsupported layers, shapes the trainer refuses).
    Model,
    /// The device's data: no labeled samples, features that do not fit, labels out of range.
    Data,
    /// The sandbox ran out of memory, or the update could not be stored.
    Resources,
    /// The trainer ran past its time budget.
    Timeout,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Model => "model",
            FailureKind::Data => "data",
            FailureKind::Resources => "resources",
            FailureKind::Timeout => "timeout",
        }
    }
}

/// A selected device's report that it could not train a round (JSON body of a binary
/// envelope of kind [`FAILURE_KIND`], on the same `fl/update` topic and sealed like an update).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainFailure {
    pub task: String,
    pub round: u32,
    /// Global version the device was to train from.
    pub base_version: u32,
    pub kind: FailureKind,
    /// The device-side reason, as its log says it.
    pub reason: String,
}

impl TrainFailure {
    pub fn encode(&self) -> Vec<u8> {
        let mut f = self.clone();
        if f.reason.len() > MAX_FAILURE_REASON {
            let mut end = MAX_FAILURE_REASON;
            while !f.reason.is_char_boundary(end) {
                end -= 1;
            }
            f.reason.truncate(end);
        }
        serde_json::to_vec(&f).unwrap_or_default()
    }

    pub fn decode(body: &[u8]) -> Result<TrainFailure, FlError> {
        let f: TrainFailure =
            serde_json::from_slice(body).map_err(|e| FlError::Update(e.to_string()))?;
        if validate_message_id(&f.task).is_err() || f.round == 0 {
            return Err(FlError::Update(format!(
                "failure report for task {:?} round {}",
                f.task, f.round
            )));
        }
        if f.reason.len() > MAX_FAILURE_REASON {
            return Err(FlError::TooLarge {
                what: "failure reason",
                size: f.reason.len(),
                limit: MAX_FAILURE_REASON,
            });
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn header() -> RoundHeader {
        RoundHeader {
            task: "digits".into(),
            device: "pi-1".into(),
            round: 3,
            version: 2,
            model: "models/digits.onnx".into(),
            params: vec![
                ParamSpec {
                    name: "fc1.weight".into(),
                    shape: vec![3, 2],
                },
                ParamSpec {
                    name: "fc1.bias".into(),
                    shape: vec![2],
                },
            ],
            issued_ms: 1,
            train: Some(TrainOrder {
                deadline_ms: 10,
                epochs: 1,
                lr: 0.1,
                batch_size: 8,
                mu: 0.0,
                codec: Codec::TopK { fraction: 0.1 },
                seed: 4,
                max_samples: None,
            }),
            done: false,
            frozen: Some(frozen_digest([[1.0f32, 2.0].as_slice()])),
            blob: None,
        }
    }

    #[test]
    fn round_messages_verify_and_split() {
        let k = key(1);
        let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let bytes = encode_round(&header(), &w, &k).expect("ok");
        let trusted = TrustedKeys::new([k.verifying_key()]);
        let m = decode_round(&bytes, &trusted).expect("ok");
        assert_eq!(m.header, header());
        assert_eq!(m.weights, w);
        let t = m.tensors();
        assert_eq!(t[1].1, &[6.0, 7.0]);
    }

    #[test]
    fn round_messages_with_a_blob_carry_no_weights() {
        let k = key(1);
        let trusted = TrustedKeys::new([k.verifying_key()]);
        let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let mut h = header();
        h.blob = Some(WeightsBlob::of(&w));
        assert!(encode_round(&h, &w, &k).is_err(), "weights beside a blob");
        let bytes = encode_round(&h, &[], &k).expect("encodes");
        let m = decode_round(&bytes, &trusted).expect("decodes");
        assert!(m.weights.is_empty());
        assert_eq!(m.header.blob, h.blob);
        // A blob that does not fit the params is refused before anything else is read.
        let mut wrong = h.clone();
        wrong.blob = Some(WeightsBlob::of(&vec![0.0; 40_000]));
        assert!(encode_round(&wrong, &[], &k).is_err());
    }

    #[test]
    fn forged_or_broken_round_messages_are_refused() {
        let k = key(1);
        let w = vec![0.5f32; 8];
        let bytes = encode_round(&header(), &w, &k).expect("ok");
        let trusted = TrustedKeys::new([k.verifying_key()]);
        let other = TrustedKeys::new([key(2).verifying_key()]);
        assert!(matches!(
            decode_round(&bytes, &other),
            Err(FlError::UnknownKey { .. })
        ));
        let mut tampered = bytes.clone();
        let at = tampered.len() - 70;
        tampered[at] ^= 1;
        assert!(matches!(
            decode_round(&tampered, &trusted),
            Err(FlError::BadSignature { .. })
        ));
        assert!(matches!(
            decode_round(&bytes[..40], &trusted),
            Err(FlError::Round(_) | FlError::BadSignature { .. })
        ));
        assert!(decode_round(b"{}", &trusted).is_err());
        assert!(encode_round(&header(), &[0.0; 7], &k).is_err());
        let mut nan = w.clone();
        nan[2] = f32::NAN;
        assert!(encode_round(&header(), &nan, &k).is_err());
    }

    #[test]
    fn updates_round_trip_and_refuse_garbage() {
        let u = Update {
            task: "digits".into(),
            round: 3,
            base_version: 2,
            samples: 120,
            loss: 0.5,
            accuracy: 0.9,
            train_ms: 40,
            payload: codec::encode(Codec::Fp16, &[0.1, 0.2], None, 0),
        };
        let bytes = u.encode();
        assert_eq!(Update::decode(&bytes).expect("ok"), u);
        assert!(Update::decode(&bytes[..10]).is_err());
        assert!(Update::decode(b"XX").is_err());
        let mut zero = u.clone();
        zero.samples = 0;
        assert!(Update::decode(&zero.encode()).is_err());
    }
}

#[cfg(test)]
mod failure_tests {
    use super::*;

    #[test]
    fn failure_reports_round_trip_cut_long_reasons_and_refuse_bad_ones() {
        let f = TrainFailure {
            task: "digits".into(),
            round: 3,
            base_version: 2,
            kind: FailureKind::Data,
            reason: "sample 17: label 12 is outside 0..10".into(),
        };
        let body = f.encode();
        assert_eq!(TrainFailure::decode(&body), Ok(f.clone()));
        let text = String::from_utf8(body).expect("json");
        assert!(text.contains("\"kind\":\"data\""), "{text}");
        // A long reason is cut on a char boundary, not refused.
        let long = TrainFailure {
            reason: "é".repeat(MAX_FAILURE_REASON),
            ..f.clone()
        };
        let back = TrainFailure::decode(&long.encode()).expect("decodes");
        assert!(back.reason.len() <= MAX_FAILURE_REASON && back.reason.starts_with('é'));
        for bad in [
            TrainFailure {
                round: 0,
                ..f.clone()
            },
            TrainFailure {
                task: "a b".into(),
                ..f.clone()
            },
        ] {
            let body = serde_json::to_vec(&bad).expect("json");
            assert!(TrainFailure::decode(&body).is_err(), "{bad:?}");
        }
        assert!(TrainFailure::decode(b"{\"task\":\"t\"}").is_err());
        assert!(
            TrainFailure::decode(
                br#"{"task":"t","round":1,"base_version":0,"kind":"disk","reason":""}"#
            )
            .is_err()
        );
    }
}
