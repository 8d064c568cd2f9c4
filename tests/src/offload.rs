//! The offload scenario's parts, shared by `tests/tests/offload.rs` and `cargo xtask demo`: a
//! coordinator config serving one model for offload, an agent pipeline whose inference stage
//! may offload it, the agent's `[offload]` settings, and readers for the decision counts the
//! agent reports in telemetry.

use std::path::Path;

use anyhow::Result;

use crate::{AgentOptions, Event};

/// The coordinator's name for the offloaded model.
pub const OFFLOAD_MODEL: &str = "mlp";

/// A pipeline: a 20 Hz synthetic sensor (64-sample windows) -> the MLP at `models/mlp.onnx`
/// (relative to the pipeline file), which may run on the coordinator -> the log.
pub const OFFLOAD_PIPELINE: &str = r#"
name = "offload"
[[source]]
name = "sensor"
kind = "synthetic"
rate_hz = 20
window = 64
[[stage]]
name = "classify"
kind = "inference"
model = "models/mlp.onnx"
input = "sensor"
offload_model = "mlp"
[[sink]]
kind = "log"
input = "classify"
every = 100
"#;

/// Coordinator config text: the offload service (2 workers) serving `model` as
/// [`OFFLOAD_MODEL`], advertising every 200 ms.
pub fn offload_coordinator_config(model: &Path) -> String {
    format!(
        "watch_unknown_topics = false\n[offload]\nenabled = true\nworkers = 2\n\
         max_queue = 16\nreplica = \"r1\"\nadvertise_interval_ms = 200\n\
         [offload.models]\n{OFFLOAD_MODEL} = {model:?}\n"
    )
}

/// Sets the agent to run `pipeline` and to decide by cost as a battery-powered device would:
/// energy decides (the CPU costs far more than the radio), an answer must come within 150 ms,
/// the link is probed every second when nothing else measured it.
pub fn offloading_agent(o: &mut AgentOptions, pipeline: &Path) -> Result<()> {
    let mut p = toml::Table::new();
    p.insert(
        "file".into(),
        toml::Value::String(pipeline.display().to_string()),
    );
    o.extra.insert("pipeline".into(), toml::Value::Table(p));
    let offload: toml::Table = toml::from_str(
        "mode = \"cost\"\nlatency_weight = 0.0\nenergy_weight = 1.0\ncpu_mw = 100000.0\n\
         idle_mw = 10.0\nradio_nj_per_byte = 1.0\ndeadline_ms = 150\ntimeout_ms = 1000\n\
         probe_interval_ms = 1000\nadvert_max_age_ms = 5000\n",
    )?;
    o.extra
        .insert("offload".into(), toml::Value::Table(offload));
    Ok(())
}

/// The `offload` section of `device`'s latest telemetry carrying one.
pub fn latest_offload<'a>(events: &'a [Event], device: &str) -> Option<&'a serde_json::Value> {
    events
        .iter()
        .rev()
        .filter(|e| e.is_for("telemetry", device))
        .find_map(|e| e.raw.get("offload"))
}

/// A counter of the latest offload telemetry: `decisions.local/deadline`, `remote_ok`, ...
/// (a `/` after the first dot is part of the key); 0 when absent.
pub fn offload_count(events: &[Event], device: &str, path: &str) -> u64 {
    let Some(mut v) = latest_offload(events, device) else {
        return 0;
    };
    let (head, rest) = path.split_once('.').unwrap_or((path, ""));
    v = match v.get(head) {
        Some(x) => x,
        None => return 0,
    };
    if !rest.is_empty() {
        v = match v.get(rest) {
            Some(x) => x,
            None => return 0,
        };
    }
    v.as_u64().unwrap_or(0)
}
