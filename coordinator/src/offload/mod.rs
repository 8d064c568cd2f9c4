//! The inference service for offloaded requests (issue 7, coordinator side).
//!
//! ```text
//! transport -> service loop: submit (decode; unknown model / expired / queue full answered
//!   at once) -> bounded job queue -> worker threads (own sessions, run) -> answers channel
//!   -> service loop publishes on edge/v1/{device}/offload/response, QoS 0
//! ```
//!
//! Requests arrive through the coordinator's ordinary subscription (the shared filter
//! `$share/edge-offload/edge/v1/+/offload/request`, so replicas split them), and answers go out
//! through its transport. Both are QoS 0 by design: a lost request or answer is a timeout on
//! the device, which then runs the model locally. (Through an external broker the transport
//! publishes at QoS 1; that costs a PUBACK, nothing else.) Answers are published by the service
//! loop between its batches, so a batch's group commit can delay an answer by its fsync.
//!
//! Each worker thread owns one session of every model (`Model` serialises runs on one
//! session), so `workers` requests to the same model run in parallel. Nothing here blocks the
//! service loop: the job queue is `try_send`, the answers channel is bounded and drained by the
//! loop. A garbage payload is counted and ignored (there is no correlation id to answer).
//!
//! Invariant: every decoded request gets at most one answer; no unbounded queue.
//! Boundary: `service` (start, submit, answers, advert, shutdown).

pub mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use edge_inference::{InferenceConfig, Model, Provider, Runtime, RuntimeError, Tensor};
use protocol::v1::offload::{Capacity, Request, Response, Status};
use protocol::v1::tensor::WireTensor;
use protocol::v1::{self, topics};
use tokio::sync::mpsc;

use crate::config::OffloadConfig;
use stats::Stats;

/// Errors that stop `serve` at start-up.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("offload model {name:?} from {path} does not load: {error}")]
    Load {
        name: String,
        path: PathBuf,
        error: String,
    },
    #[error("offload service: cannot start worker thread: {0}")]
    Thread(std::io::Error),
}

/// One accepted request waiting for a worker.
struct Job {
    device: String,
    request: Request,
    received: Instant,
}

/// What the service loop and the workers share.
struct Shared {
    stats: Mutex<Stats>,
    /// Jobs in the queue (not yet taken by a worker).
    waiting: AtomicUsize,
    stop: AtomicBool,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn depth(&self) -> u32 {
        u32::try_from(self.waiting.load(Ordering::Relaxed)).unwrap_or(u32::MAX)
    }
}

/// A running offload service.
pub struct Offload {
    replica: String,
    workers: usize,
    max_queue: usize,
    models: Vec<String>,
    advertise_interval_ms: u64,
    jobs: Option<SyncSender<Job>>,
    answers_tx: mpsc::Sender<(String, Vec<u8>)>,
    answers: mpsc::Receiver<(String, Vec<u8>)>,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offload")
            .field("replica", &self.replica)
            .field("models", &self.models)
            .finish()
    }
}

impl Offload {
    /// Loads every model (one session per worker) and starts the workers. `Ok(None)` when
    /// offload is off, or when the ONNX Runtime library is missing (logged at ERROR: the
    /// capability is stopped, the rest of the coordinator runs). A model file that is missing
    /// or does not load is an error naming it.
    pub async fn start(config: &OffloadConfig) -> Result<Option<Offload>, OffloadError> {
        if !config.enabled {
            return Ok(None);
        }
        let config = config.clone();
        match tokio::task::spawn_blocking(move || Offload::start_blocking(&config)).await {
            Ok(result) => result,
            Err(e) => Err(OffloadError::Thread(std::io::Error::other(e.to_string()))),
        }
    }

