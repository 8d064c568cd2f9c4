//! `cargo xtask bench [outbox|e2e|rss|all]`: our code and a baseline, side by side in one run.
//!
//! - outbox: durable enqueue rate vs an append+fdatasync loop (`cargo bench -p edge-agent --bench outbox`);
//! - sandbox: the WASM feature-extractor stage vs the same code compiled natively, per-message
//!   overhead and the component-model copy floor ([`sandbox`]);
//! - e2e: messages/s from the agent's local API through outbox, uplink, embedded broker and
//!   coordinator, vs a bare rumqttc client publishing the same envelopes to the same broker,
//!   both timed until the coordinator's journal holds every message (the agent deletes a
//!   message only on the coordinator's end-to-end ack, so at most `mqtt.max_unacked` run
//!   ahead); then a steady 1,000 msg/s through a link proxy for the downstream bytes per 1,000
//!   messages (PUBACKs and end-to-end acks) and the outbox depth its telemetry reports;
//! - rss: RSS and PSS of the agent with no pipeline, with the vibration pipeline (two WASM
//!   stages; compiled at that start, and again with the module cache warm) and with one small
//!   ONNX model, vs a bare tokio+rumqttc process connected to the
//!   same broker; the size of the agent binary measured; optionally an older agent binary
//!   beside it (`--before`) and the stripped sizes of the aarch64 and armv7 release agents
//!   (`--arm-sizes`);
//! - fl: federated learning on digits, every update codec against fp32 ([`fl`]);
//! - fl-ack: the coordinator's telemetry latency while federated rounds close on a 10,000-row
//!   hold-out, against an idle phase of the same run, optionally for a second binary
//!   ([`fl_ack`]);
//! - auth: per-message cost of the MAC every device message carries vs an ed25519 signature, on
//!   this machine and on aarch64 under qemu-user ([`auth`]);
//! - offload: the agent's offload policy against always-local, always-offload and a hindsight
//!   oracle over a measured trace of changing link and load ([`offload`]).
//!
//! Release builds. Figures are medians over rounds; the machines are shared and noisy, so
//! quote the ratios.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edge_tests::{Agent, AgentOptions, Class, Coordinator, Journal, LocalApi, Publish};

const E2E_MESSAGES: usize = 4000;
const E2E_PAYLOAD: usize = 200;
const ROUNDS: usize = 3;

pub fn run(root: &Path, which: &str, rss_opts: &RssOptions) -> Result<()> {
    let all = which == "all";
    if all || which == "outbox" {
        let mut bench = crate::cargo();
        bench.args(["bench", "-p", "edge-agent", "--bench", "outbox"]);
        crate::run(bench).context("outbox benchmark failed")?;
    }
    if all || which == "e2e" || which == "rss" {
        build_release(root)?;
        let dir = tempfile::Builder::new()
            .prefix("edge-bench")
            .tempdir_in(root.join("target"))?;
        if all || which == "e2e" {
            e2e(root, dir.path())?;
        }
        if all || which == "rss" {
            rss(root, dir.path(), rss_opts)?;
        }
    }
    if !matches!(which, "all" | "outbox" | "e2e" | "rss") {
        bail!("unknown benchmark {which:?}: use outbox, e2e, rss or all");
    }
    Ok(())
}

/// `cargo xtask bench sandbox`: `agent/benches/sandbox.rs` (release), the guest modules built
/// first by the caller.
pub fn sandbox() -> Result<()> {
    let mut bench = crate::cargo();
    bench.args(["bench", "-p", "edge-agent", "--bench", "sandbox"]);
    crate::run(bench).context("sandbox benchmark failed")
}

/// `cargo xtask bench fl`: the federated-learning benchmark (`tests/benches/fl.rs`). Run
/// through `cargo test --bench` (the dev profile): what it reports, accuracy and bytes, does not
/// depend on the host code's optimisation (the training runs in the WASM module, compiled by
/// Cranelift either way), and it spares a release build of the whole workspace.
pub fn fl() -> Result<()> {
    let mut bench = crate::cargo();
    bench.args(["test", "-p", "edge-tests", "--bench", "fl"]);
    crate::run(bench).context("federated-learning benchmark failed")
}

