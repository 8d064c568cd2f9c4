//! Message handling without I/O: topic + payload in, journal events and registry changes out.
//!
//! [`Core`] holds the device registry in memory and decides what each incoming message means.
//! It never touches the network, the disk or the clock: the caller passes the time, answers
//! "was this id seen before?" through [`SeenIds`], writes the returned events to the journal,
//! and then persists what the [`Outcome`] names (the id to remember, the records that changed).
//! Journaling before remembering the id means a crash in between can only repeat a journal
//! line on redelivery, never lose one.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;

use protocol::v1::topics::{self, DeviceTopic};
use protocol::v1::{Data, Envelope, MAX_PAYLOAD_BYTES, Registration, Status, Telemetry, binary};
use serde::de::DeserializeOwned;

use crate::event::{Event, OFFLINE_BROKER_RESTART};
use crate::registry::{DeviceRecord, TelemetrySnapshot};

/// Longest topic copied into a journal line or log; topics come from outside and MQTT allows
/// 64 KiB.
const MAX_SHOWN_TOPIC: usize = 200;

/// Answers whether a (device, message id) pair was already processed.
pub trait SeenIds {
    type Error;
    fn contains(&self, device: &str, id: &str) -> Result<bool, Self::Error>;
}

/// An in-memory seen set, for tests and tools.
impl SeenIds for HashSet<(String, String)> {
    type Error = Infallible;
    fn contains(&self, device: &str, id: &str) -> Result<bool, Infallible> {
        Ok(HashSet::contains(self, &(device.to_owned(), id.to_owned())))
    }
}

/// What the caller must do after [`Core::handle`]: journal `events` (in order), then record
/// `seen` as processed and persist the records of the devices in `changed`.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub events: Vec<Event>,
    /// (device, message id) to remember for duplicate detection.
    pub seen: Option<(String, String)>,
    /// Devices whose registry record changed.
    pub changed: Vec<String>,
}

/// Coordinator-wide counts since start, for the periodic stats line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Accepted messages (status, register, telemetry, data).
    pub messages: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Messages deliberately not processed: our own status, commands to devices, cleared
    /// retained statuses.
    pub ignored: u64,
}

/// The device registry and the rules for every message kind.
#[derive(Debug, Default)]
pub struct Core {
    devices: BTreeMap<String, DeviceRecord>,
    totals: Totals,
}

impl Core {
    /// Starts from the persisted registry.
    pub fn new(records: impl IntoIterator<Item = DeviceRecord>) -> Core {
        Core {
            devices: records.into_iter().map(|r| (r.device.clone(), r)).collect(),
            totals: Totals::default(),
        }
    }

    pub fn device(&self, device: &str) -> Option<&DeviceRecord> {
        self.devices.get(device)
    }

    pub fn devices(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.devices.values()
    }

