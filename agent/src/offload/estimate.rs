//! What the offload policy knows about the two sides, learned from outcomes: moving averages
//! of local and remote compute, and a link model (round-trip time and uplink throughput)
//! fitted to the network part of every offloaded request.
//!
//! Pure: callers pass the measurements; the live client and the trace benchmark share it, so
//! the benchmark evaluates exactly what the agent runs.

/// Exponentially weighted moving average; `None` until the first sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ewma {
    alpha: f64,
    value: Option<f64>,
}

impl Ewma {
    pub fn new(alpha: f64) -> Ewma {
        Ewma {
            alpha: alpha.clamp(0.01, 1.0),
            value: None,
        }
    }

    pub fn observe(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.value = Some(match self.value {
            None => x,
            Some(v) => v + self.alpha * (x - v),
        });
    }

    pub fn get(&self) -> Option<f64> {
        self.value
    }
}

/// Memory of the loss rate, in attempts: an outage counts once, so the rate says how often
/// the link starts failing, and one outage in this many attempts adds about `timeout / 50`
/// to the expected cost of a request.
const LOSS_MEMORY: f64 = 50.0;

/// The link as the device sees it: `network_ms = rtt + bytes / throughput`, fitted by
/// discounted least squares over the network part of answered requests and probes (end-to-end
/// time minus the coordinator's reported queue and compute time). With payloads of one size
/// only the throughput cannot be separated from the round trip; the fit then reports the mean
/// as the round trip and the throughput as unknown, which predicts that size correctly.
///
/// Unanswered attempts are kept apart from the fit. While the last attempt went unanswered the
/// link is *out* and costs what the lost attempts waited; once something is answered the
/// outage is over, and losses only weigh by how often the link starts failing (an outage counts
/// once, over the last [`LOSS_MEMORY`] attempts or so). So a flaky link (losses scattered
/// among answers) keeps a lasting penalty, while one outage stops counting as soon as the link
/// answers again instead of fading over many answers: with probes every few seconds, that fade
/// kept a recovered link looking slow for a minute. For the same reason the first answer after
/// an outage starts the fit afresh.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    discount: f64,
    n: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    /// Mean wait of lost attempts, ms (the timeout, usually).
    lost_ms: Ewma,
    /// Outages started per attempt, discounted over about [`LOSS_MEMORY`] attempts.
    loss_rate: f64,
    /// The last attempt went unanswered.
    out: bool,
}

impl Default for LinkModel {
    fn default() -> Self {
        LinkModel::new(0.8)
    }
}

impl LinkModel {
    /// `discount`: weight kept by older answers per new one (0.8: about the last 5 count).
    pub fn new(discount: f64) -> LinkModel {
        LinkModel {
            discount: discount.clamp(0.0, 0.999),
            n: 0.0,
            sx: 0.0,
            sy: 0.0,
            sxx: 0.0,
            sxy: 0.0,
            lost_ms: Ewma::new(0.5),
            loss_rate: 0.0,
            out: false,
        }
    }

    pub fn observe(&mut self, bytes: u64, network_ms: f64) {
        if !network_ms.is_finite() || network_ms < 0.0 {
            return;
        }
        // The first answer after an outage starts the fit afresh: a link that comes back may
        // come back different (another route, another access point, the congestion gone), and
        // the samples from before it would take several answers to fade.
        let g = if self.out { 0.0 } else { self.discount };
        for v in [
            &mut self.n,
            &mut self.sx,
            &mut self.sy,
            &mut self.sxx,
            &mut self.sxy,
        ] {
            *v *= g;
        }
        let x = bytes as f64;
        self.n += 1.0;
        self.sx += x;
        self.sy += network_ms;
        self.sxx += x * x;
        self.sxy += x * network_ms;
        self.attempt(false);
    }

    /// A request or probe without an answer within `ms`: the link is out until something is
    /// answered. Nothing says whether the round trip or the throughput failed, so the fit is
    /// left alone (a lost large request next to answered small probes would otherwise read as
    /// a throughput collapse that only requests, which the policy then avoids, could correct).
    pub fn observe_lost(&mut self, ms: f64) {
        if !ms.is_finite() || ms < 0.0 {
            return;
        }
        self.lost_ms.observe(ms);
        self.attempt(true);
    }

    fn attempt(&mut self, lost: bool) {
        // An outage starts with its first loss; the ones after it are the same outage.
        let started = lost && !self.out;
        self.loss_rate += (f64::from(u8::from(started)) - self.loss_rate) / LOSS_MEMORY;
        self.out = lost;
    }

    /// The last attempt went unanswered (and nothing was answered since).
    pub fn is_out(&self) -> bool {
        self.out
    }

    /// How often an attempt starts an outage, 0..1.
    pub fn loss_rate(&self) -> f64 {
        self.loss_rate
    }

