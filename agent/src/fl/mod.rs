//! Federated learning on the device: apply each new global model, train locally when selected,
//! send the compressed weight delta through the outbox.
//!
//! ```text
//! fl/round (retained, signed) ──► admit ───► patch the weights into the pipeline's model and
//!                                            swap it in (the inference stage serves them)
//!                                       └──► selected? train with the pipeline's trainer module on
//!                                            its dataset ──► delta = local - global ──► codec
//!                                            (+ error-feedback residual) ──► outbox ──► fl/update
//! ```
//!
//! The running pipeline says what it can train (`[training]`: model, trainer module, dataset);
//! it publishes that in the [`TrainingSlot`] when it starts live. Round messages for a model
//! no running pipeline trains are kept and handled when one starts.
//!
//! Admission ([`admit`]): a round message must be signed by the coordinator key of the
//! enrollment session (not the deploy keys: the coordinator's online identity signs rounds),
//! name this device in its header (or, on the round topic of a group of the session's, that
//! group, with no train order: a large group's weights come once for all its members), and be
//! newer than the last one admitted for its task
//! ([`state::Mark`], persisted, so a replay of an older round is refused after a reboot too).
//! Before enrollment there is no key to verify with: the newest message waits until a session
//! exists.
//!
//! **Invariants:** a round is trained and queued at most once per device (see [`state`]); the
//! update is in the outbox (durable, sent when online, in order with the device's other
//! model-class messages) before the round counts as submitted; the newest applied global
//! weights are re-applied whenever the pipeline restarts (reboot, redeploy) from the stored
//! round message. Forged, corrupted or malformed round messages are logged with the cause,
//! counted, and change nothing.
//! **Boundary:** the pipeline publishes [`TrainingSetup`]; the coordinator decides selection,
//! deadlines and what a late update is worth.

mod fetch;
mod frozen;
pub mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge_inference::dense::{self, NamedWeights};
use protocol::v1::deploy::{TrustedKeys, VerifyingKey};
use protocol::v1::fl::{self, FailureKind, RoundMessage, TrainFailure, Update, codec};
use protocol::v1::{Class, topics};
use tokio::sync::watch;

use crate::dataset::Dataset;
use crate::enrollment::SessionWatch;
use crate::inbox::{Inbox, Incoming, Subscription};
use crate::inference::Inference;
use crate::outbox::{NewMessage, Outbox};
use crate::sandbox::Sandbox;
use crate::sandbox::SandboxError;
use crate::sandbox::trainer::{Param, SampleSource, TrainError, TrainResult};
pub use state::FlState;
use state::{Admission, Mark, StateError};

/// Round messages and weight chunks buffered between the uplink and this task (one round
/// message per task is retained; chunks come in windows of 32).
pub const INBOX_CAPACITY: usize = 64;

/// What the task subscribes to: its round messages and the chunks of weights too big for them.
pub fn topics(device: &str) -> [String; 2] {
    [topics::fl_round(device), topics::fl_chunk(device)]
}

/// What the live pipeline can train, published when it starts.
#[derive(Debug)]
pub struct TrainingSetup {
    pub pipeline: String,
    /// The inference stage's model (registry name) the global weights patch.
    pub model: String,
    /// The model's bytes as the pipeline loaded them (the base every patch starts from).
    pub model_bytes: Vec<u8>,
    /// Its external data files, if any (the pipeline's copy, separate from the session's):
    /// global weights go into copies of them at the same offsets, so the model keeps its layout.
    pub model_data: edge_inference::DataFiles,
    pub trainer_name: String,
    pub trainer_bytes: Vec<u8>,
    pub dataset: String,
}

impl TrainingSetup {
    /// The model with every initializer's values in the graph, for code that reads weights
    /// (the frozen layers): the bytes as loaded, or, with external data files, an inline copy.
    fn readable_model(&self) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        if self.model_data.is_empty() {
            return Ok(std::borrow::Cow::Borrowed(&self.model_bytes));
        }
        edge_inference::external::inline(&self.model_bytes, &self.model_data)
            .map(std::borrow::Cow::Owned)
            .map_err(|e| format!("model {}: {e}", self.model))
    }
}

/// The live pipeline's [`TrainingSetup`], watched by the federated-learning task.
#[derive(Debug, Clone)]
pub struct TrainingSlot(Arc<watch::Sender<Option<Arc<TrainingSetup>>>>);

impl Default for TrainingSlot {
    fn default() -> Self {
        TrainingSlot(Arc::new(watch::channel(None).0))
    }
}

impl TrainingSlot {
    pub fn set(&self, setup: Option<Arc<TrainingSetup>>) {
        self.0.send_replace(setup);
    }

    /// Clears the slot if it still holds `setup` (a newer pipeline may have replaced it).
    pub fn clear_if(&self, setup: &Arc<TrainingSetup>) {
        self.0.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, setup)) {
                *cur = None;
                true
            } else {
                false
            }
        });
    }

    pub fn get(&self) -> Option<Arc<TrainingSetup>> {
        self.0.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<TrainingSetup>>> {
        self.0.subscribe()
    }
}

/// Counters for logs and telemetry.
#[derive(Debug, Default)]
pub struct FlStats {
    pub rounds_received: AtomicU64,
    pub rejected: AtomicU64,
    pub applied: AtomicU64,
    pub trained: AtomicU64,
    pub queued: AtomicU64,
    pub failed: AtomicU64,
    /// Task, round and version of the last verified round message.
    last: std::sync::Mutex<(String, u32, u32)>,
}

impl FlStats {
    fn saw(&self, task: &str, round: u32, version: u32) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = (task.to_owned(), round, version);
    }

    /// `None` until the first round message arrived.
    pub fn telemetry(&self) -> Option<protocol::v1::FlTelemetry> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let received = get(&self.rounds_received);
        if received == 0 {
            return None;
        }
        let (task, round, version) = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Some(protocol::v1::FlTelemetry {
            rounds_received: received,
            rejected: get(&self.rejected),
            applied: get(&self.applied),
            trained: get(&self.trained),
            queued: get(&self.queued),
            failed: get(&self.failed),
            task,
            round,
            version,
        })
    }
}

