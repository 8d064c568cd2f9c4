//! A fault-injecting TCP proxy on loopback, put between an agent and its broker to give the link
//! delay, jitter, a bandwidth cap, a black hole (stall), resets and outages (cut/restore).
//!
//! The kernel on the test machines has no `netem`, so this is how tests shape a link. It is plain
//! std threads and blocking sockets: per connection one reader and one writer per direction,
//! all sharing one mutex-guarded state and one condvar (a handful of connections per test, so
//! one lock costs nothing and keeps the reasoning simple).
//!
//! How each fault is modelled (see [`Link`] for the knobs):
//! - delay and jitter: every chunk read is stamped with a release time
//!   `max(previous release, arrival + delay + uniform(0..=jitter))`, so jitter varies latency but
//!   never reorders bytes within a direction, as TCP never does;
//! - bandwidth: a pacer per direction (a token bucket holding one slice of 20 ms worth of bytes);
//! - stall: nothing is forwarded in either direction, nothing is lost, connections stay open; the
//!   queue of each direction is bounded, so a stalled sender ends up blocked in `write` like over
//!   a black-holed TCP link;
//! - loss: TCP never loses bytes inside a stream, so loss is modelled as the connection dying
//!   part-way: after a chunk the connection is reset with some probability, or deterministically
//!   once a byte budget is spent; the bytes that made it before the reset are delivered;
//! - dropped downstream: what the upstream sends is read and discarded, the other direction
//!   flows; clearing it resets the connections that lost bytes, since their streams have holes;
//! - cut: every live connection is closed on both sides at once, queued data is dropped, and new
//!   connections are accepted and closed at once until [`LinkProxy::restore`].
//!
//! Connections are ended with `shutdown(Both)`, so the peers see a FIN (EOF), or an RST if they
//! then write. A real RST would need `SO_LINGER`, which std does not expose (nix would, with its
//! `socket` feature); to an MQTT client either is the connection going away.
//!
//! Invariant: binds only 127.0.0.1:0; never reorders, duplicates or alters bytes (only delays
//! them, discards them under `drop_down`, or ends the connection); every thread it starts is joined when the proxy is dropped.
//! Boundary: used by `tests/tests/*.rs` and `xtask`; knows nothing of MQTT.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::Rng;

/// Largest read from a socket, so the largest chunk one delay/loss decision applies to.
const READ_BUF: usize = 16 * 1024;
/// Bytes a direction may hold before its reader stops reading (back-pressure on the sender).
/// Room for a bandwidth-delay product of 1 MiB: ample for loopback tests.
const QUEUE_CAP: usize = 1024 * 1024;
/// Socket read/write timeout: how often a blocked thread looks at whether its connection was
/// torn down, in case the shutdown did not wake it.
const IO_TIMEOUT: Duration = Duration::from_millis(200);
/// Longest a thread waits on the condvar before looking at the state again (a safety net; every
/// change notifies).
const MAX_WAIT: Duration = Duration::from_millis(500);
/// How long connecting to the upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The bandwidth pacer sends at most this much time's worth of bytes at once.
const PACE_SLICE: Duration = Duration::from_millis(20);

/// The conditions of the link, applied to both directions alike. `Link::default()` is a clean
/// link: no delay, no cap, no faults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Link {
    /// Added to every chunk, each direction.
    pub delay: Duration,
    /// Up to this much more per chunk, uniformly at random; never reorders bytes.
    pub jitter: Duration,
    /// Cap in bytes per second, each direction separately (not bits). `Some(0)` passes nothing.
    pub bytes_per_sec: Option<u64>,
    /// Hold all data in both directions without closing anything (a black hole); it flows again,
    /// intact, when cleared.
    pub stall: bool,
    /// Hold only what the client sends (client -> upstream) while the other direction flows:
    /// a device that still hears its broker but whose publishes, pings and reconnects go
    /// nowhere (a dead uplink). Held data flows on, intact, when cleared.
    pub stall_up: bool,
    /// Discard what the upstream sends to the client (upstream -> client) while the other
    /// direction flows: a device whose publishes arrive but that hears nothing back (no
    /// acknowledgements, no ping answers). Connections that lost bytes this way are reset when
    /// it is cleared (their stream has a hole); new ones then work.
    pub drop_down: bool,
    /// Probability, per chunk read from either side (one `read`, up to 16 KiB, so it depends on
    /// how the sender writes), that the connection is reset after a random prefix of that chunk.
    pub reset_probability: f64,
    /// Reset each connection once this many bytes (both directions together, counted from the
    /// connection's start) have been read from it: those bytes are delivered (each after its
    /// delay), then the connection ends; anything read after them is dropped.
    pub reset_after_bytes: Option<u64>,
}

