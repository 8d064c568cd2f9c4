//! Per-device rollout tracking: which chunks went out, what each agent reported. Pure; the
//! service feeds it and renders progress bars and journal lines from it.

use std::collections::{BTreeMap, BTreeSet};

use protocol::v1::deploy::{DeployStatus, Manifest, ResendRequest, Step};
use serde::{Deserialize, Serialize};

/// What is known about one device's part of a rollout. Persisted in the rollout's progress
/// file (all but the set of sent chunks, which only feeds `chunks_sent`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceProgress {
    /// Distinct chunks sent at least once.
    pub chunks_sent: u32,
    pub chunks_total: u32,
    /// Chunks sent again on the device's request.
    pub resent: u32,
    /// Bytes the agent last said it had, of the total it has to download.
    pub agent_received: u64,
    pub agent_total: u64,
    /// The agent's last reported step (`None`: nothing heard yet).
    pub last: Option<Step>,
    /// Chunks the agent last said it dropped (forged or damaged, wrong length, unknown
    /// artifact or index); they do not fail the deployment.
    pub chunks_dropped: u64,
    #[serde(skip)]
    sent: BTreeSet<(String, u32)>,
}

impl DeviceProgress {
    /// Fraction done for a progress bar: the agent's own count once it reports, else what was
    /// sent; 1.0 after a final step.
    pub fn fraction(&self) -> f64 {
        match &self.last {
            Some(s) if s.is_final() => 1.0,
            Some(Step::Verifying | Step::Starting) => 1.0,
            Some(Step::Downloading { .. }) if self.agent_total > 0 => {
                self.agent_received as f64 / self.agent_total as f64
            }
            _ if self.chunks_total > 0 => {
                f64::from(self.chunks_sent) / f64::from(self.chunks_total)
            }
            _ => 0.0,
        }
    }

    pub fn is_final(&self) -> bool {
        self.last.as_ref().is_some_and(Step::is_final)
    }
}

/// Counts of devices by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub healthy: usize,
    /// Rolled back, failed or rejected.
    pub failed: usize,
    pub in_progress: usize,
}

/// One deployment's rollout to its devices.
#[derive(Debug, Clone)]
pub struct Rollout {
    deployment_id: String,
    version: u64,
    /// Chunk count per artifact digest.
    chunks: BTreeMap<String, u32>,
    devices: BTreeMap<String, DeviceProgress>,
}

impl Rollout {
    pub fn new(manifest: &Manifest, devices: impl IntoIterator<Item = String>) -> Self {
        let chunks: BTreeMap<String, u32> = manifest
            .artifacts
            .iter()
            .map(|a| (a.sha256.clone(), manifest.chunk_count(a.size)))
            .collect();
        let mut r = Rollout {
            deployment_id: manifest.deployment_id.clone(),
            version: manifest.version,
            chunks,
            devices: BTreeMap::new(),
        };
        for d in devices {
            r.add_device(d);
        }
        r
    }

    /// A rollout from persisted per-device progress (a coordinator restart).
    pub fn restore(manifest: &Manifest, devices: BTreeMap<String, DeviceProgress>) -> Self {
        let mut r = Rollout::new(manifest, std::iter::empty());
        r.devices = devices;
        r
    }

    pub fn has_device(&self, device: &str) -> bool {
        self.devices.contains_key(device)
    }

    /// Devices in the rollout (a staged rollout's: the launched ones).
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    pub fn deployment_id(&self) -> &str {
        &self.deployment_id
    }

    /// Adds a device (a group member that showed up later); no-op if known.
    pub fn add_device(&mut self, device: String) {
        let total = self.chunks.values().sum();
        self.devices
            .entry(device)
            .or_insert_with(|| DeviceProgress {
                chunks_total: total,
                ..DeviceProgress::default()
            });
    }

    /// Forgets a device (it left a staged rollout's rollback set).
    pub fn remove_device(&mut self, device: &str) {
        self.devices.remove(device);
    }

    /// Records that chunk `index` of `sha256` went to `device`.
    pub fn on_chunk_sent(&mut self, device: &str, sha256: &str, index: u32) {
        if self.chunks.get(sha256).is_none_or(|&n| index >= n) {
            return;
        }
        if let Some(p) = self.devices.get_mut(device)
            && p.sent.insert((sha256.to_owned(), index))
        {
            p.chunks_sent += 1;
        }
    }

    /// Records a status report; false if it is about another deployment or an unknown device.
    pub fn on_status(&mut self, device: &str, status: &DeployStatus) -> bool {
        if status.deployment_id != self.deployment_id || status.version != self.version {
            return false;
        }
        let Some(p) = self.devices.get_mut(device) else {
            return false;
        };
        if let Step::Downloading { received, total } = status.step {
            p.agent_received = received;
            p.agent_total = total;
        }
        p.last = Some(status.step.clone());
        // A count only grows; a report without one (an older agent, a redelivery answered
        // from state) leaves it.
        p.chunks_dropped = p.chunks_dropped.max(status.chunks_dropped);
        true
    }

