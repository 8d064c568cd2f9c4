//! The offload client's bookkeeping without I/O: what the device knows about the link, the
//! coordinator's replicas and each model's two sides, the per-model policies, and the counters
//! telemetry reports. It decides where a frame runs, says when a link probe is due and what it
//! carries, and is told how each attempt ended; the caller ([`super::client`]) does the
//! sending, the waiting and the local runs, and passes the time in (`now`).
//!
//! The trace benchmark (`tests/benches/offload.rs`) replays recorded outcomes through this
//! same type, so what it measures is what the agent runs.
//!
//! **Invariant:** no clock, no I/O, no randomness; every decision and every fallback is
//! counted, by typed keys turned into telemetry's strings in one place ([`Counters`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use protocol::v1::offload::{Capacity, Status};
use protocol::v1::{OffloadModelTelemetry, OffloadTelemetry};

use super::config::OffloadConfig;
use super::estimate::{Context, Knowledge};
use super::policy::{Choice, Decision, Mode, Policy, Reason};

/// Bytes a request adds to its tensors (magic, ids, names, shapes), roughly.
const REQUEST_OVERHEAD: u64 = 64;
/// Largest padding of a link probe, bytes.
const MAX_PROBE_PAD: u64 = 64 * 1024;
/// An answer's queue depth stands for the coordinator's queue this long (adverts are older).
const ANSWER_QUEUE_FRESH: Duration = Duration::from_secs(1);

/// The size the link model is told for a request whose tensors hold `tensor_bytes` bytes.
pub fn request_bytes(tensor_bytes: usize) -> u64 {
    tensor_bytes as u64 + REQUEST_OVERHEAD
}

/// Why an offloaded frame ran on the device after all; counted per value in telemetry
/// (`fallbacks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FallbackCause {
    /// `max_pending` requests were already waiting for answers.
    Busy,
    /// The request could not be encoded or handed to the uplink, or the uplink dropped it.
    NotSent,
    /// No answer within `timeout_ms`.
    Timeout,
    /// The hedged local run finished first (or no usable answer came while it ran).
    Hedge,
    /// The coordinator answered `error`: the model refused the inputs or failed.
    Error,
    /// The coordinator's queue was full.
    Overloaded,
    /// The deadline passed before the coordinator started.
    Expired,
    /// The replica does not serve the model.
    UnknownModel,
}

impl FallbackCause {
    /// The cause of a refusal with `status`; `None` for `ok`, which is no refusal.
    pub fn refused(status: Status) -> Option<FallbackCause> {
        match status {
            Status::Ok => None,
            Status::Error => Some(FallbackCause::Error),
            Status::Overloaded => Some(FallbackCause::Overloaded),
            Status::Expired => Some(FallbackCause::Expired),
            Status::UnknownModel => Some(FallbackCause::UnknownModel),
        }
    }

    /// The telemetry key (for refusals, the status's wire name).
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackCause::Busy => "busy",
            FallbackCause::NotSent => "not_sent",
            FallbackCause::Timeout => "timeout",
            FallbackCause::Hedge => "hedge",
            FallbackCause::Error => Status::Error.as_str(),
            FallbackCause::Overloaded => Status::Overloaded.as_str(),
            FallbackCause::Expired => Status::Expired.as_str(),
            FallbackCause::UnknownModel => Status::UnknownModel.as_str(),
        }
    }
}

/// How an offloaded request ended, as the caller saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The coordinator answered at `at` (`ok` or a refusal).
    Answer {
        at: Instant,
        status: Status,
        queue_ms: u32,
        compute_ms: u32,
        queue_depth: u32,
    },
    /// No answer by `at`, `timeout_ms` after sending.
    Timeout { at: Instant },
    /// The request never went out (or the uplink dropped it before an answer could come).
    NotSent,
    /// Hedging: the local run decided before a usable answer came.
    HedgeWon,
}

/// Totals since the agent started, by typed keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    pub decisions: BTreeMap<(Choice, Reason), u64>,
    pub fallbacks: BTreeMap<FallbackCause, u64>,
    /// Offloaded frames answered `ok`.
    pub remote_ok: u64,
    /// Answers that came after their frame was done (late, or the hedge won).
    pub late_answers: u64,
    /// Link probes that ended (answered or lost).
    pub probes: u64,
}

impl Counters {
    /// `decisions` as telemetry keys them: `side/reason` (`local/offline`, ...).
    pub fn decision_keys(&self) -> BTreeMap<String, u64> {
        self.decisions
            .iter()
            .map(|((c, r), n)| (format!("{}/{}", c.as_str(), r.as_str()), *n))
            .collect()
    }

