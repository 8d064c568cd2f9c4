//! `edge-agent check-config` dry-runs what it checks: the real binary, on real files, with the
//! torch default exports (`m.onnx` + `m.onnx.data`) and the built guest modules. A config
//! whose pipeline cannot start exits non-zero with the first error naming the file and the
//! cause, and never prints "ok"; a good one loads every model, compiles every module and
//! checks the trainer against the training model.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use edge_testmodels::exported_path;
use edge_tests::{TestEnv, agent_bin, run_test, wasm_dir};

/// A device folder: `agent.toml`, `pipeline.toml`, `models/` with both torch pairs,
/// `encoder.wasm`, `mlp_trainer.wasm` and a replay file.
struct Setup {
    dir: PathBuf,
}

impl Setup {
    fn new(env: &TestEnv, name: &str, training_model: &str) -> Result<Setup> {
        let dir = env.path(name);
        std::fs::create_dir_all(dir.join("models"))?;
        for f in [
            "torch_mlp.onnx",
            "torch_mlp.onnx.data",
            "torch_cnn.onnx",
            "torch_cnn.onnx.data",
        ] {
            std::fs::copy(exported_path(f), dir.join("models").join(f))
                .with_context(|| format!("copying fixture {f}"))?;
        }
        for m in ["encoder.wasm", "mlp_trainer.wasm"] {
            std::fs::copy(wasm_dir().join(m), dir.join(m))
                .with_context(|| format!("copying {m} (cargo xtask modules builds it)"))?;
        }
        std::fs::write(dir.join("rows.jsonl"), "{\"a\": 1.0}\n")?;
        let fields: Vec<String> = (0..64).map(|i| format!("\"f{i}\"")).collect();
        std::fs::write(
            dir.join("pipeline.toml"),
            format!(
                r#"
name = "digits"
[[source]]
name = "rows"
kind = "file"
path = "rows.jsonl"
format = "jsonl"
[[stage]]
name = "encode"
module = "encoder.wasm"
input = "rows"
config = {{ fields = [{fields}] }}
[[stage]]
name = "classify"
kind = "inference"
model = "models/torch_mlp.onnx"
input = "encode"
[[stage]]
name = "conv"
kind = "inference"
model = "models/torch_cnn.onnx"
input = "encode"
[[sink]]
kind = "dataset"
input = "rows"
dataset = "digits"
[[sink]]
kind = "log"
input = ["classify", "conv"]
[training]
model = "{training_model}"
trainer = "mlp_trainer.wasm"
dataset = "digits"
"#,
                fields = fields.join(", ")
            ),
        )?;
        std::fs::write(
            dir.join("agent.toml"),
            format!(
                "state_dir = \"{}\"\n[pipeline]\nfile = \"{}\"\n",
                dir.join("state").display(),
                dir.join("pipeline.toml").display()
            ),
        )?;
        Ok(Setup { dir })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Runs `edge-agent check-config agent.toml` from `/` (so nothing resolves against the
    /// test's working directory): (success, stdout, stderr).
    fn check(&self) -> Result<(bool, String, String)> {
        let out = Command::new(agent_bin()?)
            .arg("check-config")
            .arg(self.path("agent.toml"))
            .current_dir("/")
            .env("RUST_LOG", "warn")
            .output()
            .context("cannot run edge-agent check-config")?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Expects a refusal whose error names every one of `needles`.
    fn refused(&self, case: &str, needles: &[&str]) -> Result<()> {
        let (ok, stdout, stderr) = self.check()?;
        ensure!(!ok, "{case}: check-config succeeded:\n{stdout}");
        ensure!(!stdout.contains(": ok"), "{case}: printed ok:\n{stdout}");
        eprintln!("{case}: {}", stderr.trim_end().lines().last().unwrap_or(""));
        for n in needles {
            ensure!(
                stderr.contains(n),
                "{case}: error does not name {n:?}:\n{stderr}"
            );
        }
        Ok(())
    }
}

/// Replaces the data file's location in a graph by another of the same length (the protobuf
/// stays valid): a hand-edited or hostile model file.
fn set_location(model: &Path, old: &str, new: &str) -> Result<()> {
    ensure!(old.len() == new.len());
    let mut bytes = std::fs::read(model)?;
    let mut hits = 0;
    for i in 0..bytes.len().saturating_sub(old.len() - 1) {
        if &bytes[i..i + old.len()] == old.as_bytes() {
            bytes[i..i + old.len()].copy_from_slice(new.as_bytes());
            hits += 1;
        }
    }
    ensure!(hits > 0, "{old} not in {}", model.display());
    Ok(std::fs::write(model, bytes)?)
}

#[test]
fn check_config_dry_runs_models_modules_and_trainer() {
    run_test("check_config", scenario);
}

fn scenario(env: &TestEnv) -> Result<()> {
    // Good: both torch pairs load, the modules compile, the trainer fits the MLP.
    let good = Setup::new(env, "good", "models/torch_mlp.onnx")?;
    let (ok, stdout, stderr) = good.check()?;
    ensure!(ok, "good config refused:\n{stdout}\n{stderr}");
    for line in [
        "model models/torch_mlp.onnx: loads on cpu, 1 data file(s)",
        "model models/torch_cnn.onnx: loads on cpu, 1 data file(s)",
        "module encoder.wasm: compiles",
        "training: trainer mlp_trainer.wasm compiles; model models/torch_mlp.onnx",
        "pipeline.toml: ok",
    ] {
        ensure!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    ensure!(
        !good.path("state").exists(),
        "a dry run wrote into the state directory"
    );

    let data = "models/torch_mlp.onnx.data";
    let s = Setup::new(env, "missing", "models/torch_mlp.onnx")?;
    std::fs::remove_file(s.path(data))?;
    s.refused(
        "missing data file",
        &[&s.path(data).display().to_string(), "is missing"],
    )?;

    let s = Setup::new(env, "truncated", "models/torch_mlp.onnx")?;
    let len = std::fs::metadata(s.path(data))?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.path(data))?
        .set_len(len / 2)?;
    s.refused(
        "truncated data file",
        &[&s.path(data).display().to_string(), "is truncated"],
    )?;

    for (case, location, cause) in [
        ("dot-dot", "../../../etc/passwd", "'..'"),
        ("absolute", "/torch_mlp.onnx.dat", "absolute"),
    ] {
        let s = Setup::new(env, case, "models/torch_mlp.onnx")?;
        set_location(
            &s.path("models/torch_mlp.onnx"),
            "torch_mlp.onnx.data",
            location,
        )?;
        s.refused(case, &["models/torch_mlp.onnx", location, cause])?;
    }

    let s = Setup::new(env, "symlink", "models/torch_mlp.onnx")?;
    let outside = env.path("outside.bin");
    std::fs::rename(s.path(data), &outside)?;
    std::os::unix::fs::symlink(&outside, s.path(data))?;
    s.refused(
        "symlink out of the folder",
        &["models/torch_mlp.onnx", "outside the model's folder"],
    )?;

    // A broken graph (cut short, as by an interrupted copy).
    let s = Setup::new(env, "broken-model", "models/torch_mlp.onnx")?;
    let graph = std::fs::read(s.path("models/torch_cnn.onnx"))?;
    std::fs::write(s.path("models/torch_cnn.onnx"), &graph[..graph.len() / 2])?;
    s.refused("broken model", &["stage conv", "models/torch_cnn.onnx"])?;

    // A module that is not WebAssembly.
    let s = Setup::new(env, "broken-module", "models/torch_mlp.onnx")?;
    std::fs::write(s.path("encoder.wasm"), b"not wasm")?;
    s.refused("broken module", &["encoder.wasm"])?;

    // The trainer against a training model it cannot train (convolutions, not dense layers).
    let s = Setup::new(env, "trainer-mismatch", "models/torch_cnn.onnx")?;
    s.refused(
        "trainer vs model",
        &["mlp_trainer.wasm", "models/torch_cnn.onnx"],
    )?;
    Ok(())
}
