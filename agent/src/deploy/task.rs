//! The agent's deploy task: decides which pipeline runs. It feeds deployment messages from
//! MQTT into the [`Deployer`], executes its actions (reports and resend requests through the
//! outbox, artifacts into the state database, candidates started in shadow for the health
//! check, then committed or rolled back), and has the installed or local pipeline run. The
//! pipelines themselves belong to the pipeline host ([`HostHandle`]), which this task drives
//! with commands: start, shadow, swap, discard.
//!
//! The pipeline that runs, in order of precedence: the installed deployment, else the local
//! `[pipeline] file`, else none. A candidate runs in shadow beside it until the health check
//! decides; only a passed check replaces the running pipeline (a swap).
//!
//! A model deployment (kind `model`, `.onnx` artifacts named like the pipeline's `model =`
//! paths) does not restart anything: each model is loaded beside the serving version, probed
//! and compared with it (inputs, outputs); if all pass, the health check passes and the commit
//! swaps them into the registry under the running pipeline (requests in flight finish on the
//! old version); if one fails, the rollback leaves the old versions serving. Committed models
//! also apply when the pipeline starts again (restart, fallback).
//!
//! Groups come from the enrollment session: the task follows its watch, tells the deployer
//! which groups' manifests to take and keeps one inbox subscription for those groups' topics
//! (replaced when the groups change; the uplink follows the inbox's filters on the broker).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use protocol::v1::deploy::{DeployKind, Manifest, MediaType};
use protocol::v1::{Class, topics};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::unpack::Unpacked;
use super::{Action, ArtifactStore, DeployConfig, Deployer, FileStore, Health};
use crate::enrollment::SessionWatch;
use crate::inbox::{Inbox, Incoming, Subscription};
use crate::inference::Inference;
use crate::link::{self, LinkWatch};
use crate::outbox::{NewMessage, Outbox};
use crate::pipeline::{
    ArtifactError, Artifacts, HostError, HostHandle, Launch, LocalFiles, Mode, Origin, PipelineSpec,
};
use crate::statedb::StateDb;

/// Tree and key of the persisted deployer state in the state database.
const STATE_TREE: &str = "deploy";
const STATE_KEY: &[u8] = b"state";
/// How often time-based checks run (resend after a stall, health window, health counters);
/// reconnects are not among them, they come from the link-state watch.
const TICK: Duration = Duration::from_millis(250);
/// Deployment messages buffered between the uplink and this task (chunks are up to 64 KiB;
/// a lost one is asked for again).
pub const INBOX_CAPACITY: usize = 64;
/// Resend requests are only useful while the download is going on.
const RESEND_TTL: Duration = Duration::from_secs(60);

/// A pipeline from a deployment: modules come from the artifact store by manifest name.
struct Deployed {
    by_name: BTreeMap<String, String>,
    store: Arc<FileStore>,
    unpacked: Unpacked,
}

impl Deployed {
    fn new(m: &Manifest, store: Arc<FileStore>, unpacked: Unpacked) -> Deployed {
        Deployed {
            by_name: m
                .artifacts
                .iter()
                .map(|a| (a.name.clone(), a.sha256.clone()))
                .collect(),
            store,
            unpacked,
        }
    }
}

/// Bytes of a stored artifact, its digest checked again.
fn read_artifact(store: &FileStore, sha: &str) -> Result<Vec<u8>, ArtifactError> {
    let bytes = store
        .get(sha)
        .map_err(|e| ArtifactError::Store(Box::new(e)))?
        .ok_or_else(|| ArtifactError::Missing(sha.to_owned()))?;
    // The store checked the digest on put; check again what comes back from disk.
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != sha {
        return Err(ArtifactError::Corrupted {
            sha: sha.to_owned(),
            actual,
        });
    }
    Ok(bytes)
}

impl Artifacts for Deployed {
    fn module(&self, name: &str) -> Result<Vec<u8>, ArtifactError> {
        let sha = self
            .by_name
            .get(name)
            .ok_or_else(|| ArtifactError::NotListed(name.to_owned()))?;
        read_artifact(&self.store, sha)
    }

    fn base_dir(&self) -> Option<&Path> {
        None
    }

