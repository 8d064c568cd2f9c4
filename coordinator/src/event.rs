//! Operational events: each is one journal line and one log line, emitted together.
//!
//! The journal line shapes are a contract (tests and the demo tail the journal): the `event`
//! tag and the fields named in the crate docs must not change; fields may be added.

use protocol::v1::Class;
use serde::Serialize;

/// Why a device was marked offline without its own status message.
pub const OFFLINE_BROKER_RESTART: &str = "embedded broker restarted";

/// Everything the coordinator journals.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Subscribed (and, for the embedded broker, listening): devices can be served.
    Ready { broker: String, embedded: bool },
    /// A device's status says online (a new session).
    Online {
        device: String,
        since_ms: u64,
        agent_version: String,
    },
    /// A device's status (usually its last will) says offline, or the coordinator knows the
    /// session ended (`reason`).
    Offline {
        device: String,
        since_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'static str>,
    },
    /// A device announced itself (every agent start).
    Registered {
        device: String,
        id: String,
        boot_id: String,
        agent_version: String,
        hostname: String,
        os: String,
        arch: String,
    },
    /// A telemetry sample (summary; the full sample is in the registry).
    Telemetry {
        device: String,
        id: String,
        seq: u64,
        created_ms: u64,
        cpu_percent: f32,
        mem_used_bytes: u64,
        mem_total_bytes: u64,
        agent_rss_bytes: u64,
        outbox_depth: [u64; 4],
        /// The running pipeline's per-stage figures, when one runs.
        #[serde(skip_serializing_if = "Option::is_none")]
        pipeline: Option<Box<protocol::v1::PipelineTelemetry>>,
        /// Federated-learning counters, when the device has taken part in a task.
        #[serde(skip_serializing_if = "Option::is_none")]
        fl: Option<Box<protocol::v1::FlTelemetry>>,
        /// Offload decisions by side and reason, fallbacks, the measured link.
        #[serde(skip_serializing_if = "Option::is_none")]
        offload: Option<Box<protocol::v1::OffloadTelemetry>>,
        /// The device's own authentication refusals (forged answers, adverts) and whether it
        /// is enrolled, so an attack on a device shows at the coordinator.
        #[serde(skip_serializing_if = "Option::is_none")]
        auth: Option<Box<protocol::v1::AuthTelemetry>>,
    },
    /// An application message from a device's local API.
    Data {
        device: String,
        id: String,
        class: Class,
        seq: u64,
        stream: String,
        created_ms: u64,
        payload: protocol::v1::DataPayload,
    },
    /// A message id seen before (at-least-once redelivery); dropped.
    Duplicate {
        device: String,
        id: String,
        topic: String,
    },
    /// A malformed, oversized or misplaced message; dropped.
    Rejected {
        topic: String,
        reason: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        device: Option<String>,
    },
    /// A spooled deployment was picked up (or resumed after a restart) and its manifest
    /// published; `devices` are the targets known so far.
    DeploymentStarted {
        deployment_id: String,
        version: u64,
        target: String,
        devices: Vec<String>,
        resumed: bool,
    },
    /// A device reported a deployment step (`step` is the wire name: downloading, verifying,
    /// starting, healthy, rolled_back, failed, rejected); `chunks_dropped`, when the agent
    /// dropped any: chunks of this deployment it refused so far (forged or damaged data,
    /// wrong length, unknown artifact or index), each asked for again.
    Deploy {
        device: String,
        id: String,
        deployment_id: String,
        version: u64,
        step: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        received: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        total: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        chunks_dropped: Option<u64>,
    },
    /// A device asked for chunks again: how many are being resent to it, how many a group
    /// broadcast answers (queued already, or a rebroadcast this request started), how many
    /// asked-for entries were ignored (unknown deployment, digest or index, or over the
    /// per-request bound).
    DeployResend {
        device: String,
        deployment_id: String,
        chunks: u32,
        #[serde(default)]
        rebroadcast: u32,
        ignored: u32,
    },
    /// So many devices of a group rollout waited for the same chunk that it goes out once
    /// more on the group chunk topic instead of once per device.
    DeployRebroadcast {
        deployment_id: String,
        /// The artifact's digest.
        artifact: String,
        index: u32,
        devices: u32,
    },
    /// A deployment ended: every target device is final, the manifest expired, a newer
    /// deployment replaced it on the same topic, or its package was invalid.
    DeploymentFinished {
        deployment_id: String,
        version: u64,
        reason: String,
        healthy: usize,
        failed: usize,
        in_progress: usize,
    },
    /// A staged rollout (`--strategy canary`) decided something: `launched` a wave (`devices`
    /// got the manifest), a wave's `gate_passed` (its soak starts), `halted` (the updated
    /// `devices` are being rolled back), `paused`, `resumed`.
    RolloutDecision {
        deployment_id: String,
        decision: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        wave: Option<usize>,
        devices: Vec<String>,
        healthy: usize,
        failed: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A federated task was picked up from the spool (or resumed after a restart).
    FlTaskStarted {
        task: String,
        model: String,
        members: String,
        rounds: u32,
        weights: usize,
        round: u32,
        version: u32,
        resumed: bool,
    },
    /// A round opened: the selected devices got a train order, every member the weights.
    FlRoundOpened {
        task: String,
        round: u32,
        version: u32,
        selected: Vec<String>,
        deadline_ms: u64,
        members: usize,
    },
    /// A round cannot open yet (too few members online); journaled when the reason changes.
    FlRoundWaiting {
        task: String,
        round: u32,
        reason: String,
    },
    /// The deadline passed with fewer than `min_updates` updates: the round goes on, with
    /// `added` devices selected on top.
    FlRoundExtended {
        task: String,
        round: u32,
        received: u32,
        min_updates: u32,
        added: Vec<String>,
        deadline_ms: u64,
    },
    /// An update was accepted into `applied_round` (later than `round` for a late update).
    FlUpdate {
        task: String,
        device: String,
        id: String,
        round: u32,
        applied_round: u32,
        staleness: u32,
        samples: u32,
        loss: f32,
        bytes: u64,
    },
    /// An update was refused (`reason`: malformed, unknown_task, task_finished, unregistered,
    /// unknown_round, not_selected, duplicate, base_version, wrong_length, bad_payload,
    /// non_finite, late_dropped); the aggregate is untouched.
    FlUpdateRejected {
        #[serde(skip_serializing_if = "Option::is_none")]
        task: Option<String>,
        device: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        round: Option<u32>,
        reason: &'static str,
        detail: String,
    },
    /// A selected device reported that it could not train a round (`kind`: model, data,
    /// resources, timeout; `reason`: the device's own words).
    FlTrainFailed {
        task: String,
        device: String,
        round: u32,
        kind: &'static str,
        reason: String,
    },
    /// A round ended without a new global version: every selected device failed, or no
    /// update came within `max_extensions` deadlines; the reasons per device.
    FlRoundFailed {
        task: String,
        round: u32,
        reason: String,
        failures: Vec<crate::fl::state::DeviceFailure>,
    },
    /// A round was aggregated into a new global version; its metrics.
    FlRoundClosed {
        task: String,
        #[serde(flatten)]
        metrics: Box<crate::fl::RoundMetrics>,
    },
    /// A task ended (`completed` after its last round, or stopped).
    FlTaskFinished {
        task: String,
        reason: String,
        rounds_closed: u32,
        version: u32,
    },
    /// A device was enrolled (or its groups changed): its messages are accepted from now on.
    /// `by` is `claim` (then `claim_key_id` names the key), `operator` or `allowlist`.
    DeviceEnrolled {
        device: String,
        key_id: String,
        by: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        claim_key_id: Option<String>,
        groups: Vec<String>,
        hardware: protocol::v1::enroll::Hardware,
    },
    /// A new enrollment request waits for an operator (`devices pending`, `devices approve`);
    /// `claim_key` is a claim key the request named that this coordinator does not list.
    EnrollmentPending {
        device: String,
        key_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        claim_key: Option<String>,
        hardware: protocol::v1::enroll::Hardware,
    },
    /// An enrollment request was refused, by the policy (an id not in the allowlist) or by an
    /// operator.
    EnrollmentRejected {
        device: String,
        key_id: String,
        by: &'static str,
        reason: String,
    },
    /// A request for an id that is enrolled (or waiting) under another key: refused, the
    /// record untouched.
    EnrollmentConflict {
        device: String,
        key_id: String,
        enrolled_key_id: String,
        state: &'static str,
        hardware: protocol::v1::enroll::Hardware,
    },
    /// A remote command went out to its device (`crate::commands`).
    CommandSent {
        device: String,
        command: String,
        kind: &'static str,
    },
    /// A remote command ended: `state` is done, failed, expired or timed-out; `error` says why
    /// it did not succeed.
    CommandFinished {
        device: String,
        command: String,
        kind: &'static str,
        state: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// An operator revoked a device: its messages are refused from now on.
    DeviceRevoked {
        device: String,
        key_id: String,
        previous: &'static str,
        groups: Vec<String>,
    },
    /// Messages dropped at the service entry because they did not authenticate, by reason
    /// (`unenrolled`, `not_enrolled`, `revoked`, `no_trailer`, `bad_mac`, `replay`,
    /// `max_pending`, ...), since `since_ms` (0: since start); at most one line per 10 s.
    /// `devices` names up to 16 of the devices concerned.
    AuthRejected {
        reasons: std::collections::BTreeMap<String, u64>,
        total: u64,
        devices: Vec<String>,
        since_ms: u64,
    },
    /// `identity rotate` applied: a new online key signs and MACs everything from now on; every
    /// enrolled device was sent an answer naming it, signed with the old key (`devices`, the
    /// ones told). Until the rotation finishes, each device's messages are accepted under either
    /// key, and under the new one only once it used it.
    CoordinatorKeyRotated {
        old_key_id: String,
        new_key_id: String,
        devices_told: usize,
        devices: Vec<String>,
    },
    /// A device sent its first message under the coordinator's new key: its old session keys
    /// are refused from now on.
    DeviceKeySwitched {
        device: String,
        key_id: String,
        /// Enrolled devices still on the old key.
        pending: usize,
    },
    /// The rotation ended (`identity rotate --finish`, or every device switched: `automatic`):
    /// the old key file is deleted and nothing under the old key is accepted. `not_switched`
    /// names the enrolled devices that never used the new key (they are refused until they
    /// trust it). `old_key_accepted`: messages accepted under the old key during the transition.
    CoordinatorKeyRotationFinished {
        old_key_id: String,
        new_key_id: String,
        automatic: bool,
        switched: usize,
        not_switched: Vec<String>,
        old_key_accepted: u64,
    },
    /// Clean shutdown finished; nothing after this line until the next `ready`.
    Stopped {},
}

impl Event {
    /// Emits the log line for this event. Rejects are WARN (degraded input, processing goes
    /// on); per-message events are DEBUG so a busy fleet does not flood the log.
    pub fn log(&self) {
        match self {
            Event::Ready { broker, embedded } => {
                tracing::info!(%broker, embedded, "coordinator ready")
            }
            Event::Online {
                device,
                since_ms,
                agent_version,
            } => {
                tracing::info!(%device, since_ms, %agent_version, "device online")
            }
            Event::Offline {
                device,
                since_ms,
                reason,
            } => {
                tracing::info!(%device, since_ms, reason = reason.unwrap_or("status"), "device offline")
            }
            Event::Registered {
                device,
                boot_id,
                agent_version,
                hostname,
                ..
            } => {
                tracing::info!(%device, %boot_id, %agent_version, %hostname, "device registered")
            }
            Event::Telemetry {
                device, id, seq, ..
            } => {
                tracing::debug!(%device, %id, seq, "telemetry")
            }
            Event::Data {
                device,
                id,
                stream,
                seq,
                ..
            } => {
                tracing::debug!(%device, %id, %stream, seq, "data")
            }
            Event::Duplicate { device, id, topic } => {
                tracing::debug!(%device, %id, %topic, "duplicate message dropped")
            }
            Event::Rejected {
                topic,
                reason,
                device,
            } => {
                tracing::warn!(%topic, %reason, device = device.as_deref().unwrap_or("-"), "message rejected")
            }
            Event::DeploymentStarted {
                deployment_id,
                version,
                target,
                devices,
                resumed,
            } => {
                tracing::info!(%deployment_id, version, %target, devices = devices.len(), resumed, "deployment started")
            }
            Event::Deploy {
                device,
                deployment_id,
                version,
                step,
                reason,
                chunks_dropped,
                ..
            } => match (reason, chunks_dropped) {
                (Some(reason), _) => {
                    let chunks_dropped = chunks_dropped.unwrap_or(0);
                    tracing::warn!(%device, %deployment_id, version, step, %reason, chunks_dropped, "deployment step")
                }
                // Someone published bad chunks for this device (or the link damaged them).
                (None, Some(chunks_dropped)) => {
                    tracing::warn!(%device, %deployment_id, version, step, chunks_dropped, "deployment step; the device dropped bad chunks")
                }
                (None, None) => {
                    tracing::info!(%device, %deployment_id, version, step, "deployment step")
                }
            },
            Event::DeployResend {
                device,
                deployment_id,
                chunks,
                rebroadcast,
                ignored,
            } => {
                if *ignored > 0 {
                    tracing::warn!(%device, %deployment_id, chunks, rebroadcast, ignored, "resend request partly ignored")
                } else {
                    tracing::debug!(%device, %deployment_id, chunks, rebroadcast, "resending chunks")
                }
            }
            Event::DeployRebroadcast {
                deployment_id,
                artifact,
                index,
                devices,
            } => {
                tracing::info!(%deployment_id, %artifact, index, devices, "many devices lack a chunk; broadcasting it to the group again")
            }
            Event::DeploymentFinished {
                deployment_id,
                version,
                reason,
                healthy,
                failed,
                in_progress,
            } => {
                tracing::info!(%deployment_id, version, %reason, healthy, failed, in_progress, "deployment finished")
            }
            Event::RolloutDecision {
                deployment_id,
                decision,
                wave,
                devices,
                healthy,
                failed,
                reason,
            } => {
                let wave = wave.map_or(-1, |w| w as i64);
                if *decision == "halted" {
                    tracing::warn!(%deployment_id, decision, wave, devices = devices.len(), healthy, failed, reason = reason.as_deref().unwrap_or("-"), "rollout halted; rolling back the updated devices")
                } else {
                    tracing::info!(%deployment_id, decision, wave, devices = devices.len(), healthy, failed, reason = reason.as_deref().unwrap_or("-"), "rollout decision")
                }
            }
            Event::FlTaskStarted {
                task,
                model,
                members,
                rounds,
                weights,
                round,
                version,
                resumed,
            } => {
                tracing::info!(%task, %model, %members, rounds, weights, round, version, resumed, "federated task started")
            }
            Event::FlRoundOpened {
                task,
                round,
                version,
                selected,
                deadline_ms,
                members,
            } => {
                tracing::info!(%task, round, version, selected = selected.len(), members, deadline_ms, "federated round opened")
            }
            Event::FlRoundWaiting {
                task,
                round,
                reason,
            } => tracing::warn!(%task, round, %reason, "federated round waiting"),
            Event::FlRoundExtended {
                task,
                round,
                received,
                min_updates,
                added,
                ..
            } => {
                tracing::warn!(%task, round, received, min_updates, added = added.len(), "federated round deadline passed; extended")
            }
            Event::FlUpdate {
                task,
                device,
                round,
                staleness,
                samples,
                bytes,
                ..
            } => {
                tracing::debug!(%task, %device, round, staleness, samples, bytes, "federated update accepted")
            }
            Event::FlUpdateRejected {
                task,
                device,
                round,
                reason,
                detail,
            } => {
                tracing::warn!(task = task.as_deref().unwrap_or("-"), %device, round = round.unwrap_or(0), reason, %detail, "federated update rejected")
            }
            Event::FlTrainFailed {
                task,
                device,
                round,
                kind,
                reason,
            } => {
                tracing::warn!(%task, %device, round, kind, %reason, "federated training failed on a device")
            }
            Event::FlRoundFailed {
                task,
                round,
                reason,
                failures,
            } => {
                let devices: Vec<String> = failures.iter().map(ToString::to_string).collect();
                tracing::error!(%task, round, %reason, failures = %devices.join("; "), "federated round failed")
            }
            Event::FlRoundClosed { task, metrics: m } => {
                tracing::info!(
                    %task,
                    round = m.round,
                    version = m.new_version.unwrap_or(m.version),
                    reason = m.close_reason.as_deref().unwrap_or("-"),
                    selected = m.selected,
                    received = m.received,
                    late = m.late,
                    rejected = m.rejected_total(),
                    duplicates = m.duplicates,
                    bytes_in = m.bytes_in,
                    bytes_out = m.bytes_out,
                    train_loss = m.train_loss.map(f64::from),
                    clip_threshold = m.clip_threshold.map(f64::from),
                    clipped = m.clipped,
                    epsilon = m.epsilon,
                    eval_accuracy = m.eval_accuracy.map(f64::from),
                    eval_loss = m.eval_loss.map(f64::from),
                    eval_note = m.eval_note.as_deref(),
                    "federated round closed"
                )
            }
            Event::FlTaskFinished {
                task,
                reason,
                rounds_closed,
                version,
            } => tracing::info!(%task, %reason, rounds_closed, version, "federated task finished"),
            Event::DeviceEnrolled {
                device,
                key_id,
                by,
                groups,
                ..
            } => {
                tracing::info!(%device, %key_id, by, groups = %groups.join(","), "device enrolled")
            }
            Event::EnrollmentPending {
                device,
                key_id,
                hardware,
                ..
            } => {
                tracing::warn!(%device, %key_id, arch = %hardware.arch, board = %hardware.board, "enrollment waits for an operator: edge-coordinator devices approve")
            }
            Event::EnrollmentRejected {
                device,
                key_id,
                by,
                reason,
            } => tracing::warn!(%device, %key_id, by, %reason, "enrollment rejected"),
            Event::EnrollmentConflict {
                device,
                key_id,
                enrolled_key_id,
                state,
                ..
            } => {
                tracing::warn!(%device, %key_id, %enrolled_key_id, state, "enrollment refused: the device id belongs to another key")
            }
            Event::DeviceRevoked { device, key_id, .. } => {
                tracing::warn!(%device, %key_id, "device revoked")
            }
            Event::CommandSent {
                device,
                command,
                kind,
            } => tracing::info!(%device, %command, kind, "remote command sent"),
            Event::CommandFinished {
                device,
                command,
                kind,
                state,
                error,
            } => match error {
                None => tracing::info!(%device, %command, kind, state, "remote command finished"),
                Some(error) => {
                    tracing::warn!(%device, %command, kind, state, %error, "remote command did not succeed")
                }
            },
            Event::CoordinatorKeyRotated {
                old_key_id,
                new_key_id,
                devices_told,
                ..
            } => {
                tracing::info!(%old_key_id, %new_key_id, devices_told, "coordinator key rotated: devices told, both keys accepted until each device switches")
            }
            Event::DeviceKeySwitched {
                device,
                key_id,
                pending,
            } => {
                tracing::info!(%device, %key_id, pending, "device switched to the new coordinator key")
            }
            Event::CoordinatorKeyRotationFinished {
                old_key_id,
                new_key_id,
                automatic,
                switched,
                not_switched,
                old_key_accepted,
            } => {
                if not_switched.is_empty() {
                    tracing::info!(%old_key_id, %new_key_id, automatic, switched, old_key_accepted, "coordinator key rotation finished: the old key is deleted")
                } else {
                    tracing::warn!(%old_key_id, %new_key_id, automatic, switched, not_switched = %not_switched.join(","), old_key_accepted, "coordinator key rotation finished with devices that never switched: they are refused until they trust the new key")
                }
            }
            Event::AuthRejected {
                reasons,
                total,
                devices,
                ..
            } => {
                let reasons: Vec<String> =
                    reasons.iter().map(|(r, n)| format!("{r}={n}")).collect();
                tracing::warn!(total, reasons = %reasons.join(" "), devices = %devices.join(","), "messages dropped by authentication since the last summary")
            }
            Event::Stopped {} => tracing::info!("coordinator stopped"),
        }
    }
}
