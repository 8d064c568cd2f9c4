//! `GET /metrics`: the Prometheus text exposition format (version 0.0.4), rendered from the
//! shared view and the rollout and task files at each scrape.
//!
//! Fleet series are bounded by what they count (states, classes, reasons cut to their first
//! words, steps). Per-device series are relayed from telemetry so devices behind NAT are
//! observable without being scraped; they exist for at most `[api] metrics_max_devices`
//! devices (the first by id), and `edge_device_series_omitted` says how many were left out.
//! Format: <https://prometheus.io/docs/instrumenting/exposition_formats/> (HELP/TYPE lines,
//! label values escaping `\`, `"` and newlines).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::view::{Counters, OffloadSnapshot, Row};
use super::{ApiError, ApiState, blocking};
use crate::deploy::progress::{self, Outcome, ProgressFile};
use crate::fl::state::{Phase, TaskState};

/// Rollouts and tasks with series: the most recently updated ones.
const MAX_ROLLOUTS: usize = 50;
const MAX_TASKS: usize = 50;

/// Prometheus metrics of the coordinator and, relayed from telemetry, of its devices.
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain"),
        (status = 401, body = super::ErrorBody)))]
pub async fn metrics(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let dir = state.state_dir.clone();
    let (rollouts, tasks) = blocking(move || Ok(read_files(&dir))).await?;
    let text = render(
        &state.view.rows(),
        &state.view.counters(),
        state.view.offload().as_ref(),
        &rollouts,
        &tasks,
        state.config.metrics_max_devices,
        protocol::v1::now_ms(),
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Rollouts still running and recent tasks. A file that cannot be read is skipped (logged):
/// a scrape reports what it can.
fn read_files(dir: &std::path::Path) -> (Vec<ProgressFile>, Vec<TaskState>) {
    use crate::deploy::spool;
    use crate::fl::files;
    let mut rollouts: Vec<ProgressFile> = spool::rollouts(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|id| match spool::read_progress(dir, id) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "rollout progress unreadable for /metrics");
                None
            }
        })
        .collect();
    rollouts.sort_by_key(|r| std::cmp::Reverse(r.updated_ms));
    rollouts.truncate(MAX_ROLLOUTS);
    let mut tasks: Vec<TaskState> = files::tasks(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|id| files::read_state(dir, id).ok().flatten())
        .collect();
    tasks.sort_by_key(|t| std::cmp::Reverse(t.started_ms));
    tasks.truncate(MAX_TASKS);
    (rollouts, tasks)
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn line(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", esc(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// The whole exposition.
pub fn render(
    rows: &[Row],
    counters: &Counters,
    offload: Option<&OffloadSnapshot>,
    rollouts: &[ProgressFile],
    tasks: &[TaskState],
    max_devices: usize,
    now_ms: u64,
) -> String {
    let mut o = Out(String::with_capacity(
        256 + rows.len().min(max_devices) * 900,
    ));

    let mut by_state: BTreeMap<(&str, bool), u64> = BTreeMap::new();
    let mut versions: BTreeMap<&str, u64> = BTreeMap::new();
    for r in rows {
        *by_state.entry((r.state(), r.record.online)).or_default() += 1;
        *versions.entry(r.record.agent_version.as_str()).or_default() += 1;
    }
    o.head(
        "edge_devices",
        "gauge",
        "Devices by enrollment state and online status.",
    );
    for ((state, online), n) in &by_state {
        o.line(
            "edge_devices",
            &[
                ("state", state),
                ("online", if *online { "true" } else { "false" }),
            ],
            n,
        );
    }
    o.head(
        "edge_devices_by_version",
        "gauge",
        "Devices by agent version.",
    );
    for (v, n) in versions.iter().take(100) {
        o.line(
            "edge_devices_by_version",
            &[("version", if v.is_empty() { "unknown" } else { v })],
            n,
        );
    }

    o.head(
        "edge_messages_total",
        "counter",
        "Accepted messages by class and topic since start.",
    );
    for ((class, topic), n) in &counters.messages {
        o.line(
            "edge_messages_total",
            &[("class", class), ("topic", topic)],
            n,
        );
    }
    o.head(
        "edge_duplicates_total",
        "counter",
        "Redelivered messages dropped as duplicates since start.",
    );
    o.line("edge_duplicates_total", &[], counters.duplicates);
    o.head(
        "edge_rejected_total",
        "counter",
        "Malformed, oversized or misplaced messages by reason since start.",
    );
    for (reason, n) in &counters.rejected {
        o.line("edge_rejected_total", &[("reason", reason)], n);
    }
    o.head(
        "edge_auth_rejected_total",
        "counter",
        "Messages dropped before routing (not enrolled, bad MAC, replay) by reason since start.",
    );
    for (reason, n) in &counters.auth_rejected {
        o.line("edge_auth_rejected_total", &[("reason", reason)], n);
    }
    o.head(
        "edge_deploy_steps_total",
        "counter",
        "Deployment steps reported by devices since start.",
    );
    for (step, n) in &counters.deploy_steps {
        o.line("edge_deploy_steps_total", &[("step", step)], n);
    }

    o.head(
        "edge_rollout_devices",
        "gauge",
        "Devices of each rollout by outcome (the 50 most recent rollouts).",
    );
    let mut finished_lines = Vec::new();
    for p in rollouts {
        let (mut healthy, mut failed, mut pending) = (0u64, 0u64, 0u64);
        for d in p.devices.values() {
            match progress::outcome(d) {
                Outcome::Healthy => healthy += 1,
                Outcome::Failed(_) => failed += 1,
                Outcome::Pending(_) => pending += 1,
            }
        }
        for (outcome, n) in [
            ("healthy", healthy),
            ("failed", failed),
            ("in_progress", pending),
        ] {
            o.line(
                "edge_rollout_devices",
                &[("deployment", &p.deployment_id), ("outcome", outcome)],
                n,
            );
        }
        finished_lines.push((p.deployment_id.clone(), u8::from(p.finished.is_some())));
    }
    o.head("edge_rollout_finished", "gauge", "1 once a rollout ended.");
    for (id, f) in finished_lines {
        o.line("edge_rollout_finished", &[("deployment", &id)], f);
    }

    o.head(
        "edge_fl_round",
        "gauge",
        "The open (or next) round of each federated task.",
    );
    for t in tasks {
        o.line("edge_fl_round", &[("task", &t.spec.id)], t.round);
    }
    o.head(
        "edge_fl_rounds_closed",
        "gauge",
        "Closed rounds of each federated task.",
    );
    for t in tasks {
        o.line(
            "edge_fl_rounds_closed",
            &[("task", &t.spec.id)],
            t.history.len(),
        );
    }
    o.head("edge_fl_active", "gauge", "1 while a federated task runs.");
    for t in tasks {
        o.line(
            "edge_fl_active",
            &[("task", &t.spec.id)],
            u8::from(!matches!(t.phase, Phase::Finished { .. })),
        );
    }
    o.head(
        "edge_fl_eval_accuracy",
        "gauge",
        "Held-out accuracy of the newest evaluated global model.",
    );
    for t in tasks {
        if let Some(a) = t.history.iter().rev().find_map(|r| r.eval_accuracy) {
            o.line("edge_fl_eval_accuracy", &[("task", &t.spec.id)], a);
        }
    }
    o.head(
        "edge_fl_update_bytes_total",
        "counter",
        "Update bytes received by each federated task.",
    );
    for t in tasks {
        o.line(
            "edge_fl_update_bytes_total",
            &[("task", &t.spec.id)],
            t.totals.bytes_in,
        );
    }
    o.head(
        "edge_fl_updates_total",
        "counter",
        "Updates accepted by each federated task.",
    );
    for t in tasks {
        o.line(
            "edge_fl_updates_total",
            &[("task", &t.spec.id)],
            t.totals.accepted,
        );
    }

    if let Some(s) = offload {
        o.head(
            "edge_offload_queue_depth",
            "gauge",
            "Offloaded requests waiting for a worker.",
        );
        o.line("edge_offload_queue_depth", &[], s.queue_depth);
        o.head(
            "edge_offload_queue_capacity",
            "gauge",
            "Most offloaded requests that may wait.",
        );
        o.line("edge_offload_queue_capacity", &[], s.max_queue);
        o.head(
            "edge_offload_requests_total",
            "counter",
            "Offloaded requests by outcome since start.",
        );
        for (outcome, n) in [
            ("ok", s.ok),
            ("error", s.errors),
            ("overloaded", s.overloaded),
            ("expired", s.expired),
            ("unknown_model", s.unknown_model),
            ("garbage", s.garbage),
            ("probe", s.probes),
            ("dropped", s.dropped),
        ] {
            o.line("edge_offload_requests_total", &[("outcome", outcome)], n);
        }
        o.head(
            "edge_offload_compute_ms",
            "gauge",
            "Compute time percentiles over recent offloaded requests.",
        );
        if let (Some(p50), Some(p99)) = (s.compute_p50_ms, s.compute_p99_ms) {
            o.line("edge_offload_compute_ms", &[("quantile", "0.5")], p50);
            o.line("edge_offload_compute_ms", &[("quantile", "0.99")], p99);
        }
    }

    let shown = rows.len().min(max_devices);
    o.head(
        "edge_device_series_omitted",
        "gauge",
        "Devices without per-device series ([api] metrics_max_devices).",
    );
    o.line("edge_device_series_omitted", &[], rows.len() - shown);
    if shown > 0 {
        device_series(&mut o, &rows[..shown], now_ms);
    }
    o.0
}

fn device_series(o: &mut Out, rows: &[Row], now_ms: u64) {
    o.head(
        "edge_device_online",
        "gauge",
        "1 while the device's session is up.",
    );
    for r in rows {
        o.line(
            "edge_device_online",
            &[("device", &r.record.device)],
            u8::from(r.record.online),
        );
    }
    o.head(
        "edge_device_last_seen_age_seconds",
        "gauge",
        "Seconds since the device's last accepted message.",
    );
    for r in rows.iter().filter(|r| r.record.last_seen_ms > 0) {
        o.line(
            "edge_device_last_seen_age_seconds",
            &[("device", &r.record.device)],
            now_ms.saturating_sub(r.record.last_seen_ms) / 1000,
        );
    }
    let telemetry: Vec<(&str, &protocol::v1::Telemetry)> = rows
        .iter()
        .filter_map(|r| {
            r.record
                .telemetry
                .as_ref()
                .map(|t| (r.record.device.as_str(), &t.body))
        })
        .collect();
    o.head(
        "edge_device_cpu_percent",
        "gauge",
        "Device CPU use, percent of all cores (latest telemetry).",
    );
    for (d, t) in &telemetry {
        o.line("edge_device_cpu_percent", &[("device", d)], t.cpu_percent);
    }
    o.head(
        "edge_device_memory_used_bytes",
        "gauge",
        "Device memory in use (latest telemetry).",
    );
    for (d, t) in &telemetry {
        o.line(
            "edge_device_memory_used_bytes",
            &[("device", d)],
            t.mem_used_bytes,
        );
    }
    o.head(
        "edge_device_agent_rss_bytes",
        "gauge",
        "Resident memory of the agent process (latest telemetry).",
    );
    for (d, t) in &telemetry {
        o.line(
            "edge_device_agent_rss_bytes",
            &[("device", d)],
            t.agent_rss_bytes,
        );
    }
    o.head(
        "edge_device_outbox_depth",
        "gauge",
        "Messages waiting in the device's outbox by class (latest telemetry).",
    );
    for (d, t) in &telemetry {
        for (class, n) in protocol::v1::Class::ALL.iter().zip(t.outbox.depth) {
            o.line(
                "edge_device_outbox_depth",
                &[("device", d), ("class", class.as_str())],
                n,
            );
        }
    }
    o.head(
        "edge_device_outbox_refused_total",
        "counter",
        "Messages the device's outbox refused because it was full.",
    );
    for (d, t) in &telemetry {
        o.line(
            "edge_device_outbox_refused_total",
            &[("device", d)],
            t.outbox.refused,
        );
    }
}
