//! WASM sandbox costs, each against a baseline measured in the same run.
//!
//! - per-message overhead of a stage with instance reuse: a passthrough module on a tiny
//!   frame (µs per call), against a native function call doing the same copy;
//! - the feature extractor as a WASM stage against the same `dsp` code compiled natively
//!   (the stage's input checks, extract, the same JSON output and output frame), on a
//!   1024-sample window; WASM and native rounds alternate, and the ratio is the median of the
//!   per-round ratios (a shared machine's drift hits both sides of a round alike);
//! - what the epoch checks that enforce the call deadline cost: that stage against the same
//!   module compiled without them (a sandbox of its own, `epoch_checks: false`), alternating;
//! - the component-model floor for that window: a passthrough stage given the same
//!   1024-sample frame (the window copied into the guest and back out, no work);
//! - throughput of that stage on one core (msgs/s);
//! - pooled instantiation time (instance only, and instance + `init`);
//! - memory per loaded module (compiled code size, RSS growth) and per live instance;
//! - pipeline throughput: synthetic source -> feature extractor -> log sink through the
//!   pipeline runtime (threads, bounded channels), against the same stage called in a loop.
//!   Run under `taskset -c 0` for the one-core figure.
//!
//! Medians of several rounds. Needs the guest modules built (`cargo xtask modules`).
//! `cargo xtask bench sandbox` builds them and runs this (`cargo bench -p edge-agent --bench
//! sandbox`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use edge_agent::sandbox::{
    Frame, Payload, Sandbox, SandboxConfig, SledKv, StageContext, StageMetrics,
};

const ROUNDS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn module(artifact: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../modules/target/wasm32-wasip2/release")
        .join(format!("{artifact}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the modules first: cargo build --release --target wasm32-wasip2 (in modules/)",
            path.display()
        )
    })
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn samples(n: usize) -> Frame {
    Frame {
        stream: "vibration/motor-1".into(),
        timestamp_ms: 1_700_000_000_000,
        payload: Payload::Samples(
            (0..n)
                .map(|i| (2.0 * std::f32::consts::PI * 50.0 * i as f32 / 1000.0).sin())
                .collect(),
        ),
        meta: vec![("sensor".into(), "imu0".into())],
    }
}

/// Median seconds per call of `f` over `ROUNDS` rounds of `n` calls.
fn per_call(n: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 + 1 {
        f();
    }
    median(
        (0..ROUNDS)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..n {
                    f();
                }
                t.elapsed().as_secs_f64() / n as f64
            })
            .collect(),
    )
}

