//! Finding and loading the ONNX Runtime shared library, once per process, and the
//! [`InferenceConfig`] that steers it.
//!
//! Invariant: no ort API is touched before a library has loaded ([`Runtime`] is the proof), so a
//! missing or broken library is a typed [`RuntimeError::Unavailable`] listing every path tried,
//! never a panic inside ort. The agent then keeps running WASM pipelines without inference.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use ort::environment::Environment;
use serde::Deserialize;

use crate::provider::Provider;

/// The `[inference]` section of the agent's config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Path of `libonnxruntime.so`. When set, only this file is tried. When unset: the
    /// `ORT_DYLIB_PATH` environment variable, then `libonnxruntime.so` next to the agent's
    /// executable, then the workspace's `target/ort/{triple}/` (development builds).
    pub library: Option<PathBuf>,
    /// Execution providers in order of preference. Each model runs on the first one that takes
    /// it; `cpu` should normally come last. A provider the library was not built with is skipped
    /// (and reported).
    pub providers: Vec<Provider>,
    /// Threads ONNX Runtime uses inside one model run (intra-op). 0: its default, one per
    /// physical core.
    pub intra_threads: usize,
    /// Reject f32/f16 inputs holding NaN or infinity with an error naming the input, instead of
    /// passing them to the model.
    pub reject_non_finite: bool,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            library: None,
            providers: Provider::ALL.to_vec(),
            intra_threads: 0,
            reject_non_finite: true,
        }
    }
}

/// One place the library was looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Where the path came from: `inference.library`, `ORT_DYLIB_PATH`, `next to the executable`,
    /// `workspace target/ort`.
    pub source: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

/// Why no runtime is available.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("onnx runtime unavailable: {}", describe(.tried))]
    Unavailable { tried: Vec<Attempt> },
    #[error("onnx runtime loaded from {library} but its environment failed: {reason}")]
    Environment { library: PathBuf, reason: String },
}

fn describe(tried: &[Attempt]) -> String {
    let mut text = if tried.is_empty() {
        "no library path to try".to_owned()
    } else {
        tried
            .iter()
            .map(|a| format!("{} ({}): {}", a.path.display(), a.source, a.reason))
            .collect::<Vec<_>>()
            .join("; ")
    };
    if cfg!(target_arch = "arm") {
        text.push_str(ARMV7_HINT);
    }
    text
}

/// The usual cause on 32-bit ARM, where the package ships no library: said in the error, so
/// the operator does not go looking for a broken install.
const ARMV7_HINT: &str = " (PyPI publishes no armv7 onnxruntime wheel, so armhf packages ship \
                          no library: set inference.library to a vendor or source build)";

/// A loaded ONNX Runtime: the library, its ort environment, and the config. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("library", &self.inner.library)
            .field("version", &self.inner.version)
            .finish()
    }
}

pub(crate) struct Inner {
    pub env: Environment,
    pub library: PathBuf,
    pub version: String,
    pub built_in: Vec<Provider>,
    pub config: InferenceConfig,
}

/// The library can be loaded into a process only once (ort keeps it in a global), so the first
/// success is remembered and every later `Runtime::load` shares it.
struct Loaded {
    env: Environment,
    library: PathBuf,
    version: String,
    built_in: Vec<Provider>,
}

static LOADED: Mutex<Option<Arc<Loaded>>> = Mutex::new(None);

