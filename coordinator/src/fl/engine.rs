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

use std::collections::{BTreeMap, BTreeSet};

use protocol::v1::binary::BinaryEnvelope;
use protocol::v1::deploy::SigningKey;
use protocol::v1::fl::{self, CodecError, RoundHeader, TrainOrder, Update, codec};
use protocol::v1::topics;

use super::aggregate::{ClientUpdate, ServerState, aggregate};
use super::eval::EvalMetrics;
use super::state::{Phase, RecentRound, Reject, RoundMetrics, StoredUpdate, TaskState, Totals};
use super::task::{Members, TaskSpec};
use crate::deploy::engine::Action;
use crate::event::Event;

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

impl From<Option<Result<EvalMetrics, String>>> for EvalOutcome {
    /// The [`super::eval::Evaluator`]'s answer.
    fn from(r: Option<Result<EvalMetrics, String>>) -> EvalOutcome {
        match r {
            None => EvalOutcome::NoHoldout,
            Some(Ok(m)) => EvalOutcome::Metrics(m),
            Some(Err(why)) => EvalOutcome::Unavailable(why),
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
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("tasks", &self.tasks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// SplitMix64 step: selection shuffles and per-device training seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hash_str(s: &str) -> u64 {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// `count` of `candidates` (sorted first), chosen by a Fisher-Yates shuffle seeded by `seed`.
pub fn select(mut candidates: Vec<String>, count: usize, seed: u64) -> Vec<String> {
    candidates.sort();
    let mut state = seed;
    for i in (1..candidates.len()).rev() {
        state = mix(state);
        let j = (state % (i as u64 + 1)) as usize;
        candidates.swap(i, j);
    }
    candidates.truncate(count);
    candidates.sort();
    candidates
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

    /// The outcome of an [`EvalRequest`]: fills the closed round's eval figures and hands out
    /// its `fl_round_closed` (and the task's `fl_task_finished` if the task ended while its
    /// last evaluation ran). An outcome nobody is waiting for (a replay) is ignored.
    pub fn on_evaluated(&mut self, task: &str, version: u32, outcome: EvalOutcome) -> Vec<Action> {
        let Some(t) = self.tasks.get_mut(task) else {
            return Vec::new();
        };
        let s = &mut t.state;
        if !s.evaluating.remove(&version) {
            return Vec::new();
        }
        self.dirty.insert(task.to_owned());
        let Some(m) = s
            .history
            .iter_mut()
            .find(|m| m.new_version == Some(version))
        else {
            tracing::error!(%task, version, "evaluated version has no closed round; result dropped");
            return Vec::new();
        };
        match outcome {
            EvalOutcome::Metrics(e) => {
                m.eval_accuracy = Some(e.accuracy);
                m.eval_loss = Some(e.loss);
                m.eval_rows = Some(e.rows);
            }
            EvalOutcome::Unavailable(why) => m.eval_note = Some(format!("eval unavailable: {why}")),
            EvalOutcome::NoHoldout => {}
        }
        let mut out = vec![Action::Event(Event::FlRoundClosed {
            task: task.to_owned(),
            metrics: Box::new(m.clone()),
        })];
        if let Phase::Finished { reason } = &s.phase
            && s.evaluating.is_empty()
        {
            out.push(Action::Event(Event::FlTaskFinished {
                task: task.to_owned(),
                reason: reason.clone(),
                rounds_closed: s.history.len() as u32,
                version: s.version,
            }));
        }
        out
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
        self.tasks.insert(
            id.clone(),
            Task {
                key,
                state,
                global,
                server,
                accepted,
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

    /// Deadlines and waiting tasks.
    pub fn tick(&mut self, now_ms: u64, fleet: &dyn Fleet) -> Vec<Action> {
        let ids: Vec<String> = self.tasks.keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            match &t.state.phase {
                Phase::Waiting { .. } => out.extend(self.try_open(&id, now_ms, fleet)),
                Phase::Open if now_ms >= t.state.deadline_ms => {
                    if t.accepted.len() >= t.state.spec.min_updates as usize {
                        out.extend(self.close(&id, "deadline", now_ms, fleet));
                    } else {
                        out.extend(self.extend(&id, now_ms, fleet));
                    }
                }
                _ => {}
            }
        }
        out
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
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.publish_round(&id, device, now_ms));
        }
        out
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

    /// An `fl/update` message from `device` (the topic's). Validates it against the round it
    /// claims; a refused update is counted by reason and never touches the aggregate.
    pub fn on_update(
        &mut self,
        device: &str,
        payload: &[u8],
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
        let envelope = match BinaryEnvelope::decode(payload) {
            Ok(e) => e,
            Err(e) => {
                return vec![self.reject(None, device, None, Reject::Malformed, e.to_string())];
            }
        };
        if envelope.device != device {
            let detail = format!("envelope from {} on the topic of {device}", envelope.device);
            return vec![self.reject(None, device, None, Reject::Malformed, detail)];
        }
        if envelope.kind != fl::UPDATE_KIND {
            let detail = format!(
                "envelope kind {:?}, expected {:?}",
                envelope.kind,
                fl::UPDATE_KIND
            );
            return vec![self.reject(None, device, None, Reject::Malformed, detail)];
        }
        let update = match Update::decode(&envelope.body) {
            Ok(u) => u,
            Err(e) => {
                return vec![self.reject(None, device, None, Reject::Malformed, e.to_string())];
            }
        };
        let task_id = update.task.clone();
        let round = Some(update.round);
        let Some(t) = self.tasks.get_mut(&task_id) else {
            let detail = format!("no task {task_id}");
            return vec![self.reject(None, device, round, Reject::UnknownTask, detail)];
        };
        let body_bytes = envelope.body.len() as u64;
        t.state.current.bytes_in += body_bytes;
        t.state.totals.bytes_in += body_bytes;
        self.dirty.insert(task_id.clone());
        match self.validate(&task_id, device, &update, fleet) {
            Err((reason, detail)) => {
                vec![self.reject(Some(&task_id), device, round, reason, detail)]
            }
            Ok((staleness, delta)) => {
                let mut out: Vec<Action> = self
                    .accept(
                        &task_id,
                        device,
                        &envelope.id,
                        &update,
                        staleness,
                        delta,
                        body_bytes,
                    )
                    .into_iter()
                    .collect();
                out.extend(self.check_quorum(&task_id, now_ms, fleet));
                out
            }
        }
    }

    /// Checks an update against its task and round; the staleness and delta if it counts.
    fn validate(
        &self,
        task_id: &str,
        device: &str,
        u: &Update,
        fleet: &dyn Fleet,
    ) -> Result<(u32, Vec<f32>), (Reject, String)> {
        let Some(t) = self.tasks.get(task_id) else {
            return Err((Reject::UnknownTask, format!("no task {task_id}")));
        };
        let s = &t.state;
        if let Phase::Finished { reason } = &s.phase {
            return Err((Reject::TaskFinished, format!("task finished: {reason}")));
        }
        if !fleet.is_registered(device) {
            return Err((Reject::Unregistered, "device never registered".into()));
        }
        let current = s.round;
        if u.round == 0 || u.round > current || (u.round == current && s.phase != Phase::Open) {
            return Err((
                Reject::UnknownRound,
                format!(
                    "round {} has not opened (current round {current}, {})",
                    u.round,
                    s.phase.name()
                ),
            ));
        }
        let staleness = current - u.round;
        if staleness > s.spec.max_staleness {
            return Err((
                Reject::LateDropped,
                format!(
                    "round {} is {staleness} rounds old; max_staleness is {}",
                    u.round, s.spec.max_staleness
                ),
            ));
        }
        let (selected, version, contributed) = if staleness == 0 {
            (&s.selected, s.version, None)
        } else {
            match s.recent.get(&u.round) {
                Some(r) => (&r.selected, r.version, Some(&r.contributed)),
                None => {
                    return Err((
                        Reject::UnknownRound,
                        format!("round {} is not known", u.round),
                    ));
                }
            }
        };
        if !selected.contains(device) {
            return Err((
                Reject::NotSelected,
                format!("not selected in round {}", u.round),
            ));
        }
        let key = (device.to_owned(), u.round);
        if t.accepted.contains_key(&key) || contributed.is_some_and(|c| c.contains(device)) {
            return Err((
                Reject::Duplicate,
                format!("update for round {} already accepted", u.round),
            ));
        }
        if u.base_version != version {
            return Err((
                Reject::BaseVersion,
                format!(
                    "trained from version {}, round {} sent version {version}",
                    u.base_version, u.round
                ),
            ));
        }
        if !u.loss.is_finite() || !u.accuracy.is_finite() {
            return Err((Reject::NonFinite, "non-finite loss or accuracy".into()));
        }
        let delta = codec::decode(&u.payload, t.global.len()).map_err(|e| {
            let reason = match e {
                CodecError::Length { .. } => Reject::WrongLength,
                CodecError::NonFinite { .. } => Reject::NonFinite,
                _ => Reject::BadPayload,
            };
            (reason, e.to_string())
        })?;
        if delta.len() != t.global.len() {
            return Err((
                Reject::WrongLength,
                format!("{} weights, the model has {}", delta.len(), t.global.len()),
            ));
        }
        Ok((staleness, delta))
    }

    fn reject(
        &mut self,
        task: Option<&str>,
        device: &str,
        round: Option<u32>,
        reason: Reject,
        detail: String,
    ) -> Action {
        match task.and_then(|id| self.tasks.get_mut(id)) {
            Some(t) => {
                if reason == Reject::Duplicate {
                    t.state.current.duplicates += 1;
                    t.state.totals.duplicates += 1;
                } else {
                    *t.state
                        .current
                        .rejected
                        .entry(reason.as_str().into())
                        .or_default() += 1;
                    *t.state
                        .totals
                        .rejected
                        .entry(reason.as_str().into())
                        .or_default() += 1;
                }
                self.dirty.insert(t.state.spec.id.clone());
            }
            None => *self.unattributed.entry(reason.as_str().into()).or_default() += 1,
        }
        Action::Event(Event::FlUpdateRejected {
            task: task.map(str::to_owned),
            device: device.to_owned(),
            round,
            reason: reason.as_str(),
            detail,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn accept(
        &mut self,
        task_id: &str,
        device: &str,
        id: &str,
        u: &Update,
        staleness: u32,
        delta: Vec<f32>,
        bytes: u64,
    ) -> Option<Action> {
        let stored = StoredUpdate {
            device: device.to_owned(),
            origin: u.round,
            staleness,
            samples: u.samples,
            loss: u.loss,
            accuracy: u.accuracy,
            delta,
        };
        let t = self.tasks.get_mut(task_id)?;
        let m = &mut t.state.current;
        m.received += 1;
        if staleness == 0 {
            m.on_time += 1;
        } else {
            m.late += 1;
        }
        t.state.totals.accepted += 1;
        t.accepted
            .insert((device.to_owned(), u.round), stored.clone());
        let applied = t.state.round;
        self.writes.push(Write::Update {
            task: task_id.to_owned(),
            round: applied,
            update: stored,
        });
        self.dirty.insert(task_id.to_owned());
        Some(Action::Event(Event::FlUpdate {
            task: task_id.to_owned(),
            device: device.to_owned(),
            id: id.to_owned(),
            round: u.round,
            applied_round: applied,
            staleness,
            samples: u.samples,
            loss: u.loss,
            bytes,
        }))
    }

    fn check_quorum(&mut self, id: &str, now_ms: u64, fleet: &dyn Fleet) -> Vec<Action> {
        let Some(t) = self.tasks.get(id) else {
            return Vec::new();
        };
        let s = &t.state;
        let on_time = t.accepted.keys().filter(|(_, r)| *r == s.round).count();
        if s.phase == Phase::Open && on_time >= s.spec.quorum_count(s.selected.len()) {
            return self.close(id, "quorum", now_ms, fleet);
        }
        Vec::new()
    }

    /// Opens the current round if enough members are online, else records why it waits.
    fn try_open(&mut self, id: &str, now_ms: u64, fleet: &dyn Fleet) -> Vec<Action> {
        let Some(t) = self.tasks.get_mut(id) else {
            return Vec::new();
        };
        if now_ms < t.state.not_before_ms {
            let reason = format!(
                "round_interval_s: the next round opens at {} ms",
                t.state.not_before_ms
            );
            if t.state.phase
                != (Phase::Waiting {
                    reason: reason.clone(),
                })
            {
                t.state.phase = Phase::Waiting { reason };
                self.dirty.insert(id.to_owned());
            }
            return Vec::new();
        }
        let spec = &t.state.spec;
        let members = fleet.members(&spec.members);
        let online: Vec<String> = members
            .iter()
            .filter(|(_, on)| *on)
            .map(|(d, _)| d.clone())
            .collect();
        if online.len() < spec.min_clients as usize {
            let reason = format!(
                "{} of the {} required members online ({} registered)",
                online.len(),
                spec.min_clients,
                members.len()
            );
            if t.state.phase
                == (Phase::Waiting {
                    reason: reason.clone(),
                })
            {
                return Vec::new();
            }
            t.state.phase = Phase::Waiting {
                reason: reason.clone(),
            };
            self.dirty.insert(id.to_owned());
            return vec![Action::Event(Event::FlRoundWaiting {
                task: id.to_owned(),
                round: t.state.round,
                reason,
            })];
        }
        let count = spec.selection_count(online.len());
        let seed = mix(spec.seed ^ u64::from(t.state.round).rotate_left(32) ^ hash_str(id));
        let selected = select(online, count, seed);
        let s = &mut t.state;
        s.phase = Phase::Open;
        s.selected = selected.iter().cloned().collect();
        s.deadline_ms = now_ms + u64::from(s.spec.round_timeout_s) * 1000;
        s.current.round = s.round;
        s.current.version = s.version;
        s.current.opened_ms = now_ms;
        s.current.selected = s.selected.len() as u32;
        self.dirty.insert(id.to_owned());
        let event = Event::FlRoundOpened {
            task: id.to_owned(),
            round: s.round,
            version: s.version,
            selected,
            deadline_ms: s.deadline_ms,
            members: members.len(),
        };
        let mut out = vec![Action::Event(event)];
        out.extend(self.announce(id, Some(&members), now_ms, fleet));
        out
    }

    /// Publishes the current round's message to every registered member.
    fn announce(
        &mut self,
        id: &str,
        members: Option<&[(String, bool)]>,
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
        let Some(t) = self.tasks.get(id) else {
            return Vec::new();
        };
        let owned;
        let members = match members {
            Some(m) => m,
            None => {
                owned = fleet.members(&t.state.spec.members);
                &owned
            }
        };
        let devices: BTreeSet<String> = members
            .iter()
            .map(|(d, _)| d.clone())
            .chain(t.state.selected.iter().cloned())
            .collect();
        let mut out = Vec::new();
        for device in devices {
            out.extend(self.publish_round(id, &device, now_ms));
        }
        out
    }

    /// The current round's message for one device: a train order if it is selected and its
    /// update is not in yet.
    fn publish_round(&mut self, id: &str, device: &str, now_ms: u64) -> Option<Action> {
        let t = self.tasks.get_mut(id)?;
        let s = &t.state;
        let train = (s.selected.contains(device)
            && !t.accepted.contains_key(&(device.to_owned(), s.round)))
        .then(|| TrainOrder {
            deadline_ms: s.deadline_ms,
            epochs: s.spec.train.epochs,
            lr: s.spec.train.lr,
            batch_size: s.spec.train.batch_size,
            mu: s.spec.train.mu,
            codec: s.spec.train.codec,
            seed: mix(s.spec.seed ^ mix(u64::from(s.round)) ^ hash_str(device)),
            max_samples: s.spec.train.max_samples,
        });
        let header = RoundHeader {
            task: id.to_owned(),
            round: s.round,
            version: s.version,
            model: s.spec.model.clone(),
            params: s.spec.params.clone(),
            issued_ms: now_ms,
            train,
            done: false,
        };
        let payload = match fl::encode_round(&header, &t.global, &t.key) {
            Ok(p) => p,
            Err(e) => {
                // Checked when the task was loaded (size) and kept finite by the optimizer;
                // a failure here is a bug, reported rather than sent malformed.
                tracing::error!(task = %id, %device, error = %e, "cannot encode round message");
                return None;
            }
        };
        let bytes = payload.len() as u64;
        t.state.current.bytes_out += bytes;
        t.state.totals.bytes_out += bytes;
        self.dirty.insert(id.to_owned());
        Some(Action::Publish {
            topic: topics::fl_round(device),
            payload,
            retain: true,
        })
    }

    /// The deadline passed with fewer than `min_updates` updates: wait another
    /// `round_timeout_s`, selecting online members not selected yet up to the usual count.
    fn extend(&mut self, id: &str, now_ms: u64, fleet: &dyn Fleet) -> Vec<Action> {
        let Some(t) = self.tasks.get_mut(id) else {
            return Vec::new();
        };
        let s = &mut t.state;
        let members = fleet.members(&s.spec.members);
        let online: Vec<&String> = members
            .iter()
            .filter(|(_, on)| *on)
            .map(|(d, _)| d)
            .collect();
        let want = s.spec.selection_count(online.len());
        let have = online
            .iter()
            .filter(|d| s.selected.contains(d.as_str()))
            .count();
        let fresh: Vec<String> = online
            .iter()
            .filter(|d| !s.selected.contains(d.as_str()))
            .map(|d| (*d).clone())
            .collect();
        s.current.extensions += 1;
        let seed = mix(s.spec.seed
            ^ u64::from(s.round).rotate_left(32)
            ^ u64::from(s.current.extensions)
            ^ hash_str(id));
        let added = select(fresh, want.saturating_sub(have), seed);
        s.selected.extend(added.iter().cloned());
        s.current.selected = s.selected.len() as u32;
        s.deadline_ms = now_ms + u64::from(s.spec.round_timeout_s) * 1000;
        let event = Event::FlRoundExtended {
            task: id.to_owned(),
            round: s.round,
            received: t.accepted.len() as u32,
            min_updates: s.spec.min_updates,
            added: added.clone(),
            deadline_ms: s.deadline_ms,
        };
        self.dirty.insert(id.to_owned());
        let mut out = vec![Action::Event(event)];
        for device in &added {
            out.extend(self.publish_round(id, device, now_ms));
        }
        out
    }

    /// Aggregates the current round, moves the global model, asks for its evaluation (when
    /// the task has a held-out set), and opens the next round (or finishes the task).
    fn close(&mut self, id: &str, reason: &str, now_ms: u64, fleet: &dyn Fleet) -> Vec<Action> {
        let Some(t) = self.tasks.get_mut(id) else {
            return Vec::new();
        };
        let accepted = std::mem::take(&mut t.accepted);
        let updates: Vec<ClientUpdate> = accepted
            .values()
            .map(|u| ClientUpdate {
                device: u.device.clone(),
                samples: u.samples,
                staleness: u.staleness,
                delta: u.delta.clone(),
            })
            .collect();
        let combined = aggregate(&t.state.spec.rule, &updates);
        let optimizer = t.state.spec.server_optimizer;
        let mut next = t.global.clone();
        t.server.apply(&optimizer, &mut next, &combined);
        if next.iter().all(|w| w.is_finite()) {
            t.global = next;
        } else {
            // Every delta was finite, but a huge one can still overflow: keep the old model
            // rather than publish infinities.
            tracing::error!(task = %id, round = t.state.round, "aggregate overflowed; global model kept");
        }
        let s = &mut t.state;
        let round_version = s.version;
        s.version += 1;
        let total: f64 = accepted.values().map(|u| f64::from(u.samples)).sum();
        if total > 0.0 {
            let mean = |f: fn(&StoredUpdate) -> f32| {
                (accepted
                    .values()
                    .map(|u| f64::from(u.samples) * f64::from(f(u)))
                    .sum::<f64>()
                    / total) as f32
            };
            s.current.train_loss = Some(mean(|u| u.loss));
            s.current.train_accuracy = Some(mean(|u| u.accuracy));
        }
        let evaluate = s.spec.holdout;
        if evaluate {
            s.evaluating.insert(s.version);
            self.evaluations.push(EvalRequest {
                task: id.to_owned(),
                version: s.version,
                weights: t.global.clone(),
            });
        }
        s.current.new_version = Some(s.version);
        s.current.closed_ms = Some(now_ms);
        s.current.close_reason = Some(reason.to_owned());
        // Remember the round for late updates, and who contributed to which round.
        s.recent.insert(
            s.round,
            RecentRound {
                version: round_version,
                selected: std::mem::take(&mut s.selected),
                contributed: BTreeSet::new(),
            },
        );
        for (device, origin) in accepted.keys() {
            if let Some(r) = s.recent.get_mut(origin) {
                r.contributed.insert(device.clone());
            }
        }
        let next_round = s.round + 1;
        let window = s.spec.max_staleness;
        s.recent.retain(|&r, _| next_round - r <= window);
        let closed_round = s.round;
        let metrics = std::mem::take(&mut s.current);
        s.history.push(metrics.clone());
        let finished = s.round >= s.spec.rounds;
        s.round = if finished { s.round } else { next_round };
        s.not_before_ms = now_ms + u64::from(s.spec.round_interval_s) * 1000;
        s.current = RoundMetrics {
            round: s.round,
            version: s.version,
            ..RoundMetrics::default()
        };
        let version = s.version;
        self.writes.push(Write::Weights {
            task: id.to_owned(),
            version,
            weights: t.global.clone(),
        });
        if let Some(old) = version.checked_sub(KEEP_VERSIONS) {
            self.writes.push(Write::DropWeights {
                task: id.to_owned(),
                version: old,
            });
        }
        self.writes.push(Write::Server {
            task: id.to_owned(),
            version,
            state: t.server.clone(),
        });
        self.writes.push(Write::ClearUpdates {
            task: id.to_owned(),
            round: closed_round,
        });
        self.dirty.insert(id.to_owned());
        // With an evaluation pending, the round's line waits for its figures (on_evaluated).
        let mut out = Vec::new();
        if !evaluate {
            out.push(Action::Event(Event::FlRoundClosed {
                task: id.to_owned(),
                metrics: Box::new(metrics),
            }));
        }
        if finished {
            out.extend(self.finish(id, "completed".into(), now_ms, fleet));
        } else {
            out.extend(self.try_open(id, now_ms, fleet));
        }
        out
    }

    /// Marks the task finished and sends every member the final weights with `done`.
    fn finish(&mut self, id: &str, reason: String, now_ms: u64, fleet: &dyn Fleet) -> Vec<Action> {
        let Some(t) = self.tasks.get_mut(id) else {
            return Vec::new();
        };
        let s = &mut t.state;
        s.phase = Phase::Finished {
            reason: reason.clone(),
        };
        s.finished_ms = Some(now_ms);
        s.selected.clear();
        t.accepted.clear();
        self.writes.push(Write::ClearUpdates {
            task: id.to_owned(),
            round: s.round,
        });
        self.dirty.insert(id.to_owned());
        let header = RoundHeader {
            task: id.to_owned(),
            round: s.round,
            version: s.version,
            model: s.spec.model.clone(),
            params: s.spec.params.clone(),
            issued_ms: now_ms,
            train: None,
            done: true,
        };
        // While an evaluation runs, the last round's line is not out yet: on_evaluated hands
        // this event out after it, so readers of the journal see every round before the end.
        let mut out = Vec::new();
        if s.evaluating.is_empty() {
            out.push(Action::Event(Event::FlTaskFinished {
                task: id.to_owned(),
                reason,
                rounds_closed: s.history.len() as u32,
                version: s.version,
            }));
        }
        match fl::encode_round(&header, &t.global, &t.key) {
            Ok(payload) => {
                for (device, _) in fleet.members(&s.spec.members) {
                    s.totals.bytes_out += payload.len() as u64;
                    out.push(Action::Publish {
                        topic: topics::fl_round(&device),
                        payload: payload.clone(),
                        retain: true,
                    });
                }
            }
            Err(e) => {
                tracing::error!(task = %id, error = %e, "cannot encode the final round message")
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fl::aggregate::{Rule, ServerOptimizer};
    use crate::fl::eval::EvalMetrics;
    use crate::fl::task::TrainSpec;
    use protocol::v1::deploy::TrustedKeys;
    use protocol::v1::fl::{Codec, ParamSpec, decode_round};
    use protocol::v1::{Class, message_id};

    /// devices: id -> (registered, online, groups)
    #[derive(Default)]
    struct TestFleet(BTreeMap<String, (bool, bool)>);

    impl TestFleet {
        fn with(n: usize) -> TestFleet {
            let mut f = TestFleet::default();
            for i in 0..n {
                f.0.insert(format!("d{i}"), (true, true));
            }
            f
        }
    }

    impl Fleet for TestFleet {
        fn is_registered(&self, device: &str) -> bool {
            self.0.get(device).is_some_and(|d| d.0)
        }
        fn members(&self, _: &Members) -> Vec<(String, bool)> {
            self.0
                .iter()
                .filter(|(_, d)| d.0)
                .map(|(k, d)| (k.clone(), d.1))
                .collect()
        }
    }

    /// What a host's evaluator would report: no runtime for version 1, figures after.
    fn fixed_eval(version: u32) -> EvalOutcome {
        if version == 1 {
            EvalOutcome::Unavailable("onnx runtime unavailable: test".into())
        } else {
            EvalOutcome::Metrics(EvalMetrics {
                accuracy: 0.5,
                loss: 1.0,
                rows: 4,
            })
        }
    }

    /// Runs every evaluation the engine asked for, as the host would, and returns what the
    /// outcomes handed out.
    fn run_evaluations(e: &mut Engine) -> Vec<Action> {
        let mut out = Vec::new();
        for r in e.take_evaluations() {
            out.extend(e.on_evaluated(&r.task, r.version, fixed_eval(r.version)));
        }
        out
    }

    fn closed_metrics(actions: &[Action]) -> Option<RoundMetrics> {
        events(actions).into_iter().find_map(|e| match e {
            Event::FlRoundClosed { metrics, .. } => Some((**metrics).clone()),
            _ => None,
        })
    }

    fn spec_with_holdout() -> TaskSpec {
        TaskSpec {
            holdout: true,
            ..spec()
        }
    }

    const N: usize = 6;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[3; 32])
    }

    fn spec() -> TaskSpec {
        TaskSpec {
            id: "t".into(),
            model: "models/m.onnx".into(),
            params: vec![
                ParamSpec {
                    name: "W".into(),
                    shape: vec![2, 2],
                },
                ParamSpec {
                    name: "B".into(),
                    shape: vec![2],
                },
            ],
            members: Members::Group("fl".into()),
            rounds: 3,
            fraction: 1.0,
            min_clients: 2,
            quorum: 1.0,
            round_timeout_s: 10,
            round_interval_s: 0,
            min_updates: 1,
            max_staleness: 1,
            seed: 0,
            train: TrainSpec {
                epochs: 1,
                lr: 0.1,
                batch_size: 4,
                mu: 0.0,
                codec: Codec::Fp32,
                max_samples: None,
            },
            rule: Rule::FedAvg,
            server_optimizer: ServerOptimizer::Sgd { lr: 1.0 },
            holdout: false,
        }
    }

    fn update_payload(device: &str, round: u32, base: u32, samples: u32, delta: &[f32]) -> Vec<u8> {
        let u = Update {
            task: "t".into(),
            round,
            base_version: base,
            samples,
            loss: 0.5,
            accuracy: 0.8,
            train_ms: 1,
            payload: codec::encode(Codec::Fp32, delta, None, 0),
        };
        raw_update(device, &u)
    }

    fn raw_update(device: &str, u: &Update) -> Vec<u8> {
        BinaryEnvelope {
            id: message_id(1, u64::from(u.round) * 1000 + u64::from(u.samples)),
            device: device.into(),
            class: Class::Model,
            seq: 1,
            created_ms: 0,
            kind: fl::UPDATE_KIND.into(),
            body: u.encode(),
        }
        .encode()
        .expect("encodes")
    }

    fn events(actions: &[Action]) -> Vec<&Event> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Event(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn rounds_published(actions: &[Action]) -> Vec<(String, RoundHeader, Vec<f32>)> {
        let trusted = TrustedKeys::new([key().verifying_key()]);
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish {
                    topic,
                    payload,
                    retain,
                } => {
                    assert!(*retain, "round messages are retained");
                    let m = decode_round(payload, &trusted).expect("verifies");
                    Some((topic.clone(), m.header, m.weights))
                }
                _ => None,
            })
            .collect()
    }

    fn rejected_reason(actions: &[Action]) -> Option<&'static str> {
        events(actions).into_iter().find_map(|e| match e {
            Event::FlUpdateRejected { reason, .. } => Some(*reason),
            _ => None,
        })
    }

    fn started(fleet: &TestFleet) -> (Engine, Vec<Action>) {
        let mut e = Engine::default();
        let out = e.start(spec(), key(), vec![0.0; N], 1_000, fleet);
        (e, out)
    }

    #[test]
    fn selection_is_deterministic_sized_and_a_subset() {
        let devices: Vec<String> = (0..20).map(|i| format!("d{i}")).collect();
        let a = select(devices.clone(), 5, 42);
        assert_eq!(
            a,
            select(devices.iter().rev().cloned().collect(), 5, 42),
            "input order does not matter"
        );
        assert_eq!(a.len(), 5);
        assert!(a.iter().all(|d| devices.contains(d)));
        assert_ne!(
            a,
            select(devices.clone(), 5, 43),
            "another seed, another selection"
        );
        assert_eq!(select(devices.clone(), 50, 1).len(), 20);
        let mut s = spec();
        s.fraction = 0.3;
        s.min_clients = 2;
        assert_eq!(s.selection_count(20), 6);
        assert_eq!(s.selection_count(4), 2);
        assert_eq!(s.selection_count(1), 1);
    }

    #[test]
    fn waits_for_min_clients_then_opens_and_announces_to_every_member() {
        let mut fleet = TestFleet::with(3);
        for d in ["d1", "d2"] {
            fleet.0.insert(d.into(), (true, false));
        }
        let (mut e, out) = started(&fleet);
        assert!(matches!(
            events(&out)[..],
            [Event::FlTaskStarted { .. }, Event::FlRoundWaiting { .. }]
        ));
        assert!(matches!(
            e.state("t").expect("known").phase,
            Phase::Waiting { .. }
        ));
        // Nothing changes, nothing new is said.
        assert!(e.tick(2_000, &fleet).is_empty());
        fleet.0.insert("d1".into(), (true, true));
        let out = e.tick(3_000, &fleet);
        let published = rounds_published(&out);
        assert_eq!(published.len(), 3, "every registered member gets the round");
        for (topic, h, w) in &published {
            assert_eq!((h.round, h.version), (1, 0));
            assert_eq!(w, &vec![0.0; N]);
            let device = topic.split('/').nth(2).expect("device in topic");
            assert_eq!(
                h.train.is_some(),
                device != "d2",
                "{topic}: the offline member only gets weights"
            );
        }
        let s = e.state("t").expect("known");
        assert_eq!(s.phase, Phase::Open);
        assert_eq!(s.selected.len(), 2);
        assert_eq!(s.deadline_ms, 13_000);
        let writes = e.take_writes();
        assert!(
            writes
                .iter()
                .any(|w| matches!(w, Write::Weights { version: 0, .. }))
        );
        assert!(writes.iter().any(|w| matches!(w, Write::State { .. })));
    }

    #[test]
    fn quorum_closes_the_round_with_the_weighted_mean_and_opens_the_next() {
        let fleet = TestFleet::with(3);
        let mut e = Engine::default();
        let out = e.start(spec_with_holdout(), key(), vec![0.0; N], 1_000, &fleet);
        assert_eq!(rounds_published(&out).len(), 3);
        let _ = e.take_writes();
        let out = e.on_update(
            "d0",
            &update_payload("d0", 1, 0, 10, &[1.0; N]),
            2_000,
            &fleet,
        );
        assert!(matches!(
            events(&out)[..],
            [Event::FlUpdate { staleness: 0, .. }]
        ));
        let writes = e.take_writes();
        assert!(
            writes
                .iter()
                .any(|w| matches!(w, Write::Update { update, .. } if update.device == "d0"))
        );
        e.on_update(
            "d1",
            &update_payload("d1", 1, 0, 30, &[3.0; N]),
            2_000,
            &fleet,
        );
        let out = e.on_update(
            "d2",
            &update_payload("d2", 1, 0, 60, &[0.0; N]),
            2_000,
            &fleet,
        );
        // The next round opened at once; the closed round's line waits for its evaluation.
        assert!(closed_metrics(&out).is_none(), "held until evaluated");
        assert_eq!(e.state("t").expect("known").evaluating, BTreeSet::from([1]));
        let requests = e.take_evaluations();
        assert_eq!(requests.len(), 1);
        assert_eq!((requests[0].task.as_str(), requests[0].version), ("t", 1));
        assert!(requests[0].weights.iter().all(|w| (w - 1.0).abs() < 1e-6));
        let evaluated = e.on_evaluated("t", 1, fixed_eval(1));
        let closed = closed_metrics(&evaluated).expect("round closed");
        assert!(e.state("t").expect("known").evaluating.is_empty());
        assert!(
            e.on_evaluated("t", 1, fixed_eval(1)).is_empty(),
            "a second outcome for the same version is ignored"
        );
        assert_eq!(
            (closed.round, closed.version, closed.new_version),
            (1, 0, Some(1))
        );
        assert_eq!(
            (
                closed.selected,
                closed.received,
                closed.on_time,
                closed.late
            ),
            (3, 3, 3, 0)
        );
        assert_eq!(closed.close_reason.as_deref(), Some("quorum"));
        assert_eq!(closed.train_loss, Some(0.5));
        assert!(
            closed
                .eval_note
                .as_deref()
                .is_some_and(|n| n.starts_with("eval unavailable: "))
        );
        assert!(closed.bytes_in > 0 && closed.bytes_out > 0);
        // (10 * 1 + 30 * 3 + 60 * 0) / 100 = 1.0
        let g = e.global("t").expect("known");
        assert!(g.iter().all(|w| (w - 1.0).abs() < 1e-6), "{g:?}");
        let published = rounds_published(&out);
        assert_eq!(published.len(), 3);
        assert!(
            published
                .iter()
                .all(|(_, h, w)| h.round == 2 && h.version == 1 && w == &vec![1.0; N])
        );
        let writes = e.take_writes();
        assert!(
            writes
                .iter()
                .any(|w| matches!(w, Write::Weights { version: 1, .. }))
        );
        assert!(
            writes
                .iter()
                .any(|w| matches!(w, Write::ClearUpdates { .. }))
        );
        assert!(writes.iter().any(|w| matches!(w, Write::Server { .. })));
    }

    #[test]
    fn round_interval_holds_the_next_round_back() {
        let fleet = TestFleet::with(2);
        let mut e = Engine::default();
        let mut sp = spec();
        sp.round_interval_s = 5;
        let _ = e.start(sp, key(), vec![0.0; N], 1_000, &fleet);
        for d in ["d0", "d1"] {
            e.on_update(d, &update_payload(d, 1, 0, 10, &[1.0; N]), 2_000, &fleet);
        }
        let s = e.state("t").expect("known");
        assert_eq!((s.round, s.not_before_ms), (2, 7_000));
        assert!(matches!(s.phase, Phase::Waiting { .. }), "{:?}", s.phase);
        assert!(
            rounds_published(&e.tick(6_999, &fleet)).is_empty(),
            "too early"
        );
        let out = e.tick(7_000, &fleet);
        assert_eq!(rounds_published(&out).len(), 2);
        assert_eq!(e.state("t").expect("known").phase, Phase::Open);
    }

    #[test]
    fn bad_updates_are_counted_by_reason_and_leave_the_aggregate_alone() {
        let mut fleet = TestFleet::with(3);
        fleet.0.insert("ghost".into(), (false, true));
        let mut s = spec();
        s.quorum = 0.5; // two on-time updates close the round
        let mut e = Engine::default();
        e.start(s, key(), vec![0.0; N], 1_000, &fleet);
        // The codec encodes NaN as 0, so the NaN payload is built by hand (tag 1 = fp32).
        let mut nan_body = vec![1u8];
        nan_body.extend_from_slice(&(N as u32).to_le_bytes());
        for i in 0..N {
            nan_body.extend_from_slice(&(if i == 2 { f32::NAN } else { 0.5 }).to_le_bytes());
        }
        let template = Update::decode(
            &BinaryEnvelope::decode(&update_payload("d0", 1, 0, 5, &[0.0; N]))
                .expect("env")
                .body,
        )
        .expect("u");
        let nan = raw_update(
            "d0",
            &Update {
                payload: nan_body,
                ..template.clone()
            },
        );
        let bad_codec = {
            let mut p = codec::encode(Codec::Fp32, &[0.5; N], None, 0);
            p.truncate(p.len() - 2);
            p
        };
        let mut wrong_task = Update::decode(
            &BinaryEnvelope::decode(&update_payload("d0", 1, 0, 5, &[0.5; N]))
                .expect("env")
                .body,
        )
        .expect("u");
        wrong_task.task = "other".into();
        let mut nan_loss = wrong_task.clone();
        nan_loss.task = "t".into();
        nan_loss.loss = f32::INFINITY;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "d0",
                update_payload("d0", 1, 0, 5, &[0.5; N - 1]),
                "wrong_length",
            ),
            ("d0", nan, "non_finite"),
            (
                "d0",
                raw_update(
                    "d0",
                    &Update {
                        payload: bad_codec,
                        ..template.clone()
                    },
                ),
                "bad_payload",
            ),
            (
                "d0",
                update_payload("d0", 7, 0, 5, &[0.5; N]),
                "unknown_round",
            ),
            (
                "d0",
                update_payload("d0", 0, 0, 5, &[0.5; N]),
                "unknown_round",
            ),
            (
                "d0",
                update_payload("d0", 1, 3, 5, &[0.5; N]),
                "base_version",
            ),
            (
                "ghost",
                update_payload("ghost", 1, 0, 5, &[0.5; N]),
                "unregistered",
            ),
            ("d0", raw_update("d0", &nan_loss), "non_finite"),
            ("d1", update_payload("d0", 1, 0, 5, &[0.5; N]), "malformed"),
            ("d0", b"garbage".to_vec(), "malformed"),
            ("d0", raw_update("d0", &wrong_task), "unknown_task"),
        ];
        for (device, payload, want) in &cases {
            let out = e.on_update(device, payload, 2_000, &fleet);
            assert_eq!(rejected_reason(&out), Some(*want), "{want}");
        }
        // The good one, then its replay.
        let good = update_payload("d0", 1, 0, 5, &[0.5; N]);
        assert!(rejected_reason(&e.on_update("d0", &good, 2_000, &fleet)).is_none());
        assert_eq!(
            rejected_reason(&e.on_update("d0", &good, 2_000, &fleet)),
            Some("duplicate")
        );
        let m = &e.state("t").expect("known").current;
        assert_eq!(m.received, 1);
        assert_eq!(m.duplicates, 1);
        let want: BTreeMap<String, u64> = [
            ("wrong_length", 1),
            ("non_finite", 2),
            ("bad_payload", 1),
            ("unknown_round", 2),
            ("base_version", 1),
            ("unregistered", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(m.rejected, want);
        assert_eq!(e.unattributed().get("malformed"), Some(&2));
        assert_eq!(e.unattributed().get("unknown_task"), Some(&1));
        // The round closes on the second good update; the aggregate is the two good deltas.
        e.on_update(
            "d1",
            &update_payload("d1", 1, 0, 5, &[1.5; N]),
            2_000,
            &fleet,
        );
        let g = e.global("t").expect("known");
        assert!(g.iter().all(|w| (w - 1.0).abs() < 1e-6), "{g:?}");
    }

    #[test]
    fn a_device_not_selected_is_refused() {
        let fleet = TestFleet::with(4);
        let mut s = spec();
        s.fraction = 0.5;
        let mut e = Engine::default();
        e.start(s, key(), vec![0.0; N], 1_000, &fleet);
        let selected = e.state("t").expect("known").selected.clone();
        assert_eq!(selected.len(), 2);
        let outsider = (0..4)
            .map(|i| format!("d{i}"))
            .find(|d| !selected.contains(d))
            .expect("one left out");
        let out = e.on_update(
            &outsider,
            &update_payload(&outsider, 1, 0, 5, &[0.5; N]),
            2_000,
            &fleet,
        );
        assert_eq!(rejected_reason(&out), Some("not_selected"));
    }

    #[test]
    fn late_updates_within_the_window_count_discounted_and_older_ones_are_dropped() {
        let fleet = TestFleet::with(3);
        let mut s = spec();
        s.quorum = 0.6; // 2 of 3
        s.rounds = 5;
        let mut e = Engine::default();
        e.start(s, key(), vec![0.0; N], 1_000, &fleet);
        e.on_update(
            "d0",
            &update_payload("d0", 1, 0, 10, &[1.0; N]),
            2_000,
            &fleet,
        );
        e.on_update(
            "d1",
            &update_payload("d1", 1, 0, 10, &[1.0; N]),
            2_000,
            &fleet,
        );
        assert_eq!(e.state("t").expect("known").round, 2);
        // d2's round-1 update arrives during round 2: applied with staleness 1.
        let late = update_payload("d2", 1, 0, 10, &[4.0; N]);
        let out = e.on_update("d2", &late, 3_000, &fleet);
        assert!(matches!(
            events(&out)[..],
            [Event::FlUpdate {
                staleness: 1,
                round: 1,
                applied_round: 2,
                ..
            }]
        ));
        // Its replay is a duplicate (not a second late update).
        assert_eq!(
            rejected_reason(&e.on_update("d2", &late, 3_000, &fleet)),
            Some("duplicate")
        );
        // An on-time round-2 update from d0 (10 samples, delta 1) plus the late one (10
        // samples at half weight, delta 4): (10 * 1 + 5 * 4) / 15 = 2. Quorum needs 2 on time.
        e.on_update(
            "d0",
            &update_payload("d0", 2, 1, 10, &[1.0; N]),
            3_000,
            &fleet,
        );
        assert_eq!(
            e.state("t").expect("known").round,
            2,
            "a late update does not count for the quorum"
        );
        let out = e.on_update(
            "d1",
            &update_payload("d1", 2, 1, 10, &[1.0; N]),
            3_000,
            &fleet,
        );
        let closed = events(&out)
            .into_iter()
            .find_map(|e| match e {
                Event::FlRoundClosed { metrics, .. } => Some(metrics.clone()),
                _ => None,
            })
            .expect("closed");
        assert_eq!((closed.received, closed.on_time, closed.late), (3, 2, 1));
        // Round 1 moved the model by 1; round 2 by (10 + 10 + 5 * 4) / 25 = 1.6.
        let g = e.global("t").expect("known");
        assert!(g.iter().all(|w| (w - 2.6).abs() < 1e-5), "{g:?}");
        // Round 3 is open; a round-1 update is now 2 rounds old.
        let out = e.on_update(
            "d2",
            &update_payload("d2", 1, 0, 10, &[4.0; N]),
            4_000,
            &fleet,
        );
        assert_eq!(rejected_reason(&out), Some("late_dropped"));
        // d2's round-2 update is one round late and it was selected then: accepted.
        let out = e.on_update(
            "d2",
            &update_payload("d2", 2, 1, 10, &[0.0; N]),
            4_000,
            &fleet,
        );
        assert!(rejected_reason(&out).is_none());
        assert_eq!(
            e.state("t")
                .expect("known")
                .current
                .rejected
                .get("late_dropped"),
            Some(&1)
        );
    }

    #[test]
    fn deadline_closes_with_min_updates_or_extends_and_tops_up() {
        let mut fleet = TestFleet::with(4);
        let mut s = spec();
        s.fraction = 0.5;
        s.min_updates = 2;
        let mut e = Engine::default();
        e.start(s, key(), vec![0.0; N], 1_000, &fleet);
        let selected: Vec<String> = e
            .state("t")
            .expect("known")
            .selected
            .iter()
            .cloned()
            .collect();
        e.on_update(
            &selected[0],
            &update_payload(&selected[0], 1, 0, 5, &[1.0; N]),
            2_000,
            &fleet,
        );
        // The other selected device went offline; before the deadline nothing happens.
        fleet.0.insert(selected[1].clone(), (true, false));
        assert!(e.tick(10_999, &fleet).is_empty());
        // At the deadline, 1 < min_updates: extended, one fresh online member added.
        let out = e.tick(11_000, &fleet);
        let added = events(&out)
            .into_iter()
            .find_map(|e| match e {
                Event::FlRoundExtended {
                    added, deadline_ms, ..
                } => Some((added.clone(), *deadline_ms)),
                _ => None,
            })
            .expect("extended");
        assert_eq!(added.0.len(), 1);
        assert_eq!(added.1, 21_000);
        let published = rounds_published(&out);
        assert_eq!(published.len(), 1);
        assert!(published[0].1.train.is_some());
        let s = e.state("t").expect("known");
        assert_eq!((s.selected.len(), s.current.extensions, s.round), (3, 1, 1));
        // The added device delivers; at the new deadline the round closes with 2 updates.
        let d = &added.0[0];
        e.on_update(d, &update_payload(d, 1, 0, 5, &[3.0; N]), 12_000, &fleet);
        let out = e.tick(21_000, &fleet);
        assert!(events(&out).iter().any(|e| matches!(e, Event::FlRoundClosed { metrics, .. } if metrics.close_reason.as_deref() == Some("deadline") && metrics.received == 2)));
        let g = e.global("t").expect("known");
        assert!(g.iter().all(|w| (w - 2.0).abs() < 1e-6), "{g:?}");
    }

    #[test]
    fn the_last_round_finishes_the_task_with_done_messages() {
        let fleet = TestFleet::with(2);
        let mut s = spec();
        s.rounds = 1;
        let mut e = Engine::default();
        e.start(s, key(), vec![0.0; N], 1_000, &fleet);
        e.on_update(
            "d0",
            &update_payload("d0", 1, 0, 5, &[1.0; N]),
            2_000,
            &fleet,
        );
        let out = e.on_update(
            "d1",
            &update_payload("d1", 1, 0, 5, &[1.0; N]),
            2_000,
            &fleet,
        );
        assert!(events(&out).iter().any(|e| matches!(e, Event::FlTaskFinished { reason, rounds_closed: 1, version: 1, .. } if reason == "completed")));
        let published = rounds_published(&out);
        assert_eq!(published.len(), 2);
        assert!(
            published
                .iter()
                .all(|(_, h, w)| h.done && h.train.is_none() && w == &vec![1.0; N])
        );
        assert!(matches!(
            e.state("t").expect("known").phase,
            Phase::Finished { .. }
        ));
        assert_eq!(e.active_count(), 0);
        let out = e.on_update(
            "d0",
            &update_payload("d0", 1, 0, 5, &[1.0; N]),
            3_000,
            &fleet,
        );
        assert_eq!(rejected_reason(&out), Some("task_finished"));
        assert!(
            e.stop("t", "stopped", 3_000, &fleet).is_empty(),
            "already finished"
        );
    }

    #[test]
    fn stop_sends_done_with_the_current_weights() {
        let fleet = TestFleet::with(2);
        let (mut e, _) = started(&fleet);
        let out = e.stop("t", "stopped by fl stop", 5_000, &fleet);
        assert!(
            rounds_published(&out)
                .iter()
                .all(|(_, h, _)| h.done && h.version == 0)
        );
        assert!(
            matches!(&e.state("t").expect("known").phase, Phase::Finished { reason } if reason == "stopped by fl stop")
        );
    }

    #[test]
    fn restore_resumes_the_open_round_with_its_accepted_updates() {
        let fleet = TestFleet::with(3);
        let (mut e, _) = started(&fleet);
        e.on_update(
            "d0",
            &update_payload("d0", 1, 0, 10, &[3.0; N]),
            2_000,
            &fleet,
        );
        // Persist as the service would, then rebuild a fresh engine from what was written.
        let mut state = None;
        let mut weights = None;
        let mut server = None;
        let mut updates = Vec::new();
        for w in e.take_writes() {
            match w {
                Write::State { state: s, .. } => state = Some(*s),
                Write::Weights { weights: v, .. } => weights = Some(v),
                Write::Server { state: s, .. } => server = Some(s),
                Write::Update { update, .. } => updates.push(update),
                _ => {}
            }
        }
        let mut resumed = Engine::default();
        let out = resumed.restore(
            state.expect("state written"),
            key(),
            weights.expect("weights written"),
            server.expect("server written"),
            updates,
            5_000,
            &fleet,
        );
        assert!(matches!(
            events(&out)[0],
            Event::FlTaskStarted {
                resumed: true,
                round: 1,
                ..
            }
        ));
        let published = rounds_published(&out);
        assert_eq!(published.len(), 3, "the open round is announced again");
        for (topic, h, _) in &published {
            assert_eq!(
                h.train.is_some(),
                !topic.contains("/d0/"),
                "{topic}: d0 already delivered"
            );
            assert_eq!(
                h.train.as_ref().map(|t| t.deadline_ms),
                h.train.as_ref().map(|_| 11_000),
                "deadline kept"
            );
        }
        // The replayed update is a duplicate; the other two close the round with all three.
        let dup = resumed.on_update(
            "d0",
            &update_payload("d0", 1, 0, 10, &[3.0; N]),
            6_000,
            &fleet,
        );
        assert_eq!(rejected_reason(&dup), Some("duplicate"));
        resumed.on_update(
            "d1",
            &update_payload("d1", 1, 0, 10, &[0.0; N]),
            6_000,
            &fleet,
        );
        resumed.on_update(
            "d2",
            &update_payload("d2", 1, 0, 10, &[0.0; N]),
            6_000,
            &fleet,
        );
        let g = resumed.global("t").expect("known");
        assert!(g.iter().all(|w| (w - 1.0).abs() < 1e-6), "{g:?}");
        assert_eq!(resumed.state("t").expect("known").history[0].received, 3);
    }

    #[test]
    fn a_task_sharing_members_with_a_running_one_is_refused_without_publishing() {
        let fleet = TestFleet::with(2);
        let (mut e, _) = started(&fleet);
        let mut other = spec();
        other.id = "t2".into();
        let out = e.start(other, key(), vec![0.0; N], 2_000, &fleet);
        assert!(rounds_published(&out).is_empty());
        assert!(
            matches!(&e.state("t2").expect("known").phase, Phase::Finished { reason } if reason.contains("running task t"))
        );
        assert_eq!(
            e.state("t").expect("known").phase,
            Phase::Open,
            "the running task goes on"
        );
        // Once the first one ended, a new task over the same members runs.
        e.stop("t", "stopped", 3_000, &fleet);
        let mut third = spec();
        third.id = "t3".into();
        let out = e.start(third, key(), vec![0.0; N], 4_000, &fleet);
        assert_eq!(rounds_published(&out).len(), 2);
    }

    #[test]
    fn a_member_registering_mid_round_gets_the_round() {
        let fleet = TestFleet::with(2);
        let (mut e, _) = started(&fleet);
        let out = e.on_registered("d9", &["fl".into()], 3_000);
        let p = rounds_published(&out);
        assert_eq!(p.len(), 1);
        assert!(p[0].0.ends_with("/d9/fl/round") && p[0].1.train.is_none());
        assert!(e.on_registered("d8", &["other".into()], 3_000).is_empty());
    }

    #[test]
    fn a_task_without_holdout_closes_at_once_and_asks_for_no_evaluation() {
        let fleet = TestFleet::with(2);
        let (mut e, _) = started(&fleet);
        e.on_update(
            "d0",
            &update_payload("d0", 1, 0, 5, &[1.0; N]),
            2_000,
            &fleet,
        );
        let out = e.on_update(
            "d1",
            &update_payload("d1", 1, 0, 5, &[1.0; N]),
            2_000,
            &fleet,
        );
        let closed = closed_metrics(&out).expect("closed at once");
        assert_eq!(
            (closed.eval_accuracy, closed.eval_note.as_deref()),
            (None, None)
        );
        assert!(e.take_evaluations().is_empty());
        assert!(e.state("t").expect("known").evaluating.is_empty());
    }

    #[test]
    fn the_last_rounds_evaluation_comes_before_the_task_finished_line() {
        let fleet = TestFleet::with(2);
        let mut e = Engine::default();
        let mut s = spec_with_holdout();
        s.rounds = 2;
        e.start(s, key(), vec![0.0; N], 1_000, &fleet);
        for round in 1..=2 {
            for d in ["d0", "d1"] {
                let p = update_payload(d, round, round - 1, 5, &[1.0; N]);
                let out = e.on_update(d, &p, 2_000, &fleet);
                if round == 2 && d == "d1" {
                    // Final weights go out at once; the end waits for the evaluation.
                    assert!(rounds_published(&out).iter().all(|(_, h, _)| h.done));
                    assert_eq!(rounds_published(&out).len(), 2);
                    assert!(events(&out).iter().all(|e| !matches!(
                        e,
                        Event::FlRoundClosed { .. } | Event::FlTaskFinished { .. }
                    )));
                    assert!(matches!(
                        e.state("t").expect("known").phase,
                        Phase::Finished { .. }
                    ));
                }
            }
        }
        // Both rounds closed before either evaluation came back (rounds outran them).
        assert_eq!(
            e.state("t").expect("known").evaluating,
            BTreeSet::from([1, 2])
        );
        let out = run_evaluations(&mut e);
        let names: Vec<&str> = events(&out)
            .into_iter()
            .map(|e| match e {
                Event::FlRoundClosed { metrics, .. } if metrics.round == 1 => "closed 1",
                Event::FlRoundClosed { metrics, .. } if metrics.round == 2 => "closed 2",
                Event::FlTaskFinished { .. } => "finished",
                _ => "other",
            })
            .collect();
        assert_eq!(names, ["closed 1", "closed 2", "finished"]);
        let last = closed_metrics(&out[1..]).expect("round 2");
        assert_eq!((last.eval_accuracy, last.eval_rows), (Some(0.5), Some(4)));
        assert!(events(&out).iter().any(|e| matches!(
            e,
            Event::FlTaskFinished {
                rounds_closed: 2,
                version: 2,
                ..
            }
        )));
        let h = &e.state("t").expect("known").history;
        assert_eq!(
            h[1].eval_accuracy,
            Some(0.5),
            "the history has the figures too"
        );
        assert!(h[0].eval_note.is_some());
        assert!(
            e.take_writes()
                .iter()
                .any(|w| matches!(w, Write::State { state, .. } if state.evaluating.is_empty())),
            "the state without pending evaluations is written"
        );
    }

    /// A restart while evaluations run: the current version's is asked for again, an older
    /// one is recorded unavailable; every closed round still gets its line, and a task that
    /// finished meanwhile its end.
    #[test]
    fn restore_reruns_the_current_evaluation_and_gives_up_older_ones() {
        let fleet = TestFleet::with(2);
        let mut e = Engine::default();
        let mut s = spec_with_holdout();
        s.rounds = 2;
        e.start(s, key(), vec![0.0; N], 1_000, &fleet);
        for round in 1..=2 {
            for d in ["d0", "d1"] {
                let p = update_payload(d, round, round - 1, 5, &[1.0; N]);
                e.on_update(d, &p, 2_000, &fleet);
            }
        }
        let asked = e.take_evaluations();
        assert_eq!(asked.len(), 2);
        let mut state = None;
        let mut weights = None;
        let mut server = None;
        for w in e.take_writes() {
            match w {
                Write::State { state: s, .. } => state = Some(*s),
                Write::Weights {
                    version: 2,
                    weights: v,
                    ..
                } => weights = Some(v),
                Write::Server {
                    version: 2,
                    state: s,
                    ..
                } => server = Some(s),
                _ => {}
            }
        }
        let state = state.expect("state written");
        assert_eq!(
            state.evaluating,
            BTreeSet::from([1, 2]),
            "persisted as pending"
        );
        let mut resumed = Engine::default();
        let out = resumed.restore(
            state,
            key(),
            weights.expect("weights written"),
            server.expect("server written"),
            Vec::new(),
            5_000,
            &fleet,
        );
        // Round 1's evaluation is given up at once; round 2's runs again.
        let closed = closed_metrics(&out).expect("round 1's line");
        assert_eq!(closed.round, 1);
        assert_eq!(
            closed.eval_note,
            Some(format!("eval unavailable: {EVAL_LOST_ON_RESTART}"))
        );
        assert!(
            !events(&out)
                .iter()
                .any(|e| matches!(e, Event::FlTaskFinished { .. }))
        );
        assert!(
            rounds_published(&out).is_empty(),
            "a finished task announces nothing"
        );
        let again = resumed.take_evaluations();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].version, 2);
        assert_eq!(again[0].weights, asked[1].weights);
        let out = resumed.on_evaluated("t", 2, fixed_eval(2));
        assert_eq!(
            closed_metrics(&out).and_then(|m| m.eval_accuracy),
            Some(0.5)
        );
        assert!(
            events(&out)
                .iter()
                .any(|e| matches!(e, Event::FlTaskFinished { .. }))
        );
    }
}
