//! Models bigger than one MQTT message: the global weights of a round travel as a *blob*
//! the signed round header describes (SHA-256 of the whole and of every chunk), pulled by each
//! device in windows; an update bigger than one message travels as *parts* through the
//! device's outbox and is put together by the coordinator before it is admitted.
//!
//! ```text
//! coordinator                                                agent
//!   RoundMessage{header.blob = digests, no weights} --fl/round-->  admit; chunks it lacks?
//!               <--fl/update-- BinaryEnvelope kind fl-fetch {task, version, indexes}
//!   WeightChunk (binary, not signed) --fl/chunk-->            check against the header's
//!                                                             digest, keep (sled), repeat
//!               <--fl/update-- BinaryEnvelope kind fl-part (UpdatePart) x N, via the outbox
//! ```
//!
//! A chunk needs no signature of its own: the signed header names its SHA-256, so a forged or
//! damaged one is dropped and asked for again. Parts carry the SHA-256 of the whole update;
//! the coordinator admits the assembled update only if it matches (the MAC of each envelope
//! already names the device).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{FlError, begin, open};
use crate::v1::validate_message_id;

/// Binary envelope `kind` of a device's request for weight chunks (JSON [`FetchRequest`]).
pub const FETCH_KIND: &str = "fl-fetch";
/// Binary envelope `kind` of one part of an update too big for one message ([`UpdatePart`]).
pub const PART_KIND: &str = "fl-part";

/// Weights up to this many travel inside the round message (64 KiB of f32, leaving room for
/// the header under the 96 KiB payload limit); more travel as a blob.
pub const MAX_INLINE_WEIGHTS: usize = 16 * 1024;
/// The most weights a task may have: 32 MiB of f32, 512 chunks, whose digests keep the
/// round header near 35 KiB.
pub const MAX_WEIGHTS: usize = 8 * 1024 * 1024;
/// Bytes of weights per chunk (a multiple of 4: a chunk holds whole f32s).
pub const CHUNK_BYTES: u32 = 64 * 1024;
/// Chunk indexes one fetch request may name.
pub const MAX_FETCH_INDEXES: usize = 64;
/// Bytes of update per part.
pub const PART_BYTES: usize = 60 * 1024;
/// The largest update the coordinator puts together from parts (an f32 delta of
/// [`MAX_WEIGHTS`] plus its header).
pub const MAX_UPDATE_BYTES: usize = MAX_WEIGHTS * 4 + 4096;

const CHUNK_MAGIC: &[u8; 2] = b"FC";
const PART_MAGIC: &[u8; 2] = b"FP";

/// How a round's weights travel when they do not fit in the round message: the little-endian
/// f32 bytes of every param in header order, cut into `chunk_size` chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsBlob {
    /// SHA-256 (hex) of all the bytes.
    pub sha256: String,
    pub chunk_size: u32,
    /// SHA-256 (hex) of each chunk, in order.
    pub chunks: Vec<String>,
}

impl WeightsBlob {
    /// Describes `weights` (hashing each chunk once; no copy of the weights is made).
    pub fn of(weights: &[f32]) -> WeightsBlob {
        let per = CHUNK_BYTES as usize / 4;
        let mut whole = Sha256::new();
        let chunks = weights
            .chunks(per)
            .map(|c| {
                let mut h = Sha256::new();
                for v in c {
                    let b = v.to_le_bytes();
                    h.update(b);
                    whole.update(b);
                }
                hex::encode(h.finalize())
            })
            .collect();
        WeightsBlob {
            sha256: hex::encode(whole.finalize()),
            chunk_size: CHUNK_BYTES,
            chunks,
        }
    }

