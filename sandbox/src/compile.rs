//! Compiling a component with a time bound, in a child process (the agent) or on a thread.
//!
//! In a child process ([`Compiler::Process`], the agent's hidden `compile-wasm` command running
//! [`child_main`]): the module goes in on stdin with the settings that decide its code, the
//! serialized artifact comes back on stdout, and a compile past `compile_timeout_ms` is killed.
//! Cranelift's code and working memory are touched only by that short-lived process: compiled in
//! the agent, the compiler's code pages stayed in the agent's resident set (5.3 MB of the first
//! start's 20.6 MB PSS with the vibration pipeline, x86_64, `cargo xtask bench rss`).
//!
//! On a thread ([`compile_bounded`]; tests, tools, and where the child cannot be started):
//! Cranelift cannot be cancelled, so the caller stops waiting after the timeout; the abandoned
//! thread finishes in the background and its result is dropped. While one is still running,
//! further compilations are refused, so a stream of pathological modules cannot pile up
//! compiler threads.
//!
//! Either way the compiling engine is a throwaway one ([`crate::engine::compiler`]): wasmtime's
//! compiler keeps its working buffers (Cranelift's contexts, sized by the largest function it
//! compiled) for reuse for as long as its engine lives, and the agent's own engine lives for
//! the agent's life. Only the serialized artifact comes back.

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

/// Where modules are compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compiler {
    /// On a thread of this process ([`compile_bounded`]): tests and tools.
    Thread,
    /// In a child process, `program` with `args`, which must run [`child_main`] (the agent's
    /// hidden `compile-wasm` command, [`CHILD_COMMAND`]). Cranelift's code and working memory
    /// are then touched only by a process that exits when the module is compiled, instead of
    /// staying in the agent's resident set (5.3 MB of the agent's own code pages after the first
    /// compile on x86_64, `cargo xtask bench rss`), and a compile past its timeout is killed
    /// rather than left running. Where the child cannot be started (an emulator that cannot
    /// exec the binary again), the thread is used.
    Process {
        program: std::path::PathBuf,
        args: Vec<std::ffi::OsString>,
    },
}

/// The agent's hidden command that runs [`child_main`].
pub const CHILD_COMMAND: &str = "compile-wasm";

/// First line of a compile request: the settings that decide how a module compiles (what an
/// artifact's compatibility is checked against), then the module's bytes.
const REQUEST_MAGIC: &str = "edge-compile-1";

/// The request's first line for `cfg`.
fn request_line(cfg: &SandboxConfig) -> String {
    format!(
        "{REQUEST_MAGIC} {} {} {} {}\n",
        u8::from(cfg.epoch_checks),
        cfg.max_wasm_stack_bytes,
        cfg.memory_reservation_bytes,
        cfg.max_memory_bytes
    )
}

/// The settings and module bytes of a request.
fn parse_request(input: &[u8]) -> Result<(SandboxConfig, &[u8]), String> {
    let end = input
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("compile request: no settings line")?;
    let line = std::str::from_utf8(&input[..end])
        .map_err(|_| "compile request: settings line is not text")?;
    let fields: Vec<&str> = line.split(' ').collect();
    let [REQUEST_MAGIC, epoch, stack, reservation, memory] = fields[..] else {
        return Err(format!(
            "compile request: unexpected settings line {line:?}"
        ));
    };
    let number = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| format!("compile request: {s:?} is not a number"))
    };
    let mut cfg = SandboxConfig {
        max_wasm_stack_bytes: number(stack)?,
        memory_reservation_bytes: number(reservation)?,
        max_memory_bytes: number(memory)?,
        ..SandboxConfig::default()
    };
    cfg.epoch_checks = epoch == "1";
    Ok((cfg, &input[end + 1..]))
}

/// What the child writes first, before it reads anything: a child whose output does not start
/// with it never ran [`child_main`] (under qemu-user without binfmt_misc, the exec of the agent's
/// own binary fails inside the child, which exits 127 as if it had run).
const STARTED: &[u8] = b"edge-compile-1 started\n";

