//! The service's side of federated learning: owns the round [`Engine`], the ONNX evaluator
//! and the task files; takes tasks from the spool, stop requests, updates and registrations,
//! and persists every change before handing back what to publish and journal.
//!
//! Invariant: the actions of [`FlHost::resume`], [`FlHost::pickup`] and [`FlHost::tick`] are
//! handed back after their writes are on disk; those of [`FlHost::on_update`] and
//! [`FlHost::on_registered`] (called per message) after the caller's [`FlHost::persist`],
//! which the service runs at its group commit, before it publishes. So a round message is
//! never published for a state a restart would not find.
//! Boundary: the service loop.

use std::path::{Path, PathBuf};

use super::engine::{Engine, Fleet};
use super::eval::OnnxEvaluator;
use super::files::{self, FilesError};
use super::task::{Members, initial_weights};
use crate::core::Core;
use crate::deploy::engine::Action;

/// The registry as the round engine sees it: registered devices, their groups and whether
/// their status says online.
impl Fleet for Core {
    fn is_registered(&self, device: &str) -> bool {
        self.device(device)
            .is_some_and(|r| r.registration.is_some())
    }

    fn members(&self, members: &Members) -> Vec<(String, bool)> {
        self.devices()
            .filter_map(|r| {
                let reg = r.registration.as_ref()?;
                members
                    .contains(&r.device, &reg.groups)
                    .then(|| (r.device.clone(), r.online))
            })
            .collect()
    }
}

/// Federated learning inside `serve`.
pub struct FlHost {
    state_dir: PathBuf,
    fsync: bool,
    engine: Engine,
    eval: OnnxEvaluator,
}

impl std::fmt::Debug for FlHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlHost")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl FlHost {
    pub fn new(state_dir: &Path, fsync: bool) -> FlHost {
        FlHost {
            state_dir: state_dir.to_owned(),
            fsync,
            engine: Engine::default(),
            eval: OnnxEvaluator::default(),
        }
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
            self.eval.add(id, f.model.clone(), f.spec.params.clone(), h);
        }
        Ok(match persisted {
            Some(p) => self
                .engine
                .restore(p.state, f.key, p.global, p.server, p.updates, now_ms, fleet),
            None => {
                let names: Vec<String> = f.spec.params.iter().map(|p| p.name.clone()).collect();
                let (params, initial) =
                    initial_weights(&f.model, Some(&names)).map_err(|error| {
                        FilesError::Corrupt {
                            path: dir.join("model.onnx"),
                            error,
                        }
                    })?;
                if params != f.spec.params {
                    return Err(FilesError::Corrupt {
                        path: dir.join("model.onnx"),
                        error: "its initializers no longer match the task's params".into(),
                    });
                }
                self.engine.start(f.spec, f.key, initial, now_ms, fleet)
            }
        })
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
                self.persist()?;
            } else if files::spool_dir(&self.state_dir).join(&id).is_dir() {
                // Not taken yet: the next pick-up starts it, and the stop ends it then.
                continue;
            }
            files::clear_stop(&self.state_dir, &id)?;
        }
        out.extend(self.engine.tick(now_ms, fleet, &mut self.eval));
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
        self.engine
            .on_update(device, payload, now_ms, fleet, &mut self.eval)
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
