//! The coordinator's HTTP API, `/metrics` and the dashboard: one axum server on the service's
//! runtime, started by `service::run` beside the MQTT transport.
//!
//! Handlers never reach into the service loop: devices, enrollment and counters come from the
//! shared [`view::FleetView`] the loop refreshes after each batch; deployments and federated
//! tasks from the files `serve` already writes for the CLI (progress files, task state); the
//! journal from its file. Decisions (enrollment, federated tasks) go through the same spools as
//! `edge-coordinator devices approve` and `fl start|stop`, and wait for `serve` to apply them.
//!
//! Every route but `/metrics` (when `metrics_public`) and the dashboard's static pages needs a
//! bearer token from `[[api.tokens]]`; GETs need scope `read`, everything else `admin`. The
//! OpenAPI 3 document is generated from the handlers' `#[utoipa::path]` annotations
//! ([`ApiDoc`]); [`router`] records each route it mounts, and a test checks that both lists
//! agree.

pub mod commands;
pub mod config;
pub mod dashboard;
pub mod deployments;
pub mod devices;
pub mod enrollment;
pub mod fl;
pub mod index;
pub mod journal;
pub mod metrics;
pub mod offload;
pub mod view;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::OpenApi;

pub use config::{ApiConfig, Scope, TokenConfig};
pub use view::FleetView;

/// Where `serve` writes the API's address while it runs (`{"url": "http://..."}`).
pub fn address_path(state_dir: &Path) -> PathBuf {
    state_dir.join("api.json")
}

/// A read-scope token for local tools (`edge-coordinator devices`), made at each start, mode
/// 0600: whoever can read the state directory can read the registry anyway.
pub fn local_token_path(state_dir: &Path) -> PathBuf {
    state_dir.join("api.token")
}

/// What `api.json` holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Address {
    pub url: String,
    pub pid: u32,
}

/// Errors that stop the API from starting.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    #[error(
        "cannot listen for the HTTP API on {addr}: {error} (set [api] listen, or enabled = false)"
    )]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// What every handler can reach.
#[derive(Debug)]
pub struct ApiState {
    pub view: Arc<FleetView>,
    pub state_dir: PathBuf,
    pub journal_path: PathBuf,
    pub config: ApiConfig,
    /// sha256 of the local read token (`api.token`).
    pub local_token: String,
    /// Remote commands (`crate::commands`), shared with the service loop.
    pub commands: Arc<crate::commands::CommandBoard>,
    /// Where open commands are kept across restarts; a submit is saved before it is answered.
    pub command_file: Option<Arc<crate::commands::CommandFile>>,
}

/// An error answer: `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the field, token scope or resource.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// `Json<T>` whose rejections are [`ApiError`]s: 400 naming the field serde could not take,
/// 413 for a body over `max_body_bytes` (read to its end first, bounded, so the client sees
/// the 413 and not a reset connection), 415 without a JSON content type.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T> FromRequest<Arc<ApiState>> for ApiJson<T>
where
    Json<T>: FromRequest<Arc<ApiState>, Rejection = axum::extract::rejection::JsonRejection>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<ApiState>) -> Result<Self, Self::Rejection> {
        let limit = state.config.max_body_bytes;
        let (parts, body) = req.into_parts();
        let bytes = read_body(body, limit, || {
            format!("request body over the limit of {limit} bytes ([api] max_body_bytes)")
        })
        .await?;
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => {
                // axum answers 422 for JSON of the wrong shape; to a client it is one more
                // malformed body, so 400 like a syntax error (the message names the field).
                let status = match rejection.status() {
                    StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
                    s => s,
                };
                Err(ApiError::new(status, rejection.body_text()))
            }
        }
    }
}

/// Reads a request body of at most `limit` bytes. A larger one is refused with 413 and
/// `too_large()`'s message, but only after reading up to another `limit` bytes of it:
/// answering a client that is still sending would show it a reset connection instead of the
/// cause.
pub async fn read_body(
    mut body: axum::body::Body,
    limit: usize,
    too_large: impl FnOnce() -> String,
) -> Result<Vec<u8>, ApiError> {
    use axum::body::HttpBody;
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while seen <= limit.saturating_mul(2) {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                return Err(ApiError::bad_request(format!(
                    "cannot read the request body: {e}"
                )));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            bytes.extend_from_slice(&data);
        }
    }
    if seen > limit {
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, too_large()));
    }
    Ok(bytes)
}

/// `Query<T>` whose rejections are 400s naming the parameter.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

/// Runs a blocking file read off the runtime's worker threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => Err(ApiError::internal(format!("request handler failed: {e}"))),
    }
}