/// The child's side of [`Compiler::Process`]: says it started, reads a request from stdin,
/// writes the artifact to stdout; on failure writes the reason to stderr and exits with 1.
pub fn child_main() -> std::process::ExitCode {
    use std::io::{Read, Write};
    let mut input = Vec::new();
    let result = {
        let mut out = std::io::stdout().lock();
        out.write_all(STARTED).and_then(|()| out.flush())
    }
    .map_err(|e| format!("writing to the agent: {e}"))
    .and_then(|()| {
        std::io::stdin()
            .read_to_end(&mut input)
            .map_err(|e| format!("reading the compile request: {e}"))
    })
    .and_then(|_| parse_request(&input))
    .and_then(|(cfg, bytes)| {
        let engine = crate::engine::compiler(&cfg).map_err(|e| e.to_string())?;
        Component::new(&engine, bytes)
            .and_then(|c| c.serialize())
            .map_err(|e| format!("{e:#}"))
    })
    .and_then(|artifact| {
        let mut out = std::io::stdout().lock();
        out.write_all(&artifact)
            .and_then(|()| out.flush())
            .map_err(|e| format!("writing the artifact: {e}"))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("{reason}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Why [`compile_in_child`] produced no artifact.
pub(crate) enum ChildError {
    /// The child could not be started, or never ran [`child_main`]: compile on a thread instead.
    Spawn(std::io::Error),
    Failed(SandboxError),
}

/// Compiles `bytes` in a child process (see [`Compiler::Process`]), killing it after
/// `cfg.compile_timeout_ms`.
pub(crate) fn compile_in_child(
    cfg: &SandboxConfig,
    program: &std::path::Path,
    args: &[std::ffi::OsString],
    bytes: &[u8],
    digest: &str,
) -> Result<Vec<u8>, ChildError> {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let timeout = Duration::from_millis(cfg.compile_timeout_ms);
    let failed = |reason: String| {
        ChildError::Failed(SandboxError::Compile {
            digest: digest.to_owned(),
            reason,
        })
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ChildError::Spawn)?;
    let (Some(mut stdin), Some(mut stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(failed("the compiler process has no pipes".into()));
    };
    // The child reads the whole request before it writes anything; reading on threads keeps a
    // large artifact or message from filling a pipe while this thread waits.
    let request = request_line(cfg);
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        stdout.read_to_end(&mut v).map(|_| v)
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.take(64 * 1024).read_to_end(&mut v);
        String::from_utf8_lossy(&v).trim().to_owned()
    });
    let written = stdin
        .write_all(request.as_bytes())
        .and_then(|()| stdin.write_all(bytes));
    drop(stdin);
    let started = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(SandboxError::CompileTimeout {
                    digest: digest.to_owned(),
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(SandboxError::Engine(format!(
                    "waiting for the compiler process: {e}"
                )));
            }
        }
    };
    let artifact = out.join();
    let message = err.join().unwrap_or_default();
    let status = status.map_err(ChildError::Failed)?;
    let artifact = match artifact {
        // The artifact is what follows the STARTED line (dropped in place, not copied).
        Ok(Ok(mut a)) if a.starts_with(STARTED) => {
            a.drain(..STARTED.len());
            Ok(a)
        }
        Ok(Ok(_)) => {
            return Err(ChildError::Spawn(std::io::Error::other(format!(
                "{} did not run the compile command ({status}{}{message})",
                program.display(),
                if message.is_empty() { "" } else { ": " }
            ))));
        }
        Ok(Err(e)) => Err(format!("reading the compiler process's artifact: {e}")),
        Err(_) => Err("the thread reading the compiler process's artifact panicked".to_owned()),
    };
    if !status.success() {
        let why = if message.is_empty() {
            format!("the compiler process ended with {status}")
        } else {
            message
        };
        return Err(failed(why));
    }
    if let Err(e) = written {
        return Err(failed(format!(
            "sending the module to the compiler process: {e}"
        )));
    }
    match artifact {
        Ok(a) if !a.is_empty() => Ok(a),
        Ok(_) => Err(failed("the compiler process returned no artifact".into())),
        Err(e) => Err(failed(e)),
    }
}
