//! Headless Chromium (Debian's `chromium`, provisioned by `cargo xtask test`) for the
//! dashboard tests: the DOM after the page's scripts ran, and screenshots.
//!
//! `--virtual-time-budget` lets the page's fetches and timers run before the DOM is dumped
//! (Chromium's headless flags: <https://developer.chrome.com/docs/chromium/headless>).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

/// How much virtual time a page gets to load and render (its fetches are real requests).
const BUDGET_MS: u32 = 10_000;

/// The browser: `EDGE_CHROMIUM`, else `chromium` on PATH.
pub fn chromium_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("EDGE_CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    anyhow::bail!(
        "chromium not found on PATH (Debian package chromium; `cargo xtask test` installs it as root, or set EDGE_CHROMIUM)"
    )
}

/// One headless browser profile under `profile_dir`.
#[derive(Debug)]
pub struct Browser {
    bin: PathBuf,
    profile: PathBuf,
}

impl Browser {
    pub fn new(profile_dir: &Path) -> Result<Browser> {
        std::fs::create_dir_all(profile_dir)
            .with_context(|| format!("cannot create {}", profile_dir.display()))?;
        Ok(Browser {
            bin: chromium_bin()?,
            profile: profile_dir.to_owned(),
        })
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.args([
            "--headless",
            // Root in CI containers: Chromium's sandbox needs user namespaces it may not get.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            &format!("--virtual-time-budget={BUDGET_MS}"),
        ])
        .arg(format!("--user-data-dir={}", self.profile.display()));
        c
    }

    /// The serialized DOM of `url` once its scripts ran.
    pub fn dom(&self, url: &str) -> Result<String> {
        let out = self
            .command()
            .arg("--dump-dom")
            .arg(url)
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        ensure!(
            out.status.success(),
            "chromium --dump-dom {url} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A PNG screenshot of `url` at 1280x1400.
    pub fn screenshot(&self, url: &str, png: &Path) -> Result<()> {
        if let Some(dir) = png.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let out = self
            .command()
            .arg(format!("--screenshot={}", png.display()))
            .arg("--window-size=1280,1400")
            .arg(url)
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        ensure!(
            out.status.success() && png.is_file(),
            "chromium --screenshot {url} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

/// `target/dashboard/` in this workspace, where the dashboard tests leave their screenshots.
pub fn screenshot_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("dashboard")
}