/// Counters since the proxy started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted and connected through to the upstream.
    pub accepted: u64,
    /// Connections accepted and closed at once because the link was cut.
    pub refused: u64,
    /// Connections closed at once because the upstream could not be reached.
    pub upstream_failures: u64,
    /// Connections open now (accepted and not yet ended).
    pub live: u64,
    /// Bytes delivered from clients to the upstream.
    pub bytes_up: u64,
    /// Bytes delivered from the upstream to clients.
    pub bytes_down: u64,
    /// Bytes read from one side that will never be delivered (cut, reset, a side gone).
    pub bytes_dropped: u64,
    /// Bytes read and held now, waiting for their release time, the bandwidth cap or a stall.
    pub bytes_queued: u64,
    /// Calls to [`LinkProxy::cut`].
    pub cuts: u64,
    /// Connections reset by the loss model (`reset_probability`, `reset_after_bytes`).
    pub resets: u64,
}

/// A running proxy from `127.0.0.1:port()` to one upstream address. Dropping it closes every
/// connection and joins its threads.
pub struct LinkProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LinkProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkProxy")
            .field("port", &self.port)
            .field("upstream", &self.shared.upstream)
            .finish_non_exhaustive()
    }
}

impl LinkProxy {
    /// Listens on 127.0.0.1:0 and forwards every connection to `upstream` over a clean link.
    ///
    /// The upstream need not be up yet: a connection made while it is down is accepted and
    /// closed at once (counted in `upstream_failures`), as a client would see a refused connect.
    pub fn start(upstream: SocketAddr) -> Result<LinkProxy> {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("link proxy cannot bind 127.0.0.1:0")?;
        let port = listener
            .local_addr()
            .context("link proxy cannot read its bound port")?
            .port();
        let shared = Arc::new(Shared {
            upstream,
            port,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("proxy{port}-accept"))
                .spawn(move || accept_loop(&shared, listener))
                .context("link proxy cannot start its accept thread")?
        };
        Ok(LinkProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// [`LinkProxy::start`] towards 127.0.0.1:`port`.
    pub fn to_port(port: u16) -> Result<LinkProxy> {
        LinkProxy::start(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// The port clients connect to, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`, for an agent's or coordinator's broker URL.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The link conditions now.
    pub fn link(&self) -> Link {
        self.shared.lock().link.clone()
    }

    /// Changes the link conditions, for live connections too: a stall, its end and the
    /// bandwidth cap take effect at once; a new delay or jitter applies to data read from now
    /// on (data already held keeps the release time it was given).
    pub fn set(&self, link: Link) {
        {
            let mut st = self.shared.lock();
            if st.link.drop_down && !link.drop_down {
                st.teardown_all();
            }
            st.link = link;
        }
        self.shared.wake.notify_all();
    }

    /// Closes every live connection on both sides, dropping the data they held (counted in
    /// `bytes_dropped`), and refuses new connections (accepts and closes them) until
    /// [`LinkProxy::restore`]. Link conditions set with [`LinkProxy::set`] are kept.
    pub fn cut(&self) {
        {
            let mut st = self.shared.lock();
            st.cut = true;
            st.stats.cuts += 1;
            st.teardown_all();
        }
        self.shared.wake.notify_all();
    }

    /// Accepts and forwards new connections again after [`LinkProxy::cut`].
    pub fn restore(&self) {
        self.shared.lock().cut = false;
        self.shared.wake.notify_all();
    }

    /// Whether the link is cut now.
    pub fn is_cut(&self) -> bool {
        self.shared.lock().cut
    }

    pub fn stats(&self) -> ProxyStats {
        self.shared.lock().stats()
    }

    /// Waits until `pred` holds for the stats and returns them; errs with `what` and the last
    /// stats after `timeout`.
    pub fn wait_stats(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&ProxyStats) -> bool,
    ) -> Result<ProxyStats> {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats();
            if pred(&stats) {
                return Ok(stats);
            }
            if Instant::now() >= deadline {
                bail!(
                    "link proxy on port {}: not {what} within {timeout:?}: {stats:?}",
                    self.port
                );
            }
            std::thread::sleep(crate::POLL);
        }
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.shutdown = true;
            st.teardown_all();
        }
        self.shared.wake.notify_all();
        // The acceptor is blocked in accept(): a connection wakes it to see `shutdown`. Should
        // that connect fail, leave the thread rather than hang the test on the join.
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let woke = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok();
        if let Some(acceptor) = self.acceptor.take()
            && woke
        {
            let _ = acceptor.join();
        }
        // No connection is added once `shutdown` is set, so this is every connection thread;
        // each has been woken by the teardown and exits within IO_TIMEOUT.
        let threads = std::mem::take(&mut self.shared.lock().threads);
        for t in threads {
            let _ = t.join();
        }
    }
}

/// A direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

impl Dir {
    fn idx(self) -> usize {
        match self {
            Dir::Up => 0,
            Dir::Down => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dir::Up => "up",
            Dir::Down => "down",
        }
    }
}

struct Shared {
    upstream: SocketAddr,
    port: u16,
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking proxy thread must not take the test's proxy calls down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a notification, until `until` at the latest (and never longer than MAX_WAIT).
    fn wait<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        until: Option<Instant>,
    ) -> MutexGuard<'a, State> {
        let mut timeout = MAX_WAIT;
        if let Some(until) = until {
            timeout = timeout.min(until.saturating_duration_since(Instant::now()));
        }
        match self.wake.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(e) => e.into_inner().0,
        }
    }
}

