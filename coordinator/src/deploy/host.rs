//! The service's side of deployments, as [`crate::fl::FlHost`] is for federated learning: owns
//! the rollout [`Engine`] and the files around it (the spool `deploy` writes, each rollout's
//! directory and progress file), and hands back what to publish and journal.
//!
//! Invariant: a package that fails its checks is never sent (its progress file says why); a
//! finished rollout's artifact copies are deleted only after its final progress is on disk.
//! Boundary: the service loop.

use std::path::{Path, PathBuf};

use protocol::v1::deploy::{DeployStatus, ResendRequest, SignedManifest, Target};

use super::Package;
use super::engine::{Engine, EngineTotals};
use super::progress::ProgressFile;
use super::spool;
use super::waves::Strategy;
use crate::action::Action;
use crate::enrollment::EnrolledFleet;
use crate::event::Event;

/// Deployments inside `serve`.
#[derive(Debug)]
pub struct DeployHost {
    state_dir: PathBuf,
    engine: Engine,
}

impl DeployHost {
    pub fn new(state_dir: &Path) -> DeployHost {
        DeployHost {
            state_dir: state_dir.to_owned(),
            engine: Engine::default(),
        }
    }

    pub fn active_count(&self) -> usize {
        self.engine.active_count()
    }

    /// Chunks waiting to be published.
    pub fn queued(&self) -> usize {
        self.engine.queued()
    }

    pub fn totals(&self) -> EngineTotals {
        self.engine.totals()
    }

