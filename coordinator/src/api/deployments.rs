//! `GET /api/deployments` and `GET /api/deployments/{id}`: each rollout's status per device,
//! from the progress files `serve` rewrites every 250 ms (the ones `deploy` draws its bars
//! from), and pausing, resuming and aborting staged rollouts (admin; the same control spool
//! and checks as `edge-coordinator rollout`). Creating a rollout stays with the CLI (`deploy`
//! signs with the offline deploy key, which serve does not hold).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Serialize;

use super::{ApiError, ApiState, blocking};
use crate::deploy::control::{self, ControlError};
use crate::deploy::engine::Control;
use crate::deploy::progress::{self, Outcome, ProgressFile};
use crate::deploy::spool;

/// A rollout and how its devices stand.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Rollout {
    pub deployment_id: String,
    pub version: u64,
    /// `device ID` or `group NAME`.
    pub target: String,
    /// Why it ended; absent while it runs.
    pub finished: Option<String>,
    pub expires_ms: u64,
    pub updated_ms: u64,
    pub total_bytes: u64,
    pub healthy: usize,
    pub failed: usize,
    pub in_progress: usize,
    /// Per device; only in the single-rollout answer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceRollout>,
}

/// One device in a rollout.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceRollout {
    pub device: String,
    /// healthy, failed, or in_progress.
    pub outcome: String,
    /// The last step the agent reported (downloading, verifying, starting, healthy,
    /// rolled_back, failed, rejected); absent before it reported anything.
    pub step: Option<String>,
    /// Why it failed or rolled back, or what it waits for.
    pub detail: String,
    /// Download progress, 0 to 1.
    pub fraction: f64,
    pub chunks_sent: u32,
    pub chunks_total: u32,
    pub resent: u32,
    pub chunks_dropped: u64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RolloutList {
    pub rollouts: Vec<Rollout>,
}

fn rollout(p: &ProgressFile, with_devices: bool) -> Rollout {
    let mut r = Rollout {
        deployment_id: p.deployment_id.clone(),
        version: p.version,
        target: p.target.to_string(),
        finished: p.finished.clone(),
        expires_ms: p.expires_ms,
        updated_ms: p.updated_ms,
        total_bytes: p.total_bytes,
        healthy: 0,
        failed: 0,
        in_progress: 0,
        devices: Vec::new(),
    };
    for (device, d) in &p.devices {
        let (outcome, detail) = match progress::outcome(d) {
            Outcome::Healthy => {
                r.healthy += 1;
                ("healthy", String::new())
            }
            Outcome::Failed(why) => {
                r.failed += 1;
                ("failed", why)
            }
            Outcome::Pending(what) => {
                r.in_progress += 1;
                ("in_progress", what)
            }
        };
        if with_devices {
            r.devices.push(DeviceRollout {
                device: device.clone(),
                outcome: outcome.to_owned(),
                step: d.last.as_ref().map(|s| progress::step_name(s).to_owned()),
                detail,
                fraction: d.fraction(),
                chunks_sent: d.chunks_sent,
                chunks_total: d.chunks_total,
                resent: d.resent,
                chunks_dropped: d.chunks_dropped,
            });
        }
    }
    r
}

/// Every rollout `serve` knows (running and finished), newest update first.
#[utoipa::path(get, path = "/api/deployments", tag = "deployments",
    responses((status = 200, body = RolloutList), (status = 401, body = super::ErrorBody)))]
pub async fn list(State(state): State<Arc<ApiState>>) -> Result<Json<RolloutList>, ApiError> {
    let dir = state.state_dir.clone();
    let mut rollouts = blocking(move || {
        let ids = spool::rollouts(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut out = Vec::new();
        for id in ids {
            // A rollout whose progress file is not written yet is left out until it is.
            if let Some(p) =
                spool::read_progress(&dir, &id).map_err(|e| ApiError::internal(e.to_string()))?
            {
                out.push(rollout(&p, false));
            }
        }
        Ok(out)
    })
    .await?;
    rollouts.sort_by_key(|r| std::cmp::Reverse(r.updated_ms));
    Ok(Json(RolloutList { rollouts }))
}

/// One rollout with every device's step.
#[utoipa::path(get, path = "/api/deployments/{id}", tag = "deployments",
    params(("id" = String, Path, description = "deployment id")),
    responses((status = 200, body = Rollout), (status = 404, body = super::ErrorBody),
        (status = 401, body = super::ErrorBody)))]
