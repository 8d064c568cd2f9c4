//! The embedded MQTT broker (rumqttd) and the coordinator's in-process link to it.
//!
//! Start-up order matters: rumqttd's router starts with [`Broker::new`], the coordinator's
//! link connects and subscribes, and only after the router has acknowledged the subscription
//! does the network server start. So no device can publish before the coordinator is
//! subscribed, and nothing published right after a restart is acknowledged to a device with
//! nobody there to receive it.
//!
//! rumqttd behaviours this module works around (rumqttd 0.20):
//! - the router PUBACKs a device's QoS 1 publish when it appends it to its in-memory log, not
//!   when a subscriber has it, so acknowledging on the link adds nothing and we subscribe at
//!   QoS 0 (the link is in-process and lossless while the process lives);
//! - a publish on a topic that matches no filter disconnects the publisher, our link included,
//!   so the coordinator's own status topic is a pre-created filter;
//! - when the link's buffer fills, the router sends `Unschedule` and stops forwarding until the
//!   link says it is ready again;
//! - a second connection with the same client id replaces the first, so the link's id has a
//!   random part that no device can guess;
//! - there is no way to stop a started broker: its threads end with the process.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{Broker, ConnectionSettings, Notification, RouterConfig, ServerSettings};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{AckToken, Inbound, Message, TransportError};
use crate::config::EmbeddedConfig;

/// How long the broker may take to listen (it is a thread in this process: milliseconds).
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running embedded broker and the coordinator's link to it.
pub struct Embedded {
    addr: SocketAddr,
    link_tx: LinkTx,
    pump: JoinHandle<()>,
}

impl Embedded {
    /// Starts the broker on `config.listen`, subscribed to `filters` before any client can
    /// connect, and pumps forwarded messages into `tx`. Returns once the port accepts
    /// connections.
    pub async fn start(
        config: &EmbeddedConfig,
        filters: Vec<String>,
        own_topics: Vec<String>,
        tx: mpsc::Sender<Inbound>,
    ) -> Result<Embedded, TransportError> {
        let addr = reserve_listen_addr(config.listen)?;
        let broker_config = broker_config(config, addr, own_topics);
        // Router start-up, link handshake and the wait for SUBACKs are blocking calls.
        let (broker, link_tx, link_rx) =
            tokio::task::spawn_blocking(move || link_and_subscribe(broker_config, &filters))
                .await
                .map_err(|e| TransportError::Start(format!("start-up task failed: {e}")))??;

        let server = std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                let mut broker = broker;
                // Returns only if every server thread ended (e.g. it could not bind).
                broker
                    .start()
                    .map_err(|e| TransportError::Start(e.to_string()))
            })
            .map_err(|e| TransportError::Start(format!("cannot spawn broker thread: {e}")))?;
        wait_listening(addr, &server).await?;
        if server.is_finished() {
            return Err(finished_reason(server));
        }
        let pump = tokio::spawn(pump(link_rx, tx));
        tracing::info!(listen = %addr, "embedded broker listening");
        Ok(Embedded {
            addr,
            link_tx,
            pump,
        })
    }

    /// The address the broker listens on (with the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `mqtt://` URL clients use, with a connectable host for wildcard listen addresses.
    pub fn url(&self) -> String {
        format!("mqtt://{}", connect_addr(self.addr))
    }

    /// Publishes a message, retained or not (`LinkTx::publish` cannot set the retain flag).
    /// The link's publish is QoS 0, but rumqttd forwards at the subscriber's QoS, so devices
    /// subscribed at QoS 1 get it at QoS 1. `send` waits while the router's queue is full.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), TransportError> {
        let publish = Publish::new(topic.as_bytes().to_vec(), payload, retain);
        self.link_tx
            .send(Packet::Publish(publish, None))
            .await
            .map(drop)
            .map_err(|e| TransportError::Link(format!("cannot publish on {topic}: {e}")))
    }

    pub fn shutdown(self) {
        self.pump.abort();
    }
}

/// rumqttd binds inside its own thread and only logs a failure, so check the address here
/// first for a clear error, and resolve port 0 to a concrete free port (rumqttd would pick one
/// we could not learn).
fn reserve_listen_addr(listen: SocketAddr) -> Result<SocketAddr, TransportError> {
    let probe = TcpListener::bind(listen).map_err(|error| TransportError::Listen {
        addr: listen,
        error,
    })?;
    let addr = probe.local_addr().map_err(|error| TransportError::Listen {
        addr: listen,
        error,
    })?;
    // Dropped here; rumqttd binds it again a moment later. Another process grabbing the port
    // in between makes the start-up check below fail rather than go unnoticed.
    drop(probe);
    Ok(addr)
}

