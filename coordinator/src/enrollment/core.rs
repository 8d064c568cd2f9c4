//! Enrollment decisions without I/O: a request (or an operator's command) in, the decision,
//! the answer to publish, the journal events and the record to persist out. The caller passes
//! the time; the policy comes from `[enrollment]`.
//!
//! Rules (one device id, one key):
//! - A new id is decided by the policy: `claim` accepts a request signed by a listed claim key
//!   (that claim's groups) and leaves an unclaimed one pending; `manual` leaves every new one
//!   pending; `allowlist` accepts listed ids (`allowlist_groups`) and rejects the rest.
//! - A new pending request beyond `max_pending` waiting ones is rejected and counted
//!   (`max_pending`), never stored: a flood of invented ids cannot grow the store.
//! - Policy rejections of an unknown id are answered but neither stored nor retained.
//! - The same id and key again: the current answer is sent again (a pending one is decided
//!   again first, so a claim key added since accepts it).
//! - The same id with another key: refused as a conflict (answer `rejected` about the other
//!   key, not retained, so the real device's retained answer stays) and journaled; the record
//!   is never overwritten. The one exception is a record an operator or the policy rejected:
//!   it holds no trust, so a request with a new key is decided afresh (how an operator frees an
//!   id that someone squatted: `devices reject` it, and the real device's next request counts).
//! - Operator decisions (`approve`, `reject`, `revoke`) are retained answers; each decision's
//!   `issued_ms` is above the previous one's, so a device always takes the newest even if the
//!   clock stepped back.
//! - Key rotation ([`Enrollments::rotate`]): every answer names the new coordinator key from
//!   then on; each enrolled device that has not used it yet gets a new (retained) answer, which
//!   the gate signs with the old key (the device's proof). A record remembers the coordinator
//!   key its device's session is under (`coordinator_key`), set when it is first accepted and
//!   when the gate sees its first message under a new key ([`Enrollments::switch`]); only that
//!   key's session keys are accepted once a device switched.

use std::collections::BTreeMap;

use protocol::v1::auth::PublicIdentity;
use protocol::v1::deploy::{VerifyingKey, key_id};
use protocol::v1::enroll::{self, Decision, EnrollAnswer, EnrollError, Hardware};
use serde::{Deserialize, Serialize};

use super::config::Policy;
use crate::event::Event;

/// `by` of a decision an operator made.
pub const BY_OPERATOR: &str = "operator";
/// `by` of a decision the allowlist made.
pub const BY_ALLOWLIST: &str = "allowlist";
/// `by` of a decision a claim key made (its id is in `claim`).
pub const BY_CLAIM: &str = "claim";
/// `by` of a rejection by the policy (an id not in the allowlist).
pub const BY_POLICY: &str = "policy";

/// What the coordinator knows about one device id's enrollment; persisted as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollmentRecord {
    pub device: String,
    /// The device's public keys, bound to the id by the first decision.
    pub identity: PublicIdentity,
    pub state: Decision,
    /// Deployment groups (the device's own registration no longer names them).
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub hardware: Hardware,
    /// Who decided: `claim`, `operator`, `allowlist`, `policy`; empty while pending.
    #[serde(default)]
    pub by: String,
    /// Id of the listed claim key that signed the request, if one did.
    #[serde(default)]
    pub claim: Option<String>,
    /// Why, for anything but accepted.
    #[serde(default)]
    pub reason: String,
    /// First request, coordinator clock.
    #[serde(default)]
    pub requested_ms: u64,
    /// Latest request.
    #[serde(default)]
    pub last_request_ms: u64,
    /// The current decision's time: its answer's `issued_ms`.
    #[serde(default)]
    pub decided_ms: u64,
    /// Key id of the coordinator key the device's session is under: set when it is accepted
    /// and when it switches to a rotated key. Empty for records from before rotations existed
    /// (the key current then).
    #[serde(default)]
    pub coordinator_key: String,
    /// Key id of the coordinator key the latest rotation announced to the device (so a
    /// rotation resumed after a restart announces with the same `issued_ms`).
    #[serde(default)]
    pub announced_key: String,
}

impl EnrollmentRecord {
    pub fn key_id(&self) -> String {
        self.identity.key_id()
    }
}

/// An answer to publish on the device's `enroll/answer` topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub answer: EnrollAnswer,
    /// Decisions about the enrolled key are retained; refusals of other keys are not.
    pub retain: bool,
}