/// The OpenAPI document: every handler's annotation, the bearer scheme.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "edge-coordinator API",
        description = "Fleet registry, enrollment, deployments, federated learning, offload and journal of a running edge-coordinator. Bearer tokens from [[api.tokens]]; GET needs scope read, everything else admin."
    ),
    paths(
        devices::list,
        devices::detail,
        enrollment::list,
        enrollment::approve,
        enrollment::reject,
        enrollment::revoke,
        commands::submit,
        commands::detail,
        commands::lines,
        deployments::list,
        deployments::create,
        deployments::detail,
        deployments::pause,
        deployments::resume,
        deployments::abort,
        fl::list,
        fl::detail,
        fl::start,
        fl::stop,
        offload::stats,
        journal::query,
        metrics::metrics,
        openapi_json,
    ),
    modifiers(&BearerScheme),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The OpenAPI 3 document of this API.
#[utoipa::path(get, path = "/api/openapi.json", tag = "meta",
    responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json")))]
pub async fn openapi_json() -> Response {
    match ApiDoc::openapi().to_json() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => {
            ApiError::internal(format!("cannot encode the OpenAPI document: {e}")).into_response()
        }
    }
}

/// The router and the (method, path) of every API route it mounted.
pub fn router(state: Arc<ApiState>) -> (Router, Vec<(Method, &'static str)>) {
    let mut mounted = Vec::new();
    let mut api: Router<Arc<ApiState>> = Router::new();
    let mut mount = |path: &'static str, methods: &[Method], route: MethodRouter<Arc<ApiState>>| {
        mounted.extend(methods.iter().map(|m| (m.clone(), path)));
        api = std::mem::take(&mut api).route(path, route);
    };
    mount("/api/devices", &[Method::GET], get(devices::list));
    mount("/api/devices/{id}", &[Method::GET], get(devices::detail));
    mount("/api/enrollment", &[Method::GET], get(enrollment::list));
    mount(
        "/api/enrollment/{id}/approve",
        &[Method::POST],
        post(enrollment::approve),
    );
    mount(
        "/api/enrollment/{id}/reject",
        &[Method::POST],
        post(enrollment::reject),
    );
    mount(
        "/api/enrollment/{id}/revoke",
        &[Method::POST],
        post(enrollment::revoke),
    );
    mount(
        "/api/devices/{id}/commands",
        &[Method::POST],
        post(commands::submit),
    );
    mount("/api/commands/{id}", &[Method::GET], get(commands::detail));
    mount(
        "/api/commands/{id}/lines",
        &[Method::GET],
        get(commands::lines),
    );
    // Packages are larger than any JSON body: the upload reads its body itself, bounded by
    // `max_upload_bytes` (`deployments::create`).
    mount(
        "/api/deployments",
        &[Method::GET, Method::POST],
        get(deployments::list).post(deployments::create),
    );
    mount(
        "/api/deployments/{id}",
        &[Method::GET],
        get(deployments::detail),
    );
    mount(
        "/api/deployments/{id}/pause",
        &[Method::POST],
        post(deployments::pause),
    );
    mount(
        "/api/deployments/{id}/resume",
        &[Method::POST],
        post(deployments::resume),
    );
    mount(
        "/api/deployments/{id}/abort",
        &[Method::POST],
        post(deployments::abort),
    );
    // One path, two methods: axum wants them in one MethodRouter.
    mount(
        "/api/fl/tasks",
        &[Method::GET, Method::POST],
        get(fl::list).post(fl::start),
    );
    mount("/api/fl/tasks/{id}", &[Method::GET], get(fl::detail));
    mount("/api/fl/tasks/{id}/stop", &[Method::POST], post(fl::stop));
    mount("/api/offload", &[Method::GET], get(offload::stats));
    mount("/api/journal", &[Method::GET], get(journal::query));
    mount("/api/openapi.json", &[Method::GET], get(openapi_json));
    mount("/metrics", &[Method::GET], get(metrics::metrics));
    let max_body = state.config.max_body_bytes;
    let api = api
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state);
    // The dashboard's pages and script are public (they hold no data; their requests carry
    // the token the operator enters).
    let router = dashboard::routes().merge(api);
    (router, mounted)
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such route: {method} {}", uri.path()))
}

/// Bearer-token check: 401 without a known token, 403 when its scope is too small.
async fn authorize(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let path = request.uri().path().to_owned();
    if path == "/metrics" && state.config.metrics_public {
        return Ok(next.run(request).await);
    }
    match grant(&state, &request, &path) {
        Ok(granted) => {
            let mut request = request;
            request.extensions_mut().insert(granted);
            Ok(next.run(request).await)
        }
        Err(refusal) => {
            // Read what the client is still sending (bounded by the largest body any route
            // takes) before answering: closing on a client in the middle of an upload would
            // show it a broken pipe instead of the 401/403 that names the cause.
            let limit = state
                .config
                .max_body_bytes
                .max(state.config.max_upload_bytes);
            let _ = axum::body::to_bytes(request.into_body(), limit).await;
            Err(refusal)
        }
    }
}