/// A model's dense layers split where the round's weights start: the trained ones, and the
/// frozen ones in front (a task's `[train] trainable`), read once.
struct Split {
    trained: Vec<edge_inference::dense::DenseLayer>,
    frozen: Option<frozen::Frozen>,
}

/// Splits `setup`'s model at the first layer the round carries (none: at 0, and `to_trainer`
/// names the first layer the round lacks), and checks the frozen layers against the digest
/// the round names.
fn split_layers(msg: &RoundMessage, setup: &TrainingSetup) -> Result<Split, RoundError> {
    let model_err = |reason: String| RoundError::Model {
        model: setup.model.clone(),
        reason,
    };
    let mut layers =
        edge_inference::dense_layers(&setup.model_bytes).map_err(|e| model_err(e.to_string()))?;
    let params = &msg.header.params;
    let first = dense::first_named(&layers, |n| params.iter().any(|p| p.name == n)).unwrap_or(0);
    let trained = layers.split_off(first);
    let frozen = if layers.is_empty() {
        None
    } else {
        let readable = setup.readable_model().map_err(model_err)?;
        Some(frozen::Frozen::from_model(&readable, &layers).map_err(model_err)?)
    };
    if let Some(want) = &msg.header.frozen {
        match &frozen {
            Some(f) => f.check(want).map_err(model_err)?,
            None => {
                return Err(model_err(format!(
                    "the round names frozen layers (sha256 {want}) in front of its weights, \
                     and this model has none there: it is not the task's model"
                )));
            }
        }
    }
    Ok(Split { trained, frozen })
}

/// Why a round did not produce an update.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error("dataset {dataset}: {reason}")]
    Dataset { dataset: String, reason: String },
    #[error("dataset {dataset} has no labeled samples to train on")]
    NoSamples { dataset: String },
    #[error("model {model}: {reason}")]
    Model { model: String, reason: String },
    #[error("trainer {module}: {reason}")]
    Trainer {
        module: String,
        kind: FailureKind,
        reason: String,
    },
    #[error("cannot queue the update: {0}")]
    Outbox(String),
    #[error("round weights not fetched: {0}")]
    Fetch(String),
    #[error("{0}")]
    State(#[from] state::StateError),
}

impl RoundError {
    /// What the failure was up against, as reported to the coordinator.
    pub fn kind(&self) -> FailureKind {
        match self {
            RoundError::Dataset { .. } | RoundError::NoSamples { .. } => FailureKind::Data,
            RoundError::Model { .. } => FailureKind::Model,
            RoundError::Trainer { kind, .. } => *kind,
            RoundError::Outbox(_) | RoundError::State(_) | RoundError::Fetch(_) => {
                FailureKind::Resources
            }
        }
    }
}

/// The kind of a trainer's failure. A trainer's own refusals are text (the WIT contract has
/// no error type); it names a sample by index for bad data (`sample 17: label 12 is outside
/// 0..10`) or says `no samples`, and names a parameter otherwise.
fn trainer_kind(e: &TrainError) -> FailureKind {
    match e {
        TrainError::Sandbox(SandboxError::Timeout { .. }) => FailureKind::Timeout,
        TrainError::Sandbox(SandboxError::MemoryLimit { .. }) => FailureKind::Resources,
        TrainError::Refused { message, .. }
            if message.starts_with("sample ") || message.starts_with("no samples") =>
        {
            FailureKind::Data
        }
        _ => FailureKind::Model,
    }
}

/// Why a round message is refused; counted in the FL telemetry's `rejected`.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Message(#[from] fl::FlError),
    #[error("round message for device {0:?}, not this one")]
    OtherDevice(String),
    #[error(
        "round message for group {0:?} orders training: a group's message carries weights only"
    )]
    GroupOrder(String),
    #[error(
        "task {task} round {round} version {version} is not newer than the last one admitted (round {held_round} version {held_version}): a replay"
    )]
    Replay {
        task: String,
        round: u32,
        version: u32,
        held_round: u32,
        held_version: u32,
        /// A group's message: the one a selected member takes after its own newer train
        /// order of the same round, so not a sign of an attack.
        group: bool,
    },
}