    /// Checks the blob's shape against the weight count the header's params declare.
    pub(super) fn validate(&self, weights: usize) -> Result<(), FlError> {
        let bad = |m: String| Err(FlError::Round(m));
        if weights > MAX_WEIGHTS {
            return bad(format!(
                "{weights} weights, over the limit of {MAX_WEIGHTS}"
            ));
        }
        if self.chunk_size == 0
            || !self.chunk_size.is_multiple_of(4)
            || self.chunk_size > CHUNK_BYTES
        {
            return bad(format!("invalid chunk size {}", self.chunk_size));
        }
        let want = (weights * 4).div_ceil(self.chunk_size as usize);
        if self.chunks.len() != want {
            return bad(format!(
                "blob lists {} chunks, {weights} weights need {want}",
                self.chunks.len()
            ));
        }
        if !std::iter::once(&self.sha256)
            .chain(&self.chunks)
            .all(|d| crate::v1::deploy::is_sha256_hex(d))
        {
            return bad("blob digests must be SHA-256 hex".into());
        }
        Ok(())
    }

    /// Floats in chunk `index` of a blob of `weights` weights.
    pub fn chunk_range(&self, weights: usize, index: u32) -> std::ops::Range<usize> {
        let per = self.chunk_size as usize / 4;
        let start = (index as usize * per).min(weights);
        start..(start + per).min(weights)
    }

    /// Checks chunk `index`'s bytes against the digest the signed header names.
    pub fn check_chunk(&self, weights: usize, index: u32, data: &[u8]) -> Result<(), FlError> {
        let Some(want) = self.chunks.get(index as usize) else {
            return Err(FlError::Chunk(format!(
                "index {index} of a blob of {} chunks",
                self.chunks.len()
            )));
        };
        let len = self.chunk_range(weights, index).len() * 4;
        if data.len() != len {
            return Err(FlError::Chunk(format!(
                "chunk {index} has {} bytes, expected {len}",
                data.len()
            )));
        }
        if hex::encode(Sha256::digest(data)) != *want {
            return Err(FlError::Chunk(format!(
                "chunk {index} does not match its digest"
            )));
        }
        Ok(())
    }
}

/// The bytes of chunk `index` of `weights` (little-endian f32).
pub fn chunk_bytes(weights: &[f32], blob: &WeightsBlob, index: u32) -> Vec<u8> {
    weights[blob.chunk_range(weights.len(), index)]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// The encoded [`WeightChunk`] of chunk `index` of `weights`, written straight from the
/// weights (no intermediate copy of the chunk's bytes: the coordinator sends one per request).
pub fn encode_chunk(
    task: &str,
    version: u32,
    index: u32,
    weights: &[f32],
    blob: &WeightsBlob,
) -> Vec<u8> {
    let range = blob.chunk_range(weights.len(), index);
    let mut out = chunk_header(task, version, index, range.len() * 4);
    out.extend(weights[range].iter().flat_map(|v| v.to_le_bytes()));
    out
}

fn chunk_header(task: &str, version: u32, index: u32, data_len: usize) -> Vec<u8> {
    let mut out = begin(CHUNK_MAGIC, task, 8 + data_len);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out
}

/// One chunk of a round's weights, coordinator -> device on `fl/chunk`:
/// `"FC" | format u8 | task_len u8 | task | version u32 | index u32 | data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightChunk {
    pub task: String,
    /// The global version whose weights these are.
    pub version: u32,
    pub index: u32,
    pub data: Vec<u8>,
}

impl WeightChunk {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = chunk_header(&self.task, self.version, self.index, self.data.len());
        out.extend_from_slice(&self.data);
        out
    }

    pub fn decode(payload: &[u8]) -> Result<WeightChunk, FlError> {
        let err = FlError::Chunk;
        if payload.len() > crate::v1::MAX_PAYLOAD_BYTES {
            return Err(err(format!("{} bytes", payload.len())));
        }
        let (mut c, task) = open(payload, CHUNK_MAGIC, "a weight chunk", err)?;
        let version = c.u32("version")?;
        let index = c.u32("index")?;
        Ok(WeightChunk {
            task,
            version,
            index,
            data: c.buf.to_vec(),
        })
    }
}

