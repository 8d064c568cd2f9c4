//! `GET /api/deployments` and `GET /api/deployments/{id}`: each rollout's status per device,
//! from the progress files `serve` rewrites every 250 ms (the ones `deploy` draws its bars
//! from), and pausing, resuming and aborting staged rollouts (admin; the same control spool
//! and checks as `edge-coordinator rollout`), and `POST /api/deployments`: a package file
//! signed offline (`edge-coordinator deploy ... --out FILE`, [`crate::deploy::file`]) checked
//! completely (format, every artifact's size, sha256 and chunk digests, the signature against
//! `[api] deploy_keys`, expiry, target known, strategy) and only then spooled exactly as the
//! CLI spools it. Serve never holds the signing key.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiQuery, ApiState, blocking};
use crate::deploy::control::{self, ControlError};
use crate::deploy::engine::Control;
use crate::deploy::progress::{self, Outcome, ProgressFile};
use crate::deploy::spool;
use crate::deploy::waves::{Amount, Strategy};

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
    /// A staged rollout that halted (and rolls its updated devices back).
    pub halted: bool,
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
        halted: p.waves.as_ref().is_some_and(|w| w.is_halted()),
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

/// How to roll an uploaded package out (the `deploy` flags of the same names).
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CreateQuery {
    /// `all` (default): every device of the target at once; `canary`: a group in waves, halted
    /// and rolled back past max_failures (the file must carry the rollback package, as
    /// `deploy --strategy canary --out FILE` writes it).
    pub strategy: Option<String>,
    /// Canary wave: N devices or P% of the group (default 1).
    pub canary: Option<String>,
    /// Each later wave: N devices or P% of the group (default 25%).
    pub batch: Option<String>,
    /// Seconds after a wave passed its gate before the next starts (default 60).
    pub soak_secs: Option<u64>,
    /// A wave passes its gate after this many seconds at the latest (default 600).
    pub wave_timeout_secs: Option<u64>,
    /// Failures allowed over the rollout: N devices or P% of the group (default 0).
    pub max_failures: Option<String>,
}

/// What an accepted upload became.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Created {
    pub deployment_id: String,
    pub version: u64,
    /// `device ID` or `group NAME`.
    pub target: String,
    /// all or canary.
    pub strategy: String,
    pub artifacts: usize,
    pub total_bytes: u64,
    /// The rollback deployment of a canary rollout.
    pub rollback_id: Option<String>,
    /// Whether serve took it from the spool within a few seconds (GET
    /// /api/deployments/{id} shows it once it has).
    pub picked_up: bool,
}

