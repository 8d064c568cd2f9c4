//! Enrollment for the harness's agents and coordinators: every agent enrolls itself with a fleet
//! claim key (claim mode), as a flashed board would, and every coordinator the harness starts
//! accepts the harness's claims.
//!
//! Groups are the coordinator's to assign, by claim: the harness has one claim key per group set
//! its tests use ([`GROUP_SETS`]), so an agent that should be in `lab` enrolls with the `lab`
//! claim. The keys are derived from fixed seeds: they are test fixtures, never used outside the
//! harness, and deriving them lets the coordinator's config and every agent agree without a
//! shared file.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use protocol::v1::auth::PublicIdentity;
use protocol::v1::deploy::{SigningKey, public_key_hex};
use sha2::{Digest, Sha256};

/// The group sets the harness's agents are enrolled into; each gets its own claim key.
pub const GROUP_SETS: [&[&str]; 6] = [&[], &["lab"], &["fl"], &["demo"], &["torch"], &["logreg"]];

fn claim_key(groups: &[&str]) -> Result<SigningKey> {
    ensure!(
        GROUP_SETS.contains(&groups),
        "no harness claim for groups {groups:?}; add the set to GROUP_SETS"
    );
    let seed: [u8; 32] =
        Sha256::digest(format!("edge-tests fleet claim|{}", groups.join(","))).into();
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes the claim key for `groups` to `path` (mode 0600, in the key-file format of
/// `protocol::keyfile`), replacing what is there.
pub fn write_claim_key(path: &Path, groups: &[&str]) -> Result<PathBuf> {
    let key = claim_key(groups)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    use std::io::Write;
    writeln!(f, "{}", hex_seed(&key))?;
    Ok(path.to_owned())
}

fn hex_seed(key: &SigningKey) -> String {
    key.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// The coordinator's `[enrollment]` table: claim mode, one claim per [`GROUP_SETS`] entry.
pub fn coordinator_enrollment() -> Result<toml::Table> {
    use toml::Value;
    let mut claims = Vec::new();
    for groups in GROUP_SETS {
        let mut c = toml::Table::new();
        c.insert(
            "key".into(),
            Value::String(public_key_hex(&claim_key(groups)?.verifying_key())),
        );
        c.insert(
            "groups".into(),
            Value::Array(groups.iter().map(|g| Value::String((*g).into())).collect()),
        );
        claims.push(Value::Table(c));
    }
    let mut t = toml::Table::new();
    t.insert("mode".into(), Value::String("claim".into()));
    t.insert("claims".into(), Value::Array(claims));
    Ok(t)
}

/// Adds the harness's `[enrollment]` to the coordinator config at `path` (created if missing);
/// a config that already has an `[enrollment]` table keeps its own.
pub fn add_to_coordinator_config(path: &Path) -> Result<()> {
    let mut root: toml::Table = match std::fs::read_to_string(path) {
        Ok(text) => {
            toml::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if !root.contains_key("enrollment") {
        root.insert(
            "enrollment".into(),
            toml::Value::Table(coordinator_enrollment()?),
        );
    }
    std::fs::write(path, toml::to_string(&root)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Runs `edge-coordinator identity --state-dir DIR`: the coordinator's public identity (made if
/// missing), for agents that pin it.
pub fn coordinator_identity(state_dir: &Path) -> Result<PublicIdentity> {
    let out = std::process::Command::new(crate::bins::coordinator_bin()?)
        .arg("identity")
        .arg("--state-dir")
        .arg(state_dir)
        .output()
        .context("cannot run edge-coordinator identity")?;
    if !out.status.success() {
        bail!(
            "edge-coordinator identity failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON line")?;
    serde_json::from_str(line).with_context(|| format!("cannot parse identity {line:?}"))
}
