//! One simulated device: the agent's own parts (identity and enrollment, outbox, uplink with
//! its MQTT connection, deploy task with its state machine, telemetry), wired as `agent::run`
//! wires them, with two stand-ins: the pipeline host is [`SimHost`], which starts nothing and
//! reports the candidate's health by the scenario's rule, and ONNX Runtime is absent.
//!
//! **Invariant:** every message a simulated device sends or takes goes through the agent
//! library (sealed by its enrollment session, queued in its outbox); this file only wires and
//! records. **Boundary:** started and stopped by [`crate::fleet`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use edge_agent::agent::{AGENT_VERSION, registration};
use edge_agent::config::Config;
use edge_agent::dataset::{Dataset, Sample};
use edge_agent::deploy::task::{self, DeployParts, DeployTask};
use edge_agent::enrollment::{self, Enrollment};
use edge_agent::fl::{self, FlDeps, FlState, FlTask, LocalTrainer, RoundError, TrainingSetup};
use edge_agent::inbox::Inbox;
use edge_agent::inference::Inference;
use edge_agent::link;
use edge_agent::outbox::{MemoryStore, NewMessage, Outbox};
use edge_agent::pipeline::{Command, HostHandle, Origin, RunningSlot, Stats};
use edge_agent::sandbox::trainer::{Param, SampleSource, TrainResult};
use edge_agent::statedb::StateDb;
use edge_agent::{telemetry, uplink};
use protocol::v1::{Class, topics};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::scenario::FlRole;
use crate::timeline::Timeline;

/// What a device runs (live) or tries (candidate), as the results report it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Running {
    pub pipeline: String,
    pub deployment_id: String,
    pub version: u64,
}

/// What the simulator knows of a device, updated as it runs; the end state is read from it.
#[derive(Debug, Default)]
pub struct DeviceState {
    pub live: Option<Running>,
    pub candidates: u32,
    pub health_failed: u32,
    pub committed: u32,
    pub discarded: u32,
    pub enrolled: bool,
    pub reboots: u32,
    pub power_cuts: u32,
    pub delivered: u64,
    pub queued: u64,
    /// Federated rounds this device trained (its update queued, or, for a dropout, never).
    pub fl_trained: u32,
    /// Global version of the newest round message it verified (0: none).
    pub fl_version: u32,
    /// Round messages it refused (forged, for another device, replayed), over its restarts.
    pub fl_rejected: u64,
}

/// How one device is set up; cheap to clone for a restart.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub id: String,
    pub group: String,
    pub config: Config,
    /// Candidates whose pipeline this rule names fail their health check.
    pub fails_health: Option<crate::scenario::HealthRule>,
    /// Federated learning, if the scenario has it.
    pub fl: Option<FlSpec>,
    /// Where the outbox keeps its records (`[fleet] outbox`).
    pub outbox: crate::scenario::OutboxStore,
}

/// Page cache of a simulated device's state database: it holds a few small trees.
const STATE_CACHE_BYTES: u64 = 256 * 1024;

/// The agent's state database for a simulated device: the same sled trees, without sled's
/// flusher thread (one per database: 10,000 devices would mean 10,000 threads) and with a
/// small cache. What the agent syncs is still synced ([`StateDb::sync`] at every step).
fn open_state(state_dir: &std::path::Path) -> Result<StateDb> {
    let dir = state_dir.join("state");
    let db = sled::Config::new()
        .path(&dir)
        .cache_capacity(STATE_CACHE_BYTES)
        .flush_every_ms(None)
        .open()
        .with_context(|| format!("cannot open the state database {}", dir.display()))?;
    Ok(StateDb { db, dir })
}

/// A device's part in federated learning.
#[derive(Debug, Clone)]
pub struct FlSpec {
    pub section: crate::scenario::FlSection,
    pub role: FlRole,
    pub model_bytes: Arc<Vec<u8>>,
    /// Set when the fleet stops: a dropout's endless training gives up.
    pub stopping: Arc<AtomicBool>,
}

