//! systemd's notify protocol (sd_notify(3)), so the unit can be `Type=notify` with a watchdog:
//! `READY=1` once started, `WATCHDOG=1` keep-alives, `STATUS=` text and `STOPPING=1`.
//!
//! One datagram per message to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract
//! namespace); no libsystemd, no crate. Without `$NOTIFY_SOCKET` (not started by systemd, or
//! a `Type=exec` unit) every call is a no-op. **Invariant:** never fails the agent: a message
//! that cannot be sent is logged and dropped (systemd then acts on its own timeouts).
//! **Boundary:** built once by `main.rs` from the environment (tests build it from explicit
//! values, so they never touch the process environment); used by `agent::run`.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {addr:?} is not a usable socket address: {source}")]
    Address { addr: String, source: io::Error },
    #[error("WATCHDOG_USEC {0:?} is not a positive number of microseconds")]
    WatchdogUsec(String),
    #[error("cannot create a datagram socket for NOTIFY_SOCKET {addr:?}: {source}")]
    Socket { addr: String, source: io::Error },
    #[error("cannot send {what} to NOTIFY_SOCKET {addr:?}: {source}")]
    Send {
        what: String,
        addr: String,
        source: io::Error,
    },
}

/// What systemd tells a service in its environment; the variables are read once, by
/// [`NotifyEnv::from_process`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyEnv {
    /// `NOTIFY_SOCKET`: a socket path, or `@name` for the abstract namespace.
    pub socket: Option<String>,
    /// `WATCHDOG_USEC`: the unit's `WatchdogSec=` in microseconds.
    pub watchdog_usec: Option<String>,
    /// `WATCHDOG_PID`: the process the watchdog is meant for (unset: this one).
    pub watchdog_pid: Option<String>,
}

impl NotifyEnv {
    pub fn from_process() -> NotifyEnv {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        NotifyEnv {
            socket: var("NOTIFY_SOCKET"),
            watchdog_usec: var("WATCHDOG_USEC"),
            watchdog_pid: var("WATCHDOG_PID"),
        }
    }
}

/// Sends notifications to the service manager, or nothing when there is none.
#[derive(Debug)]
pub struct Notifier {
    sink: Option<Sink>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Sink {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// As given in `NOTIFY_SOCKET`, for messages.
    shown: String,
}

impl Notifier {
    /// Sends nothing: not under systemd.
    pub fn disabled() -> Notifier {
        Notifier {
            sink: None,
            watchdog: None,
        }
    }

    /// From the process environment; a malformed one is logged and notifying turned off
    /// (the agent runs either way; systemd then reports the missing READY=1 itself).
    pub fn from_env() -> Notifier {
        match Notifier::new(&NotifyEnv::from_process(), std::process::id()) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "sd_notify disabled");
                Notifier::disabled()
            }
        }
    }

    /// `pid` is this process's id, compared with `WATCHDOG_PID`.
    pub fn new(env: &NotifyEnv, pid: u32) -> Result<Notifier, NotifyError> {
        let Some(shown) = env.socket.clone() else {
            return Ok(Notifier::disabled());
        };
        let addr = socket_addr(&shown).map_err(|source| NotifyError::Address {
            addr: shown.clone(),
            source,
        })?;
        let socket = UnixDatagram::unbound().map_err(|source| NotifyError::Socket {
            addr: shown.clone(),
            source,
        })?;
        // Like sd_watchdog_enabled(3): a watchdog meant for another process (WATCHDOG_PID
        // inherited through a fork) is not ours to feed.
        let ours = env
            .watchdog_pid
            .as_deref()
            .is_none_or(|p| p.trim().parse::<u32>().ok() == Some(pid));
        let watchdog = match env.watchdog_usec.as_deref() {
            Some(usec) if ours => {
                let n = usec
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| NotifyError::WatchdogUsec(usec.to_owned()))?;
                Some(Duration::from_micros(n))
            }
            _ => None,
        };
        Ok(Notifier {
            sink: Some(Sink {
                socket,
                addr,
                shown,
            }),
            watchdog,
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.sink.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the unit's `WatchdogSec=`, as sd_watchdog_enabled(3)
    /// recommends, so one late tick does not get the agent killed. `None`: no watchdog.
    pub fn keepalive_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// Start-up is done: state opened, config valid, tasks running.
    pub fn ready(&self, status: &str) {
        self.log_failure(self.send(&format!("READY=1\nSTATUS={}", one_line(status))));
    }

    /// The agent is alive; `status` replaces the text `systemctl status` shows.
    pub fn keepalive(&self, status: &str) {
        self.log_failure(self.send(&format!("WATCHDOG=1\nSTATUS={}", one_line(status))));
    }

    /// Shutdown began (draining, making the outbox durable).
    pub fn stopping(&self, status: &str) {
        self.log_failure(self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status))));
    }

    /// Sends one message (newline-separated `KEY=value` assignments) as a datagram.
    pub fn send(&self, message: &str) -> Result<(), NotifyError> {
        let Some(sink) = &self.sink else {
            return Ok(());
        };
        sink.socket
            .send_to_addr(message.as_bytes(), &sink.addr)
            .map(drop)
            .map_err(|source| NotifyError::Send {
                what: message.lines().next().unwrap_or_default().to_owned(),
                addr: sink.shown.clone(),
                source,
            })
    }

    fn log_failure(&self, sent: Result<(), NotifyError>) {
        if let Err(e) = sent {
            tracing::warn!(error = %e, "sd_notify message lost");
        }
    }
}

