//! Remote commands: what an operator asks one device to do (`edge/v1/{device}/cmd/{name}`,
//! coordinator -> device, MAC'd with the session's `down` key) and what the device answers
//! (`edge/v1/{device}/reply`, device -> coordinator, MAC'd with its `up` key like every other
//! device message, so it goes through the coordinator's gate).
//!
//! A request names its kind twice, in the topic (`cmd/{name}`, so an observer sees what was
//! asked) and in the body; [`Request::from_json`] refuses a body whose kind, device or version
//! does not match its topic, a malformed id, a level that is not a level, and durations or
//! line counts out of bounds. The MAC covers the topic, so a request cannot be moved to another
//! device or turned into another command.
//!
//! Every request has an id and an expiry (`expires_ms`, wall clock): the device refuses one
//! that arrives after it, so a request recorded on the broker is worthless once it expires,
//! whatever happens to the replay windows. A request gets exactly one final reply
//! ([`ReplyBody::Done`] or [`ReplyBody::Failed`]); a log follow gets [`ReplyBody::Lines`] chunks
//! first and ends with `Done` (stopped or ran out of time).

use serde::{Deserialize, Serialize};

use super::{Error, MAX_PAYLOAD_BYTES, VERSION, validate_device_id, validate_message_id};

/// Longest a log level override or a log follow may last, seconds.
pub const MAX_DURATION_S: u64 = 3600;
/// Most log lines one fetch asks for.
pub const MAX_LINES: u32 = 10_000;
/// Longest a log level (filter directive) may be, bytes.
pub const MAX_LEVEL_LEN: usize = 256;

/// What the device is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum CommandKind {
    /// Stop the live pipeline and start it again from the same description and artifacts.
    RestartPipeline,
    /// Set the agent's log filter (`debug`, `info,edge_agent=trace`, ...) for `for_s` seconds,
    /// then go back to the filter it had.
    LogLevel { level: String, for_s: u64 },
    /// The last `lines` lines of the agent's log ring.
    Logs { lines: u32 },
    /// Send new log lines as they are written, for at most `for_s` seconds.
    Follow { for_s: u64 },
    /// End the follow `follow` (a request id) early.
    StopFollow { follow: String },
    /// The effective configuration, secrets redacted.
    Config,
}

impl CommandKind {
    /// The topic's last level for this kind (`cmd/{name}`).
    pub fn name(&self) -> &'static str {
        match self {
            CommandKind::RestartPipeline => "restart-pipeline",
            CommandKind::LogLevel { .. } => "log-level",
            CommandKind::Logs { .. } => "logs",
            CommandKind::Follow { .. } => "follow",
            CommandKind::StopFollow { .. } => "stop-follow",
            CommandKind::Config => "config",
        }
    }

    /// Whether the command changes the device (the API wants scope admin for these).
    pub fn changes_device(&self) -> bool {
        matches!(
            self,
            CommandKind::RestartPipeline | CommandKind::LogLevel { .. }
        )
    }

    /// Checks the bounds serde cannot; the message names the field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: String| Err(Error::Command(what));
        match self {
            CommandKind::LogLevel { level, for_s } => {
                if level.is_empty() || level.len() > MAX_LEVEL_LEN {
                    return bad(format!("level must be 1-{MAX_LEVEL_LEN} characters"));
                }
                if !level.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '=' | ',' | '.')
                }) {
                    return bad(format!(
                        "level {level:?} is not a log filter (e.g. debug, info,edge_agent=trace)"
                    ));
                }
                check_duration("for_s", *for_s)
            }
            CommandKind::Logs { lines } => {
                if *lines == 0 || *lines > MAX_LINES {
                    return bad(format!("lines must be 1-{MAX_LINES}, got {lines}"));
                }
                Ok(())
            }
            CommandKind::Follow { for_s } => check_duration("for_s", *for_s),
            CommandKind::StopFollow { follow } => validate_message_id(follow),
            CommandKind::RestartPipeline | CommandKind::Config => Ok(()),
        }
    }
}