/// A started device; [`RunningDevice::stop`] drains it the way the agent shuts down.
pub struct RunningDevice {
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    outbox: Arc<Outbox>,
    state: StateDb,
    sessions: enrollment::SessionWatch,
    fl: Arc<edge_agent::fl::FlStats>,
}

impl RunningDevice {
    /// Starts the device's tasks. `shared` is where its state is recorded; `records` holds
    /// its outbox when the scenario keeps outboxes in memory (the same records across a
    /// reboot, fresh ones after a power cut).
    pub async fn start(
        spec: &DeviceSpec,
        shared: Arc<Mutex<DeviceState>>,
        timeline: Timeline,
        records: &MemoryStore,
    ) -> Result<RunningDevice> {
        let cfg = &spec.config;
        let device = spec.id.clone();
        std::fs::create_dir_all(&cfg.state_dir)
            .with_context(|| format!("cannot create {}", cfg.state_dir.display()))?;
        let outbox = match spec.outbox {
            crate::scenario::OutboxStore::Memory => {
                Outbox::open_in_memory(&cfg.state_dir.join("outbox"), records.clone(), &cfg.outbox)?
            }
            crate::scenario::OutboxStore::Disk => {
                let (dir, ocfg) = (cfg.state_dir.clone(), cfg.outbox.clone());
                tokio::task::spawn_blocking(move || Outbox::open(&dir, &ocfg))
                    .await
                    .context("outbox open task")??
            }
        };
        let outbox = Arc::new(outbox);
        let inference = Inference::unavailable("simulated device: no onnx runtime");
        let enrolling = {
            let hardware = enrollment::hardware(AGENT_VERSION, Vec::new());
            Enrollment::open(&cfg.state_dir, &cfg.enrollment, &device, hardware)?
        };
        let sessions = enrolling.watch();
        let boot_id = format!("{:016x}", rand::random::<u64>());
        let groups = sessions
            .borrow()
            .as_ref()
            .map(|s| s.groups().to_vec())
            .unwrap_or_default();
        let reg = NewMessage {
            class: Class::Control,
            topic: topics::register(&device),
            body: serde_json::to_vec(&registration(&inference, &boot_id, groups))?,
            ttl: None,
        };
        outbox.enqueue(reg).await?;

        let inbox = Inbox::default();
        let (link_tx, link) = link::link_state();
        let (enroll_tx, enroll_rx) = link::enroll_path();
        let auth = Arc::new(link::AuthStats::default());
        let answers = inbox.subscribe(&topics::enroll_answer(&device), enrollment::INBOX_CAPACITY);
        let uplink = uplink::Uplink::new(
            cfg.mqtt.clone(),
            device.clone(),
            AGENT_VERSION.into(),
            outbox.clone(),
            uplink::Links {
                inbox: inbox.clone(),
                link: link_tx,
                direct: None,
                session: sessions.clone(),
                enroll: Some(enroll_rx),
                auth: auth.clone(),
            },
        )?;
        let state = open_state(&cfg.state_dir)?;
        let (deployer, store, restored) = task::open_deployer(&state, &device, cfg.deploy.clone())?;
        let deploy_sub = inbox.subscribe_all(
            &topics::agent_deploy_filters(&device, &[]),
            task::INBOX_CAPACITY,
        );
        let slot = RunningSlot::default();
        let (host, commands) = HostHandle::channel();
        let deploy_task = DeployTask::new(
            deployer,
            store,
            DeployParts {
                state: state.clone(),
                outbox: outbox.clone(),
                device: device.clone(),
                inference: inference.clone(),
                host,
                link: link.clone(),
                local: None,
                inbox: inbox.clone(),
                session: sessions.clone(),
            },
        );
        let sim_host = SimHost {
            device: device.clone(),
            rule: spec.fails_health.clone(),
            slot: slot.clone(),
            shared: shared.clone(),
            timeline: timeline.clone(),
            candidate: None,
            live: None,
        };

        let (stop_tx, stop_rx) = watch::channel(false);
        let fl_stats = Arc::default();
        let fl_task = match &spec.fl {
            Some(f) => Some(federated(
                f,
                &device,
                &state,
                cfg,
                &outbox,
                &sessions,
                &inference,
                &inbox,
                shared.clone(),
                timeline.clone(),
            )?),
            None => None,
        };
        let fl_stats = fl_task
            .as_ref()
            .map_or(fl_stats, |(t, _): &(FlTask, _)| t.stats.clone());
        let mut tasks = vec![
            ("pipeline-host", tokio::spawn(sim_host.run(commands))),
            (
                "deploy",
                tokio::spawn(deploy_task.run(restored, deploy_sub, stop_rx.clone())),
            ),
            (
                "enrollment",
                tokio::spawn(enrolling.run(answers, link.clone(), enroll_tx, stop_rx.clone())),
            ),
            (
                "sim-watch",
                tokio::spawn(watch_enrollment(
                    device.clone(),
                    sessions.clone(),
                    shared.clone(),
                    timeline.clone(),
                    stop_rx.clone(),
                )),
            ),
        ];
        if let Some((t, sub)) = fl_task {
            tasks.push((
                "federated-learning",
                tokio::spawn(t.run(sub, stop_rx.clone())),
            ));
        }
        if cfg.telemetry.interval_s > 0 {
            tasks.push((
                "telemetry",
                tokio::spawn(telemetry::run(
                    device.clone(),
                    Duration::from_secs(cfg.telemetry.interval_s),
                    telemetry::Sources {
                        outbox: outbox.clone(),
                        pipeline: slot,
                        inference,
                        fl: fl_stats.clone(),
                        offload: None,
                        auth,
                        session: sessions.clone(),
                    },
                    stop_rx.clone(),
                )),
            ));
        }
        tasks.push(("uplink", tokio::spawn(uplink.run(stop_rx))));
        Ok(RunningDevice {
            stop: stop_tx,
            tasks,
            outbox,
            state,
            sessions,
            fl: fl_stats,
        })
    }

