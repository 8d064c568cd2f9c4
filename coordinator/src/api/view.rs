//! The fleet as the API, `/metrics` and the dashboard see it: a snapshot the service loop
//! updates after each batch and the HTTP handlers read, so no request ever waits on the loop
//! and the loop never waits on a request for longer than a map insert.
//!
//! Readers copy what they need (an `Arc` per device record, one device's history) under the
//! read lock and format outside it; writers replace changed records. Telemetry history is
//! bounded per device (`[api] history_samples`) and lives only in memory: it starts empty at
//! each coordinator start (the journal keeps every sample for longer looks back).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use protocol::v1::enroll::Decision;
use serde::Serialize;

use crate::enrollment::EnrollmentRecord;
use crate::event::Event;
use crate::registry::DeviceRecord;

use super::index::{self, Counts, Filter, Index};

/// One telemetry sample, reduced to what charts plot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Sample {
    /// Coordinator clock when it arrived, ms since the epoch.
    pub received_ms: u64,
    /// Device clock when it was queued.
    pub created_ms: u64,
    pub cpu_percent: f32,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    pub agent_rss_bytes: u64,
    /// Outbox depth per class: control, model, results, telemetry.
    pub outbox_depth: [u64; 4],
    /// Per pipeline stage: calls so far and latency percentiles (rates are differences
    /// between samples).
    pub stages: Vec<StageSample>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct StageSample {
    pub name: String,
    pub calls: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl Sample {
    fn of(record: &DeviceRecord) -> Option<Sample> {
        let t = record.telemetry.as_ref()?;
        let b = &t.body;
        Some(Sample {
            received_ms: t.received_ms,
            created_ms: t.created_ms,
            cpu_percent: b.cpu_percent,
            mem_used_bytes: b.mem_used_bytes,
            mem_total_bytes: b.mem_total_bytes,
            agent_rss_bytes: b.agent_rss_bytes,
            outbox_depth: b.outbox.depth,
            stages: b
                .pipeline
                .iter()
                .flat_map(|p| &p.stages)
                .map(|s| StageSample {
                    name: s.name.clone(),
                    calls: s.calls,
                    errors: s.errors + s.traps + s.timeouts,
                    p50_us: s.p50_us,
                    p99_us: s.p99_us,
                })
                .collect(),
        })
    }
}

/// A device as the view keeps it.
#[derive(Debug, Clone)]
pub struct DeviceEntry {
    pub record: Arc<DeviceRecord>,
    /// Telemetry samples, oldest first, at most `history_samples`.
    pub history: VecDeque<Sample>,
}

/// Service-wide counters since start, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Accepted messages by (class, topic kind): `telemetry/telemetry`, `results/data`, ...
    pub messages: BTreeMap<(String, String), u64>,
    /// Messages the core rejected, by reason.
    pub rejected: BTreeMap<String, u64>,
    pub duplicates: u64,
    /// Messages the gate dropped (unauthenticated, replayed, ...), by reason.
    pub auth_rejected: BTreeMap<String, u64>,
    /// Deployment steps reported by devices, by step.
    pub deploy_steps: BTreeMap<String, u64>,
    pub fl_updates: u64,
    pub fl_rounds_closed: u64,
}

/// The offload service's figures at the last refresh.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct OffloadSnapshot {
    pub replica: String,
    pub workers: usize,
    pub max_queue: usize,
    pub queue_depth: u32,
    pub models: Vec<String>,
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub overloaded: u64,
    pub expired: u64,
    pub unknown_model: u64,
    pub garbage: u64,
    pub probes: u64,
    pub dropped: u64,
    /// Compute time percentiles over the recent window, ms; absent before the first run.
    pub compute_p50_ms: Option<f64>,
    pub compute_p99_ms: Option<f64>,
}

#[derive(Debug, Default)]
struct State {
    devices: BTreeMap<String, DeviceEntry>,
    enrollments: BTreeMap<String, Arc<EnrollmentRecord>>,
    counters: Counters,
    offload: Option<OffloadSnapshot>,
    started_ms: u64,
    /// The device list's sets, kept with `devices` and `enrollments` in the same writes.
    index: Index,
}

impl State {
    /// The row `rows()` would list for `id`, if any.
    fn row(&self, id: &str) -> Option<Row> {
        let enrollment = self.enrollments.get(id).cloned();
        match self.devices.get(id) {
            Some(d) => Some(Row {
                record: d.record.clone(),
                enrollment,
            }),
            None => enrollment
                .filter(|e| matches!(e.state, Decision::Accepted | Decision::Revoked))
                .map(|e| Row {
                    record: Arc::new(DeviceRecord {
                        device: id.to_owned(),
                        ..DeviceRecord::default()
                    }),
                    enrollment: Some(e),
                }),
        }
    }

