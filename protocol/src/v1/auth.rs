//! Message authentication: the keys each party holds, the trailer that proves who sent a
//! message, and the replay window that refuses one sent before.
//!
//! The trust model (README "Trust model" has the operator's view):
//! - Every device makes its own [`Identity`] at first start (an ed25519 key that signs, an x25519
//!   key that agrees); the private half never leaves the device.
//! - The coordinator has an online [`Identity`] of the same shape. Devices pin its public half
//!   ([`PublicIdentity`]) from config or from their enrollment answer.
//! - Enrollment binds a device id to a device key once ([`super::enroll`]). From then on both
//!   sides derive the same [`SessionKeys`] by x25519 agreement (nothing secret ever crosses the
//!   broker) and authenticate per-device traffic with HMAC-SHA256 (the cheap path: a few hundred
//!   nanoseconds per message where an ed25519 signature costs tens of microseconds, see
//!   `cargo xtask bench auth`).
//! - What many devices read (capacity adverts, enrollment answers) is signed with the
//!   coordinator's ed25519 key instead, since a MAC key is per device.
//! - Deployments stay signed by the offline deploy key ([`super::deploy`]); FL round messages
//!   are signed by the coordinator's key inside their own format ([`super::fl`]).
//!
//! Wire form: the payload (JSON or binary envelope, unchanged) followed by a fixed-size trailer
//! read from the end, so the body keeps its own format and a JSON body is still readable in
//! `mosquitto_sub`:
//! ```text
//! MAC trailer (35 bytes):  epoch u64 | counter u64 | tag[16] | kind 0x01 | "EA"
//! SIG trailer (83 bytes):  key_id[8] | counter u64 | sig[64] | kind 0x02 | "EA"
//! ```
//! Integers are big-endian. Both authenticate the topic too (a message cannot be moved to
//! another device's or another kind's topic), the counter, and for the MAC the epoch:
//! `HMAC(key, "edge/v1 mac" | topic_len u16 | topic | epoch | counter | payload)`, truncated to 16
//! bytes; the signature covers the same with `"edge/v1 sig"` and the key id.
//!
//! Replay: a device numbers its messages per *epoch* (a boot counter it persists and raises at
//! every start), so `(epoch, counter)` never repeats under one key. The coordinator keeps a
//! [`ReplayWindow`] per device: an older epoch, or a counter already seen or below the window, is
//! refused.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Last two bytes of every authenticated payload.
pub const MAGIC: &[u8; 2] = b"EA";
/// Trailer kinds (the byte before [`MAGIC`]).
const KIND_MAC: u8 = 1;
const KIND_SIG: u8 = 2;
/// Size of the MAC trailer: epoch, counter, 16-byte tag, kind, magic.
pub const MAC_TRAILER_LEN: usize = 8 + 8 + TAG_LEN + 1 + 2;
/// Size of the signature trailer: key id, counter, signature, kind, magic.
pub const SIG_TRAILER_LEN: usize = KEY_ID_LEN + 8 + 64 + 1 + 2;
/// The most any trailer adds to a payload (brokers and clients allow for it beyond
/// [`super::MAX_PAYLOAD_BYTES`]).
pub const MAX_TRAILER_LEN: usize = 2 * SIG_TRAILER_LEN;
const TAG_LEN: usize = 16;
const KEY_ID_LEN: usize = 8;
/// Counter of the retained status and the last will: both are sealed when the connection is
/// made and published later (the will maybe much later), so they sit outside the replay window;
/// the status's own `since_ms` orders them.
pub const STATUS_COUNTER: u64 = 0;

