//! The enrollment state machine: no I/O, no clock (the caller passes the wall-clock time a
//! request carries, and owns the timer the retry delays are for).
//!
//! ```text
//! not enrolled ──request()──► sealed request + delay before the next one (doubling, jittered,
//!      ▲                      capped at 5 minutes)
//!      │          on_answer(bytes) ──► verify (pinned or trusted coordinator key, our key, our id)
//!      │                                ├─ about another key ──────────► OtherKey (ignored)
//!      │                                ├─ not newer than the held one ─► Stale (ignored)
//!      │                                ├─ accepted ────────────────────► Session (enrolled)
//!      │                                ├─ accepted, signed by the trusted key but naming
//!      │                                │  another one ─────────────────► Rotated (re-pinned,
//!      │                                │                                  new session keys)
//!      └────────────────────────────────┴─ pending/rejected/revoked ───► no session
//! ```
//!
//! Rotation: the coordinator replaces its key by announcing the new one in an accepted answer
//! signed with the key the device trusts. The device trusts the new key from then on (and only
//! it), keeps the announcing answer as the evidence of why ([`Rotation`], persisted beside the
//! answer so a restart trusts the new key even when the configured pin names the old one), and
//! derives new session keys. An answer naming another key signed by anything but the trusted
//! key is refused like any forgery.
//!
//! Trust: the coordinator key that counts is the configured pin, else the key named in the
//! first accepted answer about our key (trust on first use); from then on only answers signed by
//! it count. Before anything is trusted, a refusal is reported but neither held nor persisted,
//! so a forged "rejected" with a far-future timestamp cannot shut out the real answer.
//!
//! The newest trusted answer is "held": only a newer one (higher `issued_ms`) replaces it, and
//! the caller persists it ([`Machine::take_persist`]) so a restart starts from it
//! ([`Machine::restore`]) instead of waiting for the broker's retained copy.

use std::sync::Arc;
use std::time::Duration;

use protocol::v1::VERSION;
use protocol::v1::auth::{AuthError, Identity, PublicIdentity};
use protocol::v1::deploy::{SigningKey, public_key_hex};
use protocol::v1::enroll::{self, Decision, EnrollAnswer, EnrollError, EnrollRequest, Hardware};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use serde::{Deserialize, Serialize};

use super::config::MAX_RETRY_MS;
use super::session::{Counter, Session};

/// What the machine starts from.
#[derive(Debug)]
pub struct Params {
    pub device: String,
    pub identity: Identity,
    /// The fleet claim key that co-signs requests, if the device has one.
    pub claim: Option<SigningKey>,
    pub hardware: Hardware,
    /// `enrollment.coordinator`, if set.
    pub pin: Option<PublicIdentity>,
    /// `enrollment.retry_ms`.
    pub retry_ms: u64,
    /// This process's boot epoch (see `files::Files::raise_epoch`).
    pub epoch: u64,
}

/// Why the device trusts the coordinator key it trusts, when that is not the pin or the first
/// answer: the accepted answer, signed by the `previous` key, that named the current one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    /// The key that signed the announcement (trusted before it, never since).
    pub previous: PublicIdentity,
    /// The signed announcement (an `EnrollAnswer`), hex.
    #[serde(with = "hex_bytes")]
    pub answer: Vec<u8>,
}

/// Bytes as a hex string in JSON.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

/// What an answer did.
#[derive(Debug)]
pub enum Verdict {
    /// Accepted and signed by the trusted key, naming a new one: the coordinator rotated its
    /// key. Trusted from now on (a new session), the previous one no more.
    Rotated {
        groups: Vec<String>,
        /// Key id of the key trusted until now.
        from: String,
        /// Key id of the key trusted from now on.
        to: String,
        /// The configured pin (`enrollment.coordinator`) is another key than the one now
        /// trusted: its key id.
        stale_pin: Option<String>,
    },
    /// Newer and accepted: the device is enrolled (a new session).
    Accepted {
        groups: Vec<String>,
        /// Key id of the coordinator now trusted.
        coordinator: String,
        /// Nothing was pinned or trusted before: this answer's key is trusted on first use.
        first_use: bool,
        /// The device was enrolled already (new groups, or re-approved).
        renewed: bool,
    },
    /// Newer and not accepted: pending, rejected or revoked. No session.
    NotAccepted {
        decision: Decision,
        reason: String,
        /// The device was enrolled until this answer (it stops sending now).
        was_accepted: bool,
        /// Signed by the trusted coordinator (held and persisted); false before anything is
        /// trusted, when the answer could be anyone's.
        trusted: bool,
    },
    /// Not newer than the answer held: the retained copy again (`same`), or an old one replayed.
    Stale {
        issued_ms: u64,
        held_ms: u64,
        same: bool,
    },
    /// About another device key (someone else asking for this id): not ours to act on.
    OtherKey { key: String },
    /// Does not verify or decode.
    Invalid(String),
}

