//! The progress file of one rollout: what `serve` persists (so a restart resumes) and what
//! `deploy` reads to draw its progress bars. Plain data and pure helpers; [`super::spool`]
//! reads and writes it.

use std::collections::BTreeMap;

use protocol::v1::deploy::{Step, Target};
use serde::{Deserialize, Serialize};

use super::rollout::DeviceProgress;

/// `state_dir/deploy/rollouts/{id}/progress.json`, rewritten atomically by `serve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressFile {
    pub deployment_id: String,
    pub version: u64,
    pub target: Target,
    /// When agents stop accepting the manifest (ms since the epoch).
    pub expires_ms: u64,
    /// Artifact bytes one device downloads.
    pub total_bytes: u64,
    /// Chunks one device needs.
    pub chunk_total: u32,
    /// Per target device; group members join as they register or report.
    pub devices: BTreeMap<String, DeviceProgress>,
    /// Resend entries ignored (unknown deployment, digest or index, over the bound).
    #[serde(default)]
    pub resends_ignored: u64,
    /// Set once the rollout ended; the reason says why.
    #[serde(default)]
    pub finished: Option<String>,
    /// Coordinator clock at the last rewrite.
    pub updated_ms: u64,
    /// A staged rollout's waves, phase and strategy (`None`: the whole target at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<super::waves::Waves>,
    /// Finished, and still the group's current version: its manifest stays retained and
    /// joining devices get it until it expires or a newer deployment replaces it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub serving: bool,
    /// A halted staged rollout: the devices being rolled back, and how far.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollback: BTreeMap<String, DeviceProgress>,
}

/// How one device ended, for the `deploy` command's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Healthy,
    /// Rolled back, failed or rejected, with the line to print.
    Failed(String),
    /// Not final yet.
    Pending(String),
}

/// The wire name of a step (`rolled_back`, ...), as journaled.
pub fn step_name(step: &Step) -> &'static str {
    match step {
        Step::Downloading { .. } => "downloading",
        Step::Verifying => "verifying",
        Step::Starting => "starting",
        Step::Healthy => "healthy",
        Step::RolledBack { .. } => "rolled_back",
        Step::Failed { .. } => "failed",
        Step::Rejected { .. } => "rejected",
    }
}

/// The reason a final step carries, if any.
pub fn step_reason(step: &Step) -> Option<&str> {
    match step {
        Step::RolledBack { reason } | Step::Failed { reason } | Step::Rejected { reason } => {
            Some(reason)
        }
        _ => None,
    }
}

/// A device's outcome as the `deploy` command prints it (`healthy`, `rolled back: REASON`).
pub fn outcome(p: &DeviceProgress) -> Outcome {
    match &p.last {
        Some(Step::Healthy) => Outcome::Healthy,
        Some(Step::RolledBack { reason }) => Outcome::Failed(format!("rolled back: {reason}")),
        Some(Step::Failed { reason }) => Outcome::Failed(format!("failed: {reason}")),
        Some(Step::Rejected { reason }) => Outcome::Failed(format!("rejected: {reason}")),
        Some(step) => Outcome::Pending(step_name(step).replace('_', " ")),
        None if p.chunks_sent > 0 => Outcome::Pending("sending".into()),
        None => Outcome::Pending("waiting for the device".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_and_names() {
        let mut p = DeviceProgress::default();
        assert_eq!(
            outcome(&p),
            Outcome::Pending("waiting for the device".into())
        );
        p.last = Some(Step::RolledBack {
            reason: "trap in stage f".into(),
        });
        assert_eq!(
            outcome(&p),
            Outcome::Failed("rolled back: trap in stage f".into())
        );
        assert_eq!(step_name(p.last.as_ref().expect("set")), "rolled_back");
        assert_eq!(
            step_reason(p.last.as_ref().expect("set")),
            Some("trap in stage f")
        );
        p.last = Some(Step::Healthy);
        assert_eq!(outcome(&p), Outcome::Healthy);
        p.last = Some(Step::Verifying);
        assert_eq!(outcome(&p), Outcome::Pending("verifying".into()));
    }
}
