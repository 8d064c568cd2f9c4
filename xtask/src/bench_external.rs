//! `cargo xtask bench external`: peak agent memory while it loads a 100 MB model whose weights
//! are in an external data file (torch's `m.onnx` + `m.onnx.data` layout), against the
//! weights' size, with two baselines measured in the same run: the same model written as one
//! self-contained file (weights inline), and the agent with a tiny model (its floor).
//!
//! The model: `x [1, 1024] -> MatMul W1 [1024, 12800] -> Relu -> MatMul W2 [12800, 1024]`,
//! 104.9 MB of f32 weights, generated here. Each case starts a real `edge-agent run` whose
//! local pipeline (synthetic source -> the model -> log) loads the model; once the pipeline
//! has started, the agent's peak resident set (`VmHWM` in /proc/PID/status, the kernel's
//! high-water mark, so the load's peak whenever it happened) is read and the agent stopped.
//! No broker is needed: the agent runs its local pipeline while its uplink retries.
//! Rounds interleave the cases; medians are printed. `EDGE_AGENT_BIN` picks the binary
//! (default: the release build, built first).
//!
//! Then the price of holding the weights once: a model opened from disk is mapped by ONNX
//! Runtime and not prepacked (see `edge_inference::external`), one read into memory is copied
//! and prepacked. Both sessions of `big.onnx` run here in this process, one input at a time,
//! interleaved; the median time per run of each is printed with their ratio.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edge_inference::DType;
use edge_inference::onnx::{
    DATA_LOCATION_EXTERNAL, GraphProto, StringStringEntryProto, TensorProto,
};
use edge_testmodels::onnx_builder::{init_f32, model, node, value_info};

const ROUNDS: usize = 3;
const IN: u32 = 1024;
const HIDDEN: u32 = 12800;

const PIPELINE: &str = r#"
name = "big"
[[source]]
name = "x"
kind = "synthetic"
rate_hz = 2
window = 1024
[[stage]]
name = "mlp"
kind = "inference"
model = "models/MODEL"
input = "x"
[[sink]]
kind = "log"
input = "mlp"
every = 1000
"#;

/// Deterministic, non-trivial weights (small, so the probe's outputs stay finite).
fn weights(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                / (1u32 << 24) as f32
                * 0.02
                - 0.01
        })
        .collect()
}

fn graph(initializer: Vec<TensorProto>) -> Vec<u8> {
    model(GraphProto {
        name: "big".into(),
        node: vec![
            node("MatMul", &["x", "w1"], &["h"], vec![]),
            node("Relu", &["h"], &["r"], vec![]),
            node("MatMul", &["r", "w2"], &["y"], vec![]),
        ],
        initializer,
        input: vec![value_info("x", DType::F32, &[1, i64::from(IN)])],
        output: vec![value_info("y", DType::F32, &[1, i64::from(IN)])],
        ..Default::default()
    })
}

fn external(name: &str, dims: &[u32], location: &str, offset: usize, length: usize) -> TensorProto {
    let entry = |k: &str, v: String| StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| i64::from(d)).collect(),
        data_type: DType::F32.onnx_code(),
        external_data: vec![
            entry("location", location.into()),
            entry("offset", offset.to_string()),
            entry("length", length.to_string()),
        ],
        data_location: DATA_LOCATION_EXTERNAL,
        ..Default::default()
    }
}

/// Writes `big.onnx` + `big.onnx.data`, `inline.onnx` and `tiny.onnx` into `models`;
/// returns the weights' size in bytes.
fn write_models(models: &Path) -> Result<u64> {
    std::fs::create_dir_all(models)?;
    let w1 = weights((IN * HIDDEN) as usize, 1);
    let w2 = weights((HIDDEN * IN) as usize, 2);
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|f| f.to_le_bytes()).collect() };
    let (b1, b2) = (bytes(&w1), bytes(&w2));
    let mut data = b1.clone();
    data.extend_from_slice(&b2);
    std::fs::write(models.join("big.onnx.data"), &data)?;
    std::fs::write(
        models.join("big.onnx"),
        graph(vec![
            external("w1", &[IN, HIDDEN], "big.onnx.data", 0, b1.len()),
            external("w2", &[HIDDEN, IN], "big.onnx.data", b1.len(), b2.len()),
        ]),
    )?;
    std::fs::write(
        models.join("inline.onnx"),
        graph(vec![
            init_f32("w1", &[IN, HIDDEN], &w1),
            init_f32("w2", &[HIDDEN, IN], &w2),
        ]),
    )?;
    let mut w = vec![0.0; 16];
    for i in 0..4 {
        w[i * 4 + i] = 1.0;
    }
    std::fs::write(
        models.join("tiny.onnx"),
        edge_testmodels::onnx_builder::linear(4, 4, &w, &[0.0; 4]),
    )?;
    Ok(data.len() as u64)
}