/// `cargo xtask bench fl-ack [--before BIN]`: telemetry latency while federated rounds close
/// (`tests/benches/fl_ack.rs`), with the real coordinator binary. The dev profile, like
/// `offload`: the evaluation's cost is ONNX Runtime's (a prebuilt library). `--before` names
/// another `edge-coordinator` binary measured in the same run; it is given this workspace's
/// ONNX Runtime library through `ORT_DYLIB_PATH`, since a binary built elsewhere looks in its
/// own workspace.
pub fn fl_ack(root: &Path, before: Option<&Path>) -> Result<()> {
    let library = crate::ort::ensure_ort(root, crate::ort::host_triple(), false)?;
    crate::build_bins()?;
    let mut bench = crate::cargo();
    bench.args(["test", "-p", "edge-tests", "--bench", "fl_ack"]);
    if let Some(b) = before {
        let b = b
            .canonicalize()
            .with_context(|| format!("--before {}", b.display()))?;
        bench.env("FL_ACK_BEFORE_BIN", b);
        if std::env::var_os("ORT_DYLIB_PATH").is_none() {
            bench.env("ORT_DYLIB_PATH", library);
        }
    }
    crate::run(bench).context("fl-ack benchmark failed")
}

/// `cargo xtask bench fl-large`: federated learning with 1M- and 5M-weight models through
/// the real binaries (`tests/benches/fl_large.rs`). The dev profile: the training runs in the
/// WASM module (Cranelift either way) and ONNX Runtime is prebuilt; what the debug build of
/// the agent and coordinator adds shows in the round times, not in the memory figures.
pub fn fl_large(root: &Path) -> Result<()> {
    crate::ort::ensure_ort(root, crate::ort::host_triple(), false)?;
    crate::build_bins()?;
    let mut bench = crate::cargo();
    bench.args(["test", "-p", "edge-tests", "--bench", "fl_large"]);
    crate::run(bench).context("large-model federated-learning benchmark failed")
}

/// `cargo xtask bench offload`: offload decisions over a measured mixed trace
/// (`tests/benches/offload.rs`), with the real coordinator binary. The dev profile, like `fl`:
/// the local side's time is ONNX Runtime's own (a prebuilt library), and the calibration line
/// the benchmark prints shows what the debug-built broker and coordinator add to a round trip.
pub fn offload(root: &Path) -> Result<()> {
    crate::ort::ensure_ort(root, crate::ort::host_triple(), false)?;
    // The coordinator binary the benchmark starts (target/debug, the workspace's features).
    crate::build_bins()?;
    let mut bench = crate::cargo();
    bench.args(["test", "-p", "edge-tests", "--bench", "offload"]);
    crate::run(bench).context("offload benchmark failed")
}

/// `cargo xtask bench api`: the HTTP API at 1,000 and 10,000 synthetic devices
/// (`tests/benches/api.rs`), with the real coordinator binary. The dev profile, like the other
/// coordinator benchmarks (`EDGE_COORDINATOR_BIN` names a release build to measure that).
pub fn api() -> Result<()> {
    crate::build_bins()?;
    let mut bench = crate::cargo();
    bench.args(["test", "-p", "edge-tests", "--bench", "api"]);
    crate::run(bench).context("API benchmark failed")
}

/// `cargo xtask bench auth [--host-only]`: `protocol/benches/auth.rs` on this machine, then
/// cross-built for aarch64 and run under qemu-user, whose figures are marked emulated (only the
/// ratios between its lines mean anything).
pub fn auth(host_only: bool) -> Result<()> {
    let mut bench = crate::cargo();
    bench.args(["bench", "-p", "protocol", "--bench", "auth"]);
    crate::run(bench).context("auth benchmark failed")?;
    if host_only {
        return Ok(());
    }
    let target = crate::cross::Target::load("aarch64-unknown-linux-gnu")?;
    let runner = crate::qemu::prepare(&target)?;
    let mut bench = crate::cargo();
    bench.args([
        "bench",
        "-p",
        "protocol",
        "--bench",
        "auth",
        "--target",
        &target.triple,
    ]);
    target.cargo_env(&mut bench);
    bench.env(format!("CARGO_TARGET_{}_RUNNER", target.env_key()), runner);
    bench.env("EDGE_BENCH_EMULATED", "1");
    crate::run(bench).context("auth benchmark under qemu failed")
}

