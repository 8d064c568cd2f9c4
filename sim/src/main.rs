//! `edge-sim SCENARIO.toml [--out DIR]`: runs a simulated fleet (see `sim/README.md`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "edge-sim",
    version,
    about = "Runs a simulated fleet of edge agents against a real broker and coordinator"
)]
struct Cli {
    /// The scenario file (TOML; see sim/README.md).
    scenario: PathBuf,
    /// Where the results go (devices.csv, timeline.csv, result.json); overrides `[run] out_dir`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Overrides `[agent.mqtt] url` (e.g. the coordinator's embedded broker in a test).
    #[arg(long)]
    mqtt_url: Option<String>,
    /// Overrides `[run] state_dir`: where the devices keep their state (kept after the run;
    /// whoever names it removes it).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Runs shard I of N (`--shard 0/2`): every Nth device of the fleet, at 1/N of the ramp
    /// and churn rates, so a fleet larger than one process's open-file limit runs as N
    /// processes. Rogues run in shard 0.
    #[arg(long)]
    shard: Option<edge_sim::scenario::Shard>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,edge_agent=warn,rumqttc=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut scenario = edge_sim::Scenario::load(&cli.scenario)?;
    if let Some(shard) = cli.shard {
        scenario.run.shard = shard;
    }
    if let Some(dir) = cli.state_dir {
        scenario.run.state_dir = dir;
    }
    if let Some(url) = cli.mqtt_url {
        let mqtt = scenario
            .agent
            .entry("mqtt")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(t) = mqtt else {
            anyhow::bail!("[agent] mqtt is not a table");
        };
        t.insert("url".into(), toml::Value::String(url));
    }
    let out = cli
        .out
        .or_else(|| {
            (!scenario.run.out_dir.as_os_str().is_empty()).then(|| scenario.run.out_dir.clone())
        })
        .unwrap_or_else(|| PathBuf::from("sim-results"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let result = rt.block_on(async {
        edge_sim::run(scenario, &out, shutdown_signal()).await?;
        Ok(())
    });
    // Every device was stopped and joined; a blocking thread still running (a trainer that
    // ignores the stop) must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
