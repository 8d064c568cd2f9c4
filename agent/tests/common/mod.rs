//! Shared by the agent's integration tests: the real guest modules from `modules/`, built
//! on first use.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const BUILD_COMMAND: &str = "cargo build --release --target wasm32-wasip2 (in modules/)";

pub fn modules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../modules")
}

/// Bytes of `modules/target/wasm32-wasip2/release/<artifact>.wasm`, building the modules
/// workspace once if any artifact is missing.
pub fn module(artifact: &str) -> Vec<u8> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let path = modules_dir()
        .join("target/wasm32-wasip2/release")
        .join(format!("{artifact}.wasm"));
    if !path.exists() {
        let built = BUILT.get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args(["build", "--release", "--target", "wasm32-wasip2"])
                .current_dir(modules_dir())
                .env_remove("CARGO_TARGET_DIR")
                .env_remove("RUSTFLAGS")
                .status()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("exit status {status}"))
            }
        });
        if let Err(e) = built {
            panic!(
                "guest modules missing and building them failed ({e}); run `{BUILD_COMMAND}` \
                 (needs `rustup target add wasm32-wasip2`)"
            );
        }
    }
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; run `{BUILD_COMMAND}`", path.display()))
}

/// The directory holding the built `.wasm` files (built if missing).
pub fn wasm_dir() -> PathBuf {
    module("feature_extractor");
    modules_dir().join("target/wasm32-wasip2/release")
}

/// `target/ort/{host}/libonnxruntime.so`, provisioned with `cargo xtask ort` the first time.
pub fn ort_library() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let lib = edge_inference::workspace_library();
        if !lib.exists() {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            // Its own target dir: the outer `cargo test` may still hold the lock on ours.
            let status = std::process::Command::new(
                std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
            )
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", root.join("target/provision"))
            .args(["run", "--quiet", "-p", "xtask", "--", "ort"])
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo to provision onnx runtime: {e}"));
            assert!(status.success(), "cargo xtask ort failed: {status}");
        }
        assert!(
            lib.exists(),
            "{} missing after cargo xtask ort",
            lib.display()
        );
        lib
    })
    .clone()
}

/// What a pipeline runs against, all in `dir`: state db, dataset store, outbox, a sandbox
/// with `cfg`, an empty inbox, and `inference`. Call inside a tokio runtime.
pub fn pipeline_deps(
    dir: &Path,
    cfg: &edge_agent::sandbox::SandboxConfig,
    inference: edge_agent::inference::Inference,
) -> edge_agent::pipeline::Deps {
    use std::sync::Arc;

    use edge_agent::config::{DatasetConfig, OutboxConfig};
    let state = edge_agent::statedb::StateDb::open(dir).expect("state db");
    let dataset = Arc::new(
        edge_agent::dataset::Dataset::open(&state.db, &DatasetConfig::default()).expect("dataset"),
    );
    let outbox =
        Arc::new(edge_agent::outbox::Outbox::open(dir, &OutboxConfig::default()).expect("outbox"));
    edge_agent::pipeline::Deps {
        sandbox: edge_agent::sandbox::Sandbox::new(cfg, dir).expect("sandbox"),
        state,
        outbox,
        inbox: Default::default(),
        dataset,
        device: "dev-1".into(),
        runtime: tokio::runtime::Handle::current(),
        inference,
        training: Default::default(),
        offload: None,
    }
}