    pub fn enrolled(&self) -> bool {
        self.sessions.borrow().is_some()
    }

    pub fn outbox_figures(&self) -> (u64, u64) {
        let st = self.outbox.stats();
        (st.delivered, st.depth.iter().sum())
    }

    /// Adds what its federated-learning task saw since it started to `st`.
    pub fn record_fl(&self, st: &mut DeviceState) {
        if let Some(t) = self.fl.telemetry() {
            st.fl_version = st.fl_version.max(t.version);
            st.fl_rejected += t.rejected;
        }
    }

    /// Stops every task (in the agent's order) and makes the outbox and state durable.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        for (name, h) in self.tasks {
            if let Err(e) = h.await {
                tracing::error!(task = name, error = %e, "simulated device task ended abnormally");
            }
        }
        self.outbox.close().await?;
        self.state.sync()?;
        Ok(())
    }
}

/// The agent's federated-learning task for a device: its dataset filled with synthetic
/// labeled samples, the scenario's model published as what the running pipeline trains, and
/// the synthetic trainer in place of the WASM module.
#[allow(clippy::too_many_arguments)]
fn federated(
    f: &FlSpec,
    device: &str,
    state: &StateDb,
    cfg: &Config,
    outbox: &Arc<Outbox>,
    sessions: &enrollment::SessionWatch,
    inference: &Inference,
    inbox: &Inbox,
    shared: Arc<Mutex<DeviceState>>,
    timeline: Timeline,
) -> Result<(FlTask, edge_agent::inbox::Subscription)> {
    const DATASET: &str = "sim";
    let dataset = Arc::new(Dataset::open(&state.db, &cfg.dataset)?);
    let have = dataset.samples(DATASET)?.len();
    for i in have..f.section.samples as usize {
        dataset.append(
            DATASET,
            &Sample {
                timestamp_ms: protocol::v1::now_ms(),
                label: Some(i64::try_from(i % 10).unwrap_or(0)),
                features: vec![0.0; f.section.inputs as usize],
            },
        )?;
    }
    let slot = fl::TrainingSlot::default();
    slot.set(Some(Arc::new(TrainingSetup {
        pipeline: "simulated".into(),
        model: f.section.model.clone(),
        model_bytes: f.model_bytes.to_vec(),
        model_data: Default::default(),
        trainer_name: "synthetic".into(),
        trainer_bytes: Vec::new(),
        dataset: DATASET.into(),
    })));
    let task = FlTask::new(FlDeps {
        device: device.to_owned(),
        session: sessions.clone(),
        inbox: inbox.clone(),
        state: FlState::open(&state.db, cfg.state_dir.join("fl"))?,
        outbox: outbox.clone(),
        dataset,
        trainer: Arc::new(SyntheticTrainer {
            device: device.to_owned(),
            role: f.role,
            delay: Duration::from_secs_f64(f.section.straggler_delay_s.max(0.0)),
            stopping: f.stopping.clone(),
            shared,
            timeline,
        }),
        inference: inference.clone(),
        slot,
        // Simulated models have no external data files.
        weights_dir: None,
    });
    let sub = inbox.subscribe_all(&fl::topics(device), fl::INBOX_CAPACITY);
    Ok((task, sub))
}

