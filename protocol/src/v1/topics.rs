//! The v1 topic tree. Every topic is built and parsed here, nowhere else.
//!
//! ```text
//! edge/v1/{device}/status          retained Status; the agent's last will sets online=false
//! edge/v1/{device}/register        Envelope<Registration>, class control, at every start
//! edge/v1/{device}/telemetry       Envelope<Telemetry>, class telemetry, every N seconds
//! edge/v1/{device}/data/{stream}   Envelope<Data>, application messages from the local API
//! edge/v1/{device}/cmd/{name}      command::Request, coordinator -> device (MAC'd)
//! edge/v1/{device}/reply           command::Reply, device -> coordinator (MAC'd)
//! edge/v1/coordinator/status       retained coordinator status
//! edge/v1/{device}/deploy/manifest SignedManifest, coordinator -> device
//! edge/v1/{device}/deploy/chunk    deploy::Chunk (binary), coordinator -> device (and resends)
//! edge/v1/{device}/deploy/status   Envelope<DeployStatus>, device -> coordinator
//! edge/v1/{device}/deploy/resend   Envelope<ResendRequest>, device -> coordinator
//! edge/v1/group/{group}/deploy/manifest  SignedManifest for every member of a group
//! edge/v1/group/{group}/deploy/chunk     chunks broadcast once to a group; resends go per device
//! edge/v1/{device}/fl/round        retained signed fl::RoundMessage (global weights, train order)
//! edge/v1/{device}/fl/update       BinaryEnvelope kind fl-update (compressed weight delta), or
//!                                  fl-part / fl-fetch / fl-failure (see v1::fl)
//! edge/v1/{device}/fl/chunk        fl::WeightChunk (binary), coordinator -> device
//! edge/v1/{device}/ack             v1::ack::Ack, coordinator -> device: what it committed
//! ```
//!
//! `group` is reserved in the device position like `coordinator`: [`parse_deploy`] refuses it
//! as a device id, so `edge/v1/group/...` always means a group.

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

/// Device -> coordinator: the replies to commands (`v1::command::Reply`), MAC'd.
pub fn reply(device: &str) -> String {
    format!("{ROOT}/{device}/reply")
}

/// What the coordinator subscribes to for command replies.
pub const COORDINATOR_REPLY_FILTER: &str = "edge/v1/+/reply";

/// Device -> coordinator: an enrollment request (`v1::enroll`).
pub fn enroll(device: &str) -> String {
    format!("{ROOT}/{device}/enroll")
}

/// Coordinator -> device: the signed, retained answer to an enrollment request.
pub fn enroll_answer(device: &str) -> String {
    format!("{ROOT}/{device}/enroll/answer")
}

/// Coordinator -> device: end-to-end acknowledgements (`v1::ack`), MAC'd.
pub fn ack(device: &str) -> String {
    format!("{ROOT}/{device}/ack")
}

/// Filters the coordinator subscribes to for everything devices send.
pub const COORDINATOR_FILTERS: [&str; 5] = [
    "edge/v1/+/enroll",
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

/// Name reserved for group-addressed topics in the device position of the tree.
pub const GROUP: &str = "group";

pub fn deploy_manifest(device: &str) -> String {
    format!("{ROOT}/{device}/deploy/manifest")
}

pub fn deploy_chunk(device: &str) -> String {
    format!("{ROOT}/{device}/deploy/chunk")
}

pub fn deploy_status(device: &str) -> String {
    format!("{ROOT}/{device}/deploy/status")
}

pub fn deploy_resend(device: &str) -> String {
    format!("{ROOT}/{device}/deploy/resend")
}

pub fn group_deploy_manifest(group: &str) -> String {
    format!("{ROOT}/{GROUP}/{group}/deploy/manifest")
}

pub fn group_deploy_chunk(group: &str) -> String {
    format!("{ROOT}/{GROUP}/{group}/deploy/chunk")
}

/// Filters the coordinator subscribes to for deployment traffic from devices.
pub const COORDINATOR_DEPLOY_FILTERS: [&str; 2] =
    ["edge/v1/+/deploy/status", "edge/v1/+/deploy/resend"];

/// Filters an agent subscribes to for deployments: its own topics and each of its groups'.
pub fn agent_deploy_filters(device: &str, groups: &[String]) -> Vec<String> {
    let mut filters = vec![deploy_manifest(device), deploy_chunk(device)];
    for g in groups {
        filters.push(group_deploy_manifest(g));
        filters.push(group_deploy_chunk(g));
    }
    filters
}

/// What a deployment topic means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployTopic {
    Manifest { device: String },
    Chunk { device: String },
    Status { device: String },
    Resend { device: String },
    GroupManifest { group: String },
    GroupChunk { group: String },
}

