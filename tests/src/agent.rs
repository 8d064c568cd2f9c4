//! An `edge-agent run` process with its own config file and state dir.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;

use crate::local_api::LocalApi;
use crate::process::{ChildProc, ensure_dir};

/// What the harness writes into the agent's config; everything else keeps the defaults of
/// `config/agent.toml`.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub device_id: String,
    /// `mqtt://127.0.0.1:PORT`; nothing needs to listen there yet.
    pub mqtt_url: String,
    /// Defaults to `DIR/state`.
    pub state_dir: Option<PathBuf>,
    pub reconnect_min_ms: u64,
    /// Small, so a test does not wait out a long backoff after the broker comes back.
    pub reconnect_max_ms: u64,
    /// 0 turns telemetry off.
    pub telemetry_interval_s: u64,
    /// `refuse` or `quarantine`; `None` keeps the default.
    pub on_corruption: Option<String>,
    pub outbox_max_bytes: Option<u64>,
    /// `--log-format json`.
    pub json_logs: bool,
    /// The groups the agent is enrolled into: the harness's claim for this set (one of
    /// [`crate::enroll::GROUP_SETS`]) goes into the agent's `[enrollment] claim_key_file`.
    pub groups: Vec<String>,
    /// Pins the coordinator's public identity (`[enrollment] coordinator`); without it the
    /// agent trusts the coordinator key of its first signed answer.
    pub coordinator_key: Option<protocol::v1::auth::PublicIdentity>,
    /// Further keys, merged over the generated config (tables are merged key by key), e.g.
    /// `[outbox] ttl_results_s`.
    pub extra: toml::Table,
    /// Another `edge-agent` binary than [`crate::bins::agent_bin`]'s, e.g. an older build
    /// measured beside this one in a benchmark.
    pub bin: Option<PathBuf>,
}

impl AgentOptions {
    pub fn new(device_id: impl Into<String>, mqtt_url: impl Into<String>) -> AgentOptions {
        AgentOptions {
            device_id: device_id.into(),
            mqtt_url: mqtt_url.into(),
            state_dir: None,
            reconnect_min_ms: 50,
            reconnect_max_ms: 1000,
            telemetry_interval_s: 2,
            on_corruption: None,
            outbox_max_bytes: None,
            json_logs: false,
            groups: Vec::new(),
            coordinator_key: None,
            extra: toml::Table::new(),
            bin: None,
        }
    }

    /// The config file's text for an agent whose files live under `dir`.
    pub fn to_toml(&self, dir: &Path) -> Result<String> {
        use toml::Value;
        let state_dir = self.state_dir.clone().unwrap_or_else(|| dir.join("state"));
        let mut root = toml::Table::new();
        root.insert("state_dir".into(), Value::String(path_str(&state_dir)?));
        let mut device = toml::Table::new();
        device.insert("id".into(), Value::String(self.device_id.clone()));
        root.insert("device".into(), Value::Table(device));
        let mut mqtt = toml::Table::new();
        mqtt.insert("url".into(), Value::String(self.mqtt_url.clone()));
        mqtt.insert(
            "reconnect_min_ms".into(),
            Value::Integer(to_i64(self.reconnect_min_ms)?),
        );
        mqtt.insert(
            "reconnect_max_ms".into(),
            Value::Integer(to_i64(self.reconnect_max_ms)?),
        );
        root.insert("mqtt".into(), Value::Table(mqtt));
        let mut outbox = toml::Table::new();
        if let Some(mode) = &self.on_corruption {
            outbox.insert("on_corruption".into(), Value::String(mode.clone()));
        }
        if let Some(max) = self.outbox_max_bytes {
            outbox.insert("max_bytes".into(), Value::Integer(to_i64(max)?));
        }
        if !outbox.is_empty() {
            root.insert("outbox".into(), Value::Table(outbox));
        }
        let mut telemetry = toml::Table::new();
        telemetry.insert(
            "interval_s".into(),
            Value::Integer(to_i64(self.telemetry_interval_s)?),
        );
        root.insert("telemetry".into(), Value::Table(telemetry));
        let mut enrollment = toml::Table::new();
        enrollment.insert(
            "claim_key_file".into(),
            Value::String(path_str(&dir.join(CLAIM_KEY_FILE))?),
        );
        // Retry an unanswered request soon: tests start agents before their coordinator.
        enrollment.insert("retry_ms".into(), Value::Integer(500));
        if let Some(pin) = &self.coordinator_key {
            let mut c = toml::Table::new();
            c.insert("sign".into(), Value::String(pin.sign.clone()));
            c.insert("agree".into(), Value::String(pin.agree.clone()));
            enrollment.insert("coordinator".into(), Value::Table(c));
        }
        root.insert("enrollment".into(), Value::Table(enrollment));
        merge(&mut root, &self.extra);
        toml::to_string(&root).context("cannot encode agent config")
    }
}

impl AgentOptions {
    /// Writes what an agent under `dir` starts from: the claim key its config names
    /// (`dir/claim.key`) and the config itself at `config_path`. Whoever starts the process
    /// (the harness, or a runner such as qemu-user) needs both.
    pub fn write_files(&self, dir: &Path, config_path: &Path) -> Result<()> {
        let groups: Vec<&str> = self.groups.iter().map(String::as_str).collect();
        crate::enroll::write_claim_key(&dir.join(CLAIM_KEY_FILE), &groups)?;
        std::fs::write(config_path, self.to_toml(dir)?)
            .with_context(|| format!("cannot write {}", config_path.display()))
    }
}

