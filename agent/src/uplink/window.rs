//! What the uplink has handed to rumqttc, in two stages. No I/O: the uplink feeds it events
//! and the clock.
//!
//! 1. Publishes until their PUBACK: rumqttc reports `Outgoing::Publish(pkid)` in the order
//!    publishes were handed to it, which maps a PUBACK's packet id back to an outbox key. This
//!    in-flight window paces the link.
//! 2. Outbox messages the broker took, until the coordinator's end-to-end ack
//!    (`protocol::v1::ack`): only that ack lets the outbox delete a message, since a broker
//!    that loses its sessions PUBACKs messages the coordinator never gets. At most
//!    `max_unacked` wait at once; when a class's oldest has waited `ack_timeout` and the
//!    coordinator has committed nothing of that class for `ack_timeout` either, the class is
//!    sent again from its oldest stored message (the coordinator drops duplicates) and the
//!    timeout doubles, up to [`MAX_ACK_TIMEOUT`], until an ack comes. An ack sets it back to
//!    `ack_timeout` or [`RTT_FACTOR`] times the smoothed time acks have taken, whichever is
//!    longer, up to [`RTT_CEILING`] times `ack_timeout`: a coordinator that is slow but
//!    working (a fleet registering at once puts it 10 to 30 s behind) is not sent everything
//!    again each time its acks come a little later than the configured timeout; the
//!    smoothing rises at once with a slow ack and falls slowly. A class the coordinator
//!    keeps committing is working through its backlog in order (the broker keeps a
//!    publisher's order per topic): resending it would only queue every waiting message a
//!    second time behind the first. (A device whose first message waits behind other devices'
//!    backlog still times out: `bench fl-large` with 10 agents sending 20 MB updates at once.)
//!    A resend hint from the coordinator (it holds back a message for an earlier one it
//!    lacks) rewinds that class at once, at most once per [`HINT_HOLDOFF`].
//! 3. Probing: a new connection (a restart or a reconnect) sends each class one message, its
//!    oldest, and no more until the coordinator acknowledges it. The messages an earlier
//!    connection left in the broker's queue mostly reach the coordinator before the probe (a
//!    broker keeps a publisher's order per topic, and most of a class is one topic), and the
//!    ack of the probe reaches the class's chain head (`protocol::v1::ack`), so the rest of the
//!    class goes out without resending what was only slow. Without this, a device restarting
//!    while the coordinator is behind resends up to `max_unacked` per class each time, which
//!    puts the coordinator further behind. A probe unanswered for `ack_timeout` (the
//!    coordinator is away, or far behind) ends probing: the class is sent as before, so new
//!    messages still reach the broker while the coordinator is down.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use protocol::v1::Class;

use crate::outbox::Key;

/// The longest the ack timeout backs off to while nothing is acknowledged.
pub const MAX_ACK_TIMEOUT: Duration = Duration::from_secs(300);
/// After an ack, the timeout is at least this many times the smoothed ack time...
pub const RTT_FACTOR: u32 = 3;
/// ...and at most this many times the configured `ack_timeout` (an ack after an outage of
/// the coordinator measures the outage, not how slow it is).
pub const RTT_CEILING: u32 = 4;
/// A class rewound less than this long ago ignores further resend hints: the messages the
/// coordinator holds back were mostly sent before the rewind, and each would ask again.
pub const HINT_HOLDOFF: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct SendWindow {
    capacity: usize,
    max_unacked: usize,
    /// Last seq handed out per class since the connection or the class's last rewind.
    cursors: [Option<u64>; 4],
    /// Publishes handed to rumqttc, not yet reported as written; `None` for non-outbox ones.
    unsent: VecDeque<Option<Key>>,
    /// Written publishes awaiting PUBACK, by packet id.
    inflight: HashMap<u16, Key>,
    /// Outbox messages the broker acknowledged, awaiting the coordinator, with the PUBACK time.
    awaiting: BTreeMap<Key, Instant>,
    /// `awaiting` in PUBACK order per class; entries no longer in `awaiting` (or with another
    /// time) are stale and skipped.
    order: [VecDeque<(Instant, Key)>; 4],
    /// When the coordinator last committed a message of each class.
    progress: [Option<Instant>; 4],
    rewound: [Option<Instant>; 4],
    /// Classes that send one message until the coordinator acknowledges it.
    probing: [bool; 4],
    /// The probe each probing class has out, if any.
    probe: [Option<u64>; 4],
    base_timeout: Duration,
    timeout: Duration,
    /// Smoothed time from the broker's PUBACK to the coordinator's ack (see the module docs).
    srtt: Option<Duration>,
}