/// See the module docs.
#[derive(Debug)]
pub struct Machine {
    device: String,
    identity: Identity,
    public: PublicIdentity,
    claim: Option<SigningKey>,
    hardware: Hardware,
    /// The coordinator whose answers count: the pin, else the one an accepted answer named,
    /// or the one a rotation announced.
    trusted: Option<PublicIdentity>,
    /// `enrollment.coordinator`, for telling the operator it went stale.
    pin: Option<PublicIdentity>,
    /// How `trusted` came from a rotation, if it did.
    rotation: Option<Rotation>,
    /// A rotation to write (before the answer) so a restart trusts the new key.
    persist_rotation: Option<Rotation>,
    /// The newest answer signed by `trusted`, with its signed bytes.
    held: Option<(EnrollAnswer, Vec<u8>)>,
    session: Option<Arc<Session>>,
    epoch: u64,
    counter: Arc<Counter>,
    retry_ms: u64,
    attempt: u32,
    rng: StdRng,
    persist: Option<Vec<u8>>,
}

impl Machine {
    pub fn new(p: Params) -> Machine {
        Machine::with_rng(p, StdRng::from_entropy())
    }

    /// A machine whose retry jitter comes from `rng` (tests seed it).
    pub fn with_rng(p: Params, rng: StdRng) -> Machine {
        Machine {
            public: p.identity.public(),
            device: p.device,
            identity: p.identity,
            claim: p.claim,
            hardware: p.hardware,
            trusted: p.pin.clone(),
            pin: p.pin,
            rotation: None,
            persist_rotation: None,
            held: None,
            session: None,
            epoch: p.epoch,
            counter: Arc::default(),
            retry_ms: p.retry_ms,
            attempt: 0,
            rng,
            persist: None,
        }
    }

