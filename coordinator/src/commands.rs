//! Remote commands to devices (`protocol::v1::command`): the board every command lives on
//! from the operator's request to its result.
//!
//! The HTTP API puts a command on the [`CommandBoard`] (`queued`); the service loop, the only
//! part that publishes, takes the due ones every tick ([`CommandBoard::due`]): a queued command
//! whose device is online is sent (`sent`, with an expiry on the wire of now + its timeout),
//! one that waited past its `expires_ms` becomes `expired`, one for a device that is no longer
//! enrolled `failed` (naming the state), and a sent one without a final reply by its deadline
//! `timed-out`. Replies come back through the gate (MAC'd by the device) to
//! [`CommandBoard::on_reply`]: `done` with the outcome, `failed` with the device's reason, and
//! for a log follow the lines as they arrive. Handlers read the board and wait on its version
//! ([`CommandBoard::changed`]) instead of polling.
//!
//! The board is in memory; its open commands (queued for an offline device, or sent and
//! waiting for the reply) are also kept in `state_dir/commands.json` by [`CommandFile`], which
//! the API saves before it answers a submit and the service loop whenever that set changed
//! (after each state change and reply, and at shutdown), so a restarted `serve` puts them back on the board with
//! their expiry: a command whose device comes online is sent then, one that waited past its
//! expiry reports `expired`, and a sent one still takes its reply (or times out).
//! Finished commands are not kept (their result was reported; the journal has it).
//!
//! **Invariant:** every command ends in exactly one final state; the board holds at most
//! [`MAX_COMMANDS`] commands and [`MAX_LINES`] lines per follow. The board does no I/O (only
//! [`CommandFile`] does). **Boundary:** the API submits and reads; the service loop sends,
//! expires, records replies and saves.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use protocol::v1::command::{CommandKind, Outcome, Reply, ReplyBody, Request};
use protocol::v1::{self, VERSION};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Commands kept (finished ones are forgotten oldest first beyond this).
pub const MAX_COMMANDS: usize = 1000;
/// Commands not yet final at once; more are refused.
pub const MAX_OPEN: usize = 256;
/// Lines kept per follow (the oldest go first; readers see the gap).
pub const MAX_LINES: usize = 5000;

/// Where a command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Waiting for its device to be online.
    Queued,
    /// Published; waiting for the device's reply.
    Sent,
    /// The device ran it.
    Done,
    /// The device refused it or it failed there, or the device is not enrolled.
    Failed,
    /// Its device was not online before the command's expiry.
    Expired,
    /// Sent, but no final reply came in time.
    TimedOut,
}

impl State {
    pub fn is_final(self) -> bool {
        !matches!(self, State::Queued | State::Sent)
    }
}

/// One command as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CommandRecord {
    pub id: String,
    pub device: String,
    #[schema(value_type = Object)]
    pub command: CommandKind,
    pub state: State,
    pub created_ms: u64,
    /// The command expires (if still queued) at this time.
    pub expires_ms: u64,
    /// Seconds the device has to answer once the command is sent.
    pub timeout_s: u64,
    pub sent_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// What the device returned (`done`).
    #[schema(value_type = Option<Object>)]
    pub outcome: Option<Outcome>,
    /// Why it did not succeed (`failed`, `expired`, `timed-out`).
    pub error: Option<String>,
    /// Follow lines received, counted from the start (the first kept one has number
    /// `lines_total - lines.len()`).
    pub lines_total: u64,
    /// Lines the device reported lost (its follower lagged) or that the board forgot.
    pub lines_dropped: u64,
    #[serde(skip)]
    lines: VecDeque<String>,
    /// Follow chunks seen, to count gaps.
    #[serde(skip)]
    next_chunk: u64,
}

impl CommandRecord {
    /// Lines numbered `after` and later (at most `max`), with the number of the next one.
    pub fn lines_from(&self, after: u64, max: usize) -> (Vec<String>, u64) {
        let first = self.lines_total - self.lines.len() as u64;
        let skip = after.saturating_sub(first) as usize;
        let lines: Vec<String> = self.lines.iter().skip(skip).take(max).cloned().collect();
        let next = first.max(after) + lines.len() as u64;
        (lines, next)
    }
}

