//! Runs a scenario: builds each device's agent config from the scenario, starts the devices at
//! the scenario's ramp, applies churn, logs progress, and at the end stops every device the way
//! the agent shuts down and writes the results.
//!
//! **Invariant:** a device's slot is locked while it stops or starts, so churn and the final
//! stop never race on one device's files. **Boundary:** called by `main.rs` and by tests.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use edge_agent::config::Config;
use edge_agent::outbox::MemoryStore;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex as AsyncMutex;

use crate::device::{DeviceSpec, DeviceState, RunningDevice};
use crate::results::{self, DeviceEnd, Summary};
use crate::scenario::Scenario;
use crate::timeline::Timeline;

/// The outbox's files under a state folder (what a power cut loses).
const OUTBOX_FILES: [&str; 3] = ["outbox", "outbox.wal", "outbox.incarnation"];
/// Devices stopped at once at the end (each flushes and fsyncs its stores).
const STOP_CONCURRENCY: usize = 64;
/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

struct Slot {
    spec: DeviceSpec,
    state: Arc<Mutex<DeviceState>>,
    running: Option<RunningDevice>,
    /// The device's outbox records when kept in memory (what a power cut loses).
    records: MemoryStore,
}

type Slots = Arc<Vec<Arc<AsyncMutex<Slot>>>>;

/// Where the devices' state lives for this run; removed on drop unless kept.
enum StateRoot {
    Temp(tempfile::TempDir),
    Given(PathBuf),
}

impl StateRoot {
    fn path(&self) -> &Path {
        match self {
            StateRoot::Temp(t) => t.path(),
            StateRoot::Given(p) => p,
        }
    }
}

fn state_root(s: &Scenario) -> Result<StateRoot> {
    if !s.run.state_dir.as_os_str().is_empty() {
        std::fs::create_dir_all(&s.run.state_dir)
            .with_context(|| format!("cannot create {}", s.run.state_dir.display()))?;
        return Ok(StateRoot::Given(s.run.state_dir.clone()));
    }
    let tmpfs = Path::new("/dev/shm");
    let mut b = tempfile::Builder::new();
    b.prefix("edge-sim-");
    let dir = if tmpfs.is_dir() {
        b.tempdir_in(tmpfs)
    } else {
        b.tempdir()
    }
    .context("cannot create the devices' state folder")?;
    if s.run.keep_state {
        return Ok(StateRoot::Given(dir.keep()));
    }
    Ok(StateRoot::Temp(dir))
}

/// The agent config of one device: the scenario's `[agent]` table with the per-device keys,
/// parsed by the agent's own config parser (so its validation applies).
pub fn device_config(s: &Scenario, group: usize, id: &str, state_dir: &Path) -> Result<Config> {
    use toml::Value;
    let mut root = s.agent.clone();
    let path_str = |p: &Path| -> Result<Value> {
        Ok(Value::String(
            p.to_str()
                .with_context(|| format!("{} is not utf-8", p.display()))?
                .to_owned(),
        ))
    };
    root.insert("state_dir".into(), path_str(state_dir)?);
    let mut device = toml::Table::new();
    device.insert("id".into(), Value::String(id.to_owned()));
    root.insert("device".into(), Value::Table(device));
    let table = |root: &mut toml::Table, key: &str| -> Result<toml::Table> {
        match root.remove(key) {
            None => Ok(toml::Table::new()),
            Some(Value::Table(t)) => Ok(t),
            Some(_) => anyhow::bail!("[agent] {key} is not a table"),
        }
    };
    let mut telemetry = table(&mut root, "telemetry")?;
    telemetry.insert(
        "interval_s".into(),
        Value::Integer(i64::try_from(s.fleet.telemetry_interval_s)?),
    );
    root.insert("telemetry".into(), Value::Table(telemetry));
    let mut enrollment = table(&mut root, "enrollment")?;
    enrollment.insert(
        "claim_key_file".into(),
        path_str(&s.fleet.group[group].claim_key_file)?,
    );
    root.insert("enrollment".into(), Value::Table(enrollment));
    let text = toml::to_string(&root).context("cannot encode a device's agent config")?;
    Config::parse(&text, Path::new("scenario [agent]")).map_err(Into::into)
}

/// The broker's address from `[agent.mqtt] url`, for link proxies (plain `mqtt://` only: a
/// proxy on 127.0.0.1 would not match a TLS server name).
fn broker_addr(s: &Scenario) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let url = s
        .agent
        .get("mqtt")
        .and_then(|m| m.get("url"))
        .and_then(|u| u.as_str())
        .context("[[link]] profiles need [agent.mqtt] url (or --mqtt-url)")?;
    let rest = url
        .strip_prefix("mqtt://")
        .with_context(|| format!("[[link]] profiles need a plain mqtt:// broker, not {url}"))?;
    let host_port = if rest.contains(':') {
        rest.to_owned()
    } else {
        format!("{rest}:1883")
    };
    host_port
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve the broker address in {url}"))?
        .next()
        .with_context(|| format!("no address for the broker in {url}"))
}

