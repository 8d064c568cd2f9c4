//! Shared by the coordinator's integration tests: a `serve` process on a free loopback port
//! with its state dir and log in a temp dir, stopped with SIGTERM and checked, killed on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(60);
pub const POLL: Duration = Duration::from_millis(20);

/// The coordinator process; killed on drop so a failing test leaks nothing.
pub struct Coordinator {
    pub child: Child,
    pub log: PathBuf,
    pub state: PathBuf,
}

impl Coordinator {
    pub fn start(dir: &Path) -> Coordinator {
        let state = dir.join("state");
        let args = [
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--state-dir".into(),
            state.clone().into_os_string(),
        ];
        Self::spawn(dir, &args, state)
    }

    /// `serve --config CONFIG`, whose state dir is `state`.
    pub fn start_with_config(dir: &Path, config: &Path, state: PathBuf) -> Coordinator {
        let args = [
            "serve".into(),
            "--config".into(),
            config.as_os_str().to_owned(),
        ];
        Self::spawn(dir, &args, state)
    }

    fn spawn(dir: &Path, args: &[std::ffi::OsString], state: PathBuf) -> Coordinator {
        let log = dir.join(format!("coordinator-{}.log", protocol::v1::now_ms()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_edge-coordinator"))
            .args(args)
            .env("RUST_LOG", "debug,rumqttd=warn,sled=info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("coordinator starts");
        Coordinator { child, log, state }
    }

    pub fn journal_path(&self) -> PathBuf {
        self.state.join("journal.jsonl")
    }

    /// SIGTERM, then the exit status (must be 0).
    pub fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill failed");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(exit) = self.child.try_wait().expect("wait") {
                assert!(
                    exit.success(),
                    "coordinator exited with {exit}; log:\n{}",
                    self.log_text()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "coordinator did not stop; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(POLL);
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Coordinator {
    /// Waits for the journal's first `ready` line and returns the broker's port.
    pub fn wait_ready_port(&self) -> u16 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let text = std::fs::read_to_string(self.journal_path()).unwrap_or_default();
            let port = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| l["event"] == "ready")
                .and_then(|l| l["broker"].as_str().map(str::to_owned))
                .and_then(|u| u.rsplit(':').next().and_then(|p| p.parse().ok()));
            if let Some(port) = port {
                return port;
            }
            assert!(
                Instant::now() < deadline,
                "coordinator not ready; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(POLL);
        }
    }
}