/// Why a message did not authenticate. `reason()` is the stable name counters use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no authentication trailer")]
    NoTrailer,
    #[error("authentication trailer of the wrong kind (expected {expected})")]
    WrongKind { expected: &'static str },
    #[error("message authentication code does not match")]
    BadMac,
    #[error("signature by key {key_id} does not verify")]
    BadSignature { key_id: String },
    #[error("signed by key {key_id}, which is not trusted here")]
    UnknownKey { key_id: String },
    #[error("replayed: epoch {epoch} counter {counter} was already seen or is too old")]
    Replay { epoch: u64, counter: u64 },
    #[error("invalid key: {0}")]
    Key(String),
}

impl AuthError {
    /// Short stable name for counters and logs (`bad_mac`, `replay`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::NoTrailer => "no_trailer",
            AuthError::WrongKind { .. } => "wrong_kind",
            AuthError::BadMac => "bad_mac",
            AuthError::BadSignature { .. } => "bad_signature",
            AuthError::UnknownKey { .. } => "unknown_key",
            AuthError::Replay { .. } => "replay",
            AuthError::Key(_) => "bad_key",
        }
    }
}

/// A party's key pair: ed25519 to sign, x25519 to agree on session keys. Stored as 64 bytes
/// (signing seed, then the x25519 secret) by whoever owns it.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    agreement: x25519_dalek::StaticSecret,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("Identity")
            .field("key_id", &self.public().key_id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A new random identity from the OS's generator.
    pub fn generate() -> Identity {
        let mut rng = rand_core::OsRng;
        Identity {
            signing: SigningKey::generate(&mut rng),
            agreement: x25519_dalek::StaticSecret::random_from_rng(rng),
        }
    }

    /// The 64-byte secret form (signing seed, x25519 secret).
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.signing.to_bytes());
        out[32..].copy_from_slice(self.agreement.as_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Identity, AuthError> {
        let bytes: &[u8; 64] = bytes
            .try_into()
            .map_err(|_| AuthError::Key(format!("expected 64 bytes, got {}", bytes.len())))?;
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&bytes[..32]);
        let mut x = [0u8; 32];
        x.copy_from_slice(&bytes[32..]);
        Ok(Identity {
            signing: SigningKey::from_bytes(&seed),
            agreement: x25519_dalek::StaticSecret::from(x),
        })
    }

    pub fn public(&self) -> PublicIdentity {
        PublicIdentity {
            sign: hex::encode(self.signing.verifying_key().as_bytes()),
            agree: hex::encode(x25519_dalek::PublicKey::from(&self.agreement).as_bytes()),
        }
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// Signs `payload` published on `topic`; returns the payload with its trailer.
    pub fn seal(&self, topic: &str, payload: &[u8], counter: u64) -> Vec<u8> {
        seal_with(&self.signing, topic, payload, counter)
    }

    /// The session keys shared with `peer` about `device`: the same on both sides (the device
    /// uses its identity and the coordinator's public one, the coordinator the reverse).
    pub fn session_keys(
        &self,
        peer: &PublicIdentity,
        device: &str,
        device_public: &PublicIdentity,
        coordinator_public: &PublicIdentity,
    ) -> Result<SessionKeys, AuthError> {
        let peer_agree = x25519_dalek::PublicKey::from(peer.agree_bytes()?);
        let shared = self.agreement.diffie_hellman(&peer_agree);
        if !shared.was_contributory() {
            return Err(AuthError::Key(
                "peer agreement key is a low-order point".into(),
            ));
        }
        let info = format!(
            "edge/v1 session|{device}|{}|{}",
            device_public.sign, coordinator_public.sign
        );
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"edge/v1 session"), shared.as_bytes());
        let mut okm = [0u8; 64];
        hk.expand(info.as_bytes(), &mut okm)
            .map_err(|_| AuthError::Key("hkdf output length".into()))?;
        let mut up = [0u8; 32];
        let mut down = [0u8; 32];
        up.copy_from_slice(&okm[..32]);
        down.copy_from_slice(&okm[32..]);
        Ok(SessionKeys {
            up: MacKey(up),
            down: MacKey(down),
        })
    }
}