    /// `fallbacks` as telemetry keys them (`timeout`, `overloaded`, ...).
    pub fn fallback_keys(&self) -> BTreeMap<String, u64> {
        self.fallbacks
            .iter()
            .map(|(c, n)| (c.as_str().to_owned(), *n))
            .collect()
    }
}

/// A replica's capacity advert and when it counts from.
#[derive(Debug)]
struct Advert {
    capacity: Capacity,
    received: Instant,
}

/// Per offloadable model (the coordinator's name for it).
#[derive(Debug)]
struct ModelState {
    policy: Policy,
    /// The queue depth of the last answer, and when it came.
    remote_queue: Option<(u32, Instant)>,
    /// When the model last ran here (the local estimate's age).
    local_at: Option<Instant>,
}

/// Everything the offload client decides and keeps; see the module docs.
#[derive(Debug)]
pub struct OffloadCore {
    cfg: OffloadConfig,
    knowledge: Knowledge,
    adverts: BTreeMap<String, Advert>,
    models: BTreeMap<String, ModelState>,
    counters: Counters,
    /// When the link was last measured (answer, probe or timeout).
    last_measured: Option<Instant>,
    /// Size of the last offload request, bytes.
    last_request_bytes: u64,
    /// Load of the CPUs the agent may use, 0..1.
    cpu_load: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl OffloadCore {
    pub fn new(cfg: OffloadConfig) -> OffloadCore {
        OffloadCore {
            cfg,
            knowledge: Knowledge::default(),
            adverts: BTreeMap::new(),
            models: BTreeMap::new(),
            counters: Counters::default(),
            last_measured: None,
            last_request_bytes: 0,
            cpu_load: 0.0,
        }
    }

    pub fn config(&self) -> &OffloadConfig {
        &self.cfg
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.timeout_ms)
    }

    /// The latest load sample of the CPUs the agent may use, 0..1.
    pub fn set_cpu_load(&mut self, load: f64) {
        self.cpu_load = load;
    }

    /// A capacity advert from `replica`, received at `now` (`now_ms`: the wall clock). A
    /// retained advert may be the last word of a coordinator that died long ago: it counts
    /// only if its own timestamp is recent, and from then on (live ones count from arrival).
    pub fn advert(
        &mut self,
        replica: &str,
        capacity: Capacity,
        retained: bool,
        now: Instant,
        now_ms: u64,
    ) {
        let received = if retained {
            let age = now_ms.saturating_sub(capacity.ts_ms);
            if age > self.cfg.advert_max_age_ms {
                return;
            }
            now.checked_sub(Duration::from_millis(age)).unwrap_or(now)
        } else {
            now
        };
        self.adverts
            .insert(replica.to_owned(), Advert { capacity, received });
    }

    /// `replica` cleared its retained advert (it shut down).
    pub fn advert_cleared(&mut self, replica: &str) {
        self.adverts.remove(replica);
    }

    fn fresh_adverts(&self, now: Instant) -> impl Iterator<Item = &Capacity> {
        let max_age = Duration::from_millis(self.cfg.advert_max_age_ms);
        self.adverts
            .values()
            .filter(move |a| now.saturating_duration_since(a.received) <= max_age)
            .map(|a| &a.capacity)
    }

    /// Decides where a frame of `model` (the coordinator's name) runs and counts the
    /// decision. `payload_bytes`: [`request_bytes`] of its input; `local_queue`: frames waiting
    /// for the stage; `connected`: the uplink's link state now.
    pub fn decide(
        &mut self,
        model: &str,
        payload_bytes: u64,
        local_queue: u32,
        connected: bool,
        now: Instant,
    ) -> Decision {
        let mut c = Context {
            payload_bytes,
            local_queue,
            cpu_load: self.cpu_load,
            ..Context::default()
        };
        for a in self.fresh_adverts(now) {
            if !a.models.iter().any(|m| m == model) {
                continue;
            }
            c.remote_workers += a.workers;
            c.remote_queue += a.queue_depth;
            if let Some(&ms) = a.ewma_compute_ms.get(model) {
                c.advert_compute_ms = Some(c.advert_compute_ms.map_or(ms, |m: f64| m.min(ms)));
            }
        }
        c.online = connected && c.remote_workers > 0;
        let policy = self.cfg.policy();
        let m = self
            .models
            .entry(model.to_owned())
            .or_insert_with(|| ModelState {
                policy: Policy::new(policy),
                remote_queue: None,
                local_at: None,
            });
        c.local_age_ms = m
            .local_at
            .map_or(f64::INFINITY, |at| ms(now.saturating_duration_since(at)));
        // The freshest queue depth: an answer newer than the advert interval wins.
        if let Some((q, at)) = m.remote_queue
            && now.saturating_duration_since(at) < ANSWER_QUEUE_FRESH
        {
            c.remote_queue = q;
        }
        let d = m.policy.decide(&self.knowledge.estimates(model, &c));
        *self
            .counters
            .decisions
            .entry((d.choice, d.reason))
            .or_default() += 1;
        d
    }

