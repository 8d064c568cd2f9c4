//! The running parts of a pipeline: sources (threads, or a task for MQTT), stages (one
//! thread each, owning its [`StageRunner`]) and sinks (tokio tasks), joined by bounded
//! channels.
//!
//! Stop flows downstream: sources stop on the stop signal and drop their senders; a stage or
//! sink ends when all its inputs are closed and drained. So stopping loses nothing already
//! inside the pipeline.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::v1::{Class, Data, topics};
use tokio::sync::{mpsc, watch};

use super::codec;
use super::spec::{FileFormat, MqttPayload, OnFull, SinkClass};
use crate::dataset::{Dataset, Sample};
use crate::inbox::Subscription;
use crate::inference::Inference;
use crate::outbox::{NewMessage, Outbox};
use crate::sandbox::{CallOutcome, Frame, Payload, StageMetrics, StageRunner};
use edge_inference::Tensor;

/// Counters of one source, stage or sink.
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// Frames emitted (sources), produced (stages) or written (sinks).
    pub frames: AtomicU64,
    /// Frames dropped because the next channel was full (drop policy).
    pub dropped: AtomicU64,
    /// Frames that failed: unreadable input lines, refused writes, stage errors.
    pub errors: AtomicU64,
}

impl NodeCounters {
    fn bump(c: &AtomicU64) -> u64 {
        c.fetch_add(1, Ordering::Relaxed)
    }
}

/// Logs the first occurrence and then every power of two, so a persistent failure is
/// visible without flooding the log.
pub fn worth_logging(n: u64) -> bool {
    n == 0 || (n + 1).is_power_of_two()
}

/// The stop signal: a flag for threads, a watch for tasks.
#[derive(Debug)]
pub struct Stop {
    flag: AtomicBool,
    tx: watch::Sender<bool>,
}

impl Stop {
    pub fn new() -> Arc<Stop> {
        Arc::new(Stop {
            flag: AtomicBool::new(false),
            tx: watch::Sender::new(false),
        })
    }

    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.tx.send_replace(true);
    }

    pub fn is_stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// Sleeps up to `d`, waking early on stop; returns false when stopped.
    fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        loop {
            if self.is_stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= end {
                return true;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }
}

pub type Outputs = Vec<mpsc::Sender<Frame>>;

/// Sends a frame to every output from a thread. Returns false when every output is closed.
pub fn send_blocking(outs: &Outputs, frame: Frame, on_full: OnFull, c: &NodeCounters) -> bool {
    let send = |tx: &mpsc::Sender<Frame>, f: Frame| -> bool {
        match on_full {
            OnFull::Block => tx.blocking_send(f).is_ok(),
            OnFull::Drop => try_send_or_count(tx, f, c),
        }
    };
    let Some((last, rest)) = outs.split_last() else {
        return false;
    };
    let mut open = false;
    for tx in rest {
        open |= send(tx, frame.clone());
    }
    // The last output takes the frame itself; the others got copies.
    send(last, frame) || open
}

