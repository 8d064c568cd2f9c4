//! The scenario file: what fleet to simulate and what goes wrong in it. Parsed once at start;
//! every field has a default except the groups, so a scenario names only what it changes.
//!
//! **Invariant:** which devices fail health is a pure function of the scenario (no randomness),
//! so a test can reason about which wave holds a failing device. **Boundary:** read by
//! [`crate::run`]; the `[agent]` table is handed to the agent's own config parser unchanged.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("scenario {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("scenario {path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
}

/// A whole scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// The simulated fleet: its groups and how devices behave.
    pub fleet: Fleet,
    /// Agent config keys every simulated device starts from (as in `edge-agent`'s config file),
    /// e.g. `[agent.mqtt] url` and `[agent.deploy] trusted_keys`. The simulator sets
    /// `device.id`, `state_dir` and `telemetry.interval_s` per device; `[enrollment]
    /// claim_key_file` comes from the device's group.
    #[serde(default)]
    pub agent: toml::Table,
    /// Which devices' new deployments fail their health check.
    #[serde(default)]
    pub health: HealthRule,
    /// Devices restarting while the scenario runs.
    #[serde(default)]
    pub churn: Churn,
    /// Federated learning: devices take part in rounds with a synthetic trainer.
    #[serde(default)]
    pub fl: Option<FlSection>,
    /// Rogue clients on the same broker: `edge-attacker` attacks, and `replay`.
    #[serde(default)]
    pub rogue: Vec<Rogue>,
    /// Link profiles: devices whose uplink goes through a shaping proxy. The first profile
    /// naming a device applies to it.
    #[serde(default)]
    pub link: Vec<LinkProfile>,
    /// How long the run lasts and where its results go.
    #[serde(default)]
    pub run: RunSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// Device groups; the fleet is their devices together, in this order.
    pub group: Vec<Group>,
    /// Seconds between telemetry samples of each device; 0 turns telemetry off.
    #[serde(default = "default_telemetry")]
    pub telemetry_interval_s: u64,
    /// Devices started per second (connection ramp), so the broker and the coordinator see
    /// a fleet coming online rather than a synchronised burst; 0 starts all at once.
    #[serde(default = "default_ramp")]
    pub start_per_second: u32,
    /// Where each device's outbox keeps its records: `memory` (the agent's outbox logic over
    /// records in memory: no file, no thread; a reboot keeps them, a power cut loses them) or
    /// `disk` (the agent's own sled store and write-ahead log under the device's state folder,
    /// about 3 file descriptors and a thread per device).
    #[serde(default)]
    pub outbox: OutboxStore,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxStore {
    #[default]
    Memory,
    Disk,
}

/// Devices enrolled with one claim key (the coordinator assigns the key's groups).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Prefix of the device ids: `NAME-00042`. Also the label in the results.
    pub name: String,
    /// How many devices.
    pub devices: u32,
    /// The fleet claim key these devices enroll with (`[enrollment] claim_key_file`); relative
    /// paths are resolved against the scenario file's folder.
    pub claim_key_file: PathBuf,
}

/// Which candidates fail their health check. A device fails when it is one of the failing
/// fraction and the candidate's pipeline is named in `pipelines` (or `pipelines` is empty).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthRule {
    /// Fraction of each group's devices, 0..=1, spread evenly over the group (with 0.1, every
    /// tenth device: indices 9, 19, 29, ...).
    #[serde(default)]
    pub fail_fraction: f64,
    /// Pipeline names whose candidates fail on those devices; empty: every candidate.
    #[serde(default)]
    pub pipelines: Vec<String>,
    /// Seconds a failing candidate runs (processing nothing) before it fails: a version that
    /// hangs a while and then breaks, rather than at once.
    #[serde(default)]
    pub fail_after_s: f64,
}

impl HealthRule {
    /// Whether device `index` of its group is one of the failing fraction.
    pub fn fails(&self, index: u32) -> bool {
        let f = self.fail_fraction.clamp(0.0, 1.0);
        // Evenly spread: device i fails when the running total floor((i+1)f) steps up at i.
        let before = (f64::from(index) * f).floor();
        let after = (f64::from(index + 1) * f).floor();
        after > before
    }