    /// Starts from the answer persisted by an earlier run, verified again (pin, our key, our
    /// id); returns its decision. A file that does not verify (tampered, another pin, another
    /// key) is refused and the machine stays unenrolled.
    ///
    /// After a rotation ([`Machine::restore_rotation`] first), an answer file that does not
    /// verify under the new key (a crash before it was rewritten) gives way to the rotation's
    /// own answer.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<Decision, RestoreError> {
        let (answer, bytes) = match self.verify(bytes) {
            Ok((answer, rotated_from)) => {
                if let Some(previous) = rotated_from
                    && answer.decision == Decision::Accepted
                {
                    // Trusted pin, rotation answer, no rotation file (its write failed): the
                    // rotation counts now, and is written again.
                    let r = Rotation {
                        previous,
                        answer: bytes.to_vec(),
                    };
                    self.rotation = Some(r.clone());
                    self.persist_rotation = Some(r);
                }
                (answer, bytes.to_vec())
            }
            Err(e) => match &self.rotation {
                Some(r) => {
                    let answer = enroll::open_answer_signed_by(
                        &self.device,
                        &r.answer,
                        &self.public,
                        &r.previous,
                    )?;
                    (answer, r.answer.clone())
                }
                None => return Err(e.into()),
            },
        };
        let decision = answer.decision;
        if decision == Decision::Accepted {
            self.session = Some(Arc::new(self.session_for(&answer)?));
        }
        // Only answers under a trusted key were ever persisted: its signer is trusted again.
        if decision == Decision::Accepted || self.trusted.is_none() {
            self.trusted = Some(answer.coordinator.clone());
        }
        self.held = Some((answer, bytes));
        Ok(decision)
    }

    /// Starts from a rotation persisted by an earlier run: its answer must be signed by the
    /// previous key, accept this device and name another key, which is trusted from now on
    /// (over the configured pin). Returns the key id now trusted.
    pub fn restore_rotation(&mut self, r: Rotation) -> Result<String, RestoreError> {
        let answer =
            enroll::open_answer_signed_by(&self.device, &r.answer, &self.public, &r.previous)?;
        if answer.decision != Decision::Accepted || answer.coordinator == r.previous {
            return Err(RestoreError::NotARotation);
        }
        let to = answer.coordinator.key_id();
        self.trusted = Some(answer.coordinator);
        self.rotation = Some(r);
        Ok(to)
    }

    /// The configured pin, when it names another key than the one trusted (a rotation
    /// superseded it): `(pin key id, trusted key id)`.
    pub fn stale_pin(&self) -> Option<(String, String)> {
        match (&self.pin, &self.trusted) {
            (Some(p), Some(t)) if p != t => Some((p.key_id(), t.key_id())),
            _ => None,
        }
    }

    /// Verifies an answer against the trusted key (or, with none, the key it names); the key
    /// it rotated from when it is signed by the trusted key and names another.
    fn verify(&self, bytes: &[u8]) -> Result<(EnrollAnswer, Option<PublicIdentity>), EnrollError> {
        let Some(trusted) = &self.trusted else {
            return enroll::open_answer(&self.device, bytes, &self.public, None).map(|a| (a, None));
        };
        let answer = enroll::open_answer_signed_by(&self.device, bytes, &self.public, trusted)?;
        if answer.coordinator == *trusted {
            Ok((answer, None))
        } else {
            Ok((answer, Some(trusted.clone())))
        }
    }

    /// The fleet claim key that co-signs the requests from now on.
    pub fn set_claim(&mut self, claim: Option<SigningKey>) {
        self.claim = claim;
    }

    /// The current session; `None` while not enrolled.
    pub fn session(&self) -> Option<Arc<Session>> {
        self.session.clone()
    }

    /// The answer held (the newest trusted one), if any.
    pub fn held(&self) -> Option<&EnrollAnswer> {
        self.held.as_ref().map(|(a, _)| a)
    }

    /// This device's public identity.
    pub fn public(&self) -> &PublicIdentity {
        &self.public
    }

    /// Whether anything tells the device which coordinator to trust (a pin or an accepted
    /// answer).
    pub fn trusts_a_coordinator(&self) -> bool {
        self.trusted.is_some()
    }

    /// While not enrolled: the sealed request to publish on `topics::enroll(device)` (issued at
    /// `now_ms`, wall clock) and how long to wait before the next one; `None` once enrolled.
    pub fn request(&mut self, now_ms: u64) -> Option<(Vec<u8>, Duration)> {
        if self.session.is_some() {
            return None;
        }
        let req = EnrollRequest {
            v: VERSION,
            device: self.device.clone(),
            identity: self.public.clone(),
            hardware: self.hardware.clone(),
            claim_key: self
                .claim
                .as_ref()
                .map(|k| public_key_hex(&k.verifying_key())),
            issued_ms: now_ms,
        };
        let bytes = enroll::seal_request(&req, &self.identity, self.claim.as_ref());
        Some((bytes, self.next_delay()))
    }

    /// Equal jitter: uniform in [d/2, d] where d = retry_ms x 2^attempt, capped at 5 minutes, so
    /// a fleet that booted together does not ask in lockstep.
    fn next_delay(&mut self) -> Duration {
        let d = self
            .retry_ms
            .saturating_mul(1u64 << self.attempt.min(20))
            .min(MAX_RETRY_MS);
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(self.rng.gen_range(d / 2..=d))
    }

    /// An answer from `edge/v1/{device}/enroll/answer` (signed bytes as received).
    pub fn on_answer(&mut self, bytes: &[u8]) -> Verdict {
        if let Some((held, held_bytes)) = &self.held
            && held_bytes.as_slice() == bytes
        {
            // The retained copy again; after a rotation it is signed by a key no longer trusted.
            return Verdict::Stale {
                issued_ms: held.issued_ms,
                held_ms: held.issued_ms,
                same: true,
            };
        }
        let (answer, rotated_from) = match self.verify(bytes) {
            Ok(a) => a,
            Err(EnrollError::WrongKey { answer, .. }) => {
                return Verdict::OtherKey { key: answer };
            }
            Err(e) => return Verdict::Invalid(e.to_string()),
        };
        if let Some((held, held_bytes)) = &self.held
            && answer.issued_ms <= held.issued_ms
        {
            return Verdict::Stale {
                issued_ms: answer.issued_ms,
                held_ms: held.issued_ms,
                same: held_bytes.as_slice() == bytes,
            };
        }
        let first_use = self.trusted.is_none();
        if answer.decision != Decision::Accepted {
            if first_use {
                // Could be anyone's: say so, but hold nothing and change nothing.
                return Verdict::NotAccepted {
                    decision: answer.decision,
                    reason: answer.reason,
                    was_accepted: false,
                    trusted: false,
                };
            }
            let was_accepted = self.session.take().is_some();
            let (decision, reason) = (answer.decision, answer.reason.clone());
            self.hold(answer, bytes);
            return Verdict::NotAccepted {
                decision,
                reason,
                was_accepted,
                trusted: true,
            };
        }
        let session = match self.session_for(&answer) {
            Ok(s) => s,
            Err(e) => return Verdict::Invalid(format!("coordinator identity in the answer: {e}")),
        };
        let renewed = self.session.replace(Arc::new(session)).is_some();
        self.attempt = 0;
        self.trusted = Some(answer.coordinator.clone());
        if let Some(previous) = rotated_from {
            let r = Rotation {
                previous,
                answer: bytes.to_vec(),
            };
            let verdict = Verdict::Rotated {
                groups: answer.groups.clone(),
                from: r.previous.key_id(),
                to: answer.coordinator.key_id(),
                stale_pin: self.stale_pin().map(|(pin, _)| pin),
            };
            self.rotation = Some(r.clone());
            self.persist_rotation = Some(r);
            self.hold(answer, bytes);
            return verdict;
        }
        let verdict = Verdict::Accepted {
            groups: answer.groups.clone(),
            coordinator: answer.coordinator.key_id(),
            first_use,
            renewed,
        };
        self.hold(answer, bytes);
        verdict
    }

    fn hold(&mut self, answer: EnrollAnswer, bytes: &[u8]) {
        self.held = Some((answer, bytes.to_vec()));
        self.persist = Some(bytes.to_vec());
    }

    fn session_for(&self, answer: &EnrollAnswer) -> Result<Session, AuthError> {
        Session::new(
            &self.identity,
            &self.device,
            answer.coordinator.clone(),
            answer.groups.clone(),
            self.epoch,
            self.counter.clone(),
        )
    }

    /// The signed answer to write to `enrollment.bin`, once per change of the held answer.
    pub fn take_persist(&mut self) -> Option<Vec<u8>> {
        self.persist.take()
    }

    /// A rotation to write, once; before [`Machine::take_persist`]'s answer, so a crash in
    /// between still trusts the new key.
    pub fn take_persist_rotation(&mut self) -> Option<Rotation> {
        self.persist_rotation.take()
    }
}

