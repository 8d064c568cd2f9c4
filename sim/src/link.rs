//! Link profiles: a per-device TCP proxy between a simulated device's uplink and the broker,
//! giving its link delay, a bandwidth cap, scheduled outages and forced disconnects
//! (`[[link]]` in the scenario). The kernel here has no `netem`, so shaping is done in user
//! space; the device's agent code is unchanged (its `mqtt.url` names the proxy).
//!
//! How each is modelled:
//! - delay: every chunk read is released `delay_ms` after it arrived, in order (TCP never
//!   reorders), in both directions;
//! - bandwidth: after writing a chunk a direction waits as long as the chunk takes at the cap;
//! - outage: for `outage_s` out of every `outage_every_s` (from the proxy's start) the link is
//!   down: live connections are closed and new ones are closed at once;
//! - forced disconnect: at `disconnects_per_minute` (exponential gaps) the live connection is
//!   closed; the device reconnects as after any broken link.
//!
//! **Invariant:** binds only 127.0.0.1:0; never alters, duplicates or reorders bytes, only
//! delays them or ends the connection; all its tasks are tokio tasks ended by the stop signal.
//! **Boundary:** started by [`crate::fleet`] for the devices a profile names.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::scenario::LinkProfile;
use crate::timeline::Timeline;

/// Largest chunk read at once: the unit one delay and one pacing step apply to.
const CHUNK: usize = 16 * 1024;
/// Chunks a direction may hold in flight (back-pressure on the sender beyond that).
const IN_FLIGHT: usize = 64;

/// A device's shaped link: the address its uplink connects to.
pub struct DeviceLink {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl DeviceLink {
    /// Binds the proxy for `device` and starts serving it until `stop` turns true.
    pub async fn start(
        device: String,
        profile: LinkProfile,
        upstream: SocketAddr,
        timeline: Timeline,
        stop: watch::Receiver<bool>,
        seed: u64,
    ) -> Result<DeviceLink> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind a link proxy on 127.0.0.1")?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(serve(
            listener,
            Shaper {
                device,
                profile,
                upstream,
                timeline,
                started: Instant::now(),
            },
            stop,
            seed,
        ));
        Ok(DeviceLink { addr, task })
    }

    /// Waits for the proxy's tasks to end (after the stop signal).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

struct Shaper {
    device: String,
    profile: LinkProfile,
    upstream: SocketAddr,
    timeline: Timeline,
    started: Instant,
}

impl Shaper {
    /// Where `now` falls in the outage cycle, if the profile has outages: the period, the time
    /// into the current period and when in it the outage starts. Outages sit at the end of
    /// each period, so a device starts on a working link.
    fn cycle(&self, now: Instant) -> Option<(f64, f64, f64)> {
        let (every, len) = (self.profile.outage_every_s, self.profile.outage_s);
        if every <= 0.0 || len <= 0.0 {
            return None;
        }
        let phase = now.duration_since(self.started).as_secs_f64() % every;
        Some((every, phase, every - len.min(every)))
    }

    /// When the outage in force at `now` ends, if one is.
    fn outage_until(&self, now: Instant) -> Option<Instant> {
        let (every, phase, start) = self.cycle(now)?;
        (phase >= start).then(|| now + Duration::from_secs_f64(every - phase))
    }

    /// When the next outage starts, if the profile has outages.
    fn next_outage(&self, now: Instant) -> Option<Instant> {
        let (every, phase, start) = self.cycle(now)?;
        let wait = if phase < start {
            start - phase
        } else {
            every - phase + start
        };
        Some(now + Duration::from_secs_f64(wait))
    }
}