    fn start_blocking(config: &OffloadConfig) -> Result<Option<Offload>, OffloadError> {
        let mut files = Vec::with_capacity(config.models.len());
        for (name, path) in &config.models {
            // With its external data files (torch's `m.onnx` + `m.onnx.data`), resolved
            // beside the model file; read once and shared by every worker's session.
            let model = edge_inference::ModelFiles::read(path).map_err(|e| OffloadError::Load {
                name: name.clone(),
                path: path.clone(),
                error: e.to_string(),
            })?;
            files.push((name.clone(), path.clone(), model));
        }
        // Workers provide the parallelism; one intra-op thread each keeps them from fighting
        // over cores.
        let inference = InferenceConfig {
            providers: vec![Provider::Cpu],
            intra_threads: 1,
            ..InferenceConfig::default()
        };
        let runtime = match Runtime::load(&inference) {
            Ok(rt) => rt,
            Err(e @ RuntimeError::Unavailable { .. }) => {
                tracing::error!(error = %e, "offload service disabled: no onnx runtime library");
                return Ok(None);
            }
            Err(e) => {
                tracing::error!(error = %e, "offload service disabled: onnx runtime does not start");
                return Ok(None);
            }
        };
        let mut sessions: Vec<BTreeMap<String, Model>> = Vec::with_capacity(config.workers);
        for _ in 0..config.workers {
            let mut set = BTreeMap::new();
            for (name, path, files) in &files {
                let model =
                    Model::load_with_data(&runtime, name, "offload", &files.graph, &files.data)
                        .map_err(|e| OffloadError::Load {
                            name: name.clone(),
                            path: path.clone(),
                            error: e.to_string(),
                        })?;
                set.insert(name.clone(), model);
            }
            sessions.push(set);
        }
        // Every session holds its own copy of the weights; the bytes read go now.
        drop(files);

        let replica = if config.replica.is_empty() {
            default_replica()
        } else {
            config.replica.clone()
        };
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel::<Job>(config.max_queue);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        // Room for every queued and running job's answer plus refusals made meanwhile; when
        // it is full, workers wait (and the queue fills, and new requests are refused).
        let (answers_tx, answers) = mpsc::channel(config.max_queue + config.workers + 64);
        let shared = Arc::new(Shared {
            stats: Mutex::new(Stats::default()),
            waiting: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let mut threads = Vec::with_capacity(config.workers);
        for (i, models) in sessions.into_iter().enumerate() {
            let rx = Arc::clone(&jobs_rx);
            let tx = answers_tx.clone();
            let shared = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("offload-{i}"))
                .spawn(move || worker(&rx, &tx, &shared, &models))
                .map_err(OffloadError::Thread)?;
            threads.push(handle);
        }
        let models: Vec<String> = config.models.keys().cloned().collect();
        tracing::info!(
            replica = %replica,
            workers = config.workers,
            max_queue = config.max_queue,
            models = %models.join(","),
            library = %runtime.library().display(),
            "offload service ready"
        );
        Ok(Some(Offload {
            replica,
            workers: config.workers,
            max_queue: config.max_queue,
            models,
            advertise_interval_ms: config.advertise_interval_ms,
            jobs: Some(jobs_tx),
            answers_tx,
            answers,
            shared,
            threads,
        }))
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The retained advert's topic.
    pub fn advert_topic(&self) -> String {
        topics::offload_capacity(&self.replica)
    }

    pub fn advertise_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.advertise_interval_ms)
    }

    /// The capacity advert as it is now.
    pub fn advert(&self, now_ms: u64) -> Vec<u8> {
        let ewma = self.shared.stats().ewma_ms().clone();
        Capacity {
            replica: self.replica.clone(),
            workers: u32::try_from(self.workers).unwrap_or(u32::MAX),
            queue_depth: self.shared.depth(),
            max_queue: u32::try_from(self.max_queue).unwrap_or(u32::MAX),
            models: self.models.clone(),
            ewma_compute_ms: ewma,
            ts_ms: now_ms,
        }
        .to_json()
    }

