//! A missing library is a typed "unavailable" error naming what was tried, never a panic.
//! Its own test binary: once a library has loaded, it stays loaded for the whole process.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use edge_inference::{InferenceConfig, Runtime, RuntimeError};

#[test]
fn missing_library_is_unavailable_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("edge-inference-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let missing = dir.join("libonnxruntime.so");
    let config = InferenceConfig {
        library: Some(missing.clone()),
        ..InferenceConfig::default()
    };
    let err = Runtime::load(&config).unwrap_err();
    let RuntimeError::Unavailable { tried } = &err else {
        panic!("expected unavailable, got {err}");
    };
    assert_eq!(tried.len(), 1, "an explicit library is the only candidate");
    assert_eq!(tried[0].path, missing);
    assert_eq!(tried[0].source, "inference.library");
    assert!(err.to_string().contains("no such file"), "{err}");

    // A file that is not a shared library: the loader's reason is passed on.
    let junk = dir.join("junk.so");
    std::fs::write(&junk, b"not an elf file").unwrap();
    let config = InferenceConfig {
        library: Some(junk.clone()),
        ..InferenceConfig::default()
    };
    let err = Runtime::load(&config).unwrap_err();
    assert!(
        err.to_string().contains(&junk.display().to_string()),
        "{err}"
    );
    assert!(!err.to_string().contains("no such file"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