/// A device's request for chunks of a round's weights (JSON body of a binary envelope of kind
/// [`FETCH_KIND`] on `fl/update`, sealed like an update).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    pub task: String,
    pub version: u32,
    pub indexes: Vec<u32>,
}

impl FetchRequest {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(body: &[u8]) -> Result<FetchRequest, FlError> {
        let f: FetchRequest =
            serde_json::from_slice(body).map_err(|e| FlError::Chunk(format!("fetch: {e}")))?;
        if validate_message_id(&f.task).is_err() {
            return Err(FlError::Chunk(format!("fetch for task {:?}", f.task)));
        }
        if f.indexes.is_empty() || f.indexes.len() > MAX_FETCH_INDEXES {
            return Err(FlError::Chunk(format!(
                "fetch names {} chunks (1 to {MAX_FETCH_INDEXES})",
                f.indexes.len()
            )));
        }
        Ok(f)
    }
}

/// One part of an update too big for one message (body of a binary envelope of kind
/// [`PART_KIND`]): `"FP" | format u8 | task_len u8 | task | round u32 | index u32 | count u32
/// | total u32 | sha256 (32) of the whole update | data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdatePart {
    pub task: String,
    pub round: u32,
    pub index: u32,
    pub count: u32,
    /// Bytes of the whole update.
    pub total: u32,
    pub sha256: [u8; 32],
    pub data: Vec<u8>,
}

impl UpdatePart {
    /// Cuts an encoded [`super::Update`] into parts of [`PART_BYTES`], one at a time (a
    /// caller that encodes each and lets it go holds one part beside the update, not a copy).
    pub fn split<'a>(
        task: &'a str,
        round: u32,
        update: &'a [u8],
    ) -> impl ExactSizeIterator<Item = UpdatePart> + 'a {
        let parts = Parts::of(task, round, update);
        (0..parts.count).map(move |i| {
            let start = i as usize * PART_BYTES;
            let end = (start + PART_BYTES).min(update.len());
            parts.part(i, update[start..end].to_vec())
        })
    }

    /// [`UpdatePart::split`] of an update it takes, last part first: each part is cut from
    /// the update's end as it is asked for, and the update shrinks as it is (its pages go back
    /// as it does), so the parts made and the update left are never much more than the update.
    /// The receiver puts parts together in any order.
    pub fn from_the_end(task: &str, round: u32, update: Vec<u8>) -> FromTheEnd {
        let parts = Parts::of(task, round, &update);
        FromTheEnd {
            left: parts.count,
            parts,
            update,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = begin(PART_MAGIC, &self.task, 48 + self.data.len());
        for v in [self.round, self.index, self.count, self.total] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(&self.data);
        out
    }

    /// Decodes and checks a part against itself: index within count, count and size within
    /// [`MAX_UPDATE_BYTES`], this part's length what its index implies.
    pub fn decode(body: &[u8]) -> Result<UpdatePart, FlError> {
        let err = FlError::Update;
        let (mut c, task) = open(body, PART_MAGIC, "an update part", err)?;
        let round = c.u32("round")?;
        let index = c.u32("index")?;
        let count = c.u32("count")?;
        let total = c.u32("total")?;
        let sha256: [u8; 32] = c
            .take(32, "sha256")?
            .try_into()
            .map_err(|_| err("sha256".into()))?;
        let data = c.buf.to_vec();
        if total as usize > MAX_UPDATE_BYTES {
            return Err(FlError::TooLarge {
                what: "update",
                size: total as usize,
                limit: MAX_UPDATE_BYTES,
            });
        }
        let want_count = (total as usize).div_ceil(PART_BYTES).max(1) as u32;
        if count != want_count || index >= count {
            return Err(err(format!(
                "part {index} of {count}: an update of {total} bytes has {want_count} parts"
            )));
        }
        let start = index as usize * PART_BYTES;
        let want_len = (total as usize - start).min(PART_BYTES);
        if data.len() != want_len {
            return Err(err(format!(
                "part {index} has {} bytes, expected {want_len}",
                data.len()
            )));
        }
        Ok(UpdatePart {
            task,
            round,
            index,
            count,
            total,
            sha256,
            data,
        })
    }
}

