//! Enrollment: how a device that made its own key becomes a member of the fleet.
//!
//! ```text
//! device                                   coordinator
//!   EnrollRequest (JSON)  --{d}/enroll-->    verify: device key signature (proof of possession),
//!   | sig by device key                       claim key signature if any, policy
//!   [| sig by claim key]                       (`claim` | `manual` | `allowlist`)
//!                        <--{d}/enroll/answer-- EnrollAnswer (JSON, retained), signed by the
//!                                               coordinator's online key
//! ```
//! The request carries two [`auth`](super::auth) signature trailers: the inner one by the device
//! key the request names (so nobody can enroll a key they do not hold), the outer one by a fleet
//! claim key (so a board flashed with the fleet's image enrolls itself). Both cover the topic,
//! so a request cannot be moved to another device id. The answer binds the device id to that
//! key, assigns the groups (devices no longer declare their own) and names the coordinator key
//! the device pins.

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::auth::{self, AuthError, Identity, PublicIdentity};
use super::{MAX_PAYLOAD_BYTES, VERSION, topics, validate_device_id};

/// Errors from building or checking enrollment messages.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("enrollment message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("enrollment message is not valid json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("enrollment for device {inner:?} published on the topic of {topic:?}")]
    DeviceMismatch { inner: String, topic: String },
    #[error("invalid device id: {0}")]
    DeviceId(#[from] super::Error),
    #[error("device key signature: {0}")]
    DeviceSignature(AuthError),
    #[error("claim key signature: {0}")]
    ClaimSignature(AuthError),
    #[error("the request names claim key {named} but is signed by {signed}")]
    ClaimMismatch { named: String, signed: String },
    #[error("coordinator signature: {0}")]
    CoordinatorSignature(AuthError),
    #[error("the answer is for key {answer} but this device's key is {ours}")]
    WrongKey { answer: String, ours: String },
}

/// What a device says about itself when it asks to join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub v: u8,
    pub device: String,
    /// The device's public keys; the private halves never leave it.
    pub identity: PublicIdentity,
    pub hardware: Hardware,
    /// The fleet claim key (ed25519 public, hex) whose signature is the outer trailer; absent
    /// when the device has no claim (manual or allowlist enrollment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_key: Option<String>,
    /// Device's wall clock when it built the request, ms since the Unix epoch.
    pub issued_ms: u64,
}

/// Hardware facts for the operator deciding on a pending device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    pub arch: String,
    pub os: String,
    /// Board model (device tree model, or DMI product name), empty if unknown.
    #[serde(default)]
    pub board: String,
    /// Inference accelerators the agent found (execution providers such as `cuda`).
    #[serde(default)]
    pub accelerators: Vec<String>,
    pub agent_version: String,
}

/// A request whose signatures checked out.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedRequest {
    pub request: EnrollRequest,
    /// The claim key that signed it, if one did.
    pub claim: Option<VerifyingKey>,
}

/// The coordinator's decision about a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Enrolled: the device may send, and trusts the coordinator key named.
    Accepted,
    /// Waiting for an operator (`edge-coordinator devices approve ID`).
    Pending,
    /// Refused (policy, an id enrolled under another key, an operator's `reject`).
    Rejected,
    /// Was enrolled; an operator revoked it. The device stops sending.
    Revoked,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Accepted => "accepted",
            Decision::Pending => "pending",
            Decision::Rejected => "rejected",
            Decision::Revoked => "revoked",
        }
    }
}

/// Body of `edge/v1/{device}/enroll/answer` (retained), signed by the coordinator's online key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollAnswer {
    pub v: u8,
    pub device: String,
    /// The device signing key (hex) this answer is about: a device whose key differs ignores it.
    pub device_key: String,
    pub decision: Decision,
    /// Why, for anything but `accepted` (and for an operator reading the device's log).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Deployment groups the coordinator put the device in.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The coordinator's public keys, which the device pins.
    pub coordinator: PublicIdentity,
    /// Coordinator clock, ms since the Unix epoch; also the trailer's counter, so a device can
    /// refuse an older answer replayed after a newer one.
    pub issued_ms: u64,
}

/// Signs `request` with the device identity and, if given, the claim key; the bytes to publish
/// on `topics::enroll(device)`.
pub fn seal_request(
    request: &EnrollRequest,
    device: &Identity,
    claim: Option<&SigningKey>,
) -> Vec<u8> {
    let topic = topics::enroll(&request.device);
    // Serializing our own plain structs cannot fail.
    let json = serde_json::to_vec(request).unwrap_or_default();
    let inner = device.seal(&topic, &json, request.issued_ms);
    match claim {
        Some(key) => auth::seal_with(key, &topic, &inner, request.issued_ms),
        None => inner,
    }
}

