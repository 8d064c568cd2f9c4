//! `edge-coordinator deploy`: builds and signs a deployment, spools it for the running `serve`,
//! and renders its progress from the rollout's progress file until every device is final.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use edge_coordinator::deploy::waves::{Amount, Strategy};

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
    /// Sign the deployment (and, with --strategy canary, its rollback) into one package file
    /// instead of spooling it, for `POST /api/deployments` on a coordinator that holds no
    /// signing key. Wave options are then given with the upload (query parameters).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["dry_run", "no_wait"])]
    out: Option<PathBuf>,
    /// Admin token for the running serve's API: with it the deployment is uploaded through
    /// `POST /api/deployments` (checked against `[api] deploy_keys`) and followed through the
    /// API; without it (or without a running serve) it is spooled in the state directory.
    #[arg(long, env = "EDGE_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
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
    /// `all`: every device of the target at once; `canary`: a group in waves (a canary, then
    /// batches, each through a health gate and a soak), halted and rolled back past
    /// --max-failures.
    #[arg(long, value_enum, default_value_t = StrategyKind::All)]
    strategy: StrategyKind,
    /// Canary wave: N devices or P% of the group [default: 1].
    #[arg(long)]
    canary: Option<Amount>,
    /// Each later wave: N devices or P% of the group [default: 25%].
    #[arg(long)]
    batch: Option<Amount>,
    /// Seconds to wait after a wave passed its health gate before the next starts (failures
    /// reported meanwhile still count) [default: 60].
    #[arg(long)]
    soak_secs: Option<u64>,
    /// A wave passes its gate when all its devices reported a final step, or after this many
    /// seconds (silent devices are not failures; they keep their manifest) [default: 600].
    #[arg(long)]
    wave_timeout_secs: Option<u64>,
    /// Failures (rolled back, failed, rejected) allowed over the whole rollout: N devices or
    /// P% of the group; one more halts it and rolls the updated devices back [default: 0].
    #[arg(long)]
    max_failures: Option<Amount>,
    /// With --strategy canary: the pipeline the devices ran before, deployed (as version
    /// --version + 1) to every updated device if the rollout halts; defaults to the group's
    /// current version (its last healthy group rollout, while its manifest has not expired).
    #[arg(long)]
    rollback_to: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StrategyKind {
    All,
    Canary,
}

