//! `edge-coordinator devices` (the persisted registry with each device's enrollment), its
//! enrollment subcommands (`pending`, `approve`, `reject`, `revoke`, which reach a running
//! `serve` through its state directory; `devices` and `devices pending` ask its HTTP API while it
//! runs, with the local read token, and read the state directory when none does), `keygen` (a deployment or fleet claim key) and
//! `identity` (the coordinator's public identity).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use edge_coordinator::config;
use edge_coordinator::enrollment::EnrollmentRecord;
use edge_coordinator::enrollment::files::{self, Command, CommandResult};
use edge_coordinator::registry;
use edge_coordinator::store::Store;
use protocol::v1::enroll::Decision;

use super::{LocalApi, PICKUP_TIMEOUT, PROGRESS_POLL, StateArgs, resolve_state_dir};

/// Enrollment decisions; each takes effect in the running `serve` (answer published, the
/// device's messages accepted or refused from then on).
#[derive(Debug, Subcommand)]
pub(crate) enum DevicesCommand {
    /// List enrollment requests waiting for an operator (also while `serve` runs).
    Pending {
        /// Print JSON (the full records) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Enroll a device (pending, rejected or revoked), or change an enrolled device's groups.
    Approve {
        device: String,
        /// Deployment group; repeatable. Without any, an enrolled or revoked device keeps the
        /// groups it had.
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        #[command(flatten)]
        state: StateArgs,
        /// Spool the decision and exit without waiting for `serve` to apply it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Refuse a device's pending enrollment request.
    Reject {
        device: String,
        /// Why, for the device's log.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        state: StateArgs,
        #[arg(long)]
        no_wait: bool,
    },
    /// Take an enrolled device out of the fleet: its messages are refused from now on.
    Revoke {
        device: String,
        #[command(flatten)]
        state: StateArgs,
        #[arg(long)]
        no_wait: bool,
    },
}

pub(crate) fn devices_command(command: DevicesCommand) -> Result<()> {
    match command {
        DevicesCommand::Pending { json, state } => pending(json, state),
        DevicesCommand::Approve {
            device,
            groups,
            state,
            no_wait,
        } => decide(Command::Approve { device, groups }, state, no_wait),
        DevicesCommand::Reject {
            device,
            reason,
            state,
            no_wait,
        } => decide(Command::Reject { device, reason }, state, no_wait),
        DevicesCommand::Revoke {
            device,
            state,
            no_wait,
        } => decide(Command::Revoke { device }, state, no_wait),
    }
}

pub(crate) fn devices(
    state_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let state_dir = resolve_state_dir(state_dir, config)?;
    // A running coordinator holds the database: ask its API instead.
    match from_api(&state_dir) {
        Ok(Some(devices)) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&devices).context("cannot encode devices")?
                );
            } else if devices.is_empty() {
                println!("no devices registered in the running coordinator");
            } else {
                print!(
                    "{}",
                    edge_coordinator::api::devices::render_table(&devices, protocol::v1::now_ms())
                );
            }
            return Ok(());
        }
        Ok(None) => {}
        Err(e) => eprintln!("warning: {e:#}; reading the state directory instead"),
    }
    // A small cache: this is a one-shot read.
    let store = Store::open_existing(&config::db_path(&state_dir), 8 * 1024 * 1024)?;
    let records = store.load_devices()?;
    let enrollments = store.load_enrollments()?;
    if json {
        #[derive(serde::Serialize)]
        struct Row<'a> {
            #[serde(flatten)]
            record: &'a registry::DeviceRecord,
            enrollment: Option<&'a EnrollmentRecord>,
        }
        let rows: Vec<Row> = records
            .iter()
            .map(|r| Row {
                record: r,
                enrollment: enrollments.iter().find(|e| e.device == r.device),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).context("cannot encode records")?
        );
    } else if records.is_empty() && enrollments.is_empty() {
        println!("no devices registered in {}", state_dir.display());
    } else {
        print!(
            "{}",
            registry::render_table(&records, &enrollments, protocol::v1::now_ms())
        );
        let pending = enrollments
            .iter()
            .filter(|e| e.state == Decision::Pending)
            .count();
        if pending > 0 {
            println!("{pending} enrollment request(s) pending: edge-coordinator devices pending");
        }
    }
    Ok(())
}

/// Every device from the running coordinator's API, page by page; `None` when no coordinator
/// runs on this state directory (no `api.json`).
fn from_api(
    state_dir: &std::path::Path,
) -> Result<Option<Vec<edge_coordinator::api::devices::DeviceSummary>>> {
    use edge_coordinator::api::{self, devices::DeviceList};
    let Some(local) = LocalApi::open(state_dir)? else {
        return Ok(None);
    };
    let mut devices = Vec::new();
    loop {
        let page: DeviceList = local.get(&format!(
            "/api/devices?limit={}&offset={}",
            api::devices::MAX_LIMIT,
            devices.len()
        ))?;
        let got = page.devices.len();
        devices.extend(page.devices);
        if got == 0 || devices.len() >= page.total {
            return Ok(Some(devices));
        }
    }
}

