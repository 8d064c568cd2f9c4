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
        let log = dir.join(format!("coordinator-{}.log", protocol::v1::now_ms()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let state = dir.join("state");
        let child = Command::new(env!("CARGO_BIN_EXE_edge-coordinator"))
            .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
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
