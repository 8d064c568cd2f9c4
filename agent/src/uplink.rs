//! MQTT uplink: drains the outbox to the broker and keeps the device's online status.
//!
//! Each connection attempt gets a fresh rumqttc client and event loop with a clean session:
//! the outbox, not rumqttc's in-memory state, is the source of truth, so after a reconnect
//! every unacknowledged message is simply sent again from the outbox (the coordinator drops
//! the duplicates by message id). A message leaves the outbox only on its PUBACK.
//!
//! rumqttc reports `Outgoing::Publish(pkid)` in the order publishes were handed to it, which
//! is how a PUBACK's packet id is mapped back to an outbox key ([`SendWindow`]).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protocol::v1::{self, Class, Envelope, Status, topics};
use rand::Rng;
use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, LastWill, MqttOptions, Outgoing, QoS, Transport,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::watch;

use crate::inbox::{Inbox, Incoming as InboxMessage};
use crate::link::{Direct, DirectReceiver, LinkSender, LinkState};
use crate::outbox::{Key, Outbox, Stored};
use crate::setting::InvalidSetting;

/// `[mqtt]`: the broker connection.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker address, `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
    pub url: String,
    /// Seconds between keepalive pings.
    pub keepalive_s: u64,
    /// Username; empty sends no credentials.
    pub username: String,
    /// Password sent with `username`.
    pub password: String,
    /// PEM CA bundle for mqtts; empty uses the system trust store.
    pub ca_file: PathBuf,
    /// PEM client certificate for mutual TLS.
    pub cert_file: PathBuf,
    /// PEM private key for mutual TLS.
    pub key_file: PathBuf,
    /// First reconnect delay, milliseconds.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, milliseconds.
    pub reconnect_max_ms: u64,
    /// QoS 1 publishes in flight before waiting for PUBACKs.
    pub inflight: u16,
    /// Largest MQTT packet accepted from the broker, bytes.
    pub max_packet_bytes: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: "mqtt://127.0.0.1:1883".into(),
            keepalive_s: 30,
            username: String::new(),
            password: String::new(),
            ca_file: PathBuf::new(),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            reconnect_min_ms: 200,
            reconnect_max_ms: 30_000,
            inflight: 64,
            max_packet_bytes: 131_072,
        }
    }
}

impl MqttConfig {
    /// Checks the values serde cannot; the message names the key (`mqtt.KEY`).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        BrokerAddr::parse(&self.url).map_err(|e| format!("mqtt.url: {e}"))?;
        if self.cert_file.as_os_str().is_empty() != self.key_file.as_os_str().is_empty() {
            return Err("mqtt.cert_file and mqtt.key_file must be set together".into());
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            return Err(
                "mqtt.reconnect_min_ms must be at least 1 and at most mqtt.reconnect_max_ms".into(),
            );
        }
        if self.keepalive_s < 5 {
            return Err("mqtt.keepalive_s must be at least 5".into());
        }
        if self.inflight == 0 {
            return Err("mqtt.inflight must be at least 1".into());
        }
        if self.max_packet_bytes < 16 * 1024 {
            return Err("mqtt.max_packet_bytes must be at least 16384".into());
        }
        Ok(())
    }
}

