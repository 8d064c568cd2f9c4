//! `GET /api/devices` (filtered, paginated server-side) and `GET /api/devices/{id}` (the
//! latest telemetry and the in-memory history), from the shared view.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};

use super::view::{Row, Sample};
use super::{ApiError, ApiQuery, ApiState};

/// Most devices one page may hold.
pub const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;
/// Outbox refusals or telemetry older than this make a device "need attention".
pub const STALE_TELEMETRY_MS: u64 = 5 * 60 * 1000;

/// Filters and the page.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeviceQuery {
    /// Only devices whose enrollment lists this deployment group.
    pub group: Option<String>,
    /// Enrollment state: accepted, pending, rejected, revoked or unenrolled.
    pub state: Option<String>,
    /// Agent version, exactly.
    pub version: Option<String>,
    /// Online (true) or offline (false) only.
    pub online: Option<bool>,
    /// Only devices needing attention (true).
    pub attention: Option<bool>,
    /// Devices to skip (default 0).
    pub offset: Option<usize>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
}

/// One device in a list.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceSummary {
    pub device: String,
    /// accepted, pending, rejected, revoked or unenrolled.
    pub state: String,
    pub groups: Vec<String>,
    pub online: bool,
    pub agent_version: String,
    /// Coordinator clock, ms since the epoch; 0: never.
    pub last_seen_ms: u64,
    pub cpu_percent: Option<f32>,
    pub mem_used_bytes: Option<u64>,
    pub mem_total_bytes: Option<u64>,
    pub agent_rss_bytes: Option<u64>,
    /// Outbox depth per class (control, model, results, telemetry).
    pub outbox_depth: Option<[u64; 4]>,
    /// Inference providers actually running, per model (`model=provider`).
    pub providers: Vec<String>,
    /// Why the device needs attention; empty when it does not.
    pub attention: Vec<String>,
    pub messages: u64,
    pub rejected: u64,
}

/// A page of devices.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceList {
    /// Devices matching the filters (all pages).
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
    /// Devices online among those matching.
    pub online: usize,
    /// Devices needing attention among those matching.
    pub attention: usize,
    /// Agent versions among those matching, with counts.
    pub versions: std::collections::BTreeMap<String, usize>,
    pub devices: Vec<DeviceSummary>,
}

/// One device in full.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub summary: DeviceSummary,
    pub first_seen_ms: u64,
    /// The enrollment record (keys, hardware, who decided), if any.
    #[schema(value_type = Option<Object>)]
    pub enrollment: Option<serde_json::Value>,
    /// The latest registration (agent version, boot id, host).
    #[schema(value_type = Option<Object>)]
    pub registration: Option<serde_json::Value>,
    /// The latest telemetry sample as the device sent it (pipeline stages, inference, offload,
    /// federated learning, outbox), with its id and clocks.
    #[schema(value_type = Option<Object>)]
    pub telemetry: Option<serde_json::Value>,
    /// Message counts since the device was first seen.
    #[schema(value_type = Object)]
    pub counters: serde_json::Value,
    /// Telemetry since the coordinator started, oldest first (bounded by
    /// `[api] history_samples`).
    pub history: Vec<Sample>,
}

/// Why a device needs an operator, from what the coordinator knows of it.
pub fn attention(row: &Row, now_ms: u64) -> Vec<String> {
    let mut why = Vec::new();
    check_attention(row, now_ms, &mut |reason| {
        why.push(reason());
        true
    });
    why
}

/// Whether [`attention`] would name anything, without formatting the reasons (the list
/// checks every device of the fleet for its counts).
pub fn needs_attention(row: &Row, now_ms: u64) -> bool {
    let mut any = false;
    check_attention(row, now_ms, &mut |_| {
        any = true;
        false
    });
    any
}

/// Whether [`attention`] names a reason that does not depend on the time (all but "no
/// telemetry for 5 min"): what the list's index keeps per device.
pub fn needs_static_attention(row: &Row) -> bool {
    let mut any = false;
    check_attention_at(row, None, &mut |_| {
        any = true;
        false
    });
    any
}

fn check_attention(row: &Row, now_ms: u64, found: &mut dyn FnMut(&dyn Fn() -> String) -> bool) {
    check_attention_at(row, Some(now_ms), found)
}

