//! The rollout engine: every active deployment, the paced queue of chunks to publish, resend
//! requests and status reports. No I/O, no clock: the service passes the time, publishes the
//! returned [`Action`]s, journals their events and persists [`Engine::take_dirty`]'s progress.
//!
//! Wire behaviour it decides:
//! - the signed manifest is published retained on the device's (or group's) manifest topic,
//!   so a device that connects later still gets it; a newer deployment on the same topic
//!   replaces it (the older rollout ends as superseded), and when a rollout ends its manifest
//!   is cleared (an empty retained message) unless a newer one took the topic or it stays the
//!   group's current version (below);
//! - chunks go out once, not retained, on the device's chunk topic (a group's: once on the
//!   group chunk topic), at most `budget` per [`Engine::tick`], resends first;
//! - a resend request is answered on the requesting device's chunk topic, with at most
//!   [`MAX_RESEND_CHUNKS`] chunks; entries for unknown deployments, digests or indexes, and
//!   any beyond the bound, are ignored and counted;
//! - in a group rollout, a chunk whose broadcast is still queued answers a request for it,
//!   and once [`rebroadcast_threshold`] devices wait for the same chunk their per-device
//!   answers become one publish on the group chunk topic (*rebroadcast*, journaled): when a
//!   whole fleet misses chunks at once (the broker or the devices were too busy to take a
//!   fan-out of 10,000), per-device answers paced at a few hundred a second would take many
//!   minutes, while one broadcast repairs them all;
//! - a rollout ends when every target device reported a final step, or when its manifest
//!   expires;
//! - a staged rollout (`--strategy canary`, rules in `waves.rs`) publishes the signed group
//!   manifest retained on each launched device's own manifest topic instead of the group's,
//!   broadcasts the chunks on the group chunk topic once per wave (devices without the
//!   manifest ignore them), answers resends only for launched devices, and on a halt replaces
//!   each updated device's manifest with the rollback deployment's (its own resends answered
//!   from the rollback package). It ends when every wave passed its gate and soak and every
//!   launched device is final, or, halted, when every device rolled back is final; then the
//!   device topics it used are cleared;
//! - a group rollout that ends well (every device healthy; a staged one every wave through)
//!   stays the group's *current version* until its manifest expires or a newer deployment to
//!   the group ends well (a newer one that fails hands the topic back to it): its manifest
//!   stays retained on the group topic and resends for it are answered, so a device that joins
//!   the group later installs it (the signed manifest's expiry, `deploy --ttl-secs`, bounds
//!   how long; serve cannot sign a new one).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use protocol::v1::deploy::{DeployStatus, ResendRequest, Target};
use protocol::v1::topics;

use super::package::Package;
use super::progress::{ProgressFile, step_name, step_reason};
use super::rollout::{DeviceProgress, Rollout};
use super::waves::{Decision, Phase, Strategy, Waves, is_failure};
use crate::action::Action;
use crate::event::Event;

/// Most chunks one resend request makes us publish. A request may list up to
/// `MAX_RESEND_INDEXES` (2048) indexes; the agent asks again for whatever is still missing.
pub const MAX_RESEND_CHUNKS: usize = 256;

/// A group rollout's per-device answers for one chunk become a rebroadcast once this many
/// devices wait for it...
const REBROADCAST_MIN_DEVICES: usize = 8;
/// ...and at least this fraction (1/N) of the rollout's devices: a broadcast reaches every
/// member, so one device's loss on a flaky link stays a per-device answer.
const REBROADCAST_FRACTION: usize = 10;

/// How many devices of a group rollout of `devices` must wait for the same chunk before it
/// is rebroadcast.
pub fn rebroadcast_threshold(devices: usize) -> usize {
    REBROADCAST_MIN_DEVICES.max(devices / REBROADCAST_FRACTION)
}

/// `(deployment id, artifact digest, index)`.
type ChunkRef = (String, String, u32);

/// One chunk waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Queued {
    deployment_id: String,
    topic: String,
    /// The device it is for; `None` for a group broadcast (counts for every known member).
    device: Option<String>,
    sha256: String,
    index: u32,
}

struct Active {
    package: Package,
    rollout: Rollout,
    manifest_topic: String,
    /// Set for group deployments: devices of this group join the rollout.
    group: Option<String>,
    resends_ignored: u64,
    finished: Option<String>,
    /// Progress changed since the last [`Engine::take_dirty`].
    dirty: bool,
    /// Set for a staged rollout.
    staged: Option<Staged>,
    /// Finished, and served to joining devices (see [`Serving`]).
    serving: bool,
}

/// A finished group rollout that is the group's current version (see the module docs).
struct Serving {
    package: Package,
    manifest_topic: String,
    /// Its final progress, written again with `serving: false` when serving ends.
    progress: ProgressFile,
}

/// A staged rollout's waves and its rollback deployment.
struct Staged {
    waves: Waves,
    rollback: Package,
    /// The rollback deployment's progress on the devices it was sent to.
    rolled_back: Rollout,
}

/// An operator's request for a staged rollout (`edge-coordinator rollout ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    Pause,
    Resume,
    Abort,
}

/// Why a control request was not applied; the text goes to the log and the journal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("no active rollout {0}")]
    Unknown(String),
    #[error("rollout {0} was not started with --strategy canary")]
    NotStaged(String),
    #[error("rollout {0} is halted already")]
    Halted(String),
}

/// Counts since start, for the stats line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineTotals {
    pub chunks_sent: u64,
    pub chunks_resent: u64,
    /// Resends published once on a group chunk topic for many devices (counted in
    /// `chunks_resent` too).
    pub chunks_rebroadcast: u64,
    pub resend_entries_ignored: u64,
}

/// Every active deployment and what is queued for them.
#[derive(Default)]
pub struct Engine {
    active: BTreeMap<String, Active>,
    /// Resend answers, sent before `initial`.
    resends: VecDeque<Queued>,
    initial: VecDeque<Queued>,
    queued: HashSet<Queued>,
    /// Per-device resend answers of group rollouts queued, per chunk (see the module docs).
    waiting: HashMap<ChunkRef, usize>,
    /// Manifest topic -> the deployment whose manifest is retained there.
    retained: BTreeMap<String, String>,
    /// Rollback deployment id -> the staged rollout it belongs to.
    rollback_of: BTreeMap<String, String>,
    /// Deployment id -> a finished group rollout still served to joining devices.
    serving: BTreeMap<String, Serving>,
    /// Progress files of rollouts that stopped being served, for [`Engine::take_dirty`].
    served: Vec<ProgressFile>,
    /// Rollout that took a group topic -> the served version it replaced there, which becomes
    /// the group's current version again if that rollout does not end well.
    shadowed: BTreeMap<String, String>,
    totals: EngineTotals,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("active", &self.active.keys().collect::<Vec<_>>())
            .field("queued", &self.queued.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// True while the deployment is known (active, or finished but not yet persisted).
    pub fn contains(&self, deployment_id: &str) -> bool {
        self.active.contains_key(deployment_id)
    }

    /// Deployments not finished.
    pub fn active_count(&self) -> usize {
        self.active
            .values()
            .filter(|a| a.finished.is_none())
            .count()
    }

    /// Chunks waiting to be published.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    pub fn totals(&self) -> EngineTotals {
        self.totals
    }

    /// Starts a new deployment: `members` are the registered devices of its group (ignored
    /// for a device target). Publishes the retained manifest and queues every chunk once.
    pub fn start(&mut self, package: Package, members: Vec<String>, now_ms: u64) -> Vec<Action> {
        let id = package.manifest.deployment_id.clone();
        if self.active.contains_key(&id) {
            return Vec::new();
        }
        let (devices, chunk_topic, group) = match &package.manifest.target {
            Target::Device(d) => (vec![d.clone()], topics::deploy_chunk(d), None),
            Target::Group(g) => (members, topics::group_deploy_chunk(g), Some(g.clone())),
        };
        let rollout = Rollout::new(&package.manifest, devices);
        let chunks: Vec<(String, u32)> = package
            .chunks()
            .map(|c| (c.sha256.clone(), c.index))
            .collect();
        let mut out = self.insert(package, rollout, group, 0, false);
        for (sha256, index) in chunks {
            self.enqueue(
                false,
                Queued {
                    deployment_id: id.clone(),
                    topic: chunk_topic.clone(),
                    device: None,
                    sha256,
                    index,
                },
            );
        }
        out.extend(self.check_expiry(&id, now_ms));
        out
    }

    /// Resumes a deployment after a restart from its progress file: republishes the retained
    /// manifest (an embedded broker forgot it) but no chunks; agents ask for what they lack.
    pub fn resume(&mut self, package: Package, progress: ProgressFile, now_ms: u64) -> Vec<Action> {
        let id = package.manifest.deployment_id.clone();
        if self.active.contains_key(&id) {
            return Vec::new();
        }
        let group = match &package.manifest.target {
            Target::Group(g) => Some(g.clone()),
            Target::Device(_) => None,
        };
        let rollout = Rollout::restore(&package.manifest, progress.devices);
        let mut out = self.insert(package, rollout, group, progress.resends_ignored, true);
        out.extend(self.check_expiry(&id, now_ms));
        out
    }

