//! Who trains: opening a round when enough members are online, the seeded selection, and
//! extending a round whose deadline passed with too few updates (topping it up with online
//! members not selected yet). Selection is a seeded shuffle, so a round's members can be
//! replayed from the task's seed, the round and the task id.

use super::{Engine, Fleet};
use crate::action::Action;
use crate::event::Event;
use crate::fl::state::Phase;

/// SplitMix64 step: selection shuffles and per-device training seeds.
pub(super) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(super) fn hash_str(s: &str) -> u64 {
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
    /// Opens the current round if enough members are online, else records why it waits.
    pub(super) fn try_open(&mut self, id: &str, now_ms: u64, fleet: &dyn Fleet) -> Vec<Action> {
        let Some(t) = self.tasks.get_mut(id) else {
            return Vec::new();
        };
        if now_ms < t.state.not_before_ms {
            let reason = format!(
                "the next round opens at {} ms (round_interval_s, or a round timeout after a \
                 round failed for a reason other than the model)",
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

    /// The deadline passed with fewer than `min_updates` updates: wait another
    /// `round_timeout_s`, selecting online members not selected yet up to the usual count.
    pub(super) fn extend(&mut self, id: &str, now_ms: u64, fleet: &dyn Fleet) -> Vec<Action> {
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
}
