//! One file per command of `edge-coordinator` (`main.rs` parses and dispatches), and what
//! several of them share: where the state directory is and how an error is reported.

pub(crate) mod deploy;
pub(crate) mod devices;
pub(crate) mod fl;
pub(crate) mod remote;
pub(crate) mod rollout;
pub(crate) mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use edge_coordinator::config::Config;

/// How long `deploy` and `fl` wait for `serve` to take what they spooled.
pub(crate) const PICKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often they reread the state `serve` writes (progress files, task state).
pub(crate) const PROGRESS_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Where the running `serve` keeps its state.
#[derive(Debug, Args)]
pub(crate) struct StateArgs {
    /// State directory of the running `serve`; defaults to the one in --config, or the
    /// built-in default.
    #[arg(long)]
    pub(crate) state_dir: Option<PathBuf>,
    /// Configuration file to take state_dir from.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
}

pub(crate) fn report(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--state-dir`, else the config file's `state_dir`, else the default.
pub(crate) fn resolve_state_dir(
    state_dir: Option<PathBuf>,
    config: Option<PathBuf>,
) -> Result<PathBuf> {
    Ok(match (state_dir, config) {
        (Some(dir), _) => dir,
        (None, Some(path)) => Config::load(&path)?.state_dir,
        (None, None) => Config::default().state_dir,
    })
}
