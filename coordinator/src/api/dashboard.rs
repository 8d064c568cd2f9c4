//! The web dashboard: one page and one script, embedded in the binary (`include_str!`), plain
//! HTML and JavaScript with inline SVG charts; no build step. The pages hold no data: the
//! script reads the JSON API with the bearer token the operator enters, so they are served
//! without a token.
//!
//! Views (URL fragment): fleet overview `#/` (online/offline, versions, devices needing
//! attention, the device list paginated on the server), device `#/device/ID` (CPU, memory and
//! outbox charts from the telemetry history, pipeline stage rates and latencies, the
//! inference provider in use, offload decisions), rollouts `#/rollouts` and `#/rollout/ID`
//! (per-device progress), federated tasks `#/fl` and `#/fl/ID` (accuracy and upload bytes per
//! round).

use axum::Router;
use axum::http::header;
use axum::routing::get;

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");

/// `/` and `/dashboard.js`.
pub fn routes() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    INDEX,
                )
            }),
        )
        .route(
            "/dashboard.js",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    SCRIPT,
                )
            }),
        )
}