/// The public half of an [`Identity`], hex-encoded as it travels in enrollment messages and
/// config files.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicIdentity {
    /// ed25519 verifying key, 64 hex digits.
    pub sign: String,
    /// x25519 public key, 64 hex digits.
    pub agree: String,
}

impl PublicIdentity {
    pub fn verifying_key(&self) -> Result<VerifyingKey, AuthError> {
        let bytes = decode32(&self.sign, "signing")?;
        VerifyingKey::from_bytes(&bytes).map_err(|e| AuthError::Key(format!("signing key: {e}")))
    }

    fn agree_bytes(&self) -> Result<[u8; 32], AuthError> {
        decode32(&self.agree, "agreement")
    }

    /// Checks both keys parse.
    pub fn validate(&self) -> Result<(), AuthError> {
        self.verifying_key()?;
        self.agree_bytes()?;
        Ok(())
    }

    /// First 16 hex digits of the signing key's sha256, as logs and trailers name keys.
    pub fn key_id(&self) -> String {
        match self.verifying_key() {
            Ok(k) => hex::encode(key_id_bytes(&k)),
            Err(_) => "invalid".into(),
        }
    }

    /// Verifies a signature trailer on `bytes` (published on `topic`) by this key and returns
    /// the payload and the trailer's counter.
    pub fn open<'a>(&self, topic: &str, bytes: &'a [u8]) -> Result<(&'a [u8], u64), AuthError> {
        verify_signed(topic, bytes, std::slice::from_ref(&self.verifying_key()?))
    }
}

fn decode32(s: &str, what: &str) -> Result<[u8; 32], AuthError> {
    let v = hex::decode(s).map_err(|e| AuthError::Key(format!("{what} key is not hex: {e}")))?;
    v.try_into()
        .map_err(|_| AuthError::Key(format!("{what} key must be 32 bytes")))
}

fn key_id_bytes(key: &VerifyingKey) -> [u8; KEY_ID_LEN] {
    use sha2::Digest;
    let d = Sha256::digest(key.as_bytes());
    let mut out = [0u8; KEY_ID_LEN];
    out.copy_from_slice(&d[..KEY_ID_LEN]);
    out
}

/// `payload` with a signature trailer by `key` (an identity's, or a fleet claim key).
pub fn seal_with(key: &SigningKey, topic: &str, payload: &[u8], counter: u64) -> Vec<u8> {
    let kid = key_id_bytes(&key.verifying_key());
    let sig = key.sign(&sig_input(topic, &kid, counter, payload));
    let mut out = Vec::with_capacity(payload.len() + SIG_TRAILER_LEN);
    out.extend_from_slice(payload);
    out.extend_from_slice(&kid);
    out.extend_from_slice(&counter.to_be_bytes());
    out.extend_from_slice(&sig.to_bytes());
    out.push(KIND_SIG);
    out.extend_from_slice(MAGIC);
    out
}

/// Verifies a signature trailer against any of `trusted`; returns the payload and counter.
pub fn verify_signed<'a>(
    topic: &str,
    bytes: &'a [u8],
    trusted: &[VerifyingKey],
) -> Result<(&'a [u8], u64), AuthError> {
    let (payload, trailer) = split(bytes, KIND_SIG, SIG_TRAILER_LEN)?;
    let mut kid = [0u8; KEY_ID_LEN];
    kid.copy_from_slice(&trailer[..KEY_ID_LEN]);
    let counter = u64::from_be_bytes(
        trailer[KEY_ID_LEN..KEY_ID_LEN + 8]
            .try_into()
            .unwrap_or_default(),
    );
    let mut sig = [0u8; 64];
    sig.copy_from_slice(&trailer[KEY_ID_LEN + 8..KEY_ID_LEN + 8 + 64]);
    let key = trusted
        .iter()
        .find(|k| key_id_bytes(k) == kid)
        .ok_or_else(|| AuthError::UnknownKey {
            key_id: hex::encode(kid),
        })?;
    key.verify(
        &sig_input(topic, &kid, counter, payload),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| AuthError::BadSignature {
        key_id: hex::encode(kid),
    })?;
    Ok((payload, counter))
}

