//! Deployments from the test side: a signing key from `edge-coordinator keygen`, a pipeline
//! directory with real modules copied in, and `edge-coordinator deploy` runs whose exit status
//! and per-device lines the test reads.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::agent::AgentOptions;
use crate::bins::coordinator_bin;
use crate::coordinator::Coordinator;
use crate::process::ensure_dir;

/// The built guest modules (`cargo xtask modules` builds them; so does `cargo xtask test`).
pub fn wasm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../modules/target/wasm32-wasip2/release")
}

/// A private key file and its public key (hex, for the agents' `trusted_keys`).
#[derive(Debug, Clone)]
pub struct SigningKey {
    pub path: PathBuf,
    pub public_hex: String,
}

impl SigningKey {
    /// Runs `edge-coordinator keygen --out PATH`.
    pub fn generate(path: &Path) -> Result<SigningKey> {
        if let Some(dir) = path.parent() {
            ensure_dir(dir)?;
        }
        let out = Command::new(coordinator_bin()?)
            .args(["keygen", "--out"])
            .arg(path)
            .output()
            .context("cannot run edge-coordinator keygen")?;
        if !out.status.success() {
            bail!("keygen failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let public_hex = String::from_utf8(out.stdout)?.trim().to_owned();
        Ok(SigningKey {
            path: path.to_owned(),
            public_hex,
        })
    }
}

/// A directory with a pipeline description and the modules it names (copied from the
/// built modules, under the names the description uses).
#[derive(Debug, Clone)]
pub struct PipelineDir {
    pub toml: PathBuf,
}

/// A pipeline named `name`: a synthetic sensor on `stream` (20 Hz, windows of 64) into the
/// feature extractor (`modules/features.wasm`, see [`FEATURES_MODULE`]), whose output goes to
/// the outbox as stream `features`.
pub fn features_pipeline(name: &str, stream: &str) -> String {
    format!(
        r#"name = "{name}"
[[source]]
name = "imu"
kind = "synthetic"
stream = "{stream}"
rate_hz = 20
window = 64
[[stage]]
name = "features"
module = "modules/features.wasm"
input = "imu"
config = {{ sample_rate_hz = 1000.0, bands = 4 }}
[[sink]]
kind = "outbox"
input = "features"
stream = "features"
"#
    )
}

/// The module [`features_pipeline`] names, as `PipelineDir::create` takes it.
pub const FEATURES_MODULE: (&str, &str) = ("feature_extractor", "modules/features.wasm");

impl PipelineDir {
    /// Writes `text` as `DIR/pipeline.toml` and copies each `(artifact, name)` module:
    /// `modules/target/.../ARTIFACT.wasm` to `DIR/NAME`.
    pub fn create(dir: &Path, text: &str, modules: &[(&str, &str)]) -> Result<PipelineDir> {
        ensure_dir(dir)?;
        for (artifact, name) in modules {
            let from = wasm_dir().join(format!("{artifact}.wasm"));
            let to = dir.join(name);
            if let Some(parent) = to.parent() {
                ensure_dir(parent)?;
            }
            std::fs::copy(&from, &to).with_context(|| {
                format!(
                    "cannot copy {} (build the modules: cargo xtask modules)",
                    from.display()
                )
            })?;
        }
        let toml = dir.join("pipeline.toml");
        std::fs::write(&toml, text).with_context(|| format!("cannot write {}", toml.display()))?;
        Ok(PipelineDir { toml })
    }
}

/// What one `edge-coordinator deploy` run printed.
#[derive(Debug)]
pub struct DeployRun {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl DeployRun {
    /// The final line the command printed for `device` (`DEV: healthy`, `DEV: rolled back: ..`,
    /// then ` (N bad chunks dropped)` if the agent dropped any), without the `DEV: `.
    pub fn outcome(&self, device: &str) -> Option<&str> {
        let prefix = format!("{device}: ");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
    }
}

/// Runs `edge-coordinator deploy TARGET PIPELINE --key K --version V ARGS..` against the
/// coordinator's state dir and waits for it (it waits for the rollout, bounded by
/// `--timeout-s`, which callers should pass).
pub fn deploy(
    coord: &Coordinator,
    target: &[&str],
    pipeline: &PipelineDir,
    key: &SigningKey,
    version: u64,
    args: &[&str],
) -> Result<DeployRun> {
    let mut cmd = Command::new(coordinator_bin()?);
    cmd.arg("deploy").args(target).arg(&pipeline.toml);
    run_deploy(cmd, coord, key, version, args)
}

/// `deploy` with the key, version and state dir every run needs; the outcome lines are read
/// by the caller.
fn run_deploy(
    mut cmd: Command,
    coord: &Coordinator,
    key: &SigningKey,
    version: u64,
    args: &[&str],
) -> Result<DeployRun> {
    let out = cmd
        .arg("--key")
        .arg(&key.path)
        .args(["--version", &version.to_string(), "--state-dir"])
        .arg(coord.state_dir())
        .args(args)
        .output()
        .context("cannot run edge-coordinator deploy")?;
    Ok(DeployRun {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

impl AgentOptions {
    /// Trusts `key` for deployments, enrolls into `groups` (the coordinator assigns them by the
    /// claim the agent enrolls with), and asks for missing chunks after `resend_after_ms` (short
    /// in tests, so a lost chunk is asked for again quickly).
    pub fn trust_deployments(
        &mut self,
        key: &SigningKey,
        groups: &[&str],
        resend_after_ms: u64,
    ) -> &mut AgentOptions {
        use toml::Value;
        let mut deploy = toml::Table::new();
        deploy.insert(
            "trusted_keys".into(),
            Value::Array(vec![Value::String(key.public_hex.clone())]),
        );
        deploy.insert(
            "resend_after_ms".into(),
            Value::Integer(i64::try_from(resend_after_ms).unwrap_or(i64::MAX)),
        );
        self.extra.insert("deploy".into(), Value::Table(deploy));
        self.groups = groups.iter().map(|g| (*g).to_owned()).collect();
        self
    }
}

impl PipelineDir {
    /// Writes `bytes` as `DIR/NAME` beside the description (a model file, for instance).
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf> {
        let dir = self
            .toml
            .parent()
            .context("pipeline.toml has no directory")?;
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            ensure_dir(parent)?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

/// Runs `edge-coordinator deploy TARGET --model NAME=FILE.. --key K --version V ARGS..`: a
/// model deployment swapping models of the running pipeline.
pub fn deploy_models(
    coord: &Coordinator,
    target: &[&str],
    models: &[(&str, &Path)],
    key: &SigningKey,
    version: u64,
    args: &[&str],
) -> Result<DeployRun> {
    let mut cmd = Command::new(coordinator_bin()?);
    cmd.arg("deploy").args(target);
    for (name, file) in models {
        cmd.arg("--model").arg(format!("{name}={}", file.display()));
    }
    run_deploy(cmd, coord, key, version, args)
}
