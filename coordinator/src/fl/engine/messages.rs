//! Signed round messages: the current round to every registered member (a train order for
//! the selected whose update is not in yet, weights only for the others). Each is retained
//! on the device's round topic, so a device that reconnects finds the round it missed.

use std::collections::BTreeSet;

use protocol::v1::fl::{RoundHeader, TrainOrder};
use protocol::v1::topics;

use super::selection::{hash_str, mix};
use super::{Engine, Fleet};
use crate::action::Action;
use crate::fl::state::TaskState;

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
        let mut out = Vec::new();
        for device in devices {
            out.extend(self.publish_round(id, &device, now_ms));
        }
        out
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
        let payload = match t.encode_round(header) {
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
