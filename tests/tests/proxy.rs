//! The link proxy on its own, between a plain TCP client and a local echo server (and once
//! between an MQTT client and mosquitto): bytes pass unchanged and in order both ways, delay,
//! bandwidth cap, stall, loss-as-reset and cut/restore behave as documented, and the stats
//! count what happened.
//!
//! Timings are only asserted as lower bounds (a 300 ms delay cannot make an echo faster than
//! 600 ms, however loaded the machine); never as upper bounds.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use edge_tests::{Link, LinkProxy, Mosquitto, RawMqtt, RawOutcome, run_test};
use rand::RngCore;

/// Deadline for every wait, and the clients' read timeout: only reached when something is broken.
const WAIT: Duration = Duration::from_secs(30);

/// Echoes every connection back until EOF, then closes its sending side.
struct Echo {
    port: u16,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Result<Echo> {
        let listener = TcpListener::bind("127.0.0.1:0").context("echo cannot bind")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("echo-accept".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(mut conn) = conn else { continue };
                        // Ends with its connection, which the proxy closes when dropped.
                        let _ =
                            std::thread::Builder::new()
                                .name("echo-conn".into())
                                .spawn(move || {
                                    let Ok(mut reader) = conn.try_clone() else {
                                        return;
                                    };
                                    let _ = std::io::copy(&mut reader, &mut conn);
                                    let _ = conn.shutdown(Shutdown::Write);
                                });
                    }
                })?
        };
        Ok(Echo {
            port,
            stop,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && let Some(t) = self.acceptor.take()
        {
            let _ = t.join();
        }
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

fn connect(proxy: &LinkProxy) -> Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", proxy.port()))
        .with_context(|| format!("cannot connect to the proxy on port {}", proxy.port()))?;
    s.set_read_timeout(Some(WAIT))?;
    Ok(s)
}

/// Sends `data` from a thread, closes the sending side, and reads the echo until EOF.
fn echo_all(stream: &TcpStream, data: &[u8]) -> Result<Vec<u8>> {
    let mut writer = stream.try_clone()?;
    let data = data.to_vec();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut got = Vec::new();
    let mut reader = stream;
    let read = reader.read_to_end(&mut got);
    sender
        .join()
        .map_err(|_| anyhow!("sender thread panicked"))?
        .context("cannot send through the proxy")?;
    read.with_context(|| format!("reading the echo stopped after {} bytes", got.len()))?;
    Ok(got)
}

/// Writes `data` and reads back exactly as many bytes, leaving the connection open.
fn echo_once(stream: &mut TcpStream, data: &[u8]) -> Result<Vec<u8>> {
    stream.write_all(data)?;
    let mut got = vec![0u8; data.len()];
    stream
        .read_exact(&mut got)
        .context("no complete echo through the proxy")?;
    Ok(got)
}

/// Reads until the connection ends (EOF or reset) and returns what came before; errs if it is
/// still open after [`WAIT`].
fn read_until_closed(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!(
                    "connection still open after {WAIT:?} ({} bytes read)",
                    got.len()
                )
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Ok(got),
        }
    }
}

fn ensure_same(got: &[u8], want: &[u8]) -> Result<()> {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        bail!(
            "byte {i} differs (of {} sent, {} received)",
            want.len(),
            got.len()
        );
    }
    ensure!(
        got.len() == want.len(),
        "{} bytes sent, {} received",
        want.len(),
        got.len()
    );
    Ok(())
}

#[test]
fn bytes_pass_unchanged_and_in_order_both_ways() -> Result<()> {
    let echo = Echo::start()?;
    let proxy = LinkProxy::to_port(echo.port)?;
    // Jitter larger than the delay, so an implementation that reordered chunks would show it.
    proxy.set(Link {
        delay: Duration::from_millis(1),
        jitter: Duration::from_millis(5),
        ..Link::default()
    });
    let data = random_bytes(4 * 1024 * 1024);
    let a = connect(&proxy)?;
    let b = connect(&proxy)?;
    let other = {
        let data = data.clone();
        std::thread::spawn(move || echo_all(&b, &data))
    };
    ensure_same(&echo_all(&a, &data)?, &data).context("first connection")?;
    ensure_same(
        &other.join().map_err(|_| anyhow!("thread panicked"))??,
        &data,
    )
    .context("second connection")?;
    let n = 2 * data.len() as u64;
    let stats = proxy.wait_stats("all bytes counted", WAIT, |s| {
        s.bytes_up == n && s.bytes_down == n && s.live == 0
    })?;
    ensure!(stats.accepted == 2, "{stats:?}");
    ensure!(
        stats.bytes_dropped == 0 && stats.bytes_queued == 0,
        "{stats:?}"
    );
    ensure!(
        stats.refused == 0 && stats.cuts == 0 && stats.resets == 0,
        "{stats:?}"
    );
    Ok(())
}