/// Why a persisted answer cannot be used at start.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the persisted answer does not verify: {0}")]
    Answer(#[from] enroll::EnrollError),
    #[error("coordinator identity in the persisted answer: {0}")]
    Session(#[from] AuthError),
    #[error(
        "the rotation file's answer is not a rotation (it does not accept this device under another key)"
    )]
    NotARotation,
}

#[cfg(test)]
mod tests {
    use protocol::v1::auth::{STATUS_COUNTER, Stamp};
    use protocol::v1::enroll::seal_answer;
    use protocol::v1::topics;

    use super::*;

    const DEVICE: &str = "pi-1";

    struct Fleet {
        device: Identity,
        coord: Identity,
        claim: SigningKey,
    }

    fn fleet() -> Fleet {
        Fleet {
            device: Identity::generate(),
            coord: Identity::generate(),
            claim: SigningKey::from_bytes(&[5; 32]),
        }
    }

    fn machine(f: &Fleet, pin: Option<PublicIdentity>) -> Machine {
        Machine::with_rng(
            Params {
                device: DEVICE.into(),
                identity: f.device.clone(),
                claim: Some(f.claim.clone()),
                hardware: Hardware {
                    arch: "aarch64".into(),
                    os: "linux".into(),
                    board: "Raspberry Pi 4 Model B".into(),
                    accelerators: vec![],
                    agent_version: "0.1.0".into(),
                },
                pin,
                retry_ms: 1_000,
                epoch: 7,
            },
            StdRng::seed_from_u64(1),
        )
    }

