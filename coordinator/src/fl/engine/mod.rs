//! The round engine: every federated task, its rounds, client selection, update validation,
//! aggregation and the round messages. No I/O and no clock: the service passes the time and
//! a [`Fleet`] view of the registry, publishes and journals the returned [`Action`]s, and
//! persists [`Engine::take_writes`] before it publishes (so a round message never names a
//! round the store does not know).
//!
//! Held-out evaluation is not run here: closing a round queues an [`EvalRequest`]
//! ([`Engine::take_evaluations`]) and the host runs it off the service loop (ONNX Runtime on
//! up to 10,000 rows would stall every ack and publish behind it). The next round opens at
//! once; the closed round's `fl_round_closed` waits for its figures and is handed out by
//! [`Engine::on_evaluated`], so the journal keeps one complete line per round (readers take
//! `eval_accuracy` from it). A task that finishes meanwhile holds its `fl_task_finished`
//! back until its last evaluation is in, so it still comes after every round's line.
//!
//! Rules it decides (the module docs of [`crate::fl`] state them for operators):
//! - a round opens when at least `min_clients` members are online; it selects
//!   `max(min_clients, ceil(fraction * online))` of them with a shuffle seeded by the task's
//!   seed and the round, and publishes a signed round message, retained, to every registered
//!   member (train order only for the selected);
//! - it closes early once `ceil(quorum * selected)` on-time updates are in; at the deadline it
//!   closes if at least `min_updates` updates (on time or late) are in, else it is extended by
//!   `round_timeout_s` and topped up with online members not yet selected;
//! - late updates: see [`crate::fl`].
//!
//! Files, by job: `selection` (who trains: opening a round, the seeded shuffle, extensions),
//! `admission` (an update's way in: decoding, validation, rejections by reason, the quorum
//! check), `rounds` (closing, evaluation outcomes, deadlines, finishing), `messages` (signed
//! round messages). This file holds the types, starting, resuming and stopping tasks.

use std::collections::{BTreeMap, BTreeSet};

use protocol::v1::deploy::SigningKey;
use protocol::v1::fl::{self, RoundHeader};

use super::aggregate::ServerState;
use super::eval::{EvalError, EvalMetrics};
use super::state::{Phase, RoundMetrics, StoredUpdate, TaskState, Totals};
use super::task::{Members, TaskSpec};
use crate::action::Action;
use crate::event::Event;

mod admission;
mod fetch;
mod messages;
mod rounds;
mod selection;
#[cfg(test)]
mod tests;

pub use selection::select;

/// Global weight versions kept in the store per task (the newest and a few before it).
pub const KEEP_VERSIONS: u32 = 3;

/// The registry as the engine needs it.
pub trait Fleet {
    /// True once the device has registered.
    fn is_registered(&self, device: &str) -> bool;
    /// The registered devices that belong to `members`, with whether each is online.
    fn members(&self, members: &Members) -> Vec<(String, bool)>;
}

/// Something to persist, in order, before the actions that came with it are published.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    State {
        task: String,
        state: Box<TaskState>,
    },
    Weights {
        task: String,
        version: u32,
        weights: Vec<f32>,
    },
    DropWeights {
        task: String,
        version: u32,
    },
    /// The optimizer state after `version`.
    Server {
        task: String,
        version: u32,
        state: ServerState,
    },
    /// An update accepted into `round`.
    Update {
        task: String,
        round: u32,
        update: StoredUpdate,
    },
    /// `round` closed or the task ended: its accepted updates go.
    ClearUpdates {
        task: String,
        round: u32,
    },
}

/// Global weights to evaluate on a task's held-out set, asked for when a round closes.
///
/// Handed out through [`Engine::take_evaluations`] rather than as an [`Action`]: `Action` is
/// what the service publishes and journals for every engine, and an evaluation must never
/// reach it; a separate queue makes that a matter of types.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRequest {
    pub task: String,
    pub version: u32,
    pub weights: Vec<f32>,
}

/// What an evaluation gave.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalOutcome {
    /// The task has no held-out set: the round carries no eval figures.
    NoHoldout,
    Metrics(EvalMetrics),
    /// It could not run (no runtime, a model that does not run); recorded as
    /// `eval unavailable: REASON`, and the task goes on.
    Unavailable(String),
}

