//! The offload decision: run a request locally or on the coordinator, from measured costs and,
//! in `adaptive` mode, from what past decisions actually cost.
//!
//! Pure: no clock, no I/O, no randomness; the caller feeds measurements ([`Estimates`]) and
//! outcomes ([`Policy::observe`]) and gets a [`Decision`] with the reason, which it counts.
//!
//! - Cost model: expected latency of each side, `local = ewma_local_ms * (1 + local_queue)`,
//!   `remote = rtt + payload / uplink throughput + remote compute * (1 + remote queue / workers)`;
//!   energy: local compute time at `cpu_mw`, transmission at `radio_nj_per_byte`, waiting at
//!   `idle_mw`; cost = `latency_weight * latency_ms + energy_weight * energy_mj`. A side whose
//!   expected latency misses `deadline_ms` loses to one that meets it.
//! - Adaptive: a discounted lower-confidence-bound bandit (minimising latency) per context
//!   bucket (expected network time class x local-load class). Its arms learn the cost model's
//!   error on each side (observed minus expected latency), so it starts where the model points
//!   and corrects the model where it is wrong (e.g. a link whose delay the RTT probe
//!   under-states), and what it learned in a bucket follows the model's prediction when the
//!   conditions inside the bucket change (a latency learned on a slow link in the same class
//!   would not). Discounting (Garivier and Moulines
//!   2011, "On Upper-Confidence Bound Policies for Switching Bandit Problems") forgets old
//!   outcomes, so a link that changes is noticed.
//! - Offline (no connection, or no fresh capacity advert naming the model) is always local.
//! - Refresh: a local estimate only changes when the device runs the model, so while
//!   offloading wins it would keep whatever the device measured last (under load, say) and
//!   never see the device get faster. When the local side was not measured for `refresh_ms`,
//!   a request the cost model (or the bandit) would offload runs locally instead, once, and
//!   measures it; the link has its probes for the same purpose. Deadline decisions are not
//!   overridden.
//!
//! **Invariant:** every decision carries a reason; the policy never offloads without a link.

/// How the agent decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Always on the device.
    Local,
    /// Always on the coordinator while online (local when offline or on timeout).
    Offload,
    /// The cost model alone.
    Cost,
    /// The cost model as a prior, corrected by observed outcomes.
    Adaptive,
}

impl Mode {
    /// The config and telemetry name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Offload => "offload",
            Mode::Cost => "cost",
            Mode::Adaptive => "adaptive",
        }
    }
}

/// Weights and limits, from the agent config.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    pub mode: Mode,
    pub latency_weight: f64,
    pub energy_weight: f64,
    /// A side expected to miss this is avoided (0 = no deadline).
    pub deadline_ms: f64,
    /// Power of the CPU while inferring, mW.
    pub cpu_mw: f64,
    /// Power while waiting for an answer, mW.
    pub idle_mw: f64,
    /// Energy to send one byte, nJ.
    pub radio_nj_per_byte: f64,
    /// Exploration strength of the adaptive mode (in units of the latency spread).
    pub exploration: f64,
    /// Per-step discount of old outcomes in adaptive mode (0.9-0.999).
    pub discount: f64,
    /// A local estimate older than this is re-measured by running one request locally that
    /// would have been offloaded (0 = never).
    pub refresh_ms: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            mode: Mode::Adaptive,
            latency_weight: 1.0,
            energy_weight: 0.0,
            deadline_ms: 0.0,
            cpu_mw: 2000.0,
            idle_mw: 300.0,
            radio_nj_per_byte: 100.0,
            exploration: 0.3,
            discount: 0.97,
            refresh_ms: 5000.0,
        }
    }
}

/// What the agent measured just before deciding.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Estimates {
    /// Moving average of local inference latency for this model, ms (0: never run).
    pub local_ms: f64,
    /// Time since the model last ran here, ms (infinite: never).
    pub local_age_ms: f64,
    /// Requests waiting for the local model.
    pub local_queue: u32,
    /// Machine CPU load, 0..1.
    pub cpu_load: f64,
    pub payload_bytes: u64,
    /// Connected to the broker, and a capacity advert naming the model is fresh.
    pub online: bool,
    /// Moving average of the round-trip time to the coordinator, ms.
    pub rtt_ms: f64,
    /// Moving average of uplink throughput, bytes/s (0: unknown).
    pub uplink_bps: f64,
    /// The coordinator's advertised compute time for the model, queue depth and workers.
    pub remote_ms: f64,
    pub remote_queue: u32,
    pub remote_workers: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Choice {
    Local,
    Offload,
}

impl Choice {
    /// The side's name in telemetry keys (`local/offline`).
    pub fn as_str(self) -> &'static str {
        match self {
            Choice::Local => "local",
            Choice::Offload => "offload",
        }
    }
}

