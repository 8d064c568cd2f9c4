//! Remote commands (`protocol::v1::command`): restart the pipeline, set the log level for a
//! while, fetch recent log lines, follow the log, show the effective configuration.
//!
//! Requests arrive through the inbox on `edge/v1/{device}/cmd/#` after the uplink checked
//! their MAC against the session's `down` key and its replay window (a forged or replayed
//! request never gets here; the uplink counts it in `AuthStats`). This task then refuses, and
//! counts, a body that does not parse or match its topic, a request past its expiry and an id
//! it has already run. Replies go out on the direct path (sealed by the uplink with the `up`
//! key, like everything the device sends), so they reach the coordinator only while connected;
//! a reply lost on the way shows up there as a timeout.
//!
//! ```text
//! uplink ─(MAC + replay checked)─► inbox ─► CommandTask ──restart──► pipeline host (weak handle)
//!                                              ├──level/lines──► logs::LogControl
//!                                              └──Reply──► direct path ─► uplink (sealed)
//! ```
//!
//! **Invariant:** one final reply per request it accepts; a log level override always returns
//! to the start-up filter when it runs out, or when the agent stops. Follows are bounded in
//! number ([`MAX_FOLLOWS`]) and time (the request's `for_s`). **Boundary:** spawned and joined by
//! `agent::run`.

pub mod logs;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use protocol::v1::command::{CommandKind, Outcome, Reply, ReplyBody, Request};
use protocol::v1::{self, topics};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;

use crate::inbox::{Inbox, Subscription};
use crate::link::{Direct, DirectSender};
use crate::pipeline::host::WeakHostHandle;
use logs::LogControl;

/// Requests waiting for the task.
pub const INBOX_CAPACITY: usize = 32;
/// Log follows running at once; more are refused.
pub const MAX_FOLLOWS: usize = 4;
/// Request ids remembered to refuse a second run.
const SEEN_IDS: usize = 1024;
/// How long a reply may wait on the direct path.
const REPLY_TTL: Duration = Duration::from_secs(30);
/// Most bytes of log text in one reply (the rest of a fetch is counted as dropped; a
/// follow sends another chunk), well under the payload limit with JSON escaping.
const REPLY_TEXT_BYTES: usize = v1::MAX_PAYLOAD_BYTES / 3;

/// Counts for `/metrics` and the tests.
#[derive(Debug, Default)]
pub struct CommandStats {
    /// Requests run (accepted).
    pub accepted: AtomicU64,
    /// Requests refused: malformed, for another device or kind than their topic.
    pub malformed: AtomicU64,
    /// Requests refused because their expiry had passed.
    pub expired: AtomicU64,
    /// Requests refused because their id had run already.
    pub duplicate: AtomicU64,
    /// Follow chunks dropped because the direct path was full.
    pub chunks_dropped: AtomicU64,
}

/// What the task needs, handed over by `agent::run`.
pub struct CommandDeps {
    pub device: String,
    /// The direct path to the uplink.
    pub direct: DirectSender,
    pub host: WeakHostHandle,
    /// `None` when this process does not capture its log (see [`logs`]).
    pub logs: Option<Arc<LogControl>>,
    /// The effective configuration, secrets redacted ([`redacted_config`]).
    pub config: String,
    pub stats: Arc<CommandStats>,
}

/// The command task; see the module docs.
pub struct CommandTask {
    deps: CommandDeps,
    seen: VecDeque<String>,
    /// When the log level override runs out.
    revert_at: Option<tokio::time::Instant>,
    follows: JoinSet<()>,
    /// Stop signals of running follows, by request id.
    stops: HashMap<String, watch::Sender<bool>>,
}

/// The topic filter the task subscribes to.
pub fn filter(device: &str) -> String {
    topics::cmd(device, "#")
}

impl CommandTask {
    pub fn new(deps: CommandDeps) -> CommandTask {
        CommandTask {
            deps,
            seen: VecDeque::new(),
            revert_at: None,
            follows: JoinSet::new(),
            stops: HashMap::new(),
        }
    }

    /// Subscribes on `inbox` (call before the uplink connects, so the broker subscription is
    /// in the first set).
    pub fn subscribe(inbox: &Inbox, device: &str) -> Subscription {
        inbox.subscribe(&filter(device), INBOX_CAPACITY)
    }