/// Checks a request received on `topic_device`'s enroll topic: size, the claim signature (if the
/// outer trailer is by one of `claim_keys`), the device key's signature, version and ids. Which
/// claims and devices are welcome is the coordinator's policy, not this function's.
pub fn open_request(
    topic_device: &str,
    bytes: &[u8],
    claim_keys: &[VerifyingKey],
) -> Result<VerifiedRequest, EnrollError> {
    if bytes.len() > MAX_PAYLOAD_BYTES + auth::MAX_TRAILER_LEN {
        return Err(EnrollError::TooLarge {
            size: bytes.len(),
            limit: MAX_PAYLOAD_BYTES,
        });
    }
    let topic = topics::enroll(topic_device);
    // One trailer (device) or two (device, then claim): the JSON ends where one of them starts.
    let json_at = |trailers: usize| {
        bytes
            .len()
            .checked_sub(trailers * auth::SIG_TRAILER_LEN)
            .and_then(|end| serde_json::from_slice::<EnrollRequest>(&bytes[..end]).ok())
    };
    let (request, inner, claim) = if let Some(request) = json_at(1) {
        (request, bytes, None)
    } else if let Some(request) = json_at(2) {
        let inner = &bytes[..bytes.len() - auth::SIG_TRAILER_LEN];
        // A claim by a key this coordinator does not know is no claim (the policy decides);
        // a known key with a bad signature is a forgery.
        let mut claim = None;
        for k in claim_keys {
            match auth::verify_signed(&topic, bytes, std::slice::from_ref(k)) {
                Ok(_) => {
                    claim = Some(*k);
                    break;
                }
                Err(AuthError::UnknownKey { .. }) => {}
                Err(e) => return Err(EnrollError::ClaimSignature(e)),
            }
        }
        (request, inner, claim)
    } else {
        // Neither parses: report why the plain form does not.
        let end = bytes.len().saturating_sub(auth::SIG_TRAILER_LEN);
        serde_json::from_slice::<EnrollRequest>(&bytes[..end])?;
        return Err(EnrollError::DeviceSignature(AuthError::NoTrailer));
    };
    if request.v != VERSION {
        return Err(EnrollError::Version(request.v));
    }
    validate_device_id(&request.device)?;
    if request.device != topic_device {
        return Err(EnrollError::DeviceMismatch {
            inner: request.device,
            topic: topic_device.to_owned(),
        });
    }
    let device_key = request
        .identity
        .verifying_key()
        .map_err(EnrollError::DeviceSignature)?;
    request
        .identity
        .validate()
        .map_err(EnrollError::DeviceSignature)?;
    auth::verify_signed(&topic, inner, &[device_key]).map_err(EnrollError::DeviceSignature)?;
    if let (Some(named), Some(signed)) = (&request.claim_key, &claim) {
        let signed = super::deploy::public_key_hex(signed);
        if *named != signed {
            return Err(EnrollError::ClaimMismatch {
                named: named.clone(),
                signed,
            });
        }
    }
    Ok(VerifiedRequest { request, claim })
}

/// Signs an answer with the coordinator's identity; the bytes to publish (retained) on
/// `topics::enroll_answer(device)`.
pub fn seal_answer(answer: &EnrollAnswer, coordinator: &Identity) -> Vec<u8> {
    let json = serde_json::to_vec(answer).unwrap_or_default();
    coordinator.seal(
        &topics::enroll_answer(&answer.device),
        &json,
        answer.issued_ms,
    )
}

/// Checks an answer received on our enroll/answer topic: signed by `pinned` (the coordinator
/// key from config) or, when nothing is pinned yet, by the key the answer itself names (trust
/// on first use, which the agent logs); and about our own key.
pub fn open_answer(
    device: &str,
    bytes: &[u8],
    our_key: &PublicIdentity,
    pinned: Option<&PublicIdentity>,
) -> Result<EnrollAnswer, EnrollError> {
    let answer = match pinned {
        Some(p) => open_answer_signed_by(device, bytes, our_key, p)?,
        None => {
            let named = peek_answer(bytes)?.coordinator;
            open_answer_signed_by(device, bytes, our_key, &named)?
        }
    };
    if let Some(p) = pinned
        && answer.coordinator != *p
    {
        return Err(EnrollError::CoordinatorSignature(AuthError::UnknownKey {
            key_id: answer.coordinator.key_id(),
        }));
    }
    Ok(answer)
}

/// Checks an answer signed by `signer` (size, signature, version, device id, our key) without
/// asking which coordinator key it names: when that is another key than `signer`, the answer is
/// a key rotation, announced with the key the device already trusts, and what to do about it is
/// the device's decision ([`open_answer`] refuses it).
pub fn open_answer_signed_by(
    device: &str,
    bytes: &[u8],
    our_key: &PublicIdentity,
    signer: &PublicIdentity,
) -> Result<EnrollAnswer, EnrollError> {
    let answer = peek_answer(bytes)?;
    signer
        .open(&topics::enroll_answer(device), bytes)
        .map_err(EnrollError::CoordinatorSignature)?;
    if answer.v != VERSION {
        return Err(EnrollError::Version(answer.v));
    }
    if answer.device != device {
        return Err(EnrollError::DeviceMismatch {
            inner: answer.device,
            topic: device.to_owned(),
        });
    }
    if answer.device_key != our_key.sign {
        return Err(EnrollError::WrongKey {
            answer: answer.device_key,
            ours: our_key.sign.clone(),
        });
    }
    Ok(answer)
}