async fn serve(listener: TcpListener, shaper: Shaper, mut stop: watch::Receiver<bool>, seed: u64) {
    let shaper = std::sync::Arc::new(shaper);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => break,
        };
        while conns.try_join_next().is_some() {}
        let Ok((device_side, _)) = accepted else {
            continue;
        };
        if let Some(until) = shaper.outage_until(Instant::now()) {
            // Down: the connection is closed at once, as an unreachable broker would refuse it.
            drop(device_side);
            tracing::debug!(device = %shaper.device, until = ?until, "link down: connection refused");
            continue;
        }
        let seed = rng.r#gen::<u64>();
        conns.spawn(connection(shaper.clone(), device_side, stop.clone(), seed));
    }
    conns.shutdown().await;
}

/// One connection through the link, until it ends, an outage or a forced disconnect closes
/// it, or the simulator stops.
async fn connection(
    shaper: std::sync::Arc<Shaper>,
    device_side: TcpStream,
    mut stop: watch::Receiver<bool>,
    seed: u64,
) {
    let upstream = match TcpStream::connect(shaper.upstream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(device = %shaper.device, error = %e, "link proxy cannot reach the broker");
            return;
        }
    };
    let _ = device_side.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (dr, dw) = device_side.into_split();
    let (ur, uw) = upstream.into_split();
    let p = &shaper.profile;
    let delay = Duration::from_millis(p.delay_ms);
    let rate = p.bandwidth_kbps;
    let mut pipes = tokio::task::JoinSet::new();
    for (r, w) in [(dr, uw), (ur, dw)] {
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        pipes.spawn(read_side(r, tx));
        pipes.spawn(write_side(rx, w, delay, rate));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let disconnect = async {
        if p.disconnects_per_minute <= 0.0 {
            return std::future::pending::<()>().await;
        }
        let u: f64 = rng.gen_range(f64::EPSILON..1.0);
        tokio::time::sleep(Duration::from_secs_f64(
            -u.ln() * 60.0 / p.disconnects_per_minute,
        ))
        .await;
    };
    let outage = async {
        match shaper.next_outage(Instant::now()) {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        // Either direction ended (a peer closed): the connection is over.
        _ = pipes.join_next() => {}
        () = disconnect => {
            shaper.timeline.record(&shaper.device, "link-disconnect", "forced");
        }
        () = outage => {
            shaper.timeline.record(
                &shaper.device,
                "link-outage",
                &format!("{} s", shaper.profile.outage_s),
            );
        }
        _ = stop.changed() => {}
    }
    // Dropping the halves closes both sockets.
    pipes.shutdown().await;
}

async fn read_side(mut r: tokio::net::tcp::OwnedReadHalf, tx: mpsc::Sender<(Instant, Vec<u8>)>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn write_side(
    mut rx: mpsc::Receiver<(Instant, Vec<u8>)>,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    kbps: u64,
) {
    while let Some((arrived, bytes)) = rx.recv().await {
        tokio::time::sleep_until(arrived + delay).await;
        if w.write_all(&bytes).await.is_err() {
            return;
        }
        if kbps > 0 {
            let secs = bytes.len() as f64 * 8.0 / (kbps as f64 * 1000.0);
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        }
    }
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shaper(every: f64, len: f64) -> Shaper {
        Shaper {
            device: "d".into(),
            profile: LinkProfile {
                outage_every_s: every,
                outage_s: len,
                ..LinkProfile::default()
            },
            upstream: "127.0.0.1:1".parse().expect("addr"),
            timeline: Timeline::default(),
            started: Instant::now(),
        }
    }

    #[test]
    fn outages_sit_at_the_end_of_each_period() {
        let s = shaper(10.0, 2.0);
        let t0 = s.started;
        assert!(s.outage_until(t0).is_none());
        assert_eq!(s.next_outage(t0), Some(t0 + Duration::from_secs(8)));
        let down = t0 + Duration::from_secs(9);
        assert_eq!(s.outage_until(down), Some(t0 + Duration::from_secs(10)));
        assert_eq!(s.next_outage(down), Some(t0 + Duration::from_secs(18)));
        assert!(s.outage_until(t0 + Duration::from_secs(11)).is_none());
        let none = shaper(0.0, 2.0);
        assert!(none.outage_until(t0).is_none() && none.next_outage(t0).is_none());
    }
}
