//! The device registry record (what the coordinator knows about one device) and its rendering
//! for `edge-coordinator devices` (beside each device's enrollment) and `devices pending`.
//!
//! Records are stored as JSON in sled. Every field has a serde default so a record written by
//! an older coordinator still loads after fields are added.

use protocol::v1::{Registration, Telemetry};
use serde::{Deserialize, Serialize};

use crate::enrollment::EnrollmentRecord;

/// Everything the registry keeps per device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceRecord {
    pub device: String,
    /// First message of any kind from this device, coordinator clock, ms since the epoch.
    pub first_seen_ms: u64,
    /// Latest accepted message from this device, coordinator clock.
    pub last_seen_ms: u64,
    /// From the device's retained status (its last will clears it).
    pub online: bool,
    /// Start of the session the status describes, device clock.
    pub since_ms: u64,
    /// From the latest status or registration.
    pub agent_version: String,
    /// The latest registration (sent at every agent start).
    pub registration: Option<Registration>,
    /// The newest telemetry sample by the device's clock.
    pub telemetry: Option<TelemetrySnapshot>,
    pub counters: Counters,
}

/// The newest telemetry sample and where it came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TelemetrySnapshot {
    pub id: String,
    pub seq: u64,
    /// Device clock when the sample was queued.
    pub created_ms: u64,
    /// Coordinator clock when it arrived.
    pub received_ms: u64,
    pub body: Telemetry,
}

/// Per-device message counts since the device was first seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Accepted messages of every kind (status, register, telemetry, data).
    pub messages: u64,
    /// Redeliveries of a message id already processed.
    pub duplicates: u64,
    /// Malformed or oversized messages on this device's topics.
    pub rejected: u64,
    pub registrations: u64,
    pub telemetry: u64,
    pub data: u64,
}

impl DeviceRecord {
    pub fn new(device: &str, now_ms: u64) -> Self {
        DeviceRecord {
            device: device.to_owned(),
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            ..DeviceRecord::default()
        }
    }
}

/// Renders records as the `devices` table, one line per device, ages relative to `now_ms`:
/// every registry record with its enrollment state and groups, and enrolled or revoked devices
/// that have not sent anything yet.
pub fn render_table(
    records: &[DeviceRecord],
    enrollments: &[EnrollmentRecord],
    now_ms: u64,
) -> String {
    let enrollment = |device: &str| enrollments.iter().find(|e| e.device == device);
    let silent: Vec<DeviceRecord> = enrollments
        .iter()
        .filter(|e| {
            matches!(
                e.state,
                protocol::v1::enroll::Decision::Accepted | protocol::v1::enroll::Decision::Revoked
            ) && !records.iter().any(|r| r.device == e.device)
        })
        .map(|e| DeviceRecord {
            device: e.device.clone(),
            ..DeviceRecord::default()
        })
        .collect();
    let mut rows = vec![
        [
            "DEVICE",
            "ENROLLED",
            "GROUPS",
            "ONLINE",
            "LAST SEEN",
            "AGENT",
            "CPU%",
            "MEM USED",
            "RSS",
            "OUTBOX c/m/r/t",
            "MSGS",
            "DUPS",
            "REJECTED",
        ]
        .map(String::from),
    ];
    for r in records.iter().chain(&silent) {
        let t = r.telemetry.as_ref().map(|t| &t.body);
        let e = enrollment(&r.device);
        rows.push([
            r.device.clone(),
            e.map_or("no".into(), |e| e.state.as_str().to_owned()),
            e.filter(|e| !e.groups.is_empty())
                .map_or("-".into(), |e| e.groups.join(",")),
            if r.online { "yes".into() } else { "no".into() },
            age(now_ms, r.last_seen_ms),
            if r.agent_version.is_empty() {
                "-".into()
            } else {
                r.agent_version.clone()
            },
            t.map_or("-".into(), |t| format!("{:.1}", t.cpu_percent)),
            t.map_or("-".into(), |t| mib(t.mem_used_bytes)),
            t.map_or("-".into(), |t| mib(t.agent_rss_bytes)),
            t.map_or("-".into(), |t| {
                let d = t.outbox.depth;
                format!("{}/{}/{}/{}", d[0], d[1], d[2], d[3])
            }),
            r.counters.messages.to_string(),
            r.counters.duplicates.to_string(),
            r.counters.rejected.to_string(),
        ]);
    }
    columns(&rows)
}

