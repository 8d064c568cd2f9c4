//! The authentication gate, without I/O: every inbound message is checked here before
//! anything else sees it, and every outbound one is sealed here on its way out. The rules per
//! topic are `protocol::v1::topics::Topic::auth_rule`; this is the coordinator's half of them.
//!
//! Inbound, in order: our own publishes echoed back are ignored; an enrollment request goes to
//! [`super::Enrollments::on_request`] (its signatures are its own); any other device message
//! needs the device's enrollment (`unenrolled`, `not_enrolled` for pending or rejected,
//! `revoked`), then a MAC by the session's `up` key (`no_trailer`, `wrong_kind`, `bad_mac`),
//! then, for `DeviceMac` topics, a counter the device's [`ReplayWindow`] has not seen
//! (`replay`). The retained status and the will carry [`auth::STATUS_COUNTER`] and skip the
//! window (a will of an earlier boot may well arrive after the new boot's first messages; the
//! core already ignores a will whose `since_ms` is not the current session's). What passes is
//! routed with its trailer cut off; a topic outside the tree has no rule and goes on to the
//! core, which journals it as rejected.
//!
//! Drops are counted by reason (the stats line), logged at WARN at most once per reason per
//! [`WARN_INTERVAL_MS`] with the count since the previous line, and summed into an
//! `auth_rejected` journal event at most every [`SUMMARY_INTERVAL_MS`] ([`Gate::summary`]).
//!
//! Outbound ([`Gate::seal`]): `CoordinatorMac` topics (offload responses, commands) get the
//! device's session `down` MAC with the coordinator's epoch and a process-wide counter;
//! `CoordinatorSigned` topics (capacity adverts, enrollment answers, our status) a signature
//! by the coordinator identity with the time as counter; `Embedded` ones (deployments, FL
//! rounds, signed in their own format) and empty payloads (clearing a retained topic) go out
//! as they are.
//!
//! Key rotation ([`Gate::rotate`]): the gate holds the previous identity until the rotation
//! finishes ([`Gate::finish_rotation`]). Meanwhile a device that has not used the new key yet
//! ([`super::Enrollments::switched`]) is accepted under the session keys of either; its first
//! message under the new ones switches it ([`super::Enrollments::switch`], persisted by the
//! service, [`Gate::take_switched`]) and its old keys are refused from then on. Everything
//! sealed goes out under the new key, except the answers to devices that have not switched
//! (the rotation's announcement, and any later decision about them), which the old key signs:
//! it is the key they trust. Messages accepted under the old key are counted
//! ([`Gate::old_key_accepted`]).
//!
//! Replay windows live here per device; those that moved are handed to the store at every
//! batch commit ([`Gate::take_moved_windows`]) and restored at start.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use protocol::v1::auth::{self, Identity, PublicIdentity, ReplayWindow, Rule, SessionKeys, Stamp};
use protocol::v1::enroll::{self, Decision, EnrollAnswer};
use protocol::v1::topics::{self, Topic};

use super::core::Enrollments;
use crate::event::Event;

/// Shortest gap between two WARN lines about drops of one reason.
pub const WARN_INTERVAL_MS: u64 = 10_000;
/// Shortest gap between two `auth_rejected` journal events.
pub const SUMMARY_INTERVAL_MS: u64 = 10_000;
/// Most device ids an `auth_rejected` event names.
const SUMMARY_DEVICES: usize = 16;

/// What to do with an inbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Our own publish, delivered back by a catch-all subscription: ignored.
    Echo,
    /// An enrollment request for [`super::Enrollments::on_request`].
    Enrollment,
    /// Route the first `len` bytes (the payload without its trailer).
    Route { len: usize },
    /// Dropped and counted under `reason`.
    Dropped { reason: &'static str },
}

/// Something the service publishes, before sealing.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    /// An enrollment answer, signed as `protocol::v1::enroll::seal_answer` does.
    Answer { answer: EnrollAnswer, retain: bool },
}

/// Why an outbound message was not sealed (and so not sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("no session with device {device} ({reason}); {topic} not sent")]
    NoSession {
        device: String,
        topic: String,
        reason: &'static str,
    },
    #[error("{0} is a device's topic; the coordinator does not publish there")]
    NotOurs(String),
}

/// One device's session: the keys agreed with the key its enrollment names.
struct Session {
    device_key: String,
    keys: SessionKeys,
    /// Under the previous coordinator identity, while a rotation lasts.
    old_keys: Option<SessionKeys>,
}

