//! The running coordinator: wires transport, core, store and journal together in one loop.
//!
//! Per message: the core decides, the events go to the journal, then the seen id and changed
//! registry records go to sled. Messages are taken in batches (whatever is already queued, up
//! to [`MAX_BATCH`]); each batch ends with a group commit (journal fsync, sled flush + fsync)
//! and only then are its messages acknowledged to the broker.

use std::future::Future;
use std::time::Duration;

use protocol::v1::{self, Status, topics};
use tokio::sync::mpsc;

use crate::config::{BrokerMode, Config};
use crate::core::{Core, Outcome};
use crate::event::Event;
use crate::journal::{Journal, JournalError};
use crate::registry::DeviceRecord;
use crate::store::{Store, StoreError};
use crate::transport::embedded::Embedded;
use crate::transport::external::External;
use crate::transport::{AckToken, CHANNEL_CAPACITY, Inbound, Message, Transport, TransportError};

/// Most messages processed before a group commit.
const MAX_BATCH: usize = 256;
/// How much of the journal's end is read at start-up to recover ids processed after the last
/// database commit: one full batch of the largest messages fits.
const RECOVERY_WINDOW_BYTES: u64 = (MAX_BATCH as u64) * (v1::MAX_PAYLOAD_BYTES as u64 + 4096);
/// How often deferred client requests are retried.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// Errors that stop the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot create state directory {path}: {error}")]
    StateDir {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("broker transport stopped: {0}")]
    TransportClosed(String),
}

/// Runs the coordinator until `shutdown` resolves (then stops cleanly and returns `Ok`) or a
/// fatal error occurs.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
    config.validate()?;
    let mode = config.broker_mode()?;
    std::fs::create_dir_all(&config.state_dir).map_err(|error| ServiceError::StateDir {
        path: config.state_dir.clone(),
        error,
    })?;
    let store = Store::open(&config.db_path(), config.store.cache_bytes)?;
    let core = Core::new(store.load_devices()?);
    let journal = Journal::open(&config.journal_path(), config.journal.max_bytes)?;
    tracing::info!(
        state_dir = %config.state_dir.display(),
        journal = %journal.path().display(),
        devices = core.devices().count(),
        "state loaded"
    );

    let started_ms = v1::now_ms();
    let own_status = topics::status(topics::COORDINATOR);
    let filters: Vec<String> = if config.watch_unknown_topics {
        vec![format!("{}/#", topics::ROOT)]
    } else {
        topics::COORDINATOR_FILTERS
            .iter()
            .map(|f| (*f).to_owned())
            .collect()
    };
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let mut service = Service {
        config: config.clone(),
        core,
        store,
        journal,
        rx,
        ready: false,
        started_ms,
    };
    service.recover_seen_ids()?;
    service.prune()?;

    let transport = match mode {
        BrokerMode::Embedded => {
            // Sessions of the previous broker died with it; devices reconnect and say so.
            let out = service.core.broker_restarted();
            service.apply(out, v1::now_ms())?;
            service.commit()?;
            let embedded =
                Embedded::start(&config.embedded, filters, vec![own_status.clone()], tx).await?;
            let url = embedded.url();
            let mut transport = Transport::Embedded(embedded);
            transport
                .publish_retained(&own_status, service.own_status(true))
                .await?;
            service.ready(url, true)?;
            transport
        }
        BrokerMode::External { tls, host, port } => {
            let will = (own_status.clone(), service.own_status(false));
            Transport::External(External::start(
                &config.mqtt,
                tls,
                &host,
                port,
                filters,
                will,
                tx,
            )?)
        }
    };
    service.run(transport, shutdown).await
}

struct Service {
    config: Config,
    core: Core,
    store: Store,
    journal: Journal,
    rx: mpsc::Receiver<Inbound>,
    ready: bool,
    started_ms: u64,
}

impl Service {
    async fn run(
        mut self,
        mut transport: Transport,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServiceError> {
        tokio::pin!(shutdown);
        let stats_every = Duration::from_secs(self.config.stats_interval_s.max(1));
        let mut stats =
            tokio::time::interval_at(tokio::time::Instant::now() + stats_every, stats_every);
        let prune_every = Duration::from_secs(self.config.store.prune_interval_s);
        let mut prune =
            tokio::time::interval_at(tokio::time::Instant::now() + prune_every, prune_every);
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        let own_status = topics::status(topics::COORDINATOR);

        let result = loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break Ok(()),
                inbound = self.rx.recv() => {
                    let Some(first) = inbound else {
                        break Err(ServiceError::TransportClosed("message channel closed".into()));
                    };
                    if let Err(e) = self.batch(first, &mut transport, &own_status).await {
                        break Err(e);
                    }
                }
                _ = retry.tick(), if transport.has_deferred() => transport.retry_deferred(),
                _ = stats.tick(), if self.config.stats_interval_s > 0 => self.log_stats(),
                _ = prune.tick() => if let Err(e) = self.prune() { break Err(e) },
            }
        };

