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
//! Requests go out at QoS 0 on the uplink's direct path, not through the outbox: an answer
//! that comes after its deadline is useless, so a request is never stored or sent again.
//! Every decision and every fallback is counted by reason for telemetry.
//!
//! **Invariant:** a frame handed to [`Offloader::run`] always gets an answer or an error from
//! one side: remote failures of any kind end in a local run.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use protocol::v1::offload::{Capacity, Request, Response, Status, WireTensor};
use protocol::v1::{self, OffloadModelTelemetry, OffloadTelemetry, topics};
use tokio::sync::{oneshot, watch};

use super::config::OffloadConfig;
use super::estimate::{Context, Knowledge};
use super::policy::{Choice, Estimates, Mode, Policy};
use crate::inbox::Subscription;
use crate::inference::InferenceError;
use crate::link::{Direct, DirectSender, LinkWatch};

/// Queue between stages and the uplink's direct path.
pub const DIRECT_CAPACITY: usize = 64;
/// Inbox queue for responses and capacity adverts.
pub const INBOX_CAPACITY: usize = 256;
/// Bytes a request adds to its tensors (magic, ids, names, shapes), roughly.
const REQUEST_OVERHEAD: u64 = 64;
/// Largest padding of a link probe, bytes.
const MAX_PROBE_PAD: u64 = 64 * 1024;

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
    LocalTask(String),
    #[error("offload answer: output {name:?} has unsupported dtype {dtype}")]
    AnswerDtype { name: String, dtype: u8 },
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

/// Per offloadable model (the coordinator's name for it): its policy, and the queue depth of
/// the last answer with when it came.
#[derive(Debug)]
struct ModelState {
    policy: Policy,
    remote_queue: Option<(u32, Instant)>,
    /// When the model last ran here (the local estimate's age).
    local_at: Option<Instant>,
}

#[derive(Debug)]
struct Advert {
    capacity: Capacity,
    received: Instant,
}

#[derive(Debug, Default)]
struct Counters {
    decisions: BTreeMap<String, u64>,
    fallbacks: BTreeMap<String, u64>,
    remote_ok: u64,
    late_answers: u64,
    probes: u64,
}

#[derive(Debug)]
struct State {
    knowledge: Knowledge,
    adverts: BTreeMap<String, Advert>,
    models: BTreeMap<String, ModelState>,
    counters: Counters,
    /// When the link was last measured (answer, probe or timeout).
    last_measured: Option<Instant>,
    /// Size of the last offload request, bytes.
    last_request_bytes: u64,
}

