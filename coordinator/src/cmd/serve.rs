//! `edge-coordinator serve`: flags over the config file, logging, the async runtime, and the
//! coordinator library's `run` until SIGINT/SIGTERM.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use edge_coordinator::config::{Config, LogFormat};

use super::report;

/// Flags override the config file's keys.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
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
    /// Overrides `api.listen` (HOST:PORT; port 0 picks a free one).
    #[arg(long, env = "EDGE_COORDINATOR_API_LISTEN")]
    api_listen: Option<SocketAddr>,
    /// Overrides `log_format`.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

pub(crate) fn serve(args: ServeArgs) -> ExitCode {
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

pub(crate) fn serve_config(args: ServeArgs) -> Result<Config> {
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
    if let Some(v) = args.api_listen {
        config.api.listen = v;
    }
    if let Some(v) = args.log_format {
        config.log_format = v;
    }
    config
        .validate()
        .context("invalid settings after applying command-line flags")?;
    Ok(config)
}

pub(crate) fn run(config: Config) -> Result<()> {
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
pub(crate) fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
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

pub(crate) fn init_logging(format: LogFormat) {
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