#[test]
fn delay_applies_each_way_and_to_live_connections() -> Result<()> {
    let echo = Echo::start()?;
    let proxy = LinkProxy::to_port(echo.port)?;
    let mut s = connect(&proxy)?;
    ensure_same(&echo_once(&mut s, b"before")?, b"before")?;
    proxy.set(Link {
        delay: Duration::from_millis(300),
        ..Link::default()
    });
    let t0 = Instant::now();
    ensure_same(&echo_once(&mut s, b"after")?, b"after")?;
    let took = t0.elapsed();
    ensure!(
        took >= Duration::from_millis(600),
        "an echo over a 300 ms link took {took:?}"
    );
    Ok(())
}

#[test]
fn bandwidth_cap_applies_to_each_direction() -> Result<()> {
    let echo = Echo::start()?;
    let proxy = LinkProxy::to_port(echo.port)?;
    proxy.set(Link {
        bytes_per_sec: Some(100_000),
        ..Link::default()
    });
    let data = random_bytes(200_000);
    let s = connect(&proxy)?;
    let t0 = Instant::now();
    let got = echo_all(&s, &data)?;
    let took = t0.elapsed();
    ensure_same(&got, &data)?;
    // 200 KB at 100 KB/s is 2 s each way (pipelined); 1.5 s leaves room for the first slice.
    ensure!(
        took >= Duration::from_millis(1500),
        "200 KB through a 100 KB/s link took {took:?}"
    );
    Ok(())
}

#[test]
fn stall_holds_data_then_releases_it_intact() -> Result<()> {
    let echo = Echo::start()?;
    let proxy = LinkProxy::to_port(echo.port)?;
    let mut s = connect(&proxy)?;
    ensure_same(&echo_once(&mut s, b"ping")?, b"ping")?;
    proxy.set(Link {
        stall: true,
        ..Link::default()
    });
    let data = random_bytes(100_000);
    s.write_all(&data)?;
    let stats = proxy.wait_stats("holding all the data", WAIT, |s| {
        s.bytes_queued == data.len() as u64 && s.bytes_up == 4 && s.bytes_down == 4
    })?;
    ensure!(stats.live == 1, "{stats:?}");
    // Held, not delivered: nothing comes back while stalled.
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut one = [0u8; 1];
    match s.read(&mut one) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => bail!("read during a stall returned {other:?}"),
    }
    s.set_read_timeout(Some(WAIT))?;
    proxy.set(Link::default());
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got).context("data held by the stall")?;
    ensure_same(&got, &data)?;
    let stats = proxy.wait_stats("all bytes counted", WAIT, |s| {
        s.bytes_up == 100_004 && s.bytes_down == 100_004
    })?;
    ensure!(stats.bytes_dropped == 0 && stats.live == 1, "{stats:?}");
    Ok(())
}

#[test]
fn stall_up_holds_only_what_the_client_sends() -> Result<()> {
    let echo = Echo::start()?;
    let proxy = LinkProxy::to_port(echo.port)?;
    let mut s = connect(&proxy)?;
    ensure_same(&echo_once(&mut s, b"ping")?, b"ping")?;
    proxy.set(Link {
        stall_up: true,
        ..Link::default()
    });
    s.write_all(b"held")?;
    proxy.wait_stats("holding the upstream bytes", WAIT, |st| {
        st.bytes_queued == 4 && st.bytes_up == 4
    })?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut one = [0u8; 1];
    match s.read(&mut one) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => bail!("read during an upstream stall returned {other:?}"),
    }
    s.set_read_timeout(Some(WAIT))?;
    proxy.set(Link::default());
    let mut got = [0u8; 4];
    s.read_exact(&mut got)
        .context("data held by the upstream stall")?;
    ensure_same(&got, b"held")?;
    Ok(())
}