fn sig_input(topic: &str, kid: &[u8; KEY_ID_LEN], counter: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + topic.len() + payload.len());
    m.extend_from_slice(b"edge/v1 sig");
    m.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    m.extend_from_slice(topic.as_bytes());
    m.extend_from_slice(kid);
    m.extend_from_slice(&counter.to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// Splits `bytes` into payload and a trailer of `kind`.
fn split(bytes: &[u8], kind: u8, len: usize) -> Result<(&[u8], &[u8]), AuthError> {
    if bytes.len() < 3 || &bytes[bytes.len() - 2..] != MAGIC {
        return Err(AuthError::NoTrailer);
    }
    let found = bytes[bytes.len() - 3];
    if found != kind {
        return Err(AuthError::WrongKind {
            expected: if kind == KIND_MAC { "mac" } else { "signature" },
        });
    }
    if bytes.len() < len {
        return Err(AuthError::NoTrailer);
    }
    Ok(bytes.split_at(bytes.len() - len))
}

/// One direction's HMAC-SHA256 key.
#[derive(Clone)]
pub struct MacKey([u8; 32]);

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

/// Where a MAC trailer says a message belongs in its sender's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub epoch: u64,
    pub counter: u64,
}

impl MacKey {
    fn tag(&self, topic: &str, stamp: Stamp, payload: &[u8]) -> Hmac<Sha256> {
        // A 32-byte key is always a valid HMAC key.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("hmac takes keys of any length"));
        mac.update(b"edge/v1 mac");
        mac.update(&(topic.len() as u16).to_be_bytes());
        mac.update(topic.as_bytes());
        mac.update(&stamp.epoch.to_be_bytes());
        mac.update(&stamp.counter.to_be_bytes());
        mac.update(payload);
        mac
    }

    /// `payload` with a MAC trailer for `topic` and `stamp`.
    pub fn seal(&self, topic: &str, payload: &[u8], stamp: Stamp) -> Vec<u8> {
        let tag = self.tag(topic, stamp, payload).finalize().into_bytes();
        let mut out = Vec::with_capacity(payload.len() + MAC_TRAILER_LEN);
        out.extend_from_slice(payload);
        out.extend_from_slice(&stamp.epoch.to_be_bytes());
        out.extend_from_slice(&stamp.counter.to_be_bytes());
        out.extend_from_slice(&tag[..TAG_LEN]);
        out.push(KIND_MAC);
        out.extend_from_slice(MAGIC);
        out
    }

    /// Checks the MAC trailer of `bytes` (constant time); returns the payload and its stamp.
    /// Replay is the caller's [`ReplayWindow`]'s job.
    pub fn open<'a>(&self, topic: &str, bytes: &'a [u8]) -> Result<(&'a [u8], Stamp), AuthError> {
        let (payload, stamp, tag) = read_mac_trailer(bytes)?;
        self.tag(topic, stamp, payload)
            .verify_truncated_left(tag)
            .map_err(|_| AuthError::BadMac)?;
        Ok((payload, stamp))
    }
}

/// The body of an authenticated payload without checking anything: for observers that only
/// read (a monitoring client, a test watching the broker). Never act on it. A payload without a
/// trailer is returned whole.
pub fn body_unverified(bytes: &[u8]) -> &[u8] {
    let len = match bytes
        .len()
        .checked_sub(3)
        .map(|i| (bytes[i], &bytes[i + 1..]))
    {
        Some((KIND_MAC, m)) if m == MAGIC => MAC_TRAILER_LEN,
        Some((KIND_SIG, m)) if m == MAGIC => SIG_TRAILER_LEN,
        _ => 0,
    };
    &bytes[..bytes.len().saturating_sub(len)]
}

