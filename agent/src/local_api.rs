//! Local publish API: applications on the device hand messages to the agent over a Unix socket.
//!
//! Newline-delimited JSON. Request: `{"stream":"vib/alerts","class":"results","payload":{..},
//! "ttl_s":3600}` (`class` defaults to results, `ttl_s` to the class's TTL, 0 = never expire).
//! Response, one line per request in request order: `{"ok":true,"id":"..","seq":17,
//! "class":"results"}` once the message is durably stored, or `{"ok":false,"error":".."}`.
//! Clients may pipeline: lines already waiting on a connection are stored with one group commit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use protocol::v1::{Class, Data, DataPayload, topics};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::outbox::{NewMessage, Outbox};

/// Most requests stored with one commit.
const MAX_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    #[error("another agent is already serving the local API on {0}")]
    InUse(PathBuf),
    #[error("local API socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub stream: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<Class>,
    pub payload: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<Class>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn err(e: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            id: None,
            seq: None,
            class: None,
            error: Some(e.to_string()),
        }
    }
}

/// Binds the socket, refusing to steal it from a running agent.
pub async fn bind(path: &Path) -> Result<UnixListener, LocalApiError> {
    let io = |source| LocalApiError::Io {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(LocalApiError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    UnixListener::bind(path).map_err(io)
}

/// Serves connections until `shutdown` turns true; then waits briefly for open batches.
pub async fn serve(
    listener: UnixListener,
    device: String,
    outbox: Arc<Outbox>,
    max_message_bytes: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let device: Arc<str> = device.into();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(connection(stream, device.clone(), outbox.clone(), max_message_bytes));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "local API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    // Let requests already being stored finish, so their clients get an answer.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

async fn connection(
    stream: UnixStream,
    device: Arc<str>,
    outbox: Arc<Outbox>,
    max_message_bytes: usize,
) {
    let (rd, mut wr) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, rd);
    // Room for the payload plus the request's own fields.
    let line_limit = max_message_bytes + 1024;
    loop {
        let mut lines = Vec::new();
        let mut fatal = None;
        loop {
            let mut buf = Vec::new();
            let n = match (&mut reader)
                .take(line_limit as u64 + 1)
                .read_until(b'\n', &mut buf)
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, "local API read failed");
                    0
                }
            };
            if n == 0 {
                break;
            }
            if buf.last() != Some(&b'\n') && buf.len() > line_limit {
                fatal = Some(format!(
                    "request longer than {line_limit} bytes; closing connection"
                ));
                break;
            }
            lines.push(buf);
            // Take more only if a whole line is already buffered, never wait for one.
            if lines.len() >= MAX_BATCH || !reader.buffer().contains(&b'\n') {
                break;
            }
        }
        if lines.is_empty() && fatal.is_none() {
            return;
        }
        let mut responses = handle_batch(&lines, &device, &outbox, max_message_bytes).await;
        if let Some(f) = &fatal {
            responses.push(Response::err(f));
        }
        let mut out = Vec::with_capacity(responses.len() * 80);
        for r in &responses {
            out.extend_from_slice(&serde_json::to_vec(r).unwrap_or_default());
            out.push(b'\n');
        }
        if wr.write_all(&out).await.is_err() || fatal.is_some() {
            return;
        }
    }
}

async fn handle_batch(
    lines: &[Vec<u8>],
    device: &str,
    outbox: &Outbox,
    max_message_bytes: usize,
) -> Vec<Response> {
    let mut responses: Vec<Option<Response>> = vec![None; lines.len()];
    let mut msgs = Vec::new();
    let mut slots = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        match parse_request(line, device, max_message_bytes) {
            Ok(m) => {
                msgs.push(m);
                slots.push(i);
            }
            Err(e) => responses[i] = Some(Response::err(e)),
        }
    }
    for (slot, res) in slots.into_iter().zip(outbox.enqueue_batch(msgs).await) {
        responses[slot] = Some(match res {
            Ok(a) => Response {
                ok: true,
                id: Some(a.id),
                seq: Some(a.seq),
                class: Some(a.class),
                error: None,
            },
            Err(e) => {
                tracing::warn!(error = %e, "local API message refused");
                Response::err(e)
            }
        });
    }
    responses
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Response::err("internal error")))
        .collect()
}