/// Why a command was not accepted onto the board.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
    #[error("{MAX_OPEN} commands are already waiting; try again when some have finished")]
    Full,
}

/// Counts for `/metrics` and logs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub submitted: u64,
    /// By final state (`done`, `failed`, `expired`, `timed-out`).
    pub finished: BTreeMap<&'static str, u64>,
    /// Replies naming no command on the board (late, after a restart, or not ours).
    pub unknown_replies: u64,
}

/// A command that ended, for the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub device: String,
    pub id: String,
    pub kind: &'static str,
    pub state: &'static str,
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Board {
    records: BTreeMap<String, CommandRecord>,
    /// Ended since the loop last took them (`take_finished`).
    finished: Vec<Finished>,
    /// Ids in submission order, for forgetting the oldest finished ones.
    order: VecDeque<String>,
    next: u64,
    totals: Totals,
    /// Raised whenever the set of open commands or their states changes (what
    /// [`CommandFile`] saves).
    open_changes: u64,
}

/// A command not final yet, as [`CommandFile`] keeps it across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenCommand {
    pub id: String,
    pub device: String,
    pub command: CommandKind,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub timeout_s: u64,
    /// When it was sent; absent while queued.
    pub sent_ms: Option<u64>,
}

/// See the module docs.
#[derive(Debug)]
pub struct CommandBoard {
    board: Mutex<Board>,
    /// Raised at every change; handlers wait on it.
    version: watch::Sender<u64>,
    /// Makes ids unique across coordinator starts.
    prefix: String,
}

/// What the loop must publish for a command now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub device: String,
    pub request: Request,
}

/// The device facts the loop knows when it takes due commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Enrolled and online.
    Online,
    /// Enrolled, offline.
    Offline,
    /// Not enrolled any more (revoked, rejected) or never: the state's name.
    NotEnrolled(&'static str),
}

