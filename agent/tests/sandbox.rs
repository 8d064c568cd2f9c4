//! Sandbox tests against the real guest modules from `modules/` (built on first use with
//! `cargo build --release --target wasm32-wasip2` in `modules/`), including the hostile ones:
//! each misbehaves in one way and the host must contain it.

use std::path::PathBuf;
use std::sync::Arc;

use edge_agent::sandbox::{
    Frame, KvStore, ModuleSource, Payload, Sandbox, SandboxConfig, SandboxError, SledKv,
    StageContext, StageMetrics, StageRunner,
};

mod common;
use common::module;

/// A sandbox in a temp state dir plus a sled db for kv, both dropped with it.
struct Fixture {
    sandbox: Sandbox,
    db: sled::Db,
    db_dir: PathBuf,
    _dir: tempfile::TempDir,
}

fn fixture(cfg: SandboxConfig) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let sandbox = Sandbox::new(&cfg, dir.path()).expect("sandbox");
    let db_dir = dir.path().join("kv");
    let db = sled::Config::new()
        .path(&db_dir)
        .cache_capacity(1 << 20)
        .open()
        .expect("sled");
    Fixture {
        sandbox,
        db,
        db_dir,
        _dir: dir,
    }
}

/// Call deadline of the tests. ARM builds are usually tested under qemu-user (`cargo xtask
/// qemu-test`, a debug build, on a loaded CI machine), and armv7 also interprets wasm with
/// Pulley (about 10x slower): an honest guest needs a longer budget there.
const CALL_TIMEOUT_MS: u64 = if cfg!(target_arch = "x86_64") {
    200
} else {
    2000
};

fn test_config() -> SandboxConfig {
    SandboxConfig {
        call_timeout_ms: CALL_TIMEOUT_MS,
        restart_backoff_min_ms: 0,
        restart_backoff_max_ms: 0,
        max_instances: 8,
        ..SandboxConfig::default()
    }
}

impl Fixture {
    fn ctx(&self, stage: &str) -> StageContext {
        StageContext {
            stage: stage.into(),
            kv: Arc::new(SledKv::open(&self.db, &self.db_dir, stage).expect("kv")),
            metrics: Arc::new(StageMetrics::new(16)),
            grants: Default::default(),
        }
    }

    fn runner(&self, artifact: &str, stage: &str, config: &str) -> StageRunner {
        let module = self
            .sandbox
            .load(artifact, &module(artifact))
            .expect("load module");
        StageRunner::start(&self.sandbox, &module, self.ctx(stage), config).expect("start stage")
    }
}

fn samples(values: Vec<f32>) -> Frame {
    Frame {
        stream: "vibration/motor-1".into(),
        timestamp_ms: 1_700_000_000_000,
        payload: Payload::Samples(values),
        meta: vec![("sensor".into(), "imu0".into())],
    }
}

fn json_frame(ts: u64, text: String) -> Frame {
    Frame {
        stream: "features".into(),
        timestamp_ms: ts,
        payload: Payload::Json(text),
        meta: vec![],
    }
}

fn json_of(frame: &Frame) -> serde_json::Value {
    let Payload::Json(text) = &frame.payload else {
        panic!("expected a json frame, got {:?}", frame.payload)
    };
    serde_json::from_str(text).expect("valid json")
}

fn sine(freq: f32, rate: f32, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (2.0 * std::f32::consts::PI * freq * i as f32 / rate).sin())
        .collect()
}

