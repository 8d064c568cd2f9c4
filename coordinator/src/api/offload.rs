//! `GET /api/offload`: the offload inference service's counters, queue and compute times,
//! as of the service loop's last refresh (every 250 ms).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::view::OffloadSnapshot;
use super::{ApiError, ApiState};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OffloadStats {
    /// Whether this coordinator runs the offload service (`[offload] enabled` and a loadable
    /// ONNX Runtime).
    pub enabled: bool,
    pub service: Option<OffloadSnapshot>,
    /// Offload decisions the devices reported in their telemetry, summed over the fleet, by
    /// `side/reason`.
    pub device_decisions: std::collections::BTreeMap<String, u64>,
    /// Offloaded frames that devices ran locally after all, by cause, summed over the fleet.
    pub device_fallbacks: std::collections::BTreeMap<String, u64>,
}

/// The offload service and the fleet's offload decisions.
#[utoipa::path(get, path = "/api/offload", tag = "offload",
    responses((status = 200, body = OffloadStats), (status = 401, body = super::ErrorBody)))]
pub async fn stats(State(state): State<Arc<ApiState>>) -> Result<Json<OffloadStats>, ApiError> {
    let service = state.view.offload();
    let mut device_decisions = std::collections::BTreeMap::new();
    let mut device_fallbacks = std::collections::BTreeMap::new();
    for row in state.view.rows() {
        let Some(o) = row
            .record
            .telemetry
            .as_ref()
            .and_then(|t| t.body.offload.as_ref())
        else {
            continue;
        };
        for (k, v) in &o.decisions {
            *device_decisions.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &o.fallbacks {
            *device_fallbacks.entry(k.clone()).or_insert(0) += v;
        }
    }
    Ok(Json(OffloadStats {
        enabled: service.is_some(),
        service,
        device_decisions,
        device_fallbacks,
    }))
}
