//! Signed round messages: the current round to every registered member (a train order for
//! the selected whose update is not in yet, weights only for the others). Each is retained,
//! so a device that reconnects finds the round it missed.
//!
//! A task over a group with at least [`GROUP_BROADCAST_MIN`] members to send weights only
//! sends those weights once, on the group's round topic (`topics::group_fl_round`, header
//! device `group/{group}`), and a message on a device's own topic only to the selected: at
//! 10,000 members and 1,000 selected, one message instead of 9,000 copies of the weights
//! (100 MB a round for a 2,500-weight model, through the coordinator's one connection).
//! A device's own topic then holds only its current train order: those of earlier rounds are
//! cleared as each round opens (an empty retained message), so a reconnecting device is not
//! handed an older round beside the group's newer one. The selected's train orders are
//! issued a millisecond after the group message, so a device that takes the group's message
//! first still admits its order as newer. Smaller groups and device lists get a message
//! each, as before.

use std::collections::BTreeSet;

use protocol::v1::fl::{RoundHeader, TrainOrder};
use protocol::v1::topics;

use super::selection::{hash_str, mix};
use super::{Engine, Fleet};
use crate::action::Action;
use crate::fl::state::TaskState;
use crate::fl::task::Members;

/// Members to send weights only from which a task over a group sends them once on the group's
/// topic.
pub const GROUP_BROADCAST_MIN: usize = 32;

impl Engine {
    /// Publishes the current round's message to every registered member.
    pub(super) fn announce(
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
        let training: BTreeSet<String> = t
            .state
            .selected
            .iter()
            .filter(|d| !t.accepted.contains_key(&((*d).clone(), t.state.round)))
            .cloned()
            .collect();
        let mut out = Vec::new();
        let broadcast = self.broadcast_group(id, devices.len() - training.len());
        if let Some(t) = self.tasks.get_mut(id) {
            t.broadcast = broadcast.is_some();
        }
        let Some(group) = broadcast else {
            for device in devices {
                out.extend(self.publish_round(id, &device, now_ms));
            }
            return out;
        };
        out.extend(self.publish_group(id, &group, now_ms, false));
        for device in &training {
            out.extend(self.publish_round(id, device, now_ms + 1));
        }
        out.extend(self.clear_personal(id, &training));
        out
    }

    /// Task `id`'s current round, weights only (or its final weights, `done`), retained on
    /// `group`'s round topic.
    pub(super) fn publish_group(
        &mut self,
        id: &str,
        group: &str,
        now_ms: u64,
        done: bool,
    ) -> Option<Action> {
        let t = self.tasks.get(id)?;
        let header = round_header(
            id,
            &topics::group_recipient(group),
            &t.state,
            now_ms,
            None,
            done,
        );
        self.signed(id, header, topics::group_fl_round(group))
    }

    /// Task `id`'s round message with `header`, signed, retained on `topic`, and counted in
    /// the task's bytes out (and the open round's, unless it is the final message: the last
    /// round has closed by then).
    pub(super) fn signed(
        &mut self,
        id: &str,
        header: RoundHeader,
        topic: String,
    ) -> Option<Action> {
        let t = self.tasks.get_mut(id)?;
        let done = header.done;
        let payload = match t.encode_round(header) {
            Ok(p) => p,
            Err(e) => {
                // Checked when the task was loaded (size) and kept finite by the optimizer;
                // a failure here is a bug, reported rather than sent malformed.
                tracing::error!(task = %id, %topic, error = %e, "cannot encode round message");
                return None;
            }
        };
        let bytes = payload.len() as u64;
        if !done {
            t.state.current.bytes_out += bytes;
        }
        t.state.totals.bytes_out += bytes;
        self.dirty.insert(id.to_owned());
        Some(Action::Publish {
            topic,
            payload,
            retain: true,
        })
    }

    /// Clears the own round topic of every device holding a message of task `id` except
    /// `keep`'s (an empty retained message removes the retained one).
    pub(super) fn clear_personal(&mut self, id: &str, keep: &BTreeSet<String>) -> Vec<Action> {
        let Some(t) = self.tasks.get_mut(id) else {
            return Vec::new();
        };
        let stale: Vec<String> = t.personal.difference(keep).cloned().collect();
        t.personal.retain(|d| keep.contains(d));
        stale
            .iter()
            .map(|device| Action::Publish {
                topic: topics::fl_round(device),
                payload: Vec::new(),
                retain: true,
            })
            .collect()
    }

    /// The group task `id`'s weights-only messages for `recipients` devices go to, if they
    /// go to one (see the module docs).
    pub(super) fn broadcast_group(&self, id: &str, recipients: usize) -> Option<String> {
        match &self.tasks.get(id)?.state.spec.members {
            Members::Group(g) if recipients >= GROUP_BROADCAST_MIN => Some(g.clone()),
            _ => None,
        }
    }

    /// The current round's message for one device: a train order if it is selected and its
    /// update is not in yet.
    pub(super) fn publish_round(&mut self, id: &str, device: &str, now_ms: u64) -> Option<Action> {
        let t = self.tasks.get_mut(id)?;
        let s = &t.state;
        let train = (s.selected.contains(device)
            && !t.accepted.contains_key(&(device.to_owned(), s.round)))
        .then(|| {
            let seed = mix(s.spec.seed ^ mix(u64::from(s.round)) ^ hash_str(device));
            s.spec.train.order(s.deadline_ms, seed)
        });
        let header = round_header(id, device, s, now_ms, train, false);
        t.personal.insert(device.to_owned());
        self.signed(id, header, topics::fl_round(device))
    }
}

/// The header of task `id`'s current round message: a member's train order (or none) and
/// whether the task is done. One place, so a round message and a task's final one carry the
/// same fields.
pub(super) fn round_header(
    id: &str,
    device: &str,
    s: &TaskState,
    now_ms: u64,
    train: Option<TrainOrder>,
    done: bool,
) -> RoundHeader {
    RoundHeader {
        task: id.to_owned(),
        device: device.to_owned(),
        round: s.round,
        version: s.version,
        model: s.spec.model.clone(),
        params: s.spec.params.clone(),
        issued_ms: now_ms,
        train,
        done,
        frozen: s.spec.frozen.clone(),
        // Task::encode_round fills it for a model too big for the message.
        blob: None,
    }
}