/// The stamp of a MAC trailer, unverified (for routing before the key is known).
pub fn peek_stamp(bytes: &[u8]) -> Result<Stamp, AuthError> {
    read_mac_trailer(bytes).map(|(_, s, _)| s)
}

fn read_mac_trailer(bytes: &[u8]) -> Result<(&[u8], Stamp, &[u8]), AuthError> {
    let (payload, t) = split(bytes, KIND_MAC, MAC_TRAILER_LEN)?;
    let word = |i: usize| u64::from_be_bytes(t[i..i + 8].try_into().unwrap_or_default());
    Ok((
        payload,
        Stamp {
            epoch: word(0),
            counter: word(8),
        },
        &t[16..16 + TAG_LEN],
    ))
}

/// The two MAC keys a device and the coordinator share: `up` for device -> coordinator, `down`
/// for coordinator -> device (separate, so a message can never be reflected back as the other
/// side's).
#[derive(Debug, Clone)]
pub struct SessionKeys {
    pub up: MacKey,
    pub down: MacKey,
}

/// Per-device anti-replay state at the receiver: the sender's current epoch, the highest counter
/// seen in it and a 1024-counter window below that, so messages that overtake each other (the
/// agent sends control before telemetry; a reconnect resends) are still accepted once each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayWindow {
    epoch: u64,
    top: u64,
    /// Bit i set: counter `top - i` was seen.
    bits: [u64; WINDOW_WORDS],
}

const WINDOW_WORDS: usize = 16;
/// How far below the highest counter a message may still arrive.
pub const REPLAY_WINDOW: u64 = (WINDOW_WORDS * 64) as u64;

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow::restore(0, 0)
    }
}

