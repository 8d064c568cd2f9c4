//! Hostile test module `escape`: tries to reach outside the sandbox through the WASI
//! interfaces that Rust's standard library uses (files, directories, environment, args,
//! TCP, UDP, DNS) and reports what worked as a JSON frame. Against a correctly configured
//! host every attempt fails (`"escaped": false`); a host test asserts exactly that.
//!
//! Config:
//! - `connect` (default `["127.0.0.1:1883"]`): TCP addresses to try; a test can point it at
//!   a port it listens on, so "denied" cannot be confused with "nothing listening"
//! - `read` (default `["/etc/passwd", "/proc/self/environ"]`): files to try to read
//! - `when` = `"process"` (default) | `"init"`: in `init`, any success fails init with the
//!   report as the error, so the host sees it either way

use edge_guest::{Frame, Guest, Payload, config};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_connect")]
    connect: Vec<String>,
    #[serde(default = "default_read")]
    read: Vec<String>,
    #[serde(default)]
    when: When,
}

fn default_connect() -> Vec<String> {
    vec!["127.0.0.1:1883".into()]
}

fn default_read() -> Vec<String> {
    vec!["/etc/passwd".into(), "/proc/self/environ".into()]
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum When {
    #[default]
    Process,
    Init,
}

/// One attempt: what was tried, whether it succeeded, and the error or what was seen.
#[derive(Debug, Serialize)]
struct Attempt {
    what: String,
    ok: bool,
    detail: String,
}

#[derive(Debug, Serialize)]
struct Report {
    escaped: bool,
    attempts: Vec<Attempt>,
}

fn attempt<T>(
    what: impl Into<String>,
    r: std::io::Result<T>,
    seen: impl FnOnce(T) -> String,
) -> Attempt {
    match r {
        Ok(v) => Attempt {
            what: what.into(),
            ok: true,
            detail: seen(v),
        },
        Err(e) => Attempt {
            what: what.into(),
            ok: false,
            detail: e.to_string(),
        },
    }
}

fn probe(c: &Config) -> Report {
    use std::net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
    let mut attempts = Vec::new();
    for path in &c.read {
        attempts.push(attempt(format!("read {path}"), std::fs::read(path), |b| {
            format!("{} bytes", b.len())
        }));
    }
    for dir in ["/", "."] {
        attempts.push(attempt(
            format!("list {dir}"),
            std::fs::read_dir(dir).map(|d| d.count()),
            |n| format!("{n} entries"),
        ));
    }
    attempts.push(attempt(
        "write /tmp/edge-escape-probe",
        std::fs::write("/tmp/edge-escape-probe", b"escape"),
        |()| "written".into(),
    ));
    // Names only: a test log should not collect the host's secrets if this ever succeeds.
    let vars: Vec<String> = std::env::vars_os()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    attempts.push(Attempt {
        what: "environment variables".into(),
        ok: !vars.is_empty(),
        detail: vars.join(","),
    });
    let args = std::env::args_os().count();
    attempts.push(Attempt {
        what: "command-line arguments".into(),
        ok: args > 0,
        detail: format!("{args} args"),
    });
    // wasi-libc answers "/" by itself when the host gives no initial directory; anything
    // else came from the host (`wasi:cli/environment.initial-cwd`) and reveals a host path.
    let cwd = std::env::current_dir().map(|p| p.display().to_string());
    attempts.push(Attempt {
        what: "host working directory".into(),
        ok: cwd.as_ref().is_ok_and(|p| p != "/"),
        detail: cwd.unwrap_or_else(|e| e.to_string()),
    });
    for target in &c.connect {
        let r = target
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))
            .and_then(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)));
        attempts.push(attempt(format!("tcp connect {target}"), r, |s| {
            format!("connected from {:?}", s.local_addr().ok())
        }));
    }
    attempts.push(attempt(
        "tcp listen 0.0.0.0:0",
        TcpListener::bind("0.0.0.0:0"),
        |l| format!("listening on {:?}", l.local_addr().ok()),
    ));
    let udp = UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.send_to(b"escape", "127.0.0.1:9").map(|n| (s, n)));
    attempts.push(attempt("udp bind and send", udp, |(_, n)| {
        format!("sent {n} bytes")
    }));
    attempts.push(attempt(
        "dns lookup localhost",
        ("localhost", 80).to_socket_addrs().map(|a| a.count()),
        |n| format!("{n} addresses"),
    ));
    Report {
        escaped: attempts.iter().any(|a| a.ok),
        attempts,
    }
}

thread_local! {
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
}

struct Component;

impl Guest for Component {
    fn init(text: String) -> Result<(), String> {
        let c: Config = config::parse(&text)?;
        if c.when == When::Init {
            let report = probe(&c);
            if report.escaped {
                return Err(serde_json::to_string(&report)
                    .unwrap_or_else(|e| format!("escaped; report failed: {e}")));
            }
        }
        CONFIG.with(|s| *s.borrow_mut() = Some(c));
        Ok(())
    }

    fn process(frame: Frame) -> Result<Vec<Frame>, String> {
        let c = CONFIG
            .with(|s| s.borrow().clone())
            .ok_or("process called before init")?;
        let report = probe(&c);
        let text = serde_json::to_string(&report).map_err(|e| format!("encoding report: {e}"))?;
        Ok(vec![Frame {
            payload: Payload::Json(text),
            ..frame
        }])
    }
}

edge_guest::export_stage!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        let c: Config = config::parse("").unwrap();
        assert_eq!(c.connect, default_connect());
        assert!(
            config::parse::<Config>(r#"{"connect": "x"}"#)
                .unwrap_err()
                .starts_with("connect:")
        );
    }
}