/// Counts of dropped messages, and when each was last logged and journaled.
#[derive(Debug, Default)]
struct Drops {
    totals: BTreeMap<&'static str, u64>,
    since_summary: BTreeMap<&'static str, u64>,
    devices: BTreeSet<String>,
    last_summary_ms: Option<u64>,
    /// Per reason: last WARN line, drops since.
    warned: BTreeMap<&'static str, (u64, u64)>,
}

impl Drops {
    fn count(&mut self, reason: &'static str, device: Option<&str>, topic: &str, now_ms: u64) {
        *self.totals.entry(reason).or_default() += 1;
        *self.since_summary.entry(reason).or_default() += 1;
        if let Some(d) = device
            && self.devices.len() < SUMMARY_DEVICES
        {
            self.devices.insert(d.to_owned());
        }
        let (last, count) = self.warned.entry(reason).or_insert((0, 0));
        *count += 1;
        if *last == 0 || now_ms.saturating_sub(*last) >= WARN_INTERVAL_MS {
            tracing::warn!(
                reason,
                count = *count,
                device = device.unwrap_or("-"),
                topic = %topic.chars().take(200).collect::<String>(),
                "messages dropped: not authenticated (count since the last line for this reason)"
            );
            *last = now_ms.max(1);
            *count = 0;
        }
    }
}

/// Inbound verification and outbound sealing for one coordinator process.
pub struct Gate {
    identity: Identity,
    public: PublicIdentity,
    /// The identity before a rotation, until it finishes.
    previous: Option<Identity>,
    /// Messages accepted under the previous identity's session keys.
    old_key_accepted: u64,
    /// Devices that switched to the current key since the last [`Gate::take_switched`].
    switched: Vec<String>,
    epoch: u64,
    counter: u64,
    sessions: HashMap<String, Session>,
    windows: HashMap<String, ReplayWindow>,
    moved: BTreeSet<String>,
    drops: Drops,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("identity", &self.identity)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// `epoch` is this process's (raised at every start); `windows` the persisted
    /// `(device, epoch, top)` of each device's replay window.
    pub fn new(
        identity: Identity,
        epoch: u64,
        windows: impl IntoIterator<Item = (String, u64, u64)>,
    ) -> Gate {
        Gate {
            public: identity.public(),
            identity,
            previous: None,
            old_key_accepted: 0,
            switched: Vec::new(),
            epoch,
            counter: 0,
            sessions: HashMap::new(),
            windows: windows
                .into_iter()
                .map(|(d, e, t)| (d, ReplayWindow::restore(e, t)))
                .collect(),
            moved: BTreeSet::new(),
            drops: Drops::default(),
        }
    }

