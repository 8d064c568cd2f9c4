//! Staged rollouts (`deploy --strategy canary`): which devices of a group get the new version
//! when, and when to stop. Pure: the engine passes the time and the per-device progress, and
//! turns the returned [`Decision`]s into publishes and journal lines.
//!
//! The rules:
//! - the group's members are split into waves: a canary (`--canary`, N devices or P percent of
//!   the members) first, then batches (`--batch`, N or P percent), in member order; a device
//!   that joins the group during the rollout goes into the next wave;
//! - a wave's devices get the signed group manifest on their own manifest topic (retained);
//!   devices outside the launched waves never see it;
//! - a wave passes its health gate when each of its devices reported a final step for this
//!   version, or when `--wave-timeout-secs` passed since it started (devices still silent then
//!   are not failures, but stay in the rollout until they report or the manifest expires);
//! - after the gate the rollout soaks for `--soak-secs` (failures reported meanwhile still
//!   count), then launches the next wave; a paused rollout launches nothing;
//! - failures are devices that reported rolled back, failed or rejected for this version,
//!   counted over every launched wave; more than `--max-failures` (a count, or a percent of
//!   the group's members) halts the rollout at once, paused or not, and the devices already
//!   updated (healthy, or still on their way) are rolled back: they get the rollback
//!   deployment, the previous pipeline signed at the next version by `deploy`;
//! - `rollout abort` halts the same way; `rollout pause` / `resume` stop and restart waves.
//!
//! Prior art: Eclipse hawkBit's cascaded rollout groups with an error threshold that stops the
//! rollout (hawkBit documentation, "Rollout Management").

use serde::{Deserialize, Serialize};

use super::rollout::Rollout;
use protocol::v1::deploy::Step;

/// A number of devices, or a percentage of the group.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    Count(u32),
    Percent(f64),
}

/// Why an amount given on the command line does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither a device count (5) nor a percentage (10%)")]
pub struct AmountError(String);

impl std::str::FromStr for Amount {
    type Err = AmountError;
    fn from_str(s: &str) -> Result<Amount, AmountError> {
        let bad = || AmountError(s.to_owned());
        match s.trim().strip_suffix('%') {
            Some(p) => {
                let p: f64 = p.trim().parse().map_err(|_| bad())?;
                if !(0.0..=100.0).contains(&p) {
                    return Err(bad());
                }
                Ok(Amount::Percent(p))
            }
            None => s.trim().parse().map(Amount::Count).map_err(|_| bad()),
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Amount {
    /// Devices of `total` for a wave: a percentage rounds up, and a wave has at least one.
    pub fn wave_size(self, total: usize) -> usize {
        let n = match self {
            Amount::Count(n) => n as usize,
            Amount::Percent(p) => (total as f64 * p / 100.0).ceil() as usize,
        };
        n.max(1)
    }

    /// Failures of `total` allowed: a percentage rounds down.
    pub fn allowed(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n as usize,
            Amount::Percent(p) => (total as f64 * p / 100.0).floor() as usize,
        }
    }
}

/// The operator's choices, spooled by `deploy` beside the package (`strategy.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    pub canary: Amount,
    pub batch: Amount,
    pub soak_ms: u64,
    pub wave_timeout_ms: u64,
    pub max_failures: Amount,
    /// The deployment id of the rollback package spooled with it.
    pub rollback_id: String,
}

/// Where a staged rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Phase {
    Running,
    /// Rolling the updated devices back; no wave starts again.
    Halted {
        reason: String,
    },
}

/// The persisted state of a staged rollout (in the progress file, so a restarted coordinator
/// goes on where it was).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Waves {
    pub strategy: Strategy,
    /// Launched waves, in order; the last is the current one.
    pub waves: Vec<Vec<String>>,
    /// Members not launched yet, in the order they would be (after a halt: never updated).
    pub pending: Vec<String>,
    /// Coordinator clock when the current wave started.
    pub wave_started_ms: u64,
    /// When the current wave passed its gate (its soak started).
    pub gate_passed_ms: Option<u64>,
    pub paused: bool,
    pub phase: Phase,
    /// Group size the percentages were taken of (members at the start, plus joiners).
    pub total: usize,
}

/// What the engine must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send the manifest to these devices (wave `wave`, 0 is the canary).
    Launch { wave: usize, devices: Vec<String> },
    /// The current wave passed its gate; its soak starts.
    GatePassed {
        wave: usize,
        healthy: usize,
        failed: usize,
        silent: usize,
    },
    /// Stop and roll back the updated devices.
    Halt { reason: String, failures: usize },
}

/// A device's step for the rollout's version counts as a failure.
pub fn is_failure(step: Option<&Step>) -> bool {
    matches!(
        step,
        Some(Step::RolledBack { .. } | Step::Failed { .. } | Step::Rejected { .. })
    )
}

