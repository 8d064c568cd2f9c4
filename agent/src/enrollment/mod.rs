//! Device identity and zero-touch enrollment: how the agent becomes a member of the fleet
//! and gets the keys it authenticates every message with.
//!
//! ```text
//! start: identity/device.key (made once) ─► epoch raised + fsync'd ─► enrollment.bin re-verified
//!        ─► accepted? session at once : not enrolled
//! connect (link watch) / retry timer ─► Machine::request ─► EnrollSender ─► uplink:
//!        edge/v1/{d}/enroll (QoS 1, signed by the device key and the claim key if any)
//! edge/v1/{d}/enroll/answer (retained, coordinator-signed) ─► inbox ─► Machine::on_answer
//!        ─► enrollment.bin ─► watch<Option<Arc<Session>>> ─► uplink (seal, verify), deploy
//!        (groups), FL (coordinator key), telemetry (enrolled)
//! ```
//!
//! Parts: `files` (the identity directory: key, epoch, answer), `machine` (the I/O-free state
//! machine: requests, backoff, answers, trust), `session` (what an accepted answer gives:
//! keys, epoch, counter, coordinator identity, groups), `config` (`[enrollment]`). This file
//! opens them at start and runs the thin task around the machine.
//!
//! **Invariant:** the epoch is durable before anything is sealed with it; a key file that does
//! not load is an error, never replaced; only an answer signed by the trusted coordinator
//! changes what is persisted. **Boundary:** `agent::run` opens it and spawns the task; the CLI
//! (`edge-agent identity`) reads the public identity.

pub mod config;
pub mod files;
pub mod machine;
pub mod session;

use std::path::Path;
use std::sync::Arc;

use protocol::keyfile::{self, KeyError};
use protocol::v1::auth::PublicIdentity;
use protocol::v1::enroll::{Decision, Hardware};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use config::{CoordinatorPin, EnrollmentConfig};
use files::{EpochSource, Files, FilesError};
use machine::{Machine, Params, Verdict};
pub use session::{Session, SessionWatch};

use crate::inbox::{Incoming, Subscription};
use crate::link::{self, EnrollSender, LinkWatch};

/// Answers buffered between the uplink and the task (one retained answer per device).
pub const INBOX_CAPACITY: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error("enrollment.claim_key_file: {0}")]
    Claim(KeyError),
}

/// The enrollment part, opened at start; [`Enrollment::run`] is its task.
#[derive(Debug)]
pub struct Enrollment {
    device: String,
    machine: Machine,
    files: Files,
    tx: watch::Sender<Option<Arc<Session>>>,
    /// Requests sent by this process (the first is logged at INFO, the rest at DEBUG).
    sent: u64,
}

/// This device's public identity from `state_dir`, made now if there is none (`edge-agent
/// identity`); `true` when it was just made. Does not touch the epoch.
pub fn device_identity(state_dir: &Path) -> Result<(PublicIdentity, bool), EnrollmentError> {
    let (id, made) = Files::open(state_dir)?.identity()?;
    Ok((id.public(), made))
}

/// What the device says about its hardware in the request, for an operator deciding on it.
/// `accelerators`: the execution providers the inference runtime was built with, besides cpu.
pub fn hardware(agent_version: &str, accelerators: Vec<String>) -> Hardware {
    Hardware {
        arch: std::env::consts::ARCH.into(),
        os: sysinfo::System::long_os_version().unwrap_or_else(|| std::env::consts::OS.into()),
        board: board(),
        accelerators,
        agent_version: agent_version.to_owned(),
    }
}

/// The board model: the device tree's (ARM boards), else DMI's product name (PCs, VMs), else
/// empty.
fn board() -> String {
    ["/proc/device-tree/model", "/sys/class/dmi/id/product_name"]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .map(|b| {
            // The device tree's string ends in a NUL.
            let s = String::from_utf8_lossy(&b);
            s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .chars()
                .take(128)
                .collect::<String>()
        })
        .find(|s| !s.is_empty())
        .unwrap_or_default()
}

