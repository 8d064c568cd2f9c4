//! The running coordinator: wires transport, core, store and journal together in one loop.
//!
//! Per message: the core decides, the events go to the journal, then the seen id and changed
//! registry records go to sled. Messages are taken in batches (whatever is already queued, up
//! to [`MAX_BATCH`]); each batch ends with a group commit (journal fsync, sled flush + fsync)
//! and only then are its messages acknowledged to the broker.
//!
//! Deployments: the service owns every rollout through [`DeployHost`] (the engine, the spool,
//! the progress files). It picks up packages that `deploy` spooled under the state directory
//! (at start-up and every [`SPOOL_POLL`]), resumes unfinished rollouts after a restart, feeds
//! deployment statuses and resend requests (decoded and deduplicated here) to the host and
//! does what it returns: publishes (manifest retained, chunks paced at [`CHUNKS_PER_TICK`] per
//! [`DEPLOY_TICK`]), journals, and has each rollout's progress file rewritten every
//! [`PROGRESS_INTERVAL`].
//!
//! Authentication: every inbound message meets the [`Gate`] first, before deduplication, the
//! core, deployments, federated learning or offload (`Service::message`): an enrollment request
//! goes to the enrollment core, a message from a device that is not enrolled, or whose MAC or
//! counter does not check out, is dropped and counted, and everything else is routed without
//! its trailer, so the size and format checks downstream see the body alone. The replay
//! windows that moved are written with the batch's commit. Every publish goes through
//! `Service::publish`, which seals it per topic (`Gate::seal`). Operator decisions
//! (`devices approve|reject|revoke`) arrive through a spool polled with the deployment spool;
//! their answers are published after their commit, like everything else.
//!
//! Federated learning: the service owns every task through [`FlHost`]: `fl/update` messages
//! go to it (never to the core), registrations tell it about new members, and every
//! [`FL_TICK`] it takes new tasks and stop requests and checks deadlines. Its state is
//! written (`FlHost::persist`) before the batch's commit and acks, and before any round
//! message it asks for is published, so a restart never finds less than devices were told.
//! Held-out evaluations run on the host's own thread; their outcomes arrive here as one more
//! event of the loop (`FlHost::next_evaluated`), never inside a batch, so a round closing
//! delays no ack.

use std::future::Future;
use std::time::Duration;

use protocol::v1::ack::{AckSet, Header};
use protocol::v1::deploy::{DeployStatus, ResendRequest};
use protocol::v1::topics::{DeployTopic, Topic};
use protocol::v1::{self, Envelope, Status, binary, topics};
use tokio::sync::mpsc;

use crate::action::Action;
use crate::api::FleetView;
use crate::commands::{CommandBoard, CommandFile, Presence};
use crate::config::{BrokerMode, Config};
use crate::core::{Core, Outcome, SeenIds};
use crate::deploy::host::DeployHost;
use crate::enrollment::files::{self as enrollment_files, Command, CommandResult};
use crate::enrollment::{EnrolledFleet, Enrollments, Gate, Outgoing, Verdict};
use crate::event::Event;
use crate::fl::FlHost;
use crate::fl::files::FilesError;
use crate::journal::{Journal, JournalError};
use crate::offload::{Offload, OffloadError};
use crate::registry::DeviceRecord;
use crate::store::{Store, StoreError};
use crate::transport::embedded::Embedded;
use crate::transport::external::External;
use crate::transport::{AckToken, CHANNEL_CAPACITY, Inbound, Message, Transport, TransportError};
use protocol::v1::enroll::Decision;

