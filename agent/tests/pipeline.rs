//! Pipeline runtime tests with the real guest modules, a real outbox, state database and
//! dataset store in a temp dir: sources -> WASM stages -> sinks, failures contained.

mod common;

use std::time::{Duration, Instant};

use edge_agent::inbox::Incoming;
use edge_agent::pipeline::run_start;
use edge_agent::pipeline::{Deps, LocalFiles, Mode, Origin, Pipeline, PipelineError, PipelineSpec};
use edge_agent::sandbox::SandboxConfig;
use protocol::v1::{Class, PipelineTelemetry};

struct Fixture {
    deps: Deps,
    files: LocalFiles,
    dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = SandboxConfig {
        restart_backoff_min_ms: 1,
        restart_backoff_max_ms: 5,
        // No test here is about deadlines. ARM builds run these under qemu-user (a debug
        // build on a shared CI machine), where a module's first call was seen to pass the
        // 1 s default under load; the sandbox tests check the deadline itself.
        call_timeout_ms: if cfg!(target_arch = "x86_64") {
            SandboxConfig::default().call_timeout_ms
        } else {
            10_000
        },
        ..SandboxConfig::default()
    };
    let unused = edge_agent::inference::Inference::unavailable("not used by these tests");
    Fixture {
        deps: common::pipeline_deps(dir.path(), &cfg, unused),
        files: LocalFiles {
            dir: common::wasm_dir(),
        },
        dir,
    }
}

impl Fixture {
    async fn start(&self, toml: &str, mode: Mode) -> Result<Pipeline, PipelineError> {
        let spec = PipelineSpec::parse(toml).expect("valid description");
        run_start(
            spec,
            Box::new(self.files.clone()),
            self.deps.clone(),
            mode,
            Origin::default(),
        )
        .await
    }