impl Waves {
    /// A new staged rollout over `members` (in order); nothing launched until [`Waves::step`].
    pub fn new(strategy: Strategy, members: Vec<String>, now_ms: u64) -> Waves {
        Waves {
            strategy,
            total: members.len(),
            waves: Vec::new(),
            pending: members,
            wave_started_ms: now_ms,
            gate_passed_ms: None,
            paused: false,
            phase: Phase::Running,
        }
    }

    pub fn is_halted(&self) -> bool {
        matches!(self.phase, Phase::Halted { .. })
    }

    pub fn is_launched(&self, device: &str) -> bool {
        self.waves.iter().flatten().any(|d| d == device)
    }

    /// A member that joined the group: it goes into the next wave.
    pub fn join(&mut self, device: &str) -> bool {
        if self.is_halted() || self.is_launched(device) || self.pending.iter().any(|d| d == device)
        {
            return false;
        }
        self.pending.push(device.to_owned());
        self.total += 1;
        true
    }

    /// Failures so far over every launched wave.
    pub fn failures(&self, rollout: &Rollout) -> usize {
        self.waves
            .iter()
            .flatten()
            .filter(|d| is_failure(rollout.progress(d).and_then(|p| p.last.as_ref())))
            .count()
    }

    /// Halts the rollout (an operator's abort); nothing if it is halted already.
    pub fn halt(&mut self, reason: String) -> Option<Decision> {
        if self.is_halted() {
            return None;
        }
        self.phase = Phase::Halted {
            reason: reason.clone(),
        };
        Some(Decision::Halt {
            reason,
            failures: 0,
        })
    }

    /// What to do now, given every device's progress. Call after each status report and on
    /// every tick.
    pub fn step(&mut self, rollout: &Rollout, now_ms: u64) -> Vec<Decision> {
        if self.is_halted() {
            return Vec::new();
        }
        let failures = self.failures(rollout);
        let allowed = self.strategy.max_failures.allowed(self.total);
        if failures > allowed {
            let reason = format!(
                "{failures} of {} devices failed, over --max-failures {} ({allowed} allowed)",
                self.total, self.strategy.max_failures
            );
            self.phase = Phase::Halted {
                reason: reason.clone(),
            };
            return vec![Decision::Halt { reason, failures }];
        }
        let mut out = Vec::new();
        if let Some(current) = self.waves.last()
            && self.gate_passed_ms.is_none()
        {
            let steps: Vec<Option<&Step>> = current
                .iter()
                .map(|d| rollout.progress(d).and_then(|p| p.last.as_ref()))
                .collect();
            let final_count = steps
                .iter()
                .filter(|s| s.is_some_and(Step::is_final))
                .count();
            let timed_out = now_ms >= self.wave_started_ms + self.strategy.wave_timeout_ms;
            if final_count == current.len() || timed_out {
                self.gate_passed_ms = Some(now_ms);
                let healthy = steps
                    .iter()
                    .filter(|s| matches!(s, Some(Step::Healthy)))
                    .count();
                let failed = steps.iter().filter(|s| is_failure(**s)).count();
                out.push(Decision::GatePassed {
                    wave: self.waves.len() - 1,
                    healthy,
                    failed,
                    silent: current.len() - final_count,
                });
            }
        }
        let soaked = match (self.waves.is_empty(), self.gate_passed_ms) {
            (true, _) => true,
            (false, Some(at)) => now_ms >= at + self.strategy.soak_ms,
            (false, None) => false,
        };
        if soaked && !self.paused && !self.pending.is_empty() {
            let size = if self.waves.is_empty() {
                self.strategy.canary.wave_size(self.total)
            } else {
                self.strategy.batch.wave_size(self.total)
            };
            let devices: Vec<String> = self.pending.drain(..size.min(self.pending.len())).collect();
            self.waves.push(devices.clone());
            self.wave_started_ms = now_ms;
            self.gate_passed_ms = None;
            out.push(Decision::Launch {
                wave: self.waves.len() - 1,
                devices,
            });
        }
        out
    }

    /// Every wave launched and the last one through its gate and soak: what is left is
    /// waiting for silent devices.
    pub fn all_launched(&self, now_ms: u64) -> bool {
        self.pending.is_empty()
            && self
                .gate_passed_ms
                .is_some_and(|at| now_ms >= at + self.strategy.soak_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::v1::deploy::{DeployStatus, Manifest};

    fn strategy(canary: &str, batch: &str, max_failures: &str) -> Strategy {
        Strategy {
            canary: canary.parse().expect("amount"),
            batch: batch.parse().expect("amount"),
            soak_ms: 100,
            wave_timeout_ms: 1_000,
            max_failures: max_failures.parse().expect("amount"),
            rollback_id: "dep-1-rollback".into(),
        }
    }

    fn manifest() -> Manifest {
        crate::deploy::rollout::tests::package().manifest
    }

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i}")).collect()
    }

    fn report(r: &mut Rollout, device: &str, step: Step) {
        let m = manifest();
        assert!(r.on_status(
            device,
            &DeployStatus {
                deployment_id: m.deployment_id.clone(),
                version: m.version,
                step,
                chunks_dropped: 0,
            }
        ));
    }