    fn reindex(&mut self, id: &str) {
        let entry = self.row(id).map(|row| index::Entry {
            state: row.state(),
            groups: row
                .enrollment
                .as_ref()
                .map(|e| e.groups.clone())
                .unwrap_or_default(),
            version: row.record.agent_version.clone(),
            online: row.record.online,
            static_attention: super::devices::needs_static_attention(&row),
            fresh_ms: match &row.record.telemetry {
                Some(t) if row.record.online && !super::devices::needs_static_attention(&row) => {
                    Some(t.received_ms)
                }
                _ => None,
            },
        });
        self.index.set(id, entry);
    }
}

/// A page of the device list from the index.
#[derive(Debug)]
pub enum Listing {
    /// Unfiltered or one filter: the page's rows and the whole match's counts.
    Indexed { counts: Counts, rows: Vec<Row> },
    /// Several filters, or `attention`: every row of the smallest named set, for a full pass.
    Scan(Vec<Row>),
}

/// Shared between the service loop (writer) and the HTTP handlers (readers).
#[derive(Debug)]
pub struct FleetView {
    state: RwLock<State>,
    history_samples: usize,
}

/// What a list query sees of one device: its record and enrollment.
#[derive(Debug, Clone)]
pub struct Row {
    pub record: Arc<DeviceRecord>,
    pub enrollment: Option<Arc<EnrollmentRecord>>,
}

impl Row {
    pub fn state(&self) -> &'static str {
        self.enrollment
            .as_ref()
            .map_or("unenrolled", |e| e.state.as_str())
    }
}

impl FleetView {
    pub fn new(history_samples: usize, started_ms: u64) -> FleetView {
        FleetView {
            state: RwLock::new(State {
                started_ms,
                ..State::default()
            }),
            history_samples: history_samples.max(1),
        }
    }