impl CommandBoard {
    pub fn new(started_ms: u64) -> CommandBoard {
        CommandBoard {
            board: Mutex::default(),
            version: watch::channel(0).0,
            prefix: format!("{started_ms:x}"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        // Writers only insert or update whole values: a poisoned lock is still consistent.
        self.board.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// A receiver that wakes on every change.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Puts a command for `device` on the board; its id.
    pub fn submit(
        &self,
        device: &str,
        command: CommandKind,
        timeout_s: u64,
        wait_s: u64,
        now_ms: u64,
    ) -> Result<String, SubmitError> {
        v1::validate_device_id(device).map_err(|e| SubmitError::Invalid(e.to_string()))?;
        command
            .validate()
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        let mut b = self.lock();
        if b.records.values().filter(|r| !r.state.is_final()).count() >= MAX_OPEN {
            return Err(SubmitError::Full);
        }
        b.next += 1;
        let id = format!("c{}-{}", self.prefix, b.next);
        let record = CommandRecord {
            id: id.clone(),
            device: device.to_owned(),
            command,
            state: State::Queued,
            created_ms: now_ms,
            expires_ms: now_ms + wait_s * 1000,
            timeout_s,
            sent_ms: None,
            finished_ms: None,
            outcome: None,
            error: None,
            lines_total: 0,
            lines_dropped: 0,
            lines: VecDeque::new(),
            next_chunk: 0,
        };
        b.records.insert(id.clone(), record);
        b.order.push_back(id.clone());
        b.totals.submitted += 1;
        b.open_changes += 1;
        while b.order.len() > MAX_COMMANDS {
            // Forget the oldest finished command; open ones stay (at most MAX_OPEN).
            let Some(pos) = b
                .order
                .iter()
                .position(|i| b.records.get(i).is_none_or(|r| r.state.is_final()))
            else {
                break;
            };
            if let Some(old) = b.order.remove(pos) {
                b.records.remove(&old);
            }
        }
        drop(b);
        self.bump();
        Ok(id)
    }

    /// Commands that ended since the last call, for the journal.
    pub fn take_finished(&self) -> Vec<Finished> {
        std::mem::take(&mut self.lock().finished)
    }

    pub fn get(&self, id: &str) -> Option<CommandRecord> {
        self.lock().records.get(id).cloned()
    }

    pub fn totals(&self) -> Totals {
        self.lock().totals.clone()
    }

    /// Whether anything waits for the loop (it skips the tick otherwise).
    pub fn has_open(&self) -> bool {
        self.lock().records.values().any(|r| !r.state.is_final())
    }

    /// Takes what is due at `now_ms`: commands to send, and final states for those that
    /// expired, timed out or whose device left the fleet. `presence` says where a device is.
    pub fn due(&self, now_ms: u64, presence: impl Fn(&str) -> Presence) -> Vec<Send> {
        let mut out = Vec::new();
        let mut changed = false;
        let mut b = self.lock();
        let Board {
            records,
            totals,
            finished: ended,
            ..
        } = &mut *b;
        for r in records.values_mut() {
            match r.state {
                State::Queued => match presence(&r.device) {
                    Presence::NotEnrolled(state) => {
                        let error = format!("device {} is {state}", r.device);
                        finish(r, totals, ended, State::Failed, Some(error), now_ms);
                        changed = true;
                    }
                    _ if now_ms > r.expires_ms => {
                        let waited = (now_ms - r.created_ms) / 1000;
                        let error = format!(
                            "device {} was not online within {waited} s; the command expired unsent",
                            r.device
                        );
                        finish(r, totals, ended, State::Expired, Some(error), now_ms);
                        changed = true;
                    }
                    Presence::Online => {
                        r.state = State::Sent;
                        r.sent_ms = Some(now_ms);
                        out.push(Send {
                            device: r.device.clone(),
                            request: Request {
                                v: VERSION,
                                id: r.id.clone(),
                                device: r.device.clone(),
                                expires_ms: now_ms + r.timeout_s * 1000,
                                command: r.command.clone(),
                            },
                        });
                        changed = true;
                    }
                    Presence::Offline => {}
                },
                State::Sent => {
                    let sent = r.sent_ms.unwrap_or(now_ms);
                    if now_ms > sent + deadline_ms(r) {
                        let error = format!(
                            "device {} did not answer within {} s",
                            r.device,
                            deadline_ms(r) / 1000
                        );
                        finish(r, totals, ended, State::TimedOut, Some(error), now_ms);
                        changed = true;
                    }
                }
                _ => {}
            }
        }
        if changed {
            b.open_changes += 1;
        }
        drop(b);
        if changed {
            self.bump();
        }
        out
    }

    /// Every open command and the change count they were taken at.
    pub fn open_commands(&self) -> (u64, Vec<OpenCommand>) {
        let b = self.lock();
        let open = b
            .order
            .iter()
            .filter_map(|id| b.records.get(id))
            .filter(|r| !r.state.is_final())
            .map(|r| OpenCommand {
                id: r.id.clone(),
                device: r.device.clone(),
                command: r.command.clone(),
                created_ms: r.created_ms,
                expires_ms: r.expires_ms,
                timeout_s: r.timeout_s,
                sent_ms: r.sent_ms,
            })
            .collect();
        (b.open_changes, open)
    }

    /// Puts back the open commands an earlier run kept (queued, or sent and waiting for the
    /// reply), with their ids and expiry; the next [`CommandBoard::due`] sends, expires or
    /// times them out as usual. Ids already on the board, and more than [`MAX_OPEN`], are
    /// skipped.
    pub fn restore(&self, open: Vec<OpenCommand>) -> usize {
        let mut b = self.lock();
        let mut restored = 0;
        for c in open {
            if b.records.contains_key(&c.id) || restored >= MAX_OPEN {
                continue;
            }
            let record = CommandRecord {
                id: c.id.clone(),
                device: c.device,
                command: c.command,
                state: if c.sent_ms.is_some() {
                    State::Sent
                } else {
                    State::Queued
                },
                created_ms: c.created_ms,
                expires_ms: c.expires_ms,
                timeout_s: c.timeout_s,
                sent_ms: c.sent_ms,
                finished_ms: None,
                outcome: None,
                error: None,
                lines_total: 0,
                lines_dropped: 0,
                lines: VecDeque::new(),
                next_chunk: 0,
            };
            b.records.insert(c.id.clone(), record);
            b.order.push_back(c.id);
            restored += 1;
        }
        drop(b);
        if restored > 0 {
            self.bump();
        }
        restored
    }

    /// Records a reply that passed the gate on `device`'s reply topic; `Err` says why it was
    /// not taken (logged by the caller).
    pub fn on_reply(&self, device: &str, payload: &[u8], now_ms: u64) -> Result<(), String> {
        let reply = Reply::from_json(payload, device).map_err(|e| e.to_string())?;
        let mut b = self.lock();
        let Board {
            records,
            totals,
            finished: ended,
            open_changes,
            ..
        } = &mut *b;
        let Some(r) = records.get_mut(&reply.id).filter(|r| r.device == device) else {
            totals.unknown_replies += 1;
            return Err(format!("reply to unknown command {}", reply.id));
        };
        if r.state.is_final() {
            return Err(format!("reply to command {} that already ended", reply.id));
        }
        match reply.body {
            ReplyBody::Lines {
                seq,
                lines,
                dropped,
            } => {
                // A chunk lost on the way shows as a gap in the sequence.
                let gap = seq.saturating_sub(r.next_chunk);
                r.next_chunk = r.next_chunk.max(seq + 1);
                r.lines_dropped += dropped + gap;
                r.lines_total += lines.len() as u64;
                r.lines.extend(lines);
                while r.lines.len() > MAX_LINES {
                    r.lines.pop_front();
                }
            }
            ReplyBody::Done { outcome } => {
                r.outcome = Some(outcome);
                finish(r, totals, ended, State::Done, None, now_ms);
                *open_changes += 1;
            }
            ReplyBody::Failed { error } => {
                finish(r, totals, ended, State::Failed, Some(error), now_ms);
                *open_changes += 1;
            }
        }
        drop(b);
        self.bump();
        Ok(())
    }
}

/// Why the open commands cannot be read or kept.
#[derive(Debug, thiserror::Error)]
pub enum CommandFileError {
    #[error("remote commands file {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("remote commands file {path} is not valid: {error}")]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
}

/// The board's open commands on disk (`state_dir/commands.json`): a JSON list of
/// [`OpenCommand`], replaced whole (temporary file, fsync, rename) when it changed.
#[derive(Debug)]
pub struct CommandFile {
    path: PathBuf,
    /// The board's change count at the last save.
    saved: Mutex<Option<u64>>,
}

impl CommandFile {
    pub fn new(state_dir: &Path) -> CommandFile {
        CommandFile {
            path: state_dir.join("commands.json"),
            saved: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open commands an earlier run kept; none when there is no file.
    pub fn load(&self) -> Result<Vec<OpenCommand>, CommandFileError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => {
                return Err(CommandFileError::Io {
                    path: self.path.clone(),
                    error,
                });
            }
        };
        serde_json::from_slice(&bytes).map_err(|error| CommandFileError::Parse {
            path: self.path.clone(),
            error,
        })
    }

    /// Writes the board's open commands if they changed since the last save; whether it wrote.
    pub fn save(&self, board: &CommandBoard) -> Result<bool, CommandFileError> {
        let mut saved = self.saved.lock().unwrap_or_else(PoisonError::into_inner);
        let (changes, open) = board.open_commands();
        if *saved == Some(changes) {
            return Ok(false);
        }
        let json = serde_json::to_vec(&open).map_err(|error| CommandFileError::Parse {
            path: self.path.clone(),
            error,
        })?;
        crate::spooldir::replace_file(&self.path, &json, true).map_err(|error| {
            CommandFileError::Io {
                path: self.path.clone(),
                error,
            }
        })?;
        *saved = Some(changes);
        Ok(true)
    }
}

/// The stable name of a state (as the API and the journal write it).
pub fn state_name(state: State) -> &'static str {
    match state {
        State::Queued => "queued",
        State::Sent => "sent",
        State::Done => "done",
        State::Failed => "failed",
        State::Expired => "expired",
        State::TimedOut => "timed-out",
    }
}

fn finish(
    r: &mut CommandRecord,
    totals: &mut Totals,
    ended: &mut Vec<Finished>,
    state: State,
    error: Option<String>,
    now_ms: u64,
) {
    r.state = state;
    r.error = error.clone();
    r.finished_ms = Some(now_ms);
    let name = state_name(state);
    *totals.finished.entry(name).or_default() += 1;
    ended.push(Finished {
        device: r.device.clone(),
        id: r.id.clone(),
        kind: r.command.name(),
        state: name,
        error,
    });
}

/// How long after sending a final reply may come: the timeout, plus a follow's own time.
fn deadline_ms(r: &CommandRecord) -> u64 {
    let running = match &r.command {
        CommandKind::Follow { for_s } => *for_s,
        _ => 0,
    };
    (r.timeout_s + running) * 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(id: &str, body: ReplyBody) -> Vec<u8> {
        Reply::new("pi-1", id, body).to_json()
    }

    #[test]
    fn a_command_waits_for_its_device_then_runs_once() {
        let board = CommandBoard::new(1);
        let id = board
            .submit("pi-1", CommandKind::Config, 10, 60, 1000)
            .expect("ok");
        assert!(board.due(2000, |_| Presence::Offline).is_empty());
        let sent = board.due(3000, |_| Presence::Online);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].request.id, id);
        assert_eq!(sent[0].request.expires_ms, 13_000);
        assert!(
            board.due(4000, |_| Presence::Online).is_empty(),
            "sent once"
        );
        let done = ReplyBody::Done {
            outcome: Outcome {
                summary: "ok".into(),
                ..Outcome::default()
            },
        };
        board
            .on_reply("pi-1", &reply(&id, done.clone()), 5000)
            .expect("taken");
        let r = board.get(&id).expect("kept");
        assert_eq!(r.state, State::Done);
        assert_eq!(r.outcome.map(|o| o.summary), Some("ok".into()));
        // A second final reply, one from another device, one for an unknown id: not taken.
        assert!(
            board
                .on_reply("pi-1", &reply(&id, done.clone()), 5000)
                .is_err()
        );
        assert!(
            board
                .on_reply(
                    "pi-2",
                    &Reply::new("pi-2", &id, done.clone()).to_json(),
                    5000
                )
                .is_err()
        );
        assert!(board.on_reply("pi-1", &reply("nope", done), 5000).is_err());
        assert!(board.on_reply("pi-1", b"{", 5000).is_err());
        assert_eq!(board.totals().unknown_replies, 2);
    }