#[derive(Default)]
struct State {
    link: Link,
    cut: bool,
    shutdown: bool,
    /// Counters; `live` and `bytes_queued` are computed in [`State::stats`].
    stats: ProxyStats,
    conns: HashMap<u64, Conn>,
    /// Every connection thread not yet joined (finished ones are reaped on each accept).
    threads: Vec<JoinHandle<()>>,
    next_id: u64,
}

impl State {
    fn stats(&self) -> ProxyStats {
        let mut s = self.stats.clone();
        let open = self.conns.values().filter(|c| !c.closed);
        s.live = open.clone().count() as u64;
        s.bytes_queued = open
            .flat_map(|c| c.queues.iter())
            .map(|q| q.bytes as u64)
            .sum();
        s
    }

    /// Ends connection `id` on both sides at once and drops what it held. Idempotent.
    fn teardown(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.closed {
            return;
        }
        c.closed = true;
        for q in &mut c.queues {
            self.stats.bytes_dropped += q.bytes as u64;
            q.items.clear();
            q.bytes = 0;
        }
        // Wakes the readers blocked in read() (they see EOF and then `closed`) and makes the
        // writers' next write fail; the peers see the connection end.
        let _ = c.client.shutdown(Shutdown::Both);
        let _ = c.upstream.shutdown(Shutdown::Both);
    }

    fn teardown_all(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.teardown(id);
        }
    }
}

/// One proxied connection. The four threads serving it own their own handles to the two
/// sockets; these are for the teardown. It is removed when the last thread exits.
struct Conn {
    client: TcpStream,
    upstream: TcpStream,
    queues: [Queue; 2],
    /// Torn down: every thread exits, nothing more is forwarded.
    closed: bool,
    /// Bytes read from both sides so far, for `reset_after_bytes`.
    bytes_read: u64,
    /// The loss model has queued a reset: nothing more is read into either direction.
    reset_queued: bool,
    threads_left: u8,
}

/// What one direction holds between its reader and its writer.
struct Queue {
    items: VecDeque<Item>,
    /// Data bytes in `items`.
    bytes: usize,
    /// Release time of the last item pushed: later items are never released before it.
    last_release: Instant,
    /// When the bandwidth pacer lets the next slice go.
    next_send: Instant,
}

impl Queue {
    fn new(now: Instant) -> Queue {
        Queue {
            items: VecDeque::new(),
            bytes: 0,
            last_release: now,
            next_send: now,
        }
    }
}

enum Item {
    Data {
        release: Instant,
        bytes: Vec<u8>,
    },
    /// The sender closed its side: pass the FIN on.
    Eof {
        release: Instant,
    },
    /// The loss model ends the connection here.
    Reset {
        release: Instant,
    },
}

