//! The fleet simulator (`edge-sim`) as a child process: writes a scenario and the claim keys
//! it names, starts the simulator against a broker, and stops it (SIGTERM: it stops every
//! device the way the agent shuts down and writes its results).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::ChildProc;

/// A running simulator; dropped, it is killed (results are only written by [`Sim::stop`]).
/// The devices' state lives in a tmpfs folder this handle owns, removed when it is dropped, so
/// a killed simulator leaves nothing behind in `/dev/shm`.
pub struct Sim {
    proc: ChildProc,
    out: PathBuf,
    // Dropped after `proc` (fields drop in order): the process is gone before its files.
    _state: tempfile::TempDir,
}

impl Sim {
    /// Writes `scenario` to `dir/scenario.toml` and starts `edge-sim` on it against `mqtt_url`.
    /// The scenario's groups name claim key files relative to `dir`; write them first
    /// ([`crate::enroll::write_claim_key`]).
    pub fn start(dir: &Path, scenario: &str, mqtt_url: &str) -> Result<Sim> {
        Sim::start_shard(dir, scenario, mqtt_url, None)
    }

    /// As [`Sim::start`], running shard `(I, N)` of the fleet (`edge-sim --shard I/N`); its
    /// results go to `dir/out-I` and its log to `dir/sim-I.log`.
    pub fn start_shard(
        dir: &Path,
        scenario: &str,
        mqtt_url: &str,
        shard: Option<(u32, u32)>,
    ) -> Result<Sim> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let file = dir.join("scenario.toml");
        std::fs::write(&file, scenario)
            .with_context(|| format!("cannot write {}", file.display()))?;
        let (out, log) = match shard {
            Some((i, _)) => (
                dir.join(format!("out-{i}")),
                dir.join(format!("sim-{i}.log")),
            ),
            None => (dir.join("out"), dir.join("sim.log")),
        };
        let tmpfs = Path::new("/dev/shm");
        let mut b = tempfile::Builder::new();
        b.prefix("edge-sim-test-");
        let state = if tmpfs.is_dir() {
            b.tempdir_in(tmpfs)
        } else {
            b.tempdir()
        }
        .context("cannot create the simulated devices' state folder")?;
        let mut args: Vec<std::ffi::OsString> = vec![
            file.into_os_string(),
            "--out".into(),
            out.clone().into_os_string(),
            "--mqtt-url".into(),
            mqtt_url.into(),
            "--state-dir".into(),
            state.path().as_os_str().to_owned(),
        ];
        if let Some((i, n)) = shard {
            args.push("--shard".into());
            args.push(format!("{i}/{n}").into());
        }
        let mut proc = ChildProc::new("edge-sim", crate::bins::sim_bin()?, args, log);
        proc.spawn()?;
        Ok(Sim {
            proc,
            out,
            _state: state,
        })
    }

    /// Stops the simulator and returns the path of its `result.json`.
    pub fn stop(&mut self, timeout: Duration) -> Result<PathBuf> {
        let status = self.proc.terminate(timeout)?;
        ensure!(
            status.success(),
            "edge-sim exited with {status}:\n{}",
            self.proc.log_tail(40)
        );
        let result = self.out.join("result.json");
        ensure!(result.is_file(), "edge-sim wrote no {}", result.display());
        Ok(result)
    }

    /// Whether the simulator still runs (it exits on its own only after an error or its
    /// scenario's duration).
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub fn log_tail(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }
}