    pub fn public(&self) -> &PublicIdentity {
        &self.public
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A rotation in progress at start: `previous` is still accepted from devices that have not
    /// switched.
    pub fn with_previous(mut self, previous: Option<Identity>) -> Gate {
        self.previous = previous;
        self
    }

    /// The identity is now `next`; the current one becomes the previous (see module docs).
    pub fn rotate(&mut self, next: Identity) {
        let previous = std::mem::replace(&mut self.identity, next);
        self.public = self.identity.public();
        self.previous = Some(previous);
        self.sessions.clear();
    }

    /// The rotation ends: nothing under the previous identity is accepted any more.
    pub fn finish_rotation(&mut self) -> Option<PublicIdentity> {
        self.sessions.clear();
        self.previous.take().map(|p| p.public())
    }

    /// The identity before the rotation in progress, if one is.
    pub fn previous(&self) -> Option<&Identity> {
        self.previous.as_ref()
    }

    /// Messages accepted under the previous identity since start.
    pub fn old_key_accepted(&self) -> u64 {
        self.old_key_accepted
    }

    /// Devices whose records [`super::Enrollments::switch`] changed since the last call.
    pub fn take_switched(&mut self) -> Vec<String> {
        std::mem::take(&mut self.switched)
    }

    /// Checks one inbound message; counts and logs a drop.
    pub fn verify(
        &mut self,
        enrollments: &mut Enrollments,
        topic: Option<&Topic>,
        topic_str: &str,
        bytes: &[u8],
        now_ms: u64,
    ) -> Verdict {
        let verdict = self.check(enrollments, topic, topic_str, bytes);
        if let Verdict::Dropped { reason } = verdict {
            self.count_drop(reason, topic.and_then(Topic::device), topic_str, now_ms);
        }
        verdict
    }

    /// Counts a message dropped for `reason` (also enrollment requests the enrollment core
    /// refused).
    pub fn count_drop(
        &mut self,
        reason: &'static str,
        device: Option<&str>,
        topic: &str,
        now_ms: u64,
    ) {
        self.drops.count(reason, device, topic, now_ms);
    }

    fn check(
        &mut self,
        enrollments: &mut Enrollments,
        topic: Option<&Topic>,
        topic_str: &str,
        bytes: &[u8],
    ) -> Verdict {
        let Some(topic) = topic else {
            // No rule outside the tree: the core journals it as rejected.
            return Verdict::Route { len: bytes.len() };
        };
        if topic.from_coordinator() {
            return Verdict::Echo;
        }
        let rule = topic.auth_rule();
        if rule == Rule::Enrollment {
            return Verdict::Enrollment;
        }
        let Some(device) = topic.device() else {
            // Every device-to-coordinator topic names its device; anything else is ours.
            return Verdict::Echo;
        };
        if rule == Rule::DeviceStatus && bytes.is_empty() {
            // A retained status cleared by someone: the core ignores it.
            return Verdict::Route { len: 0 };
        }
        // During a rotation, a device that has not used the new key may use either.
        let transition = self.previous.is_some() && !enrollments.switched(device);
        let session = match session(
            &mut self.sessions,
            &mut self.windows,
            &self.identity,
            &self.public,
            self.previous.as_ref().filter(|_| transition),
            enrollments,
            device,
        ) {
            Ok(s) => s,
            Err(reason) => return Verdict::Dropped { reason },
        };
        let (payload, stamp, old) = match session.keys.up.open(topic_str, bytes) {
            Ok((p, s)) => (p, s, false),
            Err(e) => match session
                .old_keys
                .as_ref()
                .map(|k| k.up.open(topic_str, bytes))
            {
                Some(Ok((p, s))) => (p, s, true),
                _ => return Verdict::Dropped { reason: e.reason() },
            },
        };
        if rule == Rule::DeviceMac {
            let window = self.windows.entry(device.to_owned()).or_default();
            if let Err(e) = window.accept(stamp) {
                return Verdict::Dropped { reason: e.reason() };
            }
            self.moved.insert(device.to_owned());
        }
        let len = payload.len();
        if old {
            self.old_key_accepted += 1;
        } else if transition && enrollments.switch(device) {
            self.switched.push(device.to_owned());
            // Its old keys are refused from now on.
            if let Some(s) = self.sessions.get_mut(device) {
                s.old_keys = None;
            }
        }
        Verdict::Route { len }
    }

    /// Seals an outbound message per its topic's rule; `(topic, bytes, retain)` to publish.
    pub fn seal(
        &mut self,
        enrollments: &Enrollments,
        out: Outgoing,
        now_ms: u64,
    ) -> Result<(String, Vec<u8>, bool), SealError> {
        let (topic, payload, retain) = match out {
            Outgoing::Answer { answer, retain } => {
                let topic = topics::enroll_answer(&answer.device);
                let signer = match &self.previous {
                    Some(previous) if announces_to(enrollments, &answer) => previous,
                    _ => &self.identity,
                };
                return Ok((topic, enroll::seal_answer(&answer, signer), retain));
            }
            Outgoing::Publish {
                topic,
                payload,
                retain,
            } => (topic, payload, retain),
        };
        if payload.is_empty() {
            // Clears a retained message; a trailer would make it a message.
            return Ok((topic, payload, retain));
        }
        let Some(parsed) = Topic::parse(&topic) else {
            return Ok((topic, payload, retain));
        };
        let sealed = match parsed.auth_rule() {
            Rule::CoordinatorMac => {
                let device = parsed.device().unwrap_or_default();
                let keys = session(
                    &mut self.sessions,
                    &mut self.windows,
                    &self.identity,
                    &self.public,
                    None,
                    enrollments,
                    device,
                )
                .map(|s| &s.keys)
                .map_err(|reason| SealError::NoSession {
                    device: device.to_owned(),
                    topic: topic.clone(),
                    reason,
                })?;
                self.counter += 1;
                keys.down.seal(
                    &topic,
                    &payload,
                    Stamp {
                        epoch: self.epoch,
                        counter: self.counter,
                    },
                )
            }
            Rule::CoordinatorSigned => self.identity.seal(&topic, &payload, now_ms),
            Rule::Embedded => payload,
            Rule::DeviceMac | Rule::DeviceStatus | Rule::Enrollment => {
                return Err(SealError::NotOurs(topic));
            }
        };
        Ok((topic, sealed, retain))
    }

    /// `(device, epoch, top)` of every replay window that moved since the last call, for the
    /// store (written with the batch it belongs to).
    pub fn take_moved_windows(&mut self) -> Vec<(String, u64, u64)> {
        std::mem::take(&mut self.moved)
            .into_iter()
            .filter_map(|d| {
                let w = self.windows.get(&d)?;
                Some((d, w.epoch(), w.top()))
            })
            .collect()
    }

    /// Drops since start, by reason.
    pub fn drop_totals(&self) -> &BTreeMap<&'static str, u64> {
        &self.drops.totals
    }