    /// Whether a request may go out with `pending` answers awaited now; records its size for
    /// the probes. `Err`: the frame runs here instead (the cause is counted).
    pub fn admit(&mut self, pending: usize, payload_bytes: u64) -> Result<(), FallbackCause> {
        if pending >= self.cfg.max_pending as usize {
            return Err(self.fallback(FallbackCause::Busy));
        }
        self.last_request_bytes = payload_bytes;
        Ok(())
    }

    /// Counts a fallback and hands its cause back.
    pub fn fallback(&mut self, cause: FallbackCause) -> FallbackCause {
        *self.counters.fallbacks.entry(cause).or_default() += 1;
        cause
    }

    /// How an offloaded request of `model` sent at `sent` ended. `Ok`: the coordinator's
    /// outputs are the frame's; `Err`: the frame runs here (the cause is counted).
    pub fn remote_outcome(
        &mut self,
        model: &str,
        payload_bytes: u64,
        sent: Instant,
        outcome: Outcome,
    ) -> Result<(), FallbackCause> {
        match outcome {
            Outcome::Answer {
                at,
                status,
                queue_ms,
                compute_ms,
                queue_depth,
            } => {
                if let Some(m) = self.models.get_mut(model) {
                    m.remote_queue = Some((queue_depth, at));
                }
                if let Some(cause) = FallbackCause::refused(status) {
                    return Err(self.fallback(cause));
                }
                self.knowledge.observe_remote(
                    model,
                    payload_bytes,
                    ms(at.saturating_duration_since(sent)),
                    f64::from(queue_ms),
                    f64::from(compute_ms),
                );
                self.last_measured = Some(at);
                self.counters.remote_ok += 1;
                Ok(())
            }
            Outcome::Timeout { at } => {
                // What the link cost this time, as far as we know: at least the timeout.
                self.knowledge.observe_timeout(ms(self.timeout()));
                self.last_measured = Some(at);
                Err(self.fallback(FallbackCause::Timeout))
            }
            Outcome::NotSent => Err(self.fallback(FallbackCause::NotSent)),
            Outcome::HedgeWon => Err(self.fallback(FallbackCause::Hedge)),
        }
    }

    /// A local run of `model` (chosen or a fallback) succeeded in `took`, finishing at `now`:
    /// a real run on this device feeds the local estimate either way (after an outage, the
    /// local latency is then fresh, not an hour old).
    pub fn local_ran(&mut self, model: &str, took: Duration, now: Instant) {
        self.knowledge.observe_local(model, ms(took));
        if let Some(m) = self.models.get_mut(model) {
            m.local_at = Some(now);
        }
    }

    /// A frame `decision` sent somewhere got its outputs after `latency` in all (a fallback's
    /// local run included): the policy learns what the choice cost.
    pub fn finished(&mut self, model: &str, decision: &Decision, latency: Duration) {
        if let Some(m) = self.models.get_mut(model) {
            m.policy.observe(decision, ms(latency));
        }
    }

    /// An answer came that nobody waits for any more.
    pub fn late_answer(&mut self) {
        self.counters.late_answers += 1;
    }

    /// The padding of a link probe to send now, or `None` when none is due. A probe is due in
    /// the cost and adaptive modes, while connected and a replica advertises, once nothing
    /// measured the link for `probe_interval_ms` (at most a second during an outage): a
    /// policy that chose local because the link was bad would otherwise never see it recover.
    pub fn probe_due(&self, connected: bool, now: Instant) -> Option<usize> {
        if self.cfg.probe_interval_ms == 0
            || !matches!(self.cfg.mode, Mode::Cost | Mode::Adaptive)
            || !connected
            || self.models.is_empty()
        {
            return None;
        }
        let interval = self
            .knowledge
            .probe_interval_ms(self.cfg.probe_interval_ms as f64);
        let due = self
            .last_measured
            .is_none_or(|at| ms(now.saturating_duration_since(at)) >= interval);
        if !due || self.fresh_adverts(now).next().is_none() {
            return None;
        }
        // Every other probe is the size of the last request, so the link model sees both
        // sizes at the same time and can tell round trip from throughput.
        Some(if self.counters.probes % 2 == 1 {
            self.last_request_bytes
                .saturating_sub(REQUEST_OVERHEAD)
                .min(MAX_PROBE_PAD) as usize
        } else {
            0
        })
    }

