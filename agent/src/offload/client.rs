//! The agent's offload client: sends an inference stage's frame to the coordinator's
//! inference service when the policy says so, and runs it locally when the policy says so,
//! when the link is down, when the answer is late or refused.
//!
//! ```text
//! stage thread --decide--> local run ----------------------------------------> outputs
//!              \--request (QoS 0, direct uplink path)--> coordinator --response--> router
//!               (timeout / hedge / refusal: local run)                   |
//!                                                                       v
//!                                                        pending[correlation id] -> stage
//! ```
//!
//! This file is the I/O around [`OffloadCore`] (`core.rs`), which decides and keeps the
//! books: here the requests go out on the uplink's direct path, the waits and timers run, the
//! local runs happen, and the router task receives answers and adverts, samples the CPU load
//! and owns the link probe in flight (one at a time, dropped with the router).
//!
//! Requests go out at QoS 0 on the uplink's direct path, not through the outbox: an answer
//! that comes after its deadline is useless, so a request is never stored or sent again.
//!
//! **Invariant:** a frame handed to [`Offloader::run`] always gets an answer or an error from
//! one side: remote failures of any kind end in a local run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use protocol::v1::offload::{Capacity, Request, Response, Status};
use protocol::v1::tensor::WireTensor;
use protocol::v1::{self, OffloadTelemetry, topics};
use tokio::sync::{oneshot, watch};

use super::config::OffloadConfig;
use super::core::{OffloadCore, Outcome, request_bytes};
use super::policy::{Choice, Mode};
use crate::inbox::Subscription;
use crate::inference::InferenceError;
use crate::link::{Direct, DirectSender, LinkWatch};

/// Queue between stages and the uplink's direct path.
pub const DIRECT_CAPACITY: usize = 64;
/// Inbox queue for responses and capacity adverts.
pub const INBOX_CAPACITY: usize = 256;
/// How often the router samples the CPU load and looks whether a link probe is due.
const TICK: Duration = Duration::from_millis(500);

/// Outputs of one model run, named.
pub type Outputs = Vec<(String, edge_inference::Tensor)>;

/// Why a frame got no outputs. Remote failures end in a local run, so most of these are the
/// local run's; the rest name what was wrong with the coordinator's answer.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    /// The run on the device failed.
    #[error(transparent)]
    Local(#[from] InferenceError),
    /// The hedged local run panicked or was cancelled.
    #[error("local run failed: {0}")]
    LocalTask(#[from] tokio::task::JoinError),
    #[error("offload answer: output {name:?}: {source}")]
    AnswerTensor {
        name: String,
        source: edge_inference::TensorError,
    },
    #[error("offload refused and no local run")]
    Refused,
    #[error("offload timed out")]
    TimedOut,
    #[error("offload request dropped")]
    Dropped,
}

/// What the local run of a frame returns.
pub type LocalResult = Result<Outputs, InferenceError>;

/// An answer and when it arrived.
type Answer = (Response, Instant);

struct Inner {
    cfg: OffloadConfig,
    device: String,
    link: LinkWatch,
    tx: DirectSender,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    core: Mutex<OffloadCore>,
}

/// Cheap to clone; shared by every inference stage that may offload.
#[derive(Clone)]
pub struct Offloader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Offloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offloader")
            .field("mode", &self.inner.cfg.mode)
            .finish_non_exhaustive()
    }
}

/// Runs `f` and says how long it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

/// How an offloaded frame ended.
enum Waited {
    Answer(Response, Instant),
    /// The hedged local run finished first (its result and how long it ran).
    HedgeWon((Result<Outputs, OffloadError>, Duration)),
    Timeout,
    /// The request was dropped before an answer could come (uplink gone).
    Dropped,
}

/// The link probe in flight; the router task owns it.
struct Probe {
    id: u64,
    /// Size of the probe request.
    bytes: u64,
    sent: Instant,
    deadline: tokio::time::Instant,
    rx: oneshot::Receiver<Answer>,
}

/// The probe's answer, or `None` once its deadline passed (or its waiter was dropped).
async fn probe_answer(probe: &mut Option<Probe>) -> Option<Answer> {
    let p = probe.as_mut()?;
    tokio::time::timeout_at(p.deadline, &mut p.rx)
        .await
        .ok()?
        .ok()
}