struct Inner {
    cfg: OffloadConfig,
    device: String,
    link: LinkWatch,
    tx: DirectSender,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<(Response, Instant)>>>,
    state: Mutex<State>,
    /// Load of the CPUs this process may run on, 0..1, as f32 bits.
    cpu_load: AtomicU32,
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

impl Offloader {
    /// `link`: whether the uplink is connected; `tx`: the uplink's direct path.
    pub fn new(cfg: OffloadConfig, device: String, link: LinkWatch, tx: DirectSender) -> Offloader {
        Offloader {
            inner: Arc::new(Inner {
                cfg,
                device,
                link,
                tx,
                // Random start so answers to a previous run of the agent never match.
                next_id: AtomicU64::new(rand::random::<u64>() >> 1),
                pending: Mutex::default(),
                state: Mutex::new(State {
                    knowledge: Knowledge::default(),
                    adverts: BTreeMap::new(),
                    models: BTreeMap::new(),
                    counters: Counters::default(),
                    last_measured: None,
                    last_request_bytes: 0,
                }),
                cpu_load: AtomicU32::new(0),
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

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn pending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<(Response, Instant)>>> {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Routes responses to their waiting frames and records capacity adverts, until
    /// `shutdown`; also samples the CPU load the policy sees.
    pub async fn route(self, mut sub: Subscription, mut shutdown: watch::Receiver<bool>) {
        let mut cpu = CpuGauge::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let response_topic = topics::offload_response(&self.inner.device);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    let load = cpu.sample();
                    self.inner.cpu_load.store(load.to_bits(), Ordering::Relaxed);
                    self.maybe_probe();
                }
                msg = sub.rx.recv() => {
                    let Some(msg) = msg else { return };
                    if msg.topic == response_topic {
                        self.on_response(&msg.payload);
                    } else {
                        self.on_advert(&msg.topic, &msg.payload, msg.retain);
                    }
                }
            }
        }
    }

    /// Measures the link with a probe when nothing else did for `probe_interval_ms`: a
    /// policy that chose local because the link was bad would otherwise never see it
    /// recover.
    fn maybe_probe(&self) {
        let cfg = &self.inner.cfg;
        if cfg.probe_interval_ms == 0
            || !matches!(cfg.mode, Mode::Cost | Mode::Adaptive)
            || !self.inner.link.borrow().connected
        {
            return;
        }
        let now = Instant::now();
        let pad = {
            let st = self.state();
            let max_age = Duration::from_millis(cfg.advert_max_age_ms);
            let interval = st.knowledge.probe_interval_ms(cfg.probe_interval_ms as f64);
            let due = st
                .last_measured
                .is_none_or(|at| ms(now.duration_since(at)) >= interval);
            let coordinator = st
                .adverts
                .values()
                .any(|a| now.duration_since(a.received) <= max_age);
            if !due || !coordinator || st.models.is_empty() {
                return;
            }
            // Every other probe is the size of the last request, so the link model sees
            // both sizes at the same time and can tell round trip from throughput.
            if st.counters.probes % 2 == 1 {
                st.last_request_bytes
                    .saturating_sub(REQUEST_OVERHEAD)
                    .min(MAX_PROBE_PAD) as usize
            } else {
                0
            }
        };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let Ok(payload) = Request::probe(id, v1::now_ms() + cfg.timeout_ms, pad).encode() else {
            return;
        };
        let bytes = payload.len() as u64;
        let Some(rx) = self.send(id, payload, now + timeout) else {
            return;
        };
        // Marked now so that one probe at a time is in flight.
        self.state().last_measured = Some(now);
        let this = self.clone();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(timeout, rx).await;
            this.pending().remove(&id);
            let mut st = this.state();
            match answer {
                Ok(Ok((r, at))) => {
                    st.knowledge.observe_probe(
                        bytes,
                        ms(at.duration_since(now)),
                        f64::from(r.queue_ms),
                    );
                    st.last_measured = Some(at);
                }
                _ => {
                    st.knowledge.observe_timeout(ms(timeout));
                    st.last_measured = Some(Instant::now());
                }
            }
            st.counters.probes += 1;
        });
    }

    /// Registers `id` as waiting and hands the request to the uplink's direct path; `None`
    /// when the path is full or gone.
    fn send(
        &self,
        id: u64,
        payload: Vec<u8>,
        expires: Instant,
    ) -> Option<oneshot::Receiver<(Response, Instant)>> {
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
        match waiter {
            Some(tx) => {
                if tx.send((r, at)).is_err() {
                    self.state().counters.late_answers += 1;
                }
            }
            None => self.state().counters.late_answers += 1,
        }
    }

    fn on_advert(&self, topic: &str, payload: &[u8], retained: bool) {
        let Some(replica) = topic.rsplit('/').next().filter(|r| !r.is_empty()) else {
            return;
        };
        let mut st = self.state();
        if payload.is_empty() {
            // A replica cleared its retained advert on shutdown.
            st.adverts.remove(replica);
            return;
        }
        let capacity = match Capacity::from_json(payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(topic, error = %e, "dropping malformed capacity advert");
                return;
            }
        };
        // A retained advert may be the last word of a coordinator that died long ago: it
        // counts only if its own timestamp is recent (live ones count from their arrival).
        let max_age = self.inner.cfg.advert_max_age_ms;
        let received = if retained {
            let age = v1::now_ms().saturating_sub(capacity.ts_ms);
            if age > max_age {
                return;
            }
            Instant::now()
                .checked_sub(Duration::from_millis(age))
                .unwrap_or_else(Instant::now)
        } else {
            Instant::now()
        };
        st.adverts
            .insert(replica.to_owned(), Advert { capacity, received });
    }