impl Enrollment {
    /// Opens the identity directory of `state_dir`: loads or makes the device key, raises the
    /// epoch (durably), re-verifies the persisted answer and loads the claim key. A claim key
    /// that does not load is an error unless the device is enrolled already (it is only needed
    /// to ask).
    pub fn open(
        state_dir: &Path,
        cfg: &EnrollmentConfig,
        device: &str,
        hardware: Hardware,
    ) -> Result<Enrollment, EnrollmentError> {
        let files = Files::open(state_dir)?;
        let (identity, made) = files.identity()?;
        let public = identity.public();
        if made {
            tracing::info!(device, key_id = %public.key_id(), dir = %files.dir().display(), "device identity created");
        }
        let (epoch, source) = files.raise_epoch(protocol::v1::now_ms() / 1000)?;
        if source == EpochSource::Recovered {
            tracing::warn!(dir = %files.dir().display(), epoch, "boot epoch file missing or damaged beside an existing key; restarting the epoch from the clock");
        }
        let mut machine = Machine::new(Params {
            device: device.to_owned(),
            identity,
            claim: None,
            hardware,
            pin: cfg.coordinator.as_ref().map(CoordinatorPin::public),
            retry_ms: cfg.retry_ms,
            epoch,
        });
        match files.rotation() {
            Ok(Some(r)) => match machine.restore_rotation(r) {
                Ok(to) => {
                    tracing::info!(device, coordinator = %to, "trusting the coordinator key a rotation announced")
                }
                Err(e) => {
                    tracing::error!(device, dir = %files.dir().display(), error = %e, "persisted coordinator key rotation does not verify; ignoring it")
                }
            },
            Ok(None) => {}
            Err(e) => {
                tracing::error!(device, error = %e, "cannot read the persisted coordinator key rotation; ignoring it")
            }
        }
        if let Some(bytes) = files.answer()? {
            match machine.restore(&bytes) {
                Ok(Decision::Accepted) => {}
                Ok(decision) => {
                    tracing::warn!(device, decision = decision.as_str(), reason = %machine.held().map(|a| a.reason.as_str()).unwrap_or_default(), "not enrolled: the last answer held refuses this device; asking again");
                }
                Err(e) => {
                    tracing::error!(device, dir = %files.dir().display(), error = %e, "persisted enrollment answer does not verify; ignoring it and asking again");
                }
            }
        }
        // A pin-then-rotation whose rotation file was not written: written now.
        if let Some(r) = machine.take_persist_rotation()
            && let Err(e) = files.save_rotation(&r)
        {
            tracing::error!(error = %e, "cannot persist the coordinator key rotation");
        }
        if let Some((pin, trusted)) = machine.stale_pin() {
            tracing::warn!(device, pin = %pin, trusted = %trusted, "enrollment.coordinator is stale: the coordinator rotated its key; update the pin to the key trusted now");
        }
        let enrolled = machine.session().is_some();
        if let Some(path) = &cfg.claim_key_file {
            match keyfile::load_signing_key(path) {
                Ok(k) => machine.set_claim(Some(k)),
                Err(e) if enrolled => {
                    tracing::warn!(error = %e, "claim key unreadable; not needed while enrolled");
                }
                Err(e) => return Err(EnrollmentError::Claim(e)),
            }
        }
        if !machine.trusts_a_coordinator() {
            tracing::warn!(
                device,
                "no coordinator pinned (enrollment.coordinator): the key named in the first accepted enrollment answer will be trusted"
            );
        }
        let session = machine.session();
        match &session {
            Some(s) => {
                tracing::info!(device, key_id = %public.key_id(), epoch, groups = ?s.groups(), coordinator = %s.coordinator().key_id(), "enrolled")
            }
            None => {
                tracing::info!(device, key_id = %public.key_id(), epoch, "not enrolled yet: the enrollment request is the only thing sent until it is accepted")
            }
        }
        Ok(Enrollment {
            device: device.to_owned(),
            machine,
            files,
            tx: watch::channel(session).0,
            sent: 0,
        })
    }

    /// The session as it changes; `None` while not enrolled.
    pub fn watch(&self) -> SessionWatch {
        self.tx.subscribe()
    }

    /// This device's public identity.
    pub fn public(&self) -> &PublicIdentity {
        self.machine.public()
    }