    fn launched(d: &[Decision]) -> Vec<Vec<String>> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Launch { devices, .. } => Some(devices.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn amounts_parse_and_round() {
        assert_eq!("5".parse::<Amount>(), Ok(Amount::Count(5)));
        assert_eq!("12.5%".parse::<Amount>(), Ok(Amount::Percent(12.5)));
        assert!("150%".parse::<Amount>().is_err());
        assert!("five".parse::<Amount>().is_err());
        assert_eq!(Amount::Percent(10.0).wave_size(15), 2);
        assert_eq!(Amount::Percent(1.0).wave_size(5), 1);
        assert_eq!(Amount::Count(0).wave_size(5), 1);
        assert_eq!(Amount::Percent(10.0).allowed(15), 1);
        assert_eq!(Amount::Count(3).allowed(15), 3);
    }

    #[test]
    fn canary_then_batches_after_gate_and_soak() {
        let m = manifest();
        let mut w = Waves::new(strategy("1", "50%", "0"), members(5), 0);
        let mut r = Rollout::new(&m, std::iter::empty());
        let d = w.step(&r, 0);
        assert_eq!(launched(&d), vec![vec!["d0".to_owned()]]);
        r.add_device("d0".into());
        // Nothing more until the canary is final.
        assert!(w.step(&r, 10).is_empty());
        report(&mut r, "d0", Step::Healthy);
        let d = w.step(&r, 20);
        assert!(matches!(
            d[..],
            [Decision::GatePassed {
                wave: 0,
                healthy: 1,
                failed: 0,
                silent: 0
            }]
        ));
        // Soaking.
        assert!(w.step(&r, 119).is_empty());
        let d = w.step(&r, 120);
        assert_eq!(
            launched(&d),
            vec![vec!["d1".to_owned(), "d2".to_owned(), "d3".to_owned()]]
        );
        for dev in ["d1", "d2", "d3"] {
            r.add_device(dev.into());
        }
        // A silent device does not hold the rollout past the wave timeout.
        report(&mut r, "d1", Step::Healthy);
        report(&mut r, "d2", Step::Healthy);
        assert!(w.step(&r, 500).is_empty());
        let d = w.step(&r, 1_120);
        assert!(matches!(
            d[..],
            [Decision::GatePassed {
                wave: 1,
                silent: 1,
                ..
            }]
        ));
        // Paused: no wave starts; resumed: the rest go.
        w.paused = true;
        assert!(w.step(&r, 5_000).is_empty());
        assert!(w.join("d9"));
        assert!(!w.join("d9"));
        w.paused = false;
        let d = w.step(&r, 5_001);
        assert_eq!(launched(&d), vec![vec!["d4".to_owned(), "d9".to_owned()]]);
        assert!(!w.all_launched(5_001));
        for dev in ["d4", "d9"] {
            r.add_device(dev.into());
            report(&mut r, dev, Step::Healthy);
        }
        w.step(&r, 5_002);
        assert!(w.all_launched(5_102));
        assert!(!w.is_halted());
    }

    #[test]
    fn a_failure_over_the_budget_halts_in_the_canary_wave() {
        let m = manifest();
        let mut w = Waves::new(strategy("20%", "40%", "10%"), members(10), 0);
        let mut r = Rollout::new(&m, std::iter::empty());
        let d = w.step(&r, 0);
        assert_eq!(launched(&d), vec![vec!["d0".to_owned(), "d1".to_owned()]]);
        r.add_device("d0".into());
        r.add_device("d1".into());
        // One failure of ten is within 10%.
        report(
            &mut r,
            "d0",
            Step::RolledBack {
                reason: "trap".into(),
            },
        );
        assert!(w.step(&r, 1).is_empty());
        report(
            &mut r,
            "d1",
            Step::Rejected {
                reason: "too large".into(),
            },
        );
        let d = w.step(&r, 2);
        match &d[..] {
            [
                Decision::Halt {
                    reason,
                    failures: 2,
                },
            ] => {
                assert!(reason.contains("--max-failures 10%"), "{reason}")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(w.is_halted());
        assert_eq!(w.pending.len(), 8, "the rest were never updated");
        // Halted for good: nothing launches, nobody joins, a second abort is a no-op.
        assert!(w.step(&r, 10_000).is_empty());
        assert!(!w.join("d11"));
        assert!(w.halt("aborted".into()).is_none());
    }

    #[test]
    fn state_roundtrips_through_json() {
        let mut w = Waves::new(strategy("1", "2", "1"), members(3), 7);
        let r = Rollout::new(&manifest(), std::iter::empty());
        w.step(&r, 7);
        w.halt("aborted by the operator".into());
        let back: Waves =
            serde_json::from_str(&serde_json::to_string(&w).expect("json")).expect("parses");
        assert_eq!(back, w);
    }
}
