//! A restartable child process whose output goes to a log file and which dies with its owner.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

/// Pids of every [`ChildProc`] started and not yet seen to exit, so that an interrupted run
/// (`cargo xtask demo` on Ctrl-C) can stop them all from its signal thread, where the owners'
/// `Drop` never runs.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<u32>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops every child process the harness started and has not seen exit: SIGTERM, then SIGKILL
/// for those still running after `grace`. Reaps them; returns how many there were. For a
/// signal handler's thread: the `ChildProc`s that own them are not touched and must not be used
/// afterwards (the process is about to exit).
pub fn stop_all_children(grace: Duration) -> usize {
    let pids: Vec<Pid> = live()
        .drain(..)
        .filter_map(|p| i32::try_from(p).ok().map(Pid::from_raw))
        .collect();
    for &pid in &pids {
        let _ = kill(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let mut left = pids.clone();
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|&pid| {
            matches!(
                waitpid(pid, Some(WaitPidFlag::WNOHANG)),
                Ok(nix::sys::wait::WaitStatus::StillAlive)
            )
        });
        std::thread::sleep(crate::POLL);
    }
    for pid in left {
        let _ = kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
    }
    pids.len()
}

/// One program with fixed arguments that can be started, signalled and started again.
///
/// stdout and stderr of every start are appended to one log file (a header line marks each
/// start), so a failing test can print the whole history. Dropping it SIGKILLs the process.
#[derive(Debug)]
pub struct ChildProc {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    log_path: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Environment variables set for the child, beside the inherited ones.
    envs: Vec<(OsString, OsString)>,
}

impl ChildProc {
    /// Describes the process; nothing runs until [`ChildProc::spawn`].
    pub fn new(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
        log_path: impl Into<PathBuf>,
    ) -> Self {
        ChildProc {
            name: name.into(),
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            log_path: log_path.into(),
            child: None,
            starts: 0,
            envs: Vec::new(),
        }
    }

    /// Sets an environment variable for every start.
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Starts the process (again). Refuses if the previous start is still running.
    pub fn spawn(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("{} is already running", self.name);
        }
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot open log file {}", self.log_path.display()))?;
        writeln!(
            log,
            "===== harness: start #{} of {}: {} {} =====",
            self.starts,
            self.name,
            self.program.display(),
            self.args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        )
        .with_context(|| format!("cannot write log file {}", self.log_path.display()))?;
        let stdout = log.try_clone().context("cannot clone log file handle")?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("cannot start {} ({})", self.name, self.program.display()))?;
        live().push(child.id());
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the last start has not exited (reaps it if it has).
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && matches!(self.poll(), Ok(None))
    }

    /// Exit status of the last start if it has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.poll().ok().flatten()
    }

    /// The last start's exit status once it has exited (reaped, and its pid forgotten by the
    /// registry [`stop_all_children`] reads); `None` while it runs or before any start.
    fn poll(&mut self) -> std::io::Result<Option<ExitStatus>> {
        let Some(c) = &mut self.child else {
            return Ok(None);
        };
        let status = c.try_wait()?;
        if status.is_some() {
            forget_pid(c.id());
        }
        Ok(status)
    }

    /// Sends `sig` to the running process; no-op if it has exited.
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let Some(pid) = self.pid() else { return Ok(()) };
        let pid = Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
        kill(pid, sig).with_context(|| format!("cannot send {sig} to {} (pid {pid})", self.name))
    }

    /// SIGKILL and reap: the power-cut of a process.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(c) = &mut self.child {
            // Fails only if it already exited; wait() below reaps either way.
            let _ = c.kill();
            c.wait()
                .with_context(|| format!("cannot reap {}", self.name))?;
            forget_pid(c.id());
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `timeout` for the exit; SIGKILLs and errs past that.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        match self.wait_exit(timeout) {
            Ok(status) => Ok(status),
            Err(e) => {
                self.kill()?;
                Err(e.context(format!(
                    "{} ignored SIGTERM for {timeout:?}; killed it",
                    self.name
                )))
            }
        }
    }

    /// Polls `ready` until it holds; errs naming `what` if the process exits first or
    /// `timeout` passes, with the end of its log.
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if ready()? {
                return Ok(());
            }
            if let Some(status) = self.exit_status() {
                bail!(
                    "{} exited with {status} before {what}; its log:\n{}",
                    self.name,
                    tail(&self.last_log(), 40)
                );
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "{}: no {what} within {timeout:?}; its log:\n{}",
                    self.name,
                    tail(&self.last_log(), 40)
                );
            }
            std::thread::sleep(crate::POLL);
        }
    }

    /// SIGTERM and require a clean exit (status 0) within [`crate::STOP_TIMEOUT`]; the error
    /// shows the end of the process's log.
    pub fn stop_clean(&mut self) -> Result<()> {
        let status = self.terminate(crate::STOP_TIMEOUT)?;
        if !status.success() {
            bail!(
                "{} exited with {status} after SIGTERM; its log:\n{}",
                self.name,
                tail(&self.last_log(), 40)
            );
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        if self.child.is_none() {
            bail!("{} was never started", self.name)
        }
        loop {
            if let Some(status) = self
                .poll()
                .with_context(|| format!("cannot wait for {}", self.name))?
            {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(crate::POLL);
        }
    }

    /// Everything the process wrote so far, all starts.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Only what the last start wrote.
    pub fn last_log(&self) -> String {
        let all = self.log();
        match all.rfind("===== harness: start #") {
            Some(i) => all[i..].to_owned(),
            None => all,
        }
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log(), n)
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The child `pid` exited and was reaped: its number may be reused, never signal it again.
fn forget_pid(pid: u32) {
    live().retain(|&p| p != pid);
}

pub(crate) fn read_lossy(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}

pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Creates `dir` and its parents.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}
