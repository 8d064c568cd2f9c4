//! The edge coordinator: fleet registry, telemetry and the data journal, behind an embedded
//! MQTT broker or an external one.
//!
//! ```text
//! agents --MQTT--> broker (embedded rumqttd | external) --> transport pump --channel-->
//!   service loop: gate (enrolled? MAC? replay?) -> core.handle (no I/O) -> journal line
//!   -> sled (seen id, registry, replay windows) -> commit -> ack
//! ```
//!
//! Entry point: [`run`] with a [`Config`] and a shutdown future; the binary adds the CLI.
//!
//! The code map (each module with its Invariant and Boundary) is in ARCHITECTURE.md, section
//! `coordinator/`; it is kept there only, so it cannot drift from a second copy here.
//!
//! Errors: each module has its own `thiserror` enum whose message already contains the
//! underlying error (a field named `error`, deliberately not a `#[source]`), so the binary's
//! `{:#}` and log lines print each cause once.
//!
//! Journal events (one JSON object per line; extra fields may appear):
//! `ready {broker, embedded}`, `online {device, since_ms}`, `offline {device}`,
//! `registered {device, boot_id, agent_version}`,
//! `telemetry {device, id, seq, cpu_percent, mem_used_bytes, agent_rss_bytes, outbox_depth}`,
//! `data {device, id, class, seq, stream, created_ms, payload}`, `duplicate {device, id}`,
//! `rejected {topic, reason}`, `stopped`,
//! `deployment_started {deployment_id, version, target, devices, resumed}`,
//! `deploy {device, id, deployment_id, version, step, reason?, received?, total?,
//! chunks_dropped?}`,
//! `deploy_resend {device, deployment_id, chunks, rebroadcast, ignored}`,
//! `deploy_rebroadcast {deployment_id, artifact, index, devices}`,
//! `deployment_finished {deployment_id, version, reason, healthy, failed, in_progress}`,
//! `rollout_decision {deployment_id, decision, wave?, devices, healthy, failed, reason?}`,
//! `fl_task_started {task, model, members, rounds, weights, round, version, resumed}`,
//! `fl_round_opened {task, round, version, selected, deadline_ms, members}`,
//! `fl_round_waiting {task, round, reason}`,
//! `fl_round_extended {task, round, received, min_updates, added, deadline_ms}`,
//! `fl_update {task, device, id, round, applied_round, staleness, samples, loss, bytes}`,
//! `fl_update_rejected {task?, device, round?, reason, detail}`,
//! `fl_round_closed {task, round, version, new_version, opened_ms, closed_ms, close_reason,
//! extensions, selected, received, on_time, late, rejected {reason: n}, duplicates, bytes_in,
//! bytes_out, train_loss?, train_accuracy?, eval_accuracy?, eval_loss?, eval_rows?, eval_note?}`
//! (for a task with a held-out set, journaled when its evaluation is in: `closed_ms` is the
//! close, `ts_ms` the line),
//! `fl_task_finished {task, reason, rounds_closed, version}`,
//! `device_enrolled {device, key_id, by, claim_key_id?, groups, hardware}` (`by`: claim,
//! operator, allowlist),
//! `enrollment_pending {device, key_id, claim_key?, hardware}`,
//! `enrollment_rejected {device, key_id, by, reason}` (`by`: policy, operator),
//! `enrollment_conflict {device, key_id, enrolled_key_id, state, hardware}`,
//! `device_revoked {device, key_id, previous, groups}`,
//! `command_sent {device, command, kind}`,
//! `command_finished {device, command, kind, state, error?}` (`state`: done, failed, expired,
//! timed-out),
//! `auth_rejected {reasons {reason: n}, total, devices, since_ms}` (at most every 10 s);
//! every line has `ts_ms`.

pub mod action;
pub mod api;
pub mod chains;
pub mod commands;
pub mod config;
pub mod core;
pub mod deploy;
pub mod enrollment;
pub mod event;
pub mod fl;
pub mod journal;
pub mod offload;
pub mod registry;
pub mod service;
pub mod spooldir;
pub mod store;
pub mod transport;

pub use config::Config;
pub use service::{ServiceError, run};