/// The token's name and scope, or why the request is refused.
fn grant(state: &ApiState, request: &Request, path: &str) -> Result<commands::Granted, ApiError> {
    // A command that only reads from a device (logs, config) needs scope read; the handler
    // checks admin for the ones that change it, from the scope granted here.
    let device_command = request.method() == Method::POST
        && path.starts_with("/api/devices/")
        && path.ends_with("/commands");
    let needed =
        if request.method() == Method::GET || request.method() == Method::HEAD || device_command {
            Scope::Read
        } else {
            Scope::Admin
        };
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token: send Authorization: Bearer TOKEN (edge-coordinator api-token makes one)",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "malformed Authorization header: expected Bearer TOKEN",
            )
        })?;
    let digest = config::token_digest(token);
    let (name, scope) = if digest == state.local_token {
        ("local", Scope::Read)
    } else {
        match state.config.tokens.iter().find(|t| t.sha256 == digest) {
            Some(t) => (t.name.as_str(), t.scope),
            None => {
                tracing::warn!(path = %path, "API request with an unknown token");
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unknown bearer token",
                ));
            }
        }
    };
    if scope < needed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token {name:?} has scope {}; {} {path} needs scope {}",
                scope.as_str(),
                request.method(),
                needed.as_str()
            ),
        ));
    }
    if needed == Scope::Admin {
        tracing::info!(token = name, method = %request.method(), path = %path, "API admin request");
    }
    Ok(commands::Granted {
        scope,
        token: name.to_owned(),
    })
}

/// A running API server.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    state_dir: PathBuf,
}

impl Server {
    /// Binds `config.listen`, writes `api.json` and the local token, and serves until
    /// [`Server::shutdown`].
    pub async fn start(
        config: &ApiConfig,
        view: Arc<FleetView>,
        state_dir: &Path,
        journal_path: &Path,
        commands: Arc<crate::commands::CommandBoard>,
        command_file: Arc<crate::commands::CommandFile>,
    ) -> Result<Server, ApiStartError> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|error| ApiStartError::Bind {
                addr: config.listen,
                error,
            })?;
        let addr = listener.local_addr().map_err(|error| ApiStartError::Bind {
            addr: config.listen,
            error,
        })?;
        let local = config::new_token();
        let token_path = local_token_path(state_dir);
        write_private(&token_path, local.as_bytes())?;
        let address = Address {
            url: format!("http://{addr}"),
            pid: std::process::id(),
        };
        let address_file = address_path(state_dir);
        let text = serde_json::to_vec(&address).unwrap_or_default();
        write_private(&address_file, &text)?;
        let state = Arc::new(ApiState {
            view,
            state_dir: state_dir.to_owned(),
            journal_path: journal_path.to_owned(),
            config: config.clone(),
            local_token: config::token_digest(&local),
            commands,
            command_file: Some(command_file),
        });
        let (router, _) = router(state);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "HTTP API stopped");
            }
        });
        tracing::info!(url = %address.url, tokens = config.tokens.len(), "HTTP API listening");
        Ok(Server {
            addr,
            stop,
            task,
            state_dir: state_dir.to_owned(),
        })
    }

    /// Stops accepting, lets requests in flight finish (bounded), removes `api.json`.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(std::time::Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            tracing::warn!("HTTP API requests still running after 5 s; dropped");
            task.abort();
        }
        for path in [
            address_path(&self.state_dir),
            local_token_path(&self.state_dir),
        ] {
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove API file");
            }
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ApiStartError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |error| ApiStartError::Write {
        path: path.to_owned(),
        error,
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route the router mounts is in the OpenAPI document with its method, and the
    /// document names no route that is not mounted.
    #[test]
    fn openapi_lists_exactly_the_mounted_routes() {
        let state = Arc::new(ApiState {
            view: Arc::new(FleetView::new(1, 0)),
            state_dir: PathBuf::from("/nonexistent"),
            journal_path: PathBuf::from("/nonexistent/journal.jsonl"),
            config: ApiConfig::default(),
            local_token: String::new(),
            commands: Arc::new(crate::commands::CommandBoard::new(0)),
            command_file: None,
        });
        let (_, mounted) = router(state);
        let mut mounted: Vec<(String, String)> = mounted
            .iter()
            .map(|(m, p)| (m.as_str().to_lowercase(), (*p).to_owned()))
            .collect();
        mounted.sort();
        let doc: serde_json::Value =
            serde_json::to_value(ApiDoc::openapi()).expect("the document serializes");
        let mut documented = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                documented.push((method.clone(), path.clone()));
            }
        }
        documented.sort();
        assert_eq!(mounted, documented);
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    }
}
