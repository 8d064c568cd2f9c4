//! `cargo xtask bench fleet`: the coordinator and a broker against simulated fleets (`edge-sim`)
//! of growing size, with the embedded broker and with mosquitto. Per size and broker: time for
//! every device to enroll and register, time for 99% of the fleet to run a 400 KB pipeline
//! deployment, a federated round with up to 1,000 clients, the coordinator's CPU seconds and RSS
//! per device, device messages per second through the broker, and the simulator's memory per
//! device. Table on stdout, `target/bench/fleet.csv` and `target/bench/fleet.svg`.
//!
//! Timings are wall-clock on whatever else this machine runs; the per-device columns are the
//! ones to compare across sizes.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use edge_tests::sim::Sim;
use edge_tests::{Coordinator, Mosquitto, PipelineDir, SigningKey, TestEnv, deploy};

/// The deployment's artifact size.
const PIPELINE_BYTES: usize = 400 * 1024;
/// Clients of the federated round (or the whole fleet, if smaller).
const FL_CLIENTS: u32 = 1000;
const FL_ROUNDS: u32 = 2;
/// Most devices one simulator process runs: each holds about two file descriptors (its MQTT
/// socket and its state database), against this machine's hard limit of 20,000 per process.
const DEVICES_PER_SIM: u32 = 4000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Embedded,
    Mosquitto,
}

impl BrokerKind {
    fn label(self) -> &'static str {
        match self {
            BrokerKind::Embedded => "embedded",
            BrokerKind::Mosquitto => "mosquitto",
        }
    }
}

/// One (size, broker) run.
#[derive(Debug, Clone, Default)]
struct Row {
    devices: u32,
    broker: String,
    enroll_s: f64,
    deploy_p99_s: f64,
    deployed: usize,
    fl_clients: u32,
    fl_round_s: f64,
    coord_cpu_s: f64,
    coord_cpu_ms_per_device: f64,
    coord_rss_kib_per_device: f64,
    coord_rss_mib: f64,
    msgs_per_s: f64,
    /// Messages in and out of mosquitto per second (its `$SYS` counters over its lifetime);
    /// NaN for the embedded broker, which has no such counters.
    broker_msgs_per_s: f64,
    sim_rss_kib_per_device: f64,
    /// Open file descriptors and threads of the simulator once every device registered.
    sim_fds: u64,
    sim_threads: u64,
    error: String,
}

pub fn run(root: &Path, sizes: &[u32], brokers: &[BrokerKind], keep: bool) -> Result<()> {
    raise_nofile();
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let mut rows = Vec::new();
    if keep {
        let earlier = std::fs::read_to_string(out_dir.join("fleet.csv")).unwrap_or_default();
        rows = parse_csv(&earlier)
            .into_iter()
            .filter(|r| {
                !(sizes.contains(&r.devices) && brokers.iter().any(|b| b.label() == r.broker))
            })
            .collect();
    }
    for &n in sizes {
        for &b in brokers {
            println!("bench fleet: {n} devices, {} broker ...", b.label());
            let row = match one(n, b) {
                Ok(r) => r,
                Err(e) => {
                    println!("bench fleet: {n} devices, {}: failed: {e:#}", b.label());
                    Row {
                        devices: n,
                        broker: b.label().into(),
                        error: format!("{e:#}").replace(['\n', ','], " "),
                        ..Row::default()
                    }
                }
            };
            print_row(&row);
            rows.push(row);
            rows.sort_by(|a, b| (a.devices, &a.broker).cmp(&(b.devices, &b.broker)));
            // Written after every run, so a later failure or a kill keeps what was measured.
            std::fs::write(out_dir.join("fleet.csv"), csv(&rows))?;
            std::fs::write(out_dir.join("fleet.svg"), svg(&rows))?;
        }
    }
    for line in ratios(&rows) {
        println!("bench fleet: {line}");
    }
    println!(
        "bench fleet: {} and {}",
        out_dir.join("fleet.csv").display(),
        out_dir.join("fleet.svg").display()
    );
    Ok(())
}