/// Pending enrollment requests from the running coordinator's API (`GET /api/enrollment`);
/// `None` when none runs on this state directory.
fn pending_from_api(state_dir: &std::path::Path) -> Result<Option<Vec<EnrollmentRecord>>> {
    #[derive(serde::Deserialize)]
    struct List {
        records: Vec<EnrollmentRecord>,
    }
    let Some(local) = LocalApi::open(state_dir)? else {
        return Ok(None);
    };
    let list: List = local.get("/api/enrollment?state=pending")?;
    Ok(Some(list.records))
}

fn pending(json: bool, state: StateArgs) -> Result<()> {
    let state_dir = resolve_state_dir(state.state_dir, state.config)?;
    // A running coordinator answers from its live view; otherwise (or if its API fails) the
    // snapshot it wrote last.
    let from_api = match pending_from_api(&state_dir) {
        Ok(records) => records,
        Err(e) => {
            eprintln!("warning: {e:#}; reading the state directory instead");
            None
        }
    };
    let source = match from_api {
        Some(_) => "the running coordinator".to_owned(),
        None => state_dir.display().to_string(),
    };
    let records: Vec<EnrollmentRecord> = match from_api {
        Some(records) => records,
        None => files::read_snapshot(&state_dir)?
            .into_iter()
            .filter(|r| r.state == Decision::Pending)
            .collect(),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&records).context("cannot encode records")?
        );
    } else if records.is_empty() {
        println!("no enrollment requests pending in {source}");
    } else {
        print!(
            "{}",
            registry::render_pending(&records, protocol::v1::now_ms())
        );
    }
    Ok(())
}

/// The coordinator's own key, changed through the running `serve`.
#[derive(Debug, Subcommand)]
pub(crate) enum IdentityCommand {
    /// Replace the coordinator's online key: `serve` makes a new one, keeps the old one as
    /// `coordinator.key.old` and tells every enrolled device, in an answer signed with the old
    /// key, to trust the new one. Each device's messages are accepted under either key until it
    /// uses the new one; the old key is deleted when all have (or with `--finish`). Applied at
    /// the next start if `serve` is not running.
    Rotate {
        /// End the rotation in progress now: the old key is deleted and refused, also from
        /// devices that have not switched yet.
        #[arg(long)]
        finish: bool,
        #[command(flatten)]
        state: StateArgs,
        /// Spool the command and exit without waiting for `serve` to apply it.
        #[arg(long)]
        no_wait: bool,
    },
}

pub(crate) fn identity_command(command: IdentityCommand) -> Result<()> {
    match command {
        IdentityCommand::Rotate {
            finish,
            state,
            no_wait,
        } => {
            let command = if finish {
                Command::FinishRotation {}
            } else {
                Command::Rotate {}
            };
            decide(command, state, no_wait)
        }
    }
}

/// Spools an operator's decision for `serve` and (unless `no_wait`) waits for its result.
fn decide(command: Command, state: StateArgs, no_wait: bool) -> Result<()> {
    let device = command.device().unwrap_or("the coordinator key").to_owned();
    if command.device().is_some() {
        protocol::v1::validate_device_id(&device)
            .map_err(|e| anyhow::anyhow!("invalid device id {device:?}: {e}"))?;
    }
    if let Command::Approve { groups, .. } = &command {
        edge_coordinator::enrollment::config::check_groups("--group", groups)?;
    }
    let state_dir = resolve_state_dir(state.state_dir, state.config)?;
    let id = files::write_command(&state_dir, &command).context("cannot spool the decision")?;
    if no_wait {
        eprintln!("spooled for serve in {}", state_dir.display());
        return Ok(());
    }
    let start = std::time::Instant::now();
    loop {
        if let Some(CommandResult { ok, message, .. }) = files::read_result(&state_dir, &id)? {
            if let Err(e) = files::remove_command(&state_dir, &id) {
                eprintln!("warning: {e:#}");
            }
            anyhow::ensure!(ok, "{message}");
            println!("{message}");
            return Ok(());
        }
        if start.elapsed() > PICKUP_TIMEOUT {
            anyhow::bail!(
                "no coordinator applied the decision about {device} within {} s; is `edge-coordinator serve` running with state_dir {}? It stays spooled and takes effect when serve starts",
                PICKUP_TIMEOUT.as_secs(),
                state_dir.display()
            );
        }
        std::thread::sleep(PROGRESS_POLL);
    }
}

pub(crate) fn keygen(out: &std::path::Path) -> Result<()> {
    let public = edge_coordinator::deploy::generate_key_file(out)?;
    eprintln!(
        "wrote private key {} (mode 0600); the public key below goes into the agents' trusted_keys (a deploy key) or into [[enrollment.claims]] key (a fleet claim key)",
        out.display()
    );
    println!("{}", protocol::v1::deploy::public_key_hex(&public));
    Ok(())
}

/// Prints the coordinator's public identity as one JSON line, creating the identity if the
/// state directory has none yet.
pub(crate) fn identity(state: StateArgs) -> Result<()> {
    let state_dir = resolve_state_dir(state.state_dir, state.config)?;
    let (identity, created) = files::load_or_create_identity(&state_dir)?;
    if created {
        eprintln!(
            "created the coordinator identity {} (mode 0600)",
            files::identity_path(&state_dir).display()
        );
    }
    println!(
        "{}",
        serde_json::to_string(&identity.public()).context("cannot encode the identity")?
    );
    Ok(())
}
