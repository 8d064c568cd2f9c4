//! `cargo xtask qemu-test --target TRIPLE`: the ARM build tested on the desktop under qemu-user.
//!
//! 1. Provisions the cross toolchain, qemu-user and (aarch64) the onnxruntime wheel's library.
//! 2. Runs the tests of `edge-agent`, `edge-sandbox` and `edge-inference` built for the
//!    target, each test binary under qemu-user (cargo's `CARGO_TARGET_{T}_RUNNER`); the
//!    inference tests run real models on the aarch64 libonnxruntime.
//! 3. End to end: the host coordinator with its embedded broker on loopback, the ARM agent
//!    under qemu-user connecting to it, a signed WASM pipeline deployed over MQTT and its
//!    output in the coordinator's journal; when the agent has inference stages, a second
//!    pipeline with an ONNX model on the aarch64 library. Beside it a host agent, for the idle
//!    RSS of both.
//!
//! On a target without an onnxruntime wheel (armv7) the test targets that need the library
//! (`inference` in both crates) are left out (the model builders' own tests, in the dev-only
//! `edge-testmodels`, run on the host only), and
//! the end-to-end run checks that the agent reports inference unavailable with its reason
//! while the WASM pipeline (Pulley there) still delivers.
//!
//! `EDGE_ARM_AGENT_BIN` names a prebuilt ARM agent for the end-to-end run (e.g. the release
//! build `cargo xtask dist` made, for the idle RSS of what ships), as `EDGE_AGENT_BIN` and
//! `EDGE_COORDINATOR_BIN` do for the host binaries.
//!
//! ONNX Runtime crashes at start-up under qemu-user because the emulated process reads the
//! host's x86 `/proc/cpuinfo`. The runner script therefore runs qemu in a private mount
//! namespace with an aarch64-looking cpuinfo bind-mounted over `/proc/cpuinfo` (root: `unshare
//! -m`; otherwise a user namespace, `unshare -r -m`, where the test sees uid 0). Full-system
//! qemu does not need this.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use edge_tests::{AgentOptions, ChildProc, Coordinator, Event, PipelineDir, SigningKey, TestEnv};

use crate::cross::Target;

/// The Debian package with qemu-aarch64 and qemu-arm.
const QEMU_PACKAGE: &str = "qemu-user";
/// An agent under emulation starts (and compiles WASM) several times slower.
const WAIT: Duration = Duration::from_secs(300);
/// Telemetry samples after registration before the agents count as idle.
const IDLE_SAMPLES: usize = 3;
/// Integration test targets (in `agent/tests/` and `inference/tests/`) that load the
/// ONNX Runtime library; not run where no library exists for the target.
const ORT_TEST_TARGETS: &[&str] = &["inference"];
/// Overrides the ARM agent binary of the end-to-end run.
const ARM_AGENT_ENV: &str = "EDGE_ARM_AGENT_BIN";

/// What one `qemu-test` run measured.
#[derive(Debug, Default)]
pub struct Report {
    pub build: Duration,
    pub tests: Duration,
    pub e2e: Option<E2e>,
}

/// Figures of the end-to-end run.
#[derive(Debug, Default)]
pub struct E2e {
    pub elapsed: Duration,
    /// VmRSS of the qemu-user process running the idle ARM agent (emulator and its
    /// translation cache included), KiB.
    pub rss_emulated_kib: u64,
    /// What that agent reports as its own RSS in telemetry (qemu shows it the emulator's
    /// numbers), KiB.
    pub rss_reported_kib: Option<u64>,
    /// VmRSS of the idle host (x86_64) agent, same build profile, KiB.
    pub rss_host_kib: u64,
    pub wasm_frames: usize,
    /// `None` when the agent has no inference stage yet.
    pub inference_frames: Option<usize>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "qemu-test: build {:.0} s, tests under qemu-user {:.0} s",
            self.build.as_secs_f64(),
            self.tests.as_secs_f64()
        )?;
        if let Some(e) = &self.e2e {
            writeln!(
                f,
                "qemu-test: end to end {:.0} s: {} pipeline frames from the WASM stage, {}",
                e.elapsed.as_secs_f64(),
                e.wasm_frames,
                match e.inference_frames {
                    Some(n) => format!("{n} from the ONNX inference stage"),
                    None => "no inference stage in this agent yet".into(),
                }
            )?;
            writeln!(
                f,
                "qemu-test: idle RSS: emulated agent {:.1} MiB (qemu process; the agent reports {}), host agent {:.1} MiB",
                e.rss_emulated_kib as f64 / 1024.0,
                e.rss_reported_kib.map_or("nothing".into(), |k| format!(
                    "{:.1} MiB",
                    k as f64 / 1024.0
                )),
                e.rss_host_kib as f64 / 1024.0
            )?;
        }
        Ok(())
    }
}