impl Offloader {
    /// `link`: whether the uplink is connected; `tx`: the uplink's direct path.
    pub fn new(cfg: OffloadConfig, device: String, link: LinkWatch, tx: DirectSender) -> Offloader {
        Offloader {
            inner: Arc::new(Inner {
                core: Mutex::new(OffloadCore::new(cfg.clone())),
                cfg,
                device,
                link,
                tx,
                // Random start so answers to a previous run of the agent never match.
                next_id: AtomicU64::new(rand::random::<u64>() >> 1),
                pending: Mutex::default(),
            }),
        }
    }

    pub fn mode(&self) -> Mode {
        self.inner.cfg.mode
    }

    /// The inbox filters [`Offloader::route`] needs.
    pub fn filters(device: &str) -> Vec<String> {
        vec![
            topics::offload_response(device),
            topics::OFFLOAD_CAPACITY_FILTER.to_owned(),
        ]
    }

    fn core(&self) -> MutexGuard<'_, OffloadCore> {
        self.inner
            .core
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<u64, oneshot::Sender<Answer>>> {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn connected(&self) -> bool {
        self.inner.link.borrow().connected
    }

    /// Routes responses to their waiting frames and records capacity adverts, until
    /// `shutdown`; also samples the CPU load the policy sees and sends the link probes.
    pub async fn route(self, mut sub: Subscription, mut shutdown: watch::Receiver<bool>) {
        let mut cpu = CpuGauge::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let response_topic = topics::offload_response(&self.inner.device);
        // Owned here and not by a task of its own, so no probe outlives the router.
        let mut probe: Option<Probe> = None;
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {
                    let load = cpu.sample();
                    self.core().set_cpu_load(f64::from(load));
                    if probe.is_none() {
                        probe = self.start_probe();
                    }
                }
                answer = probe_answer(&mut probe), if probe.is_some() => {
                    if let Some(p) = probe.take() {
                        self.probe_done(p, answer);
                    }
                }
                msg = sub.rx.recv() => {
                    let Some(msg) = msg else { break };
                    if msg.topic == response_topic {
                        self.on_response(&msg.payload);
                    } else {
                        self.on_advert(&msg.topic, &msg.payload, msg.retain);
                    }
                }
            }
        }
        if let Some(p) = probe {
            self.pending().remove(&p.id);
        }
    }

    /// Sends a link probe when the core says one is due (see [`OffloadCore::probe_due`]).
    fn start_probe(&self) -> Option<Probe> {
        let (connected, now) = (self.connected(), Instant::now());
        let pad = self.core().probe_due(connected, now)?;
        let cfg = &self.inner.cfg;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let payload = Request::probe(id, v1::now_ms() + cfg.timeout_ms, pad)
            .encode()
            .ok()?;
        let bytes = payload.len() as u64;
        let rx = self.send(id, payload, now + timeout)?;
        self.core().probe_sent(now);
        Some(Probe {
            id,
            bytes,
            sent: now,
            deadline: tokio::time::Instant::from_std(now + timeout),
            rx,
        })
    }

    fn probe_done(&self, p: Probe, answer: Option<Answer>) {
        self.pending().remove(&p.id);
        let mut core = self.core();
        match answer {
            Some((r, at)) => core.probe_answered(p.bytes, p.sent, at, r.queue_ms),
            None => core.probe_lost(Instant::now()),
        }
    }

    /// Registers `id` as waiting and hands the request to the uplink's direct path; `None`
    /// when the path is full or gone.
    fn send(
        &self,
        id: u64,
        payload: Vec<u8>,
        expires: Instant,
    ) -> Option<oneshot::Receiver<Answer>> {
        let (tx, rx) = oneshot::channel();
        self.pending().insert(id, tx);
        let direct = Direct {
            topic: topics::offload_request(&self.inner.device),
            payload,
            expires,
        };
        if self.inner.tx.try_send(direct).is_err() {
            self.pending().remove(&id);
            return None;
        }
        Some(rx)
    }

    fn on_response(&self, payload: &[u8]) {
        let at = Instant::now();
        let r = match Response::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(size = payload.len(), error = %e, "dropping malformed offload response");
                return;
            }
        };
        let waiter = self.pending().remove(&r.correlation_id);
        let delivered = waiter.is_some_and(|tx| tx.send((r, at)).is_ok());
        if !delivered {
            self.core().late_answer();
        }
    }

    fn on_advert(&self, topic: &str, payload: &[u8], retained: bool) {
        let Some(replica) = topic.rsplit('/').next().filter(|r| !r.is_empty()) else {
            return;
        };
        if payload.is_empty() {
            // A replica cleared its retained advert on shutdown.
            self.core().advert_cleared(replica);
            return;
        }
        match Capacity::from_json(payload) {
            Ok(capacity) => {
                self.core()
                    .advert(replica, capacity, retained, Instant::now(), v1::now_ms());
            }
            Err(e) => tracing::warn!(topic, error = %e, "dropping malformed capacity advert"),
        }
    }

    /// Runs one model call for `model` (the coordinator's name) with `input`, here or there.
    /// `local` runs it on the device; it may run on a blocking thread when hedging. Blocking:
    /// call from a stage thread, with `rt` the agent's runtime.
    pub fn run<F>(
        &self,
        rt: &tokio::runtime::Handle,
        model: &str,
        input: edge_inference::Tensor,
        local_queue: u32,
        local: F,
    ) -> Result<Outputs, OffloadError>
    where
        F: FnOnce(edge_inference::Tensor) -> LocalResult + Send + 'static,
    {
        let payload_bytes = request_bytes(input.data().len());
        let (connected, start) = (self.connected(), Instant::now());
        let decision = self
            .core()
            .decide(model, payload_bytes, local_queue, connected, start);
        let result = match decision.choice {
            Choice::Local => self.local_measured(model, timed(move || Ok(local(input)?))),
            Choice::Offload => {
                let wire = WireTensor::from(&input);
                self.offload(rt, model, wire, payload_bytes, start, move || {
                    Ok(local(input)?)
                })
            }
        };
        if result.is_ok() {
            self.core().finished(model, &decision, start.elapsed());
        }
        result
    }

    fn offload<F>(
        &self,
        rt: &tokio::runtime::Handle,
        model: &str,
        wire: WireTensor,
        payload_bytes: u64,
        start: Instant,
        local: F,
    ) -> Result<Outputs, OffloadError>
    where
        F: FnOnce() -> Result<Outputs, OffloadError> + Send + 'static,
    {
        let cfg = &self.inner.cfg;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        // Every fallback is a real run on this device and feeds the local estimate.
        let pending = self.pending().len();
        if self.core().admit(pending, payload_bytes).is_err() {
            return self.local_measured(model, timed(local));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let request = Request {
            correlation_id: id,
            deadline_ms: v1::now_ms() + cfg.timeout_ms,
            model: model.to_owned(),
            inputs: vec![wire],
        };
        let sent = match request.encode() {
            Ok(payload) => self.send(id, payload, start + timeout),
            Err(e) => {
                tracing::debug!(model, error = %e, "offload request cannot be encoded");
                None
            }
        };
        let Some(mut rx) = sent else {
            let _ = self
                .core()
                .remote_outcome(model, payload_bytes, start, Outcome::NotSent);
            return self.local_measured(model, timed(local));
        };
        let hedge = (cfg.hedge_ms > 0).then(|| Duration::from_millis(cfg.hedge_ms));
        let waited = rt.block_on(async {
            let first = hedge.unwrap_or(timeout);
            match tokio::time::timeout(first, &mut rx).await {
                Ok(Ok((r, at))) => return (Waited::Answer(r, at), Some(local)),
                Ok(Err(_)) => return (Waited::Dropped, Some(local)),
                Err(_) if hedge.is_none() => return (Waited::Timeout, Some(local)),
                Err(_) => {}
            }
            // Hedge: run locally as well; the first to finish wins.
            let mut handle = tokio::task::spawn_blocking(move || timed(local));
            let rest = timeout.saturating_sub(start.elapsed());
            let joined = |l: Result<_, tokio::task::JoinError>| {
                l.unwrap_or_else(|e| (Err(OffloadError::LocalTask(e)), Duration::ZERO))
            };
            tokio::select! {
                r = tokio::time::timeout(rest, &mut rx) => match r {
                    Ok(Ok((r, at))) if r.status == Status::Ok => (Waited::Answer(r, at), None),
                    // No usable answer: the local run decides.
                    _ => (Waited::HedgeWon(joined((&mut handle).await)), None),
                },
                l = &mut handle => (Waited::HedgeWon(joined(l)), None),
            }
        });
        self.pending().remove(&id);
        let settle = |outcome| {
            // Counted by the core; every outcome here but an `ok` answer is a fallback.
            self.core()
                .remote_outcome(model, payload_bytes, start, outcome)
        };
        match waited {
            (Waited::Answer(r, at), local) => {
                let answered = settle(Outcome::Answer {
                    at,
                    status: r.status,
                    queue_ms: r.queue_ms,
                    compute_ms: r.compute_ms,
                    queue_depth: r.queue_depth,
                });
                if answered.is_ok() {
                    return r.outputs.into_iter().map(from_wire).collect();
                }
                tracing::debug!(model, status = r.status.as_str(), error = %r.error, "offload refused; running locally");
                self.fallback(model, local, OffloadError::Refused)
            }
            (Waited::HedgeWon(ran), _) => {
                let _ = settle(Outcome::HedgeWon);
                self.local_measured(model, ran)
            }
            (Waited::Timeout, local) => {
                let _ = settle(Outcome::Timeout { at: Instant::now() });
                self.fallback(model, local, OffloadError::TimedOut)
            }
            (Waited::Dropped, local) => {
                let _ = settle(Outcome::NotSent);
                self.fallback(model, local, OffloadError::Dropped)
            }
        }
    }

    /// The local run after a remote failure; `missing` when it already ran as the hedge.
    fn fallback<F>(
        &self,
        model: &str,
        local: Option<F>,
        missing: OffloadError,
    ) -> Result<Outputs, OffloadError>
    where
        F: FnOnce() -> Result<Outputs, OffloadError>,
    {
        match local {
            Some(local) => self.local_measured(model, timed(local)),
            None => Err(missing),
        }
    }

    /// Records a finished local run of `model` (chosen or fallback) in the local estimate.
    fn local_measured(
        &self,
        model: &str,
        (result, took): (Result<Outputs, OffloadError>, Duration),
    ) -> Result<Outputs, OffloadError> {
        if result.is_ok() {
            self.core().local_ran(model, took, Instant::now());
        }
        result
    }

    /// Decision and fallback counters, the link and per-model latencies.
    pub fn telemetry(&self) -> OffloadTelemetry {
        self.core().telemetry()
    }
}