    fn insert(
        &mut self,
        package: Package,
        rollout: Rollout,
        group: Option<String>,
        resends_ignored: u64,
        resumed: bool,
    ) -> Vec<Action> {
        let id = package.manifest.deployment_id.clone();
        let manifest_topic = match &package.manifest.target {
            Target::Device(d) => topics::deploy_manifest(d),
            Target::Group(g) => topics::group_deploy_manifest(g),
        };
        let mut out = Vec::new();
        // The topic's retained manifest is about to be replaced: the older rollout ends
        // without clearing it.
        if let Some(older) = self.retained.insert(manifest_topic.clone(), id.clone())
            && older != id
        {
            // A served current version stays the fallback until this one ends well.
            if self.serving.contains_key(&older) {
                self.shadowed.insert(id.clone(), older.clone());
            }
            out.extend(self.finish(&older, format!("superseded by deployment {id}")));
        }
        out.push(Action::Publish {
            topic: manifest_topic.clone(),
            payload: package.manifest_payload(),
            retain: true,
        });
        out.push(Action::Event(Event::DeploymentStarted {
            deployment_id: id.clone(),
            version: package.manifest.version,
            target: package.manifest.target.to_string(),
            devices: rollout.devices().map(|(d, _)| d.to_owned()).collect(),
            resumed,
        }));
        self.active.insert(
            id,
            Active {
                package,
                rollout,
                manifest_topic,
                group,
                resends_ignored,
                finished: None,
                dirty: true,
                staged: None,
                serving: false,
            },
        );
        out
    }

    /// Starts a staged rollout to a group: nothing is published to the group topic; the
    /// canary wave gets the manifest on its devices' topics (see `waves.rs`).
    pub fn start_staged(
        &mut self,
        package: Package,
        rollback: Package,
        strategy: Strategy,
        members: Vec<String>,
        now_ms: u64,
    ) -> Vec<Action> {
        let waves = Waves::new(strategy, members, now_ms);
        let rolled_back = Rollout::new(&rollback.manifest, std::iter::empty());
        let rollout = Rollout::new(&package.manifest, std::iter::empty());
        self.insert_staged(
            package,
            rollout,
            waves,
            rollback,
            rolled_back,
            0,
            false,
            now_ms,
        )
    }