/// Raises this process's open-file limit to its hard limit; the brokers and the simulator it
/// starts inherit it (each simulated device holds a socket and its stores' files).
fn raise_nofile() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            println!("bench fleet: cannot raise the open-file limit: {e}");
        }
    }
    println!(
        "bench fleet: open-file limit {:?}",
        getrlimit(Resource::Nofile).current
    );
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of `pid`, seconds.
fn cpu_s(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Some(ticks / hz)
}

fn scenario(n: u32, key: &SigningKey, pin: &protocol::v1::auth::PublicIdentity) -> String {
    format!(
        r#"
[fleet]
telemetry_interval_s = 30
start_per_second = 500

[[fleet.group]]
name = "fl"
devices = {n}
claim_key_file = "claim-fl.key"

[agent.mqtt]
url = "mqtt://127.0.0.1:1"
reconnect_min_ms = 500
reconnect_max_ms = 5000

[agent.enrollment]
retry_ms = 5000
coordinator = {{ sign = "{sign}", agree = "{agree}" }}

[agent.deploy]
trusted_keys = ["{key}"]
resend_after_ms = 5000

[fl]
model = "{model}"
model_file = "model.onnx"
"#,
        key = key.public_hex,
        sign = pin.sign,
        agree = pin.agree,
        model = edge_tests::FL_MODEL,
    )
}

fn fl_task(id: &str, clients: u32, n: u32) -> String {
    let fraction = f64::from(clients) / f64::from(n);
    format!(
        r#"
id = "{id}"
model = "{model}"
initial = "initial.onnx"
group = "fl"
rounds = {FL_ROUNDS}
fraction = {fraction}
min_clients = {clients}
quorum = 1.0
round_timeout_s = 300
round_interval_s = 1
max_staleness = 1
seed = 1
[train]
epochs = 1
lr = 0.1
batch_size = 16
codec = "fp32"
[aggregate]
rule = "fedavg"
server_optimizer = "sgd"
[eval]
holdout = "holdout.csv"
"#,
        model = edge_tests::FL_MODEL,
    )
}