/// Most messages processed before a group commit.
const MAX_BATCH: usize = 256;
/// How much of the journal's end is read at start-up to recover ids processed after the last
/// database commit: one full batch of the largest messages fits.
const RECOVERY_WINDOW_BYTES: u64 = (MAX_BATCH as u64) * (v1::MAX_PAYLOAD_BYTES as u64 + 4096);
/// How often deferred client requests are retried.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// How often queued deployment chunks are published, [`CHUNKS_PER_TICK`] at a time: at most
/// 160 chunks (10 MiB at the default chunk size) a second over all rollouts, so neither the
/// broker's per-subscription buffers nor slow device links are flooded; whatever a device
/// still misses it asks for again.
const DEPLOY_TICK: Duration = Duration::from_millis(50);
const CHUNKS_PER_TICK: usize = 8;
/// No chunks are published while more than this waits for the external client's queue.
/// Not zero: under a fleet's steady load the queue is never empty (acks to thousands of
/// devices), and a deployment must get its share rather than wait for a quiet moment that
/// does not come (at 10,000 devices it never did: no chunk went out for minutes). Chunks
/// join the same FIFO as the acks, so they go at the rate the broker takes them, and the
/// bound keeps at most ~2 ticks of chunks (1 MiB) in memory here.
const DEPLOY_BACKLOG_BYTES: usize = 1 << 20;
/// Over [`DEPLOY_BACKLOG_BYTES`] and up to this, one chunk per tick still goes (64 KiB per
/// 50 ms): a fleet's steady load can keep the queue over the first bound for minutes.
const DEPLOY_BACKLOG_MAX_BYTES: usize = 16 << 20;
/// How often the spool is checked for new deployments.
const SPOOL_POLL: Duration = Duration::from_millis(500);
/// How often changed rollout progress files are rewritten.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// The enrollment snapshot is rewritten at most once per this many times its last duration
/// (at most about 1/10 of the service loop's time).
const SNAPSHOT_DUTY: u32 = 10;
/// How often federated tasks are checked: spool, stop requests, deadlines, waiting rounds.
const FL_TICK: Duration = Duration::from_millis(250);
/// End-to-end acks wait at most this long after their commit, so that under load one ack
/// covers the messages of several batches; an ack after a quiet spell goes out at once.
const ACK_INTERVAL: Duration = Duration::from_millis(25);
/// How often remote commands are checked: queued ones sent to devices now online, expiries
/// and timeouts.
const COMMAND_TICK: Duration = Duration::from_millis(50);
/// How often dropped-message counts may be journaled (`auth_rejected`).
const AUTH_SUMMARY: Duration = Duration::from_millis(crate::enrollment::gate::SUMMARY_INTERVAL_MS);

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
    #[error("federated learning state: {0}")]
    Fl(#[from] FilesError),
    #[error(transparent)]
    Offload(#[from] OffloadError),
    #[error("coordinator identity: {0}")]
    Identity(#[from] enrollment_files::FilesError),
    #[error(transparent)]
    Api(#[from] crate::api::ApiStartError),
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
    let policy = config.enrollment.policy()?;
    let (identity, previous, created) = enrollment_files::load_identities(&config.state_dir)?;
    let epoch = enrollment_files::raise_epoch(&config.state_dir)?;
    tracing::info!(
        key_id = %identity.public().key_id(),
        created,
        epoch,
        path = %enrollment_files::identity_path(&config.state_dir).display(),
        "coordinator identity"
    );
    let store = Store::open(&config.db_path(), config.store.cache_bytes)?;
    let core = Core::new(store.load_devices()?);
    let enrollments = Enrollments::new(policy, identity.public(), store.load_enrollments()?);
    let gate =
        Gate::new(identity.clone(), epoch, store.load_replay_windows()?).with_previous(previous);
    let journal = Journal::open(
        &config.journal_path(),
        config.journal.max_bytes,
        config.journal.keep,
    )?;
    tracing::info!(
        state_dir = %config.state_dir.display(),
        journal = %journal.path().display(),
        devices = core.devices().count(),
        enrolled = enrollments.count(protocol::v1::enroll::Decision::Accepted),
        pending = enrollments.count(protocol::v1::enroll::Decision::Pending),
        enrollment_mode = config.enrollment.mode.as_str(),
        "state loaded"
    );

    let started_ms = v1::now_ms();
    let own_status = topics::status(topics::COORDINATOR);
    let filters: Vec<String> = if config.watch_unknown_topics {
        vec![format!("{}/#", topics::ROOT)]
    } else {
        topics::COORDINATOR_FILTERS
            .iter()
            .chain(topics::COORDINATOR_DEPLOY_FILTERS.iter())
            .chain(std::iter::once(&topics::COORDINATOR_FL_FILTER))
            .chain(std::iter::once(&topics::COORDINATOR_REPLY_FILTER))
            .map(|f| (*f).to_owned())
            .collect()
    };
    let offload = Offload::start(&config.offload).await?;
    let mut filters = filters;
    let mut own_topics = vec![own_status.clone()];
    if let Some(o) = &offload {
        // The catch-all already delivers every request; a shared subscription beside it would
        // deliver each twice.
        if config.watch_unknown_topics {
            tracing::warn!(
                "watch_unknown_topics is on: offload requests are not shared with other replicas"
            );
        } else {
            filters.push(topics::COORDINATOR_OFFLOAD_FILTER.to_owned());
        }
        own_topics.push(o.advert_topic());
    }
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let mut service = Service {
        config: config.clone(),
        core,
        store,
        journal,
        rx,
        ready: false,
        started_ms,
        deploy: DeployHost::new(&config.state_dir),
        publishes: Vec::new(),
        fl: FlHost::new(
            &config.state_dir,
            config.store.fsync,
            identity.signing_key().clone(),
        ),
        offload,
        enrollments,
        gate,
        snapshot_stale: true,
        snapshot_last: None,
        acks: Default::default(),
        last_ack_flush: std::time::Instant::now(),
        held_back: 0,
        backlog_peak: 0,
        batches: BatchStats::default(),
        chains: Default::default(),
        view: std::sync::Arc::new(FleetView::new(config.api.history_samples, started_ms)),
        api: None,
        commands: std::sync::Arc::new(CommandBoard::new(started_ms)),
        command_file: std::sync::Arc::new(CommandFile::new(&config.state_dir)),
    };
    match service.command_file.load() {
        Ok(open) => {
            let restored = service.commands.restore(open);
            if restored > 0 {
                tracing::info!(commands = restored, path = %service.command_file.path().display(), "remote commands from the last run put back");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "remote commands of the last run lost; starting without them")
        }
    }
    service.recover_seen_ids()?;
    service.resume_rotation()?;
    service.prune()?;
    service.write_snapshot();
    service.view.update_devices(service.core.devices());
    service.view.set_enrollments(service.enrollments.records());
    service.refresh_view();
    if config.api.enabled {
        service.api = Some(
            crate::api::Server::start(
                &config.api,
                service.view.clone(),
                &config.state_dir,
                service.journal.path(),
                service.commands.clone(),
                service.command_file.clone(),
            )
            .await?,
        );
    }

    let transport = match mode {
        BrokerMode::Embedded => {
            // Sessions of the previous broker died with it; devices reconnect and say so.
            let out = service.core.broker_restarted();
            service.apply(out, v1::now_ms())?;
            service.commit()?;
            let embedded = Embedded::start(&config.embedded, filters, own_topics, tx).await?;
            let url = embedded.url();
            let mut transport = Transport::Embedded(embedded);
            service.publish_own_status(&mut transport, true).await?;
            service.ready(url, true)?;
            transport
        }
        BrokerMode::External { tls, host, port } => {
            // Signed now and published by the broker whenever it is: its counter is this time.
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
    deploy: DeployHost,
    /// Publishes the engines asked for while handling a batch; sealed and sent after its
    /// commit.
    publishes: Vec<Outgoing>,
    fl: FlHost,
    offload: Option<Offload>,
    /// Enrollment records and the policy for new ones.
    enrollments: Enrollments,
    /// Inbound verification, outbound sealing.
    gate: Gate,
    /// The enrollment snapshot file lags the records.
    snapshot_stale: bool,
    /// When the last snapshot was written and how long it took ([`Service::write_snapshot`]).
    snapshot_last: Option<(std::time::Instant, Duration)>,
    /// Committed messages (and resend hints) per device not yet acknowledged: sent by
    /// `flush_acks` at most every [`ACK_INTERVAL`], never before their commit.
    acks: std::collections::HashMap<String, AckSet>,
    last_ack_flush: std::time::Instant,
    /// Messages held back for an earlier one of their class (a broker lost it), since start.
    held_back: u64,
    /// The most bytes seen waiting for the external client's queue since the last stats line.
    backlog_peak: usize,
    /// Batch sizes and commit times since the last stats line.
    batches: BatchStats,
    /// How far a duplicate's ack may reach (`chains`).
    chains: crate::chains::Chains,
    /// What the HTTP API reads (`crate::api`); refreshed after each batch.
    view: std::sync::Arc<FleetView>,
    api: Option<crate::api::Server>,
    /// Remote commands the API queued; sent, expired and answered here.
    commands: std::sync::Arc<CommandBoard>,
    /// Where the open commands survive a restart (saved after each tick and reply).
    command_file: std::sync::Arc<CommandFile>,
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
        let mut deploy_tick = tokio::time::interval(DEPLOY_TICK);
        deploy_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut spool_poll = tokio::time::interval(SPOOL_POLL);
        spool_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut progress = tokio::time::interval(PROGRESS_INTERVAL);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut fl_tick = tokio::time::interval(FL_TICK);
        fl_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ack_flush = tokio::time::interval(ACK_INTERVAL);
        ack_flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut command_tick = tokio::time::interval(COMMAND_TICK);
        command_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut auth_summary = tokio::time::interval(AUTH_SUMMARY);
        auth_summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let advert_every = self
            .offload
            .as_ref()
            .map_or(Duration::from_secs(3600), Offload::advertise_interval);
        let mut advert = tokio::time::interval(advert_every);
        advert.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.resume_rollouts(&mut transport).await?;
        self.resume_fl(&mut transport).await?;

        let result = loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break Ok(()),
                inbound = self.rx.recv() => {
                    let Some(first) = inbound else {
                        break Err(ServiceError::TransportClosed("message channel closed".into()));
                    };
                    if let Err(e) = self.batch(first, &mut transport).await {
                        break Err(e);
                    }
                }
                _ = retry.tick(), if transport.has_deferred() => transport.retry_deferred(),
                _ = ack_flush.tick(), if !self.acks.is_empty() => if let Err(e) = self.flush_acks(&mut transport).await { break Err(e) },
                _ = deploy_tick.tick() => if let Err(e) = self.deploy_tick(&mut transport).await { break Err(e) },
                _ = spool_poll.tick() => {
                    if let Err(e) = self.pickup(&mut transport).await { break Err(e) }
                    if let Err(e) = self.enrollment_commands(&mut transport).await { break Err(e) }
                }
                _ = progress.tick() => {
                    self.write_progress();
                    self.write_snapshot();
                    self.refresh_view();
                }
                _ = fl_tick.tick() => if let Err(e) = self.fl_tick(&mut transport).await { break Err(e) },
                done = self.fl.next_evaluated() => if let Err(e) = self.fl_evaluated(vec![done], false) { break Err(e) },
                Some((topic, payload)) = next_answer(&mut self.offload) => {
                    let out = Outgoing::Publish { topic, payload, retain: false };
                    if let Err(e) = self.publish(&mut transport, out).await { break Err(e) }
                }
                _ = advert.tick(), if self.offload.is_some() => if let Some(o) = &self.offload {
                    let out = Outgoing::Publish { topic: o.advert_topic(), payload: o.advert(v1::now_ms()), retain: true };
                    if let Err(e) = self.publish(&mut transport, out).await { break Err(e) }
                },
                _ = command_tick.tick(), if self.commands.has_open() => if let Err(e) = self.command_tick(&mut transport).await { break Err(e) },
                _ = auth_summary.tick() => if let Err(e) = self.auth_summary() { break Err(e) },
                _ = stats.tick(), if self.config.stats_interval_s > 0 => self.log_stats(),
                _ = prune.tick() => if let Err(e) = self.prune() { break Err(e) },
            }
        };

        self.write_progress();
        // Evaluations already running finish and are recorded; see FlHost::shutdown.
        let evaluated = self.fl.shutdown().await;
        if let Err(e) = self.fl_evaluated(evaluated, true) {
            tracing::warn!(error = %e, "cannot record the last federated evaluations; they run again at the next start");
        }
        if let Some(o) = self.offload.take() {
            // An empty retained payload clears the advert: agents stop counting on us.
            let clear = Outgoing::Publish {
                topic: o.advert_topic(),
                payload: Vec::new(),
                retain: true,
            };
            if let Err(e) = self.publish(&mut transport, clear).await {
                tracing::warn!(error = %e, "could not clear the offload capacity advert");
            }
            o.shutdown().await;
        }
        if let Err(e) = self.auth_summary_now() {
            tracing::warn!(error = %e, "cannot journal the last dropped-message counts");
        }
        // Committed already: acknowledged now, or devices would send them again.
        if let Err(e) = self.flush_acks(&mut transport).await {
            tracing::warn!(error = %e, "could not send the last end-to-end acks; devices resend those messages");
        }
        // Stop taking messages first, so the pump is never stuck sending to us while the
        // transport flushes its disconnect.
        drop(std::mem::replace(&mut self.rx, mpsc::channel(1).1));
        if result.is_ok() {
            if let Err(e) = self.publish_own_status(&mut transport, false).await {
                tracing::warn!(error = %e, "could not publish offline status");
            }
            self.journal.append(v1::now_ms(), &Event::Stopped {})?;
            Event::Stopped {}.log();
        }
        let committed = self
            .store
            .save_replay_windows(&self.gate.take_moved_windows())
            .map_err(ServiceError::from)
            .and_then(|()| commit(&self.journal, &self.store, self.config.store.fsync));
        self.write_snapshot_now();
        if let Some(api) = self.api.take() {
            api.shutdown().await;
        }
        // After the API stopped: commands submitted until then are kept too.
        self.save_commands();
        transport.shutdown().await;
        result.and(committed)
    }

    /// Processes `first` and whatever else is already queued, commits, then acknowledges.
    async fn batch(
        &mut self,
        first: Inbound,
        transport: &mut Transport,
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
                    self.publish_own_status(transport, true).await?;
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
        self.auth_summary()?;
        let switched = self.key_switches()?;
        // Replay windows with the batch that moved them: after a restart, every counter an
        // acknowledged message used counts as seen.
        self.store
            .save_replay_windows(&self.gate.take_moved_windows())?;
        // Federated state first: the acks and the round messages below depend on it.
        self.fl.persist()?;
        let commit_started = std::time::Instant::now();
        self.commit()?;
        self.batches.add(acks.len(), commit_started.elapsed());
        for ack in acks {
            transport.ack(ack);
        }
        // `self.acks` now holds only committed messages. Sent here once ACK_INTERVAL has passed
        // (under load the loop always has a batch ready, so its timer arm alone would starve),
        // otherwise by that timer: a busy device gets one ack for several batches.
        if self.last_ack_flush.elapsed() >= ACK_INTERVAL {
            self.flush_acks(transport).await?;
        }
        if switched {
            self.finish_if_all_switched()?;
        }
        self.flush_publishes(transport).await?;
        self.write_snapshot();
        match closed {
            Some(reason) => Err(ServiceError::TransportClosed(reason)),
            None => Ok(()),
        }
    }

    /// Verifies one message (the gate: echoes of our own publishes are ignored, enrollment
    /// requests decided, unauthenticated messages dropped), then routes what passed, without
    /// its trailer, by what its topic means.
    fn message(&mut self, message: Message) -> Result<(), ServiceError> {
        let now = v1::now_ms();
        let parsed = Topic::parse(&message.topic);
        let len = match self.gate.verify(
            &mut self.enrollments,
            parsed.as_ref(),
            &message.topic,
            &message.payload,
            now,
        ) {
            Verdict::Echo | Verdict::Dropped { .. } => return Ok(()),
            Verdict::Enrollment => {
                return match &parsed {
                    Some(Topic::Enroll { device }) => {
                        self.enroll_request(device, &message.topic, &message.payload, now)
                    }
                    _ => Ok(()),
                };
            }
            Verdict::Route { len } => len,
        };
        let message = Message {
            payload: message.payload.slice(..len),
            ..message
        };
        // An outbox message is acknowledged end to end once committed, and processed only
        // after the previous one of its class that the device still held (`v1::ack`).
        let header = match parsed.as_ref() {
            Some(t) if t.from_outbox() => t
                .device()
                .zip(Header::peek(&message.payload))
                .map(|(d, h)| (d.to_owned(), h)),
            _ => None,
        };
        if let Some((device, h)) = &header
            && let Some(prev) = h.prev
            && !SeenIds::contains(&self.store, device, &v1::message_id(h.incarnation, prev))?
        {
            self.held_back += 1;
            tracing::debug!(device = %device, id = %h.id, prev, "holding back a message until the one before it arrives");
            self.acks
                .entry(device.clone())
                .or_default()
                .resend(h.incarnation, h.class, prev);
            return Ok(());
        }
        self.route(parsed, message, now)?;
        if let Some((device, h)) = header {
            // Core, deployments and refusals record the id already; updates do not.
            if !SeenIds::contains(&self.store, &device, &h.id)? {
                self.store.record(Some((&device, &h.id, now)), &[])?;
            }
            let through = self.chains.committed(&device, &h);
            self.acks.entry(device).or_default().committed_through(
                h.incarnation,
                h.class,
                h.seq,
                through,
            );
        }
        Ok(())
    }

    /// Routes a message that passed the gate by what its topic means.
    fn route(
        &mut self,
        parsed: Option<Topic>,
        message: Message,
        now: u64,
    ) -> Result<(), ServiceError> {
        match parsed {
            // Not reached: the gate ignores echoes and takes enrollment requests.
            Some(t) if t.from_coordinator() => Ok(()),
            Some(Topic::Deploy(t)) => self.deploy_message(t, &message.topic, &message.payload, now),
            Some(Topic::FlUpdate { device }) => {
                // Not deduplicated by envelope id: updates are idempotent by (task, round,
                // device), and the engine counts a second copy as a duplicate.
                let fleet = EnrolledFleet::new(&self.core, &self.enrollments);
                let actions = self.fl.on_update(&device, &message.payload, now, &fleet);
                self.actions(actions, now)
            }
            Some(Topic::CommandReply { device }) => {
                if let Err(e) = self.commands.on_reply(&device, &message.payload, now) {
                    tracing::warn!(device = %device, error = %e, "command reply not taken");
                }
                self.save_commands();
                self.journal_commands(now)
            }
            Some(Topic::OffloadRequest { device }) => {
                if let Some(o) = &mut self.offload {
                    o.submit(&device, &message.payload, now);
                }
                Ok(())
            }
            // Status, registration, telemetry, data, and anything outside the tree (the core
            // journals what it rejects, with the reason).
            Some(Topic::Device(_)) | None => self.device_message(message, now),
            // Every other kind is the coordinator's own (the first arm).
            Some(_) => Ok(()),
        }
    }

    /// What the core decides for a device's status, registration, telemetry or data.
    fn device_message(&mut self, message: Message, now: u64) -> Result<(), ServiceError> {
        let out = self
            .core
            .handle(&message.topic, &message.payload, now, &self.store)?;
        let registered = out.events.iter().find_map(|e| match e {
            Event::Registered { device, .. } => Some(device.clone()),
            _ => None,
        });
        self.apply(out, now)?;
        if let Some(device) = registered {
            self.joined(&device, now)?;
        }
        Ok(())
    }

    /// A device registered or was (re)enrolled: rollouts to its groups and federated tasks
    /// take it in, by the groups its enrollment gave it (the registration's own are ignored).
    fn joined(&mut self, device: &str, now: u64) -> Result<(), ServiceError> {
        let Some(groups) = EnrolledFleet::new(&self.core, &self.enrollments)
            .groups(device)
            .map(<[String]>::to_vec)
        else {
            return Ok(());
        };
        self.deploy.on_registered(device, &groups);
        let actions = self.fl.on_registered(device, &groups, now);
        self.actions(actions, now)
    }

    /// An enrollment request on `device`'s enroll topic.
    fn enroll_request(
        &mut self,
        device: &str,
        topic: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<(), ServiceError> {
        let out = self.enrollments.on_request(device, payload, now);
        if let Some(reason) = out.refused {
            self.gate.count_drop(reason, Some(device), topic, now);
        }
        self.enrollment_outcome(out, now)
    }

    /// Journals an enrollment decision, persists the record it changed and queues its answer
    /// for after the commit.
    fn enrollment_outcome(
        &mut self,
        out: crate::enrollment::Outcome,
        now: u64,
    ) -> Result<(), ServiceError> {
        self.journal_events(now, out.events)?;
        if let Some(record) = out.changed.as_deref().and_then(|d| self.enrollments.get(d)) {
            self.store.save_enrollment(record)?;
            self.snapshot_stale = true;
        }
        if let Some(a) = out.answer {
            self.publishes.push(Outgoing::Answer {
                answer: a.answer,
                retain: a.retain,
            });
        }
        if let Some(device) = out.accepted {
            self.joined(&device, now)?;
        }
        Ok(())
    }

    /// Operator decisions spooled by `devices approve|reject|revoke`: each is applied,
    /// committed, its answer published, and then its result written for the waiting command.
    async fn enrollment_commands(&mut self, transport: &mut Transport) -> Result<(), ServiceError> {
        let state_dir = self.config.state_dir.clone();
        let ids = match enrollment_files::pending_commands(&state_dir) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the enrollment command spool");
                return Ok(());
            }
        };
        if ids.is_empty() {
            return Ok(());
        }
        let now = v1::now_ms();
        let mut results = Vec::new();
        for id in ids {
            let command = match enrollment_files::take_command(&state_dir, &id) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(command = %id, error = %e, "enrollment command not applied");
                    let spooled = enrollment_files::spool_dir(&state_dir).join(&id);
                    if spooled.exists() {
                        // Not taken: moved aside so it is not tried again every poll.
                        let aside = spooled.with_file_name(format!(".refused-{id}"));
                        if let Err(e) = std::fs::rename(&spooled, &aside) {
                            tracing::error!(command = %id, error = %e, "cannot move the refused command aside");
                        }
                    } else {
                        // Taken but unreadable: the waiting command learns why.
                        let result = CommandResult {
                            ok: false,
                            state: None,
                            message: e.to_string(),
                        };
                        results.push((id, result));
                    }
                    continue;
                }
            };
            let Some(device) = command.device().map(str::to_owned) else {
                let result = self.key_command(&command, now)?;
                tracing::info!(command = %id, ok = result.ok, message = %result.message, "coordinator key command");
                results.push((id, result));
                continue;
            };
            let before = self.enrollments.get(&device).map(|r| r.state);
            let decided = match &command {
                Command::Approve { groups, .. } => {
                    self.enrollments.approve(&device, groups.clone(), now)
                }
                Command::Reject { reason, .. } => self.enrollments.reject(&device, reason, now),
                Command::Revoke { .. } => self.enrollments.revoke(&device, now),
                // Handled above.
                Command::Rotate {} | Command::FinishRotation {} => continue,
            };
            let result = match decided {
                Ok(out) => {
                    let changed = out.changed.is_some();
                    self.enrollment_outcome(out, now)?;
                    let record = self.enrollments.get(&device);
                    let state = record.map(|r| r.state);
                    let groups = record.map(|r| r.groups.join(",")).unwrap_or_default();
                    let what = state.map_or("unknown", |s| s.as_str());
                    let message = match (changed, state) {
                        (false, _) => format!(
                            "device {device} was already {what}; its answer was published again"
                        ),
                        (true, Some(protocol::v1::enroll::Decision::Accepted)) => format!(
                            "device {device} enrolled{}",
                            if groups.is_empty() {
                                String::new()
                            } else {
                                format!(" in groups {groups}")
                            }
                        ),
                        (true, _) => format!(
                            "device {device} {what} (was {})",
                            before.map_or("unknown", |s| s.as_str())
                        ),
                    };
                    CommandResult {
                        ok: true,
                        state,
                        message,
                    }
                }
                Err(e) => CommandResult {
                    ok: false,
                    state: before,
                    message: e.to_string(),
                },
            };
            tracing::info!(command = %id, %device, ok = result.ok, message = %result.message, "enrollment command");
            results.push((id, result));
        }
        self.fl.persist()?;
        self.commit()?;
        self.flush_publishes(transport).await?;
        self.write_snapshot_now();
        for (id, result) in results {
            if let Err(e) = enrollment_files::write_result(&state_dir, &id, &result) {
                tracing::warn!(command = %id, error = %e, "cannot write the enrollment command's result");
            }
        }
        Ok(())
    }

    /// `identity rotate [--finish]`, spooled like the enrollment decisions.
    fn key_command(&mut self, command: &Command, now: u64) -> Result<CommandResult, ServiceError> {
        let failed = |message: String| CommandResult {
            ok: false,
            state: None,
            message,
        };
        match command {
            Command::Rotate {} => {
                let (next, previous) =
                    match enrollment_files::rotate_identity(&self.config.state_dir) {
                        Ok(ids) => ids,
                        Err(e) => return Ok(failed(e.to_string())),
                    };
                let (old_key_id, new_key_id) = (previous.public().key_id(), next.public().key_id());
                self.gate.rotate(next.clone());
                self.fl.set_key(next.signing_key().clone());
                let announced = self.enrollments.rotate(next.public(), now);
                let devices: Vec<String> = announced
                    .answers
                    .iter()
                    .map(|a| a.answer.device.clone())
                    .collect();
                self.announced(announced)?;
                self.journal_events(
                    now,
                    [Event::CoordinatorKeyRotated {
                        old_key_id: old_key_id.clone(),
                        new_key_id: new_key_id.clone(),
                        devices_told: devices.len(),
                        devices: devices.clone(),
                    }],
                )?;
                let mut message = format!(
                    "coordinator key rotated from {old_key_id} to {new_key_id}; {} enrolled device(s) told",
                    devices.len()
                );
                if self.finish_if_all_switched()? {
                    message.push_str("; no device to wait for: the old key is deleted");
                } else {
                    message.push_str(
                        "; the old key is accepted from each until it uses the new one (identity rotate --finish ends that)",
                    );
                }
                Ok(CommandResult {
                    ok: true,
                    state: None,
                    message,
                })
            }
            Command::FinishRotation {} => {
                if self.gate.previous().is_none() {
                    return Ok(failed("no coordinator key rotation in progress".into()));
                }
                let (switched, not_switched) = self.enrollments.switch_counts();
                self.finish_rotation(false)?;
                Ok(CommandResult {
                    ok: true,
                    state: None,
                    message: format!(
                        "coordinator key rotation finished: old key deleted; {switched} device(s) switched{}",
                        if not_switched.is_empty() {
                            String::new()
                        } else {
                            format!(
                                ", refused from now on as they never used the new key: {}",
                                not_switched.join(",")
                            )
                        }
                    ),
                })
            }
            Command::Approve { .. } | Command::Reject { .. } | Command::Revoke { .. } => {
                Ok(failed("not a coordinator key command".into()))
            }
        }
    }

    /// Persists the records a rotation's announcement changed and queues its answers (signed
    /// with the old key by the gate) for after the commit.
    fn announced(
        &mut self,
        announced: crate::enrollment::core::Announcement,
    ) -> Result<(), ServiceError> {
        for device in &announced.changed {
            if let Some(record) = self.enrollments.get(device) {
                self.store.save_enrollment(record)?;
                self.snapshot_stale = true;
            }
        }
        for a in announced.answers {
            self.publishes.push(Outgoing::Answer {
                answer: a.answer,
                retain: a.retain,
            });
        }
        Ok(())
    }

    /// Start-up during a rotation: the announcement once more (the same answers, or new ones
    /// if a crash came between the key files and the records), unless every device switched.
    fn resume_rotation(&mut self) -> Result<(), ServiceError> {
        let Some(previous) = self.gate.previous() else {
            return Ok(());
        };
        let old_key_id = previous.public().key_id();
        if self.finish_if_all_switched()? {
            return Ok(());
        }
        let announced = self.enrollments.announce(v1::now_ms());
        let (switched, pending) = self.enrollments.switch_counts();
        tracing::info!(old_key_id = %old_key_id, new_key_id = %self.gate.public().key_id(), switched, pending = pending.len(), "coordinator key rotation in progress: announcing the new key again");
        self.announced(announced)?;
        self.commit()
    }

    /// Persists and journals the devices the gate saw switch to the new key; `true` if any did.
    fn key_switches(&mut self) -> Result<bool, ServiceError> {
        let switched = self.gate.take_switched();
        if switched.is_empty() {
            return Ok(false);
        }
        let key_id = self.gate.public().key_id();
        let pending = self.enrollments.switch_counts().1.len();
        for device in switched {
            if let Some(record) = self.enrollments.get(&device) {
                self.store.save_enrollment(record)?;
                self.snapshot_stale = true;
            }
            let event = Event::DeviceKeySwitched {
                device,
                key_id: key_id.clone(),
                pending,
            };
            self.journal_events(v1::now_ms(), [event])?;
        }
        Ok(true)
    }

    /// Finishes the rotation in progress if no enrolled device is left on the old key; `true`
    /// when it did.
    fn finish_if_all_switched(&mut self) -> Result<bool, ServiceError> {
        if self.gate.previous().is_none() || !self.enrollments.switch_counts().1.is_empty() {
            return Ok(false);
        }
        self.finish_rotation(true)?;
        Ok(true)
    }

    /// Deletes the old key (durably) and stops accepting anything under it.
    fn finish_rotation(&mut self, automatic: bool) -> Result<(), ServiceError> {
        enrollment_files::finish_rotation(&self.config.state_dir)?;
        let Some(old) = self.gate.finish_rotation() else {
            return Ok(());
        };
        let (switched, not_switched) = self.enrollments.switch_counts();
        let event = Event::CoordinatorKeyRotationFinished {
            old_key_id: old.key_id(),
            new_key_id: self.gate.public().key_id(),
            automatic,
            switched,
            not_switched,
            old_key_accepted: self.gate.old_key_accepted(),
        };
        self.journal_events(v1::now_ms(), [event])
    }

    /// Rewrites the enrollment snapshot (`devices pending` reads it) and the API's copy of the
    /// records if records changed, unless the last rewrite was too recent for its cost: both
    /// take every record, so rewriting them after each batch is quadratic while a fleet
    /// enrolls (10,000 simulated devices: the loop spent its time here and fell behind the
    /// broker). The rewrite waits until [`SNAPSHOT_DUTY`] times its last duration has passed;
    /// a small fleet's takes well under a millisecond, so it still follows every change. The
    /// progress tick writes what is left stale.
    fn write_snapshot(&mut self) {
        if let Some((at, took)) = self.snapshot_last
            && at.elapsed() < took.saturating_mul(SNAPSHOT_DUTY)
        {
            return;
        }
        self.write_snapshot_now();
    }

    /// [`Service::write_snapshot`] without the wait (start, shutdown, enrollment decisions).
    fn write_snapshot_now(&mut self) {
        if !self.snapshot_stale {
            return;
        }
        let started = std::time::Instant::now();
        self.view.set_enrollments(self.enrollments.records());
        match enrollment_files::write_snapshot(&self.config.state_dir, self.enrollments.records()) {
            Ok(()) => self.snapshot_stale = false,
            Err(e) => tracing::warn!(error = %e, "cannot write the enrollment snapshot"),
        }
        self.snapshot_last = Some((std::time::Instant::now(), started.elapsed()));
    }

    /// Journals the dropped-message counts if the last summary is old enough.
    fn auth_summary(&mut self) -> Result<(), ServiceError> {
        match self.gate.summary(v1::now_ms()) {
            Some(event) => self.journal_events(v1::now_ms(), [event]),
            None => Ok(()),
        }
    }

    /// At shutdown: the counts since the last summary, however recent it was.
    fn auth_summary_now(&mut self) -> Result<(), ServiceError> {
        match self.gate.summary(u64::MAX) {
            Some(event) => self.journal_events(v1::now_ms(), [event]),
            None => Ok(()),
        }
    }

    /// Start-up: resumes federated tasks (announcing open rounds again) and takes new ones.
    async fn resume_fl(&mut self, transport: &mut Transport) -> Result<(), ServiceError> {
        let now = v1::now_ms();
        let fleet = EnrolledFleet::new(&self.core, &self.enrollments);
        let actions = self.fl.resume(now, &fleet)?;
        self.actions(actions, now)?;
        self.journal.sync()?;
        self.flush_publishes(transport).await
    }

    /// New tasks, stop requests, deadlines and waiting rounds; publishes what they ask for
    /// (their state is already on disk).
    async fn fl_tick(&mut self, transport: &mut Transport) -> Result<(), ServiceError> {
        let now = v1::now_ms();
        let fleet = EnrolledFleet::new(&self.core, &self.enrollments);
        let actions = self.fl.tick(now, &fleet)?;
        if actions.is_empty() {
            return Ok(());
        }
        self.actions(actions, now)?;
        self.flush_publishes(transport).await
    }

    /// Evaluation outcomes: their events are journaled now; the state that says they are
    /// done is written by the next persist (the next batch or FL tick, at most [`FL_TICK`]
    /// away; at once when `persist_now`, at shutdown). A crash in between leaves them pending
    /// in `state.json`, so the restart evaluates again and the round's line repeats; it is
    /// never lost. Not written here: a state write with fsync per evaluation is loop time,
    /// which is what moving the evaluation off the loop was for.
    fn fl_evaluated(
        &mut self,
        done: Vec<crate::fl::worker::Evaluated>,
        persist_now: bool,
    ) -> Result<(), ServiceError> {
        if done.is_empty() {
            return Ok(());
        }
        let now = v1::now_ms();
        for d in done {
            let actions = self.fl.on_evaluated(d);
            self.actions(actions, now)?;
        }
        if persist_now {
            self.fl.persist()?;
        }
        Ok(())
    }

    /// Deployment traffic: statuses and resend requests from devices (deduplicated by
    /// envelope id like every other envelope), and the echo of our own manifests and chunks
    /// (ignored).
    fn deploy_message(
        &mut self,
        parsed: DeployTopic,
        topic: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<(), ServiceError> {
        let device = match parsed {
            DeployTopic::Status { device } | DeployTopic::Resend { device } => device,
            // Our own publishes, delivered back by the catch-all subscription.
            DeployTopic::Manifest { .. }
            | DeployTopic::Chunk { .. }
            | DeployTopic::GroupManifest { .. }
            | DeployTopic::GroupChunk { .. } => return Ok(()),
        };
        let is_status = topic == topics::deploy_status(&device);
        let reject = |reason: String| Event::Rejected {
            topic: topic.to_owned(),
            reason,
            device: Some(device.clone()),
        };
        let decoded: Result<(String, Option<DeployStatus>, Option<ResendRequest>), Event> =
            if payload.len() > v1::MAX_PAYLOAD_BYTES {
                Err(reject(format!(
                    "payload of {} bytes exceeds the limit of {} bytes",
                    payload.len(),
                    v1::MAX_PAYLOAD_BYTES
                )))
            } else if binary::is_binary(payload) {
                Err(reject("binary envelope on a json topic".into()))
            } else if is_status {
                Envelope::<DeployStatus>::from_json(payload, &device)
                    .map(|e| (e.id, Some(e.body), None))
                    .map_err(|e| reject(e.to_string()))
            } else {
                Envelope::<ResendRequest>::from_json(payload, &device)
                    .map(|e| (e.id, None, Some(e.body)))
                    .map_err(|e| reject(e.to_string()))
            };
        let (id, status, resend) = match decoded {
            Ok(d) => d,
            Err(event) => return self.journal_events(now, [event]),
        };
        if SeenIds::contains(&self.store, &device, &id)? {
            let event = Event::Duplicate {
                device: device.clone(),
                id,
                topic: topic.to_owned(),
            };
            return self.journal_events(now, [event]);
        }
        let actions = match (status, resend) {
            (Some(status), _) => self.deploy.on_status(&device, &id, &status, now),
            (_, Some(request)) => self.deploy.on_resend(&device, &request),
            _ => Vec::new(),
        };
        self.actions(actions, now)?;
        // Journaled first, remembered second: a crash in between repeats a line, never loses one.
        self.store.record(Some((&device, &id, now)), &[])?;
        Ok(())
    }

    fn journal_events(
        &mut self,
        now: u64,
        events: impl IntoIterator<Item = Event>,
    ) -> Result<(), ServiceError> {
        for event in events {
            self.journal.append(now, &event)?;
            event.log();
            self.view.count_events(std::slice::from_ref(&event));
        }
        Ok(())
    }

    /// Journals the engine's events now and keeps its publishes for after the commit.
    fn actions(&mut self, actions: Vec<Action>, now: u64) -> Result<(), ServiceError> {
        for action in actions {
            match action {
                Action::Event(event) => self.journal_events(now, [event])?,
                Action::Publish {
                    topic,
                    payload,
                    retain,
                } => self.publishes.push(Outgoing::Publish {
                    topic,
                    payload,
                    retain,
                }),
            }
        }
        Ok(())
    }

    async fn flush_publishes(&mut self, transport: &mut Transport) -> Result<(), ServiceError> {
        for out in std::mem::take(&mut self.publishes) {
            self.publish(transport, out).await?;
        }
        Ok(())
    }

    /// Sends the remote commands whose device is online, and lets the board expire and time
    /// out the others (`crate::commands`).
    async fn command_tick(&mut self, transport: &mut Transport) -> Result<(), ServiceError> {
        let due = {
            let (core, enrollments) = (&self.core, &self.enrollments);
            self.commands.due(v1::now_ms(), |device| {
                match enrollments.get(device).map(|r| r.state) {
                    Some(Decision::Accepted) => {
                        if core.device(device).is_some_and(|d| d.online) {
                            Presence::Online
                        } else {
                            Presence::Offline
                        }
                    }
                    Some(other) => Presence::NotEnrolled(other.as_str()),
                    None => Presence::NotEnrolled("not enrolled"),
                }
            })
        };
        let now = v1::now_ms();
        let sent = due.iter().map(|send| Event::CommandSent {
            device: send.device.clone(),
            command: send.request.id.clone(),
            kind: send.request.command.name(),
        });
        self.journal_events(now, sent.collect::<Vec<_>>())?;
        self.journal_commands(now)?;
        self.save_commands();
        for send in due {
            let out = Outgoing::Publish {
                topic: topics::cmd(&send.device, send.request.command.name()),
                payload: send.request.to_json(),
                retain: false,
            };
            self.publish(transport, out).await?;
        }
        Ok(())
    }

    /// Keeps the open remote commands on disk for a restart, if they changed. A failure loses
    /// them only if serve stops before the next save succeeds.
    fn save_commands(&self) {
        if let Err(e) = self.command_file.save(&self.commands) {
            tracing::error!(error = %e, "cannot keep the open remote commands for a restart");
        }
    }

    /// Journals the remote commands that ended since the last call.
    fn journal_commands(&mut self, now: u64) -> Result<(), ServiceError> {
        let ended = self
            .commands
            .take_finished()
            .into_iter()
            .map(|f| Event::CommandFinished {
                device: f.device,
                command: f.id,
                kind: f.kind,
                state: f.state,
                error: f.error,
            });
        self.journal_events(now, ended.collect::<Vec<_>>())
    }

    /// The one way out: seals `out` per its topic's rule (`Gate::seal`) and publishes it. A
    /// message that cannot be sealed (no session with its device) is not sent, and logged.
    async fn publish(
        &mut self,
        transport: &mut Transport,
        out: Outgoing,
    ) -> Result<(), ServiceError> {
        match self.gate.seal(&self.enrollments, out, v1::now_ms()) {
            Ok((topic, payload, retain)) => Ok(transport.publish(&topic, payload, retain).await?),
            Err(e) => {
                tracing::warn!(error = %e, "message not sent");
                Ok(())
            }
        }
    }

    /// Publishes the end-to-end acks gathered since the last flush: committed messages (and
    /// resend hints) per device, one `Ack` per outbox incarnation.
    async fn flush_acks(&mut self, transport: &mut Transport) -> Result<(), ServiceError> {
        self.last_ack_flush = std::time::Instant::now();
        for (device, set) in std::mem::take(&mut self.acks) {
            for ack in set.into_acks() {
                let out = Outgoing::Publish {
                    topic: topics::ack(&device),
                    payload: ack.to_json(),
                    retain: false,
                };
                self.publish(transport, out).await?;
            }
        }
        Ok(())
    }

    async fn publish_own_status(
        &mut self,
        transport: &mut Transport,
        online: bool,
    ) -> Result<(), ServiceError> {
        let out = Outgoing::Publish {
            topic: topics::status(topics::COORDINATOR),
            payload: own_status_json(online, self.started_ms),
            retain: true,
        };
        self.publish(transport, out).await
    }

    /// Publishes the next paced chunks (fewer, then none, while an external client's queue
    /// is backed up: [`DEPLOY_BACKLOG_BYTES`], [`DEPLOY_BACKLOG_MAX_BYTES`]) and ends
    /// expired rollouts.
    async fn deploy_tick(&mut self, transport: &mut Transport) -> Result<(), ServiceError> {
        let backlog = transport.backlog_bytes();
        self.backlog_peak = self.backlog_peak.max(backlog);
        let budget = match backlog {
            b if b <= DEPLOY_BACKLOG_BYTES => CHUNKS_PER_TICK,
            b if b <= DEPLOY_BACKLOG_MAX_BYTES => 1,
            _ => 0,
        };
        let now = v1::now_ms();
        let actions = self.deploy.tick(now, budget);
        if actions.is_empty() {
            return Ok(());
        }
        self.actions(actions, now)?;
        self.flush_publishes(transport).await
    }

    /// Start-up: resumes every rollout whose progress file says it is not finished, then
    /// picks up the spool.
    async fn resume_rollouts(&mut self, transport: &mut Transport) -> Result<(), ServiceError> {
        let now = v1::now_ms();
        let actions = self
            .deploy
            .resume(now, &EnrolledFleet::new(&self.core, &self.enrollments));
        self.actions(actions, now)?;
        self.write_progress();
        self.flush_publishes(transport).await?;
        self.pickup(transport).await
    }

    /// Takes new deployments from the spool and starts them.
    async fn pickup(&mut self, transport: &mut Transport) -> Result<(), ServiceError> {
        let now = v1::now_ms();
        let actions = self
            .deploy
            .pickup(now, &EnrolledFleet::new(&self.core, &self.enrollments));
        if actions.is_empty() {
            return Ok(());
        }
        self.actions(actions, now)?;
        self.journal.sync()?;
        // At once, so `deploy` sees the pick-up without waiting for the next interval.
        self.write_progress();
        self.flush_publishes(transport).await
    }

    fn write_progress(&mut self) {
        self.deploy.write_progress(v1::now_ms());
    }

    /// Figures the API shows that are not per message: the gate's drop totals, offload.
    fn refresh_view(&self) {
        self.view.set_auth_rejected(
            self.gate
                .drop_totals()
                .iter()
                .map(|(r, n)| ((*r).to_owned(), *n))
                .collect(),
        );
        self.view
            .set_offload(self.offload.as_ref().map(Offload::snapshot));
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
        self.view.update_devices(records.iter().copied());
        self.view.count_events(&out.events);
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

    /// Our status, signed (the will is signed at start and published by the broker later;
    /// devices order statuses by `since_ms`, not by the signature's counter).
    fn own_status(&mut self, online: bool) -> Vec<u8> {
        let out = Outgoing::Publish {
            topic: topics::status(topics::COORDINATOR),
            payload: own_status_json(online, self.started_ms),
            retain: true,
        };
        match self.gate.seal(&self.enrollments, out, v1::now_ms()) {
            Ok((_, payload, _)) => payload,
            // Not reached: a signed topic always seals.
            Err(_) => Vec::new(),
        }
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
        let now = v1::now_ms();
        match enrollment_files::prune_commands(
            &self.config.state_dir,
            now.saturating_sub(enrollment_files::KEEP_COMMANDS_MS),
        ) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pruned = n, "deleted old enrollment command results"),
            Err(e) => tracing::warn!(error = %e, "cannot delete old enrollment command results"),
        }
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

    fn log_stats(&mut self) {
        let t = self.core.totals();
        let batches = std::mem::take(&mut self.batches);
        tracing::info!(
            devices = self.core.devices().count(),
            devices_online = self.core.online_count(),
            messages = t.messages,
            duplicates = t.duplicates,
            rejected = t.rejected,
            ignored = t.ignored,
            seen_ids = self.store.seen_len(),
            held_back = self.held_back,
            batches = batches.batches,
            batch_mean = batches.mean_size(),
            batch_max = batches.largest,
            commit_ms_mean = batches.mean_commit_ms(),
            deployments = self.deploy.active_count(),
            fl_tasks = self.fl.active_count(),
            chunks_queued = self.deploy.queued(),
            chunks_sent = self.deploy.totals().chunks_sent,
            chunks_resent = self.deploy.totals().chunks_resent,
            chunks_rebroadcast = self.deploy.totals().chunks_rebroadcast,
            broker_backlog_peak_bytes = std::mem::take(&mut self.backlog_peak),
            resend_entries_ignored = self.deploy.totals().resend_entries_ignored,
            enrolled = self.enrollments.count(protocol::v1::enroll::Decision::Accepted),
            enrollment_pending = self.enrollments.count(protocol::v1::enroll::Decision::Pending),
            auth_rejected = self.gate.drop_totals().values().sum::<u64>(),
            key_rotation = self.gate.previous().is_some(),
            old_key_accepted = self.gate.old_key_accepted(),
            key_switched = self.enrollments.switch_counts().0,
            key_pending = self.enrollments.switch_counts().1.len(),
            auth_reasons = %self
                .gate
                .drop_totals()
                .iter()
                .map(|(r, n)| format!("{r}={n}"))
                .collect::<Vec<_>>()
                .join(" "),
            "stats"
        );
        if let Some(o) = &self.offload {
            o.log_stats();
        }
    }
}

