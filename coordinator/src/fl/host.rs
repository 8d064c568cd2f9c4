//! The service's side of federated learning: owns the round [`Engine`], the evaluation thread
//! ([`Worker`]) and the task files; takes tasks from the spool, stop requests, updates,
//! registrations and evaluation outcomes, and persists every change before handing back what
//! to publish and journal.
//!
//! Evaluations the engine asks for go to the worker (tasks with a held-out set) or are
//! answered at once (tasks without one, so their rounds' lines are not delayed); outcomes come
//! back through [`FlHost::next_evaluated`], which the service loop selects on, and
//! [`FlHost::on_evaluated`].
//!
//! Invariant: the actions of [`FlHost::resume`], [`FlHost::pickup`] and [`FlHost::tick`] are
//! handed back after their writes are on disk; those of [`FlHost::on_update`] and
//! [`FlHost::on_registered`] (called per message) after the caller's [`FlHost::persist`],
//! which the service runs at its group commit, before it publishes. So a round message is
//! never published for a state a restart would not find. Those of [`FlHost::on_evaluated`]
//! (events only) are journaled before the next persist: see there.
//! Boundary: the service loop.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use protocol::v1::binary::BinaryEnvelope;
use protocol::v1::deploy::SigningKey;
use protocol::v1::fl;

use super::engine::{Engine, EvalOutcome, EvalRequest, Fleet};
use super::files::{self, FilesError};
use super::parts::Parts;
use super::task::{Members, initial_weights};
use super::worker::{Evaluated, Worker, WorkerError};
use crate::action::Action;
use crate::enrollment::EnrolledFleet;

/// The registry as the round engine sees it: enrolled devices that registered, the groups
/// their enrollment gave them and whether their status says online.
impl Fleet for EnrolledFleet<'_> {
    fn is_registered(&self, device: &str) -> bool {
        self.groups(device).is_some()
    }

    fn members(&self, members: &Members) -> Vec<(String, bool)> {
        self.registered()
            .filter(|(r, groups)| members.contains(&r.device, groups))
            .map(|(r, _)| (r.device.clone(), r.online))
            .collect()
    }
}

/// Federated learning inside `serve`.
pub struct FlHost {
    state_dir: PathBuf,
    fsync: bool,
    /// The coordinator identity's signing key: every task's round messages are signed with it.
    key: SigningKey,
    engine: Engine,
    /// Started with the first task that has a held-out set.
    worker: Option<Worker>,
    /// Tasks whose held-out set the worker has.
    holdouts: BTreeSet<String>,
    /// Kept so the channel never closes while the host lives: `next_evaluated` then waits
    /// instead of ending when no worker runs.
    results_tx: mpsc::UnboundedSender<Evaluated>,
    results: mpsc::UnboundedReceiver<Evaluated>,
    /// Parts of updates too big for one message, on disk until whole.
    parts: Parts,
}