fn registered(events: &[edge_tests::Event]) -> usize {
    events
        .iter()
        .filter(|e| e.is("registered"))
        .filter_map(|e| e.device.as_deref())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

fn one(n: u32, broker: BrokerKind) -> Result<Row> {
    let env = TestEnv::new(&format!("bench-fleet-{n}-{}", broker.label()))?;
    let mosquitto = match broker {
        // Without persistence: the harness's persistent broker saves its whole database every
        // second, which at 10,000 sessions (143 MB) stalled mosquitto for longer than the
        // clients' keep-alive. What is measured here is the coordinator and the fleet.
        // 256 unacknowledged messages per client (mosquitto's default is 20): the coordinator
        // acknowledges after each group commit, so the window bounds its batches (one run at
        // 10,000 devices: FL round 39.7 s against 60.1 s with 20).
        BrokerKind::Mosquitto => Some(Mosquitto::start_volatile_with_inflight(
            &env.path("mosquitto"),
            256,
        )?),
        BrokerKind::Embedded => None,
    };
    let broker_started = Instant::now();
    let coord = match &mosquitto {
        Some(m) => Coordinator::start_external(&env.path("coordinator"), &m.url())?,
        None => Coordinator::start_embedded(&env.path("coordinator"))?,
    };
    let coord_pid = coord.pid().context("coordinator pid")?;
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;
    let pin = edge_tests::enroll::coordinator_identity(&coord.state_dir())?;
    let sim_dir = env.path("sim");
    std::fs::create_dir_all(&sim_dir)?;
    edge_tests::enroll::write_claim_key(&sim_dir.join("claim-fl.key"), &["fl"])?;
    let model = edge_testmodels::onnx_builder::mlp(&edge_testmodels::onnx_builder::mlp_layers(
        &[64, 32, 10],
        1,
    ));
    std::fs::write(sim_dir.join("model.onnx"), &model)?;
    let mut journal = coord.journal();
    let wait = Duration::from_secs(60 + u64::from(n) / 10);

    // 1. Enroll and register.
    let started = Instant::now();
    let shards = n.div_ceil(DEVICES_PER_SIM);
    let text = scenario(n, &key, &pin);
    let mut sims = Vec::new();
    for i in 0..shards {
        let shard = (shards > 1).then_some((i, shards));
        sims.push(Sim::start_shard(&sim_dir, &text, &coord.url(), shard)?);
    }
    let pids: Vec<u32> = sims
        .iter()
        .map(|s| s.pid().context("simulator pid"))
        .collect::<Result<_>>()?;
    // A simulator that exits (a bad scenario, a crash) ends the wait: its devices never come.
    // The row's error says what happened; the logs go to stdout.
    let mut exited = None;
    let waited = journal.wait_for("every device registered", wait, |e| {
        exited = sims.iter_mut().position(|s| !s.is_running());
        exited.is_some() || registered(e) >= n as usize
    });
    if let Some(i) = exited {
        println!("bench fleet: simulator {i} log:\n{}", sims[i].log_tail(20));
        bail!("simulator {i} of {shards} exited");
    }
    if waited.is_err() {
        println!("bench fleet: simulator 0 log:\n{}", sims[0].log_tail(20));
        bail!(
            "{} of {n} devices registered within {} s",
            registered(journal.events()),
            wait.as_secs()
        );
    }
    let enroll_s = started.elapsed().as_secs_f64();
    let sum = |f: &dyn Fn(u32) -> u64| pids.iter().map(|&p| f(p)).sum::<u64>();
    let sim_rss = sum(&|p| proc_status_kib(p, "VmRSS:").unwrap_or(0));
    let sim_threads = sum(&|p| proc_status_kib(p, "Threads:").unwrap_or(0));
    let sim_fds =
        sum(&|p| std::fs::read_dir(format!("/proc/{p}/fd")).map_or(0, |d| d.count() as u64));

    // 2. A 400 KB pipeline to the whole group; 99% of the fleet live on it.
    let dir = env.path("pipeline");
    let v1 = PipelineDir::create(
        &dir,
        &edge_tests::features_pipeline("bench", "features"),
        &[edge_tests::FEATURES_MODULE],
    )?;
    // Padded to 400 KB: the simulator never compiles it, the bytes still travel and are
    // checked (digest, signature) on every device.
    let module = dir.join(edge_tests::FEATURES_MODULE.1);
    let mut bytes = std::fs::read(&module)?;
    bytes.resize(PIPELINE_BYTES.max(bytes.len()), 0);
    std::fs::write(&module, &bytes)?;
    let deploy_start_ms = protocol::v1::now_ms();
    let timeout = (120 + n / 5).to_string();
    let run = deploy(
        &coord,
        &["--group", "fl"],
        &v1,
        &key,
        1,
        &[
            "--health-messages",
            "3",
            "--health-seconds",
            "0",
            "--timeout-s",
            &timeout,
        ],
    )?;
    if !run.success {
        println!(
            "bench fleet: deploy did not finish on every device: {}",
            run.stderr.lines().last().unwrap_or("")
        );
    }

    // 3. A federated task over up to FL_CLIENTS of them.
    let clients = FL_CLIENTS.min(n);
    let task_dir = env.path("task");
    edge_tests::federated_data(&task_dir, 1, edge_tests::digits::Split::Iid, &model)?;
    let task_file = task_dir.join("bench.toml");
    std::fs::write(&task_file, fl_task("bench", clients, n))?;
    // A failed round is reported in the row; the figures before and after it still count.
    let mut fl = || -> Result<f64> {
        let out = std::process::Command::new(edge_tests::coordinator_bin()?)
            .args(["fl", "start"])
            .arg(&task_file)
            .arg("--state-dir")
            .arg(coord.state_dir())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // A busy coordinator takes the spooled task later than `fl start` waits (10 s).
        let spooled = stderr.contains("no coordinator picked up task");
        ensure!(out.status.success() || spooled, "fl start: {stderr}");
        if spooled {
            println!(
                "bench fleet: fl start: the coordinator had not taken the task within 10 s; waiting for it"
            );
        }
        let fl_start_ms = protocol::v1::now_ms();
        journal.wait_for("the federated task finished", wait, |e| {
            edge_tests::task_finished(e, "bench")
        })?;
        let closes: Vec<u64> = edge_tests::closed_rounds(journal.events(), "bench")
            .iter()
            .map(|e| e.ts_ms)
            .collect();
        match closes.as_slice() {
            [first, ..] => {
                let span = closes.last().copied().unwrap_or(*first) - fl_start_ms.min(*first);
                Ok(span as f64 / 1000.0 / closes.len() as f64)
            }
            [] => bail!("no federated round closed"),
        }
    };
    let (fl_round_s, fl_error) = match fl() {
        Ok(s) => (s, String::new()),
        Err(e) => {
            println!("bench fleet: {n} devices: federated round failed: {e:#}");
            (f64::NAN, format!("fl: {e:#}").replace(['\n', ','], " "))
        }
    };

    let coord_cpu = cpu_s(coord_pid).unwrap_or(0.0);
    let coord_rss = proc_status_kib(coord_pid, "VmRSS:").unwrap_or(0);
    let sim_secs = started.elapsed().as_secs_f64();
    let mut delivered = 0u64;
    let mut live: Vec<u64> = Vec::new();
    for sim in &mut sims {
        let result = sim.stop(Duration::from_secs(120 + u64::from(n) / 20))?;
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&result)?)?;
        let devices = report["devices"].as_array().cloned().unwrap_or_default();
        delivered += devices
            .iter()
            .filter_map(|d| d["delivered"].as_u64())
            .sum::<u64>();
        live.extend(
            report["timeline"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter(|e| {
                            e["event"] == "live"
                                && e["detail"]
                                    .as_str()
                                    .is_some_and(|d| d.starts_with("bench v1"))
                        })
                        .filter_map(|e| e["unix_ms"].as_u64())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        );
    }
    live.sort_unstable();
    let p99_index = ((f64::from(n) * 0.99).ceil() as usize).saturating_sub(1);
    let deploy_p99_s = live
        .get(p99_index)
        .map(|t| t.saturating_sub(deploy_start_ms) as f64 / 1000.0)
        .unwrap_or(f64::NAN);
    let broker_msgs_per_s = match &mosquitto {
        Some(m) => match broker_messages(m.port()) {
            Ok(total) => total as f64 / broker_started.elapsed().as_secs_f64(),
            Err(e) => {
                println!("bench fleet: mosquitto's message counters: {e:#}");
                f64::NAN
            }
        },
        None => f64::NAN,
    };
    drop(mosquitto);
    Ok(Row {
        devices: n,
        broker: broker.label().into(),
        enroll_s,
        deploy_p99_s,
        deployed: live.len(),
        fl_clients: clients,
        fl_round_s,
        coord_cpu_s: coord_cpu,
        coord_cpu_ms_per_device: coord_cpu * 1000.0 / f64::from(n),
        coord_rss_kib_per_device: coord_rss as f64 / f64::from(n),
        coord_rss_mib: coord_rss as f64 / 1024.0,
        msgs_per_s: delivered as f64 / sim_secs,
        broker_msgs_per_s,
        sim_rss_kib_per_device: sim_rss as f64 / f64::from(n),
        sim_fds,
        sim_threads,
        error: fl_error,
    })
}