    /// Runs until `stop`: asks at every connection and on the retry timer while not enrolled,
    /// and takes the answers the inbox delivers (`answers`, on `topics::enroll_answer`).
    pub async fn run(
        mut self,
        mut answers: Subscription,
        mut link: LinkWatch,
        requests: EnrollSender,
        mut stop: watch::Receiver<bool>,
    ) {
        // 0, not the current count: a connection made before this task ran still asks.
        let mut connects = 0;
        let mut link_open = true;
        let mut retry: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                msg = answers.rx.recv() => match msg {
                    Some(m) => {
                        self.on_answer(&m);
                        if self.machine.session().is_some() {
                            retry = None;
                        } else if retry.is_none() && link.borrow().connected {
                            // Just refused or revoked: ask again, then back off.
                            self.ask(&requests, &mut retry);
                        }
                    }
                    None => return,
                },
                open = link::next_connect(&mut link, &mut connects), if link_open => {
                    if open {
                        self.ask(&requests, &mut retry);
                    } else {
                        link_open = false;
                    }
                }
                () = sleep_until(retry), if retry.is_some() => {
                    retry = None;
                    // Offline, the next connection asks.
                    if link.borrow().connected {
                        self.ask(&requests, &mut retry);
                    }
                }
            }
        }
    }

    /// Sends a request if not enrolled and schedules the next one.
    fn ask(&mut self, requests: &EnrollSender, retry: &mut Option<Instant>) {
        let Some((bytes, delay)) = self.machine.request(protocol::v1::now_ms()) else {
            *retry = None;
            return;
        };
        *retry = Some(Instant::now() + delay);
        match requests.try_send(bytes) {
            Ok(()) => {
                self.sent += 1;
                if self.sent == 1 {
                    tracing::info!(device = %self.device, next_in_ms = delay.as_millis() as u64, "enrollment requested");
                } else {
                    tracing::debug!(device = %self.device, requests = self.sent, next_in_ms = delay.as_millis() as u64, "enrollment requested again");
                }
            }
            // One is already waiting for the uplink; it says the same.
            Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => *retry = None,
        }
    }

    fn on_answer(&mut self, m: &Incoming) {
        if m.payload.is_empty() {
            return; // a retained answer being cleared
        }
        let device = self.device.as_str();
        match self.machine.on_answer(&m.payload) {
            Verdict::Accepted {
                groups,
                coordinator,
                first_use,
                renewed,
            } => {
                if first_use {
                    tracing::warn!(device, coordinator = %coordinator, "trusting the coordinator key named in this first accepted enrollment answer (no enrollment.coordinator pinned)");
                }
                tracing::info!(device, groups = ?groups, coordinator = %coordinator, renewed, "enrolled: messages are sealed and sent");
            }
            Verdict::Rotated {
                groups,
                from,
                to,
                stale_pin,
            } => {
                tracing::info!(device, from = %from, to = %to, groups = ?groups, "coordinator key rotated: trusting the new key, session keys derived again");
                if let Some(pin) = stale_pin {
                    tracing::warn!(device, pin = %pin, trusted = %to, "enrollment.coordinator is stale: the coordinator rotated its key; update the pin to the key trusted now");
                }
            }
            Verdict::NotAccepted {
                decision: Decision::Pending,
                reason,
                ..
            } => {
                tracing::info!(device, reason = %reason, "enrollment pending: waiting for an operator (edge-coordinator devices approve)");
            }
            Verdict::NotAccepted {
                decision,
                reason,
                was_accepted,
                trusted,
            } => {
                tracing::error!(device, decision = decision.as_str(), reason = %reason, was_enrolled = was_accepted, verified_against_trusted_key = trusted, "enrollment {}: the device sends nothing; its outbox keeps what it has", decision.as_str());
            }
            Verdict::Stale { same: true, .. } => {
                tracing::debug!(device, "enrollment answer already held");
            }
            Verdict::Stale {
                issued_ms, held_ms, ..
            } => {
                tracing::warn!(
                    device,
                    issued_ms,
                    held_ms,
                    "ignoring an enrollment answer older than the one held (replayed?)"
                );
            }
            Verdict::OtherKey { key } => {
                tracing::warn!(device, their_key = %key, "an enrollment answer about another key for this device id: another device may be using this id");
            }
            Verdict::Invalid(error) => {
                tracing::warn!(device, error = %error, "dropping an enrollment answer that does not verify");
            }
        }
        // The rotation first: the answer that follows is signed by the new key, or is the
        // rotation itself, and a restart between the two must trust the new key.
        if let Some(r) = self.machine.take_persist_rotation()
            && let Err(e) = self.files.save_rotation(&r)
        {
            // The session below holds for this run; the next start trusts the pin (the old key)
            // and takes the persisted rotation answer as a rotation again.
            tracing::error!(error = %e, "cannot persist the coordinator key rotation");
        }
        if let Some(bytes) = self.machine.take_persist()
            && let Err(e) = self.files.save_answer(&bytes)
        {
            // The session below still holds for this run; the next start asks again.
            tracing::error!(error = %e, "cannot persist the enrollment answer");
        }
        let session = self.machine.session();
        self.tx.send_if_modified(|cur| {
            let same = match (cur.as_ref(), session.as_ref()) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                *cur = session;
            }
            !same
        });
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use protocol::v1::auth::Identity;
    use protocol::v1::enroll::{EnrollAnswer, open_request, seal_answer};
    use protocol::v1::topics;

    use super::*;
    use crate::inbox::Inbox;

    fn answer(public: &PublicIdentity, coord: &Identity, decision: Decision, at: u64) -> Vec<u8> {
        seal_answer(
            &EnrollAnswer {
                v: protocol::v1::VERSION,
                device: "pi-1".into(),
                device_key: public.sign.clone(),
                decision,
                reason: String::new(),
                groups: vec!["lab".into()],
                coordinator: coord.public(),
                issued_ms: at,
            },
            coord,
        )
    }

    /// Waits for an event, failing the test after a generous deadline (never a sleep).
    async fn soon<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(std::time::Duration::from_secs(30), f)
            .await
            .expect("in time")
    }

    /// The task end to end without a broker: a connection makes it ask, an answer through the
    /// inbox enrolls it (watch + file), and a restart starts enrolled with a higher epoch.
    #[tokio::test]
    async fn asks_on_connect_enrolls_and_restarts_enrolled() {
        let state = tempfile::tempdir().expect("tempdir");
        let coord = Identity::generate();
        let cfg = EnrollmentConfig {
            coordinator: Some(CoordinatorPin {
                sign: coord.public().sign,
                agree: coord.public().agree,
            }),
            // The shortest wait, so the retry below comes quickly.
            retry_ms: 100,
            ..EnrollmentConfig::default()
        };
        let e = Enrollment::open(state.path(), &cfg, "pi-1", Hardware::default()).expect("opens");
        let public = e.public().clone();
        let mut sessions = e.watch();
        assert!(sessions.borrow().is_none());
        let inbox = Inbox::default();
        let answers = inbox.subscribe(&topics::enroll_answer("pi-1"), INBOX_CAPACITY);
        let (link_tx, link_rx) = link::link_state();
        let (req_tx, mut req_rx) = link::enroll_path();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(e.run(answers, link_rx, req_tx, stop_rx));

        link_tx.send_modify(|l| {
            l.connected = true;
            l.connects += 1;
        });
        let first = soon(req_rx.recv()).await.expect("a request on connect");
        let req = open_request("pi-1", &first, &[]).expect("signed by the device");
        assert_eq!(req.request.identity, public);
        // Unanswered: asked again after the backoff.
        soon(req_rx.recv()).await.expect("a retry");

        inbox.deliver(Incoming {
            topic: topics::enroll_answer("pi-1"),
            payload: answer(&public, &coord, Decision::Accepted, 10).into(),
            retain: true,
        });
        soon(sessions.changed()).await.expect("a session");
        let epoch = sessions.borrow().as_ref().expect("enrolled").epoch();
        assert_eq!(epoch, 1);
        stop_tx.send(true).expect("stop");
        task.await.expect("ends");

        let again =
            Enrollment::open(state.path(), &cfg, "pi-1", Hardware::default()).expect("reopens");
        let s = again
            .watch()
            .borrow()
            .clone()
            .expect("enrolled from the file");
        assert_eq!(s.epoch(), 2, "the epoch rises at every start");
        assert_eq!(s.groups(), ["lab"]);
        assert_eq!(again.public(), &public, "the same key");
    }
}