/// What the caller does after a decision: journal `events`, persist the record of `changed`,
/// count `refused`, then (after the commit) publish `answer`.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub events: Vec<Event>,
    pub answer: Option<Answer>,
    /// The device whose record changed.
    pub changed: Option<String>,
    /// A request refused without a decision, by counter name (`bad_signature`, `max_pending`,
    /// `malformed_request`, ...).
    pub refused: Option<&'static str>,
    /// The device was accepted now (it joins deployments and federated tasks by its groups).
    pub accepted: Option<String>,
}

/// What a rotation asks for: the answers announcing the new key, the records that changed.
#[derive(Debug, Default, PartialEq)]
pub struct Announcement {
    /// One retained answer per enrolled device not yet under the new key.
    pub answers: Vec<Answer>,
    pub changed: Vec<String>,
}

/// Why an operator's command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("no enrollment request from device {0}")]
    Unknown(String),
    #[error("device {0} is enrolled; use `devices revoke` to take it out")]
    Enrolled(String),
    #[error("device {0} is revoked; `devices approve` takes it back")]
    Revoked(String),
    #[error("{0}")]
    Invalid(String),
}

/// Every enrollment record and the policy that decides new ones.
#[derive(Debug)]
pub struct Enrollments {
    policy: Policy,
    claim_keys: Vec<VerifyingKey>,
    coordinator: PublicIdentity,
    records: BTreeMap<String, EnrollmentRecord>,
}

/// What the policy says about a new request.
enum Verdict {
    Accept {
        groups: Vec<String>,
        by: &'static str,
    },
    Pending,
    Reject(String),
}

impl Enrollments {
    /// Starts from the persisted records; `coordinator` is named in every answer.
    pub fn new(
        policy: Policy,
        coordinator: PublicIdentity,
        records: impl IntoIterator<Item = EnrollmentRecord>,
    ) -> Enrollments {
        Enrollments {
            claim_keys: policy.claim_keys(),
            policy,
            coordinator,
            records: records.into_iter().map(|r| (r.device.clone(), r)).collect(),
        }
    }

    pub fn get(&self, device: &str) -> Option<&EnrollmentRecord> {
        self.records.get(device)
    }

    pub fn records(&self) -> impl Iterator<Item = &EnrollmentRecord> {
        self.records.values()
    }

    /// The coordinator key every answer names.
    pub fn coordinator(&self) -> &PublicIdentity {
        &self.coordinator
    }

    /// The coordinator's key is now `new`: every answer names it, and each enrolled device not
    /// yet under it is sent an answer saying so (see [`Enrollments::announce`]).
    pub fn rotate(&mut self, new: PublicIdentity, now_ms: u64) -> Announcement {
        self.coordinator = new;
        self.announce(now_ms)
    }

    /// The answers announcing the current key to every enrolled device not yet under it; a
    /// device announced to already gets the same answer again (after a restart during a
    /// rotation), the others a new decision time.
    pub fn announce(&mut self, now_ms: u64) -> Announcement {
        let current = self.coordinator.key_id();
        let due: Vec<String> = self
            .records
            .values()
            .filter(|r| r.state == Decision::Accepted && r.coordinator_key != current)
            .map(|r| r.device.clone())
            .collect();
        let mut out = Announcement::default();
        for device in due {
            let decided_ms = self.next_decision_ms(&device, now_ms);
            if let Some(r) = self.records.get_mut(&device)
                && r.announced_key != current
            {
                r.announced_key = current.clone();
                r.decided_ms = decided_ms;
                out.changed.push(device.clone());
            }
            out.answers.extend(self.retained(&device));
        }
        out
    }

    /// Whether `device` is enrolled and its session is under the current coordinator key.
    pub fn switched(&self, device: &str) -> bool {
        self.records
            .get(device)
            .is_some_and(|r| r.coordinator_key == self.coordinator.key_id())
    }

    /// `device` used the current coordinator key: its session is under it from now on. `true`
    /// when that is news (persist the record).
    pub fn switch(&mut self, device: &str) -> bool {
        let current = self.coordinator.key_id();
        match self.records.get_mut(device) {
            Some(r) if r.coordinator_key != current => {
                r.coordinator_key = current;
                true
            }
            _ => false,
        }
    }

    /// Enrolled devices under the current coordinator key, and those not yet (by id).
    pub fn switch_counts(&self) -> (usize, Vec<String>) {
        let current = self.coordinator.key_id();
        let mut switched = 0;
        let mut pending = Vec::new();
        for r in self
            .records
            .values()
            .filter(|r| r.state == Decision::Accepted)
        {
            if r.coordinator_key == current {
                switched += 1;
            } else {
                pending.push(r.device.clone());
            }
        }
        (switched, pending)
    }

