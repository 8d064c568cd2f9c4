//! MQTT uplink: drains the outbox to the broker and keeps the device's online status.
//!
//! Each connection attempt gets a fresh rumqttc client and event loop with a clean session:
//! the outbox, not rumqttc's in-memory state, is the source of truth, so after a reconnect
//! every unacknowledged message is simply sent again from the outbox (the coordinator drops
//! the duplicates by message id).
//!
//! A message leaves the outbox only when the coordinator says it has durably committed it
//! (`protocol::v1::ack`, on `edge/v1/{device}/ack`), never on the broker's PUBACK alone: the
//! PUBACK paces the link, the coordinator's ack decides deletion, and what stays
//! unacknowledged is sent again ([`window`]). Each JSON envelope names `prev`, the previous
//! message of its class still held here, so the coordinator keeps each class in order even
//! when a broker drops messages in the middle.
//!
//! Authentication, per `Topic::auth_rule` (the one table, in `protocol::v1::auth`), against the
//! enrollment session (a watch; `None` until enrolled):
//! - Unenrolled: the enrollment request (already signed) is the only publish. Outbox messages
//!   wait in the outbox, direct publishes are dropped, no status and no last will.
//! - Enrolled: every outbox message and direct publish is sealed as it is handed to the client
//!   (`Session::seal`: MAC, epoch, a new counter per publish, resends included); the status and
//!   the will are sealed at the status counter. A connection made before enrollment has no
//!   will, so the session's arrival ends it cleanly and the next one (at once) carries it.
//! - Incoming ([`Ingress`]): coordinator MACs (offload responses, commands) are checked with the
//!   session's `down` key and a replay window, coordinator signatures (capacity adverts, the
//!   coordinator's status) with its key; the trailer is stripped before the inbox. Enrollment
//!   answers go to the enrollment part as they are, messages signed inside their own format
//!   (deployments, FL rounds) unchanged. Anything that fails is dropped, counted by reason
//!   ([`AuthStats`]) and logged at WARN at most once per reason per 10 s.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protocol::v1::auth::{self, ReplayWindow, Rule};
use protocol::v1::topics::Topic;
use protocol::v1::{self, Class, Envelope, Status, topics};
use rand::Rng;
use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, LastWill, MqttOptions, Outgoing, QoS, Transport,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::watch;

use crate::enrollment::{Session, SessionWatch};
use crate::inbox::{Inbox, Incoming as InboxMessage};
use crate::link::{AuthStats, Direct, DirectReceiver, EnrollReceiver, LinkSender, LinkState};
use crate::outbox::{Outbox, Stored};
use crate::setting::InvalidSetting;

pub mod window;
use window::SendWindow;

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
    /// Largest MQTT packet accepted from the broker, bytes; at least the largest message
    /// with its authentication trailer and the MQTT header (see [`MIN_PACKET_BYTES`]).
    pub max_packet_bytes: usize,
    /// Milliseconds a message the broker took may wait for the coordinator's end-to-end ack
    /// before it is sent again (doubling while none comes, up to 5 minutes; after an ack, 3x
    /// the time acks have been taking, between this and 4x this).
    pub ack_timeout_ms: u64,
    /// Messages sent but not yet acknowledged by the coordinator, at most; at least `inflight`.
    pub max_unacked: u32,
}