/// Why one request line is refused; the text is the client's answer.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("malformed request: {0}")]
    Malformed(serde_json::Error),
    #[error(transparent)]
    Stream(protocol::v1::Error),
    #[error("cannot encode payload: {0}")]
    Encode(serde_json::Error),
    #[error("message of {size} bytes exceeds local_api.max_message_bytes ({limit})")]
    TooLarge { size: usize, limit: usize },
}

fn parse_request(
    line: &[u8],
    device: &str,
    max_message_bytes: usize,
) -> Result<NewMessage, RequestError> {
    let req: Request = serde_json::from_slice(line).map_err(RequestError::Malformed)?;
    topics::validate_stream(&req.stream).map_err(RequestError::Stream)?;
    let class = req.class.unwrap_or(Class::Results);
    let body = serde_json::to_vec(&Data {
        stream: req.stream.clone(),
        payload: DataPayload::Json(req.payload),
    })
    .map_err(RequestError::Encode)?;
    if body.len() > max_message_bytes {
        return Err(RequestError::TooLarge {
            size: body.len(),
            limit: max_message_bytes,
        });
    }
    Ok(NewMessage {
        class,
        topic: topics::data(device, &req.stream),
        body,
        ttl: req.ttl_s.map(Duration::from_secs),
    })
}

/// Client side, used by `edge-agent publish`: sends one request and returns the answer.
pub async fn publish(socket: &Path, req: &Request) -> Result<Response, LocalApiError> {
    let io = |source| LocalApiError::Io {
        path: socket.to_owned(),
        source,
    };
    let stream = UnixStream::connect(socket).await.map_err(io)?;
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| io(std::io::Error::other(e)))?;
    line.push(b'\n');
    wr.write_all(&line).await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(rd)
        .read_line(&mut answer)
        .await
        .map_err(io)?;
    serde_json::from_str(&answer)
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_are_named() {
        let cases: [(&[u8], &str); 4] = [
            (b"{not json", "malformed request"),
            (br#"{"stream":"a//b","payload":1}"#, "invalid stream"),
            (br#"{"stream":"a","payload":1,"class":"bulk"}"#, "malformed request"),
            (br#"{"stream":"a","payload":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#, "exceeds"),
        ];
        for (line, needle) in cases {
            let err = parse_request(line, "d1", 40)
                .expect_err("refused")
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
        let ok = parse_request(
            br#"{"stream":"a/b","payload":{"x":1},"class":"control","ttl_s":5}"#,
            "d1",
            1000,
        )
        .expect("valid");
        assert_eq!(ok.topic, "edge/v1/d1/data/a/b");
        assert_eq!(ok.class, Class::Control);
        assert_eq!(ok.ttl, Some(Duration::from_secs(5)));
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Arc::new(Outbox::open(dir.path(), &Default::default()).expect("open"));
        let sock = dir.path().join("a.sock");
        let listener = bind(&sock).await.expect("bind");
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(serve(listener, "d1".into(), outbox.clone(), 1000, rx));
        assert!(matches!(bind(&sock).await, Err(LocalApiError::InUse(_))));

        let stream = UnixStream::connect(&sock).await.expect("connect");
        let (rd, mut wr) = stream.into_split();
        let mut req = Vec::new();
        for i in 0..50 {
            req.extend_from_slice(format!("{{\"stream\":\"s\",\"payload\":{i}}}\n").as_bytes());
        }
        req.extend_from_slice(b"garbage\n");
        wr.write_all(&req).await.expect("write");
        let mut lines = BufReader::new(rd).lines();
        let mut seqs = Vec::new();
        for _ in 0..50 {
            let r: Response =
                serde_json::from_str(&lines.next_line().await.expect("read").expect("line"))
                    .expect("json");
            assert!(r.ok, "{r:?}");
            seqs.push(r.seq.expect("seq"));
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        let bad: Response =
            serde_json::from_str(&lines.next_line().await.expect("read").expect("line"))
                .expect("json");
        assert!(!bad.ok);
        assert_eq!(outbox.stats().depth[Class::Results.index()], 50);
    }
}