/// Puts parts (each decoded by [`UpdatePart::decode`], all of one update, in any order)
/// together and checks the whole against the digest they carry.
pub fn assemble(parts: &[UpdatePart]) -> Result<Vec<u8>, FlError> {
    let err = FlError::Update;
    let first = parts.first().ok_or_else(|| err("no parts".into()))?;
    if parts.len() != first.count as usize {
        return Err(err(format!("{} of {} parts", parts.len(), first.count)));
    }
    let mut out = vec![0u8; first.total as usize];
    let mut seen = vec![false; first.count as usize];
    for p in parts {
        if (p.count, p.total, p.sha256, p.round)
            != (first.count, first.total, first.sha256, first.round)
            || p.task != first.task
        {
            return Err(err("parts of different updates".into()));
        }
        if std::mem::replace(&mut seen[p.index as usize], true) {
            return Err(err(format!("part {} twice", p.index)));
        }
        let start = p.index as usize * PART_BYTES;
        out[start..start + p.data.len()].copy_from_slice(&p.data);
    }
    if <[u8; 32]>::from(Sha256::digest(&out)) != first.sha256 {
        return Err(err("the assembled update does not match its digest".into()));
    }
    Ok(out)
}

/// What every part of one update carries ([`UpdatePart::split`], [`UpdatePart::from_the_end`]).
#[derive(Debug)]
struct Parts {
    task: String,
    round: u32,
    sha256: [u8; 32],
    total: u32,
    count: u32,
}

impl Parts {
    fn of(task: &str, round: u32, update: &[u8]) -> Parts {
        Parts {
            task: task.to_owned(),
            round,
            sha256: Sha256::digest(update).into(),
            total: update.len() as u32,
            count: update.len().div_ceil(PART_BYTES).max(1) as u32,
        }
    }

    fn part(&self, index: u32, data: Vec<u8>) -> UpdatePart {
        UpdatePart {
            task: self.task.clone(),
            round: self.round,
            index,
            count: self.count,
            total: self.total,
            sha256: self.sha256,
            data,
        }
    }
}

/// The parts of an update, last first ([`UpdatePart::from_the_end`]).
#[derive(Debug)]
pub struct FromTheEnd {
    parts: Parts,
    /// Parts not cut yet: `0..left`.
    left: u32,
    update: Vec<u8>,
}

impl Iterator for FromTheEnd {
    type Item = UpdatePart;