    /// Resumes a staged rollout after a restart: republishes what the devices still waiting
    /// need (the embedded broker forgot its retained messages), then goes on deciding.
    pub fn resume_staged(
        &mut self,
        package: Package,
        rollback: Package,
        progress: ProgressFile,
        waves: Waves,
        now_ms: u64,
    ) -> Vec<Action> {
        let rollout = Rollout::restore(&package.manifest, progress.devices);
        let rolled_back = Rollout::restore(&rollback.manifest, progress.rollback);
        self.insert_staged(
            package,
            rollout,
            waves,
            rollback,
            rolled_back,
            progress.resends_ignored,
            true,
            now_ms,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn insert_staged(
        &mut self,
        package: Package,
        rollout: Rollout,
        waves: Waves,
        rollback: Package,
        rolled_back: Rollout,
        resends_ignored: u64,
        resumed: bool,
        now_ms: u64,
    ) -> Vec<Action> {
        let id = package.manifest.deployment_id.clone();
        let Target::Group(group) = package.manifest.target.clone() else {
            return Vec::new();
        };
        if self.active.contains_key(&id) {
            return Vec::new();
        }
        let mut out = vec![Action::Event(Event::DeploymentStarted {
            deployment_id: id.clone(),
            version: package.manifest.version,
            target: package.manifest.target.to_string(),
            devices: waves
                .waves
                .iter()
                .flatten()
                .chain(&waves.pending)
                .cloned()
                .collect(),
            resumed,
        })];
        if resumed {
            // Devices still waiting get their manifest again: the new version before a halt,
            // the rollback after one.
            let (manifest, progress) = if waves.is_halted() {
                (rollback.manifest_payload(), &rolled_back)
            } else {
                (package.manifest_payload(), &rollout)
            };
            for (d, p) in progress.devices() {
                if !p.is_final() {
                    out.push(Action::Publish {
                        topic: topics::deploy_manifest(d),
                        payload: manifest.clone(),
                        retain: true,
                    });
                }
            }
        }
        self.rollback_of
            .insert(rollback.manifest.deployment_id.clone(), id.clone());
        self.active.insert(
            id.clone(),
            Active {
                manifest_topic: topics::group_deploy_manifest(&group),
                package,
                rollout,
                group: Some(group),
                resends_ignored,
                finished: None,
                dirty: true,
                staged: Some(Staged {
                    waves,
                    rollback,
                    rolled_back,
                }),
                serving: false,
            },
        );
        out.extend(self.decide(&id, now_ms));
        out.extend(self.check_expiry(&id, now_ms));
        out
    }

    /// Runs a staged rollout's decisions and carries them out; ends it when it is done.
    fn decide(&mut self, id: &str, now_ms: u64) -> Vec<Action> {
        let Some(a) = self.active.get_mut(id).filter(|a| a.finished.is_none()) else {
            return Vec::new();
        };
        let Some(st) = a.staged.as_mut() else {
            return Vec::new();
        };
        let decisions = st.waves.step(&a.rollout, now_ms);
        let mut out = Vec::new();
        for d in decisions {
            a.dirty = true;
            match d {
                Decision::Launch { wave, devices } => {
                    for d in &devices {
                        a.rollout.add_device(d.clone());
                        out.push(Action::Publish {
                            topic: topics::deploy_manifest(d),
                            payload: a.package.manifest_payload(),
                            retain: true,
                        });
                    }
                    out.push(Action::Event(Event::RolloutDecision {
                        deployment_id: id.to_owned(),
                        decision: "launched",
                        wave: Some(wave),
                        devices,
                        healthy: 0,
                        failed: 0,
                        reason: None,
                    }));
                    let group = a.group.clone().unwrap_or_default();
                    let chunks: Vec<(String, u32)> = a
                        .package
                        .chunks()
                        .map(|c| (c.sha256.clone(), c.index))
                        .collect();
                    for (sha256, index) in chunks {
                        self.enqueue(
                            false,
                            Queued {
                                deployment_id: id.to_owned(),
                                topic: topics::group_deploy_chunk(&group),
                                device: None,
                                sha256,
                                index,
                            },
                        );
                    }
                    // `self.enqueue` needed the engine; take the rollout again.
                    return out.into_iter().chain(self.decide(id, now_ms)).collect();
                }
                Decision::GatePassed {
                    wave,
                    healthy,
                    failed,
                    silent,
                } => {
                    out.push(Action::Event(Event::RolloutDecision {
                        deployment_id: id.to_owned(),
                        decision: "gate_passed",
                        wave: Some(wave),
                        devices: st.waves.waves.get(wave).cloned().unwrap_or_default(),
                        healthy,
                        failed,
                        reason: (silent > 0).then(|| {
                            format!("{silent} devices silent at the wave timeout; still waiting for them")
                        }),
                    }));
                }
                Decision::Halt { reason, failures } => {
                    out.extend(halt(id, a, reason, failures));
                    self.drop_queued(id);
                    break;
                }
            }
        }
        out.extend(self.check_done(id, now_ms));
        out
    }

    /// Ends a staged rollout that is done: halted and every rolled-back device final, or
    /// every wave through and every launched device final.
    fn check_done(&mut self, id: &str, now_ms: u64) -> Vec<Action> {
        let Some(a) = self.active.get(id).filter(|a| a.finished.is_none()) else {
            return Vec::new();
        };
        let Some(st) = a.staged.as_ref() else {
            return Vec::new();
        };
        let serve = !st.waves.is_halted();
        let reason = match &st.waves.phase {
            Phase::Halted { reason } if st.rolled_back.is_finished() => {
                let s = st.rolled_back.summary();
                format!(
                    "halted: {reason}; rolled back {} of {} updated devices",
                    s.healthy,
                    s.healthy + s.failed
                )
            }
            Phase::Running if st.waves.all_launched(now_ms) && a.rollout.is_finished() => {
                format!(
                    "every wave passed its health gate ({} waves)",
                    st.waves.waves.len()
                )
            }
            _ => return Vec::new(),
        };
        self.finish_serving(id, reason, serve)
    }

    /// Pause, resume or abort a staged rollout.
    pub fn control(
        &mut self,
        id: &str,
        control: Control,
        now_ms: u64,
    ) -> Result<Vec<Action>, ControlError> {
        let a = self
            .active
            .get_mut(id)
            .filter(|a| a.finished.is_none())
            .ok_or_else(|| ControlError::Unknown(id.to_owned()))?;
        let st = a
            .staged
            .as_mut()
            .ok_or_else(|| ControlError::NotStaged(id.to_owned()))?;
        if st.waves.is_halted() {
            return Err(ControlError::Halted(id.to_owned()));
        }
        a.dirty = true;
        let event = |decision, reason: Option<String>| {
            Action::Event(Event::RolloutDecision {
                deployment_id: id.to_owned(),
                decision,
                wave: None,
                devices: Vec::new(),
                healthy: 0,
                failed: 0,
                reason,
            })
        };
        match control {
            Control::Pause => {
                st.waves.paused = true;
                Ok(vec![event("paused", None)])
            }
            Control::Resume => {
                st.waves.paused = false;
                let mut out = vec![event("resumed", None)];
                out.extend(self.decide(id, now_ms));
                Ok(out)
            }
            Control::Abort => {
                let reason = "aborted by the operator".to_owned();
                st.waves.halt(reason.clone());
                let mut out = halt(id, a, reason, 0);
                self.drop_queued(id);
                out.extend(self.check_done(id, now_ms));
                Ok(out)
            }
        }
    }

    fn drop_queued(&mut self, id: &str) {
        self.waiting.retain(|(d, _, _), _| d != id);
        self.resends.retain(|q| q.deployment_id != id);
        self.initial.retain(|q| q.deployment_id != id);
        self.queued.retain(|q| q.deployment_id != id);
    }

    /// A device registered with `groups`: it joins the active rollouts to those groups (its
    /// agent gets the retained group manifest by itself).
    pub fn on_registered(&mut self, device: &str, groups: &[String]) {
        for a in self.active.values_mut() {
            if a.finished.is_none()
                && a.group.as_ref().is_some_and(|g| groups.contains(g))
                && !a.rollout.has_device(device)
            {
                match a.staged.as_mut() {
                    // It waits for the next wave.
                    Some(st) => a.dirty |= st.waves.join(device),
                    None => {
                        a.rollout.add_device(device.to_owned());
                        a.dirty = true;
                    }
                }
            }
        }
    }

    /// A (not duplicate) status report with envelope id `id`. Always journaled; it moves the
    /// rollout only if the deployment is active and the device is (or may become) a target.
    pub fn on_status(
        &mut self,
        device: &str,
        id: &str,
        status: &DeployStatus,
        now_ms: u64,
    ) -> Vec<Action> {
        let (received, total) = match status.step {
            protocol::v1::deploy::Step::Downloading { received, total } => {
                (Some(received), Some(total))
            }
            _ => (None, None),
        };
        let mut out = vec![Action::Event(Event::Deploy {
            device: device.to_owned(),
            id: id.to_owned(),
            deployment_id: status.deployment_id.clone(),
            version: status.version,
            step: step_name(&status.step),
            reason: step_reason(&status.step).map(str::to_owned),
            received,
            total,
            chunks_dropped: (status.chunks_dropped > 0).then_some(status.chunks_dropped),
        })];
        if let Some(owner) = self.rollback_of.get(&status.deployment_id).cloned() {
            if let Some(a) = self.active.get_mut(&owner).filter(|a| a.finished.is_none())
                && let Some(st) = a.staged.as_mut()
            {
                a.dirty = true;
                let on_its_way = a.rollout.progress(device).is_some_and(|p| !p.is_final());
                if on_its_way && matches!(status.step, protocol::v1::deploy::Step::Rejected { .. })
                {
                    // Refused while the new version is still in its health check (busy):
                    // not final; its report on the new version decides (see below).
                    st.rolled_back.remove_device(device);
                    st.rolled_back.add_device(device.to_owned());
                } else {
                    st.rolled_back.on_status(device, status);
                }
            }
            out.extend(self.check_done(&owner, now_ms));
            return out;
        }
        let Some(a) = self
            .active
            .get_mut(&status.deployment_id)
            .filter(|a| a.finished.is_none())
        else {
            return out;
        };
        if a.group.is_some() && a.staged.is_none() && !a.rollout.has_device(device) {
            a.rollout.add_device(device.to_owned());
        }
        if a.rollout.on_status(device, status) {
            a.dirty = true;
        }
        if let Some(st) = a.staged.as_mut() {
            if st.waves.is_halted() && a.rollout.has_device(device) {
                let rolled = st.rolled_back.progress(device).and_then(|p| p.last.clone());
                match &status.step {
                    // Updated after the halt (it was on its way, or refused the rollback as
                    // busy in its health check): it gets the rollback now.
                    protocol::v1::deploy::Step::Healthy
                        if !matches!(rolled, Some(protocol::v1::deploy::Step::Healthy)) =>
                    {
                        st.rolled_back.remove_device(device);
                        st.rolled_back.add_device(device.to_owned());
                        out.push(Action::Publish {
                            topic: topics::deploy_manifest(device),
                            payload: st.rollback.manifest_payload(),
                            retain: true,
                        });
                    }
                    // It never took the new version: nothing to roll back. Unless the
                    // failure is the rollback itself replacing the new version mid-install
                    // (the agent reports that before its first step on the rollback): then
                    // the rollback's own steps are still to come and counted.
                    protocol::v1::deploy::Step::Failed { reason }
                        if rolled.is_none()
                            && reason.starts_with(&format!(
                                "superseded by deployment {} ",
                                st.rollback.manifest.deployment_id
                            )) => {}
                    s if is_failure(Some(s)) && rolled.is_none() => {
                        st.rolled_back.remove_device(device);
                    }
                    _ => {}
                }
            }
            let id = status.deployment_id.clone();
            out.extend(self.decide(&id, now_ms));
            out.extend(self.check_done(&id, now_ms));
            out.extend(self.check_expiry(&id, now_ms));
            return out;
        }
        if a.rollout.is_finished() {
            let s = a.rollout.summary();
            let serve = a.group.is_some() && s.failed == 0 && s.healthy > 0;
            out.extend(self.finish_serving(
                &status.deployment_id,
                "every device is final".into(),
                serve,
            ));
        }
        out.extend(self.check_expiry(&status.deployment_id, now_ms));
        out
    }

    /// A resend request from `device`: queues the valid chunks (bounded) on its chunk topic,
    /// or, in a group rollout, on the group's when many devices lack them (module docs).
    pub fn on_resend(&mut self, device: &str, request: &ResendRequest) -> Vec<Action> {
        let asked: usize = request.artifacts.iter().map(|m| m.indexes.len()).sum();
        let id = request.deployment_id.clone();
        if let Some(owner) = self.rollback_of.get(&id).cloned() {
            let chunks = match self
                .active
                .get_mut(&owner)
                .filter(|a| a.finished.is_none())
                .and_then(|a| a.staged.as_mut())
            {
                Some(st) if st.rolled_back.has_device(device) => {
                    st.rolled_back.on_resend(device, request, MAX_RESEND_CHUNKS)
                }
                _ => Vec::new(),
            };
            return self.answer_resend(device, &id, chunks, asked, None);
        }
        if let Some(s) = self.serving.get(&id) {
            // A device that joined the group after the rollout.
            let mut r = Rollout::new(&s.package.manifest, [device.to_owned()]);
            let chunks = r.on_resend(device, request, MAX_RESEND_CHUNKS);
            return self.answer_resend(device, &id, chunks, asked, None);
        }
        let (chunks, group) = match self.active.get_mut(&id).filter(|a| a.finished.is_none()) {
            Some(a)
                if a.staged
                    .as_ref()
                    .is_some_and(|st| st.waves.is_halted() || !a.rollout.has_device(device)) =>
            {
                (Vec::new(), None)
            }
            Some(a) if a.group.is_some() || a.rollout.has_device(device) => {
                if !a.rollout.has_device(device) {
                    a.rollout.add_device(device.to_owned());
                }
                let chunks = a.rollout.on_resend(device, request, MAX_RESEND_CHUNKS);
                a.resends_ignored += (asked - chunks.len()) as u64;
                a.dirty = true;
                let group = a.group.as_ref().map(|g| {
                    (
                        topics::group_deploy_chunk(g),
                        rebroadcast_threshold(a.rollout.device_count()),
                    )
                });
                (chunks, group)
            }
            // Unknown or finished deployment, or a device that is not its target.
            _ => (Vec::new(), None),
        };
        self.answer_resend(device, &id, chunks, asked, group)
    }

    /// Queues the answer to one resend request: on the device's chunk topic, or, given the
    /// rollout's `(group chunk topic, rebroadcast threshold)`, covered by a queued broadcast
    /// or turned into a rebroadcast once enough devices wait for the chunk.
    fn answer_resend(
        &mut self,
        device: &str,
        id: &str,
        chunks: Vec<(String, u32)>,
        asked: usize,
        group: Option<(String, usize)>,
    ) -> Vec<Action> {
        let ignored = asked - chunks.len();
        self.totals.resend_entries_ignored += ignored as u64;
        let mut out = Vec::new();
        let (mut count, mut rebroadcast) = (0u32, 0u32);
        for (sha256, index) in chunks {
            let q = Queued {
                deployment_id: id.to_owned(),
                topic: topics::deploy_chunk(device),
                device: Some(device.to_owned()),
                sha256,
                index,
            };
            let Some((topic, threshold)) = &group else {
                count += 1;
                self.enqueue(true, q);
                continue;
            };
            let broadcast = Queued {
                topic: topic.clone(),
                device: None,
                ..q.clone()
            };
            if self.queued.contains(&broadcast) {
                // Its first broadcast or a rebroadcast is still queued: that answers it.
                rebroadcast += 1;
                continue;
            }
            if self.queued.contains(&q) {
                count += 1;
                continue;
            }
            let key = (q.deployment_id.clone(), q.sha256.clone(), q.index);
            let waiting = self.waiting.get(&key).copied().unwrap_or(0) + 1;
            if waiting < *threshold {
                self.waiting.insert(key, waiting);
                count += 1;
                self.enqueue(true, q);
                continue;
            }
            // Enough devices lack it: one broadcast, first in line, instead of their answers.
            self.waiting.remove(&key);
            let same_chunk = |e: &Queued| {
                e.device.is_some()
                    && e.deployment_id == broadcast.deployment_id
                    && e.sha256 == broadcast.sha256
                    && e.index == broadcast.index
            };
            self.resends.retain(|e| !same_chunk(e));
            self.queued.retain(|e| !same_chunk(e));
            self.queued.insert(broadcast.clone());
            out.push(Action::Event(Event::DeployRebroadcast {
                deployment_id: id.to_owned(),
                artifact: broadcast.sha256.clone(),
                index: broadcast.index,
                devices: waiting as u32,
            }));
            self.resends.push_front(broadcast);
            rebroadcast += 1;
        }
        out.insert(
            0,
            Action::Event(Event::DeployResend {
                device: device.to_owned(),
                deployment_id: id.to_owned(),
                chunks: count,
                rebroadcast,
                ignored: ignored as u32,
            }),
        );
        out
    }

    fn enqueue(&mut self, resend: bool, q: Queued) {
        // Already waiting (a repeated request): one publish answers both.
        if self.queued.insert(q.clone()) {
            if resend {
                self.resends.push_back(q);
            } else {
                self.initial.push_back(q);
            }
        }
    }

    /// Ends expired rollouts, then publishes at most `budget` queued chunks, resends first.
    pub fn tick(&mut self, now_ms: u64, budget: usize) -> Vec<Action> {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        let mut out = Vec::new();
        for id in &ids {
            out.extend(self.decide(id, now_ms));
            out.extend(self.check_expiry(id, now_ms));
        }
        let expired: Vec<String> = self
            .serving
            .iter()
            .filter(|(_, s)| now_ms >= s.package.manifest.expires_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(s) = self.serving.get(&id)
                && self.retained.get(&s.manifest_topic) == Some(&id)
            {
                self.retained.remove(&s.manifest_topic);
                out.push(Action::Publish {
                    topic: s.manifest_topic.clone(),
                    payload: Vec::new(),
                    retain: true,
                });
            }
            tracing::info!(deployment_id = %id, "the group's current version expired; devices joining now get no deployment");
            self.end_serving(&id);
        }
        let mut sent = 0;
        while sent < budget {
            let (q, resend) = match self.resends.pop_front() {
                Some(q) => (q, true),
                None => match self.initial.pop_front() {
                    Some(q) => (q, false),
                    None => break,
                },
            };
            self.queued.remove(&q);
            if resend && q.device.is_some() {
                let key = (q.deployment_id.clone(), q.sha256.clone(), q.index);
                if let Some(n) = self.waiting.get_mut(&key) {
                    *n -= 1;
                    if *n == 0 {
                        self.waiting.remove(&key);
                    }
                }
            }
            if let Some(s) = self.serving.get(&q.deployment_id) {
                let Some(payload) = s
                    .package
                    .chunk(&q.sha256, q.index)
                    .and_then(|c| c.encode().ok())
                else {
                    continue;
                };
                self.totals.chunks_resent += 1;
                sent += 1;
                out.push(Action::Publish {
                    topic: q.topic,
                    payload,
                    retain: false,
                });
                continue;
            }
            if let Some(owner) = self.rollback_of.get(&q.deployment_id) {
                // A rollback chunk: always a resend to one device.
                let Some(st) = self
                    .active
                    .get_mut(owner)
                    .filter(|a| a.finished.is_none())
                    .and_then(|a| a.staged.as_mut())
                else {
                    continue;
                };
                let Some(payload) = st
                    .rollback
                    .chunk(&q.sha256, q.index)
                    .and_then(|c| c.encode().ok())
                else {
                    continue;
                };
                if let Some(d) = &q.device {
                    st.rolled_back.on_chunk_sent(d, &q.sha256, q.index);
                }
                self.totals.chunks_resent += 1;
                sent += 1;
                out.push(Action::Publish {
                    topic: q.topic,
                    payload,
                    retain: false,
                });
                continue;
            }
            let Some(a) = self
                .active
                .get_mut(&q.deployment_id)
                .filter(|a| a.finished.is_none())
            else {
                continue;
            };
            // Our own package: a chunk that cannot be built or encoded is skipped, never sent
            // malformed (it does not happen for a package that passed `from_signed`).
            let Some(payload) = a
                .package
                .chunk(&q.sha256, q.index)
                .and_then(|c| c.encode().ok())
            else {
                continue;
            };
            match &q.device {
                Some(d) => a.rollout.on_chunk_sent(d, &q.sha256, q.index),
                None => {
                    let devices: Vec<String> =
                        a.rollout.devices().map(|(d, _)| d.to_owned()).collect();
                    for d in devices {
                        a.rollout.on_chunk_sent(&d, &q.sha256, q.index);
                    }
                }
            }
            a.dirty = true;
            if resend {
                self.totals.chunks_resent += 1;
                if q.device.is_none() {
                    self.totals.chunks_rebroadcast += 1;
                }
            } else {
                self.totals.chunks_sent += 1;
            }
            sent += 1;
            out.push(Action::Publish {
                topic: q.topic,
                payload,
                retain: false,
            });
        }
        out
    }

    fn check_expiry(&mut self, id: &str, now_ms: u64) -> Vec<Action> {
        match self.active.get(id) {
            Some(a) if a.finished.is_none() && now_ms >= a.package.manifest.expires_ms => {
                self.finish(id, "the manifest expired".into())
            }
            _ => Vec::new(),
        }
    }

    fn finish(&mut self, id: &str, reason: String) -> Vec<Action> {
        self.finish_serving(id, reason, false)
    }

    /// Ends a rollout; with `serve`, it stays the group's current version (module docs).
    fn finish_serving(&mut self, id: &str, reason: String, serve: bool) -> Vec<Action> {
        let Some(a) = self.active.get_mut(id).filter(|a| a.finished.is_none()) else {
            return Vec::new();
        };
        a.finished = Some(reason.clone());
        a.dirty = true;
        let summary = a.rollout.summary();
        let mut out = Vec::new();
        if serve {
            a.serving = true;
            if a.staged.is_some() {
                out.push(Action::Publish {
                    topic: a.manifest_topic.clone(),
                    payload: a.package.manifest_payload(),
                    retain: true,
                });
            }
            let mut progress = progress_file(a, 0);
            progress.serving = false;
            self.serving.insert(
                id.to_owned(),
                Serving {
                    package: a.package.clone(),
                    manifest_topic: a.manifest_topic.clone(),
                    progress,
                },
            );
        }
        if a.staged.is_some() {
            // Every device topic it published a manifest on (new version or rollback).
            for (d, _) in a.rollout.devices() {
                out.push(Action::Publish {
                    topic: topics::deploy_manifest(d),
                    payload: Vec::new(),
                    retain: true,
                });
            }
        }
        let mut replaced = None;
        if serve {
            // The group topic is ours now; the version it held before stops being served.
            replaced = self
                .retained
                .insert(a.manifest_topic.clone(), id.to_owned())
                .filter(|older| older != id);
        } else if self.retained.get(&a.manifest_topic).map(String::as_str) == Some(id) {
            self.retained.remove(&a.manifest_topic);
            out.push(Action::Publish {
                topic: a.manifest_topic.clone(),
                payload: Vec::new(),
                retain: true,
            });
        }
        out.push(Action::Event(Event::DeploymentFinished {
            deployment_id: id.to_owned(),
            version: a.package.manifest.version,
            reason,
            healthy: summary.healthy,
            failed: summary.failed,
            in_progress: summary.in_progress,
        }));
        let rollback = a
            .staged
            .as_ref()
            .map(|st| st.rollback.manifest.deployment_id.clone());
        if !serve {
            self.drop_queued(id);
        }
        if let Some(rb) = rollback {
            self.drop_queued(&rb);
        }
        if let Some(older) = replaced {
            self.end_serving(&older);
        }
        if let Some(older) = self.shadowed.remove(id) {
            out.extend(self.restore_serving(id, &older, serve));
        }
        out
    }

    /// `id` ended; `older` is the served version it had replaced on the group topic: dropped if
    /// `id` is the group's version now, passed on if a newer deployment holds the topic, else
    /// the group's current version again (its manifest retained once more).
    fn restore_serving(&mut self, id: &str, older: &str, serve: bool) -> Vec<Action> {
        if serve {
            self.end_serving(older);
            return Vec::new();
        }
        let Some(s) = self.serving.get(older) else {
            return Vec::new();
        };
        match self.retained.get(&s.manifest_topic).cloned() {
            Some(newer) if newer != id => {
                self.shadowed.insert(newer, older.to_owned());
                Vec::new()
            }
            _ => {
                self.retained
                    .insert(s.manifest_topic.clone(), older.to_owned());
                vec![Action::Publish {
                    topic: s.manifest_topic.clone(),
                    payload: s.package.manifest_payload(),
                    retain: true,
                }]
            }
        }
    }

    /// Stops serving a group's former current version (replaced, or expired).
    fn end_serving(&mut self, id: &str) {
        if let Some(s) = self.serving.remove(id) {
            self.drop_queued(id);
            self.served.push(s.progress);
        }
    }

    /// Resumes serving a finished group rollout after a restart (its progress file says
    /// `serving`): the retained manifest again, resends answered.
    pub fn resume_serving(
        &mut self,
        package: Package,
        mut progress: ProgressFile,
        now_ms: u64,
    ) -> Vec<Action> {
        let id = package.manifest.deployment_id.clone();
        let Target::Group(g) = &package.manifest.target else {
            return Vec::new();
        };
        let topic = topics::group_deploy_manifest(g);
        progress.serving = false;
        if now_ms >= package.manifest.expires_ms {
            self.served.push(progress);
            return Vec::new();
        }
        let out = match self.retained.get(&topic).cloned() {
            // A rollout resumed before it holds the topic: this version waits behind it.
            Some(newer) if newer != id => {
                self.shadowed.insert(newer, id.clone());
                Vec::new()
            }
            _ => {
                self.retained.insert(topic.clone(), id.clone());
                vec![Action::Publish {
                    topic: topic.clone(),
                    payload: package.manifest_payload(),
                    retain: true,
                }]
            }
        };
        self.serving.insert(
            id,
            Serving {
                package,
                manifest_topic: topic,
                progress,
            },
        );
        out
    }

    /// Group rollouts served to joining devices.
    pub fn serving_count(&self) -> usize {
        self.serving.len()
    }

    /// Progress of every rollout that changed since the last call; finished rollouts are
    /// forgotten once returned here.
    pub fn take_dirty(&mut self, now_ms: u64) -> Vec<ProgressFile> {
        let mut out: Vec<ProgressFile> = self
            .served
            .drain(..)
            .map(|mut p| {
                p.updated_ms = now_ms;
                p
            })
            .collect();
        for a in self.active.values_mut().filter(|a| a.dirty) {
            a.dirty = false;
            out.push(progress_file(a, now_ms));
        }
        self.active.retain(|_, a| a.finished.is_none());
        let active = &self.active;
        self.rollback_of
            .retain(|_, owner| active.contains_key(owner));
        out
    }
}

/// Halts a staged rollout: every launched device that took (or may still take) the new
/// version gets the rollback deployment; those that refused or lost it are left alone.
fn halt(id: &str, a: &mut Active, reason: String, failures: usize) -> Vec<Action> {
    let Some(st) = a.staged.as_mut() else {
        return Vec::new();
    };
    a.dirty = true;
    let mut out = Vec::new();
    let mut rolled = Vec::new();
    for (d, p) in a.rollout.devices() {
        if is_failure(p.last.as_ref()) {
            continue;
        }
        st.rolled_back.add_device(d.to_owned());
        rolled.push(d.to_owned());
        out.push(Action::Publish {
            topic: topics::deploy_manifest(d),
            payload: st.rollback.manifest_payload(),
            retain: true,
        });
    }
    let s = a.rollout.summary();
    out.push(Action::Event(Event::RolloutDecision {
        deployment_id: id.to_owned(),
        decision: "halted",
        wave: st.waves.waves.len().checked_sub(1),
        devices: rolled,
        healthy: s.healthy,
        failed: s.failed.max(failures),
        reason: Some(reason),
    }));
    out
}

fn progress_file(a: &Active, now_ms: u64) -> ProgressFile {
    let m = &a.package.manifest;
    ProgressFile {
        deployment_id: m.deployment_id.clone(),
        version: m.version,
        target: m.target.clone(),
        expires_ms: m.expires_ms,
        total_bytes: a.package.blobs().map(|(_, b)| b.len() as u64).sum(),
        chunk_total: a.package.chunk_total(),
        devices: a
            .rollout
            .devices()
            .map(|(d, p): (&str, &DeviceProgress)| (d.to_owned(), p.clone()))
            .collect(),
        resends_ignored: a.resends_ignored,
        finished: a.finished.clone(),
        updated_ms: now_ms,
        waves: a.staged.as_ref().map(|st| st.waves.clone()),
        serving: a.serving,
        rollback: a
            .staged
            .as_ref()
            .map(|st| {
                st.rolled_back
                    .devices()
                    .map(|(d, p)| (d.to_owned(), p.clone()))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::package::{ArtifactFile, PackageSpec};
    use protocol::v1::deploy::{
        Chunk, DeployKind, HealthCheck, MissingChunks, SigningKey, Step, sha256_hex,
    };

    const BYTES: [u8; 35] = [7; 35];

    fn package(id: &str, target: Target) -> Package {
        Package::build(
            PackageSpec {
                deployment_id: id.into(),
                target,
                version: 2,
                now_ms: 0,
                ttl_ms: 10_000,
                kind: DeployKind::Pipeline,
                pipeline_toml: Some(String::new()),
                chunk_size: 10,
                health: HealthCheck {
                    messages: 0,
                    seconds: 0,
                },
            },
            vec![ArtifactFile {
                name: "a.wasm".into(),
                version: "1".into(),
                bytes: BYTES.to_vec(),
            }],
            &SigningKey::from_bytes(&[9; 32]),
        )
        .expect("builds")
    }

    fn publishes(actions: &[Action]) -> Vec<(String, usize, bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish {
                    topic,
                    payload,
                    retain,
                } => Some((topic.clone(), payload.len(), *retain)),
                Action::Event(_) => None,
            })
            .collect()
    }

    fn chunk_indexes(actions: &[Action]) -> Vec<u32> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish {
                    payload,
                    retain: false,
                    ..
                } => Chunk::decode(payload).ok().map(|c| c.index),
                _ => None,
            })
            .collect()
    }

