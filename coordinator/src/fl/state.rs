//! What the coordinator persists about a federated task, and the per-round metrics it reports.
//!
//! [`TaskState`] is small (JSON in the store and the source of `fl status`); the bulky parts
//! (global weights per version, the server optimizer's moments, the accepted updates of the
//! current round) are stored beside it in binary ([`StoredUpdate::to_bytes`],
//! [`super::aggregate::ServerState::to_bytes`], weights as little-endian f32).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::task::TaskSpec;

/// Where a task is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Phase {
    /// The current round cannot open yet (fewer than `min_clients` members online).
    Waiting { reason: String },
    /// The current round is open: selected devices train until the quorum or the deadline.
    Open,
    /// No more rounds: `completed`, or why it stopped.
    Finished { reason: String },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Waiting { .. } => "waiting",
            Phase::Open => "open",
            Phase::Finished { .. } => "finished",
        }
    }
}

/// Counts and figures of one round. While the round is current they grow; when it closes it
/// is journaled (`fl_round_closed`) and kept in the task's history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoundMetrics {
    pub round: u32,
    /// Global version the round's devices trained from.
    pub version: u32,
    /// Global version the round produced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_version: Option<u32>,
    /// When it opened (0: never opened).
    pub opened_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_ms: Option<u64>,
    /// `quorum`, `deadline` or `stopped`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_reason: Option<String>,
    /// Times the deadline passed with fewer than `min_updates` updates.
    pub extensions: u32,
    /// Devices selected to train.
    pub selected: u32,
    /// Updates accepted into this round (`on_time + late`).
    pub received: u32,
    /// Accepted updates trained for this round.
    pub on_time: u32,
    /// Accepted updates trained for an earlier round (the late-update rule).
    pub late: u32,
    /// Refused updates by reason (see [`Reject`]), duplicates aside.
    pub rejected: BTreeMap<String, u64>,
    /// Second copies of an update already accepted (same task, round and device).
    pub duplicates: u64,
    /// Bytes of update bodies received while the round was current, accepted or not.
    pub bytes_in: u64,
    /// Bytes of round messages published for this round.
    pub bytes_out: u64,
    /// Sample-weighted mean of the accepted updates' training loss and accuracy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_accuracy: Option<f32>,
    /// The clipping threshold the round's updates were held to (L2 norm), when clipping is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_threshold: Option<f32>,
    /// Updates scaled down to it.
    #[serde(skip_serializing_if = "is_zero")]
    pub clipped: u32,
    /// With `[privacy]`: the epsilon spent by the task's released models, this one included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// The new global model on the held-out set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_rows: Option<u32>,
    /// `eval unavailable: REASON` when the held-out evaluation could not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_note: Option<String>,
    /// Selected devices that reported they could not train this round, one entry each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<DeviceFailure>,
    /// Why the round failed (`close_reason` is then `failed` and there is no new version).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A device's report that it could not train a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFailure {
    pub device: String,
    /// `model`, `data`, `resources` or `timeout`.
    pub kind: String,
    pub reason: String,
}

impl std::fmt::Display for DeviceFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.device, self.kind, self.reason)
    }
}

impl RoundMetrics {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// Why an update was refused; the wire name is the key in the metrics' `rejected` map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not a binary envelope of kind `fl-update` from the topic's device, or an update header
    /// that does not decode.
    Malformed,
    UnknownTask,
    TaskFinished,
    /// The device never registered with this coordinator.
    Unregistered,
    /// Round 0, a round that has not opened, or one the coordinator no longer knows.
    UnknownRound,
    /// The device was not selected to train in that round.
    NotSelected,
    /// An update for (task, round, device) was already accepted.
    Duplicate,
    /// Trained from another global version than the round's.
    BaseVersion,
    /// The delta has another number of weights than the model.
    WrongLength,
    /// The delta payload does not decode (truncated, unknown codec, trailing bytes).
    BadPayload,
    /// NaN or infinity in the delta, loss or accuracy.
    NonFinite,
    /// Late by more than `max_staleness` rounds.
    LateDropped,
}

impl Reject {
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::UnknownTask => "unknown_task",
            Reject::TaskFinished => "task_finished",
            Reject::Unregistered => "unregistered",
            Reject::UnknownRound => "unknown_round",
            Reject::NotSelected => "not_selected",
            Reject::Duplicate => "duplicate",
            Reject::BaseVersion => "base_version",
            Reject::WrongLength => "wrong_length",
            Reject::BadPayload => "bad_payload",
            Reject::NonFinite => "non_finite",
            Reject::LateDropped => "late_dropped",
        }
    }
}