pub(crate) fn deploy(args: DeployArgs) -> Result<()> {
    use edge_coordinator::deploy::{PackageSpec, load_signing_key, package};
    use protocol::v1::deploy::{DeployKind, HealthCheck, Target};

    let target = match (args.device, args.group) {
        (Some(d), _) => Target::Device(d),
        (None, Some(g)) => Target::Group(g),
        (None, None) => anyhow::bail!("name a target with --device or --group"),
    };
    if args.strategy == StrategyKind::Canary {
        anyhow::ensure!(
            matches!(target, Target::Group(_)),
            "--strategy canary rolls out to a group: use --group"
        );
        anyhow::ensure!(
            args.pipeline.is_some(),
            "--strategy canary needs a pipeline deployment (model deployments roll out with --strategy all)"
        );
    } else {
        let staged_only = [
            ("--rollback-to", args.rollback_to.is_some()),
            ("--canary", args.canary.is_some()),
            ("--batch", args.batch.is_some()),
            ("--soak-secs", args.soak_secs.is_some()),
            ("--wave-timeout-secs", args.wave_timeout_secs.is_some()),
            ("--max-failures", args.max_failures.is_some()),
        ];
        if let Some((flag, _)) = staged_only.iter().find(|(_, given)| *given) {
            anyhow::bail!("{flag} is only used with --strategy canary");
        }
    }
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
    let rollback_spec = PackageSpec {
        deployment_id: format!("{}-rollback", spec.deployment_id),
        version: spec
            .version
            .checked_add(1)
            .context("--version is too large")?,
        ..spec.clone()
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
    let rollback = |group: &str| match &args.rollback_to {
        Some(previous) => package::load(previous, rollback_spec.clone(), &key).with_context(|| {
            format!(
                "cannot build the rollback deployment from {}",
                previous.display()
            )
        }),
        None => current_version(&state_dir, group, rollback_spec.clone(), &key),
    };
    if let Some(out) = &args.out {
        let waves = [
            ("--canary", args.canary.is_some()),
            ("--batch", args.batch.is_some()),
            ("--soak-secs", args.soak_secs.is_some()),
            ("--wave-timeout-secs", args.wave_timeout_secs.is_some()),
            ("--max-failures", args.max_failures.is_some()),
        ];
        if let Some((flag, _)) = waves.iter().find(|(_, given)| *given) {
            anyhow::bail!(
                "{flag} is not signed into a package file: give it with the upload (query parameter {} of POST /api/deployments?strategy=canary)",
                flag.trim_start_matches("--").replace('-', "_")
            );
        }
        let rollback = match (args.strategy, &pkg.manifest.target) {
            (StrategyKind::Canary, Target::Group(group)) => Some(rollback(group)?),
            _ => None,
        };
        let bytes = edge_coordinator::deploy::file::encode(&pkg, rollback.as_ref());
        write_new(out, &bytes)?;
        eprintln!(
            "{plan}; signed into {} ({} bytes{}): upload it with POST /api/deployments{}",
            out.display(),
            bytes.len(),
            rollback
                .as_ref()
                .map(|r| format!(
                    ", rollback {} version {}",
                    r.manifest.deployment_id, r.manifest.version
                ))
                .unwrap_or_default(),
            if rollback.is_some() {
                "?strategy=canary"
            } else {
                ""
            }
        );
        return Ok(());
    }
    let staged = match (args.strategy, &pkg.manifest.target) {
        (StrategyKind::All, _) | (_, Target::Device(_)) => None,
        (StrategyKind::Canary, Target::Group(group)) => {
            let rollback = rollback(group)?;
            let soak_secs = args.soak_secs.unwrap_or(60);
            let strategy = Strategy {
                canary: args.canary.unwrap_or(Amount::Count(1)),
                batch: args.batch.unwrap_or(Amount::Percent(25.0)),
                soak_ms: soak_secs.saturating_mul(1000),
                wave_timeout_ms: args.wave_timeout_secs.unwrap_or(600).saturating_mul(1000),
                max_failures: args.max_failures.unwrap_or(Amount::Count(0)),
                rollback_id: rollback.manifest.deployment_id.clone(),
            };
            eprintln!(
                "canary {} then batches of {}, soak {} s, at most {} failures; a halt rolls the updated devices back with deployment {} version {} (the next deployment needs a version above it)",
                strategy.canary,
                strategy.batch,
                soak_secs,
                strategy.max_failures,
                rollback.manifest.deployment_id,
                rollback.manifest.version
            );
            Some((strategy, rollback))
        }
    };
    let id = &pkg.manifest.deployment_id;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.timeout_s);
    // With an admin token and a running serve, the deployment goes through its API (checked
    // there against [api] deploy_keys); without one, through the spool as before.
    if let Some(token) = args.token.clone()
        && edge_coordinator::api::address_path(&state_dir).exists()
    {
        let client = super::remote::Client::open(&state_dir, Some(token))?;
        let bytes = edge_coordinator::deploy::file::encode(&pkg, staged.as_ref().map(|(_, r)| r));
        let query = match &staged {
            None => String::new(),
            Some((s, _)) => format!(
                "?strategy=canary&canary={}&batch={}&soak_secs={}&wave_timeout_secs={}&max_failures={}",
                encode_amount(s.canary),
                encode_amount(s.batch),
                s.soak_ms / 1000,
                s.wave_timeout_ms / 1000,
                encode_amount(s.max_failures)
            ),
        };
        client
            .post_bytes(&format!("/api/deployments{query}"), &bytes)
            .with_context(|| format!("the coordinator's API refused deployment {id}"))?;
        eprintln!("{plan}; uploaded through the API of the running serve");
        if args.no_wait {
            return Ok(());
        }
        return watch_api(&client, id, deadline);
    }
    let spooled = match &staged {
        None => edge_coordinator::deploy::spool::write_spool(&state_dir, &pkg),
        Some((strategy, rollback)) => edge_coordinator::deploy::spool::write_spool_staged(
            &state_dir, &pkg, strategy, rollback,
        ),
    }
    .context("cannot spool the deployment")?;
    eprintln!("{plan}; spooled in {}", spooled.display());
    if args.no_wait {
        return Ok(());
    }
    wait_for_pickup(&state_dir, id, &spooled)?;
    watch(&state_dir, id, deadline)
}

