//! The pipeline host: the one owner of the running pipeline and of a candidate in shadow
//! beside it. A tokio task driven by [`Command`]s from a [`HostHandle`]; the deploy task
//! decides (start, shadow, swap, discard) and the host does it, so the deploy task holds no
//! pipeline and no pipeline dependencies ([`Deps`]).
//!
//! ```text
//! deploy task ──start/shadow/swap/discard/health──► host task ──► Pipeline (live), Pipeline (shadow)
//! remote commands ──restart (weak handle)──────────►     └─► RunningSlot (telemetry)
//! ```
//!
//! Commands run one at a time, in order; a start (module compilation, `init`) runs on a
//! blocking thread while the host waits for it. The host ends when every handle is dropped:
//! it then stops the candidate and the running pipeline, draining them.
//!
//! **Invariant:** only a `swap` replaces the running pipeline; a failed start leaves what
//! ran before running. **Boundary:** spawned by `agent::run`, driven by `deploy::task`.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{
    ArtifactError, Artifacts, Deps, Mode, Origin, Pipeline, PipelineError, PipelineSpec,
    RunningSlot,
};

/// Commands waiting for the host; the deploy task sends one at a time and waits.
const COMMANDS: usize = 8;

/// A pipeline to start: its description, where its modules come from, and what it is.
pub struct Launch {
    pub spec: PipelineSpec,
    pub artifacts: Box<dyn Artifacts>,
    pub origin: Origin,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("pipeline", &self.spec.name)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The host task ended (the agent is stopping, or it panicked).
    #[error("pipeline host stopped")]
    Gone,
}

/// Progress of the candidate's health check: frames processed, and a failure if one stage
/// failed for good.
pub type Health = (u64, Option<String>);

/// The host's closed set of events. Public so that another host can answer them: the fleet
/// simulator (`sim/`) drives the agent's own deploy task against a host that starts nothing
/// and reports health by a scenario rule.
#[derive(Debug)]
pub enum Command {
    /// Start live if nothing runs (the installed or local pipeline at start-up, or after a
    /// rollback left nothing running); `Ok(false)`: something already runs, nothing started.
    Start(Launch, oneshot::Sender<Result<bool, PipelineError>>),
    /// Start a candidate in shadow beside the running pipeline, replacing an older one.
    Shadow(Launch, oneshot::Sender<Result<(), PipelineError>>),
    /// Commit: stop the candidate and the running pipeline, start this one live.
    Swap(Launch, oneshot::Sender<Result<(), PipelineError>>),
    /// Rollback: stop the candidate; the running pipeline stays.
    Discard(oneshot::Sender<()>),
    /// The candidate's health-check progress; `None` without a candidate.
    CandidateHealth(oneshot::Sender<Option<Health>>),
    /// Whether a pipeline runs live.
    IsRunning(oneshot::Sender<bool>),
    /// Stop the live pipeline and start it again from the same description and artifacts;
    /// `Ok(None)`: nothing runs live. On error nothing runs (as after a failed swap).
    Restart(oneshot::Sender<Result<Option<String>, PipelineError>>),
}

/// Cheap to clone; the host stops its pipelines once the last handle is dropped.
#[derive(Debug, Clone)]
pub struct HostHandle {
    tx: mpsc::Sender<Command>,
}

impl HostHandle {
    /// A handle and the receiving end of its commands, for a host other than
    /// [`PipelineHost`] (the fleet simulator's). The handle behaves as `PipelineHost::new`'s:
    /// dropping every clone ends the receiver.
    pub fn channel() -> (HostHandle, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(COMMANDS);
        (HostHandle { tx }, rx)
    }

