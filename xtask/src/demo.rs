//! `cargo xtask demo`: the README's one-command tour, built from the test harness.
//!
//! Provisioned like `cargo xtask test` (`provision::prepare`), then six steps, each named when
//! it starts and when it fails (with the path of the logs, which a failed run keeps):
//! 1. a coordinator with its embedded broker and two agents (`edge-a`, `edge-b`) as separate
//!    processes in a temp dir; each publishes a result with `edge-agent publish`;
//! 2. a signed WASM pipeline deployed to both over MQTT (a simulated vibration sensor -> FFT
//!    features -> anomaly alerts), then a broken version that both roll back;
//! 3. a broker outage during which the agents keep queueing (telemetry, alerts, results), and
//!    the count of everything queued that arrived once it is back;
//! 4. a federated-learning task on the digits data: four agents train on their non-IID shards,
//!    the coordinator aggregates and evaluates each round on a held-out set;
//! 5. a third agent behind a link proxy whose offload decisions follow the link;
//! 6. a summary that reads in ten seconds.
//!
//! A timeline from the coordinator's journal is printed as it goes. The binaries are the debug
//! build `cargo xtask test` also uses, and the memory figures say so. Ctrl-C (or SIGTERM) stops
//! every process the demo started and removes its files; processes are also killed on every
//! other exit path (the harness kills children on drop).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edge_testmodels::onnx_builder;
use edge_tests::digits::Split;
use edge_tests::{
    Agent, AgentOptions, Coordinator, Event, FlTask, Journal, Link, LinkProxy, OFFLOAD_PIPELINE,
    PipelineDir, SigningKey, TestEnv, deploy, federated_agent, federated_data,
    offload_coordinator_config, offload_count, offloading_agent, task_finished,
};

const DEVICES: [&str; 2] = ["edge-a", "edge-b"];
/// The third agent, behind a link proxy, whose inference stage may offload.
const OFFLOADER: &str = "edge-c";
const TELEMETRY_S: u64 = 2;
const ONLINE_STREAM: Duration = Duration::from_secs(5);
const OUTAGE_TICKS: u32 = 6;
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Set by the interrupt handler: a step that fails after it was set failed because of it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The binaries' profile, for the figures that depend on it.
static BUILD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// The federated act: agents, rounds, the task's name and update codec.
const FL_AGENTS: usize = 4;
const FL_ROUNDS: u32 = 20;
const FL_TASK: &str = "digits-demo";
const FL_CODEC: &str = "int8";
/// The steps, in order (their numbers are printed as they start and when one fails).
const STEPS: [&str; 5] = [
    "coordinator and two agents, results published online",
    "signed pipeline deployed, broken version rolled back",
    "broker outage: queue offline, deliver afterwards",
    "federated learning on the digits data",
    "offload decisions over a changing link",
];

pub fn run() -> Result<()> {
    let mut env = TestEnv::new("demo")?;
    stop_everything_on_signal(env.dir().to_owned())?;
    let mut summary = Summary::default();
    let started = Instant::now();
    let result = tour(&env, &mut summary);
    if result.is_err() && INTERRUPTED.load(Ordering::SeqCst) {
        // A Ctrl-C in a terminal reaches the agents too, so a step fails as they stop: that is
        // the interruption, not a failure to report. The handler stops the rest and exits.
        loop {
            std::thread::park();
        }
    }
    if let Err(e) = &result {
        env.dump_logs();
        let dir = env.keep();
        eprintln!();
        eprintln!("demo failed: {e:#}");
        eprintln!("logs (kept): {}", dir.display());
        for log in env.log_files() {
            eprintln!("  {}", log.display());
        }
        return result;
    }
    summary.print(started.elapsed());
    Ok(())
}

/// Ctrl-C, SIGTERM or SIGHUP: stop every process the demo started (they may be mid-step, with
/// no owner left to drop them), remove the demo's files, exit 130.
///
/// A handler (on ctrlc's own thread), not a blocked signal mask: children inherit a mask, and
/// a coordinator with SIGTERM blocked never stops.
fn stop_everything_on_signal(dir: std::path::PathBuf) -> Result<()> {
    ctrlc::set_handler(move || {
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("\ndemo: interrupted: stopping every process it started");
        let n = edge_tests::stop_all_children(Duration::from_secs(10));
        let removed = std::fs::remove_dir_all(&dir).is_ok();
        eprintln!(
            "demo: stopped {n} processes{}",
            if removed {
                format!(", removed {}", dir.display())
            } else {
                String::new()
            }
        );
        std::process::exit(130);
    })
    .context("cannot install the interrupt handler")
}

