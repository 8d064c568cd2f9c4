//! Loopback ports for the processes under test.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Ports handed out by this process, so two tests running in parallel threads never get the
/// same one even if the kernel offers a just-released port again.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, read, released).
///
/// Another process can still take it before ours binds; starters that pick a port this way
/// retry with a fresh one when the bind fails.
pub fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0")
            .context("cannot bind 127.0.0.1:0 to find a free port")?;
        let port = listener
            .local_addr()
            .context("cannot read the bound port")?
            .port();
        drop(listener);
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    bail!("no unused free port after 100 tries")
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_for_tcp(port: u16, timeout: Duration) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("nothing accepted connections on {addr} within {timeout:?}");
        }
        std::thread::sleep(crate::POLL);
    }
}

/// True if `log` says a listener could not bind because the address was taken.
pub(crate) fn looks_like_port_collision(log: &str) -> bool {
    let l = log.to_ascii_lowercase();
    l.contains("address already in use") || l.contains("addrinuse") || l.contains("os error 98")
}

/// Runs `start` on `target` again while it fails because the port is still held (an old
/// listener going away on a restart), until it succeeds, fails otherwise, or the start timeout
/// passes. `log` reads the process log that tells a port collision apart.
pub(crate) fn retry_while_port_busy<T>(
    target: &mut T,
    start: impl Fn(&mut T) -> anyhow::Result<()>,
    log: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + crate::START_TIMEOUT;
    loop {
        match start(target) {
            Err(_)
                if std::time::Instant::now() < deadline
                    && looks_like_port_collision(&log(target)) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
}