    pub fn count(&self, state: Decision) -> usize {
        self.records.values().filter(|r| r.state == state).count()
    }

    /// The groups of an accepted device; `None` for any other.
    pub fn groups(&self, device: &str) -> Option<&[String]> {
        self.records
            .get(device)
            .filter(|r| r.state == Decision::Accepted)
            .map(|r| r.groups.as_slice())
    }

    /// The answer that states a record's current decision (the same bytes each time it is
    /// sealed: ed25519 signatures are deterministic).
    pub fn answer(&self, r: &EnrollmentRecord) -> EnrollAnswer {
        EnrollAnswer {
            v: protocol::v1::VERSION,
            device: r.device.clone(),
            device_key: r.identity.sign.clone(),
            decision: r.state,
            reason: r.reason.clone(),
            groups: if r.state == Decision::Accepted {
                r.groups.clone()
            } else {
                Vec::new()
            },
            coordinator: self.coordinator.clone(),
            issued_ms: r.decided_ms,
        }
    }

    fn retained(&self, device: &str) -> Option<Answer> {
        self.records.get(device).map(|r| Answer {
            answer: self.answer(r),
            retain: true,
        })
    }

    /// A request published on `device`'s enroll topic.
    pub fn on_request(&mut self, device: &str, bytes: &[u8], now_ms: u64) -> Outcome {
        let verified = match enroll::open_request(device, bytes, &self.claim_keys) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(%device, error = %e, "enrollment request refused");
                return Outcome {
                    refused: Some(request_error_reason(&e)),
                    ..Outcome::default()
                };
            }
        };
        let request = verified.request;
        let claim = verified.claim;
        let key_id_now = request.identity.key_id();
        if let Some(r) = self.records.get_mut(device) {
            if r.identity == request.identity {
                r.hardware = request.hardware;
                r.last_request_ms = now_ms;
                if r.state == Decision::Pending
                    && let Verdict::Accept { groups, by } = decide(&self.policy, device, claim)
                {
                    return self.accept(device, groups, by, claim, now_ms);
                }
                return Outcome {
                    answer: self.retained(device),
                    changed: Some(device.to_owned()),
                    ..Outcome::default()
                };
            }
            if r.state != Decision::Rejected {
                let reason = format!(
                    "device id {device} is {} under another key ({}); refused",
                    match r.state {
                        Decision::Pending => "waiting for enrollment",
                        _ => "enrolled",
                    },
                    r.key_id()
                );
                let event = Event::EnrollmentConflict {
                    device: device.to_owned(),
                    key_id: key_id_now,
                    enrolled_key_id: r.key_id(),
                    state: r.state.as_str(),
                    hardware: request.hardware,
                };
                let answer = EnrollAnswer {
                    v: protocol::v1::VERSION,
                    device: device.to_owned(),
                    device_key: request.identity.sign,
                    decision: Decision::Rejected,
                    reason,
                    groups: Vec::new(),
                    coordinator: self.coordinator.clone(),
                    issued_ms: now_ms,
                };
                return Outcome {
                    events: vec![event],
                    answer: Some(Answer {
                        answer,
                        retain: false,
                    }),
                    ..Outcome::default()
                };
            }
        }
        // A new id, or a rejected record's id under a new key: the policy decides.
        let claim_id = claim.as_ref().map(key_id);
        match decide(&self.policy, device, claim) {
            Verdict::Accept { groups, by } => {
                self.records.insert(
                    device.to_owned(),
                    new_record(device, &request.identity, request.hardware, now_ms),
                );
                self.accept(device, groups, by, claim, now_ms)
            }
            Verdict::Pending if self.count(Decision::Pending) >= self.policy.max_pending => {
                let answer = self.refusal(
                    device,
                    &request.identity,
                    format!(
                        "too many enrollment requests are waiting for an operator ({}); try again later",
                        self.policy.max_pending
                    ),
                    now_ms,
                );
                Outcome {
                    answer: Some(answer),
                    refused: Some("max_pending"),
                    ..Outcome::default()
                }
            }
            Verdict::Pending => {
                let mut record =
                    new_record(device, &request.identity, request.hardware.clone(), now_ms);
                record.claim = claim_id.clone();
                record.reason = match self.policy.mode {
                    super::config::Mode::Manual => "waiting for an operator (manual mode)".into(),
                    _ if request.claim_key.is_some() => {
                        "waiting for an operator (claimed by a key this coordinator does not list)"
                            .into()
                    }
                    _ => "waiting for an operator (no claim)".into(),
                };
                record.decided_ms = self.next_decision_ms(device, now_ms);
                let event = Event::EnrollmentPending {
                    device: device.to_owned(),
                    key_id: key_id_now,
                    claim_key: request.claim_key,
                    hardware: request.hardware,
                };
                self.records.insert(device.to_owned(), record);
                Outcome {
                    events: vec![event],
                    answer: self.retained(device),
                    changed: Some(device.to_owned()),
                    ..Outcome::default()
                }
            }
            Verdict::Reject(reason) => {
                let event = Event::EnrollmentRejected {
                    device: device.to_owned(),
                    key_id: key_id_now,
                    by: BY_POLICY,
                    reason: reason.clone(),
                };
                Outcome {
                    events: vec![event],
                    answer: Some(self.refusal(device, &request.identity, reason, now_ms)),
                    ..Outcome::default()
                }
            }
        }
    }

    /// A rejection that is not stored and not retained.
    fn refusal(
        &self,
        device: &str,
        identity: &PublicIdentity,
        reason: String,
        now_ms: u64,
    ) -> Answer {
        Answer {
            answer: EnrollAnswer {
                v: protocol::v1::VERSION,
                device: device.to_owned(),
                device_key: identity.sign.clone(),
                decision: Decision::Rejected,
                reason,
                groups: Vec::new(),
                coordinator: self.coordinator.clone(),
                issued_ms: now_ms,
            },
            retain: false,
        }
    }

    /// A time for a new decision about `device`: now, but above its previous decision's.
    fn next_decision_ms(&self, device: &str, now_ms: u64) -> u64 {
        match self.records.get(device) {
            Some(r) if r.decided_ms >= now_ms => r.decided_ms + 1,
            _ => now_ms,
        }
    }

    fn accept(
        &mut self,
        device: &str,
        groups: Vec<String>,
        by: &'static str,
        claim: Option<VerifyingKey>,
        now_ms: u64,
    ) -> Outcome {
        let decided_ms = self.next_decision_ms(device, now_ms);
        let current = self.coordinator.key_id();
        let Some(r) = self.records.get_mut(device) else {
            return Outcome::default();
        };
        if !matches!(r.state, Decision::Accepted | Decision::Revoked) {
            // Its first session: under the current key. (An enrolled or revoked device keeps
            // the key its session was under: a rotation still has to reach it.)
            r.coordinator_key = current;
        }
        r.state = Decision::Accepted;
        r.groups = groups;
        r.by = by.to_owned();
        if by == BY_CLAIM {
            r.claim = claim.as_ref().map(key_id);
        }
        r.reason.clear();
        r.decided_ms = decided_ms;
        let event = Event::DeviceEnrolled {
            device: device.to_owned(),
            key_id: r.key_id(),
            by,
            claim_key_id: if by == BY_CLAIM {
                r.claim.clone()
            } else {
                None
            },
            groups: r.groups.clone(),
            hardware: r.hardware.clone(),
        };
        Outcome {
            events: vec![event],
            answer: self.retained(device),
            changed: Some(device.to_owned()),
            accepted: Some(device.to_owned()),
            ..Outcome::default()
        }
    }

    /// `devices approve`: accepts a device in any state, with `groups` (an accepted or revoked
    /// device keeps the groups it had when none are given).
    pub fn approve(
        &mut self,
        device: &str,
        groups: Vec<String>,
        now_ms: u64,
    ) -> Result<Outcome, CommandError> {
        super::config::check_groups("--group", &groups)
            .map_err(|e| CommandError::Invalid(e.to_string()))?;
        let r = self
            .records
            .get(device)
            .ok_or_else(|| CommandError::Unknown(device.to_owned()))?;
        if r.state == Decision::Accepted && (groups.is_empty() || groups == r.groups) {
            // Nothing changes: the current answer once more.
            return Ok(Outcome {
                answer: self.retained(device),
                ..Outcome::default()
            });
        }
        let groups =
            if groups.is_empty() && matches!(r.state, Decision::Accepted | Decision::Revoked) {
                r.groups.clone()
            } else {
                groups
            };
        Ok(self.accept(device, groups, BY_OPERATOR, None, now_ms))
    }

    /// `devices reject`: refuses a pending (or already rejected) device.
    pub fn reject(
        &mut self,
        device: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<Outcome, CommandError> {
        let decided_ms = self.next_decision_ms(device, now_ms);
        let r = self
            .records
            .get_mut(device)
            .ok_or_else(|| CommandError::Unknown(device.to_owned()))?;
        match r.state {
            Decision::Accepted => return Err(CommandError::Enrolled(device.to_owned())),
            Decision::Revoked => return Err(CommandError::Revoked(device.to_owned())),
            Decision::Pending | Decision::Rejected => {}
        }
        r.state = Decision::Rejected;
        r.by = BY_OPERATOR.to_owned();
        r.reason = if reason.is_empty() {
            "rejected by an operator".into()
        } else {
            reason.to_owned()
        };
        r.groups.clear();
        r.decided_ms = decided_ms;
        let event = Event::EnrollmentRejected {
            device: device.to_owned(),
            key_id: r.key_id(),
            by: BY_OPERATOR,
            reason: r.reason.clone(),
        };
        Ok(Outcome {
            events: vec![event],
            answer: self.retained(device),
            changed: Some(device.to_owned()),
            ..Outcome::default()
        })
    }

    /// `devices revoke`: the device's messages are refused from now on and it is told to stop.
    pub fn revoke(&mut self, device: &str, now_ms: u64) -> Result<Outcome, CommandError> {
        let decided_ms = self.next_decision_ms(device, now_ms);
        let r = self
            .records
            .get_mut(device)
            .ok_or_else(|| CommandError::Unknown(device.to_owned()))?;
        if r.state == Decision::Revoked {
            return Ok(Outcome {
                answer: self.retained(device),
                ..Outcome::default()
            });
        }
        let previous = r.state.as_str();
        r.state = Decision::Revoked;
        r.by = BY_OPERATOR.to_owned();
        r.reason = "revoked by an operator".into();
        r.decided_ms = decided_ms;
        let event = Event::DeviceRevoked {
            device: device.to_owned(),
            key_id: r.key_id(),
            previous,
            groups: r.groups.clone(),
        };
        Ok(Outcome {
            events: vec![event],
            answer: self.retained(device),
            changed: Some(device.to_owned()),
            ..Outcome::default()
        })
    }
}