/// The drop policy: sends if there is room, else drops the frame and counts it. Returns false
/// only when the receiver is gone.
fn try_send_or_count(tx: &mpsc::Sender<Frame>, f: Frame, c: &NodeCounters) -> bool {
    match tx.try_send(f) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            NodeCounters::bump(&c.dropped);
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// Pacing for sources with a rate: sleeps until the next tick.
struct Pace {
    period: Option<Duration>,
    next: Instant,
}

impl Pace {
    fn new(rate_hz: f64) -> Pace {
        Pace {
            period: (rate_hz > 0.0).then(|| Duration::from_secs_f64(1.0 / rate_hz)),
            next: Instant::now(),
        }
    }

    /// Returns false when stopped while waiting.
    fn wait(&mut self, stop: &Stop) -> bool {
        let Some(p) = self.period else {
            return !stop.is_stopped();
        };
        let now = Instant::now();
        if self.next > now && !stop.sleep(self.next - now) {
            return false;
        }
        // After a stall, do not burst to catch up.
        self.next = (self.next + p).max(Instant::now());
        !stop.is_stopped()
    }
}

/// xorshift64*: deterministic noise for the synthetic source without a dependency.
struct Noise(u64);

impl Noise {
    fn next_unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Settings of a synthetic source, copied out of the spec.
#[derive(Debug, Clone)]
pub struct Synthetic {
    pub stream: String,
    pub rate_hz: f64,
    pub window: u32,
    pub sample_rate_hz: f64,
    pub tones: Vec<[f64; 2]>,
    pub noise: f64,
    pub anomaly_every: u64,
    pub anomaly_gain: f64,
    pub count: u64,
    pub seed: u64,
    pub on_full: OnFull,
}

pub fn run_synthetic(s: Synthetic, outs: Outputs, stop: Arc<Stop>, c: Arc<NodeCounters>) {
    let mut pace = Pace::new(s.rate_hz);
    let mut noise = Noise(s.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut n: u64 = 0;
    while (s.count == 0 || n < s.count) && pace.wait(&stop) {
        let gain = if s.anomaly_every > 0 && n > 0 && n.is_multiple_of(s.anomaly_every) {
            s.anomaly_gain
        } else {
            1.0
        };
        let base = n * u64::from(s.window);
        let samples = (0..u64::from(s.window))
            .map(|i| {
                let t = (base + i) as f64 / s.sample_rate_hz;
                let tone: f64 = s
                    .tones
                    .iter()
                    .map(|[f, a]| a * (std::f64::consts::TAU * f * t).sin())
                    .sum();
                (gain * tone + s.noise * (2.0 * noise.next_unit() - 1.0)) as f32
            })
            .collect();
        let frame = Frame {
            stream: s.stream.clone(),
            timestamp_ms: protocol::v1::now_ms(),
            payload: Payload::Samples(samples),
            meta: Vec::new(),
        };
        NodeCounters::bump(&c.frames);
        if !send_blocking(&outs, frame, s.on_full, &c) {
            break;
        }
        n += 1;
    }
}

/// Settings of a file source.
#[derive(Debug, Clone)]
pub struct FileReplay {
    pub name: String,
    pub path: PathBuf,
    pub format: FileFormat,
    pub stream: String,
    pub rate_hz: f64,
    pub repeat: bool,
    pub on_full: OnFull,
}

pub fn run_file(f: FileReplay, outs: Outputs, stop: Arc<Stop>, c: Arc<NodeCounters>) {
    use std::io::BufRead;
    let mut pace = Pace::new(f.rate_hz);
    'replay: loop {
        let file = match std::fs::File::open(&f.path) {
            Ok(file) => file,
            Err(e) => {
                tracing::error!(source = %f.name, path = %f.path.display(), error = %e, "cannot open replay file; source stopped");
                NodeCounters::bump(&c.errors);
                return;
            }
        };
        for (lineno, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(source = %f.name, path = %f.path.display(), line = lineno + 1, error = %e, "cannot read replay file; source stopped");
                    NodeCounters::bump(&c.errors);
                    return;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            let payload = match f.format {
                FileFormat::Jsonl => match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(_) => Some(Payload::Json(line)),
                    Err(e) => {
                        bad_line(&f, lineno, &format!("not JSON: {e}"), &c);
                        None
                    }
                },
                FileFormat::Samples => match codec::samples_from_line(&line) {
                    Ok(v) => Some(Payload::Samples(v)),
                    Err(e) => {
                        bad_line(&f, lineno, &e.to_string(), &c);
                        None
                    }
                },
                FileFormat::Lines => Some(Payload::Bytes(line.into_bytes())),
            };
            let Some(payload) = payload else {
                continue;
            };
            if !pace.wait(&stop) {
                return;
            }
            let frame = Frame {
                stream: f.stream.clone(),
                timestamp_ms: protocol::v1::now_ms(),
                payload,
                meta: Vec::new(),
            };
            NodeCounters::bump(&c.frames);
            if !send_blocking(&outs, frame, f.on_full, &c) {
                return;
            }
        }
        if !f.repeat || stop.is_stopped() {
            break 'replay;
        }
    }
    tracing::info!(source = %f.name, path = %f.path.display(), frames = c.frames.load(Ordering::Relaxed), "replay finished");
}

fn bad_line(f: &FileReplay, lineno: usize, e: &str, c: &NodeCounters) {
    let n = NodeCounters::bump(&c.errors);
    if worth_logging(n) {
        tracing::warn!(source = %f.name, path = %f.path.display(), line = lineno + 1, error = %e, skipped = n + 1, "skipping unreadable line");
    }
}

/// Settings of an MQTT source.
#[derive(Debug)]
pub struct MqttSource {
    pub name: String,
    pub payload: MqttPayload,
    pub stream: Option<String>,
    pub on_full: OnFull,
}

pub async fn run_mqtt(
    m: MqttSource,
    mut sub: Subscription,
    outs: Outputs,
    stop: Arc<Stop>,
    c: Arc<NodeCounters>,
) {
    let mut stopped = stop.subscribe();
    loop {
        let msg = tokio::select! {
            msg = sub.rx.recv() => match msg { Some(m) => m, None => break },
            _ = stopped.wait_for(|s| *s) => break,
        };
        let payload = match m.payload {
            MqttPayload::Json => match std::str::from_utf8(&msg.payload)
                .ok()
                .filter(|s| serde_json::from_str::<serde_json::Value>(s).is_ok())
            {
                Some(s) => Payload::Json(s.to_owned()),
                None => {
                    let n = NodeCounters::bump(&c.errors);
                    if worth_logging(n) {
                        tracing::warn!(source = %m.name, topic = %msg.topic, size = msg.payload.len(), rejected = n + 1, "dropping MQTT message that is not a JSON document");
                    }
                    continue;
                }
            },
            MqttPayload::Bytes => Payload::Bytes(msg.payload.to_vec()),
        };
        let frame = Frame {
            stream: m.stream.clone().unwrap_or_else(|| msg.topic.clone()),
            timestamp_ms: protocol::v1::now_ms(),
            payload,
            meta: vec![("topic".into(), msg.topic)],
        };
        NodeCounters::bump(&c.frames);
        let mut open = false;
        for tx in &outs {
            open |= match m.on_full {
                OnFull::Block => tx.send(frame.clone()).await.is_ok(),
                OnFull::Drop => try_send_or_count(tx, frame.clone(), &c),
            };
        }
        if !open {
            break;
        }
    }
    c.dropped.fetch_add(sub.dropped(), Ordering::Relaxed);
}

/// What the deploy health check reads: successes and the first failure of any stage.
#[derive(Debug, Default)]
pub struct HealthCounters {
    pub processed: AtomicU64,
    pub first_failure: Mutex<Option<String>>,
}

impl HealthCounters {
    pub fn fail(&self, reason: String) {
        let mut f = self.first_failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(reason);
        }
    }
}