    fn digest(&self, name: &str) -> Option<String> {
        self.by_name.get(name).cloned()
    }

    fn unpacked(&self) -> Option<&Unpacked> {
        Some(&self.unpacked)
    }
}

/// A pipeline's artifacts with the models committed by model deployments put in place.
struct WithModels {
    inner: Box<dyn Artifacts>,
    overrides: BTreeMap<String, String>,
    store: Arc<FileStore>,
}

impl Artifacts for WithModels {
    fn module(&self, name: &str) -> Result<Vec<u8>, ArtifactError> {
        match self.overrides.get(name) {
            Some(sha) => read_artifact(&self.store, sha),
            None => self.inner.module(name),
        }
    }

    fn base_dir(&self) -> Option<&Path> {
        self.inner.base_dir()
    }

    fn digest(&self, name: &str) -> Option<String> {
        (self.overrides.get(name).cloned()).or_else(|| self.inner.digest(name))
    }

    fn unpacked(&self) -> Option<&Unpacked> {
        self.inner.unpacked()
    }
}

/// What the deploy task works with besides its deployer and artifact store; built by
/// `agent::run`.
pub struct DeployParts {
    pub state: StateDb,
    pub outbox: Arc<Outbox>,
    pub device: String,
    /// Model deployments load, check and swap models here.
    pub inference: Inference,
    /// The pipeline host: this task tells it what to run.
    pub host: HostHandle,
    /// The uplink's connection; a reconnect makes the deployer ask for missing chunks.
    pub link: LinkWatch,
    /// The local pipeline, parsed at start-up.
    pub local: Option<(PipelineSpec, LocalFiles)>,
    /// Where the group topics' subscription is made.
    pub inbox: Inbox,
    /// The enrollment session: its groups are this device's groups.
    pub session: SessionWatch,
}

/// The deploy task; see the module docs.
pub struct DeployTask {
    deployer: Deployer,
    store: Arc<FileStore>,
    /// Deployed models' data files, written out of `store` for ONNX Runtime to map.
    unpacked: Unpacked,
    state: StateDb,
    outbox: Arc<Outbox>,
    device: String,
    inference: Inference,
    host: HostHandle,
    link: LinkWatch,
    local: Option<(PipelineSpec, LocalFiles)>,
    inbox: Inbox,
    session: SessionWatch,
    /// Models of a model deployment that passed their checks, swapped in at commit.
    checked_models: Vec<Arc<edge_inference::Model>>,
    reported_processed: u64,
    last_rejected: Option<[u8; 32]>,
}

