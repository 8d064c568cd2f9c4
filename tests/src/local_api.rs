//! Client for the agent's local API: newline-delimited JSON over a Unix socket.
//!
//! One response line per request line, in request order; `ok: true` means the message is
//! durably stored and will be delivered. A connection that drops before a request's response
//! arrives leaves that request "not accepted": the agent owes nothing for it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use protocol::v1::Class;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::delivery::Expected;

/// How long a read may block before the client gives up on a silent agent.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// One publish request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Publish {
    pub stream: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<Class>,
    pub payload: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
}

impl Publish {
    pub fn new(stream: impl Into<String>, class: Class, payload: Value) -> Publish {
        Publish {
            stream: stream.into(),
            class: Some(class),
            payload,
            ttl_s: None,
        }
    }
}

/// `n` distinct messages on stream `test/TAG`, cycling through `classes`; each payload names
/// its tag and index so a mix-up is visible in the journal.
pub fn test_messages(tag: &str, n: usize, classes: &[Class]) -> Vec<Publish> {
    (0..n)
        .map(|i| {
            let class = classes
                .get(i % classes.len().max(1))
                .copied()
                .unwrap_or(Class::Results);
            Publish::new(
                format!("test/{tag}"),
                class,
                serde_json::json!({ "tag": tag, "i": i }),
            )
        })
        .collect()
}

/// The agent's promise for one accepted message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Accepted {
    pub id: String,
    pub seq: u64,
    pub class: Class,
}

/// Response to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Accepted(Accepted),
    /// `ok: false` with the agent's error text.
    Refused(String),
}

#[derive(Deserialize)]
struct RawReply {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(flatten)]
    accepted: Option<Accepted>,
}

fn parse_reply(line: &str) -> Result<Reply> {
    let raw: RawReply = serde_json::from_str(line)
        .with_context(|| format!("malformed local API response {line:?}"))?;
    if raw.ok {
        let acc = raw
            .accepted
            .with_context(|| format!("ok response without id/seq/class: {line:?}"))?;
        Ok(Reply::Accepted(acc))
    } else {
        Ok(Reply::Refused(raw.error.unwrap_or_default()))
    }
}

/// Result of a pipelined batch: the replies that came back (a prefix of the batch, in order)
/// and how many requests got none because the connection failed.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub replies: Vec<Reply>,
    pub unanswered: usize,
    /// Why the batch stopped early, if it did.
    pub error: Option<String>,
    /// Set when the agent answered with something that is not a valid response line (a
    /// protocol violation, unlike a dropped connection).
    pub malformed: Option<String>,
}

impl BatchOutcome {
    /// Accepted messages paired with their index in the batch.
    pub fn accepted(&self) -> impl Iterator<Item = (usize, &Accepted)> {
        self.replies
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r {
                Reply::Accepted(a) => Some((i, a)),
                Reply::Refused(_) => None,
            })
    }

    /// Refusals paired with their index in the batch.
    pub fn refused(&self) -> impl Iterator<Item = (usize, &str)> {
        self.replies
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r {
                Reply::Refused(e) => Some((i, e.as_str())),
                Reply::Accepted(_) => None,
            })
    }

    /// True if every request was accepted.
    pub fn all_accepted(&self) -> bool {
        self.unanswered == 0 && self.replies.iter().all(|r| matches!(r, Reply::Accepted(_)))
    }
}

