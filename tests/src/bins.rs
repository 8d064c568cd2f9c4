//! Finds the built `edge-agent`, `edge-coordinator` and `edge-sim` binaries.
//!
//! Integration tests run from `target/<profile>/deps/`, xtask from `target/<profile>/`, and the
//! binaries sit in `target/<profile>/`, so looking next to the running executable and one level
//! up finds the binaries of the same profile. `EDGE_AGENT_BIN` / `EDGE_COORDINATOR_BIN`
//! override (e.g. to test a release or cross-built binary).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

/// Path of the `edge-agent` binary.
pub fn agent_bin() -> Result<PathBuf> {
    locate("edge-agent", "EDGE_AGENT_BIN")
}

/// Path of the `edge-coordinator` binary.
pub fn coordinator_bin() -> Result<PathBuf> {
    locate("edge-coordinator", "EDGE_COORDINATOR_BIN")
}

/// Path of the `edge-sim` binary (the fleet simulator).
pub fn sim_bin() -> Result<PathBuf> {
    locate("edge-sim", "EDGE_SIM_BIN")
}

fn locate(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{env_var}={} does not name a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let mut searched = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        searched.push(dir.display().to_string());
    }
    bail!(
        "{name} binary not found in {}: build it with `cargo build --workspace --bins` \
         (`cargo xtask test` does) or set {env_var}",
        searched.join(" or ")
    )
}