#[test]
fn feature_extractor_processes_a_sine_window() {
    let fx = fixture(test_config());
    let mut stage = fx.runner(
        "feature_extractor",
        "features",
        r#"{"sample_rate_hz": 1000, "bands": 8}"#,
    );
    let out = stage
        // 156.25 Hz: exactly 160 periods in 1024 samples at 1 kHz, inside band 2.
        .process(&samples(sine(156.25, 1000.0, 1024)))
        .expect("process");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].stream, "vibration/motor-1");
    assert_eq!(
        out[0].meta,
        vec![("sensor".to_string(), "imu0".to_string())]
    );
    let v = json_of(&out[0]);
    assert_eq!(v["n"], 1024);
    let rms = v["rms"].as_f64().expect("rms");
    assert!(
        (rms - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-3,
        "rms {rms}"
    );
    let hz = v["dominant_hz"].as_f64().expect("dominant_hz");
    assert!((hz - 156.25).abs() < 1.0, "dominant {hz}");
    // 62.5 Hz bands: band 2 (125..187.5 Hz) holds nearly all the energy.
    let bands: Vec<f64> = v["bands"]
        .as_array()
        .expect("bands")
        .iter()
        .map(|b| b.as_f64().expect("number"))
        .collect();
    assert!(bands[2] / bands.iter().sum::<f64>() > 0.9, "{bands:?}");

    // A frame the module rejects fails that frame only.
    let err = stage
        .process(&json_frame(1, "{}".into()))
        .expect_err("json into the extractor");
    assert!(matches!(err, SandboxError::GuestError { .. }), "{err}");
    assert!(
        err.to_string().contains("expected a samples payload"),
        "{err}"
    );
    assert!(stage.process(&samples(sine(50.0, 1000.0, 256))).is_ok());
    let m = stage.metrics().snapshot();
    assert_eq!((m.calls, m.ok, m.guest_errors, m.traps), (3, 2, 1, 0));
    assert_eq!(m.latency.count, 3);
}

