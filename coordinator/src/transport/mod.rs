//! Where messages come from: the embedded rumqttd broker or an external broker, behind one
//! small interface.
//!
//! Each transport runs a pump task that turns broker activity into [`Inbound`] values on a
//! bounded channel (its capacity is the backpressure), and a [`Transport`] handle through which
//! the service publishes (its own status, deployment manifests and chunks) and acknowledges
//! processed messages. The handle never
//! blocks on the pump: requests the client cannot take right now are deferred and retried, so
//! the pump (which drains those requests) and the service (which drains the channel) cannot
//! wait on each other.

pub mod embedded;
pub mod external;

use bytes::Bytes;

/// Capacity of the pump -> service channel.
pub const CHANNEL_CAPACITY: usize = 256;

/// Errors from starting or using a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("embedded broker cannot listen on {addr}: {error}")]
    Listen {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("embedded broker failed to start: {0}")]
    Start(String),
    #[error("embedded broker link: {0}")]
    Link(String),
    #[error("cannot read {what} {path}: {error}")]
    TlsFile {
        what: &'static str,
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("invalid tls setup: {0}")]
    Tls(String),
}

/// Something the pump saw.
#[derive(Debug)]
pub enum Inbound {
    /// A message on a subscribed topic.
    Message(Message),
    /// (Re)connected to the external broker; subscriptions were requested.
    Connected { session_present: bool },
    /// The broker confirmed the subscriptions.
    Subscribed,
    /// The transport stopped for good (the embedded link closed).
    Closed(String),
}

/// One received message and what acknowledges it.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub ack: AckToken,
}

/// How to acknowledge a message once it is processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckToken {
    /// Nothing to acknowledge (QoS 0, or the embedded link, where the broker acknowledged the
    /// publisher already).
    None,
    /// A QoS 1 delivery from the external broker.
    Mqtt { pkid: u16 },
}

/// The service's side of a transport.
pub enum Transport {
    Embedded(embedded::Embedded),
    External(external::External),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Embedded(e) => write!(f, "Transport::Embedded({})", e.addr()),
            Transport::External(e) => write!(f, "Transport::External({})", e.broker()),
        }
    }
}

impl Transport {
    /// Publishes a retained QoS 1 message (our status, deployment manifests).
    pub async fn publish_retained(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<(), TransportError> {
        self.publish(topic, payload, true).await
    }

    /// Publishes a QoS 1 message (JSON or binary), retained or not.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), TransportError> {
        match self {
            Transport::Embedded(e) => e.publish(topic, payload, retain).await,
            Transport::External(e) => {
                e.publish(topic, payload, retain);
                Ok(())
            }
        }
    }

    /// Bytes of publishes and acks waiting in this handle for the client's queue (0 for the
    /// embedded link, whose `publish` waits instead). The deployment pacer sends no more
    /// chunks while over a bound.
    pub fn backlog_bytes(&self) -> usize {
        match self {
            Transport::Embedded(_) => 0,
            Transport::External(e) => e.deferred_bytes(),
        }
    }

    /// Acknowledges a processed message (deferred if the client is busy).
    pub fn ack(&mut self, token: AckToken) {
        if let (Transport::External(e), AckToken::Mqtt { pkid }) = (self, token) {
            e.ack(pkid);
        }
    }

    /// Requests waiting for room in the client's queue.
    pub fn has_deferred(&self) -> bool {
        match self {
            Transport::Embedded(_) => false,
            Transport::External(e) => e.has_deferred(),
        }
    }

    /// Retries deferred requests.
    pub fn retry_deferred(&mut self) {
        if let Transport::External(e) = self {
            e.retry_deferred();
        }
    }

    /// Stops the transport: the external client disconnects cleanly (so the broker discards
    /// the will, after we published our offline status ourselves).
    pub async fn shutdown(self) {
        match self {
            Transport::Embedded(e) => e.shutdown(),
            Transport::External(e) => e.shutdown().await,
        }
    }
}
