//! The deployment state machine: manifest checks, chunk assembly, health check, commit and
//! rollback. Pure: time comes in as `now_ms`, effects go out as [`Action`]s; the only outside
//! call is the injected [`ArtifactStore`].
//!
//! Chunks are not signed, and anyone who can publish on the broker can send one. So a chunk is
//! checked against the verified manifest before it touches the assembly buffer: its artifact
//! and index must be listed, its offset and length must be the ones the signed `chunk_size`
//! gives, and its data must hash to the signed chunk digest. A chunk that fails is dropped
//! ([`Action::ChunkDropped`], counted per deployment and reported in every status after it)
//! and asked for again; it never fails the deployment nor burns its version. Chunks are never
//! kept ahead of their manifest: one that comes first is ignored, as before, and fetched again
//! once the download runs, so every assembled chunk went through the check. The sha256 of the
//! whole artifact is still checked at the end; it can only fail now if the signed manifest
//! contradicts itself.

use std::collections::{BTreeMap, BTreeSet};

use protocol::v1::deploy::{
    Chunk, DeployError, DeployKind, DeployStatus, Manifest, MissingChunks, ResendRequest,
    SignedManifest, Step, Target, sha256_hex, verify,
};
use serde::{Deserialize, Serialize};

use super::config::DeployConfig;
use super::store::ArtifactStore;

/// Most chunks one artifact may travel in; bounds the per-chunk bookkeeping (a signed
/// manifest could otherwise ask for one-byte chunks).
const MAX_CHUNKS_PER_ARTIFACT: u32 = 1 << 16;

/// Magic and format version of [`Deployer::to_bytes`].
const STATE_MAGIC: &[u8; 4] = b"EDS1";

/// Least time between two resend requests caused by dropped chunks: a flood of forged chunks
/// becomes at most one request a second (each index once), not one request per chunk.
const REREQUEST_GAP_MS: u64 = 1_000;

/// A stalled download waits `resend_after_ms` before its first resend request and twice as
/// long before each next one, up to this many doublings (8x). When a whole fleet downloads at
/// once, chunks are late because the broker and the coordinator are busy, not lost: requests
/// at a fixed interval would add load exactly then (every device asking again for everything
/// it lacks) and give up while the answers are still queued.
const STALL_BACKOFF_DOUBLINGS: u32 = 3;

/// How long a download waits without a chunk before its next resend request, after
/// `stalled` requests that brought nothing.
fn stall_wait_ms(resend_after_ms: u64, stalled: u32) -> u64 {
    resend_after_ms.saturating_mul(1 << stalled.min(STALL_BACKOFF_DOUBLINGS))
}

/// Why a verified manifest is not for this device or over its limits; the text is the
/// rejection reason the coordinator sees in the deployment status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("manifest is for device {target}, this is device {device}")]
    OtherDevice { target: String, device: String },
    #[error("manifest is for group {group}, which device {device} is not in")]
    OtherGroup { group: String, device: String },
    #[error("manifest lists {count} artifacts, over the limit of {limit}")]
    TooManyArtifacts { count: usize, limit: u32 },
    #[error("artifact {name} is {size} bytes, over the limit of {limit} bytes")]
    ArtifactTooLarge { name: String, size: u64, limit: u64 },
    #[error(
        "artifact {name} would take {chunks} chunks, over the limit of \
         {MAX_CHUNKS_PER_ARTIFACT} (chunk_size {chunk_size} is too small)"
    )]
    TooManyChunks {
        name: String,
        chunks: u32,
        chunk_size: u32,
    },
    #[error("artifacts total {total} bytes, over the limit of {limit} bytes")]
    TooLarge { total: u64, limit: u64 },
}

/// What the caller must do, in the order returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish on `deploy/status` (class control).
    Report(DeployStatus),
    /// Publish on `deploy/resend`.
    RequestResend(ResendRequest),
    /// Start the manifest's pipeline beside (or instead of) the running one; every artifact is
    /// in the store. Then feed [`Deployer::on_health`].
    Start { manifest: Manifest },
    /// The started pipeline passed its health check: it is now the installed one (stop the
    /// old one, keep its artifacts: it is the rollback target).
    Commit { manifest: Manifest },
    /// Stop the started pipeline and run `to` again (`None`: nothing was installed before).
    Rollback {
        to: Option<Manifest>,
        reason: String,
    },
    /// A payload on a chunk topic that does not decode as a chunk (log it at WARN); it names
    /// no deployment, so nothing counts it.
    ChunkRejected { reason: String },
    /// A chunk of the deployment in progress failed its check and was dropped (log it at
    /// WARN); the deployment goes on, and a chunk with a known index is asked for again.
    ChunkDropped(DroppedChunk),
    /// Store [`Deployer::to_bytes`] now (a step worth resuming from was reached).
    Persist,
}