/// Installs qemu-user and what the target needs, and writes the runner script. Returns the
/// script's path.
pub fn prepare(target: &Target) -> Result<PathBuf> {
    target.prepare()?;
    crate::provision::ensure_debian_packages(&[QEMU_PACKAGE])?;
    which(&target.qemu)
        .with_context(|| format!("{} not found after installing {QEMU_PACKAGE}", target.qemu))?;
    if target.onnxruntime {
        crate::ort::ensure_ort(&crate::root(), &target.triple, false)?;
    }
    write_runner(target)
}

/// Debian packages `qemu-test` needs for `target` (for the guarded step of `xtask test`).
pub fn packages(target: &Target) -> Vec<&str> {
    let mut p: Vec<&str> = target.packages.iter().map(String::as_str).collect();
    p.push(QEMU_PACKAGE);
    p
}

fn which(bin: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .with_context(|| format!("{bin} is not on PATH"))
}

/// `target/qemu/{triple}/run`: `run PROGRAM ARGS..` runs an ARM program under qemu-user (with
/// the cpuinfo workaround where ONNX Runtime may load). Rewritten on every run, so it always
/// matches the settings.
fn write_runner(target: &Target) -> Result<PathBuf> {
    let dir = crate::root().join("target/qemu").join(&target.triple);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let qemu = format!("{} -L {}", target.qemu, target.sysroot.display());
    let body = if target.onnxruntime {
        let cpuinfo = dir.join("cpuinfo");
        std::fs::write(&cpuinfo, fake_cpuinfo())
            .with_context(|| format!("cannot write {}", cpuinfo.display()))?;
        let userns = if nix::unistd::Uid::effective().is_root() {
            ""
        } else {
            "-r "
        };
        format!(
            "# ONNX Runtime's CPU detection crashes on the host's x86 /proc/cpuinfo: show it an\n\
             # aarch64 one, in a private mount namespace.\n\
             exec unshare {userns}-m sh -c 'mount --bind \"$0\" /proc/cpuinfo && exec \"$@\"' \\\n  \
             '{}' {qemu} \"$@\"\n",
            cpuinfo.display()
        )
    } else {
        format!("exec {qemu} \"$@\"\n")
    };
    let script = dir.join("run");
    // Tests that start one of the target's programs themselves (the agent binary, say) find
    // this script in EDGE_TARGET_RUNNER: a fresh machine has no binfmt_misc entry for it.
    let text = format!(
        "#!/bin/sh\n# Written by `cargo xtask qemu-test`: runs a {} program under qemu-user.\n\
         export EDGE_TARGET_RUNNER='{}'\n{body}",
        target.triple,
        script.display()
    );
    std::fs::write(&script, text).with_context(|| format!("cannot write {}", script.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", script.display()))?;
    Ok(script)
}

/// One Cortex-A76 entry per host core (qemu-user passes the host's core count through).
fn fake_cpuinfo() -> String {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (0..cores)
        .map(|i| {
            format!(
                "processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 \
                 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n\
                 CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
            )
        })
        .collect()
}

/// `cargo xtask qemu-test`.
pub fn run(triple: &str, e2e: bool, test_args: &[String]) -> Result<Report> {
    let target = Target::load(triple)?;
    let runner = prepare(&target)?;
    // The sandbox tests and the end-to-end pipeline load the guest modules.
    crate::build_modules()?;
    let mut report = Report::default();

    let started = Instant::now();
    let build = test_cmd(&target, &runner, test_args, true)?;
    crate::run(build).with_context(|| format!("building the tests for {triple} failed"))?;
    report.build = started.elapsed();

    let started = Instant::now();
    crate::run(test_cmd(&target, &runner, test_args, false)?)
        .with_context(|| format!("tests under {} failed", target.qemu))?;
    report.tests = started.elapsed();
    println!(
        "qemu-test: tests under {} took {:.0} s",
        target.qemu,
        report.tests.as_secs_f64()
    );

    if e2e {
        // Building the agent's integration tests built its binary too, with the features the
        // tests unify (a separate `cargo build --bins` would resolve them without the
        // dev-dependencies and rebuild much of the tree).
        let tests_built_agent = !test_args
            .iter()
            .any(|a| a == "-p" || a.starts_with("--package"));
        report.e2e = Some(end_to_end(&target, &runner, tests_built_agent)?);
    }
    print!("{report}");
    Ok(report)
}

/// `cargo test` of the agent, sandbox and inference crates for the target, run under qemu-user. With
/// no onnxruntime for the target (and no packages named by the caller), the test targets and
/// unit tests that load the library are left out. `no_run`: only build (`--no-run`, and
/// nothing after the caller's `--`, which is for the test binaries).
fn test_cmd(
    target: &Target,
    runner: &Path,
    args: &[String],
    no_run: bool,
) -> Result<std::process::Command> {
    let mut cmd = crate::cargo();
    cmd.args(["test", "--target", &target.triple]);
    let chosen = args.iter().any(|a| a == "-p" || a.starts_with("--package"));
    if !chosen {
        cmd.args([
            "-p",
            "edge-agent",
            "-p",
            "edge-sandbox",
            "-p",
            "edge-inference",
        ]);
    }
    let without_ort = !target.onnxruntime && !chosen;
    if without_ort {
        cmd.args(["--lib", "--bins"]);
        for t in test_targets_without_ort()? {
            cmd.args(["--test", &t]);
        }
    }
    // Our filters go after the caller's own `--` (or start one).
    let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
    cmd.args(&args[..split]);
    if no_run {
        cmd.arg("--no-run");
    } else if without_ort {
        cmd.arg("--");
        cmd.args(args.iter().skip(split + 1));
    } else {
        cmd.args(&args[split..]);
    }
    target.cargo_env(&mut cmd);
    cmd.env(format!("CARGO_TARGET_{}_RUNNER", target.env_key()), runner);
    Ok(cmd)
}

/// Integration test targets of edge-agent and edge-inference except those loading ONNX
/// Runtime, from the file names in their `tests/` (cargo's auto-discovery).
fn test_targets_without_ort() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for dir in ["agent/tests", "inference/tests"] {
        let dir = crate::root().join(dir);
        for e in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let path = e?.path();
            if let Some(name) = path
                .extension()
                .filter(|x| *x == "rs")
                .and(path.file_stem())
                .and_then(|n| n.to_str())
                && !ORT_TEST_TARGETS.contains(&name)
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// The end-to-end run; logs of every process are printed if it fails.
fn end_to_end(target: &Target, runner: &Path, tests_built_agent: bool) -> Result<E2e> {
    // The host coordinator and a host agent for the RSS comparison (xtask finds them next
    // to itself in target/debug/); the ARM agent in the profile the tests just built.
    // EDGE_AGENT_BIN and EDGE_COORDINATOR_BIN (the harness's overrides) skip that build.
    if std::env::var_os("EDGE_AGENT_BIN").is_none()
        || std::env::var_os("EDGE_COORDINATOR_BIN").is_none()
    {
        crate::build_bins()?;
    }
    let built = target
        .out_dir(&crate::cross::cargo_target_dir(), false)
        .join("edge-agent");
    let arm_agent = match std::env::var_os(ARM_AGENT_ENV) {
        Some(p) => {
            let p = PathBuf::from(p);
            ensure!(
                p.is_file(),
                "{ARM_AGENT_ENV}={} does not name a file",
                p.display()
            );
            p
        }
        None if tests_built_agent && built.is_file() => built,
        None => {
            let mut build = crate::cargo();
            build.args([
                "build",
                "--bins",
                "-p",
                "edge-agent",
                "--target",
                &target.triple,
            ]);
            target.cargo_env(&mut build);
            crate::run(build)
                .with_context(|| format!("building edge-agent for {} failed", target.triple))?;
            built
        }
    };
    println!("qemu-test: end to end with {}", arm_agent.display());

    let env = TestEnv::new("qemu-e2e")?;
    let started = Instant::now();
    match scenario(&env, target, runner, &arm_agent) {
        Ok(mut e) => {
            e.elapsed = started.elapsed();
            Ok(e)
        }
        Err(e) => {
            env.dump_logs();
            Err(e.context(format!("end-to-end run under {} failed", target.qemu)))
        }
    }
}

fn scenario(env: &TestEnv, target: &Target, runner: &Path, arm_agent: &Path) -> Result<E2e> {
    let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
    let mut journal = coord.journal();
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
    let inference = agent_has_inference()?;
    let arm_dev = "arm-qemu";
    let host_dev = "x86-host";

    // The ARM agent: the runner script runs `edge-agent run` under qemu-user.
    let dir = env.path(arm_dev);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut opts = agent_options(&coord, arm_dev, &key);
    if inference && target.onnxruntime {
        let lib =
            crate::ort::ort_dir(&crate::root(), &target.triple, false).join("libonnxruntime.so");
        let mut t = toml::Table::new();
        t.insert("library".into(), toml::Value::String(path_str(&lib)?));
        opts.extra.insert("inference".into(), toml::Value::Table(t));
    }
    let config = dir.join("agent.toml");
    opts.write_files(&dir, &config)?;
    let arm_log = dir.join(format!("agent-{arm_dev}.log"));
    let mut arm = ChildProc::new(
        format!("agent {arm_dev} (qemu)"),
        runner,
        [
            path_str(arm_agent)?,
            "run".into(),
            "--config".into(),
            path_str(&config)?,
        ],
        arm_log.clone(),
    );
    arm.spawn()?;
    let socket = dir.join("state/agent.sock");
    arm.wait_until("its local API was up", WAIT, || {
        Ok(std::os::unix::net::UnixStream::connect(&socket).is_ok())
    })?;
    let mut host =
        edge_tests::Agent::start(&env.path(host_dev), agent_options(&coord, host_dev, &key))?;
    journal.wait_registered(arm_dev, WAIT)?;
    journal.wait_registered(host_dev, WAIT)?;

    // Idle: registered, no pipeline, a few telemetry samples sent.
    journal.wait_for("idle telemetry from both agents", WAIT, |ev| {
        [arm_dev, host_dev]
            .iter()
            .all(|d| ev.iter().filter(|e| e.is_for("telemetry", d)).count() >= IDLE_SAMPLES)
    })?;
    let rss_emulated_kib = rss_kib(arm.pid().context("the qemu agent has no pid")?)?;
    let rss_host_kib = rss_kib(host.pid().context("the host agent has no pid")?)?;
    let rss_reported_kib = journal
        .events()
        .iter()
        .rev()
        .find(|e| e.is_for("telemetry", arm_dev))
        .and_then(|e| find_u64(&e.raw, "agent_rss_bytes"))
        .map(|b| b / 1024);
    host.stop()?;

    // A signed WASM pipeline over MQTT: synthetic sensor -> feature extractor -> outbox.
    let v1 = PipelineDir::create(
        &env.path("v1"),
        &wasm_pipeline(),
        &[edge_tests::FEATURES_MODULE],
    )?;
    deploy_healthy(&coord, arm_dev, &v1, &key, 1)?;
    let from = journal.len();
    journal.wait_for("features from the WASM stage under qemu", WAIT, |ev| {
        count_stream(ev, arm_dev, "features", from) >= 5
    })?;
    let wasm_frames = count_stream(journal.events(), arm_dev, "features", 0);

    // ONNX inference on the aarch64 library, when the agent has inference stages.
    let inference_frames = if inference && target.onnxruntime {
        let v2 = PipelineDir::create(&env.path("v2"), &inference_pipeline(), &[])?;
        let model_dir = env.path("v2/models");
        std::fs::create_dir_all(&model_dir)
            .with_context(|| format!("cannot create {}", model_dir.display()))?;
        let model = model_dir.join("score.onnx");
        std::fs::write(&model, score_model())
            .with_context(|| format!("cannot write {}", model.display()))?;
        deploy_healthy(&coord, arm_dev, &v2, &key, 2)?;
        let from = journal.len();
        journal.wait_for("scores from the ONNX stage under qemu", WAIT, |ev| {
            count_stream(ev, arm_dev, "scores", from) >= 5
        })?;
        Some(count_stream(journal.events(), arm_dev, "scores", 0))
    } else {
        if !target.onnxruntime {
            println!(
                "qemu-test: no onnxruntime for {}: inference not run",
                target.triple
            );
        } else {
            println!(
                "qemu-test: this agent has no [inference] config yet: the ONNX pipeline stage was not run \
                 (the edge-inference tests above ran models on the aarch64 library)"
            );
        }
        None
    };

    // SIGTERM reaches the agent through qemu; it must drain and exit cleanly.
    arm.stop_clean()?;
    if !target.onnxruntime {
        // No library for this target: the agent must have said so, with the reason, and
        // still have run the WASM pipeline above.
        let log = std::fs::read_to_string(&arm_log)
            .with_context(|| format!("cannot read {}", arm_log.display()))?;
        let line = log
            .lines()
            .find(|l| l.contains("onnx inference unavailable"))
            .with_context(|| {
                format!(
                    "the {} agent did not report inference unavailable (log {})",
                    target.triple,
                    arm_log.display()
                )
            })?;
        println!("qemu-test: {}: {}", target.triple, line.trim());
    }
    Ok(E2e {
        rss_emulated_kib,
        rss_reported_kib,
        rss_host_kib,
        wasm_frames,
        inference_frames,
        ..E2e::default()
    })
}

fn agent_options(coord: &Coordinator, device: &str, key: &SigningKey) -> AgentOptions {
    let mut o = AgentOptions::new(device, coord.url());
    o.telemetry_interval_s = 1;
    o.trust_deployments(key, &[], 2000);
    o
}

fn deploy_healthy(
    coord: &Coordinator,
    device: &str,
    pipeline: &PipelineDir,
    key: &SigningKey,
    version: u64,
) -> Result<()> {
    let args = [
        "--health-messages",
        "10",
        "--health-seconds",
        "0",
        "--timeout-s",
        "300",
    ];
    let run = edge_tests::deploy(coord, &["--device", device], pipeline, key, version, &args)?;
    ensure!(
        run.success && run.outcome(device) == Some("healthy"),
        "deployment v{version} to {device} did not end healthy:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    Ok(())
}

fn wasm_pipeline() -> String {
    edge_tests::features_pipeline("qemu-vibration", "imu")
}

/// Synthetic sensor windows straight into an ONNX model (64 samples -> 2 scores).
fn inference_pipeline() -> String {
    r#"name = "qemu-inference"
[[source]]
name = "imu"
kind = "synthetic"
stream = "imu"
rate_hz = 20
window = 64
[[stage]]
name = "score"
kind = "inference"
model = "models/score.onnx"
input = "imu"
[[sink]]
kind = "outbox"
input = "score"
stream = "scores"
"#
    .to_owned()
}

/// A linear layer 64 -> 2 with a dynamic batch dimension: the mean and the mean of the
/// first half of the window.
fn score_model() -> Vec<u8> {
    let mut w = vec![0.0f32; 64 * 2];
    for i in 0..64 {
        w[i * 2] = 1.0 / 64.0;
        if i < 32 {
            w[i * 2 + 1] = 1.0 / 32.0;
        }
    }
    edge_testmodels::onnx_builder::linear(64, 2, &w, &[0.0, 0.0])
}

/// Whether the agent's config has an `[inference]` table (the inference stage is wired).
fn agent_has_inference() -> Result<bool> {
    let text = std::fs::read_to_string(crate::root().join("config/agent.toml"))
        .context("cannot read config/agent.toml")?;
    Ok(text.lines().any(|l| l.trim() == "[inference]"))
}

fn count_stream(events: &[Event], device: &str, stream: &str, from: usize) -> usize {
    events[from.min(events.len())..]
        .iter()
        .filter(|e| e.is_for("data", device) && e.str_field("stream") == Some(stream))
        .count()
}

/// The first number under `key` anywhere in a JSON value.
fn find_u64(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .and_then(serde_json::Value::as_u64)
            .or_else(|| m.values().find_map(|v| find_u64(v, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|v| find_u64(v, key)),
        _ => None,
    }
}

/// VmRSS of a process, KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{path} has no VmRSS line"))
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// The guarded step of `cargo xtask test`: qemu-test for aarch64, skipped (with the reason)
/// only when packages are missing and we are not root to install them.
pub fn ci_step() -> Result<()> {
    let target = Target::load("aarch64-unknown-linux-gnu")?;
    let missing = crate::provision::missing_debian_packages(&packages(&target))?;
    if !missing.is_empty() && !nix::unistd::Uid::effective().is_root() {
        println!(
            "xtask test: skipping the aarch64 qemu-user step: missing Debian packages {} \
             (install them, or run as root, to include it)",
            missing.join(", ")
        );
        return Ok(());
    }
    let started = Instant::now();
    run(&target.triple, true, &[])?;
    println!(
        "xtask test: aarch64 qemu-user step took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_cpuinfo_has_the_fields_onnx_runtime_reads_per_core() {
        let text = fake_cpuinfo();
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(text.matches("processor\t:").count(), cores);
        assert_eq!(text.matches("CPU implementer\t: 0x41").count(), cores);
        assert_eq!(text.matches("CPU part\t: 0xd0b").count(), cores);
    }

    #[test]
    fn rss_of_this_process_is_positive() {
        assert!(rss_kib(std::process::id()).expect("reads") > 0);
    }

    #[test]
    fn finds_nested_numbers() {
        let v = serde_json::json!({"body": {"agent": {"agent_rss_bytes": 42}}});
        assert_eq!(find_u64(&v, "agent_rss_bytes"), Some(42));
        assert_eq!(find_u64(&v, "nope"), None);
    }
}