impl Item {
    fn release(&self) -> Instant {
        match self {
            Item::Data { release, .. } | Item::Eof { release } | Item::Reset { release } => {
                *release
            }
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    for incoming in listener.incoming() {
        if shared.lock().shutdown {
            return;
        }
        let client = match incoming {
            Ok(client) => client,
            // Out of file descriptors and the like: back off instead of spinning.
            Err(_) => {
                std::thread::sleep(crate::POLL);
                continue;
            }
        };
        if refuse_if_cut(shared) {
            continue;
        }
        let upstream = match TcpStream::connect_timeout(&shared.upstream, CONNECT_TIMEOUT) {
            Ok(upstream) => upstream,
            Err(_) => {
                shared.lock().stats.upstream_failures += 1;
                continue;
            }
        };
        // A cut may have come while we were connecting.
        if refuse_if_cut(shared) {
            continue;
        }
        if shared.lock().shutdown {
            return;
        }
        let _ = open_conn(shared, client, upstream);
    }
}

/// Counts a refused connection if the link is cut; the caller drops (closes) it.
fn refuse_if_cut(shared: &Shared) -> bool {
    let mut st = shared.lock();
    if st.cut {
        st.stats.refused += 1;
    }
    st.cut
}

/// Registers a connection and starts its four threads. On an error the sockets are dropped,
/// which closes the connection.
fn open_conn(shared: &Arc<Shared>, client: TcpStream, upstream: TcpStream) -> std::io::Result<()> {
    for s in [&client, &upstream] {
        // The proxy decides when bytes go; Nagle must not add its own delay.
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
    }
    let handles = [
        (Dir::Up, Role::Read, client.try_clone()?),
        (Dir::Up, Role::Write, upstream.try_clone()?),
        (Dir::Down, Role::Read, upstream.try_clone()?),
        (Dir::Down, Role::Write, client.try_clone()?),
    ];
    let mut st = shared.lock();
    if st.shutdown {
        return Ok(());
    }
    st.threads.retain(|t| !t.is_finished());
    let id = st.next_id;
    st.next_id += 1;
    let now = Instant::now();
    st.conns.insert(
        id,
        Conn {
            client,
            upstream,
            queues: [Queue::new(now), Queue::new(now)],
            closed: false,
            bytes_read: 0,
            reset_queued: false,
            threads_left: 0,
        },
    );
    st.stats.accepted += 1;
    // The threads start under the lock and wait for it, so they all see the connection.
    for (dir, role, stream) in handles {
        let shared_for_thread = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!(
                "proxy{}-c{id}-{}-{}",
                shared.port,
                dir.name(),
                role.name()
            ))
            .spawn(move || {
                let shared = &*shared_for_thread;
                match role {
                    Role::Read => read_loop(shared, id, dir, stream),
                    Role::Write => write_loop(shared, id, dir, stream),
                }
                let mut st = shared.lock();
                if let Some(c) = st.conns.get_mut(&id) {
                    c.threads_left -= 1;
                    if c.threads_left == 0 {
                        st.conns.remove(&id);
                    }
                }
                drop(st);
                shared.wake.notify_all();
            });
        match spawned {
            Ok(t) => {
                st.threads.push(t);
                if let Some(c) = st.conns.get_mut(&id) {
                    c.threads_left += 1;
                }
            }
            Err(_) => {
                st.teardown(id);
                break;
            }
        }
    }
    if st.conns.get(&id).is_some_and(|c| c.threads_left == 0) {
        st.conns.remove(&id);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Read,
    Write,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Read => "rd",
            Role::Write => "wr",
        }
    }
}

/// Reads from one side into the direction's queue, stamping each chunk with its release time
/// and applying the loss model, until EOF, an error or the teardown.
fn read_loop(shared: &Shared, id: u64, dir: Dir, mut src: TcpStream) {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        // Back-pressure: read no more while the queue is full.
        {
            let mut st = shared.lock();
            loop {
                let Some(c) = st.conns.get(&id) else {
                    return;
                };
                if c.closed {
                    return;
                }
                if c.queues[dir.idx()].bytes < QUEUE_CAP {
                    break;
                }
                st = shared.wait(st, None);
            }
        }
        let n = match src.read(&mut buf) {
            Ok(n) => n,
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => continue,
            // The side reset the connection: so does the proxy, to the other side.
            Err(_) => {
                shared.lock().teardown(id);
                shared.wake.notify_all();
                return;
            }
        };
        let done = enqueue(&mut shared.lock(), id, dir, &buf[..n]);
        shared.wake.notify_all();
        if done {
            return;
        }
    }
}