/// A closed round still inside the late-update window: enough to validate and deduplicate
/// late updates for it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecentRound {
    pub version: u32,
    pub selected: BTreeSet<String>,
    /// Devices whose update for this round was accepted (on time, or late into a later round).
    pub contributed: BTreeSet<String>,
}

/// Task-wide totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    pub accepted: u64,
    pub rejected: BTreeMap<String, u64>,
    pub duplicates: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Everything about a task but the bulky vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    pub spec: TaskSpec,
    /// Current global version (0: the initial model).
    pub version: u32,
    /// The current round: open, or the next to open.
    pub round: u32,
    pub phase: Phase,
    /// Devices selected in the current round.
    pub selected: BTreeSet<String>,
    /// Deadline of the open round, ms since the epoch.
    pub deadline_ms: u64,
    /// The next round opens no earlier than this (`round_interval_s` after the last close).
    #[serde(default)]
    pub not_before_ms: u64,
    /// Closed rounds still inside the late-update window, by round.
    pub recent: BTreeMap<u32, RecentRound>,
    pub current: RoundMetrics,
    /// Closed rounds, oldest first.
    pub history: Vec<RoundMetrics>,
    /// Global versions whose held-out evaluation is still running: their rounds are in
    /// `history` without eval figures, and their `fl_round_closed` is journaled when the
    /// result comes back (see [`super::engine::Engine::on_evaluated`]).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub evaluating: BTreeSet<u32>,
    pub totals: Totals,
    /// Rounds in a row that ended `failed` (reset by a round that closes normally).
    #[serde(default)]
    pub failed_in_a_row: u32,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
}

/// One accepted update of the current round, with its decoded delta.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredUpdate {
    pub device: String,
    /// The round it was trained for (earlier than the current one for a late update).
    pub origin: u32,
    pub staleness: u32,
    pub samples: u32,
    pub loss: f32,
    pub accuracy: f32,
    pub delta: Vec<f32>,
}

impl StoredUpdate {
    /// `device_len u8 | device | origin u32 | staleness u32 | samples u32 | loss f32 |
    /// accuracy f32 | n u32 | n x f32` (little-endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let device = &self.device.as_bytes()[..self.device.len().min(255)];
        let mut out = Vec::with_capacity(28 + device.len() + 4 * self.delta.len());
        out.push(device.len() as u8);
        out.extend_from_slice(device);
        for v in [self.origin, self.staleness, self.samples] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.loss.to_le_bytes());
        out.extend_from_slice(&self.accuracy.to_le_bytes());
        out.extend_from_slice(&(self.delta.len() as u32).to_le_bytes());
        out.extend(self.delta.iter().flat_map(|x| x.to_le_bytes()));
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<StoredUpdate> {
        let (&len, rest) = bytes.split_first()?;
        let device = std::str::from_utf8(rest.get(..len as usize)?)
            .ok()?
            .to_owned();
        let rest = &rest[len as usize..];
        let word = |i: usize| -> Option<[u8; 4]> { rest.get(i * 4..i * 4 + 4)?.try_into().ok() };
        let origin = u32::from_le_bytes(word(0)?);
        let staleness = u32::from_le_bytes(word(1)?);
        let samples = u32::from_le_bytes(word(2)?);
        let loss = f32::from_le_bytes(word(3)?);
        let accuracy = f32::from_le_bytes(word(4)?);
        let n = u32::from_le_bytes(word(5)?) as usize;
        let body = &rest[24..];
        if body.len() != n.checked_mul(4)? {
            return None;
        }
        Some(StoredUpdate {
            device,
            origin,
            staleness,
            samples,
            loss,
            accuracy,
            delta: f32s_from_bytes(body)?,
        })
    }
}

/// Little-endian f32s.
pub fn f32s_to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Inverse of [`f32s_to_bytes`]; `None` for a length that is not a multiple of 4.
pub fn f32s_from_bytes(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_updates_round_trip_and_refuse_garbage() {
        let u = StoredUpdate {
            device: "d1".into(),
            origin: 3,
            staleness: 1,
            samples: 40,
            loss: 0.25,
            accuracy: 0.5,
            delta: vec![1.0, -2.5, 0.0],
        };
        let b = u.to_bytes();
        assert_eq!(StoredUpdate::from_bytes(&b), Some(u));
        assert_eq!(StoredUpdate::from_bytes(&b[..b.len() - 1]), None);
        assert_eq!(StoredUpdate::from_bytes(&[9, 1]), None);
        assert_eq!(StoredUpdate::from_bytes(&[]), None);
        assert_eq!(
            f32s_from_bytes(&f32s_to_bytes(&[1.5, 2.0])),
            Some(vec![1.5, 2.0])
        );
        assert_eq!(f32s_from_bytes(&[0, 0, 0]), None);
    }
}