    /// Whether a candidate named `pipeline` fails on a failing device.
    pub fn applies_to(&self, pipeline: &str) -> bool {
        self.pipelines.is_empty() || self.pipelines.iter().any(|p| p == pipeline)
    }
}

/// Federated learning on simulated devices. Each device runs the agent's own round handling
/// (admission, signature and replay checks, update encoding, outbox) with a synthetic trainer
/// in place of the WASM module: it nudges the weights it is given and returns them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlSection {
    /// The model's name as the task names it (`model = ...` in the coordinator's task file).
    pub model: String,
    /// The ONNX file the devices "serve" (the task's initial model); relative to the scenario.
    pub model_file: PathBuf,
    /// Synthetic labeled samples per device (features: `inputs` zeros, labels 0..10).
    #[serde(default = "default_samples")]
    pub samples: u32,
    /// Features per sample: the model's input width.
    #[serde(default = "default_inputs")]
    pub inputs: u32,
    /// Fraction of devices that never answer a round (their training never finishes).
    #[serde(default)]
    pub dropout_fraction: f64,
    /// Fraction of devices that answer late, after `straggler_delay_s`.
    #[serde(default)]
    pub straggler_fraction: f64,
    #[serde(default = "default_straggler_delay")]
    pub straggler_delay_s: f64,
}

/// What a device does when ordered to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlRole {
    Prompt,
    Straggler,
    Dropout,
}

impl FlSection {
    /// Dropouts are the first `dropout_fraction` of every hundred devices (by index), then the
    /// stragglers: deterministic, so a test knows who answers.
    pub fn role(&self, index: u32) -> FlRole {
        let p = f64::from(index % 100) / 100.0;
        if p < self.dropout_fraction {
            FlRole::Dropout
        } else if p < self.dropout_fraction + self.straggler_fraction {
            FlRole::Straggler
        } else {
            FlRole::Prompt
        }
    }
}

fn default_samples() -> u32 {
    32
}

fn default_inputs() -> u32 {
    64
}

fn default_straggler_delay() -> f64 {
    5.0
}

/// One attack by a rogue client once the whole fleet has started: `replay DEVICE` (the
/// simulator records one of the device's sealed messages off the broker and publishes it
/// again), or `edge-attacker PORT ATTACK ARGS..` (the security tests' attacker: it holds none
/// of the fleet's keys): `impersonate DEVICE`, `flood DEVICE N`, `forge-status DEVICE ID VER`,
/// `forge-chunk DEVICE N`, `forge-update DEVICE N`, `sybil N`, `enroll-as DEVICE`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rogue {
    /// The attack and its arguments, as `edge-attacker` takes them after the port.
    pub attack: Vec<String>,
    /// Seconds after the fleet started.
    #[serde(default)]
    pub at_s: f64,
}

/// A link profile (`[[link]]`): delay, bandwidth, outages and forced disconnects on the
/// uplinks of the devices it names (see [`crate::link`]). Plain `mqtt://` brokers only.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkProfile {
    /// Device ids this profile applies to.
    #[serde(default)]
    pub devices: Vec<String>,
    /// ... and this fraction of each group's devices, 0..=1, spread evenly as
    /// `[health] fail_fraction` is (with 0.1: indices 9, 19, ...).
    #[serde(default)]
    pub fraction: f64,
    /// One-way delay added to every byte, both directions, milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
    /// Bandwidth cap per direction, kilobits per second; 0: none.
    #[serde(default)]
    pub bandwidth_kbps: u64,
    /// Period of the outages, seconds; 0: no outages.
    #[serde(default)]
    pub outage_every_s: f64,
    /// Length of each outage (at the end of each period), seconds.
    #[serde(default)]
    pub outage_s: f64,
    /// Forced disconnects of a live connection per minute (exponential gaps); 0: none.
    #[serde(default)]
    pub disconnects_per_minute: f64,
}