/// Release builds of the agent and coordinator (and the bare-client baseline), which the
/// harness then uses instead of target/debug: for benchmarks and `soak`.
pub fn build_release(root: &Path) -> Result<()> {
    let mut build = crate::cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "edge-agent",
        "-p",
        "edge-coordinator",
        "--bins",
        "--example",
        "bare_mqtt",
    ]);
    crate::run(build).context("release build failed")?;
    let rel = root.join("target/release");
    // The harness finds binaries through these (it would otherwise take target/debug). One
    // already set is kept: `EDGE_AGENT_BIN=OTHER/edge-agent cargo xtask bench rss` measures
    // another build (an earlier commit's, for a before/after) against the same baseline.
    for (key, bin) in [
        ("EDGE_AGENT_BIN", "edge-agent"),
        ("EDGE_COORDINATOR_BIN", "edge-coordinator"),
    ] {
        if std::env::var_os(key).is_none() {
            unsafe_env(key, rel.join(bin));
        }
    }
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_env(key: &str, value: PathBuf) {
    // Single-threaded at this point (no harness threads started yet).
    unsafe { std::env::set_var(key, value) };
}

fn bare_bin(root: &Path) -> PathBuf {
    root.join("target/release/examples/bare_mqtt")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn count_data(journal: &mut Journal, device: &str) -> Result<usize> {
    journal.refresh()?;
    Ok(journal
        .events()
        .iter()
        .filter(|e| e.is_for("data", device))
        .count())
}

fn wait_count(journal: &mut Journal, device: &str, n: usize, timeout: Duration) -> Result<()> {
    journal.wait_for(
        &format!("{n} data events from {device}"),
        timeout,
        |events| events.iter().filter(|e| e.is_for("data", device)).count() >= n,
    )
}

fn e2e(root: &Path, dir: &Path) -> Result<()> {
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let rdir = dir.join(format!("e2e-{round}"));
        std::fs::create_dir_all(&rdir)?;
        let coord = Coordinator::start_embedded(&rdir.join("coordinator"))?;
        let port = coord.port().context("coordinator port")?;
        let mut journal = coord.journal();

        // Baseline: bare rumqttc publishing the same envelopes (enrolled with the harness's
        // claim and MAC'd: the least the coordinator accepts).
        let claim = edge_tests::enroll::write_claim_key(&rdir.join("claim.key"), &[])?;
        let mut child = Command::new(bare_bin(root))
            .args([
                "publish",
                "127.0.0.1",
                &port.to_string(),
                &E2E_MESSAGES.to_string(),
                &E2E_PAYLOAD.to_string(),
            ])
            .arg(&claim)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot run bare_mqtt")?;
        let mut lines = std::io::BufReader::new(child.stdout.take().context("bare_mqtt stdout")?);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut lines, &mut line)?;
        if line.trim() != "ready" {
            bail!("bare_mqtt did not enroll: {line:?}");
        }
        let start = Instant::now();
        std::io::Write::write_all(&mut child.stdin.take().context("bare_mqtt stdin")?, b"go\n")?;
        if !child.wait()?.success() {
            bail!("bare_mqtt publish failed");
        }
        wait_count(
            &mut journal,
            "bench-bare",
            E2E_MESSAGES,
            Duration::from_secs(120),
        )?;
        bare.push(E2E_MESSAGES as f64 / start.elapsed().as_secs_f64());

        // Ours: the agent's local API -> outbox -> uplink -> broker -> coordinator.
        let mut opts = AgentOptions::new("bench-agent", format!("mqtt://127.0.0.1:{port}"));
        opts.telemetry_interval_s = 0;
        let agent = Agent::start(&rdir.join("agent"), opts)?;
        journal.wait_registered("bench-agent", Duration::from_secs(60))?;
        let before = count_data(&mut journal, "bench-agent")?;
        let filler = serde_json::Value::String("x".repeat(E2E_PAYLOAD));
        let msgs: Vec<Publish> = (0..E2E_MESSAGES)
            .map(|_| Publish::new("bench", Class::Results, filler.clone()))
            .collect();
        let socket = agent.socket_path();
        let start = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = msgs
                .chunks(E2E_MESSAGES / 4)
                .map(|part| {
                    let socket = socket.clone();
                    s.spawn(move || -> Result<()> {
                        let mut api = LocalApi::connect(&socket)?;
                        api.publish_all(part, 256)?;
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("publisher thread panicked"))??;
            }
            Ok(())
        })?;
        wait_count(
            &mut journal,
            "bench-agent",
            before + E2E_MESSAGES,
            Duration::from_secs(120),
        )?;
        ours.push(E2E_MESSAGES as f64 / start.elapsed().as_secs_f64());
        drop(agent);
        drop(coord);
    }
    let (o, b) = (median(ours), median(bare));
    println!(
        "end-to-end publish rate, {E2E_MESSAGES} messages of {E2E_PAYLOAD} bytes, median of {ROUNDS} rounds"
    );
    println!("  bare rumqttc client -> embedded broker -> coordinator : {b:>8.0} msg/s");
    println!(
        "  agent local API -> durable outbox -> uplink -> ...     : {o:>8.0} msg/s  ratio {:.2}x of bare",
        o / b
    );
    steady(&dir.join("e2e-steady"))
}

