//! Telemetry latency while federated rounds close: `cargo xtask bench fl-ack` (or
//! `cargo test -p edge-tests --bench fl_ack` with the coordinator binary built).
//!
//! What it answers: does a round closing (aggregation plus the held-out evaluation, ONNX
//! Runtime over a 10,000-row set) hold back the coordinator's handling of everything else?
//! Before the evaluation moved to its own thread it ran inside the service's message batch,
//! so every message queued behind it waited, and so did the batch's commit and acks.
//!
//! How it measures, against the real coordinator binary (embedded broker, temp dirs):
//! - a raw MQTT client registers `tel` and publishes a telemetry envelope every
//!   [`TELEMETRY_PERIOD`], QoS 1; each sample's latency is the journal line's `ts_ms` (when
//!   the service loop took it up) minus the envelope's `created_ms` (when it was sent), both
//!   from this machine's clock, in whole milliseconds;
//! - phase `idle`: [`IDLE`] of telemetry with no federated task (the baseline);
//! - phase `rounds`: a task over two fake devices (`d0`, `d1`, registered in group `fl`,
//!   online) on the digits MLP 64-32-10 with a hold-out of exactly 10,000 rows (the digits
//!   rows repeated; the cap, `MAX_HOLDOUT_ROWS`); both devices send an fp32 update as soon as
//!   each round opens (`round_interval_s = 0`), so rounds close back to back for `FL_ACK_ROUNDS`
//!   rounds while the telemetry keeps flowing.
//!
//! Prints per coordinator binary p50, p99 and max of both phases and the ratios rounds/idle,
//! and how many rounds carried eval figures (without an ONNX Runtime library evaluation is
//! instant and the comparison means nothing: it says so). With `FL_ACK_BEFORE_BIN` naming
//! another `edge-coordinator` binary (e.g. one built from the commit before the change), the
//! same run measures that one too and prints after/before ratios.
//!
//! Environment: `FL_ACK_ROUNDS` (default 20), `FL_ACK_BEFORE_BIN`, `ORT_DYLIB_PATH` (passed on
//! to the coordinators; a binary built elsewhere does not find this workspace's library by
//! itself). Timings are printed, never asserted.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edge_testmodels::onnx_builder;
use edge_tests::{Coordinator, FL_GROUP, FlTask, SigningKey, digits};
use protocol::v1::binary::BinaryEnvelope;
use protocol::v1::fl::{Codec, Update, codec};
use protocol::v1::{self, Class, Envelope, Registration, Status, Telemetry, message_id, topics};
use rumqttc::{Client, MqttOptions, QoS};

const TELEMETRY_PERIOD: Duration = Duration::from_millis(20);
const IDLE: Duration = Duration::from_secs(6);
const HOLDOUT_ROWS: usize = 10_000;
const TASK: &str = "ack";
const WAIT: Duration = Duration::from_secs(120);

/// Set in the copy of this process that measures the `FL_ACK_BEFORE_BIN` binary: it prints
/// its figures on one line starting with this, for the parent to read.
const CHILD: &str = "FL_ACK_CHILD";

