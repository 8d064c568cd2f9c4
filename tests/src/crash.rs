//! The crash loop: an agent under heavy local-API load is SIGKILLed at random moments and
//! restarted, over and over; afterwards every message it acknowledged must be in the journal.
//!
//! Shared by the `crash_loop` test (a few dozen kills) and `cargo xtask soak` (hundreds).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use protocol::v1::Class;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::agent::{Agent, AgentOptions};
use crate::coordinator::Coordinator;
use crate::delivery::{DeliveryReport, Expected};
use crate::local_api::{LocalApi, Publish};

/// Knobs of one crash loop.
#[derive(Debug, Clone)]
pub struct CrashLoopOptions {
    /// SIGKILLs to deliver.
    pub kills: u32,
    /// Seeds the kill delays (the interleaving with the writers is up to the scheduler).
    pub seed: u64,
    /// Concurrent local API connections publishing.
    pub writers: usize,
    /// Requests per pipelined batch.
    pub batch: usize,
    /// Total publish rate cap in messages per second; `None` publishes as fast as the agent
    /// answers.
    pub rate: Option<u32>,
    /// Range (ms) of the random time between the agent being ready and the next SIGKILL.
    pub kill_delay_ms: (u64, u64),
    pub device_id: String,
    /// How long delivery may stall (no accepted message reaching the journal) after the load
    /// stops.
    pub delivery_timeout: Duration,
    /// Print a progress line every few kills (for `cargo xtask soak`).
    pub verbose: bool,
}

impl Default for CrashLoopOptions {
    fn default() -> Self {
        CrashLoopOptions {
            kills: 20,
            seed: 1,
            writers: 3,
            batch: 16,
            rate: None,
            kill_delay_ms: (50, 400),
            device_id: "crash-1".into(),
            delivery_timeout: crate::DELIVERY_TIMEOUT,
            verbose: false,
        }
    }
}

/// What a crash loop observed.
#[derive(Debug, Clone, Default)]
pub struct CrashLoopReport {
    pub kills: u32,
    pub seed: u64,
    /// Requests written to the local API.
    pub sent: u64,
    /// Requests answered `ok: true`: the agent owes their delivery.
    pub accepted: u64,
    /// Requests answered `ok: false` (none are expected in this scenario).
    pub refused: u64,
    pub first_refusal: Option<String>,
    /// Requests in flight when a kill dropped the connection: neither accepted nor refused.
    pub unanswered: u64,
    /// Responses that were not valid protocol lines, or accepted with another class.
    pub protocol_errors: Vec<String>,
    /// The journal check for every accepted message.
    pub delivery: DeliveryReport,
    /// Set if the accepted messages did not all arrive in time.
    pub delivery_error: Option<String>,
    /// Set if the agent or the coordinator died on its own.
    pub process_error: Option<String>,
    pub elapsed: Duration,
}

impl CrashLoopReport {
    /// True if every accepted message arrived once, in order, and nothing else went wrong.
    pub fn is_ok(&self) -> bool {
        self.accepted > 0
            && self.refused == 0
            && self.protocol_errors.is_empty()
            && self.delivery_error.is_none()
            && self.process_error.is_none()
            && self.delivery.is_ok()
    }
}

impl fmt::Display for CrashLoopReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "crash loop: {} kills (seed {}) in {:.1?}: sent {}, accepted {}, refused {}, unanswered at kill {}",
            self.kills,
            self.seed,
            self.elapsed,
            self.sent,
            self.accepted,
            self.refused,
            self.unanswered
        )?;
        write!(f, "{}", self.delivery)?;
        if let Some(r) = &self.first_refusal {
            writeln!(f, "  first refusal: {r}")?;
        }
        for e in self.protocol_errors.iter().take(5) {
            writeln!(f, "  protocol error: {e}")?;
        }
        if let Some(e) = &self.delivery_error {
            writeln!(f, "  delivery: {e}")?;
        }
        if let Some(e) = &self.process_error {
            writeln!(f, "  process: {e}")?;
        }
        writeln!(
            f,
            "  verdict: {}",
            if self.is_ok() { "PASS" } else { "FAIL" }
        )
    }
}

#[derive(Default)]
struct Tally {
    expected: Vec<Expected>,
    sent: u64,
    refused: u64,
    first_refusal: Option<String>,
    unanswered: u64,
    protocol_errors: Vec<String>,
}

/// Writer threads; dropping stops and joins them, so an early return leaves none behind.
struct Writers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Writers {
    fn start(opts: &CrashLoopOptions, socket: PathBuf, tally: &Arc<Mutex<Tally>>) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = opts.rate.map(|rate| {
            let per_writer = f64::from(rate.max(1)) / opts.writers.max(1) as f64;
            Duration::from_secs_f64(opts.batch as f64 / per_writer)
        });
        let handles = (0..opts.writers)
            .map(|w| {
                let (stop, socket, tally) = (stop.clone(), socket.clone(), tally.clone());
                let batch = opts.batch.max(1);
                std::thread::spawn(move || writer(w, &socket, batch, pause, &stop, &tally))
            })
            .collect();
        Writers { stop, handles }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop();
    }
}

const CLASSES: [Class; 3] = [Class::Control, Class::Results, Class::Telemetry];

