//! Shared by the coordinator's integration tests: a `serve` process on a free loopback port
//! with its state dir and log in a temp dir, stopped with SIGTERM and checked, killed on drop;
//! and a device's side of enrollment and message authentication ([`DeviceAuth`]), since the
//! coordinator drops everything a device that is not enrolled sends.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use protocol::v1::auth::{self, Identity, PublicIdentity, Rule, SessionKeys, Stamp};
use protocol::v1::deploy::{SigningKey, VerifyingKey, public_key_hex};
use protocol::v1::enroll::{self, Decision, EnrollRequest, Hardware};
use protocol::v1::topics::{self, Topic};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use sha2::Digest;

pub const TIMEOUT: Duration = Duration::from_secs(60);
pub const POLL: Duration = Duration::from_millis(20);

/// The coordinator process; killed on drop so a failing test leaks nothing.
pub struct Coordinator {
    pub child: Child,
    pub log: PathBuf,
    pub state: PathBuf,
}

impl Coordinator {
    /// `serve` with the embedded broker on a free port, state in `dir/state`, and the test
    /// claim keys ([`enrollment_toml`]).
    pub fn start(dir: &Path) -> Coordinator {
        let state = dir.join("state");
        let config = dir.join("enrollment.toml");
        std::fs::write(&config, enrollment_toml()).expect("config written");
        let args = [
            "serve".into(),
            "--config".into(),
            config.into_os_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--state-dir".into(),
            state.clone().into_os_string(),
        ];
        Self::spawn(dir, &args, state)
    }

    /// `serve --config CONFIG`, whose state dir is `state`.
    pub fn start_with_config(dir: &Path, config: &Path, state: PathBuf) -> Coordinator {
        let args = [
            "serve".into(),
            "--config".into(),
            config.as_os_str().to_owned(),
        ];
        Self::spawn(dir, &args, state)
    }

