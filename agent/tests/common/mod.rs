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