    /// The `auth_rejected` event for the drops since the last one, if there were any and the
    /// last one is at least [`SUMMARY_INTERVAL_MS`] old.
    pub fn summary(&mut self, now_ms: u64) -> Option<Event> {
        if self.drops.since_summary.is_empty()
            || self
                .drops
                .last_summary_ms
                .is_some_and(|t| now_ms.saturating_sub(t) < SUMMARY_INTERVAL_MS)
        {
            return None;
        }
        let since_ms = self.drops.last_summary_ms.unwrap_or(0);
        self.drops.last_summary_ms = Some(now_ms);
        let reasons: BTreeMap<String, u64> = std::mem::take(&mut self.drops.since_summary)
            .into_iter()
            .map(|(r, n)| (r.to_owned(), n))
            .collect();
        Some(Event::AuthRejected {
            total: reasons.values().sum(),
            reasons,
            devices: std::mem::take(&mut self.drops.devices)
                .into_iter()
                .collect(),
            since_ms,
        })
    }
}

/// Whether an answer goes to a device that still trusts the previous coordinator key: about
/// its enrolled (or revoked) key, and it has not used the current one yet.
fn announces_to(enrollments: &Enrollments, answer: &EnrollAnswer) -> bool {
    enrollments.get(&answer.device).is_some_and(|r| {
        r.identity.sign == answer.device_key
            && matches!(r.state, Decision::Accepted | Decision::Revoked)
            && !enrollments.switched(&answer.device)
    })
}

