//! Remote commands end to end, through the CLI against a running `serve` (embedded broker) and
//! real agents: `cmd config`, `cmd restart-pipeline` (refused with a read token, run with an
//! admin one), `cmd log-level` (and its return to the start-up level), `logs --lines`, `logs
//! --follow` seeing new agent log lines and ended by the CLI (SIGINT); a command to an offline
//! device expires, one to an unknown device and one to a revoked device are refused naming
//! why; commands queued for an offline device survive a restart of `serve` (one runs when the
//! device comes back, one whose wait ran out reports expired); a forged command and a replayed one, published by a separate MQTT client, are refused
//! by the agent and counted (its telemetry's authentication counts, through the API).
//!
//! Prints the log-follow latency (the agent's timestamp on a line to the moment the CLI printed
//! it, same clock) as a median of a few lines; no timing is asserted. Also scrapes the agent's own
//! `/metrics` (on a local port) for the refusals it counted.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use edge_tests::api::{ApiClient, start_with_tokens};
use edge_tests::{Agent, AgentOptions, Coordinator, RawMqtt, TestEnv, coordinator_bin, run_test};

const WAIT: Duration = Duration::from_secs(60);
const READ: &str = "edge_read_token_for_the_commands_test";
const ADMIN: &str = "edge_admin_token_for_the_commands_test";
const ONLINE: &str = "cmd-a";
const OTHER: &str = "cmd-b";
/// Log lines whose latency the figure takes the median of.
const SAMPLES: usize = 5;

#[test]
fn remote_commands_work_through_the_cli_and_refuse_what_they_should() {
    run_test("commands", scenario);
}

/// A pipeline without modules: a synthetic sensor into the log sink.
const PIPELINE: &str = r#"
name = "cmdtest"
[[source]]
name = "imu"
kind = "synthetic"
rate_hz = 5
window = 8
[[sink]]
kind = "log"
input = "imu"
every = 1000
"#;