    // A panicking reader leaves nothing half-written (readers do not write), and a writer
    // only inserts whole values, so a poisoned lock still holds a consistent view.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn started_ms(&self) -> u64 {
        self.read().started_ms
    }

    /// Replaces the records of devices that changed; a new telemetry sample joins the history.
    pub fn update_devices<'a>(&self, records: impl IntoIterator<Item = &'a DeviceRecord>) {
        let prepared: Vec<(Arc<DeviceRecord>, Option<Sample>)> = records
            .into_iter()
            .map(|r| (Arc::new(r.clone()), Sample::of(r)))
            .collect();
        if prepared.is_empty() {
            return;
        }
        let max = self.history_samples;
        let mut state = self.write();
        for (record, sample) in prepared {
            let entry = state
                .devices
                .entry(record.device.clone())
                .or_insert_with(|| DeviceEntry {
                    record: record.clone(),
                    history: VecDeque::new(),
                });
            let new_sample = match (&sample, entry.history.back()) {
                (Some(s), Some(last)) => {
                    s.received_ms != last.received_ms || s.created_ms != last.created_ms
                }
                (Some(_), None) => true,
                (None, _) => false,
            };
            if let (true, Some(s)) = (new_sample, sample) {
                if entry.history.len() >= max {
                    entry.history.pop_front();
                }
                entry.history.push_back(s);
            }
            let id = record.device.clone();
            entry.record = record;
            state.reindex(&id);
        }
    }

    /// Replaces every enrollment record.
    pub fn set_enrollments<'a>(&self, records: impl IntoIterator<Item = &'a EnrollmentRecord>) {
        let map: BTreeMap<String, Arc<EnrollmentRecord>> = records
            .into_iter()
            .map(|r| (r.device.clone(), Arc::new(r.clone())))
            .collect();
        let mut state = self.write();
        let old = std::mem::replace(&mut state.enrollments, map);
        // Only the devices whose enrollment changed move in the index.
        let changed: Vec<String> = old
            .iter()
            .filter(|(id, e)| state.enrollments.get(*id).is_none_or(|n| n != *e))
            .map(|(id, _)| id.clone())
            .chain(
                state
                    .enrollments
                    .keys()
                    .filter(|id| !old.contains_key(*id))
                    .cloned(),
            )
            .collect();
        for id in changed {
            state.reindex(&id);
        }
    }

    /// A page of the device list through the index (see [`Listing`]); `scan` forces a full
    /// pass over the smallest named set (a filter the index does not hold).
    pub fn list(
        &self,
        filter: &Filter<'_>,
        scan: bool,
        offset: usize,
        limit: usize,
        now_ms: u64,
    ) -> Listing {
        let state = self.read();
        let sets = state.index.candidates(filter);
        let rows =
            |ids: &[Arc<str>]| -> Vec<Row> { ids.iter().filter_map(|id| state.row(id)).collect() };
        if scan || sets.len() > 1 {
            return Listing::Scan(rows(sets[0].ids()));
        }
        Listing::Indexed {
            counts: sets[0].counts(now_ms),
            rows: rows(sets[0].page(offset, limit)),
        }
    }

    /// Counts what the core decided about a message.
    pub fn count_events(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let mut state = self.write();
        let c = &mut state.counters;
        for event in events {
            let key = match event {
                Event::Online { .. } | Event::Offline { .. } => Some(("control", "status")),
                Event::Registered { .. } => Some(("control", "register")),
                Event::Telemetry { .. } => Some(("telemetry", "telemetry")),
                Event::Data { class, .. } => {
                    *c.messages
                        .entry((class.as_str().to_owned(), "data".to_owned()))
                        .or_default() += 1;
                    None
                }
                Event::Deploy { step, .. } => {
                    *c.deploy_steps.entry((*step).to_owned()).or_default() += 1;
                    Some(("control", "deploy"))
                }
                Event::Duplicate { .. } => {
                    c.duplicates += 1;
                    None
                }
                Event::Rejected { reason, .. } => {
                    *c.rejected.entry(reason_key(reason)).or_default() += 1;
                    None
                }
                Event::FlUpdate { .. } => {
                    c.fl_updates += 1;
                    Some(("model", "fl_update"))
                }
                Event::FlRoundClosed { .. } => {
                    c.fl_rounds_closed += 1;
                    None
                }
                _ => None,
            };
            if let Some((class, topic)) = key {
                *c.messages
                    .entry((class.to_owned(), topic.to_owned()))
                    .or_default() += 1;
            }
        }
    }

    /// The gate's drop totals (it keeps them since start).
    pub fn set_auth_rejected(&self, totals: BTreeMap<String, u64>) {
        let mut state = self.write();
        if state.counters.auth_rejected != totals {
            state.counters.auth_rejected = totals;
        }
    }

    pub fn set_offload(&self, offload: Option<OffloadSnapshot>) {
        self.write().offload = offload;
    }

    pub fn offload(&self) -> Option<OffloadSnapshot> {
        self.read().offload.clone()
    }

    pub fn counters(&self) -> Counters {
        self.read().counters.clone()
    }

    /// Every device (registry records, and enrolled devices that sent nothing yet), in id
    /// order, with its enrollment. Cheap: `Arc` copies.
    pub fn rows(&self) -> Vec<Row> {
        let state = self.read();
        let mut rows: Vec<Row> = state
            .devices
            .values()
            .map(|d| Row {
                record: d.record.clone(),
                enrollment: state.enrollments.get(&d.record.device).cloned(),
            })
            .collect();
        let before = rows.len();
        for (id, e) in &state.enrollments {
            if !state.devices.contains_key(id)
                && matches!(e.state, Decision::Accepted | Decision::Revoked)
            {
                rows.push(Row {
                    record: Arc::new(DeviceRecord {
                        device: id.clone(),
                        ..DeviceRecord::default()
                    }),
                    enrollment: Some(e.clone()),
                });
            }
        }
        // Registry records come in id order; only enrolled devices that sent nothing yet need
        // merging in.
        if rows.len() > before {
            rows.sort_by(|a, b| a.record.device.cmp(&b.record.device));
        }
        rows
    }

    /// One device with its history.
    pub fn device(&self, id: &str) -> Option<(Row, Vec<Sample>)> {
        let state = self.read();
        let enrollment = state.enrollments.get(id).cloned();
        match state.devices.get(id) {
            Some(d) => Some((
                Row {
                    record: d.record.clone(),
                    enrollment,
                },
                d.history.iter().cloned().collect(),
            )),
            None => enrollment.map(|e| {
                (
                    Row {
                        record: Arc::new(DeviceRecord {
                            device: id.to_owned(),
                            ..DeviceRecord::default()
                        }),
                        enrollment: Some(e),
                    },
                    Vec::new(),
                )
            }),
        }
    }

    /// Enrollment records in a given state.
    pub fn enrollments(&self, state: Option<Decision>) -> Vec<Arc<EnrollmentRecord>> {
        self.read()
            .enrollments
            .values()
            .filter(|e| state.is_none_or(|s| e.state == s))
            .cloned()
            .collect()
    }
}