/// An output of the coordinator's answer, checked like every local tensor.
fn from_wire(t: WireTensor) -> Result<(String, edge_inference::Tensor), OffloadError> {
    let name = t.name.clone();
    match edge_inference::Tensor::try_from(t) {
        Ok(tensor) => Ok((name, tensor)),
        Err(source) => Err(OffloadError::AnswerTensor { name, source }),
    }
}

/// Load of the CPUs this process may run on (its affinity mask), 0..1, since the last sample.
struct CpuGauge {
    sys: sysinfo::System,
    cpus: Vec<usize>,
}

impl CpuGauge {
    fn new() -> CpuGauge {
        let sys = sysinfo::System::new_with_specifics(
            sysinfo::RefreshKind::nothing()
                .with_cpu(sysinfo::CpuRefreshKind::nothing().with_cpu_usage()),
        );
        CpuGauge {
            sys,
            cpus: allowed_cpus(),
        }
    }

    fn sample(&mut self) -> f32 {
        self.sys.refresh_cpu_usage();
        let all = self.sys.cpus();
        let used: Vec<f32> = if self.cpus.is_empty() {
            all.iter().map(sysinfo::Cpu::cpu_usage).collect()
        } else {
            self.cpus
                .iter()
                .filter_map(|&i| all.get(i).map(sysinfo::Cpu::cpu_usage))
                .collect()
        };
        if used.is_empty() {
            return 0.0;
        }
        (used.iter().sum::<f32>() / used.len() as f32 / 100.0).clamp(0.0, 1.0)
    }
}

