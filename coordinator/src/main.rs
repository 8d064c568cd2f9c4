//! `edge-coordinator`: the command line around the coordinator library.
//!
//! `serve` runs it (embedded broker by default, `--broker` for an external one);
//! `generate-config` and `check-config` deal with the TOML file; `devices` prints the persisted
//! registry while the coordinator is stopped. `keygen` creates a deployment signing key;
//! `deploy` builds and signs a deployment, spools it for the running `serve` (which sends it
//! and owns the rollout) and draws its progress from the rollout's progress file until every
//! device is final; `deploy --dry-run` only prints the signed manifest. `fl start` validates a
//! federated task and spools it for `serve` (which runs its rounds), `fl status` prints its
//! rounds from the state directory (also while `serve` runs), `fl stop` ends it.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use edge_coordinator::config::{self, Config, LogFormat};
use edge_coordinator::registry;
use edge_coordinator::store::Store;

#[derive(Debug, Parser)]
#[command(
    name = "edge-coordinator",
    version,
    about = "Cloud coordinator for edge agents: MQTT broker, device registry, telemetry and data journal"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator until SIGINT/SIGTERM.
    Serve(Box<ServeArgs>),
    /// Print the commented default configuration.
    GenerateConfig,
    /// Check a configuration file; errors name the key and its line.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Print the persisted device registry (the coordinator must not be running).
    Devices {
        /// State directory; defaults to the one in --config, or the built-in default.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Configuration file to take state_dir from.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON (one array of full records) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create an ed25519 deployment signing key (mode 0600) and print its public key, the
    /// value agents list in `trusted_keys`. Never overwrites an existing file.
    Keygen {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Build and sign a deployment of a pipeline description and the artifacts it names, or
    /// (`--model NAME=FILE`) of new versions of models in the running pipeline.
    Deploy(DeployArgs),
    /// Federated learning: start a task, show its rounds, stop it.
    Fl {
        #[command(subcommand)]
        command: FlCommand,
    },
}

#[derive(Debug, Subcommand)]
enum FlCommand {
    /// Validate a task file (TOML), read its initial model, and spool it for the running
    /// `serve`, which runs its rounds (signing each round message with --key).
    Start {
        /// The task file; `initial` and `eval.holdout` paths are relative to it.
        task: PathBuf,
        /// Private key written by `keygen` (the devices' trusted key). A copy (mode 0600)
        /// goes to the state directory: `serve` signs every round with it.
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        state: StateArgs,
        /// Spool the task and exit without waiting for `serve` to take it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show federated tasks and their rounds (participants, bytes, loss, accuracy).
    Status {
        /// Only this task.
        task: Option<String>,
        /// Print the tasks' state as JSON instead of tables (one object for a named task,
        /// else an array).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Stop a task: `serve` sends every member the current global weights marked done.
    Stop {
        task: String,
        #[command(flatten)]
        state: StateArgs,
        /// Exit without waiting for `serve` to stop the task.
        #[arg(long)]
        no_wait: bool,
    },
}

/// Where the running `serve` keeps its state.
#[derive(Debug, Args)]
struct StateArgs {
    /// State directory of the running `serve`; defaults to the one in --config, or the
    /// built-in default.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Configuration file to take state_dir from.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["device", "group"])))]
struct DeployArgs {
    /// The pipeline description (TOML); `.wasm`/`.onnx` paths in it are read relative to it.
    #[arg(required_unless_present = "model", conflicts_with = "model")]
    pipeline: Option<PathBuf>,
    /// Instead of a pipeline: a model deployment replacing model NAME (an inference stage's
    /// `model =` path) in the running pipeline with FILE; repeatable. The agent health-checks
    /// the new version and keeps the old one if it fails.
    #[arg(long = "model", value_name = "NAME=FILE")]
    model: Vec<String>,
    /// Deploy to this device.
    #[arg(long)]
    device: Option<String>,
    /// Deploy to every device of this group.
    #[arg(long)]
    group: Option<String>,
    /// Private key written by `keygen`.
    #[arg(long)]
    key: PathBuf,
    /// Deployment version; must be higher than the target's installed one.
    #[arg(long)]
    version: u64,
    /// Deployment id; defaults to one derived from the time.
    #[arg(long)]
    id: Option<String>,
    /// How long agents accept the manifest, seconds.
    #[arg(long, default_value_t = 3600)]
    ttl_secs: u64,
    /// Health check: messages processed without error before commit (0: off).
    #[arg(long, default_value_t = 100)]
    health_messages: u32,
    /// Health check: seconds without error before commit (0: off).
    #[arg(long, default_value_t = 30)]
    health_seconds: u32,
    /// Data bytes per chunk.
    #[arg(long, default_value_t = protocol::v1::deploy::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// Print the signed manifest and the chunk plan instead of sending.
    #[arg(long)]
    dry_run: bool,
    /// Spool the deployment for `serve` and exit without waiting for the devices.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting after this many seconds (the rollout goes on in `serve`).
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
    /// State directory of the running `serve`; defaults to the one in --config, or the
    /// built-in default.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Configuration file to take state_dir from.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// How long `deploy` waits for `serve` to take a spooled deployment.
const PICKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often `deploy` rereads the progress file.
const PROGRESS_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Flags override the config file's keys.
#[derive(Debug, Args)]
struct ServeArgs {
    /// Configuration file (TOML); without it the built-in defaults apply.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides `state_dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Overrides `embedded.listen` (HOST:PORT; port 0 picks a free one).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Overrides `mqtt.url`: connect to this broker (mqtt://HOST:PORT or mqtts://HOST:PORT)
    /// instead of running the embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// Overrides `mqtt.ca_file`.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Overrides `mqtt.cert_file`.
    #[arg(long)]
    cert_file: Option<PathBuf>,
    /// Overrides `mqtt.key_file`.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Overrides `mqtt.username`.
    #[arg(long)]
    username: Option<String>,
    /// Overrides `mqtt.password` (prefer the environment variable: argv is world-readable).
    #[arg(long, env = "EDGE_COORDINATOR_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Overrides `journal.path`.
    #[arg(long)]
    journal: Option<PathBuf>,
    /// Overrides `log_format`.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::GenerateConfig => {
            print!("{}", config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                // Printed whole: the toml message spans lines (position, excerpt, caret).
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Devices {
            state_dir,
            config,
            json,
        } => report(devices(state_dir, config, json)),
        Command::Keygen { out } => report(keygen(&out)),
        Command::Deploy(args) => report(deploy(args)),
        Command::Fl { command } => report(fl(command)),
    }
}

fn report(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match serve_config(args) {
        Ok(c) => c,
        Err(e) => return report(Err(e)),
    };
    init_logging(config.log_format);
    // One process-wide rustls provider (ring: no cmake, simple ARM cross builds). An error
    // only means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "coordinator stopped");
            ExitCode::FAILURE
        }
    }
}

fn serve_config(args: ServeArgs) -> Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(v) = args.state_dir {
        config.state_dir = v;
    }
    if let Some(v) = args.listen {
        config.embedded.listen = v;
    }
    if let Some(v) = args.broker {
        config.mqtt.url = v;
    }
    if let Some(v) = args.ca_file {
        config.mqtt.ca_file = v;
    }
    if let Some(v) = args.cert_file {
        config.mqtt.cert_file = v;
    }
    if let Some(v) = args.key_file {
        config.mqtt.key_file = v;
    }
    if let Some(v) = args.username {
        config.mqtt.username = v;
    }
    if let Some(v) = args.password {
        config.mqtt.password = v;
    }
    if let Some(v) = args.journal {
        config.journal.path = v;
    }
    if let Some(v) = args.log_format {
        config.log_format = v;
    }
    config
        .validate()
        .context("invalid settings after applying command-line flags")?;
    Ok(config)
}

fn run(config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_signal().context("cannot install signal handlers")?;
        edge_coordinator::run(config, shutdown)
            .await
            .context("coordinator failed")
    })
}