/// Runs `scenario` until its duration is over or `shutdown` resolves; writes the results to
/// `out` and returns their summary.
pub async fn run(
    scenario: Scenario,
    out: &Path,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary> {
    let root = state_root(&scenario)?;
    let timeline = Timeline::default();
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let model_bytes =
        match &scenario.fl {
            Some(f) => Arc::new(std::fs::read(&f.model_file).with_context(|| {
                format!("cannot read [fl] model_file {}", f.model_file.display())
            })?),
            None => Arc::default(),
        };
    let (links_stop, links_rx) = tokio::sync::watch::channel(false);
    let upstream = match scenario.link.is_empty() {
        true => None,
        false => Some(broker_addr(&scenario)?),
    };
    let mut links = Vec::new();
    let mut slots = Vec::new();
    for (gi, index, id) in scenario.devices() {
        let mut config = device_config(&scenario, gi, &id, &root.path().join(&id))?;
        let profile = scenario.link.iter().find(|l| l.applies(&id, index));
        if let (Some(profile), Some(upstream)) = (profile, upstream) {
            let link = crate::link::DeviceLink::start(
                id.clone(),
                profile.clone(),
                upstream,
                timeline.clone(),
                links_rx.clone(),
                scenario.churn.seed ^ u64::from(index) ^ ((gi as u64) << 32),
            )
            .await?;
            config.mqtt.url = format!("mqtt://{}", link.addr);
            links.push(link);
        }
        let fails = scenario.health.fails(index);
        slots.push(Arc::new(AsyncMutex::new(Slot {
            spec: DeviceSpec {
                id,
                group: scenario.fleet.group[gi].name.clone(),
                config,
                fails_health: fails.then(|| scenario.health.clone()),
                fl: scenario.fl.as_ref().map(|f| crate::device::FlSpec {
                    section: f.clone(),
                    role: f.role(index),
                    model_bytes: model_bytes.clone(),
                    stopping: stopping.clone(),
                }),
                outbox: scenario.fleet.outbox,
            },
            state: Arc::default(),
            running: None,
            records: MemoryStore::default(),
        })));
    }
    let slots: Slots = Arc::new(slots);
    let total = slots.len();
    tracing::info!(
        devices = total,
        state_dir = %root.path().display(),
        failing_health = slots.len().min(
            scenario.devices().iter().filter(|(_, i, _)| scenario.health.fails(*i)).count()
        ),
        "starting the simulated fleet"
    );
    timeline.record("fleet", "starting", &format!("{total} devices"));

    let mut shutdown = std::pin::pin!(shutdown);
    let deadline = (scenario.run.duration_s > 0)
        .then(|| tokio::time::Instant::now() + Duration::from_secs(scenario.run.duration_s));
    let until_end = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let mut until_end = std::pin::pin!(until_end);

    // Ramp: start devices at the scenario's rate, stopping early if told to.
    let shards = scenario.run.shard.count;
    let gap = match scenario.fleet.start_per_second {
        0 => Duration::ZERO,
        n => Duration::from_secs(1) * shards / n,
    };
    let mut stopped_early = false;
    for slot in slots.iter() {
        let mut s = slot.lock().await;
        let started = RunningDevice::start(&s.spec, s.state.clone(), timeline.clone(), &s.records)
            .await
            .with_context(|| format!("cannot start simulated device {}", s.spec.id))?;
        s.running = Some(started);
        drop(s);
        if !gap.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(gap) => {}
                () = &mut shutdown => { stopped_early = true; break; }
                () = &mut until_end => { stopped_early = true; break; }
            }
        }
    }
    timeline.record("fleet", "started", &format!("{total} devices"));
    let rogues = match scenario.run.shard.index {
        0 => tokio::spawn(crate::rogue::run_all(scenario.clone(), timeline.clone())),
        _ => tokio::spawn(async {}),
    };

    let (churn_stop, churn_rx) = tokio::sync::watch::channel(false);
    let churn = tokio::spawn(churn(
        scenario.clone(),
        slots.clone(),
        timeline.clone(),
        churn_rx,
    ));
    if !stopped_early {
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        let mut all_enrolled = false;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = &mut until_end => break,
                _ = progress.tick() => {}
            }
            let p = results::progress(&slots_states(&slots).await);
            if !all_enrolled && p.enrolled == total {
                all_enrolled = true;
                timeline.record("fleet", "all-enrolled", &format!("{total} devices"));
            }
            tracing::info!(
                enrolled = p.enrolled, live = %p.versions, candidates = p.candidates,
                "simulated fleet"
            );
        }
    }
    rogues.abort();
    let _ = rogues.await;
    // Churn finishes the restarts it began, so no device is left half-stopped.
    let _ = churn_stop.send(true);
    let _ = churn.await;
    timeline.record("fleet", "stopping", "");
    // A dropout's endless training ends now (its device is stopping: the agent's FL task no
    // longer waits for it), so no blocking thread outlives the run.
    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(devices = total, "stopping the simulated devices");
    stop_all(&slots).await;
    let _ = links_stop.send(true);
    for link in links {
        link.join().await;
    }
    tracing::info!("simulated devices stopped");
    timeline.record("fleet", "stopped", "");

    let mut ends = Vec::new();
    for slot in slots.iter() {
        let s = slot.lock().await;
        ends.push(DeviceEnd::of(
            &s.spec,
            &s.state.lock().unwrap_or_else(|p| p.into_inner()),
        ));
    }
    let summary = results::write(out, &ends, &timeline.entries())?;
    drop(root);
    Ok(summary)
}

