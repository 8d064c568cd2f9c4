//! Wires the agent's parts together and owns their lifetimes.
//!
//! Tasks: the uplink (outbox -> MQTT), enrollment (device identity, the request/answer
//! exchange, the session every message is sealed with), telemetry (sysinfo -> outbox), the
//! local API (socket -> outbox), the deploy task (which pipeline and models run), the pipeline
//! host (runs them) and federated learning (rounds -> local training -> outbox). ONNX Runtime
//! is only probed here (it loads with the first model, see `inference`), the WASM engine is
//! built with the first module (see `sandbox`), and the identity files are opened (the boot epoch
//! raised) before the uplink can seal anything. Each is spawned here, told to stop through one watch channel, and
//! joined before the outbox is made durable for the last time. systemd hears about it all
//! through [`sd_notify`](crate::sd_notify): ready, alive (watchdog), stopping.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use protocol::v1::{Class, Registration, topics};
use tokio::sync::watch;

use crate::config::Config;
use crate::dataset::{Dataset, DatasetError};
use crate::deploy::task::{self, DeployParts, DeployTask, TaskError};
use crate::enrollment::{self, Enrollment, EnrollmentError};
use crate::inbox::Inbox;
use crate::inference::Inference;
use crate::link::{self, LinkWatch};
use crate::outbox::{NewMessage, Outbox, OutboxError};
use crate::pipeline::{Deps, LocalFiles, PipelineHost, PipelineSpec, RunningSlot};
use crate::sandbox::{Sandbox, SandboxError};
use crate::sd_notify::Notifier;
use crate::statedb::{StateDb, StateDbError};
use crate::{identity, local_api, telemetry, uplink};

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Enrollment(#[from] EnrollmentError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    LocalApi(#[from] local_api::LocalApiError),
    #[error(transparent)]
    Uplink(#[from] uplink::UplinkError),
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    StateDb(#[from] StateDbError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("cannot start the WASM sandbox: {0}")]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Deploy(#[from] TaskError),
    #[error("local pipeline {path}: {reason}")]
    LocalPipeline { path: String, reason: String },
    #[error("a task panicked: {0}")]
    Task(String),
    #[error("cannot serve metrics: {0}")]
    Metrics(std::io::Error),
}

/// Runs the agent until `shutdown` resolves, then drains and makes the outbox durable.
/// `notify` tells systemd when start-up is done, that the agent is alive, and when it stops
/// ([`Notifier::disabled`] when not under systemd). `compiler`: where WASM modules compile
/// (the binary: in a child process of itself, `edge_sandbox::Compiler::Process`).
pub async fn run(
    cfg: Config,
    compiler: crate::sandbox::Compiler,
    notify: Notifier,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| AgentError::StateDir {
        path: cfg.state_dir.display().to_string(),
        source,
    })?;
    let device = identity::resolve(&cfg.device.id, &cfg.state_dir)?;
    let outbox = {
        let (dir, ocfg) = (cfg.state_dir.clone(), cfg.outbox.clone());
        tokio::task::spawn_blocking(move || Outbox::open(&dir, &ocfg))
            .await
            .map_err(|e| AgentError::Task(e.to_string()))??
    };
    let outbox = Arc::new(outbox);
    let socket = cfg.socket_path();
    let listener = local_api::bind(&socket).await?;
    // Only probed here (the library file, not loaded): ONNX Runtime loads with the first
    // model, so an agent without inference stages never maps it. Without a library the agent
    // goes on with WASM pipelines and says why in its registration and telemetry.
    let inference = Inference::new(&cfg.inference);
    // The identity files before anything can be sealed: the epoch is raised (durably) here.
    let enrolling = {
        let hardware = enrollment::hardware(AGENT_VERSION, inference.accelerators());
        Enrollment::open(&cfg.state_dir, &cfg.enrollment, &device, hardware)?
    };
    let sessions = enrolling.watch();
    let boot_id = format!("{:016x}", rand::random::<u64>());
    let groups = sessions
        .borrow()
        .as_ref()
        .map(|s| s.groups().to_vec())
        .unwrap_or_default();
    let registration = registration(&inference, &boot_id, groups);
    let reg = NewMessage {
        class: Class::Control,
        topic: topics::register(&device),
        body: serde_json::to_vec(&registration).unwrap_or_default(),
        ttl: None,
    };
    if let Err(e) = outbox.enqueue(reg).await {
        tracing::warn!(error = %e, "registration not queued");
    }

    // The shared pieces, created here and handed out, so no part has to reach into another
    // for them: incoming messages (inbox), whether the broker is connected (link state), the
    // direct path for publishes that skip the outbox, the enrollment-request path and the
    // counts of incoming messages that did not authenticate. Offload is the direct path's only
    // user; without it the uplink gets no receiver.
    let inbox = Inbox::default();
    let (link_tx, link) = link::link_state();
    let (enroll_tx, enroll_rx) = link::enroll_path();
    let auth = Arc::new(link::AuthStats::default());
    let answers = inbox.subscribe(&topics::enroll_answer(&device), enrollment::INBOX_CAPACITY);
    let offloading = cfg.offload.mode != crate::offload::policy::Mode::Local;
    // Command replies use the direct path too, so there always is one.
    let (direct_all, direct_rx) = link::direct_path(crate::offload::client::DIRECT_CAPACITY);
    let direct_tx = offloading.then(|| direct_all.clone());
    let commands_sub = crate::command::CommandTask::subscribe(&inbox, &device);
    let uplink = uplink::Uplink::new(
        cfg.mqtt.clone(),
        device.clone(),
        AGENT_VERSION.into(),
        outbox.clone(),
        uplink::Links {
            inbox: inbox.clone(),
            link: link_tx,
            direct: Some(direct_rx),
            session: sessions.clone(),
            enroll: Some(enroll_rx),
            auth: auth.clone(),
        },
    )?;

    let local = local_pipeline(&cfg)?;
    let state = StateDb::open(&cfg.state_dir)?;
    let dataset = Arc::new(Dataset::open(&state.db, &cfg.dataset)?);
    let sandbox = Sandbox::with_compiler(&cfg.sandbox, &cfg.state_dir, compiler)?;
    let (deployer, store, restored) = task::open_deployer(&state, &device, cfg.deploy.clone())?;
    // This device's own deploy topics; the deploy task follows the groups' from the session.
    let deploy_sub = inbox.subscribe_all(
        &topics::agent_deploy_filters(&device, &[]),
        task::INBOX_CAPACITY,
    );
    let slot = RunningSlot::default();
    let training = crate::fl::TrainingSlot::default();
    // Offload: stages send requests on the uplink's direct path; responses and capacity
    // adverts come back through the inbox to the router.
    let offload = direct_tx.map(|direct| {
        crate::offload::Offloader::new(cfg.offload.clone(), device.clone(), link.clone(), direct)
    });
    let offload_sub = offload.as_ref().map(|_| {
        inbox.subscribe_all(
            &crate::offload::Offloader::filters(&device),
            crate::offload::client::INBOX_CAPACITY,
        )
    });
    let deps = Deps {
        sandbox,
        state: state.clone(),
        outbox: outbox.clone(),
        inbox: inbox.clone(),
        dataset,
        device: device.clone(),
        runtime: tokio::runtime::Handle::current(),
        inference: inference.clone(),
        training: training.clone(),
        offload: offload.clone(),
    };
    let fl_task = crate::fl::FlTask::new(crate::fl::FlDeps {
        device: device.clone(),
        // Round messages are signed by the coordinator's online identity, which the
        // enrollment session names (pinned or trusted at enrollment).
        session: sessions.clone(),
        inbox: inbox.clone(),
        state: crate::fl::FlState::open(&state.db, cfg.state_dir.join("fl"))
            .map_err(|e| AgentError::Task(e.to_string()))?,
        outbox: outbox.clone(),
        dataset: deps.dataset.clone(),
        trainer: Arc::new(deps.sandbox.clone()),
        inference: inference.clone(),
        slot: training.clone(),
        weights_dir: Some(cfg.state_dir.join("fl-weights")),
    });
    let fl_stats = fl_task.stats.clone();
    let fl_sub = inbox.subscribe_all(&crate::fl::topics(&device), crate::fl::INBOX_CAPACITY);
    // The host owns the pipelines and everything they run against; the deploy task holds
    // the only handle, so the host stops the pipelines (draining them) once that task ends.
    let (pipeline_host, host) = PipelineHost::new(deps, slot.clone());
    let command_stats = Arc::new(crate::command::CommandStats::default());
    let commands = crate::command::CommandTask::new(crate::command::CommandDeps {
        device: device.clone(),
        direct: direct_all,
        host: host.downgrade(),
        logs: crate::command::logs::installed(),
        config: crate::command::redacted_config(&cfg),
        stats: command_stats.clone(),
    });
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
            local,
            inbox: inbox.clone(),
            session: sessions.clone(),
        },
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let pipelines = tokio::spawn(pipeline_host.run());
    let deploy = tokio::spawn(deploy_task.run(restored, deploy_sub, stop_rx.clone()));
    let fl = tokio::spawn(fl_task.run(fl_sub, stop_rx.clone()));
    let commands = tokio::spawn(commands.run(commands_sub, stop_rx.clone()));
    let enroll = tokio::spawn(enrolling.run(answers, link.clone(), enroll_tx, stop_rx.clone()));
    let offload_router = offload
        .clone()
        .zip(offload_sub)
        .map(|(o, sub)| tokio::spawn(o.route(sub, stop_rx.clone())));
    let api = tokio::spawn(local_api::serve(
        listener,
        device.clone(),
        outbox.clone(),
        cfg.local_api.max_message_bytes,
        stop_rx.clone(),
    ));
    let metrics_listeners = crate::metrics::bind(&cfg.local_api)
        .await
        .map_err(AgentError::Metrics)?;
    let metrics = (!metrics_listeners.is_empty()).then(|| {
        let sources = crate::metrics::Sources {
            outbox: outbox.clone(),
            pipeline: slot.clone(),
            inference: inference.clone(),
            auth: auth.clone(),
            commands: command_stats.clone(),
        };
        tokio::spawn(crate::metrics::run(
            metrics_listeners,
            sources,
            stop_rx.clone(),
        ))
    });
    let telemetry = (cfg.telemetry.interval_s > 0).then(|| {
        tokio::spawn(telemetry::run(
            device.clone(),
            Duration::from_secs(cfg.telemetry.interval_s),
            telemetry::Sources {
                outbox: outbox.clone(),
                pipeline: slot.clone(),
                inference: inference.clone(),
                fl: fl_stats.clone(),
                offload: offload.clone(),
                auth: auth.clone(),
                session: sessions.clone(),
            },
            stop_rx.clone(),
        ))
    });
    let up = tokio::spawn(uplink.run(stop_rx));
    let st = outbox.stats();
    tracing::info!(
        device = %device, broker = %cfg.mqtt.url, state_dir = %cfg.state_dir.display(),
        socket = %socket.display(), queued = st.depth.iter().sum::<u64>(), boot_id = %boot_id,
        "agent started"
    );
    let status = || status_line(&link, &sessions, &slot, &outbox);
    // Ready without waiting for the broker: an offline board is a working board (its outbox
    // keeps everything), and systemd must not restart it for that.
    notify.ready(&status());

    let mut shutdown = std::pin::pin!(shutdown);
    match notify.keepalive_interval() {
        None => shutdown.await,
        Some(every) => {
            // The keep-alive comes from this loop, the one that owns every task, and not from
            // a task of its own or a thread: the tick needs the runtime's timer, which the
            // worker threads drive, and each ping first sends a probe task through those
            // workers. A wedged runtime (workers blocked) or a task that ended on its own
            // stops the pings, and systemd restarts the agent; a thread that pinged on its own
            // would keep a hung agent "alive".
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut reported = false;
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    _ = tick.tick() => {}
                }
                let ended = [
                    ("deploy", Some(&deploy)),
                    ("pipeline-host", Some(&pipelines)),
                    ("federated-learning", Some(&fl)),
                    ("commands", Some(&commands)),
                    ("metrics", metrics.as_ref()),
                    ("enrollment", Some(&enroll)),
                    ("offload", offload_router.as_ref()),
                    ("local-api", Some(&api)),
                    ("telemetry", telemetry.as_ref()),
                    ("uplink", Some(&up)),
                ]
                .into_iter()
                .find_map(|(name, h)| h.filter(|h| h.is_finished()).map(|_| name));
                let probe = tokio::time::timeout(every, tokio::spawn(async {})).await;
                match (ended, probe) {
                    (None, Ok(Ok(()))) => {
                        reported = false;
                        notify.keepalive(&status());
                    }
                    (ended, _) if !reported => {
                        reported = true;
                        tracing::error!(
                            task = ended.unwrap_or("(runtime)"),
                            "agent unhealthy: a task ended or the runtime did not run a probe \
                             task in time; watchdog keep-alives withheld, systemd restarts the \
                             agent unless it recovers"
                        );
                    }
                    _ => {}
                }
            }
        }
    }
    tracing::info!("shutting down: finishing local API requests, then making the outbox durable");
    notify.stopping("stopping: draining, making the outbox durable");
    let _ = stop_tx.send(true);
    let mut panicked = None;
    // The host after the deploy task: it stops the pipelines once that task dropped its
    // handle, and their outbox sinks drain before the outbox closes.
    for (name, handle) in [
        ("deploy", Some(deploy)),
        ("pipeline-host", Some(pipelines)),
        ("federated-learning", Some(fl)),
        ("commands", Some(commands)),
        ("metrics", metrics),
        ("enrollment", Some(enroll)),
        ("offload", offload_router),
        ("local-api", Some(api)),
        ("telemetry", telemetry),
        ("uplink", Some(up)),
    ] {
        if let Some(h) = handle
            && let Err(e) = h.await
        {
            tracing::error!(task = name, error = %e, "task ended abnormally");
            panicked = Some(format!("{name}: {e}"));
        }
    }
    outbox.close().await?;
    if let Err(e) = state.sync() {
        tracing::error!(dir = %state.dir.display(), error = %e, "cannot make the state database durable");
    }
    let _ = std::fs::remove_file(&socket);
    let st = outbox.stats();
    tracing::info!(
        queued = st.depth.iter().sum::<u64>(),
        delivered = st.delivered,
        "agent stopped"
    );
    match panicked {
        Some(p) => Err(AgentError::Task(p)),
        None => Ok(()),
    }
}