impl std::fmt::Debug for FlHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlHost")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl FlHost {
    /// `key` signs every round message (the coordinator identity's signing key, which devices
    /// pinned at enrollment).
    pub fn new(state_dir: &Path, fsync: bool, key: SigningKey) -> FlHost {
        // Unbounded: at most one outcome per closed round, and the worker must never block
        // on a full queue while the service loop waits on it at shutdown.
        let (results_tx, results) = mpsc::unbounded_channel();
        FlHost {
            state_dir: state_dir.to_owned(),
            fsync,
            key,
            engine: Engine::default(),
            worker: None,
            holdouts: BTreeSet::new(),
            results_tx,
            results,
            parts: Parts::new(state_dir, fsync),
        }
    }

    /// Round messages are signed with `key` from now on (the coordinator rotated its identity).
    pub fn set_key(&mut self, key: SigningKey) {
        self.key = key;
    }

    /// Hands the engine's evaluation requests to the worker; answers those of tasks without
    /// a held-out set (or when the worker cannot take them) at once.
    fn dispatch(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        for request in self.engine.take_evaluations() {
            let outcome = if self.holdouts.contains(&request.task) {
                match self.send(request.clone()) {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::error!(task = %request.task, error = %e, "federated evaluation not run");
                        EvalOutcome::Unavailable(e.to_string())
                    }
                }
            } else {
                EvalOutcome::NoHoldout
            };
            out.extend(
                self.engine
                    .on_evaluated(&request.task, request.version, outcome),
            );
        }
        out
    }

    fn send(&mut self, request: EvalRequest) -> Result<(), WorkerError> {
        self.worker
            .as_ref()
            .ok_or(WorkerError::Stopped)?
            .evaluate(request)
    }

    /// The next evaluation outcome; waits for ever while none is running.
    pub async fn next_evaluated(&mut self) -> Evaluated {
        match self.results.recv().await {
            Some(e) => e,
            // Not reached: we hold a sender.
            None => std::future::pending().await,
        }
    }

    /// An outcome from [`FlHost::next_evaluated`]: the closed round's `fl_round_closed` (and
    /// `fl_task_finished` if it was the task's last). Journal them before the next
    /// [`FlHost::persist`]: a crash in between leaves the evaluation pending in `state.json`,
    /// so a restart runs it again and the line repeats rather than goes missing.
    pub fn on_evaluated(&mut self, e: Evaluated) -> Vec<Action> {
        self.engine.on_evaluated(&e.task, e.version, e.outcome)
    }

    /// Stops the evaluation thread after the evaluations already asked for, and returns their
    /// outcomes (the service journals and persists them before it exits; one that is still
    /// missing stays pending in `state.json` and runs again at the next start).
    pub async fn shutdown(&mut self) -> Vec<Evaluated> {
        if let Some(mut w) = self.worker.take() {
            w.shutdown().await;
        }
        let mut out = Vec::new();
        while let Ok(e) = self.results.try_recv() {
            out.push(e);
        }
        out
    }

    /// Tasks not finished.
    pub fn active_count(&self) -> usize {
        self.engine.active_count()
    }

    /// Start-up: resumes every task directory (a task that cannot be read is logged and
    /// skipped), then takes the spool.
    pub fn resume(&mut self, now_ms: u64, fleet: &dyn Fleet) -> Result<Vec<Action>, FilesError> {
        let mut out = Vec::new();
        for id in files::tasks(&self.state_dir)? {
            match self.load(&id, now_ms, fleet) {
                Ok(actions) => out.extend(actions),
                Err(e) => {
                    tracing::error!(task = %id, error = %e, "cannot resume federated task; it is not running")
                }
            }
        }
        self.persist()?;
        out.extend(self.pickup(now_ms, fleet)?);
        Ok(out)
    }

    /// Loads one task directory: its persisted state, or (taken from the spool but stopped
    /// before the first state was written) a fresh start.
    fn load(
        &mut self,
        id: &str,
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Result<Vec<Action>, FilesError> {
        let dir = files::task_dir(&self.state_dir, id);
        let f = files::load_task_files(&dir)?;
        if f.spec.id != id {
            return Err(FilesError::Corrupt {
                path: dir,
                error: format!("holds task {}", f.spec.id),
            });
        }
        let persisted = files::load_persisted(&self.state_dir, id)?;
        if let Some(h) = f.holdout {
            if self.worker.is_none() {
                match Worker::start(self.results_tx.clone()) {
                    Ok(w) => self.worker = Some(w),
                    // Its evaluations are recorded as unavailable (dispatch); the task runs.
                    Err(e) => tracing::error!(error = %e, "federated evaluation disabled"),
                }
            }
            if let Some(w) = &self.worker {
                match w.add(
                    id,
                    f.model.clone(),
                    f.spec.params.clone(),
                    h,
                    f.spec.eval_output.clone(),
                ) {
                    Ok(()) => {
                        self.holdouts.insert(id.to_owned());
                    }
                    Err(e) => {
                        tracing::error!(task = %id, error = %e, "held-out set not registered")
                    }
                }
            } else {
                // dispatch() records its evaluations as unavailable (`WorkerError::Stopped`).
                self.holdouts.insert(id.to_owned());
            }
        }
        let mut actions = match persisted {
            Some(p) => self.engine.restore(
                p.state,
                self.key.clone(),
                p.global,
                p.server,
                p.updates,
                now_ms,
                fleet,
            ),
            None => {
                let names: Vec<String> = f.spec.params.iter().map(|p| p.name.clone()).collect();
                let (params, initial) =
                    initial_weights(&f.model, Some(&names)).map_err(|e| FilesError::Corrupt {
                        path: dir.join("model.onnx"),
                        error: e.to_string(),
                    })?;
                if params != f.spec.params {
                    return Err(FilesError::Corrupt {
                        path: dir.join("model.onnx"),
                        error: "its initializers no longer match the task's params".into(),
                    });
                }
                self.engine
                    .start(f.spec, self.key.clone(), initial, now_ms, fleet)
            }
        };
        actions.extend(self.dispatch());
        Ok(actions)
    }

    /// Takes new tasks from the spool and starts them.
    pub fn pickup(&mut self, now_ms: u64, fleet: &dyn Fleet) -> Result<Vec<Action>, FilesError> {
        let mut out = Vec::new();
        for id in files::pending(&self.state_dir)? {
            if let Err(e) = files::take(&self.state_dir, &id) {
                tracing::error!(task = %id, error = %e, "cannot take federated task from the spool; moving it aside");
                let spool = files::spool_dir(&self.state_dir);
                let aside = spool.join(format!(".refused-{id}-{now_ms}"));
                if let Err(e) = std::fs::rename(spool.join(&id), &aside) {
                    tracing::error!(task = %id, error = %e, "cannot move the refused task aside");
                }
                continue;
            }
            match self.load(&id, now_ms, fleet) {
                Ok(actions) => out.extend(actions),
                Err(e) => tracing::error!(task = %id, error = %e, "cannot start federated task"),
            }
        }
        self.persist()?;
        Ok(out)
    }

    /// Deadlines, waiting tasks, new tasks and stop requests.
    pub fn tick(&mut self, now_ms: u64, fleet: &dyn Fleet) -> Result<Vec<Action>, FilesError> {
        let mut out = self.pickup(now_ms, fleet)?;
        for id in files::stop_requests(&self.state_dir)? {
            if self.engine.contains(&id) {
                out.extend(self.engine.stop(&id, "stopped by fl stop", now_ms, fleet));
                out.extend(self.dispatch());
                self.persist()?;
            } else if files::spool_dir(&self.state_dir).join(&id).is_dir() {
                // Not taken yet: the next pick-up starts it, and the stop ends it then.
                continue;
            }
            files::clear_stop(&self.state_dir, &id)?;
        }
        out.extend(self.engine.tick(now_ms, fleet));
        out.extend(self.dispatch());
        self.persist()?;
        Ok(out)
    }

    /// An `fl/update` message on `device`'s topic. Call [`FlHost::persist`] before
    /// publishing what it returns.
    pub fn on_update(
        &mut self,
        device: &str,
        payload: &[u8],
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
        let mut out = match BinaryEnvelope::decode(payload) {
            Ok(e) if e.kind == fl::chunks::PART_KIND && e.device == device => {
                self.on_part(device, e, now_ms, fleet)
            }
            Ok(e) => self.engine.on_envelope(device, &e, now_ms, fleet),
            // The engine counts and journals the refusal.
            Err(_) => self.engine.on_update(device, payload, now_ms, fleet),
        };
        out.extend(self.dispatch());
        out
    }

    /// One part of an update too big for one message: kept on disk; the update, once whole,
    /// is admitted like any other (under the id of the part that completed it).
    fn on_part(
        &mut self,
        device: &str,
        mut envelope: BinaryEnvelope,
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
        match self.parts.add(device, &envelope.body) {
            Ok(None) => Vec::new(),
            Ok(Some(body)) => {
                envelope.kind = fl::UPDATE_KIND.to_owned();
                envelope.body = body;
                self.engine.on_envelope(device, &envelope, now_ms, fleet)
            }
            Err(e) => {
                let part = fl::UpdatePart::decode(&envelope.body).ok();
                tracing::warn!(%device, error = %e, "federated update part refused");
                vec![self.engine.refuse(
                    part.as_ref().map(|p| p.task.as_str()),
                    device,
                    part.as_ref().map(|p| p.round),
                    format!("update part: {e}"),
                )]
            }
        }
    }

    /// A device registered (with these groups). Call [`FlHost::persist`] before publishing
    /// what it returns.
    pub fn on_registered(&mut self, device: &str, groups: &[String], now_ms: u64) -> Vec<Action> {
        self.engine.on_registered(device, groups, now_ms)
    }

    /// Writes every change not yet on disk (one group of fsyncs for a whole batch).
    pub fn persist(&mut self) -> Result<(), FilesError> {
        let writes = self.engine.take_writes();
        if writes.is_empty() {
            return Ok(());
        }
        files::apply(&self.state_dir, writes, self.fsync)
    }
}
