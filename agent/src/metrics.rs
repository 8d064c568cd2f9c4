//! The agent's own Prometheus `/metrics` (text format 0.0.4), off by default: served on a
//! local TCP address (`local_api.metrics_listen`) and/or a Unix socket (`local_api.metrics_socket`),
//! for a node exporter or a local scraper. The coordinator relays most of the same figures from
//! telemetry for devices behind NAT; this is for a scraper on the device's own network.
//!
//! Series: outbox depth per class and its totals (delivered, expired, evicted, refused),
//! per pipeline stage calls/ok/errors/frames (counters, for rates) and latency percentiles, the
//! inference provider each model actually runs on, incoming messages refused because they did
//! not authenticate (by reason) and remote commands (by outcome).
//!
//! The server is a minimal HTTP/1.1 responder: one request per connection, `GET /metrics` only,
//! request head capped at 8 KiB and 5 s.
//! **Boundary:** spawned by `agent::run` when configured; reads shared stats only.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::command::CommandStats;
use crate::inference::Inference;
use crate::link::AuthStats;
use crate::outbox::Outbox;
use crate::pipeline::RunningSlot;

/// One counter read off a stage's telemetry.
type StageFigure = fn(&protocol::v1::StageTelemetry) -> u64;

/// What the page is made from.
#[derive(Clone)]
pub struct Sources {
    pub outbox: Arc<Outbox>,
    pub pipeline: RunningSlot,
    pub inference: Inference,
    pub auth: Arc<AuthStats>,
    pub commands: Arc<CommandStats>,
}

/// The page: every series with its HELP and TYPE.
pub fn render(s: &Sources) -> String {
    let mut out = String::new();
    let st = s.outbox.stats();
    let name = "edge_agent_outbox_depth";
    let _ = writeln!(
        out,
        "# HELP {name} Messages waiting in the outbox, by class.\n# TYPE {name} gauge"
    );
    for (class, depth) in protocol::v1::Class::ALL.iter().zip(st.depth) {
        let _ = writeln!(out, "{name}{{class=\"{}\"}} {depth}", class.as_str());
    }
    for (name, help, v) in [
        (
            "edge_agent_outbox_bytes",
            "Bytes the outbox holds.",
            st.depth_bytes,
        ),
        (
            "edge_agent_outbox_awaiting_ack",
            "Messages the broker took that await the coordinator's ack.",
            st.awaiting_ack,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    for (name, help, v) in [
        (
            "edge_agent_outbox_delivered_total",
            "Messages the coordinator acknowledged as committed.",
            st.delivered,
        ),
        (
            "edge_agent_outbox_expired_total",
            "Messages dropped because their TTL passed.",
            st.expired,
        ),
        (
            "edge_agent_outbox_evicted_total",
            "Telemetry evicted to make room.",
            st.evicted,
        ),
        (
            "edge_agent_outbox_refused_total",
            "Messages refused because the outbox was full.",
            st.refused,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }

    if let Some(p) = s.pipeline.telemetry() {
        let pl = escape(&p.name);
        let stages = &p.stages;
        let counters: [(&str, &str, StageFigure); 4] = [
            (
                "edge_agent_stage_calls_total",
                "Stage process calls.",
                |t| t.calls,
            ),
            (
                "edge_agent_stage_errors_total",
                "Stage calls that failed (errors, traps, timeouts).",
                |t| t.errors + t.traps + t.timeouts,
            ),
            (
                "edge_agent_stage_frames_out_total",
                "Frames a stage emitted.",
                |t| t.frames_out,
            ),
            (
                "edge_agent_stage_refused_total",
                "Frames refused while a stage restarted or after it failed.",
                |t| t.refused,
            ),
        ];
        for (name, help, f) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for t in stages {
                let _ = writeln!(
                    out,
                    "{name}{{pipeline=\"{pl}\",stage=\"{}\"}} {}",
                    escape(&t.name),
                    f(t)
                );
            }
        }
        let name = "edge_agent_stage_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Stage call latency percentiles.\n# TYPE {name} gauge"
        );
        for t in stages {
            for (q, us) in [
                ("0.5", t.p50_us),
                ("0.95", t.p95_us),
                ("0.99", t.p99_us),
                ("1", t.max_us),
            ] {
                let _ = writeln!(
                    out,
                    "{name}{{pipeline=\"{pl}\",stage=\"{}\",quantile=\"{q}\"}} {}",
                    escape(&t.name),
                    us as f64 / 1e6
                );
            }
        }
    }

    let inf = s.inference.telemetry();
    let name = "edge_agent_inference_model_info";
    let _ = writeln!(
        out,
        "# HELP {name} Models loaded and the execution provider each actually runs on.\n# TYPE {name} gauge"
    );
    for m in &inf.models {
        let _ = writeln!(
            out,
            "{name}{{model=\"{}\",version=\"{}\",provider=\"{}\",placement=\"{}\"}} 1",
            escape(&m.name),
            escape(&m.version),
            escape(&m.provider),
            escape(&m.placement)
        );
    }
    let name = "edge_agent_inference_runs_total";
    let _ = writeln!(
        out,
        "# HELP {name} Inference runs per model.\n# TYPE {name} counter"
    );
    for m in &inf.models {
        let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", escape(&m.name), m.runs);
    }

    let name = "edge_agent_auth_rejected_total";
    let _ = writeln!(
        out,
        "# HELP {name} Incoming messages dropped because they did not authenticate, by reason.\n# TYPE {name} counter"
    );
    for (reason, v) in s.auth.rejected() {
        let _ = writeln!(out, "{name}{{reason=\"{}\"}} {v}", escape(&reason));
    }

    let c = &s.commands;
    let name = "edge_agent_commands_total";
    let _ = writeln!(
        out,
        "# HELP {name} Remote commands, by outcome.\n# TYPE {name} counter"
    );
    for (outcome, v) in [
        ("accepted", &c.accepted),
        ("malformed", &c.malformed),
        ("expired", &c.expired),
        ("duplicate", &c.duplicate),
    ] {
        let _ = writeln!(
            out,
            "{name}{{outcome=\"{outcome}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
    out
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Answers one HTTP request on `io`.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, sources: &Sources) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return;
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (status, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", render(sources)),
        (Some("GET"), Some(_)) => ("404 Not Found", "only /metrics is served here\n".to_owned()),
        _ => ("405 Method Not Allowed", "GET /metrics\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = io.write_all(response.as_bytes()).await;
    let _ = io.shutdown().await;
}

/// Where the page is served.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

/// Binds what `cfg` asks for (nothing when both are empty).
pub async fn bind(cfg: &crate::config::LocalApiConfig) -> std::io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    if !cfg.metrics_listen.is_empty() {
        let l = tokio::net::TcpListener::bind(&cfg.metrics_listen)
            .await
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("local_api.metrics_listen {}: {e}", cfg.metrics_listen),
                )
            })?;
        out.push(Listener::Tcp(l));
    }
    if !cfg.metrics_socket.as_os_str().is_empty() {
        let path = cfg.metrics_socket.clone();
        // A socket file left by a previous run.
        let _ = std::fs::remove_file(&path);
        let l = tokio::net::UnixListener::bind(&path).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("local_api.metrics_socket {}: {e}", path.display()),
            )
        })?;
        out.push(Listener::Unix(l, path));
    }
    Ok(out)
}