/// The next message on the group round topics; never, without a subscription.
async fn next_group_message(sub: &mut Option<Subscription>) -> Option<Incoming> {
    match sub {
        Some(s) => s.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Checks a round message's signature (the coordinator's key) and that it is for `device`, or
/// for one of its `groups` as a whole (weights only: a group's message never orders training).
pub fn verify(
    payload: &[u8],
    device: &str,
    groups: &[String],
    coordinator: VerifyingKey,
) -> Result<RoundMessage, Refusal> {
    let msg = fl::decode_round(payload, &TrustedKeys::new([coordinator]))?;
    let h = &msg.header;
    if h.device == device {
        return Ok(msg);
    }
    match topics::recipient_group(&h.device) {
        Some(g) if groups.iter().any(|x| x == g) => {
            if h.train.is_some() {
                return Err(Refusal::GroupOrder(g.to_owned()));
            }
            Ok(msg)
        }
        _ => Err(Refusal::OtherDevice(msg.header.device)),
    }
}

/// [`verify`], then checks the message against its task's mark and, if it is newer, stores it
/// and the new mark durably before returning it (an `Again` changes nothing stored).
pub fn admit(
    payload: &[u8],
    device: &str,
    groups: &[String],
    coordinator: VerifyingKey,
    state: &FlState,
) -> Result<Result<(RoundMessage, Admission), Refusal>, StateError> {
    let msg = match verify(payload, device, groups, coordinator) {
        Ok(m) => m,
        Err(e) => return Ok(Err(e)),
    };
    let h = &msg.header;
    let mark = Mark::of(h.version, h.round, h.issued_ms, payload);
    let admission = match state.mark(&h.task)? {
        None => Admission::New,
        Some(held) => match held.admits(&mark) {
            Some(a) => a,
            None => {
                return Ok(Err(Refusal::Replay {
                    task: h.task.clone(),
                    round: h.round,
                    version: h.version,
                    held_round: held.round,
                    held_version: held.version,
                    group: h.device != device,
                }));
            }
        },
    };
    if admission == Admission::New {
        state.admit_round(&h.task, &h.model, payload, mark)?;
    }
    Ok(Ok((msg, admission)))
}

/// Hands `tensors`, laid end to end, to `put` a piece at a time from the end (each piece with
/// its offset among all the values), letting go of each piece as it goes.
fn drain_from_the_end(tensors: &mut [Vec<f32>], mut put: impl FnMut(usize, &[f32])) {
    /// Values let go at a time (256 KiB).
    const PIECE: usize = 64 * 1024;
    let mut end: usize = tensors.iter().map(Vec::len).sum();
    for t in tensors.iter_mut().rev() {
        while !t.is_empty() {
            let start = t.len() - t.len().min(PIECE);
            end -= t.len() - start;
            put(end, &t[start..]);
            t.truncate(start);
            t.shrink_to_fit();
        }
    }
}

/// The blob of a round whose weights are only in the state directory (its chunks, kept by the
/// fetch); `None` for a round that carries its weights.
fn kept_blob(msg: &RoundMessage) -> Option<&fl::WeightsBlob> {
    msg.header.blob.as_ref().filter(|_| msg.weights.is_empty())
}

/// The task; see the module docs.
pub struct FlTask {
    d: FlDeps,
    pub stats: Arc<FlStats>,
    /// Per model: (task, global version, registry version) of the weights this process
    /// applied. In memory on purpose: after a restart the pipeline loads its base model again
    /// and the stored round message is applied anew.
    applied: std::sync::Mutex<std::collections::HashMap<String, (String, u32, String)>>,
}

/// Runs one round's local training on the samples given. The agent's is the WASM sandbox
/// (the pipeline's trainer module); the fleet simulator (`sim/`) has a cheap synthetic one, so
/// that many devices in one process take part in rounds without compiling WASM.
pub trait LocalTrainer: Send + Sync {
    fn train(
        &self,
        setup: &TrainingSetup,
        weights: Vec<Param>,
        params_json: &str,
        samples: Arc<dyn SampleSource>,
    ) -> Result<TrainResult, RoundError>;
}

impl LocalTrainer for Sandbox {
    fn train(
        &self,
        setup: &TrainingSetup,
        weights: Vec<Param>,
        params_json: &str,
        samples: Arc<dyn SampleSource>,
    ) -> Result<TrainResult, RoundError> {
        let module = self
            .load_trainer(&setup.trainer_name, &setup.trainer_bytes)
            .map_err(|e| RoundError::Trainer {
                module: setup.trainer_name.clone(),
                kind: FailureKind::Model,
                reason: e.to_string(),
            })?;
        Sandbox::train(self, &module, weights, params_json, samples).map_err(|e| {
            RoundError::Trainer {
                module: setup.trainer_name.clone(),
                kind: trainer_kind(&e),
                reason: e.to_string(),
            }
        })
    }
}

/// What [`FlTask::new`] needs.
pub struct FlDeps {
    pub device: String,
    /// The enrollment session: its coordinator key verifies round messages.
    pub session: SessionWatch,
    /// Where the group round topics of the session's groups are subscribed.
    pub inbox: Inbox,
    pub state: FlState,
    pub outbox: Arc<Outbox>,
    pub dataset: Arc<Dataset>,
    /// The agent's: its [`Sandbox`].
    pub trainer: Arc<dyn LocalTrainer>,
    pub inference: Inference,
    pub slot: TrainingSlot,
    /// Where each round's global weights are written (the model's data files patched, or a
    /// file of their own for a model without any) for ONNX Runtime to map: the weights are not
    /// held in memory as a whole file. `None`: patched in memory.
    pub weights_dir: Option<std::path::PathBuf>,
}

impl FlTask {
    pub fn new(d: FlDeps) -> FlTask {
        FlTask {
            d,
            stats: Arc::default(),
            applied: Default::default(),
        }
    }

    pub async fn run(self, mut sub: Subscription, mut stop: watch::Receiver<bool>) {
        let mut setups = self.d.slot.subscribe();
        let mut sessions = self.d.session.clone();
        let mut sessions_open = true;
        // The newest round message that came before enrollment (nothing to verify it with).
        let mut waiting: Option<Vec<u8>> = None;
        let round_topic = topics::fl_round(&self.d.device);
        // The session's groups and the subscription to their round topics.
        let mut groups: Vec<String> = Vec::new();
        let mut group_sub: Option<Subscription> = None;
        self.follow_groups(&mut sessions, &mut groups, &mut group_sub);
        let me = Arc::new(self);
        loop {
            // `handle` gives up on a round when told to stop and consumes that change: without
            // this check the loop below would wait for a second one and shutdown would hang.
            if *stop.borrow() {
                return;
            }
            // In order: the device's own messages before its groups'. The coordinator publishes
            // them in round order, but the two topics reach this task through two queues, and
            // a device busy training must not take round 3's group message before its own
            // round 2 order (which would then be refused as older).
            let msg = tokio::select! {
                biased;
                _ = stop.changed() => return,
                msg = sub.rx.recv() => {
                    let Some(msg) = msg else { return };
                    msg
                }
                Some(msg) = next_group_message(&mut group_sub) => msg,
                changed = sessions.changed(), if sessions_open => {
                    if changed.is_err() {
                        sessions_open = false;
                        continue;
                    }
                    me.follow_groups(&mut sessions, &mut groups, &mut group_sub);
                    let enrolled = sessions.borrow().is_some();
                    if enrolled && let Some(payload) = waiting.take() {
                        me.handle_all(payload, true, &mut sub, &mut stop).await;
                    }
                    continue;
                }
                changed = setups.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let model = setups.borrow_and_update().as_ref().map(|s| s.model.clone());
                    // A pipeline (re)started: give it the newest global weights back.
                    if let Some(m) = model.and_then(|m| me.d.state.round(&m)) {
                        me.handle_all(m, false, &mut sub, &mut stop).await;
                    }
                    continue;
                }
            };
            let group_topic = groups
                .iter()
                .any(|g| msg.topic == topics::group_fl_round(g));
            if msg.payload.is_empty() || (msg.topic != round_topic && !group_topic) {
                continue; // a cleared retained message, or a chunk no fetch waits for
            }
            me.stats.rounds_received.fetch_add(1, Ordering::Relaxed);
            let payload = msg.payload.to_vec();
            // Not `borrow_and_update`: a change of session (groups) is the branch above's.
            if sessions.borrow().is_none() {
                tracing::info!(
                    "federated round message kept until the device is enrolled (no coordinator key to verify it yet)"
                );
                waiting = Some(payload);
                continue;
            }
            // Newer than anything kept from before enrollment.
            waiting = None;
            me.handle_all(payload, true, &mut sub, &mut stop).await;
        }
    }

    /// Takes the session's groups (none while not enrolled) and subscribes to their round
    /// topics, anew only when they changed (the new routes before the old ones go).
    fn follow_groups(
        &self,
        sessions: &mut SessionWatch,
        groups: &mut Vec<String>,
        sub: &mut Option<Subscription>,
    ) {
        let now: Vec<String> = sessions
            .borrow_and_update()
            .as_ref()
            .map(|s| s.groups().to_vec())
            .unwrap_or_default();
        if now == *groups {
            return;
        }
        let filters: Vec<String> = now.iter().map(|g| topics::group_fl_round(g)).collect();
        *sub = (!filters.is_empty()).then(|| self.d.inbox.subscribe_all(&filters, INBOX_CAPACITY));
        *groups = now;
    }

    /// [`FlTask::handle`], then each round message that came while it fetched weights.
    async fn handle_all(
        self: &Arc<Self>,
        payload: Vec<u8>,
        fresh: bool,
        sub: &mut Subscription,
        stop: &mut watch::Receiver<bool>,
    ) {
        let mut next = Some((payload, fresh));
        while let Some((payload, fresh)) = next.take() {
            match self.clone().handle(payload, fresh, sub, stop).await {
                Ok(newer) => {
                    if newer.is_some() {
                        self.stats.rounds_received.fetch_add(1, Ordering::Relaxed);
                    }
                    next = newer.map(|p| (p, true));
                }
                Err(e) if fresh => tracing::warn!(error = %e, "federated round not completed"),
                Err(e) => tracing::warn!(error = %e, "stored federated round not completed"),
            }
            // The round's weights, model copies and update are dropped by now.
            crate::memory::release();
        }
    }

    /// Admits a round message ([`admit`]), fetches its weights if they travel in chunks,
    /// applies them, trains if ordered. `fresh` is false for the stored message replayed after
    /// a pipeline start (verified again, already admitted). Returns a round message that came
    /// while the weights were fetched, to handle next.
    async fn handle(
        self: Arc<Self>,
        payload: Vec<u8>,
        fresh: bool,
        sub: &mut Subscription,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<Vec<u8>>, RoundError> {
        let session = self
            .d
            .session
            .borrow()
            .as_ref()
            .map(|s| (s.coordinator_key(), s.groups().to_vec()));
        let Some((key, groups)) = session else {
            tracing::info!("federated round message not handled: the device is not enrolled");
            return Ok(None);
        };
        let msg = if fresh {
            match admit(&payload, &self.d.device, &groups, key, &self.d.state)? {
                Ok((m, _)) => m,
                Err(e @ Refusal::Replay { group: true, .. }) => {
                    tracing::debug!(error = %e, "group round message older than the one held");
                    return Ok(None);
                }
                Err(e) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "federated round message rejected");
                    return Ok(None);
                }
            }
        } else {
            // Our own stored newest message: verified again, already admitted.
            match verify(&payload, &self.d.device, &groups, key) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "stored federated round message no longer verifies; waiting for the next one");
                    return Ok(None);
                }
            }
        };
        let h = &msg.header;
        if fresh {
            self.stats.saw(&h.task, h.round, h.version);
            tracing::info!(task = %h.task, round = h.round, version = h.version, selected = h.train.is_some(), done = h.done, "federated round received");
        }
        let Some(setup) = self.d.slot.get() else {
            tracing::info!(task = %h.task, model = %h.model, "no running pipeline trains this model yet; round kept for when one starts");
            return Ok(None);
        };
        if setup.model != h.model {
            tracing::info!(task = %h.task, model = %h.model, pipeline = %setup.pipeline, trains = %setup.model, "round is for a model the running pipeline does not train; kept");
            return Ok(None);
        }
        let msg = match self.fetch(msg, sub, stop).await? {
            fetch::Fetched::Done(msg) => *msg,
            fetch::Fetched::Superseded(newer) => return Ok(Some(newer)),
            fetch::Fetched::Stopped => return Ok(None),
        };
        // The chunks' messages and copies are dropped; what the allocator keeps of them would
        // otherwise add to every later phase of the round.
        if msg.header.blob.is_some() {
            crate::memory::release();
        }
        let work = {
            let me = self.clone();
            let setup = setup.clone();
            tokio::task::spawn_blocking(move || me.work(msg, &setup))
        };
        tokio::select! {
            r = work => r.unwrap_or_else(|e| Err(RoundError::Trainer { module: setup.trainer_name.clone(), kind: FailureKind::Model, reason: format!("training thread panicked: {e}") })).map(|()| None),
            _ = stop.changed() => Ok(None),
        }
    }

    /// Blocking part of a round: apply, train, encode, queue, commit.
    fn work(&self, msg: RoundMessage, setup: &TrainingSetup) -> Result<(), RoundError> {
        let h = &msg.header;
        // A round over frozen layers is checked before anything is applied: neither served
        // nor trained, a head over other features than the task's.
        let split = match &h.frozen {
            Some(_) => match split_layers(&msg, setup) {
                Ok(split) => Some(split),
                Err(e) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(task = %h.task, round = h.round, error = %e, "round refused: the frozen layers differ");
                    if h.train.is_some() && !h.done {
                        self.report_failure(h, &e);
                    }
                    return Err(e);
                }
            },
            None => None,
        };
        self.apply(&msg, setup);
        if h.done {
            self.d.state.finish(&h.task)?;
            tracing::info!(task = %h.task, version = h.version, "federated task finished; final weights applied");
            return Ok(());
        }
        let Some(order) = &h.train else {
            return Ok(());
        };
        if self
            .d
            .state
            .submitted(&h.task)
            .is_some_and(|r| r >= h.round)
        {
            tracing::debug!(task = %h.task, round = h.round, "update for this round already queued");
            return Ok(());
        }
        // The model's previous session and the patched copies are dropped (see above).
        crate::memory::release();
        let header = h.clone();
        let order = order.clone();
        let result = self.train(msg, setup, &order, split);
        if let Err(e) = &result {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(task = %header.task, round = header.round, kind = e.kind().as_str(), error = %e, "local training failed; no update for this round");
            self.report_failure(&header, e);
        }
        result
    }

    /// Tells the coordinator why this device has no update for the round (through the outbox,
    /// sealed like an update), so that `fl status` shows it and a round nobody can train ends.
    fn report_failure(&self, h: &fl::RoundHeader, e: &RoundError) {
        let report = TrainFailure {
            task: h.task.clone(),
            round: h.round,
            base_version: h.version,
            kind: e.kind(),
            reason: e.to_string(),
        };
        let message = NewMessage::binary(
            Class::Model,
            topics::fl_update(&self.d.device),
            fl::FAILURE_KIND,
            &report.encode(),
            Some(Duration::ZERO),
        );
        let outbox = self.d.outbox.clone();
        if let Err(e) = tokio::runtime::Handle::current().block_on(outbox.enqueue(message)) {
            tracing::warn!(task = %h.task, round = h.round, error = %e, "training failure not reported: cannot queue the report");
        }
    }

    /// Patches the global weights into the pipeline's model and swaps it in, unless the
    /// version serving it already carries these (or newer) weights of this task. A failure
    /// is logged; training goes on (it needs only the weights).
    fn apply(&self, msg: &RoundMessage, setup: &TrainingSetup) {
        let h = &msg.header;
        let serving = self
            .d
            .inference
            .model(&setup.model)
            .map(|m| m.version().to_owned());
        {
            let applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((task, version, model_version)) = applied.get(&setup.model)
                && *task == h.task
                && *version >= h.version
                && serving.as_deref() == Some(model_version.as_str())
            {
                return;
            }
        }
        if !self.d.inference.status().available {
            tracing::warn!(model = %setup.model, reason = %self.d.inference.status().reason, "global weights not applied: onnx inference unavailable");
            return;
        }
        // One folder per model: each round's files are renamed over the last ones.
        let folder = self
            .d
            .weights_dir
            .as_ref()
            .map(|dir| dir.join(crate::inference::version_of(setup.model.as_bytes())));
        let patched = match (kept_blob(msg), &folder) {
            // In the kept chunks only: the kept chunks are read straight into the files.
            (Some(blob), Some(folder)) => {
                let specs: Vec<_> = h
                    .params
                    .iter()
                    .map(|p| edge_inference::UpdateSpec {
                        name: &p.name,
                        dtype: edge_inference::DType::F32,
                        shape: &p.shape,
                    })
                    .collect();
                edge_inference::patch_initializers_to_disk_from(
                    &setup.model_bytes,
                    &setup.model_data,
                    &specs,
                    &mut fetch::KeptBytes::new(self.kept(&h.task, h.version, blob), &h.params),
                    folder,
                )
                .map_err(|e| e.to_string())
            }
            _ => {
                let tensors = match kept_blob(msg) {
                    Some(blob) => self.kept_tensors(h, blob).map_err(|e| e.to_string()),
                    None => msg
                        .tensors()
                        .into_iter()
                        .map(|(p, data)| {
                            edge_inference::Tensor::from_f32(p.shape.clone(), data)
                                .map(|t| (p.name.as_str(), t))
                                .map_err(|e| e.to_string())
                        })
                        .collect(),
                };
                tensors.and_then(|t| {
                    match &folder {
                        Some(folder) => edge_inference::patch_initializers_to_disk(
                            &setup.model_bytes,
                            &setup.model_data,
                            &t,
                            folder,
                        ),
                        None => edge_inference::patch_initializers_with_data(
                            &setup.model_bytes,
                            &setup.model_data,
                            &t,
                        ),
                    }
                    .map_err(|e| e.to_string())
                })
            }
        };
        let result = patched.and_then(|(bytes, data)| {
            let model = self
                .d
                .inference
                .prepare(&setup.model, &bytes, &data)
                .map_err(|e| e.to_string())?;
            let version = model.version().to_owned();
            self.d.inference.commit(model);
            Ok(version)
        });
        match result {
            Ok(model_version) => {
                self.stats.applied.fetch_add(1, Ordering::Relaxed);
                self.applied
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        setup.model.clone(),
                        (h.task.clone(), h.version, model_version),
                    );
                tracing::info!(task = %h.task, version = h.version, model = %setup.model, "global weights applied");
            }
            Err(e) => {
                tracing::warn!(task = %h.task, version = h.version, model = %setup.model, error = %e, "global weights not applied; the model keeps serving its previous weights");
            }
        }
    }

    /// The round's tensors read from its kept chunks, each as the bytes of its values (what the
    /// patch writes), checked against the round's digest.
    fn kept_tensors<'m>(
        &self,
        h: &'m fl::RoundHeader,
        blob: &fl::WeightsBlob,
    ) -> Result<Vec<(&'m str, edge_inference::Tensor)>, RoundError> {
        self.kept_each(h, blob, |p, kept| {
            let mut bytes = Vec::with_capacity(p.len() * 4);
            kept.read(p.len() * 4, |piece| bytes.extend_from_slice(piece))?;
            edge_inference::Tensor::new(edge_inference::DType::F32, p.shape.clone(), bytes)
                .map(|t| (p.name.as_str(), t))
                .map_err(|e| RoundError::Fetch(format!("{}: {e}", p.name)))
        })
    }

    /// The round's weights read from its kept chunks, a tensor each, checked against the
    /// round's digest: the trainer's input.
    fn kept_weights(
        &self,
        h: &fl::RoundHeader,
        blob: &fl::WeightsBlob,
    ) -> Result<Vec<NamedWeights>, RoundError> {
        self.kept_each(h, blob, |p, kept| {
            let mut data = Vec::with_capacity(p.len());
            kept.read_values(p.len(), |_, v| data.push(v))?;
            Ok(NamedWeights {
                name: p.name.clone(),
                shape: p.shape.clone(),
                data,
            })
        })
    }

    /// `one` for each of the round's params in order, reading its values from the kept
    /// chunks; nothing is returned unless the whole matches the round's digest.
    fn kept_each<'m, T>(
        &self,
        h: &'m fl::RoundHeader,
        blob: &fl::WeightsBlob,
        mut one: impl FnMut(&'m fl::ParamSpec, &mut fetch::Kept<'_>) -> Result<T, RoundError>,
    ) -> Result<Vec<T>, RoundError> {
        let mut kept = self.kept(&h.task, h.version, blob);
        let out = h
            .params
            .iter()
            .map(|p| one(p, &mut kept))
            .collect::<Result<Vec<T>, RoundError>>()?;
        kept.finish(fl::weight_count(&h.params))?;
        Ok(out)
    }

    fn train(
        &self,
        msg: RoundMessage,
        setup: &TrainingSetup,
        order: &fl::TrainOrder,
        split: Option<Split>,
    ) -> Result<(), RoundError> {
        let started = Instant::now();
        let samples = self
            .d
            .dataset
            .samples(&setup.dataset)
            .map_err(|e| RoundError::Dataset {
                dataset: setup.dataset.clone(),
                reason: e.to_string(),
            })?;
        let mut labeled: Vec<(Vec<f32>, i64)> = samples
            .into_iter()
            .filter_map(|s| s.label.map(|l| (s.features, l)))
            .collect();
        if let Some(max) = order.max_samples {
            let max = max as usize;
            if labeled.len() > max {
                labeled.drain(..labeled.len() - max);
            }
        }
        if labeled.is_empty() {
            return Err(RoundError::NoSamples {
                dataset: setup.dataset.clone(),
            });
        }
        let trainer_err = |reason: String| RoundError::Trainer {
            module: setup.trainer_name.clone(),
            kind: FailureKind::Model,
            reason,
        };
        // The trainer takes (weight [inputs, outputs], bias [outputs]) pairs in layer order;
        // the model may lay them out otherwise (torch's Gemm: [outputs, inputs]; skl2onnx's
        // biases: [1, n]). The layers come from the graph, not from names or positions.
        let model_err = |reason: String| RoundError::Model {
            model: setup.model.clone(),
            reason,
        };
        let Split {
            trained: layers,
            frozen,
        } = match split {
            Some(split) => split,
            None => split_layers(&msg, setup)?,
        };
        // The trainer's input, each tensor read once (from the kept chunks, whole and checked
        // before the trainer sees any, or from the message) and moved into its layout: the
        // trainer's copy is the only one.
        let round_weights = match kept_blob(&msg) {
            Some(blob) => self.kept_weights(&msg.header, blob)?,
            None => msg
                .tensors()
                .into_iter()
                .map(|(p, data)| NamedWeights {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    data: data.to_vec(),
                })
                .collect(),
        };
        if let Some(prefix) = &frozen {
            if let Some((x, _)) = labeled.iter().find(|(x, _)| x.len() != prefix.inputs()) {
                return Err(RoundError::Dataset {
                    dataset: setup.dataset.clone(),
                    reason: format!(
                        "a sample has {} features, the model takes {}",
                        x.len(),
                        prefix.inputs()
                    ),
                });
            }
            for (x, _) in &mut labeled {
                *x = prefix.forward(x);
            }
        }
        let weights: Vec<Param> = dense::into_trainer(&layers, round_weights)
            .map_err(model_err)?
            .into_iter()
            .map(|w| Param {
                name: w.name,
                shape: w.shape,
                data: w.data,
            })
            .collect();
        let params = order.trainer_params();
        let out = self
            .d
            .trainer
            .train(setup, weights, &params, Arc::new(labeled))?;
        let h = &msg.header;
        self.stats.trained.fetch_add(1, Ordering::Relaxed);
        tracing::info!(task = %h.task, round = h.round, samples = out.samples, loss = out.loss, accuracy = out.accuracy, ms = started.elapsed().as_millis() as u64, "round trained; forming the update");
        // The sandbox checked names, shapes and finiteness; back to the model's layout (moved,
        // not copied), then the delta in the header's order.
        let mut trained = dense::from_trainer(
            &layers,
            out.weights
                .into_iter()
                .map(|w| NamedWeights {
                    name: w.name,
                    shape: w.shape,
                    data: w.data,
                })
                .collect(),
        )
        .map_err(trainer_err)?;
        // Each trained tensor less its global weights, in place and in the header's order (the
        // global ones read again from the kept chunks, checked as a whole, or from the
        // message).
        let n = fl::weight_count(&h.params);
        let mut kept = kept_blob(&msg).map(|blob| self.kept(&h.task, h.version, blob));
        let mut locals: Vec<Vec<f32>> = Vec::with_capacity(h.params.len());
        let mut at = 0;
        for p in &h.params {
            let t = trained
                .iter_mut()
                .find(|w| w.name == p.name)
                .ok_or_else(|| trainer_err(format!("returned no tensor {}", p.name)))?;
            let mut local = std::mem::take(&mut t.data);
            if local.len() != p.len() {
                return Err(trainer_err(format!(
                    "returned {} weights for {}, the model has {}",
                    local.len(),
                    p.name,
                    p.len()
                )));
            }
            match &mut kept {
                Some(kept) => kept.read_values(p.len(), |i, g| local[i] -= g)?,
                None => {
                    let global =
                        msg.weights
                            .get(at..at + p.len())
                            .ok_or_else(|| RoundError::Model {
                                model: setup.model.clone(),
                                reason: format!(
                                    "the round carries {} weights, its params {n}",
                                    msg.weights.len()
                                ),
                            })?;
                    local.iter_mut().zip(global).for_each(|(l, g)| *l -= g);
                }
            }
            at += p.len();
            locals.push(local);
        }
        drop(trained);
        if let Some(kept) = kept {
            kept.finish(n)?;
        }
        // The update's body: its header, then the payload. The codecs that encode each value
        // on its own (fp32, fp16) write the deltas straight into it, the others take the delta
        // whole. Either is filled from its end while the deltas are let go from theirs (a
        // zeroed allocation this large is fresh pages, taken only as they are written), so
        // the deltas and what they become are never both whole, also when one tensor is
        // nearly all of the model.
        let mut body = Update {
            task: h.task.clone(),
            round: h.round,
            base_version: h.version,
            samples: out.samples,
            loss: out.loss,
            accuracy: out.accuracy,
            train_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
            payload: Vec::new(),
        }
        .encode();
        let ef = order.codec.uses_error_feedback();
        let mut residual = ef.then(|| self.d.state.residual(&h.task, n));
        match codec::element_wise(order.codec, n) {
            Some(e) => {
                let head = body.len();
                let mut full = vec![0u8; head + e.len()];
                full[..head].copy_from_slice(&body);
                full[head..head + e.at(0)].copy_from_slice(&e.header());
                body = full;
                drain_from_the_end(&mut locals, |start, piece| {
                    let at = head + e.at(start)..head + e.at(start + piece.len());
                    e.write(piece, &mut body[at]);
                });
            }
            None => {
                let mut delta = vec![0.0f32; n];
                drain_from_the_end(&mut locals, |start, piece| {
                    delta[start..start + piece.len()].copy_from_slice(piece);
                });
                codec::encode_into(
                    order.codec,
                    &delta,
                    residual.as_deref_mut(),
                    order.seed,
                    &mut body,
                );
            }
        }
        let topic = topics::fl_update(&self.d.device);
        let binary = |kind: &str, b: &[u8]| {
            NewMessage::binary(Class::Model, topic.clone(), kind, b, Some(Duration::ZERO))
        };
        // Over one message: in parts, queued together (one commit), put together by the
        // coordinator (in any order). The parts are cut from the body's end as the outbox
        // takes them, each made into its message when its turn comes, so the update is not
        // held twice (nor in the small blocks the parts are, which would stay in malloc's
        // arenas until the round's end).
        let bytes = body.len();
        let outbox = self.d.outbox.clone();
        let (queued, parts) = if body.len() <= fl::chunks::PART_BYTES {
            let queued = tokio::runtime::Handle::current()
                .block_on(outbox.enqueue_batch(vec![binary(fl::UPDATE_KIND, &body)]));
            (queued, 1)
        } else {
            let parts = fl::UpdatePart::from_the_end(&h.task, h.round, std::mem::take(&mut body));
            let count = parts.len();
            // Each part's body: the binary envelope, the part's header and at most PART_BYTES.
            let charge = count as u64
                * Outbox::charge(topic.len(), fl::chunks::PART_BYTES + 64 + 2 * h.task.len());
            let messages = parts.map(|p| binary(fl::chunks::PART_KIND, &p.encode()));
            let queued = tokio::runtime::Handle::current()
                .block_on(outbox.enqueue_batch_from(messages, charge));
            (queued, count)
        };
        drop(body);
        let queued = queued
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RoundError::Outbox(e.to_string()))?;
        let queued = queued
            .last()
            .ok_or_else(|| RoundError::Outbox("nothing queued".into()))?;
        self.d
            .state
            .commit_submitted(&h.task, h.round, residual.as_deref())?;
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            task = %h.task, round = h.round, samples = out.samples, loss = out.loss,
            accuracy = out.accuracy, codec = %order.codec, bytes, parts, id = %queued.id,
            ms = started.elapsed().as_millis() as u64, "federated update queued"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use protocol::v1::auth::Identity;
    use protocol::v1::fl::{ParamSpec, RoundHeader, encode_round};

    use super::*;

    fn header(device: &str, round: u32, version: u32, issued_ms: u64) -> RoundHeader {
        RoundHeader {
            task: "digits".into(),
            device: device.into(),
            round,
            version,
            model: "models/digits.onnx".into(),
            params: vec![ParamSpec {
                name: "w".into(),
                shape: vec![2],
            }],
            issued_ms,
            train: None,
            done: false,
            frozen: None,
            blob: None,
        }
    }

    fn round(coord: &Identity, h: &RoundHeader) -> Vec<u8> {
        encode_round(h, &[0.5, -0.5], coord.signing_key()).expect("encodes")
    }

    #[test]
    fn tensors_drained_from_the_end_land_where_they_were_laid() {
        let sizes = [3, 64 * 1024 * 2 + 5, 0, 7];
        let mut tensors: Vec<Vec<f32>> = Vec::new();
        let mut all = Vec::new();
        for n in sizes {
            let t: Vec<f32> = (all.len()..all.len() + n).map(|i| i as f32).collect();
            all.extend_from_slice(&t);
            tensors.push(t);
        }
        let mut out = vec![f32::NAN; all.len()];
        let mut ends = Vec::new();
        super::drain_from_the_end(&mut tensors, |start, piece| {
            out[start..start + piece.len()].copy_from_slice(piece);
            ends.push(start + piece.len());
        });
        assert_eq!(out, all);
        assert!(
            ends.windows(2).all(|w| w[1] < w[0]),
            "from the end: {ends:?}"
        );
        assert!(tensors.iter().all(|t| t.is_empty() && t.capacity() == 0));
    }

    #[test]
    fn rounds_need_the_coordinator_key_this_device_and_a_newer_mark_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let coord = Identity::generate();
        let key = coord.public().verifying_key().expect("key");
        let r3 = round(&coord, &header("pi-1", 3, 2, 100));
        let r2 = round(&coord, &header("pi-1", 2, 1, 50));
        {
            let db = sled::open(dir.path()).expect("open");
            let state = FlState::open(&db, dir.path().join("fl")).expect("state");
            // Signed by someone else (the deploy key, a forger): refused.
            let forged = round(&Identity::generate(), &header("pi-1", 9, 9, 1));
            assert!(matches!(
                admit(&forged, "pi-1", &[], key, &state).expect("state"),
                Err(Refusal::Message(fl::FlError::UnknownKey { .. }))
            ));
            // Another device's message moved to this one's topic: refused.
            let theirs = round(&coord, &header("pi-2", 9, 9, 1));
            assert!(matches!(
                admit(&theirs, "pi-1", &[], key, &state).expect("state"),
                Err(Refusal::OtherDevice(_))
            ));
            let (m, a) = admit(&r3, "pi-1", &[], key, &state)
                .expect("state")
                .expect("admitted");
            assert_eq!((m.header.round, a), (3, Admission::New));
            assert_eq!(state.round("models/digits.onnx"), Some(r3.clone()));
            db.flush().expect("flush");
        }
        // After a restart: an older round is a replay, the held one comes back as `Again`, a
        // re-issue of the same round (later issued_ms) and the next round are new.
        let db = crate::statedb::reopen_for_test(&sled::Config::new().path(dir.path()));
        let state = FlState::open(&db, dir.path().join("fl")).expect("state");
        assert!(matches!(
            admit(&r2, "pi-1", &[], key, &state).expect("state"),
            Err(Refusal::Replay { round: 2, .. })
        ));
        let twin = round(
            &coord,
            &RoundHeader {
                done: true,
                ..header("pi-1", 3, 2, 100)
            },
        );
        assert!(matches!(
            admit(&twin, "pi-1", &[], key, &state).expect("state"),
            Err(Refusal::Replay { .. })
        ));
        assert_eq!(
            admit(&r3, "pi-1", &[], key, &state)
                .expect("state")
                .expect("again")
                .1,
            Admission::Again
        );
        let reissued = round(
            &coord,
            &RoundHeader {
                done: true,
                ..header("pi-1", 3, 2, 101)
            },
        );
        assert_eq!(
            admit(&reissued, "pi-1", &[], key, &state)
                .expect("state")
                .expect("new")
                .1,
            Admission::New
        );
        assert_eq!(state.round("models/digits.onnx"), Some(reissued));
        assert!(matches!(
            admit(&r3, "pi-1", &[], key, &state).expect("state"),
            Err(Refusal::Replay { .. })
        ));
    }

    /// A group's round message is taken by its members (weights only), refused by others and
    /// when it orders training; taken after a member's own newer train order of the same
    /// round it is a quiet replay, and the train order after it is newer.
    #[test]
    fn a_group_message_is_for_its_members_and_orders_no_training() {
        let dir = tempfile::tempdir().expect("tempdir");
        let coord = Identity::generate();
        let key = coord.public().verifying_key().expect("key");
        let db = sled::open(dir.path()).expect("open");
        let state = FlState::open(&db, dir.path().join("fl")).expect("state");
        let lab = vec!["lab".to_owned()];
        let to_group = round(&coord, &header(&topics::group_recipient("lab"), 1, 0, 100));
        assert!(matches!(
            admit(&to_group, "pi-1", &[], key, &state).expect("state"),
            Err(Refusal::OtherDevice(_))
        ));
        assert!(matches!(
            admit(&to_group, "pi-1", &["other".to_owned()], key, &state).expect("state"),
            Err(Refusal::OtherDevice(_))
        ));
        let ordering = round(
            &coord,
            &RoundHeader {
                train: Some(fl::TrainOrder {
                    deadline_ms: 1,
                    epochs: 1,
                    lr: 0.1,
                    batch_size: 1,
                    mu: 0.0,
                    codec: codec::Codec::Fp32,
                    seed: 1,
                    max_samples: None,
                }),
                ..header(&topics::group_recipient("lab"), 1, 0, 100)
            },
        );
        assert!(matches!(
            admit(&ordering, "pi-1", &lab, key, &state).expect("state"),
            Err(Refusal::GroupOrder(g)) if g == "lab"
        ));
        // The member's own train order, a millisecond after the group's message.
        let own = round(&coord, &header("pi-1", 1, 0, 101));
        assert_eq!(
            admit(&own, "pi-1", &lab, key, &state)
                .expect("state")
                .expect("admitted")
                .1,
            Admission::New
        );
        assert!(matches!(
            admit(&to_group, "pi-1", &lab, key, &state).expect("state"),
            Err(Refusal::Replay { group: true, .. })
        ));
        assert!(matches!(
            admit(&own, "pi-1", &lab, key, &state).expect("state"),
            Ok((_, Admission::Again))
        ));
        // The next round's group message is newer.
        let next = round(&coord, &header(&topics::group_recipient("lab"), 2, 1, 200));
        assert_eq!(
            admit(&next, "pi-1", &lab, key, &state)
                .expect("state")
                .expect("admitted")
                .1,
            Admission::New
        );
        assert!(matches!(
            admit(&own, "pi-1", &lab, key, &state).expect("state"),
            Err(Refusal::Replay { group: false, .. })
        ));
    }

    #[test]
    fn telemetry_appears_with_the_first_round_and_counts() {
        let s = FlStats::default();
        assert_eq!(s.telemetry(), None);
        s.rounds_received.fetch_add(2, Ordering::Relaxed);
        s.queued.fetch_add(1, Ordering::Relaxed);
        s.saw("digits", 4, 3);
        let t = s.telemetry().expect("after a round");
        assert_eq!((t.rounds_received, t.queued, t.rejected), (2, 1, 0));
        assert_eq!((t.task.as_str(), t.round, t.version), ("digits", 4, 3));
    }
}