/// Messages per second, and seconds, of the steady phase.
const STEADY_RATE: usize = 1000;
const STEADY_SECONDS: usize = 6;

/// A steady 1,000 msg/s from the local API through a link proxy (clean link) to the embedded
/// broker: what comes down per 1,000 messages, and how deep the outbox runs.
fn steady(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let coord = Coordinator::start_embedded(&dir.join("coordinator"))?;
    let port = coord.port().context("coordinator port")?;
    let mut journal = coord.journal();
    let proxy = edge_tests::LinkProxy::to_port(port)?;
    let mut opts = AgentOptions::new("bench-steady", proxy.url());
    opts.telemetry_interval_s = 1;
    let agent = Agent::start(&dir.join("agent"), opts)?;
    journal.wait_registered("bench-steady", Duration::from_secs(60))?;
    // Settle: enrollment answer, retained statuses, the first telemetry.
    std::thread::sleep(Duration::from_secs(2));
    let before = proxy.stats();
    let since = journal.len();
    let total = STEADY_RATE * STEADY_SECONDS;
    let filler = serde_json::Value::String("x".repeat(E2E_PAYLOAD));
    let batch: Vec<Publish> = (0..STEADY_RATE / 100)
        .map(|_| Publish::new("steady", Class::Results, filler.clone()))
        .collect();
    let mut api = agent.api()?;
    let start = Instant::now();
    for tick in 0..(total / batch.len()) {
        let due = start + Duration::from_millis(10 * tick as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait); // pacing the offered load, not a sync
        }
        api.publish_all(&batch, batch.len())?;
    }
    let offered_s = start.elapsed().as_secs_f64();
    wait_count(
        &mut journal,
        "bench-steady",
        total,
        Duration::from_secs(120),
    )?;
    // The last acks follow the last commit.
    std::thread::sleep(Duration::from_secs(2));
    let after = proxy.stats();
    let down = after.bytes_down - before.bytes_down;
    let up = after.bytes_up - before.bytes_up;
    let per_k = |b: u64| b as f64 * 1000.0 / total as f64;
    journal.refresh()?;
    let mut depths: Vec<f64> = journal.events()[since.min(journal.len())..]
        .iter()
        .filter(|e| e.is_for("telemetry", "bench-steady"))
        .filter_map(|e| e.raw.get("outbox_depth")?.as_array().cloned())
        .map(|d| d.iter().filter_map(serde_json::Value::as_u64).sum::<u64>() as f64)
        .collect();
    depths.sort_by(|a, b| a.total_cmp(b));
    let max_depth = depths.last().copied().unwrap_or(0.0);
    let median_depth = if depths.is_empty() {
        0.0
    } else {
        median(depths.clone())
    };
    println!(
        "steady load: {total} messages of {E2E_PAYLOAD} bytes offered at {STEADY_RATE} msg/s ({:.0} msg/s achieved) through a link proxy",
        total as f64 / offered_s
    );
    println!(
        "  downstream bytes per 1,000 messages: {:>8.0} (PUBACKs alone would be 4,000; bare rumqttc gets only those)",
        per_k(down)
    );
    println!(
        "  of which end-to-end acks (total - PUBACKs): {:>8.0}   upstream per 1,000: {:>8.0}",
        per_k(down.saturating_sub(4 * total as u64)),
        per_k(up)
    );
    println!(
        "  outbox depth in telemetry (messages, {} samples): median {median_depth:.0}, max {max_depth:.0}",
        depths.len()
    );
    drop(agent);
    drop(coord);
    Ok(())
}