pub async fn detail(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<Rollout>, ApiError> {
    if protocol::v1::validate_message_id(&id).is_err() || id.starts_with('.') {
        return Err(ApiError::bad_request(format!(
            "invalid deployment id {id:?}"
        )));
    }
    let dir = state.state_dir.clone();
    let key = id.clone();
    let p = blocking(move || {
        spool::read_progress(&dir, &key).map_err(|e| ApiError::internal(e.to_string()))
    })
    .await?
    .ok_or_else(|| ApiError::not_found(format!("no deployment {id:?}")))?;
    Ok(Json(rollout(&p, true)))
}

/// What a rollout control request did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ControlResult {
    pub deployment_id: String,
    /// paused, resumed or halted.
    pub state: String,
    /// False when the rollout already was in that state (nothing was spooled).
    pub changed: bool,
    pub message: String,
}

/// Pause a staged rollout: no new wave starts; devices already updating go on, and failures
/// still halt it. Spooled like `edge-coordinator rollout pause`; the answer waits for serve.
#[utoipa::path(post, path = "/api/deployments/{id}/pause", tag = "deployments",
    params(("id" = String, Path, description = "deployment id")),
    responses((status = 200, body = ControlResult), (status = 404, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody), (status = 403, body = super::ErrorBody),
        (status = 504, body = super::ErrorBody)))]
pub async fn pause(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<ControlResult>, ApiError> {
    control(&state, id, Control::Pause).await
}

/// Start a paused staged rollout's waves again.
#[utoipa::path(post, path = "/api/deployments/{id}/resume", tag = "deployments",
    params(("id" = String, Path, description = "deployment id")),
    responses((status = 200, body = ControlResult), (status = 404, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody), (status = 403, body = super::ErrorBody),
        (status = 504, body = super::ErrorBody)))]
pub async fn resume(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<ControlResult>, ApiError> {
    control(&state, id, Control::Resume).await
}

/// Halt a staged rollout and roll the devices already updated back.
#[utoipa::path(post, path = "/api/deployments/{id}/abort", tag = "deployments",
    params(("id" = String, Path, description = "deployment id")),
    responses((status = 200, body = ControlResult), (status = 404, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody), (status = 403, body = super::ErrorBody),
        (status = 504, body = super::ErrorBody)))]
pub async fn abort(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<ControlResult>, ApiError> {
    control(&state, id, Control::Abort).await
}

async fn control(
    state: &ApiState,
    id: String,
    action: Control,
) -> Result<Json<ControlResult>, ApiError> {
    if protocol::v1::validate_message_id(&id).is_err() || id.starts_with('.') {
        return Err(ApiError::bad_request(format!(
            "invalid deployment id {id:?}"
        )));
    }
    let dir = state.state_dir.clone();
    let key = id.clone();
    let changed = blocking(move || {
        control::apply(&dir, &key, action).map_err(|e| match e {
            ControlError::Unknown { .. } => ApiError::not_found(e.to_string()),
            ControlError::Refused(m) => ApiError::new(StatusCode::CONFLICT, m),
            ControlError::NotApplied(m) => ApiError::new(StatusCode::GATEWAY_TIMEOUT, m),
            ControlError::Io(m) => ApiError::internal(m),
        })
    })
    .await?;
    Ok(Json(ControlResult {
        deployment_id: id.clone(),
        state: match action {
            Control::Pause => "paused",
            Control::Resume => "resumed",
            Control::Abort => "halted",
        }
        .to_owned(),
        changed,
        message: format!(
            "rollout {id}: {}{}",
            if changed { "" } else { "already " },
            control::done_word(action)
        ),
    }))
}
