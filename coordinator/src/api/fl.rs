//! Federated tasks: `GET /api/fl/tasks`, `GET /api/fl/tasks/{id}` (per-round metrics), and,
//! with scope admin, `POST /api/fl/tasks` (start) and `POST /api/fl/tasks/{id}/stop`. Start and
//! stop go through the same code as `edge-coordinator fl start|stop` (load and validate the
//! task file, spool it; a stop request file) and wait for `serve` to take them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::devices::to_json;
use super::{ApiError, ApiJson, ApiState, blocking};
use crate::fl::state::{Phase, RoundMetrics, TaskState};
use crate::fl::{files, task as fl_task};

/// How long start and stop wait for `serve` (it checks every 250 ms).
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

/// A task at a glance.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TaskSummary {
    pub task: String,
    pub model: String,
    /// `group NAME` or the device list.
    pub members: String,
    /// waiting, open or finished.
    pub phase: String,
    /// Why it waits or finished.
    pub reason: Option<String>,
    /// The open round, or the next to open.
    pub round: u32,
    pub rounds: u32,
    /// Global model version.
    pub version: u32,
    pub rounds_closed: usize,
    /// The newest held-out accuracy, if the task evaluates.
    pub eval_accuracy: Option<f32>,
    pub updates_accepted: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
}

/// One closed round, for plots.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RoundPoint {
    pub round: u32,
    pub version: u32,
    pub opened_ms: u64,
    pub closed_ms: Option<u64>,
    pub close_reason: Option<String>,
    pub selected: u32,
    pub received: u32,
    pub late: u32,
    pub rejected: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub train_loss: Option<f32>,
    pub train_accuracy: Option<f32>,
    pub eval_accuracy: Option<f32>,
    pub eval_loss: Option<f32>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TaskList {
    pub tasks: Vec<TaskSummary>,
}

/// A task in full: its summary, closed rounds and the raw state `fl status --json` prints.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TaskDetail {
    #[serde(flatten)]
    pub summary: TaskSummary,
    pub history: Vec<RoundPoint>,
    /// The open (or next) round so far.
    pub current: RoundPoint,
    #[schema(value_type = Object)]
    pub state: serde_json::Value,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    /// Path of the task file (TOML) on the coordinator's host; its `initial` and
    /// `eval.holdout` paths are relative to it, as for `edge-coordinator fl start`.
    #[schema(value_type = String)]
    pub task_file: PathBuf,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TaskChanged {
    pub task: String,
    pub phase: String,
    pub message: String,
}

fn summary(s: &TaskState) -> TaskSummary {
    let (phase, reason) = match &s.phase {
        Phase::Waiting { reason } | Phase::Finished { reason } => {
            (s.phase.name(), Some(reason.clone()))
        }
        Phase::Open => (s.phase.name(), None),
    };
    TaskSummary {
        task: s.spec.id.clone(),
        model: s.spec.model.clone(),
        members: s.spec.members.to_string(),
        phase: phase.to_owned(),
        reason,
        round: s.round,
        rounds: s.spec.rounds,
        version: s.version,
        rounds_closed: s.history.len(),
        eval_accuracy: s.history.iter().rev().find_map(|r| r.eval_accuracy),
        updates_accepted: s.totals.accepted,
        bytes_in: s.totals.bytes_in,
        bytes_out: s.totals.bytes_out,
        started_ms: s.started_ms,
        finished_ms: s.finished_ms,
    }
}

fn point(r: &RoundMetrics) -> RoundPoint {
    RoundPoint {
        round: r.round,
        version: r.version,
        opened_ms: r.opened_ms,
        closed_ms: r.closed_ms,
        close_reason: r.close_reason.clone(),
        selected: r.selected,
        received: r.received,
        late: r.late,
        rejected: r.rejected_total(),
        bytes_in: r.bytes_in,
        bytes_out: r.bytes_out,
        train_loss: r.train_loss,
        train_accuracy: r.train_accuracy,
        eval_accuracy: r.eval_accuracy,
        eval_loss: r.eval_loss,
    }
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if fl_task::valid_task_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("invalid task id {id:?}")))
    }
}

/// Every federated task `serve` has started.
#[utoipa::path(get, path = "/api/fl/tasks", tag = "federated learning",
    responses((status = 200, body = TaskList), (status = 401, body = super::ErrorBody)))]
pub async fn list(State(state): State<Arc<ApiState>>) -> Result<Json<TaskList>, ApiError> {
    let dir = state.state_dir.clone();
    let tasks = blocking(move || {
        let ids = files::tasks(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(s) =
                files::read_state(&dir, &id).map_err(|e| ApiError::internal(e.to_string()))?
            {
                out.push(summary(&s));
            }
        }
        Ok(out)
    })
    .await?;
    Ok(Json(TaskList { tasks }))
}