/// An amount as a query value (`%` escaped).
fn encode_amount(a: Amount) -> String {
    a.to_string().replace('%', "%25")
}

/// [`watch`] through the API (`GET /api/deployments/{id}`): one line per device as its
/// outcome changes, then each device's outcome. Fails unless every device ended healthy.
fn watch_api(client: &super::remote::Client, id: &str, deadline: std::time::Instant) -> Result<()> {
    use serde_json::Value;
    let path = format!("/api/deployments/{id}");
    let start = std::time::Instant::now();
    let mut shown: std::collections::BTreeMap<String, String> = Default::default();
    let rollout = loop {
        let r = match client.call("GET", &path, None) {
            Ok(r) => r,
            // Not taken from the spool yet.
            Err(e) if e.to_string().contains("HTTP 404") && start.elapsed() < PICKUP_TIMEOUT => {
                std::thread::sleep(PROGRESS_POLL);
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot follow deployment {id}")),
        };
        let devices = r["devices"].as_array().cloned().unwrap_or_default();
        for d in &devices {
            let device = d["device"].as_str().unwrap_or("?").to_owned();
            let line = match d["outcome"].as_str() {
                Some("healthy") => "healthy".to_owned(),
                _ => format!(
                    "{} ({:.0}%)",
                    d["detail"].as_str().unwrap_or(""),
                    d["fraction"].as_f64().unwrap_or(0.0) * 100.0
                ),
            };
            if shown.get(&device) != Some(&line) {
                eprintln!("{device:>16} {line}");
                shown.insert(device, line);
            }
        }
        if !r["finished"].is_null() {
            break r;
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("timed out waiting for deployment {id} (the rollout goes on in `serve`)");
        }
        std::thread::sleep(PROGRESS_POLL);
    };
    let devices = rollout["devices"].as_array().cloned().unwrap_or_default();
    let mut not_healthy = 0;
    for d in &devices {
        let device = d["device"].as_str().unwrap_or("?");
        let dropped = match d["chunks_dropped"].as_u64().unwrap_or(0) {
            0 => String::new(),
            n => format!(" ({n} bad chunks dropped)"),
        };
        let detail = d["detail"].as_str().unwrap_or("");
        match d["outcome"].as_str() {
            Some("healthy") => println!("{device}: healthy{dropped}"),
            Some("failed") => {
                not_healthy += 1;
                println!("{device}: {detail}{dropped}");
            }
            _ => {
                not_healthy += 1;
                println!("{device}: not finished ({detail})");
            }
        }
    }
    let reason = rollout["finished"].as_str().unwrap_or_default();
    if devices.is_empty() {
        anyhow::bail!("deployment {id} ended without any target device: {reason}");
    }
    if rollout["halted"] == Value::Bool(true) {
        anyhow::bail!("deployment {id} halted: {reason}");
    }
    if not_healthy > 0 {
        anyhow::bail!(
            "deployment {id}: {not_healthy} of {} devices did not end healthy ({reason})",
            devices.len()
        );
    }
    eprintln!("deployment {id}: all {} devices healthy", devices.len());
    Ok(())
}

/// Writes a package file that must not exist yet (an operator's earlier package is never
/// overwritten), whole: under a temporary name first, synced, then linked into place.
fn write_new(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .with_context(|| format!("--out {}: not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(file);
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            anyhow::bail!("{} exists; choose another --out", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
    }
}

/// The rollback package when `--rollback-to` is not given: the group's current version (the
/// last group rollout that ended healthy and is still served to joining devices, artifacts
/// kept in its rollout directory), signed again as the rollback.
fn current_version(
    state_dir: &std::path::Path,
    group: &str,
    spec: edge_coordinator::deploy::PackageSpec,
    key: &protocol::v1::deploy::SigningKey,
) -> Result<edge_coordinator::deploy::Package> {
    use edge_coordinator::deploy::{ArtifactFile, Package, spool};
    use protocol::v1::deploy::{DeployKind, Target};
    let mut best: Option<(u64, String)> = None;
    for id in spool::rollouts(state_dir)? {
        if let Ok(Some(p)) = spool::read_progress(state_dir, &id)
            && p.serving
            && p.target == Target::Group(group.to_owned())
            && best.as_ref().is_none_or(|(v, _)| p.version > *v)
        {
            best = Some((p.version, id));
        }
    }
    let Some((version, id)) = best else {
        anyhow::bail!(
            "group {group} has no current version in {} (no healthy group rollout is still served: none yet, or its manifest expired); name the pipeline the group runs now with --rollback-to",
            state_dir.display()
        );
    };
    let dir = spool::rollout_dir(state_dir, &id);
    let current = spool::load_package(&dir)
        .with_context(|| format!("cannot read group {group}'s current version {id}"))?;
    anyhow::ensure!(
        current.manifest.kind == DeployKind::Pipeline,
        "group {group}'s current version {id} is a model deployment; name the pipeline the group runs with --rollback-to"
    );
    let blobs: std::collections::BTreeMap<&str, &[u8]> = current.blobs().collect();
    let files = current
        .manifest
        .artifacts
        .iter()
        .map(|a| {
            let bytes = blobs
                .get(a.sha256.as_str())
                .with_context(|| format!("{}: artifact {} is missing", dir.display(), a.name))?;
            Ok(ArtifactFile {
                name: a.name.clone(),
                version: a.version.clone(),
                bytes: bytes.to_vec(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    eprintln!("rollback: group {group}'s current version, deployment {id} version {version}");
    Package::build(
        edge_coordinator::deploy::PackageSpec {
            kind: DeployKind::Pipeline,
            pipeline_toml: current.manifest.pipeline_toml.clone(),
            chunk_size: current.manifest.chunk_size,
            ..spec
        },
        files,
        key,
    )
    .with_context(|| format!("cannot sign group {group}'s current version {id} as the rollback"))
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
    if let Some(waves) = &final_progress.waves {
        for (i, wave) in waves.waves.iter().enumerate() {
            let name = if i == 0 {
                "canary".to_owned()
            } else {
                format!("wave {i}")
            };
            println!("{name}: {}", wave.join(", "));
        }
        if !waves.pending.is_empty() {
            println!("not updated: {}", waves.pending.join(", "));
        }
        for (device, p) in &final_progress.rollback {
            match outcome(p) {
                Outcome::Healthy => println!("rollback {device}: back on the previous pipeline"),
                Outcome::Failed(m) | Outcome::Pending(m) => {
                    println!("rollback {device}: not confirmed ({m})")
                }
            }
        }
    }
    let reason = final_progress.finished.unwrap_or_default();
    if final_progress.devices.is_empty() {
        anyhow::bail!("deployment {id} ended without any target device: {reason}");
    }
    if let Some(w) = &final_progress.waves
        && w.is_halted()
    {
        anyhow::bail!("deployment {id} halted: {reason}");
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