    /// (round trip ms, ms per byte): the answered samples' fit, with the cost of losses.
    fn fit(&self) -> (f64, f64) {
        let lost = self.lost_ms.get().unwrap_or(0.0);
        if self.out || self.n <= 1e-9 {
            // Out, or never answered: what the lost attempts waited.
            return (lost, 0.0);
        }
        let (rtt, slope) = self.answered_fit();
        let p = self.loss_rate.clamp(0.0, 1.0);
        ((1.0 - p) * rtt + p * lost, (1.0 - p) * slope)
    }

    /// The fit of answered samples; the slope is 0 when sizes did not vary enough.
    fn answered_fit(&self) -> (f64, f64) {
        if self.n <= 1e-9 {
            return (0.0, 0.0);
        }
        let mx = self.sx / self.n;
        let my = self.sy / self.n;
        let var = self.sxx / self.n - mx * mx;
        // Sizes must spread by at least ~10% of their mean for a slope to mean anything.
        if var <= (0.1 * mx).powi(2) || var <= 1.0 {
            return (my, 0.0);
        }
        let slope = (self.sxy / self.n - mx * my) / var;
        if slope <= 0.0 {
            return (my, 0.0);
        }
        let rtt = my - slope * mx;
        if rtt < 0.0 {
            // The line crosses below zero: all of it is throughput.
            return (0.0, my / mx.max(1.0));
        }
        (rtt, slope)
    }

    /// Round trip, ms (0 when never measured).
    pub fn rtt_ms(&self) -> f64 {
        self.fit().0
    }

    /// Uplink throughput, bytes/s (0: unknown).
    pub fn uplink_bps(&self) -> f64 {
        match self.fit().1 {
            s if s > 0.0 => 1000.0 / s,
            _ => 0.0,
        }
    }

    /// Expected network time of a request of `bytes`, ms.
    pub fn predict_ms(&self, bytes: u64) -> f64 {
        let (rtt, slope) = self.fit();
        rtt + slope * bytes as f64
    }
}

/// What the device learned about one offloadable model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelKnowledge {
    /// Local run time, ms.
    pub local_ms: Ewma,
    /// End-to-end time of answered offloads, ms.
    pub remote_ms: Ewma,
    /// The coordinator's compute time, as its answers report it, ms.
    pub remote_compute_ms: Ewma,
}

impl Default for ModelKnowledge {
    fn default() -> Self {
        ModelKnowledge {
            local_ms: Ewma::new(0.2),
            remote_ms: Ewma::new(0.2),
            remote_compute_ms: Ewma::new(0.2),
        }
    }
}

/// What the policy cannot learn from outcomes: measured now, or advertised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Context {
    pub payload_bytes: u64,
    pub local_queue: u32,
    pub cpu_load: f64,
    /// Connected, with a fresh capacity advert naming the model.
    pub online: bool,
    pub remote_workers: u32,
    pub remote_queue: u32,
    /// The adverts' compute time for the model, ms.
    pub advert_compute_ms: Option<f64>,
    /// Time since the model last ran here, ms (infinite: never).
    pub local_age_ms: f64,
}

impl Default for Context {
    fn default() -> Self {
        Context {
            payload_bytes: 0,
            local_queue: 0,
            cpu_load: 0.0,
            online: false,
            remote_workers: 0,
            remote_queue: 0,
            advert_compute_ms: None,
            local_age_ms: f64::INFINITY,
        }
    }
}

/// Probe interval during an outage, ms.
pub const OUTAGE_PROBE_MS: f64 = 1000.0;

/// Everything the device learned: the link and each model's two sides. The live client and
/// the trace benchmark feed it the same way.
#[derive(Debug, Clone, Default)]
pub struct Knowledge {
    pub link: LinkModel,
    pub models: std::collections::BTreeMap<String, ModelKnowledge>,
}

impl Knowledge {
    fn model(&mut self, model: &str) -> &mut ModelKnowledge {
        self.models.entry(model.to_owned()).or_default()
    }

    pub fn observe_local(&mut self, model: &str, ms: f64) {
        self.model(model).local_ms.observe(ms);
    }

    /// An answered offload: `total_ms` from sending to the answer, of which the coordinator
    /// says it spent `queue_ms` queued and `compute_ms` computing.
    pub fn observe_remote(
        &mut self,
        model: &str,
        bytes: u64,
        total_ms: f64,
        queue_ms: f64,
        compute_ms: f64,
    ) {
        self.link
            .observe(bytes, (total_ms - queue_ms - compute_ms).max(0.0));
        let m = self.model(model);
        m.remote_ms.observe(total_ms);
        m.remote_compute_ms.observe(compute_ms);
    }

    /// A request or probe with no answer within `timeout_ms`: the link cost at least that.
    pub fn observe_timeout(&mut self, timeout_ms: f64) {
        self.link.observe_lost(timeout_ms);
    }

    /// How long the link may go unmeasured before a probe (`interval_ms` from the config):
    /// during an outage at most [`OUTAGE_PROBE_MS`], so its end is noticed within a second.
    pub fn probe_interval_ms(&self, interval_ms: f64) -> f64 {
        if self.link.is_out() {
            interval_ms.min(OUTAGE_PROBE_MS)
        } else {
            interval_ms
        }
    }

