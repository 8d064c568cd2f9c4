//! A private mosquitto broker on a free loopback port, with persistence in the test dir.
//!
//! Persistence matters: the coordinator keeps a persistent session, and the messages queued
//! for it must survive a broker restart just as they would in production.
//!
//! [`Mosquitto::start_volatile`] gives a broker without persistence, as many are run: a restart
//! loses every session and what was queued in it, messages it already PUBACKed included.
//!
//! [`Mosquitto::start_tls`] gives the same broker a mutual-TLS listener instead: clients must
//! present a certificate signed by the test CA, and its common name is their username.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::net::{free_port, looks_like_port_collision, retry_while_port_busy};
use crate::process::{ChildProc, ensure_dir};
use crate::tls::TlsFiles;

/// Largest MQTT packet the broker accepts: above [`protocol::v1::MAX_PAYLOAD_BYTES`] plus
/// framing, so oversized-payload tests reach the clients.
const MAX_PACKET_SIZE: usize = 200_000;

/// Finds the mosquitto binary: `MOSQUITTO_BIN`, then `PATH`, then `/usr/sbin` (where Debian
/// puts it, which is not on a non-root user's PATH).
pub fn mosquitto_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MOSQUITTO_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("MOSQUITTO_BIN={} does not name a file", p.display());
        }
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")]);
    for dir in dirs {
        let candidate = dir.join("mosquitto");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "the `mosquitto` binary is missing (not on PATH nor in /usr/sbin): install the Debian \
         package `mosquitto` (`cargo xtask test` does this when run as root) or set MOSQUITTO_BIN"
    )
}

/// A running (or stopped, restartable) mosquitto.
#[derive(Debug)]
pub struct Mosquitto {
    dir: PathBuf,
    port: u16,
    conf_path: PathBuf,
    /// The listener is mqtts (see [`Mosquitto::start_tls`]).
    tls: bool,
    proc: ChildProc,
}

/// mosquitto's own default `max_inflight_messages`.
const DEFAULT_INFLIGHT: u16 = 20;

impl Mosquitto {
    /// Writes `DIR/mosquitto.conf` and starts the broker on a free port.
    pub fn start(dir: &Path) -> Result<Mosquitto> {
        Mosquitto::start_with(dir, None, true, DEFAULT_INFLIGHT)
    }

    /// Like [`Mosquitto::start`], without persistence: a restart loses every session and the
    /// messages queued for them.
    pub fn start_volatile(dir: &Path) -> Result<Mosquitto> {
        Mosquitto::start_with(dir, None, false, DEFAULT_INFLIGHT)
    }

    /// Like [`Mosquitto::start_volatile`], letting each client have `inflight` unacknowledged
    /// QoS 1 messages (`max_inflight_messages`, default 20). The coordinator acknowledges
    /// after its group commit, so this window bounds its batches: the fleet benchmark runs
    /// with 256 (`MAX_BATCH`).
    pub fn start_volatile_with_inflight(dir: &Path, inflight: u16) -> Result<Mosquitto> {
        Mosquitto::start_with(dir, None, false, inflight)
    }

    /// Like [`Mosquitto::start`], with a mutual-TLS listener: the server certificate from
    /// `tls`, and a client certificate signed by `tls`'s CA required of every client, whose
    /// common name becomes its username (anonymous clients are refused).
    pub fn start_tls(dir: &Path, tls: &TlsFiles) -> Result<Mosquitto> {
        Mosquitto::start_with(dir, Some(tls), true, DEFAULT_INFLIGHT)
    }

    fn start_with(
        dir: &Path,
        tls: Option<&TlsFiles>,
        persist: bool,
        inflight: u16,
    ) -> Result<Mosquitto> {
        let bin = mosquitto_bin()?;
        ensure_dir(dir)?;
        let mut last_err = None;
        for _ in 0..5 {
            let mut m = Mosquitto::new(dir, &bin, free_port()?, tls, persist, inflight)?;
            match m.start_once() {
                Ok(()) => return Ok(m),
                Err(e) if looks_like_port_collision(&m.proc.last_log()) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err
            .context("no attempts")?
            .context("port collisions on 5 tries"))
    }

    fn new(
        dir: &Path,
        bin: &Path,
        port: u16,
        tls: Option<&TlsFiles>,
        persist: bool,
        inflight: u16,
    ) -> Result<Mosquitto> {
        let conf_path = dir.join("mosquitto.conf");
        let persistence = dir.join("persistence");
        ensure_dir(&persistence)?;
        let persistence = persistence.to_str().context("test dir path is not UTF-8")?;
        let security = match tls {
            None => "allow_anonymous true\n".to_owned(),
            Some(tls) => {
                let path = |p: &Path| {
                    p.to_str()
                        .map(str::to_owned)
                        .with_context(|| format!("path {} is not UTF-8", p.display()))
                };
                format!(
                    "cafile {}\n\
                     certfile {}\n\
                     keyfile {}\n\
                     require_certificate true\n\
                     # The certificate is the credential: its CN is the username.\n\
                     use_identity_as_username true\n\
                     allow_anonymous false\n",
                    path(&tls.ca_cert)?,
                    path(&tls.server_cert)?,
                    path(&tls.server_key)?,
                )
            }
        };
        let conf = format!(
            "# Written by the edge-tests harness.\n\
             listener {port} 127.0.0.1\n\
             {security}\
             persistence {persist}\n\
             max_inflight_messages {inflight}\n\
             persistence_location {persistence}/\n\
             # Saved at SIGTERM; every second too, so a killed broker loses little.\n\
             autosave_interval 1\n\
             max_packet_size {MAX_PACKET_SIZE}\n\
             # $SYS counters every second (default 10), so a short run's are published.\n\
             sys_interval 1\n\
             # Room for everything a test queues for a disconnected persistent session.\n\
             max_queued_messages 0\n\
             max_queued_bytes 0\n\
             # When run as root, stay root: the persistence dir is the test's, not mosquitto's.\n\
             user root\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             log_type information\n\
             connection_messages true\n\
             log_timestamp_format %H:%M:%S\n"
        );
        std::fs::write(&conf_path, conf)
            .with_context(|| format!("cannot write {}", conf_path.display()))?;
        let args = vec![
            "-c".to_owned(),
            conf_path.to_str().context("path is not UTF-8")?.to_owned(),
        ];
        let proc = ChildProc::new("mosquitto", bin, args, dir.join("mosquitto.log"));
        Ok(Mosquitto {
            dir: dir.to_owned(),
            port,
            conf_path,
            tls: tls.is_some(),
            proc,
        })
    }

    fn start_once(&mut self) -> Result<()> {
        self.proc.spawn()?;
        let port = self.port;
        let what = format!("listening on 127.0.0.1:{port}");
        self.proc.wait_until(&what, crate::START_TIMEOUT, || {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        })
    }

    /// SIGTERM, so it saves its persistence file; errs unless it exits cleanly.
    pub fn stop(&mut self) -> Result<()> {
        self.proc.stop_clean()
    }

    /// Starts it again on the same port with the same persistence (retrying while the old
    /// listener's port is not yet free).
    pub fn start_again(&mut self) -> Result<()> {
        retry_while_port_busy(self, Self::start_once, |p| p.proc.last_log())
    }

    /// [`Mosquitto::stop`] then [`Mosquitto::start_again`].
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`, or `mqtts://` for a broker from [`Mosquitto::start_tls`].
    pub fn url(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn conf_path(&self) -> &Path {
        &self.conf_path
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}
