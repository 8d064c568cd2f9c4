//! Connection to an external broker (mosquitto, EMQX, ...) with rumqttc.
//!
//! The session is persistent (`clean_session = false`, stable client id), so the broker keeps
//! our subscriptions and queues QoS 1 messages while the coordinator is down. Acks are manual:
//! a message is acknowledged only after the service has journaled and stored it, so a crash
//! before that makes the broker redeliver it (and the seen-id set drops the copy if it was
//! already processed).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ClientError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport as MqttTransport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{AckToken, Inbound, Message, TransportError};
use crate::config::MqttConfig;

/// Requests the client queue can hold before we defer; far above one batch of acks.
const REQUEST_CAPACITY: usize = 1024;
/// QoS 1 publishes in flight to the broker (rumqttc's default is 100): the coordinator is
/// one client publishing for a whole fleet (end-to-end acks, commands, chunks), and at 100
/// its queue stayed backed up for minutes under 10,000 devices' acks.
const OUTGOING_INFLIGHT: u16 = 1000;
/// The trust store used when no CA file is configured.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// How long a clean disconnect may take at shutdown.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A publish the client's queue had no room for.
#[derive(Debug)]
struct Deferred {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

impl Deferred {
    /// About what it takes on the wire, bytes.
    fn wire_bytes(&self) -> usize {
        7 + self.topic.len() + self.payload.len()
    }
}

/// What a broker ack (PUBACK) takes on the wire, bytes.
const ACK_WIRE_BYTES: usize = 4;

/// Connected (or reconnecting) client and its pump task.
pub struct External {
    broker: String,
    client: AsyncClient,
    deferred: VecDeque<Deferred>,
    /// Broker acks for messages we processed, deferred too but sent before any publish: the
    /// broker lets a subscriber have only so many unacknowledged messages (mosquitto: 20), so
    /// an ack queued behind megabytes of publishes (acks to 10,000 devices, chunks) would
    /// stop everything coming in, the end-to-end acks devices wait for included.
    deferred_acks: VecDeque<u16>,
    /// The sum of `deferred`'s [`Deferred::wire_bytes`] and [`ACK_WIRE_BYTES`] per deferred
    /// ack.
    deferred_bytes: usize,
    stopping: Arc<AtomicBool>,
    pump: JoinHandle<()>,
}

/// What the pump needs to subscribe and reconnect.
struct PumpConfig {
    filters: Vec<String>,
    reconnect_min: Duration,
    reconnect_max: Duration,
    broker: String,
}

impl External {
    /// Builds the client and starts the pump; connecting happens in the background (the
    /// service learns about it through [`Inbound::Connected`] and [`Inbound::Subscribed`]).
    pub fn start(
        config: &MqttConfig,
        tls: bool,
        host: &str,
        port: u16,
        filters: Vec<String>,
        will: (String, Vec<u8>),
        tx: mpsc::Sender<Inbound>,
    ) -> Result<External, TransportError> {
        let mut options = MqttOptions::new(config.client_id.clone(), host, port);
        options
            .set_keep_alive(Duration::from_secs(config.keepalive_s.max(1)))
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_inflight(OUTGOING_INFLIGHT)
            .set_max_packet_size(config.max_packet_bytes, config.max_packet_bytes)
            .set_last_will(LastWill::new(will.0, will.1, QoS::AtLeastOnce, true));
        if !config.username.is_empty() {
            options.set_credentials(config.username.clone(), config.password.clone());
        }
        if tls {
            options.set_transport(MqttTransport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls_config(config)?),
            )));
        }
        let broker = format!("{}://{host}:{port}", if tls { "mqtts" } else { "mqtt" });
        let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        let stopping = Arc::new(AtomicBool::new(false));
        let pump_config = PumpConfig {
            filters,
            reconnect_min: Duration::from_millis(config.reconnect_min_ms),
            reconnect_max: Duration::from_millis(config.reconnect_max_ms),
            broker: broker.clone(),
        };
        let pump = tokio::spawn(pump(
            eventloop,
            client.clone(),
            pump_config,
            tx,
            stopping.clone(),
        ));
        Ok(External {
            broker,
            client,
            deferred: VecDeque::new(),
            deferred_acks: VecDeque::new(),
            deferred_bytes: 0,
            stopping,
            pump,
        })
    }

    /// `mqtt[s]://host:port`, without credentials.
    pub fn broker(&self) -> &str {
        &self.broker
    }

    /// Queues a QoS 1 publish (retained or not); deferred while the client's queue is full.
    pub fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) {
        let request = Deferred {
            topic: topic.to_owned(),
            payload,
            retain,
        };
        self.deferred_bytes += request.wire_bytes();
        self.deferred.push_back(request);
        self.retry_deferred();
    }

    pub fn ack(&mut self, pkid: u16) {
        self.deferred_bytes += ACK_WIRE_BYTES;
        self.deferred_acks.push_back(pkid);
        self.retry_deferred();
    }

    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty() || !self.deferred_acks.is_empty()
    }

    /// What the requests waiting for room in the client's queue take on the wire, bytes.
    pub fn deferred_bytes(&self) -> usize {
        self.deferred_bytes
    }

    /// Sends queued requests until the client's queue is full: acks first, then publishes in
    /// order.
    pub fn retry_deferred(&mut self) {
        let client = &self.client;
        let bytes = &mut self.deferred_bytes;
        let acks_sent = drain(
            &mut self.deferred_acks,
            bytes,
            |_| ACK_WIRE_BYTES,
            |&pkid| {
                let mut publish = rumqttc::Publish::new("", QoS::AtLeastOnce, Vec::<u8>::new());
                publish.pkid = pkid;
                client.try_ack(&publish)
            },
        );
        if acks_sent {
            drain(&mut self.deferred, bytes, Deferred::wire_bytes, |r| {
                client.try_publish(
                    r.topic.as_str(),
                    QoS::AtLeastOnce,
                    r.retain,
                    r.payload.clone(),
                )
            });
        }
    }

    /// Flushes what is queued, disconnects cleanly and waits briefly for the pump to send it.
    pub async fn shutdown(mut self) {
        self.retry_deferred();
        self.stopping.store(true, Ordering::SeqCst);
        if self.client.try_disconnect().is_err() {
            tracing::warn!(broker = %self.broker, "could not queue the disconnect; the broker will publish our will");
        }
        if tokio::time::timeout(DISCONNECT_TIMEOUT, &mut self.pump)
            .await
            .is_err()
        {
            tracing::warn!(broker = %self.broker, "disconnect did not complete in time");
            self.pump.abort();
        }
    }
}