impl LinkProfile {
    /// Whether the profile applies to device `id`, number `index` of its group.
    pub fn applies(&self, id: &str, index: u32) -> bool {
        let spread = HealthRule {
            fail_fraction: self.fraction,
            ..HealthRule::default()
        };
        self.devices.iter().any(|d| d == id) || spread.fails(index)
    }
}

/// Restarts while the scenario runs, each on a device picked at random.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    /// Clean reboots per minute across the fleet: the device stops (its outbox made durable)
    /// and starts again from the same state, outbox kept.
    #[serde(default)]
    pub reboots_per_minute: f64,
    /// Power cuts per minute across the fleet: the device stops and loses its outbox (the
    /// outbox files are deleted before it starts again); identity and deployments stay.
    #[serde(default)]
    pub power_cuts_per_minute: f64,
    /// Seconds a device stays down before it starts again.
    #[serde(default = "default_down")]
    pub down_s: f64,
    /// Seed of the churn's random choices.
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Seconds to run before stopping; 0 runs until SIGINT or SIGTERM.
    #[serde(default)]
    pub duration_s: u64,
    /// Where devices keep their state; empty: a fresh folder under /dev/shm (tmpfs) when it
    /// exists, else the system's temporary folder. Removed at the end unless `keep_state`.
    #[serde(default)]
    pub state_dir: PathBuf,
    /// Keep the devices' state folders after the run.
    #[serde(default)]
    pub keep_state: bool,
    /// Where the results go (`devices.csv`, `timeline.csv`, `result.json`); `--out` overrides.
    #[serde(default)]
    pub out_dir: PathBuf,
    /// This process runs shard `.0` of `.1` (`edge-sim --shard I/N`): the devices whose
    /// position in the fleet is I modulo N, at 1/N of the ramp and churn rates; rogues run in
    /// shard 0 only. One process holds about two file descriptors per device (its MQTT socket
    /// and its state database), so fleets beyond the open-file limit run as several shards.
    #[serde(skip)]
    pub shard: Shard,
}

/// Shard `index` of `count` (see [`RunSection::shard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Shard, String> {
        let bad = || format!("shard {s:?}: expected I/N with I < N, e.g. 0/2");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

fn default_telemetry() -> u64 {
    30
}

fn default_ramp() -> u32 {
    200
}

