//! Shared test support: makes sure the ONNX Runtime library is there (running
//! `cargo xtask ort` on a fresh machine) and loads it.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use edge_inference::{InferenceConfig, Provider, Runtime};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `target/ort/{host}/libonnxruntime.so`, provisioned through xtask the first time.
pub fn library() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let lib = edge_inference::workspace_library();
        if !lib.exists() {
            // Its own target dir: the outer `cargo test` may still hold the lock on ours.
            let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .current_dir(root())
                .env("CARGO_TARGET_DIR", root().join("target/provision"))
                .args(["run", "--quiet", "-p", "xtask", "--", "ort"])
                .status()
                .expect("cannot run cargo to provision onnx runtime");
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

/// A runtime on the workspace library with `providers` preferred (one intra-op thread, so
/// tests running in parallel do not oversubscribe the machine).
pub fn runtime_with(providers: &[Provider]) -> Runtime {
    let config = InferenceConfig {
        library: Some(library()),
        providers: providers.to_vec(),
        intra_threads: 1,
        reject_non_finite: true,
    };
    Runtime::load(&config).expect("onnx runtime loads")
}

pub fn runtime() -> Runtime {
    runtime_with(&[Provider::Cpu])
}

pub fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "length: got {got:?}, want {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
            "element {i}: got {g}, want {w} (got {got:?})"
        );
    }
}