/// Why; counted per value in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The configured mode fixes the side.
    Fixed,
    /// No link or no capacity for the model: local.
    Offline,
    /// The other side is expected to miss the deadline.
    Deadline,
    /// The cost model prefers this side.
    Cost,
    /// The adaptive policy's learned estimate prefers this side.
    Learned,
    /// The adaptive policy tries the side it knows less about.
    Explore,
    /// The local estimate is stale: this request re-measures it.
    Refresh,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Fixed => "fixed",
            Reason::Offline => "offline",
            Reason::Deadline => "deadline",
            Reason::Cost => "cost",
            Reason::Learned => "learned",
            Reason::Explore => "explore",
            Reason::Refresh => "refresh",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub choice: Choice,
    pub reason: Reason,
    /// The cost model's expected latency of each side, ms.
    pub expected_local_ms: f64,
    pub expected_remote_ms: f64,
    /// The context bucket the decision (and its outcome) belongs to.
    pub bucket: usize,
}

/// Round-trip classes (ms upper bounds) x local-load classes.
const RTT_CLASSES: [f64; 3] = [20.0, 100.0, 400.0];
const LOAD_CLASSES: [f64; 1] = [0.6];
const BUCKETS: usize = (RTT_CLASSES.len() + 1) * (LOAD_CLASSES.len() + 1);

/// Discounted statistics of one arm in one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Arm {
    /// Discounted count and sum of the cost model's errors (observed minus expected latency).
    n: f64,
    sum: f64,
}

impl Arm {
    fn mean(&self) -> Option<f64> {
        (self.n > 1e-9).then(|| self.sum / self.n)
    }
}

/// The policy; one per model (or stream).
#[derive(Debug, Clone)]
pub struct Policy {
    cfg: PolicyConfig,
    arms: [[Arm; 2]; BUCKETS],
}

/// The context: the expected network time of this request (round trip and transfer of its
/// payload, so a thin uplink is not mistaken for a fast one with the same round trip) and the
/// CPU load.
fn bucket(e: &Estimates) -> usize {
    let network_ms = e.rtt_ms + transfer_ms(e);
    let rtt = RTT_CLASSES.iter().filter(|&&b| network_ms >= b).count();
    let load = LOAD_CLASSES.iter().filter(|&&b| e.cpu_load >= b).count();
    rtt * (LOAD_CLASSES.len() + 1) + load
}

/// Time to send the payload at the measured uplink throughput, ms (0: throughput unknown).
fn transfer_ms(e: &Estimates) -> f64 {
    if e.uplink_bps > 0.0 {
        e.payload_bytes as f64 / e.uplink_bps * 1000.0
    } else {
        0.0
    }
}

fn arm_index(c: Choice) -> usize {
    match c {
        Choice::Local => 0,
        Choice::Offload => 1,
    }
}