impl From<Option<Result<EvalMetrics, EvalError>>> for EvalOutcome {
    /// The [`super::eval::Evaluator`]'s answer.
    fn from(r: Option<Result<EvalMetrics, EvalError>>) -> EvalOutcome {
        match r {
            None => EvalOutcome::NoHoldout,
            Some(Ok(m)) => EvalOutcome::Metrics(m),
            Some(Err(why)) => EvalOutcome::Unavailable(why.to_string()),
        }
    }
}

/// The note recorded for an evaluation that a restart cut short and that cannot be run again
/// (its weights are no longer the current global model).
pub const EVAL_LOST_ON_RESTART: &str =
    "the coordinator restarted before it finished and a newer global version replaced it";

struct Task {
    key: SigningKey,
    state: TaskState,
    global: Vec<f32>,
    server: ServerState,
    /// Accepted updates of the current round by (device, origin round).
    accepted: BTreeMap<(String, u32), StoredUpdate>,
    /// The chunk digests of `global` and the version they describe, for models too big for
    /// a round message (computed once per version, not once per device).
    blob: Option<(u32, fl::WeightsBlob)>,
    /// Devices whose own round topic holds a message of this task (see `messages`): cleared
    /// when the task's rounds go to its group's topic and they are not selected any more.
    personal: BTreeSet<String>,
    /// The last announcement went to the group's topic: a (re)registering member that is not
    /// to train finds the round there.
    broadcast: bool,
}

impl Task {
    /// A signed round message for `header` (its blob filled in when the weights travel in
    /// chunks).
    fn encode_round(&mut self, mut header: RoundHeader) -> Result<Vec<u8>, fl::FlError> {
        if self.global.len() <= fl::chunks::MAX_INLINE_WEIGHTS {
            return fl::encode_round(&header, &self.global, &self.key);
        }
        header.blob = Some(cached_blob(&mut self.blob, self.state.version, &self.global).clone());
        fl::encode_round(&header, &[], &self.key)
    }
}

/// The blob of `global` at `version`, from `cache` or computed into it. A function of the
/// fields it needs, not a method, so a caller can hold it and `global` at once.
fn cached_blob<'a>(
    cache: &'a mut Option<(u32, fl::WeightsBlob)>,
    version: u32,
    global: &[f32],
) -> &'a fl::WeightsBlob {
    if cache.as_ref().is_none_or(|(v, _)| *v != version) {
        *cache = Some((version, fl::WeightsBlob::of(global)));
    }
    &cache.as_ref().expect("just set").1
}

/// Every federated task the coordinator runs.
#[derive(Default)]
pub struct Engine {
    tasks: BTreeMap<String, Task>,
    writes: Vec<Write>,
    evaluations: Vec<EvalRequest>,
    dirty: BTreeSet<String>,
    /// Rejections that name no known task, by reason.
    unattributed: BTreeMap<String, u64>,
    noise: Noise,
}

/// Randomness for differential privacy's noise: from the OS, never the task's `seed` (the task
/// file, and so anyone who reads it, knows that).
struct Noise(rand::rngs::StdRng);