/// Resolves on the first SIGINT or SIGTERM.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
    })
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // rumqttd logs every client disconnect at ERROR; the coordinator reports what matters
    // (device online/offline, rejects) itself. RUST_LOG=info,rumqttd=warn brings them back.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `--state-dir`, else the config file's `state_dir`, else the default.
fn resolve_state_dir(state_dir: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf> {
    Ok(match (state_dir, config) {
        (Some(dir), _) => dir,
        (None, Some(path)) => Config::load(&path)?.state_dir,
        (None, None) => Config::default().state_dir,
    })
}

fn devices(state_dir: Option<PathBuf>, config: Option<PathBuf>, json: bool) -> Result<()> {
    let state_dir = resolve_state_dir(state_dir, config)?;
    // A small cache: this is a one-shot read.
    let store = Store::open_existing(&config::db_path(&state_dir), 8 * 1024 * 1024)?;
    let records = store.load_devices()?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&records).context("cannot encode records")?
        );
    } else if records.is_empty() {
        println!("no devices registered in {}", state_dir.display());
    } else {
        print!(
            "{}",
            registry::render_table(&records, protocol::v1::now_ms())
        );
    }
    Ok(())
}

fn keygen(out: &std::path::Path) -> Result<()> {
    let public = edge_coordinator::deploy::generate_key_file(out)?;
    eprintln!(
        "wrote private key {} (mode 0600); add the public key below to the agents' trusted_keys",
        out.display()
    );
    println!("{}", protocol::v1::deploy::public_key_hex(&public));
    Ok(())
}