    /// A probe's answer: only the link is measured.
    pub fn observe_probe(&mut self, bytes: u64, total_ms: f64, queue_ms: f64) {
        self.link.observe(bytes, (total_ms - queue_ms).max(0.0));
    }

    /// What the policy sees for `model` now.
    pub fn estimates(&self, model: &str, c: &Context) -> super::policy::Estimates {
        let m = self.models.get(model).copied().unwrap_or_default();
        let local_ms = m.local_ms.get().unwrap_or(0.0);
        super::policy::Estimates {
            local_ms,
            local_age_ms: c.local_age_ms,
            local_queue: c.local_queue,
            cpu_load: c.cpu_load,
            payload_bytes: c.payload_bytes,
            online: c.online,
            rtt_ms: self.link.rtt_ms(),
            uplink_bps: self.link.uplink_bps(),
            // Never measured: the advert's figure, else as fast as here (same model).
            remote_ms: m
                .remote_compute_ms
                .get()
                .or(c.advert_compute_ms)
                .unwrap_or(local_ms),
            remote_queue: c.remote_queue,
            remote_workers: c.remote_workers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_starts_at_the_first_sample_and_follows() {
        let mut e = Ewma::new(0.5);
        assert_eq!(e.get(), None);
        e.observe(10.0);
        assert_eq!(e.get(), Some(10.0));
        e.observe(20.0);
        assert_eq!(e.get(), Some(15.0));
        e.observe(f64::NAN);
        assert_eq!(e.get(), Some(15.0));
    }

    #[test]
    fn link_model_separates_round_trip_and_throughput() {
        let mut l = LinkModel::new(0.95);
        // 20 ms round trip, 100 kB/s: 0.01 ms per byte.
        for i in 0..40u64 {
            let bytes = 1_000 + (i % 5) * 2_000;
            l.observe(bytes, 20.0 + bytes as f64 * 0.01);
        }
        assert!((l.rtt_ms() - 20.0).abs() < 0.5, "{}", l.rtt_ms());
        assert!(
            (l.uplink_bps() - 100_000.0).abs() < 2_000.0,
            "{}",
            l.uplink_bps()
        );
        assert!((l.predict_ms(50_000) - 520.0).abs() < 10.0);
    }

    #[test]
    fn one_payload_size_predicts_that_size() {
        let mut l = LinkModel::default();
        for _ in 0..10 {
            l.observe(4_000, 35.0);
        }
        assert!((l.predict_ms(4_000) - 35.0).abs() < 1e-6);
        assert_eq!(l.uplink_bps(), 0.0);
    }

    #[test]
    fn an_outage_costs_the_timeout_until_something_is_answered() {
        let mut l = LinkModel::new(0.8);
        for i in 0..20u64 {
            l.observe(if i % 2 == 0 { 25 } else { 400 }, 2.0);
        }
        for _ in 0..10 {
            l.observe_lost(1000.0);
        }
        assert!(l.is_out());
        assert_eq!(l.uplink_bps(), 0.0, "no slope from a timeout");
        assert!((l.predict_ms(400) - 1000.0).abs() < 1e-6);
        // One answered probe ends it: ten losses in a row were one outage, which only adds
        // its share of the timeout; the link that came back is measured afresh.
        l.observe(400, 2.0);
        assert!(!l.is_out());
        assert!(l.predict_ms(400) < 25.0, "{}", l.predict_ms(400));
        assert!(l.predict_ms(400) > 2.0, "an outage leaves a trace");
    }

    #[test]
    fn a_flaky_link_keeps_its_penalty() {
        let mut l = LinkModel::new(0.8);
        // One attempt in five lost, for a long time (the last one answered).
        for i in 0..301 {
            if i % 5 == 4 {
                l.observe_lost(1000.0);
            } else {
                l.observe(4_000, 2.0);
            }
        }
        assert!(!l.is_out());
        assert!((l.loss_rate() - 0.2).abs() < 0.05, "{}", l.loss_rate());
        assert!(l.predict_ms(4_000) > 100.0, "{}", l.predict_ms(4_000));
    }

    #[test]
    fn probes_come_faster_during_an_outage() {
        let mut k = Knowledge::default();
        assert_eq!(k.probe_interval_ms(5000.0), 5000.0);
        k.observe_timeout(1000.0);
        assert_eq!(k.probe_interval_ms(5000.0), OUTAGE_PROBE_MS);
        k.observe_probe(40, 3.0, 0.0);
        assert_eq!(k.probe_interval_ms(5000.0), 5000.0);
    }

    #[test]
    fn link_model_forgets_an_old_link() {
        let mut l = LinkModel::new(0.8);
        for _ in 0..20 {
            l.observe(4_000, 5.0);
        }
        for _ in 0..20 {
            l.observe(4_000, 200.0);
        }
        assert!(l.predict_ms(4_000) > 190.0, "{}", l.predict_ms(4_000));
    }
}
