//! The real `edge-agent` binary under a stand-in service manager: a datagram socket in a temp
//! dir passed as `NOTIFY_SOCKET`, with `WATCHDOG_USEC` set as systemd does for `WatchdogSec=`.
//! The agent must say `READY=1` with no broker reachable (an offline board is a ready board),
//! then send `WATCHDOG=1` keep-alives, and `STOPPING=1` when told to stop.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long to wait for each message; generous for a loaded CI machine (not a timing check).
const WAIT: Duration = Duration::from_secs(120);

/// Kills the agent if the test fails half-way.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A broker address nothing listens on.
fn dead_broker() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let port = l.local_addr().expect("address").port();
    format!("mqtt://127.0.0.1:{port}")
}

fn recv(sock: &UnixDatagram, log: &Path) -> String {
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!(
            "no sd_notify message within {WAIT:?} ({e}); agent log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

/// The agent binary; under `cargo xtask qemu-test` it is built for another architecture, so it
/// runs through the same qemu-user runner as this test (the runner names itself in
/// `EDGE_TARGET_RUNNER`).
fn agent_command() -> Command {
    let bin = env!("CARGO_BIN_EXE_edge-agent");
    match std::env::var_os("EDGE_TARGET_RUNNER") {
        Some(runner) => {
            let mut cmd = Command::new(runner);
            cmd.arg(bin);
            cmd
        }
        None => Command::new(bin),
    }
}

#[test]
fn agent_notifies_ready_keepalives_and_stopping_while_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n[device]\nid = \"notify-test\"\n[mqtt]\nurl = \"{}\"\n\
             [telemetry]\ninterval_s = 0\n",
            dead_broker()
        ),
    )
    .expect("writes config");
    let notify_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify_path).expect("binds notify socket");
    sock.set_read_timeout(Some(WAIT)).expect("timeout");
    let log = dir.path().join("agent.log");
    let stderr = std::fs::File::create(&log).expect("log file");

    let child = agent_command()
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        // 2 s watchdog: a keep-alive every second, so the test sees two quickly.
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("WATCHDOG_PID")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("starts edge-agent");
    let mut agent = Agent(child);

    let ready = recv(&sock, &log);
    assert!(ready.starts_with("READY=1\n"), "first message: {ready:?}");
    assert!(ready.contains("STATUS=offline"), "status: {ready:?}");
    let mut keepalives = 0;
    while keepalives < 2 {
        let msg = recv(&sock, &log);
        assert!(msg.starts_with("WATCHDOG=1\n"), "message: {msg:?}");
        keepalives += 1;
    }

    let pid = rustix::process::Pid::from_raw(i32::try_from(agent.0.id()).expect("pid fits"))
        .expect("a child's pid is positive");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM sent");
    let stopping = loop {
        let msg = recv(&sock, &log);
        // A keep-alive already on its way may come first.
        if !msg.starts_with("WATCHDOG=1\n") {
            break msg;
        }
    };
    assert!(
        stopping.starts_with("STOPPING=1\n"),
        "message: {stopping:?}"
    );
    let status = agent.0.wait().expect("waits for the agent");
    assert!(
        status.success(),
        "agent exited with {status}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