impl Default for Noise {
    fn default() -> Self {
        Noise(rand::SeedableRng::from_entropy())
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("tasks", &self.tasks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub fn contains(&self, task: &str) -> bool {
        self.tasks.contains_key(task)
    }

    pub fn state(&self, task: &str) -> Option<&TaskState> {
        self.tasks.get(task).map(|t| &t.state)
    }

    pub fn global(&self, task: &str) -> Option<&[f32]> {
        self.tasks.get(task).map(|t| t.global.as_slice())
    }

    /// Tasks not finished.
    pub fn active_count(&self) -> usize {
        self.tasks
            .values()
            .filter(|t| !matches!(t.state.phase, Phase::Finished { .. }))
            .count()
    }

    /// Rejections of updates that named no known task, by reason.
    pub fn unattributed(&self) -> &BTreeMap<String, u64> {
        &self.unattributed
    }

    /// What to persist since the last call: queued writes, then the state of every task that
    /// changed.
    pub fn take_writes(&mut self) -> Vec<Write> {
        let mut out = std::mem::take(&mut self.writes);
        for id in std::mem::take(&mut self.dirty) {
            if let Some(t) = self.tasks.get(&id) {
                out.push(Write::State {
                    task: id,
                    state: Box::new(t.state.clone()),
                });
            }
        }
        out
    }

    /// Evaluations asked for since the last call, oldest first. The host runs each and hands
    /// the outcome back through [`Engine::on_evaluated`].
    pub fn take_evaluations(&mut self) -> Vec<EvalRequest> {
        std::mem::take(&mut self.evaluations)
    }

    /// Starts a new task at round 1 from `initial` weights; opens the round if enough members
    /// are online. A task id already known is ignored.
    pub fn start(
        &mut self,
        spec: TaskSpec,
        key: SigningKey,
        initial: Vec<f32>,
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
        let id = spec.id.clone();
        if self.tasks.contains_key(&id) {
            return Vec::new();
        }
        if initial.len() != spec.weight_count() {
            tracing::error!(task = %id, weights = initial.len(), expected = spec.weight_count(), "initial weights do not match the params; task not started");
            return Vec::new();
        }
        let n = initial.len();
        let state = TaskState {
            version: 0,
            round: 1,
            phase: Phase::Waiting {
                reason: "starting".into(),
            },
            selected: BTreeSet::new(),
            deadline_ms: 0,
            not_before_ms: 0,
            recent: BTreeMap::new(),
            current: RoundMetrics {
                round: 1,
                ..RoundMetrics::default()
            },
            history: Vec::new(),
            evaluating: BTreeSet::new(),
            totals: Totals::default(),
            failed_in_a_row: 0,
            started_ms: now_ms,
            finished_ms: None,
            spec,
        };
        self.writes.push(Write::Weights {
            task: id.clone(),
            version: 0,
            weights: initial.clone(),
        });
        self.writes.push(Write::Server {
            task: id.clone(),
            version: 0,
            state: ServerState::new(n),
        });
        self.tasks.insert(
            id.clone(),
            Task {
                key,
                state,
                global: initial,
                server: ServerState::new(n),
                accepted: BTreeMap::new(),
                blob: None,
                personal: BTreeSet::new(),
                broadcast: false,
            },
        );
        self.dirty.insert(id.clone());
        let mut out: Vec<Action> = self.started_event(&id, false).into_iter().collect();
        if let Some(reason) = self.conflict(&id, fleet) {
            // Ended before it sent anything: a done message would replace the other task's
            // retained round on the shared topics.
            if let Some(t) = self.tasks.get_mut(&id) {
                t.state.phase = Phase::Finished {
                    reason: reason.clone(),
                };
                t.state.finished_ms = Some(now_ms);
            }
            out.push(Action::Event(Event::FlTaskFinished {
                task: id,
                reason,
                rounds_closed: 0,
                version: 0,
            }));
            return out;
        }
        out.extend(self.try_open(&id, now_ms, fleet));
        out
    }

    /// Why task `id` cannot run beside the running ones: a device has one round topic, so
    /// two tasks sharing a member would overwrite each other's retained round messages.
    fn conflict(&self, id: &str, fleet: &dyn Fleet) -> Option<String> {
        let mine = &self.tasks.get(id)?.state.spec.members;
        let my_devices: BTreeSet<String> =
            fleet.members(mine).into_iter().map(|(d, _)| d).collect();
        for (other, t) in &self.tasks {
            if other == id || matches!(t.state.phase, Phase::Finished { .. }) {
                continue;
            }
            let theirs = &t.state.spec.members;
            let mut shared: BTreeSet<String> = fleet
                .members(theirs)
                .into_iter()
                .map(|(d, _)| d)
                .filter(|d| my_devices.contains(d))
                .collect();
            match (mine, theirs) {
                (Members::Group(a), Members::Group(b)) if a == b => {
                    shared.insert(format!("group {a}"));
                }
                (Members::Devices(a), Members::Devices(b)) => {
                    shared.extend(a.iter().filter(|d| b.contains(d)).cloned());
                }
                _ => {}
            }
            if !shared.is_empty() {
                let shared: Vec<String> = shared.into_iter().collect();
                return Some(format!(
                    "refused: {} already take part in running task {other} (a device has one round topic); stop that task first",
                    shared.join(", ")
                ));
            }
        }
        None
    }

    /// Resumes a persisted task after a restart: an open round is announced again (the
    /// embedded broker forgot its retained messages) with its selection, deadline and the
    /// updates already accepted; a waiting one tries to open.
    ///
    /// Evaluations the restart cut short: the one of the current global version is asked for
    /// again (its weights are at hand, and it is the figure readers want); an older one
    /// (rounds closed faster than evaluations ran) is recorded as unavailable with
    /// [`EVAL_LOST_ON_RESTART`] rather than reloading superseded weights. Either way every
    /// closed round gets its `fl_round_closed`, and a finished task its `fl_task_finished`.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        &mut self,
        state: TaskState,
        key: SigningKey,
        global: Vec<f32>,
        server: ServerState,
        updates: Vec<StoredUpdate>,
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
        let id = state.spec.id.clone();
        if self.tasks.contains_key(&id) {
            return Vec::new();
        }
        let n = state.spec.weight_count();
        let server = if server.n == n {
            server
        } else {
            ServerState::new(n)
        };
        let accepted = updates
            .into_iter()
            .filter(|u| u.delta.len() == n)
            .map(|u| ((u.device.clone(), u.origin), u))
            .collect();
        let finished = matches!(state.phase, Phase::Finished { .. });
        let pending: Vec<u32> = state.evaluating.iter().copied().collect();
        let current = state.version;
        // Only the open round's selected can hold a message on their own topics once rounds
        // go to the group's topic (earlier ones were cleared as each round opened).
        let personal = state.selected.clone();
        self.tasks.insert(
            id.clone(),
            Task {
                key,
                state,
                global,
                server,
                accepted,
                blob: None,
                personal,
                broadcast: false,
            },
        );
        let mut out: Vec<Action> = if finished {
            Vec::new()
        } else {
            self.started_event(&id, true).into_iter().collect()
        };
        for version in pending {
            if version == current
                && let Some(t) = self.tasks.get(&id)
            {
                self.evaluations.push(EvalRequest {
                    task: id.clone(),
                    version,
                    weights: t.global.clone(),
                });
            } else {
                out.extend(self.on_evaluated(
                    &id,
                    version,
                    EvalOutcome::Unavailable(EVAL_LOST_ON_RESTART.into()),
                ));
            }
        }
        if finished {
            return out;
        }
        let open = self
            .tasks
            .get(&id)
            .is_some_and(|t| t.state.phase == Phase::Open);
        if open {
            out.extend(self.announce(&id, None, now_ms, fleet));
            // A deadline that passed while we were down is handled by the next tick.
        } else {
            out.extend(self.try_open(&id, now_ms, fleet));
        }
        out
    }

    fn started_event(&self, id: &str, resumed: bool) -> Option<Action> {
        let t = self.tasks.get(id)?;
        let s = &t.state;
        Some(Action::Event(Event::FlTaskStarted {
            task: id.to_owned(),
            model: s.spec.model.clone(),
            members: s.spec.members.to_string(),
            rounds: s.spec.rounds,
            weights: t.global.len(),
            round: s.round,
            version: s.version,
            resumed,
        }))
    }

    /// Ends a task now (`fl stop`): members get the current global weights with `done`.
    pub fn stop(
        &mut self,
        task: &str,
        reason: &str,
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
        match self.tasks.get(task) {
            Some(t) if !matches!(t.state.phase, Phase::Finished { .. }) => {
                self.finish(task, reason.to_owned(), now_ms, fleet)
            }
            _ => Vec::new(),
        }
    }

    /// A device (re)registered: if it belongs to an open task, it gets the round's message
    /// (its retained copy may be gone with an embedded broker's restart).
    pub fn on_registered(&mut self, device: &str, groups: &[String], now_ms: u64) -> Vec<Action> {
        let ids: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                t.state.phase == Phase::Open && t.state.spec.members.contains(device, groups)
            })
            // Rounds on the group's topic: a member not selected finds its round there.
            .filter(|(_, t)| !t.broadcast || t.state.selected.contains(device))
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.publish_round(&id, device, now_ms));
        }
        out
    }
}