/// How long the answer waits for serve to take the spooled deployment.
const PICKUP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Create a deployment from a package file signed offline (`edge-coordinator deploy ...
/// --out FILE`, sent as the body, `application/octet-stream`). Checked completely before it
/// is spooled for serve like the CLI's: format, every artifact against the signed manifest,
/// the signature against `[api] deploy_keys`, expiry, the target device or group known,
/// the strategy. Nothing is spooled when a check fails.
#[utoipa::path(post, path = "/api/deployments", tag = "deployments", params(CreateQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "a package file from `edge-coordinator deploy ... --out FILE`"),
    responses(
        (status = 201, body = Created),
        (status = 400, description = "not a package file, truncated, or a bad parameter (named)", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody),
        (status = 403, body = super::ErrorBody),
        (status = 409, description = "a deployment with this id exists", body = super::ErrorBody),
        (status = 413, description = "over [api] max_upload_bytes", body = super::ErrorBody),
        (status = 422, description = "an artifact does not match the signed manifest, an unknown signer or bad signature, expired, unknown target", body = super::ErrorBody)))]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    ApiQuery(q): ApiQuery<CreateQuery>,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let limit = state.config.max_upload_bytes;
    let body = super::read_body(body, limit, || {
        format!(
            "deployment package over the upload limit of {limit} bytes ([api] max_upload_bytes)"
        )
    })
    .await?;
    let strategy = strategy(&q)?;
    let checked = {
        let state = state.clone();
        blocking(move || check(&state, &body, strategy)).await?
    };
    let id = checked.package.manifest.deployment_id.clone();
    let dir = state.state_dir.clone();
    let created = Created {
        deployment_id: id.clone(),
        version: checked.package.manifest.version,
        target: checked.package.manifest.target.to_string(),
        strategy: if checked.staged.is_some() {
            "canary"
        } else {
            "all"
        }
        .to_owned(),
        artifacts: checked.package.manifest.artifacts.len(),
        total_bytes: checked.package.manifest.total_bytes(),
        rollback_id: checked.staged.as_ref().map(|(s, _)| s.rollback_id.clone()),
        picked_up: false,
    };
    let picked_up = blocking(move || {
        let spooled = match &checked.staged {
            None => spool::write_spool(&dir, &checked.package),
            Some((strategy, rollback)) => {
                spool::write_spool_staged(&dir, &checked.package, strategy, rollback)
            }
        };
        match spooled {
            Ok(_) => {}
            Err(e @ spool::SpoolError::Exists { .. }) => {
                return Err(ApiError::new(StatusCode::CONFLICT, e.to_string()));
            }
            Err(e) => return Err(ApiError::internal(format!("cannot spool: {e}"))),
        }
        let start = std::time::Instant::now();
        while start.elapsed() < PICKUP_WAIT {
            if let Ok(Some(_)) = spool::read_progress(&dir, &checked.package.manifest.deployment_id)
            {
                return Ok(true);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(false)
    })
    .await?;
    tracing::info!(deployment = %id, target = %created.target, version = created.version,
        strategy = %created.strategy, "deployment uploaded through the API");
    Ok((
        StatusCode::CREATED,
        Json(Created {
            picked_up,
            ..created
        }),
    ))
}

/// The staged strategy asked for, without its rollback id (known once the file is read);
/// `None` for `all`. Wave parameters without `strategy=canary` are refused, naming them.
fn strategy(q: &CreateQuery) -> Result<Option<Strategy>, ApiError> {
    let amount = |name: &str, v: &Option<String>, default: Amount| match v {
        None => Ok(default),
        Some(s) => s
            .parse::<Amount>()
            .map_err(|e| ApiError::bad_request(format!("query parameter {name}: {e}"))),
    };
    match q.strategy.as_deref().unwrap_or("all") {
        "all" => {
            let staged_only = [
                ("canary", q.canary.is_some()),
                ("batch", q.batch.is_some()),
                ("soak_secs", q.soak_secs.is_some()),
                ("wave_timeout_secs", q.wave_timeout_secs.is_some()),
                ("max_failures", q.max_failures.is_some()),
            ];
            if let Some((name, _)) = staged_only.iter().find(|(_, given)| *given) {
                return Err(ApiError::bad_request(format!(
                    "query parameter {name} is only used with strategy=canary"
                )));
            }
            Ok(None)
        }
        "canary" => Ok(Some(Strategy {
            canary: amount("canary", &q.canary, Amount::Count(1))?,
            batch: amount("batch", &q.batch, Amount::Percent(25.0))?,
            soak_ms: q.soak_secs.unwrap_or(60).saturating_mul(1000),
            wave_timeout_ms: q.wave_timeout_secs.unwrap_or(600).saturating_mul(1000),
            max_failures: amount("max_failures", &q.max_failures, Amount::Count(0))?,
            rollback_id: String::new(),
        })),
        other => Err(ApiError::bad_request(format!(
            "query parameter strategy: {other:?} is neither all nor canary"
        ))),
    }
}

/// An upload that passed every check.
struct Checked {
    package: crate::deploy::Package,
    staged: Option<(Strategy, crate::deploy::Package)>,
}

fn check(state: &ApiState, body: &[u8], strategy: Option<Strategy>) -> Result<Checked, ApiError> {
    use crate::deploy::file::{self, FileError};
    use protocol::v1::deploy::{DeployKind, Target, TrustedKeys, verify};

    let unprocessable = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    let decoded = file::decode(body).map_err(|e| match e {
        // The bytes parse but do not match what was signed.
        FileError::Size { .. } | FileError::Package { .. } => unprocessable(e.to_string()),
        _ => ApiError::bad_request(e.to_string()),
    })?;
    let trusted = TrustedKeys::from_hex(&state.config.deploy_keys)
        .map_err(|e| ApiError::internal(format!("[api] deploy_keys: {e}")))?;
    if trusted.is_empty() {
        return Err(unprocessable(
            "this coordinator accepts no uploaded deployments: [api] deploy_keys is empty (add the public keys the devices trust)".into(),
        ));
    }
    let now = protocol::v1::now_ms();
    let verified = |p: &crate::deploy::Package, what: &str| {
        verify(&p.signed, &trusted).map_err(|e| {
            unprocessable(format!(
                "{what} {}: {e} (the keys in [api] deploy_keys)",
                p.manifest.deployment_id
            ))
        })?;
        if p.manifest.expires_ms <= now {
            return Err(unprocessable(format!(
                "{what} {}: its signed manifest expired at {} ms (sign it again with a later --ttl-secs)",
                p.manifest.deployment_id, p.manifest.expires_ms
            )));
        }
        Ok(())
    };
    verified(&decoded.package, "deployment")?;
    let manifest = &decoded.package.manifest;
    if manifest.deployment_id.starts_with('.') {
        return Err(ApiError::bad_request(format!(
            "invalid deployment id {:?}",
            manifest.deployment_id
        )));
    }
    match &manifest.target {
        Target::Device(d) => {
            let (row, _) = state.view.device(d).ok_or_else(|| {
                unprocessable(format!(
                    "target device {d} is not known to this coordinator"
                ))
            })?;
            if matches!(row.state(), "revoked" | "rejected") {
                return Err(unprocessable(format!(
                    "target device {d} is {}",
                    row.state()
                )));
            }
        }
        Target::Group(g) => {
            let member = |r: &super::view::Row| {
                r.enrollment
                    .as_ref()
                    .is_some_and(|e| e.groups.iter().any(|x| x == g))
                    || r.record
                        .registration
                        .as_ref()
                        .is_some_and(|reg| reg.groups.iter().any(|x| x == g))
            };
            if !state.view.rows().iter().any(member) {
                return Err(unprocessable(format!(
                    "target group {g} has no device known to this coordinator"
                )));
            }
        }
    }
    let staged = match (strategy, decoded.rollback) {
        (None, None) => None,
        (None, Some(rb)) => {
            return Err(ApiError::bad_request(format!(
                "the file carries a rollback package ({}); upload it with strategy=canary",
                rb.manifest.deployment_id
            )));
        }
        (Some(_), None) => {
            return Err(ApiError::bad_request(
                "strategy=canary needs the rollback package in the file: make it with `edge-coordinator deploy --strategy canary --out FILE`",
            ));
        }
        (Some(mut strategy), Some(rollback)) => {
            if !matches!(manifest.target, Target::Group(_)) || manifest.kind != DeployKind::Pipeline
            {
                return Err(ApiError::bad_request(
                    "strategy=canary rolls a pipeline deployment out to a group",
                ));
            }
            verified(&rollback, "rollback deployment")?;
            if rollback.manifest.target != manifest.target
                || rollback.manifest.version <= manifest.version
            {
                return Err(unprocessable(format!(
                    "rollback deployment {} must target {} with a version above {}",
                    rollback.manifest.deployment_id, manifest.target, manifest.version
                )));
            }
            strategy.rollback_id = rollback.manifest.deployment_id.clone();
            Some((strategy, rollback))
        }
    };
    Ok(Checked {
        package: decoded.package,
        staged,
    })
}