/// The one line `systemctl status` shows: uplink, enrollment, pipeline, backlog.
fn status_line(
    link: &LinkWatch,
    sessions: &enrollment::SessionWatch,
    slot: &RunningSlot,
    outbox: &Outbox,
) -> String {
    let link = match (link.borrow().connected, sessions.borrow().is_some()) {
        (true, true) => "connected",
        (true, false) => "connected, not enrolled",
        (false, true) => "offline",
        (false, false) => "offline, not enrolled",
    };
    let pipeline = match slot.telemetry() {
        Some(p) => format!("pipeline {} v{} running", p.name, p.version),
        None => "no pipeline".to_owned(),
    };
    let queued = outbox.stats().depth.iter().sum::<u64>();
    format!("{link}, {pipeline}, {queued} queued")
}

/// What the agent says about itself at every start. `groups`: the enrollment's, informational
/// (the coordinator keeps its own record of what it assigned). Public for the fleet simulator,
/// whose devices register as agents do.
pub fn registration(inference: &Inference, boot_id: &str, groups: Vec<String>) -> Registration {
    let mut capabilities: Vec<String> = [
        "outbox",
        "telemetry",
        "local-api",
        "pipeline",
        "deploy",
        "federated-learning",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    if inference.status().available {
        capabilities.push("inference".into());
    }
    Registration {
        agent_version: AGENT_VERSION.into(),
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        os: sysinfo::System::long_os_version().unwrap_or_else(|| std::env::consts::OS.into()),
        arch: std::env::consts::ARCH.into(),
        boot_id: boot_id.to_owned(),
        started_ms: protocol::v1::now_ms(),
        capabilities,
        groups,
        inference: inference.status(),
    }
}

/// Reads and checks `[pipeline] file`, so a broken local pipeline stops the agent at start
/// with the reason instead of leaving a device silently idle.
pub fn local_pipeline(cfg: &Config) -> Result<Option<(PipelineSpec, LocalFiles)>, AgentError> {
    let path = &cfg.pipeline.file;
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    let err = |reason: String| AgentError::LocalPipeline {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let spec = PipelineSpec::parse(&text).map_err(|e| err(e.to_string()))?;
    let dir = path
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    Ok(Some((spec, LocalFiles { dir })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_says_why_inference_is_unavailable() {
        let inf = Inference::unavailable(
            "onnx runtime unavailable: /bogus.so (inference.library): no such file",
        );
        let r = registration(&inf, "b1", vec!["lab".into()]);
        assert_eq!(r.groups, ["lab"]);
        assert!(!r.inference.available);
        assert!(r.inference.reason.contains("/bogus.so"));
        assert!(!r.capabilities.iter().any(|c| c == "inference"));
        let json = serde_json::to_string(&r).expect("encodes");
        let back: Registration = serde_json::from_str(&json).expect("decodes");
        assert_eq!(back, r);
    }
}