    /// Runs until `shutdown`; ends every follow and returns the log level to the start-up
    /// filter.
    pub async fn run(mut self, mut sub: Subscription, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                msg = sub.rx.recv() => match msg {
                    Some(m) => self.on_message(&m.topic, &m.payload).await,
                    None => break,
                },
                () = sleep_until(self.revert_at) => self.revert(),
                Some(_) = self.follows.join_next(), if !self.follows.is_empty() => {
                    self.stops.retain(|_, tx| !tx.is_closed());
                }
                _ = shutdown.changed() => break,
            }
        }
        for tx in self.stops.values() {
            let _ = tx.send(true);
        }
        while self.follows.join_next().await.is_some() {}
        if self.revert_at.is_some() {
            self.revert();
        }
    }

    fn revert(&mut self) {
        self.revert_at = None;
        if let Some(control) = &self.deps.logs {
            match control.set(control.base()) {
                Ok(()) => tracing::info!(level = %control.base(), "log level override ended"),
                Err(e) => tracing::warn!(error = %e, "cannot return to the start-up log level"),
            }
        }
    }

    async fn on_message(&mut self, topic: &str, payload: &[u8]) {
        let stats = self.deps.stats.clone();
        let Some(topics::DeviceTopic::Cmd { device, name }) = topics::parse(topic) else {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic, "dropping a command on an unexpected topic");
            return;
        };
        let request = match Request::from_json(payload, &device, &name) {
            Ok(r) => r,
            Err(e) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(topic, error = %e, "refusing a malformed command");
                return;
            }
        };
        if self.seen.contains(&request.id) {
            stats.duplicate.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(command = %name, id = %request.id, "refusing a command that already ran");
            return;
        }
        self.seen.push_back(request.id.clone());
        if self.seen.len() > SEEN_IDS {
            self.seen.pop_front();
        }
        if request.expires_ms < v1::now_ms() {
            stats.expired.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(command = %name, id = %request.id, "refusing a command that arrived after its expiry");
            self.reply(
                &request.id,
                ReplyBody::Failed {
                    error: "the command arrived after its expiry".into(),
                },
            )
            .await;
            return;
        }
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(command = %name, id = %request.id, "running remote command");
        let body = self.run_command(&request).await;
        if let Some(body) = body {
            self.reply(&request.id, body).await;
        }
    }

    /// The reply to send now; `None` for a follow (its task replies).
    async fn run_command(&mut self, request: &Request) -> Option<ReplyBody> {
        let done = |summary: String| ReplyBody::Done {
            outcome: Outcome {
                summary,
                ..Outcome::default()
            },
        };
        let failed = |error: String| ReplyBody::Failed { error };
        let no_logs = || failed("this agent process does not capture its log".into());
        Some(match &request.command {
            CommandKind::RestartPipeline => match self.deps.host.upgrade() {
                None => failed("the pipeline host has stopped (agent stopping)".into()),
                Some(host) => match host.restart().await {
                    Ok(Some(name)) => {
                        tracing::info!(pipeline = %name, "pipeline restarted by a remote command");
                        done(format!("pipeline {name} restarted"))
                    }
                    Ok(None) => failed("no pipeline runs on this device".into()),
                    Err(e) => failed(format!("pipeline restart failed: {e}")),
                },
            },
            CommandKind::LogLevel { level, for_s } => match &self.deps.logs {
                None => no_logs(),
                Some(control) => match control.set(level) {
                    Ok(()) => {
                        self.revert_at =
                            Some(tokio::time::Instant::now() + Duration::from_secs(*for_s));
                        tracing::info!(level = %level, for_s, "log level set by a remote command");
                        done(format!(
                            "log level {level} for {for_s} s, then {}",
                            control.base()
                        ))
                    }
                    Err(e) => failed(e),
                },
            },
            CommandKind::Logs { lines } => match &self.deps.logs {
                None => no_logs(),
                Some(control) => {
                    let (all, evicted) = control.last(*lines as usize);
                    let (lines, cut) = fit(all, REPLY_TEXT_BYTES);
                    ReplyBody::Done {
                        outcome: Outcome {
                            summary: format!("{} log lines", lines.len()),
                            lines,
                            dropped: evicted + cut,
                            config: None,
                        },
                    }
                }
            },
            CommandKind::Follow { for_s } => match &self.deps.logs {
                None => no_logs(),
                Some(_) if self.stops.len() >= MAX_FOLLOWS => failed(format!(
                    "{MAX_FOLLOWS} log follows already run on this device"
                )),
                Some(control) => {
                    let (tx, rx) = watch::channel(false);
                    self.stops.insert(request.id.clone(), tx);
                    let follow = Follow {
                        device: self.deps.device.clone(),
                        id: request.id.clone(),
                        direct: self.deps.direct.clone(),
                        stats: self.deps.stats.clone(),
                    };
                    let lines = control.follow();
                    let until = tokio::time::Instant::now() + Duration::from_secs(*for_s);
                    self.follows.spawn(follow.run(lines, until, rx));
                    return None;
                }
            },
            CommandKind::StopFollow { follow } => match self.stops.remove(follow) {
                Some(tx) => {
                    let _ = tx.send(true);
                    done(format!("follow {follow} stopped"))
                }
                None => failed(format!("no log follow {follow} runs")),
            },
            CommandKind::Config => ReplyBody::Done {
                outcome: Outcome {
                    summary: "effective configuration, secrets redacted".into(),
                    config: Some(serde_json::Value::String(self.deps.config.clone())),
                    ..Outcome::default()
                },
            },
        })
    }

    async fn reply(&self, id: &str, body: ReplyBody) {
        send(&self.deps.direct, &self.deps.device, id, body).await;
    }
}

