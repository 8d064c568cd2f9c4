//! An update's way in: decoding the binary envelope, validation against the round it names
//! (in the order the module docs of [`crate::fl`] list), rejections counted by reason, the
//! accepted update queued for persistence, and the quorum check that may close the round.
//! A refused update never reaches the aggregate.

use protocol::v1::binary::BinaryEnvelope;
use protocol::v1::fl::{self, CodecError, Update, codec};

use super::{Engine, Fleet, Write};
use crate::action::Action;
use crate::event::Event;
use std::collections::BTreeSet;

use crate::fl::state::{DeviceFailure, Phase, Reject, StoredUpdate};

impl Engine {
    /// An `fl/update` message from `device` (the topic's). Validates it against the round it
    /// claims; a refused update is counted by reason and never touches the aggregate.
    pub fn on_update(
        &mut self,
        device: &str,
        payload: &[u8],
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
        match BinaryEnvelope::decode(payload) {
            Ok(e) => self.on_envelope(device, &e, now_ms, fleet),
            Err(e) => vec![self.reject(None, device, None, Reject::Malformed, e.to_string())],
        }
    }

    /// A message that failed before it reached the engine (an update's parts that do not put
    /// together): counted and journaled like a malformed update.
    pub fn refuse(
        &mut self,
        task: Option<&str>,
        device: &str,
        round: Option<u32>,
        detail: String,
    ) -> Action {
        let task = task.filter(|t| self.tasks.contains_key(*t));
        self.reject(task, device, round, Reject::Malformed, detail)
    }

    /// [`Engine::on_update`] for a decoded envelope (an update put together from its parts
    /// comes this way).
    pub fn on_envelope(
        &mut self,
        device: &str,
        envelope: &BinaryEnvelope,
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
        if envelope.device != device {
            let detail = format!("envelope from {} on the topic of {device}", envelope.device);
            return vec![self.reject(None, device, None, Reject::Malformed, detail)];
        }
        if envelope.kind == fl::chunks::FETCH_KIND {
            return self.on_fetch(device, &envelope.body, fleet);
        }
        if envelope.kind == fl::FAILURE_KIND {
            return self.on_failure(device, &envelope.body, now_ms, fleet);
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
    pub(super) fn validate(
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

    /// A selected device's report that it could not train: recorded in the round's metrics
    /// (one per device) and journaled; when every selected device has failed, the round ends.
    fn on_failure(
        &mut self,
        device: &str,
        body: &[u8],
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
        let f = match fl::TrainFailure::decode(body) {
            Ok(f) => f,
            Err(e) => {
                return vec![self.reject(None, device, None, Reject::Malformed, e.to_string())];
            }
        };
        let round = Some(f.round);
        let Some(t) = self.tasks.get_mut(&f.task) else {
            let detail = format!("failure report for no task {}", f.task);
            return vec![self.reject(None, device, round, Reject::UnknownTask, detail)];
        };
        let id = f.task.clone();
        // The reason goes to the journal, logs and `fl status` on an operator's terminal:
        // control characters (escape sequences) from a device are shown, not obeyed.
        let reason: String = f
            .reason
            .chars()
            .flat_map(|c| {
                let shown: Vec<char> = if c.is_control() {
                    c.escape_default().collect()
                } else {
                    vec![c]
                };
                shown
            })
            .collect();
        let s = &mut t.state;
        if matches!(s.phase, Phase::Finished { .. }) {
            let detail = "failure report after the task finished".to_owned();
            return vec![self.reject(Some(&id), device, round, Reject::TaskFinished, detail)];
        }
        let event = Action::Event(Event::FlTrainFailed {
            task: id.clone(),
            device: device.to_owned(),
            round: f.round,
            kind: f.kind.as_str(),
            reason: reason.clone(),
        });
        // A report for an earlier round (sent late, or from the outbox after an outage) is
        // journaled only: that round is over.
        if f.round != s.round || !matches!(s.phase, Phase::Open) {
            return vec![event];
        }
        if !s.selected.contains(device) {
            let detail = "failure report from a device not selected".to_owned();
            return vec![self.reject(Some(&id), device, round, Reject::NotSelected, detail)];
        }
        if s.current.failures.iter().any(|x| x.device == device) {
            let detail = "second failure report for the round".to_owned();
            return vec![self.reject(Some(&id), device, round, Reject::Duplicate, detail)];
        }
        s.current.failures.push(DeviceFailure {
            device: device.to_owned(),
            kind: f.kind.as_str().to_owned(),
            reason,
        });
        self.dirty.insert(id.clone());
        let mut out = vec![event];
        out.extend(self.check_settled(&id, now_ms, fleet));
        out
    }

    pub(super) fn reject(
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
    pub(super) fn accept(
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

    pub(super) fn check_quorum(&mut self, id: &str, now_ms: u64, fleet: &dyn Fleet) -> Vec<Action> {
        let Some(t) = self.tasks.get(id) else {
            return Vec::new();
        };
        let s = &t.state;
        let on_time = t.accepted.keys().filter(|(_, r)| *r == s.round).count();
        if s.phase == Phase::Open && on_time >= s.spec.quorum_count(s.selected.len()) {
            return self.close(id, "quorum", now_ms, fleet);
        }
        self.check_settled(id, now_ms, fleet)
    }

    /// Once every selected device of the open round has either failed or sent an update for
    /// it, nothing more will come: the round closes (`failures`) with `min_updates`, or fails.
    pub(super) fn check_settled(
        &mut self,
        id: &str,
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
        let Some(t) = self.tasks.get(id) else {
            return Vec::new();
        };
        let s = &t.state;
        if s.phase != Phase::Open || s.current.failures.is_empty() {
            return Vec::new();
        }
        let failed: BTreeSet<&str> = s
            .current
            .failures
            .iter()
            .map(|x| x.device.as_str())
            .collect();
        let trained: BTreeSet<&str> = t
            .accepted
            .keys()
            .filter(|(_, r)| *r == s.round)
            .map(|(d, _)| d.as_str())
            .collect();
        let settled = s
            .selected
            .iter()
            .all(|d| failed.contains(d.as_str()) || trained.contains(d.as_str()));
        if !settled {
            return Vec::new();
        }
        if t.accepted.len() >= s.spec.min_updates as usize {
            self.close(id, "failures", now_ms, fleet)
        } else {
            self.fail_round(id, "every selected device failed".into(), now_ms, fleet)
        }
    }
}