/// Renders the enrollment requests waiting for an operator (`devices pending`).
pub fn render_pending(records: &[EnrollmentRecord], now_ms: u64) -> String {
    let mut rows = vec![
        [
            "DEVICE",
            "KEY ID",
            "REQUESTED",
            "LAST REQUEST",
            "CLAIM",
            "ARCH",
            "OS",
            "BOARD",
            "ACCELERATORS",
            "AGENT",
        ]
        .map(String::from),
    ];
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    for r in records {
        let h = &r.hardware;
        rows.push([
            r.device.clone(),
            r.key_id(),
            age(now_ms, r.requested_ms),
            age(now_ms, r.last_request_ms),
            r.claim.clone().unwrap_or_else(|| "-".into()),
            dash(&h.arch),
            dash(&h.os),
            dash(&h.board),
            dash(&h.accelerators.join(",")),
            dash(&h.agent_version),
        ]);
    }
    columns(&rows)
}

/// Aligns rows into columns (the first row is the header).
pub fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `12s ago`, `3m ago`, ..., `never` for 0.
pub fn age(now_ms: u64, then_ms: u64) -> String {
    if then_ms == 0 {
        return "never".into();
    }
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// Bytes in MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_row_per_device() {
        let mut a = DeviceRecord::new("pi-1", 1_000);
        a.online = true;
        a.agent_version = "0.1.0".into();
        a.counters.messages = 7;
        a.telemetry = Some(TelemetrySnapshot {
            body: Telemetry {
                cpu_percent: 12.5,
                ..Telemetry::default()
            },
            ..TelemetrySnapshot::default()
        });
        let b = DeviceRecord::new("pi-2", 1_000);
        let enrolled = |device: &str, state| EnrollmentRecord {
            device: device.into(),
            identity: protocol::v1::auth::Identity::generate().public(),
            state,
            groups: vec!["lab".into()],
            hardware: Default::default(),
            by: "operator".into(),
            claim: None,
            reason: String::new(),
            requested_ms: 1_000,
            last_request_ms: 1_000,
            decided_ms: 1_000,
            coordinator_key: String::new(),
            announced_key: String::new(),
        };
        use protocol::v1::enroll::Decision;
        let enrollments = [
            enrolled("pi-1", Decision::Accepted),
            enrolled("pi-3", Decision::Accepted),
            enrolled("pi-4", Decision::Pending),
        ];
        let table = render_table(&[a, b], &enrollments, 61_000);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(
            lines[1].starts_with("pi-1")
                && lines[1].contains("accepted")
                && lines[1].contains("lab")
                && lines[1].contains("yes")
                && lines[1].contains("12.5")
        );
        assert!(lines[1].contains("1m ago"), "{table}");
        assert!(lines[2].starts_with("pi-2") && lines[2].contains("no"));
        assert!(
            lines[3].starts_with("pi-3") && lines[3].contains("never"),
            "{table}"
        );
        let pending = render_pending(&enrollments[2..], 61_000);
        assert!(
            pending
                .lines()
                .nth(1)
                .is_some_and(|l| l.starts_with("pi-4")),
            "{pending}"
        );
    }

    #[test]
    fn old_records_with_missing_fields_still_load() {
        let r: DeviceRecord =
            serde_json::from_str(r#"{"device":"d1","online":true}"#).expect("loads");
        assert_eq!(r.device, "d1");
        assert!(r.online);
        assert_eq!(r.counters, Counters::default());
    }
}