/// The answer's JSON, before any signature is checked (size and decoding only).
fn peek_answer(bytes: &[u8]) -> Result<EnrollAnswer, EnrollError> {
    if bytes.len() > MAX_PAYLOAD_BYTES + auth::MAX_TRAILER_LEN {
        return Err(EnrollError::TooLarge {
            size: bytes.len(),
            limit: MAX_PAYLOAD_BYTES,
        });
    }
    let json_end = bytes
        .len()
        .checked_sub(auth::SIG_TRAILER_LEN)
        .ok_or(EnrollError::CoordinatorSignature(AuthError::NoTrailer))?;
    Ok(serde_json::from_slice(&bytes[..json_end])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(device: &Identity, claim: Option<&SigningKey>) -> EnrollRequest {
        EnrollRequest {
            v: VERSION,
            device: "pi-1".into(),
            identity: device.public(),
            hardware: Hardware {
                arch: "aarch64".into(),
                os: "linux".into(),
                board: "Raspberry Pi 4 Model B".into(),
                accelerators: vec![],
                agent_version: "0.1.0".into(),
            },
            claim_key: claim.map(|k| super::super::deploy::public_key_hex(&k.verifying_key())),
            issued_ms: 1_000,
        }
    }

    #[test]
    fn claimed_requests_verify_and_name_their_claim() {
        let device = Identity::generate();
        let claim = SigningKey::from_bytes(&[9; 32]);
        let req = request(&device, Some(&claim));
        let bytes = seal_request(&req, &device, Some(&claim));
        let ok = open_request("pi-1", &bytes, &[claim.verifying_key()]).expect("verifies");
        assert_eq!(ok.request, req);
        assert_eq!(ok.claim, Some(claim.verifying_key()));
        // Without the claim key known, the request is still the device's, just unclaimed.
        let unclaimed = open_request("pi-1", &bytes, &[]).expect("device-signed");
        assert_eq!(unclaimed.claim, None);
        // Moved to another device's topic: refused.
        assert!(open_request("pi-2", &bytes, &[claim.verifying_key()]).is_err());
    }

    #[test]
    fn a_request_for_a_key_the_sender_lacks_is_refused() {
        let device = Identity::generate();
        let thief = Identity::generate();
        // Names the victim's key but is signed by the thief's.
        let req = request(&device, None);
        let bytes = seal_request(&req, &thief, None);
        assert!(matches!(
            open_request("pi-1", &bytes, &[]),
            Err(EnrollError::DeviceSignature(_))
        ));
        let mut tampered = seal_request(&req, &device, None);
        tampered[5] ^= 1;
        assert!(open_request("pi-1", &tampered, &[]).is_err());
    }

    #[test]
    fn answers_bind_device_key_and_coordinator() {
        let device = Identity::generate();
        let coord = Identity::generate();
        let answer = EnrollAnswer {
            v: VERSION,
            device: "pi-1".into(),
            device_key: device.public().sign,
            decision: Decision::Accepted,
            reason: String::new(),
            groups: vec!["lab".into()],
            coordinator: coord.public(),
            issued_ms: 5,
        };
        let bytes = seal_answer(&answer, &coord);
        let got = open_answer("pi-1", &bytes, &device.public(), Some(&coord.public())).expect("ok");
        assert_eq!(got, answer);
        assert_eq!(
            open_answer("pi-1", &bytes, &device.public(), None).expect("tofu"),
            answer
        );
        // Pinned to another coordinator: a forged answer is refused.
        let forger = Identity::generate();
        let forged = seal_answer(
            &EnrollAnswer {
                coordinator: forger.public(),
                ..answer.clone()
            },
            &forger,
        );
        assert!(open_answer("pi-1", &forged, &device.public(), Some(&coord.public())).is_err());
        // Someone else's answer is not ours.
        let other = Identity::generate();
        assert!(matches!(
            open_answer("pi-1", &bytes, &other.public(), Some(&coord.public())),
            Err(EnrollError::WrongKey { .. })
        ));
    }

    #[test]
    fn a_rotation_is_signed_by_the_old_key_and_names_the_new_one() {
        let device = Identity::generate();
        let (old, new) = (Identity::generate(), Identity::generate());
        let rotation = EnrollAnswer {
            v: VERSION,
            device: "pi-1".into(),
            device_key: device.public().sign,
            decision: Decision::Accepted,
            reason: String::new(),
            groups: vec![],
            coordinator: new.public(),
            issued_ms: 9,
        };
        let bytes = seal_answer(&rotation, &old);
        // Pinned to the old key: not an ordinary answer...
        assert!(open_answer("pi-1", &bytes, &device.public(), Some(&old.public())).is_err());
        // ...but verified with it, for the device to decide on.
        let got = open_answer_signed_by("pi-1", &bytes, &device.public(), &old.public())
            .expect("signed by the old key");
        assert_eq!(got.coordinator, new.public());
        // Nobody else's signature makes it one.
        let forged = seal_answer(&rotation, &new);
        assert!(open_answer_signed_by("pi-1", &forged, &device.public(), &old.public()).is_err());
    }
}