/// Batches since the last stats line: how many messages each group commit covered and how
/// long the commits took (the service loop waits for them before it acknowledges).
#[derive(Debug, Default)]
struct BatchStats {
    batches: u64,
    messages: u64,
    largest: usize,
    commit: Duration,
}

impl BatchStats {
    fn add(&mut self, messages: usize, commit: Duration) {
        self.batches += 1;
        self.messages += messages as u64;
        self.largest = self.largest.max(messages);
        self.commit += commit;
    }

    fn mean_size(&self) -> f64 {
        self.messages as f64 / self.batches.max(1) as f64
    }

    fn mean_commit_ms(&self) -> f64 {
        self.commit.as_secs_f64() * 1000.0 / self.batches.max(1) as f64
    }
}

/// The offload service's next answer; pending forever without one.
async fn next_answer(offload: &mut Option<Offload>) -> Option<(String, Vec<u8>)> {
    match offload {
        Some(o) => o.next_answer().await,
        None => std::future::pending().await,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrollment::config::ClaimConfig;
    use protocol::v1::auth::{Identity, SessionKeys, Stamp};
    use protocol::v1::deploy::{SigningKey, public_key_hex};
    use protocol::v1::enroll::{EnrollRequest, Hardware, seal_request};
    use protocol::v1::{Class, Data};

    /// A service without a transport: messages go in through `Service::message`.
    fn service(dir: &std::path::Path, claim: &SigningKey) -> Service {
        let mut config = Config {
            state_dir: dir.to_owned(),
            ..Config::default()
        };
        config.enrollment.claims = vec![ClaimConfig {
            key: public_key_hex(&claim.verifying_key()),
            groups: vec!["lab".into()],
        }];
        let identity = Identity::generate();
        let store = Store::open(&config.db_path(), 1 << 20).expect("store");
        let journal = Journal::open(&config.journal_path(), 1 << 20, 1).expect("journal");
        let (_tx, rx) = mpsc::channel(1);
        Service {
            enrollments: Enrollments::new(
                config.enrollment.policy().expect("valid"),
                identity.public(),
                Vec::new(),
            ),
            gate: Gate::new(identity.clone(), 1, Vec::new()),
            fl: FlHost::new(dir, false, identity.signing_key().clone()),
            deploy: DeployHost::new(dir),
            core: Core::default(),
            store,
            journal,
            rx,
            ready: true,
            started_ms: 1,
            publishes: Vec::new(),
            offload: None,
            snapshot_stale: false,
            snapshot_last: None,
            acks: Default::default(),
            last_ack_flush: std::time::Instant::now(),
            held_back: 0,
            backlog_peak: 0,
            batches: BatchStats::default(),
            chains: Default::default(),
            view: std::sync::Arc::new(FleetView::new(10, 0)),
            api: None,
            commands: std::sync::Arc::new(CommandBoard::new(0)),
            command_file: std::sync::Arc::new(CommandFile::new(&config.state_dir)),
            config,
        }
    }

    fn message(topic: String, payload: Vec<u8>) -> Message {
        Message {
            topic,
            payload: payload.into(),
            ack: AckToken::None,
        }
    }

    fn journal(s: &Service) -> Vec<serde_json::Value> {
        std::fs::read_to_string(s.journal.path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn data(id: &str) -> Vec<u8> {
        Envelope {
            v: v1::VERSION,
            id: id.into(),
            device: "pi-1".into(),
            class: Class::Results,
            seq: 1,
            prev: None,
            created_ms: 1,
            body: Data {
                stream: "s".into(),
                payload: serde_json::json!({"x": 1}).into(),
            },
        }
        .to_json()
    }

    /// Enrolls pi-1 through the service; returns the device's session keys.
    fn enroll(s: &mut Service, claim: &SigningKey) -> SessionKeys {
        let device = Identity::generate();
        let request = EnrollRequest {
            v: v1::VERSION,
            device: "pi-1".into(),
            identity: device.public(),
            hardware: Hardware::default(),
            claim_key: Some(public_key_hex(&claim.verifying_key())),
            issued_ms: 1,
        };
        let bytes = seal_request(&request, &device, Some(claim));
        s.message(message(topics::enroll("pi-1"), bytes))
            .expect("handled");
        let coordinator = s.gate.public().clone();
        device
            .session_keys(&coordinator, "pi-1", &device.public(), &coordinator)
            .expect("keys")
    }

    #[test]
    fn messages_are_verified_at_the_entry_and_routed_without_their_trailer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let claim = SigningKey::from_bytes(&[4; 32]);
        let mut s = service(dir.path(), &claim);
        let topic = topics::data("pi-1", "s");

        // Before enrollment: dropped, not journaled, not in the registry.
        let stamp = |counter| Stamp { epoch: 5, counter };
        s.message(message(topic.clone(), data("m0"))).expect("ok");
        assert!(s.core.device("pi-1").is_none());

        let keys = enroll(&mut s, &claim);
        let lines = journal(&s);
        assert!(
            lines
                .iter()
                .any(|l| l["event"] == "device_enrolled" && l["groups"][0] == "lab"),
            "{lines:?}"
        );
        assert!(matches!(
            &s.publishes[..],
            [Outgoing::Answer { retain: true, .. }]
        ));
        assert!(s.store.load_enrollments().expect("loads").len() == 1);

        // A good message: the core sees the body alone (it would reject a trailer as bad json).
        let sealed = keys.up.seal(&topic, &data("m1"), stamp(1));
        s.message(message(topic.clone(), sealed.clone()))
            .expect("ok");
        // The same bytes again (a replay), a forged MAC, no trailer at all.
        s.message(message(topic.clone(), sealed)).expect("ok");
        let mut forged = keys.up.seal(&topic, &data("m2"), stamp(2));
        forged[3] ^= 1;
        s.message(message(topic.clone(), forged)).expect("ok");
        s.message(message(topic.clone(), data("m3"))).expect("ok");
        let lines = journal(&s);
        let data_lines: Vec<&serde_json::Value> =
            lines.iter().filter(|l| l["event"] == "data").collect();
        assert_eq!(data_lines.len(), 1, "{lines:?}");
        assert_eq!(data_lines[0]["id"], "m1");
        assert_eq!(data_lines[0]["payload"], serde_json::json!({"x": 1}));
        assert!(!lines.iter().any(|l| l["event"] == "rejected"), "{lines:?}");
        let totals: Vec<(&str, u64)> = s.gate.drop_totals().iter().map(|(r, n)| (*r, *n)).collect();
        assert_eq!(
            totals,
            vec![
                ("bad_mac", 1),
                ("no_trailer", 1),
                ("replay", 1),
                ("unenrolled", 1)
            ]
        );
        // The batch's end journals them, and moves the replay window into the store.
        s.auth_summary().expect("journals");
        let summary = journal(&s)
            .into_iter()
            .find(|l| l["event"] == "auth_rejected")
            .expect("summary");
        assert_eq!(summary["total"], 4);
        assert_eq!(s.gate.take_moved_windows(), vec![("pi-1".to_owned(), 5, 1)]);

        // A revoked device's messages are refused from then on.
        let out = s.enrollments.revoke("pi-1", v1::now_ms()).expect("known");
        s.enrollment_outcome(out, v1::now_ms()).expect("ok");
        let later = keys.up.seal(&topic, &data("m4"), stamp(3));
        s.message(message(topic, later)).expect("ok");
        assert_eq!(s.gate.drop_totals().get("revoked"), Some(&1));
    }

    /// An outbox message: id from incarnation 7 and `seq`, naming `prev`.
    fn outbox_data(seq: u64, prev: Option<u64>) -> Vec<u8> {
        Envelope {
            v: v1::VERSION,
            id: v1::message_id(7, seq),
            device: "pi-1".into(),
            class: Class::Results,
            seq,
            prev,
            created_ms: 1,
            body: Data {
                stream: "s".into(),
                payload: serde_json::json!({"seq": seq}).into(),
            },
        }
        .to_json()
    }

    #[test]
    fn outbox_messages_are_acknowledged_and_kept_in_order_per_class() {
        let dir = tempfile::tempdir().expect("tempdir");
        let claim = SigningKey::from_bytes(&[4; 32]);
        let mut s = service(dir.path(), &claim);
        let keys = enroll(&mut s, &claim);
        let topic = topics::data("pi-1", "s");
        let mut counter = 0;
        let mut send = |s: &mut Service, seq, prev| {
            counter += 1;
            let sealed = keys
                .up
                .seal(&topic, &outbox_data(seq, prev), Stamp { epoch: 5, counter });
            s.message(message(topic.clone(), sealed)).expect("ok");
        };
        // 1 arrives, 2 is lost by the broker, 3 (sent while 2 was held) waits for 2.
        send(&mut s, 1, None);
        send(&mut s, 3, Some(2));
        assert_eq!(s.held_back, 1);
        // The device sends again from its oldest: 2, then 3, and a duplicate of 1 (acked again).
        send(&mut s, 2, Some(1));
        send(&mut s, 3, Some(2));
        send(&mut s, 1, None);
        let seqs: Vec<u64> = journal(&s)
            .iter()
            .filter(|l| l["event"] == "data")
            .filter_map(|l| l["seq"].as_u64())
            .collect();
        assert_eq!(seqs, vec![1, 2, 3], "in order, once each");
        let acks = s.acks.remove("pi-1").expect("acks for pi-1").into_acks();
        assert_eq!(acks.len(), 1);
        assert_eq!(acks[0].inc, format!("{:016x}", 7));
        assert_eq!(acks[0].committed, vec![(Class::Results, 1, 3)]);
        assert_eq!(acks[0].resend, vec![(Class::Results, 2)]);
    }
}