pub fn run_stage(
    mut runner: StageRunner,
    mut rx: mpsc::Receiver<Frame>,
    outs: Outputs,
    c: Arc<NodeCounters>,
    health: Arc<HealthCounters>,
    stop: Arc<Stop>,
) {
    while let Some(frame) = rx.blocking_recv() {
        // After a trap the instance restarts with backoff: hold the frame until then, so
        // the backoff slows the pipeline (sources drop or wait by their policy) instead of
        // refusing every frame in between. Once stopping, frames are not held any more.
        if let Some(at) = runner.ready_at() {
            let now = Instant::now();
            if at > now && !runner.is_failed() {
                stop.sleep(at - now);
            }
        }
        match runner.process(&frame) {
            Ok(out) => {
                health.processed.fetch_add(1, Ordering::Relaxed);
                for f in out {
                    NodeCounters::bump(&c.frames);
                    // Backpressure: a slow consumer slows this stage and, through it, the
                    // sources. A closed output (pipeline stopping) just discards.
                    send_blocking(&outs, f, OnFull::Block, &c);
                }
            }
            Err(e) => {
                let n = NodeCounters::bump(&c.errors);
                health.fail(format!("stage {}: {e}", runner.stage()));
                // Traps are logged by the runner; guest errors (a rejected frame) here.
                if worth_logging(n) && !e.poisons_instance() {
                    tracing::warn!(stage = %runner.stage(), error = %e, errors = n + 1, "stage rejected a frame");
                }
            }
        }
    }
}