/// The session with `device` (derived once per device key; with its keys under `previous`
/// too when given), or why there is none.
fn session<'a>(
    sessions: &'a mut HashMap<String, Session>,
    windows: &mut HashMap<String, ReplayWindow>,
    identity: &Identity,
    public: &PublicIdentity,
    previous: Option<&Identity>,
    enrollments: &Enrollments,
    device: &str,
) -> Result<&'a Session, &'static str> {
    let record = enrollments.get(device).ok_or("unenrolled")?;
    match record.state {
        Decision::Accepted => {}
        Decision::Pending | Decision::Rejected => return Err("not_enrolled"),
        Decision::Revoked => return Err("revoked"),
    }
    let stale = sessions
        .get(device)
        .is_none_or(|s| s.device_key != record.identity.sign);
    if stale {
        let keys = identity
            .session_keys(&record.identity, device, &record.identity, public)
            .map_err(|e| auth::AuthError::reason(&e))?;
        if sessions.contains_key(device) {
            // Another key under this id (cannot happen for an accepted record, which is never
            // rebound): its numbering starts over.
            windows.remove(device);
        }
        sessions.insert(
            device.to_owned(),
            Session {
                device_key: record.identity.sign.clone(),
                keys,
                old_keys: None,
            },
        );
    }
    let s = sessions.get_mut(device).ok_or("unenrolled")?;
    if let Some(previous) = previous
        && s.old_keys.is_none()
    {
        let keys = previous
            .session_keys(
                &record.identity,
                device,
                &record.identity,
                &previous.public(),
            )
            .map_err(|e| auth::AuthError::reason(&e))?;
        s.old_keys = Some(keys);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrollment::config::{ClaimConfig, EnrollmentConfig};
    use protocol::v1::deploy::{SigningKey, public_key_hex};
    use protocol::v1::enroll::{EnrollRequest, Hardware, seal_request};
    use protocol::v1::topics::DeviceTopic;

    struct Fixture {
        enrollments: Enrollments,
        gate: Gate,
        device: Identity,
        keys: SessionKeys,
        /// The coordinator identity the fixture enrolled under.
        coordinator: PublicIdentity,
    }

    impl Fixture {
        fn keys_owner_public(&self) -> PublicIdentity {
            self.coordinator.clone()
        }
    }

    /// A coordinator with `pi-1` enrolled (claimed), and the device's view of the session.
    fn fixture() -> Fixture {
        let claim = SigningKey::from_bytes(&[5; 32]);
        let coordinator = Identity::generate();
        let policy = EnrollmentConfig {
            claims: vec![ClaimConfig {
                key: public_key_hex(&claim.verifying_key()),
                groups: vec![],
            }],
            ..EnrollmentConfig::default()
        }
        .policy()
        .expect("valid");
        let mut enrollments = Enrollments::new(policy, coordinator.public(), Vec::new());
        let device = Identity::generate();
        let request = EnrollRequest {
            v: protocol::v1::VERSION,
            device: "pi-1".into(),
            identity: device.public(),
            hardware: Hardware::default(),
            claim_key: Some(public_key_hex(&claim.verifying_key())),
            issued_ms: 1,
        };
        let o = enrollments.on_request("pi-1", &seal_request(&request, &device, Some(&claim)), 1);
        assert_eq!(o.accepted.as_deref(), Some("pi-1"));
        let cp = coordinator.public();
        let keys = device
            .session_keys(&cp, "pi-1", &device.public(), &cp)
            .expect("keys");
        Fixture {
            enrollments,
            coordinator: cp,
            gate: Gate::new(coordinator, 7, Vec::new()),
            device,
            keys,
        }
    }

    fn stamp(counter: u64) -> Stamp {
        Stamp { epoch: 3, counter }
    }

    fn verify(f: &mut Fixture, topic: &str, bytes: &[u8], now: u64) -> Verdict {
        let parsed = Topic::parse(topic);
        f.gate
            .verify(&mut f.enrollments, parsed.as_ref(), topic, bytes, now)
    }

    #[test]
    fn a_good_message_is_routed_without_its_trailer() {
        let mut f = fixture();
        let topic = topics::telemetry("pi-1");
        let body = br#"{"v":1}"#;
        let sealed = f.keys.up.seal(&topic, body, stamp(1));
        assert_eq!(
            verify(&mut f, &topic, &sealed, 10),
            Verdict::Route { len: body.len() }
        );
        assert_eq!(&sealed[..body.len()], body);
        assert_eq!(f.gate.take_moved_windows(), vec![("pi-1".to_owned(), 3, 1)]);
        assert!(f.gate.take_moved_windows().is_empty());
        assert!(f.gate.drop_totals().is_empty());
        assert_eq!(
            f.gate.summary(10),
            None,
            "nothing dropped, nothing journaled"
        );
    }

    #[test]
    fn unenrolled_forged_and_replayed_messages_are_dropped_and_counted() {
        let mut f = fixture();
        let topic = topics::data("pi-1", "s");
        let sealed = f.keys.up.seal(&topic, b"{}", stamp(1));
        assert_eq!(
            verify(&mut f, &topic, &sealed, 10),
            Verdict::Route { len: 2 }
        );
        assert_eq!(
            verify(&mut f, &topic, &sealed, 11),
            Verdict::Dropped { reason: "replay" }
        );
        // Another device's topic: unknown to the enrollment.
        let other = topics::data("pi-9", "s");
        let sealed_other = f.keys.up.seal(&other, b"{}", stamp(2));
        assert_eq!(
            verify(&mut f, &other, &sealed_other, 12),
            Verdict::Dropped {
                reason: "unenrolled"
            }
        );
        // A MAC by another key, a flipped byte, no trailer at all.
        let forger = Identity::generate();
        let fake = forger
            .session_keys(
                &f.gate.public().clone(),
                "pi-1",
                &forger.public(),
                &f.gate.public().clone(),
            )
            .expect("keys");
        assert_eq!(
            verify(&mut f, &topic, &fake.up.seal(&topic, b"{}", stamp(3)), 13),
            Verdict::Dropped { reason: "bad_mac" }
        );
        let mut flipped = f.keys.up.seal(&topic, b"{}", stamp(4));
        flipped[0] ^= 1;
        assert_eq!(
            verify(&mut f, &topic, &flipped, 14),
            Verdict::Dropped { reason: "bad_mac" }
        );
        assert_eq!(
            verify(&mut f, &topic, b"{}", 15),
            Verdict::Dropped {
                reason: "no_trailer"
            }
        );
        // Moved to another topic of the same device: the topic is under the MAC.
        let register = topics::register("pi-1");
        let moved = f.keys.up.seal(&topic, b"{}", stamp(5));
        assert_eq!(
            verify(&mut f, &register, &moved, 16),
            Verdict::Dropped { reason: "bad_mac" }
        );
        let totals: Vec<(&str, u64)> = f.gate.drop_totals().iter().map(|(r, n)| (*r, *n)).collect();
        assert_eq!(
            totals,
            vec![
                ("bad_mac", 3),
                ("no_trailer", 1),
                ("replay", 1),
                ("unenrolled", 1)
            ]
        );
        match f.gate.summary(20) {
            Some(Event::AuthRejected {
                reasons,
                total,
                devices,
                ..
            }) => {
                assert_eq!(total, 6);
                assert_eq!(reasons.get("bad_mac"), Some(&3));
                assert_eq!(devices, vec!["pi-1".to_owned(), "pi-9".to_owned()]);
            }
            other => panic!("{other:?}"),
        }
        // At most one summary per interval, and none without new drops.
        verify(&mut f, &topic, b"{}", 21);
        assert_eq!(f.gate.summary(21), None);
        assert!(f.gate.summary(20 + SUMMARY_INTERVAL_MS).is_some());
        assert_eq!(f.gate.summary(40 + 2 * SUMMARY_INTERVAL_MS), None);
    }

    #[test]
    fn replay_windows_survive_a_store_reopen() {
        let mut f = fixture();
        let topic = topics::telemetry("pi-1");
        let first = f.keys.up.seal(&topic, b"{}", stamp(1));
        let second = f.keys.up.seal(&topic, b"{}", stamp(2));
        assert_eq!(verify(&mut f, &topic, &first, 1), Verdict::Route { len: 2 });
        assert_eq!(
            verify(&mut f, &topic, &second, 2),
            Verdict::Route { len: 2 }
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sled");
        {
            // What the service does at the end of a batch.
            let store = crate::store::Store::open(&path, 1 << 20).expect("opens");
            store
                .save_replay_windows(&f.gate.take_moved_windows())
                .expect("saves");
            store.commit(true).expect("commits");
        }
        let store = crate::store::Store::open(&path, 1 << 20).expect("reopens");
        let identity = f.gate.identity().clone();
        f.gate = Gate::new(identity, 8, store.load_replay_windows().expect("loads"));
        assert_eq!(
            verify(&mut f, &topic, &second, 3),
            Verdict::Dropped { reason: "replay" },
            "replayed after the restart"
        );
        assert_eq!(
            verify(&mut f, &topic, &first, 4),
            Verdict::Dropped { reason: "replay" }
        );
        let third = f.keys.up.seal(&topic, b"{}", stamp(3));
        assert_eq!(verify(&mut f, &topic, &third, 5), Verdict::Route { len: 2 });
    }

    #[test]
    fn pending_rejected_and_revoked_devices_are_refused() {
        let mut f = fixture();
        let topic = topics::telemetry("pi-1");
        f.enrollments.revoke("pi-1", 50).expect("known");
        let sealed = f.keys.up.seal(&topic, b"{}", stamp(1));
        assert_eq!(
            verify(&mut f, &topic, &sealed, 60),
            Verdict::Dropped { reason: "revoked" }
        );
        let dev = Identity::generate();
        let request = EnrollRequest {
            v: protocol::v1::VERSION,
            device: "pi-2".into(),
            identity: dev.public(),
            hardware: Hardware::default(),
            claim_key: None,
            issued_ms: 1,
        };
        f.enrollments
            .on_request("pi-2", &seal_request(&request, &dev, None), 1);
        let t2 = topics::telemetry("pi-2");
        assert_eq!(
            verify(&mut f, &t2, b"anything", 61),
            Verdict::Dropped {
                reason: "not_enrolled"
            }
        );
    }

    #[test]
    fn status_skips_the_window_and_echoes_are_ignored() {
        let mut f = fixture();
        let status = topics::status("pi-1");
        let s = |epoch| Stamp {
            epoch,
            counter: auth::STATUS_COUNTER,
        };
        let sealed = f.keys.up.seal(&status, b"{}", s(3));
        assert_eq!(
            verify(&mut f, &status, &sealed, 1),
            Verdict::Route { len: 2 }
        );
        assert_eq!(
            verify(&mut f, &status, &sealed, 2),
            Verdict::Route { len: 2 },
            "retained, redelivered"
        );
        let data = topics::data("pi-1", "s");
        let newer = f.keys.up.seal(
            &data,
            b"{}",
            Stamp {
                epoch: 4,
                counter: 1,
            },
        );
        verify(&mut f, &data, &newer, 3);
        assert_eq!(
            verify(&mut f, &status, &sealed, 4),
            Verdict::Route { len: 2 },
            "a will of an earlier boot still reaches the core, which compares since_ms"
        );
        let mut forged = sealed.clone();
        forged[0] ^= 1;
        assert_eq!(
            verify(&mut f, &status, &forged, 4),
            Verdict::Dropped { reason: "bad_mac" }
        );
        assert_eq!(verify(&mut f, &status, b"", 5), Verdict::Route { len: 0 });
        // Our own publishes, and enrollment requests (checked by the enrollment core).
        for t in [
            topics::offload_response("pi-1"),
            topics::enroll_answer("pi-1"),
            topics::fl_round("pi-1"),
        ] {
            assert_eq!(verify(&mut f, &t, b"x", 6), Verdict::Echo, "{t}");
        }
        assert_eq!(
            verify(&mut f, &topics::enroll("pi-1"), b"x", 7),
            Verdict::Enrollment
        );
        assert_eq!(
            verify(&mut f, "elsewhere/x", b"x", 8),
            Verdict::Route { len: 1 }
        );
        assert!(matches!(
            Topic::parse(&status),
            Some(Topic::Device(DeviceTopic::Status { .. }))
        ));
    }

    #[test]
    fn offload_responses_verify_with_the_device_side_keys() {
        let mut f = fixture();
        let topic = topics::offload_response("pi-1");
        let out = |payload: &[u8]| Outgoing::Publish {
            topic: topic.clone(),
            payload: payload.to_vec(),
            retain: false,
        };
        let (t, bytes, _) = f
            .gate
            .seal(&f.enrollments, out(b"OR.."), 99)
            .expect("sealed");
        assert_eq!(t, topic);
        let (payload, stamp) = f.keys.down.open(&topic, &bytes).expect("device verifies");
        assert_eq!(payload, b"OR..");
        assert_eq!(
            stamp,
            Stamp {
                epoch: 7,
                counter: 1
            }
        );
        let (_, again, _) = f
            .gate
            .seal(&f.enrollments, out(b"OR.."), 99)
            .expect("sealed");
        assert_eq!(f.keys.down.open(&topic, &again).expect("ok").1.counter, 2);
        // The up key does not open it: a response cannot be reflected as a request.
        assert!(f.keys.up.open(&topic, &bytes).is_err());
        // Signed topics verify with the coordinator's public identity; embedded ones and
        // clearing payloads go out untouched.
        let advert = topics::offload_capacity("r1");
        let (_, signed, _) = f
            .gate
            .seal(
                &f.enrollments,
                Outgoing::Publish {
                    topic: advert.clone(),
                    payload: b"{}".to_vec(),
                    retain: true,
                },
                1234,
            )
            .expect("sealed");
        assert_eq!(
            f.gate.public().open(&advert, &signed),
            Ok((&b"{}"[..], 1234))
        );
        let round = topics::fl_round("pi-1");
        let plain = Outgoing::Publish {
            topic: round,
            payload: b"FR".to_vec(),
            retain: true,
        };
        assert_eq!(f.gate.seal(&f.enrollments, plain, 1).expect("ok").1, b"FR");
        let clear = Outgoing::Publish {
            topic: advert,
            payload: Vec::new(),
            retain: true,
        };
        assert!(
            f.gate
                .seal(&f.enrollments, clear, 1)
                .expect("ok")
                .1
                .is_empty()
        );
        // No session with a device that is not enrolled: nothing is sent.
        let stranger = Outgoing::Publish {
            topic: topics::offload_response("pi-9"),
            payload: b"x".to_vec(),
            retain: false,
        };
        assert!(matches!(
            f.gate.seal(&f.enrollments, stranger, 1),
            Err(SealError::NoSession {
                reason: "unenrolled",
                ..
            })
        ));
        // Answers are signed as the device expects them.
        let record = f.enrollments.get("pi-1").expect("enrolled").clone();
        let answer = f.enrollments.answer(&record);
        let (t, bytes, retain) = f
            .gate
            .seal(
                &f.enrollments,
                Outgoing::Answer {
                    answer: answer.clone(),
                    retain: true,
                },
                5,
            )
            .expect("sealed");
        assert_eq!((t, retain), (topics::enroll_answer("pi-1"), true));
        let opened = enroll::open_answer("pi-1", &bytes, &f.device.public(), Some(f.gate.public()))
            .expect("device accepts it");
        assert_eq!(opened, answer);
    }

    #[test]
    fn during_a_rotation_both_keys_count_until_the_device_uses_the_new_one() {
        let mut f = fixture();
        let old = f.gate.identity().clone();
        let new = Identity::generate();
        let (dp, np) = (f.device.public(), new.public());
        let new_keys = f.device.session_keys(&np, "pi-1", &dp, &np).expect("keys");
        f.gate.rotate(new.clone());
        let announced = f.enrollments.rotate(np.clone(), 10);
        assert_eq!(announced.answers.len(), 1);
        // The announcement: signed by the old key, naming the new one.
        let (_, bytes, _) = f
            .gate
            .seal(
                &f.enrollments,
                Outgoing::Answer {
                    answer: announced.answers[0].answer.clone(),
                    retain: true,
                },
                10,
            )
            .expect("sealed");
        let opened = enroll::open_answer_signed_by("pi-1", &bytes, &dp, &old.public())
            .expect("signed by the old key");
        assert_eq!(opened.coordinator, np);
        // Everything else goes out under the new key.
        let response = topics::offload_response("pi-1");
        let (_, sealed, _) = f
            .gate
            .seal(
                &f.enrollments,
                Outgoing::Publish {
                    topic: response.clone(),
                    payload: b"OR".to_vec(),
                    retain: false,
                },
                11,
            )
            .expect("sealed");
        assert!(new_keys.down.open(&response, &sealed).is_ok());
        assert!(f.keys.down.open(&response, &sealed).is_err());

        let topic = topics::telemetry("pi-1");
        let under_old = f.keys.up.seal(&topic, b"{}", stamp(1));
        assert_eq!(
            verify(&mut f, &topic, &under_old, 12),
            Verdict::Route { len: 2 }
        );
        assert_eq!(f.gate.old_key_accepted(), 1);
        assert!(f.gate.take_switched().is_empty());
        let under_new = new_keys.up.seal(&topic, b"{}", stamp(2));
        assert_eq!(
            verify(&mut f, &topic, &under_new, 13),
            Verdict::Route { len: 2 }
        );
        assert_eq!(f.gate.take_switched(), vec!["pi-1".to_owned()]);
        assert!(f.enrollments.switched("pi-1"));
        // Switched: the old keys are refused.
        let late = f.keys.up.seal(&topic, b"{}", stamp(3));
        assert_eq!(
            verify(&mut f, &topic, &late, 14),
            Verdict::Dropped { reason: "bad_mac" }
        );
        assert_eq!(f.gate.old_key_accepted(), 1);

        // The switch survives a store reopen: after a restart (rotation still in progress) the
        // old keys stay refused for this device.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sled");
        {
            let store = crate::store::Store::open(&path, 1 << 20).expect("opens");
            store
                .save_enrollment(f.enrollments.get("pi-1").expect("enrolled"))
                .expect("saves");
            store
                .save_replay_windows(&f.gate.take_moved_windows())
                .expect("saves");
            store.commit(true).expect("commits");
        }
        let store = crate::store::Store::open(&path, 1 << 20).expect("reopens");
        f.enrollments = Enrollments::new(
            EnrollmentConfig::default().policy().expect("valid"),
            np.clone(),
            store.load_enrollments().expect("loads"),
        );
        f.gate = Gate::new(new.clone(), 8, store.load_replay_windows().expect("loads"))
            .with_previous(Some(old.clone()));
        assert!(f.enrollments.switched("pi-1"));
        let after = f.keys.up.seal(&topic, b"{}", stamp(4));
        assert_eq!(
            verify(&mut f, &topic, &after, 15),
            Verdict::Dropped { reason: "bad_mac" }
        );
        let good = new_keys.up.seal(&topic, b"{}", stamp(5));
        assert_eq!(verify(&mut f, &topic, &good, 16), Verdict::Route { len: 2 });
    }

    #[test]
    fn after_a_rotation_finishes_nothing_under_the_old_key_is_accepted() {
        let mut f = fixture();
        let new = Identity::generate();
        f.gate.rotate(new.clone());
        f.enrollments.rotate(new.public(), 10);
        let topic = topics::telemetry("pi-1");
        let before = f.keys.up.seal(&topic, b"{}", stamp(1));
        assert_eq!(
            verify(&mut f, &topic, &before, 11),
            Verdict::Route { len: 2 }
        );
        assert_eq!(f.gate.finish_rotation(), Some(f.keys_owner_public()));
        assert!(f.gate.previous().is_none());
        let after = f.keys.up.seal(&topic, b"{}", stamp(2));
        assert_eq!(
            verify(&mut f, &topic, &after, 12),
            Verdict::Dropped { reason: "bad_mac" }
        );
        // Its answers are the new key's now.
        let record = f.enrollments.get("pi-1").expect("enrolled").clone();
        let answer = f.enrollments.answer(&record);
        let (_, bytes, _) = f
            .gate
            .seal(
                &f.enrollments,
                Outgoing::Answer {
                    answer,
                    retain: true,
                },
                13,
            )
            .expect("sealed");
        assert!(
            enroll::open_answer("pi-1", &bytes, &f.device.public(), Some(&new.public())).is_ok()
        );
    }
}
