//! One temp dir per end-to-end test, and the logs of its processes printed when it fails.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::process::{read_lossy, tail};

/// Lines of each log printed on failure.
const LOG_TAIL_LINES: usize = 120;

/// A test's private directory. Every process a test starts keeps its files and logs under it.
///
/// If the test fails (an `Err` from [`run_test`]'s closure, or a panic while this is alive),
/// the tail of every `*.log` file and the journal under the dir is printed. Set
/// `EDGE_TESTS_KEEP=1` to keep the dir afterwards.
#[derive(Debug)]
pub struct TestEnv {
    name: String,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    dumped: Cell<bool>,
}

impl TestEnv {
    pub fn new(name: &str) -> Result<TestEnv> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("edge-{name}-"))
            .tempdir()
            .context("cannot create a temp dir for the test")?;
        let path = dir.path().to_owned();
        Ok(TestEnv {
            name: name.to_owned(),
            dir: Some(dir),
            path,
            dumped: Cell::new(false),
        })
    }

    /// The test's directory.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// A subdirectory (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Every `*.log` file under the dir (the processes' logs), sorted.
    pub fn log_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        collect_files(&self.path, &mut files);
        files.retain(|f| f.extension().is_some_and(|x| x == "log"));
        files.sort();
        files
    }

    /// Keeps the directory after this is dropped (a failed demo's logs stay for the user to
    /// read); returns its path.
    pub fn keep(&mut self) -> PathBuf {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        self.path.clone()
    }

    /// Prints the logs and the journal tail of everything under the dir to stderr.
    pub fn dump_logs(&self) {
        if self.dumped.replace(true) {
            return;
        }
        eprintln!(
            "===== {}: files under {} =====",
            self.name,
            self.path.display()
        );
        let mut files = Vec::new();
        collect_files(&self.path, &mut files);
        files.sort();
        for f in files {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let lines = if name.ends_with(".log") {
                LOG_TAIL_LINES
            } else if name.ends_with(".jsonl") {
                40
            } else {
                continue;
            };
            eprintln!("----- {} (last {lines} lines) -----", f.display());
            eprintln!("{}", tail(&read_lossy(&f), lines));
        }
        eprintln!("===== end of {} logs =====", self.name);
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        match e.file_type() {
            // The agent's sled dirs hold no logs; skip them to keep the walk cheap.
            Ok(t) if t.is_dir() && !p.ends_with("outbox") => {
                collect_files(&p, out);
            }
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        if std::env::var_os("EDGE_TESTS_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
            && let Some(dir) = self.dir.take()
        {
            eprintln!("{}: keeping {}", self.name, dir.keep().display());
        }
    }
}

/// Runs an end-to-end test body in a fresh [`TestEnv`]; on error prints the processes' logs
/// and panics with the error chain, so `#[test] fn x() { run_test("x", |env| { .. }) }`.
///
/// Processes created inside the closure are dropped (killed) when it returns, before the logs
/// are printed, so the logs are complete.
pub fn run_test(name: &str, f: impl FnOnce(&TestEnv) -> Result<()>) {
    let env = match TestEnv::new(name) {
        Ok(env) => env,
        Err(e) => panic!("{name}: {e:#}"),
    };
    if let Err(e) = f(&env) {
        env.dump_logs();
        panic!("{name} failed: {e:?}");
    }
}