/// The simulator's trainer: moves every weight a little (a deterministic step scaled by the
/// order's learning rate), so an update has the model's exact shapes and finite values and
/// costs microseconds. Stragglers answer after a delay; dropouts never answer.
struct SyntheticTrainer {
    device: String,
    role: FlRole,
    delay: Duration,
    stopping: Arc<AtomicBool>,
    shared: Arc<Mutex<DeviceState>>,
    timeline: Timeline,
}

impl LocalTrainer for SyntheticTrainer {
    fn train(
        &self,
        setup: &TrainingSetup,
        weights: Vec<Param>,
        params_json: &str,
        samples: Arc<dyn SampleSource>,
    ) -> Result<TrainResult, RoundError> {
        match self.role {
            FlRole::Dropout => {
                self.timeline.record(&self.device, "fl-dropout", "");
                // Gone for the rest of the run: the round never hears from this device.
                while !self.stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                return Err(RoundError::Trainer {
                    module: setup.trainer_name.clone(),
                    kind: protocol::v1::fl::FailureKind::Resources,
                    reason: "simulated dropout: the simulator stopped".into(),
                });
            }
            FlRole::Straggler => std::thread::sleep(self.delay),
            FlRole::Prompt => {}
        }
        let lr = serde_json::from_str::<serde_json::Value>(params_json)
            .ok()
            .and_then(|v| v.get("lr").and_then(serde_json::Value::as_f64))
            .unwrap_or(0.1) as f32;
        let weights = weights
            .into_iter()
            .map(|mut p| {
                for (i, w) in p.data.iter_mut().enumerate() {
                    // Small, deterministic, finite.
                    *w -= lr * 0.01 * ((i % 7) as f32 - 3.0) / 3.0;
                }
                p
            })
            .collect();
        let n = samples.count();
        let trained = {
            let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            s.fl_trained += 1;
            s.fl_trained
        };
        self.timeline
            .record(&self.device, "fl-trained", &format!("{trained}"));
        Ok(TrainResult {
            weights,
            samples: n,
            loss: 1.0 / (1.0 + trained as f32),
            accuracy: 1.0 - 1.0 / (1.0 + trained as f32),
        })
    }
}

