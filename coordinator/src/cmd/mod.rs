//! One file per command of `edge-coordinator` (`main.rs` parses and dispatches), and what
//! several of them share: where the state directory is, how an error is reported, and the
//! running serve's API with its local read token ([`LocalApi`]).

pub(crate) mod deploy;
pub(crate) mod devices;
pub(crate) mod fl;
pub(crate) mod remote;
pub(crate) mod rollout;
pub(crate) mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
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

/// The running serve's API on a state directory, called with the local read token it wrote.
pub(crate) struct LocalApi {
    url: String,
    token: String,
    /// `api.json`, for errors.
    address_file: PathBuf,
    agent: ureq::Agent,
}

impl LocalApi {
    /// `None` when no coordinator runs on this state directory (no `api.json`).
    pub(crate) fn open(state_dir: &std::path::Path) -> Result<Option<LocalApi>> {
        use edge_coordinator::api;
        let path = api::address_path(state_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let address: api::Address = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid", path.display()))?;
        let token_path = api::local_token_path(state_dir);
        let token = std::fs::read_to_string(&token_path)
            .with_context(|| format!("cannot read the API token {}", token_path.display()))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Some(LocalApi {
            url: address.url,
            token: token.trim().to_owned(),
            address_file: path,
            agent,
        }))
    }

    /// GET `path`; the decoded answer of a 2xx, else an error with the status and body.
    pub(crate) fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.get_found(path)?
            .with_context(|| format!("{}{path} answered 404 Not Found", self.url))
    }

    /// [`LocalApi::get`], with `None` for a 404.
    pub(crate) fn get_found<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>> {
        let url = format!("{}{path}", self.url);
        let mut response = self
            .agent
            .get(&url)
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .with_context(|| {
                format!(
                    "coordinator API {} (from {}) not reachable",
                    self.url,
                    self.address_file.display()
                )
            })?;
        let body = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("cannot read the answer from {url}"))?;
        if response.status() == 404 {
            return Ok(None);
        }
        anyhow::ensure!(
            response.status().is_success(),
            "{url} answered {}: {body}",
            response.status()
        );
        serde_json::from_str(&body)
            .map(Some)
            .with_context(|| format!("unexpected answer from {url}"))
    }
}