impl SendWindow {
    pub fn new(capacity: usize, max_unacked: usize, ack_timeout: Duration) -> Self {
        SendWindow {
            capacity,
            max_unacked,
            cursors: [None; 4],
            unsent: VecDeque::new(),
            inflight: HashMap::new(),
            awaiting: BTreeMap::new(),
            order: Default::default(),
            progress: [None; 4],
            rewound: [None; 4],
            probing: [true; 4],
            probe: [None; 4],
            base_timeout: ack_timeout,
            timeout: ack_timeout,
            srtt: None,
        }
    }

    /// Room for another outbox publish: the in-flight window and the unacknowledged budget.
    pub fn has_room(&self) -> bool {
        self.unsent.iter().filter(|k| k.is_some()).count() + self.inflight.len() < self.capacity
            && self.awaiting.len() < self.max_unacked
    }

    pub fn cursor(&self, class: Class) -> Option<u64> {
        self.cursors[class.index()]
    }

    /// Whether `class` may hand out another message: not while its probe is out.
    pub fn may_hand(&self, class: Class) -> bool {
        let i = class.index();
        !self.probing[i] || self.probe[i].is_none()
    }

    /// Whether `class` is probing (see the module docs).
    pub fn probing(&self, class: Class) -> bool {
        self.probing[class.index()]
    }

    /// An outbox message was handed to the client.
    pub fn handed(&mut self, key: Key) {
        let i = key.class.index();
        if self.probing[i] {
            self.probe[i] = Some(key.seq);
        }
        self.cursors[i] = Some(key.seq);
        self.unsent.push_back(Some(key));
    }

    /// A publish that is not from the outbox (status) was handed to the client.
    pub fn handed_other(&mut self) {
        self.unsent.push_back(None);
    }

    /// Advances the cursor past a message that was dropped instead of sent.
    pub fn handed_skip(&mut self, key: Key) {
        self.cursors[key.class.index()] = Some(key.seq);
    }

    /// The client wrote the next publish with this packet id.
    pub fn written(&mut self, pkid: u16) {
        if let Some(Some(key)) = self.unsent.pop_front() {
            self.inflight.insert(pkid, key);
        }
    }

    /// The broker acknowledged `pkid`: the outbox key, if it was ours. It now awaits the
    /// coordinator, unless `stored` says the outbox no longer holds it (the coordinator's
    /// ack overtook the broker's, or it expired or was evicted meanwhile: a probe gone that
    /// way is no probe, and the class's next message becomes one).
    pub fn acked(&mut self, pkid: u16, now: Instant, stored: impl Fn(Key) -> bool) -> Option<Key> {
        let key = self.inflight.remove(&pkid)?;
        if stored(key) {
            self.awaiting.insert(key, now);
            self.order[key.class.index()].push_back((now, key));
        } else if self.probe[key.class.index()] == Some(key.seq) {
            self.probe[key.class.index()] = None;
        }
        Some(key)
    }

    /// The coordinator committed every message of `class` in `from..=to` (at `now`), whether
    /// the outbox still holds it or not. The ack of a class's probe ends its probing; an ack
    /// also resets the timeout's backoff (to what acks take lately) and puts off the class's
    /// timeout (see the module docs).
    pub fn committed_range(&mut self, class: Class, from: u64, to: u64, now: Instant) {
        let i = class.index();
        self.progress[i] = Some(now);
        if self.probe[i].is_some_and(|p| (from..=to).contains(&p)) {
            self.probing[i] = false;
            self.probe[i] = None;
        }
        let done: Vec<(Key, Instant)> = self
            .awaiting
            .range(Key { class, seq: from }..=Key { class, seq: to })
            .map(|(k, t)| (*k, *t))
            .collect();
        // The longest any of them waited: the ack covers the oldest.
        let mut sample = None;
        for (k, t) in done {
            self.awaiting.remove(&k);
            sample = sample.max(Some(now.saturating_duration_since(t)));
        }
        if let Some(s) = sample {
            self.srtt = Some(match self.srtt {
                Some(r) if s <= r => (r * 7 + s) / 8,
                // Up at once: a coordinator falling behind must not be flooded meanwhile.
                _ => s,
            });
        }
        let ceiling = (self.base_timeout * RTT_CEILING)
            .min(MAX_ACK_TIMEOUT)
            .max(self.base_timeout);
        let rtt = self.srtt.unwrap_or_default() * RTT_FACTOR;
        self.timeout = rtt.clamp(self.base_timeout, ceiling);
    }