    fn answer(f: &Fleet, decision: Decision, issued_ms: u64) -> EnrollAnswer {
        EnrollAnswer {
            v: VERSION,
            device: DEVICE.into(),
            device_key: f.device.public().sign,
            decision,
            reason: if decision == Decision::Accepted {
                String::new()
            } else {
                format!("operator said {}", decision.as_str())
            },
            groups: vec!["lab".into()],
            coordinator: f.coord.public(),
            issued_ms,
        }
    }

    fn signed(f: &Fleet, decision: Decision, issued_ms: u64) -> Vec<u8> {
        seal_answer(&answer(f, decision, issued_ms), &f.coord)
    }

    /// What the coordinator would read: the payload and stamp of a device -> coordinator MAC.
    fn open_up(f: &Fleet, topic: &str, sealed: &[u8]) -> (Vec<u8>, Stamp) {
        let (dp, cp) = (f.device.public(), f.coord.public());
        let keys = f
            .coord
            .session_keys(&dp, DEVICE, &dp, &cp)
            .expect("coordinator side");
        let (payload, stamp) = keys.up.open(topic, sealed).expect("verifies");
        (payload.to_vec(), stamp)
    }

    #[test]
    fn unenrolled_requests_are_signed_by_the_device_and_the_claim() {
        let f = fleet();
        let mut m = machine(&f, None);
        let (bytes, _) = m.request(1_234).expect("not enrolled: a request");
        let got = enroll::open_request(DEVICE, &bytes, &[f.claim.verifying_key()]).expect("valid");
        assert_eq!(got.claim, Some(f.claim.verifying_key()));
        assert_eq!(got.request.identity, f.device.public());
        assert_eq!(got.request.issued_ms, 1_234);
        assert_eq!(got.request.hardware.board, "Raspberry Pi 4 Model B");
        assert!(m.session().is_none());
    }

    #[test]
    fn retries_back_off_with_jitter_up_to_five_minutes() {
        let f = fleet();
        let mut m = machine(&f, None);
        let mut d = 1_000u64;
        for _ in 0..12 {
            let (_, delay) = m.request(0).expect("request");
            let ms = delay.as_millis() as u64;
            assert!((d / 2..=d).contains(&ms), "{ms} outside [{}, {d}]", d / 2);
            d = (d * 2).min(MAX_RETRY_MS);
        }
        for _ in 0..30 {
            let (_, delay) = m.request(0).expect("request");
            assert!(delay <= Duration::from_millis(MAX_RETRY_MS));
        }
    }

