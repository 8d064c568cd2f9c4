//! `edge-coordinator logs DEVICE [--follow] [--lines N]` and `edge-coordinator cmd DEVICE
//! restart-pipeline | log-level LEVEL --for SECS | config`: remote commands through the
//! running `serve`'s HTTP API (`api::commands`), found through `state_dir/api.json`. Scope
//! read (the local token `serve` writes) is enough for `logs` and `config`; `restart-pipeline`
//! and `log-level` need an admin token (`--token` or `EDGE_API_TOKEN`).
//!
//! Each waits for the command's end and prints its result; a command that failed on the
//! device, expired waiting for an offline one, timed out, or that the API refused (unknown or
//! revoked device, scope) exits non-zero with the cause.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use edge_coordinator::api;
use serde_json::{Value, json};

use super::{StateArgs, resolve_state_dir};

/// What every remote command takes.
#[derive(Debug, Args)]
pub(crate) struct RemoteArgs {
    #[command(flatten)]
    pub(crate) state: StateArgs,
    /// Bearer token for the API (admin for restart-pipeline and log-level); default: the
    /// local read token the running serve wrote to its state directory.
    #[arg(long, env = "EDGE_API_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Seconds the device has to answer once the command is sent.
    #[arg(long, default_value_t = 30)]
    pub(crate) timeout_s: u64,
    /// Seconds the command may wait for an offline device before it expires.
    #[arg(long, default_value_t = 300)]
    pub(crate) wait_s: u64,
}

#[derive(Debug, Subcommand)]
pub(crate) enum CmdCommand {
    /// Stop the device's live pipeline and start it again.
    RestartPipeline {
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Set the agent's log filter (debug, trace, info,edge_agent=debug, ...) for a while.
    LogLevel {
        level: String,
        /// Seconds before the agent goes back to its start-up filter.
        #[arg(long = "for", value_name = "SECS")]
        for_s: u64,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Print the agent's effective configuration, secrets redacted.
    Config {
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

/// The running serve's API.
pub(crate) struct Client {
    url: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    pub(crate) fn open(state_dir: &Path, token: Option<String>) -> Result<Client> {
        let path = api::address_path(state_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no edge-coordinator serve runs on {} (no {}): remote commands go through its HTTP API",
                state_dir.display(),
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let address: api::Address = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid", path.display()))?;
        let token = match token {
            Some(t) => t,
            None => {
                let p = api::local_token_path(state_dir);
                std::fs::read_to_string(&p)
                    .with_context(|| format!("cannot read the API token {}", p.display()))?
            }
        };
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(api::commands::MAX_WAIT_S + 15)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Client {
            url: address.url,
            token: token.trim().to_owned(),
            agent,
        })
    }

    /// The JSON answer of a 2xx; otherwise the API's error message with the status.
    pub(crate) fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.url);
        let auth = format!("Bearer {}", self.token);
        let response = match body {
            Some(b) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(b.to_string().as_bytes()),
            None => self.agent.get(&url).header("Authorization", &auth).call(),
        };
        self.answer(response, method, path)
    }

    /// POST raw bytes (a deployment package file) to `path`; the JSON answer of a 2xx.
    pub(crate) fn post_bytes(&self, path: &str, bytes: &[u8]) -> Result<Value> {
        let url = format!("{}{path}", self.url);
        let response = self
            .agent
            .post(&url)
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/octet-stream")
            .send(bytes);
        self.answer(response, "POST", path)
    }

    fn answer(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        method: &str,
        path: &str,
    ) -> Result<Value> {
        let mut response = response.with_context(|| {
            format!(
                "coordinator API {} not reachable ({method} {path})",
                self.url
            )
        })?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("cannot read the answer to {method} {path}"))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            bail!("{message} (HTTP {})", status.as_u16());
        }
        Ok(value)
    }

    fn submit(&self, device: &str, command: Value, args: &RemoteArgs) -> Result<String> {
        let body = json!({"command": command, "timeout_s": args.timeout_s, "wait_s": args.wait_s});
        let answer = self
            .call(
                "POST",
                &format!("/api/devices/{device}/commands"),
                Some(body),
            )
            .with_context(|| format!("device {device} refused the command"))?;
        answer
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .context("the API's answer names no command id")
    }