    /// What the policy sees for `model` now.
    fn estimates(
        &self,
        st: &mut State,
        model: &str,
        payload_bytes: u64,
        local_queue: u32,
    ) -> Estimates {
        let now = Instant::now();
        let max_age = Duration::from_millis(self.inner.cfg.advert_max_age_ms);
        let mut c = Context {
            payload_bytes,
            local_queue,
            cpu_load: f64::from(f32::from_bits(self.inner.cpu_load.load(Ordering::Relaxed))),
            ..Context::default()
        };
        for a in st.adverts.values() {
            if now.duration_since(a.received) > max_age
                || !a.capacity.models.iter().any(|m| m == model)
            {
                continue;
            }
            c.remote_workers += a.capacity.workers;
            c.remote_queue += a.capacity.queue_depth;
            if let Some(&ms) = a.capacity.ewma_compute_ms.get(model) {
                c.advert_compute_ms = Some(c.advert_compute_ms.map_or(ms, |m: f64| m.min(ms)));
            }
        }
        c.online = self.inner.link.borrow().connected && c.remote_workers > 0;
        let m = st
            .models
            .entry(model.to_owned())
            .or_insert_with(|| ModelState {
                policy: Policy::new(self.inner.cfg.policy()),
                remote_queue: None,
                local_at: None,
            });
        c.local_age_ms = m
            .local_at
            .map_or(f64::INFINITY, |at| ms(now.duration_since(at)));
        // The freshest queue depth: an answer newer than the advert interval wins.
        if let Some((q, at)) = m.remote_queue
            && now.duration_since(at) < Duration::from_secs(1)
        {
            c.remote_queue = q;
        }
        st.knowledge.estimates(model, &c)
    }

