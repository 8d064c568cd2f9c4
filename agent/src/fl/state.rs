//! What federated learning keeps on the device, in the state database's `fl` tree.
//!
//! ```text
//! round/{model}      the newest verified round message for the model, of whichever task
//!                    (signed bytes, re-verified when read): replayed when a pipeline training
//!                    that model (re)starts, so a reboot or a new deployment gets the newest
//!                    global weights back without the network
//! submitted/{task}   last round whose update is in the outbox (u32 BE): a round is trained
//!                    and sent at most once, also across restarts
//! residual/{task}    error-feedback residual, n x f32 LE
//! mark/{task}        the newest round message admitted for the task: version u32 BE, round
//!                    u32 BE, issued_ms u64 BE, sha256 of the message (32 bytes); anything
//!                    older is refused, also after a restart (see [`Mark::admits`])
//! chunk/{task}/{version u32 BE}/{index u32 BE}
//!                    a verified chunk of a model too big for its round message (the round's
//!                    header names each chunk's digest): a fetch resumes where it stopped,
//!                    and a restart puts the weights together without the network; only the
//!                    newest version of a task is kept
//! ```
//!
//! **Invariant:** `submitted` and `residual` change together in one sled transaction, after
//! the update is durably in the outbox. A crash between the enqueue and that commit retrains
//! the round from the old residual and sends a second update, which the coordinator drops as
//! a duplicate of (task, round, device): the residual stays consistent with what counted.
//! A round message and its task's mark are stored together, in one transaction, and flushed
//! before the message is acted on.

use sha2::{Digest, Sha256};
use sled::Transactional;

const TREE: &str = "fl";

#[derive(Debug, thiserror::Error)]
#[error("federated-learning state: {0}")]
pub struct StateError(String);

fn err(e: impl std::fmt::Display) -> StateError {
    StateError(e.to_string())
}

/// Where the newest admitted round message of a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub version: u32,
    pub round: u32,
    pub issued_ms: u64,
    pub digest: [u8; 32],
}

/// How a round message compares with its task's mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Newer: act on it and move the mark.
    New,
    /// The very message admitted last (its retained copy at a reconnect): act on it again,
    /// which is idempotent (applied weights are skipped, a queued round is not trained twice).
    Again,
}

impl Mark {
    pub fn of(version: u32, round: u32, issued_ms: u64, message: &[u8]) -> Mark {
        Mark {
            version,
            round,
            issued_ms,
            digest: Sha256::digest(message).into(),
        }
    }

    /// Whether `new` may follow this mark: a higher (version, round), or the same (version,
    /// round) issued later. The coordinator re-issues the current round's message with the
    /// same (version, round) when a round is extended (a device added to the selection gets a
    /// train order), when a member registers again and when a task is stopped (`done`); each
    /// carries a newer `issued_ms`. Anything else (a lower (version, round), or the same one
    /// issued no later, with other bytes) is a replay of an older message.
    pub fn admits(&self, new: &Mark) -> Option<Admission> {
        if new.digest == self.digest {
            return Some(Admission::Again);
        }
        let (old_at, new_at) = ((self.version, self.round), (new.version, new.round));
        (new_at > old_at || (new_at == old_at && new.issued_ms > self.issued_ms))
            .then_some(Admission::New)
    }

    fn to_bytes(self) -> [u8; 48] {
        let mut out = [0u8; 48];
        out[..4].copy_from_slice(&self.version.to_be_bytes());
        out[4..8].copy_from_slice(&self.round.to_be_bytes());
        out[8..16].copy_from_slice(&self.issued_ms.to_be_bytes());
        out[16..].copy_from_slice(&self.digest);
        out
    }

    fn from_bytes(b: &[u8]) -> Option<Mark> {
        let b: &[u8; 48] = b.try_into().ok()?;
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&b[16..]);
        Some(Mark {
            version: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            round: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            issued_ms: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            digest,
        })
    }
}

