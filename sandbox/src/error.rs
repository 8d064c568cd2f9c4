//! The sandbox's error type: one enum, each case naming the module (name and digest) or the
//! stage it is about.

use std::path::PathBuf;

use super::ModuleId;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid sandbox config: {0}")]
    Config(String),
    #[error("wasm engine: {0}")]
    Engine(String),
    #[error("module cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "module {digest}: {size} bytes is more than sandbox.max_module_bytes ({limit}); not compiled"
    )]
    TooLarge {
        digest: String,
        size: u64,
        limit: u64,
    },
    #[error("module {digest} does not compile: {reason}")]
    Compile { digest: String, reason: String },
    #[error("module {digest}: compiling took longer than {timeout_ms} ms; gave up")]
    CompileTimeout { digest: String, timeout_ms: u64 },
    #[error(
        "module {digest}: an earlier compilation that timed out is still running; try again later"
    )]
    CompilerBusy { digest: String },
    #[error("module {module}: {grant} grants are not supported by this agent")]
    GrantUnsupported {
        module: ModuleId,
        grant: &'static str,
    },
    #[error("module {module}: cannot instantiate: {reason}")]
    Instantiate { module: ModuleId, reason: String },
    #[error("module {module} refused its config: {message}")]
    InitRefused { module: ModuleId, message: String },
    #[error("module {module} trapped: {reason}")]
    Trap { module: ModuleId, reason: String },
    #[error("module {module}: call ran longer than {timeout_ms} ms and was stopped")]
    Timeout { module: ModuleId, timeout_ms: u64 },
    #[error(
        "module {module} trapped after its memory limit of {limit} bytes refused growing to {requested} bytes"
    )]
    MemoryLimit {
        module: ModuleId,
        limit: u64,
        requested: u64,
    },
    #[error("module {module} rejected the frame: {message}")]
    GuestError { module: ModuleId, message: String },
    #[error("module {module}: output over limit: {reason}")]
    OutputLimit { module: ModuleId, reason: String },
    #[error("module {module}: instance trapped earlier and must not be called again")]
    Poisoned { module: ModuleId },
    #[error("stage {stage}: restarting after a trap in {retry_in_ms} ms (frame not processed)")]
    Restarting { stage: String, retry_in_ms: u64 },
    #[error("stage {stage} failed after {traps} consecutive traps; last: {last}")]
    StageFailed {
        stage: String,
        traps: u32,
        last: String,
    },
}

impl SandboxError {
    /// Whether the error left the instance unusable (a trap of any kind): the instance must
    /// be discarded and a fresh one created.
    pub fn poisons_instance(&self) -> bool {
        matches!(
            self,
            SandboxError::Trap { .. }
                | SandboxError::Timeout { .. }
                | SandboxError::MemoryLimit { .. }
                | SandboxError::Poisoned { .. }
        )
    }
}