/// What a sink does with frames, with its settings.
#[derive(Debug, Clone)]
pub enum SinkKind {
    Outbox {
        outbox: Arc<Outbox>,
        device: String,
        class: SinkClass,
        stream: Option<String>,
        ttl: Option<Duration>,
    },
    Log {
        every: u64,
    },
    Dataset {
        store: Arc<Dataset>,
        dataset: String,
        label_key: String,
        require_label: bool,
    },
}

/// Runs a sink until its inputs close. `shadow`: count what would be written, write nothing
/// (a deployment under health check must not publish or train on unproven output).
pub async fn run_sink(
    pipeline: String,
    name: String,
    kind: SinkKind,
    mut rx: mpsc::Receiver<Frame>,
    c: Arc<NodeCounters>,
    shadow: bool,
) {
    let mut seen: u64 = 0;
    while let Some(frame) = rx.recv().await {
        seen += 1;
        let result = match &kind {
            SinkKind::Log { every } => {
                if !shadow && (seen - 1).is_multiple_of(*every) {
                    tracing::info!(pipeline = %pipeline, sink = %name, stream = %frame.stream, frame = %codec::summary(&frame), "frame");
                }
                Ok(())
            }
            SinkKind::Outbox {
                outbox,
                device,
                class,
                stream,
                ttl,
            } => {
                let stream = stream.clone().unwrap_or_else(|| frame.stream.clone());
                match topics::validate_stream(&stream) {
                    Err(e) => Err(format!("invalid stream {stream:?}: {e}")),
                    Ok(()) if shadow => Ok(()),
                    Ok(()) => {
                        let body = Data {
                            stream: stream.clone(),
                            payload: codec::data_payload(&frame.payload),
                        };
                        let msg = NewMessage {
                            class: match class {
                                SinkClass::Control => Class::Control,
                                SinkClass::Model => Class::Model,
                                SinkClass::Results => Class::Results,
                                SinkClass::Telemetry => Class::Telemetry,
                            },
                            topic: topics::data(device, &stream),
                            body: serde_json::to_vec(&body).unwrap_or_default(),
                            ttl: *ttl,
                        };
                        outbox
                            .enqueue(msg)
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string())
                    }
                }
            }
            SinkKind::Dataset {
                store,
                dataset,
                label_key,
                require_label,
            } => match codec::sample_parts(&frame, label_key) {
                Ok((_, None)) if *require_label => Err(format!(
                    "frame has no {label_key} label and require_label is set"
                )),
                Ok(_) if shadow => Ok(()),
                Ok((features, label)) => store
                    .append(
                        dataset,
                        &Sample {
                            timestamp_ms: frame.timestamp_ms,
                            label,
                            features,
                        },
                    )
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
        };
        match result {
            Ok(()) => {
                NodeCounters::bump(&c.frames);
            }
            Err(e) => {
                let n = NodeCounters::bump(&c.errors);
                if worth_logging(n) {
                    // A refused outbox write loses that frame: ERROR by our logging rule.
                    tracing::error!(pipeline = %pipeline, sink = %name, stream = %frame.stream, error = %e, failed = n + 1, "sink could not write a frame; frame lost");
                }
            }
        }
    }
}

/// Settings of an inference stage, resolved at start.
pub struct InferenceStage {
    pub stage: String,
    /// Name of the model in the registry (a shadow pipeline's are prefixed).
    pub model: String,
    pub inference: Inference,
    /// Model outputs to emit, in order; empty: all.
    pub outputs: Vec<String>,
    pub max_batch: usize,
    pub max_wait: Duration,
    pub metrics: Arc<StageMetrics>,
    pub runtime: tokio::runtime::Handle,
    /// The offload client and the coordinator's name for the model, when frames may run
    /// there (`offload_model`, live pipelines only).
    pub offload: Option<(crate::offload::Offloader, String)>,
}

