//! The v1 topic tree. Every topic is built and parsed here, nowhere else.
//!
//! ```text
//! edge/v1/{device}/status          retained Status; the agent's last will sets online=false
//! edge/v1/{device}/register        Envelope<Registration>, class control, at every start
//! edge/v1/{device}/telemetry       Envelope<Telemetry>, class telemetry, every N seconds
//! edge/v1/{device}/data/{stream}   Envelope<Data>, application messages from the local API
//! edge/v1/{device}/cmd/{name}      coordinator -> device commands (later protocol additions)
//! edge/v1/coordinator/status       retained coordinator status
//! ```

use super::{Error, validate_device_id};

pub const ROOT: &str = "edge/v1";

/// Name reserved for the coordinator in the device position of the tree.
pub const COORDINATOR: &str = "coordinator";

pub fn status(device: &str) -> String {
    format!("{ROOT}/{device}/status")
}

pub fn register(device: &str) -> String {
    format!("{ROOT}/{device}/register")
}

pub fn telemetry(device: &str) -> String {
    format!("{ROOT}/{device}/telemetry")
}

pub fn data(device: &str, stream: &str) -> String {
    format!("{ROOT}/{device}/data/{stream}")
}

pub fn cmd(device: &str, name: &str) -> String {
    format!("{ROOT}/{device}/cmd/{name}")
}

/// Filters the coordinator subscribes to for everything devices send.
pub const COORDINATOR_FILTERS: [&str; 4] = [
    "edge/v1/+/status",
    "edge/v1/+/register",
    "edge/v1/+/telemetry",
    "edge/v1/+/data/#",
];

/// What a device-originated topic means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTopic {
    Status { device: String },
    Register { device: String },
    Telemetry { device: String },
    Data { device: String, stream: String },
    Cmd { device: String, name: String },
}

impl DeviceTopic {
    pub fn device(&self) -> &str {
        match self {
            DeviceTopic::Status { device }
            | DeviceTopic::Register { device }
            | DeviceTopic::Telemetry { device }
            | DeviceTopic::Data { device, .. }
            | DeviceTopic::Cmd { device, .. } => device,
        }
    }
}

/// Parses a topic of the v1 tree; `None` for anything else (including invalid device ids).
pub fn parse(topic: &str) -> Option<DeviceTopic> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
    let (device, rest) = rest.split_once('/')?;
    if validate_device_id(device).is_err() || device == COORDINATOR {
        return None;
    }
    let device = device.to_owned();
    match rest.split_once('/') {
        None => match rest {
            "status" => Some(DeviceTopic::Status { device }),
            "register" => Some(DeviceTopic::Register { device }),
            "telemetry" => Some(DeviceTopic::Telemetry { device }),
            _ => None,
        },
        Some(("data", stream)) if valid_stream(stream) => Some(DeviceTopic::Data {
            device,
            stream: stream.to_owned(),
        }),
        Some(("cmd", name)) if valid_stream(name) => Some(DeviceTopic::Cmd {
            device,
            name: name.to_owned(),
        }),
        _ => None,
    }
}

/// A stream name may have several levels (`a/b`) but no wildcards or empty levels.
pub fn valid_stream(stream: &str) -> bool {
    !stream.is_empty()
        && stream.len() <= 128
        && stream.split('/').all(|level| {
            !level.is_empty()
                && level
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        })
}

/// Validates a stream name for the local API, with an error naming it.
pub fn validate_stream(stream: &str) -> Result<(), Error> {
    if valid_stream(stream) {
        Ok(())
    } else {
        Err(Error::Stream(stream.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse_agree() {
        assert_eq!(
            parse(&status("d1")),
            Some(DeviceTopic::Status {
                device: "d1".into()
            })
        );
        assert_eq!(
            parse(&telemetry("d1")),
            Some(DeviceTopic::Telemetry {
                device: "d1".into()
            })
        );
        assert_eq!(
            parse(&register("d1")),
            Some(DeviceTopic::Register {
                device: "d1".into()
            })
        );
        assert_eq!(
            parse(&data("d1", "vib/alerts")),
            Some(DeviceTopic::Data {
                device: "d1".into(),
                stream: "vib/alerts".into()
            })
        );
    }

    #[test]
    fn foreign_or_malformed_topics_are_none() {
        for t in [
            "edge/v2/d1/status",
            "edge/v1/d1/unknown",
            "edge/v1/coordinator/status",
            "edge/v1/d1/data/",
            "edge/v1/d1/data/a//b",
            "edge/v1//status",
            "other",
        ] {
            assert_eq!(parse(t), None, "{t}");
        }
    }
}