/// CPU numbers in this process's affinity mask (`Cpus_allowed_list` of /proc/self/status,
/// e.g. `0-3,6`); empty if unknown.
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(list) = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
    else {
        return Vec::new();
    };
    parse_cpu_list(list.trim())
}

fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        match (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
            (Ok(a), Ok(b)) if a <= b && b < 4096 => cpus.extend(a..=b),
            _ => return Vec::new(),
        }
    }
    cpus
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_inference::Tensor;
    use std::collections::BTreeMap;

    /// An offloader that is online, with a "coordinator" thread answering each request as
    /// `answer` says (None: never answers).
    fn online(
        cfg: OffloadConfig,
        answer: impl Fn(&Request) -> Option<Response> + Send + 'static,
    ) -> (tokio::runtime::Runtime, Offloader) {
        let (rt, off, _link) = online_link(cfg, answer);
        (rt, off)
    }

    /// [`online`], with the link-state sender to take the link down.
    fn online_link(
        cfg: OffloadConfig,
        answer: impl Fn(&Request) -> Option<Response> + Send + 'static,
    ) -> (tokio::runtime::Runtime, Offloader, crate::link::LinkSender) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (link_tx, link) = crate::link::link_state();
        link_tx.send_modify(|l| l.connected = true);
        let (tx, mut rx) = crate::link::direct_path(DIRECT_CAPACITY);
        let off = Offloader::new(cfg, "d1".into(), link, tx);
        let advert = Capacity {
            replica: "r1".into(),
            workers: 2,
            queue_depth: 0,
            max_queue: 64,
            models: vec!["m".into()],
            ewma_compute_ms: BTreeMap::from([("m".to_owned(), 1.0)]),
            ts_ms: v1::now_ms(),
        };
        off.on_advert(&topics::offload_capacity("r1"), &advert.to_json(), false);
        let router = off.clone();
        rt.spawn(async move {
            while let Some(d) = rx.recv().await {
                assert_eq!(d.topic, topics::offload_request("d1"));
                let req = Request::decode(&d.payload).expect("request decodes");
                if let Some(r) = answer(&req) {
                    router.on_response(&r.encode().expect("encodes"));
                }
            }
        });
        (rt, off, link_tx)
    }

    fn doubled(req: &Request) -> Option<Response> {
        let x = req.inputs[0].to_f32().expect("f32");
        let y: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
        let mut r = Response::failed(req.correlation_id, Status::Ok, "");
        r.outputs = vec![WireTensor::from_f32("y", req.inputs[0].shape.clone(), &y)];
        Some(r)
    }

    fn local_plus_one(t: Tensor) -> LocalResult {
        let y: Vec<f32> = t.to_f32().expect("f32").iter().map(|v| v + 1.0).collect();
        Ok(vec![(
            "y".into(),
            Tensor::from_f32(t.shape().to_vec(), &y).expect("tensor"),
        )])
    }

    fn run_once(rt: &tokio::runtime::Runtime, off: &Offloader) -> f32 {
        let x = Tensor::from_f32(vec![1, 2], &[1.0, 2.0]).expect("tensor");
        let out = off
            .run(rt.handle(), "m", x, 0, local_plus_one)
            .expect("an answer from one side");
        out[0].1.to_f32().expect("f32")[0]
    }

    fn cfg(mode: Mode) -> OffloadConfig {
        OffloadConfig {
            mode,
            timeout_ms: 300,
            ..OffloadConfig::default()
        }
    }

    #[test]
    fn offload_mode_gets_the_coordinators_answer_and_measures_the_link() {
        let (rt, off) = online(cfg(Mode::Offload), doubled);
        assert_eq!(run_once(&rt, &off), 2.0, "remote doubles");
        assert_eq!(run_once(&rt, &off), 2.0);
        let t = off.telemetry();
        assert_eq!(t.decisions.get("offload/fixed"), Some(&2));
        assert_eq!(t.remote_ok, 2);
        assert!(t.fallbacks.is_empty(), "{:?}", t.fallbacks);
        assert!(t.models[0].remote_ms.is_some());
    }

    #[test]
    fn silence_refusals_and_offline_end_in_a_local_run_counted_by_cause() {
        let (rt, off) = online(cfg(Mode::Offload), |_| None);
        assert_eq!(run_once(&rt, &off), 2.0, "local adds one");
        let t = off.telemetry();
        assert_eq!(t.fallbacks.get("timeout"), Some(&1));
        // The fallback ran on the device, so it measured the local side.
        assert!(t.models[0].local_ms.is_some(), "{:?}", t.models);

        let (rt, off) = online(cfg(Mode::Offload), |req| {
            Some(Response::failed(
                req.correlation_id,
                Status::Overloaded,
                "queue full",
            ))
        });
        assert_eq!(run_once(&rt, &off), 2.0);
        assert_eq!(off.telemetry().fallbacks.get("overloaded"), Some(&1));

        let (rt, off, link) = online_link(cfg(Mode::Offload), doubled);
        link.send_modify(|l| l.connected = false);
        assert_eq!(run_once(&rt, &off), 2.0);
        assert_eq!(off.telemetry().decisions.get("local/offline"), Some(&1));
    }

    #[test]
    fn no_fresh_advert_for_the_model_means_local() {
        let (rt, off) = online(cfg(Mode::Offload), doubled);
        // The replica cleared its advert (shut down).
        off.on_advert(&topics::offload_capacity("r1"), b"", true);
        assert_eq!(run_once(&rt, &off), 2.0);
        assert_eq!(off.telemetry().decisions.get("local/offline"), Some(&1));
        // A retained advert from a coordinator that died an hour ago does not count either.
        let stale = Capacity {
            replica: "r1".into(),
            workers: 2,
            queue_depth: 0,
            max_queue: 64,
            models: vec!["m".into()],
            ewma_compute_ms: BTreeMap::new(),
            ts_ms: v1::now_ms() - 3_600_000,
        };
        off.on_advert(&topics::offload_capacity("r1"), &stale.to_json(), true);
        assert_eq!(run_once(&rt, &off), 2.0);
        assert_eq!(off.telemetry().decisions.get("local/offline"), Some(&2));
    }

    #[test]
    fn a_hedged_request_takes_the_local_answer_when_the_remote_is_slow() {
        let mut c = cfg(Mode::Offload);
        c.hedge_ms = 20;
        c.timeout_ms = 2_000;
        let (rt, off) = online(c, |_| None);
        assert_eq!(run_once(&rt, &off), 2.0);
        // Counted as a hedge win, not as a timeout: the local run did not wait for it.
        assert_eq!(off.telemetry().fallbacks.get("hedge"), Some(&1));
        assert_eq!(off.telemetry().fallbacks.get("timeout"), None);
        assert!(off.telemetry().models[0].local_ms.is_some());
    }

    #[test]
    fn answers_nobody_waits_for_are_counted_and_garbage_is_ignored() {
        let (rt, off) = online(cfg(Mode::Offload), doubled);
        let stray = Response::failed(42, Status::Ok, "");
        off.on_response(&stray.encode().expect("encodes"));
        off.on_response(b"garbage");
        off.on_advert(&topics::offload_capacity("r2"), b"{not json", false);
        assert_eq!(off.telemetry().late_answers, 1);
        assert_eq!(run_once(&rt, &off), 2.0);
    }

    #[test]
    fn the_router_sends_link_probes_and_ends_with_its_probe_on_shutdown() {
        let mut c = cfg(Mode::Cost);
        c.probe_interval_ms = 100;
        let (rt, off) = online(c, |req| {
            req.is_probe()
                .then(|| Response::failed(req.correlation_id, Status::Ok, ""))
        });
        // A model to probe for: one frame decided by cost.
        run_once(&rt, &off);
        let inbox = crate::inbox::Inbox::default();
        let sub = inbox.subscribe_all(&Offloader::filters("d1"), INBOX_CAPACITY);
        let (stop, stopped) = watch::channel(false);
        let router = rt.spawn(off.clone().route(sub, stopped));
        let deadline = Instant::now() + Duration::from_secs(10);
        while off.telemetry().probes < 2 {
            assert!(
                Instant::now() < deadline,
                "no probes: {:?}",
                off.telemetry()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.send(true).expect("router listens");
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), router).await })
            .expect("the router ends on shutdown")
            .expect("the router did not panic");
        assert!(off.pending().is_empty(), "a probe outlived its router");
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,6"), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("1"), vec![1]);
        assert!(parse_cpu_list("x").is_empty());
        assert!(!allowed_cpus().is_empty());
    }
}