#[derive(Debug, Clone)]
pub struct FlState {
    tree: sled::Tree,
}

impl FlState {
    pub fn open(db: &sled::Db) -> Result<FlState, StateError> {
        Ok(FlState {
            tree: db.open_tree(TREE).map_err(err)?,
        })
    }

    /// The newest round message admitted for `task`. A mark that does not decode (damaged)
    /// reads as none, like a task never seen.
    pub fn mark(&self, task: &str) -> Result<Option<Mark>, StateError> {
        Ok(self
            .tree
            .get(format!("mark/{task}"))
            .map_err(err)?
            .and_then(|v| Mark::from_bytes(&v)))
    }

    /// Stores an admitted round message as the newest for `model` and moves `task`'s mark to
    /// it, in one transaction, then flushes: a restart never admits anything older.
    pub fn admit_round(
        &self,
        task: &str,
        model: &str,
        message: &[u8],
        mark: Mark,
    ) -> Result<(), StateError> {
        (&self.tree,)
            .transaction(|(t,)| {
                t.insert(format!("round/{model}").as_bytes(), message)?;
                t.insert(format!("mark/{task}").as_bytes(), &mark.to_bytes()[..])?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| err(format!("{e:?}")))?;
        self.tree.flush().map_err(err)?;
        Ok(())
    }

    /// The newest stored round message for `model`.
    pub fn round(&self, model: &str) -> Option<Vec<u8>> {
        Some(self.tree.get(format!("round/{model}")).ok()??.to_vec())
    }

    pub fn submitted(&self, task: &str) -> Option<u32> {
        let v = self.tree.get(format!("submitted/{task}")).ok()??;
        Some(u32::from_be_bytes(v.as_ref().try_into().ok()?))
    }

    /// The residual for `task` if it has `n` weights, else zeros (a new task, or a model whose
    /// shape changed).
    pub fn residual(&self, task: &str, n: usize) -> Vec<f32> {
        match self.tree.get(format!("residual/{task}")) {
            Ok(Some(v)) if v.len() == n * 4 => v
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            _ => vec![0.0; n],
        }
    }

    /// Records that `round`'s update is queued and stores the residual left after it, in one
    /// transaction, then flushes.
    pub fn commit_submitted(
        &self,
        task: &str,
        round: u32,
        residual: Option<&[f32]>,
    ) -> Result<(), StateError> {
        let bytes: Option<Vec<u8>> =
            residual.map(|r| r.iter().flat_map(|x| x.to_le_bytes()).collect());
        (&self.tree,)
            .transaction(|(t,)| {
                t.insert(format!("submitted/{task}").as_bytes(), &round.to_be_bytes())?;
                if let Some(b) = &bytes {
                    t.insert(format!("residual/{task}").as_bytes(), b.as_slice())?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| err(format!("{e:?}")))?;
        self.tree.flush().map_err(err)?;
        Ok(())
    }

    fn chunk_prefix(task: &str, version: u32) -> Vec<u8> {
        let mut k = format!("chunk/{task}/").into_bytes();
        k.extend_from_slice(&version.to_be_bytes());
        k.push(b'/');
        k
    }

    /// The chunks of `task`'s weights at `version` held, by index.
    pub fn chunk_indexes(&self, task: &str, version: u32) -> Result<Vec<u32>, StateError> {
        let prefix = Self::chunk_prefix(task, version);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix).keys() {
            let k = kv.map_err(err)?;
            if let Ok(i) = <[u8; 4]>::try_from(&k[prefix.len()..]) {
                out.push(u32::from_be_bytes(i));
            }
        }
        Ok(out)
    }

    pub fn chunk(
        &self,
        task: &str,
        version: u32,
        index: u32,
    ) -> Result<Option<sled::IVec>, StateError> {
        let mut k = Self::chunk_prefix(task, version);
        k.extend_from_slice(&index.to_be_bytes());
        self.tree.get(k).map_err(err)
    }

    /// Keeps a verified chunk (flushed with the next round message, or by sled's own flush:
    /// a chunk lost in a crash is fetched again).
    pub fn put_chunk(
        &self,
        task: &str,
        version: u32,
        index: u32,
        data: &[u8],
    ) -> Result<(), StateError> {
        let mut k = Self::chunk_prefix(task, version);
        k.extend_from_slice(&index.to_be_bytes());
        self.tree.insert(k, data).map_err(err)?;
        Ok(())
    }

    /// Drops the chunks of every version of `task` but `keep` (`None`: all of them).
    pub fn drop_chunks(&self, task: &str, keep: Option<u32>) -> Result<(), StateError> {
        let keep = keep.map(|v| Self::chunk_prefix(task, v));
        let mut batch = sled::Batch::default();
        for kv in self.tree.scan_prefix(format!("chunk/{task}/")).keys() {
            let k = kv.map_err(err)?;
            if keep.as_ref().is_none_or(|p| !k.starts_with(p)) {
                batch.remove(k);
            }
        }
        self.tree.apply_batch(batch).map_err(err)
    }

    /// Forgets a finished task's residual (its round message and submitted mark stay, so a
    /// replayed final message does nothing).
    pub fn finish(&self, task: &str) -> Result<(), StateError> {
        self.tree.remove(format!("residual/{task}")).map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residuals_and_marks_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::open(dir.path()).expect("open");
            let s = FlState::open(&db).expect("state");
            assert_eq!(s.residual("t", 3), vec![0.0; 3]);
            assert_eq!(s.submitted("t"), None);
            s.commit_submitted("t", 4, Some(&[1.0, -2.0, 0.5]))
                .expect("commit");
            s.admit_round("t", "m.onnx", b"old", Mark::of(1, 1, 1, b"old"))
                .expect("round");
            s.admit_round("t", "m.onnx", b"msg", Mark::of(1, 2, 2, b"msg"))
                .expect("round");
            db.flush().expect("flush");
        }
        let db = crate::statedb::reopen_for_test(&sled::Config::new().path(dir.path()));
        let s = FlState::open(&db).expect("state");
        assert_eq!(s.submitted("t"), Some(4));
        assert_eq!(s.residual("t", 3), vec![1.0, -2.0, 0.5]);
        assert_eq!(
            s.residual("t", 4),
            vec![0.0; 4],
            "a shape change starts from zero"
        );
        assert_eq!(
            s.round("m.onnx"),
            Some(b"msg".to_vec()),
            "the newest message per model"
        );
        assert_eq!(s.round("other.onnx"), None);
        assert_eq!(s.mark("t").expect("reads"), Some(Mark::of(1, 2, 2, b"msg")));
        assert_eq!(s.mark("other").expect("reads"), None);
        s.finish("t").expect("finish");
        assert_eq!(s.residual("t", 3), vec![0.0; 3]);
    }

    #[test]
    fn marks_order_rounds_and_let_reissues_through() {
        let held = Mark::of(2, 3, 100, b"round 3");
        assert_eq!(held.admits(&held), Some(Admission::Again));
        assert_eq!(
            held.admits(&Mark::of(2, 4, 50, b"round 4")),
            Some(Admission::New)
        );
        assert_eq!(
            held.admits(&Mark::of(3, 3, 50, b"v3")),
            Some(Admission::New)
        );
        // The same round re-issued later (an extension's train order, `done`): newer.
        assert_eq!(
            held.admits(&Mark::of(2, 3, 101, b"extended")),
            Some(Admission::New)
        );
        // Older, or the same round issued no later with other bytes: replays.
        assert_eq!(held.admits(&Mark::of(2, 2, 200, b"round 2")), None);
        assert_eq!(held.admits(&Mark::of(1, 9, 200, b"v1")), None);
        assert_eq!(held.admits(&Mark::of(2, 3, 100, b"twin")), None);
        assert_eq!(held.admits(&Mark::of(2, 3, 99, b"earlier")), None);
    }
}