impl std::fmt::Debug for DeployTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployTask")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// Why the deployer's state could not be made durable (logged; the next persist retries).
#[derive(Debug, thiserror::Error)]
enum PersistError {
    #[error("deploy state tree: {0}")]
    Tree(#[from] sled::Error),
    #[error("syncing the state database: {0}")]
    Sync(#[from] std::io::Error),
}

/// Why a deployment's pipeline does not start; the text becomes the failed health check's
/// reason in the deployment status.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0:?} deployments are not supported by this agent version")]
    Unsupported(DeployKind),
    #[error("manifest carries no pipeline description")]
    NoDescription,
    #[error("pipeline description: {0}")]
    Description(crate::pipeline::SpecError),
    #[error(transparent)]
    Host(#[from] HostError),
}

/// Why a model deployment's models fail their check; the text becomes the failed health
/// check's reason in the deployment status.
#[derive(Debug, thiserror::Error)]
pub enum ModelCheckError {
    #[error("artifact {0}: a model deployment carries only onnx models")]
    NotOnnx(String),
    #[error("model {name}: onnx inference is unavailable on this device: {reason}")]
    Unavailable { name: String, reason: String },
    #[error("model {0} is not used by the running pipeline (no inference stage loads it)")]
    NotUsed(String),
    #[error("model {name}: {source}")]
    Artifact { name: String, source: ArtifactError },
    #[error(transparent)]
    Prepare(#[from] crate::inference::InferenceError),
    #[error("model check panicked: {0}")]
    Panicked(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("deploy state in {path}: {reason}")]
    State { path: String, reason: String },
}

/// Loads the persisted deployer (or a fresh one) and the artifact store.
pub fn open_deployer(
    state: &StateDb,
    device_id: &str,
    config: DeployConfig,
) -> Result<(Deployer, Arc<FileStore>, bool), TaskError> {
    let err = |reason: String| TaskError::State {
        path: state.dir.display().to_string(),
        reason,
    };
    // `state_dir/artifacts`, beside the state database (`state_dir/state`).
    let store = FileStore::open(state.dir.with_file_name("artifacts"), &state.db)
        .map_err(|e| err(e.to_string()))?;
    let tree = state
        .db
        .open_tree(STATE_TREE)
        .map_err(|e| err(e.to_string()))?;
    let (deployer, restored) = match tree.get(STATE_KEY).map_err(|e| err(e.to_string()))? {
        Some(bytes) => (
            Deployer::from_bytes(device_id, config, &bytes).map_err(|e| err(e.to_string()))?,
            true,
        ),
        None => (Deployer::new(device_id, config), false),
    };
    Ok((deployer, Arc::new(store), restored))
}

impl DeployTask {
    pub fn new(deployer: Deployer, store: Arc<FileStore>, parts: DeployParts) -> DeployTask {
        DeployTask {
            deployer,
            store,
            unpacked: Unpacked::new(parts.state.dir.with_file_name("models")),
            state: parts.state,
            outbox: parts.outbox,
            device: parts.device,
            inference: parts.inference,
            host: parts.host,
            link: parts.link,
            local: parts.local,
            inbox: parts.inbox,
            session: parts.session,
            checked_models: Vec::new(),
            reported_processed: 0,
            last_rejected: None,
        }
    }

    /// Runs until `shutdown`; then persists state. Its host handle goes with it, and the host
    /// then stops the pipelines (draining them). `sub`: this device's own deploy topics.
    pub async fn run(
        mut self,
        restored: bool,
        mut sub: Subscription,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut sessions = self.session.clone();
        let mut sessions_open = true;
        let mut group_sub = self.follow_groups(&mut sessions, None);
        if restored {
            let actions = self.deployer.on_restart(protocol::v1::now_ms());
            self.execute(actions).await;
        }
        self.start_installed().await;
        // A reconnect is awaited on the link state, not polled: the deployer asks for the
        // chunks it still misses as soon as the link is back. Its own clone, so the select
        // below can borrow it while the handlers use `self`.
        let mut link = self.link.clone();
        let mut connects = link.borrow_and_update().connects;
        let mut link_open = true;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = sub.rx.recv() => match msg {
                    Some(m) => self.on_message(m).await,
                    None => break,
                },
                Some(m) = next_message(&mut group_sub) => self.on_message(m).await,
                changed = sessions.changed(), if sessions_open => {
                    if changed.is_ok() {
                        group_sub = self.follow_groups(&mut sessions, group_sub);
                    } else {
                        sessions_open = false;
                    }
                }
                open = link::next_connect(&mut link, &mut connects), if link_open => {
                    if open {
                        let actions = self.deployer.on_reconnect(protocol::v1::now_ms());
                        self.execute(actions).await;
                    } else {
                        // The uplink is gone (shutting down): no reconnect can come.
                        link_open = false;
                    }
                }
                _ = tick.tick() => {
                    self.poll_health().await;
                    let actions = self.deployer.on_tick(protocol::v1::now_ms());
                    self.execute(actions).await;
                }
                _ = shutdown.changed() => break,
            }
        }
        drop(sub);
        drop(group_sub);
        self.persist().await;
    }

    /// Takes the session's groups (none while not enrolled): the deployer's, and the group
    /// topics' subscription, made anew only when the groups changed.
    fn follow_groups(
        &mut self,
        sessions: &mut SessionWatch,
        current: Option<Subscription>,
    ) -> Option<Subscription> {
        let groups: Vec<String> = sessions
            .borrow_and_update()
            .as_ref()
            .map(|s| s.groups().to_vec())
            .unwrap_or_default();
        if current.is_some() && groups == self.deployer.groups() {
            return current;
        }
        if groups != self.deployer.groups() {
            tracing::info!(groups = ?groups, "deployment groups (from enrollment)");
        }
        // The new routes before the old ones go, so a topic in both never lacks a route.
        let next = (!groups.is_empty()).then(|| {
            let filters: Vec<String> = groups
                .iter()
                .flat_map(|g| {
                    [
                        topics::group_deploy_manifest(g),
                        topics::group_deploy_chunk(g),
                    ]
                })
                .collect();
            self.inbox.subscribe_all(&filters, INBOX_CAPACITY)
        });
        drop(current);
        self.deployer.set_groups(groups);
        next
    }

    async fn on_message(&mut self, m: Incoming) {
        let now = protocol::v1::now_ms();
        let actions = match topics::parse_deploy(&m.topic) {
            Some(
                topics::DeployTopic::Manifest { .. } | topics::DeployTopic::GroupManifest { .. },
            ) => {
                if m.payload.is_empty() {
                    // A retained manifest being cleared.
                    return;
                }
                let digest: [u8; 32] = Sha256::digest(&m.payload).into();
                let actions =
                    self.deployer
                        .on_manifest_payload(&m.payload, now, self.store.as_ref());
                let rejected_only = actions.iter().all(|a| {
                    matches!(a, Action::Report(s) if matches!(s.step, protocol::v1::deploy::Step::Rejected { .. }))
                });
                if rejected_only {
                    // The same retained manifest comes back on every reconnect: say why
                    // it is refused once, not every time.
                    if self.last_rejected == Some(digest) {
                        return;
                    }
                    self.last_rejected = Some(digest);
                }
                actions
            }
            Some(topics::DeployTopic::Chunk { .. } | topics::DeployTopic::GroupChunk { .. }) => {
                self.deployer
                    .on_chunk_payload(&m.payload, now, self.store.as_ref())
            }
            _ => {
                tracing::warn!(topic = %m.topic, "ignoring a message on an unexpected deploy topic");
                return;
            }
        };
        self.execute(actions).await;
    }

    /// Executes actions; health and start results can produce more, handled in turn.
    async fn execute(&mut self, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let more = self.execute_one(action).await;
            queue.extend(more);
        }
    }