    /// Takes one request payload from `device`. Never blocks: refusals are queued as answers
    /// at once, accepted requests go to the workers.
    pub fn submit(&mut self, device: &str, payload: &[u8], now_ms: u64) {
        let request = match Request::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                self.shared.stats().counters.garbage += 1;
                tracing::debug!(device, error = %e, "offload request ignored");
                return;
            }
        };
        let id = request.correlation_id;
        if request.is_probe() {
            // A device measuring the link: answered at once, with the queue depth.
            self.shared.stats().counters.probes += 1;
            let mut response = Response::failed(id, Status::Ok, "");
            response.queue_depth = self.shared.depth();
            return self.send_answer(device, response);
        }
        self.shared.stats().counters.requests += 1;
        if !self.models.contains(&request.model) {
            let why = format!(
                "model {:?} is not served by replica {}",
                request.model, self.replica
            );
            return self.refuse(device, id, Status::UnknownModel, why);
        }
        if request.expired(now_ms) {
            let why = format!(
                "deadline {} passed on arrival ({now_ms})",
                request.deadline_ms
            );
            return self.refuse(device, id, Status::Expired, why);
        }
        let Some(jobs) = &self.jobs else { return };
        self.shared.waiting.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            device: device.to_owned(),
            request,
            received: Instant::now(),
        };
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
                let why = format!("queue full ({} waiting)", self.max_queue);
                self.refuse(device, id, Status::Overloaded, why);
            }
        }
    }

    fn refuse(&mut self, device: &str, id: u64, status: Status, why: String) {
        tracing::debug!(device, correlation_id = id, status = status.as_str(), reason = %why, "offload request refused");
        let mut response = Response::failed(id, status, why);
        response.queue_depth = self.shared.depth();
        self.shared.stats().answered(status);
        self.send_answer(device, response);
    }

    fn send_answer(&self, device: &str, response: Response) {
        let mut stats = self.shared.stats();
        match response.encode() {
            Ok(bytes) => {
                if self
                    .answers_tx
                    .try_send((topics::offload_response(device), bytes))
                    .is_err()
                {
                    stats.counters.dropped += 1;
                }
            }
            Err(_) => stats.counters.dropped += 1,
        }
    }

    /// The next answer to publish: (topic, payload). Pending forever once shut down.
    pub async fn next_answer(&mut self) -> Option<(String, Vec<u8>)> {
        self.answers.recv().await
    }

    /// The figures the API and `/metrics` show (`crate::api::view`).
    pub fn snapshot(&self) -> crate::api::view::OffloadSnapshot {
        let stats = self.shared.stats();
        let c = stats.counters;
        let percentiles = stats.percentiles_ms();
        crate::api::view::OffloadSnapshot {
            replica: self.replica.clone(),
            workers: self.workers,
            max_queue: self.max_queue,
            queue_depth: self.shared.depth(),
            models: self.models.clone(),
            requests: c.requests,
            ok: c.ok,
            errors: c.errors,
            overloaded: c.overloaded,
            expired: c.expired,
            unknown_model: c.unknown_model,
            garbage: c.garbage,
            probes: c.probes,
            dropped: c.dropped,
            compute_p50_ms: percentiles.map(|p| p.0),
            compute_p99_ms: percentiles.map(|p| p.1),
        }
    }

    /// The periodic INFO line.
    pub fn log_stats(&self) {
        let stats = self.shared.stats();
        let c = stats.counters;
        let (p50, p99) = stats.percentiles_ms().unwrap_or((0.0, 0.0));
        tracing::info!(
            replica = %self.replica,
            requests = c.requests,
            ok = c.ok,
            errors = c.errors,
            overloaded = c.overloaded,
            expired = c.expired,
            unknown_model = c.unknown_model,
            garbage = c.garbage,
            probes = c.probes,
            dropped = c.dropped,
            queue_depth = self.shared.depth(),
            compute_p50_ms = p50,
            compute_p99_ms = p99,
            "offload stats"
        );
    }

    /// Stops the workers (queued jobs are dropped unanswered: the devices time out and run
    /// them locally) and joins them. The caller clears the retained advert.
    pub async fn shutdown(mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        // Workers waiting to hand over an answer see the channel closed.
        self.answers.close();
        while self.answers.try_recv().is_ok() {}
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            threads
                .into_iter()
                .map(std::thread::JoinHandle::join)
                .filter(Result::is_err)
                .count()
        })
        .await;
        if !matches!(joined, Ok(0)) {
            tracing::warn!("an offload worker thread panicked");
        }
        self.log_stats();
    }
}

