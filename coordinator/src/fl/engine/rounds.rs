//! A round's end: deadlines (close or extend), closing (aggregate, server optimizer, new
//! global version, the evaluation request, the next round), evaluation outcomes (the closed
//! round's journal line), and finishing a task with `done` messages.

use std::collections::BTreeSet;

use protocol::v1::topics;

use super::{Engine, EvalOutcome, EvalRequest, Fleet, KEEP_VERSIONS, Write};
use crate::action::Action;
use crate::event::Event;
use crate::fl::aggregate::{ClientUpdate, aggregate};
use crate::fl::privacy::{self, Clip};
use crate::fl::state::{Phase, RecentRound, RoundMetrics, StoredUpdate};

impl Engine {
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
                    let s = &t.state;
                    if t.accepted.len() >= s.spec.min_updates as usize {
                        out.extend(self.close(&id, "deadline", now_ms, fleet));
                    } else if s.current.extensions >= s.spec.max_extensions {
                        let reason = format!(
                            "{} of min_updates {} updates after {} deadlines of {} s",
                            t.accepted.len(),
                            s.spec.min_updates,
                            s.current.extensions + 1,
                            s.spec.round_timeout_s
                        );
                        out.extend(self.fail_round(&id, reason, now_ms, fleet));
                    } else {
                        out.extend(self.extend(&id, now_ms, fleet));
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Aggregates the current round, moves the global model, asks for its evaluation (when
    /// the task has a held-out set), and opens the next round (or finishes the task).
    pub(super) fn close(
        &mut self,
        id: &str,
        reason: &str,
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
        let Some(t) = self.tasks.get_mut(id) else {
            return Vec::new();
        };
        let accepted = std::mem::take(&mut t.accepted);
        let mut updates: Vec<ClientUpdate> = accepted
            .values()
            .map(|u| ClientUpdate {
                device: u.device.clone(),
                samples: u.samples,
                staleness: u.staleness,
                delta: u.delta.clone(),
            })
            .collect();
        let clipped = privacy::clip(&t.state.spec.clip, &mut updates);
        let combined = match (&t.state.spec.privacy, t.state.spec.clip) {
            (Some(p), Clip::Norm { norm }) => {
                privacy::noisy_mean(&updates, norm, p.noise_multiplier, &mut self.noise.0)
            }
            _ => aggregate(&t.state.spec.rule, &updates),
        };
        drop(updates);
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
        s.failed_in_a_row = 0;
        if let Some(c) = clipped {
            s.current.clip_threshold = Some(c.threshold);
            s.current.clipped = c.clipped;
        }
        // Models released so far, this one included: each cost one Gaussian mechanism.
        let released = s.history.iter().filter(|m| m.new_version.is_some()).count() as u32 + 1;
        let mut budget_spent = None;
        if let Some(p) = s.spec.privacy {
            let z = f64::from(p.noise_multiplier);
            let spent = privacy::epsilon(released, z, p.delta);
            s.current.epsilon = Some(spent);
            if let Some(max) = p.max_epsilon {
                let next = privacy::epsilon(released + 1, z, p.delta);
                if next > max {
                    budget_spent = Some(format!(
                        "privacy budget: epsilon {spent:.2} spent, another round would reach \
                         {next:.2} > max_epsilon {max} (delta {})",
                        p.delta
                    ));
                }
            }
        }
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
        let finished = s.round >= s.spec.rounds || budget_spent.is_some();
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
            let reason = budget_spent.unwrap_or_else(|| "completed".into());
            out.extend(self.finish(id, reason, now_ms, fleet));
        } else {
            out.extend(self.try_open(id, now_ms, fleet));
        }
        out
    }

    /// Ends the current round without a new global version (`reason`: why), and opens the
    /// next one, or stops the task once `max_failed_rounds` rounds in a row have failed.
    pub(super) fn fail_round(
        &mut self,
        id: &str,
        reason: String,
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
        let Some(t) = self.tasks.get_mut(id) else {
            return Vec::new();
        };
        t.accepted.clear();
        let s = &mut t.state;
        s.failed_in_a_row += 1;
        s.current.closed_ms = Some(now_ms);
        s.current.close_reason = Some("failed".into());
        s.current.failed = Some(reason.clone());
        // Late updates for it still count later: the global version is unchanged.
        s.recent.insert(
            s.round,
            RecentRound {
                version: s.version,
                selected: std::mem::take(&mut s.selected),
                contributed: BTreeSet::new(),
            },
        );
        let closed_round = s.round;
        let next_round = s.round + 1;
        let window = s.spec.max_staleness;
        s.recent.retain(|&r, _| next_round - r <= window);
        let metrics = std::mem::take(&mut s.current);
        s.history.push(metrics.clone());
        let summary = if metrics.failures.is_empty() {
            reason.clone()
        } else {
            let devices: Vec<String> = metrics.failures.iter().map(ToString::to_string).collect();
            format!("{reason}: {}", devices.join("; "))
        };
        let stop = s.failed_in_a_row >= s.spec.max_failed_rounds;
        let last = s.round >= s.spec.rounds;
        if !(stop || last) {
            s.round = next_round;
        }
        // A model no device can train fails again at once; anything else (no labeled data yet,
        // a busy board, a full outbox) may pass: the next round waits a round's timeout
        // first, so `max_failed_rounds` spans minutes, not the seconds of back-to-back tries.
        let transient =
            metrics.failures.is_empty() || metrics.failures.iter().any(|f| f.kind != "model");
        let pause_s = if transient {
            s.spec.round_interval_s.max(s.spec.round_timeout_s)
        } else {
            s.spec.round_interval_s
        };
        s.not_before_ms = now_ms + u64::from(pause_s) * 1000;
        s.current = RoundMetrics {
            round: s.round,
            version: s.version,
            ..RoundMetrics::default()
        };
        let in_a_row = s.failed_in_a_row;
        self.writes.push(Write::ClearUpdates {
            task: id.to_owned(),
            round: closed_round,
        });
        self.dirty.insert(id.to_owned());
        let mut out = vec![Action::Event(Event::FlRoundFailed {
            task: id.to_owned(),
            round: closed_round,
            reason,
            failures: metrics.failures,
        })];
        if stop {
            let rounds = if in_a_row == 1 {
                "1 round failed".to_owned()
            } else {
                format!("{in_a_row} rounds in a row failed")
            };
            let why =
                format!("failed: {rounds} (max_failed_rounds); round {closed_round}: {summary}");
            out.extend(self.finish(id, why, now_ms, fleet));
        } else if last {
            out.extend(self.finish(
                id,
                format!("completed; the last round failed: {summary}"),
                now_ms,
                fleet,
            ));
        } else {
            out.extend(self.try_open(id, now_ms, fleet));
        }
        out
    }

    /// Marks the task finished and sends every member the final weights with `done`.
    pub(super) fn finish(
        &mut self,
        id: &str,
        reason: String,
        now_ms: u64,
        fleet: &dyn Fleet,
    ) -> Vec<Action> {
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
        let members = fleet.members(&t.state.spec.members);
        if let Some(group) = self.broadcast_group(id, members.len()) {
            // Once on the group's topic, and the members' own topics cleared of this task's
            // train orders (older than the final weights).
            out.extend(self.publish_group(id, &group, now_ms, true));
            out.extend(self.clear_personal(id, &BTreeSet::new()));
            return out;
        }
        // One message per member: each names its device, so none can be moved to another's topic.
        for (device, _) in members {
            let Some(t) = self.tasks.get(id) else {
                break;
            };
            let header = super::messages::round_header(id, &device, &t.state, now_ms, None, true);
            out.extend(self.signed(id, header, topics::fl_round(&device)));
        }
        out
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
}
