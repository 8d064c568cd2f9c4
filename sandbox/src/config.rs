//! The sandbox's configuration (`[sandbox]` in the agent config) and the per-stage grants.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::setting::InvalidSetting;

/// Limits and policies of the WASM sandbox. Every limit is per instance (one stage) unless
/// its doc says otherwise.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Largest linear memory one module instance may grow to, bytes; growing past it fails
    /// (and a module that cannot handle that traps with a memory-limit error).
    pub max_memory_bytes: u64,
    /// Most elements in one table of an instance (function-pointer tables).
    pub max_table_elements: u32,
    /// Most bytes of wasm call stack a call may use before it traps with a stack overflow.
    pub max_wasm_stack_bytes: u64,
    /// Wall-clock budget of one `init` or `process` call, milliseconds; a call still running
    /// after it is stopped and fails with a timeout.
    pub call_timeout_ms: u64,
    /// Wall-clock budget of one `train` or `evaluate` call of a federated-learning trainer
    /// module, milliseconds (several epochs in one call, so much longer than a stage's
    /// `call_timeout_ms`); a call still running after it is stopped and fails with a timeout.
    pub train_timeout_ms: u64,
    /// Period of the epoch ticker that enforces `call_timeout_ms`, milliseconds: a deadline
    /// fires between `call_timeout_ms` and `call_timeout_ms + epoch_tick_ms` after the call.
    pub epoch_tick_ms: u64,
    /// Instances that can exist at once, all stages together. Address space for all of them
    /// is reserved when the first module loads (pooling allocator), so keep it small on
    /// 32-bit boards.
    pub max_instances: u32,
    /// Virtual address space reserved per linear memory, bytes. 0 chooses: 4 GiB on 64-bit
    /// targets (bounds checks compiled away, guard pages catch overruns), `max_memory_bytes`
    /// on 32-bit targets (explicit bounds checks). Changing it recompiles cached modules.
    pub memory_reservation_bytes: u64,
    /// Most frames one `process` call may return.
    pub max_output_frames: u32,
    /// Most bytes (payloads, stream names and labels) one `process` call may return.
    pub max_output_bytes: u64,
    /// Largest module accepted, bytes; a larger one is refused before compiling.
    pub max_module_bytes: u64,
    /// Longest a module may take to compile, milliseconds; after it the load fails.
    pub compile_timeout_ms: u64,
    /// Directory of compiled modules; empty means `wasm-cache` in the state directory.
    pub cache_dir: PathBuf,
    /// Log lines per second a module may write (its `log` calls and stdout/stderr lines);
    /// lines beyond it are dropped and counted.
    pub log_lines_per_s: u32,
    /// Burst of log lines allowed above `log_lines_per_s`.
    pub log_burst: u32,
    /// Longest log line kept, bytes; longer lines are truncated.
    pub log_max_line_bytes: u32,
    /// Longest kv key, bytes.
    pub kv_max_key_bytes: u32,
    /// Largest kv value, bytes.
    pub kv_max_value_bytes: u32,
    /// Most kv bytes (keys plus values) one stage may store.
    pub kv_max_total_bytes: u64,
    /// kv writes reach the OS at once (they survive a crash of the agent); they are fsync'd
    /// (survive a power cut) at most this many milliseconds later. 0 fsyncs every write.
    pub kv_sync_interval_ms: u64,
    /// Most distinct counter and gauge names one stage may create; more are ignored and
    /// counted.
    pub max_metric_names: u32,
    /// Consecutive traps (including timeouts and memory-limit traps) after which a stage is
    /// marked failed and no longer restarted.
    pub max_consecutive_traps: u32,
    /// Delay before the first restart after a trap, milliseconds; doubles with each further
    /// consecutive trap.
    pub restart_backoff_min_ms: u64,
    /// Longest delay between restarts, milliseconds.
    pub restart_backoff_max_ms: u64,
    /// Whether compiled code checks the epoch (at function entries and loop headers), which is
    /// what enforces `call_timeout_ms` and `train_timeout_ms`. Always true from a config
    /// file (not a key); only `cargo xtask bench sandbox` turns it off, in a sandbox of its
    /// own, to measure what the checks cost. Without them a call that spins is never stopped.
    #[doc(hidden)]
    #[serde(skip)]
    pub epoch_checks: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            max_memory_bytes: 64 * 1024 * 1024,
            max_table_elements: 10_000,
            max_wasm_stack_bytes: 512 * 1024,
            call_timeout_ms: 1_000,
            train_timeout_ms: 60_000,
            epoch_tick_ms: 10,
            max_instances: 16,
            memory_reservation_bytes: 0,
            max_output_frames: 64,
            max_output_bytes: 4 * 1024 * 1024,
            max_module_bytes: 16 * 1024 * 1024,
            compile_timeout_ms: 60_000,
            cache_dir: PathBuf::new(),
            log_lines_per_s: 10,
            log_burst: 50,
            log_max_line_bytes: 1024,
            kv_max_key_bytes: 256,
            kv_max_value_bytes: 64 * 1024,
            kv_max_total_bytes: 1024 * 1024,
            kv_sync_interval_ms: 1_000,
            max_metric_names: 64,
            max_consecutive_traps: 5,
            restart_backoff_min_ms: 100,
            restart_backoff_max_ms: 30_000,
            epoch_checks: true,
        }
    }
}