#[test]
fn anomaly_detector_state_persists_across_reinstantiation() {
    let fx = fixture(test_config());
    let config = r#"{"features": ["rms"], "warmup": 20, "z_threshold": 4.0}"#;
    let frame = |i: u64, rms: f64| json_frame(i * 1000, format!(r#"{{"rms": {rms}}}"#));
    let module = fx
        .sandbox
        .load("anomaly-detector", &module("anomaly_detector"))
        .expect("load");
    {
        let mut a =
            StageRunner::start(&fx.sandbox, &module, fx.ctx("detector"), config).expect("start");
        for i in 0..40 {
            let out = a
                .process(&frame(i, 1.0 + 0.1 * (i % 2) as f64))
                .expect("process");
            assert!(out.is_empty(), "no alert on normal values");
        }
        let m = a.metrics().snapshot();
        assert_eq!(m.gauges.get("tracked_features"), Some(&1.0), "{m:?}");
    }
    let kv = SledKv::open(&fx.db, &fx.db_dir, "detector").expect("kv");
    assert!(
        kv.get(b"anomaly-detector/state").expect("get").is_some(),
        "state saved in kv"
    );

    // A new instance on the same namespace alerts at once: the baseline survived.
    let mut b =
        StageRunner::start(&fx.sandbox, &module, fx.ctx("detector"), config).expect("restart");
    let out = b.process(&frame(41, 25.0)).expect("process");
    assert_eq!(out.len(), 1, "alert expected from the restored baseline");
    let alert = json_of(&out[0]);
    assert_eq!(alert["kind"], "anomaly");
    assert_eq!(alert["findings"][0]["feature"], "rms");
    assert_eq!(
        b.metrics().snapshot().counters.get("alerts_total"),
        Some(&1)
    );

    // Control: a stage with an empty namespace is still warming up and says nothing.
    let mut fresh =
        StageRunner::start(&fx.sandbox, &module, fx.ctx("other"), config).expect("fresh");
    assert!(fresh.process(&frame(41, 25.0)).expect("process").is_empty());
}

#[test]
fn spin_is_stopped_by_the_deadline_and_the_stage_restarts() {
    let fx = fixture(test_config());
    let mut spin = fx.runner("hostile_spin", "spin", "{}");
    let mut healthy = fx.runner("feature_extractor", "fx", r#"{"sample_rate_hz": 100}"#);
    let err = spin.process(&samples(vec![1.0])).expect_err("spins");
    assert!(
        matches!(
            err,
            SandboxError::Timeout {
                timeout_ms: CALL_TIMEOUT_MS,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("hostile_spin@"), "{err}");
    // The next frame gets a fresh instance (restart counted) and is stopped again.
    let err = spin.process(&samples(vec![1.0])).expect_err("spins again");
    assert!(matches!(err, SandboxError::Timeout { .. }), "{err}");
    let m = spin.metrics().snapshot();
    assert_eq!((m.timeouts, m.restarts), (2, 1), "{m:?}");
    // Other stages on the same sandbox are unaffected.
    assert_eq!(
        healthy.process(&samples(vec![1.0; 64])).expect("ok").len(),
        1
    );

    // Spinning in init: instantiation of the stage fails with a timeout.
    let module = fx
        .sandbox
        .load("spin", &module("hostile_spin"))
        .expect("load");
    let err = StageRunner::start(&fx.sandbox, &module, fx.ctx("spin2"), r#"{"when": "init"}"#)
        .expect_err("init spins");
    assert!(matches!(err, SandboxError::Timeout { .. }), "{err}");
}

/// A guest that sleeps (a blocking WASI clock wait, which the epoch deadline cannot
/// interrupt) is woken just after its deadline and stopped with a timeout.
#[test]
fn sleep_is_cut_at_the_deadline() {
    let fx = fixture(test_config());
    let mut sleeper = fx.runner("hostile_sleep", "sleep", "{}");
    let err = sleeper.process(&samples(vec![])).expect_err("sleeps");
    assert!(matches!(err, SandboxError::Timeout { .. }), "{err}");
}

#[test]
fn memory_hog_traps_at_the_memory_cap() {
    let cfg = SandboxConfig {
        max_memory_bytes: 16 * 1024 * 1024,
        ..test_config()
    };
    let fx = fixture(cfg);
    let mut hog = fx.runner("hostile_memory_hog", "hog", "{}");
    let err = hog.process(&samples(vec![])).expect_err("hog");
    match &err {
        SandboxError::MemoryLimit {
            limit, requested, ..
        } => {
            assert_eq!(*limit, 16 * 1024 * 1024);
            assert!(*requested > *limit, "{err}");
        }
        other => panic!("expected a memory-limit error, got {other}"),
    }
    assert_eq!(hog.metrics().snapshot().memory_limits, 1);

    // Memory under the cap is granted, and `graceful` sees growth fail as an error.
    let mut under = fx.runner("hostile_memory_hog", "hog2", r#"{"max_mib": 8}"#);
    let out = under.process(&samples(vec![])).expect("8 MiB fits");
    assert_eq!(json_of(&out[0])["held_kib"], 8192);
    let mut graceful = fx.runner("hostile_memory_hog", "hog3", r#"{"graceful": true}"#);
    let err = graceful.process(&samples(vec![])).expect_err("graceful");
    assert!(matches!(err, SandboxError::GuestError { .. }), "{err}");
    assert!(err.to_string().contains("out of memory"), "{err}");
    // The host is fine: a normal stage still runs.
    let mut fx_stage = fx.runner("feature_extractor", "fx", r#"{"sample_rate_hz": 100}"#);
    assert!(fx_stage.process(&samples(vec![0.5; 128])).is_ok());
}

#[test]
fn deep_recursion_traps_with_stack_overflow() {
    let fx = fixture(test_config());
    let mut native = fx.runner("hostile_deep_recursion", "rec", "{}");
    let err = native.process(&samples(vec![])).expect_err("recursion");
    assert!(
        matches!(&err, SandboxError::Trap { reason, .. } if reason.contains("stack overflow")),
        "{err}"
    );
    let mut shadow = fx.runner("hostile_deep_recursion", "rec2", r#"{"mode": "shadow"}"#);
    let err = shadow
        .process(&samples(vec![]))
        .expect_err("shadow recursion");
    assert!(matches!(err, SandboxError::Trap { .. }), "{err}");
}

#[test]
fn trap_fails_one_frame_then_backoff_and_failure() {
    let fx = fixture(test_config());
    // Traps on every 3rd call: the frames around it pass.
    let mut every3 = fx.runner("hostile_trap", "t3", r#"{"every": 3}"#);
    let f = samples(vec![1.0]);
    assert!(every3.process(&f).is_ok());
    assert!(every3.process(&f).is_ok());
    let err = every3.process(&f).expect_err("third traps");
    assert!(
        matches!(&err, SandboxError::Trap { reason, .. } if reason.contains("deliberate panic on call 3")),
        "panic message from stderr expected: {err}"
    );
    // The fresh instance counts calls from 1 again.
    assert_eq!(every3.process(&f).expect("after restart"), vec![f.clone()]);
    assert_eq!(every3.policy().consecutive(), 0);

    // Trapping every call: K consecutive traps mark the stage failed.
    let mut always = fx.runner("hostile_trap", "t1", r#"{"kind": "unreachable"}"#);
    let k = test_config().max_consecutive_traps;
    for n in 1..k {
        let err = always.process(&f).expect_err("traps");
        assert!(matches!(err, SandboxError::Trap { .. }), "trap {n}: {err}");
        assert!(!always.is_failed());
    }
    let err = always.process(&f).expect_err("last trap");
    assert!(matches!(err, SandboxError::Trap { .. }), "{err}");
    assert!(always.is_failed());
    let err = always.process(&f).expect_err("failed");
    assert!(
        matches!(&err, SandboxError::StageFailed { traps, last, .. } if *traps == k && last.contains("unreachable")),
        "{err}"
    );
    let m = always.metrics().snapshot();
    assert_eq!(m.traps, u64::from(k));
    assert_eq!(m.restarts, u64::from(k - 1));
    assert!(m.failed.is_some());

    // With a real backoff the frame after a trap is refused, not run.
    let fx = fixture(SandboxConfig {
        restart_backoff_min_ms: 60_000,
        restart_backoff_max_ms: 60_000,
        ..test_config()
    });
    let mut slow = fx.runner("hostile_trap", "t", r#"{"kind": "oob"}"#);
    assert!(matches!(slow.process(&f), Err(SandboxError::Trap { .. })));
    let err = slow.process(&f).expect_err("backing off");
    assert!(
        matches!(err, SandboxError::Restarting { retry_in_ms, .. } if retry_in_ms > 1000),
        "{err}"
    );
    assert!(slow.ready_at().is_some());
    assert_eq!(slow.metrics().snapshot().refused, 1);
}

/// Checks an escape report: every attempt failed. One exception: `current_dir()` succeeds
/// inside any WASI guest, because wasi-libc keeps the working directory in the guest itself
/// (`/` unless the guest changes it) without asking the host, so "/" reveals nothing.
fn assert_contained(report: &serde_json::Value) {
    let attempts = report["attempts"].as_array().expect("attempts");
    let tried: Vec<&str> = attempts
        .iter()
        .map(|a| a["what"].as_str().unwrap_or(""))
        .collect();
    for needle in [
        "read /etc/passwd",
        "read /proc/self/environ",
        "list /",
        "write /tmp",
        "environment variables",
        "command-line arguments",
        "tcp connect",
        "tcp listen",
        "udp",
        "dns",
    ] {
        assert!(
            tried.iter().any(|w| w.contains(needle)),
            "{needle} not attempted: {tried:?}"
        );
    }
    for a in attempts {
        if a["what"] == "current directory" && a["detail"] == "/" {
            continue;
        }
        assert_eq!(a["ok"], false, "escaped: {a}");
    }
}

#[test]
fn escape_attempts_all_fail() {
    // Something listening, so a denied connect cannot be mistaken for "nothing there".
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    // The host has environment variables the module could leak if it could see them.
    assert!(std::env::vars_os().next().is_some());
    let fx = fixture(test_config());
    let config = format!(r#"{{"connect": ["{addr}"]}}"#);
    let mut esc = fx.runner("hostile_escape", "escape", &config);
    let out = esc.process(&samples(vec![])).expect("report");
    let report = json_of(&out[0]);
    assert_contained(&report);
    let detail = |what: &str| {
        report["attempts"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|x| x["what"].as_str().is_some_and(|w| w.starts_with(what)))
            })
            .map(|x| x["detail"].to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        detail("environment variables"),
        "\"\"",
        "no variable names seen"
    );
    assert!(
        detail("tcp connect").contains("denied") || detail("tcp connect").contains("ermission"),
        "{}",
        detail("tcp connect")
    );

    // The same probes in `init`: the module fails init with its report if anything worked.
    let module = fx
        .sandbox
        .load("escape", &module("hostile_escape"))
        .expect("load");
    let config = format!(r#"{{"connect": ["{addr}"], "when": "init"}}"#);
    match StageRunner::start(&fx.sandbox, &module, fx.ctx("escape2"), &config) {
        Ok(_) => {}
        Err(SandboxError::InitRefused { message, .. }) => {
            assert_contained(&serde_json::from_str(&message).expect("report json"));
        }
        Err(e) => panic!("unexpected: {e}"),
    }
}

#[test]
fn oversized_and_garbage_modules_are_refused() {
    let fx = fixture(SandboxConfig {
        max_module_bytes: 64 * 1024,
        ..test_config()
    });
    let big = module("feature_extractor");
    assert!(big.len() > 64 * 1024);
    let err = fx.sandbox.load("fx", &big).expect_err("too large");
    assert!(matches!(err, SandboxError::TooLarge { .. }), "{err}");
    assert_eq!(fx.sandbox.stats().compiles, 0, "refused before compiling");

    // A generated "huge" module: a valid wasm header followed by megabytes of junk.
    let mut huge = b"\0asm\x0d\0\x01\0".to_vec();
    huge.resize(8 * 1024 * 1024, 0x41);
    assert!(matches!(
        fx.sandbox.load("huge", &huge),
        Err(SandboxError::TooLarge { .. })
    ));

    let garbage = b"definitely not a wasm component".to_vec();
    let err = fx.sandbox.load("junk", &garbage).expect_err("garbage");
    let digest = {
        use sha2::Digest;
        let d: [u8; 32] = sha2::Sha256::digest(&garbage).into();
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert!(matches!(err, SandboxError::Compile { .. }), "{err}");
    assert!(
        err.to_string().contains(&digest),
        "error names the digest: {err}"
    );
    assert_eq!(fx.sandbox.stats().load_failures, 3);
}

#[test]
fn compile_cache_hits_detects_corruption_and_is_keyed_by_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = module("feature_extractor");
    let cfg = test_config();
    let sandbox = Sandbox::new(&cfg, dir.path()).expect("sandbox");
    let first = sandbox.load("fx", &bytes).expect("compile");
    assert_eq!(first.source(), ModuleSource::Compiled);
    let path = sandbox.cache_path(first.id().digest()).expect("cache path");
    assert!(path.exists(), "artifact cached at {}", path.display());
    let second = sandbox.load("fx", &bytes).expect("cached");
    assert_eq!(second.source(), ModuleSource::Cache);
    let s = sandbox.stats();
    assert_eq!(
        (s.cache_hits, s.cache_misses, s.compiles),
        (1, 1, 1),
        "{s:?}"
    );

    // A cached module runs like a compiled one.
    let fx = fixture(cfg.clone());
    let mut stage = StageRunner::start(
        &sandbox,
        &second,
        fx.ctx("fx"),
        r#"{"sample_rate_hz": 100}"#,
    )
    .expect("start from cache");
    assert!(stage.process(&samples(vec![1.0; 32])).is_ok());

    // Corrupt the artifact: detected, deleted, recompiled, cached again.
    let mut damaged = std::fs::read(&path).expect("read cache file");
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0xFF;
    std::fs::write(&path, &damaged).expect("write");
    let third = sandbox.load("fx", &bytes).expect("recompiled");
    assert_eq!(third.source(), ModuleSource::Compiled);
    assert_eq!(sandbox.stats().cache_rejected, 1);
    assert_ne!(std::fs::read(&path).expect("rewritten"), damaged);
    // A truncated file likewise.
    std::fs::write(&path, &damaged[..100]).expect("truncate");
    assert_eq!(
        sandbox.load("fx", &bytes).expect("load").source(),
        ModuleSource::Compiled
    );
    assert_eq!(sandbox.stats().cache_rejected, 2);
    drop(stage);
    drop(sandbox);

    // Another engine setting that changes generated code: another cache key, so no hit.
    // (One wasm page above the maximum: on 32-bit targets the default reservation is the
    // maximum itself, and their address space has no room for much more.)
    let other_cfg = SandboxConfig {
        memory_reservation_bytes: cfg.max_memory_bytes + 65536,
        ..cfg.clone()
    };
    let other = Sandbox::new(&other_cfg, dir.path()).expect("sandbox");
    assert_ne!(
        other.cache_path(first.id().digest()).expect("cache path"),
        path
    );
    assert_eq!(
        other.load("fx", &bytes).expect("load").source(),
        ModuleSource::Compiled
    );
    // Same settings again: hits the original file.
    let again = Sandbox::new(&cfg, dir.path()).expect("sandbox");
    assert_eq!(
        again.load("fx", &bytes).expect("load").source(),
        ModuleSource::Cache
    );
}

#[test]
fn flood_is_contained_by_quotas_and_limits() {
    // Guest lines are only rate-limited (and counted) at levels a subscriber wants.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::WARN)
        .try_init();
    let fx = fixture(SandboxConfig {
        kv_max_total_bytes: 64 * 1024,
        max_output_frames: 10,
        max_output_bytes: 32 * 1024,
        ..test_config()
    });
    let f = samples(vec![]);
    let mut kv = fx.runner(
        "hostile_flood",
        "kv",
        r#"{"target": "kv", "count": 100, "size_kib": 8}"#,
    );
    let report = json_of(&kv.process(&f).expect("report")[0]);
    assert!(report["done"].as_u64().expect("done") < 100, "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or("")
            .contains("QuotaExceeded"),
        "{report}"
    );

    let mut log = fx.runner(
        "hostile_flood",
        "log",
        r#"{"target": "log", "count": 1000, "size_kib": 4}"#,
    );
    log.process(&f).expect("report");
    let m = log.metrics().snapshot();
    assert!(m.log_dropped > 900 && m.log_lines <= 60, "{m:?}");

    let mut names = fx.runner(
        "hostile_flood",
        "names",
        r#"{"target": "counters", "count": 1000}"#,
    );
    names.process(&f).expect("report");
    let m = names.metrics().snapshot();
    assert_eq!(m.counters.len() + m.gauges.len(), 16);
    assert!(m.metric_names_dropped > 1900, "{m:?}");

    let mut frames = fx.runner(
        "hostile_flood",
        "frames",
        r#"{"target": "frames", "count": 11}"#,
    );
    let err = frames.process(&f).expect_err("too many frames");
    assert!(matches!(err, SandboxError::OutputLimit { .. }), "{err}");
    let mut big = fx.runner(
        "hostile_flood",
        "big",
        r#"{"target": "big-frame", "size_kib": 64}"#,
    );
    assert!(matches!(
        big.process(&f),
        Err(SandboxError::OutputLimit { .. })
    ));
    let mut err_flood = fx.runner(
        "hostile_flood",
        "err",
        r#"{"target": "big-error", "size_kib": 256}"#,
    );
    let err = err_flood.process(&f).expect_err("big error");
    assert!(err.to_string().len() < 2048, "error message truncated");
    // None of this poisons the instances.
    assert!(!frames.is_failed() && frames.process(&f).is_err());
    assert_eq!(frames.metrics().snapshot().traps, 0);
}

/// The agent binary's hidden compile command, as `Sandbox::with_compiler` runs it, through `sh`
/// so the test sees each start (a marker file per compile). Under `cargo xtask qemu-test` the
/// binary is built for another architecture and runs through the same qemu-user runner as this
/// test (`EDGE_TARGET_RUNNER`; a fresh machine has no binfmt_misc entry for it).
fn compiler_process(marker_dir: &std::path::Path) -> edge_agent::sandbox::Compiler {
    let runner = std::env::var_os("EDGE_TARGET_RUNNER");
    let script = if runner.is_some() {
        r#"touch "$1/started.$$" && exec "$3" "$0" "$2""#
    } else {
        r#"touch "$1/started.$$" && exec "$0" "$2""#
    };
    let mut args: Vec<std::ffi::OsString> = vec![
        "-c".into(),
        script.into(),
        env!("CARGO_BIN_EXE_edge-agent").into(),
        marker_dir.as_os_str().to_owned(),
        edge_agent::sandbox::COMPILE_COMMAND.into(),
    ];
    args.extend(runner);
    edge_agent::sandbox::Compiler::Process {
        program: "/bin/sh".into(),
        args,
    }
}

fn starts(marker_dir: &std::path::Path) -> usize {
    std::fs::read_dir(marker_dir)
        .map(|d| d.filter_map(Result::ok).count())
        .unwrap_or(0)
}

/// Children of this process still running the compile command.
fn compile_children() -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...: the fields after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(me)
                && String::from_utf8_lossy(&cmdline).contains(edge_agent::sandbox::COMPILE_COMMAND)
        })
        .collect()
}

#[test]
fn modules_compile_in_a_child_process_that_is_killed_at_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let markers = dir.path().join("markers");
    std::fs::create_dir(&markers).expect("markers");
    let bytes = module("feature_extractor");
    let cfg = test_config();
    let sandbox = Sandbox::with_compiler(&cfg, &dir.path().join("a"), compiler_process(&markers))
        .expect("sandbox");
    let compiled = sandbox.load("fx", &bytes).expect("compiled in the child");
    assert_eq!(compiled.source(), ModuleSource::Compiled);
    assert_eq!(starts(&markers), 1, "one compiler process");
    // Its artifact runs and is cached like one compiled here.
    let fx = fixture(cfg.clone());
    let mut stage = StageRunner::start(
        &sandbox,
        &compiled,
        fx.ctx("fx"),
        r#"{"sample_rate_hz": 100}"#,
    )
    .expect("start");
    assert!(stage.process(&samples(vec![1.0; 32])).is_ok());
    assert_eq!(
        sandbox.load("fx", &bytes).expect("cached").source(),
        ModuleSource::Cache
    );
    assert_eq!(starts(&markers), 1, "a cache hit starts no compiler");

    // The child's own error comes back, naming the module.
    let garbage = b"definitely not a wasm component".to_vec();
    let err = sandbox.load("junk", &garbage).expect_err("garbage");
    assert!(matches!(err, SandboxError::Compile { .. }), "{err}");
    assert!(err.to_string().contains("failed to parse"), "{err}");

    // Past the timeout the child is killed, not left compiling.
    let slow = Sandbox::with_compiler(
        &SandboxConfig {
            compile_timeout_ms: 1,
            ..cfg.clone()
        },
        &dir.path().join("b"),
        compiler_process(&markers),
    )
    .expect("sandbox");
    let err = slow.load("fx", &bytes).expect_err("timeout");
    assert!(matches!(err, SandboxError::CompileTimeout { .. }), "{err}");
    assert_eq!(compile_children(), Vec::<u32>::new(), "killed and reaped");

    // A compiler that cannot start: compiled in this process instead.
    let fallback = Sandbox::with_compiler(
        &cfg,
        &dir.path().join("c"),
        edge_agent::sandbox::Compiler::Process {
            program: dir.path().join("no-such-binary"),
            args: Vec::new(),
        },
    )
    .expect("sandbox");
    assert_eq!(
        fallback.load("fx", &bytes).expect("compiled here").source(),
        ModuleSource::Compiled
    );
    // A child that starts but never runs the compile command (qemu-user without binfmt_misc
    // fails the exec inside the child, which exits 127): compiled in this process too.
    let not_ours = Sandbox::with_compiler(
        &cfg,
        &dir.path().join("d"),
        edge_agent::sandbox::Compiler::Process {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "exit 127".into()],
        },
    )
    .expect("sandbox");
    assert_eq!(
        not_ours.load("fx", &bytes).expect("compiled here").source(),
        ModuleSource::Compiled
    );
}