/// `@name`: the abstract namespace (Linux); anything else: a filesystem path.
fn socket_addr(addr: &str) -> io::Result<SocketAddr> {
    match addr.strip_prefix('@') {
        Some(name) => abstract_addr(name.as_bytes()),
        None => SocketAddr::from_pathname(addr),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket addresses exist on Linux only",
    ))
}

/// A status may not span lines: a newline would start a new assignment.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(socket: &str) -> NotifyEnv {
        NotifyEnv {
            socket: Some(socket.into()),
            ..NotifyEnv::default()
        }
    }

    /// A bound receiving socket in a temp dir, and its path.
    fn listener() -> (tempfile::TempDir, UnixDatagram, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("binds");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let path = path.to_str().expect("utf-8").to_owned();
        (dir, sock, path)
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).expect("utf-8")
    }

    #[test]
    fn sends_ready_keepalive_and_stopping_to_a_path_socket() {
        let (_dir, sock, path) = listener();
        let n = Notifier::new(&env(&path), 42).expect("notifier");
        assert!(n.is_enabled());
        n.ready("offline, no pipeline");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=offline, no pipeline");
        n.keepalive("connected\nSTOPPING=1");
        assert_eq!(recv(&sock), "WATCHDOG=1\nSTATUS=connected STOPPING=1");
        n.stopping("draining");
        assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=draining");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "edge-agent-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let sock = UnixDatagram::bind_addr(&addr).expect("binds");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let n = Notifier::new(&env(&format!("@{name}")), 1).expect("notifier");
        n.ready("up");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=up");
    }

    #[test]
    fn keepalive_interval_is_half_the_watchdog_and_only_for_our_pid() {
        let (_dir, _sock, path) = listener();
        let with = |usec: Option<&str>, pid: Option<&str>| NotifyEnv {
            watchdog_usec: usec.map(str::to_owned),
            watchdog_pid: pid.map(str::to_owned),
            ..env(&path)
        };
        let n = Notifier::new(&with(Some("30000000"), None), 7).expect("notifier");
        assert_eq!(n.keepalive_interval(), Some(Duration::from_secs(15)));
        let n = Notifier::new(&with(Some("30000000"), Some("7")), 7).expect("notifier");
        assert_eq!(n.keepalive_interval(), Some(Duration::from_secs(15)));
        let n = Notifier::new(&with(Some("30000000"), Some("8")), 7).expect("notifier");
        assert_eq!(n.keepalive_interval(), None);
        assert!(n.is_enabled(), "READY=1 still goes to the manager");
        let n = Notifier::new(&with(None, None), 7).expect("notifier");
        assert_eq!(n.keepalive_interval(), None);
        for bad in ["0", "soon", "-5"] {
            let e = Notifier::new(&with(Some(bad), None), 7).expect_err("rejected");
            assert!(e.to_string().contains("WATCHDOG_USEC"), "{e}");
        }
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        let n = Notifier::new(&NotifyEnv::default(), 1).expect("notifier");
        assert!(!n.is_enabled());
        assert_eq!(n.keepalive_interval(), None);
        n.send("READY=1").expect("no-op");
    }

    #[test]
    fn a_vanished_socket_is_an_error_naming_it() {
        let (dir, sock, path) = listener();
        let n = Notifier::new(&env(&path), 1).expect("notifier");
        drop(sock);
        drop(dir);
        let e = n.send("WATCHDOG=1").expect_err("no receiver");
        assert!(e.to_string().contains(&path), "{e}");
        assert!(e.to_string().contains("WATCHDOG=1"), "{e}");
        // The convenience calls only log.
        n.keepalive("x");
    }
}
