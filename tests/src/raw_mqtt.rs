//! A bare MQTT client for publishing hostile input (malformed or oversized payloads, forged
//! topics, forged deployment chunks) straight to the broker, bypassing the agent, and for
//! watching what others publish (an attacker on the broker sees every topic it subscribes to).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::{Client, Connection, Event, MqttOptions, Packet, Publish, QoS, RecvTimeoutError};

/// Big enough to send payloads above any limit under test; the broker decides what it takes.
const MAX_PACKET: usize = 1024 * 1024;

/// One connection; publishes with QoS 1 and waits for the broker's answer.
///
/// It does not reconnect: once the broker drops it (as it may for an oversized packet) it is
/// spent, and a test opens a new one. That keeps a rejected packet from being re-sent forever.
pub struct RawMqtt {
    client: Client,
    conn: Connection,
    dead: Option<String>,
    /// Publishes on subscribed filters that arrived while waiting for something else.
    received: VecDeque<Publish>,
}

impl std::fmt::Debug for RawMqtt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawMqtt")
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

/// What became of one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawOutcome {
    /// The broker acknowledged it (so it was routed to subscribers).
    Acked,
    /// The connection failed before the acknowledgement, with the reason.
    Dropped(String),
}

impl RawMqtt {
    /// Connects to 127.0.0.1:`port` and waits for CONNACK.
    pub fn connect(port: u16, client_id: &str, timeout: Duration) -> Result<RawMqtt> {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        let (client, conn) = Client::new(opts, 16);
        let mut raw = RawMqtt {
            client,
            conn,
            dead: None,
            received: VecDeque::new(),
        };
        let deadline = Instant::now() + timeout;
        loop {
            match raw.next(deadline)? {
                Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(raw),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("raw MQTT client cannot connect to 127.0.0.1:{port}: {e}"),
                None => {
                    bail!("raw MQTT client: no CONNACK from 127.0.0.1:{port} within {timeout:?}")
                }
            }
        }
    }

    /// Publishes `payload` on `topic` (QoS 1, not retained) and waits for PUBACK or a failure.
    pub fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> Result<RawOutcome> {
        if let Some(why) = &self.dead {
            bail!("raw MQTT connection already dropped: {why}");
        }
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .with_context(|| format!("cannot queue a publish on {topic}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.next(deadline)? {
                Some(Ok(Event::Incoming(Packet::PubAck(_)))) => return Ok(RawOutcome::Acked),
                Some(Ok(Event::Incoming(Packet::Publish(p)))) => self.received.push_back(p),
                Some(Ok(Event::Incoming(Packet::Disconnect))) => {
                    self.dead = Some("broker sent DISCONNECT".into());
                    return Ok(RawOutcome::Dropped("broker sent DISCONNECT".into()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    self.dead = Some(e.to_string());
                    return Ok(RawOutcome::Dropped(e.to_string()));
                }
                None => bail!("raw MQTT client: no PUBACK for {topic} within {timeout:?}"),
            }
        }
    }

    /// Publishes `payload` on `topic` (QoS 1, retained as `retain` says) and waits for PUBACK.
    pub fn publish_with(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        retain: bool,
        timeout: Duration,
    ) -> Result<RawOutcome> {
        if !retain {
            return self.publish(topic, payload, timeout);
        }
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload.into())
            .with_context(|| format!("cannot queue a publish on {topic}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.next(deadline)? {
                Some(Ok(Event::Incoming(Packet::PubAck(_)))) => return Ok(RawOutcome::Acked),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Ok(RawOutcome::Dropped(e.to_string())),
                None => bail!("raw MQTT client: no PUBACK for {topic} within {timeout:?}"),
            }
        }
    }

    /// Publishes every `(topic, payload)` at QoS 1 without waiting in between (the client keeps
    /// its window full) and returns how many the broker acknowledged by `timeout`.
    pub fn flood(&mut self, msgs: Vec<(String, Vec<u8>)>, timeout: Duration) -> Result<usize> {
        let total = msgs.len();
        let deadline = Instant::now() + timeout;
        let mut queued = msgs.into_iter();
        let (mut sent, mut acked) = (0usize, 0usize);
        while acked < total {
            // Fewer in flight than the request channel holds (16, see `connect`), so a queued
            // publish never finds it full: the channel drains only while we poll below.
            while sent < total && sent - acked < 12 {
                let Some((topic, payload)) = queued.next() else {
                    break;
                };
                self.client
                    .try_publish(&topic, QoS::AtLeastOnce, false, payload)
                    .with_context(|| format!("cannot queue a publish on {topic}"))?;
                sent += 1;
            }
            match self.next(deadline)? {
                Some(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("flood connection failed after {acked} acks: {e}"),
                None => break,
            }
        }
        Ok(acked)
    }

    /// Subscribes to `filter` and returns the first message (a retained one counts): topic,
    /// payload and whether it came as retained.
    pub fn first_message(
        &mut self,
        filter: &str,
        timeout: Duration,
    ) -> Result<(String, Vec<u8>, bool)> {
        self.subscribe(filter, timeout)?;
        self.wait_publish(&format!("a message on {filter}"), timeout, |p| {
            Some((p.topic.clone(), p.payload.to_vec(), p.retain))
        })
    }

    /// Subscribes to `filter` (QoS 1) and waits for the broker's SUBACK.
    pub fn subscribe(&mut self, filter: &str, timeout: Duration) -> Result<()> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .with_context(|| format!("cannot queue a subscription to {filter}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.next(deadline)? {
                Some(Ok(Event::Incoming(Packet::SubAck(_)))) => return Ok(()),
                Some(Ok(Event::Incoming(Packet::Publish(p)))) => self.received.push_back(p),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("raw MQTT connection failed subscribing to {filter}: {e}"),
                None => bail!("raw MQTT client: no SUBACK for {filter} within {timeout:?}"),
            }
        }
    }

    /// Waits for a publish on a subscribed filter for which `pick` returns `Some` (others are
    /// skipped), within `timeout`; errs naming `what` when none comes.
    pub fn wait_publish<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pick: impl FnMut(&Publish) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.received.pop_front() {
                if let Some(t) = pick(&p) {
                    return Ok(t);
                }
                continue;
            }
            match self.next(deadline)? {
                Some(Ok(Event::Incoming(Packet::Publish(p)))) => self.received.push_back(p),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("raw MQTT connection failed waiting for {what}: {e}"),
                None => bail!("raw MQTT client: no {what} within {timeout:?}"),
            }
        }
    }

    fn next(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<Result<Event, rumqttc::ConnectionError>>> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        match self.conn.recv_timeout(left) {
            Ok(ev) => Ok(Some(ev)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => bail!("raw MQTT event loop stopped"),
        }
    }
}

impl Drop for RawMqtt {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}
