//! What the uplink has handed to rumqttc, in two stages. No I/O: the uplink feeds it events
//! and the clock.
//!
//! 1. Publishes until their PUBACK: rumqttc reports `Outgoing::Publish(pkid)` in the order
//!    publishes were handed to it, which maps a PUBACK's packet id back to an outbox key. This
//!    in-flight window paces the link.
//! 2. Outbox messages the broker took, until the coordinator's end-to-end ack
//!    (`protocol::v1::ack`): only that ack lets the outbox delete a message, since a broker
//!    that loses its sessions PUBACKs messages the coordinator never gets. At most
//!    `max_unacked` wait at once; when the oldest has waited `ack_timeout`, every class with
//!    waiting messages is sent again from its oldest stored message (the coordinator drops
//!    duplicates by id) and the timeout doubles, up to [`MAX_ACK_TIMEOUT`], until an ack
//!    comes. A resend hint from the coordinator (it holds back a message for an earlier one
//!    it lacks) rewinds that class at once, at most once per [`HINT_HOLDOFF`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use protocol::v1::Class;

use crate::outbox::Key;

/// The longest the ack timeout backs off to while nothing is acknowledged.
pub const MAX_ACK_TIMEOUT: Duration = Duration::from_secs(300);
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
    /// `awaiting` in PUBACK order; entries no longer in `awaiting` (or with another time) are
    /// stale and skipped.
    order: VecDeque<(Instant, Key)>,
    rewound: [Option<Instant>; 4],
    base_timeout: Duration,
    timeout: Duration,
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
            order: VecDeque::new(),
            rewound: [None; 4],
            base_timeout: ack_timeout,
            timeout: ack_timeout,
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

    /// An outbox message was handed to the client.
    pub fn handed(&mut self, key: Key) {
        self.cursors[key.class.index()] = Some(key.seq);
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
    /// ack overtook the broker's).
    pub fn acked(&mut self, pkid: u16, now: Instant, stored: impl Fn(Key) -> bool) -> Option<Key> {
        let key = self.inflight.remove(&pkid)?;
        if stored(key) {
            self.awaiting.insert(key, now);
            self.order.push_back((now, key));
        }
        Some(key)
    }

    /// The coordinator committed `key`; an ack also resets the timeout's backoff.
    pub fn committed(&mut self, key: Key) {
        self.awaiting.remove(&key);
        self.timeout = self.base_timeout;
    }

    /// Messages waiting for the coordinator.
    pub fn awaiting(&self) -> usize {
        self.awaiting.len()
    }

    /// When the oldest waiting message is overdue; `None` when nothing waits.
    pub fn deadline(&mut self) -> Option<Instant> {
        while let Some((t, k)) = self.order.front() {
            if self.awaiting.get(k) == Some(t) {
                return Some(*t + self.timeout);
            }
            self.order.pop_front();
        }
        None
    }

    /// Nothing was acknowledged in time: every class with waiting messages is sent again from
    /// its oldest, and the timeout backs off. Returns how many were waiting.
    pub fn timed_out(&mut self, now: Instant) -> usize {
        let waiting = self.awaiting.len();
        let mut classes: Vec<Class> = self.awaiting.keys().map(|k| k.class).collect();
        classes.dedup();
        for class in classes {
            self.rewind(class, now);
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
        w.committed(k(1));
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
        w.committed(k(4));
        assert_eq!(w.ack_timeout(), Duration::from_secs(10));
        for _ in 0..20 {
            w.timed_out(t0);
        }
        assert_eq!(w.ack_timeout(), MAX_ACK_TIMEOUT);
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