fn rss_of(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = field_kb(&status, "VmRSS:").context("VmRSS")?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let pss = field_kb(&rollup, "Pss:").unwrap_or(0);
    Ok((rss, pss))
}

fn field_kb(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// What `cargo xtask bench rss` measures besides this build.
#[derive(Debug, Clone, Default)]
pub struct RssOptions {
    /// Another `edge-agent` binary (e.g. built from main) measured in the same run.
    pub before: Option<PathBuf>,
    /// Also cross-build the aarch64 and armv7 release agents and report their stripped sizes.
    pub arm_sizes: bool,
    /// Also measure inside this board's image booted under qemu-system-aarch64.
    pub image: Option<String>,
}

/// What runs in the agent while it is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// No pipeline: what a board waiting for its first deployment costs.
    Idle,
    /// `config/pipelines/vibration.toml`: a synthetic source and two WASM stages, compiled
    /// at this start (a fresh module cache: a board's first start of a module).
    Vibration,
    /// The same with the module cache the run before filled (every later start).
    VibrationCached,
    /// A synthetic source into an inference stage running one small ONNX model.
    Model,
}

impl Load {
    /// `VibrationCached` right after `Vibration`, whose cache it uses.
    const ALL: [Load; 4] = [
        Load::Idle,
        Load::Vibration,
        Load::VibrationCached,
        Load::Model,
    ];

    fn label(self) -> &'static str {
        match self {
            Load::Idle => "no pipeline",
            Load::Vibration => "vibration pipeline (2 WASM stages), compiled",
            Load::VibrationCached => "vibration pipeline, module cache warm",
            Load::Model => "one small ONNX model (4x4 linear)",
        }
    }
}

/// A local pipeline: a synthetic source into an inference stage running a 4x4 linear model
/// ([`small_model`]).
const MODEL_PIPELINE: &str = r#"
name = "rss-model"
[[source]]
name = "imu"
kind = "synthetic"
rate_hz = 20
window = 4
[[stage]]
name = "score"
kind = "inference"
model = "models/linear.onnx"
input = "imu"
[[sink]]
kind = "outbox"
input = "score"
stream = "scores"
"#;

/// The model [`MODEL_PIPELINE`] runs: 4x4 linear, `y = 2x + 1`.
fn small_model() -> Vec<u8> {
    let mut w = vec![0.0; 16];
    for i in 0..4 {
        w[i * 4 + i] = 2.0;
    }
    edge_testmodels::onnx_builder::linear(4, 4, &w, &[1.0; 4])
}

/// One sample of one agent process.
struct Sample {
    rss: u64,
    pss: u64,
    /// Whether `libonnxruntime` was mapped.
    ort: bool,
    /// From spawn to the local API accepting a connection (the agent is up), ms.
    ready_ms: f64,
    /// From spawn to its registration in the coordinator's journal, ms.
    registered_ms: f64,
}