impl Row {
    /// Whether the run got as far as measuring (a failed federated round leaves the rest).
    fn measured(&self) -> bool {
        self.enroll_s > 0.0
    }
}

/// Per-device coordinator cost from each measured size to the next, per broker (the aim:
/// at most 1.5x from 1,000 to 10,000 devices).
fn ratios(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    for broker in ["embedded", "mosquitto"] {
        let ok: Vec<&Row> = rows
            .iter()
            .filter(|r| r.broker == broker && r.measured())
            .collect();
        for w in ok.windows(2) {
            let (a, b) = (w[0], w[1]);
            out.push(format!(
                "{broker}: {} -> {} devices: coordinator CPU per device x{:.2}, RSS per device x{:.2}",
                a.devices,
                b.devices,
                b.coord_cpu_ms_per_device / a.coord_cpu_ms_per_device,
                b.coord_rss_kib_per_device / a.coord_rss_kib_per_device,
            ));
        }
    }
    out
}

/// Messages mosquitto received plus sent since it started, from its `$SYS` topics (retained,
/// published every `sys_interval`: 1 s in the harness's configuration).
fn broker_messages(port: u16) -> Result<u64> {
    let out = std::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-C",
            "2",
            "-W",
            "30",
            "-v",
        ])
        .args(["-t", "$SYS/broker/messages/received"])
        .args(["-t", "$SYS/broker/messages/sent"])
        .output()
        .context("cannot run mosquitto_sub (Debian package mosquitto-clients)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    ensure!(
        counts.len() == 2,
        "mosquitto_sub printed {text:?} ({})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(counts.iter().sum())
}