/// Rejection reasons name the offending value at times (`payload too large: 123 bytes`); the
/// metric label keeps the words before the first colon, so its cardinality stays bounded.
fn reason_key(reason: &str) -> String {
    let head = reason.split(':').next().unwrap_or(reason).trim();
    let mut key: String = head
        .chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if key.is_empty() {
        key.push_str("other");
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::TelemetrySnapshot;

    fn with_sample(id: &str, n: u64) -> DeviceRecord {
        let mut r = DeviceRecord::new(id, 1);
        r.telemetry = Some(TelemetrySnapshot {
            received_ms: 1000 + n,
            created_ms: 900 + n,
            body: protocol::v1::Telemetry {
                cpu_percent: n as f32,
                ..Default::default()
            },
            ..Default::default()
        });
        r
    }

    #[test]
    fn history_is_bounded_and_skips_unchanged_samples() {
        let view = FleetView::new(3, 0);
        for n in 0..5 {
            let r = with_sample("pi-1", n);
            view.update_devices([&r]);
            // The same sample again (another message of the device changed its record).
            view.update_devices([&r]);
        }
        let (_, history) = view.device("pi-1").expect("known");
        let cpu: Vec<f32> = history.iter().map(|s| s.cpu_percent).collect();
        assert_eq!(cpu, vec![2.0, 3.0, 4.0]);
    }

    /// The index's page and counts equal a full pass over `rows()` for every filter, through
    /// record and enrollment changes and telemetry going stale.
    #[test]
    fn indexed_pages_equal_a_full_pass() {
        use super::super::devices::{DeviceQuery, page};
        let view = FleetView::new(2, 0);
        let identity = protocol::v1::auth::Identity::generate().public();
        let enrolled = |i: usize, state| EnrollmentRecord {
            device: format!("d{i:03}"),
            identity: identity.clone(),
            state,
            groups: vec![format!("g{}", i % 3)],
            hardware: Default::default(),
            by: "operator".into(),
            claim: None,
            reason: String::new(),
            requested_ms: 1,
            last_request_ms: 1,
            decided_ms: 1,
            coordinator_key: String::new(),
            announced_key: String::new(),
        };
        let record = |i: usize, version: &str| {
            let mut r = with_sample(&format!("d{i:03}"), i as u64);
            r.online = i.is_multiple_of(2);
            r.agent_version = version.into();
            if i.is_multiple_of(7) {
                r.counters.rejected = 1;
            }
            r
        };
        let records: Vec<DeviceRecord> = (0..40).map(|i| record(i, "1.0")).collect();
        view.update_devices(records.iter());
        let states = [Decision::Accepted, Decision::Pending, Decision::Revoked];
        // d040..d044 are enrolled but never sent anything.
        let enrollments: Vec<EnrollmentRecord> = (0..45)
            .filter(|i| i % 5 != 4)
            .map(|i| enrolled(i, states[i % 3]))
            .collect();
        view.set_enrollments(enrollments.iter());
        let check = |now_ms: u64| {
            let queries = [
                "",
                "group=g1",
                "state=accepted",
                "state=unenrolled",
                "version=1.0",
                "version=2.0",
                "online=true",
                "online=false&version=1.0",
                "attention=true",
                "group=g2&state=revoked",
                "offset=5&limit=3",
                "group=g0&offset=2&limit=4",
                "state=pending&offset=100",
            ];
            for query in queries {
                let q: DeviceQuery = serde_urlencoded_like(query);
                let full = page(&view.rows(), &q, now_ms).expect("full pass");
                let got = super::super::devices::listing(&view, &q, now_ms).expect("listing");
                assert_eq!(
                    serde_json::to_value(&got).expect("json"),
                    serde_json::to_value(&full).expect("json"),
                    "query {query:?} at {now_ms}"
                );
            }
        };
        check(2_000);
        // Telemetry of the online devices goes stale.
        check(2_000 + super::super::devices::STALE_TELEMETRY_MS);
        // Some devices upgrade and go offline, enrollments change.
        let moved: Vec<DeviceRecord> = (0..40)
            .filter(|i| i % 4 == 0)
            .map(|i| {
                let mut r = record(i, "2.0");
                r.online = !r.online;
                r
            })
            .collect();
        view.update_devices(moved.iter());
        let enrollments: Vec<EnrollmentRecord> = (0..45)
            .filter(|i| i % 6 != 5)
            .map(|i| enrolled(i, states[(i + 1) % 3]))
            .collect();
        view.set_enrollments(enrollments.iter());
        check(2_000);
        check(2_000 + super::super::devices::STALE_TELEMETRY_MS);
    }

    /// A query string as the API's extractor reads it.
    fn serde_urlencoded_like<T: serde::de::DeserializeOwned>(query: &str) -> T {
        let uri: axum::http::Uri = format!("/x?{query}").parse().expect("uri");
        axum::extract::Query::<T>::try_from_uri(&uri)
            .expect("query parses")
            .0
    }

    #[test]
    fn rejection_reasons_become_bounded_labels() {
        assert_eq!(
            reason_key("payload too large: 99999 bytes"),
            "payload_too_large"
        );
        assert_eq!(reason_key(""), "other");
    }
}
