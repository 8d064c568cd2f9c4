//! Finding and loading the ONNX Runtime shared library, once per process, and the
//! [`InferenceConfig`] that steers it.
//!
//! Loading the library maps about 20 MB into the process and starts its thread pools, so the
//! agent does it only when its first model loads. Until then [`Runtime::probe`] says, without
//! loading anything, which file would be loaded and whether it looks like a shared library
//! for this machine.
//!
//! Invariant: no ort API is touched before a library has loaded ([`Runtime`] is the proof), so a
//! missing or broken library is a typed [`RuntimeError::Unavailable`] listing every path tried,
//! never a panic inside ort; [`Runtime::probe`] never calls the dynamic loader. The agent
//! keeps running WASM pipelines without inference.

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
    /// executable, then the workspace's `target/ort/{triple}/` (development builds). The agent
    /// loads it with its first model, not at start.
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

/// What [`Runtime::probe`] found: the library [`Runtime::load`] would try first, not loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The file (symlinks resolved).
    pub library: PathBuf,
    /// Where its path came from (as in [`Attempt::source`]).
    pub source: &'static str,
    /// From the versioned file name (`libonnxruntime.so.1.32.0`), else `unknown`.
    pub version: String,
    /// Whether the library is already loaded in this process.
    pub loaded: bool,
    /// Accelerator providers shipped as separate provider libraries beside it
    /// (`libonnxruntime_providers_cuda.so` and the like). Providers built into the main
    /// library (xnnpack, acl, ...) show only once it is loaded.
    pub provider_libraries: Vec<Provider>,
}

impl Runtime {
    /// Finds the library [`Runtime::load`] would load first, without loading it: the first
    /// candidate that exists and is an ELF shared object for this machine. The dynamic loader
    /// may still refuse it (a missing dependency); that shows at the first load.
    pub fn probe(config: &InferenceConfig) -> Result<Probe, RuntimeError> {
        if let Some(l) = LOADED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            && config
                .library
                .as_ref()
                .is_none_or(|want| same_file(want, &l.library))
        {
            return Ok(Probe {
                library: l.library.clone(),
                source: "already loaded",
                version: l.version.clone(),
                loaded: true,
                provider_libraries: provider_libraries(&l.library),
            });
        }
        probe_candidates(candidates(config))
    }
}

/// [`Runtime::probe`] over `candidates`, ignoring a library already loaded.
fn probe_candidates(candidates: Vec<(&'static str, PathBuf)>) -> Result<Probe, RuntimeError> {
    let mut tried = Vec::new();
    for (source, path) in candidates {
        let bare = path.parent().is_none_or(|p| p.as_os_str().is_empty());
        if bare {
            // Left to the loader's search path: only loading tells.
            return Ok(Probe {
                version: version_from_name(&path),
                library: path,
                source,
                loaded: false,
                provider_libraries: Vec::new(),
            });
        }
        match check_elf(&path) {
            Ok(()) => {
                let library = path.canonicalize().unwrap_or(path);
                return Ok(Probe {
                    version: version_from_name(&library),
                    provider_libraries: provider_libraries(&library),
                    library,
                    source,
                    loaded: false,
                });
            }
            Err(reason) => tried.push(Attempt {
                source,
                path,
                reason,
            }),
        }
    }
    Err(RuntimeError::Unavailable { tried })
}

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
    version_from_name(library)
}

fn version_from_name(library: &Path) -> String {
    library
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split(".so.").nth(1))
        .unwrap_or("unknown")
        .to_owned()
}

/// ELF machine of the agent's own target (`e_machine`).
const ELF_MACHINE: u16 = if cfg!(target_arch = "aarch64") {
    183
} else if cfg!(target_arch = "arm") {
    40
} else if cfg!(target_arch = "x86_64") {
    62
} else {
    0
};

/// Reads the ELF header: a shared object of this machine's architecture and word size, or
/// the reason it is not.
fn check_elf(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut header = [0u8; 20];
    let mut f = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_owned(),
        _ => e.to_string(),
    })?;
    f.read_exact(&mut header)
        .map_err(|_| "not an ELF file (too short)".to_owned())?;
    if &header[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    let class64 = header[4] == 2;
    if class64 != cfg!(target_pointer_width = "64") {
        return Err(format!(
            "a {}-bit library, this agent is {}-bit",
            if class64 { 64 } else { 32 },
            if class64 { 32 } else { 64 }
        ));
    }
    let little = header[5] == 1;
    let read16 = |at: usize| {
        let b = [header[at], header[at + 1]];
        if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    if read16(16) != 3 {
        return Err("not a shared library (ELF type is not ET_DYN)".into());
    }
    let machine = read16(18);
    if ELF_MACHINE != 0 && machine != ELF_MACHINE {
        return Err(format!(
            "built for another architecture (ELF machine {machine}, this agent is {})",
            std::env::consts::ARCH
        ));
    }
    Ok(())
}

/// Providers whose separate provider library sits beside `library`.
fn provider_libraries(library: &Path) -> Vec<Provider> {
    let Some(dir) = library.parent() else {
        return Vec::new();
    };
    Provider::ALL
        .into_iter()
        .filter(|p| *p != Provider::Cpu)
        .filter(|p| {
            dir.join(format!("libonnxruntime_providers_{}.so", p.as_str()))
                .exists()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_names_what_is_wrong_with_a_file_without_loading_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Not `Runtime::probe`: another test of this process may have loaded a library.
        let probe = |p: &Path| probe_candidates(vec![("inference.library", p.to_owned())]);
        let missing = dir.path().join("libonnxruntime.so");
        let e = probe(&missing).expect_err("missing").to_string();
        assert!(
            e.contains("no such file") && e.contains("inference.library"),
            "{e}"
        );
        let text = dir.path().join("text.so");
        std::fs::write(&text, b"not a library at all, just text").expect("write");
        let e = probe(&text).expect_err("text").to_string();
        assert!(e.contains("not an ELF file"), "{e}");
        // Our own test binary is ELF for this machine but an executable (or PIE, which is
        // ET_DYN too), so check the architecture test with a forged header instead.
        let mut other = [0u8; 64];
        other[..4].copy_from_slice(b"\x7fELF");
        other[4] = if cfg!(target_pointer_width = "64") {
            2
        } else {
            1
        };
        other[5] = 1;
        other[16] = 3;
        other[18] = 0x02; // SPARC
        let foreign = dir.path().join("libonnxruntime.so.1.32.0");
        std::fs::write(&foreign, other).expect("write");
        let e = probe(&foreign).expect_err("foreign").to_string();
        assert!(e.contains("another architecture"), "{e}");
        other[18..20].copy_from_slice(&ELF_MACHINE.to_le_bytes());
        std::fs::write(&foreign, other).expect("write");
        let link = dir.path().join("libonnxruntime.so");
        std::os::unix::fs::symlink(&foreign, &link).expect("symlink");
        std::fs::write(dir.path().join("libonnxruntime_providers_cuda.so"), b"x").expect("write");
        let p = probe(&link).expect("looks loadable");
        assert_eq!(p.version, "1.32.0");
        assert!(!p.loaded);
        assert_eq!(p.provider_libraries, [Provider::Cuda]);
    }

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
