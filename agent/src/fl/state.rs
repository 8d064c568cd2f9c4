//! What federated learning keeps on the device, in the state database's `fl` tree.
//!
//! ```text
//! round/{model}      the newest verified round message for the model, of whichever task
//!                    (signed bytes, re-verified when read): replayed when a pipeline training
//!                    that model (re)starts, so a reboot or a new deployment gets the newest
//!                    global weights back without the network
//! submitted/{task}   last round whose update is in the outbox (u32 BE): a round is trained
//!                    and sent at most once, also across restarts
//! residual/{task}    the round (u32 BE) whose error-feedback residual is current: the file
//!                    `residual/{task}.{round}` (n x f32 LE); n x f32 LE itself from earlier
//!                    agents
//! mark/{task}        the newest round message admitted for the task: version u32 BE, round
//!                    u32 BE, issued_ms u64 BE, sha256 of the message (32 bytes); anything
//!                    older is refused, also after a restart (see [`Mark::admits`])
//! ```
//!
//! The verified chunks of weights too big for a round message (the round's header names each
//! chunk's digest) are files, `chunks/{task}/{version}/{index}`, not sled values: sled 0.34
//! keeps every page it writes in memory whatever its cache size, so a 20 MB model's chunks would
//! stay in the agent's memory between rounds. A fetch resumes where it stopped, and a restart
//! applies the weights without the network; only the newest version of a task is kept.
//!
//! **Invariant:** `submitted` and `residual` change together in one sled transaction, after
//! the update is durably in the outbox. A crash between the enqueue and that commit retrains
//! the round from the old residual and sends a second update, which the coordinator drops as
//! a duplicate of (task, round, device): the residual stays consistent with what counted.
//! A round message and its task's mark are stored together, in one transaction, and flushed
//! before the message is acted on.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use sled::Transactional;

const TREE: &str = "fl";

#[derive(Debug, thiserror::Error)]
#[error("federated-learning state: {0}")]
pub struct StateError(String);

fn err(e: impl std::fmt::Display) -> StateError {
    StateError(e.to_string())
}

/// A task's name as a file name: itself where it is a plain one, else `#` and a hash of it.
fn file_name(task: &str) -> String {
    let plain = !task.is_empty()
        && task.len() <= 64
        && !task.starts_with('.')
        && task
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if plain {
        task.to_owned()
    } else {
        format!("#{}", &hex::encode(Sha256::digest(task.as_bytes()))[..32])
    }
}

fn io_err(path: &Path, e: std::io::Error) -> StateError {
    StateError(format!("{}: {e}", path.display()))
}