fn rss(root: &Path, dir: &Path, opts: &RssOptions) -> Result<()> {
    const SETTLE: Duration = Duration::from_secs(5);
    let library = crate::ort::ensure_ort(root, crate::ort::host_triple(), false)?;
    let vibration = root.join("config/pipelines/vibration.toml");
    for module in ["feature_extractor", "anomaly_detector"] {
        let wasm = root.join(format!(
            "modules/target/wasm32-wasip2/release/{module}.wasm"
        ));
        if !wasm.is_file() {
            bail!("{} is missing: run `cargo xtask modules`", wasm.display());
        }
    }
    let model_dir = dir.join("rss-model");
    std::fs::create_dir_all(model_dir.join("models"))?;
    std::fs::write(model_dir.join("pipeline.toml"), MODEL_PIPELINE)?;
    std::fs::write(model_dir.join("models/linear.onnx"), small_model())?;

    let coord = Coordinator::start_embedded(&dir.join("rss-coordinator"))?;
    let port = coord.port().context("coordinator port")?;
    let mut journal = coord.journal();
    let ours = crate::root().join("target/release/edge-agent");
    let ours = std::env::var_os("EDGE_AGENT_BIN").map_or(ours, PathBuf::from);
    let mut builds = vec![("this build", ours)];
    if let Some(b) = &opts.before {
        let b = b
            .canonicalize()
            .with_context(|| format!("--before {}", b.display()))?;
        builds.push(("before", b));
    }
    // (build, load) -> samples; rounds interleave everything so drift on a shared machine
    // spreads over all of them.
    let mut samples: Vec<Vec<Sample>> = (0..builds.len() * Load::ALL.len())
        .map(|_| Vec::new())
        .collect();
    let (mut bare, mut bare_pss) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for (b, (_, bin)) in builds.iter().enumerate() {
            for (l, load) in Load::ALL.into_iter().enumerate() {
                let device = format!("rss-{round}-{b}-{l}");
                let mut o = AgentOptions::new(device.clone(), format!("mqtt://127.0.0.1:{port}"));
                o.bin = Some(bin.clone());
                // The same library for every build (one built elsewhere looks in its own
                // workspace's target/ort).
                let mut inference = toml::Table::new();
                inference.insert(
                    "library".into(),
                    toml::Value::String(library.display().to_string()),
                );
                o.extra
                    .insert("inference".into(), toml::Value::Table(inference));
                let file = match load {
                    Load::Idle => None,
                    Load::Vibration | Load::VibrationCached => {
                        let mut sandbox = toml::Table::new();
                        let cache = dir.join(format!("rss-wasm-cache-{round}-{b}"));
                        sandbox.insert(
                            "cache_dir".into(),
                            toml::Value::String(cache.display().to_string()),
                        );
                        o.extra
                            .insert("sandbox".into(), toml::Value::Table(sandbox));
                        Some(vibration.clone())
                    }
                    Load::Model => Some(model_dir.join("pipeline.toml")),
                };
                if let Some(f) = file {
                    let mut pipeline = toml::Table::new();
                    pipeline.insert("file".into(), toml::Value::String(f.display().to_string()));
                    o.extra
                        .insert("pipeline".into(), toml::Value::Table(pipeline));
                }
                let spawned = Instant::now();
                let agent = Agent::start(&dir.join(&device), o)?;
                let ready_ms = spawned.elapsed().as_secs_f64() * 1e3;
                journal.wait_registered(&device, Duration::from_secs(60))?;
                let registered_ms = spawned.elapsed().as_secs_f64() * 1e3;
                if load != Load::Idle {
                    // Running: its sink's first messages reached the coordinator.
                    journal.wait_for(
                        &format!("pipeline output from {device}"),
                        Duration::from_secs(60),
                        |events| events.iter().any(|e| e.is_for("data", &device)),
                    )?;
                }
                std::thread::sleep(SETTLE); // running time before sampling: the measurement, not a sync
                let pid = agent.pid().context("agent pid")?;
                let (rss, pss) = rss_of(pid)?;
                let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
                samples[b * Load::ALL.len() + l].push(Sample {
                    rss,
                    pss,
                    ort: maps.contains("libonnxruntime"),
                    ready_ms,
                    registered_ms,
                });
                drop(agent);
            }
        }

        let mut child = Command::new(bare_bin(root))
            .args(["idle", "127.0.0.1", &port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start bare_mqtt")?;
        std::thread::sleep(SETTLE);
        let (r, p) = rss_of(child.id())?;
        let _ = child.kill();
        let _ = child.wait();
        bare.push(r as f64);
        bare_pss.push(p as f64);
    }
    let (b, bp) = (median(bare), median(bare_pss));
    println!(
        "agent memory {}s after start (a pipeline: after its first output reached the coordinator), connected to the embedded broker, median of {ROUNDS} processes (KiB; x: ratio to bare)",
        SETTLE.as_secs()
    );
    println!("  bare tokio+rumqttc, idle                         : RSS {b:>7.0}  PSS {bp:>7.0}");
    for (bi, (name, bin)) in builds.iter().enumerate() {
        println!("  edge-agent, {name} ({})", bin.display());
        for (l, load) in Load::ALL.into_iter().enumerate() {
            let s = &samples[bi * Load::ALL.len() + l];
            let r = median(s.iter().map(|x| x.rss as f64).collect());
            let p = median(s.iter().map(|x| x.pss as f64).collect());
            let ort = s.iter().filter(|x| x.ort).count();
            println!(
                "    {:<44}: RSS {r:>7.0}  PSS {p:>7.0}  ({:.1}x, {:.1}x)  onnxruntime mapped in {ort}/{}",
                load.label(),
                r / b,
                p / bp,
                s.len()
            );
        }
    }
    println!(
        "agent start-up, median of {ROUNDS} (ms): spawn to its local API up / to registered at the coordinator"
    );
    for (bi, (name, _)) in builds.iter().enumerate() {
        for (l, load) in Load::ALL.into_iter().enumerate() {
            let s = &samples[bi * Load::ALL.len() + l];
            println!(
                "  {name:<11} {:<44}: {:>6.0} / {:>6.0}",
                load.label(),
                median(s.iter().map(|x| x.ready_ms).collect()),
                median(s.iter().map(|x| x.registered_ms).collect()),
            );
        }
    }
    for (name, bin) in &builds {
        let bytes = std::fs::metadata(bin)
            .with_context(|| format!("cannot stat {}", bin.display()))?
            .len();
        println!(
            "  binary size, {name}: {:.2} MiB ({})",
            crate::cross::mib(bytes),
            bin.display()
        );
    }
    // Both run whatever the other did: a broken cross toolchain does not hide the image's
    // figures (each failure is printed where it happens).
    let sizes = if opts.arm_sizes { arm_sizes() } else { Ok(()) };
    let image = opts.image.as_deref().map_or(Ok(()), image_rss);
    if let (Err(_), Err(e)) = (&sizes, &image) {
        eprintln!("bench rss --image failed too: {e:#}");
    }
    sizes.and(image)
}

/// The idle agent and a bare tokio+rumqttc client inside `board`'s image booted under
/// qemu-system-aarch64 (see `image_footprint`), medians of the probe's samples.
fn image_rss(board: &str) -> Result<()> {
    let target = crate::cross::Target::load(&crate::cross::Board::load(board)?.target)?;
    target.prepare()?;
    let mut cmd = crate::cargo();
    cmd.args(["build", "--release", "--target", &target.triple]);
    cmd.args(["-p", "edge-agent", "--example", "bare_mqtt"]);
    target.cargo_env(&mut cmd);
    crate::run(cmd).context("cross build of the bare_mqtt example failed")?;
    let bare = target
        .out_dir(&crate::cross::cargo_target_dir(), true)
        .join("examples/bare_mqtt");
    let opts = crate::image::Options {
        board: board.to_owned(),
        suite: crate::image::DEFAULT_SUITE.into(),
        mirror: crate::image::DEFAULT_MIRROR.into(),
        mqtt_url: None,
        smoke: true,
    };
    let root = crate::root();
    let probe = crate::image_footprint::Probe {
        bare,
        vibration: root.join("config/pipelines/vibration.toml"),
        modules: root.join("modules/target/wasm32-wasip2/release"),
        model_pipeline: MODEL_PIPELINE.to_owned(),
        model: small_model(),
    };
    let f = crate::image::build(&opts, &crate::dist::Enrollment::default(), Some(&probe))?
        .context("the image's smoke boot measured nothing")?;
    let med = |s: &[crate::image_footprint::Sample],
               k: fn(&crate::image_footprint::Sample) -> u64| {
        median(s.iter().map(|x| k(x) as f64).collect())
    };
    println!(
        "inside the {board} image under qemu-system-aarch64 (kernel {}, page size {}), connected to the host's embedded broker, {} s after start (a pipeline: after it started), median of {} samples per process (KiB)",
        f.kernel,
        f.page_size,
        crate::image_footprint::SETTLE_S,
        f.agent.len()
    );
    let bare_pss = med(f.bare.as_slice(), |x| x.pss);
    for line in &f.notes {
        println!("  agent, {line}");
    }
    let mut rows = vec![
        ("bare tokio+rumqttc".to_owned(), f.bare.as_slice()),
        (
            format!("edge-agent, {}", Load::Idle.label()),
            f.agent.as_slice(),
        ),
    ];
    for (label, _) in crate::image_footprint::LOADS {
        let load = image_load(label)
            .with_context(|| format!("the image probe's load {label} has no host bench load"))?;
        rows.push((
            format!("edge-agent, {}", load.label()),
            f.loads.get(label).map_or(&[][..], Vec::as_slice),
        ));
    }
    for (name, s) in rows {
        let pss = med(s, |x| x.pss);
        println!(
            "  {name:<56}: RSS {:>7.0}  PSS {pss:>7.0} (anon {:>6.0}, file {:>6.0})  ({:.1}x PSS of bare)",
            med(s, |x| x.rss),
            med(s, |x| x.pss_anon),
            med(s, |x| x.pss_file),
            pss / bare_pss
        );
    }
    Ok(())
}

/// The host bench's load that the image probe's `label` (`image_footprint::LOADS`) runs.
fn image_load(label: &str) -> Option<Load> {
    match label {
        "vibration" => Some(Load::Vibration),
        "vibration-warm" => Some(Load::VibrationCached),
        "model" => Some(Load::Model),
        _ => None,
    }
}

/// Targets whose release agent `bench rss --arm-sizes` cross-builds and sizes.
const ARM_SIZE_TARGETS: [&str; 2] = ["aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"];

/// Cross-builds the release agent for each of [`ARM_SIZE_TARGETS`] and prints its size as
/// built and stripped. Every target is tried and printed before a failure is returned, so one
/// broken toolchain does not hide the other's figure.
fn arm_sizes() -> Result<()> {
    let mut failed = Vec::new();
    for triple in ARM_SIZE_TARGETS {
        match arm_size(triple) {
            Ok((bin, built, stripped)) => println!(
                "  {triple} release agent: {:.2} MiB as built, {:.2} MiB stripped ({})",
                crate::cross::mib(built),
                crate::cross::mib(stripped),
                bin.display()
            ),
            Err(e) => {
                println!("  {triple} release agent: not built ({e:#})");
                failed.push(triple);
            }
        }
    }
    if !failed.is_empty() {
        bail!("cross build for {} failed", failed.join(", "));
    }
    Ok(())
}

/// The release agent for `triple`: path, size as built, size stripped.
fn arm_size(triple: &str) -> Result<(PathBuf, u64, u64)> {
    let build = crate::cross::Build {
        target: crate::cross::Target::load(triple)?,
        release: true,
        coordinator: false,
        target_cpu: None,
    };
    let bin = build
        .run()?
        .into_iter()
        .next()
        .context("the cross build named no agent binary")?;
    let (built, stripped) = crate::cross::sizes(&build.target, &bin)?;
    Ok((bin, built, stripped))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_image_probe_load_is_a_host_bench_load() {
        for (label, _) in crate::image_footprint::LOADS {
            assert!(super::image_load(label).is_some(), "{label}");
        }
    }

    #[test]
    fn arm_size_targets_have_cross_settings() {
        for triple in super::ARM_SIZE_TARGETS {
            let t =
                crate::cross::Target::load(triple).unwrap_or_else(|e| panic!("{triple}: {e:#}"));
            assert_eq!(t.triple, triple);
        }
    }
}
