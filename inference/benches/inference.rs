//! Inference latency at batch 1: `Model::run` (validation, tensor copies and all) against ONNX
//! Runtime's own Python API on the same ONNX Runtime release (the pinned wheel), the same model
//! files and the same thread settings (one intra-op thread), measured in the same run.
//! Models: silero VAD (real, from the `silero-vad` wheel) and the small CNN of `onnx_builder`.
//!
//! Then, on silero VAD: the longest request latency while new versions are hot-swapped in
//! (requests running back to back on another thread), against the longest without swaps in
//! the same run; and resident memory per loaded model (RSS growth over several loaded copies).
//!
//! Provisioning (library, model, Python venv) goes through `cargo xtask ort --models --venv`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use edge_inference::{InferenceConfig, Model, ModelRegistry, Provider, Runtime, Tensor};
use edge_testmodels::onnx_builder::SmallCnn;

const WARMUP: usize = 300;
const ITERS: usize = 3000;
const THREADS: usize = 1;

const PYTHON: &str = r#"
import sys, time, json
import numpy as np
import onnxruntime as ort
path, kind, warmup, iters, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
so = ort.SessionOptions()
so.intra_op_num_threads = threads
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
if kind == "silero":
    feeds = {"input": np.sin(np.arange(512, dtype=np.float32) * 0.05).reshape(1, 512).astype(np.float32),
             "state": np.zeros((2, 1, 128), dtype=np.float32),
             "sr": np.array(16000, dtype=np.int64)}
else:
    n = 64
    x = (((np.arange(n) * 7) % 17) / 16.0).astype(np.float32).reshape(1, 1, 8, 8)
    feeds = {"x": x}
for _ in range(warmup):
    s.run(None, feeds)
t = []
for _ in range(iters):
    a = time.perf_counter_ns()
    s.run(None, feeds)
    t.append(time.perf_counter_ns() - a)