/// Runs an inference stage until its inputs close: frames (tensor or samples payloads) in,
/// one tensor frame per emitted model output out, keeping stream, timestamp and labels. A
/// frame the model refuses (shape, dtype, NaN) fails alone: counted, logged, and the next
/// frame goes on.
pub fn run_inference_stage(
    s: InferenceStage,
    mut rx: mpsc::Receiver<Frame>,
    outs: Outputs,
    c: Arc<NodeCounters>,
    health: Arc<HealthCounters>,
) {
    let mut batcher = edge_inference::Batcher::new(s.max_batch, s.max_wait);
    loop {
        let batch = if s.max_batch <= 1 {
            match rx.blocking_recv() {
                Some(f) => vec![f],
                None => break,
            }
        } else {
            // Wait for the next frame, but no longer than the open batch's deadline.
            let next = match batcher.deadline() {
                None => rx.blocking_recv().map(Some),
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    match s
                        .runtime
                        .block_on(async { tokio::time::timeout(wait, rx.recv()).await })
                    {
                        Ok(f) => f.map(Some),
                        Err(_) => Some(None),
                    }
                }
            };
            let full = match next {
                None => {
                    if let Some(rest) = batcher.flush() {
                        s.process(rest, 0, &outs, &c, &health);
                    }
                    break;
                }
                Some(Some(f)) => batcher.push(f, Instant::now()),
                Some(None) => batcher.poll(Instant::now()),
            };
            match full {
                Some(b) => b,
                None => continue,
            }
        };
        s.process(batch, rx.len(), &outs, &c, &health);
    }
}

/// Runs `model` locally on one input, outputs named.
fn run_local(
    inference: &Inference,
    model: &str,
    input: Tensor,
) -> crate::offload::client::LocalResult {
    let (m, outputs) = inference.run(model, &[input])?;
    Ok(m.outputs()
        .iter()
        .map(|o| o.name.clone())
        .zip(outputs)
        .collect())
}

impl InferenceStage {
    /// One model call, here or (when the stage may offload) on the coordinator.
    fn call(
        &self,
        input: Tensor,
        queued: usize,
    ) -> Result<crate::offload::client::Outputs, FrameError> {
        match &self.offload {
            Some((offloader, remote)) => {
                let (inference, model) = (self.inference.clone(), self.model.clone());
                Ok(offloader.run(
                    &self.runtime,
                    remote,
                    input,
                    u32::try_from(queued).unwrap_or(u32::MAX),
                    move |t| run_local(&inference, &model, t),
                )?)
            }
            None => Ok(run_local(&self.inference, &self.model, input)
                .map_err(crate::offload::client::OffloadError::Local)?),
        }
    }

    fn process(
        &self,
        frames: Vec<Frame>,
        queued: usize,
        outs: &Outputs,
        c: &NodeCounters,
        h: &HealthCounters,
    ) {
        let tensors: Vec<Result<Tensor, FrameError>> = frames.iter().map(frame_tensor).collect();
        // A batch runs as one call when every frame has a tensor of the same dtype and
        // trailing dimensions; otherwise (or if the batched run fails) frame by frame, so one
        // bad frame fails alone.
        if frames.len() > 1
            && let Some(joined) = concat(&tensors)
        {
            let start = Instant::now();
            if let Ok(outputs) = self.call(joined, queued)
                && let Some(split) = split(&tensors, outputs)
            {
                let per_frame = start.elapsed() / frames.len() as u32;
                for (frame, outputs) in frames.iter().zip(split) {
                    self.metrics.record_call(CallOutcome::Ok, per_frame);
                    self.emit(frame, outputs, outs, c, h);
                }
                return;
            }
        }
        for (frame, tensor) in frames.iter().zip(tensors) {
            let start = Instant::now();
            match tensor.and_then(|t| self.call(t, queued)) {
                Ok(named) => {
                    self.metrics.record_call(CallOutcome::Ok, start.elapsed());
                    self.emit(frame, named, outs, c, h);
                }
                Err(e) => {
                    self.metrics
                        .record_call(CallOutcome::GuestError, start.elapsed());
                    let n = NodeCounters::bump(&c.errors);
                    h.fail(format!("stage {}: {e}", self.stage));
                    if worth_logging(n) {
                        tracing::warn!(stage = %self.stage, error = %e, errors = n + 1, "inference stage rejected a frame");
                    }
                }
            }
        }
    }