fn deploy(args: DeployArgs) -> Result<()> {
    use edge_coordinator::deploy::{PackageSpec, load_signing_key, package};
    use protocol::v1::deploy::{DeployKind, HealthCheck, Target};

    let target = match (args.device, args.group) {
        (Some(d), _) => Target::Device(d),
        (None, Some(g)) => Target::Group(g),
        (None, None) => anyhow::bail!("name a target with --device or --group"),
    };
    let key = load_signing_key(&args.key)?;
    let now_ms = protocol::v1::now_ms();
    let spec = PackageSpec {
        deployment_id: args
            .id
            .unwrap_or_else(|| format!("dep-{now_ms:x}-{}", args.version)),
        target,
        version: args.version,
        now_ms,
        ttl_ms: args.ttl_secs.saturating_mul(1000),
        kind: DeployKind::Pipeline,
        pipeline_toml: None,
        chunk_size: args.chunk_size,
        health: HealthCheck {
            messages: args.health_messages,
            seconds: args.health_seconds,
        },
    };
    let pkg = match &args.pipeline {
        Some(pipeline) => package::load(pipeline, spec, &key)
            .with_context(|| format!("cannot build a deployment from {}", pipeline.display()))?,
        None => {
            let models = args
                .model
                .iter()
                .map(|m| match m.split_once('=') {
                    Some((name, file)) if !name.is_empty() && !file.is_empty() => {
                        Ok((name.to_owned(), PathBuf::from(file)))
                    }
                    _ => anyhow::bail!("--model {m:?}: expected NAME=FILE"),
                })
                .collect::<Result<Vec<_>>>()?;
            package::load_models(&models, spec, &key).context("cannot build a model deployment")?
        }
    };
    let plan = format!(
        "deployment {} version {} for {}: {} artifacts, {} bytes, {} chunks",
        pkg.manifest.deployment_id,
        pkg.manifest.version,
        pkg.manifest.target,
        pkg.manifest.artifacts.len(),
        pkg.manifest.total_bytes(),
        pkg.chunk_total()
    );
    if args.dry_run {
        println!("{}", String::from_utf8_lossy(&pkg.manifest_payload()));
        eprintln!("{plan}");
        return Ok(());
    }
    let state_dir = resolve_state_dir(args.state_dir, args.config)?;
    let spooled = edge_coordinator::deploy::spool::write_spool(&state_dir, &pkg)
        .context("cannot spool the deployment")?;
    eprintln!("{plan}; spooled in {}", spooled.display());
    if args.no_wait {
        return Ok(());
    }
    let id = &pkg.manifest.deployment_id;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.timeout_s);
    wait_for_pickup(&state_dir, id, &spooled)?;
    watch(&state_dir, id, deadline)
}