fn new_record(
    device: &str,
    identity: &PublicIdentity,
    hardware: Hardware,
    now_ms: u64,
) -> EnrollmentRecord {
    EnrollmentRecord {
        device: device.to_owned(),
        identity: identity.clone(),
        state: Decision::Pending,
        groups: Vec::new(),
        hardware,
        by: String::new(),
        claim: None,
        reason: String::new(),
        requested_ms: now_ms,
        last_request_ms: now_ms,
        decided_ms: now_ms,
        coordinator_key: String::new(),
        announced_key: String::new(),
    }
}

fn decide(policy: &Policy, device: &str, claim: Option<VerifyingKey>) -> Verdict {
    use super::config::Mode;
    match policy.mode {
        Mode::Claim => match claim.and_then(|k| policy.claim_groups(&k)) {
            Some(groups) => Verdict::Accept {
                groups: groups.to_vec(),
                by: BY_CLAIM,
            },
            None => Verdict::Pending,
        },
        Mode::Manual => Verdict::Pending,
        Mode::Allowlist if policy.allowlist.contains(device) => Verdict::Accept {
            groups: policy.allowlist_groups.clone(),
            by: BY_ALLOWLIST,
        },
        Mode::Allowlist => Verdict::Reject(format!(
            "device id {device} is not in this coordinator's allowlist"
        )),
    }
}

