//! Weights too big for a round message: the header names a blob (the SHA-256 of every
//! chunk), and the device pulls the chunks it lacks in windows over `fl-fetch` requests
//! (through the outbox, sealed like an update). Each chunk is checked against the signed
//! digest before it is kept (a file of the state directory), so a fetch resumes where it
//! stopped, also after a reboot, and a forged or damaged chunk is dropped and asked for again.
//!
//! The weights stay there: applying them reads the kept chunks straight into the model's patch,
//! training into the trainer's input ([`Kept`], which checks the whole against the round's
//! digest as it goes), so a round never holds them whole beside their other copies.
//!
//! A newer round message arriving meanwhile ends the fetch: the caller handles that message
//! instead (its chunks, if the version is the same, are already kept).

use std::collections::BTreeSet;
use std::time::Duration;

use protocol::v1::fl::{self, FetchRequest, RoundMessage, WeightChunk, chunks};
use protocol::v1::{Class, topics};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::{FlTask, RoundError};
use crate::inbox::Subscription;
use crate::outbox::NewMessage;

/// Chunks asked for at once (2 MiB at 64 KiB each).
const WINDOW: usize = 32;
/// How long a window may bring nothing before it is asked for again.
const WAIT: Duration = Duration::from_secs(5);
/// Windows in a row that brought nothing before the fetch is given up (the next round
/// message, or the stored one at the next pipeline start, tries again).
const MAX_STALLS: u32 = 12;

/// How a fetch ended.
pub(super) enum Fetched {
    /// Every chunk is kept, each checked against its digest (the whole is checked as it is
    /// read: [`Kept`]); the message's `weights` stay empty.
    Done(Box<RoundMessage>),
    /// A round message came meanwhile: handle it instead.
    Superseded(Vec<u8>),
    /// The agent is stopping.
    Stopped,
}

impl FlTask {
    /// Fetches the chunks of `msg`'s blob that are not kept yet (a message without a blob is
    /// done as it is).
    pub(super) async fn fetch(
        &self,
        msg: RoundMessage,
        sub: &mut Subscription,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Fetched, RoundError> {
        let h = &msg.header;
        let Some(blob) = h.blob.clone() else {
            return Ok(Fetched::Done(Box::new(msg)));
        };
        let (task, version) = (h.task.clone(), h.version);
        let n = fl::weight_count(&h.params);
        let total = blob.chunks.len() as u32;
        let state = &self.d.state;
        state.drop_chunks(&task, Some(version))?;
        let mut have: BTreeSet<u32> = state.chunk_indexes(&task, version)?.into_iter().collect();
        let round_topic = topics::fl_round(&self.d.device);
        let started = std::time::Instant::now();
        let mut stalls = 0;
        let mut dropped = 0u64;
        if (have.len() as u32) < total {
            tracing::info!(task = %task, version, chunks = total, held = have.len(), bytes = n * 4, "fetching the round's weights in chunks");
        }
        while (have.len() as u32) < total {
            let window: Vec<u32> = (0..total)
                .filter(|i| !have.contains(i))
                .take(WINDOW)
                .collect();
            self.request(&task, version, window.clone()).await?;
            let deadline = tokio::time::Instant::now() + WAIT;
            let mut progressed = false;
            while !window.iter().all(|i| have.contains(i)) {
                let incoming = tokio::select! {
                    m = sub.rx.recv() => m,
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = stop.changed() => return Ok(Fetched::Stopped),
                };
                let Some(m) = incoming else {
                    return Ok(Fetched::Stopped);
                };
                if m.topic == round_topic {
                    if m.payload.is_empty() {
                        continue;
                    }
                    return Ok(Fetched::Superseded(m.payload.to_vec()));
                }
                let chunk = match WeightChunk::decode(&m.payload) {
                    Ok(c) if c.task == task && c.version == version => c,
                    Ok(_) => continue, // another task's, or a version before this one
                    Err(e) => {
                        dropped += 1;
                        tracing::warn!(task = %task, error = %e, "malformed weight chunk dropped");
                        continue;
                    }
                };
                if have.contains(&chunk.index) {
                    continue;
                }
                if let Err(e) = blob.check_chunk(n, chunk.index, &chunk.data) {
                    dropped += 1;
                    tracing::warn!(task = %task, version, index = chunk.index, error = %e, "weight chunk dropped; asking for it again");
                    continue;
                }
                state.put_chunk(&task, version, chunk.index, &chunk.data)?;
                have.insert(chunk.index);
                progressed = true;
            }
            if progressed {
                stalls = 0;
            } else {
                stalls += 1;
                if stalls >= MAX_STALLS {
                    return Err(RoundError::Fetch(format!(
                        "task {task} version {version}: {} of {total} chunks after {stalls} requests brought nothing",
                        have.len()
                    )));
                }
            }
        }
        // The weights stay in their files: applying reads them from there into the patch,
        // training into the trainer's input, each checked against the whole's digest as it
        // reads, so the round never holds them as a whole beside their other copies.
        tracing::info!(task = %task, version, chunks = total, dropped, ms = started.elapsed().as_millis() as u64, "round weights complete");
        Ok(Fetched::Done(Box::new(msg)))
    }

    async fn request(&self, task: &str, version: u32, indexes: Vec<u32>) -> Result<(), RoundError> {
        let body = FetchRequest {
            task: task.to_owned(),
            version,
            indexes,
        }
        .encode();
        let message = NewMessage::binary(
            Class::Control,
            topics::fl_update(&self.d.device),
            chunks::FETCH_KIND,
            &body,
            // Only useful while this fetch waits for it.
            Some(WAIT * 2),
        );
        self.d
            .outbox
            .enqueue(message)
            .await
            .map(|_| ())
            .map_err(|e| RoundError::Outbox(e.to_string()))
    }

    /// A reader of the kept chunks of `task`'s weights at `version`, in order.
    pub(super) fn kept<'a>(
        &'a self,
        task: &'a str,
        version: u32,
        blob: &'a fl::WeightsBlob,
    ) -> Kept<'a> {
        Kept::new(&self.d.state, task, version, blob)
    }
}