fn wait_for_pickup(state_dir: &std::path::Path, id: &str, spooled: &std::path::Path) -> Result<()> {
    use edge_coordinator::deploy::spool;
    let start = std::time::Instant::now();
    loop {
        if spool::read_progress(state_dir, id)?.is_some() {
            return Ok(());
        }
        if start.elapsed() > PICKUP_TIMEOUT {
            anyhow::bail!(
                "no coordinator picked up deployment {id} from {} within {} s; is `edge-coordinator serve` running with state_dir {}? It will be sent when it starts",
                spooled.display(),
                PICKUP_TIMEOUT.as_secs(),
                state_dir.display()
            );
        }
        std::thread::sleep(PROGRESS_POLL);
    }
}

/// Draws one bar per device from the progress file until the rollout finishes, then prints
/// each device's outcome. Fails unless every device ended healthy.
fn watch(state_dir: &std::path::Path, id: &str, deadline: std::time::Instant) -> Result<()> {
    use edge_coordinator::deploy::progress::{Outcome, outcome};
    use edge_coordinator::deploy::spool;
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

    let multi = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>16} [{bar:30}] {bytes:>10}/{total_bytes:10} {msg}")
            .context("bad progress bar template")?
            .progress_chars("=> ");
    let mut bars: std::collections::BTreeMap<String, ProgressBar> = Default::default();
    let final_progress = loop {
        let Some(progress) = spool::read_progress(state_dir, id)? else {
            anyhow::bail!("progress file of deployment {id} disappeared");
        };
        for (device, p) in &progress.devices {
            let bar = bars.entry(device.clone()).or_insert_with(|| {
                let bar = multi.add(ProgressBar::new(progress.total_bytes));
                bar.set_style(style.clone());
                bar.set_prefix(device.clone());
                bar
            });
            if p.agent_total > 0 {
                bar.set_length(p.agent_total);
                bar.set_position(p.agent_received);
            }
            let msg = match outcome(p) {
                Outcome::Healthy => {
                    bar.set_position(bar.length().unwrap_or(0));
                    "healthy".to_owned()
                }
                Outcome::Failed(m) | Outcome::Pending(m) => m,
            };
            bar.set_message(msg);
        }
        if progress.finished.is_some() {
            break progress;
        }
        if std::time::Instant::now() > deadline {
            for bar in bars.values() {
                bar.abandon();
            }
            let waiting: Vec<String> = progress
                .devices
                .iter()
                .filter_map(|(d, p)| match outcome(p) {
                    Outcome::Pending(m) => Some(format!("{d} ({m})")),
                    _ => None,
                })
                .collect();
            anyhow::bail!(
                "timed out waiting for deployment {id}; not finished: {} (the rollout goes on in `serve`)",
                if waiting.is_empty() {
                    "no target device known yet".to_owned()
                } else {
                    waiting.join(", ")
                }
            );
        }
        std::thread::sleep(PROGRESS_POLL);
    };
    for bar in bars.values() {
        bar.finish();
    }
    let _ = multi.clear();
    let mut not_healthy = 0;
    for (device, p) in &final_progress.devices {
        match outcome(p) {
            Outcome::Healthy => println!("{device}: healthy"),
            Outcome::Failed(m) => {
                not_healthy += 1;
                println!("{device}: {m}");
            }
            Outcome::Pending(m) => {
                not_healthy += 1;
                println!("{device}: not finished ({m})");
            }
        }
    }
    let reason = final_progress.finished.unwrap_or_default();
    if final_progress.devices.is_empty() {
        anyhow::bail!("deployment {id} ended without any target device: {reason}");
    }
    if not_healthy > 0 {
        anyhow::bail!(
            "deployment {id}: {not_healthy} of {} devices did not end healthy ({reason})",
            final_progress.devices.len()
        );
    }
    eprintln!(
        "deployment {id}: all {} devices healthy",
        final_progress.devices.len()
    );
    Ok(())
}

fn fl(command: FlCommand) -> Result<()> {
    match command {
        FlCommand::Start {
            task,
            key,
            state,
            no_wait,
        } => fl_start(&task, &key, state, no_wait),
        FlCommand::Status { task, json, state } => fl_status(task.as_deref(), json, state),
        FlCommand::Stop {
            task,
            state,
            no_wait,
        } => fl_stop(&task, state, no_wait),
    }
}

