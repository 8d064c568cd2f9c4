//! `GET /api/journal`: journal lines by device, event and time range. Bounded twice: only the
//! newest [`SCAN_BYTES`] of the current journal file are searched (the answer says where the
//! search started), and at most `limit` matching lines come back, the newest ones.

use std::io::{BufRead, Seek, SeekFrom};
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiQuery, ApiState, blocking};

/// How much of the journal's end one query reads.
pub const SCAN_BYTES: u64 = 32 * 1024 * 1024;
const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JournalQuery {
    /// Only lines about this device.
    pub device: Option<String>,
    /// Only this event (`telemetry`, `deploy`, `fl_round_closed`, ...).
    pub event: Option<String>,
    /// Only lines at or after this time, ms since the epoch.
    pub since_ms: Option<u64>,
    /// Only lines before this time, ms since the epoch.
    pub until_ms: Option<u64>,
    /// Most lines, 1 to 1000 (default 100): the newest matching ones, oldest first.
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JournalLines {
    /// Matching lines, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub lines: Vec<serde_json::Value>,
    /// More lines matched than `limit`; the oldest were left out.
    pub truncated: bool,
    /// Byte offset in the journal file where the search started (0: the whole file).
    pub scanned_from: u64,
    pub journal: String,
}

/// Journal lines matching the filters.
#[utoipa::path(get, path = "/api/journal", tag = "journal", params(JournalQuery),
    responses((status = 200, body = JournalLines), (status = 400, body = super::ErrorBody),
        (status = 401, body = super::ErrorBody)))]
pub async fn query(
    State(state): State<Arc<ApiState>>,
    ApiQuery(q): ApiQuery<JournalQuery>,
) -> Result<Json<JournalLines>, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit: must be 1 to {MAX_LIMIT}, got {limit}"
        )));
    }
    if let (Some(a), Some(b)) = (q.since_ms, q.until_ms)
        && a > b
    {
        return Err(ApiError::bad_request(format!(
            "since_ms: {a} is after until_ms {b}"
        )));
    }
    let path = state.journal_path.clone();
    let lines = blocking(move || search(&path, &q, limit)).await?;
    Ok(Json(lines))
}

fn search(
    path: &std::path::Path,
    q: &JournalQuery,
    limit: usize,
) -> Result<JournalLines, ApiError> {
    let err = |e: std::io::Error| {
        ApiError::internal(format!("cannot read journal {}: {e}", path.display()))
    };
    let mut file = std::fs::File::open(path).map_err(err)?;
    let len = file.metadata().map_err(err)?.len();
    let from = len.saturating_sub(SCAN_BYTES);
    file.seek(SeekFrom::Start(from)).map_err(err)?;
    let mut reader = std::io::BufReader::new(file);
    let mut line = Vec::new();
    if from > 0 {
        // Mid-line: skip to the next whole one.
        reader.read_until(b'\n', &mut line).map_err(err)?;
    }
    let mut found = std::collections::VecDeque::new();
    let mut truncated = false;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(err)? == 0 {
            break;
        }
        // Cheap text checks first: most lines are for other devices and events.
        if let Some(d) = &q.device
            && !contains(&line, format!("\"device\":\"{d}\"").as_bytes())
        {
            continue;
        }
        if let Some(e) = &q.event
            && !contains(&line, format!("\"event\":\"{e}\"").as_bytes())
        {
            continue;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&line) else {
            // A line cut by a crash (the journal's tail); not an answer to anyone's query.
            continue;
        };
        let ts = value
            .get("ts_ms")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if q.since_ms.is_some_and(|s| ts < s) || q.until_ms.is_some_and(|u| ts >= u) {
            continue;
        }
        if found.len() == limit {
            found.pop_front();
            truncated = true;
        }
        found.push_back(value);
    }
    Ok(JournalLines {
        lines: found.into(),
        truncated,
        scanned_from: from,
        journal: path.display().to_string(),
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
