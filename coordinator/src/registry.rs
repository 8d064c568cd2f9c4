//! The device registry record (what the coordinator knows about one device) and its rendering
//! for `edge-coordinator devices`.
//!
//! Records are stored as JSON in sled. Every field has a serde default so a record written by
//! an older coordinator still loads after fields are added.

use protocol::v1::{Registration, Telemetry};
use serde::{Deserialize, Serialize};

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

/// Renders records as the `devices` table, one line per device, ages relative to `now_ms`.
pub fn render_table(records: &[DeviceRecord], now_ms: u64) -> String {
    let mut rows = vec![
        [
            "DEVICE",
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
    for r in records {
        let t = r.telemetry.as_ref().map(|t| &t.body);
        rows.push([
            r.device.clone(),
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
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
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

fn age(now_ms: u64, then_ms: u64) -> String {
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

fn mib(bytes: u64) -> String {
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
        let table = render_table(&[a, b], 61_000);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[1].starts_with("pi-1") && lines[1].contains("yes") && lines[1].contains("12.5")
        );
        assert!(lines[1].contains("1m ago"), "{table}");
        assert!(lines[2].starts_with("pi-2") && lines[2].contains("no"));
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