    /// Messages waiting for the coordinator.
    pub fn awaiting(&self) -> usize {
        self.awaiting.len()
    }

    /// When the first class is overdue: its oldest waiting message has waited the timeout,
    /// and so has its last commit; `None` when nothing waits.
    pub fn deadline(&mut self) -> Option<Instant> {
        Class::ALL
            .into_iter()
            .filter_map(|c| self.class_deadline(c))
            .min()
    }

    fn class_deadline(&mut self, class: Class) -> Option<Instant> {
        let i = class.index();
        while let Some((t, k)) = self.order[i].front() {
            if self.awaiting.get(k) == Some(t) {
                let since = self.progress[i].map_or(*t, |p| p.max(*t));
                return Some(since + self.timeout);
            }
            self.order[i].pop_front();
        }
        None
    }

    /// Nothing was acknowledged in time: every overdue class ([`SendWindow::deadline`]) is
    /// sent again from its oldest, without probing (an unanswered probe ends it), and the
    /// timeout backs off. Returns how many of their messages were waiting.
    pub fn timed_out(&mut self, now: Instant) -> usize {
        let overdue: Vec<Class> = Class::ALL
            .into_iter()
            .filter(|&c| self.class_deadline(c).is_some_and(|d| d <= now))
            .collect();
        let mut waiting = 0;
        for class in overdue {
            waiting += self.awaiting.keys().filter(|k| k.class == class).count();
            self.rewind(class, now);
            self.probing[class.index()] = false;
        }
        self.timeout = (self.timeout * 2).min(MAX_ACK_TIMEOUT.max(self.base_timeout));
        waiting
    }

    /// The coordinator holds back a message of `class`: send the class again from its oldest
    /// stored message, unless it was rewound within [`HINT_HOLDOFF`]. True if rewound.
    pub fn resend_hint(&mut self, class: Class, now: Instant) -> bool {
        if self.rewound[class.index()].is_some_and(|t| now.duration_since(t) < HINT_HOLDOFF) {
            return false;
        }
        self.rewind(class, now);
        true
    }

    /// The current ack timeout (after backoff).
    pub fn ack_timeout(&self) -> Duration {
        self.timeout
    }