fn print_row(r: &Row) {
    if !r.measured() {
        return;
    }
    if !r.error.is_empty() {
        println!("  (partly measured: {})", r.error);
    }
    println!(
        "  {:>6} devices {:<9}  enroll+register {:>7.1} s  99% on the 400 KB pipeline {:>7.1} s ({} live)  \
         FL round ({} clients) {:>6.1} s  coordinator {:>6.1} CPU s ({:.2} ms/device), RSS {:.0} MiB ({:.1} KiB/device)  \
         {:>7.0} device msgs/s, {:.0} broker msgs/s  simulator {:.0} KiB/device, {} fds, {} threads",
        r.devices,
        r.broker,
        r.enroll_s,
        r.deploy_p99_s,
        r.deployed,
        r.fl_clients,
        r.fl_round_s,
        r.coord_cpu_s,
        r.coord_cpu_ms_per_device,
        r.coord_rss_mib,
        r.coord_rss_kib_per_device,
        r.msgs_per_s,
        r.broker_msgs_per_s,
        r.sim_rss_kib_per_device,
        r.sim_fds,
        r.sim_threads
    );
}

fn csv(rows: &[Row]) -> String {
    let mut s = String::from(
        "devices,broker,enroll_register_s,deploy_400kb_p99_s,deployed,fl_clients,fl_round_s,\
         coordinator_cpu_s,coordinator_cpu_ms_per_device,coordinator_rss_mib,\
         coordinator_rss_kib_per_device,device_msgs_per_s,broker_msgs_per_s,sim_rss_kib_per_device,sim_fds,\
         sim_threads,error\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{:.2},{:.2},{},{},{:.2},{:.2},{:.3},{:.1},{:.2},{:.1},{:.1},{:.1},{},{},{}",
            r.devices,
            r.broker,
            r.enroll_s,
            r.deploy_p99_s,
            r.deployed,
            r.fl_clients,
            r.fl_round_s,
            r.coord_cpu_s,
            r.coord_cpu_ms_per_device,
            r.coord_rss_mib,
            r.coord_rss_kib_per_device,
            r.msgs_per_s,
            r.broker_msgs_per_s,
            r.sim_rss_kib_per_device,
            r.sim_fds,
            r.sim_threads,
            r.error
        );
    }
    s
}

/// Rows of a `fleet.csv` this bench wrote (lines it cannot read are skipped).
fn parse_csv(text: &str) -> Vec<Row> {
    let f = |v: &str| v.parse::<f64>().unwrap_or(f64::NAN);
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let c: Vec<&str> = line.split(',').collect();
            if c.len() != 17 {
                return None;
            }
            Some(Row {
                devices: c[0].parse().ok()?,
                broker: c[1].to_owned(),
                enroll_s: f(c[2]),
                deploy_p99_s: f(c[3]),
                deployed: c[4].parse().ok()?,
                fl_clients: c[5].parse().ok()?,
                fl_round_s: f(c[6]),
                coord_cpu_s: f(c[7]),
                coord_cpu_ms_per_device: f(c[8]),
                coord_rss_mib: f(c[9]),
                coord_rss_kib_per_device: f(c[10]),
                msgs_per_s: f(c[11]),
                broker_msgs_per_s: f(c[12]),
                sim_rss_kib_per_device: f(c[13]),
                sim_fds: c[14].parse().ok()?,
                sim_threads: c[15].parse().ok()?,
                error: c[16].to_owned(),
            })
        })
        .collect()
}