/// Parses a deployment topic; `None` for anything else (including invalid ids and a device
/// named `group` or `coordinator`).
pub fn parse_deploy(topic: &str) -> Option<DeployTopic> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
    let (first, rest) = rest.split_once('/')?;
    if first == GROUP {
        let (group, rest) = rest.split_once('/')?;
        validate_device_id(group).ok()?;
        let group = group.to_owned();
        return match rest {
            "deploy/manifest" => Some(DeployTopic::GroupManifest { group }),
            "deploy/chunk" => Some(DeployTopic::GroupChunk { group }),
            _ => None,
        };
    }
    if validate_device_id(first).is_err() || first == COORDINATOR {
        return None;
    }
    let device = first.to_owned();
    match rest {
        "deploy/manifest" => Some(DeployTopic::Manifest { device }),
        "deploy/chunk" => Some(DeployTopic::Chunk { device }),
        "deploy/status" => Some(DeployTopic::Status { device }),
        "deploy/resend" => Some(DeployTopic::Resend { device }),
        _ => None,
    }
}

/// Round orders with the global weights, coordinator -> device (retained: a device that was
/// offline when the round opened still gets it on reconnect, and a late joiner gets the newest
/// global model).
pub fn fl_round(device: &str) -> String {
    format!("{ROOT}/{device}/fl/round")
}

/// A group's round message, coordinator -> every member of a task over that group (retained):
/// the global weights once for the members not selected to train, instead of one message
/// each. Its header names [`group_recipient`]`(group)` as its device and carries no train
/// order; the selected get theirs on [`fl_round`].
pub fn group_fl_round(group: &str) -> String {
    format!("{ROOT}/{GROUP}/{group}/fl/round")
}

/// What a group round message's header names as its device: `group/{group}` (no device id
/// has a `/`, so it is never a device's).
pub fn group_recipient(group: &str) -> String {
    format!("{GROUP}/{group}")
}

/// The group a round header's device field names, if it is a [`group_recipient`].
pub fn recipient_group(device_field: &str) -> Option<&str> {
    device_field
        .strip_prefix(GROUP)?
        .strip_prefix('/')
        .filter(|g| validate_device_id(g).is_ok())
}

/// Chunks of a round's global weights, coordinator -> device (not retained): the answer to a
/// device's `fl-fetch` for a model too big for its round message.
pub fn fl_chunk(device: &str) -> String {
    format!("{ROOT}/{device}/fl/chunk")
}

/// Compressed local updates, device -> coordinator (binary envelope, kind `fl-update`; also
/// `fl-failure`, `fl-part` and `fl-fetch`, see `v1::fl`).
pub fn fl_update(device: &str) -> String {
    format!("{ROOT}/{device}/fl/update")
}

/// What the coordinator subscribes to for federated learning.
pub const COORDINATOR_FL_FILTER: &str = "edge/v1/+/fl/update";