/// Serves until `shutdown`; connections are answered one at a time (a scrape is small).
pub async fn serve(listener: Listener, sources: Sources, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            conn = accept(&listener) => match conn {
                Ok(Conn::Tcp(s)) => answer(s, &sources).await,
                Ok(Conn::Unix(s)) => answer(s, &sources).await,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

/// Serves every listener until `shutdown`.
pub async fn run(listeners: Vec<Listener>, sources: Sources, shutdown: watch::Receiver<bool>) {
    let mut set = tokio::task::JoinSet::new();
    for l in listeners {
        set.spawn(serve(l, sources.clone(), shutdown.clone()));
    }
    while set.join_next().await.is_some() {}
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<Conn> {
    match l {
        Listener::Tcp(t) => t.accept().await.map(|(s, _)| Conn::Tcp(s)),
        Listener::Unix(u, _) => u.accept().await.map(|(s, _)| Conn::Unix(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_page_has_every_family_and_answers_over_http() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox =
            Outbox::open(dir.path(), &crate::outbox::OutboxConfig::default()).expect("outbox");
        let auth = Arc::new(AuthStats::default());
        auth.reject("replay");
        let commands = Arc::new(CommandStats::default());
        commands.expired.fetch_add(2, Ordering::Relaxed);
        let sources = Sources {
            outbox: Arc::new(outbox),
            pipeline: RunningSlot::default(),
            inference: Inference::new(&edge_inference::InferenceConfig::default()),
            auth,
            commands,
        };
        let page = render(&sources);
        for want in [
            "edge_agent_outbox_depth{class=\"control\"} 0",
            "# TYPE edge_agent_outbox_delivered_total counter",
            "edge_agent_auth_rejected_total{reason=\"replay\"} 1",
            "edge_agent_commands_total{outcome=\"expired\"} 2",
            "# TYPE edge_agent_inference_model_info gauge",
        ] {
            assert!(page.contains(want), "{want} missing from\n{page}");
        }
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(async move { answer(server, &sources).await });
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        client.read_to_string(&mut response).await.expect("read");
        serving.await.expect("served");
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains("edge_agent_outbox_depth"));
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