fn check_duration(field: &str, s: u64) -> Result<(), Error> {
    if s == 0 || s > MAX_DURATION_S {
        return Err(Error::Command(format!(
            "{field} must be 1-{MAX_DURATION_S} seconds, got {s}"
        )));
    }
    Ok(())
}

/// Coordinator -> device, on `cmd/{kind.name()}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub v: u8,
    /// Unique per command; the reply names it.
    pub id: String,
    pub device: String,
    /// Wall-clock milliseconds after which the device must refuse the request.
    pub expires_ms: u64,
    pub command: CommandKind,
}

impl Request {
    pub fn to_json(&self) -> Vec<u8> {
        // Our own plain struct: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a request received on `cmd/{topic_name}` of `topic_device`; see the module docs
    /// for what it refuses.
    pub fn from_json(
        payload: &[u8],
        topic_device: &str,
        topic_name: &str,
    ) -> Result<Request, Error> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::TooLarge {
                size: payload.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        let r: Request = serde_json::from_slice(payload)?;
        if r.v != VERSION {
            return Err(Error::Version(r.v));
        }
        validate_message_id(&r.id)?;
        validate_device_id(&r.device)?;
        if r.device != topic_device {
            return Err(Error::DeviceMismatch {
                envelope: r.device,
                topic: topic_device.to_owned(),
            });
        }
        if r.command.name() != topic_name {
            return Err(Error::Command(format!(
                "body is a {} command but the topic says {topic_name}",
                r.command.name()
            )));
        }
        r.command.validate()?;
        Ok(r)
    }
}

/// What a finished command returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// One line for the operator (`pipeline vibration restarted`, ...).
    pub summary: String,
    /// Log lines (fetch), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<String>,
    /// Lines the ring no longer held, or left out to fit the payload limit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u64,
    /// The effective configuration (config), secrets replaced by `"<redacted>"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The body of a reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ReplyBody {
    /// Finished; the command's last reply.
    Done { outcome: Outcome },
    /// Refused or failed, with the reason; the command's last reply.
    Failed { error: String },
    /// A follow's new lines; `seq` counts chunks from 0 so gaps can be told.
    Lines {
        seq: u64,
        lines: Vec<String>,
        #[serde(default)]
        dropped: u64,
    },
}

impl ReplyBody {
    pub fn is_final(&self) -> bool {
        !matches!(self, ReplyBody::Lines { .. })
    }
}

/// Device -> coordinator, on `edge/v1/{device}/reply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub v: u8,
    /// The request's id.
    pub id: String,
    pub device: String,
    pub body: ReplyBody,
}

