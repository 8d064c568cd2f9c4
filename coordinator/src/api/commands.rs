//! Remote commands through the API: `POST /api/devices/{id}/commands` puts one on the
//! service's [`CommandBoard`](crate::commands::CommandBoard) (scope admin for commands that
//! change the device, `restart-pipeline` and `log-level`; scope read for the others, which
//! only read); `GET /api/commands/{id}` long-polls its state and result; `GET
//! /api/commands/{id}/lines` long-polls a log follow's lines. `edge-coordinator logs` and
//! `edge-coordinator cmd` use these.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use protocol::v1::command::CommandKind;
use protocol::v1::enroll::Decision;
use serde::{Deserialize, Serialize};

use super::config::Scope;
use super::{ApiError, ApiJson, ApiQuery, ApiState, blocking};
use crate::commands::{CommandRecord, SubmitError};

/// Longest a GET waits for a change.
pub const MAX_WAIT_S: u64 = 30;
/// Default seconds the device has to answer once a command is sent.
pub const DEFAULT_TIMEOUT_S: u64 = 30;
/// Default seconds a command waits for an offline device.
pub const DEFAULT_WAIT_S: u64 = 300;
/// Longest a command may wait for an offline device.
pub const MAX_QUEUE_S: u64 = 7 * 24 * 3600;
/// Most lines one page of a follow holds.
const MAX_PAGE_LINES: usize = 1000;

/// The scope of the token that made the request, put there by the authorization layer.
#[derive(Debug, Clone)]
pub struct Granted {
    pub scope: Scope,
    /// The token's name (`local` for the local read token).
    pub token: String,
}

/// A command for one device.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    /// `{"kind": "restart-pipeline"}`, `{"kind": "log-level", "level": "debug", "for_s": 60}`,
    /// `{"kind": "logs", "lines": 100}`, `{"kind": "follow", "for_s": 60}`,
    /// `{"kind": "stop-follow", "follow": ID}` or `{"kind": "config"}`.
    #[schema(value_type = Object)]
    pub command: CommandKind,
    /// Seconds the device has to answer once the command is sent (default 30, 1 to 3600).
    pub timeout_s: Option<u64>,
    /// Seconds the command may wait for the device to be online (default 300); then it
    /// expires unsent.
    pub wait_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Wait up to this many seconds (at most 30) for the command to end; 0 (default) answers
    /// at once.
    pub wait_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LinesQuery {
    /// Number of the first line wanted (from `next` of the previous page; default 0).
    pub after: Option<u64>,
    /// Wait up to this many seconds (at most 30) for a line or the end.
    pub wait_s: Option<u64>,
}

/// One page of a follow's lines.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LinesPage {
    pub lines: Vec<String>,
    /// Pass as `after` for the next page.
    pub next: u64,
    /// Lines lost on the way or forgotten, so far.
    pub dropped: u64,
    pub state: String,
    /// The follow ended (no more lines will come); `error` says why if it failed.
    pub finished: bool,
    pub error: Option<String>,
}

fn board_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Invalid(m) => ApiError::bad_request(format!("command: {m}")),
        SubmitError::Full => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Sends a command to a device: queued until it is online (or `wait_s` passes), then sent,
/// answered within `timeout_s`.
#[utoipa::path(post, path = "/api/devices/{id}/commands", tag = "commands",
    params(("id" = String, Path, description = "device id")), request_body = CommandBody,
    responses((status = 202, description = "accepted; poll GET /api/commands/{id}", body = CommandRecord),
        (status = 400, description = "invalid command or JSON (field named)", body = super::ErrorBody),
        (status = 403, description = "restart-pipeline and log-level need scope admin", body = super::ErrorBody),
        (status = 404, description = "unknown device", body = super::ErrorBody),
        (status = 409, description = "device not enrolled (revoked, rejected, pending)", body = super::ErrorBody),
        (status = 503, description = "too many commands waiting", body = super::ErrorBody)))]
