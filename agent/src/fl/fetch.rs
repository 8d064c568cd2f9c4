//! Weights too big for a round message: the header names a blob (the SHA-256 of every
//! chunk), and the device pulls the chunks it lacks in windows over `fl-fetch` requests
//! (through the outbox, sealed like an update). Each chunk is checked against the signed
//! digest before it is kept in the state database, so a fetch resumes where it stopped, also
//! after a reboot, and a forged or damaged chunk is dropped and asked for again.
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
    /// Every weight is in, checked against the header's digests.
    Done(Box<RoundMessage>),
    /// A round message came meanwhile: handle it instead.
    Superseded(Vec<u8>),
    /// The agent is stopping.
    Stopped,
}

impl FlTask {
    /// Fills `msg`'s weights from its blob: the kept chunks, and the rest fetched.
    pub(super) async fn fetch(
        &self,
        mut msg: RoundMessage,
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
        msg.weights = self.assemble(&task, version, n, &blob)?;
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

    /// The weights from the kept chunks, checked against the digest of the whole (a kept
    /// chunk damaged on disk is found here: the chunks are dropped and fetched again).
    pub(super) fn assemble(
        &self,
        task: &str,
        version: u32,
        n: usize,
        blob: &fl::WeightsBlob,
    ) -> Result<Vec<f32>, RoundError> {
        let state = &self.d.state;
        let mut weights = Vec::with_capacity(n);
        let mut whole = Sha256::new();
        for i in 0..blob.chunks.len() as u32 {
            let data = state.chunk(task, version, i)?.ok_or_else(|| {
                RoundError::Fetch(format!(
                    "chunk {i} of task {task} version {version} is gone"
                ))
            })?;
            whole.update(&data);
            weights.extend(
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        if hex::encode(whole.finalize()) != blob.sha256 || weights.len() != n {
            state.drop_chunks(task, None)?;
            return Err(RoundError::Fetch(format!(
                "task {task} version {version}: the kept chunks do not match the round's digest; dropped, fetched again with the next round message"
            )));
        }
        if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
            return Err(RoundError::Fetch(format!("non-finite weight at {i}")));
        }
        Ok(weights)
    }
}