/// One task with its per-round metrics (participants, bytes, loss, accuracy).
#[utoipa::path(get, path = "/api/fl/tasks/{id}", tag = "federated learning",
    params(("id" = String, Path, description = "task id")),
    responses((status = 200, body = TaskDetail), (status = 404, body = super::ErrorBody),
        (status = 400, body = super::ErrorBody), (status = 401, body = super::ErrorBody)))]
pub async fn detail(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<TaskDetail>, ApiError> {
    check_id(&id)?;
    let dir = state.state_dir.clone();
    let key = id.clone();
    let s = blocking(move || {
        files::read_state(&dir, &key).map_err(|e| ApiError::internal(e.to_string()))
    })
    .await?
    .ok_or_else(|| ApiError::not_found(format!("no federated task {id:?} started")))?;
    Ok(Json(TaskDetail {
        summary: summary(&s),
        history: s.history.iter().map(point).collect(),
        current: point(&s.current),
        state: to_json(&s),
    }))
}

/// Validates a task file and spools it for `serve`, which runs its rounds.
#[utoipa::path(post, path = "/api/fl/tasks", tag = "federated learning", request_body = StartBody,
    responses((status = 201, body = TaskChanged),
        (status = 400, description = "the task file is invalid (named)", body = super::ErrorBody),
        (status = 403, body = super::ErrorBody),
        (status = 409, description = "a task with that id exists", body = super::ErrorBody),
        (status = 413, body = super::ErrorBody)))]
pub async fn start(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<StartBody>,
) -> Result<(StatusCode, Json<TaskChanged>), ApiError> {
    if !body.task_file.is_absolute() {
        return Err(ApiError::bad_request(format!(
            "task_file: must be an absolute path on the coordinator's host, got {}",
            body.task_file.display()
        )));
    }
    let dir = state.state_dir.clone();
    let id = blocking(move || {
        let loaded = fl_task::load(&body.task_file).map_err(|e| match e {
            // The CLI prints toml's excerpt of the offending line; over HTTP that would hand a
            // token holder lines of any file the coordinator can read, so only the message.
            fl_task::TaskError::Parse { path, error } => ApiError::bad_request(format!(
                "task_file: {} is not a valid task file: {}",
                path.display(),
                error.message()
            )),
            e => ApiError::bad_request(e.to_string()),
        })?;
        match files::write_spool(&dir, &loaded) {
            Ok(_) => Ok(loaded.spec.id.clone()),
            Err(e @ files::FilesError::Exists { .. }) => {
                Err(ApiError::new(StatusCode::CONFLICT, e.to_string()))
            }
            Err(e) => Err(ApiError::internal(format!("cannot spool the task: {e}"))),
        }
    })
    .await?;
    // Any state means serve took it; a task finished at once (invalid for this fleet) says why.
    let s = wait_for(&state, &id, |_| true).await?;
    if let Phase::Finished { reason } = &s.phase {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("task {id}: {reason}"),
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(TaskChanged {
            task: id.clone(),
            phase: s.phase.name().to_owned(),
            message: format!("task {id} taken by serve"),
        }),
    ))
}

/// Stops a task: `serve` sends every member the current global weights marked done.
#[utoipa::path(post, path = "/api/fl/tasks/{id}/stop", tag = "federated learning",
    params(("id" = String, Path, description = "task id")),
    responses((status = 200, body = TaskChanged), (status = 404, body = super::ErrorBody),
        (status = 403, body = super::ErrorBody)))]
pub async fn stop(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<TaskChanged>, ApiError> {
    check_id(&id)?;
    let dir = state.state_dir.clone();
    let key = id.clone();
    blocking(move || {
        if files::read_state(&dir, &key)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .is_none()
        {
            return Err(ApiError::not_found(format!(
                "no federated task {key:?} started"
            )));
        }
        files::request_stop(&dir, &key).map_err(|e| ApiError::internal(e.to_string()))
    })
    .await?;
    let s = wait_for(&state, &id, |s| matches!(s.phase, Phase::Finished { .. })).await?;
    Ok(Json(TaskChanged {
        task: id.clone(),
        phase: s.phase.name().to_owned(),
        message: format!("task {id} finished at global version {}", s.version),
    }))
}

/// Rereads the task's state until `done` holds or [`APPLY_TIMEOUT`] passes.
async fn wait_for(
    state: &ApiState,
    id: &str,
    done: impl Fn(&TaskState) -> bool,
) -> Result<TaskState, ApiError> {
    let start = Instant::now();
    loop {
        let dir = state.state_dir.clone();
        let key = id.to_owned();
        let s = blocking(move || {
            files::read_state(&dir, &key).map_err(|e| ApiError::internal(e.to_string()))
        })
        .await?;
        if let Some(s) = s
            && done(&s)
        {
            return Ok(s);
        }
        if start.elapsed() > APPLY_TIMEOUT {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the coordinator did not act on task {id} within {} s; the request stays until it does",
                    APPLY_TIMEOUT.as_secs()
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}