/// Runs step `n` (1-based) of [`STEPS`], announcing it; an error names the step.
fn step<T>(n: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let name = STEPS[n - 1];
    println!();
    println!("==== step {n}/{}: {name}", STEPS.len());
    f().with_context(|| format!("step {n}/{} ({name}) failed", STEPS.len()))
}

/// `debug` or `release`: the profile of the binaries the demo runs (the folder they are in).
fn build_profile() -> String {
    edge_tests::agent_bin()
        .ok()
        .and_then(|p| Some(p.parent()?.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unknown".into())
}

/// What the tour saw, for the closing summary.
#[derive(Default)]
struct Summary {
    /// `target/debug` or `target/release`: where the binaries came from.
    build: String,
    processes: Vec<String>,
    deployed: String,
    rollback: Vec<String>,
    /// How long the broker was down, and what each agent queued and delivered meanwhile.
    outage_s: f64,
    outage: Vec<String>,
    lost: u64,
    federated: String,
    offload: String,
}

impl Summary {
    fn print(&self, took: Duration) {
        println!();
        println!(
            "==== summary: every step passed in {:.0} s ({} binaries) ====",
            took.as_secs_f64(),
            self.build
        );
        println!("ran         {}", self.processes.join(", "));
        println!("deployed    {}", self.deployed);
        for r in &self.rollback {
            println!("rolled back {r}");
        }
        println!(
            "outage      {:.0} s without a broker: {}",
            self.outage_s,
            self.outage.join("; ")
        );
        println!(
            "lost        {} accepted messages{}",
            self.lost,
            if self.lost == 0 {
                " (every one queued during the outage arrived)"
            } else {
                ""
            }
        );
        println!("federated   {}", self.federated);
        println!("offload     {}", self.offload);
    }
}

/// Prints journal events with times relative to the start of the demo.
struct Timeline {
    t0_ms: u64,
    started: Instant,
    journal: Journal,
    shown: usize,
}

impl Timeline {
    fn note(&self, msg: &str) {
        let t = self.started.elapsed().as_secs_f64();
        println!("{t:6.1}s  == {msg}");
    }

    /// Prints what the journal gained since the last call.
    fn pump(&mut self) -> Result<()> {
        self.journal.refresh()?;
        for e in &self.journal.events()[self.shown..] {
            if let Some(line) = describe(e) {
                let t = e.ts_ms.saturating_sub(self.t0_ms) as f64 / 1000.0;
                println!("{t:6.1}s  {line}");
            }
        }
        self.shown = self.journal.len();
        Ok(())
    }

    /// Keeps printing for `d` (the demo's pacing; nothing waits on it for correctness).
    fn show_for(&mut self, d: Duration) -> Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.pump()?;
            std::thread::sleep(Duration::from_millis(100));
        }
        self.pump()
    }

    /// Keeps printing until `pred` holds over the journal, or errs after `timeout`.
    fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Journal) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.pump()?;
            if pred(&self.journal) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn describe(e: &Event) -> Option<String> {
    let dev = e.device.as_deref().unwrap_or("-");
    let line = match e.event.as_str() {
        "ready" => format!(
            "coordinator ready, broker {}{}",
            e.str_field("broker").unwrap_or("?"),
            if e.raw.get("embedded").and_then(|v| v.as_bool()) == Some(true) {
                " (embedded)"
            } else {
                ""
            }
        ),
        "registered" => format!(
            "{dev:<7} registered: agent {}, boot {}",
            e.str_field("agent_version").unwrap_or("?"),
            e.str_field("boot_id").map(short).unwrap_or("?")
        ),
        "online" => format!("{dev:<7} online"),
        "offline" => format!("{dev:<7} offline"),
        "telemetry" if e.raw.get("offload").is_some() => {
            let o = &e.raw["offload"];
            let sum = |side: &str| -> u64 {
                o.get("decisions")
                    .and_then(|d| d.as_object())
                    .map(|d| {
                        d.iter()
                            .filter(|(k, _)| k.starts_with(side))
                            .filter_map(|(_, v)| v.as_u64())
                            .sum()
                    })
                    .unwrap_or(0)
            };
            format!(
                "{dev:<7} telemetry #{:<4} offload decisions so far: {} offloaded, {} local; link rtt {:.1} ms",
                e.seq.unwrap_or(0),
                sum("offload/"),
                sum("local/"),
                o.get("rtt_ms").and_then(|v| v.as_f64()).unwrap_or(0.0)
            )
        }
        // The agent's memory is that of the build the demo runs, named so it is not taken
        // for the release agent's footprint (`cargo xtask bench rss` measures that).
        "telemetry" => format!(
            "{dev:<7} telemetry #{:<4} cpu {:5.1}%  mem used {}  agent rss {} ({} build)  outbox {}",
            e.seq.unwrap_or(0),
            e.f64_field("cpu_percent").unwrap_or(0.0),
            mib(e.f64_field("mem_used_bytes")),
            mib(e.f64_field("agent_rss_bytes")),
            BUILD.get().map_or("unknown", String::as_str),
            e.raw
                .get("outbox_depth")
                .map(|d| d.to_string())
                .unwrap_or_default()
        ),
        "data" => {
            let age_ms = e.ts_ms.saturating_sub(
                e.raw
                    .get("created_ms")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(e.ts_ms),
            );
            let queued = if age_ms >= 1000 {
                format!(" (queued {:.1}s)", age_ms as f64 / 1000.0)
            } else {
                String::new()
            };
            format!(
                "{dev:<7} data #{:<4} {} on {}: {}{queued}",
                e.seq.unwrap_or(0),
                e.class.as_deref().unwrap_or("?"),
                e.str_field("stream").unwrap_or("?"),
                e.raw
                    .get("payload")
                    .map(|p| p.to_string().chars().take(110).collect::<String>())
                    .unwrap_or_default()
            )
        }
        "duplicate" => format!(
            "{dev:<7} duplicate dropped ({})",
            e.id.as_deref().map(short).unwrap_or("?")
        ),
        "deployment_started" => format!(
            "deployment {} v{} started for {} ({} devices known)",
            e.str_field("deployment_id").unwrap_or("?"),
            e.raw.get("version").and_then(|v| v.as_u64()).unwrap_or(0),
            e.str_field("target").unwrap_or("?"),
            e.raw
                .get("devices")
                .and_then(|v| v.as_array())
                .map_or(0, Vec::len)
        ),
        "deploy" => {
            let step = e.str_field("step").unwrap_or("?");
            let detail = match (
                e.raw.get("received"),
                e.raw.get("total"),
                e.str_field("reason"),
            ) {
                (_, _, Some(reason)) => format!(": {reason}"),
                (Some(r), Some(t), None) => format!(" {r}/{t} bytes"),
                _ => String::new(),
            };
            format!(
                "{dev:<7} deployment v{} {step}{detail}",
                e.raw.get("version").and_then(|v| v.as_u64()).unwrap_or(0)
            )
        }
        "deployment_finished" => format!(
            "deployment {} v{} finished: {} healthy, {} failed ({})",
            e.str_field("deployment_id").unwrap_or("?"),
            e.raw.get("version").and_then(|v| v.as_u64()).unwrap_or(0),
            e.raw.get("healthy").and_then(|v| v.as_u64()).unwrap_or(0),
            e.raw.get("failed").and_then(|v| v.as_u64()).unwrap_or(0),
            e.str_field("reason").unwrap_or("?")
        ),
        "fl_task_started" => format!(
            "federated task {} started: {} rounds over {}, {} weights",
            e.str_field("task").unwrap_or("?"),
            e.raw.get("rounds").and_then(|v| v.as_u64()).unwrap_or(0),
            e.str_field("members").unwrap_or("?"),
            e.raw.get("weights").and_then(|v| v.as_u64()).unwrap_or(0)
        ),
        "fl_round_closed" => format!(
            "federated round {:>2} closed ({}): {} updates, {} uploaded, held-out accuracy {}",
            e.raw.get("round").and_then(|v| v.as_u64()).unwrap_or(0),
            e.str_field("close_reason").unwrap_or("?"),
            e.raw.get("received").and_then(|v| v.as_u64()).unwrap_or(0),
            kib(e.f64_field("bytes_in").unwrap_or(0.0)),
            e.f64_field("eval_accuracy")
                .map(|a| format!("{:.1}%", a * 100.0))
                .unwrap_or_else(|| e.str_field("eval_note").unwrap_or("n/a").to_owned())
        ),
        "fl_task_finished" => format!(
            "federated task {} finished: {} after {} rounds",
            e.str_field("task").unwrap_or("?"),
            e.str_field("reason").unwrap_or("?"),
            e.raw
                .get("rounds_closed")
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        ),
        "device_enrolled" => format!(
            "enrolled: key {} by {}{}",
            e.str_field("key_id").unwrap_or("?"),
            e.str_field("by").unwrap_or("?"),
            e.raw
                .get("groups")
                .and_then(|g| g.as_array())
                .filter(|g| !g.is_empty())
                .map(|g| format!(
                    ", groups {}",
                    g.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ))
                .unwrap_or_default()
        ),
        "auth_rejected" => format!(
            "refused {} unauthenticated messages",
            e.raw.get("total").and_then(|v| v.as_u64()).unwrap_or(0)
        ),
        "rejected" => format!(
            "rejected message on {}: {}",
            e.str_field("topic").unwrap_or("?"),
            e.str_field("reason").unwrap_or("?")
        ),
        _ => return None,
    };
    Some(line)
}

