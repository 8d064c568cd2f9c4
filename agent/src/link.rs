//! What the uplink shares with the parts that depend on the connection, without those parts
//! knowing the uplink: the link state (a `watch`, so a reconnect is an event to await, not a
//! counter to poll), the direct-publish path (QoS 0 publishes that skip the outbox), the
//! enrollment-request path (the one thing an unenrolled device publishes) and the counts of
//! incoming messages dropped because they did not authenticate.
//!
//! `agent::run` creates both ends and hands them out: the uplink gets the [`LinkSender`], the
//! [`DirectReceiver`] and the [`EnrollReceiver`]; offload, the deploy task, enrollment and the
//! status line get [`LinkWatch`]es, a [`DirectSender`] or an [`EnrollSender`]; telemetry reads
//! [`AuthStats`]. So `uplink` and `offload` never import each other.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

/// The broker connection as the rest of the agent sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkState {
    /// A CONNACK arrived and the connection has not failed since.
    pub connected: bool,
    /// The broker kept a session for this client (always false today: every connection
    /// uses a clean session, the outbox being the source of truth).
    pub session_present: bool,
    /// Connections made since the agent started; a change means a reconnect happened.
    pub connects: u64,
}

/// Written by the uplink only.
pub type LinkSender = watch::Sender<LinkState>;
/// Read by anyone who cares about the connection; `changed().await` wakes on every change.
pub type LinkWatch = watch::Receiver<LinkState>;

/// A new link-state channel, offline and never connected.
pub fn link_state() -> (LinkSender, LinkWatch) {
    watch::channel(LinkState::default())
}

/// Waits until a connection newer than the one counted in `seen` is made, and counts it
/// in `seen`; `false` once the uplink is gone and no connection can come any more. A
/// disconnect alone does not wake it. Cancel-safe: a reconnect that happens while the
/// caller is busy is still seen on the next call, because it compares counts.
pub async fn next_connect(link: &mut LinkWatch, seen: &mut u64) -> bool {
    loop {
        let connects = link.borrow_and_update().connects;
        if connects != *seen {
            *seen = connects;
            return true;
        }
        if link.changed().await.is_err() {
            return false;
        }
    }
}

/// A QoS 0 publish the uplink writes now, or drops once `expires` passed or while offline.
#[derive(Debug)]
pub struct Direct {
    pub topic: String,
    pub payload: Vec<u8>,
    pub expires: Instant,
}

pub type DirectSender = mpsc::Sender<Direct>;
pub type DirectReceiver = mpsc::Receiver<Direct>;

/// A new direct-publish path holding at most `capacity` publishes (at least one).
pub fn direct_path(capacity: usize) -> (DirectSender, DirectReceiver) {
    mpsc::channel(capacity.max(1))
}

/// A sealed enrollment request (`v1::enroll::seal_request`), published by the uplink on
/// `topics::enroll(device)` at QoS 1, not retained, as is: while connected at once, while
/// offline dropped (the enrollment task sends a fresh one at the next connection).
pub type EnrollSender = mpsc::Sender<Vec<u8>>;
pub type EnrollReceiver = mpsc::Receiver<Vec<u8>>;

/// A new enrollment-request path. One request waiting is enough: a newer one says the same.
pub fn enroll_path() -> (EnrollSender, EnrollReceiver) {
    mpsc::channel(1)
}

/// Incoming messages the uplink dropped because they did not authenticate, by reason
/// (`auth::AuthError::reason`, or `not_enrolled`). Written by the uplink, read by telemetry.
#[derive(Debug, Default)]
pub struct AuthStats {
    rejected: Mutex<BTreeMap<&'static str, u64>>,
}

impl AuthStats {
    /// Counts one drop; returns the total for `reason`.
    pub fn reject(&self, reason: &'static str) -> u64 {
        let mut r = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        let n = r.entry(reason).or_default();
        *n += 1;
        *n
    }

    /// Totals by reason since the agent started.
    pub fn rejected(&self) -> BTreeMap<String, u64> {
        self.rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Polls `f` once: `None` if it is still pending (no waiting on the clock).
    async fn now<F: std::future::Future>(f: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::ZERO, f).await.ok()
    }

    #[tokio::test]
    async fn a_reconnect_is_an_event_and_a_disconnect_is_not() {
        let (tx, mut rx) = link_state();
        let mut seen = rx.borrow().connects;
        assert_eq!(now(next_connect(&mut rx, &mut seen)).await, None);

        tx.send_modify(|l| {
            l.connected = true;
            l.connects += 1;
        });
        assert_eq!(now(next_connect(&mut rx, &mut seen)).await, Some(true));
        assert_eq!(seen, 1);

        tx.send_modify(|l| l.connected = false);
        assert_eq!(
            now(next_connect(&mut rx, &mut seen)).await,
            None,
            "disconnect"
        );

        // Two connections while nobody waited: one wake-up, with the newest count.
        tx.send_modify(|l| l.connects += 2);
        assert_eq!(now(next_connect(&mut rx, &mut seen)).await, Some(true));
        assert_eq!(seen, 3);

        drop(tx);
        assert_eq!(now(next_connect(&mut rx, &mut seen)).await, Some(false));
    }
}
