//! Federated learning at real sizes: `cargo xtask bench fl-large` (or `cargo bench -p
//! edge-tests --bench fl_large`).
//!
//! For each model size (default about 1 and 5 million weights: MLPs 64-1000-1000-10 and
//! 64-2200-2200-10 on the digits data), the real coordinator (embedded broker) and `FL_LARGE_AGENTS`
//! real agents run `ROUNDS` rounds with the fp32 codec, so every round message travels as
//! chunks and every update as parts. Reported per size, each against the weights' own bytes:
//! - round time (opened to closed, from the journal) and the bytes sent and received;
//! - per round, the updates in (late ones: trained for the round before) of those selected,
//!   and why it closed (`quorum`, or `deadline` with at least `min_updates`);
//! - the agent's extra memory while it fetches, trains and sends: its peak RSS during the
//!   rounds (VmHWM, reset through /proc/PID/clear_refs once the pipeline runs) minus its RSS
//!   before the task, as a multiple of the weights' size (the aim: at most one extra copy);
//! - the coordinator's peak RSS during the task;
//! - agent 0's peak RSS per phase of the rounds (fetching, applying, training, forming and queuing the update, after queuing),
//!   sampled every 20 ms (RSS, and anonymous memory alone) and attributed by its log lines. Freed memory that the allocator keeps
//!   counts in the phases after it, so only the first phase of the first round is clean.
//!
//! The trainer's sandbox gets `max_memory_bytes` 1 GiB and a 10-minute timeout here: the
//! defaults (64 MiB, 60 s) fit boards, not a 20 MB model's gradients.
//!
//! Environment: `FL_LARGE_SIZES` (comma list of `H` hidden widths, default `1000,2200`),
//! `FL_LARGE_AGENTS` (default 2).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use edge_testmodels::onnx_builder;
use edge_tests::digits::Split;
use edge_tests::{
    Agent, AgentOptions, Coordinator, FlTask, SigningKey, TestEnv, closed_rounds, federated_agent,
    federated_data, run_test, task_finished,
};

/// Agents when `FL_LARGE_AGENTS` is not set (the figure is for 10; 2 fit a shared 2-core
/// machine's time).
const DEFAULT_AGENTS: usize = 2;