    fn rewind(&mut self, class: Class, now: Instant) {
        self.cursors[class.index()] = None;
        self.probe[class.index()] = None;
        self.awaiting.retain(|k, _| k.class != class);
        self.rewound[class.index()] = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(seq: u64) -> Key {
        Key {
            class: Class::Results,
            seq,
        }
    }

    #[test]
    fn window_maps_pkids_to_keys_in_order() {
        let now = Instant::now();
        let mut w = SendWindow::new(2, 100, Duration::from_secs(1));
        w.handed_other();
        w.handed(k(1));
        w.handed(k(2));
        assert!(!w.has_room());
        w.written(1); // the status publish
        w.written(2);
        w.written(3);
        assert_eq!(w.acked(1, now, |_| true), None);
        assert_eq!(w.acked(3, now, |_| true), Some(k(2)));
        assert!(w.has_room());
        assert_eq!(w.acked(2, now, |_| true), Some(k(1)));
        assert_eq!(w.cursor(Class::Results), Some(2));
        assert_eq!(w.cursor(Class::Control), None);
        assert_eq!(w.awaiting(), 2);
    }

    #[test]
    fn unacknowledged_messages_fill_their_budget_until_the_coordinator_commits() {
        let now = Instant::now();
        let mut w = SendWindow::new(8, 2, Duration::from_secs(1));
        for (pkid, seq) in [(1, 1), (2, 2)] {
            w.handed(k(seq));
            w.written(pkid);
            w.acked(pkid, now, |_| true);
        }
        assert!(!w.has_room(), "two await the coordinator");
        w.committed_range(Class::Results, 1, 1, now);
        assert!(w.has_room());
        // A PUBACK for a message the coordinator already acknowledged leaves nothing waiting.
        w.handed(k(3));
        w.written(3);
        w.acked(3, now, |key| key != k(3));
        assert_eq!(w.awaiting(), 1);
    }

    #[test]
    fn a_timeout_rewinds_the_classes_waiting_and_backs_off_until_an_ack() {
        let t0 = Instant::now();
        let mut w = SendWindow::new(8, 100, Duration::from_secs(10));
        let t = Key {
            class: Class::Telemetry,
            seq: 9,
        };
        for (pkid, key) in [(1, k(4)), (2, k(5)), (3, t)] {
            w.handed(key);
            w.written(pkid);
            w.acked(pkid, t0, |_| true);
        }
        w.handed_skip(Key {
            class: Class::Control,
            seq: 2,
        });
        assert_eq!(w.deadline(), Some(t0 + Duration::from_secs(10)));
        assert_eq!(w.timed_out(t0 + Duration::from_secs(10)), 3);
        assert_eq!(
            w.cursor(Class::Results),
            None,
            "results sent again from the oldest"
        );
        assert_eq!(w.cursor(Class::Telemetry), None);
        assert_eq!(
            w.cursor(Class::Control),
            Some(2),
            "nothing waited in control"
        );
        assert_eq!(w.deadline(), None);
        assert_eq!(w.ack_timeout(), Duration::from_secs(20));
        w.committed_range(Class::Results, 4, 4, t0);
        assert_eq!(w.ack_timeout(), Duration::from_secs(10));
        for _ in 0..20 {
            w.timed_out(t0);
        }
        assert_eq!(w.ack_timeout(), MAX_ACK_TIMEOUT);
    }

    /// Slow acks lengthen the timeout to three times what they take (at once), and faster
    /// ones bring it back slowly, never under the base nor over four times it.
    #[test]
    fn the_timeout_follows_how_long_acks_take() {
        let t0 = Instant::now();
        let mut w = SendWindow::new(8, 64, Duration::from_secs(10));
        let send = |w: &mut SendWindow, seq: u64, at: Instant| {
            let key = Key {
                class: Class::Telemetry,
                seq,
            };
            w.handed(key);
            w.written(seq as u16);
            w.acked(seq as u16, at, |_| true);
        };
        send(&mut w, 1, t0);
        w.committed_range(Class::Telemetry, 1, 1, t0 + Duration::from_secs(12));
        assert_eq!(w.ack_timeout(), Duration::from_secs(36));
        // A faster ack: an eighth of the way down.
        let t1 = t0 + Duration::from_secs(20);
        send(&mut w, 2, t1);
        w.committed_range(Class::Telemetry, 2, 2, t1 + Duration::from_secs(4));
        assert_eq!(w.ack_timeout(), Duration::from_secs(33));
        // An ack with nothing waiting (a duplicate ack) changes nothing.
        w.committed_range(Class::Telemetry, 2, 2, t1 + Duration::from_secs(60));
        assert_eq!(w.ack_timeout(), Duration::from_secs(33));
        // Many fast acks: back to the base, not under it.
        for seq in 3..60 {
            let t = t1 + Duration::from_secs(seq);
            send(&mut w, seq, t);
            w.committed_range(Class::Telemetry, seq, seq, t);
        }
        assert_eq!(w.ack_timeout(), Duration::from_secs(10));
        // Backoff still doubles from there; an ack after a long outage sets four times the
        // base, not what the outage took.
        w.timed_out(t1);
        assert_eq!(w.ack_timeout(), Duration::from_secs(20));
        send(&mut w, 100, t1);
        w.committed_range(Class::Telemetry, 100, 100, t1 + Duration::from_secs(1000));
        assert_eq!(w.ack_timeout(), Duration::from_secs(40));
    }

    /// A coordinator working through a backlog commits a class's messages slowly but in
    /// order: that class is not sent again while its commits keep coming, and a class with
    /// none is.
    #[test]
    fn a_class_the_coordinator_keeps_committing_is_not_sent_again() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = SendWindow::new(8, 100, s(10));
        let t = Key {
            class: Class::Telemetry,
            seq: 1,
        };
        for (pkid, key) in [(1, k(1)), (2, k(2)), (3, k(3)), (4, t)] {
            w.handed(key);
            w.written(pkid);
            w.acked(pkid, t0, |_| true);
        }
        // An ack that took 8 s: the timeout is 24 s from now on (three times that).
        w.committed_range(Class::Results, 1, 1, t0 + s(8));
        assert_eq!(w.ack_timeout(), s(24));
        assert_eq!(w.deadline(), Some(t0 + s(24)), "telemetry has no commit");
        assert_eq!(w.timed_out(t0 + s(24)), 1);
        assert_eq!(w.cursor(Class::Telemetry), None, "telemetry sent again");
        assert_eq!(
            w.cursor(Class::Results),
            Some(3),
            "results still progressing"
        );
        // One that took 30 s: 40 s (90 s, over four times the base).
        w.committed_range(Class::Results, 2, 2, t0 + s(30));
        assert_eq!(w.deadline(), Some(t0 + s(70)));
        // Commits stop: the rest of the class goes again.
        assert_eq!(w.timed_out(t0 + s(70)), 1);
        assert_eq!(w.cursor(Class::Results), None);
        assert_eq!(w.deadline(), None);
    }