    /// Waits for the command's end; its record, or an error naming why it did not succeed.
    fn finish(&self, device: &str, id: &str) -> Result<Value> {
        loop {
            let r = self.call(
                "GET",
                &format!("/api/commands/{id}?wait_s={}", api::commands::MAX_WAIT_S),
                None,
            )?;
            let state = r.get("state").and_then(Value::as_str).unwrap_or("");
            match state {
                "queued" | "sent" => continue,
                "done" => return Ok(r),
                other => {
                    let error = r
                        .get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    bail!("command {id} to {device} {other}: {error}");
                }
            }
        }
    }
}

fn outcome(record: &Value) -> &Value {
    record.get("outcome").unwrap_or(&Value::Null)
}

fn print_lines(out: &mut impl Write, lines: Option<&Value>) -> Result<()> {
    for l in lines.and_then(Value::as_array).into_iter().flatten() {
        writeln!(out, "{}", l.as_str().unwrap_or_default())?;
    }
    out.flush()?;
    Ok(())
}

/// `edge-coordinator cmd DEVICE ...`.
pub(crate) fn cmd(device: &str, command: CmdCommand) -> Result<()> {
    let (body, args) = match &command {
        CmdCommand::RestartPipeline { remote } => (json!({"kind": "restart-pipeline"}), remote),
        CmdCommand::LogLevel {
            level,
            for_s,
            remote,
        } => (
            json!({"kind": "log-level", "level": level, "for_s": for_s}),
            remote,
        ),
        CmdCommand::Config { remote } => (json!({"kind": "config"}), remote),
    };
    let dir = resolve_state_dir(args.state.state_dir.clone(), args.state.config.clone())?;
    let client = Client::open(&dir, args.token.clone())?;
    let id = client.submit(device, body, args)?;
    let record = client.finish(device, &id)?;
    let o = outcome(&record);
    let mut out = std::io::stdout().lock();
    match command {
        CmdCommand::Config { .. } => {
            writeln!(
                out,
                "{}",
                o.get("config").and_then(Value::as_str).unwrap_or_default()
            )?;
        }
        _ => writeln!(
            out,
            "{device}: {}",
            o.get("summary").and_then(Value::as_str).unwrap_or("done")
        )?,
    }
    Ok(())
}

/// `edge-coordinator logs DEVICE [--follow] [--lines N]`.
pub(crate) fn logs(
    device: &str,
    follow: bool,
    lines: Option<u32>,
    for_s: u64,
    args: RemoteArgs,
) -> Result<()> {
    let dir = resolve_state_dir(args.state.state_dir.clone(), args.state.config.clone())?;
    let client = Client::open(&dir, args.token.clone())?;
    let mut out = std::io::stdout().lock();
    if !follow || lines.is_some() {
        let n = lines.unwrap_or(100);
        let id = client.submit(device, json!({"kind": "logs", "lines": n}), &args)?;
        let record = client.finish(device, &id)?;
        let o = outcome(&record);
        print_lines(&mut out, o.get("lines"))?;
        if let Some(d) = o.get("dropped").and_then(Value::as_u64).filter(|d| *d > 0) {
            eprintln!("({d} earlier lines no longer kept or left out)");
        }
    }
    if !follow {
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Ctrl-C ends the follow on the device too, then the CLI.
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("cannot install the Ctrl-C handler")?;
    }
    let id = client.submit(device, json!({"kind": "follow", "for_s": for_s}), &args)?;
    let mut next = 0u64;
    let mut dropped = 0u64;
    let mut stopping = false;
    loop {
        if stop.load(Ordering::SeqCst) && !stopping {
            stopping = true;
            if let Err(e) =
                client.submit(device, json!({"kind": "stop-follow", "follow": id}), &args)
            {
                eprintln!(
                    "warning: cannot stop the follow on {device}: {e:#}; it ends on its own within {for_s} s"
                );
                return Ok(());
            }
        }
        let page = client.call(
            "GET",
            &format!("/api/commands/{id}/lines?after={next}&wait_s=1"),
            None,
        )?;
        print_lines(&mut out, page.get("lines"))?;
        next = page.get("next").and_then(Value::as_u64).unwrap_or(next);
        let now_dropped = page.get("dropped").and_then(Value::as_u64).unwrap_or(0);
        if now_dropped > dropped {
            eprintln!("({} lines lost on the way)", now_dropped - dropped);
            dropped = now_dropped;
        }
        if page.get("finished").and_then(Value::as_bool) == Some(true) {
            let state = page.get("state").and_then(Value::as_str).unwrap_or("");
            if state == "done" || stopping {
                return Ok(());
            }
            let error = page
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given");
            bail!("log follow {id} on {device} {state}: {error}");
        }
    }
}
