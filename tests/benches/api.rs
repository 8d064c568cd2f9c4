//! The coordinator's HTTP API at fleet scale: `cargo xtask bench api` (or
//! `cargo test -p edge-tests --bench api` with the coordinator binary built).
//!
//! Issue 21's figures: p50 and p99 latency of the device list (first page, a filtered page and
//! the last page) and of the device detail at 1,000 and 10,000 devices, and `/metrics` scrape
//! time and size at 10,000 devices (with the default per-device cap of 1,000 series-devices and
//! with every device). The devices are synthetic registry entries (a record with a realistic
//! telemetry sample: a two-stage pipeline, a model, offload counters) and enrollment records,
//! written into the state directory's database before the real coordinator binary starts and
//! loads them; requests go over loopback HTTP with a bearer token, one at a time.
//!
//! Baseline in the same run: `GET /api/fl/tasks` with no tasks (HTTP, routing and the token
//! check, no fleet data); each line prints its ratio to that floor's median.
//!
//! Environment: `API_BENCH_REQUESTS` (default 300 per line), `API_BENCH_SIZES` (default
//! `1000,10000`). The binary is the one the harness finds (target/debug unless
//! `EDGE_COORDINATOR_BIN` names another, e.g. a release build). Timings are printed, never
//! asserted.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use edge_coordinator::enrollment::EnrollmentRecord;
use edge_coordinator::registry::{Counters, DeviceRecord, TelemetrySnapshot};
use edge_coordinator::store::Store;
use edge_tests::Coordinator;
use edge_tests::api::{ApiClient, token_table};
use protocol::v1::{
    InferenceStatus, InferenceTelemetry, ModelTelemetry, OffloadTelemetry, PipelineTelemetry,
    StageTelemetry, Telemetry,
};

const TOKEN: &str = "edge_api_bench_token";

/// The path of the i-th request of a line.
type PathFn = Box<dyn Fn(usize) -> String>;

fn main() -> Result<()> {
    let requests: usize = env_or("API_BENCH_REQUESTS", 300)?;
    let sizes: Vec<usize> = std::env::var("API_BENCH_SIZES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .context("API_BENCH_SIZES: comma list of counts")
        })
        .collect::<Result<_>>()?;
    let bin = edge_tests::coordinator_bin()?;
    println!("coordinator binary: {}", bin.display());
    println!("{requests} requests per line, one at a time over loopback; latency in ms\n");
    for &n in &sizes {
        run(n, requests)?;
    }
    Ok(())
}

fn env_or(key: &str, default: usize) -> Result<usize> {
    match std::env::var(key) {
        Ok(v) => v.parse().with_context(|| format!("{key}={v}: not a count")),
        Err(_) => Ok(default),
    }
}

fn run(n: usize, requests: usize) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("edge-api-bench-")
        .tempdir()?;
    let dir = tmp.path().join("coordinator");
    let state = dir.join("state");
    std::fs::create_dir_all(&state)?;
    let fill = Instant::now();
    fill_registry(&state, n)?;
    println!(
        "== {n} devices (registry written in {:.1} s) ==",
        fill.elapsed().as_secs_f64()
    );

    let caps: Vec<(&str, usize)> = if n > 1000 {
        vec![("default cap", 1000), ("every device", n)]
    } else {
        vec![("default cap", 1000)]
    };
    for (round, (label, cap)) in caps.into_iter().enumerate() {
        let config = dir.join("bench-coordinator.toml");
        let mut api = toml::Table::new();
        api.insert(
            "tokens".into(),
            toml::Value::Array(vec![token_table("bench", TOKEN, "read").into()]),
        );
        api.insert("metrics_max_devices".into(), i64::try_from(cap)?.into());
        let mut root = toml::Table::new();
        root.insert("api".into(), api.into());
        root.insert("stats_interval_s".into(), 0.into());
        std::fs::write(&config, toml::to_string(&root)?)?;
        let mut coord = Coordinator::start_embedded_with_args(
            &dir,
            vec!["--config".into(), config.display().to_string()],
        )?;
        let client = ApiClient::new(coord.api_url()?);
        let first = client.get("/api/devices?limit=1", Some(TOKEN))?.json()?;
        ensure!(
            first["total"] == n,
            "the coordinator loaded {} devices, not {n}",
            first["total"]
        );

        if round == 0 {
            // The API lines once per size (with the default configuration).
            let floor = measure(&client, "/api/fl/tasks", requests, |_| {
                "/api/fl/tasks".into()
            })?;
            print_line("floor: GET /api/fl/tasks (no data)", &floor, None);
            let lines: [(&str, PathFn); 5] = [
                (
                    "GET /api/devices (first 100)",
                    Box::new(|_| "/api/devices?limit=100".into()),
                ),
                (
                    "GET /api/devices?group=site-3 (100)",
                    Box::new(|_| "/api/devices?group=site-3&limit=100".into()),
                ),
                (
                    "GET /api/devices?online=false&version=0.1.0 (100)",
                    Box::new(|_| "/api/devices?online=false&version=0.1.0&limit=100".into()),
                ),
                (
                    "GET /api/devices (last page of 100)",
                    Box::new(move |_| format!("/api/devices?limit=100&offset={}", n - 100)),
                ),
                (
                    "GET /api/devices/{id} (random device)",
                    Box::new(move |i| format!("/api/devices/{}", device(i * 7919 % n))),
                ),
            ];
            for (name, path) in lines {
                let s = measure(&client, name, requests, path)?;
                print_line(name, &s, Some(floor.p50));
            }
        }
        {
            let scrapes = requests.min(50);
            let s = measure(&client, "/metrics", scrapes, |_| "/metrics".into())?;
            let size = client.get("/metrics", Some(TOKEN))?.body.len();
            print_line(
                &format!(
                    "GET /metrics ({label}: {} series-devices), {scrapes} scrapes",
                    cap.min(n)
                ),
                &s,
                None,
            );
            println!("    size {:.1} KiB", size as f64 / 1024.0);
        }
        coord.stop()?;
    }
    println!();
    Ok(())
}

struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
    bytes: usize,
}

fn measure(
    client: &ApiClient,
    what: &str,
    requests: usize,
    path: impl Fn(usize) -> String,
) -> Result<Stats> {
    // Warm-up: connections, caches.
    for i in 0..10 {
        client.get(&path(i), Some(TOKEN))?;
    }
    let mut ms = Vec::with_capacity(requests);
    let mut bytes = 0;
    for i in 0..requests {
        let p = path(i);
        let t = Instant::now();
        let a = client.get(&p, Some(TOKEN))?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        ensure!(
            a.status == 200,
            "{what}: GET {p} answered {}: {}",
            a.status,
            a.body
        );
        bytes = a.body.len();
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    Ok(Stats {
        p50: at(0.5),
        p99: at(0.99),
        max: ms[ms.len() - 1],
        bytes,
    })
}

fn print_line(name: &str, s: &Stats, floor: Option<f64>) {
    let ratio = floor.map_or(String::new(), |f| {
        format!("  ({:.1}x floor p50)", s.p50 / f)
    });
    println!(
        "  {name:<58} p50 {:>8.2}  p99 {:>8.2}  max {:>8.2}  body {:>7} B{ratio}",
        s.p50, s.p99, s.max, s.bytes
    );
}

fn device(i: usize) -> String {
    format!("sim-{i:05}")
}

/// `n` enrolled devices with a telemetry sample each, half of them online.
fn fill_registry(state: &Path, n: usize) -> Result<()> {
    let store = Store::open(&edge_coordinator::config::db_path(state), 64 << 20)?;
    let now = protocol::v1::now_ms();
    let identity = protocol::v1::auth::Identity::generate().public();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let records: Vec<DeviceRecord> = chunk.iter().map(|&i| record(i, now)).collect();
        let refs: Vec<&DeviceRecord> = records.iter().collect();
        store.record(None, &refs)?;
        for &i in chunk {
            store.save_enrollment(&EnrollmentRecord {
                device: device(i),
                identity: identity.clone(),
                state: protocol::v1::enroll::Decision::Accepted,
                groups: vec![format!("site-{}", i % 20)],
                hardware: Default::default(),
                by: "claim".into(),
                claim: None,
                reason: String::new(),
                requested_ms: now,
                last_request_ms: now,
                decided_ms: now,
                coordinator_key: String::new(),
                announced_key: String::new(),
            })?;
        }
    }
    store.commit(true)?;
    Ok(())
}

fn record(i: usize, now: u64) -> DeviceRecord {
    let stage = |name: &str, calls: u64| StageTelemetry {
        name: name.into(),
        module: format!("modules/{name}.wasm@0123456789ab"),
        calls,
        ok: calls,
        frames_out: calls,
        p50_us: 140,
        p95_us: 400,
        p99_us: 900,
        max_us: 2000,
        ..StageTelemetry::default()
    };
    let mut body = Telemetry {
        cpu_percent: (i % 100) as f32,
        cpu_count: 4,
        load_avg: [0.5, 0.4, 0.3],
        mem_total_bytes: 4 << 30,
        mem_used_bytes: (1 << 30) + (i as u64 % 1000) * 1_000_000,
        uptime_s: 86_400,
        agent_rss_bytes: 12 << 20,
        pipeline: Some(PipelineTelemetry {
            name: "vibration".into(),
            version: 3,
            started_ms: now - 3_600_000,
            stages: vec![stage("features", 72_000), stage("anomaly", 72_000)],
            ..PipelineTelemetry::default()
        }),
        inference: Some(InferenceTelemetry {
            status: InferenceStatus::default(),
            models: vec![ModelTelemetry {
                name: "anomaly".into(),
                version: "0123456789ab".into(),
                provider: "cpu".into(),
                placement: "full".into(),
                runs: 72_000,
                p50_us: 800,
                p99_us: 2400,
                ..ModelTelemetry::default()
            }],
        }),
        offload: Some(OffloadTelemetry {
            mode: "adaptive".into(),
            decisions: [
                ("local/learned".to_owned(), 60_000),
                ("offload/learned".to_owned(), 12_000),
            ]
            .into_iter()
            .collect(),
            ..OffloadTelemetry::default()
        }),
        ..Telemetry::default()
    };
    body.outbox.depth = [0, 0, (i % 3) as u64, (i % 7) as u64];
    body.outbox.capacity_bytes = 64 << 20;
    DeviceRecord {
        device: device(i),
        first_seen_ms: now - 86_400_000,
        last_seen_ms: now - (i as u64 % 60) * 1000,
        // Half online; the offline half is what an operator filters for.
        online: i.is_multiple_of(2),
        since_ms: now - 3_600_000,
        agent_version: if i.is_multiple_of(10) {
            "0.0.9".into()
        } else {
            "0.1.0".into()
        },
        registration: None,
        telemetry: Some(TelemetrySnapshot {
            id: format!("{i:032x}"),
            seq: 1000,
            created_ms: now - 2000,
            received_ms: now - 1000,
            body,
        }),
        counters: Counters {
            messages: 1000,
            telemetry: 900,
            data: 100,
            ..Counters::default()
        },
    }
}