    #[test]
    fn a_new_window_probes_each_class_with_one_message_until_it_is_acknowledged() {
        let t0 = Instant::now();
        let mut w = SendWindow::new(8, 100, Duration::from_secs(10));
        let control = Key {
            class: Class::Control,
            seq: 1,
        };
        assert!(w.may_hand(Class::Results) && w.may_hand(Class::Control));
        // An unframeable message skipped is not a probe.
        w.handed_skip(k(2));
        assert!(w.may_hand(Class::Results));
        w.handed(k(3));
        assert!(!w.may_hand(Class::Results), "the probe is out");
        assert!(w.may_hand(Class::Control), "classes probe independently");
        w.handed(control);
        w.written(1);
        w.written(2);
        w.acked(1, t0, |_| true);
        // Acks for later messages (left in the broker by an earlier connection) do not end it.
        w.committed_range(Class::Results, 4, 4, t0);
        assert!(!w.may_hand(Class::Results));
        // A range reaching past the probe does, even for messages no longer stored.
        w.committed_range(Class::Results, 3, 9, t0);
        assert!(w.may_hand(Class::Results) && !w.probing(Class::Results));
        assert_eq!(w.awaiting(), 0);
        w.handed(k(10));
        w.handed(k(11));
        assert!(w.may_hand(Class::Results), "the window is open");
        assert!(!w.may_hand(Class::Control));
        // A control probe the outbox dropped (expired, evicted) before its PUBACK: the next
        // message becomes the probe.
        assert_eq!(w.acked(2, t0, |_| false), Some(control));
        assert!(w.may_hand(Class::Control) && w.probing(Class::Control));
    }

    #[test]
    fn an_unanswered_probe_ends_probing_at_the_timeout() {
        let t0 = Instant::now();
        let mut w = SendWindow::new(8, 100, Duration::from_secs(10));
        w.handed(k(5));
        w.written(1);
        w.acked(1, t0, |_| true);
        assert!(!w.may_hand(Class::Results));
        // The coordinator is away: the class is sent as before, from its oldest.
        w.timed_out(t0 + Duration::from_secs(10));
        assert!(!w.probing(Class::Results));
        assert_eq!(w.cursor(Class::Results), None);
        w.handed(k(5));
        w.handed(k(6));
        assert!(w.may_hand(Class::Results));
    }

    #[test]
    fn resend_hints_rewind_a_class_at_most_once_per_holdoff() {
        let t0 = Instant::now();
        let mut w = SendWindow::new(8, 100, Duration::from_secs(10));
        w.handed(k(7));
        assert!(w.resend_hint(Class::Results, t0));
        assert_eq!(w.cursor(Class::Results), None);
        w.handed(k(7));
        assert!(!w.resend_hint(Class::Results, t0 + HINT_HOLDOFF / 2));
        assert_eq!(w.cursor(Class::Results), Some(7));
        assert!(w.resend_hint(Class::Results, t0 + HINT_HOLDOFF));
    }
}