t.sort()
print(json.dumps({"median_ns": t[len(t) // 2], "version": ort.__version__}))
"#;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Lines printed by `cargo xtask ort --models --venv`: library, model, python.
fn provision() -> (PathBuf, PathBuf, PathBuf) {
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(root())
        .env("CARGO_TARGET_DIR", root().join("target/provision"))
        .args([
            "run", "--quiet", "-p", "xtask", "--", "ort", "--models", "--venv",
        ])
        .output()
        .expect("cannot run cargo xtask ort");
    assert!(
        out.status.success(),
        "cargo xtask ort failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 paths");
    let lines: Vec<PathBuf> = text.lines().map(PathBuf::from).collect();
    (lines[0].clone(), lines[1].clone(), lines[2].clone())
}

fn median_ns(model: &Model, inputs: &[Tensor]) -> u64 {
    for _ in 0..WARMUP {
        model.run(inputs).expect("warm-up run");
    }
    let mut t: Vec<u64> = (0..ITERS)
        .map(|_| {
            let a = Instant::now();
            model.run(inputs).expect("run");
            a.elapsed().as_nanos() as u64
        })
        .collect();
    t.sort_unstable();
    t[t.len() / 2]
}

fn python_median_ns(python: &Path, model: &Path, kind: &str) -> (u64, String) {
    let out = Command::new(python)
        .args(["-c", PYTHON])
        .arg(model)
        .arg(kind)
        .args([WARMUP.to_string(), ITERS.to_string(), THREADS.to_string()])
        .output()
        .expect("cannot run the python baseline");
    assert!(
        out.status.success(),
        "python baseline failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("baseline prints json");
    (
        v["median_ns"].as_u64().expect("median_ns"),
        v["version"].as_str().unwrap_or("?").to_owned(),
    )
}

fn main() {
    let (library, silero, python) = provision();
    let rt = Runtime::load(&InferenceConfig {
        library: Some(library),
        providers: vec![Provider::Cpu],
        intra_threads: THREADS,
        reject_non_finite: true,
    })
    .expect("onnx runtime loads");

    let cnn = SmallCnn::example();
    let cnn_path = root().join("target/models/small_cnn.onnx");
    std::fs::write(&cnn_path, cnn.to_onnx()).expect("write small_cnn.onnx");

    let samples: Vec<f32> = (0..512).map(|i| (i as f32 * 0.05).sin()).collect();
    let silero_inputs = vec![
        Tensor::from_f32(vec![1, 512], &samples).unwrap(),
        Tensor::zeros(edge_inference::DType::F32, vec![2, 1, 128]).unwrap(),
        Tensor::from_i64(vec![], &[16000]).unwrap(),
    ];
    let cases: [(&str, &Path, Vec<Tensor>); 2] = [
        ("silero", &silero, silero_inputs),
        ("cnn", &cnn_path, vec![cnn.example_input(1)]),
    ];

    println!(
        "inference latency, batch 1, {THREADS} intra-op thread, onnx runtime {} ({}), {ITERS} runs after {WARMUP} warm-up",
        rt.version(),
        rt.library().display()
    );
    println!(
        "{:<8} {:>14} {:>16} {:>8}",
        "model", "ours (µs)", "python ort (µs)", "ratio"
    );
    for (name, path, inputs) in cases.iter().cloned() {
        let bytes = std::fs::read(path).expect("read model");
        let model = Model::load(&rt, name, "bench", &bytes).expect("model loads");
        let names: Vec<&str> = model.inputs().iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names.len(), inputs.len(), "{name} inputs: {names:?}");
        let ours = median_ns(&model, &inputs);
        let (theirs, version) = python_median_ns(&python, path, name);
        println!(
            "{name:<8} {:>14.1} {:>16.1} {:>7.3}x   (python onnxruntime {version})",
            ours as f64 / 1000.0,
            theirs as f64 / 1000.0,
            ours as f64 / theirs as f64
        );
    }
    let silero_bytes = std::fs::read(&silero).expect("read silero");
    hot_swap(&rt, &silero_bytes, &cases[0].2);
    memory_per_model(&rt, "silero", &silero_bytes, &cases[0].2);
    memory_per_model(&rt, "cnn", &cnn.to_onnx(), &cases[1].2);
}

const SWAPS: usize = 10;
const PHASE: Duration = Duration::from_secs(3);

/// Request latencies (ns) of back-to-back runs on another thread while `during` runs.
fn requests_while(
    registry: &Arc<ModelRegistry>,
    inputs: &[Tensor],
    during: impl FnOnce(),
) -> (Vec<u64>, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (registry, inputs, stop) = (registry.clone(), inputs.to_vec(), stop.clone());
        std::thread::spawn(move || {
            let (mut lat, mut failed) = (Vec::new(), 0);
            while !stop.load(Ordering::Relaxed) {
                let a = Instant::now();
                if registry.run("vad", &inputs).is_err() {
                    failed += 1;
                }
                lat.push(a.elapsed().as_nanos() as u64);
            }
            (lat, failed)
        })
    };
    during();
    stop.store(true, Ordering::Relaxed);
    let (mut lat, failed) = worker.join().expect("request thread");
    lat.sort_unstable();
    (lat, failed)
}

fn hot_swap(rt: &Runtime, bytes: &[u8], inputs: &[Tensor]) {
    let registry = Arc::new(ModelRegistry::new(rt.clone()));
    registry
        .install("vad", "v0", bytes, Some(inputs))
        .expect("v0 installs");
    for _ in 0..WARMUP {
        registry.run("vad", inputs).expect("warm-up");
    }
    let (base, base_failed) = requests_while(&registry, inputs, || std::thread::sleep(PHASE));
    let mut installs = Vec::new();
    let (swap, swap_failed) = requests_while(&registry, inputs, || {
        let pause = PHASE / SWAPS as u32;
        for i in 1..=SWAPS {
            let a = Instant::now();
            registry
                .install("vad", &format!("v{i}"), bytes, Some(inputs))
                .expect("new version installs");
            installs.push(a.elapsed().as_nanos() as u64);
            std::thread::sleep(pause.saturating_sub(a.elapsed()));
        }
    });
    installs.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    let med = |v: &[u64]| v[v.len() / 2];
    let p999 = |v: &[u64]| v[(v.len() * 999 / 1000).min(v.len() - 1)];
    println!();
    println!(
        "hot swap, silero: {SWAPS} new versions installed (load + probe, median {:.1} ms) while requests run back to back",
        us(med(&installs)) / 1000.0
    );
    println!(
        "{:<14} {:>9} {:>12} {:>12} {:>12} {:>7}",
        "phase", "requests", "median (µs)", "p99.9 (µs)", "max (µs)", "failed"
    );
    for (name, lat, failed) in [
        ("no swaps", &base, base_failed),
        ("during swaps", &swap, swap_failed),
    ] {
        println!(
            "{name:<14} {:>9} {:>12.1} {:>12.1} {:>12.1} {:>7}",
            lat.len(),
            us(med(lat)),
            us(p999(lat)),
            us(*lat.last().unwrap_or(&0)),
            failed
        );
    }
    println!(
        "longest request during swaps / without: {:.2}x; median ratio {:.2}x",
        *swap.last().unwrap_or(&0) as f64 / *base.last().unwrap_or(&1) as f64,
        med(&swap) as f64 / med(&base) as f64
    );
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

const COPIES: usize = 8;

/// RSS growth per loaded (and once run) model, over `COPIES` copies under different names.
fn memory_per_model(rt: &Runtime, name: &str, bytes: &[u8], inputs: &[Tensor]) {
    let registry = ModelRegistry::new(rt.clone());
    // One copy first, so one-time costs (allocator arenas, kernels) are not counted.
    registry
        .install("warm", "1", bytes, Some(inputs))
        .expect("loads");
    registry.run("warm", inputs).expect("runs");
    let before = rss_bytes();
    for i in 0..COPIES {
        let n = format!("{name}-{i}");
        registry
            .install(&n, "1", bytes, Some(inputs))
            .expect("loads");
        registry.run(&n, inputs).expect("runs");
    }
    let after = rss_bytes();
    for i in 0..COPIES {
        registry.remove(&format!("{name}-{i}"));
    }
    let freed = rss_bytes();
    let per = after.saturating_sub(before) as f64 / COPIES as f64;
    println!(
        "memory, {name}: {:.2} MiB RSS per loaded model ({COPIES} copies; file {:.2} MiB, {:.1}x the file); {:.2} MiB of {:.2} MiB returned after unloading",
        per / 1048576.0,
        bytes.len() as f64 / 1048576.0,
        per / bytes.len() as f64,
        after.saturating_sub(freed) as f64 / 1048576.0,
        after.saturating_sub(before) as f64 / 1048576.0,
    );
}