/// Queues what one read returned (`data` empty: EOF). Returns true when the reader is done.
fn enqueue(st: &mut State, id: u64, dir: Dir, data: &[u8]) -> bool {
    let State {
        link, stats, conns, ..
    } = st;
    let Some(c) = conns.get_mut(&id) else {
        return true;
    };
    if c.closed || c.reset_queued {
        stats.bytes_dropped += data.len() as u64;
        return true;
    }
    if link.drop_down && dir == Dir::Down && !data.is_empty() {
        stats.bytes_dropped += data.len() as u64;
        return false;
    }
    let mut rng = rand::thread_rng();
    let jitter = if link.jitter.is_zero() {
        Duration::ZERO
    } else {
        let max = u64::try_from(link.jitter.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.gen_range(0..=max))
    };
    let q = &mut c.queues[dir.idx()];
    let release = q.last_release.max(Instant::now() + link.delay + jitter);
    q.last_release = release;
    if data.is_empty() {
        q.items.push_back(Item::Eof { release });
        return true;
    }
    let n = data.len();
    let budget = link
        .reset_after_bytes
        .map(|limit| limit.saturating_sub(c.bytes_read));
    let keep = match budget {
        Some(left) if left <= n as u64 => Some(left as usize),
        // `<` on a uniform [0, 1) sample: 0.0 never resets, 1.0 always does, NaN never.
        _ if rng.gen_range(0.0..1.0) < link.reset_probability => Some(rng.gen_range(0..n)),
        _ => None,
    };
    c.bytes_read += n as u64;
    let kept = keep.unwrap_or(n);
    if kept > 0 {
        q.items.push_back(Item::Data {
            release,
            bytes: data[..kept].to_vec(),
        });
        q.bytes += kept;
    }
    if keep.is_some() {
        c.reset_queued = true;
        q.items.push_back(Item::Reset { release });
        stats.resets += 1;
        stats.bytes_dropped += (n - kept) as u64;
        return true;
    }
    false
}

/// What a writer does next.
enum Step {
    Wait(Option<Instant>),
    Send(Vec<u8>),
    Eof,
    Reset,
    Exit,
}

/// Decides the writer's next step from the queue and the link; takes the bytes it sends.
fn next_step(st: &mut State, id: u64, dir: Dir, now: Instant) -> Step {
    let State { link, conns, .. } = st;
    let Some(c) = conns.get_mut(&id) else {
        return Step::Exit;
    };
    if c.closed {
        return Step::Exit;
    }
    let q = &mut c.queues[dir.idx()];
    let Some(front) = q.items.front_mut() else {
        return Step::Wait(None);
    };
    if link.stall || link.bytes_per_sec == Some(0) || (link.stall_up && dir == Dir::Up) {
        return Step::Wait(None);
    }
    if front.release() > now {
        return Step::Wait(Some(front.release()));
    }
    let bytes = match front {
        Item::Eof { .. } => {
            q.items.pop_front();
            return Step::Eof;
        }
        Item::Reset { .. } => return Step::Reset,
        Item::Data { bytes, .. } => bytes,
    };
    let take = match link.bytes_per_sec {
        None => bytes.len(),
        Some(_) if q.next_send > now => return Step::Wait(Some(q.next_send)),
        Some(rate) => {
            let slice = (rate as f64 * PACE_SLICE.as_secs_f64()).max(1.0) as usize;
            let take = bytes.len().min(slice);
            q.next_send = q.next_send.max(now) + Duration::from_secs_f64(take as f64 / rate as f64);
            take
        }
    };
    let piece = if take == bytes.len() {
        let piece = std::mem::take(bytes);
        q.items.pop_front();
        piece
    } else {
        bytes.drain(..take).collect()
    };
    q.bytes -= take;
    Step::Send(piece)
}

/// Takes released data off the direction's queue and writes it to the other side.
fn write_loop(shared: &Shared, id: u64, dir: Dir, mut dst: TcpStream) {
    loop {
        let step = {
            let mut st = shared.lock();
            loop {
                match next_step(&mut st, id, dir, Instant::now()) {
                    Step::Wait(until) => st = shared.wait(st, until),
                    step => break step,
                }
            }
        };
        match step {
            Step::Send(piece) => {
                // The reader may be waiting for room in the queue.
                shared.wake.notify_all();
                let unsent = write_all(shared, id, &mut dst, &piece);
                let mut st = shared.lock();
                let sent = (piece.len() - unsent) as u64;
                match dir {
                    Dir::Up => st.stats.bytes_up += sent,
                    Dir::Down => st.stats.bytes_down += sent,
                }
                if unsent > 0 {
                    st.stats.bytes_dropped += unsent as u64;
                    st.teardown(id);
                    drop(st);
                    shared.wake.notify_all();
                    return;
                }
            }
            Step::Eof => {
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
            Step::Reset => {
                shared.lock().teardown(id);
                shared.wake.notify_all();
                return;
            }
            Step::Wait(_) | Step::Exit => return,
        }
    }
}

/// Writes all of `bytes` unless the connection fails or is torn down; returns how many bytes
/// were not written.
fn write_all(shared: &Shared, id: u64, dst: &mut TcpStream, mut bytes: &[u8]) -> usize {
    while !bytes.is_empty() {
        match dst.write(bytes) {
            Ok(0) => break,
            Ok(n) => bytes = &bytes[n..],
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {
                let st = shared.lock();
                if st.conns.get(&id).is_none_or(|c| c.closed) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    bytes.len()
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}
