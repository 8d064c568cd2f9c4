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

/// Prefix of the state folders in `/dev/shm`.
const STATE_PREFIX: &str = "edge-sim-test-";
/// In each state folder: the pid of the process that made it.
const OWNER_FILE: &str = "owner.pid";

/// Removes the state folders whose owner has gone without removing them (a harness killed
/// with SIGKILL, or by the OOM killer): a 10,000-device run leaves about 1.5 GB per simulator
/// in RAM-backed `/dev/shm`, and the next run would then be the one killed.
fn remove_orphans(tmpfs: &Path) {
    let Ok(entries) = std::fs::read_dir(tmpfs) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(STATE_PREFIX) {
            continue;
        }
        let path = entry.path();
        let owner = std::fs::read_to_string(path.join(OWNER_FILE)).ok();
        // A folder without a pid yet may be being made this instant: left alone.
        let Some(pid) = owner.and_then(|p| p.trim().parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => eprintln!(
                "edge-tests: removed {}, left by process {pid} which is gone",
                path.display()
            ),
            Err(e) => eprintln!("edge-tests: cannot remove {}: {e}", path.display()),
        }
    }
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
        // Written whole under another name and renamed: shards started one after the other
        // write the same file, and an earlier shard still reading it must never see it
        // truncated (two of three 10,000-device shards once failed with "missing field
        // `fleet`").
        let part = dir.join(format!("scenario.toml.{}", shard.map_or(0, |(i, _)| i)));
        std::fs::write(&part, scenario)
            .with_context(|| format!("cannot write {}", part.display()))?;
        std::fs::rename(&part, &file)
            .with_context(|| format!("cannot rename {} to {}", part.display(), file.display()))?;
        let (out, log) = match shard {
            Some((i, _)) => (
                dir.join(format!("out-{i}")),
                dir.join(format!("sim-{i}.log")),
            ),
            None => (dir.join("out"), dir.join("sim.log")),
        };
        let tmpfs = Path::new("/dev/shm");
        let mut b = tempfile::Builder::new();
        b.prefix(STATE_PREFIX);
        let state = if tmpfs.is_dir() {
            remove_orphans(tmpfs);
            b.tempdir_in(tmpfs)
        } else {
            b.tempdir()
        }
        .context("cannot create the simulated devices' state folder")?;
        let owner = state.path().join(OWNER_FILE);
        std::fs::write(&owner, std::process::id().to_string())
            .with_context(|| format!("cannot write {}", owner.display()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_folders_whose_owner_is_gone_are_removed() {
        let root = tempfile::tempdir().expect("temp dir");
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let gone = child.id();
        child.wait().expect("wait");
        let make = |name: &str, owner: Option<u32>| {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).expect("mkdir");
            if let Some(pid) = owner {
                std::fs::write(dir.join(OWNER_FILE), pid.to_string()).expect("write pid");
            }
            dir
        };
        let orphan = make("edge-sim-test-orphan", Some(gone));
        let ours = make("edge-sim-test-ours", Some(std::process::id()));
        let new = make("edge-sim-test-new", None);
        let other = make("something-else", Some(gone));
        remove_orphans(root.path());
        assert!(!orphan.exists());
        assert!(ours.exists() && new.exists() && other.exists());
    }
}