    #[test]
    fn an_accepted_answer_makes_a_session_the_coordinator_shares() {
        let f = fleet();
        let mut m = machine(&f, None);
        m.request(0).expect("request");
        let bytes = signed(&f, Decision::Accepted, 10);
        match m.on_answer(&bytes) {
            Verdict::Accepted {
                groups,
                first_use,
                renewed,
                ..
            } => {
                assert_eq!(groups, ["lab"]);
                assert!(first_use, "nothing was pinned");
                assert!(!renewed);
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(m.take_persist(), Some(bytes.clone()));
        assert_eq!(m.take_persist(), None, "once per change");
        assert!(m.request(0).is_none(), "enrolled devices stop asking");
        let s = m.session().expect("session");
        assert_eq!(s.groups(), ["lab"]);
        assert_eq!(s.coordinator(), &f.coord.public());

        let topic = topics::telemetry(DEVICE);
        let (payload, stamp) = open_up(&f, &topic, &s.seal(&topic, b"{}"));
        assert_eq!(payload, b"{}");
        assert_eq!(
            stamp,
            Stamp {
                epoch: 7,
                counter: 1
            }
        );
        let status = topics::status(DEVICE);
        let (_, stamp) = open_up(&f, &status, &s.seal_status(&status, b"{}"));
        assert_eq!(stamp.counter, STATUS_COUNTER);

        // The same retained answer again (a reconnect): nothing changes.
        assert!(matches!(
            m.on_answer(&bytes),
            Verdict::Stale { same: true, .. }
        ));
        // New groups in a newer answer: a new session, and the numbering goes on.
        let mut regrouped = answer(&f, Decision::Accepted, 11);
        regrouped.groups = vec!["lab".into(), "field".into()];
        assert!(matches!(
            m.on_answer(&seal_answer(&regrouped, &f.coord)),
            Verdict::Accepted { renewed: true, .. }
        ));
        let s2 = m.session().expect("session");
        assert_eq!(s2.groups(), ["lab", "field"]);
        assert!(s2.same_keys(&s));
        let (_, stamp) = open_up(&f, &topic, &s2.seal(&topic, b"{}"));
        assert_eq!(
            stamp.counter, 2,
            "the counter is per process, not per session"
        );
    }

    #[test]
    fn an_answer_about_another_key_is_ignored() {
        let f = fleet();
        let mut m = machine(&f, Some(f.coord.public()));
        let mut theirs = answer(&f, Decision::Rejected, 10);
        theirs.device_key = Identity::generate().public().sign;
        assert!(matches!(
            m.on_answer(&seal_answer(&theirs, &f.coord)),
            Verdict::OtherKey { .. }
        ));
        assert!(m.held().is_none());
        assert!(m.take_persist().is_none());
        assert!(m.request(0).is_some(), "still asking");
    }

    #[test]
    fn an_older_answer_is_ignored() {
        let f = fleet();
        let mut m = machine(&f, None);
        assert!(matches!(
            m.on_answer(&signed(&f, Decision::Accepted, 10)),
            Verdict::Accepted { .. }
        ));
        m.take_persist();
        assert!(matches!(
            m.on_answer(&signed(&f, Decision::Revoked, 9)),
            Verdict::Stale {
                issued_ms: 9,
                held_ms: 10,
                same: false
            }
        ));
        assert!(
            m.session().is_some(),
            "an old revocation replayed changes nothing"
        );
        assert!(m.take_persist().is_none());
    }

    #[test]
    fn a_revocation_ends_the_session_and_the_requests_resume() {
        let f = fleet();
        let mut m = machine(&f, None);
        m.on_answer(&signed(&f, Decision::Accepted, 10));
        let revoked = signed(&f, Decision::Revoked, 20);
        match m.on_answer(&revoked) {
            Verdict::NotAccepted {
                decision,
                reason,
                was_accepted,
                trusted,
            } => {
                assert_eq!(decision, Decision::Revoked);
                assert!(reason.contains("revoked"));
                assert!(was_accepted && trusted);
            }
            v => panic!("{v:?}"),
        }
        assert!(m.session().is_none());
        assert_eq!(m.take_persist(), Some(revoked));
        assert!(m.request(0).is_some());
    }

    #[test]
    fn trust_on_first_use_only_for_an_acceptance_and_a_pin_holds() {
        let f = fleet();
        let forger = Identity::generate();
        let mut m = machine(&f, None);
        // Before anything is trusted, a refusal (anyone's) is reported but not held.
        let mut forged = answer(&f, Decision::Rejected, u64::MAX);
        forged.coordinator = forger.public();
        let forged = seal_answer(&forged, &forger);
        assert!(matches!(
            m.on_answer(&forged),
            Verdict::NotAccepted { trusted: false, .. }
        ));
        assert!(m.held().is_none() && m.take_persist().is_none());
        // The real acceptance still counts, and from then on only its key does.
        assert!(matches!(
            m.on_answer(&signed(&f, Decision::Accepted, 10)),
            Verdict::Accepted {
                first_use: true,
                ..
            }
        ));
        let mut takeover = answer(&f, Decision::Accepted, 20);
        takeover.coordinator = forger.public();
        assert!(matches!(
            m.on_answer(&seal_answer(&takeover, &forger)),
            Verdict::Invalid(_)
        ));
        assert_eq!(m.session().expect("kept").coordinator(), &f.coord.public());

        // Pinned: another coordinator's acceptance is refused from the start.
        let mut pinned = machine(&f, Some(f.coord.public()));
        assert!(matches!(
            pinned.on_answer(&seal_answer(&takeover, &forger)),
            Verdict::Invalid(_)
        ));
        assert!(matches!(
            pinned.on_answer(&signed(&f, Decision::Accepted, 10)),
            Verdict::Accepted {
                first_use: false,
                ..
            }
        ));
    }

    #[test]
    fn a_persisted_answer_is_reloaded_and_a_tampered_one_refused() {
        let f = fleet();
        let bytes = signed(&f, Decision::Accepted, 10);
        let mut m = machine(&f, None);
        assert!(matches!(m.restore(&bytes), Ok(Decision::Accepted)));
        assert_eq!(m.session().expect("enrolled at once").groups(), ["lab"]);
        assert!(m.request(0).is_none());
        assert!(matches!(
            m.on_answer(&bytes),
            Verdict::Stale { same: true, .. }
        ));

        let mut tampered = bytes.clone();
        let at = tampered.iter().position(|&b| b == b'l').expect("a letter");
        tampered[at] = b'L';
        let mut m = machine(&f, None);
        assert!(m.restore(&tampered).is_err());
        assert!(m.session().is_none() && m.held().is_none());
        assert!(m.request(0).is_some());

        // Pinned to another coordinator since: refused too.
        let mut m = machine(&f, Some(Identity::generate().public()));
        assert!(m.restore(&bytes).is_err());
        assert!(m.session().is_none());
    }

    /// `answer(f, ..)` naming `to`, signed by `by`.
    fn rotation(f: &Fleet, to: &Identity, by: &Identity, issued_ms: u64) -> Vec<u8> {
        let mut a = answer(f, Decision::Accepted, issued_ms);
        a.coordinator = to.public();
        seal_answer(&a, by)
    }

    #[test]
    fn a_rotation_signed_by_the_trusted_key_re_pins_and_derives_new_keys() {
        let f = fleet();
        let new = Identity::generate();
        let mut m = machine(&f, Some(f.coord.public()));
        m.on_answer(&signed(&f, Decision::Accepted, 10));
        m.take_persist();
        let before = m.session().expect("enrolled");
        let announced = rotation(&f, &new, &f.coord, 20);
        match m.on_answer(&announced) {
            Verdict::Rotated {
                groups,
                from,
                to,
                stale_pin,
            } => {
                assert_eq!(groups, ["lab"]);
                assert_eq!(from, f.coord.public().key_id());
                assert_eq!(to, new.public().key_id());
                assert_eq!(stale_pin, Some(f.coord.public().key_id()), "the config pin");
            }
            v => panic!("{v:?}"),
        }
        let r = m.take_persist_rotation().expect("a rotation to persist");
        assert_eq!(
            (r.previous.clone(), r.answer.clone()),
            (f.coord.public(), announced.clone())
        );
        assert_eq!(m.take_persist(), Some(announced.clone()));
        let s = m.session().expect("still enrolled");
        assert!(!s.same_keys(&before));
        assert_eq!(s.coordinator(), &new.public());
        // The coordinator opens what the device seals under the new keys, not the old ones.
        let topic = topics::telemetry(DEVICE);
        let sealed = s.seal(&topic, b"{}");
        let dp = f.device.public();
        let keys = new
            .session_keys(&dp, DEVICE, &dp, &new.public())
            .expect("new keys");
        assert!(keys.up.open(&topic, &sealed).is_ok());
        let old_keys = f
            .coord
            .session_keys(&dp, DEVICE, &dp, &f.coord.public())
            .expect("old keys");
        assert!(old_keys.up.open(&topic, &sealed).is_err());
        // Signatures: the new key's count, the old key's no more.
        let advert = topics::offload_capacity("r1");
        assert!(s.open_signed(&advert, &new.seal(&advert, b"{}", 1)).is_ok());
        assert!(
            s.open_signed(&advert, &f.coord.seal(&advert, b"{}", 1))
                .is_err()
        );
        // The retained announcement redelivered: already held, not an error.
        assert!(matches!(
            m.on_answer(&announced),
            Verdict::Stale { same: true, .. }
        ));
        // A newer answer by the old key is refused, even one naming the new key.
        assert!(matches!(
            m.on_answer(&signed(&f, Decision::Revoked, 30)),
            Verdict::Invalid(_)
        ));
        assert!(matches!(
            m.on_answer(&rotation(&f, &new, &f.coord, 31)),
            Verdict::Invalid(_)
        ));
        assert!(m.session().is_some());
        // The new key's own answers count.
        let mut regroup = answer(&f, Decision::Accepted, 40);
        regroup.coordinator = new.public();
        regroup.groups = vec!["field".into()];
        assert!(matches!(
            m.on_answer(&seal_answer(&regroup, &new)),
            Verdict::Accepted { renewed: true, .. }
        ));
    }

    #[test]
    fn a_forged_rotation_is_refused() {
        let f = fleet();
        let forger = Identity::generate();
        for pin in [None, Some(f.coord.public())] {
            let mut m = machine(&f, pin);
            m.on_answer(&signed(&f, Decision::Accepted, 10));
            m.take_persist();
            // Names the forger's key, signed by it (or by a third key): not by the trusted one.
            for by in [&forger, &Identity::generate()] {
                assert!(matches!(
                    m.on_answer(&rotation(&f, &forger, by, 20)),
                    Verdict::Invalid(_)
                ));
            }
            assert!(m.take_persist_rotation().is_none() && m.take_persist().is_none());
            assert_eq!(m.session().expect("kept").coordinator(), &f.coord.public());
        }
        // A tampered rotation file is not trusted at the next start.
        let mut m = machine(&f, Some(f.coord.public()));
        let forged = Rotation {
            previous: forger.public(),
            answer: rotation(&f, &forger, &f.coord, 20),
        };
        assert!(m.restore_rotation(forged).is_err());
        assert!(m.stale_pin().is_none());
    }

    #[test]
    fn a_restart_after_a_rotation_trusts_the_new_key_only() {
        let f = fleet();
        let new = Identity::generate();
        let first = signed(&f, Decision::Accepted, 10);
        let announced = rotation(&f, &new, &f.coord, 20);
        let mut m = machine(&f, Some(f.coord.public()));
        m.on_answer(&first);
        m.on_answer(&announced);
        let r = m.take_persist_rotation().expect("rotation");

        // The files as written (rotation, then the answer), and as a crash between the two
        // leaves them (the answer before the rotation): both start under the new key.
        for answer_file in [announced.clone(), first.clone()] {
            let mut m = machine(&f, Some(f.coord.public()));
            assert_eq!(
                m.restore_rotation(r.clone()).expect("rotation restores"),
                new.public().key_id()
            );
            assert_eq!(
                m.stale_pin(),
                Some((f.coord.public().key_id(), new.public().key_id()))
            );
            assert_eq!(
                m.restore(&answer_file).expect("answer restores"),
                Decision::Accepted
            );
            let s = m.session().expect("enrolled at once");
            assert_eq!(s.coordinator(), &new.public());
            let advert = topics::offload_capacity("r1");
            assert!(
                s.open_signed(&advert, &f.coord.seal(&advert, b"{}", 1))
                    .is_err()
            );
            assert!(matches!(
                m.on_answer(&signed(&f, Decision::Revoked, 30)),
                Verdict::Invalid(_)
            ));
            assert!(m.session().is_some(), "the old key cannot revoke it");
        }
        // No rotation file (its write failed), the pin still the old key: the persisted
        // rotation answer is taken as the rotation again, and to be written.
        let mut m = machine(&f, Some(f.coord.public()));
        assert_eq!(
            m.restore(&announced).expect("announced answer restores"),
            Decision::Accepted
        );
        assert_eq!(m.session().expect("enrolled").coordinator(), &new.public());
        assert!(m.take_persist_rotation().is_some());
    }
}
