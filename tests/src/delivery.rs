//! The delivery contract, checked against the journal: every accepted message arrives as one
//! `data` event with its id, class, seq and payload; a re-delivery shows up only as a
//! `duplicate` event; within a class, a device's `data` events are in seq order.

use std::collections::{HashMap, HashSet};
use std::fmt;

use anyhow::{Result, bail};
use protocol::v1::Class;
use serde_json::Value;

use crate::journal::Journal;
use crate::local_api::Accepted;

/// A message the agent accepted, with what was sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub id: String,
    pub seq: u64,
    pub class: Class,
    pub stream: String,
    pub payload: Value,
}

impl Expected {
    pub fn new(accepted: &Accepted, stream: &str, payload: &Value) -> Expected {
        Expected {
            id: accepted.id.clone(),
            seq: accepted.seq,
            class: accepted.class,
            stream: stream.to_owned(),
            payload: payload.clone(),
        }
    }
}

/// What the journal says about a set of accepted messages from one device.
#[derive(Debug, Default, Clone)]
pub struct DeliveryReport {
    pub device: String,
    pub expected: usize,
    /// Accepted messages whose id's first `data` event carries exactly what was accepted.
    pub delivered: usize,
    /// Accepted but never journaled as `data`: lost messages.
    pub missing: Vec<String>,
    /// Ids with more than one `data` event (a duplicate that was not recognised as one).
    pub repeated: Vec<(String, usize)>,
    /// `duplicate` events for this device (allowed: at-least-once delivery, deduplicated).
    pub duplicate_events: usize,
    /// `data` events whose seq is not above the previous one of the same class.
    pub out_of_order: Vec<String>,
    /// Accepted messages whose id was journaled with another class, seq, stream or payload:
    /// the id was used for another message too (e.g. reused after a crash), and the accepted
    /// message itself was dropped as a duplicate of it. Lost, like `missing`.
    pub mismatched: Vec<String>,
    /// Ids the agent handed out for more than one accepted message.
    pub reused_ids: Vec<String>,
    /// Journal lines that were not JSON events.
    pub bad_lines: usize,
}

impl DeliveryReport {
    /// Checks `expected` against the events `journal` has read so far.
    pub fn check(journal: &Journal, device: &str, expected: &[Expected]) -> DeliveryReport {
        let mut r = DeliveryReport {
            device: device.to_owned(),
            expected: expected.len(),
            bad_lines: journal.bad_lines().len(),
            ..DeliveryReport::default()
        };
        let mut first_by_id: HashMap<&str, &crate::journal::Event> = HashMap::new();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let mut last_seq: HashMap<(String, String), u64> = HashMap::new();
        for e in journal.data_events(device) {
            let Some(id) = e.id.as_deref() else {
                r.mismatched
                    .push(format!("data event without id: {}", e.raw));
                continue;
            };
            *counts.entry(id).or_insert(0) += 1;
            first_by_id.entry(id).or_insert(e);
            let (Some(class), Some(seq)) = (e.class.clone(), e.seq) else {
                r.mismatched
                    .push(format!("data event without class or seq: {}", e.raw));
                continue;
            };
            if counts[id] == 1 {
                // Seqs count per outbox incarnation (a quarantined or wiped store starts a new
                // one), which the id's first half names.
                let key = (class, incarnation(id).to_owned());
                if let Some(prev) = last_seq.get(&key)
                    && seq <= *prev
                {
                    r.out_of_order
                        .push(format!("{}: seq {seq} (id {id}) after seq {prev}", key.0));
                }
                last_seq.insert(key, seq);
            }
        }
        r.duplicate_events = journal.count("duplicate", device);
        let mut repeated: Vec<(String, usize)> = counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, n)| ((*id).to_owned(), *n))
            .collect();
        repeated.sort();
        r.repeated = repeated;
        let mut seen = HashSet::new();
        for x in expected {
            if !seen.insert(x.id.as_str()) {
                r.reused_ids.push(x.id.clone());
            }
        }
        for x in expected {
            match first_by_id.get(x.id.as_str()) {
                None => r.missing.push(x.id.clone()),
                Some(e) => {
                    let payload = e.raw.get("payload");
                    if e.class.as_deref() != Some(x.class.as_str())
                        || e.seq != Some(x.seq)
                        || e.str_field("stream") != Some(x.stream.as_str())
                        || payload != Some(&x.payload)
                    {
                        r.mismatched.push(format!(
                            "id {}: accepted as {} seq {} stream {} payload {}, journaled as {}",
                            x.id, x.class, x.seq, x.stream, x.payload, e.raw
                        ));
                    } else {
                        r.delivered += 1;
                    }
                }
            }
        }
        r
    }

    /// True if nothing was lost, repeated as data, reordered or altered.
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty()
            && self.repeated.is_empty()
            && self.out_of_order.is_empty()
            && self.mismatched.is_empty()
            && self.reused_ids.is_empty()
            && self.bad_lines == 0
    }

    /// `Ok` if [`DeliveryReport::is_ok`], else an error with the report.
    pub fn ensure_ok(&self) -> Result<()> {
        if self.is_ok() {
            Ok(())
        } else {
            bail!("delivery contract broken:\n{self}")
        }
    }
}