/// The entries of `dir`, none if it does not exist.
fn entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>, StateError> {
    match std::fs::read_dir(dir) {
        Ok(d) => d.collect::<Result<_, _>>().map_err(|e| io_err(dir, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(dir, e)),
    }
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
    /// Where the chunks of weights too big for a round message are kept.
    chunks: PathBuf,
    /// Where error-feedback residuals are kept.
    residuals: PathBuf,
}

impl FlState {
    /// The `fl` tree of `db`, and the files under `dir` (`chunks/`, `residual/`; created when
    /// the first is kept).
    pub fn open(db: &sled::Db, dir: PathBuf) -> Result<FlState, StateError> {
        let tree = db.open_tree(TREE).map_err(err)?;
        // Chunks kept in the tree by earlier agents: sled holds what it wrote in memory, so
        // they moved to files (fetched again when next needed).
        let mut old = sled::Batch::default();
        let mut any = false;
        for k in tree.scan_prefix("chunk/").keys() {
            old.remove(k.map_err(err)?);
            any = true;
        }
        if any {
            tree.apply_batch(old).map_err(err)?;
        }
        Ok(FlState {
            tree,
            chunks: dir.join("chunks"),
            residuals: dir.join("residual"),
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
        let values = |b: &[u8]| {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        match self.tree.get(format!("residual/{task}")) {
            // The round whose residual file is current.
            Ok(Some(v)) if v.len() == 4 => {
                let round = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
                match std::fs::read(self.residual_path(task, round)) {
                    Ok(b) if b.len() == n * 4 => values(&b),
                    _ => vec![0.0; n],
                }
            }
            // Kept in the tree by an earlier agent.
            Ok(Some(v)) if v.len() == n * 4 => values(&v),
            _ => vec![0.0; n],
        }
    }

    fn residual_path(&self, task: &str, round: u32) -> PathBuf {
        self.residuals.join(format!("{}.{round}", file_name(task)))
    }

    /// Removes `task`'s residual files but `keep`'s (best effort: one left behind is only
    /// disk space, and goes at the next commit).
    fn drop_residuals(&self, task: &str, keep: Option<u32>) {
        let prefix = format!("{}.", file_name(task));
        let keep = keep.map(|r| format!("{prefix}{r}"));
        for entry in entries(&self.residuals).unwrap_or_default() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name
                .strip_prefix(&prefix)
                .is_some_and(|r| r.strip_suffix(".tmp").unwrap_or(r).parse::<u32>().is_ok())
                && keep.as_deref() != Some(name)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Records that `round`'s update is queued and stores the residual left after it: the
    /// residual in a file of its own (`residual/{task}.{round}`, written durably first), then
    /// `submitted` and the tree's pointer to that file in one transaction, flushed. A crash
    /// before the transaction leaves a file nothing points to (overwritten if the round is
    /// trained again, removed at the next commit). The residual is not a sled value: sled
    /// 0.34 keeps every page it writes in memory, a model's size for every task with a
    /// compressing codec.
    pub fn commit_submitted(
        &self,
        task: &str,
        round: u32,
        residual: Option<&[f32]>,
    ) -> Result<(), StateError> {
        if let Some(r) = residual {
            std::fs::create_dir_all(&self.residuals).map_err(|e| io_err(&self.residuals, e))?;
            let path = self.residual_path(task, round);
            let bytes: Vec<u8> = r.iter().flat_map(|x| x.to_le_bytes()).collect();
            crate::fsutil::write_durably(&path, &bytes).map_err(|e| io_err(&path, e))?;
        }
        (&self.tree,)
            .transaction(|(t,)| {
                t.insert(format!("submitted/{task}").as_bytes(), &round.to_be_bytes())?;
                if residual.is_some() {
                    t.insert(format!("residual/{task}").as_bytes(), &round.to_be_bytes())?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| err(format!("{e:?}")))?;
        self.tree.flush().map_err(err)?;
        if residual.is_some() {
            self.drop_residuals(task, Some(round));
        }
        Ok(())
    }

    /// The folder of `task`'s chunks, `{chunks}/{task}` ([`file_name`]).
    fn task_dir(&self, task: &str) -> PathBuf {
        self.chunks.join(file_name(task))
    }

    /// The folder of `task`'s chunks at `version`: `{chunks}/{task}/{version}`.
    fn version_dir(&self, task: &str, version: u32) -> PathBuf {
        self.task_dir(task).join(version.to_string())
    }

    /// The chunks of `task`'s weights at `version` held, by index (unordered).
    pub fn chunk_indexes(&self, task: &str, version: u32) -> Result<Vec<u32>, StateError> {
        // `{index}.tmp` is a write a crash cut short: not held.
        Ok(entries(&self.version_dir(task, version))?
            .iter()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect())
    }

    /// Reads chunk `index` of `task`'s weights at `version` into `buf` (cleared first); false
    /// if it is not held. What it holds is only as good as the caller's digest check.
    pub fn read_chunk(
        &self,
        task: &str,
        version: u32,
        index: u32,
        buf: &mut Vec<u8>,
    ) -> Result<bool, StateError> {
        use std::io::Read;
        buf.clear();
        let path = self.version_dir(task, version).join(index.to_string());
        match std::fs::File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(buf).map_err(|e| io_err(&path, e))?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    /// Keeps a verified chunk in its own file (written beside, then renamed in; not fsync'd:
    /// every read checks it against the round's digest, so a chunk a power cut damaged is
    /// dropped and fetched again, never used).
    pub fn put_chunk(
        &self,
        task: &str,
        version: u32,
        index: u32,
        data: &[u8],
    ) -> Result<(), StateError> {
        let dir = self.version_dir(task, version);
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let path = dir.join(index.to_string());
        let tmp = dir.join(format!("{index}.tmp"));
        std::fs::write(&tmp, data).map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))
    }

    /// Drops the chunks of every version of `task` but `keep` (`None`: all of them).
    pub fn drop_chunks(&self, task: &str, keep: Option<u32>) -> Result<(), StateError> {
        let dir = self.task_dir(task);
        let keep = keep.map(|v| v.to_string());
        let mut kept_any = false;
        for entry in entries(&dir)? {
            if keep.as_deref() == entry.file_name().to_str() {
                kept_any = true;
                continue;
            }
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(|e| io_err(&path, e))?;
        }
        if kept_any {
            return Ok(());
        }
        match std::fs::remove_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&dir, e)),
            _ => Ok(()),
        }
    }

    /// Forgets a finished task's residual (its round message and submitted mark stay, so a
    /// replayed final message does nothing).
    pub fn finish(&self, task: &str) -> Result<(), StateError> {
        self.tree.remove(format!("residual/{task}")).map_err(err)?;
        self.drop_residuals(task, None);
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
            let s = FlState::open(&db, dir.path().join("fl")).expect("state");
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
        let s = FlState::open(&db, dir.path().join("fl")).expect("state");
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
    fn chunks_are_files_per_task_and_version_and_old_sled_chunks_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path().join("db")).expect("open");
        // An earlier agent kept its chunks in the tree.
        let tree = db.open_tree(TREE).expect("tree");
        tree.insert(b"chunk/t/\0\0\0\x01/\0\0\0\0", &[1u8; 8][..])
            .expect("old chunk");
        tree.insert(b"submitted/t", &7u32.to_be_bytes()[..])
            .expect("submitted");
        let s = FlState::open(&db, dir.path().join("fl")).expect("state");
        let chunks = dir.path().join("fl/chunks");
        assert_eq!(tree.scan_prefix("chunk/").count(), 0, "old chunks dropped");
        assert_eq!(s.submitted("t"), Some(7), "the rest kept");

        let mut buf = vec![9u8; 3];
        assert!(!s.read_chunk("t", 1, 0, &mut buf).expect("read"));
        assert!(buf.is_empty());
        assert_eq!(s.chunk_indexes("t", 1).expect("indexes"), Vec::<u32>::new());
        s.drop_chunks("t", None).expect("nothing to drop");

        s.put_chunk("t", 1, 0, b"v1 c0").expect("put");
        s.put_chunk("t", 1, 2, b"v1 c2").expect("put");
        s.put_chunk("t", 2, 0, b"v2 c0").expect("put");
        // A task name that is not a file name, and one that would climb out of the folder.
        for odd in ["a/../../b", ".."] {
            s.put_chunk(odd, 1, 0, odd.as_bytes()).expect("put");
            assert!(s.read_chunk(odd, 1, 0, &mut buf).expect("read"));
            assert_eq!(buf, odd.as_bytes());
        }
        // A write a crash cut short is not held.
        std::fs::write(chunks.join("t/1/5.tmp"), b"torn").expect("tmp");
        let mut held = s.chunk_indexes("t", 1).expect("indexes");
        held.sort();
        assert_eq!(held, vec![0, 2]);
        assert!(s.read_chunk("t", 1, 2, &mut buf).expect("read"));
        assert_eq!(buf, b"v1 c2");

        s.drop_chunks("t", Some(2)).expect("drop v1");
        assert_eq!(s.chunk_indexes("t", 1).expect("indexes"), Vec::<u32>::new());
        assert_eq!(s.chunk_indexes("t", 2).expect("indexes"), vec![0]);
        s.drop_chunks("t", None).expect("drop all");
        assert!(
            !chunks.join("t").exists(),
            "the task's folder goes with its last chunk"
        );
        assert!(
            s.read_chunk("a/../../b", 1, 0, &mut buf).expect("read"),
            "other tasks stay"
        );
        let names: Vec<_> = std::fs::read_dir(&chunks)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names.len(),
            2,
            "every task in a folder of its own: {names:?}"
        );
    }

    #[test]
    fn residuals_are_files_the_tree_points_to() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path().join("db")).expect("open");
        let files = dir.path().join("fl/residual");
        let names = || {
            let mut v: Vec<String> = std::fs::read_dir(&files)
                .map(|d| {
                    d.map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        // An earlier agent's residual, in the tree itself, still reads.
        let tree = db.open_tree(TREE).expect("tree");
        let legacy: Vec<u8> = [0.25f32, 0.5]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        tree.insert(b"residual/t", legacy).expect("legacy");
        let s = FlState::open(&db, dir.path().join("fl")).expect("state");
        assert_eq!(s.residual("t", 2), vec![0.25, 0.5]);

        s.commit_submitted("t", 4, Some(&[1.0, 2.0]))
            .expect("commit");
        assert_eq!(names(), ["t.4"]);
        assert_eq!(
            tree.get(b"residual/t").expect("get").expect("set").len(),
            4,
            "a pointer"
        );
        assert_eq!(s.residual("t", 2), vec![1.0, 2.0]);
        // A crash after the file, before the transaction: nothing points to it; one during
        // the write leaves its temporary.
        crate::fsutil::write_durably(&files.join("t.5"), &[0u8; 8]).expect("orphan");
        std::fs::write(files.join("t.7.tmp"), [0u8; 3]).expect("cut short");
        assert_eq!(s.residual("t", 2), vec![1.0, 2.0]);
        // A round without a residual (a codec without error feedback) keeps the file.
        s.commit_submitted("t", 5, None).expect("commit");
        assert_eq!(s.submitted("t"), Some(5));
        assert_eq!(s.residual("t", 2), vec![1.0, 2.0]);
        s.commit_submitted("t", 6, Some(&[3.0, 4.0]))
            .expect("commit");
        assert_eq!(names(), ["t.6"], "older files go");
        assert_eq!(s.residual("t", 2), vec![3.0, 4.0]);
        assert_eq!(
            s.residual("t", 3),
            vec![0.0; 3],
            "another shape starts from zero"
        );
        // The file gone or damaged: zeros, as for a new task.
        std::fs::write(files.join("t.6"), [1u8; 5]).expect("damage");
        assert_eq!(s.residual("t", 2), vec![0.0; 2]);
        s.commit_submitted("other", 1, Some(&[1.0]))
            .expect("commit");
        s.finish("t").expect("finish");
        assert_eq!(names(), ["other.1"]);
        assert_eq!(s.residual("t", 2), vec![0.0; 2]);
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