impl Runtime {
    /// Loads the library from the first candidate that works (see [`InferenceConfig::library`]).
    pub fn load(config: &InferenceConfig) -> Result<Runtime, RuntimeError> {
        let mut loaded = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = loaded.as_ref() {
            if let Some(want) = &config.library
                && !same_file(want, &l.library)
            {
                return Err(RuntimeError::Unavailable {
                    tried: vec![Attempt {
                        source: "inference.library",
                        path: want.clone(),
                        reason: format!(
                            "another onnx runtime ({}) is already loaded in this process",
                            l.library.display()
                        ),
                    }],
                });
            }
            return Ok(Runtime::from_loaded(l, config));
        }
        let mut tried = Vec::new();
        for (source, path) in candidates(config) {
            // A bare file name is left to the dynamic loader's search path.
            let bare = path.parent().is_none_or(|p| p.as_os_str().is_empty());
            if !bare && !path.exists() {
                tried.push(Attempt {
                    source,
                    path,
                    reason: "no such file".into(),
                });
                continue;
            }
            let builder = match ort::init_from(&path) {
                Ok(b) => b,
                Err(e) => {
                    tried.push(Attempt {
                        source,
                        path,
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            let env = builder
                .with_name("edge-agent")
                .with_telemetry(false)
                .build()
                .map_err(|e| RuntimeError::Environment {
                    library: path.clone(),
                    reason: e.to_string(),
                })?;
            let library = path.canonicalize().unwrap_or(path);
            let version = version_of(&library);
            let built_in = Provider::ALL
                .into_iter()
                .filter(|p| p.is_built_in().unwrap_or(false))
                .collect();
            let l = Arc::new(Loaded {
                env,
                library,
                version,
                built_in,
            });
            tracing::info!(
                library = %l.library.display(),
                version = %l.version,
                source,
                "onnx runtime loaded"
            );
            *loaded = Some(Arc::clone(&l));
            return Ok(Runtime::from_loaded(&l, config));
        }
        Err(RuntimeError::Unavailable { tried })
    }

    fn from_loaded(l: &Loaded, config: &InferenceConfig) -> Runtime {
        Runtime {
            inner: Arc::new(Inner {
                env: l.env.clone(),
                library: l.library.clone(),
                version: l.version.clone(),
                built_in: l.built_in.clone(),
                config: config.clone(),
            }),
        }
    }

    /// The library file in use (symlinks resolved).
    pub fn library(&self) -> &Path {
        &self.inner.library
    }

    /// ONNX Runtime's version, e.g. `1.32.0` (`unknown` if it cannot be told).
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// The providers of our enum that this library was built with.
    pub fn built_in_providers(&self) -> &[Provider] {
        &self.inner.built_in
    }

    pub fn config(&self) -> &InferenceConfig {
        &self.inner.config
    }
}

/// Where to look, in order. An explicit `inference.library` is the only candidate: falling back
/// to another library behind the operator's back would hide a misconfiguration.
fn candidates(config: &InferenceConfig) -> Vec<(&'static str, PathBuf)> {
    if let Some(p) = &config.library {
        return vec![("inference.library", p.clone())];
    }
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        c.push(("ORT_DYLIB_PATH", PathBuf::from(p)));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        c.push(("next to the executable", dir.join("libonnxruntime.so")));
    }
    c.push(("workspace target/ort", workspace_library()));
    c
}

/// `target/ort/{host triple}/libonnxruntime.so` in this workspace, where `cargo xtask ort`
/// puts it.
pub fn workspace_library() -> PathBuf {
    let triple = if cfg!(target_arch = "aarch64") {
        "aarch64-unknown-linux-gnu"
    } else if cfg!(target_arch = "arm") {
        "armv7-unknown-linux-gnueabihf"
    } else {
        "x86_64-unknown-linux-gnu"
    };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/ort")
        .join(triple)
        .join("libonnxruntime.so")
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// From the build info (`git-branch=rel-1.32.0`), else the versioned file name
/// (`libonnxruntime.so.1.32.0`).
fn version_of(library: &Path) -> String {
    let info = ort::info();
    if let Some(v) = info
        .split("rel-")
        .nth(1)
        .map(|r| r.split([',', ' ']).next().unwrap_or(r))
        .filter(|v| !v.is_empty())
    {
        return v.to_owned();
    }
    library
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split(".so.").nth(1))
        .unwrap_or("unknown")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_our_provider_names_and_rejects_unknown_keys() {
        let c: InferenceConfig = toml::from_str(
            "library = \"/opt/ort/libonnxruntime.so\"\nproviders = [\"rknpu\", \"xnnpack\", \"cpu\"]\nintra_threads = 2",
        )
        .expect("valid config");
        assert_eq!(
            c.providers,
            [Provider::Rknpu, Provider::Xnnpack, Provider::Cpu]
        );
        assert_eq!(c.intra_threads, 2);
        assert!(c.reject_non_finite, "defaults fill what is not given");
        assert!(toml::from_str::<InferenceConfig>("providers = [\"tpu\"]").is_err());
        assert!(toml::from_str::<InferenceConfig>("librray = \"x\"").is_err());
    }

    #[test]
    fn default_prefers_accelerators_and_ends_with_cpu() {
        let c = InferenceConfig::default();
        assert_eq!(c.providers.last(), Some(&Provider::Cpu));
        assert_eq!(c.providers.len(), Provider::ALL.len());
    }

    #[test]
    fn unavailable_lists_every_attempt() {
        let e = RuntimeError::Unavailable {
            tried: vec![
                Attempt {
                    source: "ORT_DYLIB_PATH",
                    path: "/a.so".into(),
                    reason: "no such file".into(),
                },
                Attempt {
                    source: "workspace target/ort",
                    path: "/b.so".into(),
                    reason: "bad elf".into(),
                },
            ],
        };
        let hint = if cfg!(target_arch = "arm") {
            ARMV7_HINT
        } else {
            ""
        };
        assert_eq!(
            e.to_string(),
            format!(
                "onnx runtime unavailable: /a.so (ORT_DYLIB_PATH): no such file; /b.so (workspace target/ort): bad elf{hint}"
            )
        );
    }
}