fn agent_count() -> usize {
    std::env::var("FL_LARGE_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_AGENTS)
}
const ROUNDS: u32 = 2;
const WAIT: Duration = Duration::from_secs(900);

fn main() {
    run_test("bench_fl_large", bench);
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{key} of {pid}"))
}

/// Resets the peak RSS (VmHWM) of `pid` to its current RSS.
fn reset_peak(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").context("clear_refs (needs root)")
}

struct Row {
    weights: usize,
    round_s: Vec<f64>,
    /// Per round: updates in (of them late) of those selected, and why it closed.
    updates: Vec<String>,
    bytes_out: u64,
    bytes_in: u64,
    agent_before_kib: u64,
    agent_peak_kib: u64,
    /// Agent 0's anonymous memory (RssAnon) before the task, and its sampled peak.
    agent_anon_before_kib: u64,
    agent_anon_peak_kib: u64,
    coord_peak_kib: u64,
    accuracy: f64,
}

fn bench(env: &TestEnv) -> Result<()> {
    let sizes: Vec<u32> = std::env::var("FL_LARGE_SIZES")
        .unwrap_or_else(|_| "1000,2200".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut rows = Vec::new();
    for h in sizes {
        rows.push(one(env, h)?);
    }
    println!(
        "\nfederated learning at real sizes ({} agents, {ROUNDS} rounds, fp32 codec; debug/release as built)",
        agent_count()
    );
    println!(
        "| weights | MiB of f32 | round s (each) | updates in (late) / selected, close (each) | MiB out / in per round | agent RSS before MiB | agent extra peak MiB (RSS) | extra / weights | extra anonymous peak / weights | coordinator peak MiB | accuracy |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let wmib = r.weights as f64 * 4.0 / 1048576.0;
        let extra = mib(r.agent_peak_kib.saturating_sub(r.agent_before_kib));
        println!(
            "| {} | {:.1} | {} | {} | {:.1} / {:.1} | {:.1} | {:.1} | {:.2}x | {:.2}x | {:.1} | {:.3} |",
            r.weights,
            wmib,
            r.round_s
                .iter()
                .map(|s| format!("{s:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            r.updates.join(", "),
            r.bytes_out as f64 / 1048576.0 / ROUNDS as f64,
            r.bytes_in as f64 / 1048576.0 / ROUNDS as f64,
            mib(r.agent_before_kib),
            extra,
            extra / wmib,
            mib(r
                .agent_anon_peak_kib
                .saturating_sub(r.agent_anon_before_kib))
                / wmib,
            mib(r.coord_peak_kib),
            r.accuracy
        );
    }
    Ok(())
}

fn one(env: &TestEnv, h: u32) -> Result<Row> {
    let root = env.path(&format!("h{h}"));
    let coord = Coordinator::start_embedded(&root.join("coordinator"))?;
    let mut journal = coord.journal();
    let key = SigningKey::generate(&root.join("keys/deploy.key"))?;
    let layers = onnx_builder::mlp_layers(&[64, h, h, 10], 1);
    let model = onnx_builder::mlp(&layers);
    let weights: usize = layers.iter().map(|l| l.weight.len() + l.bias.len()).sum();
    let task_dir = root.join("task");
    let (d, shards) = federated_data(&task_dir, agent_count(), Split::Iid, &model)?;
    let mut agents = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("big{h}-{i}");
        let mut o = AgentOptions::new(name.clone(), coord.url());
        federated_agent(
            &mut o,
            &root.join(format!("pipelines/{name}")),
            &d,
            shard,
            &model,
            &key,
        )?;
        let mut sandbox = toml::Table::new();
        sandbox.insert("max_memory_bytes".into(), toml::Value::Integer(1 << 30));
        sandbox.insert("train_timeout_ms".into(), toml::Value::Integer(600_000));
        o.extra
            .insert("sandbox".into(), toml::Value::Table(sandbox));
        agents.push(Agent::start(&root.join(&name), o)?);
        journal.wait_registered(&name, WAIT)?;
    }
    // The pipeline runs its model before the task starts: what the agent holds anyway.
    std::thread::sleep(Duration::from_secs(3));
    let pid = agents[0].pid().context("agent pid")?;
    let cpid = coord.pid().context("coordinator pid")?;
    let agent_before_kib = status_kib(pid, "VmRSS:")?;
    let agent_anon_before_kib = status_kib(pid, "RssAnon:")?;
    reset_peak(pid)?;
    reset_peak(cpid)?;
    let started = Instant::now();
    let mut task = FlTask::new("big", ROUNDS, agent_count());
    task.extra = "max_extensions = 30".into();
    // Agent 0's RSS and anonymous memory every 20 ms, attributed to the phase its log last announced.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, log) = (stop.clone(), agents[0].log_path().to_owned());
        std::thread::spawn(move || sample_phases(pid, &log, &stop))
    };
    task.start(&coord, &task_dir, &key)?;
    journal.wait_for("task big finished", WAIT, |j| task_finished(j, "big"))?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let phases = sampler.join().expect("sampler");
    let times = |kib: u64| kib as f64 * 1024.0 / (weights as f64 * 4.0);
    for p in &phases {
        let (rss, anon) = (
            p.rss_kib.saturating_sub(agent_before_kib),
            p.anon_kib.saturating_sub(agent_anon_before_kib),
        );
        println!(
            "  agent peak while {}: RSS +{:.1} MiB over before ({:.2}x the weights), anonymous +{:.1} MiB ({:.2}x)",
            p.name,
            rss as f64 / 1024.0,
            times(rss),
            anon as f64 / 1024.0,
            times(anon),
        );
    }
    let agent_anon_peak_kib = phases.iter().map(|p| p.anon_kib).max().unwrap_or(0);
    let agent_peak_kib = status_kib(pid, "VmHWM:")?;
    let coord_peak_kib = status_kib(cpid, "VmHWM:")?;
    let events = journal.events();
    let closed = closed_rounds(events, "big");
    ensure!(
        closed.len() == ROUNDS as usize,
        "rounds closed: {}",
        closed.len()
    );
    let f = |e: &edge_tests::Event, k: &str| e.f64_field(k).unwrap_or(0.0);
    let round_s = closed
        .iter()
        .map(|e| (f(e, "closed_ms") - f(e, "opened_ms")) / 1000.0)
        .collect();
    let updates = closed
        .iter()
        .map(|e| {
            format!(
                "{} ({}) / {}, {}",
                f(e, "received"),
                f(e, "late"),
                f(e, "selected"),
                e.str_field("close_reason").unwrap_or("?")
            )
        })
        .collect();
    let bytes_out = closed.iter().map(|e| f(e, "bytes_out") as u64).sum();
    let bytes_in = closed.iter().map(|e| f(e, "bytes_in") as u64).sum();
    let accuracy = closed.last().map(|e| f(e, "eval_accuracy")).unwrap_or(0.0);
    println!(
        "{weights} weights: task done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Row {
        weights,
        round_s,
        updates,
        bytes_out,
        bytes_in,
        agent_before_kib,
        agent_peak_kib,
        agent_anon_before_kib,
        agent_anon_peak_kib,
        coord_peak_kib,
        accuracy,
    })
}

/// The phases of a round as the agent's log announces them, in order.
const PHASES: [(&str, &str); 5] = [
    ("fetching the round's weights", "fetching chunks"),
    (
        "round weights complete",
        "applying the weights (new ONNX Runtime session)",
    ),
    ("global weights applied", "training (trainer module)"),
    (
        "round trained; forming the update",
        "forming and queuing the update",
    ),
    ("federated update queued", "after queuing the update"),
];

/// A phase's peak memory, sampled.
struct PhasePeak {
    name: &'static str,
    /// VmRSS: anonymous memory and the resident pages of mapped files (the model's data files
    /// that ONNX Runtime maps: clean page cache, which the kernel can drop and read again).
    rss_kib: u64,
    /// RssAnon: the memory only the agent holds.
    anon_kib: u64,
}

/// Peak VmRSS and RssAnon (KiB) per phase until `stop`, sampled every 20 ms.
fn sample_phases(
    pid: u32,
    log: &std::path::Path,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<PhasePeak> {
    let mut peaks: Vec<PhasePeak> = PHASES
        .iter()
        .map(|(_, name)| PhasePeak {
            name,
            rss_kib: 0,
            anon_kib: 0,
        })
        .collect();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let phase = PHASES
            .iter()
            .enumerate()
            .filter_map(|(i, (marker, _))| text.rfind(marker).map(|at| (at, i)))
            .max()
            .map(|(_, i)| i);
        if let (Some(i), Ok(rss), Ok(anon)) = (
            phase,
            status_kib(pid, "VmRSS:"),
            status_kib(pid, "RssAnon:"),
        ) {
            peaks[i].rss_kib = peaks[i].rss_kib.max(rss);
            peaks[i].anon_kib = peaks[i].anon_kib.max(anon);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    peaks
}
