//! `edge-coordinator deploy`: builds and signs a deployment, spools it for the running `serve`,
//! and renders its progress from the rollout's progress file until every device is final.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::{PICKUP_TIMEOUT, PROGRESS_POLL, resolve_state_dir};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["device", "group"])))]
pub(crate) struct DeployArgs {
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
    /// Data bytes per chunk (at most 65536). The signed manifest lists every chunk's sha256,
    /// so a smaller size makes it larger.
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

pub(crate) fn deploy(args: DeployArgs) -> Result<()> {
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

pub(crate) fn wait_for_pickup(
    state_dir: &std::path::Path,
    id: &str,
    spooled: &std::path::Path,
) -> Result<()> {
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
pub(crate) fn watch(
    state_dir: &std::path::Path,
    id: &str,
    deadline: std::time::Instant,
) -> Result<()> {
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
        // Bad chunks (forged on the broker, or damaged) never fail a deployment, but an
        // operator should hear that someone sent them.
        let dropped = match p.chunks_dropped {
            0 => String::new(),
            n => format!(" ({n} bad chunks dropped)"),
        };
        match outcome(p) {
            Outcome::Healthy => println!("{device}: healthy{dropped}"),
            Outcome::Failed(m) => {
                not_healthy += 1;
                println!("{device}: {m}{dropped}");
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