    /// Which chunks to send again for a device's request: only ones that exist, each once,
    /// at most `limit` of them (the agent asks again for the rest).
    pub fn on_resend(
        &mut self,
        device: &str,
        request: &ResendRequest,
        limit: usize,
    ) -> Vec<(String, u32)> {
        if request.deployment_id != self.deployment_id {
            return Vec::new();
        }
        let Some(p) = self.devices.get_mut(device) else {
            return Vec::new();
        };
        let mut out = BTreeSet::new();
        for m in &request.artifacts {
            let Some(&n) = self.chunks.get(&m.sha256) else {
                continue;
            };
            out.extend(
                m.indexes
                    .iter()
                    .filter(|&&i| i < n)
                    .map(|&i| (m.sha256.clone(), i)),
            );
        }
        let out: Vec<(String, u32)> = out.into_iter().take(limit).collect();
        p.resent = p.resent.saturating_add(out.len() as u32);
        out
    }

    pub fn progress(&self, device: &str) -> Option<&DeviceProgress> {
        self.devices.get(device)
    }

    pub fn devices(&self) -> impl Iterator<Item = (&str, &DeviceProgress)> {
        self.devices.iter().map(|(d, p)| (d.as_str(), p))
    }

    /// True when every device reached a final step.
    pub fn is_finished(&self) -> bool {
        self.devices.values().all(DeviceProgress::is_final)
    }

    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for p in self.devices.values() {
            match &p.last {
                Some(Step::Healthy) => s.healthy += 1,
                Some(st) if st.is_final() => s.failed += 1,
                _ => s.in_progress += 1,
            }
        }
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::deploy::package::{ArtifactFile, Package, PackageSpec};
    use protocol::v1::deploy::{
        DeployKind, HealthCheck, MissingChunks, SigningKey, Target, sha256_hex,
    };

    pub(crate) fn package() -> Package {
        Package::build(
            PackageSpec {
                deployment_id: "dep-1".into(),
                target: Target::Group("lab".into()),
                version: 4,
                now_ms: 0,
                ttl_ms: 1_000,
                kind: DeployKind::Pipeline,
                pipeline_toml: Some(String::new()),
                chunk_size: 10,
                health: HealthCheck {
                    messages: 1,
                    seconds: 0,
                },
            },
            vec![ArtifactFile {
                name: "a.wasm".into(),
                version: "1".into(),
                bytes: vec![1; 35],
            }],
            &SigningKey::from_bytes(&[1; 32]),
        )
        .expect("builds")
    }

    fn status(step: Step) -> DeployStatus {
        DeployStatus {
            deployment_id: "dep-1".into(),
            version: 4,
            step,
            chunks_dropped: 0,
        }
    }

    #[test]
    fn tracks_sent_chunks_reports_and_outcomes_per_device() {
        let p = package();
        let sha = sha256_hex(&[1; 35]);
        let mut r = Rollout::new(&p.manifest, ["d1".to_owned(), "d2".to_owned()]);
        for c in p.chunks() {
            r.on_chunk_sent("d1", &c.sha256, c.index);
            r.on_chunk_sent("d1", &c.sha256, c.index);
        }
        r.on_chunk_sent("d1", &sha, 99);
        let d1 = r.progress("d1").expect("known");
        assert_eq!((d1.chunks_sent, d1.chunks_total), (4, 4));
        assert_eq!(d1.fraction(), 1.0);
        assert_eq!(r.progress("d2").expect("known").fraction(), 0.0);

        assert!(r.on_status(
            "d2",
            &status(Step::Downloading {
                received: 10,
                total: 40
            })
        ));
        assert_eq!(r.progress("d2").expect("known").fraction(), 0.25);
        let again = r.on_resend(
            "d2",
            &ResendRequest {
                deployment_id: "dep-1".into(),
                artifacts: vec![MissingChunks {
                    sha256: sha.clone(),
                    indexes: vec![3, 1, 3, 7],
                }],
            },
            usize::MAX,
        );
        assert_eq!(again, vec![(sha.clone(), 1), (sha, 3)]);
        assert_eq!(r.progress("d2").expect("known").resent, 2);

        // Reports for another deployment or version are not ours.
        assert!(!r.on_status(
            "d1",
            &DeployStatus {
                deployment_id: "dep-0".into(),
                version: 3,
                step: Step::Healthy,
                chunks_dropped: 0,
            }
        ));
        assert!(r.on_status("d1", &status(Step::Healthy)));
        assert!(!r.is_finished());
        assert!(r.on_status(
            "d2",
            &status(Step::RolledBack {
                reason: "trap".into()
            })
        ));
        assert!(r.is_finished());
        assert_eq!(
            r.summary(),
            Summary {
                healthy: 1,
                failed: 1,
                in_progress: 0
            }
        );
    }
}