impl Policy {
    pub fn new(cfg: PolicyConfig) -> Policy {
        Policy {
            cfg,
            arms: [[Arm::default(); 2]; BUCKETS],
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Expected latency (ms) of each side under the cost model.
    pub fn expected(e: &Estimates) -> (f64, f64) {
        let local = e.local_ms.max(0.0) * (1.0 + f64::from(e.local_queue));
        let workers = f64::from(e.remote_workers.max(1));
        let remote = e.rtt_ms.max(0.0)
            + transfer_ms(e)
            + e.remote_ms.max(0.0) * (1.0 + f64::from(e.remote_queue) / workers);
        (local, remote)
    }

    fn cost(&self, e: &Estimates, choice: Choice, latency_ms: f64) -> f64 {
        let energy_mj = match choice {
            Choice::Local => latency_ms * self.cfg.cpu_mw / 1000.0,
            Choice::Offload => {
                e.payload_bytes as f64 * self.cfg.radio_nj_per_byte / 1e6
                    + latency_ms * self.cfg.idle_mw / 1000.0
            }
        };
        self.cfg.latency_weight * latency_ms + self.cfg.energy_weight * energy_mj
    }

    /// Decides for one request.
    pub fn decide(&self, e: &Estimates) -> Decision {
        let (local_ms, remote_ms) = Self::expected(e);
        let b = bucket(e);
        let decision = |choice, reason| Decision {
            choice,
            reason,
            expected_local_ms: local_ms,
            expected_remote_ms: remote_ms,
            bucket: b,
        };
        match self.cfg.mode {
            Mode::Local => return decision(Choice::Local, Reason::Fixed),
            _ if !e.online => return decision(Choice::Local, Reason::Offline),
            Mode::Offload => return decision(Choice::Offload, Reason::Fixed),
            Mode::Cost | Mode::Adaptive => {}
        }
        let deadline = self.cfg.deadline_ms;
        if deadline > 0.0 {
            match (local_ms <= deadline, remote_ms <= deadline) {
                (true, false) => return decision(Choice::Local, Reason::Deadline),
                (false, true) => return decision(Choice::Offload, Reason::Deadline),
                _ => {}
            }
        }
        let by_cost =
            if self.cost(e, Choice::Local, local_ms) <= self.cost(e, Choice::Offload, remote_ms) {
                Choice::Local
            } else {
                Choice::Offload
            };
        if self.cfg.mode == Mode::Cost {
            return self.refreshed(e, decision(by_cost, Reason::Cost));
        }
        // Adaptive: each arm's learned latency (the model's prediction, worth one observation,
        // when unobserved), minus an exploration bonus that grows as the arm's discounted count
        // decays, so an arm abandoned long ago is tried again.
        let arms = &self.arms[b];
        let total: f64 = arms
            .iter()
            .map(|a| a.n)
            .sum::<f64>()
            .max(std::f64::consts::E);
        // The arm's learned latency: the model's prediction now, corrected by how wrong it was
        // on this side in this context before.
        let mean_of =
            |c: Choice, predicted: f64| predicted + arms[arm_index(c)].mean().unwrap_or(0.0);
        let scale = mean_of(Choice::Local, local_ms)
            .max(mean_of(Choice::Offload, remote_ms))
            .max(1.0);
        let score = |c: Choice, predicted: f64| {
            let a = arms[arm_index(c)];
            let mean = mean_of(c, predicted);
            let n = if a.mean().is_some() {
                a.n.max(1e-6)
            } else {
                1.0
            };
            let bonus = self.cfg.exploration * scale * (total.ln() / n).sqrt();
            (
                self.cost(e, c, mean),
                self.cost(e, c, mean - bonus),
                a.mean().is_some(),
            )
        };
        let (l_cost, l_lcb, _) = score(Choice::Local, local_ms);
        let (r_cost, r_lcb, _) = score(Choice::Offload, remote_ms);
        let choice = if l_lcb <= r_lcb {
            Choice::Local
        } else {
            Choice::Offload
        };
        let greedy = if l_cost <= r_cost {
            Choice::Local
        } else {
            Choice::Offload
        };
        let reason = if choice != greedy {
            Reason::Explore
        } else if arms.iter().any(|a| a.mean().is_some()) {
            Reason::Learned
        } else {
            Reason::Cost
        };
        self.refreshed(e, decision(choice, reason))
    }

    /// `d`, or a local run when it would offload while the local estimate is stale.
    fn refreshed(&self, e: &Estimates, d: Decision) -> Decision {
        let stale = self.cfg.refresh_ms > 0.0 && e.local_age_ms >= self.cfg.refresh_ms;
        if d.choice == Choice::Offload && stale && e.local_ms > 0.0 {
            Decision {
                choice: Choice::Local,
                reason: Reason::Refresh,
                ..d
            }
        } else {
            d
        }
    }

    /// Records what a decision cost (end-to-end latency, including a fallback after a timeout):
    /// the chosen arm learns the cost model's error, observed minus expected.
    pub fn observe(&mut self, d: &Decision, latency_ms: f64) {
        if self.cfg.mode != Mode::Adaptive || !latency_ms.is_finite() || latency_ms < 0.0 {
            return;
        }
        let g = self.cfg.discount.clamp(0.0, 1.0);
        for arm in &mut self.arms[d.bucket] {
            arm.n *= g;
            arm.sum *= g;
        }
        let expected = match d.choice {
            Choice::Local => d.expected_local_ms,
            Choice::Offload => d.expected_remote_ms,
        };
        let arm = &mut self.arms[d.bucket][arm_index(d.choice)];
        arm.n += 1.0;
        arm.sum += latency_ms - expected;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn online(local_ms: f64, rtt_ms: f64) -> Estimates {
        Estimates {
            local_ms,
            payload_bytes: 1000,
            online: true,
            rtt_ms,
            uplink_bps: 1e6,
            remote_ms: 2.0,
            remote_workers: 2,
            ..Estimates::default()
        }
    }

    fn cfg(mode: Mode) -> PolicyConfig {
        PolicyConfig {
            mode,
            ..PolicyConfig::default()
        }
    }

    #[test]
    fn offline_is_always_local_and_fixed_modes_are_fixed() {
        for mode in [Mode::Offload, Mode::Cost, Mode::Adaptive] {
            let mut e = online(100.0, 1.0);
            e.online = false;
            let d = Policy::new(cfg(mode)).decide(&e);
            assert_eq!(
                (d.choice, d.reason),
                (Choice::Local, Reason::Offline),
                "{mode:?}"
            );
        }
        let e = online(100.0, 1.0);
        assert_eq!(
            Policy::new(cfg(Mode::Local)).decide(&e).choice,
            Choice::Local
        );
        assert_eq!(
            Policy::new(cfg(Mode::Offload)).decide(&e).choice,
            Choice::Offload
        );
    }

    #[test]
    fn cost_model_follows_the_link_and_the_load() {
        let p = Policy::new(cfg(Mode::Cost));
        // Slow device, fast link: offload.
        assert_eq!(p.decide(&online(50.0, 5.0)).choice, Choice::Offload);
        // Fast device, slow link: local.
        assert_eq!(p.decide(&online(5.0, 200.0)).choice, Choice::Local);
        // A local queue makes the device slower.
        let mut e = online(10.0, 15.0);
        assert_eq!(p.decide(&e).choice, Choice::Local);
        e.local_queue = 3;
        assert_eq!(p.decide(&e).choice, Choice::Offload);
        // A busy coordinator makes offloading slower.
        e.remote_queue = 100;
        assert_eq!(p.decide(&e).choice, Choice::Local);
        // A big payload on a thin uplink too.
        let mut e = online(20.0, 5.0);
        e.payload_bytes = 100_000;
        e.uplink_bps = 100_000.0;
        assert_eq!(p.decide(&e).choice, Choice::Local);
    }

    #[test]
    fn energy_weight_prefers_the_radio_for_long_computations() {
        let mut c = cfg(Mode::Cost);
        c.latency_weight = 0.0;
        c.energy_weight = 1.0;
        let p = Policy::new(c);
        // Same latency both ways: local burns CPU power, offloading idles.
        let e = online(30.0, 26.0);
        let d = p.decide(&e);
        assert_eq!(d.choice, Choice::Offload, "{d:?}");
    }

    #[test]
    fn deadline_rules_out_the_side_that_misses_it() {
        let mut c = cfg(Mode::Cost);
        c.deadline_ms = 40.0;
        let p = Policy::new(c);
        let d = p.decide(&online(30.0, 60.0));
        assert_eq!((d.choice, d.reason), (Choice::Local, Reason::Deadline));
    }

    /// The world the adaptive policy lives in: true latencies the estimates get wrong.
    fn run(
        p: &mut Policy,
        e: &Estimates,
        true_local: f64,
        true_remote: f64,
        steps: usize,
    ) -> usize {
        let mut offloaded = 0;
        for _ in 0..steps {
            let d = p.decide(e);
            let latency = match d.choice {
                Choice::Local => true_local,
                Choice::Offload => {
                    offloaded += 1;
                    true_remote
                }
            };
            p.observe(&d, latency);
        }
        offloaded
    }

    #[test]
    fn adaptive_corrects_a_wrong_model_and_follows_a_change() {
        let mut p = Policy::new(cfg(Mode::Adaptive));
        // The probe says the link is quick (10 ms RTT) but every offload really takes 80 ms
        // (e.g. a congested broker): the model would offload, the adaptive policy learns not to.
        let e = online(30.0, 10.0);
        assert_eq!(
            Policy::new(cfg(Mode::Cost)).decide(&e).choice,
            Choice::Offload
        );
        let offloaded = run(&mut p, &e, 30.0, 80.0, 200);
        let tail = run(&mut p, &e, 30.0, 80.0, 100);
        assert!(
            offloaded < 60 && tail < 10,
            "offloaded {offloaded}, then {tail} of 100"
        );
        // The congestion clears (offloading now 12 ms): it comes back to offloading.
        run(&mut p, &e, 30.0, 12.0, 200);
        let tail = run(&mut p, &e, 30.0, 12.0, 100);
        assert!(tail > 80, "offloaded {tail} of 100 after the change");
    }

    #[test]
    fn a_stale_local_estimate_is_measured_again_once() {
        let p = Policy::new(cfg(Mode::Cost));
        // Measured slow under load, long ago: one request runs here to measure it again.
        let mut e = online(50.0, 5.0);
        e.local_age_ms = 6_000.0;
        let d = p.decide(&e);
        assert_eq!((d.choice, d.reason), (Choice::Local, Reason::Refresh));
        // Just measured: offload as the model says.
        e.local_age_ms = 10.0;
        assert_eq!(p.decide(&e).choice, Choice::Offload);
        // Never measured (0 ms estimate) is already local; a deadline is not overridden.
        let mut c = cfg(Mode::Cost);
        c.deadline_ms = 40.0;
        e.local_age_ms = f64::INFINITY;
        let d = Policy::new(c).decide(&e);
        assert_eq!((d.choice, d.reason), (Choice::Offload, Reason::Deadline));
    }

    #[test]
    fn buckets_separate_link_and_load_classes() {
        let mut a = online(10.0, 5.0);
        let mut b = a;
        b.rtt_ms = 500.0;
        assert_ne!(bucket(&a), bucket(&b));
        a.cpu_load = 0.9;
        assert_ne!(bucket(&a), bucket(&online(10.0, 5.0)));
        assert!(bucket(&b) < BUCKETS && bucket(&a) < BUCKETS);
    }
}