    #[test]
    fn offline_expires_silence_times_out_and_revoked_fails() {
        let board = CommandBoard::new(1);
        let wait = board
            .submit("pi-1", CommandKind::Config, 10, 5, 0)
            .expect("ok");
        let silent = board
            .submit("pi-2", CommandKind::Config, 10, 5, 0)
            .expect("ok");
        let revoked = board
            .submit("pi-3", CommandKind::Config, 10, 5, 0)
            .expect("ok");
        let presence = |d: &str| match d {
            "pi-2" => Presence::Online,
            "pi-3" => Presence::NotEnrolled("revoked"),
            _ => Presence::Offline,
        };
        assert_eq!(board.due(1000, presence).len(), 1);
        board.due(6000, presence);
        let expired = board.get(&wait).expect("kept");
        assert_eq!(expired.state, State::Expired);
        assert!(expired.error.unwrap_or_default().contains("not online"));
        let failed = board.get(&revoked).expect("kept");
        assert_eq!(failed.state, State::Failed);
        assert_eq!(failed.error.as_deref(), Some("device pi-3 is revoked"));
        assert_eq!(board.get(&silent).expect("kept").state, State::Sent);
        board.due(11_001, presence);
        assert_eq!(board.get(&silent).expect("kept").state, State::TimedOut);
        assert!(!board.has_open());
        let ended: Vec<(String, &str)> = board
            .take_finished()
            .into_iter()
            .map(|f| (f.device, f.state))
            .collect();
        assert_eq!(
            ended,
            [
                ("pi-3".to_owned(), "failed"),
                ("pi-1".to_owned(), "expired"),
                ("pi-2".to_owned(), "timed-out")
            ]
        );
        assert!(board.take_finished().is_empty());
    }