/// Sends a final reply, waiting for room on the direct path (bounded).
async fn send(direct: &DirectSender, device: &str, id: &str, body: ReplyBody) {
    let payload = Reply::new(device, id, body).to_json();
    let d = Direct {
        topic: topics::reply(device),
        payload,
        expires: Instant::now() + REPLY_TTL,
    };
    if tokio::time::timeout(REPLY_TTL, direct.send(d))
        .await
        .is_err()
    {
        tracing::warn!(
            id,
            "command reply not sent: the uplink's direct path stayed full"
        );
    }
}

/// The newest of `lines` that fit in `budget` bytes, and how many were left out.
fn fit(lines: Vec<String>, budget: usize) -> (Vec<String>, u64) {
    let mut used = 0;
    let mut keep = 0;
    for l in lines.iter().rev() {
        if used + l.len() + 8 > budget {
            break;
        }
        used += l.len() + 8;
        keep += 1;
    }
    let cut = lines.len() - keep;
    (lines.into_iter().skip(cut).collect(), cut as u64)
}

/// One running log follow.
struct Follow {
    device: String,
    id: String,
    direct: DirectSender,
    stats: Arc<CommandStats>,
}

impl Follow {
    /// Sends each new line as soon as it is written (with whatever else is already waiting),
    /// until `until` or a stop.
    async fn run(
        self,
        mut lines: broadcast::Receiver<Arc<str>>,
        until: tokio::time::Instant,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut seq = 0u64;
        let mut lost = 0u64;
        let why = loop {
            let first = tokio::select! {
                r = lines.recv() => r,
                () = tokio::time::sleep_until(until) => break "ran out of time",
                _ = stop.changed() => break "stopped",
            };
            let mut batch = Vec::new();
            let mut bytes = 0;
            let mut next = first;
            loop {
                match next {
                    Ok(line) => {
                        bytes += line.len() + 8;
                        batch.push(line.to_string());
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => lost += n,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
                if bytes >= REPLY_TEXT_BYTES {
                    break;
                }
                next = match lines.try_recv() {
                    Ok(l) => Ok(l),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Err(broadcast::error::RecvError::Lagged(n))
                    }
                    Err(_) => break,
                };
            }
            if batch.is_empty() && lost == 0 {
                continue;
            }
            let body = ReplyBody::Lines {
                seq,
                lines: batch,
                dropped: std::mem::take(&mut lost),
            };
            seq += 1;
            let d = Direct {
                topic: topics::reply(&self.device),
                payload: Reply::new(&self.device, &self.id, body).to_json(),
                expires: Instant::now() + REPLY_TTL,
            };
            if self.direct.try_send(d).is_err() {
                self.stats.chunks_dropped.fetch_add(1, Ordering::Relaxed);
            }
        };
        let body = ReplyBody::Done {
            outcome: Outcome {
                summary: format!("log follow ended: {why}"),
                ..Outcome::default()
            },
        };
        send(&self.direct, &self.device, &self.id, body).await;
    }
}

/// Resolves at `at`; never without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The configuration as the agent runs it, printed, with every secret replaced by
/// `<redacted>` (today the broker password; keys live in files the config only names).
pub fn redacted_config(cfg: &crate::config::Config) -> String {
    let mut c = cfg.clone();
    if !c.mqtt.password.is_empty() {
        c.mqtt.password = "<redacted>".into();
    }
    format!("{c:#?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_the_newest_lines_within_the_budget() {
        let lines: Vec<String> = (0..10).map(|i| format!("{i:02}")).collect();
        let (kept, cut) = fit(lines.clone(), 30);
        assert_eq!(kept, ["07", "08", "09"]);
        assert_eq!(cut, 7);
        assert_eq!(fit(lines, 10_000).1, 0);
    }

    #[test]
    fn the_config_shows_no_password() {
        let mut cfg = crate::config::Config::default();
        cfg.mqtt.password = "hunter2-secret".into();
        let text = redacted_config(&cfg);
        assert!(!text.contains("hunter2-secret"));
        assert!(text.contains("<redacted>"));
        assert!(text.contains("state_dir"));
    }

    fn task(direct: DirectSender) -> CommandTask {
        CommandTask::new(CommandDeps {
            device: "pi-1".into(),
            direct,
            // A host that has gone: restart must fail, naming why.
            host: WeakHostHandle::gone(),
            logs: None,
            config: "cfg".into(),
            stats: Arc::default(),
        })
    }

    fn request(id: &str, expires_ms: u64, command: CommandKind) -> (String, Vec<u8>) {
        let r = Request {
            v: v1::VERSION,
            id: id.into(),
            device: "pi-1".into(),
            expires_ms,
            command,
        };
        (topics::cmd("pi-1", r.command.name()), r.to_json())
    }

    async fn reply(rx: &mut crate::link::DirectReceiver) -> Reply {
        let d = rx.try_recv().expect("a reply was sent");
        assert_eq!(d.topic, topics::reply("pi-1"));
        Reply::from_json(&d.payload, "pi-1").expect("a valid reply")
    }

    #[tokio::test]
    async fn requests_are_answered_or_refused_and_counted() {
        let (tx, mut rx) = crate::link::direct_path(8);
        let mut t = task(tx);
        let later = v1::now_ms() + 60_000;
        let (topic, body) = request("c1", later, CommandKind::Config);
        t.on_message(&topic, &body).await;
        let r = reply(&mut rx).await;
        assert_eq!(r.id, "c1");
        assert!(matches!(r.body, ReplyBody::Done { ref outcome } if outcome.config.is_some()));

        // The same id again: refused without a reply.
        t.on_message(&topic, &body).await;
        assert!(rx.try_recv().is_err());
        assert_eq!(t.deps.stats.duplicate.load(Ordering::Relaxed), 1);

        // Expired: refused with a reply that says so.
        let (topic, body) = request("c2", 1, CommandKind::Config);
        t.on_message(&topic, &body).await;
        assert!(
            matches!(reply(&mut rx).await.body, ReplyBody::Failed { ref error } if error.contains("expiry"))
        );
        assert_eq!(t.deps.stats.expired.load(Ordering::Relaxed), 1);

        // On another kind's topic: refused, counted, no reply.
        let (_, body) = request("c3", later, CommandKind::Config);
        t.on_message(&topics::cmd("pi-1", "logs"), &body).await;
        assert!(rx.try_recv().is_err());
        assert_eq!(t.deps.stats.malformed.load(Ordering::Relaxed), 1);

        // No log capture, no host: failures that name the cause.
        let (topic, body) = request("c4", later, CommandKind::Logs { lines: 5 });
        t.on_message(&topic, &body).await;
        assert!(
            matches!(reply(&mut rx).await.body, ReplyBody::Failed { ref error } if error.contains("capture"))
        );
        let (topic, body) = request("c5", later, CommandKind::RestartPipeline);
        t.on_message(&topic, &body).await;
        assert!(
            matches!(reply(&mut rx).await.body, ReplyBody::Failed { ref error } if error.contains("stopped"))
        );
        assert_eq!(t.deps.stats.accepted.load(Ordering::Relaxed), 3);
    }
}