/// The kept chunks of a round's weights read in order ([`FlTask::kept`]); [`Kept::finish`] checks
/// the whole against the round's digest and every value finite. What was read is only to be used
/// once `finish` says so.
pub(super) struct Kept<'a> {
    state: &'a super::state::FlState,
    task: &'a str,
    version: u32,
    blob: &'a fl::WeightsBlob,
    /// The next chunk to read.
    next: u32,
    /// The chunk being read (its buffer reused for the next).
    chunk: Vec<u8>,
    /// Bytes of `chunk` already read.
    at: usize,
    /// Bytes read in all.
    read: usize,
    whole: Sha256,
    /// The first value read that is not finite.
    non_finite: Option<usize>,
}

impl<'a> Kept<'a> {
    fn new(
        state: &'a super::state::FlState,
        task: &'a str,
        version: u32,
        blob: &'a fl::WeightsBlob,
    ) -> Kept<'a> {
        Kept {
            state,
            task,
            version,
            blob,
            next: 0,
            chunk: Vec::new(),
            at: 0,
            read: 0,
            whole: Sha256::new(),
            non_finite: None,
        }
    }

    /// Hands the next `len` bytes (a whole number of f32 values) to `sink`, a piece at a time.
    pub(super) fn read(
        &mut self,
        mut len: usize,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<(), RoundError> {
        while len > 0 {
            if self.at == self.chunk.len() {
                let i = self.next;
                if i as usize >= self.blob.chunks.len() {
                    return Err(self.damaged());
                }
                if !self
                    .state
                    .read_chunk(self.task, self.version, i, &mut self.chunk)?
                {
                    return Err(RoundError::Fetch(format!(
                        "chunk {i} of task {} version {} is gone",
                        self.task, self.version
                    )));
                }
                if !self.chunk.len().is_multiple_of(4) {
                    return Err(self.damaged());
                }
                self.whole.update(&self.chunk);
                self.next += 1;
                self.at = 0;
            }
            let take = len.min(self.chunk.len() - self.at);
            let piece = &self.chunk[self.at..self.at + take];
            if self.non_finite.is_none() {
                self.non_finite = piece
                    .chunks_exact(4)
                    .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
                    .map(|k| self.read / 4 + k);
            }
            sink(piece);
            self.at += take;
            self.read += take;
            len -= take;
        }
        Ok(())
    }

    /// Hands the next `n` values to `each` with their index among them.
    pub(super) fn read_values(
        &mut self,
        n: usize,
        mut each: impl FnMut(usize, f32),
    ) -> Result<(), RoundError> {
        let mut i = 0;
        self.read(n * 4, |piece| {
            for b in piece.chunks_exact(4) {
                each(i, f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                i += 1;
            }
        })
    }

    /// Checks that the `n` weights read were all there is and match the round's digest (a kept
    /// chunk damaged on disk is found here: the chunks are dropped and fetched again with the
    /// next round message).
    pub(super) fn finish(mut self, n: usize) -> Result<(), RoundError> {
        if self.read != n * 4
            || self.at != self.chunk.len()
            || self.next as usize != self.blob.chunks.len()
        {
            return Err(self.damaged());
        }
        let digest = std::mem::take(&mut self.whole).finalize();
        if hex::encode(digest) != self.blob.sha256 {
            return Err(self.damaged());
        }
        match self.non_finite {
            Some(i) => Err(RoundError::Fetch(format!("non-finite weight at {i}"))),
            None => Ok(()),
        }
    }

    fn damaged(&self) -> RoundError {
        if let Err(e) = self.state.drop_chunks(self.task, None) {
            return e.into();
        }
        RoundError::Fetch(format!(
            "task {} version {}: the kept chunks do not match the round's digest; dropped, fetched again with the next round message",
            self.task, self.version
        ))
    }
}

/// A round's kept chunks as the bytes of a patch
/// ([`edge_inference::patch_initializers_to_disk_from`]): each param's values go straight from
/// the kept chunk files into the patched files, and the whole is checked against the round's
/// digest before the files are put in place.
pub(super) struct KeptBytes<'a> {
    kept: Option<Kept<'a>>,
    params: &'a [fl::ParamSpec],
}

