//! A size-limited tmpfs mounted over a test directory, to fill a disk on purpose.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::process::ensure_dir;

/// Errs with a clear message unless running as root; `what` names the test that needs it.
pub fn require_root(what: &str) -> Result<()> {
    if nix::unistd::Uid::effective().is_root() {
        Ok(())
    } else {
        bail!(
            "{what} needs root (it mounts a tmpfs): run the suite as root, as `cargo xtask test` in CI does"
        )
    }
}

/// A mounted tmpfs; unmounted on drop (lazily if something still holds it open).
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE tmpfs PATH` (creates PATH). Needs root.
    pub fn mount(path: &Path, size: &str) -> Result<Tmpfs> {
        require_root("mounting a tmpfs")?;
        ensure_dir(path)?;
        let opts = format!("size={size},mode=0700");
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
            .arg(path))
        .with_context(|| format!("cannot mount a {size} tmpfs on {}", path.display()))?;
        Ok(Tmpfs {
            path: path.to_owned(),
        })
    }

    /// `mount -o remount,size=SIZE PATH`: grows (or shrinks) it, keeping its files.
    pub fn resize(&self, size: &str) -> Result<()> {
        let opts = format!("remount,size={size}");
        run(Command::new("mount").args(["-o", &opts]).arg(&self.path)).with_context(|| {
            format!(
                "cannot resize the tmpfs on {} to {size}",
                self.path.display()
            )
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if run(Command::new("umount").arg(&self.path)).is_err() {
            let _ = run(Command::new("umount").arg("-l").arg(&self.path));
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