fn scenario(env: &TestEnv) -> Result<()> {
    let coord_dir = env.path("coordinator");
    let mut coord = start_with_tokens(
        &coord_dir,
        "commands-coordinator.toml",
        READ,
        ADMIN,
        toml::Table::new(),
    )?;
    let client = ApiClient::new(coord.api_url()?);
    let state_dir = coord.state_dir();

    let a_dir = env.path(ONLINE);
    std::fs::create_dir_all(&a_dir)?;
    let pipeline = a_dir.join("pipeline.toml");
    std::fs::write(&pipeline, PIPELINE)?;
    let mut opts = AgentOptions::new(ONLINE, coord.url());
    opts.telemetry_interval_s = 1;
    let mut p = toml::Table::new();
    p.insert("file".into(), pipeline.display().to_string().into());
    opts.extra.insert("pipeline".into(), p.into());
    let metrics_port = edge_tests::free_port()?;
    let mut local = toml::Table::new();
    local.insert(
        "metrics_listen".into(),
        format!("127.0.0.1:{metrics_port}").into(),
    );
    opts.extra.insert("local_api".into(), local.into());
    let mut agent = Agent::start(&a_dir, opts)?;
    let mut other = Agent::start(&env.path(OTHER), AgentOptions::new(OTHER, coord.url()))?;
    let mut journal = coord.journal();
    journal.wait_registered(ONLINE, WAIT)?;
    journal.wait_registered(OTHER, WAIT)?;
    wait_online(&client, ONLINE, true)?;

    let cli = Cli {
        state_dir: state_dir.display().to_string(),
    };

    // config: scope read is enough.
    let out = cli.ok(&["cmd", ONLINE, "config"], None)?;
    ensure!(
        out.contains(ONLINE) && out.contains("MqttConfig") && out.contains("state_dir"),
        "config output: {out}"
    );

    // restart-pipeline changes the device: refused with the local (read) token, naming why.
    let refused = cli.run(&["cmd", ONLINE, "restart-pipeline"], None)?;
    ensure!(
        !refused.status.success() && stderr(&refused).contains("scope admin"),
        "restart with a read token: {}",
        stderr(&refused)
    );
    let out = cli.ok(&["cmd", ONLINE, "restart-pipeline"], Some(ADMIN))?;
    ensure!(
        out.contains("pipeline cmdtest restarted"),
        "restart output: {out}"
    );

    // log-level for a while, then back to the start-up filter on its own.
    let out = cli.ok(
        &["cmd", ONLINE, "log-level", "debug", "--for", "2"],
        Some(ADMIN),
    )?;
    ensure!(
        out.contains("log level debug for 2 s, then info"),
        "log-level output: {out}"
    );
    let bad = cli.run(
        &["cmd", ONLINE, "log-level", "debug;x", "--for", "2"],
        Some(ADMIN),
    )?;
    ensure!(
        !bad.status.success() && stderr(&bad).contains("not a log filter"),
        "bad level: {}",
        stderr(&bad)
    );
    wait_until("the log level override to end", || {
        Ok(agent.log().contains("log level override ended"))
    })?;

    // Recent lines from the agent's ring: the commands above were logged there.
    let out = cli.ok(&["logs", ONLINE, "--lines", "200"], None)?;
    ensure!(
        out.contains("running remote command")
            && out.contains("pipeline restarted by a remote command"),
        "logs output: {out}"
    );

    follow(&cli, &client)?;
    forged_and_replayed(&coord, &client)?;

    // The agent's own /metrics shows the same refusals and the commands it ran.
    let page = ApiClient::new(format!("http://127.0.0.1:{metrics_port}")).get("/metrics", None)?;
    ensure!(page.status == 200, "agent /metrics: {page:?}");
    for want in [
        "edge_agent_auth_rejected_total{reason=\"replay\"} ",
        "edge_agent_auth_rejected_total{reason=\"bad_mac\"} ",
        "edge_agent_outbox_depth{class=\"control\"} ",
        "edge_agent_commands_total{outcome=\"accepted\"} ",
    ] {
        ensure!(
            page.body.contains(want),
            "agent /metrics lacks {want}: {}",
            page.body
        );
    }

    // Unknown device.
    let unknown = cli.run(&["cmd", "no-such-device", "config"], None)?;
    ensure!(
        !unknown.status.success() && stderr(&unknown).contains("unknown device no-such-device"),
        "unknown device: {}",
        stderr(&unknown)
    );

    // Offline: the command waits, then expires.
    other.stop()?;
    wait_online(&client, OTHER, false)?;
    let expired = cli.run(&["cmd", OTHER, "config", "--wait-s", "2"], None)?;
    ensure!(
        !expired.status.success() && stderr(&expired).contains("expired"),
        "offline device: {}",
        stderr(&expired)
    );

    // The journal keeps the operator's trail: what was sent, how each ended.
    journal.wait_for("commands in the journal", WAIT, |events| {
        let ended = |device: &str, state: &str| {
            events.iter().any(|e| {
                e.is_for("command_finished", device) && e.str_field("state") == Some(state)
            })
        };
        ended(OTHER, "expired")
            && ended(ONLINE, "done")
            && events.iter().any(|e| {
                e.is_for("command_sent", ONLINE) && e.str_field("kind") == Some("restart-pipeline")
            })
    })?;

    // Commands waiting for an offline device survive a restart of serve: one still within
    // its wait runs when the device comes back; one whose wait ran out reports expired.
    let submit = |wait_s: u64| -> Result<String> {
        let a = client.post(
            &format!("/api/devices/{OTHER}/commands"),
            Some(READ),
            &format!(r#"{{"command": {{"kind": "config"}}, "timeout_s": 30, "wait_s": {wait_s}}}"#),
        )?;
        ensure!(a.status == 202, "submit for offline {OTHER}: {a:?}");
        Ok(a.json()?["id"].as_str().context("command id")?.to_owned())
    };
    let short = submit(1)?;
    let long = submit(300)?;
    let kept = state_dir.join("commands.json");
    wait_until("both commands kept in commands.json", || {
        Ok(std::fs::read_to_string(&kept).is_ok_and(|t| t.contains(&short) && t.contains(&long)))
    })?;
    coord.restart()?;
    let client = ApiClient::new(coord.api_url()?);
    let final_state = |id: &str| -> Result<serde_json::Value> {
        let mut last = serde_json::Value::Null;
        wait_until(&format!("command {id} final after the restart"), || {
            let a = client.get(&format!("/api/commands/{id}?wait_s=5"), Some(READ))?;
            ensure!(a.status == 200, "command {id} after the restart: {a:?}");
            last = a.json()?;
            Ok(!matches!(last["state"].as_str(), Some("queued" | "sent")))
        })?;
        Ok(last)
    };
    let r = final_state(&short)?;
    ensure!(
        r["state"] == "expired" && r["error"].as_str().is_some_and(|e| e.contains("expired")),
        "short command after the restart: {r}"
    );
    let waiting = client
        .get(&format!("/api/commands/{long}"), Some(READ))?
        .json()?;
    ensure!(
        waiting["state"] == "queued",
        "long command after the restart: {waiting}"
    );
    other.restart()?;
    let r = final_state(&long)?;
    ensure!(
        r["state"] == "done",
        "long command once {OTHER} came back: {r}"
    );

    // Revoked.
    let revoke = client.post(
        &format!("/api/enrollment/{OTHER}/revoke"),
        Some(ADMIN),
        "{}",
    )?;
    ensure!(revoke.status == 200, "revoke: {revoke:?}");
    let revoked = cli.run(&["cmd", OTHER, "config"], None)?;
    ensure!(
        !revoked.status.success() && stderr(&revoked).contains("revoked"),
        "revoked device: {}",
        stderr(&revoked)
    );

    // Still answering after all that.
    cli.ok(&["cmd", ONLINE, "config"], None)?;
    agent.stop()?;
    Ok(())
}

/// `logs --follow`: lines the agent writes after the follow began arrive at the CLI; SIGINT
/// ends the follow on the device and the CLI exits cleanly.
fn follow(cli: &Cli, client: &ApiClient) -> Result<()> {
    let mut child = Command::new(coordinator_bin()?)
        .args(["logs", ONLINE, "--follow", "--for", "120", "--state-dir"])
        .arg(&cli.state_dir)
        .env_remove("EDGE_API_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start edge-coordinator logs --follow")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel::<(SystemTime, String)>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((SystemTime::now(), line)).is_err() {
                break;
            }
        }
    });
    let result = (|| -> Result<Vec<f64>> {
        // Each config command makes the agent log "running remote command ... id=ID".
        let mut latencies = Vec::new();
        let mut first = true;
        while latencies.len() < SAMPLES {
            let answer = client.post(
                &format!("/api/devices/{ONLINE}/commands"),
                Some(READ),
                r#"{"command": {"kind": "config"}}"#,
            )?;
            ensure!(answer.status == 202, "submit: {answer:?}");
            let id = answer.json()?["id"]
                .as_str()
                .context("command id")?
                .to_owned();
            // The follow may not be running on the device yet for the first ones: those are
            // sent again until one shows up.
            let deadline = Instant::now() + if first { Duration::from_secs(3) } else { WAIT };
            let mut seen = None;
            while seen.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match rx.recv_timeout(left) {
                    Ok((at, line))
                        if line.contains(&id) && line.contains("running remote command") =>
                    {
                        seen = Some((at, line));
                    }
                    Ok(_) => {}
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the follow's output ended"),
                }
            }
            match seen {
                Some((at, line)) => {
                    first = false;
                    let written = line_time(&line)
                        .with_context(|| format!("no timestamp on the agent's line {line:?}"))?;
                    let printed = at.duration_since(UNIX_EPOCH)?.as_secs_f64();
                    latencies.push((printed - written) * 1000.0);
                }
                None if first => continue,
                None => bail!("the follow did not print the agent's line for command {id}"),
            }
        }
        Ok(latencies)
    })();
    // Ends the follow the way an operator does.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id())?),
        nix::sys::signal::Signal::SIGINT,
    );
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("logs --follow did not exit after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = reader.join();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    let mut latencies = result?;
    ensure!(
        status.success(),
        "logs --follow exited with {status}: {err}"
    );
    latencies.sort_by(f64::total_cmp);
    println!(
        "log-follow latency, agent log line -> CLI output (cargo test -p edge-tests --test commands -- --nocapture): median {:.1} ms of {} lines (min {:.1}, max {:.1})",
        latencies[latencies.len() / 2],
        latencies.len(),
        latencies[0],
        latencies[latencies.len() - 1]
    );
    Ok(())
}