fn field_kb(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Starts the agent on a pipeline serving `file`, waits until the pipeline started, and
/// returns its peak RSS and its RSS then, in bytes.
fn peak_rss(bin: &Path, library: &Path, dir: &Path, file: &str, window: u32) -> Result<(u64, u64)> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let pipeline = dir.join("pipeline.toml");
    let models = dir.parent().context("dir")?.join("models");
    std::fs::write(
        &pipeline,
        PIPELINE
            .replace("MODEL", file)
            .replace("window = 1024", &format!("window = {window}")),
    )?;
    // The pipeline's models/ is the shared folder of generated models.
    std::os::unix::fs::symlink(&models, dir.join("models"))?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[device]\nid = \"bench-ext\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:9\"\n\
             [inference]\nlibrary = \"{}\"\n[pipeline]\nfile = \"{}\"\n",
            dir.join("state").display(),
            library.display(),
            pipeline.display()
        ),
    )?;
    let log = dir.join("agent.log");
    let mut child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let started = Instant::now();
    let result = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("pipeline started") {
            let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
            let hwm = field_kb(&status, "VmHWM:").context("VmHWM")?;
            let rss = field_kb(&status, "VmRSS:").context("VmRSS")?;
            break Ok((hwm * 1024, rss * 1024));
        }
        if let Ok(Some(s)) = child.try_wait() {
            break Err(anyhow::anyhow!(
                "agent exited ({s}) before its pipeline started:\n{text}"
            ));
        }
        if started.elapsed() > Duration::from_secs(120) {
            break Err(anyhow::anyhow!("pipeline did not start in 120 s:\n{text}"));
        }
        std::thread::sleep(Duration::from_millis(50)); // polling a log file, not a sync
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

pub fn run(root: &Path) -> Result<()> {
    let library = crate::ort::ensure_ort(root, crate::ort::host_triple(), false)?;
    let bin = match std::env::var_os("EDGE_AGENT_BIN") {
        Some(b) => PathBuf::from(b),
        None => {
            crate::bench::build_release(root)?;
            root.join("target/release/edge-agent")
        }
    };
    if !bin.is_file() {
        bail!("{} is not a file", bin.display());
    }
    let dir = root.join("target/bench/external");
    let _ = std::fs::remove_dir_all(&dir);
    let weights = write_models(&dir.join("models"))?;
    let cases = [
        ("external data (big.onnx + big.onnx.data)", "big.onnx", IN),
        ("same model inline (inline.onnx)", "inline.onnx", IN),
        ("floor: tiny model", "tiny.onnx", 4),
    ];
    let mut peaks: Vec<Vec<u64>> = vec![Vec::new(); cases.len()];
    let mut after: Vec<Vec<u64>> = vec![Vec::new(); cases.len()];
    for round in 0..ROUNDS {
        for (i, (_, file, window)) in cases.iter().enumerate() {
            let (p, a) = peak_rss(
                &bin,
                &library,
                &dir.join(format!("run-{round}-{i}")),
                file,
                *window,
            )?;
            peaks[i].push(p);
            after[i].push(a);
        }
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "agent {}; weights {:.1} MiB; peak RSS (VmHWM) after the pipeline started, median of {ROUNDS}:",
        bin.display(),
        mib(weights)
    );
    let floor = median(peaks[2].clone());
    for (i, (label, _, _)) in cases.iter().enumerate() {
        let m = median(peaks[i].clone());
        let a = median(after[i].clone());
        println!(
            "  {label:<44} peak {:>6.1} MiB = {:.2}x weights (above the floor {:.2}x); \
             after the load {:>6.1} MiB = {:.2}x",
            mib(m),
            m as f64 / weights as f64,
            m.saturating_sub(floor) as f64 / weights as f64,
            mib(a),
            a as f64 / weights as f64
        );
    }
    latency(&library, &dir.join("models/big.onnx"))?;
    if std::env::var_os("EXP_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Median time per run of `model` opened from disk (mapped, not prepacked) and read into
/// memory (copied, prepacked), in this process, interleaved in blocks.
fn latency(library: &Path, model: &Path) -> Result<()> {
    use edge_inference::{InferenceConfig, Model, ModelFiles, Runtime, Tensor};
    let rt = Runtime::load(&InferenceConfig {
        library: Some(library.to_owned()),
        intra_threads: 1,
        ..InferenceConfig::default()
    })?;
    let mapped = ModelFiles::open(model)?;
    let read = ModelFiles::read(model)?;
    let sessions = [
        (
            "opened from disk: mapped, not prepacked",
            Model::load_with_data(&rt, "big", "1", &mapped.graph, &mapped.data)?,
        ),
        (
            "read into memory: copied, prepacked",
            Model::load_with_data(&rt, "big", "1", &read.graph, &read.data)?,
        ),
    ];
    drop(read);
    let input = [Tensor::from_f32(vec![1, IN], &weights(IN as usize, 7))?];
    let mut times: Vec<Vec<u64>> = vec![Vec::new(); sessions.len()];
    for _ in 0..10 {
        for (i, (_, m)) in sessions.iter().enumerate() {
            for _ in 0..5 {
                let t = Instant::now();
                m.run(&input)?;
                times[i].push(t.elapsed().as_micros() as u64);
            }
        }
    }
    println!("time per run of big.onnx (batch 1, one intra-op thread, median of 50, interleaved):");
    let base = median(times[1].clone()) as f64;
    for (i, (label, _)) in sessions.iter().enumerate() {
        let m = median(times[i].clone());
        println!("  {label:<44} {m:>7} us = {:.2}x", m as f64 / base);
    }
    Ok(())
}