/// Counter name of a request that does not verify.
fn request_error_reason(e: &EnrollError) -> &'static str {
    match e {
        EnrollError::DeviceSignature(a) => a.reason(),
        EnrollError::ClaimSignature(_) | EnrollError::ClaimMismatch { .. } => "bad_claim",
        EnrollError::TooLarge { .. } => "too_large",
        EnrollError::DeviceMismatch { .. } => "wrong_device",
        EnrollError::Json(_)
        | EnrollError::Version(_)
        | EnrollError::DeviceId(_)
        | EnrollError::CoordinatorSignature(_)
        | EnrollError::WrongKey { .. } => "malformed_request",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrollment::config::{ClaimConfig, EnrollmentConfig, Mode};
    use protocol::v1::auth::Identity;
    use protocol::v1::deploy::{SigningKey, public_key_hex};
    use protocol::v1::enroll::{EnrollRequest, seal_request};

    fn claim_key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn enrollments(mode: Mode, max_pending: usize) -> Enrollments {
        let config = EnrollmentConfig {
            mode,
            claims: vec![ClaimConfig {
                key: public_key_hex(&claim_key().verifying_key()),
                groups: vec!["lab".into()],
            }],
            allowlist: vec!["pi-1".into()],
            allowlist_groups: vec!["listed".into()],
            max_pending,
        };
        Enrollments::new(
            config.policy().expect("valid"),
            Identity::generate().public(),
            Vec::new(),
        )
    }

    fn request(device: &str, id: &Identity, claim: Option<&SigningKey>) -> Vec<u8> {
        let req = EnrollRequest {
            v: protocol::v1::VERSION,
            device: device.into(),
            identity: id.public(),
            hardware: Hardware {
                arch: "aarch64".into(),
                os: "linux".into(),
                board: "Raspberry Pi 4".into(),
                accelerators: vec![],
                agent_version: "0.1.0".into(),
            },
            claim_key: claim.map(|k| public_key_hex(&k.verifying_key())),
            issued_ms: 1,
        };
        seal_request(&req, id, claim)
    }

    fn decision(o: &Outcome) -> Option<(Decision, bool)> {
        o.answer.as_ref().map(|a| (a.answer.decision, a.retain))
    }

    #[test]
    fn claimed_request_is_accepted_with_the_claims_groups() {
        let mut e = enrollments(Mode::Claim, 10);
        let dev = Identity::generate();
        let o = e.on_request("pi-7", &request("pi-7", &dev, Some(&claim_key())), 100);
        assert_eq!(decision(&o), Some((Decision::Accepted, true)));
        let a = &o.answer.as_ref().expect("answer").answer;
        assert_eq!(a.groups, vec!["lab".to_owned()]);
        assert_eq!(a.device_key, dev.public().sign);
        assert_eq!(o.changed.as_deref(), Some("pi-7"));
        assert_eq!(o.accepted.as_deref(), Some("pi-7"));
        match &o.events[..] {
            [
                Event::DeviceEnrolled {
                    by,
                    claim_key_id,
                    groups,
                    hardware,
                    ..
                },
            ] => {
                assert_eq!(*by, BY_CLAIM);
                assert_eq!(
                    claim_key_id.as_deref(),
                    Some(key_id(&claim_key().verifying_key()).as_str())
                );
                assert_eq!(groups, &vec!["lab".to_owned()]);
                assert_eq!(hardware.board, "Raspberry Pi 4");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.groups("pi-7"), Some(&["lab".to_owned()][..]));
    }

    #[test]
    fn unclaimed_request_waits_and_an_operator_decides() {
        let mut e = enrollments(Mode::Claim, 10);
        let dev = Identity::generate();
        let o = e.on_request("pi-7", &request("pi-7", &dev, None), 100);
        assert_eq!(decision(&o), Some((Decision::Pending, true)));
        assert!(matches!(&o.events[..], [Event::EnrollmentPending { .. }]));
        assert_eq!(e.groups("pi-7"), None);
        // A claim by a key this coordinator does not list is no claim.
        let stranger = SigningKey::from_bytes(&[9; 32]);
        let other = Identity::generate();
        let o = e.on_request("pi-8", &request("pi-8", &other, Some(&stranger)), 100);
        assert_eq!(decision(&o), Some((Decision::Pending, true)));
        // The operator approves with groups; the answer is newer than the pending one.
        let o = e
            .approve("pi-7", vec!["north".into()], 100)
            .expect("known device");
        let a = o.answer.expect("answer").answer;
        assert_eq!(
            (a.decision, a.groups.clone()),
            (Decision::Accepted, vec!["north".to_owned()])
        );
        assert!(
            a.issued_ms > 100,
            "issued after the pending answer of the same ms"
        );
        assert!(matches!(
            &o.events[..],
            [Event::DeviceEnrolled {
                by: BY_OPERATOR,
                ..
            }]
        ));
        assert_eq!(
            e.approve("nobody", vec![], 100),
            Err(CommandError::Unknown("nobody".into()))
        );
        assert!(matches!(
            e.approve("pi-8", vec!["bad/group".into()], 100),
            Err(CommandError::Invalid(_))
        ));
        let o = e.reject("pi-8", "not ours", 200).expect("pending");
        assert_eq!(decision(&o), Some((Decision::Rejected, true)));
        assert_eq!(o.answer.expect("answer").answer.reason, "not ours");
        assert_eq!(
            e.reject("pi-7", "", 200),
            Err(CommandError::Enrolled("pi-7".into()))
        );
    }

    #[test]
    fn manual_mode_makes_even_claimed_requests_wait() {
        let mut e = enrollments(Mode::Manual, 10);
        let o = e.on_request(
            "pi-7",
            &request("pi-7", &Identity::generate(), Some(&claim_key())),
            100,
        );
        assert_eq!(decision(&o), Some((Decision::Pending, true)));
        assert_eq!(e.count(Decision::Pending), 1);
    }

    #[test]
    fn allowlist_accepts_listed_ids_and_rejects_others_without_storing_them() {
        let mut e = enrollments(Mode::Allowlist, 10);
        let o = e.on_request("pi-1", &request("pi-1", &Identity::generate(), None), 100);
        assert_eq!(decision(&o), Some((Decision::Accepted, true)));
        assert_eq!(
            o.answer.expect("answer").answer.groups,
            vec!["listed".to_owned()]
        );
        let o = e.on_request("pi-2", &request("pi-2", &Identity::generate(), None), 100);
        assert_eq!(decision(&o), Some((Decision::Rejected, false)));
        assert!(matches!(
            &o.events[..],
            [Event::EnrollmentRejected { by: BY_POLICY, .. }]
        ));
        assert_eq!(o.changed, None);
        assert!(e.get("pi-2").is_none());
    }

    #[test]
    fn another_key_for_an_enrolled_id_is_a_conflict_and_changes_nothing() {
        let mut e = enrollments(Mode::Claim, 10);
        let real = Identity::generate();
        e.on_request("pi-7", &request("pi-7", &real, Some(&claim_key())), 100);
        let before = e.get("pi-7").cloned();
        let thief = Identity::generate();
        let o = e.on_request("pi-7", &request("pi-7", &thief, Some(&claim_key())), 200);
        assert_eq!(
            decision(&o),
            Some((Decision::Rejected, false)),
            "not retained"
        );
        let a = o.answer.as_ref().expect("answer");
        assert_eq!(
            a.answer.device_key,
            thief.public().sign,
            "about the other key"
        );
        assert!(
            a.answer.reason.contains(&real.public().key_id()),
            "{}",
            a.answer.reason
        );
        assert!(matches!(&o.events[..], [Event::EnrollmentConflict { .. }]));
        assert_eq!(o.changed, None);
        assert_eq!(e.get("pi-7").cloned(), before, "record not overwritten");
        // A pending id is not taken over either.
        e.on_request("pi-8", &request("pi-8", &real, None), 100);
        let o = e.on_request("pi-8", &request("pi-8", &thief, None), 200);
        assert!(matches!(&o.events[..], [Event::EnrollmentConflict { .. }]));
        assert_eq!(
            e.get("pi-8").map(|r| r.identity.clone()),
            Some(real.public())
        );
        // Once an operator rejects the squatter, a new key is decided afresh.
        e.reject("pi-8", "", 300).expect("pending");
        let o = e.on_request("pi-8", &request("pi-8", &thief, None), 400);
        assert_eq!(decision(&o), Some((Decision::Pending, true)));
        assert_eq!(
            e.get("pi-8").map(|r| r.identity.clone()),
            Some(thief.public())
        );
    }

    #[test]
    fn repeated_requests_get_the_same_answer() {
        let mut e = enrollments(Mode::Claim, 10);
        let dev = Identity::generate();
        let bytes = request("pi-7", &dev, Some(&claim_key()));
        let first = e.on_request("pi-7", &bytes, 100);
        let again = e.on_request("pi-7", &bytes, 5_000);
        assert_eq!(
            again.answer.as_ref().map(|a| &a.answer),
            first.answer.as_ref().map(|a| &a.answer),
            "same decision, same issued_ms"
        );
        assert!(again.events.is_empty(), "no second device_enrolled");
        assert_eq!(e.get("pi-7").map(|r| r.last_request_ms), Some(5_000));
        // A pending device is decided again: accepted once its request carries a listed claim.
        let other = Identity::generate();
        e.on_request("pi-8", &request("pi-8", &other, None), 100);
        let o = e.on_request("pi-8", &request("pi-8", &other, None), 200);
        assert_eq!(decision(&o), Some((Decision::Pending, true)));
        assert!(o.events.is_empty());
        let o = e.on_request("pi-8", &request("pi-8", &other, Some(&claim_key())), 300);
        assert_eq!(decision(&o), Some((Decision::Accepted, true)));
    }

    #[test]
    fn requests_beyond_max_pending_are_refused_and_counted() {
        let mut e = enrollments(Mode::Claim, 2);
        for d in ["a", "b"] {
            let o = e.on_request(d, &request(d, &Identity::generate(), None), 100);
            assert_eq!(decision(&o), Some((Decision::Pending, true)));
        }
        let o = e.on_request("c", &request("c", &Identity::generate(), None), 100);
        assert_eq!(decision(&o), Some((Decision::Rejected, false)));
        assert_eq!(o.refused, Some("max_pending"));
        assert!(e.get("c").is_none(), "not stored");
        // Claimed requests are not held back by the queue.
        let o = e.on_request(
            "d",
            &request("d", &Identity::generate(), Some(&claim_key())),
            100,
        );
        assert_eq!(decision(&o), Some((Decision::Accepted, true)));
    }

    #[test]
    fn revoke_answers_revoked_and_sticks() {
        let mut e = enrollments(Mode::Claim, 10);
        let dev = Identity::generate();
        let bytes = request("pi-7", &dev, Some(&claim_key()));
        e.on_request("pi-7", &bytes, 100);
        let o = e.revoke("pi-7", 50).expect("known");
        let a = o.answer.expect("answer").answer;
        assert_eq!(a.decision, Decision::Revoked);
        assert!(
            a.issued_ms > 100,
            "newer than the acceptance despite the clock"
        );
        assert!(matches!(
            &o.events[..],
            [Event::DeviceRevoked {
                previous: "accepted",
                ..
            }]
        ));
        assert_eq!(e.groups("pi-7"), None);
        // Asking again does not re-enroll it.
        let o = e.on_request("pi-7", &bytes, 200);
        assert_eq!(decision(&o), Some((Decision::Revoked, true)));
        assert!(o.events.is_empty());
        // Revoking twice repeats the answer; an operator can take it back.
        assert!(e.revoke("pi-7", 300).expect("known").events.is_empty());
        let o = e.approve("pi-7", vec![], 400).expect("known");
        assert_eq!(decision(&o), Some((Decision::Accepted, true)));
        assert_eq!(
            e.groups("pi-7"),
            Some(&["lab".to_owned()][..]),
            "its groups back"
        );
    }

    #[test]
    fn forged_requests_are_refused_by_reason() {
        let mut e = enrollments(Mode::Claim, 10);
        let dev = Identity::generate();
        let mut bytes = request("pi-7", &dev, Some(&claim_key()));
        let n = bytes.len();
        bytes[n - 10] ^= 1;
        let o = e.on_request("pi-7", &bytes, 100);
        assert_eq!(o.refused, Some("bad_claim"));
        assert_eq!(o.answer, None);
        let o = e.on_request("pi-8", &request("pi-7", &dev, None), 100);
        assert!(o.refused.is_some(), "moved to another id");
        assert_eq!(
            e.on_request("pi-7", b"{}", 100).refused,
            Some("malformed_request")
        );
    }

    #[test]
    fn a_rotation_announces_the_new_key_to_enrolled_devices_once() {
        let mut e = enrollments(Mode::Claim, 10);
        let old = e.coordinator().key_id();
        let (a, b) = (Identity::generate(), Identity::generate());
        e.on_request("pi-a", &request("pi-a", &a, Some(&claim_key())), 100);
        e.on_request("pi-b", &request("pi-b", &b, Some(&claim_key())), 100);
        e.on_request("pi-p", &request("pi-p", &Identity::generate(), None), 100);
        assert_eq!(e.get("pi-a").map(|r| r.coordinator_key.clone()), Some(old));
        let new = Identity::generate().public();
        let out = e.rotate(new.clone(), 50);
        assert_eq!(out.changed, vec!["pi-a".to_owned(), "pi-b".to_owned()]);
        assert_eq!(out.answers.len(), 2, "enrolled devices only");
        for a in &out.answers {
            assert!(a.retain);
            assert_eq!(a.answer.coordinator, new);
            assert_eq!(a.answer.decision, Decision::Accepted);
            assert!(a.answer.issued_ms > 100, "newer than the acceptance");
        }
        // Resumed after a restart: the same answers, nothing to persist.
        let again = e.announce(5_000);
        assert_eq!(again.answers, out.answers);
        assert!(again.changed.is_empty());
        assert_eq!(e.switch_counts(), (0, vec!["pi-a".into(), "pi-b".into()]));
        assert!(e.switch("pi-a"));
        assert!(!e.switch("pi-a"), "once");
        assert!(e.switched("pi-a") && !e.switched("pi-b"));
        assert_eq!(e.switch_counts(), (1, vec!["pi-b".into()]));
        assert_eq!(e.announce(6_000).answers.len(), 1);
        // A device accepted now starts under the new key.
        e.approve("pi-p", vec![], 7_000).expect("pending");
        assert!(e.switched("pi-p"));
    }
}