async fn slots_states(slots: &Slots) -> Vec<(bool, Option<u64>, u32, u32)> {
    let mut v = Vec::with_capacity(slots.len());
    for slot in slots.iter() {
        // A slot locked by churn is mid-restart; count it from its shared state anyway.
        let state = slot.lock().await.state.clone();
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        v.push((
            s.enrolled,
            s.live.as_ref().map(|r| r.version),
            s.candidates,
            s.committed,
        ));
    }
    v
}

async fn stop_all(slots: &Slots) {
    let mut set = tokio::task::JoinSet::new();
    for slot in slots.iter() {
        let slot = Arc::clone(slot);
        if set.len() >= STOP_CONCURRENCY {
            set.join_next().await;
        }
        set.spawn(async move {
            let mut s = slot.lock().await;
            if let Some(d) = s.running.take() {
                let (delivered, queued) = d.outbox_figures();
                {
                    let mut st = s.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.delivered += delivered;
                    st.queued = queued;
                    d.record_fl(&mut st);
                }
                if let Err(e) = d.stop().await {
                    tracing::error!(device = %s.spec.id, error = %e, "simulated device did not stop cleanly");
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// Reboots and power cuts at the scenario's rates (exponential gaps), each on a random device.
async fn churn(
    s: Scenario,
    slots: Slots,
    timeline: Timeline,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Each shard churns its own devices at its share of the fleet's rate.
    let total = s.churn.reboots_per_minute + s.churn.power_cuts_per_minute;
    let rate = total / f64::from(s.run.shard.count);
    if rate <= 0.0 || slots.is_empty() {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.churn.seed);
    let down = Duration::from_secs_f64(s.churn.down_s.max(0.0));
    let mut restarts = tokio::task::JoinSet::new();
    loop {
        let u: f64 = rng.gen_range(f64::EPSILON..1.0);
        let gap = -u.ln() * 60.0 / rate;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs_f64(gap)) => {}
            _ = stop.changed() => break,
        }
        let power_cut = rng.gen_bool((s.churn.power_cuts_per_minute / total).clamp(0.0, 1.0));
        let slot = slots[rng.gen_range(0..slots.len())].clone();
        let timeline = timeline.clone();
        restarts.spawn(async move {
            let mut guard = slot.lock().await;
            let slot = &mut *guard;
            let Some(d) = slot.running.take() else { return };
            let (delivered, _) = d.outbox_figures();
            {
                let mut st = slot.state.lock().unwrap_or_else(|p| p.into_inner());
                d.record_fl(&mut st);
            }
            if let Err(e) = d.stop().await {
                tracing::warn!(device = %slot.spec.id, error = %e, "simulated device did not stop cleanly");
            }
            {
                let mut st = slot.state.lock().unwrap_or_else(|p| p.into_inner());
                st.delivered += delivered;
                if power_cut {
                    st.power_cuts += 1;
                } else {
                    st.reboots += 1;
                }
            }
            if power_cut {
                slot.records = MemoryStore::default();
                for f in OUTBOX_FILES {
                    let p = slot.spec.config.state_dir.join(f);
                    let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
                }
            }
            timeline.record(
                &slot.spec.id,
                if power_cut { "power-cut" } else { "reboot" },
                "",
            );
            tokio::time::sleep(down).await;
            match RunningDevice::start(&slot.spec, slot.state.clone(), timeline.clone(), &slot.records).await {
                Ok(d) => slot.running = Some(d),
                Err(e) => {
                    tracing::error!(device = %slot.spec.id, error = %e, "simulated device did not start again");
                    timeline.record(&slot.spec.id, "start-failed", &e.to_string());
                }
            }
        });
        while restarts.try_join_next().is_some() {}
    }
    while restarts.join_next().await.is_some() {}
}