    fn status(id: &str, step: Step) -> DeployStatus {
        DeployStatus {
            deployment_id: id.into(),
            version: 2,
            step,
            chunks_dropped: 0,
        }
    }

    fn resend(id: &str, sha: &str, indexes: Vec<u32>) -> ResendRequest {
        ResendRequest {
            deployment_id: id.into(),
            artifacts: vec![MissingChunks {
                sha256: sha.into(),
                indexes,
            }],
        }
    }

    #[test]
    fn device_rollout_publishes_retained_manifest_paces_chunks_and_finishes() {
        let mut e = Engine::default();
        let out = e.start(package("dep-1", Target::Device("d1".into())), vec![], 0);
        let p = publishes(&out);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, topics::deploy_manifest("d1"));
        assert!(p[0].2, "manifest is retained");
        assert_eq!(e.queued(), 4);

        let first = e.tick(1, 3);
        assert_eq!(chunk_indexes(&first), vec![0, 1, 2]);
        assert!(
            publishes(&first)
                .iter()
                .all(|(t, _, r)| *t == topics::deploy_chunk("d1") && !r)
        );
        assert_eq!(chunk_indexes(&e.tick(2, 3)), vec![3]);
        assert!(e.tick(3, 3).is_empty());

        let out = e.on_status(
            "d1",
            "m1",
            &status(
                "dep-1",
                Step::RolledBack {
                    reason: "trap".into(),
                },
            ),
            4,
        );
        // Journaled, the retained manifest cleared, the rollout finished.
        assert!(
            matches!(&out[0], Action::Event(Event::Deploy { step: "rolled_back", reason: Some(r), .. }) if r == "trap")
        );
        assert_eq!(
            publishes(&out),
            vec![(topics::deploy_manifest("d1"), 0, true)]
        );
        assert!(matches!(
            out.last(),
            Some(Action::Event(Event::DeploymentFinished { failed: 1, .. }))
        ));
        let dirty = e.take_dirty(5);
        assert_eq!(dirty.len(), 1);
        assert_eq!(dirty[0].finished.as_deref(), Some("every device is final"));
        assert!(!e.contains("dep-1"));
        // A late duplicate-free report is still journaled, nothing else.
        assert_eq!(
            e.on_status("d1", "m2", &status("dep-1", Step::Healthy), 6)
                .len(),
            1
        );
    }

    #[test]
    fn dropped_chunks_an_agent_reports_are_journaled_and_kept_in_the_progress() {
        let mut e = Engine::default();
        e.start(package("dep-1", Target::Device("d1".into())), vec![], 0);
        let mut s = status(
            "dep-1",
            Step::Downloading {
                received: 10,
                total: 35,
            },
        );
        let out = e.on_status("d1", "m1", &s, 1);
        assert!(matches!(
            &out[0],
            Action::Event(Event::Deploy {
                chunks_dropped: None,
                ..
            })
        ));
        s.chunks_dropped = 3;
        let out = e.on_status("d1", "m2", &s, 2);
        assert!(matches!(
            &out[0],
            Action::Event(Event::Deploy {
                chunks_dropped: Some(3),
                ..
            })
        ));
        let progress = e.take_dirty(3);
        assert_eq!(progress[0].devices["d1"].chunks_dropped, 3);
    }

    #[test]
    fn resends_are_validated_bounded_and_go_first_to_the_device() {
        let mut e = Engine::default();
        let sha = sha256_hex(&BYTES);
        e.start(
            package("dep-1", Target::Group("lab".into())),
            vec!["d1".into()],
            0,
        );
        // Group chunks go once to the group topic.
        let out = e.tick(1, 8);
        assert_eq!(chunk_indexes(&out), vec![0, 1, 2, 3]);
        assert!(
            publishes(&out)
                .iter()
                .all(|(t, _, _)| *t == topics::group_deploy_chunk("lab"))
        );

        let out = e.on_resend("d2", &resend("dep-1", &sha, vec![3, 1, 1, 99]));
        // d2 is not known yet but may be a group member; 99 and the repeat are ignored.
        assert!(matches!(
            &out[..],
            [Action::Event(Event::DeployResend {
                chunks: 2,
                ignored: 2,
                ..
            })]
        ));
        let out = e.tick(2, 2);
        assert_eq!(chunk_indexes(&out), vec![1, 3]);
        assert!(
            publishes(&out)
                .iter()
                .all(|(t, _, _)| *t == topics::deploy_chunk("d2"))
        );
        for bad in [
            resend("dep-0", &sha, vec![0]),
            resend("dep-1", &"0".repeat(64), vec![0]),
        ] {
            assert!(matches!(
                &e.on_resend("d1", &bad)[..],
                [Action::Event(Event::DeployResend {
                    chunks: 0,
                    ignored: 1,
                    ..
                })]
            ));
        }
        let many: Vec<u32> = (0..5000).map(|i| i % 4).collect();
        assert!(matches!(
            &e.on_resend("d1", &resend("dep-1", &sha, many))[..],
            [Action::Event(Event::DeployResend {
                chunks: 4,
                ignored: 4996,
                ..
            })]
        ));
        let progress = e.take_dirty(3);
        assert_eq!(progress[0].resends_ignored, 2 + 1 + 4996);
        assert_eq!(
            progress[0].devices.keys().collect::<Vec<_>>(),
            vec!["d1", "d2"]
        );
        assert_eq!(e.totals().resend_entries_ignored, 2 + 2 + 4996);
    }

    #[test]
    fn a_chunk_many_devices_lack_goes_once_to_the_group() {
        let mut e = Engine::default();
        let sha = sha256_hex(&BYTES);
        let members: Vec<String> = (0..100).map(|i| format!("d{i:02}")).collect();
        e.start(
            package("dep-1", Target::Group("lab".into())),
            members.clone(),
            0,
        );
        assert_eq!(rebroadcast_threshold(100), 10);
        assert_eq!(rebroadcast_threshold(3), 8);
        assert_eq!(rebroadcast_threshold(10_000), 1_000);
        // Asked for while the first broadcast is still queued: that broadcast answers it.
        let out = e.on_resend("d00", &resend("dep-1", &sha, vec![2]));
        assert!(matches!(
            &out[..],
            [Action::Event(Event::DeployResend {
                chunks: 0,
                rebroadcast: 1,
                ..
            })]
        ));
        let out = e.tick(1, 8);
        assert_eq!(chunk_indexes(&out), vec![0, 1, 2, 3]);

        // Nine devices lack chunk 1: each gets its own answer (queued)...
        for d in &members[..9] {
            let out = e.on_resend(d, &resend("dep-1", &sha, vec![1]));
            assert!(matches!(
                &out[..],
                [Action::Event(Event::DeployResend {
                    chunks: 1,
                    rebroadcast: 0,
                    ..
                })]
            ));
        }
        // ... one of them repeats its request (still one answer for it), another lacks 3 too.
        e.on_resend(&members[0], &resend("dep-1", &sha, vec![1]));
        e.on_resend(&members[1], &resend("dep-1", &sha, vec![3]));
        assert_eq!(e.queued(), 10);
        // The tenth: the nine answers become one publish on the group topic, first in line.
        let out = e.on_resend(&members[9], &resend("dep-1", &sha, vec![1]));
        assert!(out.iter().any(|a| matches!(
            a,
            Action::Event(Event::DeployRebroadcast {
                index: 1,
                devices: 10,
                ..
            })
        )));
        assert_eq!(e.queued(), 2, "the rebroadcast and d01's chunk 3");
        // Later requests for it, while queued, are answered by it.
        let out = e.on_resend(&members[20], &resend("dep-1", &sha, vec![1]));
        assert!(matches!(
            &out[..],
            [Action::Event(Event::DeployResend {
                chunks: 0,
                rebroadcast: 1,
                ..
            })]
        ));
        let out = e.tick(2, 8);
        let sent = publishes(&out);
        assert_eq!(chunk_indexes(&out), vec![1, 3]);
        assert_eq!(sent[0].0, topics::group_deploy_chunk("lab"));
        assert_eq!(sent[1].0, topics::deploy_chunk(&members[1]));
        assert_eq!(e.totals().chunks_rebroadcast, 1);
        assert_eq!(e.totals().chunks_resent, 2);
        // Published: the next device to lack it gets its own answer again.
        let out = e.on_resend(&members[30], &resend("dep-1", &sha, vec![1]));
        assert!(matches!(
            &out[..],
            [Action::Event(Event::DeployResend {
                chunks: 1,
                rebroadcast: 0,
                ..
            })]
        ));
    }

    #[test]
    fn a_device_rollout_never_rebroadcasts() {
        let mut e = Engine::default();
        let sha = sha256_hex(&BYTES);
        e.start(package("dep-1", Target::Device("d1".into())), vec![], 0);
        e.tick(1, 8);
        for _ in 0..20 {
            e.on_resend("d1", &resend("dep-1", &sha, vec![1]));
        }
        let out = e.tick(2, 8);
        assert_eq!(
            publishes(&out)
                .iter()
                .map(|(t, _, _)| t.clone())
                .collect::<Vec<_>>(),
            vec![topics::deploy_chunk("d1")]
        );
        assert_eq!(e.totals().chunks_rebroadcast, 0);
    }

    #[test]
    fn device_target_ignores_other_devices_and_expires() {
        let mut e = Engine::default();
        let sha = sha256_hex(&BYTES);
        e.start(package("dep-1", Target::Device("d1".into())), vec![], 0);
        assert!(matches!(
            &e.on_resend("d9", &resend("dep-1", &sha, vec![0]))[..],
            [Action::Event(Event::DeployResend {
                chunks: 0,
                ignored: 1,
                ..
            })]
        ));
        let out = e.tick(10_000, 8);
        assert!(chunk_indexes(&out).is_empty(), "nothing sent after expiry");
        assert!(out.iter().any(|a| matches!(a, Action::Event(Event::DeploymentFinished { reason, .. }) if reason.contains("expired"))));
    }

    #[test]
    fn group_members_join_and_a_newer_deployment_supersedes() {
        let mut e = Engine::default();
        e.start(package("dep-1", Target::Group("lab".into())), vec![], 0);
        e.on_registered("d1", &["lab".into()]);
        e.on_registered("d2", &["other".into()]);
        e.on_status("d3", "m1", &status("dep-1", Step::Verifying), 1);
        let p = e.take_dirty(1);
        assert_eq!(p[0].devices.keys().collect::<Vec<_>>(), vec!["d1", "d3"]);

        let out = e.start(package("dep-2", Target::Group("lab".into())), vec![], 2);
        // The older one ends without clearing the topic the newer manifest now holds.
        assert_eq!(
            publishes(&out),
            vec![(
                topics::group_deploy_manifest("lab"),
                publishes(&out)[0].1,
                true
            )]
        );
        assert!(out.iter().any(|a| matches!(a, Action::Event(Event::DeploymentFinished { deployment_id, .. }) if deployment_id == "dep-1")));
        assert_eq!(e.active_count(), 1);
        // Only dep-2's chunks remain queued.
        assert_eq!(e.queued(), 4);
    }

    #[test]
    fn resume_republishes_the_manifest_without_chunks() {
        let mut e = Engine::default();
        e.start(package("dep-1", Target::Device("d1".into())), vec![], 0);
        e.tick(1, 2);
        let saved = e.take_dirty(1).remove(0);
        assert_eq!(saved.devices["d1"].chunks_sent, 2);

        let mut e = Engine::default();
        let out = e.resume(package("dep-1", Target::Device("d1".into())), saved, 2);
        assert_eq!(publishes(&out).len(), 1);
        assert!(out.iter().any(|a| matches!(
            a,
            Action::Event(Event::DeploymentStarted { resumed: true, .. })
        )));
        assert_eq!(e.queued(), 0);
        let sha = sha256_hex(&BYTES);
        e.on_resend("d1", &resend("dep-1", &sha, vec![2, 3]));
        assert_eq!(chunk_indexes(&e.tick(3, 8)), vec![2, 3]);
        assert_eq!(e.take_dirty(4)[0].devices["d1"].chunks_sent, 4);
    }

    fn staged_package(id: &str, version: u64) -> Package {
        let bytes = if version == 2 {
            BYTES.to_vec()
        } else {
            vec![3; 12]
        };
        Package::build(
            PackageSpec {
                deployment_id: id.into(),
                target: Target::Group("lab".into()),
                version,
                now_ms: 0,
                ttl_ms: 100_000,
                kind: DeployKind::Pipeline,
                pipeline_toml: Some(String::new()),
                chunk_size: 10,
                health: HealthCheck {
                    messages: 0,
                    seconds: 0,
                },
            },
            vec![ArtifactFile {
                name: "a.wasm".into(),
                version: "0".into(),
                bytes,
            }],
            &SigningKey::from_bytes(&[9; 32]),
        )
        .expect("builds")
    }

    fn strategy() -> Strategy {
        Strategy {
            canary: "1".parse().expect("amount"),
            batch: "2".parse().expect("amount"),
            soak_ms: 0,
            wave_timeout_ms: 60_000,
            max_failures: "0".parse().expect("amount"),
            rollback_id: "dep-1-rollback".into(),
        }
    }

    fn decisions(actions: &[Action]) -> Vec<(&'static str, Vec<String>)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Event(Event::RolloutDecision {
                    decision, devices, ..
                }) => Some((*decision, devices.clone())),
                _ => None,
            })
            .collect()
    }

    fn manifest_to(actions: &[Action], device: &str) -> Option<String> {
        actions.iter().find_map(|a| match a {
            Action::Publish {
                topic,
                payload,
                retain: true,
            } if *topic == topics::deploy_manifest(device) => Some(if payload.is_empty() {
                "cleared".to_owned()
            } else {
                protocol::v1::deploy::SignedManifest::from_json(payload)
                    .ok()
                    .and_then(|s| s.peek_unverified())
                    .map_or("?".into(), |m| m.deployment_id)
            }),
            _ => None,
        })
    }

    fn members() -> Vec<String> {
        (0..5).map(|i| format!("d{i}")).collect()
    }

    #[test]
    fn a_device_whose_install_the_rollback_supersedes_is_counted_as_rolled_back() {
        let mut e = Engine::default();
        e.start_staged(
            staged_package("dep-1", 2),
            staged_package("dep-1-rollback", 3),
            strategy(),
            members(),
            0,
        );
        e.on_status("d0", "m1", &status("dep-1", Step::Healthy), 2);
        // d2 fails while d1 is still installing: halt, d0 and d1 get the rollback.
        let out = e.on_status(
            "d2",
            "m2",
            &status(
                "dep-1",
                Step::RolledBack {
                    reason: "trap".into(),
                },
            ),
            3,
        );
        assert_eq!(
            decisions(&out),
            vec![("halted", vec!["d0".to_owned(), "d1".to_owned()])]
        );
        // d1's agent reports the new version replaced by the rollback before the rollback's
        // first step (the order seen on a loaded CI machine).
        e.on_status(
            "d1",
            "m3",
            &status(
                "dep-1",
                Step::Failed {
                    reason: "superseded by deployment dep-1-rollback version 3".into(),
                },
            ),
            4,
        );
        let rb = |step| DeployStatus {
            deployment_id: "dep-1-rollback".into(),
            version: 3,
            step,
            chunks_dropped: 0,
        };
        e.on_status("d0", "m4", &rb(Step::Healthy), 5);
        let out = e.on_status("d1", "m5", &rb(Step::Healthy), 6);
        let finished = out
            .iter()
            .find_map(|a| match a {
                Action::Event(Event::DeploymentFinished { reason, .. }) => Some(reason.clone()),
                _ => None,
            })
            .expect("the rollout finishes once both rollbacks are healthy");
        assert!(
            finished.contains("rolled back 2 of 2 updated devices"),
            "{finished}"
        );
    }

    #[test]
    fn staged_rollout_halts_on_a_failure_and_rolls_the_updated_devices_back() {
        let mut e = Engine::default();
        let out = e.start_staged(
            staged_package("dep-1", 2),
            staged_package("dep-1-rollback", 3),
            strategy(),
            members(),
            0,
        );
        // Only the canary gets the manifest, on its own topic; nothing on the group's.
        assert_eq!(manifest_to(&out, "d0").as_deref(), Some("dep-1"));
        assert!(manifest_to(&out, "d1").is_none());
        assert!(
            !publishes(&out)
                .iter()
                .any(|(t, _, _)| *t == topics::group_deploy_manifest("lab"))
        );
        assert_eq!(decisions(&out), vec![("launched", vec!["d0".to_owned()])]);
        assert_eq!(e.queued(), 4);
        let chunks = e.tick(1, 8);
        assert!(
            publishes(&chunks)
                .iter()
                .all(|(t, _, _)| *t == topics::group_deploy_chunk("lab"))
        );
        // A device outside the launched waves is not answered.
        let sha = sha256_hex(&BYTES);
        assert!(matches!(
            &e.on_resend("d3", &resend("dep-1", &sha, vec![0]))[..],
            [Action::Event(Event::DeployResend { chunks: 0, .. })]
        ));

        let out = e.on_status("d0", "m1", &status("dep-1", Step::Healthy), 2);
        let d = decisions(&out);
        assert_eq!(d[0].0, "gate_passed");
        assert_eq!(d[1], ("launched", vec!["d1".to_owned(), "d2".to_owned()]));
        assert_eq!(manifest_to(&out, "d1").as_deref(), Some("dep-1"));
        // d2 fails its health check: the budget of 0 is crossed; d0 (healthy) and d1 (on its
        // way) get the rollback, d2 (already back) does not.
        let out = e.on_status(
            "d2",
            "m2",
            &status(
                "dep-1",
                Step::RolledBack {
                    reason: "trap".into(),
                },
            ),
            3,
        );
        let d = decisions(&out);
        assert_eq!(d, vec![("halted", vec!["d0".to_owned(), "d1".to_owned()])]);
        assert_eq!(manifest_to(&out, "d0").as_deref(), Some("dep-1-rollback"));
        assert_eq!(manifest_to(&out, "d1").as_deref(), Some("dep-1-rollback"));
        assert!(manifest_to(&out, "d2").is_none());
        assert_eq!(e.queued(), 0, "no more chunks of the halted version");
        // No wave starts again, whatever the time.
        assert!(decisions(&e.tick(99_999, 8)).is_empty());

        // d1 was in its health check and refused the rollback as busy, then committed: it
        // gets the rollback again.
        let rb = |step| DeployStatus {
            deployment_id: "dep-1-rollback".into(),
            version: 3,
            step,
            chunks_dropped: 0,
        };
        e.on_status(
            "d1",
            "m3",
            &rb(Step::Rejected {
                reason: "busy".into(),
            }),
            4,
        );
        let out = e.on_status("d1", "m4", &status("dep-1", Step::Healthy), 5);
        assert_eq!(manifest_to(&out, "d1").as_deref(), Some("dep-1-rollback"));
        let saved = e.take_dirty(5).remove(0);
        assert!(saved.waves.as_ref().is_some_and(Waves::is_halted));
        assert_eq!(saved.rollback.keys().collect::<Vec<_>>(), vec!["d0", "d1"]);

        // Its rollback chunks are answered from the rollback package.
        let rb_sha = sha256_hex(&[3; 12]);
        e.on_resend("d0", &resend("dep-1-rollback", &rb_sha, vec![0]));
        assert_eq!(chunk_indexes(&e.tick(6, 8)), vec![0]);

        e.on_status("d0", "m5", &rb(Step::Healthy), 7);
        let out = e.on_status("d1", "m6", &rb(Step::Healthy), 8);
        match out.iter().find_map(|a| match a {
            Action::Event(Event::DeploymentFinished { reason, .. }) => Some(reason.clone()),
            _ => None,
        }) {
            Some(reason) => assert!(
                reason.starts_with("halted: 1 of 5 devices failed")
                    && reason.contains("rolled back 2 of 2"),
                "{reason}"
            ),
            None => panic!("not finished: {out:?}"),
        }
        for d in ["d0", "d1", "d2"] {
            assert_eq!(manifest_to(&out, d).as_deref(), Some("cleared"), "{d}");
        }
        let last = e.take_dirty(9).remove(0);
        assert!(last.finished.is_some());
        assert!(!e.contains("dep-1"));
    }

    #[test]
    fn staged_rollout_completes_pauses_takes_joiners_and_resumes_after_a_restart() {
        let mut e = Engine::default();
        e.start_staged(
            staged_package("dep-1", 2),
            staged_package("dep-1-rollback", 3),
            strategy(),
            members(),
            0,
        );
        e.on_status("d0", "m1", &status("dep-1", Step::Healthy), 1);
        e.on_status("d1", "m2", &status("dep-1", Step::Healthy), 2);
        // Paused with d2 still on its way: its gate passes, nothing new starts.
        let out = e.control("dep-1", Control::Pause, 3).expect("pauses");
        assert_eq!(decisions(&out), vec![("paused", vec![])]);
        let out = e.on_status("d2", "m3", &status("dep-1", Step::Healthy), 4);
        assert_eq!(decisions(&out)[0].0, "gate_passed");
        assert_eq!(decisions(&out).len(), 1);
        e.on_registered("d9", &["lab".into()]);
        assert!(matches!(
            e.control("dep-x", Control::Pause, 4),
            Err(ControlError::Unknown(_))
        ));

        // The coordinator restarts here.
        let saved = e.take_dirty(5).remove(0);
        let waves = saved.waves.clone().expect("staged");
        assert_eq!(waves.pending, vec!["d3", "d4", "d9"]);
        let mut e = Engine::default();
        let out = e.resume_staged(
            staged_package("dep-1", 2),
            staged_package("dep-1-rollback", 3),
            saved,
            waves,
            6,
        );
        // Everyone launched is final: nothing to republish, and still paused.
        assert!(manifest_to(&out, "d0").is_none());
        assert!(decisions(&out).is_empty());

        let out = e.control("dep-1", Control::Resume, 7).expect("resumes");
        assert_eq!(
            decisions(&out),
            vec![
                ("resumed", vec![]),
                ("launched", vec!["d3".to_owned(), "d4".to_owned()])
            ]
        );
        e.on_status("d3", "m4", &status("dep-1", Step::Healthy), 8);
        let out = e.on_status("d4", "m5", &status("dep-1", Step::Healthy), 9);
        assert_eq!(decisions(&out)[1], ("launched", vec!["d9".to_owned()]));
        let out = e.on_status("d9", "m6", &status("dep-1", Step::Healthy), 10);
        assert!(out.iter().any(|a| matches!(
            a,
            Action::Event(Event::DeploymentFinished { healthy: 6, failed: 0, reason, .. }) if reason.contains("every wave passed")
        )));
        assert!(matches!(
            e.control("dep-1", Control::Abort, 11),
            Err(ControlError::Unknown(_))
        ));
    }

    #[test]
    fn abort_rolls_back_and_a_silent_device_does_not_hold_a_wave() {
        let mut e = Engine::default();
        e.start_staged(
            staged_package("dep-1", 2),
            staged_package("dep-1-rollback", 3),
            strategy(),
            members(),
            0,
        );
        // d0 never answers: at the wave timeout the gate passes anyway.
        let out = e.tick(60_000, 8);
        let d = decisions(&out);
        assert_eq!(d[0].0, "gate_passed");
        assert_eq!(d[1], ("launched", vec!["d1".to_owned(), "d2".to_owned()]));
        e.on_status("d1", "m1", &status("dep-1", Step::Healthy), 60_001);
        let out = e.control("dep-1", Control::Abort, 60_002).expect("aborts");
        assert_eq!(
            decisions(&out),
            vec![(
                "halted",
                vec!["d0".to_owned(), "d1".to_owned(), "d2".to_owned()]
            )]
        );
        assert!(matches!(
            e.control("dep-1", Control::Resume, 60_003),
            Err(ControlError::Halted(_))
        ));
        // d2 then fails the new version on its own: nothing to roll back there.
        e.on_status(
            "d2",
            "m2",
            &status(
                "dep-1",
                Step::Failed {
                    reason: "superseded".into(),
                },
            ),
            60_004,
        );
        assert_eq!(
            e.take_dirty(60_005)[0].rollback.keys().collect::<Vec<_>>(),
            vec!["d0", "d1"]
        );
    }

    #[test]
    fn a_healthy_group_rollout_stays_the_groups_version_for_joiners_until_it_expires() {
        let mut e = Engine::default();
        let sha = sha256_hex(&BYTES);
        e.start(
            package("dep-1", Target::Group("lab".into())),
            vec!["d1".into()],
            0,
        );
        e.tick(1, 8);
        let out = e.on_status("d1", "m1", &status("dep-1", Step::Healthy), 2);
        // Finished, but the group manifest stays retained.
        assert!(out.iter().any(|a| matches!(
            a,
            Action::Event(Event::DeploymentFinished { healthy: 1, .. })
        )));
        assert!(
            publishes(&out).is_empty(),
            "nothing cleared: {:?}",
            publishes(&out)
        );
        assert_eq!(e.serving_count(), 1);
        let saved = e.take_dirty(3).remove(0);
        assert!(saved.serving && saved.finished.is_some());
        // d9 joins the group later: its resends are answered on its own topic.
        assert!(matches!(
            &e.on_resend("d9", &resend("dep-1", &sha, vec![0, 3]))[..],
            [Action::Event(Event::DeployResend { chunks: 2, .. })]
        ));
        let out = e.tick(4, 8);
        assert_eq!(chunk_indexes(&out), vec![0, 3]);
        assert!(
            publishes(&out)
                .iter()
                .all(|(t, _, _)| *t == topics::deploy_chunk("d9"))
        );

        // After a restart it is served again, until the manifest expires.
        let mut e = Engine::default();
        let out = e.resume_serving(package("dep-1", Target::Group("lab".into())), saved, 5);
        assert_eq!(publishes(&out).len(), 1);
        assert!(publishes(&out)[0].2);
        let out = e.tick(10_000, 8);
        assert_eq!(
            publishes(&out),
            vec![(topics::group_deploy_manifest("lab"), 0, true)]
        );
        assert_eq!(e.serving_count(), 0);
        let ended = e.take_dirty(10_001);
        assert!(!ended[0].serving, "its artifacts may go now");
        // A rollout with a failure is not served.
        let mut e = Engine::default();
        e.start(
            package("dep-2", Target::Group("lab".into())),
            vec!["d1".into()],
            0,
        );
        let out = e.on_status(
            "d1",
            "m1",
            &status(
                "dep-2",
                Step::RolledBack {
                    reason: "trap".into(),
                },
            ),
            1,
        );
        assert_eq!(
            publishes(&out),
            vec![(topics::group_deploy_manifest("lab"), 0, true)]
        );
        assert_eq!(e.serving_count(), 0);
    }

    #[test]
    fn a_restart_mid_wave_republishes_what_waiting_devices_need() {
        let mut e = Engine::default();
        e.start_staged(
            staged_package("dep-1", 2),
            staged_package("dep-1-rollback", 3),
            strategy(),
            members(),
            0,
        );
        // The canary has not answered when the coordinator stops.
        let saved = e.take_dirty(1).remove(0);
        let mut e = Engine::default();
        let waves = saved.waves.clone().expect("staged");
        let out = e.resume_staged(
            staged_package("dep-1", 2),
            staged_package("dep-1-rollback", 3),
            saved,
            waves,
            2,
        );
        assert_eq!(manifest_to(&out, "d0").as_deref(), Some("dep-1"));
        assert!(manifest_to(&out, "d1").is_none());
        assert!(
            decisions(&out).is_empty(),
            "the canary is not launched twice"
        );

        // Halted with d0 not yet rolled back, then another restart: d0 gets the rollback.
        e.control("dep-1", Control::Abort, 3).expect("aborts");
        let saved = e.take_dirty(4).remove(0);
        let mut e = Engine::default();
        let waves = saved.waves.clone().expect("staged");
        let out = e.resume_staged(
            staged_package("dep-1", 2),
            staged_package("dep-1-rollback", 3),
            saved,
            waves,
            5,
        );
        assert_eq!(manifest_to(&out, "d0").as_deref(), Some("dep-1-rollback"));
        assert!(matches!(
            e.control("dep-1", Control::Resume, 6),
            Err(ControlError::Halted(_))
        ));
    }

    #[test]
    fn a_failed_rollout_gives_the_group_its_served_version_back() {
        let mut e = Engine::default();
        e.start(
            package("dep-1", Target::Group("lab".into())),
            vec!["d1".into()],
            0,
        );
        e.on_status("d1", "m1", &status("dep-1", Step::Healthy), 1);
        assert_eq!(e.serving_count(), 1);
        e.start(
            package("dep-2", Target::Group("lab".into())),
            vec!["d1".into()],
            2,
        );
        let out = e.on_status(
            "d1",
            "m2",
            &status(
                "dep-2",
                Step::RolledBack {
                    reason: "trap".into(),
                },
            ),
            3,
        );
        // dep-2's manifest is cleared, then dep-1's retained again: the last one stays.
        let p = publishes(&out);
        let last = p.last().expect("publishes");
        assert_eq!(
            (&last.0, last.2),
            (&topics::group_deploy_manifest("lab"), true)
        );
        assert!(last.1 > 0, "dep-1's manifest, not a clear");
        assert_eq!(e.serving_count(), 1);
        // A healthy dep-3 replaces it for good.
        e.start(
            package("dep-3", Target::Group("lab".into())),
            vec!["d1".into()],
            4,
        );
        e.on_status("d1", "m3", &status("dep-3", Step::Healthy), 5);
        assert_eq!(e.serving_count(), 1);
        let ended: Vec<String> = e
            .take_dirty(6)
            .into_iter()
            .filter(|p| !p.serving && p.finished.is_some())
            .map(|p| p.deployment_id)
            .collect();
        assert!(ended.contains(&"dep-1".to_owned()), "{ended:?}");
    }
}