fn default_down() -> f64 {
    2.0
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut s = Scenario::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(fl) = &mut s.fl
            && fl.model_file.is_relative()
        {
            fl.model_file = base.join(&fl.model_file);
        }
        for g in &mut s.fleet.group {
            if g.claim_key_file.is_relative() {
                g.claim_key_file = base.join(&g.claim_key_file);
            }
        }
        Ok(s)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |field, reason: &str| ScenarioError::Invalid {
            path: path.to_owned(),
            field,
            reason: reason.to_owned(),
        };
        if s.fleet.group.is_empty() {
            return Err(invalid("fleet.group", "at least one group"));
        }
        for g in &s.fleet.group {
            if g.name.is_empty() || g.name.contains(['/', '+', '#', ' ']) {
                return Err(invalid(
                    "fleet.group.name",
                    "a non-empty name without '/', '+', '#' or spaces",
                ));
            }
        }
        if !(0.0..=1.0).contains(&s.health.fail_fraction) {
            return Err(invalid("health.fail_fraction", "between 0 and 1"));
        }
        if s.churn.reboots_per_minute < 0.0 || s.churn.power_cuts_per_minute < 0.0 {
            return Err(invalid("churn", "rates are not negative"));
        }
        if let Some(fl) = &s.fl {
            let (d, st) = (fl.dropout_fraction, fl.straggler_fraction);
            if !(0.0..=1.0).contains(&d) || !(0.0..=1.0).contains(&st) || d + st > 1.0 {
                return Err(invalid(
                    "fl",
                    "dropout_fraction and straggler_fraction are fractions adding up to at most 1",
                ));
            }
        }
        for r in &s.rogue {
            if r.attack.is_empty() {
                return Err(invalid("rogue.attack", "an attack name and its arguments"));
            }
            if r.attack[0] == "replay" && r.attack.len() != 2 {
                return Err(invalid("rogue.attack", "replay takes one device id"));
            }
        }
        for l in &s.link {
            if !(0.0..=1.0).contains(&l.fraction) {
                return Err(invalid("link.fraction", "between 0 and 1"));
            }
            if l.outage_every_s < 0.0
                || l.outage_s < 0.0
                || l.outage_s > l.outage_every_s
                || l.disconnects_per_minute < 0.0
            {
                return Err(invalid(
                    "link",
                    "outage_s between 0 and outage_every_s, rates not negative",
                ));
            }
        }
        for key in ["state_dir", "device"] {
            if s.agent.contains_key(key) {
                return Err(invalid("agent", "state_dir and device are set per device"));
            }
        }
        Ok(s)
    }

    /// The devices this process runs (all of them unless sharded): (group index, index in
    /// the group, id).
    pub fn devices(&self) -> Vec<(usize, u32, String)> {
        let Shard { index, count } = self.run.shard;
        let mut out = Vec::new();
        let mut position = 0u32;
        for (gi, g) in self.fleet.group.iter().enumerate() {
            for i in 0..g.devices {
                if position % count == index {
                    out.push((gi, i, format!("{}-{i:05}", g.name)));
                }
                position += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_fraction_is_spread_evenly_and_exact() {
        let rule = HealthRule {
            fail_fraction: 0.1,
            ..HealthRule::default()
        };
        let failing: Vec<u32> = (0..100).filter(|i| rule.fails(*i)).collect();
        assert_eq!(failing.len(), 10);
        assert_eq!(&failing[..3], &[9, 19, 29]);
        let none = HealthRule::default();
        assert!(!(0..100).any(|i| none.fails(i)));
        let all = HealthRule {
            fail_fraction: 1.0,
            pipelines: vec!["bad".into()],
            fail_after_s: 0.0,
        };
        assert!((0..10).all(|i| all.fails(i)));
        assert!(all.applies_to("bad") && !all.applies_to("good"));
    }

    #[test]
    fn example_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("scenarios folder") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(!s.devices().is_empty());
                seen += 1;
            }
        }
        assert!(seen > 0);
    }

    #[test]
    fn refuses_unknown_keys_and_per_device_agent_keys() {
        let p = Path::new("t.toml");
        let base = "[fleet]\n[[fleet.group]]\nname = \"a\"\ndevices = 2\nclaim_key_file = \"k\"\n";
        assert!(Scenario::parse(base, p).is_ok());
        assert!(Scenario::parse(&format!("{base}[health]\nfraction = 0.1\n"), p).is_err());
        assert!(Scenario::parse(&format!("{base}[agent.device]\nid = \"x\"\n"), p).is_err());
        let fl = format!(
            "{base}[fl]\nmodel = \"m\"\nmodel_file = \"m.onnx\"\ndropout_fraction = 0.3\nstraggler_fraction = 0.2\n"
        );
        let s = Scenario::parse(&fl, p).expect("parses");
        let f = s.fl.expect("fl section");
        let roles: Vec<FlRole> = (0..100).map(|i| f.role(i)).collect();
        assert_eq!(roles.iter().filter(|r| **r == FlRole::Dropout).count(), 30);
        assert_eq!(
            roles.iter().filter(|r| **r == FlRole::Straggler).count(),
            20
        );
        assert_eq!(f.role(129), FlRole::Dropout);
        assert_eq!(f.role(130), FlRole::Straggler);
        assert_eq!(f.role(150), FlRole::Prompt);
        let ids = Scenario::parse(base, p).expect("parses").devices();
        assert_eq!(ids[1].2, "a-00001");
        let mut sharded = Scenario::parse(base, p).expect("parses");
        sharded.run.shard = "1/2".parse().expect("shard");
        let ids: Vec<String> = sharded.devices().into_iter().map(|d| d.2).collect();
        assert_eq!(ids, ["a-00001"]);
        assert!("2/2".parse::<Shard>().is_err() && "x".parse::<Shard>().is_err());
    }
}