fn main() -> Result<()> {
    let rounds: u32 = std::env::var("FL_ACK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let bin = edge_tests::coordinator_bin()?;
    if std::env::var_os(CHILD).is_some() {
        let r = measure(&bin, rounds)?;
        println!("{CHILD} {}", r.to_line());
        return Ok(());
    }
    let mut runs = Vec::new();
    if let Some(before) = std::env::var_os("FL_ACK_BEFORE_BIN").map(PathBuf::from) {
        // The harness takes its coordinator from EDGE_COORDINATOR_BIN; a copy of this process
        // with it set measures the other binary (no process-wide environment changes here).
        let out = Command::new(std::env::current_exe()?)
            .env(CHILD, "1")
            .env("EDGE_COORDINATOR_BIN", &before)
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run the before measurement")?;
        let text = String::from_utf8_lossy(&out.stdout);
        print!(
            "{}",
            text.lines()
                .filter(|l| !l.starts_with(CHILD))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        );
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(CHILD))
            .with_context(|| {
                format!(
                    "the before measurement printed no figures (status {})",
                    out.status
                )
            })?;
        runs.push(("before", Run::from_line(line)?));
    }
    runs.push(("after", measure(&bin, rounds).context("after")?));
    println!();
    println!(
        "telemetry latency (journal ts - created, ms), {rounds} rounds on a {HOLDOUT_ROWS}-row hold-out"
    );
    println!(
        "{:<7} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11} {:>9} {:>9} {:>9}",
        "binary",
        "idle p50",
        "idle p99",
        "idle max",
        "rounds p50",
        "rounds p99",
        "rounds max",
        "x p50",
        "x p99",
        "evaluated"
    );
    for (name, r) in &runs {
        println!(
            "{name:<7} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11} {:>9.2} {:>9.2} {:>6}/{:<2}",
            r.idle.p50,
            r.idle.p99,
            r.idle.max,
            r.rounds.p50,
            r.rounds.p99,
            r.rounds.max,
            ratio(r.rounds.p50, r.idle.p50),
            ratio(r.rounds.p99, r.idle.p99),
            r.evaluated,
            r.closed
        );
        if r.evaluated == 0 {
            println!(
                "        no round was evaluated ({}): the figures do not show the evaluation's cost",
                r.note
            );
        }
    }
    if let [(_, b), (_, a)] = &runs[..] {
        println!(
            "after/before during rounds: p50 {:.2}, p99 {:.2}, max {:.2}",
            ratio(a.rounds.p50, b.rounds.p50),
            ratio(a.rounds.p99, b.rounds.p99),
            ratio(a.rounds.max, b.rounds.max)
        );
    }
    Ok(())
}

/// A ratio of millisecond figures, each taken as at least 1 ms (the journal's resolution:
/// 0 ms means "within the same millisecond").
fn ratio(a: u64, b: u64) -> f64 {
    a.max(1) as f64 / b.max(1) as f64
}

#[derive(Debug, Default)]
struct Figures {
    n: usize,
    p50: u64,
    p99: u64,
    max: u64,
}

fn figures(mut v: Vec<u64>) -> Figures {
    v.sort_unstable();
    let at = |q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    Figures {
        n: v.len(),
        p50: at(0.5).unwrap_or(0),
        p99: at(0.99).unwrap_or(0),
        max: v.last().copied().unwrap_or(0),
    }
}

struct Run {
    idle: Figures,
    rounds: Figures,
    closed: usize,
    evaluated: usize,
    note: String,
}

impl Run {
    fn to_line(&self) -> String {
        let (i, r) = (&self.idle, &self.rounds);
        format!(
            "{} {} {} {} {} {} {} {} {} {} {}",
            i.n,
            i.p50,
            i.p99,
            i.max,
            r.n,
            r.p50,
            r.p99,
            r.max,
            self.closed,
            self.evaluated,
            self.note
        )
    }

    fn from_line(line: &str) -> Result<Run> {
        let mut it = line.split_whitespace();
        let mut num = || -> Result<u64> {
            it.next()
                .context("short figures line")?
                .parse()
                .context("figures line")
        };
        let idle = Figures {
            n: num()? as usize,
            p50: num()?,
            p99: num()?,
            max: num()?,
        };
        let rounds = Figures {
            n: num()? as usize,
            p50: num()?,
            p99: num()?,
            max: num()?,
        };
        let closed = num()? as usize;
        let evaluated = num()? as usize;
        let note = it.collect::<Vec<_>>().join(" ");
        if idle.n == 0 || rounds.n == 0 {
            bail!("no samples in a phase: {line}");
        }
        Ok(Run {
            idle,
            rounds,
            closed,
            evaluated,
            note,
        })
    }
}