impl SandboxConfig {
    /// Checks value ranges; the message names the key (`sandbox.KEY`).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let page = 64 * 1024;
        if self.max_memory_bytes < page || self.max_memory_bytes > 4 * 1024 * 1024 * 1024 {
            return Err(InvalidSetting(format!(
                "sandbox.max_memory_bytes must be between {page} (one wasm page) and 4 GiB"
            )));
        }
        if self.memory_reservation_bytes != 0
            && self.memory_reservation_bytes < self.max_memory_bytes
        {
            return Err(
                "sandbox.memory_reservation_bytes must be 0 (automatic) or at least sandbox.max_memory_bytes"
                    .into(),
            );
        }
        if self.max_wasm_stack_bytes < 64 * 1024 || self.max_wasm_stack_bytes > 64 * 1024 * 1024 {
            return Err("sandbox.max_wasm_stack_bytes must be between 65536 and 64 MiB".into());
        }
        if self.epoch_tick_ms == 0 {
            return Err("sandbox.epoch_tick_ms must be at least 1".into());
        }
        if self.call_timeout_ms < self.epoch_tick_ms {
            return Err("sandbox.call_timeout_ms must be at least sandbox.epoch_tick_ms".into());
        }
        if self.train_timeout_ms < self.epoch_tick_ms {
            return Err("sandbox.train_timeout_ms must be at least sandbox.epoch_tick_ms".into());
        }
        if self.max_instances == 0 || self.max_instances > 10_000 {
            return Err("sandbox.max_instances must be between 1 and 10000".into());
        }
        if self.max_table_elements == 0 {
            return Err("sandbox.max_table_elements must be at least 1".into());
        }
        if self.max_module_bytes == 0 {
            return Err("sandbox.max_module_bytes must be at least 1".into());
        }
        if self.compile_timeout_ms == 0 {
            return Err("sandbox.compile_timeout_ms must be at least 1".into());
        }
        if self.max_consecutive_traps == 0 {
            return Err("sandbox.max_consecutive_traps must be at least 1".into());
        }
        if self.restart_backoff_min_ms > self.restart_backoff_max_ms {
            return Err(
                "sandbox.restart_backoff_min_ms must be at most sandbox.restart_backoff_max_ms"
                    .into(),
            );
        }
        if self.kv_max_key_bytes == 0 {
            return Err("sandbox.kv_max_key_bytes must be at least 1".into());
        }
        Ok(())
    }

    /// The cache directory: `cache_dir`, or `state_dir/wasm-cache` when it is empty.
    pub fn cache_dir_in(&self, state_dir: &Path) -> PathBuf {
        if self.cache_dir.as_os_str().is_empty() {
            state_dir.join("wasm-cache")
        } else {
            self.cache_dir.clone()
        }
    }
}

/// Capabilities a stage gets beyond the `stage` world's own imports (log, clock, kv,
/// counters). Today every grant is off and there is no way to turn one on: a stage sees no
/// files, no network, no environment variables and no arguments.
///
/// How this grows: signed deployment manifests will name what a module needs (a data
/// directory, a list of socket addresses). Each such grant becomes a typed field here (a
/// directory path with read/write permissions; allowed address ranges) instead of a bool,
/// defaulting to "nothing", and `host::wasi::context` is the single place that turns a grant
/// into a WASI capability (`preopened_dir`, `socket_addr_check`). Until then a `true` below is
/// refused at instantiation, so a manifest written for a newer agent fails loudly here rather
/// than running with less (or more) than it asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// A host directory visible to the module.
    pub filesystem: bool,
    /// Outbound TCP/UDP and name lookups.
    pub network: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_keys_are_named() {
        SandboxConfig::default().validate().expect("defaults valid");
        let err = toml::from_str::<SandboxConfig>("max_memory = 3\n")
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("max_memory"), "{err}");
        let cfg: SandboxConfig = toml::from_str("call_timeout_ms = 250\n").expect("parses");
        assert_eq!(cfg.call_timeout_ms, 250);
        assert_eq!(cfg.max_instances, SandboxConfig::default().max_instances);
    }

    #[test]
    fn bad_values_name_their_key() {
        type Edit = fn(&mut SandboxConfig);
        let cases: [(Edit, &str); 5] = [
            (|c| c.max_memory_bytes = 1, "max_memory_bytes"),
            (|c| c.epoch_tick_ms = 0, "epoch_tick_ms"),
            (|c| c.train_timeout_ms = 0, "train_timeout_ms"),
            (|c| c.max_instances = 0, "max_instances"),
            (
                |c| c.restart_backoff_min_ms = u64::MAX,
                "restart_backoff_min_ms",
            ),
        ];
        for (edit, key) in cases {
            let mut c = SandboxConfig::default();
            edit(&mut c);
            let err = c.validate().expect_err(key).to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn cache_dir_defaults_into_state_dir() {
        let c = SandboxConfig::default();
        assert_eq!(
            c.cache_dir_in(Path::new("/s")),
            PathBuf::from("/s/wasm-cache")
        );
    }
}