    /// Start-up: resumes every rollout whose progress file says it is not finished. The
    /// caller writes progress, publishes, then takes the spool ([`DeployHost::pickup`]).
    pub fn resume(&mut self, now: u64, fleet: &EnrolledFleet<'_>) -> Vec<Action> {
        let ids = match spool::rollouts(&self.state_dir) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list rollouts; none resumed");
                Vec::new()
            }
        };
        let mut out = Vec::new();
        for id in ids {
            let progress = match spool::read_progress(&self.state_dir, &id) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(deployment_id = %id, error = %e, "cannot read rollout progress; not resumed");
                    continue;
                }
            };
            if let Some(p) = progress.as_ref().filter(|p| p.finished.is_some()) {
                // Still the group's current version: served to joining devices again.
                if p.serving {
                    let dir = spool::rollout_dir(&self.state_dir, &id);
                    match spool::load_package(&dir) {
                        Ok(package) => {
                            out.extend(self.engine.resume_serving(package, p.clone(), now))
                        }
                        Err(e) => {
                            tracing::warn!(deployment_id = %id, error = %e, "cannot load the group's current version; devices joining get no deployment")
                        }
                    }
                }
                continue;
            }
            let dir = spool::rollout_dir(&self.state_dir, &id);
            let loaded =
                spool::load_package(&dir).and_then(|p| spool::load_staged(&dir).map(|s| (p, s)));
            match (loaded, progress) {
                (Ok((package, Some((_, rollback)))), Some(mut progress)) => {
                    match progress.waves.take() {
                        Some(waves) => out.extend(
                            self.engine
                                .resume_staged(package, rollback, progress, waves, now),
                        ),
                        None => out.push(self.invalid_package(
                            &id,
                            "a staged rollout's progress file has no waves",
                            now,
                        )),
                    }
                }
                (Ok((package, None)), Some(progress)) => {
                    out.extend(self.engine.resume(package, progress, now));
                }
                // Taken from the spool but stopped before the first progress file: start over.
                (Ok((package, staged)), None) => {
                    out.extend(self.start(package, staged, fleet, now))
                }
                (Err(e), _) => out.push(self.invalid_package(&id, &e.to_string(), now)),
            }
        }
        out
    }

    /// Takes new deployments from the spool and starts them; empty when there were none.
    pub fn pickup(&mut self, now: u64, fleet: &EnrolledFleet<'_>) -> Vec<Action> {
        let ids = match spool::pending(&self.state_dir) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the deployment spool");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for id in ids {
            let dir = match spool::take(&self.state_dir, &id) {
                Ok(dir) => dir,
                Err(e) => {
                    tracing::error!(deployment_id = %id, error = %e, "cannot take deployment from the spool; moving it aside");
                    let from = spool::spool_dir(&self.state_dir).join(&id);
                    let to = spool::spool_dir(&self.state_dir).join(format!(".refused-{id}-{now}"));
                    if let Err(e) = std::fs::rename(&from, &to) {
                        tracing::error!(deployment_id = %id, error = %e, "cannot move refused deployment aside");
                    }
                    continue;
                }
            };
            match spool::load_package(&dir).and_then(|p| spool::load_staged(&dir).map(|s| (p, s))) {
                Ok((package, staged)) => out.extend(self.start(package, staged, fleet, now)),
                Err(e) => out.push(self.invalid_package(&id, &e.to_string(), now)),
            }
        }
        out.extend(self.controls(now));
        out
    }

    fn start(
        &mut self,
        package: Package,
        staged: Option<(Strategy, Package)>,
        fleet: &EnrolledFleet<'_>,
        now: u64,
    ) -> Vec<Action> {
        let members = target_members(&package.manifest.target, fleet);
        match staged {
            None => self.engine.start(package, members, now),
            Some(_) if !matches!(package.manifest.target, Target::Group(_)) => {
                let id = package.manifest.deployment_id.clone();
                vec![self.invalid_package(&id, "a staged rollout needs a group target", now)]
            }
            Some((strategy, rollback)) => self
                .engine
                .start_staged(package, rollback, strategy, members, now),
        }
    }

    /// Applies the spooled `rollout pause|resume|abort` requests; one that cannot apply is
    /// logged and journaled as a rejected request.
    fn controls(&mut self, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        for request in spool::take_controls(&self.state_dir) {
            let result = request.map_err(|e| e.to_string()).and_then(|r| {
                self.engine
                    .control(&r.deployment_id, r.action, now)
                    .map_err(|e| e.to_string())
            });
            match result {
                Ok(actions) => out.extend(actions),
                Err(reason) => {
                    tracing::warn!(%reason, "rollout control request not applied");
                    out.push(Action::Event(Event::Rejected {
                        topic: "rollout control".into(),
                        reason,
                        device: None,
                    }));
                }
            }
        }
        out
    }

    /// Statuses and resend requests already decoded and deduplicated by the service.
    pub fn on_status(
        &mut self,
        device: &str,
        id: &str,
        status: &DeployStatus,
        now: u64,
    ) -> Vec<Action> {
        self.engine.on_status(device, id, status, now)
    }

    pub fn on_resend(&mut self, device: &str, request: &ResendRequest) -> Vec<Action> {
        self.engine.on_resend(device, request)
    }

    /// A device registered, or its enrollment (re)assigned its groups.
    pub fn on_registered(&mut self, device: &str, groups: &[String]) {
        self.engine.on_registered(device, groups);
    }

    /// The next `budget` paced chunks, and rollouts that expired.
    pub fn tick(&mut self, now: u64, budget: usize) -> Vec<Action> {
        self.engine.tick(now, budget)
    }

    /// A package that fails its checks is never sent; its progress file says why.
    fn invalid_package(&mut self, id: &str, error: &str, now: u64) -> Action {
        let dir = spool::rollout_dir(&self.state_dir, id);
        let manifest = std::fs::read(dir.join("manifest.json"))
            .ok()
            .and_then(|b| SignedManifest::from_json(&b).ok())
            .and_then(|s| s.peek_unverified());
        let reason = format!("invalid package: {error}");
        let progress = ProgressFile {
            deployment_id: id.to_owned(),
            version: manifest.as_ref().map_or(0, |m| m.version),
            target: manifest
                .as_ref()
                .map_or_else(|| Target::Device(String::new()), |m| m.target.clone()),
            expires_ms: manifest.as_ref().map_or(0, |m| m.expires_ms),
            total_bytes: 0,
            chunk_total: 0,
            devices: Default::default(),
            resends_ignored: 0,
            finished: Some(reason.clone()),
            updated_ms: now,
            waves: None,
            serving: false,
            rollback: Default::default(),
        };
        if let Err(e) = spool::write_progress(&self.state_dir, &progress) {
            tracing::warn!(deployment_id = %id, error = %e, "cannot write rollout progress");
        }
        Action::Event(Event::DeploymentFinished {
            deployment_id: id.to_owned(),
            version: progress.version,
            reason,
            healthy: 0,
            failed: 0,
            in_progress: 0,
        })
    }

    /// Rewrites the progress files of rollouts that changed; a finished rollout's artifact
    /// copies are deleted once its final progress is on disk and it is not served any more.
    pub fn write_progress(&mut self, now: u64) {
        for progress in self.engine.take_dirty(now) {
            if let Err(e) = spool::write_progress(&self.state_dir, &progress) {
                tracing::warn!(deployment_id = %progress.deployment_id, error = %e, "cannot write rollout progress");
                continue;
            }
            if progress.finished.is_some() && !progress.serving {
                let dir = spool::rollout_dir(&self.state_dir, &progress.deployment_id);
                let rollback = dir.join("rollback");
                for dir in std::iter::once(dir).chain(rollback.is_dir().then_some(rollback)) {
                    if let Err(e) = spool::remove_artifacts(&dir) {
                        tracing::warn!(deployment_id = %progress.deployment_id, error = %e, "cannot delete the finished rollout's artifacts");
                    }
                }
            }
        }
    }
}

/// The devices known so far for a rollout's target: a group's registered members, by the
/// groups their enrollment gave them (others join as they register), nothing for a single
/// device (its status adds it).
fn target_members(target: &Target, fleet: &EnrolledFleet<'_>) -> Vec<String> {
    match target {
        Target::Group(g) => fleet
            .registered()
            .filter(|(_, groups)| groups.iter().any(|x| x == g))
            .map(|(r, _)| r.device.clone())
            .collect(),
        Target::Device(_) => Vec::new(),
    }
}