/// A connection to the agent's local API.
#[derive(Debug)]
pub struct LocalApi {
    path: PathBuf,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl LocalApi {
    /// Connects once.
    pub fn connect(path: &Path) -> Result<LocalApi> {
        let stream = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot connect to the agent's local API at {}",
                path.display()
            )
        })?;
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .context("cannot set socket read timeout")?;
        let reader = BufReader::new(stream.try_clone().context("cannot clone socket")?);
        Ok(LocalApi {
            path: path.to_owned(),
            stream,
            reader,
        })
    }

    /// Retries [`LocalApi::connect`] until it works or `timeout` passes.
    pub fn connect_wait(path: &Path, timeout: Duration) -> Result<LocalApi> {
        let deadline = Instant::now() + timeout;
        loop {
            match LocalApi::connect(path) {
                Ok(api) => return Ok(api),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("gave up after {timeout:?}")));
                }
                Err(_) => std::thread::sleep(crate::POLL),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one raw request line (no newline) and reads its reply.
    pub fn request_line(&mut self, line: &str) -> Result<Reply> {
        let mut buf = line.as_bytes().to_vec();
        buf.push(b'\n');
        self.stream
            .write_all(&buf)
            .context("cannot write to the local API")?;
        let mut resp = String::new();
        let n = self
            .reader
            .read_line(&mut resp)
            .context("cannot read from the local API")?;
        if n == 0 {
            bail!("the agent closed the local API connection before replying");
        }
        parse_reply(resp.trim_end())
    }

    /// Publishes one message; refusals are returned as `Reply::Refused`.
    pub fn send(&mut self, msg: &Publish) -> Result<Reply> {
        let line = serde_json::to_string(msg).context("cannot encode request")?;
        self.request_line(&line)
    }

    /// Publishes one message and requires it to be accepted.
    pub fn publish(&mut self, msg: &Publish) -> Result<Accepted> {
        match self.send(msg)? {
            Reply::Accepted(a) => Ok(a),
            Reply::Refused(e) => bail!("the agent refused a message on stream {}: {e}", msg.stream),
        }
    }

    /// Publishes `msgs` in pipelined batches of `chunk` and requires every one to be accepted;
    /// returns what the journal should then show.
    pub fn publish_all(&mut self, msgs: &[Publish], chunk: usize) -> Result<Vec<Expected>> {
        let mut expected = Vec::with_capacity(msgs.len());
        for batch in msgs.chunks(chunk.max(1)) {
            let out = self.publish_batch(batch);
            if let Some((i, err)) = out.refused().next() {
                bail!(
                    "the agent refused message {} of {} (stream {}): {err}",
                    expected.len() + i + 1,
                    msgs.len(),
                    batch[i].stream
                );
            }
            if let Some(err) = &out.error {
                bail!(
                    "local API failed after {} of {} messages were accepted: {err}",
                    expected.len() + out.replies.len(),
                    msgs.len()
                );
            }
            for (i, acc) in out.accepted() {
                if Some(acc.class) != batch[i].class && batch[i].class.is_some() {
                    bail!(
                        "message on {} sent as {:?} was accepted as class {}",
                        batch[i].stream,
                        batch[i].class,
                        acc.class
                    );
                }
                expected.push(Expected::new(acc, &batch[i].stream, &batch[i].payload));
            }
        }
        Ok(expected)
    }

    /// Sends every request before reading any reply (a writer thread feeds the socket while
    /// this thread reads, so a batch larger than the socket buffers cannot deadlock).
    pub fn publish_batch(&mut self, msgs: &[Publish]) -> BatchOutcome {
        let mut out = BatchOutcome::default();
        let mut payload = Vec::new();
        for m in msgs {
            match serde_json::to_vec(m) {
                Ok(line) => {
                    payload.extend_from_slice(&line);
                    payload.push(b'\n');
                }
                Err(e) => {
                    out.unanswered = msgs.len();
                    out.error = Some(format!("cannot encode request: {e}"));
                    return out;
                }
            }
        }
        let mut writer = match self.stream.try_clone() {
            Ok(w) => w,
            Err(e) => {
                out.unanswered = msgs.len();
                out.error = Some(format!("cannot clone socket: {e}"));
                return out;
            }
        };
        let reader = &mut self.reader;
        std::thread::scope(|s| {
            // A write error shows up as a short read below, which is what counts.
            s.spawn(move || {
                let _ = writer.write_all(&payload);
            });
            for _ in 0..msgs.len() {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) => {
                        out.error = Some("connection closed by the agent".into());
                        break;
                    }
                    Ok(_) => match parse_reply(line.trim_end()) {
                        Ok(r) => out.replies.push(r),
                        Err(e) => {
                            out.error = Some(format!("{e:#}"));
                            out.malformed = Some(line.trim_end().to_owned());
                            break;
                        }
                    },
                    Err(e) => {
                        out.error = Some(format!("read failed: {e}"));
                        break;
                    }
                }
            }
            if out.error.is_some() {
                // Unblocks the writer if the agent stopped reading but kept the socket open.
                let _ = self.stream.shutdown(std::net::Shutdown::Both);
            }
        });
        out.unanswered = msgs.len() - out.replies.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        let ok =
            parse_reply(r#"{"ok":true,"id":"00ab","seq":17,"class":"results"}"#).expect("parses");
        assert_eq!(
            ok,
            Reply::Accepted(Accepted {
                id: "00ab".into(),
                seq: 17,
                class: Class::Results
            })
        );
        let no = parse_reply(r#"{"ok":false,"error":"outbox full"}"#).expect("parses");
        assert_eq!(no, Reply::Refused("outbox full".into()));
        assert!(parse_reply(r#"{"ok":true}"#).is_err());
        assert!(parse_reply("garbage").is_err());
    }

    #[test]
    fn requests_leave_out_unset_fields() {
        let p = Publish {
            stream: "s".into(),
            class: None,
            payload: serde_json::json!(1),
            ttl_s: None,
        };
        assert_eq!(
            serde_json::to_string(&p).expect("encodes"),
            r#"{"stream":"s","payload":1}"#
        );
        let p = Publish::new("vib/alerts", Class::Control, serde_json::json!({"a": 1}));
        assert_eq!(
            serde_json::to_string(&p).expect("encodes"),
            r#"{"stream":"vib/alerts","class":"control","payload":{"a":1}}"#
        );
    }
}