/// The smallest `mqtt.max_packet_bytes` that takes every message the coordinator may send:
/// the largest body, the longest authentication trailer, and room for topic and header.
pub const MIN_PACKET_BYTES: usize = v1::MAX_PAYLOAD_BYTES + auth::MAX_TRAILER_LEN + 1024;

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
            ack_timeout_ms: 10_000,
            max_unacked: 1024,
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
        if self.ack_timeout_ms < 100 {
            return Err("mqtt.ack_timeout_ms must be at least 100".into());
        }
        if self.max_unacked < u32::from(self.inflight) {
            return Err("mqtt.max_unacked must be at least mqtt.inflight".into());
        }
        if self.max_packet_bytes < MIN_PACKET_BYTES {
            return Err(format!(
                "mqtt.max_packet_bytes must be at least {MIN_PACKET_BYTES} (the largest message, its authentication trailer and the MQTT header)"
            )
            .into());
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
    /// Enrollment requests written, and dropped (offline when they came).
    pub enroll_sent: AtomicU64,
    pub enroll_dropped: AtomicU64,
    /// End-to-end acks received, and the messages they let the outbox delete.
    pub acks: AtomicU64,
    pub committed: AtomicU64,
    /// Rewinds: ack timeouts and resend hints.
    pub resends: AtomicU64,
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
    /// QoS 0 publishes that skip the outbox (offload requests): written while connected and
    /// enrolled, dropped once expired.
    direct: Option<DirectReceiver>,
    /// The enrollment session: what to seal with, and whether to send at all.
    session: SessionWatch,
    /// Enrollment requests, published as they are.
    enroll: Option<EnrollReceiver>,
    /// Incoming messages dropped by reason.
    auth: Arc<AuthStats>,
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
    /// The enrollment session (`None` until enrolled).
    pub session: SessionWatch,
    /// The receiving end of the enrollment-request path.
    pub enroll: Option<EnrollReceiver>,
    /// Where incoming messages that do not authenticate are counted.
    pub auth: Arc<AuthStats>,
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
            session: links.session,
            enroll: links.enroll,
            auth: links.auth,
            tls,
            addr,
        })
    }

    /// Connection options; the last will only with a session to seal it (an unenrolled device
    /// publishes no status).
    fn options(&self, since_ms: u64, session: Option<&Session>) -> MqttOptions {
        let mut o = MqttOptions::new(
            format!("edge-agent-{}", self.device),
            &self.addr.host,
            self.addr.port,
        );
        o.set_keep_alive(Duration::from_secs(self.cfg.keepalive_s))
            .set_clean_session(true)
            .set_inflight(self.cfg.inflight)
            .set_request_channel_capacity(self.cfg.inflight as usize * 2 + 16)
            .set_max_packet_size(
                self.cfg.max_packet_bytes,
                v1::MAX_PAYLOAD_BYTES + auth::MAX_TRAILER_LEN + 4096,
            );
        if let Some(s) = session {
            o.set_last_will(LastWill::new(
                topics::status(&self.device),
                self.status(s, false, since_ms),
                QoS::AtLeastOnce,
                true,
            ));
        }
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

    /// The retained status, sealed at the status counter.
    fn status(&self, session: &Session, online: bool, since_ms: u64) -> Vec<u8> {
        let json = Status {
            v: v1::VERSION,
            device: self.device.clone(),
            online,
            since_ms,
            agent_version: self.agent_version.clone(),
        }
        .to_json();
        session.seal_status(&topics::status(&self.device), &json)
    }

    /// Runs until `shutdown` turns true: connect, drain, reconnect with jittered backoff.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut attempt: u32 = 0;
        let mut paths = Paths {
            direct: self.direct.take(),
            enroll: self.enroll.take(),
            sessions: self.session.clone(),
            sessions_open: true,
            ingress: Ingress::new(self.auth.clone()),
        };
        loop {
            if *shutdown.borrow() {
                return;
            }
            let since_ms = v1::now_ms();
            let session = paths.sessions.borrow_and_update().clone();
            let (client, eventloop) = AsyncClient::new(
                self.options(since_ms, session.as_deref()),
                self.cfg.inflight as usize * 2 + 16,
            );
            let outcome = self
                .session(
                    &client,
                    eventloop,
                    since_ms,
                    session,
                    &mut shutdown,
                    &mut paths,
                )
                .await;
            self.link
                .send_if_modified(|l| std::mem::replace(&mut l.connected, false));
            match outcome {
                SessionEnd::Shutdown => return,
                SessionEnd::Renew => {
                    tracing::info!(broker = %self.cfg.url, "reconnecting with the enrollment session (status and last will)");
                    attempt = 0;
                    continue;
                }
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

    /// One connection. `session` is the enrollment session the connection was made with (its
    /// will is sealed with it); the current one follows the watch.
    async fn session(
        &self,
        client: &AsyncClient,
        mut eventloop: EventLoop,
        since_ms: u64,
        will: Option<Arc<Session>>,
        shutdown: &mut watch::Receiver<bool>,
        paths: &mut Paths,
    ) -> SessionEnd {
        let mut window = SendWindow::new(
            self.cfg.inflight as usize,
            self.cfg.max_unacked as usize,
            Duration::from_millis(self.cfg.ack_timeout_ms),
        );
        let mut connected = false;
        let mut session = will.clone();
        // Filters subscribed on this connection (clean session: none at connect).
        let mut subscribed = BTreeSet::new();
        loop {
            if connected
                && let Some(s) = &session
                && window.has_room()
                && let Err(e) = self.fill(client, &mut window, s)
            {
                return SessionEnd::Lost {
                    was_connected: true,
                    error: e.to_string(),
                };
            }
            // Unenrolled, the outbox keeps everything: nothing to wake up for.
            let idle = connected && session.is_some() && window.has_room();
            let overdue = if connected { window.deadline() } else { None };
            self.outbox.set_awaiting_ack(window.awaiting() as u64);
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if connected {
                        self.goodbye(client, eventloop, since_ms, session.as_deref()).await;
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
                        // Subscribed before the online status goes out: the coordinator sends
                        // queued commands as soon as it sees that status.
                        let _ = client.try_subscribe(topics::cmd(&self.device, "#"), QoS::AtLeastOnce);
                        let _ = client.try_subscribe(topics::ack(&self.device), QoS::AtLeastOnce);
                        if let Some(s) = &session {
                            let online = self.status(s, true, since_ms);
                            if client.try_publish(topics::status(&self.device), QoS::AtLeastOnce, true, online).is_ok() {
                                window.handed_other();
                            }
                        }
                        self.sync_subscriptions(client, &mut subscribed);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => window.written(pkid),
                    Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                        // The broker has it; the outbox keeps it until the coordinator's ack.
                        window.acked(ack.pkid, std::time::Instant::now(), |k| self.outbox.holds(k));
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if let Some(ack) = self.on_publish(p, session.as_deref(), &mut paths.ingress) {
                            self.on_ack(&ack, &mut window);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return SessionEnd::Lost { was_connected: connected, error: e.to_string() },
                },
                _ = self.outbox.notified(), if idle => {}
                _ = sleep_until(overdue), if overdue.is_some() => {
                    let waiting = window.timed_out(std::time::Instant::now());
                    self.stats.resends.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(waiting, next_timeout_ms = window.ack_timeout().as_millis() as u64, "no end-to-end ack from the coordinator in time; sending the unacknowledged messages again");
                }
                _ = self.inbox.changed(), if connected => self.sync_subscriptions(client, &mut subscribed),
                changed = paths.sessions.changed(), if paths.sessions_open => {
                    if changed.is_err() {
                        // Enrollment has stopped (shutting down): keep the last session.
                        paths.sessions_open = false;
                        continue;
                    }
                    session = paths.sessions.borrow_and_update().clone();
                    if needs_new_will(will.as_deref(), session.as_deref()) {
                        self.leave(client, eventloop).await;
                        return SessionEnd::Renew;
                    }
                }
                Some(request) = next_enroll(&mut paths.enroll) => {
                    if connected && client.try_publish(topics::enroll(&self.device), QoS::AtLeastOnce, false, request).is_ok() {
                        window.handed_other();
                        self.stats.enroll_sent.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.stats.enroll_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(d) = next_direct(&mut paths.direct), if connected => {
                    let Some(s) = &session else {
                        self.stats.direct_dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    if d.expires <= std::time::Instant::now() {
                        self.stats.direct_dropped.fetch_add(1, Ordering::Relaxed);
                    } else if client.try_publish(&d.topic, QoS::AtMostOnce, false, s.seal(&d.topic, &d.payload)).is_ok() {
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

    /// Hands outbox messages to the client, highest class first, until the window is full,
    /// each sealed with the session as it goes.
    fn fill(
        &self,
        client: &AsyncClient,
        window: &mut SendWindow,
        session: &Session,
    ) -> Result<(), FillError> {
        for class in Class::ALL {
            while window.has_room() && window.may_hand(class) {
                let Some(stored) = self.outbox.next_in_class(class, window.cursor(class))? else {
                    break;
                };
                let key = stored.key;
                let prev = self.outbox.prev_in_class(key)?;
                match self.outgoing(&stored, prev, session) {
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

    /// What goes on the wire for a stored message: its envelope, sealed (Rule::DeviceMac). The
    /// envelope stays within `MAX_PAYLOAD_BYTES`; the trailer comes on top.
    fn outgoing(&self, s: &Stored, prev: Option<u64>, session: &Session) -> Option<Vec<u8>> {
        let framed = self.frame(s, prev)?;
        Some(session.seal(&s.record.topic, &framed))
    }

    /// Wraps a stored body in the wire envelope (binary bodies in the binary envelope), naming
    /// `prev`, the previous message of its class still held.
    fn frame(&self, s: &Stored, prev: Option<u64>) -> Option<Vec<u8>> {
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
            prev,
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

    /// Delivers an incoming message that authenticates; an end-to-end ack for this device is
    /// returned instead, for the connection's window.
    fn on_publish(
        &self,
        p: rumqttc::Publish,
        session: Option<&Session>,
        ingress: &mut Ingress,
    ) -> Option<bytes::Bytes> {
        let topic = p.topic;
        let payload = ingress.check(&topic, p.payload, session, std::time::Instant::now())?;
        if topic == topics::ack(&self.device) {
            return Some(payload);
        }
        let matched = self.inbox.deliver(InboxMessage {
            topic,
            payload,
            retain: p.retain,
        });
        if matched == 0 {
            tracing::debug!("incoming message matched no subscription");
        }
        None
    }

    /// The coordinator committed messages: they leave the outbox. Resend hints rewind their
    /// class. An ack for another incarnation (an outbox quarantined since) is ignored.
    fn on_ack(&self, payload: &[u8], window: &mut SendWindow) {
        let ack = match v1::ack::Ack::from_json(payload) {
            Ok(a) => a,
            Err(e) => {
                self.stats
                    .malformed_incoming
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "dropping malformed end-to-end ack");
                return;
            }
        };
        if ack.incarnation() != Some(self.outbox.incarnation()) {
            tracing::debug!(inc = %ack.inc, "ack for another outbox incarnation");
            return;
        }
        self.stats.acks.fetch_add(1, Ordering::Relaxed);
        let mut committed = 0u64;
        let now = std::time::Instant::now();
        for &(class, from, to) in &ack.committed {
            // Only seqs this outbox has handed out; a range past them is not ours.
            let to = to.min(self.outbox.next_seq().saturating_sub(1));
            if from > to {
                continue;
            }
            committed += self.outbox.ack_range(class, from, to).len() as u64;
            window.committed_range(class, from, to, now);
        }
        self.stats.committed.fetch_add(committed, Ordering::Relaxed);
        for &(class, seq) in &ack.resend {
            if window.resend_hint(class, now) {
                self.stats.resends.fetch_add(1, Ordering::Relaxed);
                tracing::info!(class = %class, waiting_for = seq, "the coordinator is missing an earlier message; sending the class again from its oldest");
            }
        }
    }

    /// Clean shutdown: retained offline status (enrolled only), then disconnect, waiting
    /// briefly for both.
    async fn goodbye(
        &self,
        client: &AsyncClient,
        eventloop: EventLoop,
        since_ms: u64,
        session: Option<&Session>,
    ) {
        if let Some(s) = session {
            let _ = client.try_publish(
                topics::status(&self.device),
                QoS::AtLeastOnce,
                true,
                self.status(s, false, since_ms),
            );
        }
        self.leave(client, eventloop).await;
    }

    /// Disconnects cleanly (no will is published), waiting briefly for the DISCONNECT to go.
    async fn leave(&self, client: &AsyncClient, mut eventloop: EventLoop) {
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

/// The receiving ends and state that outlive one connection.
struct Paths {
    direct: Option<DirectReceiver>,
    enroll: Option<EnrollReceiver>,
    sessions: SessionWatch,
    /// False once the enrollment task is gone (its watch then never changes again).
    sessions_open: bool,
    ingress: Ingress,
}

/// Whether the connection must be made again for its last will: it was made without a session
/// (so without a will) or with other keys than the current session's. Losing the session
/// (revoked) needs none: the old will is simply refused by the coordinator.
fn needs_new_will(will: Option<&Session>, now: Option<&Session>) -> bool {
    match (will, now) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(w), Some(n)) => !w.same_keys(n),
    }
}

/// Checks incoming messages per `Topic::auth_rule`; see the module docs. No I/O but the WARN
/// lines.
pub struct Ingress {
    /// Coordinator -> device MAC stamps seen (per process: the coordinator raises its epoch at
    /// every start).
    window: ReplayWindow,
    log: RejectLog,
    stats: Arc<AuthStats>,
}

impl Ingress {
    pub fn new(stats: Arc<AuthStats>) -> Ingress {
        Ingress {
            window: ReplayWindow::default(),
            log: RejectLog::default(),
            stats,
        }
    }

    /// The payload to deliver (trailer stripped where there is one), or `None` when the
    /// message is dropped (counted and logged here).
    pub fn check(
        &mut self,
        topic: &str,
        payload: bytes::Bytes,
        session: Option<&Session>,
        now: std::time::Instant,
    ) -> Option<bytes::Bytes> {
        let Some(parsed) = Topic::parse(topic) else {
            // Not the v1 tree: a pipeline `mqtt` source's topic, raw sensor input.
            return Some(payload);
        };
        let rule = match parsed {
            // The enrollment part verifies answers itself, before any session exists.
            Topic::EnrollAnswer { .. } => return Some(payload),
            t => t.auth_rule(),
        };
        let inner = match rule {
            Rule::CoordinatorMac => match session {
                None => Err(NOT_ENROLLED),
                Some(s) => s
                    .open_down(topic, &payload)
                    .and_then(|(inner, stamp)| {
                        self.window.accept(stamp)?;
                        Ok(inner.len())
                    })
                    .map_err(|e| e.reason()),
            },
            Rule::CoordinatorSigned => match session {
                None => Err(NOT_ENROLLED),
                Some(s) => s
                    .open_signed(topic, &payload)
                    .map(|(inner, _)| inner.len())
                    .map_err(|e| e.reason()),
            },
            // Signed inside its own format (deployments, FL rounds), or what devices send
            // (another device's data read by a pipeline source): not ours to verify here.
            Rule::Embedded | Rule::DeviceMac | Rule::DeviceStatus | Rule::Enrollment => {
                return Some(payload);
            }
        };
        match inner {
            Ok(len) => Some(payload.slice(..len)),
            Err(reason) => {
                self.stats.reject(reason);
                if let Some(dropped) = self.log.note(reason, now) {
                    tracing::warn!(
                        topic,
                        reason,
                        dropped,
                        "dropping incoming messages that do not authenticate"
                    );
                }
                None
            }
        }
    }
}

/// The drop reason of a coordinator message that arrives before enrollment (no keys yet).
pub const NOT_ENROLLED: &str = "not_enrolled";

/// One WARN line per reason per [`RejectLog::EVERY`], carrying how many drops it stands for.
#[derive(Debug, Default)]
struct RejectLog {
    /// Per reason: when the last line went out, and drops since.
    reasons: HashMap<&'static str, (Option<std::time::Instant>, u64)>,
}

impl RejectLog {
    const EVERY: Duration = Duration::from_secs(10);

    /// Counts a drop; `Some(n)` when a line is due now, `n` the drops it reports.
    fn note(&mut self, reason: &'static str, now: std::time::Instant) -> Option<u64> {
        let (last, pending) = self.reasons.entry(reason).or_default();
        *pending += 1;
        if last.is_some_and(|t| now.duration_since(t) < Self::EVERY) {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(pending))
    }
}

/// The next enrollment request; never resolves without the path.
async fn next_enroll(enroll: &mut Option<EnrollReceiver>) -> Option<Vec<u8>> {
    match enroll {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolves at `at`; never without one.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
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
    /// The enrollment session arrived (or changed keys): connect again at once, with its will.
    Renew,
    Lost {
        was_connected: bool,
        error: String,
    },
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
    use protocol::v1::auth::{Identity, SessionKeys, Stamp};

    use super::*;
    use crate::enrollment::session::Counter;
    use crate::outbox::{NewMessage, OutboxConfig};

    struct Pair {
        device: Identity,
        coord: Identity,
    }

    impl Pair {
        fn new() -> Pair {
            Pair {
                device: Identity::generate(),
                coord: Identity::generate(),
            }
        }

        /// The device's session (epoch 3), as enrollment would make it.
        fn session(&self) -> Arc<Session> {
            Arc::new(
                Session::new(
                    &self.device,
                    "d1",
                    self.coord.public(),
                    vec![],
                    3,
                    Arc::new(Counter::default()),
                )
                .expect("session"),
            )
        }

        /// The coordinator's side of the same keys.
        fn coordinator_keys(&self) -> SessionKeys {
            let (dp, cp) = (self.device.public(), self.coord.public());
            self.coord
                .session_keys(&dp, "d1", &dp, &cp)
                .expect("coordinator side")
        }
    }

    #[tokio::test]
    async fn outbox_messages_go_out_sealed_for_the_coordinator() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Arc::new(Outbox::open(dir.path(), &OutboxConfig::default()).expect("opens"));
        let pair = Pair::new();
        let session = pair.session();
        let (_session_tx, sessions) = watch::channel(Some(session.clone()));
        let (link, _) = crate::link::link_state();
        let up = Uplink::new(
            MqttConfig::default(),
            "d1".into(),
            "0.1.0".into(),
            outbox.clone(),
            Links {
                inbox: Inbox::default(),
                link,
                direct: None,
                session: sessions,
                enroll: None,
                auth: Arc::default(),
            },
        )
        .expect("uplink");
        let topic = topics::data("d1", "vib");
        outbox
            .enqueue(NewMessage {
                class: Class::Results,
                topic: topic.clone(),
                body: br#"{"stream":"vib","payload":1}"#.to_vec(),
                ttl: None,
            })
            .await
            .expect("queued");
        let stored = outbox
            .next_in_class(Class::Results, None)
            .expect("reads")
            .expect("queued message");
        let wire = up.outgoing(&stored, None, &session).expect("framed");

        let keys = pair.coordinator_keys();
        let (payload, stamp) = keys
            .up
            .open(&topic, &wire)
            .expect("the coordinator verifies it");
        let env = Envelope::<serde_json::Value>::from_json(payload, "d1").expect("an envelope");
        assert_eq!(env.seq, stored.key.seq);
        assert_eq!(
            stamp,
            Stamp {
                epoch: 3,
                counter: 1
            }
        );
        // A resend is a new publish: a new counter, so the replay window takes it.
        let again = up.outgoing(&stored, None, &session).expect("framed");
        assert_eq!(keys.up.open(&topic, &again).expect("verifies").1.counter, 2);
        // Moved to another topic, or checked with the other direction's key: refused.
        assert!(keys.up.open(&topics::telemetry("d1"), &wire).is_err());
        assert!(keys.down.open(&topic, &wire).is_err());
        // The status and the will use the status counter.
        let status = up.status(&session, false, 1);
        let (_, stamp) = keys
            .up
            .open(&topics::status("d1"), &status)
            .expect("verifies");
        assert_eq!(stamp.counter, auth::STATUS_COUNTER);
        outbox.close().await.expect("closes");
    }

    #[test]
    fn ingress_drops_what_does_not_authenticate_and_strips_the_rest() {
        let pair = Pair::new();
        let session = pair.session();
        let keys = pair.coordinator_keys();
        let stats = Arc::new(AuthStats::default());
        let mut ingress = Ingress::new(stats.clone());
        let now = std::time::Instant::now();
        let check = |ingress: &mut Ingress, topic: &str, bytes: Vec<u8>, s: Option<&Session>| {
            ingress.check(topic, bytes::Bytes::from(bytes), s, now)
        };
        let response = topics::offload_response("d1");
        let stamp = |counter| Stamp { epoch: 9, counter };

        let good = keys.down.seal(&response, b"answer", stamp(1));
        assert_eq!(
            check(&mut ingress, &response, good.clone(), Some(&session)).as_deref(),
            Some(&b"answer"[..]),
            "trailer stripped"
        );
        // Replayed: refused by the window.
        assert_eq!(
            check(&mut ingress, &response, good.clone(), Some(&session)),
            None
        );
        // Forged: sealed with a key that is not this device's session key.
        let other = Pair::new().coordinator_keys();
        let forged = other.down.seal(&response, b"answer", stamp(2));
        assert_eq!(check(&mut ingress, &response, forged, Some(&session)), None);
        // Sealed with the device's own (up) key, reflected back: refused.
        let reflected = keys.up.seal(&response, b"answer", stamp(3));
        assert_eq!(
            check(&mut ingress, &response, reflected, Some(&session)),
            None
        );
        // No trailer at all.
        assert_eq!(
            check(&mut ingress, &response, b"answer".to_vec(), Some(&session)),
            None
        );
        // Before enrollment nothing from the coordinator can be checked.
        let fresh = keys.down.seal(&response, b"answer", stamp(4));
        assert_eq!(check(&mut ingress, &response, fresh.clone(), None), None);
        assert!(check(&mut ingress, &response, fresh, Some(&session)).is_some());

        // Capacity adverts: signed by the coordinator, or dropped.
        let advert = topics::offload_capacity("r1");
        let signed = pair.coord.seal(&advert, b"{}", 5);
        assert_eq!(
            check(&mut ingress, &advert, signed, Some(&session)).as_deref(),
            Some(&b"{}"[..])
        );
        assert_eq!(
            check(&mut ingress, &advert, b"{}".to_vec(), Some(&session)),
            None
        );
        let by_stranger = Identity::generate().seal(&advert, b"{}", 5);
        assert_eq!(
            check(&mut ingress, &advert, by_stranger, Some(&session)),
            None
        );

        // Enrollment answers, deployments and foreign topics pass as they are.
        for topic in [
            topics::enroll_answer("d1"),
            topics::deploy_manifest("d1"),
            topics::fl_round("d1"),
            "sensors/room1".to_owned(),
        ] {
            assert_eq!(
                check(&mut ingress, &topic, b"raw".to_vec(), None).as_deref(),
                Some(&b"raw"[..]),
                "{topic}"
            );
        }

        let rejected = stats.rejected();
        assert_eq!(rejected.get("replay"), Some(&1));
        assert_eq!(rejected.get("bad_mac"), Some(&2));
        assert_eq!(rejected.get("no_trailer"), Some(&2));
        assert_eq!(rejected.get("not_enrolled"), Some(&1));
        assert_eq!(rejected.get("unknown_key"), Some(&1));
    }

    #[test]
    fn reject_lines_are_one_per_reason_per_ten_seconds() {
        let mut log = RejectLog::default();
        let t0 = std::time::Instant::now();
        assert_eq!(log.note("bad_mac", t0), Some(1));
        assert_eq!(log.note("bad_mac", t0 + Duration::from_secs(1)), None);
        assert_eq!(log.note("replay", t0 + Duration::from_secs(1)), Some(1));
        assert_eq!(log.note("bad_mac", t0 + Duration::from_secs(9)), None);
        assert_eq!(
            log.note("bad_mac", t0 + Duration::from_secs(10)),
            Some(3),
            "the line counts the drops it stands for"
        );
    }

    #[test]
    fn only_a_new_session_or_new_keys_need_a_new_will() {
        let pair = Pair::new();
        let (a, b) = (pair.session(), pair.session());
        assert!(needs_new_will(None, Some(&a)));
        assert!(!needs_new_will(Some(&a), Some(&b)), "same keys, new groups");
        assert!(
            !needs_new_will(Some(&a), None),
            "revoked: stop, no reconnect"
        );
        let other = Pair::new().session();
        assert!(needs_new_will(Some(&a), Some(&other)));
    }

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
    fn backoff_stays_in_bounds_and_grows() {
        for attempt in 0..40 {
            let d = backoff(100, 5_000, attempt).as_millis() as u64;
            assert!((100..=5_000).contains(&d), "{attempt}: {d}");
        }
        assert_eq!(backoff(100, 5_000, 0).as_millis(), 100);
    }
}