impl Reply {
    pub fn new(device: &str, id: &str, body: ReplyBody) -> Reply {
        Reply {
            v: VERSION,
            id: id.to_owned(),
            device: device.to_owned(),
            body,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a reply received on `topic_device`'s reply topic.
    pub fn from_json(payload: &[u8], topic_device: &str) -> Result<Reply, Error> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::TooLarge {
                size: payload.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        let r: Reply = serde_json::from_slice(payload)?;
        if r.v != VERSION {
            return Err(Error::Version(r.v));
        }
        validate_message_id(&r.id)?;
        if r.device != topic_device {
            return Err(Error::DeviceMismatch {
                envelope: r.device,
                topic: topic_device.to_owned(),
            });
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kind: CommandKind) -> Request {
        Request {
            v: VERSION,
            id: "c1".into(),
            device: "pi-1".into(),
            expires_ms: 1,
            command: kind,
        }
    }

    #[test]
    fn every_kind_reads_back_on_its_own_topic() {
        for kind in [
            CommandKind::RestartPipeline,
            CommandKind::LogLevel {
                level: "info,edge_agent=debug".into(),
                for_s: 60,
            },
            CommandKind::Logs { lines: 100 },
            CommandKind::Follow { for_s: 30 },
            CommandKind::StopFollow {
                follow: "c0".into(),
            },
            CommandKind::Config,
        ] {
            let r = request(kind.clone());
            let back = Request::from_json(&r.to_json(), "pi-1", kind.name()).expect("valid");
            assert_eq!(back, r);
        }
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let ok = request(CommandKind::Logs { lines: 5 }).to_json();
        let text = String::from_utf8(ok.clone()).expect("utf-8");
        let cases: Vec<(Vec<u8>, &str, &str, &str)> = vec![
            (b"".to_vec(), "pi-1", "logs", "json"),
            (b"{".to_vec(), "pi-1", "logs", "json"),
            (b"[]".to_vec(), "pi-1", "logs", "json"),
            (ok.clone(), "pi-2", "logs", "does not match"),
            (ok.clone(), "pi-1", "config", "topic says config"),
            (
                text.replace("\"v\":1", "\"v\":9").into_bytes(),
                "pi-1",
                "logs",
                "version 9",
            ),
            (
                text.replace("\"c1\"", "\"a b\"").into_bytes(),
                "pi-1",
                "logs",
                "message id",
            ),
            (
                text.replace("\"lines\":5", "\"lines\":0").into_bytes(),
                "pi-1",
                "logs",
                "lines must be",
            ),
            (
                text.replace("\"lines\":5", "\"lines\":-1").into_bytes(),
                "pi-1",
                "logs",
                "json",
            ),
            (
                text.replace("\"kind\":\"logs\"", "\"kind\":\"exec\"")
                    .into_bytes(),
                "pi-1",
                "logs",
                "json",
            ),
            (
                text.replacen("}", ",\"extra\":1}", 1).into_bytes(),
                "pi-1",
                "logs",
                "json",
            ),
            (vec![b' '; MAX_PAYLOAD_BYTES + 1], "pi-1", "logs", "exceeds"),
            (
                request(CommandKind::LogLevel {
                    level: "debug".into(),
                    for_s: 0,
                })
                .to_json(),
                "pi-1",
                "log-level",
                "for_s must be",
            ),
            (
                request(CommandKind::LogLevel {
                    level: "debug; rm".into(),
                    for_s: 5,
                })
                .to_json(),
                "pi-1",
                "log-level",
                "not a log filter",
            ),
            (
                request(CommandKind::Follow {
                    for_s: MAX_DURATION_S + 1,
                })
                .to_json(),
                "pi-1",
                "follow",
                "for_s must be",
            ),
        ];
        for (payload, device, name, expected) in cases {
            let e = Request::from_json(&payload, device, name)
                .expect_err("must be refused")
                .to_string();
            assert!(
                e.contains(expected),
                "{:?}: {e} (expected {expected})",
                String::from_utf8_lossy(&payload[..payload.len().min(80)])
            );
        }
        assert!(Request::from_json(&ok, "pi-1", "logs").is_ok());
    }

    #[test]
    fn replies_read_back_and_bad_ones_are_refused() {
        for body in [
            ReplyBody::Done {
                outcome: Outcome {
                    summary: "ok".into(),
                    lines: vec!["a".into()],
                    dropped: 2,
                    config: Some(serde_json::json!({"k": 1})),
                },
            },
            ReplyBody::Failed {
                error: "no pipeline runs".into(),
            },
            ReplyBody::Lines {
                seq: 3,
                lines: vec!["x".into()],
                dropped: 0,
            },
        ] {
            let r = Reply::new("pi-1", "c1", body);
            assert_eq!(Reply::from_json(&r.to_json(), "pi-1").expect("valid"), r);
            assert!(Reply::from_json(&r.to_json(), "pi-2").is_err());
        }
        for bad in [
            &b"{}"[..],
            br#"{"v":1,"id":"c1","device":"pi-1","body":{"status":"maybe"}}"#,
            br#"{"v":1,"id":"","device":"pi-1","body":{"status":"failed","error":"x"}}"#,
            br#"{"v":2,"id":"c1","device":"pi-1","body":{"status":"failed","error":"x"}}"#,
            br#"{"v":1,"id":"c1","device":"pi-1","body":{"status":"failed","error":"x","more":1}}"#,
            b"\xff",
        ] {
            assert!(Reply::from_json(bad, "pi-1").is_err(), "{bad:?}");
        }
    }
}