fn measure(bin: &Path, rounds: u32) -> Result<Run> {
    let tmp = tempfile::Builder::new().prefix("fl-ack").tempdir()?;
    let dir = tmp.path();
    let key = SigningKey::generate(&dir.join("fl.key"))?;
    let task_dir = dir.join("task");
    write_task_files(&task_dir)?;
    std::fs::create_dir_all(dir.join("coord"))?;
    // The harness starts `coordinator_bin()`, which is `bin` in this process (see main).
    let coord = Coordinator::start_embedded(&dir.join("coord"))?;
    let port = coord.port().context("embedded broker port")?;
    let mut journal = coord.journal();

    let devices = connect(port, "fl-devices")?;
    // `tel` stays out of the group: a member that never trains would hold every round open
    // until its deadline.
    for (d, groups) in [
        ("d0", &[FL_GROUP][..]),
        ("d1", &[FL_GROUP][..]),
        ("tel", &[][..]),
    ] {
        announce(&devices, d, groups)?;
    }
    journal.wait_for("the devices to register", WAIT, |ev| {
        ["d0", "d1", "tel"]
            .iter()
            .all(|d| ev.iter().any(|e| e.is_for("registered", d)))
    })?;

    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let client = connect(port, "tel")?;
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || telemetry_loop(&client, &stop))
    };
    let t0 = v1::now_ms();
    std::thread::sleep(IDLE);
    let idle_end = v1::now_ms();

    let task = FlTask {
        round_interval_s: 0,
        ..FlTask::new(TASK, rounds, 2)
    };
    task.start(&coord, &task_dir, &key)?;
    let started = journal.wait_for_event("fl_task_started", 0, WAIT, |e| {
        e.is("fl_task_started") && e.str_field("task") == Some(TASK)
    })?;
    let weights = started
        .f64_field("weights")
        .context("fl_task_started has no weight count")? as usize;
    let rounds_start = v1::now_ms();
    for round in 1..=rounds {
        journal.wait_for(&format!("round {round} to open"), WAIT, |ev| {
            ev.iter().any(|e| {
                e.is("fl_round_opened")
                    && e.str_field("task") == Some(TASK)
                    && e.f64_field("round") == Some(f64::from(round))
            })
        })?;
        for d in ["d0", "d1"] {
            let body = update(d, round, weights);
            devices
                .publish(topics::fl_update(d), QoS::AtLeastOnce, false, body)
                .context("publish update")?;
        }
    }
    journal.wait_for("the task to finish", WAIT, |ev| {
        ev.iter()
            .any(|e| e.is("fl_task_finished") && e.str_field("task") == Some(TASK))
    })?;
    let rounds_end = v1::now_ms();
    stop.store(true, Ordering::Relaxed);
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("telemetry thread panicked"))??;
    journal.wait_for("the last telemetry", WAIT, |ev| {
        ev.iter().filter(|e| e.is_for("telemetry", "tel")).count() >= sent
    })?;

    let mut idle = Vec::new();
    let mut busy = Vec::new();
    for e in journal
        .events()
        .iter()
        .filter(|e| e.is_for("telemetry", "tel"))
    {
        let (Some(ts), Some(created)) = (e.f64_field("ts_ms"), e.f64_field("created_ms")) else {
            continue;
        };
        let (ts, created) = (ts as u64, created as u64);
        let latency = ts.saturating_sub(created);
        if (t0..idle_end).contains(&created) {
            idle.push(latency);
        } else if (rounds_start..rounds_end).contains(&created) {
            busy.push(latency);
        }
    }
    let closed: Vec<_> = edge_tests::closed_rounds(journal.events(), TASK);
    let evaluated = closed
        .iter()
        .filter(|e| e.f64_field("eval_accuracy").is_some())
        .count();
    let note = closed
        .iter()
        .find_map(|e| e.str_field("eval_note"))
        .unwrap_or("no eval figures")
        .to_owned();
    let run = Run {
        idle: figures(idle),
        rounds: figures(busy),
        closed: closed.len(),
        evaluated,
        note,
    };
    println!(
        "{}: {} idle and {} in-round samples over {:.1} s of rounds",
        bin.display(),
        run.idle.n,
        run.rounds.n,
        (rounds_end - rounds_start) as f64 / 1000.0
    );
    drop(coord);
    Ok(run)
}

