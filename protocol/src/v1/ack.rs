//! End-to-end acknowledgements: the coordinator tells a device which of its messages it has
//! durably committed, so the device may delete them from its outbox.
//!
//! The broker's PUBACK only says the broker took a message. A broker that loses its sessions
//! (mosquitto with an unwritable persistence directory, a restart without persistence, the
//! embedded broker dying with a coordinator) PUBACKs messages that never reach the
//! coordinator. So a device keeps every message until an [`Ack`] on `edge/v1/{device}/ack`
//! (MAC'd with the session's `down` key, like every coordinator-to-device message) names it,
//! and sends again what stays unacknowledged.
//!
//! Body (JSON): `{"v":1,"inc":"<16 hex>","committed":[["results",0,41],...],"resend":[["results",3]]}`:
//! - `inc`: the outbox incarnation the seqs belong to (the first half of a message id);
//! - `committed`: inclusive seq ranges per class, committed by the coordinator (processed,
//!   recognised as a duplicate, or refused with the refusal journaled: either way done).
//!   Seqs are numbered across classes, so a range names every message *of its class* with a
//!   seq in it; the device deletes those it holds. A range may reach past the message that
//!   prompted it (see "Chains" below);
//! - `resend`: per class, a seq the coordinator is waiting for: it held back a later message
//!   whose `prev` it had not committed yet (the broker lost something in between), so the
//!   device should send again from there rather than wait for its timeout.
//!
//! Order: a JSON envelope names `prev`, the seq of the previous message of its class that the
//! device still holds (sent, not yet acknowledged). The coordinator processes a message only
//! when it has committed `prev`, so each class reaches the journal in seq order even when a
//! broker drops messages in the middle of a stream.
//!
//! Chains: that rule also tells the coordinator more than the one message. A JSON message `m`
//! committed with `prev` absent (nothing older was held) or with `prev` at or below a seq `w`
//! for which this already held, means every message of the class the device held below `m`
//! when it sent `m` is committed. The coordinator keeps the highest such seq per device and
//! class (binary envelopes carry no `prev` and do not extend it), and answers a duplicate of
//! `s` with the range `s..=w`: whatever the device still holds in it was held when `w` was
//! sent. This is what lets a device that restarts, after its acks were published to nobody,
//! learn with one resent message that everything it sent before is committed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Class, Error, VERSION};

/// One acknowledgement for one outbox incarnation of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub v: u8,
    /// Outbox incarnation, 16 hex digits (as in [`super::message_id`]).
    pub inc: String,
    /// Inclusive ranges `(class, from, to)` committed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub committed: Vec<(Class, u64, u64)>,
    /// `(class, seq)`: send again from this seq.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resend: Vec<(Class, u64)>,
}

/// Most ranges one ack carries; a longer list is split over several acks.
pub const MAX_RANGES: usize = 512;

impl Ack {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes an ack; refuses another version, a malformed incarnation, reversed ranges or
    /// more than [`MAX_RANGES`] entries.
    pub fn from_json(payload: &[u8]) -> Result<Ack, Error> {
        let ack: Ack = serde_json::from_slice(payload)?;
        if ack.v != VERSION {
            return Err(Error::Version(ack.v));
        }
        if ack.incarnation().is_none() {
            return Err(Error::Ack("incarnation is not 16 hex digits"));
        }
        if ack.committed.len() > MAX_RANGES || ack.resend.len() > MAX_RANGES {
            return Err(Error::Ack("too many ranges"));
        }
        if ack.committed.iter().any(|(_, from, to)| from > to) {
            return Err(Error::Ack("a range ends before it starts"));
        }
        Ok(ack)
    }

    /// The incarnation as a number; `None` if `inc` is malformed.
    pub fn incarnation(&self) -> Option<u64> {
        (self.inc.len() == 16)
            .then(|| u64::from_str_radix(&self.inc, 16).ok())
            .flatten()
    }
}

/// The incarnation and seq a message id names (`message_id`'s two halves).
pub fn split_message_id(id: &str) -> Option<(u64, u64)> {
    if id.len() != 32 || !id.is_ascii() {
        return None;
    }
    let inc = u64::from_str_radix(&id[..16], 16).ok()?;
    let seq = u64::from_str_radix(&id[16..], 16).ok()?;
    Some((inc, seq))
}