fn fl_start(
    task: &std::path::Path,
    key: &std::path::Path,
    state: StateArgs,
    no_wait: bool,
) -> Result<()> {
    use edge_coordinator::fl::{files, task as fl_task};
    let loaded = fl_task::load(task)?;
    let key = edge_coordinator::deploy::load_signing_key(key)?;
    let state_dir = resolve_state_dir(state.state_dir, state.config)?;
    let spooled = files::write_spool(&state_dir, &loaded, &key).context("cannot spool the task")?;
    let spec = &loaded.spec;
    eprintln!(
        "task {}: {} rounds over {}, {} params ({} weights), {} + {}; spooled in {}",
        spec.id,
        spec.rounds,
        spec.members,
        spec.params.len(),
        loaded.initial.len(),
        spec.rule,
        spec.server_optimizer,
        spooled.display()
    );
    if no_wait {
        return Ok(());
    }
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = files::read_state(&state_dir, &spec.id)? {
            if let edge_coordinator::fl::Phase::Finished { reason } = &s.phase {
                anyhow::bail!("task {}: {reason}", spec.id);
            }
            eprintln!(
                "task {} taken by serve: {}; follow it with `edge-coordinator fl status {}`",
                spec.id,
                s.phase.name(),
                spec.id
            );
            return Ok(());
        }
        if start.elapsed() > PICKUP_TIMEOUT {
            anyhow::bail!(
                "no coordinator picked up task {} from {} within {} s; is `edge-coordinator serve` running with state_dir {}? It starts when serve does",
                spec.id,
                spooled.display(),
                PICKUP_TIMEOUT.as_secs(),
                state_dir.display()
            );
        }
        std::thread::sleep(PROGRESS_POLL);
    }
}

fn fl_status(task: Option<&str>, json: bool, state: StateArgs) -> Result<()> {
    use edge_coordinator::fl::{files, status};
    let state_dir = resolve_state_dir(state.state_dir, state.config)?;
    let ids = match task {
        Some(id) if !edge_coordinator::fl::task::valid_task_id(id) => {
            anyhow::bail!("invalid task id {id:?}")
        }
        Some(id) => vec![id.to_owned()],
        None => files::tasks(&state_dir)?,
    };
    let mut states = Vec::new();
    for id in &ids {
        match files::read_state(&state_dir, id)? {
            Some(s) => states.push(s),
            None if task.is_some() => {
                if files::spool_dir(&state_dir).join(id).is_dir()
                    || files::task_dir(&state_dir, id).is_dir()
                {
                    anyhow::bail!("task {id} is spooled but no coordinator has started it yet");
                }
                anyhow::bail!("no federated task {id} in {}", state_dir.display());
            }
            None => {}
        }
    }
    if json {
        let text = match (task, states.first()) {
            (Some(_), Some(one)) => serde_json::to_string_pretty(one),
            _ => serde_json::to_string_pretty(&states),
        };
        println!("{}", text.context("cannot encode the task state")?);
        return Ok(());
    }
    if states.is_empty() {
        println!("no federated tasks in {}", state_dir.display());
    }
    let now = protocol::v1::now_ms();
    for (i, s) in states.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print!("{}", status::render(s, now));
    }
    Ok(())
}

fn fl_stop(task: &str, state: StateArgs, no_wait: bool) -> Result<()> {
    use edge_coordinator::fl::{Phase, files};
    let state_dir = resolve_state_dir(state.state_dir, state.config)?;
    files::request_stop(&state_dir, task)?;
    if no_wait {
        eprintln!("asked serve to stop task {task}");
        return Ok(());
    }
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = files::read_state(&state_dir, task)?
            && let Phase::Finished { reason } = &s.phase
        {
            eprintln!(
                "task {task} finished ({reason}) at global version {}",
                s.version
            );
            return Ok(());
        }
        if start.elapsed() > PICKUP_TIMEOUT {
            anyhow::bail!(
                "task {task} did not stop within {} s; is `edge-coordinator serve` running with state_dir {}? The request stays until it does",
                PICKUP_TIMEOUT.as_secs(),
                state_dir.display()
            );
        }
        std::thread::sleep(PROGRESS_POLL);
    }
}