/// `initial.onnx` (the digits MLP) and a `holdout.csv` of exactly [`HOLDOUT_ROWS`] rows.
fn write_task_files(task_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(task_dir)?;
    let model = onnx_builder::mlp(&onnx_builder::mlp_layers(&[64, 32, 10], 1));
    std::fs::write(task_dir.join("initial.onnx"), model)?;
    let d = digits::load()?;
    let idx: Vec<usize> = (0..HOLDOUT_ROWS).map(|i| i % d.y.len()).collect();
    digits::write_csv(&d, &idx, &task_dir.join("holdout.csv"))
}

/// A client whose event loop runs on its own thread (acks, keep-alive).
fn connect(port: u16, id: &str) -> Result<Client> {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = Client::new(o, 1024);
    std::thread::spawn(move || {
        for event in connection.iter() {
            if event.is_err() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    Ok(client)
}

/// Registration and a retained online status, as an agent sends them.
fn announce(client: &Client, device: &str, groups: &[&str]) -> Result<()> {
    let now = v1::now_ms();
    let reg = Envelope {
        v: v1::VERSION,
        id: message_id(now, 0),
        device: device.to_owned(),
        class: Class::Control,
        seq: 0,
        prev: None,
        created_ms: now,
        body: Registration {
            agent_version: "bench".into(),
            hostname: device.into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            boot_id: "bench".into(),
            started_ms: now,
            capabilities: Vec::new(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            inference: Default::default(),
        },
    };
    client.publish(
        topics::register(device),
        QoS::AtLeastOnce,
        false,
        reg.to_json(),
    )?;
    let status = Status {
        v: v1::VERSION,
        device: device.to_owned(),
        online: true,
        since_ms: now,
        agent_version: "bench".into(),
    };
    client.publish(
        topics::status(device),
        QoS::AtLeastOnce,
        true,
        status.to_json(),
    )?;
    Ok(())
}

/// Publishes telemetry until `stop`; returns how many samples it sent.
fn telemetry_loop(client: &Client, stop: &AtomicBool) -> Result<usize> {
    let incarnation = v1::now_ms();
    let mut seq = 0u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let env = Envelope {
            v: v1::VERSION,
            id: message_id(incarnation, seq),
            device: "tel".into(),
            class: Class::Telemetry,
            seq,
            prev: None,
            created_ms: v1::now_ms(),
            body: Telemetry::default(),
        };
        client
            .publish(
                topics::telemetry("tel"),
                QoS::AtLeastOnce,
                false,
                env.to_json(),
            )
            .context("publish telemetry")?;
        next += TELEMETRY_PERIOD;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok(seq as usize)
}

/// An fp32 update for `round` (trained from version `round - 1`), a small delta.
fn update(device: &str, round: u32, weights: usize) -> Vec<u8> {
    let delta = vec![0.001f32; weights];
    let u = Update {
        task: TASK.into(),
        round,
        base_version: round - 1,
        samples: 100,
        loss: 0.5,
        accuracy: 0.5,
        train_ms: 1,
        payload: codec::encode(Codec::Fp32, &delta, None, 0),
    };
    let now = v1::now_ms();
    match (BinaryEnvelope {
        id: message_id(now, u64::from(round)),
        device: device.into(),
        class: Class::Model,
        seq: u64::from(round),
        created_ms: now,
        kind: protocol::v1::fl::UPDATE_KIND.into(),
        body: u.encode(),
    })
    .encode()
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cannot encode an update: {e}");
            Vec::new()
        }
    }
}