    pub fn online_count(&self) -> usize {
        self.devices.values().filter(|r| r.online).count()
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// The embedded broker lives in our process, so after a restart no device session from
    /// before can still exist: mark every device that was online offline.
    pub fn broker_restarted(&mut self) -> Outcome {
        let mut out = Outcome::default();
        for r in self.devices.values_mut().filter(|r| r.online) {
            r.online = false;
            out.events.push(Event::Offline {
                device: r.device.clone(),
                since_ms: r.since_ms,
                reason: Some(OFFLINE_BROKER_RESTART),
            });
            out.changed.push(r.device.clone());
        }
        out
    }

    /// Decides what one message means. Errors only come from `seen`.
    pub fn handle<S: SeenIds>(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: u64,
        seen: &S,
    ) -> Result<Outcome, S::Error> {
        let Some(parsed) = topics::parse(topic) else {
            if topic == topics::status(topics::COORDINATOR) {
                // Our own retained status, echoed by the catch-all subscription.
                return Ok(self.ignore());
            }
            let reason = if topic.starts_with(topics::ROOT)
                && topic[topics::ROOT.len()..].starts_with('/')
            {
                "unknown topic under edge/v1 (or invalid device id or stream name)"
            } else {
                "topic outside the edge/v1 tree"
            };
            return Ok(self.reject(topic, None, reason.into()));
        };
        if let DeviceTopic::Cmd { .. } = parsed {
            // Coordinator-to-device traffic that the catch-all subscription also delivers.
            return Ok(self.ignore());
        }
        let device = parsed.device().to_owned();
        if payload.len() > MAX_PAYLOAD_BYTES {
            let reason = format!(
                "payload of {} bytes exceeds the limit of {} bytes",
                payload.len(),
                MAX_PAYLOAD_BYTES
            );
            return Ok(self.reject(topic, Some(&device), reason));
        }
        match parsed {
            DeviceTopic::Status { .. } => Ok(self.status(topic, &device, payload, now_ms)),
            DeviceTopic::Register { .. } => self.envelope::<Registration, S>(
                topic,
                &device,
                payload,
                now_ms,
                seen,
                Self::registration,
            ),
            DeviceTopic::Telemetry { .. } => self.envelope::<Telemetry, S>(
                topic,
                &device,
                payload,
                now_ms,
                seen,
                Self::telemetry,
            ),
            DeviceTopic::Data { .. } => {
                self.envelope::<Data, S>(topic, &device, payload, now_ms, seen, Self::data)
            }
            DeviceTopic::Cmd { .. } => Ok(self.ignore()),
        }
    }

    fn ignore(&mut self) -> Outcome {
        self.totals.ignored += 1;
        Outcome::default()
    }

    fn reject(&mut self, topic: &str, device: Option<&str>, reason: String) -> Outcome {
        self.totals.rejected += 1;
        let mut out = Outcome::default();
        // Count against a device only if it is already known: a stream of garbage under
        // invented device ids must not grow the registry.
        if let Some(r) = device.and_then(|d| self.devices.get_mut(d)) {
            r.counters.rejected += 1;
            out.changed.push(r.device.clone());
        }
        out.events.push(Event::Rejected {
            topic: shown(topic),
            reason,
            device: device.map(str::to_owned),
        });
        out
    }

    fn record(&mut self, device: &str, now_ms: u64) -> &mut DeviceRecord {
        self.devices
            .entry(device.to_owned())
            .or_insert_with(|| DeviceRecord::new(device, now_ms))
    }

    fn status(&mut self, topic: &str, device: &str, payload: &[u8], now_ms: u64) -> Outcome {
        if payload.is_empty() {
            // Someone cleared the retained status (fleet clean-up); nothing to record.
            return self.ignore();
        }
        let status = match Status::from_json(payload, device) {
            Ok(s) => s,
            Err(e) => return self.reject(topic, Some(device), e.to_string()),
        };
        self.totals.messages += 1;
        let r = self.record(device, now_ms);
        r.counters.messages += 1;
        if !status.agent_version.is_empty() {
            r.agent_version = status.agent_version.clone();
        }
        let mut out = Outcome {
            changed: vec![device.to_owned()],
            ..Outcome::default()
        };
        if status.online {
            // A retained status is redelivered on every resubscribe: same session, no event.
            if !(r.online && r.since_ms == status.since_ms) {
                r.online = true;
                r.since_ms = status.since_ms;
                r.last_seen_ms = now_ms;
                out.events.push(Event::Online {
                    device: device.to_owned(),
                    since_ms: status.since_ms,
                    agent_version: status.agent_version,
                });
            }
        } else if r.online && r.since_ms == status.since_ms {
            // The will carries its session's stamp; a will from an older session (different
            // stamp) arriving after the device reconnected must not mark it offline. Stamps
            // are compared for equality, not order, because board clocks can step backwards.
            r.online = false;
            out.events.push(Event::Offline {
                device: device.to_owned(),
                since_ms: status.since_ms,
                reason: None,
            });
        } else if r.online {
            tracing::debug!(%device, since_ms = status.since_ms, current_since_ms = r.since_ms, "stale offline status ignored");
        }
        out
    }

    fn envelope<B: DeserializeOwned, S: SeenIds>(
        &mut self,
        topic: &str,
        device: &str,
        payload: &[u8],
        now_ms: u64,
        seen: &S,
        apply: fn(&mut DeviceRecord, Envelope<B>, u64) -> Event,
    ) -> Result<Outcome, S::Error> {
        if binary::is_binary(payload) {
            return Ok(self.reject(
                topic,
                Some(device),
                "binary envelope on a json topic".into(),
            ));
        }
        let env = match Envelope::<B>::from_json(payload, device) {
            Ok(env) => env,
            Err(e) => return Ok(self.reject(topic, Some(device), e.to_string())),
        };
        let duplicate = seen.contains(device, &env.id)?;
        if duplicate {
            self.totals.duplicates += 1;
        } else {
            self.totals.messages += 1;
        }
        let r = self.record(device, now_ms);
        r.last_seen_ms = now_ms;
        if duplicate {
            r.counters.duplicates += 1;
            return Ok(Outcome {
                events: vec![Event::Duplicate {
                    device: device.to_owned(),
                    id: env.id,
                    topic: shown(topic),
                }],
                seen: None,
                changed: vec![device.to_owned()],
            });
        }
        r.counters.messages += 1;
        let id = env.id.clone();
        let event = apply(r, env, now_ms);
        Ok(Outcome {
            events: vec![event],
            seen: Some((device.to_owned(), id)),
            changed: vec![device.to_owned()],
        })
    }

    fn registration(r: &mut DeviceRecord, env: Envelope<Registration>, _now_ms: u64) -> Event {
        r.counters.registrations += 1;
        r.agent_version = env.body.agent_version.clone();
        let event = Event::Registered {
            device: env.device,
            id: env.id,
            boot_id: env.body.boot_id.clone(),
            agent_version: env.body.agent_version.clone(),
            hostname: env.body.hostname.clone(),
            os: env.body.os.clone(),
            arch: env.body.arch.clone(),
        };
        r.registration = Some(env.body);
        event
    }

    fn telemetry(r: &mut DeviceRecord, env: Envelope<Telemetry>, now_ms: u64) -> Event {
        r.counters.telemetry += 1;
        let t = &env.body;
        let event = Event::Telemetry {
            device: env.device.clone(),
            id: env.id.clone(),
            seq: env.seq,
            created_ms: env.created_ms,
            cpu_percent: t.cpu_percent,
            mem_used_bytes: t.mem_used_bytes,
            mem_total_bytes: t.mem_total_bytes,
            agent_rss_bytes: t.agent_rss_bytes,
            outbox_depth: t.outbox.depth,
            pipeline: t.pipeline.clone().map(Box::new),
            fl: t.fl.clone().map(Box::new),
            offload: t.offload.clone().map(Box::new),
            auth: t.auth.clone().map(Box::new),
        };
        // After an outage the outbox replays old samples; keep the newest by the device clock.
        if r.telemetry
            .as_ref()
            .is_none_or(|old| env.created_ms >= old.created_ms)
        {
            r.telemetry = Some(TelemetrySnapshot {
                id: env.id,
                seq: env.seq,
                created_ms: env.created_ms,
                received_ms: now_ms,
                body: env.body,
            });
        }
        event
    }

    fn data(r: &mut DeviceRecord, env: Envelope<Data>, _now_ms: u64) -> Event {
        r.counters.data += 1;
        Event::Data {
            device: env.device,
            id: env.id,
            class: env.class,
            seq: env.seq,
            stream: env.body.stream,
            created_ms: env.created_ms,
            payload: env.body.payload,
        }
    }
}

/// A topic cut to a loggable length (on a character boundary).
fn shown(topic: &str) -> String {
    if topic.len() <= MAX_SHOWN_TOPIC {
        return topic.to_owned();
    }
    let mut end = MAX_SHOWN_TOPIC;
    while !topic.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &topic[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::v1::{Class, VERSION, message_id};

    type Seen = HashSet<(String, String)>;

    fn env<B: serde::Serialize>(device: &str, seq: u64, class: Class, body: B) -> Vec<u8> {
        Envelope {
            v: VERSION,
            id: message_id(7, seq),
            device: device.into(),
            class,
            seq,
            prev: None,
            created_ms: 100 + seq,
            body,
        }
        .to_json()
    }

    fn registration() -> Registration {
        Registration {
            agent_version: "0.1.0".into(),
            hostname: "pi".into(),
            os: "linux".into(),
            arch: "aarch64".into(),
            boot_id: "boot-1".into(),
            started_ms: 5,
            capabilities: vec!["outbox".into()],
            groups: Vec::new(),
            inference: Default::default(),
        }
    }

    fn data(stream: &str) -> Data {
        Data {
            stream: stream.into(),
            payload: serde_json::json!({"temp": 21.5}).into(),
        }
    }

    fn status(device: &str, online: bool, since_ms: u64) -> Vec<u8> {
        Status {
            v: VERSION,
            device: device.into(),
            online,
            since_ms,
            agent_version: "0.1.0".into(),
        }
        .to_json()
    }

    /// Runs a message through the core and applies the outcome to `seen` like the service does.
    fn run(core: &mut Core, seen: &mut Seen, topic: &str, payload: &[u8]) -> Vec<Event> {
        let out = core
            .handle(topic, payload, 1_000, seen)
            .expect("infallible");
        if let Some(key) = out.seen {
            seen.insert(key);
        }
        out.events
    }

    #[test]
    fn status_online_offline_and_redelivery() {
        let (mut core, mut seen) = (Core::default(), Seen::new());
        let t = topics::status("d1");
        let ev = run(&mut core, &mut seen, &t, &status("d1", true, 50));
        assert!(matches!(&ev[..], [Event::Online { device, since_ms: 50, .. }] if device == "d1"));
        assert!(core.device("d1").expect("known").online);
        // Retained status redelivered on resubscribe: same session, no new event.
        assert!(run(&mut core, &mut seen, &t, &status("d1", true, 50)).is_empty());
        // The will of an older session arrives late: ignored.
        assert!(run(&mut core, &mut seen, &t, &status("d1", false, 10)).is_empty());
        assert!(core.device("d1").expect("known").online);
        let ev = run(&mut core, &mut seen, &t, &status("d1", false, 50));
        assert!(matches!(
            &ev[..],
            [Event::Offline {
                since_ms: 50,
                reason: None,
                ..
            }]
        ));
        assert_eq!(core.online_count(), 0);
        // A new session whose clock stepped backwards is still a new session.
        let ev = run(&mut core, &mut seen, &t, &status("d1", true, 40));
        assert!(matches!(&ev[..], [Event::Online { since_ms: 40, .. }]));
        // A cleared retained status is ignored, not rejected.
        assert!(run(&mut core, &mut seen, &t, b"").is_empty());
        assert_eq!(core.totals().rejected, 0);
    }

    #[test]
    fn registration_telemetry_and_data_are_recorded() {
        let (mut core, mut seen) = (Core::default(), Seen::new());
        let ev = run(
            &mut core,
            &mut seen,
            &topics::register("d1"),
            &env("d1", 1, Class::Control, registration()),
        );
        assert!(
            matches!(&ev[..], [Event::Registered { boot_id, agent_version, .. }]
            if boot_id == "boot-1" && agent_version == "0.1.0")
        );

        let mut t = Telemetry {
            cpu_percent: 33.0,
            ..Telemetry::default()
        };
        t.outbox.depth = [1, 2, 3, 4];
        let ev = run(
            &mut core,
            &mut seen,
            &topics::telemetry("d1"),
            &env("d1", 3, Class::Telemetry, t.clone()),
        );
        assert!(matches!(
            &ev[..],
            [Event::Telemetry {
                seq: 3,
                outbox_depth: [1, 2, 3, 4],
                ..
            }]
        ));
        // An older sample replayed later is journaled but does not replace the newest one.
        let old = Telemetry {
            cpu_percent: 99.0,
            ..Telemetry::default()
        };
        run(
            &mut core,
            &mut seen,
            &topics::telemetry("d1"),
            &env("d1", 2, Class::Telemetry, old),
        );

        let ev = run(
            &mut core,
            &mut seen,
            &topics::data("d1", "vib/alerts"),
            &env("d1", 4, Class::Results, data("x")),
        );
        match &ev[..] {
            [
                Event::Data {
                    stream,
                    class,
                    payload,
                    seq: 4,
                    created_ms: 104,
                    ..
                },
            ] => {
                assert_eq!(stream, "x");
                assert_eq!(*class, Class::Results);
                assert_eq!(payload, &serde_json::json!({"temp": 21.5}));
            }
            other => panic!("unexpected {other:?}"),
        }
        let r = core.device("d1").expect("known");
        assert_eq!(
            r.registration.as_ref().map(|g| g.boot_id.as_str()),
            Some("boot-1")
        );
        assert_eq!(r.telemetry.as_ref().map(|s| s.body.cpu_percent), Some(33.0));
        assert_eq!(
            (r.counters.messages, r.counters.telemetry, r.counters.data),
            (4, 2, 1)
        );
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn duplicate_is_dropped_and_counted_per_arrival() {
        let (mut core, mut seen) = (Core::default(), Seen::new());
        let msg = env("d1", 9, Class::Results, data("s"));
        let t = topics::data("d1", "s");
        assert!(matches!(
            &run(&mut core, &mut seen, &t, &msg)[..],
            [Event::Data { .. }]
        ));
        for _ in 0..2 {
            let out = core.handle(&t, &msg, 2_000, &seen).expect("infallible");
            assert!(
                matches!(&out.events[..], [Event::Duplicate { id, .. }] if *id == message_id(7, 9))
            );
            assert_eq!(out.seen, None);
        }
        let r = core.device("d1").expect("known");
        assert_eq!((r.counters.data, r.counters.duplicates), (1, 2));
        assert_eq!(core.totals().duplicates, 2);
        // The same id from another device is not a duplicate.
        let other = env("d2", 9, Class::Results, data("s"));
        assert!(matches!(
            &run(&mut core, &mut seen, &topics::data("d2", "s"), &other)[..],
            [Event::Data { .. }]
        ));
    }

    #[test]
    fn malformed_messages_are_rejected_with_a_reason() {
        let (mut core, mut seen) = (Core::default(), Seen::new());
        run(
            &mut core,
            &mut seen,
            &topics::register("d1"),
            &env("d1", 1, Class::Control, registration()),
        );
        let cases: Vec<(String, Vec<u8>, &str)> = vec![
            (
                topics::data("d1", "s"),
                b"{not json".to_vec(),
                "malformed json",
            ),
            (
                topics::telemetry("d1"),
                vec![b' '; MAX_PAYLOAD_BYTES + 1],
                "exceeds the limit",
            ),
            (
                topics::data("d1", "s"),
                env("d2", 2, Class::Results, data("s")),
                "does not match",
            ),
            (
                topics::register("d1"),
                env("d1", 3, Class::Control, data("s")),
                "malformed json",
            ),
            (
                topics::status("d1"),
                b"{\"v\":2}".to_vec(),
                "malformed json",
            ),
            (topics::data("d1", "s"), b"EB\x01garbage".to_vec(), "binary"),
            (
                "edge/v1/d1/bogus".into(),
                b"garbage".to_vec(),
                "unknown topic",
            ),
            ("elsewhere/x".into(), b"garbage".to_vec(), "outside"),
        ];
        let v2 = String::from_utf8(env("d1", 4, Class::Results, data("s")))
            .expect("utf8")
            .replace("\"v\":1", "\"v\":2");
        let mut cases = cases;
        cases.push((topics::data("d1", "s"), v2.into_bytes(), "version 2"));
        for (topic, payload, why) in &cases {
            let ev = run(&mut core, &mut seen, topic, payload);
            match &ev[..] {
                [
                    Event::Rejected {
                        topic: t, reason, ..
                    },
                ] => {
                    assert_eq!(t, topic);
                    assert!(reason.contains(why), "{topic}: {reason:?} lacks {why:?}");
                }
                other => panic!("{topic}: expected a reject, got {other:?}"),
            }
        }
        assert_eq!(core.totals().rejected, cases.len() as u64);
        // Only the rejects on d1's own topics count against d1; unknown devices get no record.
        assert_eq!(core.device("d1").expect("known").counters.rejected, 7);
        assert!(core.device("d2").is_none());
        // Processing goes on after the garbage.
        let ev = run(
            &mut core,
            &mut seen,
            &topics::data("d1", "s"),
            &env("d1", 5, Class::Results, data("s")),
        );
        assert!(matches!(&ev[..], [Event::Data { .. }]));
    }

    #[test]
    fn own_status_and_commands_are_ignored() {
        let (mut core, mut seen) = (Core::default(), Seen::new());
        assert!(
            run(
                &mut core,
                &mut seen,
                &topics::status(topics::COORDINATOR),
                b"{}"
            )
            .is_empty()
        );
        assert!(run(&mut core, &mut seen, &topics::cmd("d1", "deploy"), b"{}").is_empty());
        assert_eq!(
            core.totals(),
            Totals {
                ignored: 2,
                ..Totals::default()
            }
        );
    }

    #[test]
    fn broker_restart_marks_online_devices_offline() {
        let (mut core, mut seen) = (Core::default(), Seen::new());
        run(
            &mut core,
            &mut seen,
            &topics::status("d1"),
            &status("d1", true, 5),
        );
        run(
            &mut core,
            &mut seen,
            &topics::status("d2"),
            &status("d2", false, 5),
        );
        let out = core.broker_restarted();
        assert_eq!(out.changed, vec!["d1".to_owned()]);
        assert!(matches!(
            &out.events[..],
            [Event::Offline {
                reason: Some(_),
                ..
            }]
        ));
        assert_eq!(core.online_count(), 0);
    }

    #[test]
    fn long_topics_are_cut() {
        let topic = format!("edge/v1/d1/{}", "é".repeat(300));
        let ev = Core::default()
            .handle(&topic, b"x", 0, &Seen::new())
            .expect("infallible")
            .events;
        match &ev[..] {
            [Event::Rejected { topic, .. }] => assert!(topic.len() <= MAX_SHOWN_TOPIC + 3),
            other => panic!("{other:?}"),
        }
    }
}