/// A separate MQTT client publishes a command it made up (no valid MAC) and one it recorded
/// on the broker, again: the agent refuses both, and counts them by reason.
fn forged_and_replayed(coord: &Coordinator, client: &ApiClient) -> Result<()> {
    let port = coord.port().context("broker port")?;
    let mut spy = RawMqtt::connect(port, "cmd-attacker", WAIT)?;
    let filter = format!("edge/v1/{ONLINE}/cmd/#");
    spy.subscribe(&filter, WAIT)?;
    let answer = client.post(
        &format!("/api/devices/{ONLINE}/commands"),
        Some(ADMIN),
        r#"{"command": {"kind": "restart-pipeline"}}"#,
    )?;
    ensure!(answer.status == 202, "submit: {answer:?}");
    let (topic, recorded) = spy.wait_publish("the coordinator's command", WAIT, |p| {
        Some((p.topic.clone(), p.payload.to_vec()))
    })?;
    let before = rejected(client)?;
    let body = protocol::v1::auth::body_unverified(&recorded).to_vec();
    // Forged: the body without a trailer, and with a trailer whose MAC is made up.
    let mut made_up = body.clone();
    made_up.extend_from_slice(&recorded[body.len()..]);
    let tag_at = body.len() + 16;
    made_up[tag_at] ^= 0xff;
    spy.publish(&topic, body, WAIT)?;
    spy.publish(&topic, made_up, WAIT)?;
    // Replayed: byte for byte what the coordinator sent.
    spy.publish(&topic, recorded, WAIT)?;
    wait_until(
        "the agent to count the forged and replayed commands",
        || {
            let now = rejected(client)?;
            let more = |reason: &str| {
                now.get(reason).copied().unwrap_or(0) > before.get(reason).copied().unwrap_or(0)
            };
            Ok(more("no_trailer") && more("bad_mac") && more("replay"))
        },
    )?;
    Ok(())
}