    /// A probe went out at `now`; marked so that the next one waits for the interval.
    pub fn probe_sent(&mut self, now: Instant) {
        self.last_measured = Some(now);
    }

    /// A probe of `bytes` sent at `sent` was answered at `at` after `queue_ms` at the
    /// coordinator: only the link is measured.
    pub fn probe_answered(&mut self, bytes: u64, sent: Instant, at: Instant, queue_ms: u32) {
        self.knowledge.observe_probe(
            bytes,
            ms(at.saturating_duration_since(sent)),
            f64::from(queue_ms),
        );
        self.last_measured = Some(at);
        self.counters.probes += 1;
    }

    /// A probe got no answer by `at`, its timeout.
    pub fn probe_lost(&mut self, at: Instant) {
        self.knowledge.observe_timeout(ms(self.timeout()));
        self.last_measured = Some(at);
        self.counters.probes += 1;
    }

    /// Decision and fallback counters, the link and per-model latencies.
    pub fn telemetry(&self) -> OffloadTelemetry {
        OffloadTelemetry {
            mode: self.cfg.mode.as_str().to_owned(),
            decisions: self.counters.decision_keys(),
            fallbacks: self.counters.fallback_keys(),
            remote_ok: self.counters.remote_ok,
            late_answers: self.counters.late_answers,
            probes: self.counters.probes,
            rtt_ms: self.knowledge.link.rtt_ms(),
            uplink_bps: self.knowledge.link.uplink_bps(),
            models: self
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: Mode) -> OffloadConfig {
        OffloadConfig {
            mode,
            timeout_ms: 300,
            ..OffloadConfig::default()
        }
    }

    fn advert(workers: u32, ts_ms: u64) -> Capacity {
        Capacity {
            replica: "r1".into(),
            workers,
            queue_depth: 0,
            max_queue: 64,
            models: vec!["m".into()],
            ewma_compute_ms: BTreeMap::from([("m".to_owned(), 1.0)]),
            ts_ms,
        }
    }

    fn ok_at(at: Instant) -> Outcome {
        Outcome::Answer {
            at,
            status: Status::Ok,
            queue_ms: 0,
            compute_ms: 1,
            queue_depth: 0,
        }
    }

    #[test]
    fn telemetry_keys_are_the_wire_strings() {
        let t0 = Instant::now();
        let mut core = OffloadCore::new(cfg(Mode::Offload));
        // No advert: offline.
        let d = core.decide("m", 100, 0, true, t0);
        assert_eq!((d.choice, d.reason), (Choice::Local, Reason::Offline));
        core.advert("r1", advert(2, 0), false, t0, 0);
        let d = core.decide("m", 100, 0, true, t0);
        assert_eq!((d.choice, d.reason), (Choice::Offload, Reason::Fixed));
        core.admit(0, 100).expect("room");
        let later = t0 + Duration::from_millis(5);
        core.remote_outcome("m", 100, t0, ok_at(later))
            .expect("answered");
        for status in [Status::Overloaded, Status::UnknownModel] {
            let refusal = Outcome::Answer {
                at: later,
                status,
                queue_ms: 0,
                compute_ms: 0,
                queue_depth: 3,
            };
            assert_eq!(
                core.remote_outcome("m", 100, t0, refusal),
                Err(FallbackCause::refused(status).expect("a refusal"))
            );
        }
        assert_eq!(
            core.remote_outcome("m", 100, t0, Outcome::NotSent),
            Err(FallbackCause::NotSent)
        );
        let t = core.telemetry();
        assert_eq!(t.mode, "offload");
        assert_eq!(
            t.decisions,
            BTreeMap::from([
                ("local/offline".to_owned(), 1),
                ("offload/fixed".to_owned(), 1)
            ])
        );
        assert_eq!(
            t.fallbacks,
            BTreeMap::from([
                ("not_sent".to_owned(), 1),
                ("overloaded".to_owned(), 1),
                ("unknown_model".to_owned(), 1),
            ])
        );
        assert_eq!(t.remote_ok, 1);
        assert!(t.models[0].remote_ms.is_some());
    }

    #[test]
    fn a_full_pending_table_falls_back_as_busy() {
        let mut c = cfg(Mode::Offload);
        c.max_pending = 2;
        let mut core = OffloadCore::new(c);
        assert_eq!(core.admit(1, 10), Ok(()));
        assert_eq!(core.admit(2, 10), Err(FallbackCause::Busy));
        assert_eq!(core.telemetry().fallbacks.get("busy"), Some(&1));
    }

    #[test]
    fn stale_retained_adverts_do_not_count_and_cleared_ones_go() {
        let t0 = Instant::now();
        let now_ms = 10_000_000;
        let mut core = OffloadCore::new(cfg(Mode::Offload));
        core.advert("r1", advert(2, now_ms - 3_600_000), true, t0, now_ms);
        assert_eq!(core.decide("m", 1, 0, true, t0).reason, Reason::Offline);
        core.advert("r1", advert(2, now_ms - 1_000), true, t0, now_ms);
        assert_eq!(core.decide("m", 1, 0, true, t0).reason, Reason::Fixed);
        // A retained advert counts from its own timestamp: 29 s later it is 30 s old.
        let later = t0 + Duration::from_secs(29) + Duration::from_millis(1);
        assert_eq!(core.decide("m", 1, 0, true, later).reason, Reason::Offline);
        core.advert("r1", advert(2, now_ms), false, t0, now_ms);
        core.advert_cleared("r1");
        assert_eq!(core.decide("m", 1, 0, true, t0).reason, Reason::Offline);
        // Disconnected: offline whatever the adverts say.
        core.advert("r1", advert(2, now_ms), false, t0, now_ms);
        assert_eq!(core.decide("m", 1, 0, false, t0).reason, Reason::Offline);
    }

    #[test]
    fn probes_are_due_after_the_interval_and_alternate_their_size() {
        let t0 = Instant::now();
        let mut core = OffloadCore::new(cfg(Mode::Adaptive));
        // No model yet, no advert: nothing to probe for.
        assert_eq!(core.probe_due(true, t0), None);
        core.advert("r1", advert(2, 0), false, t0, 0);
        core.decide("m", request_bytes(1000), 0, true, t0);
        core.admit(0, request_bytes(1000)).expect("room");
        assert_eq!(core.probe_due(false, t0), None, "offline");
        assert_eq!(core.probe_due(true, t0), Some(0), "never measured");
        core.probe_sent(t0);
        assert_eq!(core.probe_due(true, t0 + Duration::from_secs(1)), None);
        let answered = t0 + Duration::from_millis(2);
        core.probe_answered(30, t0, answered, 0);
        let interval = Duration::from_millis(core.config().probe_interval_ms);
        assert_eq!(core.probe_due(true, answered + interval / 2), None);
        // The second probe carries the last request's tensor bytes.
        assert_eq!(core.probe_due(true, answered + interval), Some(1000));
        core.probe_lost(answered + interval);
        assert_eq!(core.counters().probes, 2);
        // The link is out now: probed every second at most.
        let out = answered + interval + Duration::from_secs(1);
        assert_eq!(core.probe_due(true, out), Some(0));
        // Fixed modes never probe.
        let mut fixed = OffloadCore::new(cfg(Mode::Offload));
        fixed.advert("r1", advert(2, 0), false, t0, 0);
        fixed.decide("m", 1, 0, true, t0);
        assert_eq!(fixed.probe_due(true, t0), None);
    }

    #[test]
    fn a_timeout_costs_the_link_and_a_fallback_run_feeds_the_local_side() {
        let t0 = Instant::now();
        let mut core = OffloadCore::new(cfg(Mode::Cost));
        core.advert("r1", advert(2, 0), false, t0, 0);
        core.decide("m", 100, 0, true, t0);
        let at = t0 + Duration::from_millis(300);
        assert_eq!(
            core.remote_outcome("m", 100, t0, Outcome::Timeout { at }),
            Err(FallbackCause::Timeout)
        );
        core.local_ran("m", Duration::from_millis(7), at);
        let t = core.telemetry();
        assert_eq!(t.fallbacks.get("timeout"), Some(&1));
        assert_eq!(t.models[0].local_ms, Some(7.0));
        assert!(
            t.rtt_ms >= 300.0,
            "an outage costs the timeout: {}",
            t.rtt_ms
        );
    }
}