/// What the coordinator needs from an envelope to acknowledge and order it, read without
/// decoding the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub id: String,
    pub incarnation: u64,
    pub class: Class,
    pub seq: u64,
    /// The previous message of the class the device still held when it sent this one.
    pub prev: Option<u64>,
    /// A JSON envelope, whose `prev` is meaningful (absent = nothing older held). Binary
    /// envelopes carry no `prev`.
    pub chained: bool,
}

impl Header {
    /// Reads the header of a JSON or binary envelope; `None` if the payload is neither, or
    /// its id is not an outbox id (incarnation + seq) matching its seq.
    pub fn peek(payload: &[u8]) -> Option<Header> {
        let chained = !super::binary::is_binary(payload);
        let (id, class, seq, prev) = if !chained {
            let env = super::binary::BinaryEnvelope::decode(payload).ok()?;
            (env.id, env.class, env.seq, None)
        } else {
            #[derive(Deserialize)]
            struct Peek {
                id: String,
                class: Class,
                seq: u64,
                #[serde(default)]
                prev: Option<u64>,
            }
            let p: Peek = serde_json::from_slice(payload).ok()?;
            (p.id, p.class, p.seq, p.prev)
        };
        let (incarnation, id_seq) = split_message_id(&id)?;
        if id_seq != seq || prev.is_some_and(|p| p >= seq) {
            return None;
        }
        Some(Header {
            id,
            incarnation,
            class,
            seq,
            prev,
            chained,
        })
    }
}

/// Collects what one batch committed for one device, and turns it into acks.
#[derive(Debug, Default, Clone)]
pub struct AckSet {
    /// incarnation -> class -> inclusive seq ranges committed.
    committed: BTreeMap<u64, BTreeMap<Class, Vec<(u64, u64)>>>,
    /// incarnation -> class -> lowest seq to send again.
    resend: BTreeMap<u64, BTreeMap<Class, u64>>,
}

impl AckSet {
    pub fn is_empty(&self) -> bool {
        self.committed.is_empty() && self.resend.is_empty()
    }

    pub fn committed(&mut self, incarnation: u64, class: Class, seq: u64) {
        self.committed_through(incarnation, class, seq, seq);
    }

    /// Every message of `class` in `from..=to` is committed (a chain, see the module docs).
    pub fn committed_through(&mut self, incarnation: u64, class: Class, from: u64, to: u64) {
        self.committed
            .entry(incarnation)
            .or_default()
            .entry(class)
            .or_default()
            .push((from.min(to), from.max(to)));
    }

    pub fn resend(&mut self, incarnation: u64, class: Class, seq: u64) {
        let e = self
            .resend
            .entry(incarnation)
            .or_default()
            .entry(class)
            .or_insert(seq);
        *e = (*e).min(seq);
    }