/// Alternating rounds of `n` calls of `a` and of `b`: median seconds per call of each and
/// the median of the per-round ratios a/b.
fn paired(n: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64, f64) {
    for _ in 0..n / 10 + 1 {
        a();
        b();
    }
    let (mut ta, mut tb, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..n {
            a();
        }
        let sa = t.elapsed().as_secs_f64() / n as f64;
        let t = Instant::now();
        for _ in 0..n {
            b();
        }
        let sb = t.elapsed().as_secs_f64() / n as f64;
        ta.push(sa);
        tb.push(sb);
        ratio.push(sa / sb);
    }
    (median(ta), median(tb), median(ratio))
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = SandboxConfig::default();
    let sandbox = Sandbox::new(&cfg, dir.path()).expect("sandbox");
    let db_dir: PathBuf = dir.path().join("kv");
    let db = sled::Config::new()
        .path(&db_dir)
        .cache_capacity(1 << 20)
        .open()
        .expect("sled");
    let ctx = |stage: &str| StageContext {
        stage: stage.into(),
        kv: Arc::new(SledKv::open(&db, &db_dir, stage).expect("kv")),
        metrics: Arc::new(StageMetrics::new(64)),
        grants: Default::default(),
    };

    // Compile every module (filling the cache), then measure loading them from the cache
    // into a second sandbox: the steady-state memory of a loaded module, without the
    // compiler's transient allocations.
    let names = [
        "feature_extractor",
        "anomaly_detector",
        "encoder",
        "hostile_trap",
        "hostile_spin",
        "hostile_escape",
    ];
    let mut compile_ms = Vec::new();
    for name in names {
        let bytes = module(name);
        let t = Instant::now();
        sandbox.load(name, &bytes).expect("compile");
        compile_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(sandbox);
    let sandbox = Sandbox::new(&cfg, dir.path()).expect("sandbox");
    let rss0 = rss_bytes();
    let mut code = 0usize;
    let mut cached_ms = Vec::new();
    let mut modules = Vec::new();
    for name in names {
        let bytes = module(name);
        let t = Instant::now();
        let m = sandbox.load(name, &bytes).expect("cached load");
        cached_ms.push(t.elapsed().as_secs_f64() * 1e3);
        code += m.code_bytes();
        modules.push(m);
    }
    let rss_loaded = rss_bytes().saturating_sub(rss0);
    let cached_ms = median(cached_ms);
    let fx_module = &modules[0];
    let trap_module = &modules[3];

    // Per-message overhead: passthrough (hostile_trap that never traps) on a tiny frame.
    let mut pass = sandbox
        .instantiate(trap_module, &ctx("pass"))
        .expect("instantiate");
    pass.init(r#"{"every": 4294967295}"#).expect("init");
    let tiny = samples(8);
    let wasm_pass = per_call(20_000, || {
        std::hint::black_box(pass.process(&tiny).expect("process"));
    });
    let native_pass = per_call(20_000, || {
        std::hint::black_box(vec![std::hint::black_box(&tiny).clone()]);
    });

    // Feature extractor: WASM stage vs native dsp + the same JSON.
    let fx_cfg = r#"{"sample_rate_hz": 1000, "bands": 8}"#;
    let mut fx = sandbox
        .instantiate(fx_module, &ctx("fx"))
        .expect("instantiate");
    fx.init(fx_cfg).expect("init");
    let window = samples(1024);
    let mut native = dsp::Extractor::new(dsp::ExtractorConfig {
        sample_rate_hz: 1000.0,
        bands: 8,
        window: dsp::Window::Hann,
        remove_dc: false,
    });
    let Payload::Samples(values) = &window.payload else {
        unreachable!()
    };
    let mut native_stage = |values: &[f32]| {
        // The stage's input checks (modules/feature-extractor), so both sides do the same work.
        assert!(!values.is_empty() && values.len() <= 65_536);
        let f = native
            .extract_finite(values)
            .unwrap_or_else(|i| panic!("sample {i} is not finite"));
        std::hint::black_box(Frame {
            stream: window.stream.clone(),
            timestamp_ms: window.timestamp_ms,
            payload: Payload::Json(f.to_json()),
            meta: window.meta.clone(),
        });
    };
    let (wasm_fx, native_fx, fx_ratio) = paired(
        2_000,
        || {
            std::hint::black_box(fx.process(&window).expect("process"));
        },
        || native_stage(std::hint::black_box(values)),
    );
    // What the epoch checks (the call deadline) cost: the same module compiled without them,
    // in a sandbox of its own whose calls have no deadline, against the stage above.
    let unchecked_dir = tempfile::tempdir().expect("tempdir");
    let unchecked = Sandbox::new(
        &SandboxConfig {
            epoch_checks: false,
            ..cfg.clone()
        },
        unchecked_dir.path(),
    )
    .expect("sandbox without epoch checks");
    let fx_unchecked_module = unchecked
        .load("feature_extractor", &module("feature_extractor"))
        .expect("compile without epoch checks");
    let mut fx_unchecked = unchecked
        .instantiate(&fx_unchecked_module, &ctx("fx-unchecked"))
        .expect("instantiate");
    fx_unchecked.init(fx_cfg).expect("init");
    let (wasm_checked, wasm_unchecked, epoch_ratio) = paired(
        2_000,
        || {
            std::hint::black_box(fx.process(&window).expect("process"));
        },
        || {
            std::hint::black_box(fx_unchecked.process(&window).expect("process"));
        },
    );
    let wasm_pass_window = per_call(2_000, || {
        std::hint::black_box(pass.process(&window).expect("process"));
    });
    let tiny_fx = per_call(20_000, || {
        std::hint::black_box(fx.process(&tiny).expect("process"));
    });

    // Pooled instantiation (store + WASI context + instance), with and without init.
    let c = ctx("inst");
    let inst_only = per_call(500, || {
        std::hint::black_box(sandbox.instantiate(fx_module, &c).expect("instantiate"));
    });
    let inst_init = per_call(500, || {
        let mut i = sandbox.instantiate(fx_module, &c).expect("instantiate");
        i.init(fx_cfg).expect("init");
        std::hint::black_box(i);
    });

    // Memory per live instance: 8 initialised extractors that have processed a window.
    let rss1 = rss_bytes();
    let live: Vec<_> = (0..8)
        .map(|i| {
            let mut inst = sandbox
                .instantiate(fx_module, &ctx(&format!("live{i}")))
                .expect("instantiate");
            inst.init(fx_cfg).expect("init");
            inst.process(&window).expect("process");
            inst
        })
        .collect();
    let per_instance = rss_bytes().saturating_sub(rss1) / live.len() as u64;
    drop(live);

    // Pipeline throughput: the runtime's threads and channels around the same stage.
    let frames: u64 = 20_000;
    let pipeline_rate = pipeline_msgs_per_s(dir.path(), frames);

    let us = |s: f64| s * 1e6;
    println!(
        "wasm sandbox (wasmtime 48, Cranelift, pooling allocator), medians of {ROUNDS} rounds:"
    );
    println!(
        "  per-message overhead, passthrough, 8-sample frame : {:>8.2} us  (native clone {:.3} us)",
        us(wasm_pass),
        us(native_pass)
    );
    println!(
        "  feature extractor, 8-sample frame                 : {:>8.2} us",
        us(tiny_fx)
    );
    println!(
        "  feature extractor, 1024-sample window  wasm       : {:>8.2} us",
        us(wasm_fx)
    );
    println!(
        "                                          native    : {:>8.2} us   wasm/native = {:.2}x \
         (median of per-round ratios; ratio of medians {:.2}x)",
        us(native_fx),
        fx_ratio,
        wasm_fx / native_fx
    );
    println!(
        "  epoch checks: the stage with / without them       : {:>8.2} / {:.2} us = {:.3}x (median of per-round ratios)",
        us(wasm_checked),
        us(wasm_unchecked),
        epoch_ratio
    );
    println!(
        "  component-model floor: passthrough, same window   : {:>8.2} us  ({:.0}% of the wasm stage)",
        us(wasm_pass_window),
        100.0 * wasm_pass_window / wasm_fx
    );
    println!(
        "  throughput, 1 core, 1024-sample windows          : {:>8.0} msgs/s (native {:.0})",
        1.0 / wasm_fx,
        1.0 / native_fx
    );
    println!(
        "  throughput, 1 core, 8-sample passthrough         : {:>8.0} msgs/s",
        1.0 / wasm_pass
    );
    println!(
        "  instantiate (pooled), instance only               : {:>8.2} us",
        us(inst_only)
    );
    println!(
        "  instantiate (pooled) + init                       : {:>8.2} us",
        us(inst_init)
    );
    println!(
        "  load: compile median {:.0} ms, from cache median {:.1} ms ({:.0}x)",
        median(compile_ms.clone()),
        cached_ms,
        median(compile_ms) / cached_ms
    );
    println!(
        "  memory: {} modules loaded from cache = {} KiB compiled code, RSS +{} KiB ({} KiB per module)",
        names.len(),
        code / 1024,
        rss_loaded / 1024,
        rss_loaded / 1024 / names.len() as u64
    );
    println!(
        "  memory per live extractor instance (after one window): RSS +{} KiB",
        per_instance / 1024
    );
    println!(
        "  pipeline synthetic -> extractor -> log, {frames} windows of 1024: {:>8.0} msgs/s \
         (stage called in a loop {:.0}; pipeline/loop = {:.2})",
        pipeline_rate,
        1.0 / wasm_fx,
        pipeline_rate * wasm_fx
    );
}

/// Messages per second through a whole pipeline (median of 3 runs of `frames` windows).
fn pipeline_msgs_per_s(dir: &Path, frames: u64) -> f64 {
    use edge_agent::config::{DatasetConfig, OutboxConfig};
    use edge_agent::dataset::Dataset;
    use edge_agent::pipeline::{Deps, LocalFiles, Mode, Origin, Pipeline, PipelineSpec};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let state_dir = dir.join("pipeline");
    let state = edge_agent::statedb::StateDb::open(&state_dir).expect("state db");
    let deps = Deps {
        sandbox: Sandbox::new(&SandboxConfig::default(), &state_dir).expect("sandbox"),
        dataset: Arc::new(Dataset::open(&state.db, &DatasetConfig::default()).expect("dataset")),
        outbox: Arc::new(
            edge_agent::outbox::Outbox::open(&state_dir, &OutboxConfig::default()).expect("outbox"),
        ),
        state,
        inbox: Default::default(),
        device: "bench".into(),
        runtime: rt.handle().clone(),
        inference: edge_agent::inference::Inference::unavailable("not used by this benchmark"),
        training: Default::default(),
        offload: None,
    };
    let files = LocalFiles {
        dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../modules/target/wasm32-wasip2/release"),
    };
    let spec = PipelineSpec::parse(&format!(
        r#"
name = "bench"
[[source]]
name = "imu"
kind = "synthetic"
rate_hz = 0
count = {frames}
window = 1024
on_full = "block"
[[stage]]
name = "features"
module = "feature_extractor.wasm"
input = "imu"
config = {{ sample_rate_hz = 1000, bands = 8 }}
[[sink]]
kind = "log"
input = "features"
every = 1000000000
"#
    ))
    .expect("spec");
    let mut rates = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let p =
            Pipeline::start(&spec, &files, &deps, Mode::Live, Origin::default()).expect("start");
        while !p.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let elapsed = t.elapsed().as_secs_f64();
        let calls = p.stats().telemetry().stages[0].ok;
        p.stop();
        assert_eq!(calls, frames, "every window processed");
        rates.push(frames as f64 / elapsed);
    }
    median(rates)
}
