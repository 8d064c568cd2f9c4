//! `cargo xtask demo`: the README's one-command tour, built from the test harness.
//!
//! A coordinator with its embedded broker and two agents (`edge-a`, `edge-b`) run as separate
//! processes in a temp dir. The demo prints a timeline from the coordinator's journal as it
//! goes: registrations, telemetry, a broker outage during which the agents keep queueing
//! (telemetry, plus results published with `edge-agent publish`), the broker's return, and
//! the count of everything queued during the outage that arrived. Before the outage it deploys
//! a signed WASM pipeline to both agents over MQTT (a simulated vibration sensor -> FFT features
//! -> anomaly alerts), whose alerts keep flowing through the outage, then a broken version that
//! the agents roll back. Processes are killed on every exit path (the harness kills children
//! on drop).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edge_tests::{
    Agent, AgentOptions, Coordinator, Event, Journal, Link, LinkProxy, OFFLOAD_PIPELINE,
    PipelineDir, SigningKey, TestEnv, deploy, offload_coordinator_config, offload_count,
    offloading_agent,
};

const DEVICES: [&str; 2] = ["edge-a", "edge-b"];
/// The third agent, behind a link proxy, whose inference stage may offload.
const OFFLOADER: &str = "edge-c";
const TELEMETRY_S: u64 = 2;
const ONLINE_STREAM: Duration = Duration::from_secs(5);
const OUTAGE_TICKS: u32 = 6;
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run() -> Result<()> {
    let env = TestEnv::new("demo")?;
    let result = tour(&env);
    if let Err(e) = &result {
        eprintln!("demo failed: {e:#}");
        env.dump_logs();
    }
    result
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
        "telemetry" => format!(
            "{dev:<7} telemetry #{:<4} cpu {:5.1}%  mem used {}  agent rss {}  outbox {}",
            e.seq.unwrap_or(0),
            e.f64_field("cpu_percent").unwrap_or(0.0),
            mib(e.f64_field("mem_used_bytes")),
            mib(e.f64_field("agent_rss_bytes")),
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
fn offload_act(env: &TestEnv, coord: &Coordinator, tl: &mut Timeline) -> Result<()> {
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
    let mut summary = Vec::new();
    let mut phase = |tl: &mut Timeline, name: &str, key: usize, act: &dyn Fn()| -> Result<()> {
        let before = counts(&tl.journal);
        tl.note(name);
        act();
        tl.until(name, CATCH_UP_TIMEOUT, |j| {
            counts(j)[key] >= before[key] + 20
        })?;
        let after = counts(&tl.journal);
        let d: Vec<u64> = (0..KEYS.len()).map(|i| after[i] - before[i]).collect();
        summary.push(format!(
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
    for line in summary {
        println!("{line}");
    }
    Ok(())
}

fn short(s: &str) -> &str {
    &s[..s.len().min(8)]
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
    tl.show_for(Duration::from_secs(3))?;
    Ok(())
}

fn tour(env: &TestEnv) -> Result<()> {
    let started = Instant::now();
    let t0_ms = protocol::v1::now_ms();
    println!(
        "edge runtime demo: files and logs in {}",
        env.dir().display()
    );
    // The coordinator also serves an MLP for offloaded inference (the last act); ONNX Runtime
    // comes from the onnxruntime wheel (`cargo xtask ort`), fetched here if missing.
    let offload_files = env.path("offload");
    let model_path = offload_files.join("models/mlp.onnx");
    std::fs::create_dir_all(offload_files.join("models"))?;
    std::fs::write(
        &model_path,
        edge_inference::onnx_builder::mlp(&edge_inference::onnx_builder::mlp_layers(
            &[64, 32, 10],
            1,
        )),
    )?;
    let ort_ready = match crate::ort::ensure_ort(&crate::root(), crate::ort::host_triple(), false) {
        Ok(_) => true,
        Err(e) => {
            println!("no ONNX Runtime library ({e:#}): the offload act will be skipped");
            false
        }
    };
    let coordinator_config = offload_files.join("coordinator.toml");
    std::fs::write(&coordinator_config, offload_coordinator_config(&model_path))?;
    let mut coord = Coordinator::start_embedded_with_args(
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

    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
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

    deploy_pipelines(env, &coord, &key, &mut tl)?;

    tl.note("stopping the coordinator (SIGTERM): the broker goes down with it");
    coord.stop()?;
    tl.pump()?;
    let before: BTreeMap<&str, u64> = DEVICES
        .iter()
        .map(|d| (*d, max_seq(&tl.journal, d)))
        .collect();

    tl.note("agents keep running offline: telemetry and results queue in their outboxes");
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
    tl.until(
        "everything queued during the outage to arrive",
        CATCH_UP_TIMEOUT,
        |j| {
            all_results_in(j)
                && DEVICES
                    .iter()
                    .all(|d| arrived(j, d).len() as u64 == window[d].1 - window[d].0)
        },
    )?;
    // A little more of the live stream, so the outbox depth is seen back at zero.
    tl.show_for(Duration::from_secs(TELEMETRY_S + 1))?;

    println!();
    println!("summary of the outage:");
    let mut ok = true;
    for d in DEVICES {
        let (lo, hi) = window[d];
        let queued = hi - lo;
        let delivered = arrived(&tl.journal, d).len() as u64;
        let results = queued_results.get(d).map_or(0, Vec::len);
        let duplicates = tl.journal.count("duplicate", d);
        println!(
            "  {d}: queued {queued} ({results} results via edge-agent publish, {} telemetry and other), \
             delivered {delivered}, duplicates dropped {duplicates}",
            queued.saturating_sub(results as u64)
        );
        ok &= delivered == queued;
    }
    if !ok {
        bail!("some messages queued during the outage did not arrive");
    }
    println!();
    if ort_ready {
        offload_act(env, &coord, &mut tl)?;
    }
    for a in &mut agents {
        a.stop()?;
    }
    coord.stop()?;
    println!(
        "every message queued during the outage was delivered ({:.0?} in all)",
        started.elapsed()
    );
    Ok(())
}