/// The agent's counts of incoming messages that did not authenticate, from its telemetry.
fn rejected(client: &ApiClient) -> Result<std::collections::BTreeMap<String, u64>> {
    let a = client.get(&format!("/api/devices/{ONLINE}"), Some(READ))?;
    ensure!(a.status == 200, "device detail: {a:?}");
    let v = a.json()?;
    Ok(v["telemetry"]["body"]["auth"]["rejected"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default())
}

fn wait_online(client: &ApiClient, device: &str, online: bool) -> Result<()> {
    wait_until(&format!("{device} online={online}"), || {
        let a = client.get(&format!("/api/devices/{device}"), Some(READ))?;
        Ok(a.status == 200 && a.json()?["online"] == online)
    })
}

fn wait_until(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `edge-coordinator` against the running serve's state directory.
struct Cli {
    state_dir: String,
}

impl Cli {
    fn run(&self, args: &[&str], token: Option<&str>) -> Result<Output> {
        let mut c = Command::new(coordinator_bin()?);
        c.args(args).args(["--state-dir", &self.state_dir]);
        c.env_remove("EDGE_API_TOKEN");
        if let Some(t) = token {
            c.env("EDGE_API_TOKEN", t);
        }
        c.output()
            .with_context(|| format!("cannot run edge-coordinator {}", args.join(" ")))
    }

    fn ok(&self, args: &[&str], token: Option<&str>) -> Result<String> {
        let out = self.run(args, token)?;
        ensure!(
            out.status.success(),
            "edge-coordinator {} failed: {}",
            args.join(" "),
            stderr(&out)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Seconds since the epoch of a line's leading RFC 3339 UTC timestamp
/// (`2026-01-02T03:04:05.678901Z ...`, the agent's log format).
fn line_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let s: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + s)
}

#[test]
fn line_time_reads_the_agent_timestamp() {
    assert_eq!(line_time("1970-01-01T00:00:01.5Z  INFO x"), Some(1.5));
    assert_eq!(
        line_time("2026-12-06T06:40:01.000000Z  INFO edge_agent: hi"),
        Some(1_796_539_201.0)
    );
    assert_eq!(line_time("no timestamp"), None);
}