    async fn execute_one(&mut self, action: Action) -> Vec<Action> {
        match action {
            Action::Report(status) => {
                match &status.step {
                    protocol::v1::deploy::Step::Rejected { reason }
                    | protocol::v1::deploy::Step::Failed { reason }
                    | protocol::v1::deploy::Step::RolledBack { reason } => {
                        tracing::warn!(deployment = %status.deployment_id, version = status.version, step = ?status.step, reason = %reason, "deployment did not go through");
                    }
                    step => {
                        tracing::info!(deployment = %status.deployment_id, version = status.version, step = ?step, "deployment step");
                    }
                }
                self.send(topics::deploy_status(&self.device), &status, None)
                    .await;
                Vec::new()
            }
            Action::RequestResend(req) => {
                let n: usize = req.artifacts.iter().map(|a| a.indexes.len()).sum();
                tracing::info!(deployment = %req.deployment_id, chunks = n, "asking for missing chunks");
                self.send(topics::deploy_resend(&self.device), &req, Some(RESEND_TTL))
                    .await;
                Vec::new()
            }
            Action::ChunkRejected { reason } => {
                tracing::warn!(reason = %reason, "payload on a deployment chunk topic rejected");
                Vec::new()
            }
            Action::ChunkDropped(d) => {
                // Forged on the broker or damaged: degraded, not failed (the deployment goes
                // on and asks for the chunk again), so WARN.
                tracing::warn!(
                    deployment = %d.deployment_id,
                    artifact = %d.artifact,
                    index = d.index,
                    dropped = d.dropped,
                    reason = %d.reason,
                    "deployment chunk dropped"
                );
                Vec::new()
            }
            Action::Persist => {
                self.persist().await;
                Vec::new()
            }
            Action::Start { manifest } if manifest.kind == DeployKind::Model => {
                let now = protocol::v1::now_ms();
                match self.check_models(&manifest).await {
                    Ok(models) => {
                        self.checked_models = models;
                        self.deployer.on_health(Health::Passed, now)
                    }
                    Err(e) => self.deployer.on_health(Health::Failed(e.to_string()), now),
                }
            }
            Action::Commit { manifest } if manifest.kind == DeployKind::Model => {
                for m in self.checked_models.drain(..) {
                    tracing::info!(model = %m.name(), version = %m.version(), deployment = %manifest.deployment_id, "model deployment swapped in");
                    self.inference.commit(m);
                }
                self.persist().await;
                self.collect_garbage();
                Vec::new()
            }
            Action::Start { manifest } => match self.start_shadow(&manifest).await {
                Ok(()) => {
                    self.reported_processed = 0;
                    Vec::new()
                }
                Err(e) => self
                    .deployer
                    .on_health(Health::Failed(e.to_string()), protocol::v1::now_ms()),
            },
            Action::Commit { manifest } => {
                self.replace_running(&manifest).await;
                self.persist().await;
                self.collect_garbage();
                Vec::new()
            }
            Action::Rollback { to, reason } => {
                self.checked_models.clear();
                if let Err(e) = self.host.discard().await {
                    tracing::error!(error = %e, "cannot stop the candidate pipeline");
                }
                tracing::warn!(reason = %reason, back_to = ?to.as_ref().map(|m| &m.deployment_id), "deployment rolled back; the running pipeline stays");
                self.start_installed().await;
                Vec::new()
            }
        }
    }