    fn spawn(dir: &Path, args: &[std::ffi::OsString], state: PathBuf) -> Coordinator {
        let log = dir.join(format!("coordinator-{}.log", protocol::v1::now_ms()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_edge-coordinator"))
            .args(args)
            .env("RUST_LOG", "debug,rumqttd=warn,sled=info")
            // The HTTP API on a free port: tests run coordinators side by side.
            .env("EDGE_COORDINATOR_API_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("coordinator starts");
        Coordinator { child, log, state }
    }

    pub fn journal_path(&self) -> PathBuf {
        self.state.join("journal.jsonl")
    }

    /// SIGTERM, then the exit status (must be 0).
    pub fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill failed");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(exit) = self.child.try_wait().expect("wait") {
                assert!(
                    exit.success(),
                    "coordinator exited with {exit}; log:\n{}",
                    self.log_text()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "coordinator did not stop; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(POLL);
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Coordinator {
    /// Waits for the journal's first `ready` line and returns the broker's port.
    pub fn wait_ready_port(&self) -> u16 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let text = std::fs::read_to_string(self.journal_path()).unwrap_or_default();
            let port = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| l["event"] == "ready")
                .and_then(|l| l["broker"].as_str().map(str::to_owned))
                .and_then(|u| u.rsplit(':').next().and_then(|p| p.parse().ok()));
            if let Some(port) = port {
                return port;
            }
            assert!(
                Instant::now() < deadline,
                "coordinator not ready; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(POLL);
        }
    }
}

/// The group sets the test claim keys stand for: a device enrolls with the claim key of its
/// groups ([`claim_key`]) and is accepted at once in those groups.
pub const CLAIM_GROUPS: &[&[&str]] = &[&[], &["lab"], &["fleet"], &["fl"]];

/// The fleet claim key for a set of groups (one of [`CLAIM_GROUPS`]).
pub fn claim_key(groups: &[&str]) -> SigningKey {
    assert!(
        CLAIM_GROUPS.contains(&groups),
        "no test claim key for groups {groups:?}"
    );
    let seed: [u8; 32] = sha2::Sha256::digest(format!("test claim {}", groups.join(","))).into();
    SigningKey::from_bytes(&seed)
}

/// An `[enrollment]` section listing a claim key for each of [`CLAIM_GROUPS`].
pub fn enrollment_toml() -> String {
    let mut text = String::from("[enrollment]\nmode = \"claim\"\n");
    for groups in CLAIM_GROUPS {
        text.push_str(&format!(
            "[[enrollment.claims]]\nkey = \"{}\"\ngroups = {groups:?}\n",
            public_key_hex(&claim_key(groups).verifying_key())
        ));
    }
    text
}

/// The coordinator's public identity, as `edge-coordinator identity` prints it.
pub fn coordinator_identity(state: &Path) -> PublicIdentity {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-coordinator"))
        .args(["identity", "--state-dir"])
        .arg(state)
        .output()
        .expect("identity runs");
    assert!(
        out.status.success(),
        "identity: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one json line")
}

/// Epochs for [`DeviceAuth`]: each enrollment (a connection, here) numbers its messages in a
/// new, higher epoch, as an agent does at every start.
static EPOCH: AtomicU64 = AtomicU64::new(0);

fn next_epoch() -> u64 {
    EPOCH.fetch_max(protocol::v1::now_ms() << 10, Ordering::SeqCst);
    EPOCH.fetch_add(1, Ordering::SeqCst) + 1
}

/// A device's side of message authentication, as the agent keeps it after enrollment.
pub struct DeviceAuth {
    pub device: String,
    pub identity: Identity,
    /// Named (and signed) by the answer.
    pub coordinator: PublicIdentity,
    pub keys: SessionKeys,
    /// Groups the answer gave the device.
    pub groups: Vec<String>,
    epoch: u64,
    counter: AtomicU64,
}

impl DeviceAuth {
    /// Enrolls `device` through the broker at `port` with the claim key of `groups` and waits
    /// for the accepted answer. The device key is derived from the id, so enrolling the same
    /// id again is the same device (the coordinator answers again, in the groups it first
    /// gave), with a new epoch.
    pub fn enroll(port: u16, device: &str, groups: &[&str]) -> Arc<DeviceAuth> {
        let identity = device_identity(device);
        let claim = claim_key(groups);
        let request = EnrollRequest {
            v: protocol::v1::VERSION,
            device: device.into(),
            identity: identity.public(),
            hardware: Hardware {
                arch: "x86_64".into(),
                os: "linux".into(),
                board: "test".into(),
                accelerators: Vec::new(),
                agent_version: "0.1.0".into(),
            },
            claim_key: Some(public_key_hex(&claim.verifying_key())),
            issued_ms: protocol::v1::now_ms(),
        };
        let bytes = enroll::seal_request(&request, &identity, Some(&claim));
        let mut options = MqttOptions::new(
            format!("enroll-{device}-{}", next_epoch()),
            "127.0.0.1",
            port,
        );
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true);
        let (client, mut connection) = Client::new(options, 16);
        let answer_topic = topics::enroll_answer(device);
        client
            .subscribe(answer_topic.clone(), QoS::AtLeastOnce)
            .expect("subscribe queued");
        client
            .publish(topics::enroll(device), QoS::AtLeastOnce, false, bytes)
            .expect("request queued");
        let deadline = Instant::now() + TIMEOUT;
        let answer = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match connection.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == answer_topic => {
                    match enroll::open_answer(device, &p.payload, &identity.public(), None) {
                        Ok(a) if a.decision == Decision::Accepted => break a,
                        Ok(a) => {
                            panic!("{device}: enrollment {}: {}", a.decision.as_str(), a.reason)
                        }
                        Err(e) => panic!("{device}: enrollment answer does not verify: {e}"),
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{device}: enrollment connection: {e}"),
                Err(_) => panic!("{device}: no enrollment answer within {TIMEOUT:?}"),
            }
        };
        let _ = client.disconnect();
        let keys = identity
            .session_keys(
                &answer.coordinator,
                device,
                &identity.public(),
                &answer.coordinator,
            )
            .expect("session keys");
        Arc::new(DeviceAuth {
            device: device.to_owned(),
            identity,
            coordinator: answer.coordinator,
            keys,
            groups: answer.groups,
            epoch: next_epoch(),
            counter: AtomicU64::new(0),
        })
    }

    /// `payload` with the trailer the agent's uplink puts on `topic`: the `up` MAC, the
    /// status counter for the status and the will, the next counter for everything else.
    pub fn seal(&self, topic: &str, payload: &[u8]) -> Vec<u8> {
        let status = Topic::parse(topic).is_some_and(|t| t.auth_rule() == Rule::DeviceStatus);
        let counter = if status {
            auth::STATUS_COUNTER
        } else {
            self.counter.fetch_add(1, Ordering::SeqCst) + 1
        };
        self.keys.up.seal(
            topic,
            payload,
            Stamp {
                epoch: self.epoch,
                counter,
            },
        )
    }

    /// The body of a message the coordinator sent on `topic`: its `down` MAC or its signature
    /// checked and the trailer removed; deployments and round messages as they are.
    pub fn open(&self, topic: &str, bytes: &[u8]) -> Vec<u8> {
        if bytes.is_empty() {
            return Vec::new();
        }
        match Topic::parse(topic).map(|t| t.auth_rule()) {
            Some(Rule::CoordinatorMac) => self
                .keys
                .down
                .open(topic, bytes)
                .unwrap_or_else(|e| panic!("{topic}: {e}"))
                .0
                .to_vec(),
            Some(Rule::CoordinatorSigned) => self
                .coordinator
                .open(topic, bytes)
                .unwrap_or_else(|e| panic!("{topic}: {e}"))
                .0
                .to_vec(),
            _ => bytes.to_vec(),
        }
    }

    /// The key FL round messages verify with.
    pub fn coordinator_key(&self) -> VerifyingKey {
        self.coordinator.verifying_key().expect("coordinator key")
    }
}

/// A device identity derived from the id (tests only: a real device's key is random).
fn device_identity(device: &str) -> Identity {
    let mut bytes = [0u8; 64];
    bytes[..32].copy_from_slice(&sha2::Sha256::digest(format!("sign {device}")));
    bytes[32..].copy_from_slice(&sha2::Sha256::digest(format!("agree {device}")));
    Identity::from_bytes(&bytes).expect("64 bytes")
}