/// An axis label that fits left of the axis.
fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Small multiples: one panel per figure against fleet size (log scale), a line per broker.
fn svg(rows: &[Row]) -> String {
    type Get = fn(&Row) -> f64;
    let panels: [(&str, Get); 9] = [
        ("enroll + register (s)", |r| r.enroll_s),
        ("99% on a 400 KB pipeline (s)", |r| r.deploy_p99_s),
        ("FL round, up to 1,000 clients (s)", |r| r.fl_round_s),
        ("coordinator CPU per device (ms)", |r| {
            r.coord_cpu_ms_per_device
        }),
        ("coordinator RSS per device (KiB)", |r| {
            r.coord_rss_kib_per_device
        }),
        ("device messages/s via broker", |r| r.msgs_per_s),
        ("mosquitto messages/s in+out", |r| r.broker_msgs_per_s),
        ("simulator RSS per device (KiB)", |r| {
            r.sim_rss_kib_per_device
        }),
        ("coordinator CPU total (s)", |r| r.coord_cpu_s),
    ];
    let (pw, ph, cols) = (300.0, 200.0, 4usize);
    let rows_n = panels.len().div_ceil(cols);
    let (w, h) = (pw * cols as f64, ph * rows_n as f64 + 30.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"18\" font-size=\"13\">edge-sim fleet benchmark: blue embedded broker, orange mosquitto; x: devices (log)</text>\n"
    );
    let ok: Vec<&Row> = rows.iter().filter(|r| r.measured()).collect();
    let xs: Vec<f64> = ok.iter().map(|r| f64::from(r.devices).log10()).collect();
    let (xmin, xmax) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    for (i, (title, get)) in panels.iter().enumerate() {
        let (ox, oy) = ((i % cols) as f64 * pw, (i / cols) as f64 * ph + 30.0);
        let (l, r, t, b) = (ox + 45.0, ox + pw - 15.0, oy + 20.0, oy + ph - 30.0);
        let ymax = ok
            .iter()
            .map(|row| get(row))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            .max(1e-9);
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\">{title}</text>\n<line x1=\"{l}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n<line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{b}\" stroke=\"black\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n<text x=\"{}\" y=\"{b}\" text-anchor=\"end\">0</text>",
            ox + 45.0,
            oy + 14.0,
            l - 3.0,
            t + 8.0,
            short(ymax),
            l - 3.0,
        );
        let px = |x: f64| {
            if xmax > xmin {
                l + (x - xmin) / (xmax - xmin) * (r - l)
            } else {
                (l + r) / 2.0
            }
        };
        let py = |v: f64| b - v / ymax * (b - t);
        for row in &ok {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                px(f64::from(row.devices).log10()),
                b + 14.0,
                row.devices
            );
        }
        for (broker, color) in [("embedded", "#1f77b4"), ("mosquitto", "#ff7f0e")] {
            let pts: Vec<(f64, f64)> = ok
                .iter()
                .filter(|row| row.broker == broker)
                .map(|row| (px(f64::from(row.devices).log10()), get(row)))
                .filter(|(_, v)| v.is_finite())
                .map(|(x, v)| (x, py(v)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                path.join(" ")
            );
            for (x, y) in pts {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{color}\"/>"
                );
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_and_csv_have_every_row() {
        let rows = vec![
            Row {
                devices: 100,
                broker: "embedded".into(),
                enroll_s: 1.0,
                ..Row::default()
            },
            Row {
                devices: 1000,
                broker: "mosquitto".into(),
                error: "x".into(),
                ..Row::default()
            },
        ];
        assert_eq!(csv(&rows).lines().count(), 3);
        let back = parse_csv(&csv(&rows));
        assert_eq!(back.len(), 2);
        assert_eq!((back[1].devices, back[1].error.as_str()), (1000, "x"));
        let s = svg(&rows);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    }
}