fn writer(
    w: usize,
    socket: &Path,
    batch: usize,
    pause: Option<Duration>,
    stop: &AtomicBool,
    tally: &Mutex<Tally>,
) {
    let mut n: u64 = 0;
    let mut api: Option<LocalApi> = None;
    while !stop.load(Ordering::SeqCst) {
        let Some(conn) = api.as_mut() else {
            // The agent is down or restarting: keep knocking.
            match LocalApi::connect(socket) {
                Ok(c) => api = Some(c),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
            continue;
        };
        let msgs: Vec<Publish> = (0..batch)
            .map(|_| {
                n += 1;
                let class = CLASSES[(n % 3) as usize];
                Publish::new(
                    format!("crash/w{w}"),
                    class,
                    serde_json::json!({ "writer": w, "n": n, "pad": "x".repeat(64) }),
                )
            })
            .collect();
        let started = Instant::now();
        let out = conn.publish_batch(&msgs);
        {
            let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
            t.sent += msgs.len() as u64;
            t.unanswered += out.unanswered as u64;
            for (i, acc) in out.accepted() {
                if Some(acc.class) != msgs[i].class {
                    t.protocol_errors.push(format!(
                        "request of class {:?} accepted as class {} (id {})",
                        msgs[i].class, acc.class, acc.id
                    ));
                }
                t.expected
                    .push(Expected::new(acc, &msgs[i].stream, &msgs[i].payload));
            }
            for (_, err) in out.refused() {
                t.refused += 1;
                t.first_refusal.get_or_insert_with(|| err.to_owned());
            }
            if let Some(bad) = &out.malformed {
                t.protocol_errors
                    .push(format!("malformed response line {bad:?}"));
            }
        }
        if out.error.is_some() {
            api = None;
            continue;
        }
        if let Some(p) = pause {
            std::thread::sleep(p.saturating_sub(started.elapsed()));
        }
    }
}

/// Runs the crash loop in `dir` (a coordinator with its embedded broker and one agent) and
/// reports. Errs only if the harness itself cannot run (e.g. a binary is missing); contract
/// violations are in the report.
pub fn crash_loop(dir: &Path, opts: &CrashLoopOptions) -> Result<CrashLoopReport> {
    let started = Instant::now();
    let (min_delay, max_delay) = opts.kill_delay_ms;
    if min_delay > max_delay {
        bail!("kill delay range {min_delay}..{max_delay} ms is empty");
    }
    // A soak journals hundreds of MB: no rotation, so every event stays readable in one file.
    let coord_dir = dir.join("coordinator");
    std::fs::create_dir_all(&coord_dir)?;
    let config = coord_dir.join("coordinator.toml");
    std::fs::write(&config, "[journal]\nmax_bytes = 17179869184\n")?;
    let mut coord = Coordinator::start_embedded_with_args(
        &coord_dir,
        vec!["--config".into(), config.display().to_string()],
    )?;
    let mut agent_opts = AgentOptions::new(&opts.device_id, coord.url());
    agent_opts.telemetry_interval_s = 1;
    let mut agent = Agent::start(&dir.join("agent"), agent_opts)?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut writers = Writers::start(opts, agent.socket_path(), &tally);
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut report = CrashLoopReport {
        seed: opts.seed,
        ..CrashLoopReport::default()
    };

    for k in 1..=opts.kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(min_delay..=max_delay)));
        if !agent.is_running() {
            report.process_error = Some(format!(
                "the agent exited on its own before kill {k}; its log:\n{}",
                crate::process::tail(&agent.last_log(), 40)
            ));
            break;
        }
        agent.kill()?;
        report.kills = k;
        if let Err(e) = agent.restart() {
            report.process_error = Some(format!("restart after kill {k} failed: {e:#}"));
            break;
        }
        if opts.verbose && (k % 10 == 0 || k == opts.kills) {
            let t = tally.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!(
                "  kill {k}/{}: {} accepted so far ({:.0?})",
                opts.kills,
                t.expected.len(),
                started.elapsed()
            );
        }
    }
    // The last start takes some traffic too, then the load stops and delivery catches up.
    std::thread::sleep(Duration::from_millis(rng.gen_range(min_delay..=max_delay)));
    writers.stop();

    let t = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    report.sent = t.sent;
    report.accepted = t.expected.len() as u64;
    report.refused = t.refused;
    report.first_refusal = t.first_refusal;
    report.unanswered = t.unanswered;
    report.protocol_errors = t.protocol_errors;

    let mut journal = coord.journal();
    if report.process_error.is_none() {
        if opts.verbose {
            eprintln!(
                "  waiting for {} accepted messages to reach the coordinator",
                report.accepted
            );
        }
        if let Err(e) = journal.wait_for_data_ids(
            &opts.device_id,
            t.expected.iter().map(|x| x.id.as_str()),
            opts.delivery_timeout,
        ) {
            report.delivery_error = Some(format!("{e:#}"));
        }
    }
    journal.refresh()?;
    report.delivery = DeliveryReport::check(&journal, &opts.device_id, &t.expected);
    if report.process_error.is_none() {
        if !agent.is_running() {
            report.process_error =
                Some("the agent exited on its own after the last restart".into());
        } else if !coord.is_running() {
            report.process_error = Some("the coordinator exited during the crash loop".into());
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}
