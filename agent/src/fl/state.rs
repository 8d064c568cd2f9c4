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
//! ```
//!
//! **Invariant:** `submitted` and `residual` change together in one sled transaction, after
//! the update is durably in the outbox. A crash between the enqueue and that commit retrains
//! the round from the old residual and sends a second update, which the coordinator drops as
//! a duplicate of (task, round, device): the residual stays consistent with what counted.

use sled::Transactional;

const TREE: &str = "fl";

#[derive(Debug, thiserror::Error)]
#[error("federated-learning state: {0}")]
pub struct StateError(String);

fn err(e: impl std::fmt::Display) -> StateError {
    StateError(e.to_string())
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

    pub fn save_round(&self, model: &str, message: &[u8]) -> Result<(), StateError> {
        self.tree
            .insert(format!("round/{model}"), message)
            .map_err(err)?;
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
            s.save_round("m.onnx", b"old").expect("round");
            s.save_round("m.onnx", b"msg").expect("round");
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
        s.finish("t").expect("finish");
        assert_eq!(s.residual("t", 3), vec![0.0; 3]);
    }
}