/// Calls `found` with each reason (made on demand) until it returns false; without a time,
/// the reason that depends on it is skipped.
fn check_attention_at(
    row: &Row,
    now_ms: Option<u64>,
    found: &mut dyn FnMut(&dyn Fn() -> String) -> bool,
) {
    let r = &row.record;
    let state = match row.state() {
        "pending" => Some("enrollment pending"),
        "accepted" if !r.online => Some("offline"),
        _ => None,
    };
    if let Some(why) = state
        && !found(&|| why.to_owned())
    {
        return;
    }
    if let Some(t) = &r.telemetry {
        let b = &t.body;
        if r.online
            && now_ms.is_some_and(|now| now.saturating_sub(t.received_ms) > STALE_TELEMETRY_MS)
            && !found(&|| "no telemetry for 5 min".to_owned())
        {
            return;
        }
        if b.outbox.refused > 0
            && !found(&|| format!("outbox refused {} messages", b.outbox.refused))
        {
            return;
        }
        if let Some(p) = &b.pipeline {
            for s in &p.stages {
                if let Some(reason) = &s.failed
                    && !found(&|| format!("stage {} failed: {reason}", s.name))
                {
                    return;
                }
            }
        }
        if let Some(i) = &b.inference
            && !i.status.reason.is_empty()
            && !found(&|| format!("inference unavailable: {}", i.status.reason))
        {
            return;
        }
    }
    if r.counters.rejected > 0 {
        found(&|| format!("{} messages rejected", r.counters.rejected));
    }
}

fn summary(row: &Row, now_ms: u64) -> DeviceSummary {
    let r = &row.record;
    let t = r.telemetry.as_ref().map(|t| &t.body);
    DeviceSummary {
        device: r.device.clone(),
        state: row.state().to_owned(),
        groups: row
            .enrollment
            .as_ref()
            .map(|e| e.groups.clone())
            .unwrap_or_default(),
        online: r.online,
        agent_version: r.agent_version.clone(),
        last_seen_ms: r.last_seen_ms,
        cpu_percent: t.map(|t| t.cpu_percent),
        mem_used_bytes: t.map(|t| t.mem_used_bytes),
        mem_total_bytes: t.map(|t| t.mem_total_bytes),
        agent_rss_bytes: t.map(|t| t.agent_rss_bytes),
        outbox_depth: t.map(|t| t.outbox.depth),
        providers: t
            .and_then(|t| t.inference.as_ref())
            .map(|i| {
                i.models
                    .iter()
                    .map(|m| format!("{}={}", m.name, m.provider))
                    .collect()
            })
            .unwrap_or_default(),
        attention: attention(row, now_ms),
        messages: r.counters.messages,
        rejected: r.counters.rejected,
    }
}

const STATES: [&str; 5] = ["accepted", "pending", "rejected", "revoked", "unenrolled"];

/// Lists devices, filtered and paginated on the server.
#[utoipa::path(get, path = "/api/devices", tag = "devices", params(DeviceQuery),
    responses(
        (status = 200, body = DeviceList),
        (status = 400, description = "a query parameter is invalid (named)", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody)))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    ApiQuery(q): ApiQuery<DeviceQuery>,
) -> Result<Json<DeviceList>, ApiError> {
    Ok(Json(listing(&state.view, &q, protocol::v1::now_ms())?))
}

/// The device list for `q` at `now_ms`: the handler's answer (and what the view's test checks
/// against a full pass).
pub fn listing(
    view: &super::view::FleetView,
    q: &DeviceQuery,
    now_ms: u64,
) -> Result<DeviceList, ApiError> {
    let (offset, limit) = check_query(q)?;
    let filter = super::index::Filter {
        group: q.group.as_deref(),
        state: q.state.as_deref(),
        version: q.version.as_deref(),
        online: q.online,
    };
    // The index answers a page of an unfiltered or one-filter list; several filters or
    // `attention` take a pass over the smallest set they name.
    let list = match view.list(&filter, q.attention.is_some(), offset, limit, now_ms) {
        super::view::Listing::Scan(rows) => page(&rows, q, now_ms)?,
        super::view::Listing::Indexed { counts, rows } => DeviceList {
            total: counts.total,
            offset,
            limit,
            online: counts.online,
            attention: counts.attention,
            versions: counts.versions,
            devices: rows.iter().map(|r| summary(r, now_ms)).collect(),
        },
    };
    Ok(list)
}

