//! `edge-agent` command line: run, generate-config, check-config, publish, identity.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use edge_agent::config::{Config, DEFAULT_TOML};
use edge_agent::local_api;

#[derive(Parser)]
#[command(name = "edge-agent", version, about = "Edge-node runtime agent")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the commented default configuration.
    GenerateConfig,
    /// Validate a configuration file and exit.
    CheckConfig { file: PathBuf },
    /// Print this device's id and public identity as one line of JSON
    /// (`{"device":..,"identity":{"sign":..,"agree":..}}`), making the identity if there is none
    /// yet: for allowlists and images. Run it as the agent's user (it may create
    /// state_dir/identity).
    Identity {
        /// Agent config to read state_dir and device.id from; default: the built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Publish one message through a running agent's local API.
    Publish {
        /// Socket of the running agent.
        #[arg(long, conflicts_with = "config")]
        socket: Option<PathBuf>,
        /// Read the socket path from this agent config instead.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Stream name; the message goes to edge/v1/{device}/data/{stream}.
        #[arg(long)]
        stream: String,
        /// control, model, results or telemetry.
        #[arg(long, default_value = "results")]
        class: protocol::v1::Class,
        /// Time to live in seconds (0 = never expire); default is the class's TTL.
        #[arg(long)]
        ttl_s: Option<u64>,
        /// JSON payload.
        payload: String,
    },
}

fn init_logging(format: LogFormat) {
    // The capture behind remote log commands (`edge_agent::command::logs`).
    edge_agent::command::logs::init(match format {
        LogFormat::Human => edge_agent::command::logs::Format::Human,
        LogFormat::Json => edge_agent::command::logs::Format::Json,
    });
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::GenerateConfig => print!("{DEFAULT_TOML}"),
        Cmd::CheckConfig { file } => {
            let cfg = Config::load(&file)?;
            // What the agent would report: the library probed, not loaded (as at start).
            let inference = edge_agent::inference::Inference::new(&cfg.inference);
            let status = inference.status();
            if status.available {
                println!(
                    "inference: {} (onnx runtime {}), loads with the first model",
                    status.library, status.version
                );
            } else {
                println!(
                    "inference: unavailable (WASM pipelines still run): {}",
                    status.reason
                );
            }
            // The dry run: the pipeline's models, modules and trainer, through the code the
            // agent starts them with. Compiled modules go to a throwaway cache, so a check
            // never writes into the agent's state directory.
            if let Some((spec, files)) = edge_agent::agent::local_pipeline(&cfg)? {
                let pipeline = cfg.pipeline.file.clone();
                let cache = tempfile::tempdir().context("cannot make a temporary directory")?;
                let mut sandbox_cfg = cfg.sandbox.clone();
                sandbox_cfg.cache_dir = cache.path().to_owned();
                let sandbox = edge_agent::sandbox::Sandbox::new(&sandbox_cfg, &cfg.state_dir)?;
                let checked = tokio::task::spawn_blocking(move || {
                    edge_agent::pipeline::dry_run(&spec, &files, &sandbox, &inference)
                })
                .await
                .context("the pipeline check panicked")?
                .with_context(|| format!("pipeline {} cannot start", pipeline.display()))?;
                for line in checked {
                    println!("{line}");
                }
                println!("pipeline {}: ok", pipeline.display());
            }
            println!("{}: ok", file.display());
        }
        Cmd::Identity { config } => {
            let cfg = match config {
                Some(c) => Config::load(&c)?,
                None => Config::default(),
            };
            let device = edge_agent::identity::resolve(&cfg.device.id, &cfg.state_dir)?;
            let (public, made) = edge_agent::enrollment::device_identity(&cfg.state_dir)?;
            if made {
                eprintln!(
                    "created the device identity in {}",
                    cfg.state_dir.join("identity").display()
                );
            }
            // A struct, not `json!`: keeps the fields in this order (the coordinator's
            // `identity` prints sign before agree too).
            #[derive(serde::Serialize)]
            struct Printed<'a> {
                device: &'a str,
                identity: &'a protocol::v1::auth::PublicIdentity,
            }
            let printed = Printed {
                device: &device,
                identity: &public,
            };
            println!("{}", serde_json::to_string(&printed)?);
        }
        Cmd::Run { config } => {
            let cfg = Config::load(&config)?;
            let notify = edge_agent::sd_notify::Notifier::from_env();
            edge_agent::agent::run(cfg, compiler(), notify, shutdown_signal()).await?;
        }
        Cmd::Publish {
            socket,
            config,
            stream,
            class,
            ttl_s,
            payload,
        } => {
            let socket = match (socket, config) {
                (Some(s), _) => s,
                (None, Some(c)) => Config::load(&c)?.socket_path(),
                (None, None) => Config::default().socket_path(),
            };
            let payload: serde_json::Value = serde_json::from_str(&payload)
                .context("payload must be JSON (quote strings: '\"text\"')")?;
            let req = local_api::Request {
                stream,
                class: Some(class),
                payload,
                ttl_s,
            };
            let resp = local_api::publish(&socket, &req).await?;
            match (resp.ok, resp.id) {
                (true, Some(id)) => println!("{id}"),
                _ => bail!(
                    "agent refused the message: {}",
                    resp.error.unwrap_or_default()
                ),
            }
        }
    }
    Ok(())
}

/// Modules compile in a child process of this binary ([`edge_agent::sandbox::Compiler`]): the
/// compiler's code and memory never stay in the agent.
fn compiler() -> edge_agent::sandbox::Compiler {
    match std::env::current_exe() {
        Ok(program) => edge_agent::sandbox::Compiler::Process {
            program,
            args: vec![edge_agent::sandbox::COMPILE_COMMAND.into()],
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot find this binary; WASM modules compile in this process");
            edge_agent::sandbox::Compiler::Thread
        }
    }
}

fn main() -> ExitCode {
    // The hidden command the sandbox's compiler process runs (before anything else: it reads a
    // module on stdin and writes the compiled artifact to stdout).
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(edge_agent::sandbox::COMPILE_COMMAND))
    {
        return edge_agent::sandbox::compile_child_main();
    }
    let cli = Cli::parse();
    edge_agent::memory::tune();
    init_logging(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = matches!(cli.log_format, LogFormat::Json);
    match rt.block_on(real_main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = render(&e);
            if json {
                tracing::error!(error = %msg, "edge-agent failed");
            } else {
                eprintln!("error: {msg}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause its parent already quotes (our
/// error messages name their cause, so anyhow's `{:#}` would print it twice).
fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}