#[test]
fn cut_closes_connections_and_refuses_new_ones_until_restore() -> Result<()> {
    let echo = Echo::start()?;
    let proxy = LinkProxy::to_port(echo.port)?;
    let mut live = connect(&proxy)?;
    ensure_same(&echo_once(&mut live, b"ping")?, b"ping")?;
    // Data held when the cut comes is dropped, and counted.
    proxy.set(Link {
        stall: true,
        ..Link::default()
    });
    live.write_all(&[7u8; 50_000])?;
    proxy.wait_stats("holding the data", WAIT, |s| s.bytes_queued == 50_000)?;

    proxy.cut();
    ensure!(proxy.is_cut());
    let after_cut = read_until_closed(&mut live).context("live connection at the cut")?;
    ensure!(
        after_cut.is_empty(),
        "{} bytes after the cut",
        after_cut.len()
    );
    let stats = proxy.wait_stats("closed", WAIT, |s| s.live == 0)?;
    ensure!(
        stats.cuts == 1 && stats.bytes_dropped == 50_000,
        "{stats:?}"
    );

    // The kernel completes the handshake; the proxy then closes it at once.
    let mut refused = connect(&proxy)?;
    let _ = refused.write_all(b"hello");
    read_until_closed(&mut refused).context("connection made during the cut")?;
    let stats = proxy.wait_stats("refusing", WAIT, |s| s.refused == 1 && s.bytes_up == 4)?;
    ensure!(stats.accepted == 1, "{stats:?}");

    proxy.restore();
    ensure!(!proxy.is_cut());
    // The cut kept the stall; clear it.
    proxy.set(Link::default());
    let mut again = connect(&proxy)?;
    ensure_same(&echo_once(&mut again, b"back")?, b"back")?;
    let stats = proxy.stats();
    ensure!(stats.accepted == 2 && stats.refused == 1, "{stats:?}");
    Ok(())
}

#[test]
fn loss_resets_the_connection_after_a_prefix() -> Result<()> {
    let echo = Echo::start()?;
    let proxy = LinkProxy::to_port(echo.port)?;
    proxy.set(Link {
        reset_after_bytes: Some(10_000),
        ..Link::default()
    });
    let data = random_bytes(100_000);
    let mut s = connect(&proxy)?;
    // The write may fail once the proxy has closed; what matters is what comes back.
    let _ = s.write_all(&data);
    let got = read_until_closed(&mut s)?;
    ensure!(got.len() <= 10_000, "{} bytes came back", got.len());
    ensure_same(&got, &data[..got.len()])?;
    let stats = proxy.wait_stats("reset", WAIT, |s| s.resets == 1 && s.live == 0)?;
    ensure!(
        stats.bytes_up > 0 && stats.bytes_up + stats.bytes_down <= 10_000,
        "{stats:?}"
    );
    ensure!(stats.bytes_dropped > 0, "{stats:?}");

    // Probability 1: every connection dies within its first chunk, short of all of it.
    proxy.set(Link {
        reset_probability: 1.0,
        ..Link::default()
    });
    let mut s = connect(&proxy)?;
    let _ = s.write_all(&data[..1000]);
    let got = read_until_closed(&mut s)?;
    ensure!(got.len() < 1000, "{} bytes came back", got.len());
    ensure_same(&got, &data[..got.len()])?;
    proxy.wait_stats("reset again", WAIT, |s| s.resets == 2)?;
    Ok(())
}

#[test]
fn upstream_down_closes_the_client() -> Result<()> {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let proxy = LinkProxy::to_port(port)?;
    let mut s = connect(&proxy)?;
    read_until_closed(&mut s)?;
    proxy.wait_stats("failing upstream", WAIT, |s| s.upstream_failures == 1)?;
    Ok(())
}

#[test]
fn dropping_the_proxy_closes_its_connections() -> Result<()> {
    let echo = Echo::start()?;
    let proxy = LinkProxy::to_port(echo.port)?;
    let mut s = connect(&proxy)?;
    ensure_same(&echo_once(&mut s, b"ping")?, b"ping")?;
    drop(proxy);
    read_until_closed(&mut s)?;
    Ok(())
}

#[test]
fn mqtt_round_trip_through_the_proxy() {
    run_test("proxy_mqtt", |env| {
        let broker = Mosquitto::start(&env.path("mosquitto"))?;
        let proxy = LinkProxy::to_port(broker.port())?;
        proxy.set(Link {
            delay: Duration::from_millis(50),
            jitter: Duration::from_millis(20),
            ..Link::default()
        });
        let mut client = RawMqtt::connect(proxy.port(), "proxy-test", WAIT)?;
        let outcome = client.publish("proxy/test", b"hello".to_vec(), WAIT)?;
        ensure!(outcome == RawOutcome::Acked, "{outcome:?}");
        let stats = proxy.wait_stats("counting both ways", WAIT, |s| {
            s.bytes_up > 0 && s.bytes_down > 0
        })?;
        ensure!(stats.accepted == 1, "{stats:?}");

        proxy.cut();
        let outcome = client.publish("proxy/test", b"lost".to_vec(), WAIT)?;
        ensure!(
            matches!(outcome, RawOutcome::Dropped(_)),
            "publish over a cut link: {outcome:?}"
        );

        proxy.restore();
        let mut client = RawMqtt::connect(proxy.port(), "proxy-test-2", WAIT)?;
        let outcome = client.publish("proxy/test", b"back".to_vec(), WAIT)?;
        ensure!(outcome == RawOutcome::Acked, "{outcome:?}");
        Ok(())
    });
}