        // Stop taking messages first, so the pump is never stuck sending to us while the
        // transport flushes its disconnect.
        drop(self.rx);
        if result.is_ok() {
            if let Err(e) = transport
                .publish_retained(&own_status, own_status_json(false, self.started_ms))
                .await
            {
                tracing::warn!(error = %e, "could not publish offline status");
            }
            self.journal.append(v1::now_ms(), &Event::Stopped {})?;
            Event::Stopped {}.log();
        }
        let committed = commit(&self.journal, &self.store, self.config.store.fsync);
        transport.shutdown().await;
        result.and(committed)
    }

    /// Processes `first` and whatever else is already queued, commits, then acknowledges.
    async fn batch(
        &mut self,
        first: Inbound,
        transport: &mut Transport,
        own_status: &str,
    ) -> Result<(), ServiceError> {
        let mut acks: Vec<AckToken> = Vec::new();
        let mut next = Some(first);
        let mut closed = None;
        while let Some(inbound) = next.take() {
            match inbound {
                Inbound::Message(message) => {
                    acks.push(message.ack);
                    self.message(message)?;
                }
                Inbound::Connected { session_present } => {
                    tracing::debug!(session_present, "publishing coordinator status");
                    // The broker may have published our will while we were away.
                    transport
                        .publish_retained(own_status, self.own_status(true))
                        .await?;
                    // A present session still has our subscriptions, and the messages queued
                    // for it follow right away: ready now, so `ready` precedes them.
                    if session_present && !self.ready {
                        self.ready(broker_url(transport), false)?;
                    }
                }
                Inbound::Subscribed => {
                    if !self.ready {
                        self.ready(broker_url(transport), false)?;
                    } else {
                        tracing::debug!("subscriptions confirmed");
                    }
                }
                Inbound::Closed(reason) => {
                    closed = Some(reason);
                    break;
                }
            }
            if acks.len() < MAX_BATCH {
                next = self.rx.try_recv().ok();
            }
        }
        self.commit()?;
        for ack in acks {
            transport.ack(ack);
        }
        match closed {
            Some(reason) => Err(ServiceError::TransportClosed(reason)),
            None => Ok(()),
        }
    }

    fn message(&mut self, message: Message) -> Result<(), ServiceError> {
        let now = v1::now_ms();
        let out = self
            .core
            .handle(&message.topic, &message.payload, now, &self.store)?;
        self.apply(out, now)
    }

    /// Journals the events, then records the seen id and changed records (see crate docs for
    /// why in this order).
    fn apply(&mut self, out: Outcome, now: u64) -> Result<(), ServiceError> {
        for event in &out.events {
            self.journal.append(now, event)?;
            event.log();
        }
        let records: Vec<&DeviceRecord> = out
            .changed
            .iter()
            .filter_map(|d| self.core.device(d))
            .collect();
        let seen = out
            .seen
            .as_ref()
            .map(|(d, id)| (d.as_str(), id.as_str(), now));
        if seen.is_some() || !records.is_empty() {
            self.store.record(seen, &records)?;
        }
        Ok(())
    }

    fn commit(&self) -> Result<(), ServiceError> {
        commit(&self.journal, &self.store, self.config.store.fsync)
    }

    fn ready(&mut self, broker: String, embedded: bool) -> Result<(), ServiceError> {
        self.ready = true;
        let event = Event::Ready { broker, embedded };
        self.journal.append(v1::now_ms(), &event)?;
        event.log();
        Ok(())
    }

    fn own_status(&self, online: bool) -> Vec<u8> {
        own_status_json(online, self.started_ms)
    }

    /// After a crash the journal may name messages processed after the last database commit;
    /// they were never acknowledged, so the broker redelivers them. Marking their ids seen
    /// makes those redeliveries duplicates instead of second data lines. The walk goes from
    /// the newest line back to the first id the database already has (commits cover a prefix).
    fn recover_seen_ids(&mut self) -> Result<(), ServiceError> {
        let mut missing = Vec::new();
        let mut lookup_error = None;
        crate::journal::scan_tail(self.journal.path(), RECOVERY_WINDOW_BYTES, |device, id| {
            match crate::core::SeenIds::contains(&self.store, device, id) {
                Ok(true) => false,
                Ok(false) => {
                    missing.push((device.to_owned(), id.to_owned()));
                    true
                }
                Err(e) => {
                    lookup_error = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = lookup_error {
            return Err(e.into());
        }
        if missing.is_empty() {
            return Ok(());
        }
        let now = v1::now_ms();
        for (device, id) in &missing {
            self.store.record(Some((device, id, now)), &[])?;
        }
        self.store.commit(self.config.store.fsync)?;
        tracing::info!(
            recovered = missing.len(),
            "marked message ids from the journal tail as seen"
        );
        Ok(())
    }

    fn prune(&mut self) -> Result<(), ServiceError> {
        let retention_ms = self.config.store.dedup_retention_s.saturating_mul(1000);
        let cutoff = v1::now_ms().saturating_sub(retention_ms);
        let pruned = self.store.prune_seen(cutoff)?;
        if pruned > 0 {
            self.store.commit(self.config.store.fsync)?;
            tracing::info!(
                pruned,
                remaining = self.store.seen_len(),
                "forgot expired message ids"
            );
        }
        Ok(())
    }

    fn log_stats(&self) {
        let t = self.core.totals();
        tracing::info!(
            devices = self.core.devices().count(),
            devices_online = self.core.online_count(),
            messages = t.messages,
            duplicates = t.duplicates,
            rejected = t.rejected,
            ignored = t.ignored,
            seen_ids = self.store.seen_len(),
            "stats"
        );
    }
}

fn broker_url(transport: &Transport) -> String {
    match transport {
        Transport::External(e) => e.broker().to_owned(),
        Transport::Embedded(e) => e.url(),
    }
}

fn commit(journal: &Journal, store: &Store, fsync: bool) -> Result<(), ServiceError> {
    if fsync {
        journal.sync()?;
    }
    store.commit(fsync)?;
    Ok(())
}

/// The coordinator's retained status: the device `Status` shape under the coordinator's name,
/// so agents can read it with the same type.
fn own_status_json(online: bool, since_ms: u64) -> Vec<u8> {
    Status {
        v: v1::VERSION,
        device: topics::COORDINATOR.to_owned(),
        online,
        since_ms,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
    .to_json()
}