fn tls_config(config: &MqttConfig) -> Result<rustls::ClientConfig, TransportError> {
    // Harmless if already installed (the binary does it at start-up); needed when the library
    // is used on its own.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_path = if config.ca_file.as_os_str().is_empty() {
        Path::new(SYSTEM_CA_BUNDLE)
    } else {
        &config.ca_file
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = read_certs("CA file", ca_path)?;
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TransportError::Tls(format!(
            "no usable CA certificate in {}",
            ca_path.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    if config.cert_file.as_os_str().is_empty() {
        return Ok(builder.with_no_client_auth());
    }
    let chain = read_certs("client certificate", &config.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file).map_err(|e| {
        TransportError::Tls(format!(
            "no private key in {}: {e}",
            config.key_file.display()
        ))
    })?;
    builder.with_client_auth_cert(chain, key).map_err(|e| {
        TransportError::Tls(format!(
            "client certificate {} rejected: {e}",
            config.cert_file.display()
        ))
    })
}

fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let bytes = std::fs::read(path).map_err(|error| TransportError::TlsFile {
        what,
        path: path.to_owned(),
        error,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TransportError::Tls(format!("bad PEM in {what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TransportError::Tls(format!(
            "no certificate in {what} {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// Drives the event loop: subscribes on every (re)connection, forwards publishes, and
/// reconnects with capped exponential backoff after errors.
async fn pump(
    mut eventloop: EventLoop,
    client: AsyncClient,
    config: PumpConfig,
    tx: mpsc::Sender<Inbound>,
    stopping: Arc<AtomicBool>,
) {
    let mut backoff = config.reconnect_min;
    // After the service has gone, keep polling only to flush the disconnect.
    let mut service_gone = false;
    let mut connects = 0u64;
    let mut relay = Relay::start(tx);
    let filters: Vec<SubscribeFilter> = config
        .filters
        .iter()
        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
        .collect();
    loop {
        let inbound = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = config.reconnect_min;
                if ack.session_present || connects == 0 {
                    tracing::info!(broker = %config.broker, session_present = ack.session_present, "connected to broker");
                } else {
                    // What devices published while we were away was queued in that session;
                    // the broker dropped it (restarted without persistence, or could not save
                    // it). Devices keep every message until our end-to-end ack, so they send it
                    // again: a resend, not a loss.
                    tracing::warn!(broker = %config.broker, "reconnected to broker without our session (session_present=false): it lost the messages queued for us while we were away; devices resend what we have not acknowledged");
                }
                connects += 1;
                // Resubscribing an existing persistent session is harmless and makes the broker
                // resend retained device statuses, which the core treats as redeliveries.
                // The queue holds 1024 requests, so this only fails if acks piled up; a
                // persistent session keeps the previous subscriptions anyway.
                if client.try_subscribe_many(filters.clone()).is_err() {
                    tracing::warn!(broker = %config.broker, "could not queue subscriptions; relying on the persistent session");
                }
                Some(Inbound::Connected {
                    session_present: ack.session_present,
                })
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                for (filter, code) in config.filters.iter().zip(&ack.return_codes) {
                    if *code == SubscribeReasonCode::Failure {
                        // Not recoverable by retrying: the broker's ACL refuses us.
                        tracing::error!(broker = %config.broker, %filter, "broker refused the subscription");
                    }
                }
                Some(Inbound::Subscribed)
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let ack = if p.qos == QoS::AtMostOnce {
                    AckToken::None
                } else {
                    AckToken::Mqtt { pkid: p.pkid }
                };
                Some(Inbound::Message(Message {
                    topic: p.topic,
                    payload: p.payload,
                    ack,
                }))
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) if stopping.load(Ordering::SeqCst) => return,
            Ok(_) => None,
            Err(e) => {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                tracing::warn!(broker = %config.broker, error = %e, retry_in_ms = backoff.as_millis() as u64, "broker connection failed; retrying");
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(config.reconnect_max);
                None
            }
        };
        if let Some(inbound) = inbound.filter(|_| !service_gone) {
            service_gone = relay.send(inbound).is_err();
        }
    }
}

/// The pump's side of the channel to the service. It never waits: while the pump waits,
/// rumqttc's event loop is not polled, so nothing is written to or read from the socket, the
/// broker's PINGRESP goes unread, and the connection drops on "Last pingreq isn't acked"
/// (seen at 10,000 devices, with mosquitto then redelivering the whole session). What the
/// service has not taken yet waits in a queue of its own, relayed by a task that does wait.
///
/// That queue is bounded by the broker for QoS 1: with manual acks it sends at most its
/// in-flight window (mosquitto: 20) before we acknowledge. QoS 0 has no such bound, so beyond
/// [`QOS0_BACKLOG`] waiting QoS 0 messages are dropped, which at most once allows.
struct Relay {
    tx: mpsc::UnboundedSender<Inbound>,
    qos0_waiting: Arc<AtomicUsize>,
    qos0_dropped: u64,
}

/// QoS 0 messages that may wait for the service before more are dropped.
const QOS0_BACKLOG: usize = 4 * super::CHANNEL_CAPACITY;

impl Relay {
    fn start(service: mpsc::Sender<Inbound>) -> Relay {
        let (tx, mut rx) = mpsc::unbounded_channel::<Inbound>();
        let qos0_waiting = Arc::new(AtomicUsize::new(0));
        let waiting = qos0_waiting.clone();
        tokio::spawn(async move {
            while let Some(inbound) = rx.recv().await {
                if is_qos0(&inbound) {
                    waiting.fetch_sub(1, Ordering::Relaxed);
                }
                if service.send(inbound).await.is_err() {
                    return; // dropping `rx` tells the pump
                }
            }
        });
        Relay {
            tx,
            qos0_waiting,
            qos0_dropped: 0,
        }
    }

    /// Err when the service has gone.
    fn send(&mut self, inbound: Inbound) -> Result<(), ()> {
        if is_qos0(&inbound) {
            if self.qos0_waiting.load(Ordering::Relaxed) >= QOS0_BACKLOG {
                self.qos0_dropped += 1;
                if self.qos0_dropped.is_power_of_two() {
                    tracing::warn!(
                        dropped = self.qos0_dropped,
                        backlog = QOS0_BACKLOG,
                        "service behind: QoS 0 messages dropped"
                    );
                }
                return Ok(());
            }
            self.qos0_waiting.fetch_add(1, Ordering::Relaxed);
        }
        self.tx.send(inbound).map_err(|_| ())
    }
}

fn is_qos0(inbound: &Inbound) -> bool {
    matches!(
        inbound,
        Inbound::Message(Message {
            ack: AckToken::None,
            ..
        })
    )
}

/// Sends from the front of `queue`, taking each sent one's size off `bytes`, until it is empty
/// (true) or the client's queue is full or gone (false; a full one is retried later, a gone
/// one means shutting down: nothing left to send to).
fn drain<T>(
    queue: &mut VecDeque<T>,
    bytes: &mut usize,
    size: impl Fn(&T) -> usize,
    send: impl Fn(&T) -> Result<(), ClientError>,
) -> bool {
    while let Some(request) = queue.front() {
        if send(request).is_err() {
            return false;
        }
        *bytes -= size(request);
        queue.pop_front();
    }
    true
}

/// Between half and all of `d`, so coordinator replicas that lost the broker together do not
/// reconnect in lockstep. The clock's low bits are random enough for that.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let half = d / 2;
    half + Duration::from_nanos(u64::from(nanos) % (half.as_nanos() as u64).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds() {
        for ms in [1, 200, 30_000] {
            let d = Duration::from_millis(ms);
            let j = jitter(d);
            assert!(j >= d / 2 && j <= d, "{j:?} for {d:?}");
        }
    }

    fn message(ack: AckToken) -> Inbound {
        Inbound::Message(Message {
            topic: "edge/v1/d1/telemetry".into(),
            payload: Vec::new().into(),
            ack,
        })
    }

    /// The pump hands messages over without waiting for a service that is behind; what waits
    /// is every QoS 1 message and at most QOS0_BACKLOG QoS 0 ones, each taken in order.
    #[tokio::test]
    async fn a_service_behind_never_stops_the_pump_and_loses_no_qos1() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut relay = Relay::start(tx);
        let n = QOS0_BACKLOG + 500;
        for pkid in 1..=n as u16 {
            relay
                .send(message(AckToken::Mqtt { pkid }))
                .expect("service there");
            relay.send(message(AckToken::None)).expect("service there");
        }
        // (The test's runtime runs the relay task only once this one waits.)
        assert_eq!(relay.qos0_dropped, 500);
        drop(relay);
        let (mut pkids, mut qos0) = (Vec::new(), 0);
        while let Some(inbound) = rx.recv().await {
            match inbound {
                Inbound::Message(Message {
                    ack: AckToken::Mqtt { pkid },
                    ..
                }) => pkids.push(pkid),
                _ => qos0 += 1,
            }
        }
        assert_eq!(pkids, (1..=n as u16).collect::<Vec<_>>());
        assert_eq!(qos0, QOS0_BACKLOG);
    }

    #[test]
    fn missing_tls_files_are_named() {
        let config = MqttConfig {
            ca_file: "/nonexistent/ca.pem".into(),
            ..MqttConfig::default()
        };
        let err = tls_config(&config).expect_err("refused").to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