/// Records the moment a device's enrollment session appears.
async fn watch_enrollment(
    device: String,
    mut sessions: enrollment::SessionWatch,
    shared: Arc<Mutex<DeviceState>>,
    timeline: Timeline,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let enrolled = sessions.borrow_and_update().is_some();
        let newly = {
            let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
            let newly = enrolled && !s.enrolled;
            s.enrolled = enrolled;
            newly
        };
        if newly {
            timeline.record(&device, "enrolled", "");
            return;
        }
        tokio::select! {
            r = sessions.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// The simulator's pipeline host: answers the deploy task's commands as the real host would,
/// without running anything. A candidate "processes" one frame per health poll; on a device
/// the health rule names, it reports a failure instead.
struct SimHost {
    device: String,
    rule: Option<crate::scenario::HealthRule>,
    slot: RunningSlot,
    shared: Arc<Mutex<DeviceState>>,
    timeline: Timeline,
    candidate: Option<Candidate>,
    live: Option<Running>,
}

/// The candidate in "shadow": frames counted by health polls, and whether its failure was
/// recorded (the deploy task polls until it decides).
struct Candidate {
    running: Running,
    frames: u64,
    failure_noted: bool,
    started: std::time::Instant,
}

impl SimHost {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            self.handle(cmd);
        }
        self.slot.set(None);
    }

    fn running(spec_name: &str, origin: &Origin) -> Running {
        Running {
            pipeline: spec_name.to_owned(),
            deployment_id: origin.deployment_id.clone(),
            version: origin.version,
        }
    }

    fn go_live(&mut self, r: Running) {
        self.slot.set(Some(Arc::new(Stats::without_nodes(
            r.pipeline.clone(),
            Origin {
                deployment_id: r.deployment_id.clone(),
                version: r.version,
            },
        ))));
        self.timeline.record(
            &self.device,
            "live",
            &format!("{} v{} ({})", r.pipeline, r.version, r.deployment_id),
        );
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).live = Some(r.clone());
        self.live = Some(r);
    }

    fn handle(&mut self, cmd: Command) {
        let shared = self.shared.clone();
        let note = |f: &dyn Fn(&mut DeviceState)| {
            f(&mut shared.lock().unwrap_or_else(|p| p.into_inner()));
        };
        match cmd {
            Command::Start(launch, reply) => {
                let started = self.live.is_none();
                if started {
                    self.go_live(Self::running(&launch.spec.name, &launch.origin));
                }
                let _ = reply.send(Ok(started));
            }
            Command::Shadow(launch, reply) => {
                let r = Self::running(&launch.spec.name, &launch.origin);
                self.timeline.record(
                    &self.device,
                    "candidate",
                    &format!("{} v{} ({})", r.pipeline, r.version, r.deployment_id),
                );
                note(&|s| s.candidates += 1);
                self.candidate = Some(Candidate {
                    running: r,
                    frames: 0,
                    failure_noted: false,
                    started: std::time::Instant::now(),
                });
                let _ = reply.send(Ok(()));
            }
            Command::Swap(launch, reply) => {
                self.candidate = None;
                note(&|s| s.committed += 1);
                self.go_live(Self::running(&launch.spec.name, &launch.origin));
                let _ = reply.send(Ok(()));
            }
            Command::Discard(reply) => {
                if let Some(Candidate { running: r, .. }) = self.candidate.take() {
                    note(&|s| s.discarded += 1);
                    self.timeline.record(
                        &self.device,
                        "discarded",
                        &format!("{} v{}", r.pipeline, r.version),
                    );
                }
                let _ = reply.send(());
            }
            Command::CandidateHealth(reply) => {
                let rule = self.rule.as_ref();
                let health = self.candidate.as_mut().map(|c| {
                    let doomed = rule.filter(|r| r.applies_to(&c.running.pipeline));
                    match doomed {
                        // A failing candidate makes no progress until it fails.
                        Some(r) if c.started.elapsed().as_secs_f64() < r.fail_after_s => (0, None),
                        Some(_) => {
                            if !c.failure_noted {
                                c.failure_noted = true;
                                note(&|s| s.health_failed += 1);
                                self.timeline.record(
                                    &self.device,
                                    "health-failed",
                                    &format!("{} v{}", c.running.pipeline, c.running.version),
                                );
                            }
                            let reason = "simulated: the scenario's health rule fails this device";
                            (0, Some(reason.to_owned()))
                        }
                        None => {
                            c.frames += 1;
                            (c.frames, None)
                        }
                    }
                });
                let _ = reply.send(health);
            }
            Command::IsRunning(reply) => {
                let _ = reply.send(self.live.is_some());
            }
            // A remote `cmd DEVICE restart-pipeline`: the simulated pipeline starts again as it was.
            Command::Restart(reply) => {
                let name = self.live.as_ref().map(|r| r.pipeline.clone());
                if let Some(r) = &name {
                    self.timeline.record(&self.device, "restarted", r);
                }
                let _ = reply.send(Ok(name));
            }
        }
    }
}