/// The device of an `fl/update` topic; `None` for anything else.
pub fn parse_fl_update(topic: &str) -> Option<String> {
    let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
    let device = rest.strip_suffix("/fl/update")?;
    if validate_device_id(device).is_err() || device == COORDINATOR || device == GROUP {
        return None;
    }
    Some(device.to_owned())
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
    fn fl_topics_parse() {
        assert_eq!(parse_fl_update(&fl_update("d1")), Some("d1".to_owned()));
        assert_eq!(parse_fl_update("edge/v1/coordinator/fl/update"), None);
        assert_eq!(parse_fl_update("edge/v1/a/b/fl/update"), None);
        assert_eq!(parse_fl_update(&fl_round("d1")), None);
    }

    #[test]
    fn deploy_topics_build_and_parse_agree() {
        let d = || "d1".to_owned();
        assert_eq!(
            parse_deploy(&deploy_manifest("d1")),
            Some(DeployTopic::Manifest { device: d() })
        );
        assert_eq!(
            parse_deploy(&deploy_chunk("d1")),
            Some(DeployTopic::Chunk { device: d() })
        );
        assert_eq!(
            parse_deploy(&deploy_status("d1")),
            Some(DeployTopic::Status { device: d() })
        );
        assert_eq!(
            parse_deploy(&deploy_resend("d1")),
            Some(DeployTopic::Resend { device: d() })
        );
        assert_eq!(
            parse_deploy(&group_deploy_manifest("lab")),
            Some(DeployTopic::GroupManifest {
                group: "lab".into()
            })
        );
        assert_eq!(
            parse_deploy(&group_deploy_chunk("lab")),
            Some(DeployTopic::GroupChunk {
                group: "lab".into()
            })
        );
        for t in [
            "edge/v1/group/deploy/status",
            "edge/v1/coordinator/deploy/status",
            "edge/v1/group/lab/deploy/status",
            "edge/v1/group/a+b/deploy/manifest",
            "edge/v1/d1/deploy/other",
            "edge/v1/d1/status",
        ] {
            assert_eq!(parse_deploy(t), None, "{t}");
        }
        assert_eq!(agent_deploy_filters("d1", &["lab".into()]).len(), 4);
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

/// Offload requests, device -> coordinator (binary `offload::Request`, QoS 0).
pub fn offload_request(device: &str) -> String {
    format!("{ROOT}/{device}/offload/request")
}

/// Offload responses, coordinator -> device (binary `offload::Response`, QoS 0).
pub fn offload_response(device: &str) -> String {
    format!("{ROOT}/{device}/offload/response")
}

/// A replica's retained capacity advert (JSON `offload::Capacity`).
pub fn offload_capacity(replica: &str) -> String {
    format!("{ROOT}/{COORDINATOR}/offload/{replica}")
}

/// The shared-subscription group coordinator replicas use for offload requests.
pub const OFFLOAD_SHARE_GROUP: &str = "edge-offload";

/// Every device's offload requests (without the share prefix).
pub const OFFLOAD_REQUEST_FILTER: &str = "edge/v1/+/offload/request";

/// What replicas subscribe to: each request goes to one replica of the group (rumqttd 0.20,
/// mosquitto, EMQX and VerneMQ support `$share`).
pub const COORDINATOR_OFFLOAD_FILTER: &str = "$share/edge-offload/edge/v1/+/offload/request";

/// Every replica's capacity advert (what agents subscribe to).
pub const OFFLOAD_CAPACITY_FILTER: &str = "edge/v1/coordinator/offload/+";

/// The device of an `offload/request` topic; `None` for anything else.
pub fn parse_offload_request(topic: &str) -> Option<String> {
    parse_device_suffix(topic, "/offload/request")
}

/// The device of an `offload/response` topic; `None` for anything else.
pub fn parse_offload_response(topic: &str) -> Option<String> {
    parse_device_suffix(topic, "/offload/response")
}

fn parse_device_suffix(topic: &str, suffix: &str) -> Option<String> {
    let device = topic
        .strip_prefix(ROOT)?
        .strip_prefix('/')?
        .strip_suffix(suffix)?;
    if validate_device_id(device).is_err() || device == COORDINATOR || device == GROUP {
        return None;
    }
    Some(device.to_owned())
}

#[cfg(test)]
mod offload_tests {
    use super::*;

    #[test]
    fn offload_topics_parse() {
        assert_eq!(
            parse_offload_request(&offload_request("d1")),
            Some("d1".to_owned())
        );
        assert_eq!(
            parse_offload_response(&offload_response("d1")),
            Some("d1".to_owned())
        );
        assert_eq!(parse_offload_request(&offload_response("d1")), None);
        assert_eq!(
            parse_offload_request("edge/v1/coordinator/offload/request"),
            None
        );
        assert_eq!(parse_offload_request("edge/v1/a/b/offload/request"), None);
        assert_eq!(
            COORDINATOR_OFFLOAD_FILTER,
            format!("$share/{OFFLOAD_SHARE_GROUP}/{OFFLOAD_REQUEST_FILTER}")
        );
        assert_eq!(offload_capacity("r1"), "edge/v1/coordinator/offload/r1");
        assert_eq!(parse(&offload_request("d1")), None);
    }
}

/// Every topic of the v1 tree, both directions, as one closed enum: the one place a topic
/// string is turned into what it means (the per-kind parsers above are its parts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// Device -> coordinator: `{device}/status|register|telemetry|data/{stream}`.
    Device(DeviceTopic),
    /// Either way: manifests and chunks go out, statuses and resend requests come in.
    Deploy(DeployTopic),
    /// Coordinator -> device: a signed round message.
    FlRound { device: String },
    /// Coordinator -> the members of a task over `group`: its weights-only round message.
    GroupFlRound { group: String },
    /// Coordinator -> device: a chunk of a round's weights (checked against the round's digests).
    FlChunk { device: String },
    /// Device -> coordinator: a compressed update.
    FlUpdate { device: String },
    /// Device -> coordinator: an inference request to offload.
    OffloadRequest { device: String },
    /// Coordinator -> device: the answer to one.
    OffloadResponse { device: String },
    /// Coordinator replica -> devices: a retained capacity advert.
    OffloadCapacity { replica: String },
    /// The coordinator's own retained status.
    CoordinatorStatus,
    /// Device -> coordinator: an enrollment request.
    Enroll { device: String },
    /// Coordinator -> device: the signed answer (retained).
    EnrollAnswer { device: String },
    /// Coordinator -> device: what it has durably committed (`v1::ack`).
    Ack { device: String },
    /// Device -> coordinator: a command's reply (`v1::command`).
    CommandReply { device: String },
}

impl Topic {
    /// What `topic` means; `None` for anything outside the v1 tree (or with an invalid id).
    pub fn parse(topic: &str) -> Option<Topic> {
        if topic == status(COORDINATOR) {
            return Some(Topic::CoordinatorStatus);
        }
        if let Some(replica) = topic
            .strip_prefix(ROOT)
            .and_then(|t| t.strip_prefix('/'))
            .and_then(|t| t.strip_prefix(COORDINATOR))
            .and_then(|t| t.strip_prefix("/offload/"))
        {
            return (validate_device_id(replica).is_ok()).then(|| Topic::OffloadCapacity {
                replica: replica.to_owned(),
            });
        }
        if let Some(t) = parse_deploy(topic) {
            return Some(Topic::Deploy(t));
        }
        if let Some(device) = parse_fl_update(topic) {
            return Some(Topic::FlUpdate { device });
        }
        if let Some(group) = topic
            .strip_prefix(ROOT)
            .and_then(|t| t.strip_prefix('/'))
            .and_then(|t| t.strip_prefix(GROUP))
            .and_then(|t| t.strip_prefix('/'))
            .and_then(|t| t.strip_suffix("/fl/round"))
        {
            return (validate_device_id(group).is_ok()).then(|| Topic::GroupFlRound {
                group: group.to_owned(),
            });
        }
        if let Some(device) = parse_device_suffix(topic, "/fl/round") {
            return Some(Topic::FlRound { device });
        }
        if let Some(device) = parse_device_suffix(topic, "/fl/chunk") {
            return Some(Topic::FlChunk { device });
        }
        if let Some(device) = parse_offload_request(topic) {
            return Some(Topic::OffloadRequest { device });
        }
        if let Some(device) = parse_device_suffix(topic, "/enroll") {
            return Some(Topic::Enroll { device });
        }
        if let Some(device) = parse_device_suffix(topic, "/enroll/answer") {
            return Some(Topic::EnrollAnswer { device });
        }
        if let Some(device) = parse_offload_response(topic) {
            return Some(Topic::OffloadResponse { device });
        }
        if let Some(device) = parse_device_suffix(topic, "/ack") {
            return Some(Topic::Ack { device });
        }
        if let Some(device) = parse_device_suffix(topic, "/reply") {
            return Some(Topic::CommandReply { device });
        }
        parse(topic).map(Topic::Device)
    }

    /// True for what the coordinator publishes (and a catch-all subscription delivers back to
    /// it): the coordinator ignores these as echoes, a device acts on them.
    pub fn from_coordinator(&self) -> bool {
        match self {
            Topic::Device(DeviceTopic::Cmd { .. })
            | Topic::Deploy(
                DeployTopic::Manifest { .. }
                | DeployTopic::Chunk { .. }
                | DeployTopic::GroupManifest { .. }
                | DeployTopic::GroupChunk { .. },
            )
            | Topic::FlRound { .. }
            | Topic::GroupFlRound { .. }
            | Topic::FlChunk { .. }
            | Topic::OffloadResponse { .. }
            | Topic::OffloadCapacity { .. }
            | Topic::CoordinatorStatus
            | Topic::EnrollAnswer { .. }
            | Topic::Ack { .. } => true,
            Topic::Enroll { .. }
            | Topic::Device(_)
            | Topic::Deploy(DeployTopic::Status { .. } | DeployTopic::Resend { .. })
            | Topic::FlUpdate { .. }
            | Topic::OffloadRequest { .. }
            | Topic::CommandReply { .. } => false,
        }
    }

    /// True for what a device sends from its outbox, in an envelope with an outbox id: the
    /// coordinator acknowledges these end to end once committed (`v1::ack`).
    pub fn from_outbox(&self) -> bool {
        matches!(
            self,
            Topic::Device(
                DeviceTopic::Register { .. }
                    | DeviceTopic::Telemetry { .. }
                    | DeviceTopic::Data { .. }
            ) | Topic::Deploy(DeployTopic::Status { .. } | DeployTopic::Resend { .. })
                | Topic::FlUpdate { .. }
        )
    }

    /// The device the topic is about; `None` for group, replica and coordinator topics.
    pub fn device(&self) -> Option<&str> {
        match self {
            Topic::Device(t) => Some(t.device()),
            Topic::Deploy(
                DeployTopic::Manifest { device }
                | DeployTopic::Chunk { device }
                | DeployTopic::Status { device }
                | DeployTopic::Resend { device },
            )
            | Topic::FlRound { device }
            | Topic::FlChunk { device }
            | Topic::FlUpdate { device }
            | Topic::OffloadRequest { device }
            | Topic::OffloadResponse { device }
            | Topic::Enroll { device }
            | Topic::EnrollAnswer { device }
            | Topic::Ack { device }
            | Topic::CommandReply { device } => Some(device),
            Topic::Deploy(DeployTopic::GroupManifest { .. } | DeployTopic::GroupChunk { .. })
            | Topic::GroupFlRound { .. }
            | Topic::OffloadCapacity { .. }
            | Topic::CoordinatorStatus => None,
        }
    }

    /// The topic string (what [`Topic::parse`] reads back).
    pub fn to_topic(&self) -> String {
        match self {
            Topic::Device(DeviceTopic::Status { device }) => status(device),
            Topic::Device(DeviceTopic::Register { device }) => register(device),
            Topic::Device(DeviceTopic::Telemetry { device }) => telemetry(device),
            Topic::Device(DeviceTopic::Data { device, stream }) => data(device, stream),
            Topic::Device(DeviceTopic::Cmd { device, name }) => cmd(device, name),
            Topic::Deploy(DeployTopic::Manifest { device }) => deploy_manifest(device),
            Topic::Deploy(DeployTopic::Chunk { device }) => deploy_chunk(device),
            Topic::Deploy(DeployTopic::Status { device }) => deploy_status(device),
            Topic::Deploy(DeployTopic::Resend { device }) => deploy_resend(device),
            Topic::Deploy(DeployTopic::GroupManifest { group }) => group_deploy_manifest(group),
            Topic::Deploy(DeployTopic::GroupChunk { group }) => group_deploy_chunk(group),
            Topic::FlRound { device } => fl_round(device),
            Topic::GroupFlRound { group } => group_fl_round(group),
            Topic::FlChunk { device } => fl_chunk(device),
            Topic::FlUpdate { device } => fl_update(device),
            Topic::OffloadRequest { device } => offload_request(device),
            Topic::OffloadResponse { device } => offload_response(device),
            Topic::OffloadCapacity { replica } => offload_capacity(replica),
            Topic::CoordinatorStatus => status(COORDINATOR),
            Topic::Enroll { device } => enroll(device),
            Topic::EnrollAnswer { device } => enroll_answer(device),
            Topic::Ack { device } => ack(device),
            Topic::CommandReply { device } => reply(device),
        }
    }
}

#[cfg(test)]
mod topic_tests {
    use super::*;

    fn every_kind() -> Vec<Topic> {
        let d = || "pi-1".to_owned();
        vec![
            Topic::Device(DeviceTopic::Status { device: d() }),
            Topic::Device(DeviceTopic::Register { device: d() }),
            Topic::Device(DeviceTopic::Telemetry { device: d() }),
            Topic::Device(DeviceTopic::Data {
                device: d(),
                stream: "vib/alerts".into(),
            }),
            Topic::Device(DeviceTopic::Cmd {
                device: d(),
                name: "logs".into(),
            }),
            Topic::Deploy(DeployTopic::Manifest { device: d() }),
            Topic::Deploy(DeployTopic::Chunk { device: d() }),
            Topic::Deploy(DeployTopic::Status { device: d() }),
            Topic::Deploy(DeployTopic::Resend { device: d() }),
            Topic::Deploy(DeployTopic::GroupManifest {
                group: "lab".into(),
            }),
            Topic::Deploy(DeployTopic::GroupChunk {
                group: "lab".into(),
            }),
            Topic::FlRound { device: d() },
            Topic::GroupFlRound {
                group: "lab".into(),
            },
            Topic::FlChunk { device: d() },
            Topic::FlUpdate { device: d() },
            Topic::OffloadRequest { device: d() },
            Topic::OffloadResponse { device: d() },
            Topic::OffloadCapacity {
                replica: "r1".into(),
            },
            Topic::CoordinatorStatus,
            Topic::Enroll { device: d() },
            Topic::EnrollAnswer { device: d() },
            Topic::Ack { device: d() },
            Topic::CommandReply { device: d() },
        ]
    }

    #[test]
    fn every_topic_reads_back_as_itself() {
        for t in every_kind() {
            assert_eq!(
                Topic::parse(&t.to_topic()),
                Some(t.clone()),
                "{}",
                t.to_topic()
            );
        }
    }

    #[test]
    fn echoes_are_what_the_coordinator_publishes() {
        let from_devices: Vec<String> = every_kind()
            .into_iter()
            .filter(|t| !t.from_coordinator())
            .map(|t| t.to_topic())
            .collect();
        assert_eq!(
            from_devices,
            [
                "edge/v1/pi-1/status",
                "edge/v1/pi-1/register",
                "edge/v1/pi-1/telemetry",
                "edge/v1/pi-1/data/vib/alerts",
                "edge/v1/pi-1/deploy/status",
                "edge/v1/pi-1/deploy/resend",
                "edge/v1/pi-1/fl/update",
                "edge/v1/pi-1/offload/request",
                "edge/v1/pi-1/enroll",
                "edge/v1/pi-1/reply",
            ]
        );
    }

    #[test]
    fn a_group_recipient_is_never_a_device() {
        assert_eq!(recipient_group(&group_recipient("lab")), Some("lab"));
        assert!(validate_device_id(&group_recipient("lab")).is_err());
        for field in ["lab", "group", "group/", "group/a/b", "groups/lab"] {
            assert_eq!(recipient_group(field), None, "{field}");
        }
        assert_eq!(
            Topic::parse("edge/v1/group/a/b/fl/round"),
            None,
            "an invalid group"
        );
    }

    #[test]
    fn reserved_names_and_strangers_are_refused() {
        for t in [
            "edge/v1/coordinator/telemetry",
            "edge/v1/group/fl/update",
            "edge/v1/coordinator/fl/round",
            "edge/v1/a/b/fl/round",
            "edge/v1/pi-1/fl/other",
            "edge/v1/coordinator/offload/a/b",
            "edge/v2/pi-1/status",
            "edge/v1/pi-1/data/",
            "edge/v1/pi 1/status",
            "",
        ] {
            assert_eq!(Topic::parse(t), None, "{t}");
        }
    }
}
