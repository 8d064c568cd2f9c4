//! Per device and class, the highest seq below which everything the device held is known to
//! be committed: what lets a duplicate's ack reach past it (`protocol::v1::ack`, "Chains").
//!
//! In memory only. After a restart a chain starts again at the first JSON message of a class
//! that names no `prev` or follows one already chained; until then acks name single messages,
//! which is slower for a device resending a backlog but never wrong.

use std::collections::HashMap;

use protocol::v1::Class;
use protocol::v1::ack::Header;

#[derive(Debug, Default)]
pub struct Chains {
    /// device -> per class (`Class::index`): (outbox incarnation, chained seq).
    heads: HashMap<String, [Option<(u64, u64)>; Class::ALL.len()]>,
}

impl Chains {
    /// `h` passed the order check (its `prev` is committed) and is committed now. Returns
    /// the highest seq its ack may name: `h.seq`, or the chain's head if that is further.
    pub fn committed(&mut self, device: &str, h: &Header) -> u64 {
        let slots = match self.heads.get_mut(device) {
            Some(s) => s,
            None => self.heads.entry(device.to_owned()).or_default(),
        };
        let slot = &mut slots[h.class.index()];
        let head = slot
            .filter(|(inc, _)| *inc == h.incarnation)
            .map(|(_, w)| w);
        let extends = h.chained
            && match h.prev {
                None => true,
                Some(p) => head.is_some_and(|w| p <= w),
            };
        if extends {
            let w = head.map_or(h.seq, |w| w.max(h.seq));
            *slot = Some((h.incarnation, w));
            return w;
        }
        head.map_or(h.seq, |w| w.max(h.seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(inc: u64, seq: u64, prev: Option<u64>, chained: bool) -> Header {
        Header {
            id: protocol::v1::message_id(inc, seq),
            incarnation: inc,
            class: Class::Results,
            seq,
            prev,
            chained,
        }
    }

    #[test]
    fn a_chain_starts_at_a_message_with_nothing_before_it_and_follows_prev() {
        let mut c = Chains::default();
        // After a restart: prev 3 was committed, but nothing says what came before 3.
        assert_eq!(c.committed("d", &h(1, 5, Some(3), true)), 5);
        assert_eq!(c.committed("d", &h(1, 2, None, true)), 2, "a chain starts");
        assert_eq!(c.committed("d", &h(1, 7, Some(2), true)), 7);
        assert_eq!(c.committed("d", &h(1, 9, Some(7), true)), 9);
        // A duplicate of 7 (the device restarted and lost the acks): its ack reaches 9.
        assert_eq!(c.committed("d", &h(1, 7, None, true)), 9);
        // A binary envelope (no prev) does not extend the chain, and one past the head
        // whose prev is unknown does not either.
        assert_eq!(c.committed("d", &h(1, 12, None, false)), 12);
        assert_eq!(c.committed("d", &h(1, 14, Some(12), true)), 14);
        assert_eq!(c.committed("d", &h(1, 8, None, true)), 9);
        // Another device, another incarnation: their own chains.
        assert_eq!(c.committed("e", &h(1, 4, Some(1), true)), 4);
        assert_eq!(c.committed("d", &h(2, 3, Some(1), true)), 3);
        assert_eq!(c.committed("d", &h(2, 1, None, true)), 1);
        assert_eq!(
            c.committed("d", &h(1, 7, None, true)),
            7,
            "incarnation 1's chain was replaced"
        );
    }
}
