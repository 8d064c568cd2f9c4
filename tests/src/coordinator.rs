//! An `edge-coordinator serve` process: with its embedded broker on a loopback port, or
//! connected to an external broker.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::journal::Journal;
use crate::net::{free_port, looks_like_port_collision, retry_while_port_busy};
use crate::process::{ChildProc, ensure_dir};

#[derive(Debug, Clone)]
enum Broker {
    Embedded { port: u16, args: Vec<String> },
    External { url: String, args: Vec<String> },
}

/// A coordinator whose state dir, journal and log live under one directory.
///
/// Stopping and starting again keeps the port, the state dir and the journal file (the journal
/// is appended to), as a restarted service would.
#[derive(Debug)]
pub struct Coordinator {
    dir: PathBuf,
    broker: Broker,
    journal_path: PathBuf,
    proc: ChildProc,
    /// Journal reader used to notice each start's `ready` event.
    journal: Journal,
}

impl Coordinator {
    /// Starts with the embedded broker on a free loopback port.
    pub fn start_embedded(dir: &Path) -> Result<Coordinator> {
        Coordinator::start_embedded_with_args(dir, Vec::new())
    }

    /// [`Coordinator::start_embedded`] with further `serve` flags, e.g. `--config FILE`
    /// (the flags the harness passes override the file's state dir, listener and journal).
    pub fn start_embedded_with_args(dir: &Path, args: Vec<String>) -> Result<Coordinator> {
        let mut last_err = None;
        for _ in 0..5 {
            let broker = Broker::Embedded {
                port: free_port()?,
                args: args.clone(),
            };
            let mut c = Coordinator::new(dir, broker)?;
            match c.start_once() {
                Ok(()) => return Ok(c),
                // Another process took the port between free_port() and our bind: try another.
                Err(e) if looks_like_port_collision(&c.proc.last_log()) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err
            .context("no attempts")?
            .context("port collisions on 5 tries"))
    }

    /// Starts with the embedded broker on `port` (e.g. one an agent was already told to use).
    pub fn start_embedded_at(dir: &Path, port: u16) -> Result<Coordinator> {
        let broker = Broker::Embedded {
            port,
            args: Vec::new(),
        };
        let mut c = Coordinator::new(dir, broker)?;
        c.start()?;
        Ok(c)
    }

    /// Starts connected to the broker at `broker_url` (`mqtt://127.0.0.1:PORT`).
    pub fn start_external(dir: &Path, broker_url: &str) -> Result<Coordinator> {
        Coordinator::start_external_with_args(dir, broker_url, Vec::new())
    }

    /// [`Coordinator::start_external`] with further `serve` flags, e.g. the TLS files of
    /// [`crate::TlsFiles::coordinator_args`] for an `mqtts://` broker.
    pub fn start_external_with_args(
        dir: &Path,
        broker_url: &str,
        args: Vec<String>,
    ) -> Result<Coordinator> {
        let mut c = Coordinator::new(
            dir,
            Broker::External {
                url: broker_url.to_owned(),
                args,
            },
        )?;
        c.start()?;
        Ok(c)
    }

    fn new(dir: &Path, broker: Broker) -> Result<Coordinator> {
        ensure_dir(dir)?;
        let state_dir = dir.join("state");
        let journal_path = dir.join("journal.jsonl");
        let mut args: Vec<String> = vec!["serve".into(), "--state-dir".into(), utf8(&state_dir)?];
        let extra = match &broker {
            Broker::Embedded { port, args: extra } => {
                args.extend(["--listen".into(), format!("127.0.0.1:{port}")]);
                extra
            }
            Broker::External { url, args: extra } => {
                args.extend(["--broker".into(), url.clone()]);
                extra
            }
        };
        args.extend(extra.iter().cloned());
        // Every coordinator accepts the harness's fleet claims (crate::enroll): in the test's
        // own config file if it passes one, else in one the harness writes.
        match extra.iter().position(|a| a == "--config") {
            Some(i) => {
                let file = extra.get(i + 1).context("--config without a file")?;
                crate::enroll::add_to_coordinator_config(Path::new(file))?;
            }
            None => {
                let file = dir.join("coordinator.toml");
                crate::enroll::add_to_coordinator_config(&file)?;
                args.extend(["--config".into(), utf8(&file)?]);
            }
        }
        args.extend(["--journal".into(), utf8(&journal_path)?]);
        let proc = ChildProc::new(
            "coordinator",
            crate::bins::coordinator_bin()?,
            args,
            dir.join("coordinator.log"),
        )
        // The HTTP API on a free port (a flag's env form: a `--before` binary from before the
        // API ignores it); `api_url` reads where it went.
        .with_env("EDGE_COORDINATOR_API_LISTEN", "127.0.0.1:0");
        let journal = Journal::open(&journal_path);
        Ok(Coordinator {
            dir: dir.to_owned(),
            broker,
            journal_path,
            proc,
            journal,
        })
    }

    /// Starts the process (again, same port and files) and waits for its `ready` event.
    ///
    /// On a restart the old listener's port can take a moment to be free again, so a bind
    /// failure is retried on the same port until the start timeout.
    pub fn start(&mut self) -> Result<()> {
        retry_while_port_busy(self, Self::start_once, |p| p.proc.last_log())
    }

    fn start_once(&mut self) -> Result<()> {
        self.journal.refresh()?;
        let readies_before = self.journal.count_kind("ready");
        self.proc.spawn()?;
        let what = format!("journaling \"ready\" in {}", self.journal_path.display());
        let journal = &mut self.journal;
        self.proc.wait_until(&what, crate::START_TIMEOUT, || {
            journal.refresh()?;
            Ok(journal.count_kind("ready") > readies_before)
        })
    }

    /// SIGTERM; errs unless it exits cleanly in time.
    pub fn stop(&mut self) -> Result<()> {
        self.proc.stop_clean()
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> Result<()> {
        self.proc.kill()
    }

    /// [`Coordinator::stop`] then [`Coordinator::start`].
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    /// Process id of the running coordinator.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// The broker URL agents should use: the embedded listener, or the external broker.
    pub fn url(&self) -> String {
        match &self.broker {
            Broker::Embedded { port, .. } => format!("mqtt://127.0.0.1:{port}"),
            Broker::External { url, .. } => url.clone(),
        }
    }

    /// The embedded broker's port (`None` with an external broker).
    pub fn port(&self) -> Option<u16> {
        match self.broker {
            Broker::Embedded { port, .. } => Some(port),
            Broker::External { .. } => None,
        }
    }

    /// A fresh reader of the journal, from its first line.
    pub fn journal(&self) -> Journal {
        Journal::open(&self.journal_path)
    }

    /// The running coordinator's HTTP API (`http://127.0.0.1:PORT`), from the `api.json` it
    /// writes at start.
    pub fn api_url(&self) -> Result<String> {
        let path = self.state_dir().join("api.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {} (is the API enabled?)", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        v.get("url")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("{} has no url", path.display()))
    }

    /// The coordinator's state directory (`--state-dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn journal_path(&self) -> &Path {
        &self.journal_path
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn log_path(&self) -> &Path {
        self.proc.log_path()
    }
}

fn utf8(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}