/// Parsed `mqtt.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerAddr {
    pub fn parse(url: &str) -> Result<BrokerAddr, BrokerAddrError> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(BrokerAddrError::Scheme(url.to_owned()));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>().map_err(|_| BrokerAddrError::Port {
                    url: url.to_owned(),
                    port: p.to_owned(),
                })?,
            ),
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(BrokerAddrError::Host(url.to_owned()));
        }
        Ok(BrokerAddr {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

/// Why `mqtt.url` is not a broker address; each names the url.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerAddrError {
    #[error("{0:?} must start with mqtt:// or mqtts://")]
    Scheme(String),
    #[error("{url:?} has an invalid port {port:?}")]
    Port { url: String, port: String },
    #[error("{0:?} has no valid host")]
    Host(String),
}

/// Why the uplink cannot hand the next outbox message to the MQTT client; ends the session.
#[derive(Debug, thiserror::Error)]
enum FillError {
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
    #[error("mqtt client queue: {0}")]
    Client(#[from] rumqttc::ClientError),
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("cannot read TLS file {path}: {source}")]
    TlsFile {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid TLS setup: {0}")]
    Tls(String),
    #[error("mqtt.url: {0}")]
    Url(#[from] BrokerAddrError),
}

/// Live counters for logs and debugging; whether the link is up is the [`LinkState`] watch.
#[derive(Debug, Default)]
pub struct UplinkStats {
    pub published: AtomicU64,
    pub malformed_incoming: AtomicU64,
    /// Direct (QoS 0, not from the outbox) publishes written, and dropped (expired, offline
    /// or the client queue full).
    pub direct_sent: AtomicU64,
    pub direct_dropped: AtomicU64,
}

/// Tracks publishes handed to rumqttc until their PUBACK. No I/O.
#[derive(Debug)]
pub struct SendWindow {
    capacity: usize,
    /// Last seq handed out per class during this connection.
    cursors: [Option<u64>; 4],
    /// Publishes handed to rumqttc, not yet reported as written; `None` for non-outbox ones.
    unsent: VecDeque<Option<Key>>,
    /// Written publishes awaiting PUBACK, by packet id.
    inflight: HashMap<u16, Key>,
}

impl SendWindow {
    pub fn new(capacity: usize) -> Self {
        SendWindow {
            capacity,
            cursors: [None; 4],
            unsent: VecDeque::new(),
            inflight: HashMap::new(),
        }
    }

    pub fn has_room(&self) -> bool {
        self.unsent.iter().filter(|k| k.is_some()).count() + self.inflight.len() < self.capacity
    }

    pub fn cursor(&self, class: Class) -> Option<u64> {
        self.cursors[class.index()]
    }

    /// An outbox message was handed to the client.
    pub fn handed(&mut self, key: Key) {
        self.cursors[key.class.index()] = Some(key.seq);
        self.unsent.push_back(Some(key));
    }

    /// A publish that is not from the outbox (status) was handed to the client.
    pub fn handed_other(&mut self) {
        self.unsent.push_back(None);
    }

    /// The client wrote the next publish with this packet id.
    pub fn written(&mut self, pkid: u16) {
        if let Some(Some(key)) = self.unsent.pop_front() {
            self.inflight.insert(pkid, key);
        }
    }

    /// The broker acknowledged `pkid`: the outbox key to remove, if it was ours.
    pub fn acked(&mut self, pkid: u16) -> Option<Key> {
        self.inflight.remove(&pkid)
    }
}

pub struct Uplink {
    pub cfg: MqttConfig,
    pub device: String,
    pub agent_version: String,
    pub outbox: Arc<Outbox>,
    pub stats: Arc<UplinkStats>,
    /// Where incoming messages go; its filters are subscribed on every connection.
    inbox: Inbox,
    /// Tells the rest of the agent when the connection comes and goes.
    link: LinkSender,
    /// QoS 0 publishes that skip the outbox (offload requests): written while connected,
    /// dropped once expired.
    direct: Option<DirectReceiver>,
    tls: Option<Arc<rustls::ClientConfig>>,
    addr: BrokerAddr,
}

/// The shared pieces `agent::run` creates and hands to the uplink.
#[derive(Debug)]
pub struct Links {
    /// Incoming messages are delivered here; its filters are subscribed on every connection.
    pub inbox: Inbox,
    /// The uplink publishes every connection change on it.
    pub link: LinkSender,
    /// The receiving end of the direct path, if any part sends on it.
    pub direct: Option<DirectReceiver>,
}

impl Uplink {
    pub fn new(
        cfg: MqttConfig,
        device: String,
        agent_version: String,
        outbox: Arc<Outbox>,
        links: Links,
    ) -> Result<Uplink, UplinkError> {
        let addr = BrokerAddr::parse(&cfg.url)?;
        let tls = if addr.tls {
            Some(Arc::new(tls_config(&cfg)?))
        } else {
            None
        };
        Ok(Uplink {
            cfg,
            device,
            agent_version,
            outbox,
            stats: Arc::default(),
            inbox: links.inbox,
            link: links.link,
            direct: links.direct,
            tls,
            addr,
        })
    }

    fn options(&self, since_ms: u64) -> MqttOptions {
        let mut o = MqttOptions::new(
            format!("edge-agent-{}", self.device),
            &self.addr.host,
            self.addr.port,
        );
        o.set_keep_alive(Duration::from_secs(self.cfg.keepalive_s))
            .set_clean_session(true)
            .set_inflight(self.cfg.inflight)
            .set_request_channel_capacity(self.cfg.inflight as usize * 2 + 16)
            .set_max_packet_size(self.cfg.max_packet_bytes, v1::MAX_PAYLOAD_BYTES + 4096)
            .set_last_will(LastWill::new(
                topics::status(&self.device),
                self.status(false, since_ms),
                QoS::AtLeastOnce,
                true,
            ));
        if !self.cfg.username.is_empty() {
            o.set_credentials(&self.cfg.username, &self.cfg.password);
        }
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        o
    }

    fn status(&self, online: bool, since_ms: u64) -> Vec<u8> {
        Status {
            v: v1::VERSION,
            device: self.device.clone(),
            online,
            since_ms,
            agent_version: self.agent_version.clone(),
        }
        .to_json()
    }

    /// Runs until `shutdown` turns true: connect, drain, reconnect with jittered backoff.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut attempt: u32 = 0;
        let mut direct = self.direct.take();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let since_ms = v1::now_ms();
            let (client, eventloop) =
                AsyncClient::new(self.options(since_ms), self.cfg.inflight as usize * 2 + 16);
            let outcome = self
                .session(&client, eventloop, since_ms, &mut shutdown, &mut direct)
                .await;
            self.link
                .send_if_modified(|l| std::mem::replace(&mut l.connected, false));
            match outcome {
                SessionEnd::Shutdown => return,
                SessionEnd::Lost {
                    was_connected,
                    error,
                } => {
                    if was_connected {
                        attempt = 0;
                        tracing::warn!(broker = %self.cfg.url, error = %error, "uplink disconnected; outbox keeps queueing");
                    } else if attempt == 0 || attempt.is_multiple_of(10) {
                        tracing::warn!(broker = %self.cfg.url, error = %error, attempt, "broker unreachable; outbox keeps queueing");
                    } else {
                        tracing::debug!(broker = %self.cfg.url, error = %error, attempt, "connect failed");
                    }
                }
            }
            let delay = backoff(
                self.cfg.reconnect_min_ms,
                self.cfg.reconnect_max_ms,
                attempt,
            );
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn session(
        &self,
        client: &AsyncClient,
        mut eventloop: EventLoop,
        since_ms: u64,
        shutdown: &mut watch::Receiver<bool>,
        direct: &mut Option<DirectReceiver>,
    ) -> SessionEnd {
        let mut window = SendWindow::new(self.cfg.inflight as usize);
        let mut connected = false;
        // Filters subscribed on this connection (clean session: none at connect).
        let mut subscribed = BTreeSet::new();
        loop {
            if connected
                && window.has_room()
                && let Err(e) = self.fill(client, &mut window)
            {
                return SessionEnd::Lost {
                    was_connected: true,
                    error: e.to_string(),
                };
            }
            let idle = connected && window.has_room();
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if connected {
                        self.goodbye(client, eventloop, since_ms).await;
                    }
                    return SessionEnd::Shutdown;
                }
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                        connected = true;
                        self.link.send_modify(|l| {
                            *l = LinkState {
                                connected: true,
                                session_present: ack.session_present,
                                connects: l.connects + 1,
                            }
                        });
                        let st = self.outbox.stats();
                        tracing::info!(broker = %self.cfg.url, code = ?ack.code, queued = st.depth.iter().sum::<u64>(), "uplink connected");
                        let online = self.status(true, since_ms);
                        if client.try_publish(topics::status(&self.device), QoS::AtLeastOnce, true, online).is_ok() {
                            window.handed_other();
                        }
                        let _ = client.try_subscribe(topics::cmd(&self.device, "#"), QoS::AtLeastOnce);
                        self.sync_subscriptions(client, &mut subscribed);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => window.written(pkid),
                    Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                        if let Some(key) = window.acked(ack.pkid) {
                            self.outbox.ack(key);
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => self.on_publish(p),
                    Ok(_) => {}
                    Err(e) => return SessionEnd::Lost { was_connected: connected, error: e.to_string() },
                },
                _ = self.outbox.notified(), if idle => {}
                _ = self.inbox.changed(), if connected => self.sync_subscriptions(client, &mut subscribed),
                Some(d) = next_direct(direct), if connected => {
                    if d.expires <= std::time::Instant::now() {
                        self.stats.direct_dropped.fetch_add(1, Ordering::Relaxed);
                    } else if client.try_publish(d.topic, QoS::AtMostOnce, false, d.payload).is_ok() {
                        // QoS 0 publishes are reported written too (packet id 0).
                        window.handed_other();
                        self.stats.direct_sent.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.stats.direct_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Hands outbox messages to the client, highest class first, until the window is full.
    fn fill(&self, client: &AsyncClient, window: &mut SendWindow) -> Result<(), FillError> {
        for class in Class::ALL {
            while window.has_room() {
                let Some(stored) = self.outbox.next_in_class(class, window.cursor(class))? else {
                    break;
                };
                let key = stored.key;
                match self.frame(&stored) {
                    Some(payload) => {
                        client.try_publish(
                            &stored.record.topic,
                            QoS::AtLeastOnce,
                            false,
                            payload,
                        )?;
                        window.handed(key);
                        self.stats.published.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        // Cannot be sent as stored; skip it so the queue keeps moving.
                        window.handed_skip(key);
                        self.outbox.ack(key);
                    }
                }
            }
            if !window.has_room() {
                break;
            }
        }
        Ok(())
    }

    /// Wraps a stored body in the wire envelope (binary bodies in the binary envelope).
    fn frame(&self, s: &Stored) -> Option<Vec<u8>> {
        let id = v1::message_id(self.outbox.incarnation(), s.key.seq);
        if let Some((kind, bytes)) = crate::outbox::binary_body(&s.record.body) {
            let env = v1::binary::BinaryEnvelope {
                id,
                device: self.device.clone(),
                class: s.key.class,
                seq: s.key.seq,
                created_ms: s.record.created_ms,
                kind: kind.to_owned(),
                body: bytes.to_vec(),
            };
            return match env.encode() {
                Ok(p) if p.len() <= v1::MAX_PAYLOAD_BYTES => Some(p),
                Ok(p) => {
                    tracing::error!(class = %s.key.class, seq = s.key.seq, size = p.len(), "dropping binary outbox message over the wire limit");
                    None
                }
                Err(e) => {
                    tracing::error!(class = %s.key.class, seq = s.key.seq, error = %e, "dropping binary outbox message that cannot be framed");
                    None
                }
            };
        }
        let body = match std::str::from_utf8(&s.record.body)
            .ok()
            .and_then(|b| RawValue::from_string(b.to_owned()).ok())
        {
            Some(b) => b,
            None => {
                tracing::error!(class = %s.key.class, seq = s.key.seq, "dropping outbox message whose body is not json");
                return None;
            }
        };
        let env = Envelope {
            v: v1::VERSION,
            id,
            device: self.device.clone(),
            class: s.key.class,
            seq: s.key.seq,
            created_ms: s.record.created_ms,
            body,
        };
        let payload = env.to_json();
        if payload.len() > v1::MAX_PAYLOAD_BYTES {
            tracing::error!(class = %s.key.class, seq = s.key.seq, size = payload.len(), "dropping outbox message over the wire limit");
            return None;
        }
        Some(payload)
    }

    /// Subscribes to inbox filters not yet subscribed on this connection, unsubscribes from
    /// the ones nobody wants any more.
    fn sync_subscriptions(&self, client: &AsyncClient, subscribed: &mut BTreeSet<String>) {
        let wanted = self.inbox.filters();
        for f in wanted.difference(subscribed) {
            if let Err(e) = client.try_subscribe(f.as_str(), QoS::AtLeastOnce) {
                tracing::warn!(filter = %f, error = %e, "subscribe not queued");
            }
        }
        for f in subscribed.difference(&wanted) {
            let _ = client.try_unsubscribe(f.as_str());
        }
        *subscribed = wanted;
    }

    fn on_publish(&self, p: rumqttc::Publish) {
        let topic = p.topic;
        if matches!(topics::parse(&topic), Some(topics::DeviceTopic::Cmd { .. })) {
            return self.on_command(&topic, &p.payload);
        }
        let matched = self.inbox.deliver(InboxMessage {
            topic,
            payload: p.payload,
            retain: p.retain,
        });
        if matched == 0 {
            tracing::debug!("incoming message matched no subscription");
        }
    }

    fn on_command(&self, topic: &str, payload: &[u8]) {
        let Some(topics::DeviceTopic::Cmd { name, .. }) = topics::parse(topic) else {
            self.stats
                .malformed_incoming
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic, "dropping message on an unexpected topic");
            return;
        };
        match Envelope::<serde_json::Value>::from_json(payload, topics::COORDINATOR)
            .or_else(|_| Envelope::<serde_json::Value>::from_json(payload, &self.device))
        {
            Ok(env) => {
                tracing::info!(command = %name, id = %env.id, "command received; no handler in this version")
            }
            Err(e) => {
                self.stats
                    .malformed_incoming
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(topic, size = payload.len(), error = %e, "dropping malformed command");
            }
        }
    }

    /// Clean shutdown: retained offline status, then disconnect, waiting briefly for both.
    async fn goodbye(&self, client: &AsyncClient, mut eventloop: EventLoop, since_ms: u64) {
        let _ = client.try_publish(
            topics::status(&self.device),
            QoS::AtLeastOnce,
            true,
            self.status(false, since_ms),
        );
        let _ = client.try_disconnect();
        let drain = async {
            while let Ok(ev) = eventloop.poll().await {
                if let Event::Outgoing(Outgoing::Disconnect) = ev {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }
}

impl SendWindow {
    /// Advances the cursor past a message that was dropped instead of sent.
    pub fn handed_skip(&mut self, key: Key) {
        self.cursors[key.class.index()] = Some(key.seq);
    }
}

/// The next direct publish; never resolves without a direct path.
async fn next_direct(direct: &mut Option<DirectReceiver>) -> Option<Direct> {
    match direct {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

enum SessionEnd {
    Shutdown,
    Lost { was_connected: bool, error: String },
}

/// Exponential backoff with jitter: uniform between `min` and `min * 2^attempt` (capped at
/// `max`), so a fleet that lost its broker at once spreads its reconnects.
pub fn backoff(min_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let cap = min_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(max_ms)
        .max(min_ms);
    Duration::from_millis(rand::thread_rng().gen_range(min_ms..=cap))
}

fn tls_config(cfg: &MqttConfig) -> Result<rustls::ClientConfig, UplinkError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| UplinkError::TlsFile {
            path: p.display().to_string(),
            source,
        })
    };
    let ca_path = if cfg.ca_file.as_os_str().is_empty() {
        std::path::PathBuf::from("/etc/ssl/certs/ca-certificates.crt")
    } else {
        cfg.ca_file.clone()
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read(&ca_path)?) {
        let cert = cert.map_err(|e| UplinkError::Tls(format!("{}: {e}", ca_path.display())))?;
        roots
            .add(cert)
            .map_err(|e| UplinkError::Tls(format!("{}: {e}", ca_path.display())))?;
    }
    if roots.is_empty() {
        return Err(UplinkError::Tls(format!(
            "{} holds no certificates",
            ca_path.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UplinkError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    if cfg.cert_file.as_os_str().is_empty() {
        return Ok(builder.with_no_client_auth());
    }
    let certs = CertificateDer::pem_slice_iter(&read(&cfg.cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| UplinkError::Tls(format!("{}: {e}", cfg.cert_file.display())))?;
    let key = PrivateKeyDer::from_pem_slice(&read(&cfg.key_file)?)
        .map_err(|e| UplinkError::Tls(format!("{}: {e}", cfg.key_file.display())))?;
    builder
        .with_client_auth_cert(certs, key)
        .map_err(|e| UplinkError::Tls(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            BrokerAddr::parse("mqtt://broker.lan:1884").expect("ok"),
            BrokerAddr {
                tls: false,
                host: "broker.lan".into(),
                port: 1884
            }
        );
        assert_eq!(BrokerAddr::parse("mqtts://b").expect("ok").port, 8883);
        for bad in ["http://x", "mqtt://", "mqtt://h:99999", "mqtt://h:x"] {
            assert!(BrokerAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn window_maps_pkids_to_keys_in_order() {
        let k = |seq| Key {
            class: Class::Results,
            seq,
        };
        let mut w = SendWindow::new(2);
        w.handed_other();
        w.handed(k(1));
        w.handed(k(2));
        assert!(!w.has_room());
        w.written(1); // the status publish
        w.written(2);
        w.written(3);
        assert_eq!(w.acked(1), None);
        assert_eq!(w.acked(3), Some(k(2)));
        assert!(w.has_room());
        assert_eq!(w.acked(2), Some(k(1)));
        assert_eq!(w.cursor(Class::Results), Some(2));
        assert_eq!(w.cursor(Class::Control), None);
    }

    #[test]
    fn backoff_stays_in_bounds_and_grows() {
        for attempt in 0..40 {
            let d = backoff(100, 5_000, attempt).as_millis() as u64;
            assert!((100..=5_000).contains(&d), "{attempt}: {d}");
        }
        assert_eq!(backoff(100, 5_000, 0).as_millis(), 100);
    }
}