    fn count(map: &mut BTreeMap<String, u64>, key: String) {
        *map.entry(key).or_default() += 1;
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
        let payload_bytes = input.data().len() as u64 + REQUEST_OVERHEAD;
        let decision = {
            let mut st = self.state();
            let e = self.estimates(&mut st, model, payload_bytes, local_queue);
            let d = match st.models.get(model) {
                Some(m) => m.policy.decide(&e),
                None => Policy::new(self.inner.cfg.policy()).decide(&e),
            };
            Self::count(
                &mut st.counters.decisions,
                format!("{}/{}", side(d.choice), d.reason.as_str()),
            );
            d
        };
        let start = Instant::now();
        let result = match decision.choice {
            Choice::Local => self.local_measured(model, timed(move || Ok(local(input)?))),
            Choice::Offload => {
                let wire = WireTensor {
                    name: String::new(),
                    dtype: u8::try_from(input.dtype().onnx_code()).unwrap_or(0),
                    shape: input.shape().to_vec(),
                    data: input.data().to_vec(),
                };
                self.offload(rt, model, wire, payload_bytes, start, move || {
                    Ok(local(input)?)
                })
            }
        };
        if result.is_ok() {
            let mut st = self.state();
            if let Some(m) = st.models.get_mut(model) {
                m.policy.observe(&decision, ms(start.elapsed()));
            }
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
        // A fallback is a real run on this device: it feeds the local estimate as a chosen
        // local run does (after an outage, the local latency is then fresh, not an hour old).
        let fallback = |cause: &str, local: F| {
            Self::count(&mut self.state().counters.fallbacks, cause.to_owned());
            self.local_measured(model, timed(local))
        };
        if self.pending().len() >= cfg.max_pending as usize {
            return fallback("busy", local);
        }
        self.state().last_request_bytes = payload_bytes;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let request = Request {
            correlation_id: id,
            deadline_ms: v1::now_ms() + cfg.timeout_ms,
            model: model.to_owned(),
            inputs: vec![wire],
        };
        let payload = match request.encode() {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(model, error = %e, "offload request cannot be encoded");
                return fallback("not_sent", local);
            }
        };
        let Some(mut rx) = self.send(id, payload, start + timeout) else {
            return fallback("not_sent", local);
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
            tokio::select! {
                r = tokio::time::timeout(rest, &mut rx) => match r {
                    Ok(Ok((r, at))) if r.status == Status::Ok => (Waited::Answer(r, at), None),
                    _ => {
                        // No usable answer: the local run decides.
                        let l = (&mut handle).await.unwrap_or_else(|e| (Err(OffloadError::LocalTask(e.to_string())), Duration::ZERO));
                        (Waited::HedgeWon(l), None)
                    }
                },
                l = &mut handle => (
                    Waited::HedgeWon(l.unwrap_or_else(|e| (Err(OffloadError::LocalTask(e.to_string())), Duration::ZERO))),
                    None,
                ),
            }
        });
        self.pending().remove(&id);
        match waited {
            (Waited::Answer(r, at), local) => {
                let elapsed = at.duration_since(start);
                if r.status == Status::Ok {
                    let mut st = self.state();
                    st.knowledge.observe_remote(
                        model,
                        payload_bytes,
                        ms(elapsed),
                        f64::from(r.queue_ms),
                        f64::from(r.compute_ms),
                    );
                    st.last_measured = Some(at);
                    st.counters.remote_ok += 1;
                    if let Some(m) = st.models.get_mut(model) {
                        m.remote_queue = Some((r.queue_depth, at));
                    }
                    drop(st);
                    return r.outputs.into_iter().map(from_wire).collect();
                }
                tracing::debug!(model, status = r.status.as_str(), error = %r.error, "offload refused; running locally");
                {
                    let mut st = self.state();
                    if let Some(m) = st.models.get_mut(model) {
                        m.remote_queue = Some((r.queue_depth, at));
                    }
                }
                match local {
                    Some(local) => fallback(r.status.as_str(), local),
                    None => Err(OffloadError::Refused),
                }
            }
            (Waited::HedgeWon(l), _) => {
                Self::count(&mut self.state().counters.fallbacks, "hedge".into());
                self.local_measured(model, l)
            }
            (Waited::Timeout, local) => {
                // What the link cost this time, as far as we know: at least the timeout.
                let mut st = self.state();
                st.knowledge.observe_timeout(ms(timeout));
                st.last_measured = Some(Instant::now());
                drop(st);
                match local {
                    Some(local) => fallback("timeout", local),
                    None => Err(OffloadError::TimedOut),
                }
            }
            (Waited::Dropped, local) => match local {
                Some(local) => fallback("not_sent", local),
                None => Err(OffloadError::Dropped),
            },
        }
    }

    /// Records a finished local run of `model` (chosen or fallback) in the local estimate.
    fn local_measured(
        &self,
        model: &str,
        (result, took): (Result<Outputs, OffloadError>, Duration),
    ) -> Result<Outputs, OffloadError> {
        if result.is_ok() {
            let mut st = self.state();
            st.knowledge.observe_local(model, ms(took));
            if let Some(m) = st.models.get_mut(model) {
                m.local_at = Some(Instant::now());
            }
        }
        result
    }

    /// Decision and fallback counters, the link and per-model latencies.
    pub fn telemetry(&self) -> OffloadTelemetry {
        let st = self.state();
        OffloadTelemetry {
            mode: mode_name(self.inner.cfg.mode).to_owned(),
            decisions: st.counters.decisions.clone(),
            fallbacks: st.counters.fallbacks.clone(),
            remote_ok: st.counters.remote_ok,
            late_answers: st.counters.late_answers,
            probes: st.counters.probes,
            rtt_ms: st.knowledge.link.rtt_ms(),
            uplink_bps: st.knowledge.link.uplink_bps(),
            models: st
                .knowledge
                .models
                .iter()
                .map(|(name, m)| OffloadModelTelemetry {
                    model: name.clone(),
                    local_ms: m.local_ms.get(),
                    remote_ms: m.remote_ms.get(),
                })
                .collect(),
        }
    }
}

pub fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Local => "local",
        Mode::Offload => "offload",
        Mode::Cost => "cost",
        Mode::Adaptive => "adaptive",
    }
}

fn side(c: Choice) -> &'static str {
    match c {
        Choice::Local => "local",
        Choice::Offload => "offload",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn from_wire(t: WireTensor) -> Result<(String, edge_inference::Tensor), OffloadError> {
    let dtype = edge_inference::DType::from_onnx_code(i32::from(t.dtype)).ok_or_else(|| {
        OffloadError::AnswerDtype {
            name: t.name.clone(),
            dtype: t.dtype,
        }
    })?;
    let tensor = edge_inference::Tensor::new(dtype, t.shape, t.data).map_err(|source| {
        OffloadError::AnswerTensor {
            name: t.name.clone(),
            source,
        }
    })?;
    Ok((t.name, tensor))
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
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,6"), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("1"), vec![1]);
        assert!(parse_cpu_list("x").is_empty());
        assert!(!allowed_cpus().is_empty());
    }
}
