//! Periodic telemetry: machine figures from sysinfo plus the agent's own RSS and outbox depth,
//! the running pipeline's per-stage counters and latency percentiles, inference (runtime
//! status, per-model provider, runs, errors, latency) and authentication (enrolled or not,
//! incoming messages dropped by reason), queued through the outbox (class telemetry, so it is
//! the first thing shed when full).

use std::sync::Arc;
use std::time::Duration;

use protocol::v1::{AuthTelemetry, Class, DiskStat, NetStat, Telemetry, Temperature, topics};
use sysinfo::{
    Components, CpuRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System,
};
use tokio::sync::watch;

use crate::enrollment::SessionWatch;
use crate::inference::Inference;
use crate::link::AuthStats;
use crate::outbox::{NewMessage, Outbox};
use crate::pipeline::RunningSlot;

/// Caps on list lengths so one sample stays small on a board with many mounts or interfaces.
const MAX_ITEMS: usize = 16;

pub struct Sampler {
    sys: System,
    disks: Disks,
    networks: Networks,
    components: Components,
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new()
    }
}

impl Sampler {
    pub fn new() -> Self {
        let sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        Sampler {
            sys,
            disks: Disks::new_with_refreshed_list(),
            networks: Networks::new_with_refreshed_list(),
            components: Components::new_with_refreshed_list(),
        }
    }

    /// Takes one sample. CPU use is measured since the previous call.
    pub fn sample(
        &mut self,
        outbox: protocol::v1::OutboxStats,
        pipeline: Option<protocol::v1::PipelineTelemetry>,
    ) -> Telemetry {
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        self.disks.refresh(true);
        self.networks.refresh(true);
        self.components.refresh(true);
        let load = System::load_average();
        let mut networks: Vec<NetStat> = self
            .networks
            .list()
            .iter()
            .map(|(name, n)| NetStat {
                iface: name.clone(),
                rx_bytes: n.total_received(),
                tx_bytes: n.total_transmitted(),
            })
            .collect();
        networks.sort_by(|a, b| a.iface.cmp(&b.iface));
        networks.truncate(MAX_ITEMS);
        Telemetry {
            cpu_percent: self.sys.global_cpu_usage(),
            cpu_count: self.sys.cpus().len() as u32,
            load_avg: [load.one, load.five, load.fifteen],
            mem_total_bytes: self.sys.total_memory(),
            mem_used_bytes: self.sys.used_memory(),
            uptime_s: System::uptime(),
            disks: self
                .disks
                .list()
                .iter()
                .take(MAX_ITEMS)
                .map(|d| DiskStat {
                    mount: d.mount_point().display().to_string(),
                    total_bytes: d.total_space(),
                    available_bytes: d.available_space(),
                })
                .collect(),
            temperatures: self
                .components
                .list()
                .iter()
                .filter_map(|c| {
                    Some(Temperature {
                        label: c.label().to_owned(),
                        celsius: c.temperature()?,
                    })
                })
                .take(MAX_ITEMS)
                .collect(),
            networks,
            agent_rss_bytes: self_rss_bytes().unwrap_or(0),
            outbox,
            pipeline,
            inference: None,
            fl: None,
            offload: None,
            auth: None,
        }
    }
}

/// Resident set size of this process, from /proc/self/status.
pub fn self_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The agent's parts that report in each sample.
pub struct Sources {
    pub outbox: Arc<Outbox>,
    pub pipeline: RunningSlot,
    pub inference: Inference,
    pub fl: Arc<crate::fl::FlStats>,
    pub offload: Option<crate::offload::Offloader>,
    /// Incoming messages the uplink dropped, by reason.
    pub auth: Arc<AuthStats>,
    /// The enrollment session (enrolled or not).
    pub session: SessionWatch,
}

/// Samples every `interval` and queues the sample; stops when `shutdown` turns true.
pub async fn run(
    device: String,
    interval: Duration,
    sources: Sources,
    mut shutdown: watch::Receiver<bool>,
) {
    let Sources {
        outbox,
        pipeline,
        inference,
        fl,
        offload,
        auth,
        session,
    } = sources;
    let mut sampler = Sampler::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let mut t = sampler.sample(outbox.stats(), pipeline.telemetry());
        let mut inf = inference.telemetry();
        inf.models.truncate(MAX_ITEMS);
        t.inference = Some(inf);
        t.fl = fl.telemetry();
        t.offload = offload.as_ref().map(crate::offload::Offloader::telemetry);
        t.auth = Some(AuthTelemetry {
            enrolled: session.borrow().is_some(),
            rejected: auth.rejected(),
        });
        let body = match serde_json::to_vec(&t) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode telemetry");
                continue;
            }
        };
        let msg = NewMessage {
            class: Class::Telemetry,
            topic: topics::telemetry(&device),
            body,
            ttl: None,
        };
        if let Err(e) = outbox.enqueue(msg).await {
            tracing::warn!(error = %e, "telemetry sample not queued");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_has_real_figures() {
        let mut s = Sampler::new();
        let t = s.sample(Default::default(), None);
        assert!(t.mem_total_bytes > 0);
        assert!(t.cpu_count > 0);
        assert!(t.agent_rss_bytes > 0);
        assert!(serde_json::to_vec(&t).expect("encodes").len() < protocol::v1::MAX_PAYLOAD_BYTES);
    }
}