impl<'a> KeptBytes<'a> {
    pub(super) fn new(kept: Kept<'a>, params: &'a [fl::ParamSpec]) -> KeptBytes<'a> {
        KeptBytes {
            kept: Some(kept),
            params,
        }
    }
}

impl edge_inference::UpdateBytes for KeptBytes<'_> {
    fn write(
        &mut self,
        i: usize,
        sink: &mut edge_inference::Sink<'_>,
    ) -> Result<(), edge_inference::PatchError> {
        let p = &self.params[i];
        let source = |detail: String| edge_inference::PatchError::Source {
            name: p.name.clone(),
            detail,
        };
        let kept = self
            .kept
            .as_mut()
            .ok_or_else(|| source("the kept chunks were already read".into()))?;
        let mut failed = None;
        kept.read(p.len() * 4, |piece| {
            if failed.is_none() {
                failed = sink(piece).err();
            }
        })
        .map_err(|e| source(e.to_string()))?;
        failed.map_or(Ok(()), Err)
    }

    fn finish(&mut self) -> Result<(), edge_inference::PatchError> {
        let n = fl::weight_count(self.params);
        match self.kept.take() {
            Some(kept) => kept
                .finish(n)
                .map_err(|e| edge_inference::PatchError::Source {
                    name: format!("{} params", self.params.len()),
                    detail: e.to_string(),
                }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use protocol::v1::fl::chunks::{WeightsBlob, chunk_bytes};

    use super::*;
    use crate::fl::state::FlState;

    fn kept<'a>(state: &'a FlState, blob: &'a WeightsBlob) -> Kept<'a> {
        Kept::new(state, "t", 3, blob)
    }

    /// Reads `n` weights in pieces of `each` values.
    fn read_all(k: &mut Kept<'_>, n: usize, each: usize) -> Result<Vec<f32>, RoundError> {
        let mut out = Vec::new();
        let mut left = n;
        while left > 0 {
            let take = each.min(left);
            let at = out.len();
            k.read_values(take, |i, v| {
                assert_eq!(i, out.len() - at, "values come in order");
                out.push(v)
            })?;
            left -= take;
        }
        Ok(out)
    }

    #[test]
    fn kept_chunks_read_across_chunk_edges_and_check_the_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path().join("state")).expect("open");
        let state = FlState::open(&db, dir.path().join("fl")).expect("state");
        // Three chunks and a bit; read in pieces that straddle the chunk edges.
        let n = 3 * (chunks::CHUNK_BYTES as usize / 4) + 100;
        let weights: Vec<f32> = (0..n).map(|i| (i as f32 * 0.001).sin()).collect();
        let blob = WeightsBlob::of(&weights);
        let put = |i: u32, data: &[u8]| state.put_chunk("t", 3, i, data).expect("put");
        for i in 0..blob.chunks.len() as u32 {
            put(i, &chunk_bytes(&weights, &blob, i));
        }
        let mut k = kept(&state, &blob);
        assert_eq!(read_all(&mut k, n, 7_777).expect("read"), weights);
        k.finish(n).expect("whole");

        // Stopping short of the end is not the whole.
        let mut k = kept(&state, &blob);
        read_all(&mut k, n - 1, 10_000).expect("read");
        assert!(matches!(k.finish(n - 1), Err(RoundError::Fetch(_))));
        // The folder holds the chunks again for what follows (finish dropped them).
        for i in 0..blob.chunks.len() as u32 {
            put(i, &chunk_bytes(&weights, &blob, i));
        }

        // A chunk damaged on disk: every value still reads, finish refuses and drops the chunks.
        let mut bad = chunk_bytes(&weights, &blob, 1);
        bad[8] ^= 0x40;
        put(1, &bad);
        let mut k = kept(&state, &blob);
        read_all(&mut k, n, 50_000).expect("read");
        let err = k.finish(n).expect_err("damaged");
        assert!(
            err.to_string().contains("do not match the round's digest"),
            "{err}"
        );
        assert!(
            !state.read_chunk("t", 3, 0, &mut Vec::new()).expect("get"),
            "chunks dropped"
        );
        // Gone: named.
        let mut k = kept(&state, &blob);
        let err = read_all(&mut k, n, n).expect_err("gone");
        assert!(
            err.to_string()
                .contains("chunk 0 of task t version 3 is gone"),
            "{err}"
        );
    }
}