    fn emit(
        &self,
        frame: &Frame,
        outputs: Vec<(String, Tensor)>,
        outs: &Outputs,
        c: &NodeCounters,
        h: &HealthCounters,
    ) {
        h.processed.fetch_add(1, Ordering::Relaxed);
        let chosen: Vec<(String, Tensor)> = if self.outputs.is_empty() {
            outputs
        } else {
            let mut by_name: std::collections::BTreeMap<String, Tensor> =
                outputs.into_iter().collect();
            self.outputs
                .iter()
                .filter_map(|n| by_name.remove(n).map(|t| (n.clone(), t)))
                .collect()
        };
        let label = chosen.len() > 1;
        for (name, t) in chosen {
            let mut meta = frame.meta.clone();
            if label {
                meta.push(("output".into(), name));
            }
            let (dtype, shape, data) = t.into_parts();
            let out = Frame {
                stream: frame.stream.clone(),
                timestamp_ms: frame.timestamp_ms,
                payload: Payload::Tensor(crate::sandbox::Tensor {
                    dtype: dtype.into(),
                    shape,
                    data,
                }),
                meta,
            };
            NodeCounters::bump(&c.frames);
            send_blocking(outs, out, OnFull::Block, c);
        }
    }
}

/// Cuts batched outputs back into each frame's rows; `None` if an output does not have the
/// batch's rows as its first dimension.
fn split(
    inputs: &[Result<Tensor, FrameError>],
    outputs: crate::offload::client::Outputs,
) -> Option<Vec<Vec<(String, Tensor)>>> {
    let rows: Vec<u32> = inputs
        .iter()
        .map(|t| t.as_ref().ok().and_then(|t| t.shape().first().copied()))
        .collect::<Option<_>>()?;
    let total: u32 = rows.iter().sum();
    let mut per_frame: Vec<Vec<(String, Tensor)>> = vec![Vec::new(); rows.len()];
    for (name, out) in outputs {
        if out.shape().first() != Some(&total) || total == 0 {
            return None;
        }
        let (dtype, shape, data) = out.into_parts();
        let row_bytes = data.len() / total as usize;
        let mut at = 0;
        for (i, &r) in rows.iter().enumerate() {
            let len = row_bytes * r as usize;
            let mut s = shape.clone();
            s[0] = r;
            let t = Tensor::new(dtype, s, data[at..at + len].to_vec()).ok()?;
            per_frame[i].push((name.clone(), t));
            at += len;
        }
    }
    Some(per_frame)
}

/// A frame's tensor: a tensor payload as is, a samples payload as f32 `[1, n]`.
fn frame_tensor(f: &Frame) -> Result<Tensor, FrameError> {
    match &f.payload {
        Payload::Tensor(t) => {
            Tensor::new(t.dtype.into(), t.shape.clone(), t.data.clone()).map_err(FrameError::Tensor)
        }
        Payload::Samples(v) => {
            Tensor::from_f32(vec![1, v.len() as u32], v).map_err(FrameError::Samples)
        }
        Payload::Json(_) => Err(FrameError::Payload("json")),
        Payload::Bytes(_) => Err(FrameError::Payload("bytes")),
    }
}

/// Why an inference stage failed one frame; the stage's health check and log carry it.
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("frame tensor: {0}")]
    Tensor(edge_inference::TensorError),
    #[error("frame samples: {0}")]
    Samples(edge_inference::TensorError),
    #[error("expected a tensor or samples payload, got {0}")]
    Payload(&'static str),
    #[error(transparent)]
    Run(#[from] crate::offload::client::OffloadError),
}

/// Joins tensors along the first dimension; `None` unless all agree on dtype and the rest of
/// the shape.
fn concat(tensors: &[Result<Tensor, FrameError>]) -> Option<Tensor> {
    let first = tensors.first()?.as_ref().ok()?;
    let (dtype, tail) = (first.dtype(), first.shape().get(1..)?);
    let mut rows = 0u32;
    let mut data = Vec::new();
    for t in tensors {
        let t = t.as_ref().ok()?;
        if t.dtype() != dtype || t.shape().get(1..)? != tail {
            return None;
        }
        rows = rows.checked_add(*t.shape().first()?)?;
        data.extend_from_slice(t.data());
    }
    let mut shape = vec![rows];
    shape.extend_from_slice(tail);
    Tensor::new(dtype, shape, data).ok()
}
