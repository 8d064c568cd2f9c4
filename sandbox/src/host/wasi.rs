//! The WASI context of a stage: the WASI imports that a language's standard library pulls in
//! link, but grant nothing. No preopened directories, no environment variables, no
//! arguments, stdin closed, TCP/UDP and name lookups refused. stdout and stderr are not
//! inherited: their lines go to the module's rate-limited log, and the last bytes of stderr
//! are kept so a trap can be reported with the guest's panic message.
//!
//! Sleeping: the epoch deadline only interrupts running wasm, not a blocking host call, and
//! with synchronous WASI a guest's `sleep` (a monotonic-clock pollable) blocks the calling
//! thread in the host. [`add_sleep_cap`] therefore replaces the two monotonic-clock
//! `subscribe-*` functions with versions that end any wait just after the call's deadline and,
//! when the wait asked for would cross the deadline, move the epoch deadline to now: the guest
//! traps with a timeout as soon as it runs wasm again, whether or not the ticker thread kept
//! up, so a call ends within about two timeouts however it sleeps.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::clocks::WasiClocksView;
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host as _;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

use super::HostState;
use super::log::{Level, LogSink};
use crate::{Grants, ModuleId, SandboxError};

/// Bytes of stderr remembered for trap reports.
const STDERR_TAIL_BYTES: usize = 1024;

/// Builds the context for `grants`; every grant must be off (see [`Grants`]).
pub(crate) fn context(
    module: &ModuleId,
    grants: &Grants,
    stdout: GuestOutput,
    stderr: GuestOutput,
) -> Result<WasiCtx, SandboxError> {
    if grants.filesystem {
        return Err(SandboxError::GrantUnsupported {
            module: module.clone(),
            grant: "filesystem",
        });
    }
    if grants.network {
        return Err(SandboxError::GrantUnsupported {
            module: module.clone(),
            grant: "network",
        });
    }
    let mut b = WasiCtxBuilder::new();
    // The builder starts with no preopens, env or args and a closed stdin; the network
    // switches default to "allowed but every address denied", so turn them off outright.
    b.stdout(stdout)
        .stderr(stderr)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }));
    Ok(b.build())
}

/// The monotonic-clock interface as wasmtime-wasi defines it (guests importing any 0.2.x
/// resolve to it). [`add_sleep_cap`] checks that this is the name wasmtime-wasi registered.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// Shadows `subscribe-duration` and `subscribe-instant` of the monotonic clock with versions
/// that wait at most `HostState::sleep_cap_ns`. Call after WASI was added to `linker`.
pub(crate) fn add_sleep_cap(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    // Without shadowing, defining the function must fail because wasmtime-wasi defined it;
    // if it succeeds, wasmtime-wasi moved to another WIT version and the cap would silently
    // not apply: refuse to start instead.
    {
        let mut probe = linker.instance(MONOTONIC_CLOCK)?;
        if probe
            .func_wrap(
                "subscribe-duration",
                |_: StoreContextMut<'_, HostState>, (_,): (u64,)| Ok((0u32,)),
            )
            .is_ok()
        {
            wasmtime::bail!(
                "wasmtime-wasi does not define {MONOTONIC_CLOCK}; update MONOTONIC_CLOCK in sandbox/host/wasi.rs"
            );
        }
    }
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: StoreContextMut<'_, HostState>, (ns,): (u64,)| {
            let cap = store.data().sleep_cap_ns;
            if ns > cap {
                // The wait cannot end before the call's deadline: stop the call at the next
                // epoch check rather than rely on the ticker having reached the deadline when
                // the capped wait ends (a loaded machine can starve the ticker thread).
                store.set_epoch_deadline(0);
            }
            let r: Resource<DynPollable> =
                store.data_mut().clocks().subscribe_duration(ns.min(cap))?;
            Ok((r,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut store: StoreContextMut<'_, HostState>, (when,): (u64,)| {
            let cap = store.data().sleep_cap_ns;
            let now = store.data_mut().clocks().now()?;
            if when > now.saturating_add(cap) {
                store.set_epoch_deadline(0);
            }
            let mut clocks = store.data_mut().clocks();
            let latest = now.saturating_add(cap);
            let r: Resource<DynPollable> = clocks.subscribe_instant(when.min(latest))?;
            Ok((r,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A module's stdout or stderr: complete lines go to its [`LogSink`]; stderr also keeps a
/// tail for trap reports. Writes always succeed, so printing can never trap a module.
#[derive(Clone)]
pub(crate) struct GuestOutput {
    inner: Arc<Mutex<Capture>>,
}

struct Capture {
    name: &'static str,
    level: Level,
    sink: Arc<LogSink>,
    line: Vec<u8>,
    line_cap: usize,
    tail: Option<VecDeque<u8>>,
}

impl GuestOutput {
    pub(crate) fn stdout(sink: Arc<LogSink>, line_cap: usize) -> Self {
        Self::new("stdout", Level::Info, sink, line_cap, false)
    }

    pub(crate) fn stderr(sink: Arc<LogSink>, line_cap: usize) -> Self {
        Self::new("stderr", Level::Warn, sink, line_cap, true)
    }

    fn new(
        name: &'static str,
        level: Level,
        sink: Arc<LogSink>,
        line_cap: usize,
        tail: bool,
    ) -> Self {
        GuestOutput {
            inner: Arc::new(Mutex::new(Capture {
                name,
                level,
                sink,
                line: Vec::new(),
                line_cap,
                tail: tail.then(VecDeque::new),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Capture> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write_bytes(&self, bytes: &[u8]) {
        let mut c = self.lock();
        if let Some(tail) = &mut c.tail {
            tail.extend(bytes);
            let excess = tail.len().saturating_sub(STDERR_TAIL_BYTES);
            tail.drain(..excess);
        }
        for &b in bytes {
            if b == b'\n' {
                c.emit();
            } else if c.line.len() < c.line_cap {
                c.line.push(b);
            }
        }
    }

    /// Emits a pending partial line and returns the stderr tail as one line (empty for
    /// stdout or when nothing was written), clearing it.
    pub(crate) fn take_tail(&self) -> String {
        let mut c = self.lock();
        if !c.line.is_empty() {
            c.emit();
        }
        let Some(tail) = &mut c.tail else {
            return String::new();
        };
        let bytes: Vec<u8> = tail.drain(..).collect();
        let text = String::from_utf8_lossy(&bytes);
        text.split('\n')
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

impl Capture {
    fn emit(&mut self) {
        let line = std::mem::take(&mut self.line);
        let text = String::from_utf8_lossy(&line);
        self.sink
            .line(self.level, &format!("{}: {}", self.name, text.trim_end()));
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