/// The claim key file the harness writes beside each agent's config.
const CLAIM_KEY_FILE: &str = "claim.key";

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).with_context(|| format!("{v} does not fit a TOML integer"))
}

fn merge(into: &mut toml::Table, from: &toml::Table) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

/// A running (or stopped, restartable) agent.
#[derive(Debug)]
pub struct Agent {
    dir: PathBuf,
    opts: AgentOptions,
    config_path: PathBuf,
    state_dir: PathBuf,
    proc: ChildProc,
}

impl Agent {
    /// Writes `DIR/agent.toml` and starts the agent without waiting for it.
    pub fn spawn(dir: &Path, opts: AgentOptions) -> Result<Agent> {
        ensure_dir(dir)?;
        let config_path = dir.join("agent.toml");
        let state_dir = opts.state_dir.clone().unwrap_or_else(|| dir.join("state"));
        let mut args: Vec<String> = vec!["run".into(), "--config".into(), path_str(&config_path)?];
        if opts.json_logs {
            args.extend(["--log-format".into(), "json".into()]);
        }
        let proc = ChildProc::new(
            format!("agent {}", opts.device_id),
            match &opts.bin {
                Some(b) => b.clone(),
                None => crate::bins::agent_bin()?,
            },
            args,
            dir.join(format!("agent-{}.log", opts.device_id)),
        );
        let mut agent = Agent {
            dir: dir.to_owned(),
            opts,
            config_path,
            state_dir,
            proc,
        };
        agent.write_config()?;
        agent.proc.spawn()?;
        Ok(agent)
    }

    /// Starts the agent and waits until its local API accepts connections.
    pub fn start(dir: &Path, opts: AgentOptions) -> Result<Agent> {
        let mut agent = Agent::spawn(dir, opts)?;
        agent.wait_ready(crate::START_TIMEOUT)?;
        Ok(agent)
    }

    fn write_config(&self) -> Result<()> {
        self.opts.write_files(&self.dir, &self.config_path)
    }

    /// Changes the options; they take effect at the next start.
    pub fn reconfigure(&mut self, f: impl FnOnce(&mut AgentOptions)) -> Result<()> {
        f(&mut self.opts);
        self.write_config()
    }

    /// Waits until the local API accepts a connection; errs early if the agent exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let socket = self.socket_path();
        // A socket file left by a killed agent refuses connections until the new one
        // replaces it, so a successful connect means this start is ready.
        let what = format!("its local API at {} was up", socket.display());
        self.proc.wait_until(&what, timeout, || {
            Ok(std::os::unix::net::UnixStream::connect(&socket).is_ok())
        })
    }

    /// Starts the agent again (it must have exited) and waits until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.respawn()?;
        self.wait_ready(crate::START_TIMEOUT)
    }

    /// Starts the agent again without waiting.
    pub fn respawn(&mut self) -> Result<()> {
        self.write_config()?;
        self.proc.spawn()
    }

    /// SIGKILL: a power cut as far as the agent can tell.
    pub fn kill(&mut self) -> Result<()> {
        self.proc.kill()
    }

    /// SIGTERM and wait; errs unless the agent exits cleanly (status 0).
    pub fn stop(&mut self) -> Result<()> {
        self.proc.stop_clean()
    }

    /// SIGTERM and wait, returning whatever status it exits with.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.proc.terminate(crate::STOP_TIMEOUT)
    }

    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        self.proc.signal(sig)
    }

    /// Waits for the agent to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.proc.wait_exit(timeout)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// A new connection to the local API (waits a little if the agent is starting).
    pub fn api(&self) -> Result<LocalApi> {
        LocalApi::connect_wait(&self.socket_path(), crate::START_TIMEOUT)
    }

    pub fn device_id(&self) -> &str {
        &self.opts.device_id
    }

    pub fn options(&self) -> &AgentOptions {
        &self.opts
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The sled directory inside the state dir.
    pub fn outbox_dir(&self) -> PathBuf {
        self.state_dir.join("outbox")
    }

    /// `[local_api] socket` if set in `extra`, else the default `STATE_DIR/agent.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.opts
            .extra
            .get("local_api")
            .and_then(|t| t.get("socket"))
            .and_then(toml::Value::as_str)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| self.state_dir.join("agent.sock"))
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Everything the agent wrote to stdout/stderr, all starts.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// What the last start wrote.
    pub fn last_log(&self) -> String {
        self.proc.last_log()
    }

    pub fn log_path(&self) -> &Path {
        self.proc.log_path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_the_contract_keys_and_merges_extra() {
        let mut o = AgentOptions::new("d1", "mqtt://127.0.0.1:1");
        o.on_corruption = Some("quarantine".into());
        let mut outbox = toml::Table::new();
        outbox.insert("ttl_results_s".into(), toml::Value::Integer(5));
        o.extra.insert("outbox".into(), toml::Value::Table(outbox));
        let text = o.to_toml(Path::new("/x")).expect("encodes");
        let v: toml::Table = text.parse().expect("valid toml");
        assert_eq!(v["state_dir"].as_str(), Some("/x/state"));
        assert_eq!(v["device"]["id"].as_str(), Some("d1"));
        assert_eq!(v["mqtt"]["url"].as_str(), Some("mqtt://127.0.0.1:1"));
        assert_eq!(v["mqtt"]["reconnect_max_ms"].as_integer(), Some(1000));
        assert_eq!(v["outbox"]["on_corruption"].as_str(), Some("quarantine"));
        assert_eq!(v["outbox"]["ttl_results_s"].as_integer(), Some(5));
        assert_eq!(v["telemetry"]["interval_s"].as_integer(), Some(2));
    }
}