/// Offload: a third agent behind a link proxy runs an inference stage that may send frames
/// to the coordinator. It decides by cost (energy, with a 150 ms deadline), so its decisions
/// follow the link: offload while fast, local while slow (deadline) or cut (offline), offload
/// again once link probes see it recover.
fn offload_act(
    env: &TestEnv,
    coord: &Coordinator,
    tl: &mut Timeline,
    summary: &mut Summary,
) -> Result<()> {
    const KEYS: [&str; 5] = [
        "decisions.offload/cost",
        "decisions.local/deadline",
        "decisions.local/offline",
        "decisions.local/cost",
        "decisions.local/refresh",
    ];
    let counts =
        |j: &Journal| -> [u64; 5] { KEYS.map(|k| offload_count(j.events(), OFFLOADER, k)) };
    let pipeline = env.path("offload").join("pipeline.toml");
    std::fs::write(&pipeline, OFFLOAD_PIPELINE)?;
    let proxy = LinkProxy::to_port(coord.port().context("coordinator port")?)?;
    let mut o = AgentOptions::new(OFFLOADER, proxy.url());
    o.telemetry_interval_s = TELEMETRY_S;
    o.reconnect_max_ms = 500;
    offloading_agent(&mut o, &pipeline)?;
    tl.note(&format!(
        "offload: starting {OFFLOADER} behind a link proxy; its inference stage (20 frames/s) may run on the \
         coordinator, decided per frame by energy cost with a 150 ms deadline"
    ));
    let mut agent = Agent::start(&env.path(OFFLOADER), o)?;
    let first = counts(&tl.journal);
    let mut phases = Vec::new();
    let mut phase = |tl: &mut Timeline, name: &str, key: usize, act: &dyn Fn()| -> Result<()> {
        let before = counts(&tl.journal);
        tl.note(name);
        act();
        tl.until(name, CATCH_UP_TIMEOUT, |j| {
            counts(j)[key] >= before[key] + 20
        })?;
        let after = counts(&tl.journal);
        let d: Vec<u64> = (0..KEYS.len()).map(|i| after[i] - before[i]).collect();
        phases.push(format!(
            "  {name:<34} offloaded {:>4}   local: deadline {:>4}, offline {:>4}, cost {:>4}, \
             refresh {:>3}",
            d[0], d[1], d[2], d[3], d[4]
        ));
        Ok(())
    };
    phase(tl, "fast link (loopback)", 0, &|| {})?;
    phase(tl, "slow link: 250 ms each way", 1, &|| {
        proxy.set(Link {
            delay: Duration::from_millis(250),
            ..Link::default()
        })
    })?;
    phase(tl, "link cut for 4 s, then back", 2, &|| {
        proxy.cut();
        std::thread::sleep(Duration::from_secs(4));
        proxy.set(Link::default());
        proxy.restore();
    })?;
    phase(tl, "fast link again (probes notice)", 0, &|| {})?;
    agent.stop()?;
    println!();
    println!(
        "offload decisions of {OFFLOADER} per phase (counted by the agent, from its telemetry):"
    );
    for line in phases {
        println!("{line}");
    }
    let last = counts(&tl.journal);
    let d: Vec<u64> = (0..KEYS.len()).map(|i| last[i] - first[i]).collect();
    summary
        .processes
        .push(format!("{OFFLOADER} behind a link proxy"));
    summary.offload = format!(
        "{OFFLOADER}: {} frames offloaded, {} run locally (deadline {}, offline {}, cost {}, \
         refresh {}) over a fast, slow, cut and fast-again link",
        d[0],
        d[1..].iter().sum::<u64>(),
        d[1],
        d[2],
        d[3],
        d[4]
    );
    Ok(())
}