    async fn send<T: serde::Serialize>(&self, topic: String, body: &T, ttl: Option<Duration>) {
        let msg = NewMessage {
            class: Class::Control,
            topic: topic.clone(),
            body: serde_json::to_vec(body).unwrap_or_default(),
            ttl,
        };
        if let Err(e) = self.outbox.enqueue(msg).await {
            tracing::error!(topic = %topic, error = %e, "deployment report not queued");
        }
    }

    async fn persist(&self) {
        let bytes = self.deployer.to_bytes();
        let state = self.state.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<(), PersistError> {
            let tree = state.db.open_tree(STATE_TREE)?;
            tree.insert(STATE_KEY, bytes)?;
            Ok(state.sync()?)
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(dir = %self.state.dir.display(), error = %e, "cannot persist deployment state")
            }
            Err(e) => tracing::error!(error = %e, "persisting deployment state panicked"),
        }
    }

    /// Removes stored artifacts no manifest the deployer keeps refers to.
    fn collect_garbage(&self) {
        let pinned: std::collections::BTreeSet<String> =
            self.deployer.pinned_artifacts().into_iter().collect();
        for d in self.store.digests() {
            if !pinned.contains(&d)
                && let Err(e) = self.store.remove(&d)
            {
                tracing::warn!(artifact = %d, error = %e, "cannot remove an unused artifact");
            }
        }
        self.unpacked.collect_garbage(&pinned);
    }

    /// What the host needs to start a deployment's pipeline.
    fn launch(&self, manifest: &Manifest, mode: Mode) -> Result<Launch, StartError> {
        if manifest.kind != DeployKind::Pipeline {
            return Err(StartError::Unsupported(manifest.kind));
        }
        let text = manifest
            .pipeline_toml
            .clone()
            .ok_or(StartError::NoDescription)?;
        let spec = PipelineSpec::parse(&text).map_err(StartError::Description)?;
        let artifacts = Box::new(Deployed::new(
            manifest,
            self.store.clone(),
            self.unpacked.clone(),
        ));
        let origin = Origin {
            deployment_id: manifest.deployment_id.clone(),
            version: manifest.version,
        };
        // A candidate under check runs its own models; the live one gets committed ones.
        let artifacts = match mode {
            Mode::Live => self.with_models(artifacts),
            Mode::Shadow => artifacts,
        };
        Ok(Launch {
            spec,
            artifacts,
            origin,
        })
    }

    /// Has the host start a deployment's pipeline in shadow, as the candidate.
    async fn start_shadow(&self, manifest: &Manifest) -> Result<(), StartError> {
        let launch = self.launch(manifest, Mode::Shadow)?;
        Ok(self.host.shadow(launch).await?)
    }

    /// After a commit: the new pipeline goes live in place of the old one (the host stops
    /// the candidate and the old one first).
    async fn replace_running(&mut self, manifest: &Manifest) {
        let launch = match self.launch(manifest, Mode::Live) {
            Ok(l) => l,
            Err(e) => {
                // It was prepared the same way for its health check a moment ago.
                tracing::error!(deployment = %manifest.deployment_id, error = %e, "committed pipeline cannot be prepared; the previous one keeps running");
                return;
            }
        };
        if let Err(e) = self.host.swap(launch).await {
            // It passed its health check a moment ago; a failure now is unexpected.
            tracing::error!(deployment = %manifest.deployment_id, error = %e, "committed pipeline failed to start live; no pipeline is running");
        }
    }

    /// Runs the installed deployment, else the local pipeline, if nothing runs yet.
    async fn start_installed(&mut self) {
        match self.host.is_running().await {
            Ok(false) => {}
            Ok(true) | Err(HostError::Gone) => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot ask the pipeline host what runs");
                return;
            }
        }
        if let Some(m) = self.deployer.installed().cloned() {
            let started = match self.launch(&m, Mode::Live) {
                Ok(launch) => self.host.start(launch).await.map_err(StartError::from),
                Err(e) => Err(e),
            };
            match started {
                Ok(_) => return,
                Err(e) => {
                    tracing::error!(deployment = %m.deployment_id, version = m.version, error = %e, "installed pipeline does not start; falling back to the local pipeline");
                }
            }
        }
        if let Some((spec, files)) = self.local.clone() {
            let launch = Launch {
                spec,
                artifacts: self.with_models(Box::new(files)),
                origin: Origin::default(),
            };
            if let Err(e) = self.host.start(launch).await {
                tracing::error!(error = %e, "local pipeline does not start");
            }
        }
    }

    fn with_models(&self, inner: Box<dyn Artifacts>) -> Box<dyn Artifacts> {
        let overrides = self.deployer.model_overrides();
        if overrides.is_empty() {
            return inner;
        }
        Box::new(WithModels {
            inner,
            overrides,
            store: self.store.clone(),
        })
    }

    /// Loads every model of a model deployment beside the version serving now and checks it
    /// (loads, probe gives finite outputs of the declared shapes, same inputs and outputs).
    async fn check_models(
        &self,
        manifest: &Manifest,
    ) -> Result<Vec<Arc<edge_inference::Model>>, ModelCheckError> {
        let inference = self.inference.clone();
        let artifacts = Deployed::new(manifest, self.store.clone(), self.unpacked.clone());
        let listed: Vec<(String, MediaType)> = manifest
            .artifacts
            .iter()
            .map(|a| (a.name.clone(), a.media_type))
            .collect();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(listed.len());
            for (name, media) in listed {
                match media {
                    MediaType::Onnx => {}
                    // Loaded with the model that names it (below).
                    MediaType::OnnxData => continue,
                    MediaType::WasmComponent => return Err(ModelCheckError::NotOnnx(name)),
                }
                let status = inference.status();
                if !status.available {
                    return Err(ModelCheckError::Unavailable {
                        name,
                        reason: status.reason,
                    });
                }
                if inference.model(&name).is_none() {
                    return Err(ModelCheckError::NotUsed(name));
                }
                let files = artifacts
                    .model(&name)
                    .map_err(|source| ModelCheckError::Artifact {
                        name: name.clone(),
                        source,
                    })?;
                out.push(inference.prepare(&name, &files.graph, &files.data)?);
            }
            Ok(out)
        })
        .await
        .unwrap_or_else(|e| Err(ModelCheckError::Panicked(e.to_string())))
    }

    async fn poll_health(&mut self) {
        let Ok(Some((processed, failure))) = self.host.candidate_health().await else {
            return;
        };
        let now = protocol::v1::now_ms();
        let actions = if let Some(reason) = failure {
            self.deployer.on_health(Health::Failed(reason), now)
        } else if processed > self.reported_processed {
            let delta = u32::try_from(processed - self.reported_processed).unwrap_or(u32::MAX);
            self.reported_processed = processed;
            self.deployer.on_health(Health::Processed(delta), now)
        } else {
            Vec::new()
        };
        self.execute(actions).await;
    }
}

/// The next message of an optional subscription; never resolves without one.
async fn next_message(sub: &mut Option<Subscription>) -> Option<Incoming> {
    match sub {
        Some(s) => s.rx.recv().await,
        None => std::future::pending().await,
    }
}