    async fn ask<T>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, HostError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(cmd(tx)).await.map_err(|_| HostError::Gone)?;
        rx.await.map_err(|_| HostError::Gone)
    }

    /// Starts `launch` live unless a pipeline already runs; `true` if it started.
    pub async fn start(&self, launch: Launch) -> Result<bool, HostError> {
        Ok(self.ask(|tx| Command::Start(launch, tx)).await??)
    }

    /// Starts `launch` in shadow as the candidate (an older candidate is stopped after).
    pub async fn shadow(&self, launch: Launch) -> Result<(), HostError> {
        Ok(self.ask(|tx| Command::Shadow(launch, tx)).await??)
    }

    /// Stops the candidate and the running pipeline, then starts `launch` live. On error
    /// nothing runs.
    pub async fn swap(&self, launch: Launch) -> Result<(), HostError> {
        Ok(self.ask(|tx| Command::Swap(launch, tx)).await??)
    }

    /// Stops the candidate, if any; the running pipeline stays.
    pub async fn discard(&self) -> Result<(), HostError> {
        self.ask(Command::Discard).await
    }

    pub async fn candidate_health(&self) -> Result<Option<Health>, HostError> {
        self.ask(Command::CandidateHealth).await
    }

    pub async fn is_running(&self) -> Result<bool, HostError> {
        self.ask(Command::IsRunning).await
    }

    /// Restarts the live pipeline; the name of the pipeline restarted, `None` if none runs.
    pub async fn restart(&self) -> Result<Option<String>, HostError> {
        Ok(self.ask(Command::Restart).await??)
    }

    /// A handle that does not keep the host running (the host still stops its pipelines
    /// once the deploy task's handle is gone).
    pub fn downgrade(&self) -> WeakHostHandle {
        WeakHostHandle {
            tx: self.tx.downgrade(),
        }
    }
}

/// See [`HostHandle::downgrade`].
#[derive(Debug, Clone)]
pub struct WeakHostHandle {
    tx: mpsc::WeakSender<Command>,
}

impl WeakHostHandle {
    /// A handle while the host runs.
    pub fn upgrade(&self) -> Option<HostHandle> {
        self.tx.upgrade().map(|tx| HostHandle { tx })
    }

    /// A handle to a host that has already stopped.
    #[cfg(test)]
    pub(crate) fn gone() -> WeakHostHandle {
        let (tx, _) = mpsc::channel(1);
        WeakHostHandle { tx: tx.downgrade() }
    }
}

/// What the live pipeline was started from, for a restart.
struct Relaunch {
    spec: super::PipelineSpec,
    artifacts: Arc<dyn Artifacts>,
    origin: Origin,
}

/// One set of artifacts shared by the start and later restarts.
struct Shared(Arc<dyn Artifacts>);

impl Artifacts for Shared {
    fn module(&self, name: &str) -> Result<Vec<u8>, ArtifactError> {
        self.0.module(name)
    }
    fn model(&self, name: &str) -> Result<edge_inference::ModelFiles, ArtifactError> {
        self.0.model(name)
    }
    fn base_dir(&self) -> Option<&Path> {
        self.0.base_dir()
    }
}

/// Owns the pipelines; see the module docs.
pub struct PipelineHost {
    deps: Deps,
    /// Where telemetry finds the running pipeline's stats.
    slot: RunningSlot,
    running: Option<Pipeline>,
    /// What `running` was started from.
    live: Option<Relaunch>,
    candidate: Option<Pipeline>,
    rx: mpsc::Receiver<Command>,
}

impl PipelineHost {
    /// A host that runs pipelines against `deps` and publishes the live one in `slot`.
    pub fn new(deps: Deps, slot: RunningSlot) -> (PipelineHost, HostHandle) {
        let (tx, rx) = mpsc::channel(COMMANDS);
        let host = PipelineHost {
            deps,
            slot,
            running: None,
            live: None,
            candidate: None,
            rx,
        };
        (host, HostHandle { tx })
    }