    fn next(&mut self) -> Option<UpdatePart> {
        self.left = self.left.checked_sub(1)?;
        let data = self.update.split_off(self.left as usize * PART_BYTES);
        self.update.shrink_to_fit();
        Some(self.parts.part(self.left, data))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

impl ExactSizeIterator for FromTheEnd {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_split_whole_or_taken_gives_the_same_parts() {
        for len in [
            0,
            1,
            PART_BYTES - 1,
            PART_BYTES,
            PART_BYTES + 1,
            3 * PART_BYTES + 17,
        ] {
            let update: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let whole: Vec<UpdatePart> = UpdatePart::split("t", 4, &update).collect();
            let parts = UpdatePart::from_the_end("t", 4, update.clone());
            assert_eq!(parts.len(), whole.len());
            let mut taken: Vec<UpdatePart> = parts.collect();
            assert!(
                taken.windows(2).all(|w| w[0].index > w[1].index),
                "last first"
            );
            taken.reverse();
            assert_eq!(taken, whole, "{len} bytes");
            assert_eq!(
                taken
                    .iter()
                    .flat_map(|p| p.data.clone())
                    .collect::<Vec<_>>(),
                update
            );
        }
    }

    #[test]
    fn blobs_describe_chunks_that_check() {
        let w: Vec<f32> = (0..40_000).map(|i| i as f32 * 0.5).collect();
        let blob = WeightsBlob::of(&w);
        assert_eq!(blob.chunks.len(), 3); // 160,000 bytes at 64 KiB
        blob.validate(w.len()).expect("valid");
        let mut all = Vec::new();
        for i in 0..3 {
            let c = chunk_bytes(&w, &blob, i);
            blob.check_chunk(w.len(), i, &c).expect("checks");
            all.extend_from_slice(&c);
        }
        assert_eq!(hex::encode(Sha256::digest(&all)), blob.sha256);
        let direct = encode_chunk("big", 2, 1, &w, &blob);
        let via = WeightChunk {
            task: "big".into(),
            version: 2,
            index: 1,
            data: chunk_bytes(&w, &blob, 1),
        };
        assert_eq!(direct, via.encode());
        let mut bad = chunk_bytes(&w, &blob, 1);
        bad[7] ^= 1;
        assert!(blob.check_chunk(w.len(), 1, &bad).is_err());
        assert!(blob.check_chunk(w.len(), 3, &bad).is_err());
        assert!(blob.check_chunk(w.len(), 2, &bad).is_err(), "wrong length");
        assert!(blob.validate(w.len() + 20_000).is_err(), "chunk count");
        assert!(blob.validate(MAX_WEIGHTS + 1).is_err());
        let mut odd = blob.clone();
        odd.chunk_size = 6;
        assert!(odd.validate(w.len()).is_err());
    }

    #[test]
    fn chunks_and_fetches_round_trip_and_refuse_garbage() {
        let c = WeightChunk {
            task: "big".into(),
            version: 3,
            index: 7,
            data: vec![1, 2, 3, 4],
        };
        assert_eq!(WeightChunk::decode(&c.encode()).expect("decodes"), c);
        assert!(WeightChunk::decode(b"FC").is_err());
        assert!(WeightChunk::decode(b"XX\x01\x00").is_err());
        let f = FetchRequest {
            task: "big".into(),
            version: 3,
            indexes: vec![0, 5],
        };
        assert_eq!(FetchRequest::decode(&f.encode()).expect("decodes"), f);
        let none = FetchRequest {
            indexes: vec![],
            ..f.clone()
        };
        assert!(FetchRequest::decode(&none.encode()).is_err());
        let many = FetchRequest {
            indexes: (0..65).collect(),
            ..f
        };
        assert!(FetchRequest::decode(&many.encode()).is_err());
    }

    #[test]
    fn parts_split_assemble_and_refuse_what_does_not_fit() {
        let update: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
        let parts: Vec<UpdatePart> = UpdatePart::split("big", 2, &update).collect();
        assert_eq!(parts.len(), 3);
        let mut decoded: Vec<UpdatePart> = parts
            .iter()
            .map(|p| UpdatePart::decode(&p.encode()).expect("decodes"))
            .collect();
        decoded.reverse();
        assert_eq!(assemble(&decoded).expect("assembles"), update);
        assert!(assemble(&decoded[..2]).is_err());
        let mut twice = decoded.clone();
        twice[1] = twice[0].clone();
        assert!(assemble(&twice).is_err());
        let mut forged = decoded.clone();
        forged[0].data[3] ^= 1;
        assert!(assemble(&forged).is_err(), "digest");
        let mut short = parts[0].clone();
        short.data.pop();
        assert!(UpdatePart::decode(&short.encode()).is_err());
        let mut huge = parts[0].clone();
        huge.total = u32::MAX;
        assert!(UpdatePart::decode(&huge.encode()).is_err());
        let mut past = parts[2].clone();
        past.index = 3;
        assert!(UpdatePart::decode(&past.encode()).is_err());
    }
}