fn short(s: &str) -> &str {
    &s[..s.len().min(8)]
}

fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

fn mib(bytes: Option<f64>) -> String {
    format!("{:7.1} MiB", bytes.unwrap_or(0.0) / (1024.0 * 1024.0))
}

/// The seq inside a message id (`protocol::v1::message_id`: 16 hex digits of incarnation,
/// then 16 of seq).
fn seq_of(id: &str) -> Option<u64> {
    if id.len() != 32 {
        return None;
    }
    u64::from_str_radix(&id[16..], 16).ok()
}

/// Highest seq `device` had delivered (data or telemetry) so far.
fn max_seq(journal: &Journal, device: &str) -> u64 {
    journal
        .events()
        .iter()
        .filter(|e| e.is_for("data", device) || e.is_for("telemetry", device))
        .filter_map(|e| e.seq)
        .max()
        .unwrap_or(0)
}

/// `edge-agent publish`, as a local application would use it; returns the printed id.
fn cli_publish(agent: &Agent, class: &str, payload: &serde_json::Value) -> Result<String> {
    let out = Command::new(edge_tests::agent_bin()?)
        .arg("publish")
        .arg("--socket")
        .arg(agent.socket_path())
        .args(["--stream", "demo/results", "--class", class])
        .arg(payload.to_string())
        .output()
        .context("cannot run edge-agent publish")?;
    if !out.status.success() {
        bail!(
            "edge-agent publish failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if id.is_empty() {
        bail!("edge-agent publish printed no id");
    }
    Ok(id)
}

/// The vibration pipeline; `flaky` puts a stage that traps on every 7th frame between the
/// feature extractor and the detector (v2).
fn pipeline_toml(flaky: bool) -> String {
    let (detect_input, flaky_stage) = if flaky {
        (
            "flaky",
            "[[stage]]\nname = \"flaky\"\nmodule = \"modules/trap.wasm\"\ninput = \"features\"\nconfig = { every = 7 }\n",
        )
    } else {
        ("features", "")
    };
    format!(
        r#"
name = "vibration"
[[source]]
name = "imu"
kind = "synthetic"
stream = "vibration/motor-1"
rate_hz = 20
window = 256
sample_rate_hz = 1000.0
anomaly_every = 50
anomaly_gain = 6.0
[[stage]]
name = "features"
module = "modules/features.wasm"
input = "imu"
config = {{ sample_rate_hz = 1000.0, bands = 8, remove_dc = true }}
{flaky_stage}
[[stage]]
name = "detect"
module = "modules/detector.wasm"
input = "{detect_input}"
config = {{ stream = "alerts", features = ["rms"], z_threshold = 4.0, warmup = 20, cooldown_ms = 1000 }}
[[sink]]
kind = "outbox"
input = "detect"
"#
    )
}

/// Deploys v1 to the group (alerts start flowing), then a broken v2 that is rolled back.
fn deploy_pipelines(
    env: &TestEnv,
    coord: &Coordinator,
    key: &SigningKey,
    tl: &mut Timeline,
    summary: &mut Summary,
) -> Result<()> {
    let features = ("feature_extractor", "modules/features.wasm");
    let detector = ("anomaly_detector", "modules/detector.wasm");
    let v1 = PipelineDir::create(
        &env.path("pipeline-v1"),
        &pipeline_toml(false),
        &[features, detector],
    )?;
    tl.note("deploying pipeline v1 to group `demo`: `edge-coordinator deploy --group demo pipeline.toml --key deploy.key --version 1`");
    tl.note("  (synthetic vibration sensor -> feature_extractor.wasm -> anomaly_detector.wasm -> outbox; health check: 40 frames)");
    let args = [
        "--health-messages",
        "40",
        "--health-seconds",
        "0",
        "--timeout-s",
        "120",
    ];
    let run = deploy(coord, &["--group", "demo"], &v1, key, 1, &args)?;
    tl.pump()?;
    for line in run.stdout.lines() {
        tl.note(&format!("deploy v1: {line}"));
    }
    if !run.success {
        bail!("deploying v1 failed:\n{}\n{}", run.stdout, run.stderr);
    }
    summary.deployed = format!(
        "pipeline v1 (feature_extractor.wasm -> anomaly_detector.wasm), signed, healthy on {}",
        DEVICES.join(" and ")
    );
    tl.until(
        "an alert from each agent's pipeline",
        CATCH_UP_TIMEOUT,
        |j| {
            DEVICES.iter().all(|d| {
                j.data_events(d)
                    .iter()
                    .any(|e| e.str_field("stream") == Some("alerts"))
            })
        },
    )?;

    let v2 = PipelineDir::create(
        &env.path("pipeline-v2"),
        &pipeline_toml(true),
        &[features, ("hostile_trap", "modules/trap.wasm"), detector],
    )?;
    tl.note("deploying v2, which adds a stage that traps on every 7th frame: the health check fails and both agents roll back to v1, which never stopped");
    let run = deploy(coord, &["--group", "demo"], &v2, key, 2, &args)?;
    tl.pump()?;
    for line in run.stdout.lines() {
        tl.note(&format!(
            "deploy v2: {}",
            line.chars().take(160).collect::<String>()
        ));
    }
    if run.success
        || DEVICES
            .iter()
            .any(|d| !run.outcome(d).is_some_and(|o| o.starts_with("rolled back")))
    {
        bail!(
            "v2 should have been rolled back on every device:\n{}\n{}",
            run.stdout,
            run.stderr
        );
    }
    for d in DEVICES {
        let outcome = run.outcome(d).unwrap_or("?");
        summary.rollback.push(format!(
            "v2 on {d}: {}",
            outcome
                .strip_prefix("rolled back: ")
                .unwrap_or(outcome)
                .chars()
                .take(140)
                .collect::<String>()
        ));
    }
    tl.show_for(Duration::from_secs(3))?;
    Ok(())
}

fn tour(env: &TestEnv, summary: &mut Summary) -> Result<()> {
    let started = Instant::now();
    let t0_ms = protocol::v1::now_ms();
    summary.build = build_profile();
    let _ = BUILD.set(summary.build.clone());
    println!(
        "edge runtime demo: files and logs in {}",
        env.dir().display()
    );
    println!(
        "binaries: target/{} (memory figures below are this build's, not the release agent's \
         footprint: `cargo xtask bench rss` measures that)",
        summary.build
    );
    // The coordinator also serves an MLP for offloaded inference (step 5), with the ONNX Runtime
    // library that provisioning fetched.
    let offload_files = env.path("offload");
    let model_path = offload_files.join("models/mlp.onnx");
    std::fs::create_dir_all(offload_files.join("models"))?;
    std::fs::write(
        &model_path,
        onnx_builder::mlp(&onnx_builder::mlp_layers(&[64, 32, 10], 1)),
    )?;
    let coordinator_config = offload_files.join("coordinator.toml");
    std::fs::write(&coordinator_config, offload_coordinator_config(&model_path))?;
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;

    let (mut coord, mut tl, mut agents) = step(1, || {
        let coord = Coordinator::start_embedded_with_args(
            &env.path("coordinator"),
            vec!["--config".into(), coordinator_config.display().to_string()],
        )?;
        let mut tl = Timeline {
            t0_ms,
            started,
            journal: coord.journal(),
            shown: 0,
        };
        tl.pump()?;
        tl.note(&format!(
            "starting agents {} (telemetry every {TELEMETRY_S} s, group `demo`, trusting deploy key {})",
            DEVICES.join(", "),
            short(&key.public_hex)
        ));
        let mut agents = Vec::new();
        for d in DEVICES {
            let mut o = AgentOptions::new(d, coord.url());
            o.telemetry_interval_s = TELEMETRY_S;
            o.trust_deployments(&key, &["demo"], 2000);
            agents.push(Agent::start(&env.path(d), o)?);
        }
        tl.until("both agents to register", CATCH_UP_TIMEOUT, |j| {
            DEVICES.iter().all(|d| j.count("registered", d) > 0)
        })?;
        tl.show_for(ONLINE_STREAM)?;
        tl.note("each agent publishes one result through `edge-agent publish` while online");
        let mut online_ids = Vec::new();
        for (i, a) in agents.iter().enumerate() {
            online_ids.push((
                DEVICES[i],
                cli_publish(
                    a,
                    "results",
                    &serde_json::json!({"reading": 0, "online": true}),
                )?,
            ));
        }
        tl.until("the online results", CATCH_UP_TIMEOUT, |j| {
            online_ids.iter().all(|(d, id)| {
                j.data_events(d)
                    .iter()
                    .any(|e| e.id.as_deref() == Some(id.as_str()))
            })
        })?;
        Ok((coord, tl, agents))
    })?;
    summary.processes.push(format!(
        "coordinator with embedded broker, agents {}",
        DEVICES.join(" and ")
    ));

    step(2, || deploy_pipelines(env, &coord, &key, &mut tl, summary))?;
    step(3, || outage(&mut coord, &agents, &mut tl, summary))?;
    for a in &mut agents {
        a.stop()?;
    }
    step(4, || federated_act(env, &coord, &key, &mut tl, summary))?;
    step(5, || offload_act(env, &coord, &mut tl, summary))?;
    coord.stop()?;
    Ok(())
}

/// Stops the coordinator (and its broker) while the agents keep queueing, starts it again and
/// waits until everything queued meanwhile has arrived.
fn outage(
    coord: &mut Coordinator,
    agents: &[Agent],
    tl: &mut Timeline,
    summary: &mut Summary,
) -> Result<()> {
    tl.note("stopping the coordinator (SIGTERM): the broker goes down with it");
    coord.stop()?;
    tl.pump()?;
    let before: BTreeMap<&str, u64> = DEVICES
        .iter()
        .map(|d| (*d, max_seq(&tl.journal, d)))
        .collect();
    let outage_started = Instant::now();

    tl.note("agents keep running offline: telemetry, alerts and results queue in their outboxes");
    let mut queued_results: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for tick in 1..=OUTAGE_TICKS {
        std::thread::sleep(Duration::from_secs(1));
        for (i, a) in agents.iter().enumerate() {
            let id = cli_publish(
                a,
                "results",
                &serde_json::json!({"reading": tick, "online": false}),
            )?;
            let seq = seq_of(&id).map(|s| format!(" seq {s}")).unwrap_or_default();
            tl.note(&format!(
                "{} queued result #{tick} via `edge-agent publish`: id {id}{seq}",
                DEVICES[i]
            ));
            queued_results.entry(DEVICES[i]).or_default().push(id);
        }
    }
    // Everything up to each agent's last offline publish was queued during the outage.
    let mut window: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for d in DEVICES {
        let last = queued_results
            .get(d)
            .and_then(|ids| ids.last())
            .and_then(|id| seq_of(id));
        let last = last.context("cannot read the seq from the agent's message id")?;
        window.insert(d, (before[d], last));
    }

    tl.note("restarting the coordinator on the same port");
    coord.start()?;
    let outage_s = outage_started.elapsed().as_secs_f64();
    summary.outage_s = outage_s;
    let arrived = |j: &Journal, d: &str| -> BTreeSet<u64> {
        let (lo, hi) = window[d];
        j.events()
            .iter()
            .filter(|e| e.is_for("data", d) || e.is_for("telemetry", d))
            .filter_map(|e| e.seq)
            .filter(|s| *s > lo && *s <= hi)
            .collect()
    };
    let all_results_in = |j: &Journal| {
        queued_results.iter().all(|(d, ids)| {
            let got: BTreeSet<&str> = j
                .data_events(d)
                .iter()
                .filter_map(|e| e.id.as_deref())
                .collect();
            ids.iter().all(|id| got.contains(id.as_str()))
        })
    };
    let waited = tl.until(
        "everything queued during the outage to arrive",
        CATCH_UP_TIMEOUT,
        |j| {
            all_results_in(j)
                && DEVICES
                    .iter()
                    .all(|d| arrived(j, d).len() as u64 == window[d].1 - window[d].0)
        },
    );
    // A little more of the live stream, so the outbox depth is seen back at zero.
    if waited.is_ok() {
        tl.show_for(Duration::from_secs(TELEMETRY_S + 1))?;
    }

    println!();
    println!("the outage ({outage_s:.0} s):");
    for d in DEVICES {
        let (lo, hi) = window[d];
        let queued = hi - lo;
        let delivered = arrived(&tl.journal, d).len() as u64;
        let results = queued_results.get(d).map_or(0, Vec::len);
        let duplicates = tl.journal.count("duplicate", d);
        let line = format!(
            "{d}: queued {queued} ({results} results via edge-agent publish, {} telemetry and alerts), \
             delivered {delivered}, duplicates dropped {duplicates}",
            queued.saturating_sub(results as u64)
        );
        println!("  {line}");
        summary
            .outage
            .push(format!("{d} queued {queued}, delivered {delivered}"));
        summary.lost += queued.saturating_sub(delivered);
    }
    waited.context("some messages queued during the outage did not arrive")
}

/// Four agents, each with a non-IID shard of the digits data, train the MLP for a few rounds;
/// the coordinator aggregates (FedAvg) and evaluates each new global model on a held-out set.
fn federated_act(
    env: &TestEnv,
    coord: &Coordinator,
    key: &SigningKey,
    tl: &mut Timeline,
    summary: &mut Summary,
) -> Result<()> {
    let task_dir = env.path("fl-task");
    let model = onnx_builder::mlp(&onnx_builder::mlp_layers(&[64, 32, 10], 1));
    let (d, shards) = federated_data(&task_dir, FL_AGENTS, Split::Dirichlet(0.5), &model)?;
    let names: Vec<String> = (1..=FL_AGENTS).map(|i| format!("fl-{i}")).collect();
    tl.note(&format!(
        "starting agents {}: each replays its shard of the digits data (non-IID, Dirichlet 0.5: {} \
         rows) into a local dataset and serves a 64-32-10 MLP; training runs in mlp_trainer.wasm",
        names.join(", "),
        shards
            .iter()
            .map(|s| s.len().to_string())
            .collect::<Vec<_>>()
            .join("/")
    ));
    let mut agents = Vec::new();
    for (name, shard) in names.iter().zip(&shards) {
        let mut o = AgentOptions::new(name.as_str(), coord.url());
        o.telemetry_interval_s = TELEMETRY_S;
        federated_agent(
            &mut o,
            &env.path(&format!("{name}-pipeline")),
            &d,
            shard,
            &model,
            key,
        )?;
        agents.push(Agent::start(&env.path(name), o)?);
    }
    tl.until("the federated agents to register", CATCH_UP_TIMEOUT, |j| {
        names.iter().all(|n| j.count("registered", n) > 0)
    })?;
    let task = FlTask {
        round_interval_s: 0,
        codec: FL_CODEC.into(),
        ..FlTask::new(FL_TASK, FL_ROUNDS, FL_AGENTS)
    };
    tl.note(&format!(
        "`edge-coordinator fl start {FL_TASK}.toml`: {FL_ROUNDS} rounds, every agent \
         trains 2 local epochs per round, updates travel {FL_CODEC}-coded, FedAvg"
    ));
    task.start(coord, &task_dir, key)?;
    tl.until("the federated task to finish", CATCH_UP_TIMEOUT * 3, |j| {
        task_finished(j.events(), FL_TASK)
    })?;
    let rounds = edge_tests::closed_rounds(tl.journal.events(), FL_TASK);
    let accuracy = edge_tests::final_accuracy(tl.journal.events(), FL_TASK)?;
    let first = rounds
        .first()
        .and_then(|e| e.f64_field("eval_accuracy"))
        .unwrap_or(0.0);
    let uploaded: f64 = rounds.iter().filter_map(|e| e.f64_field("bytes_in")).sum();
    let updates: f64 = rounds.iter().filter_map(|e| e.f64_field("received")).sum();
    // fp32 would send every weight as 4 bytes: what the codec saved.
    let weights = tl
        .journal
        .events()
        .iter()
        .find(|e| e.is("fl_task_started") && e.str_field("task") == Some(FL_TASK))
        .and_then(|e| e.f64_field("weights"))
        .unwrap_or(0.0);
    summary
        .processes
        .push(format!("{FL_AGENTS} federated agents"));
    summary.federated = format!(
        "{} rounds over {FL_AGENTS} agents: held-out accuracy {:.1}% after round 1, {:.1}% at the end; \
         {} uploaded in {updates:.0} updates ({FL_CODEC}, {:.1}x fewer bytes than fp32)",
        rounds.len(),
        first * 100.0,
        accuracy * 100.0,
        kib(uploaded),
        if uploaded > 0.0 {
            updates * weights * 4.0 / uploaded
        } else {
            0.0
        }
    );
    for a in &mut agents {
        a.stop()?;
    }
    Ok(())
}