/// One worker: takes jobs until the queue closes or the service stops.
fn worker(
    jobs: &Mutex<Receiver<Job>>,
    answers: &mpsc::Sender<(String, Vec<u8>)>,
    shared: &Shared,
    models: &BTreeMap<String, Model>,
) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(PoisonError::into_inner);
            rx.recv()
        };
        let Ok(job) = job else { return };
        shared.waiting.fetch_sub(1, Ordering::Relaxed);
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let response = answer(&job, shared, models);
        shared.stats().answered(response.status);
        let bytes = match response.encode() {
            Ok(b) => b,
            // Outputs too large for one message: say so instead.
            Err(e) => {
                let mut failed =
                    Response::failed(job.request.correlation_id, Status::Error, e.to_string());
                failed.queue_ms = response.queue_ms;
                failed.compute_ms = response.compute_ms;
                failed.queue_depth = response.queue_depth;
                let mut stats = shared.stats();
                stats.counters.ok = stats.counters.ok.saturating_sub(1);
                stats.counters.errors += 1;
                match failed.encode() {
                    Ok(b) => b,
                    Err(_) => continue,
                }
            }
        };
        if answers
            .blocking_send((topics::offload_response(&job.device), bytes))
            .is_err()
        {
            return;
        }
    }
}

/// Runs one job (or says why not).
fn answer(job: &Job, shared: &Shared, models: &BTreeMap<String, Model>) -> Response {
    let id = job.request.correlation_id;
    let queue_ms = millis(job.received.elapsed());
    let with_timing = |mut r: Response, compute_ms: u32| {
        r.queue_ms = queue_ms;
        r.compute_ms = compute_ms;
        r.queue_depth = shared.depth();
        r
    };
    let now = v1::now_ms();
    if job.request.expired(now) {
        let why = format!(
            "deadline {} passed before compute ({now})",
            job.request.deadline_ms
        );
        return with_timing(Response::failed(id, Status::Expired, why), 0);
    }
    let Some(model) = models.get(&job.request.model) else {
        let why = format!("model {:?} is not loaded", job.request.model);
        return with_timing(Response::failed(id, Status::UnknownModel, why), 0);
    };
    let inputs = match to_inputs(model, &job.request.inputs) {
        Ok(i) => i,
        Err(why) => return with_timing(Response::failed(id, Status::Error, why.to_string()), 0),
    };
    let started = Instant::now();
    let result = model.run(&inputs);
    let elapsed = started.elapsed();
    shared.stats().computed(
        &job.request.model,
        u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
    );
    let compute_ms = millis(elapsed);
    match result {
        Ok(outputs) => {
            let outputs = model
                .outputs()
                .iter()
                .zip(outputs)
                .map(|(info, t)| t.into_wire(info.name.clone()))
                .collect();
            let mut r = Response::failed(id, Status::Ok, "");
            r.outputs = outputs;
            with_timing(r, compute_ms)
        }
        Err(e) => with_timing(
            Response::failed(id, Status::Error, e.to_string()),
            compute_ms,
        ),
    }
}

/// Why a request's tensors cannot be the model's inputs (the text goes back to the device in
/// the response).
#[derive(Debug, thiserror::Error)]
enum InputError {
    #[error("input {0:?} is missing")]
    Missing(String),
    #[error("model has no input {0:?}")]
    Unknown(String),
    #[error("input {name:?}: {error}")]
    Tensor {
        name: String,
        error: edge_inference::TensorError,
    },
}

/// Wire tensors in the model's input order: by name when every tensor is named, else by
/// position.
fn to_inputs(model: &Model, wire: &[WireTensor]) -> Result<Vec<Tensor>, InputError> {
    let ordered: Vec<&WireTensor> = if wire.iter().all(|t| !t.name.is_empty()) {
        let mut ordered = Vec::with_capacity(wire.len());
        for info in model.inputs() {
            match wire.iter().find(|t| t.name == info.name) {
                Some(t) => ordered.push(t),
                None => return Err(InputError::Missing(info.name.clone())),
            }
        }
        if let Some(extra) = wire
            .iter()
            .find(|t| !model.inputs().iter().any(|i| i.name == t.name))
        {
            return Err(InputError::Unknown(extra.name.clone()));
        }
        ordered
    } else {
        wire.iter().collect()
    };
    ordered
        .into_iter()
        .map(|t| {
            Tensor::try_from(t).map_err(|error| InputError::Tensor {
                name: t.name.clone(),
                error,
            })
        })
        .collect()
}

fn millis(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// `{hostname}-{pid}`, reduced to the characters a topic level may hold.
fn default_replica() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    let host = if host.is_empty() {
        "coordinator".to_owned()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
}