    /// Runs commands until every handle is gone, then stops both pipelines (draining them).
    pub async fn run(mut self) {
        while let Some(cmd) = self.rx.recv().await {
            match cmd {
                Command::Start(launch, reply) => {
                    let result = if self.running.is_some() {
                        Ok(false)
                    } else {
                        self.go_live(launch).await.map(|()| true)
                    };
                    let _ = reply.send(result);
                }
                Command::Shadow(launch, reply) => {
                    let result = match start(launch, self.deps.clone(), Mode::Shadow).await {
                        Ok(p) => {
                            if let Some(old) = self.candidate.replace(p) {
                                stop(old).await;
                            }
                            Ok(())
                        }
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(result);
                }
                Command::Swap(launch, reply) => {
                    if let Some(c) = self.candidate.take() {
                        stop(c).await;
                    }
                    if let Some(old) = self.running.take() {
                        self.slot.set(None);
                        stop(old).await;
                    }
                    let _ = reply.send(self.go_live(launch).await);
                }
                Command::Discard(reply) => {
                    if let Some(c) = self.candidate.take() {
                        stop(c).await;
                    }
                    let _ = reply.send(());
                }
                Command::CandidateHealth(reply) => {
                    let _ = reply.send(self.candidate.as_ref().map(|c| c.stats().health()));
                }
                Command::IsRunning(reply) => {
                    let _ = reply.send(self.running.is_some());
                }
                Command::Restart(reply) => {
                    let result = match (self.running.take(), self.live.take()) {
                        (Some(old), Some(live)) => {
                            self.slot.set(None);
                            stop(old).await;
                            let name = live.spec.name.clone();
                            self.go_live(Launch {
                                spec: live.spec,
                                artifacts: Box::new(Shared(live.artifacts)),
                                origin: live.origin,
                            })
                            .await
                            .map(|()| Some(name))
                        }
                        (running, live) => {
                            self.running = running;
                            self.live = live;
                            Ok(None)
                        }
                    };
                    let _ = reply.send(result);
                }
            }
        }
        self.slot.set(None);
        let (candidate, running) = (self.candidate.take(), self.running.take());
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(c) = candidate {
                c.stop();
            }
            if let Some(r) = running {
                r.stop();
            }
        })
        .await;
    }

    async fn go_live(&mut self, launch: Launch) -> Result<(), PipelineError> {
        let artifacts: Arc<dyn Artifacts> = Arc::from(launch.artifacts);
        let relaunch = Relaunch {
            spec: launch.spec.clone(),
            artifacts: artifacts.clone(),
            origin: launch.origin.clone(),
        };
        let launch = Launch {
            spec: launch.spec,
            artifacts: Box::new(Shared(artifacts)),
            origin: launch.origin,
        };
        let p = start(launch, self.deps.clone(), Mode::Live).await?;
        self.slot.set(Some(p.stats()));
        self.running = Some(p);
        self.live = Some(relaunch);
        Ok(())
    }
}

async fn start(launch: Launch, deps: Deps, mode: Mode) -> Result<Pipeline, PipelineError> {
    run_start(launch.spec, launch.artifacts, deps, mode, launch.origin).await
}

/// Starts a pipeline on a blocking thread (module compilation and `init` block).
pub async fn run_start(
    spec: PipelineSpec,
    artifacts: Box<dyn Artifacts>,
    deps: Deps,
    mode: Mode,
    origin: Origin,
) -> Result<Pipeline, PipelineError> {
    tokio::task::spawn_blocking(move || {
        let started = Pipeline::start(&spec, artifacts.as_ref(), &deps, mode, origin);
        // Compiling modules (cranelift, on its own threads and arenas) and loading models free
        // far more than a running pipeline keeps: hand it back to the kernel.
        crate::memory::release();
        started
    })
    .await
    .unwrap_or_else(|e| {
        Err(PipelineError::Thread(std::io::Error::other(format!(
            "pipeline start panicked: {e}"
        ))))
    })
}

async fn stop(p: Pipeline) {
    let _ = tokio::task::spawn_blocking(move || p.stop()).await;
}
