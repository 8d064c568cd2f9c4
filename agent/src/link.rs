//! What the uplink shares with the parts that depend on the connection, without those parts
//! knowing the uplink: the link state (a `watch`, so a reconnect is an event to await, not a
//! counter to poll) and the direct-publish path (QoS 0 publishes that skip the outbox).
//!
//! `agent::run` creates both ends and hands them out: the uplink gets the [`LinkSender`] and
//! the [`DirectReceiver`]; offload, the deploy task and the status line get [`LinkWatch`]es
//! and a [`DirectSender`]. So `uplink` and `offload` never import each other.

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
