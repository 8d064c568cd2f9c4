//! Outbox accounting and the admission policy: no I/O, no clock, no disk.
//!
//! # Full-outbox policy
//! When a new message does not fit in `max_bytes`:
//! 1. expired messages (any class) are removed first and counted as `expired`;
//! 2. then the oldest telemetry is evicted, oldest first, and counted as `evicted`, for a
//!    message of any class (telemetry is the only class ever dropped to make room);
//! 3. if that still does not free enough, the new message is refused with an error and
//!    counted as `refused`. Nothing already accepted outside telemetry is ever dropped.

use protocol::v1::{Class, OutboxStats};

/// Bytes a stored record is charged: its payload and topic plus a fixed per-record overhead,
/// so a flood of tiny messages cannot exceed the disk budget through sled's per-key cost.
pub fn charge(topic_len: usize, body_len: usize) -> u64 {
    (topic_len + body_len + RECORD_OVERHEAD) as u64
}

/// Approximate per-record cost in sled (key, header, node and log framing).
pub const RECORD_OVERHEAD: usize = 64;

/// What admission decided for a message of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It fits as things are.
    Fits,
    /// Expired messages exist and may free room: purge them, then ask again.
    PurgeExpired,
    /// Evict at least this many bytes of the oldest telemetry, then it fits.
    EvictTelemetry { bytes: u64 },
    /// It cannot be stored without dropping non-telemetry messages: refuse it.
    Refuse(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The single message is larger than the whole outbox.
    LargerThanCapacity,
    /// The outbox is full of messages that may not be dropped.
    Full,
}

/// Why a message left the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Delivered,
    Expired,
    Evicted,
    /// Taken back because it could not be made durable (the caller was told it was refused).
    Undone,
}

#[derive(Debug, Clone, Default)]
pub struct Accounting {
    capacity: u64,
    bytes: [u64; 4],
    count: [u64; 4],
    /// Earliest expiry among stored messages, if known; `None` means none expire. Kept as a
    /// lower bound so a full outbox does not rescan the store on every refused message.
    earliest_expiry_ms: Option<u64>,
    expired: u64,
    evicted: u64,
    refused: u64,
    delivered: u64,
}

impl Accounting {
    pub fn new(capacity: u64) -> Self {
        Accounting {
            capacity,
            ..Default::default()
        }
    }

    pub fn used(&self) -> u64 {
        self.bytes.iter().sum()
    }

    pub fn depth(&self) -> u64 {
        self.count.iter().sum()
    }

    /// Decides whether a message of `size` bytes (see [`charge`]) can be stored now.
    pub fn admit(&self, size: u64, now_ms: u64) -> Admission {
        if size > self.capacity {
            return Admission::Refuse(Refusal::LargerThanCapacity);
        }
        let free = self.capacity - self.used().min(self.capacity);
        if size <= free {
            return Admission::Fits;
        }
        if self.earliest_expiry_ms.is_some_and(|t| t <= now_ms) {
            return Admission::PurgeExpired;
        }
        let need = size - free;
        if self.bytes[Class::Telemetry.index()] >= need {
            Admission::EvictTelemetry { bytes: need }
        } else {
            Admission::Refuse(Refusal::Full)
        }
    }

    pub fn added(&mut self, class: Class, size: u64, expires_ms: Option<u64>) {
        self.bytes[class.index()] += size;
        self.count[class.index()] += 1;
        if let Some(t) = expires_ms {
            self.earliest_expiry_ms = Some(self.earliest_expiry_ms.map_or(t, |e| e.min(t)));
        }
    }

    pub fn removed(&mut self, class: Class, size: u64, why: Removal) {
        let i = class.index();
        self.bytes[i] = self.bytes[i].saturating_sub(size);
        self.count[i] = self.count[i].saturating_sub(1);
        match why {
            Removal::Delivered => self.delivered += 1,
            Removal::Expired => self.expired += 1,
            Removal::Evicted => self.evicted += 1,
            Removal::Undone => {}
        }
    }

    pub fn refused(&mut self) {
        self.refused += 1;
    }

    /// After a full scan for expired messages: the exact earliest expiry of what remains.
    pub fn set_earliest_expiry(&mut self, t: Option<u64>) {
        self.earliest_expiry_ms = t;
    }

    pub fn stats(&self) -> OutboxStats {
        OutboxStats {
            depth: self.count,
            depth_bytes: self.used(),
            capacity_bytes: self.capacity,
            expired: self.expired,
            evicted: self.evicted,
            refused: self.refused,
            delivered: self.delivered,
            awaiting_ack: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_until_full_then_evicts_only_telemetry() {
        let mut a = Accounting::new(1000);
        assert_eq!(a.admit(400, 0), Admission::Fits);
        a.added(Class::Telemetry, 400, None);
        a.added(Class::Results, 500, None);
        // 100 free: a 300-byte control message needs 200 bytes of telemetry evicted.
        assert_eq!(a.admit(300, 0), Admission::EvictTelemetry { bytes: 200 });
        a.removed(Class::Telemetry, 400, Removal::Evicted);
        assert_eq!(a.admit(300, 0), Admission::Fits);
        assert_eq!(a.stats().evicted, 1);
    }

    #[test]
    fn refuses_rather_than_dropping_other_classes() {
        let mut a = Accounting::new(1000);
        a.added(Class::Results, 900, None);
        a.added(Class::Telemetry, 50, None);
        assert_eq!(a.admit(200, 0), Admission::Refuse(Refusal::Full));
        assert_eq!(
            a.admit(1001, 0),
            Admission::Refuse(Refusal::LargerThanCapacity)
        );
        a.refused();
        assert_eq!(a.stats().refused, 1);
        assert_eq!(a.stats().depth, [0, 0, 1, 1]);
    }

    #[test]
    fn expired_messages_are_purged_before_anything_is_evicted() {
        let mut a = Accounting::new(1000);
        a.added(Class::Results, 600, Some(5_000));
        a.added(Class::Telemetry, 400, None);
        // Before the expiry: evict telemetry.
        assert_eq!(
            a.admit(100, 4_999),
            Admission::EvictTelemetry { bytes: 100 }
        );
        // After it: purge first.
        assert_eq!(a.admit(100, 5_000), Admission::PurgeExpired);
        a.removed(Class::Results, 600, Removal::Expired);
        a.set_earliest_expiry(None);
        assert_eq!(a.admit(100, 5_000), Admission::Fits);
        assert_eq!(a.stats().expired, 1);
    }

    #[test]
    fn earliest_expiry_tracks_the_minimum() {
        let mut a = Accounting::new(100);
        a.added(Class::Results, 60, Some(9));
        a.added(Class::Results, 40, Some(3));
        assert_eq!(a.admit(10, 3), Admission::PurgeExpired);
        assert_eq!(a.admit(10, 2), Admission::Refuse(Refusal::Full));
    }
}
