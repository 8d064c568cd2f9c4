//! Compiling a component with a time bound. Cranelift cannot be cancelled, so compilation
//! runs on its own thread and the caller stops waiting after the timeout; the abandoned
//! thread finishes in the background and its result is dropped. While one is still running,
//! further compilations are refused, so a stream of pathological modules cannot pile up
//! compiler threads.
//!
//! The compiling engine is the caller's throwaway one ([`crate::engine::compiler`]): wasmtime's
//! compiler keeps its working buffers (Cranelift's contexts, sized by the largest function it
//! compiled) for reuse for as long as its engine lives, and the agent's own engine lives for
//! the agent's life. Only the serialized artifact comes back; the thread drops the compiled
//! component and, with it, that engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use wasmtime::component::Component;

use super::{SandboxConfig, SandboxError};

/// Compiles `bytes` on a separate thread with a throwaway engine of `cfg`'s settings, waiting at
/// most `cfg.compile_timeout_ms`; returns the serialized artifact (what the cache keeps and the
/// sandbox's engine deserializes). `abandoned` is set while a timed-out compilation is still
/// running.
pub(crate) fn compile_bounded(
    cfg: &SandboxConfig,
    bytes: Arc<[u8]>,
    digest: &str,
    abandoned: &Arc<AtomicBool>,
) -> Result<Vec<u8>, SandboxError> {
    if abandoned.load(Ordering::Acquire) {
        return Err(SandboxError::CompilerBusy {
            digest: digest.to_owned(),
        });
    }
    let timeout = Duration::from_millis(cfg.compile_timeout_ms);
    let engine = crate::engine::compiler(cfg)?;
    let (tx, rx) = mpsc::sync_channel(1);
    let flag = Arc::clone(abandoned);
    let done = Arc::new(AtomicBool::new(false));
    let done_in_thread = Arc::clone(&done);
    std::thread::Builder::new()
        .name("wasm-compile".into())
        .spawn(move || {
            let result = Component::new(&engine, &bytes[..]).and_then(|c| c.serialize());
            drop(engine);
            done_in_thread.store(true, Ordering::Release);
            // If the caller gave up, it set the flag and nobody receives: clear the flag.
            if tx.send(result).is_err() {
                flag.store(false, Ordering::Release);
            }
        })
        .map_err(|e| SandboxError::Engine(format!("starting a compile thread: {e}")))?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(SandboxError::Compile {
            digest: digest.to_owned(),
            reason: format!("{e:#}"),
        }),
        Err(_) => {
            // Drop the receiver first: from now on the thread's send fails and it clears
            // the flag itself; if it already finished (sent into the buffer, or is about
            // to fail), `done` is visible below and we clear it here.
            drop(rx);
            abandoned.store(true, Ordering::Release);
            if done.load(Ordering::Acquire) {
                abandoned.store(false, Ordering::Release);
            }
            Err(SandboxError::CompileTimeout {
                digest: digest.to_owned(),
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            })
        }
    }
}