/// A chunk the deployer dropped: what it claimed to be and why it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedChunk {
    pub deployment_id: String,
    /// The artifact's name, or the digest the chunk claimed if no artifact has it.
    pub artifact: String,
    pub index: u32,
    pub reason: String,
    /// Chunks of this deployment dropped so far, this one included.
    pub dropped: u64,
}

/// What the caller observed about the started pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// `n` more messages went through without a trap or error.
    Processed(u32),
    /// The caller's own verdict that the check passed (commit now).
    Passed,
    /// Init failed, a stage trapped or errored: roll back.
    Failed(String),
}

/// Errors from restoring persisted state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("persisted deploy state is malformed: {0}")]
    Malformed(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Transfer {
    name: String,
    sha256: String,
    size: u64,
    total: u32,
    received: Vec<bool>,
    received_count: u32,
    done: bool,
    /// Assembly buffer, allocated at the first chunk; persisted raw after the JSON part.
    #[serde(skip)]
    data: Vec<u8>,
    has_data: bool,
}

impl Transfer {
    fn received_bytes(&self, chunk_size: u32) -> u64 {
        if self.done {
            return self.size;
        }
        let cs = u64::from(chunk_size);
        self.received
            .iter()
            .enumerate()
            .filter(|(_, r)| **r)
            .map(|(i, _)| cs.min(self.size.saturating_sub(i as u64 * cs)))
            .sum()
    }

    fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        self.received
            .iter()
            .enumerate()
            .filter(|(_, r)| !**r)
            .map(|(i, _)| i as u32)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Download {
    manifest: Manifest,
    transfers: Vec<Transfer>,
    last_progress_ms: u64,
    stalled_resends: u32,
    /// Last progress tenth reported, so status goes out ~10 times per download.
    reported_tenth: u8,
    /// Chunks of this deployment dropped so far (see the module docs).
    #[serde(default)]
    chunks_dropped: u64,
    /// `(transfer, index)` of dropped chunks not received yet, to ask for again. Not
    /// persisted: after a restart the resume asks for everything missing anyway.
    #[serde(skip)]
    rerequest: BTreeSet<(usize, u32)>,
    #[serde(skip)]
    last_rerequest_ms: Option<u64>,
}

impl Download {
    /// Drops a chunk that failed its check: counts it, remembers its index to ask for again
    /// (when its artifact is being transferred and the index is still missing) and asks if
    /// the gap allows. `artifact`: the name, or the claimed digest if no artifact has it.
    fn drop_chunk(
        &mut self,
        artifact: String,
        chunk: &Chunk,
        reason: String,
        now_ms: u64,
    ) -> Vec<Action> {
        self.chunks_dropped += 1;
        if let Some(ti) = self.transfers.iter().position(|t| {
            t.sha256 == chunk.sha256 && t.received.get(chunk.index as usize) == Some(&false)
        }) {
            self.rerequest.insert((ti, chunk.index));
        }
        let mut actions = vec![Action::ChunkDropped(DroppedChunk {
            deployment_id: self.manifest.deployment_id.clone(),
            artifact,
            index: chunk.index,
            reason,
            dropped: self.chunks_dropped,
        })];
        actions.extend(self.rerequest_due(now_ms));
        actions
    }

    /// A resend request for the dropped chunks still missing, unless one went out less than
    /// [`REREQUEST_GAP_MS`] ago (then [`Deployer::on_tick`] sends it later).
    fn rerequest_due(&mut self, now_ms: u64) -> Option<Action> {
        if self.rerequest.is_empty()
            || self
                .last_rerequest_ms
                .is_some_and(|last| now_ms.saturating_sub(last) < REREQUEST_GAP_MS)
        {
            return None;
        }
        let mut budget = protocol::v1::deploy::MAX_RESEND_INDEXES;
        let mut artifacts: Vec<MissingChunks> = Vec::new();
        let wanted = std::mem::take(&mut self.rerequest);
        for (ti, index) in wanted {
            let Some(t) = self.transfers.get(ti) else {
                continue;
            };
            if t.done || t.received.get(index as usize) != Some(&false) {
                // The real chunk came meanwhile.
                continue;
            }
            if budget == 0 {
                // Over one request's bound: the rest waits for the next gap.
                self.rerequest.insert((ti, index));
                continue;
            }
            budget -= 1;
            match artifacts.last_mut() {
                Some(m) if m.sha256 == t.sha256 => m.indexes.push(index),
                _ => artifacts.push(MissingChunks {
                    sha256: t.sha256.clone(),
                    indexes: vec![index],
                }),
            }
        }
        if artifacts.is_empty() {
            return None;
        }
        self.last_rerequest_ms = Some(now_ms);
        Some(Action::RequestResend(ResendRequest {
            deployment_id: self.manifest.deployment_id.clone(),
            artifacts,
        }))
    }

    fn totals(&self) -> (u64, u64) {
        let cs = self.manifest.chunk_size;
        let received = self.transfers.iter().map(|t| t.received_bytes(cs)).sum();
        let total = self.transfers.iter().map(|t| t.size).sum();
        (received, total)
    }

    fn missing(&self) -> Vec<MissingChunks> {
        let mut budget = protocol::v1::deploy::MAX_RESEND_INDEXES;
        let mut out = Vec::new();
        for t in self.transfers.iter().filter(|t| !t.done) {
            let indexes: Vec<u32> = t.missing().take(budget).collect();
            budget -= indexes.len();
            if !indexes.is_empty() {
                out.push(MissingChunks {
                    sha256: t.sha256.clone(),
                    indexes,
                });
            }
            if budget == 0 {
                break;
            }
        }
        out
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Candidate {
    manifest: Manifest,
    started_ms: u64,
    processed: u64,
    /// Carried over from the download, for the remaining status reports.
    #[serde(default)]
    chunks_dropped: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
enum Phase {
    #[default]
    Idle,
    Downloading(Download),
    Checking(Candidate),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    installed: Option<Manifest>,
    previous: Option<Manifest>,
    /// Committed model deployments applying on top of `installed` (or the local pipeline),
    /// oldest first; a later one wins for an artifact name both carry. Cleared when a
    /// pipeline deployment commits (it brings its own models).
    #[serde(default)]
    models: Vec<Manifest>,
    /// Highest committed version per target (`device:ID` / `group:NAME`).
    committed: BTreeMap<String, u64>,
    /// Highest version ever accepted for download per target, so a manifest that failed or
    /// rolled back is not retried by replaying it.
    attempted: BTreeMap<String, u64>,
    phase: Phase,
}

/// The agent's deployment state machine. See the module docs of `deploy` for the flow.
#[derive(Debug)]
pub struct Deployer {
    /// This device's id; manifests for another device are rejected.
    device_id: String,
    config: DeployConfig,
    /// The groups the coordinator assigned at enrollment (not persisted with the state:
    /// the enrollment session says them again at every start).
    groups: Vec<String>,
    state: State,
}

fn target_key(t: &Target) -> String {
    match t {
        Target::Device(d) => format!("device:{d}"),
        Target::Group(g) => format!("group:{g}"),
    }
}

fn report(manifest: &Manifest, step: Step) -> Action {
    report_dropped(manifest, step, 0)
}

/// A status report for the deployment in progress, with its count of dropped chunks.
fn report_dropped(manifest: &Manifest, step: Step, chunks_dropped: u64) -> Action {
    Action::Report(DeployStatus {
        deployment_id: manifest.deployment_id.clone(),
        version: manifest.version,
        step,
        chunks_dropped,
    })
}

impl Deployer {
    /// `device_id`: this device (resolved at start, so not part of the config file).
    pub fn new(device_id: impl Into<String>, config: DeployConfig) -> Self {
        Deployer {
            device_id: device_id.into(),
            config,
            groups: Vec::new(),
            state: State::default(),
        }
    }

    pub fn config(&self) -> &DeployConfig {
        &self.config
    }

    /// The groups whose deployments this device takes (from its enrollment; none before).
    pub fn set_groups(&mut self, groups: Vec<String>) {
        self.groups = groups;
    }

    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    /// The pipeline that runs when no deployment is being checked.
    pub fn installed(&self) -> Option<&Manifest> {
        self.state.installed.as_ref()
    }

    /// Model replacements committed since the installed pipeline: artifact name (the model's
    /// name in the pipeline) to sha256, the latest deployment winning.
    pub fn model_overrides(&self) -> BTreeMap<String, String> {
        self.state
            .models
            .iter()
            .flat_map(|m| m.artifacts.iter())
            .map(|a| (a.name.clone(), a.sha256.clone()))
            .collect()
    }

    /// The one installed before it, kept (with its artifacts) for a manual rollback.
    pub fn previous(&self) -> Option<&Manifest> {
        self.state.previous.as_ref()
    }

    /// The deployment being downloaded or health-checked, if any.
    pub fn in_progress(&self) -> Option<&Manifest> {
        match &self.state.phase {
            Phase::Idle => None,
            Phase::Downloading(d) => Some(&d.manifest),
            Phase::Checking(c) => Some(&c.manifest),
        }
    }

    /// Artifact digests that must stay in the store (installed, previous, in progress).
    pub fn pinned_artifacts(&self) -> Vec<String> {
        let mut out: Vec<String> = [self.state.installed.as_ref(), self.state.previous.as_ref()]
            .into_iter()
            .chain(self.state.models.iter().map(Some))
            .chain(std::iter::once(self.in_progress()))
            .flatten()
            .flat_map(|m| m.artifacts.iter().map(|a| a.sha256.clone()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// A payload from `deploy/manifest` (device or group topic).
    pub fn on_manifest_payload(
        &mut self,
        payload: &[u8],
        now_ms: u64,
        store: &dyn ArtifactStore,
    ) -> Vec<Action> {
        match SignedManifest::from_json(payload) {
            Ok(signed) => self.on_manifest(&signed, now_ms, store),
            Err(e) => vec![reject(None, &e.to_string())],
        }
    }

    /// A decoded signed manifest.
    pub fn on_manifest(
        &mut self,
        signed: &SignedManifest,
        now_ms: u64,
        store: &dyn ArtifactStore,
    ) -> Vec<Action> {
        let manifest = match verify(signed, self.config.trusted_keys.keys()) {
            Ok(m) => m,
            Err(e) => {
                // The unverified copy only labels the report; nothing acts on it.
                let peek = match e {
                    DeployError::Malformed(_) => None,
                    _ => signed.peek_unverified(),
                };
                return vec![reject(peek.as_ref(), &e.to_string())];
            }
        };
        if let Err(refusal) = self.check_target(&manifest.target) {
            return vec![reject(Some(&manifest), &refusal.to_string())];
        }
        if now_ms >= manifest.expires_ms {
            return vec![reject(
                Some(&manifest),
                &format!(
                    "manifest expired at {} ms (now {now_ms} ms)",
                    manifest.expires_ms
                ),
            )];
        }
        // Redelivery of what we are already doing or have done: answer, don't reject.
        if let Some(current) = self.in_progress()
            && same(current, &manifest)
        {
            return self.resume(now_ms);
        }
        if self
            .state
            .installed
            .iter()
            .chain(&self.state.models)
            .any(|m| same(m, &manifest))
        {
            return vec![report(&manifest, Step::Healthy)];
        }
        // One version sequence per device, whatever the target: a device deployment must
        // not downgrade what a group deployment installed, nor retry a failed version.
        if let Some((t, &v)) = self.state.committed.iter().max_by_key(|(_, v)| **v)
            && manifest.version <= v
        {
            return vec![reject(
                Some(&manifest),
                &format!(
                    "version {} is not newer than installed version {v} (deployed to {t})",
                    manifest.version
                ),
            )];
        }
        if let Some((t, &v)) = self.state.attempted.iter().max_by_key(|(_, v)| **v)
            && manifest.version <= v
        {
            return vec![reject(
                Some(&manifest),
                &format!(
                    "version {} is not newer than version {v} already attempted (deployed to {t})",
                    manifest.version
                ),
            )];
        }
        if let Phase::Checking(c) = &self.state.phase {
            return vec![reject(
                Some(&manifest),
                &format!(
                    "busy: deployment {} version {} is in its health check",
                    c.manifest.deployment_id, c.manifest.version
                ),
            )];
        }
        if let Err(refusal) = self.check_limits(&manifest) {
            return vec![reject(Some(&manifest), &refusal.to_string())];
        }

        let mut actions = Vec::new();
        if let Phase::Downloading(old) = &self.state.phase {
            actions.push(report_dropped(
                &old.manifest,
                Step::Failed {
                    reason: format!(
                        "superseded by deployment {} version {}",
                        manifest.deployment_id, manifest.version
                    ),
                },
                old.chunks_dropped,
            ));
        }
        self.state
            .attempted
            .insert(target_key(&manifest.target), manifest.version);
        let mut transfers: Vec<Transfer> = Vec::new();
        for a in &manifest.artifacts {
            // A module used twice travels once; one already stored does not travel at all.
            if transfers.iter().any(|t| t.sha256 == a.sha256)
                || store.has(&a.sha256).unwrap_or(false)
            {
                continue;
            }
            let total = manifest.chunk_count(a.size);
            transfers.push(Transfer {
                name: a.name.clone(),
                sha256: a.sha256.clone(),
                size: a.size,
                total,
                received: vec![false; total as usize],
                received_count: 0,
                done: false,
                data: Vec::new(),
                has_data: false,
            });
        }
        let download = Download {
            manifest: manifest.clone(),
            transfers,
            last_progress_ms: now_ms,
            stalled_resends: 0,
            reported_tenth: 0,
            chunks_dropped: 0,
            rerequest: BTreeSet::new(),
            last_rerequest_ms: None,
        };
        let (received, total) = download.totals();
        actions.push(report(&manifest, Step::Downloading { received, total }));
        self.state.phase = Phase::Downloading(download);
        actions.push(Action::Persist);
        self.maybe_start(now_ms, store, &mut actions);
        actions
    }

    /// A payload from `deploy/chunk`.
    pub fn on_chunk_payload(
        &mut self,
        payload: &[u8],
        now_ms: u64,
        store: &dyn ArtifactStore,
    ) -> Vec<Action> {
        match Chunk::decode(payload) {
            Ok(c) => self.on_chunk(&c, now_ms, store),
            Err(e) => vec![Action::ChunkRejected {
                reason: e.to_string(),
            }],
        }
    }

    /// A decoded chunk. Out-of-order chunks are fine; exact duplicates and chunks of
    /// deployments not in progress (or arriving before their manifest) are ignored silently
    /// (at-least-once delivery makes them). A chunk of the deployment in progress that fails
    /// its check against the signed manifest is dropped and asked for again (module docs).
    pub fn on_chunk(
        &mut self,
        chunk: &Chunk,
        now_ms: u64,
        store: &dyn ArtifactStore,
    ) -> Vec<Action> {
        let Phase::Downloading(dl) = &mut self.state.phase else {
            return Vec::new();
        };
        if dl.manifest.deployment_id != chunk.deployment_id {
            return Vec::new();
        }
        // Checked against the signed manifest whether or not the artifact is still being
        // transferred, so every bad chunk naming this deployment is counted.
        let Some(a) = dl
            .manifest
            .artifacts
            .iter()
            .find(|a| a.sha256 == chunk.sha256)
        else {
            let reason = format!(
                "chunk for artifact {} which deployment {} does not list",
                chunk.sha256, chunk.deployment_id
            );
            let artifact = chunk.sha256.clone();
            return dl.drop_chunk(artifact, chunk, reason, now_ms);
        };
        let cs = u64::from(dl.manifest.chunk_size);
        let total = dl.manifest.chunk_count(a.size);
        let expected_offset = u64::from(chunk.index) * cs;
        let expected_len = cs.min(a.size.saturating_sub(expected_offset));
        let bad = if chunk.total != total || chunk.index >= total {
            Some(format!(
                "chunk {}/{} of {}: expected {total} chunks",
                chunk.index, chunk.total, a.name
            ))
        } else if chunk.offset != expected_offset || chunk.data.len() as u64 != expected_len {
            Some(format!(
                "chunk {} of {}: offset {} and size {} do not match the expected offset \
                 {expected_offset} and size {expected_len}",
                chunk.index,
                a.name,
                chunk.offset,
                chunk.data.len()
            ))
        } else if a.chunk_sha256.get(chunk.index as usize).map(String::as_str)
            != Some(sha256_hex(&chunk.data).as_str())
        {
            // Forged on the broker or damaged on the way: either way not the signed bytes.
            Some(format!(
                "chunk {} of {}: data does not match the signed chunk digest",
                chunk.index, a.name
            ))
        } else {
            None
        };
        if let Some(reason) = bad {
            let artifact = a.name.clone();
            return dl.drop_chunk(artifact, chunk, reason, now_ms);
        }
        // Artifacts we already had are not transferred, finished ones are done: the same
        // signed bytes again are harmless, as is a resend crossing the original.
        let Some(t) = dl
            .transfers
            .iter_mut()
            .find(|t| t.sha256 == chunk.sha256 && !t.done)
        else {
            return Vec::new();
        };
        if t.received.get(chunk.index as usize) != Some(&false) {
            return Vec::new();
        }
        let start = expected_offset as usize;
        let end = start + chunk.data.len();
        if !t.has_data {
            // Bounded: size passed max_artifact_bytes when the manifest was accepted.
            t.data = vec![0; t.size as usize];
            t.has_data = true;
        }
        t.data[start..end].copy_from_slice(&chunk.data);
        t.received[chunk.index as usize] = true;
        t.received_count += 1;
        dl.last_progress_ms = now_ms;
        dl.stalled_resends = 0;

        let mut actions = Vec::new();
        if t.received_count == t.total {
            let data = std::mem::take(&mut t.data);
            t.has_data = false;
            let actual = sha256_hex(&data);
            if actual != t.sha256 || data.len() as u64 != t.size {
                // Every chunk matched its signed digest, so the signed manifest contradicts
                // itself (chunk digests against the artifact's): the deployment is bad.
                let reason = format!(
                    "hash mismatch for {}: expected {} got {actual}",
                    t.name, t.sha256
                );
                let (manifest, dropped) = (dl.manifest.clone(), dl.chunks_dropped);
                self.state.phase = Phase::Idle;
                return vec![
                    report_dropped(&manifest, Step::Rejected { reason }, dropped),
                    Action::Persist,
                ];
            }
            if let Err(e) = store.put(&t.sha256, &data) {
                let reason = format!("cannot store artifact {}: {e}", t.name);
                let (manifest, dropped) = (dl.manifest.clone(), dl.chunks_dropped);
                self.state.phase = Phase::Idle;
                return vec![
                    report_dropped(&manifest, Step::Failed { reason }, dropped),
                    Action::Persist,
                ];
            }
            t.done = true;
            actions.push(Action::Persist);
        }
        let (received, total) = dl.totals();
        let tenth = (received.saturating_mul(10) / total.max(1)).min(10) as u8;
        if tenth > dl.reported_tenth {
            dl.reported_tenth = tenth;
            actions.push(report_dropped(
                &dl.manifest,
                Step::Downloading { received, total },
                dl.chunks_dropped,
            ));
        }
        self.maybe_start(now_ms, store, &mut actions);
        actions
    }

    /// Time passes: asks again for dropped chunks held back by the gap, asks for missing
    /// chunks after a stall, waiting longer before each next request ([`stall_wait_ms`];
    /// gives up after `max_stalled_resends`), and passes a health check
    /// whose time window is over.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<Action> {
        match &mut self.state.phase {
            Phase::Idle => Vec::new(),
            Phase::Downloading(dl) => {
                let wait = stall_wait_ms(self.config.resend_after_ms, dl.stalled_resends);
                if now_ms.saturating_sub(dl.last_progress_ms) < wait {
                    return dl.rerequest_due(now_ms).into_iter().collect();
                }
                if dl.stalled_resends >= self.config.max_stalled_resends {
                    let reason = format!(
                        "transfer stalled: no chunk for {} ms after {} resend requests",
                        now_ms.saturating_sub(dl.last_progress_ms),
                        dl.stalled_resends
                    );
                    let (manifest, dropped) = (dl.manifest.clone(), dl.chunks_dropped);
                    self.state.phase = Phase::Idle;
                    return vec![
                        report_dropped(&manifest, Step::Failed { reason }, dropped),
                        Action::Persist,
                    ];
                }
                dl.stalled_resends += 1;
                dl.last_progress_ms = now_ms;
                // Everything missing, the dropped ones included.
                dl.rerequest.clear();
                vec![Action::RequestResend(ResendRequest {
                    deployment_id: dl.manifest.deployment_id.clone(),
                    artifacts: dl.missing(),
                })]
            }
            Phase::Checking(c) => {
                let window = u64::from(c.manifest.health.seconds) * 1000;
                let both_off = c.manifest.health.seconds == 0 && c.manifest.health.messages == 0;
                if both_off || (window > 0 && now_ms.saturating_sub(c.started_ms) >= window) {
                    self.commit()
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// The uplink is back: ask at once for every chunk still missing.
    pub fn on_reconnect(&mut self, now_ms: u64) -> Vec<Action> {
        match &self.state.phase {
            Phase::Downloading(_) => self.resume(now_ms),
            _ => Vec::new(),
        }
    }

    /// First call after [`Deployer::from_bytes`]: resumes a download; a health check that a
    /// restart interrupted counts as failed (the candidate may be what brought the agent down).
    pub fn on_restart(&mut self, now_ms: u64) -> Vec<Action> {
        match &self.state.phase {
            Phase::Idle => Vec::new(),
            Phase::Downloading(dl)
                if dl
                    .manifest
                    .artifacts
                    .iter()
                    .any(|a| a.chunk_sha256.len() != dl.manifest.chunk_count(a.size) as usize) =>
            {
                // Persisted by an agent version whose manifests had no chunk digests (they
                // load as empty lists): its chunks cannot be checked, so it is not resumed.
                let manifest = dl.manifest.clone();
                self.state.phase = Phase::Idle;
                let reason = "download started by an agent version without chunk digests; \
                              deploy a newer version"
                    .to_owned();
                vec![report(&manifest, Step::Failed { reason }), Action::Persist]
            }
            Phase::Downloading(_) => self.resume(now_ms),
            Phase::Checking(_) => {
                self.rollback("agent restarted during the health check".to_owned())
            }
        }
    }

    /// What the caller saw of the started pipeline.
    pub fn on_health(&mut self, health: Health, _now_ms: u64) -> Vec<Action> {
        let Phase::Checking(c) = &mut self.state.phase else {
            return Vec::new();
        };
        match health {
            Health::Passed => self.commit(),
            Health::Processed(n) => {
                c.processed = c.processed.saturating_add(u64::from(n));
                let need = u64::from(c.manifest.health.messages);
                let both_off = need == 0 && c.manifest.health.seconds == 0;
                if both_off || (need > 0 && c.processed >= need) {
                    self.commit()
                } else {
                    Vec::new()
                }
            }
            Health::Failed(reason) => self.rollback(format!("health check failed: {reason}")),
        }
    }

    /// Serialises the state: a JSON part, then the raw assembly buffers of unfinished
    /// artifacts (so a restart does not download them again).
    pub fn to_bytes(&self) -> Vec<u8> {
        let json = serde_json::to_vec(&self.state).unwrap_or_default();
        let mut out = Vec::with_capacity(8 + json.len());
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&(json.len() as u64).to_be_bytes());
        out.extend_from_slice(&json);
        if let Phase::Downloading(dl) = &self.state.phase {
            for t in dl.transfers.iter().filter(|t| t.has_data) {
                out.extend_from_slice(&t.data);
            }
        }
        out
    }

    /// Restores what [`Deployer::to_bytes`] wrote; call [`Deployer::on_restart`] next.
    pub fn from_bytes(
        device_id: impl Into<String>,
        config: DeployConfig,
        bytes: &[u8],
    ) -> Result<Self, StateError> {
        let bad = |m: &str| StateError::Malformed(m.to_owned());
        let rest = bytes
            .strip_prefix(STATE_MAGIC.as_slice())
            .ok_or_else(|| bad("bad magic"))?;
        let (len, rest) = rest.split_at_checked(8).ok_or_else(|| bad("truncated"))?;
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(len);
        let len = usize::try_from(u64::from_be_bytes(len_bytes)).map_err(|_| bad("too long"))?;
        let (json, mut rest) = rest.split_at_checked(len).ok_or_else(|| bad("truncated"))?;
        let mut state: State =
            serde_json::from_slice(json).map_err(|e| StateError::Malformed(e.to_string()))?;
        if let Phase::Downloading(dl) = &mut state.phase {
            for t in dl.transfers.iter_mut() {
                if t.received.len() != t.total as usize {
                    return Err(bad("chunk map does not match the chunk count"));
                }
                if t.has_data {
                    let (data, tail) = rest
                        .split_at_checked(t.size as usize)
                        .ok_or_else(|| bad("truncated artifact buffer"))?;
                    t.data = data.to_vec();
                    rest = tail;
                }
            }
        }
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(Deployer {
            device_id: device_id.into(),
            config,
            groups: Vec::new(),
            state,
        })
    }

    fn check_target(&self, target: &Target) -> Result<(), Refusal> {
        match target {
            Target::Device(d) if *d == self.device_id => Ok(()),
            Target::Device(d) => Err(Refusal::OtherDevice {
                target: d.clone(),
                device: self.device_id.clone(),
            }),
            Target::Group(g) if self.groups.contains(g) => Ok(()),
            Target::Group(g) => Err(Refusal::OtherGroup {
                group: g.clone(),
                device: self.device_id.clone(),
            }),
        }
    }

    fn check_limits(&self, m: &Manifest) -> Result<(), Refusal> {
        let c = &self.config;
        if m.artifacts.len() > c.max_artifacts as usize {
            return Err(Refusal::TooManyArtifacts {
                count: m.artifacts.len(),
                limit: c.max_artifacts,
            });
        }
        for a in &m.artifacts {
            if a.size > c.max_artifact_bytes {
                return Err(Refusal::ArtifactTooLarge {
                    name: a.name.clone(),
                    size: a.size,
                    limit: c.max_artifact_bytes,
                });
            }
            let chunks = m.chunk_count(a.size);
            if chunks > MAX_CHUNKS_PER_ARTIFACT {
                return Err(Refusal::TooManyChunks {
                    name: a.name.clone(),
                    chunks,
                    chunk_size: m.chunk_size,
                });
            }
        }
        let total = m
            .artifacts
            .iter()
            .fold(0u64, |s, a| s.saturating_add(a.size));
        if total > c.max_total_bytes {
            return Err(Refusal::TooLarge {
                total,
                limit: c.max_total_bytes,
            });
        }
        Ok(())
    }

    /// Re-reports the current step and asks for everything missing.
    fn resume(&mut self, now_ms: u64) -> Vec<Action> {
        match &mut self.state.phase {
            Phase::Idle => Vec::new(),
            Phase::Downloading(dl) => {
                dl.last_progress_ms = now_ms;
                let (received, total) = dl.totals();
                let mut actions = vec![report_dropped(
                    &dl.manifest,
                    Step::Downloading { received, total },
                    dl.chunks_dropped,
                )];
                // Everything missing, the dropped ones included.
                dl.rerequest.clear();
                let artifacts = dl.missing();
                if !artifacts.is_empty() {
                    actions.push(Action::RequestResend(ResendRequest {
                        deployment_id: dl.manifest.deployment_id.clone(),
                        artifacts,
                    }));
                }
                actions
            }
            Phase::Checking(c) => vec![report_dropped(
                &c.manifest,
                Step::Starting,
                c.chunks_dropped,
            )],
        }
    }

    fn maybe_start(&mut self, now_ms: u64, store: &dyn ArtifactStore, actions: &mut Vec<Action>) {
        let Phase::Downloading(dl) = &self.state.phase else {
            return;
        };
        if dl.transfers.iter().any(|t| !t.done) {
            return;
        }
        let (manifest, dropped) = (dl.manifest.clone(), dl.chunks_dropped);
        actions.push(report_dropped(&manifest, Step::Verifying, dropped));
        // Every artifact was hash-checked on arrival or is in the content-addressed store; a
        // store that lost one since is the only thing left to catch.
        for a in &manifest.artifacts {
            if !store.has(&a.sha256).unwrap_or(false) {
                let reason = format!(
                    "artifact {} ({}) is missing from the store",
                    a.name, a.sha256
                );
                self.state.phase = Phase::Idle;
                actions.push(report_dropped(&manifest, Step::Failed { reason }, dropped));
                actions.push(Action::Persist);
                return;
            }
        }
        actions.push(report_dropped(&manifest, Step::Starting, dropped));
        self.state.phase = Phase::Checking(Candidate {
            manifest: manifest.clone(),
            started_ms: now_ms,
            processed: 0,
            chunks_dropped: dropped,
        });
        actions.push(Action::Persist);
        actions.push(Action::Start { manifest });
    }

    fn commit(&mut self) -> Vec<Action> {
        let Phase::Checking(c) = std::mem::take(&mut self.state.phase) else {
            return Vec::new();
        };
        let m = c.manifest;
        self.state
            .committed
            .insert(target_key(&m.target), m.version);
        if m.kind == DeployKind::Model {
            // Models swap inside the running pipeline; the installed pipeline stays the
            // rollback target and keeps its artifacts.
            self.state.models.retain(|old| {
                !old.artifacts
                    .iter()
                    .any(|a| m.artifacts.iter().any(|b| b.name == a.name))
            });
            self.state.models.push(m.clone());
        } else {
            self.state.previous = self.state.installed.replace(m.clone());
            self.state.models.clear();
        }
        vec![
            report_dropped(&m, Step::Healthy, c.chunks_dropped),
            Action::Commit { manifest: m },
            Action::Persist,
        ]
    }

    fn rollback(&mut self, reason: String) -> Vec<Action> {
        let Phase::Checking(c) = std::mem::take(&mut self.state.phase) else {
            return Vec::new();
        };
        vec![
            Action::Rollback {
                to: self.state.installed.clone(),
                reason: reason.clone(),
            },
            report_dropped(&c.manifest, Step::RolledBack { reason }, c.chunks_dropped),
            Action::Persist,
        ]
    }
}

fn same(a: &Manifest, b: &Manifest) -> bool {
    a.deployment_id == b.deployment_id && a.version == b.version && a.target == b.target
}

fn reject(manifest: Option<&Manifest>, reason: &str) -> Action {
    Action::Report(DeployStatus {
        deployment_id: manifest
            .map(|m| m.deployment_id.clone())
            .unwrap_or_default(),
        version: manifest.map(|m| m.version).unwrap_or(0),
        step: Step::Rejected {
            reason: reason.to_owned(),
        },
        chunks_dropped: 0,
    })
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