fn broker_config(
    config: &EmbeddedConfig,
    addr: SocketAddr,
    own_topics: Vec<String>,
) -> rumqttd::Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: config.connect_timeout_ms,
        max_payload_size: config.max_payload_bytes,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        // Off: with it, every distinct unmatched topic would get its own in-memory log.
        dynamic_filters: false,
    };
    let server = ServerSettings {
        name: "edge-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    rumqttd::Config {
        id: 0,
        router: RouterConfig {
            // +1 for the coordinator's own link.
            max_connections: config.max_connections + 1,
            max_outgoing_packet_count: 200,
            max_segment_size: config.log_segment_bytes,
            max_segment_count: config.log_segments,
            custom_segment: None,
            initialized_filters: Some(own_topics),
            ..RouterConfig::default()
        },
        v4: Some([("edge-v4".to_owned(), server)].into_iter().collect()),
        ..rumqttd::Config::default()
    }
}

fn link_and_subscribe(
    broker_config: rumqttd::Config,
    filters: &[String],
) -> Result<(Broker, LinkTx, LinkRx), TransportError> {
    let broker = Broker::new(broker_config);
    let link_id = format!(
        "edge-coordinator-{}-{:x}",
        std::process::id(),
        protocol::v1::now_ms()
    );
    let (mut link_tx, mut link_rx) = broker
        .link(&link_id)
        .map_err(|e| TransportError::Link(format!("cannot connect the link: {e}")))?;
    for filter in filters {
        link_tx
            .subscribe(filter.as_str())
            .map_err(|e| TransportError::Link(format!("cannot subscribe {filter}: {e}")))?;
    }
    // One SUBACK per subscribe call; no client can connect yet, so nothing else arrives.
    let deadline = Instant::now() + START_TIMEOUT;
    let mut acked = 0;
    while acked < filters.len() {
        match link_rx.recv_deadline(deadline) {
            Ok(Some(Notification::DeviceAck(_))) => acked += 1,
            Ok(Some(Notification::Unschedule)) => {
                link_rx
                    .ready()
                    .map_err(|e| TransportError::Link(e.to_string()))?;
            }
            Ok(_) => {}
            Err(e) => {
                return Err(TransportError::Link(format!(
                    "no subscription acknowledgement: {e}"
                )));
            }
        }
    }
    Ok((broker, link_tx, link_rx))
}

/// Polls until the port accepts TCP connections or the broker thread gives up.
async fn wait_listening(
    addr: SocketAddr,
    server: &std::thread::JoinHandle<Result<(), TransportError>>,
) -> Result<(), TransportError> {
    let target = connect_addr(addr);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if server.is_finished() {
            return Ok(());
        }
        let probe = tokio::task::spawn_blocking(move || {
            TcpStream::connect_timeout(&target, Duration::from_millis(200))
        })
        .await
        .map_err(|e| TransportError::Start(format!("probe task failed: {e}")))?;
        if probe.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(TransportError::Start(format!(
                "nothing listening on {target} after {START_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn finished_reason(server: std::thread::JoinHandle<Result<(), TransportError>>) -> TransportError {
    match server.join() {
        Ok(Ok(())) => TransportError::Start(
            "the broker's server thread stopped (could it bind the listen address?)".into(),
        ),
        Ok(Err(e)) => e,
        Err(_) => TransportError::Start("the broker thread panicked".into()),
    }
}

/// A wildcard listen address is not connectable; use loopback of the same family.
fn connect_addr(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}

/// Moves forwarded publishes from the link to the service.
async fn pump(mut link_rx: LinkRx, tx: mpsc::Sender<Inbound>) {
    loop {
        match link_rx.next().await {
            Ok(Some(Notification::Forward(forward))) => {
                let message = Message {
                    topic: String::from_utf8_lossy(&forward.publish.topic).into_owned(),
                    payload: forward.publish.payload,
                    ack: AckToken::None,
                };
                if tx.send(Inbound::Message(message)).await.is_err() {
                    return;
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                // The router paused us because the link buffer was full; we drained it.
                if let Err(e) = link_rx.wake().await {
                    let _ = tx
                        .send(Inbound::Closed(format!("link wake failed: {e}")))
                        .await;
                    return;
                }
            }
            // Acks for our own publishes, or a wake-up with nothing new.
            Ok(_) => {}
            Err(e) => {
                let _ = tx
                    .send(Inbound::Closed(format!(
                        "link to the embedded broker closed: {e}"
                    )))
                    .await;
                return;
            }
        }
    }
}