/// The page and size asked for, checked, and the state filter's value.
fn check_query(q: &DeviceQuery) -> Result<(usize, usize), ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit: must be 1 to {MAX_LIMIT}, got {limit}"
        )));
    }
    if let Some(s) = &q.state
        && !STATES.contains(&s.as_str())
    {
        return Err(ApiError::bad_request(format!(
            "state: must be one of {}, got {s:?}",
            STATES.join(", ")
        )));
    }
    Ok((q.offset.unwrap_or(0), limit))
}

/// Filters and pages `rows` (in id order) in one pass over them.
pub fn page(rows: &[Row], q: &DeviceQuery, now_ms: u64) -> Result<DeviceList, ApiError> {
    let (offset, limit) = check_query(q)?;
    let mut total = 0;
    let mut online = 0;
    let mut needing = 0;
    let mut versions: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    let mut devices = Vec::new();
    for row in rows {
        let r = &row.record;
        if q.state.as_deref().is_some_and(|s| s != row.state())
            || q.version.as_deref().is_some_and(|v| v != r.agent_version)
            || q.online.is_some_and(|o| o != r.online)
            || q.group.as_deref().is_some_and(|g| {
                !row.enrollment
                    .as_ref()
                    .is_some_and(|e| e.groups.iter().any(|x| x == g))
            })
        {
            continue;
        }
        // Checked for every match: the page's counts include it.
        let needs = needs_attention(row, now_ms);
        if q.attention.is_some_and(|a| a != needs) {
            continue;
        }
        total += 1;
        online += usize::from(r.online);
        needing += usize::from(needs);
        *versions.entry(r.agent_version.as_str()).or_insert(0) += 1;
        if total > offset && devices.len() < limit {
            devices.push(summary(row, now_ms));
        }
    }
    Ok(DeviceList {
        total,
        offset,
        limit,
        online,
        attention: needing,
        versions: versions
            .into_iter()
            .map(|(v, n)| (v.to_owned(), n))
            .collect(),
        devices,
    })
}

/// One device: its latest telemetry, enrollment and history.
#[utoipa::path(get, path = "/api/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "device id")),
    responses(
        (status = 200, body = DeviceDetail),
        (status = 404, description = "no such device", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody)))]
pub async fn detail(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<DeviceDetail>, ApiError> {
    let (row, history) = state
        .view
        .device(&id)
        .ok_or_else(|| ApiError::not_found(format!("no device {id:?} in the registry")))?;
    let r = &row.record;
    Ok(Json(DeviceDetail {
        summary: summary(&row, protocol::v1::now_ms()),
        first_seen_ms: r.first_seen_ms,
        enrollment: row.enrollment.as_deref().map(to_json),
        registration: r.registration.as_ref().map(to_json),
        telemetry: r.telemetry.as_ref().map(to_json),
        counters: to_json(&r.counters),
        history,
    }))
}

/// Our own plain data types always serialize; `Null` is never reached in practice.
pub fn to_json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// The `devices` table from API summaries (what `edge-coordinator devices` prints while the
/// coordinator runs).
pub fn render_table(devices: &[DeviceSummary], now_ms: u64) -> String {
    use crate::registry::{age, columns, mib};
    let mut rows = vec![
        [
            "DEVICE",
            "ENROLLED",
            "GROUPS",
            "ONLINE",
            "LAST SEEN",
            "AGENT",
            "CPU%",
            "MEM USED",
            "RSS",
            "OUTBOX c/m/r/t",
            "MSGS",
            "REJECTED",
            "ATTENTION",
        ]
        .map(String::from),
    ];
    let or_dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
    for d in devices {
        rows.push([
            d.device.clone(),
            d.state.clone(),
            or_dash(d.groups.join(",")),
            if d.online { "yes".into() } else { "no".into() },
            age(now_ms, d.last_seen_ms),
            or_dash(d.agent_version.clone()),
            d.cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
            d.mem_used_bytes.map_or("-".into(), mib),
            d.agent_rss_bytes.map_or("-".into(), mib),
            d.outbox_depth.map_or("-".into(), |o| {
                format!("{}/{}/{}/{}", o[0], o[1], o[2], o[3])
            }),
            d.messages.to_string(),
            d.rejected.to_string(),
            or_dash(d.attention.join("; ")),
        ]);
    }
    columns(&rows)
}
