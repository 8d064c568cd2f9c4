//! What an accepted enrollment gives the rest of the agent: the keys shared with the
//! coordinator, the numbering of what the device sends, the coordinator's public identity and
//! the groups it assigned. Handed out as a `watch` of `Option<Arc<Session>>` (`None`: not
//! enrolled, send nothing but the request).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use protocol::v1::auth::{self, AuthError, Identity, PublicIdentity, SessionKeys, Stamp};
use protocol::v1::deploy::VerifyingKey;
use tokio::sync::watch;

/// The session as parts of the agent watch it.
pub type SessionWatch = watch::Receiver<Option<Arc<Session>>>;

/// The per-process message counter: starts at 1 and is shared by every [`Session`] of the
/// process, so a new answer (new groups) never restarts the numbering within an epoch.
#[derive(Debug)]
pub struct Counter(AtomicU64);

impl Default for Counter {
    fn default() -> Self {
        Counter(AtomicU64::new(1))
    }
}

/// An accepted enrollment, ready to seal and verify.
#[derive(Debug)]
pub struct Session {
    keys: SessionKeys,
    epoch: u64,
    counter: Arc<Counter>,
    coordinator: PublicIdentity,
    coordinator_key: VerifyingKey,
    groups: Vec<String>,
}

impl Session {
    /// Derives the session keys of `device` (holding `identity`) with `coordinator`; fails on a
    /// coordinator identity whose keys do not parse or do not agree.
    pub fn new(
        identity: &Identity,
        device: &str,
        coordinator: PublicIdentity,
        groups: Vec<String>,
        epoch: u64,
        counter: Arc<Counter>,
    ) -> Result<Session, AuthError> {
        let ours = identity.public();
        let keys = identity.session_keys(&coordinator, device, &ours, &coordinator)?;
        let coordinator_key = coordinator.verifying_key()?;
        Ok(Session {
            keys,
            epoch,
            counter,
            coordinator,
            coordinator_key,
            groups,
        })
    }

    /// `payload` with its MAC trailer for `topic` (Rule::DeviceMac), numbered with the next
    /// counter: every publish, resends included, gets a new one.
    pub fn seal(&self, topic: &str, payload: &[u8]) -> Vec<u8> {
        let counter = self.counter.0.fetch_add(1, Ordering::Relaxed);
        self.keys.up.seal(
            topic,
            payload,
            Stamp {
                epoch: self.epoch,
                counter,
            },
        )
    }

    /// The retained status or the last will (Rule::DeviceStatus): sealed at
    /// [`auth::STATUS_COUNTER`], outside the replay window.
    pub fn seal_status(&self, topic: &str, payload: &[u8]) -> Vec<u8> {
        self.keys.up.seal(
            topic,
            payload,
            Stamp {
                epoch: self.epoch,
                counter: auth::STATUS_COUNTER,
            },
        )
    }

    /// Checks a coordinator -> device MAC (Rule::CoordinatorMac); replay is the caller's
    /// window's job.
    pub fn open_down<'a>(
        &self,
        topic: &str,
        bytes: &'a [u8],
    ) -> Result<(&'a [u8], Stamp), AuthError> {
        self.keys.down.open(topic, bytes)
    }

    /// Checks a coordinator signature trailer (Rule::CoordinatorSigned).
    pub fn open_signed<'a>(
        &self,
        topic: &str,
        bytes: &'a [u8],
    ) -> Result<(&'a [u8], u64), AuthError> {
        auth::verify_signed(topic, bytes, std::slice::from_ref(&self.coordinator_key))
    }

    /// The coordinator's public identity this session trusts.
    pub fn coordinator(&self) -> &PublicIdentity {
        &self.coordinator
    }

    /// The coordinator's signing key (FL round messages are verified with it).
    pub fn coordinator_key(&self) -> VerifyingKey {
        self.coordinator_key
    }

    /// Deployment groups the coordinator assigned.
    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// True when both seal with the same keys and epoch (a new answer that only changed the
    /// groups); a will sealed under one is valid under the other.
    pub fn same_keys(&self, other: &Session) -> bool {
        self.coordinator == other.coordinator && self.epoch == other.epoch
    }
}