pub async fn submit(
    State(state): State<Arc<ApiState>>,
    Extension(granted): Extension<Granted>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CommandBody>,
) -> Result<(StatusCode, Json<CommandRecord>), ApiError> {
    protocol::v1::validate_device_id(&id)
        .map_err(|e| ApiError::bad_request(format!("device: {e}")))?;
    if body.command.changes_device() && granted.scope < Scope::Admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} has scope {}; the {} command needs scope admin",
                granted.token,
                granted.scope.as_str(),
                body.command.name()
            ),
        ));
    }
    let timeout_s = body.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
    if !(1..=protocol::v1::command::MAX_DURATION_S).contains(&timeout_s) {
        return Err(ApiError::bad_request(format!(
            "timeout_s must be 1-{}, got {timeout_s}",
            protocol::v1::command::MAX_DURATION_S
        )));
    }
    let wait_s = body.wait_s.unwrap_or(DEFAULT_WAIT_S);
    if wait_s > MAX_QUEUE_S {
        return Err(ApiError::bad_request(format!(
            "wait_s must be at most {MAX_QUEUE_S}, got {wait_s}"
        )));
    }
    match state.view.device(&id) {
        None => {
            return Err(ApiError::not_found(format!(
                "unknown device {id}: it never enrolled or registered"
            )));
        }
        Some((row, _)) => match row.enrollment.as_ref().map(|e| e.state) {
            Some(Decision::Accepted) => {}
            other => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "device {id} is {}: commands go only to enrolled devices",
                        other.map_or("not enrolled", Decision::as_str)
                    ),
                ));
            }
        },
    }
    let board = &state.commands;
    let cid = board
        .submit(&id, body.command, timeout_s, wait_s, protocol::v1::now_ms())
        .map_err(board_error)?;
    tracing::info!(device = %id, command = %cid, token = %granted.token, "remote command queued");
    // Kept on disk before the answer, so an accepted command survives a restart of serve.
    if let Some(file) = state.command_file.clone() {
        let board = state.commands.clone();
        let saved = blocking(move || {
            file.save(&board)
                .map_err(|e| ApiError::internal(e.to_string()))
        })
        .await;
        if let Err(e) = saved {
            tracing::error!(command = %cid, error = %e.message, "cannot keep the queued command for a restart");
        }
    }
    let record = board
        .get(&cid)
        .ok_or_else(|| ApiError::internal("the command left the board at once"))?;
    Ok((StatusCode::ACCEPTED, Json(record)))
}

/// Waits on the board until `done` says so or `wait_s` passes.
async fn wait_for(state: &ApiState, wait_s: Option<u64>, mut done: impl FnMut(&ApiState) -> bool) {
    let wait = Duration::from_secs(wait_s.unwrap_or(0).min(MAX_WAIT_S));
    let mut changed = state.commands.changed();
    let until = tokio::time::Instant::now() + wait;
    while !done(state) {
        match tokio::time::timeout_at(until, changed.changed()).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
}

/// A command: where it stands, its result or error.
#[utoipa::path(get, path = "/api/commands/{id}", tag = "commands",
    params(("id" = String, Path, description = "command id"), WaitQuery),
    responses((status = 200, body = CommandRecord),
        (status = 400, body = super::ErrorBody),
        (status = 404, description = "no such command (or forgotten)", body = super::ErrorBody)))]
pub async fn detail(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Json<CommandRecord>, ApiError> {
    let missing = || ApiError::not_found(format!("no command {id}"));
    if state.commands.get(&id).is_none() {
        return Err(missing());
    }
    wait_for(&state, q.wait_s, |s| {
        s.commands.get(&id).is_none_or(|r| r.state.is_final())
    })
    .await;
    state.commands.get(&id).map(Json).ok_or_else(missing)
}

/// A log follow's lines from `after` on.
#[utoipa::path(get, path = "/api/commands/{id}/lines", tag = "commands",
    params(("id" = String, Path, description = "command id"), LinesQuery),
    responses((status = 200, body = LinesPage),
        (status = 400, body = super::ErrorBody),
        (status = 404, description = "no such command (or forgotten)", body = super::ErrorBody)))]
pub async fn lines(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LinesQuery>,
) -> Result<Json<LinesPage>, ApiError> {
    let missing = || ApiError::not_found(format!("no command {id}"));
    let after = q.after.unwrap_or(0);
    if state.commands.get(&id).is_none() {
        return Err(missing());
    }
    wait_for(&state, q.wait_s, |s| {
        s.commands
            .get(&id)
            .is_none_or(|r| r.state.is_final() || r.lines_total > after)
    })
    .await;
    let r = state.commands.get(&id).ok_or_else(missing)?;
    let (lines, next) = r.lines_from(after, MAX_PAGE_LINES);
    let finished = r.state.is_final() && next >= r.lines_total;
    Ok(Json(LinesPage {
        lines,
        next,
        dropped: r.lines_dropped,
        state: crate::commands::state_name(r.state).to_owned(),
        finished,
        error: r.error.clone(),
    }))
}
