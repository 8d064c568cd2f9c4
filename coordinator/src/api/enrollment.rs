//! `GET /api/enrollment` and the operator's decisions (`approve`, `reject`, `revoke`, scope
//! admin). A decision is spooled exactly as `edge-coordinator devices approve` spools it
//! (`enrollment::files::write_command`), and the answer waits for `serve` to apply it: the
//! service loop stays the only writer of enrollment records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use protocol::v1::enroll::Decision;
use serde::{Deserialize, Serialize};

use super::devices::to_json;
use super::{ApiError, ApiJson, ApiQuery, ApiState, blocking};
use crate::enrollment::files::{self, Command, CommandResult};

/// How long a decision may wait for the service loop (it polls its spool every 500 ms).
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EnrollmentQuery {
    /// pending (default), accepted, rejected, revoked, or all.
    pub state: Option<String>,
}

/// Enrollment records (keys, hardware, claim, who decided and when).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EnrollmentList {
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveBody {
    /// Deployment groups; empty keeps an enrolled or revoked device's groups.
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectBody {
    /// Why, for the device's log.
    #[serde(default)]
    pub reason: String,
}

/// What `serve` said when it applied the decision.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DecisionResult {
    pub device: String,
    pub message: String,
}

/// Enrollment records, pending ones by default.
#[utoipa::path(get, path = "/api/enrollment", tag = "enrollment", params(EnrollmentQuery),
    responses((status = 200, body = EnrollmentList),
        (status = 400, body = super::ErrorBody), (status = 401, body = super::ErrorBody)))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    ApiQuery(q): ApiQuery<EnrollmentQuery>,
) -> Result<Json<EnrollmentList>, ApiError> {
    let filter = match q.state.as_deref().unwrap_or("pending") {
        "all" => None,
        "pending" => Some(Decision::Pending),
        "accepted" => Some(Decision::Accepted),
        "rejected" => Some(Decision::Rejected),
        "revoked" => Some(Decision::Revoked),
        other => {
            return Err(ApiError::bad_request(format!(
                "state: must be pending, accepted, rejected, revoked or all, got {other:?}"
            )));
        }
    };
    let records = state
        .view
        .enrollments(filter)
        .iter()
        .map(|r| to_json(r.as_ref()))
        .collect();
    Ok(Json(EnrollmentList { records }))
}

/// Enrolls a device (pending, rejected or revoked) or changes an enrolled device's groups.
#[utoipa::path(post, path = "/api/enrollment/{id}/approve", tag = "enrollment",
    params(("id" = String, Path, description = "device id")), request_body = ApproveBody,
    responses((status = 200, body = DecisionResult),
        (status = 400, description = "invalid id, groups or JSON (field named)", body = super::ErrorBody),
        (status = 403, description = "token scope is not admin", body = super::ErrorBody),
        (status = 409, description = "serve refused the decision", body = super::ErrorBody),
        (status = 413, body = super::ErrorBody)))]
pub async fn approve(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ApproveBody>,
) -> Result<Json<DecisionResult>, ApiError> {
    crate::enrollment::config::check_groups("groups", &body.groups)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    decide(
        &state,
        Command::Approve {
            device: id,
            groups: body.groups,
        },
    )
    .await
}

/// Refuses a device's pending enrollment request.
#[utoipa::path(post, path = "/api/enrollment/{id}/reject", tag = "enrollment",
    params(("id" = String, Path, description = "device id")), request_body = RejectBody,
    responses((status = 200, body = DecisionResult), (status = 400, body = super::ErrorBody),
        (status = 403, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub async fn reject(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RejectBody>,
) -> Result<Json<DecisionResult>, ApiError> {
    decide(
        &state,
        Command::Reject {
            device: id,
            reason: body.reason,
        },
    )
    .await
}

/// Takes an enrolled device out of the fleet: its messages are refused from now on.
#[utoipa::path(post, path = "/api/enrollment/{id}/revoke", tag = "enrollment",
    params(("id" = String, Path, description = "device id")),
    responses((status = 200, body = DecisionResult), (status = 400, body = super::ErrorBody),
        (status = 403, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub async fn revoke(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<DecisionResult>, ApiError> {
    decide(&state, Command::Revoke { device: id }).await
}

async fn decide(state: &ApiState, command: Command) -> Result<Json<DecisionResult>, ApiError> {
    let device = command.device().unwrap_or_default().to_owned();
    protocol::v1::validate_device_id(&device)
        .map_err(|e| ApiError::bad_request(format!("invalid device id {device:?}: {e}")))?;
    let dir = state.state_dir.clone();
    let id = blocking(move || {
        files::write_command(&dir, &command)
            .map_err(|e| ApiError::internal(format!("cannot spool the decision: {e}")))
    })
    .await?;
    let start = Instant::now();
    loop {
        let dir = state.state_dir.clone();
        let key = id.clone();
        let result = blocking(move || {
            let r = files::read_result(&dir, &key).map_err(|e| {
                ApiError::internal(format!("cannot read the decision's result: {e}"))
            })?;
            if r.is_some()
                && let Err(e) = files::remove_command(&dir, &key)
            {
                tracing::warn!(error = %e, "cannot remove an applied enrollment command");
            }
            Ok(r)
        })
        .await?;
        if let Some(CommandResult { ok, message, .. }) = result {
            return if ok {
                Ok(Json(DecisionResult { device, message }))
            } else {
                Err(ApiError::new(StatusCode::CONFLICT, message))
            };
        }
        if start.elapsed() > APPLY_TIMEOUT {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the coordinator did not apply the decision about {device} within {} s; it stays spooled",
                    APPLY_TIMEOUT.as_secs()
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}