    #[test]
    fn follow_lines_are_numbered_and_gaps_counted() {
        let board = CommandBoard::new(1);
        let id = board
            .submit("pi-1", CommandKind::Follow { for_s: 30 }, 10, 60, 0)
            .expect("ok");
        board.due(0, |_| Presence::Online);
        let chunk = |seq, lines: &[&str]| ReplyBody::Lines {
            seq,
            lines: lines.iter().map(|l| (*l).to_owned()).collect(),
            dropped: 0,
        };
        board
            .on_reply("pi-1", &reply(&id, chunk(0, &["a", "b"])), 1)
            .expect("ok");
        board
            .on_reply("pi-1", &reply(&id, chunk(2, &["c"])), 2)
            .expect("ok");
        let r = board.get(&id).expect("kept");
        assert_eq!(
            r.lines_from(0, 10),
            (vec!["a".into(), "b".into(), "c".into()], 3)
        );
        assert_eq!(r.lines_from(2, 10), (vec!["c".into()], 3));
        assert_eq!(r.lines_from(3, 10), (vec![], 3));
        assert_eq!(r.lines_dropped, 1, "chunk 1 never came");
        // Still running within for_s + timeout.
        board.due(39_000, |_| Presence::Online);
        assert_eq!(board.get(&id).expect("kept").state, State::Sent);
    }