    /// Published data messages: (topic, body JSON).
    fn outbox_data(&self) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        let mut cursor = None;
        while let Some(s) = self
            .deps
            .outbox
            .next_in_class(Class::Results, cursor)
            .expect("read outbox")
        {
            cursor = Some(s.key.seq);
            let body = serde_json::from_slice(&s.record.body).expect("json body");
            out.push((s.record.topic.clone(), body));
        }
        out
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn finish(p: Pipeline) -> PipelineTelemetry {
    wait_until("the pipeline to drain", || p.is_finished()).await;
    let t = p.stats().telemetry();
    tokio::task::spawn_blocking(move || p.stop())
        .await
        .expect("stop");
    t
}

const VIBRATION: &str = r#"
name = "vibration"
[[source]]
name = "imu"
kind = "synthetic"
stream = "motor-1"
rate_hz = 0
count = 60
window = 256
anomaly_every = 20
anomaly_gain = 10.0
[[stage]]
name = "features"
module = "feature_extractor.wasm"
input = "imu"
config = { sample_rate_hz = 1000.0, bands = 4 }
[[stage]]
name = "detect"
module = "anomaly_detector.wasm"
input = "features"
config = { features = ["rms"], warmup = 5, z_threshold = 4.0, cooldown_ms = 0 }
[[sink]]
kind = "outbox"
input = "detect"
[[sink]]
kind = "log"
input = "features"
every = 50
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_sensor_through_features_and_detector_reaches_the_outbox() {
    let fx = fixture();
    let p = fx.start(VIBRATION, Mode::Live).await.expect("starts");
    let t = finish(p).await;
    assert_eq!(t.sources[0].frames, 60);
    let features = &t.stages[0];
    assert_eq!(
        (features.calls, features.ok, features.frames_out),
        (60, 60, 60)
    );
    assert!(
        features.module.starts_with("feature_extractor.wasm@"),
        "{}",
        features.module
    );
    assert!(features.p50_us > 0 && features.max_us >= features.p99_us);
    assert_eq!(t.stages[1].calls, 60);
    let data = fx.outbox_data();
    assert!(
        !data.is_empty(),
        "the 10x bursts at frames 20 and 40 raise alerts"
    );
    assert_eq!(data.len() as u64, t.sinks[0].frames);
    for (topic, body) in &data {
        assert_eq!(
            topic,
            &format!(
                "edge/v1/dev-1/data/{}",
                body["stream"].as_str().unwrap_or("")
            )
        );
        assert!(body["payload"].is_object(), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_runs_the_stages_but_writes_nothing() {
    let fx = fixture();
    let p = fx.start(VIBRATION, Mode::Shadow).await.expect("starts");
    let t = finish(p).await;
    assert_eq!(t.stages[1].calls, 60);
    assert!(t.sinks[0].frames > 0, "would-be writes are counted");
    assert!(
        fx.outbox_data().is_empty(),
        "a shadow pipeline publishes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_replay_skips_bad_lines_and_fills_the_dataset() {
    let fx = fixture();
    let file = fx.dir.path().join("recording.txt");
    std::fs::write(&file, "1,2,3,4\nnot,a,number\n\n5, 6, 7, 8\n").expect("write");
    let toml = format!(
        r#"
name = "replay"
[[source]]
name = "rec"
kind = "file"
format = "samples"
path = "{}"
[[sink]]
kind = "dataset"
input = "rec"
dataset = "vib"
"#,
        file.display()
    );
    let p = fx.start(&toml, Mode::Live).await.expect("starts");
    let t = finish(p).await;
    assert_eq!((t.sources[0].frames, t.sources[0].errors), (2, 1));
    let samples = fx.deps.dataset.samples("vib").expect("read");
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[1].features, vec![5.0, 6.0, 7.0, 8.0]);
    assert_eq!(samples[1].label, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_source_takes_json_and_counts_what_is_not() {
    let fx = fixture();
    let toml = r#"
name = "labels"
[[source]]
name = "in"
kind = "mqtt"
topic = "lab/+/sample"
[[sink]]
kind = "dataset"
input = "in"
"#;
    let p = fx.start(toml, Mode::Live).await.expect("starts");
    assert!(fx.deps.inbox.filters().contains("lab/+/sample"));
    let msg = |payload: &'static str| Incoming {
        topic: "lab/a/sample".into(),
        payload: bytes::Bytes::from_static(payload.as_bytes()),
        retain: false,
    };
    assert_eq!(fx.deps.inbox.deliver(msg("not json")), 1);
    assert_eq!(
        fx.deps
            .inbox
            .deliver(msg(r#"{"features": [0.5, 1.5], "label": 7}"#)),
        1
    );
    let ds = fx.deps.dataset.clone();
    wait_until("the sample", || ds.len() == 1).await;
    let t = p.stats().telemetry();
    assert_eq!((t.sources[0].frames, t.sources[0].errors), (1, 1));
    tokio::task::spawn_blocking(move || p.stop())
        .await
        .expect("stop");
    assert!(fx.deps.inbox.filters().is_empty(), "stopping unsubscribes");
    assert_eq!(ds.samples("default").expect("read")[0].label, Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_stage_is_restarted_and_reported_while_frames_keep_flowing() {
    let fx = fixture();
    let toml = r#"
name = "fragile"
[[source]]
name = "imu"
kind = "synthetic"
rate_hz = 0
count = 30
window = 8
on_full = "block"
[[stage]]
name = "flaky"
module = "hostile_trap.wasm"
input = "imu"
config = { every = 3 }
[[sink]]
kind = "log"
input = "flaky"
every = 1000
"#;
    let p = fx.start(toml, Mode::Live).await.expect("starts");
    let stats = p.stats();
    let t = finish(p).await;
    let st = &t.stages[0];
    assert!(st.traps >= 1, "{st:?}");
    assert!(st.restarts >= 1, "{st:?}");
    assert!(
        t.sinks[0].frames >= 10,
        "frames between traps still flow: {t:?}"
    );
    let (processed, failure) = stats.health();
    assert!(processed >= 10);
    let failure = failure.expect("the trap is a health failure");
    assert!(failure.contains("stage flaky"), "{failure}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_channels_conserve_frames_under_backpressure() {
    let fx = fixture();
    let toml = |on_full: &str| {
        format!(
            r#"
name = "pressure"
channel_capacity = 2
[[source]]
name = "imu"
kind = "synthetic"
rate_hz = 0
count = 500
window = 1024
on_full = "{on_full}"
[[stage]]
name = "features"
module = "feature_extractor.wasm"
input = "imu"
config = {{ sample_rate_hz = 1000.0 }}
[[sink]]
kind = "log"
input = "features"
every = 100000
"#
        )
    };
    // Blocking: the source waits, nothing is lost.
    let t = finish(fx.start(&toml("block"), Mode::Live).await.expect("starts")).await;
    assert_eq!((t.sources[0].frames, t.sources[0].dropped), (500, 0));
    assert_eq!(t.stages[0].calls, 500);
    // Dropping: whatever did not fit was counted, never queued without bound.
    let t = finish(fx.start(&toml("drop"), Mode::Live).await.expect("starts")).await;
    assert_eq!(t.sources[0].frames, 500);
    assert_eq!(t.stages[0].calls + t.sources[0].dropped, 500, "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_module_or_refused_config_fails_the_start_naming_the_stage() {
    let fx = fixture();
    let err = fx
        .start(
            &VIBRATION.replace("anomaly_detector.wasm", "nope.wasm"),
            Mode::Live,
        )
        .await
        .expect_err("missing module");
    let msg = err.to_string();
    assert!(
        msg.contains("stage detect") && msg.contains("nope.wasm"),
        "{msg}"
    );

    let err = fx
        .start(
            &VIBRATION.replace(
                "config = { sample_rate_hz = 1000.0, bands = 4 }",
                "config = { bands = 4 }",
            ),
            Mode::Live,
        )
        .await
        .expect_err("init refuses a config without sample_rate_hz");
    let msg = err.to_string();
    assert!(
        msg.contains("stage features") && msg.contains("sample_rate_hz"),
        "{msg}"
    );
}

/// A pipeline that runs until stopped: a 200 Hz sensor through the feature extractor.
fn endless(name: &str, module: &str) -> String {
    format!(
        r#"
name = "{name}"
[[source]]
name = "imu"
kind = "synthetic"
stream = "motor-1"
rate_hz = 200
window = 64
[[stage]]
name = "features"
module = "{module}"
input = "imu"
config = {{ sample_rate_hz = 1000.0, bands = 4 }}
[[sink]]
kind = "log"
input = "features"
every = 1000
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_runs_a_candidate_beside_the_live_pipeline_and_swaps_on_command() {
    use edge_agent::pipeline::{Launch, PipelineHost, RunningSlot};

    let fx = fixture();
    let slot = RunningSlot::default();
    let (host, handle) = PipelineHost::new(fx.deps.clone(), slot.clone());
    let task = tokio::spawn(host.run());
    let launch = |name: &str, module: &str| Launch {
        spec: PipelineSpec::parse(&endless(name, module)).expect("valid description"),
        artifacts: Box::new(fx.files.clone()),
        origin: Origin::default(),
    };
    let live = |slot: &RunningSlot| slot.telemetry().map(|t| t.name);
    const MODULE: &str = "feature_extractor.wasm";

    assert!(!handle.is_running().await.expect("host answers"));
    assert!(handle.start(launch("a", MODULE)).await.expect("a starts"));
    assert!(
        !handle
            .start(launch("b", MODULE))
            .await
            .expect("host answers"),
        "a start while a pipeline runs starts nothing"
    );
    assert_eq!(live(&slot).as_deref(), Some("a"));
    assert_eq!(handle.candidate_health().await.expect("host answers"), None);

    // A candidate runs in shadow beside the live pipeline and its health is reported.
    handle.shadow(launch("b", MODULE)).await.expect("b starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let health = handle.candidate_health().await.expect("host answers");
        let (processed, failure) = health.expect("a candidate runs");
        assert_eq!(failure, None);
        if processed > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the candidate processed nothing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        live(&slot).as_deref(),
        Some("a"),
        "a shadow replaces nothing"
    );

    // Rollback: the candidate goes, the live pipeline stays.
    handle.discard().await.expect("host answers");
    assert_eq!(handle.candidate_health().await.expect("host answers"), None);
    assert_eq!(live(&slot).as_deref(), Some("a"));

    // A candidate that fails to start leaves everything as it was.
    let err = handle
        .shadow(launch("broken", "missing.wasm"))
        .await
        .expect_err("a missing module fails the start");
    assert!(err.to_string().contains("missing.wasm"), "{err}");
    assert_eq!(live(&slot).as_deref(), Some("a"));

    // Commit: the candidate and the old live pipeline stop, the new one runs live.
    handle.shadow(launch("c", MODULE)).await.expect("c starts");
    handle.swap(launch("c", MODULE)).await.expect("c goes live");
    assert_eq!(live(&slot).as_deref(), Some("c"));
    assert_eq!(handle.candidate_health().await.expect("host answers"), None);
    assert!(handle.is_running().await.expect("host answers"));

    // The last handle gone, the host stops its pipelines and ends.
    drop(handle);
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the host ends")
        .expect("the host does not panic");
    assert_eq!(live(&slot), None);
}
