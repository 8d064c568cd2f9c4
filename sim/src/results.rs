//! The run's results: per-device end states and the timeline, written as CSV
//! (`devices.csv`, `timeline.csv`) and JSON (`result.json`), and a summary printed at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::device::{DeviceSpec, DeviceState};
use crate::timeline::Entry;

/// One device at the end of the run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeviceEnd {
    pub device: String,
    pub group: String,
    /// Whether the scenario's health rule made this device fail candidates.
    pub fails_health: bool,
    pub enrolled: bool,
    /// The live pipeline at the end (empty: none).
    pub pipeline: String,
    pub deployment_id: String,
    /// Its version; 0 when none runs.
    pub version: u64,
    pub candidates: u32,
    pub health_failed: u32,
    pub committed: u32,
    pub discarded: u32,
    pub reboots: u32,
    pub power_cuts: u32,
    /// Messages the device's outboxes delivered (summed over restarts).
    pub delivered: u64,
    /// Messages left in its outbox at the end.
    pub queued: u64,
    /// `prompt`, `straggler` or `dropout` with federated learning; empty without.
    pub fl_role: String,
    /// Federated rounds it trained.
    pub fl_trained: u32,
    /// Global version of the newest round message it verified (0: none).
    #[serde(default)]
    pub fl_version: u32,
    /// Round messages it refused, over its restarts.
    #[serde(default)]
    pub fl_rejected: u64,
}

impl DeviceEnd {
    pub fn of(spec: &DeviceSpec, s: &DeviceState) -> DeviceEnd {
        let live = s.live.clone().unwrap_or_default();
        DeviceEnd {
            device: spec.id.clone(),
            group: spec.group.clone(),
            fails_health: spec.fails_health.is_some(),
            enrolled: s.enrolled,
            pipeline: live.pipeline,
            deployment_id: live.deployment_id,
            version: live.version,
            candidates: s.candidates,
            health_failed: s.health_failed,
            committed: s.committed,
            discarded: s.discarded,
            reboots: s.reboots,
            power_cuts: s.power_cuts,
            delivered: s.delivered,
            queued: s.queued,
            fl_role: spec
                .fl
                .as_ref()
                .map(|f| format!("{:?}", f.role).to_lowercase())
                .unwrap_or_default(),
            fl_trained: s.fl_trained,
            fl_version: s.fl_version,
            fl_rejected: s.fl_rejected,
        }
    }
}

/// Counts over the fleet.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Summary {
    pub devices: usize,
    pub enrolled: usize,
    /// Devices per live version ("none" for devices running nothing).
    pub versions: BTreeMap<String, usize>,
    pub health_failed_devices: usize,
    pub reboots: u64,
    pub power_cuts: u64,
}

/// What `result.json` holds.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Report {
    pub summary: Summary,
    pub devices: Vec<DeviceEnd>,
    pub timeline: Vec<TimelineEntry>,
}

/// A timeline entry as written (the same fields as [`Entry`]).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TimelineEntry {
    pub t_ms: u64,
    pub unix_ms: u64,
    pub device: String,
    pub event: String,
    pub detail: String,
}

/// Progress while running.
#[derive(Debug)]
pub struct Progress {
    pub enrolled: usize,
    pub versions: String,
    pub candidates: u64,
}

/// `states`: (enrolled, live version, candidates, committed) per device.
pub fn progress(states: &[(bool, Option<u64>, u32, u32)]) -> Progress {
    let mut versions: BTreeMap<String, usize> = BTreeMap::new();
    for (_, v, _, _) in states {
        *versions.entry(version_label(*v)).or_default() += 1;
    }
    Progress {
        enrolled: states.iter().filter(|s| s.0).count(),
        versions: versions
            .iter()
            .map(|(v, n)| format!("{v}:{n}"))
            .collect::<Vec<_>>()
            .join(" "),
        candidates: states.iter().map(|s| u64::from(s.2)).sum(),
    }
}

fn version_label(v: Option<u64>) -> String {
    match v {
        Some(v) => format!("v{v}"),
        None => "none".into(),
    }
}

pub fn summarize(devices: &[DeviceEnd]) -> Summary {
    let mut versions: BTreeMap<String, usize> = BTreeMap::new();
    for d in devices {
        let v = (!d.pipeline.is_empty()).then_some(d.version);
        *versions.entry(version_label(v)).or_default() += 1;
    }
    Summary {
        devices: devices.len(),
        enrolled: devices.iter().filter(|d| d.enrolled).count(),
        versions,
        health_failed_devices: devices.iter().filter(|d| d.health_failed > 0).count(),
        reboots: devices.iter().map(|d| u64::from(d.reboots)).sum(),
        power_cuts: devices.iter().map(|d| u64::from(d.power_cuts)).sum(),
    }
}

/// A CSV field, quoted when it needs to be.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

pub fn devices_csv(devices: &[DeviceEnd]) -> String {
    let mut out = String::from(
        "device,group,fails_health,enrolled,pipeline,deployment_id,version,candidates,\
         health_failed,committed,discarded,reboots,power_cuts,delivered,queued,fl_role,fl_trained,\
         fl_version,fl_rejected\n",
    );
    for d in devices {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            field(&d.device),
            field(&d.group),
            d.fails_health,
            d.enrolled,
            field(&d.pipeline),
            field(&d.deployment_id),
            d.version,
            d.candidates,
            d.health_failed,
            d.committed,
            d.discarded,
            d.reboots,
            d.power_cuts,
            d.delivered,
            d.queued,
            d.fl_role,
            d.fl_trained,
            d.fl_version,
            d.fl_rejected
        );
    }
    out
}

pub fn timeline_csv(entries: &[Entry]) -> String {
    let mut out = String::from("t_ms,unix_ms,device,event,detail\n");
    for e in entries {
        let _ = writeln!(
            out,
            "{},{},{},{},{}",
            e.t_ms,
            e.unix_ms,
            field(&e.device),
            field(&e.event),
            field(&e.detail)
        );
    }
    out
}

/// Writes `devices.csv`, `timeline.csv` and `result.json` under `out`; prints the summary.
pub fn write(out: &Path, devices: &[DeviceEnd], timeline: &[Entry]) -> Result<Summary> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let summary = summarize(devices);
    let report = Report {
        summary: summary.clone(),
        devices: devices.to_vec(),
        timeline: timeline
            .iter()
            .map(|e| TimelineEntry {
                t_ms: e.t_ms,
                unix_ms: e.unix_ms,
                device: e.device.clone(),
                event: e.event.clone(),
                detail: e.detail.clone(),
            })
            .collect(),
    };
    let files = [
        ("devices.csv", devices_csv(devices)),
        ("timeline.csv", timeline_csv(timeline)),
        ("result.json", serde_json::to_string_pretty(&report)?),
    ];
    for (name, text) in files {
        let p = out.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    println!(
        "{} devices, {} enrolled; live versions: {}; {} devices failed a health check; {} reboots, {} power cuts; results in {}",
        summary.devices,
        summary.enrolled,
        summary
            .versions
            .iter()
            .map(|(v, n)| format!("{v}={n}"))
            .collect::<Vec<_>>()
            .join(" "),
        summary.health_failed_devices,
        summary.reboots,
        summary.power_cuts,
        out.display()
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_quoting() {
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(field("plain"), "plain");
    }
}