    /// The acks, one per incarnation (more if one has over [`MAX_RANGES`] ranges), ranges
    /// merged where they overlap or touch.
    pub fn into_acks(self) -> Vec<Ack> {
        let mut incs: Vec<u64> = self.committed.keys().copied().collect();
        incs.extend(self.resend.keys().copied());
        incs.sort_unstable();
        incs.dedup();
        let mut out = Vec::new();
        for inc in incs {
            let mut ranges = Vec::new();
            for (class, mut spans) in self.committed.get(&inc).cloned().unwrap_or_default() {
                spans.sort_unstable();
                let mut it = spans.into_iter();
                let Some((mut from, mut to)) = it.next() else {
                    continue;
                };
                for (f, t) in it {
                    if f <= to.saturating_add(1) {
                        to = to.max(t);
                    } else {
                        ranges.push((class, from, to));
                        (from, to) = (f, t);
                    }
                }
                ranges.push((class, from, to));
            }
            let resend: Vec<(Class, u64)> = self
                .resend
                .get(&inc)
                .map(|m| m.iter().map(|(c, s)| (*c, *s)).collect())
                .unwrap_or_default();
            let inc_hex = format!("{inc:016x}");
            let mut chunks: Vec<Vec<(Class, u64, u64)>> =
                ranges.chunks(MAX_RANGES).map(<[_]>::to_vec).collect();
            if chunks.is_empty() {
                chunks.push(Vec::new());
            }
            for (i, committed) in chunks.into_iter().enumerate() {
                out.push(Ack {
                    v: VERSION,
                    inc: inc_hex.clone(),
                    committed,
                    resend: if i == 0 { resend.clone() } else { Vec::new() },
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_coalesce_per_class_and_round_trip() {
        let mut set = AckSet::default();
        for s in [5, 1, 2, 3, 7, 8, 3] {
            set.committed(0xab, Class::Results, s);
        }
        set.committed(0xab, Class::Telemetry, 4);
        set.resend(0xab, Class::Results, 9);
        set.resend(0xab, Class::Results, 6);
        let acks = set.into_acks();
        assert_eq!(acks.len(), 1);
        let a = &acks[0];
        assert_eq!(a.inc, "00000000000000ab");
        assert_eq!(
            a.committed,
            vec![
                (Class::Results, 1, 3),
                (Class::Results, 5, 5),
                (Class::Results, 7, 8),
                (Class::Telemetry, 4, 4)
            ]
        );
        assert_eq!(a.resend, vec![(Class::Results, 6)]);
        assert_eq!(Ack::from_json(&a.to_json()).expect("decodes"), *a);
    }

    #[test]
    fn chain_ranges_merge_with_single_seqs() {
        let mut set = AckSet::default();
        set.committed(1, Class::Results, 3);
        set.committed_through(1, Class::Results, 4, 40);
        set.committed(1, Class::Results, 12);
        set.committed_through(1, Class::Results, 50, 45);
        let acks = set.into_acks();
        assert_eq!(
            acks[0].committed,
            vec![(Class::Results, 3, 40), (Class::Results, 45, 50)]
        );
    }

    #[test]
    fn many_ranges_split_over_acks() {
        let mut set = AckSet::default();
        for s in 0..(MAX_RANGES as u64 + 10) {
            set.committed(1, Class::Results, s * 2);
        }
        let acks = set.into_acks();
        assert_eq!(acks.len(), 2);
        assert_eq!(acks[0].committed.len(), MAX_RANGES);
        assert_eq!(acks[1].committed.len(), 10);
    }

    #[test]
    fn bad_acks_are_refused() {
        for bad in [
            r#"{"v":1,"inc":"xyz","committed":[]}"#,
            r#"{"v":2,"inc":"00000000000000ab"}"#,
            r#"{"v":1,"inc":"00000000000000ab","committed":[["results",5,1]]}"#,
            r#"{"v":1,"inc":"00000000000000ab","extra":1}"#,
        ] {
            assert!(Ack::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn header_reads_json_and_binary_envelopes() {
        let id = super::super::message_id(7, 12);
        let json = format!(
            r#"{{"v":1,"id":"{id}","device":"d1","class":"results","seq":12,"prev":10,"created_ms":1,"body":{{}}}}"#
        );
        let h = Header::peek(json.as_bytes()).expect("json header");
        assert_eq!(
            (h.incarnation, h.class, h.seq, h.prev, h.chained),
            (7, Class::Results, 12, Some(10), true)
        );
        let bin = super::super::binary::BinaryEnvelope {
            id: id.clone(),
            device: "d1".into(),
            class: Class::Model,
            seq: 12,
            created_ms: 1,
            kind: "fl-update".into(),
            body: vec![1, 2, 3],
        }
        .encode()
        .expect("encodes");
        let h = Header::peek(&bin).expect("binary header");
        assert_eq!(
            (h.incarnation, h.class, h.seq, h.prev, h.chained),
            (7, Class::Model, 12, None, false)
        );
        // An id that does not name the seq, or a prev not before it, is not an outbox message.
        let other = json.replace(r#""seq":12"#, r#""seq":13"#);
        assert!(Header::peek(other.as_bytes()).is_none());
        let later = json.replace(r#""prev":10"#, r#""prev":12"#);
        assert!(Header::peek(later.as_bytes()).is_none());
    }
}