impl ReplayWindow {
    /// The state as persisted: `(epoch, top)`. Restoring treats everything at or below `top`
    /// as seen, which is what a restart of the receiver must assume.
    pub fn restore(epoch: u64, top: u64) -> ReplayWindow {
        ReplayWindow {
            epoch,
            top,
            bits: [u64::MAX; WINDOW_WORDS],
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn top(&self) -> u64 {
        self.top
    }

    /// Accepts `stamp` once: a newer epoch starts over, an older one is refused, and within
    /// the epoch a counter seen before or below the window is refused.
    pub fn accept(&mut self, stamp: Stamp) -> Result<(), AuthError> {
        let replay = Err(AuthError::Replay {
            epoch: stamp.epoch,
            counter: stamp.counter,
        });
        if stamp.epoch < self.epoch {
            return replay;
        }
        if stamp.epoch > self.epoch {
            self.epoch = stamp.epoch;
            self.top = stamp.counter;
            self.bits = [0; WINDOW_WORDS];
            self.bits[0] = 1;
            return Ok(());
        }
        if stamp.counter > self.top {
            self.shift(stamp.counter - self.top);
            self.top = stamp.counter;
            self.bits[0] |= 1;
            return Ok(());
        }
        let back = self.top - stamp.counter;
        if back >= REPLAY_WINDOW {
            return replay;
        }
        let (w, b) = ((back / 64) as usize, back % 64);
        if self.bits[w] & (1 << b) != 0 {
            return replay;
        }
        self.bits[w] |= 1 << b;
        Ok(())
    }

    /// Moves the window up by `n` counters (bit i becomes bit i + n).
    fn shift(&mut self, n: u64) {
        if n >= REPLAY_WINDOW {
            self.bits = [0; WINDOW_WORDS];
            return;
        }
        let (words, bits) = ((n / 64) as usize, (n % 64) as u32);
        for i in (0..WINDOW_WORDS).rev() {
            let lo = i.checked_sub(words).map_or(0, |j| self.bits[j]);
            let carry = match i.checked_sub(words + 1) {
                Some(j) if bits > 0 => self.bits[j] >> (64 - bits),
                _ => 0,
            };
            self.bits[i] = (lo << bits) | carry;
        }
    }
}

/// How a topic's messages are authenticated: the one table both sides follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Device -> coordinator with the device's `up` MAC; counters checked against replay.
    DeviceMac,
    /// Device -> coordinator with the `up` MAC at [`STATUS_COUNTER`] (retained status, will).
    DeviceStatus,
    /// An enrollment request: signed by the device key (and by a claim key in claim mode).
    Enrollment,
    /// Coordinator -> one device with the `down` MAC.
    CoordinatorMac,
    /// Coordinator -> devices, signed by the coordinator's key in a trailer.
    CoordinatorSigned,
    /// Signed inside the payload's own format: deployments by the deploy key (chunks through
    /// the manifest's hashes), FL rounds by the coordinator's key.
    Embedded,
}

impl super::topics::Topic {
    /// How messages on this topic prove who sent them.
    pub fn auth_rule(&self) -> Rule {
        use super::topics::{DeployTopic, DeviceTopic, Topic};
        match self {
            Topic::Device(DeviceTopic::Status { .. }) => Rule::DeviceStatus,
            Topic::Device(
                DeviceTopic::Register { .. }
                | DeviceTopic::Telemetry { .. }
                | DeviceTopic::Data { .. },
            )
            | Topic::Deploy(DeployTopic::Status { .. } | DeployTopic::Resend { .. })
            | Topic::FlUpdate { .. }
            | Topic::OffloadRequest { .. }
            | Topic::CommandReply { .. } => Rule::DeviceMac,
            Topic::Enroll { .. } => Rule::Enrollment,
            Topic::Device(DeviceTopic::Cmd { .. })
            | Topic::OffloadResponse { .. }
            | Topic::Ack { .. } => Rule::CoordinatorMac,
            Topic::OffloadCapacity { .. }
            | Topic::EnrollAnswer { .. }
            | Topic::CoordinatorStatus => Rule::CoordinatorSigned,
            Topic::Deploy(
                DeployTopic::Manifest { .. }
                | DeployTopic::Chunk { .. }
                | DeployTopic::GroupManifest { .. }
                | DeployTopic::GroupChunk { .. },
            )
            | Topic::FlRound { .. }
            | Topic::GroupFlRound { .. }
            | Topic::FlChunk { .. } => Rule::Embedded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Identity, Identity) {
        (Identity::generate(), Identity::generate())
    }

    fn keys(device: &Identity, coord: &Identity) -> (SessionKeys, SessionKeys) {
        let (dp, cp) = (device.public(), coord.public());
        let on_device = device
            .session_keys(&cp, "d1", &dp, &cp)
            .expect("device side");
        let on_coord = coord
            .session_keys(&dp, "d1", &dp, &cp)
            .expect("coordinator side");
        (on_device, on_coord)
    }

    #[test]
    fn both_sides_derive_the_same_keys_and_macs_verify() {
        let (d, c) = pair();
        let (dk, ck) = keys(&d, &c);
        let stamp = Stamp {
            epoch: 3,
            counter: 9,
        };
        let sealed = dk.up.seal("edge/v1/d1/telemetry", b"{\"x\":1}", stamp);
        assert_eq!(sealed.len(), 7 + MAC_TRAILER_LEN);
        let (payload, got) = ck
            .up
            .open("edge/v1/d1/telemetry", &sealed)
            .expect("verifies");
        assert_eq!((payload, got), (&b"{\"x\":1}"[..], stamp));
        // Another topic, the other direction's key, a flipped bit: all refused.
        assert_eq!(
            ck.up.open("edge/v1/d1/register", &sealed),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            ck.down.open("edge/v1/d1/telemetry", &sealed),
            Err(AuthError::BadMac)
        );
        let mut bad = sealed.clone();
        bad[0] ^= 1;
        assert_eq!(
            ck.up.open("edge/v1/d1/telemetry", &bad),
            Err(AuthError::BadMac)
        );
        // A different device's keys do not verify it.
        let other = Identity::generate();
        let (ok, _) = keys(&other, &c);
        assert_eq!(
            ok.up.open("edge/v1/d1/telemetry", &sealed),
            Err(AuthError::BadMac)
        );
    }

    #[test]
    fn signatures_verify_only_with_the_right_key_and_topic() {
        let (c, other) = pair();
        let sealed = c.seal("edge/v1/coordinator/offload/r1", b"advert", 5);
        assert_eq!(sealed.len(), 6 + SIG_TRAILER_LEN);
        let (payload, counter) = c
            .public()
            .open("edge/v1/coordinator/offload/r1", &sealed)
            .expect("ok");
        assert_eq!((payload, counter), (&b"advert"[..], 5));
        assert!(matches!(
            other
                .public()
                .open("edge/v1/coordinator/offload/r1", &sealed),
            Err(AuthError::UnknownKey { .. })
        ));
        assert!(matches!(
            c.public().open("edge/v1/coordinator/offload/r2", &sealed),
            Err(AuthError::BadSignature { .. })
        ));
        assert_eq!(c.public().open("t", b"{}"), Err(AuthError::NoTrailer));
        let mac = MacKey([7; 32]).seal(
            "t",
            b"x",
            Stamp {
                epoch: 1,
                counter: 1,
            },
        );
        assert!(matches!(
            c.public().open("t", &mac),
            Err(AuthError::WrongKind { .. })
        ));
    }

    #[test]
    fn identities_round_trip_and_never_print_secrets() {
        let id = Identity::generate();
        let back = Identity::from_bytes(&id.to_bytes()).expect("64 bytes");
        assert_eq!(back.public(), id.public());
        assert!(Identity::from_bytes(&[0; 10]).is_err());
        assert!(!format!("{id:?}").contains(&hex::encode(&id.to_bytes()[..32])));
        id.public().validate().expect("valid");
        let broken = PublicIdentity {
            sign: "zz".into(),
            agree: id.public().agree,
        };
        assert!(broken.validate().is_err());
    }

    #[test]
    fn replay_window_accepts_each_stamp_once() {
        let s = |epoch, counter| Stamp { epoch, counter };
        let mut w = ReplayWindow::default();
        assert!(w.accept(s(1, 1)).is_ok());
        assert!(w.accept(s(1, 1)).is_err(), "same counter twice");
        assert!(w.accept(s(1, 5)).is_ok());
        assert!(
            w.accept(s(1, 3)).is_ok(),
            "overtaken message arrives late once"
        );
        assert!(w.accept(s(1, 3)).is_err());
        assert!(w.accept(s(1, 2000)).is_ok());
        assert!(
            w.accept(s(1, 2000 - REPLAY_WINDOW)).is_err(),
            "below the window"
        );
        assert!(w.accept(s(1, 2000 - REPLAY_WINDOW + 1)).is_ok());
        assert!(w.accept(s(1, 1999)).is_ok());
        assert!(w.accept(s(0, 9999)).is_err(), "older epoch");
        assert!(w.accept(s(2, 1)).is_ok(), "new epoch starts over");
        assert!(w.accept(s(1, 3000)).is_err(), "the old epoch is closed");
        // After a restart everything up to the persisted top counts as seen.
        let mut r = ReplayWindow::restore(w.epoch(), w.top());
        assert!(r.accept(s(2, 1)).is_err());
        assert!(r.accept(s(2, 2)).is_ok());
    }

    #[test]
    fn window_shift_keeps_bits_across_words() {
        let s = |counter| Stamp { epoch: 1, counter };
        let mut w = ReplayWindow::default();
        for c in [1, 2, 3, 70, 200] {
            w.accept(s(c)).expect("first time");
        }
        for c in [1, 2, 3, 70, 200] {
            assert!(w.accept(s(c)).is_err(), "{c} again");
        }
        for c in [4, 69, 71, 199] {
            w.accept(s(c)).expect("never seen");
        }
    }
}