    #[test]
    fn bad_commands_and_too_many_are_refused() {
        let board = CommandBoard::new(1);
        assert!(matches!(
            board.submit("no such/id", CommandKind::Config, 10, 10, 0),
            Err(SubmitError::Invalid(_))
        ));
        assert!(matches!(
            board.submit("pi-1", CommandKind::Logs { lines: 0 }, 10, 10, 0),
            Err(SubmitError::Invalid(e)) if e.contains("lines")
        ));
        for _ in 0..MAX_OPEN {
            board
                .submit("pi-1", CommandKind::Config, 10, 10, 0)
                .expect("room");
        }
        assert_eq!(
            board.submit("pi-1", CommandKind::Config, 10, 10, 0),
            Err(SubmitError::Full)
        );
    }

    /// Open commands saved by one board come back on the next with their expiry: a queued one
    /// past it expires, a sent one still takes its reply; finished ones are not kept.
    #[test]
    fn open_commands_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = CommandFile::new(dir.path());
        assert!(file.load().expect("no file yet").is_empty());
        let board = CommandBoard::new(1);
        let queued = board
            .submit("pi-1", CommandKind::Config, 10, 5, 1000)
            .expect("ok");
        let later = board
            .submit("pi-2", CommandKind::Config, 10, 600, 1000)
            .expect("ok");
        let done = board
            .submit("pi-3", CommandKind::Config, 10, 600, 1000)
            .expect("ok");
        let sent = board.due(2000, |d| {
            if d == "pi-1" {
                Presence::Offline
            } else {
                Presence::Online
            }
        });
        assert_eq!(sent.len(), 2);
        let ok = ReplyBody::Done {
            outcome: Outcome::default(),
        };
        board
            .on_reply(
                "pi-3",
                &Reply::new("pi-3", &done, ok.clone()).to_json(),
                2500,
            )
            .expect("taken");
        assert!(file.save(&board).expect("saves"));
        assert!(!file.save(&board).expect("unchanged"), "written once");

        let restarted = CommandBoard::new(2);
        assert_eq!(restarted.restore(file.load().expect("loads")), 2);
        assert!(restarted.get(&done).is_none(), "finished ones are not kept");
        assert_eq!(restarted.get(&later).map(|r| r.state), Some(State::Sent));
        // Past its expiry (1000 + 5 s) and still offline: expired, named.
        assert!(restarted.due(7000, |_| Presence::Offline).is_empty());
        let r = restarted.get(&queued).expect("kept");
        assert_eq!(r.state, State::Expired);
        assert!(r.error.is_some_and(|e| e.contains("expired")));
        restarted
            .on_reply("pi-2", &Reply::new("pi-2", &later, ok).to_json(), 7100)
            .expect("the sent one takes its reply");
        assert_eq!(restarted.get(&later).map(|r| r.state), Some(State::Done));
        assert!(file.save(&restarted).expect("saves"));
        assert!(file.load().expect("loads").is_empty());
        std::fs::write(file.path(), b"[{").expect("write");
        let e = file.load().expect_err("garbage").to_string();
        assert!(e.contains("commands.json"), "{e}");
    }
}