/// The outbox incarnation part of a message id (`protocol::v1::message_id`: 16 hex digits of
/// incarnation, then 16 of seq); the whole id if it has another shape.
fn incarnation(id: &str) -> &str {
    if id.len() == 32 { &id[..16] } else { id }
}

fn sample<T: fmt::Debug>(items: &[T]) -> String {
    let shown: Vec<String> = items.iter().take(5).map(|x| format!("{x:?}")).collect();
    let more = if items.len() > 5 {
        format!(" and {} more", items.len() - 5)
    } else {
        String::new()
    };
    format!("{}{more}", shown.join(", "))
}

impl fmt::Display for DeliveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "device {}: accepted {}, delivered {}, missing {}, lost to an id used twice {}, \
             repeated as data {}, duplicates dropped {}, out of order {}, ids accepted twice {}, \
             bad journal lines {}",
            self.device,
            self.expected,
            self.delivered,
            self.missing.len(),
            self.mismatched.len(),
            self.repeated.len(),
            self.duplicate_events,
            self.out_of_order.len(),
            self.reused_ids.len(),
            self.bad_lines
        )?;
        if !self.missing.is_empty() {
            writeln!(f, "  missing: {}", sample(&self.missing))?;
        }
        if !self.repeated.is_empty() {
            writeln!(
                f,
                "  repeated as data (id, count): {}",
                sample(&self.repeated)
            )?;
        }
        if !self.out_of_order.is_empty() {
            writeln!(f, "  out of order: {}", sample(&self.out_of_order))?;
        }
        if !self.mismatched.is_empty() {
            writeln!(
                f,
                "  lost to an id used twice: {}",
                sample(&self.mismatched)
            )?;
        }
        if !self.reused_ids.is_empty() {
            writeln!(f, "  ids accepted twice: {}", sample(&self.reused_ids))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A well-formed id: incarnation `inc`, seq `seq`.
    fn id(inc: u64, seq: u64) -> String {
        protocol::v1::message_id(inc, seq)
    }

    fn line(id: &str, class: &str, seq: u64, payload: &str) -> String {
        format!(
            "{{\"ts_ms\":1,\"event\":\"data\",\"device\":\"d1\",\"id\":\"{id}\",\"class\":\"{class}\",\
             \"seq\":{seq},\"stream\":\"s\",\"created_ms\":1,\"payload\":{payload}}}\n"
        )
    }

    fn exp(id: &str, class: Class, seq: u64, payload: Value) -> Expected {
        Expected {
            id: id.into(),
            seq,
            class,
            stream: "s".into(),
            payload,
        }
    }

    fn journal(dir: &std::path::Path, lines: &[String]) -> Journal {
        let path = dir.join("j");
        let mut f = std::fs::File::create(&path).expect("create");
        for l in lines {
            f.write_all(l.as_bytes()).expect("write");
        }
        let mut j = Journal::open(&path);
        j.refresh().expect("read");
        j
    }

    #[test]
    fn finds_loss_repeats_reordering_and_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b, c, d) = (id(7, 2), id(7, 1), id(7, 3), id(7, 4));
        let j = journal(
            dir.path(),
            &[
                line(&a, "results", 2, "1"),
                line(&b, "results", 1, "2"),
                line(&a, "results", 2, "1"),
                line(&c, "control", 3, "9"),
                format!(
                    "{{\"ts_ms\":1,\"event\":\"duplicate\",\"device\":\"d1\",\"id\":\"{a}\"}}\n"
                ),
            ],
        );
        let expected = [
            exp(&a, Class::Results, 2, serde_json::json!(1)),
            exp(&b, Class::Results, 1, serde_json::json!(2)),
            exp(&c, Class::Control, 3, serde_json::json!(3)),
            exp(&d, Class::Control, 4, serde_json::json!(4)),
        ];
        let r = DeliveryReport::check(&j, "d1", &expected);
        assert_eq!(r.delivered, 2);
        assert_eq!(r.missing, std::slice::from_ref(&d));
        assert_eq!(r.repeated, [(a.clone(), 2)]);
        assert_eq!(r.duplicate_events, 1);
        assert_eq!(r.out_of_order.len(), 1, "{r}");
        assert_eq!(r.mismatched.len(), 1, "{r}");
        assert!(!r.is_ok());

        let none = DeliveryReport::check(&j, "d1", &[]);
        assert!(none.missing.is_empty());
    }

    #[test]
    fn a_new_outbox_incarnation_starts_its_own_seq_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (old, new) = (id(1, 30), id(2, 3));
        let j = journal(
            dir.path(),
            &[
                line(&old, "results", 30, "1"),
                line(&new, "results", 3, "2"),
            ],
        );
        let expected = [
            exp(&old, Class::Results, 30, serde_json::json!(1)),
            exp(&new, Class::Results, 3, serde_json::json!(2)),
        ];
        let r = DeliveryReport::check(&j, "d1", &expected);
        assert!(r.is_ok(), "{r}");
    }
}
