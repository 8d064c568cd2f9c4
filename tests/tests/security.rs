//! The attack matrix, on the coordinator's embedded broker and on mosquitto: a separate attacker process (`edge-attacker`, holding nothing but the
//! network, the wire formats, what it captures and, for one row, a stolen fleet claim key) on the
//! same broker as a real coordinator and five real, enrolled agents, while a group rollout and a
//! federated task run and the agents publish readings. Every attempt must be refused and counted,
//! and the legitimate traffic must be unaffected: every reading delivered once, the rollout
//! healthy, the federated task finished with the real devices' updates.
//!
//! The matrix is printed as a table (attempt, expected, observed) and written to
//! `security-matrix.txt` in the test's directory.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use edge_testmodels::onnx_builder;
use edge_tests::enroll::{coordinator_enrollment, coordinator_identity, write_claim_key};
use edge_tests::{
    Agent, AgentOptions, Class, Coordinator, DeliveryReport, Event, FEATURES_MODULE, FlTask,
    Journal, Mosquitto, PipelineDir, SigningKey, TestEnv, deploy, features_pipeline,
    federated_agent, federated_data, offload_coordinator_config, offloading_agent, run_test,
    task_finished, test_messages,
};

const WAIT: Duration = Duration::from_secs(90);
const LAB: [&str; 2] = ["sec-a", "sec-b"];
const FL: [&str; 2] = ["sec-fl-1", "sec-fl-2"];
const OFFLOADER: &str = "sec-off";
const SYBILS: usize = 30;
const MAX_PENDING: usize = 20;
const FLOOD: usize = 10_000;

#[test]
fn attacks_are_refused_and_counted_while_the_fleet_works() {
    run_test("security_matrix", |env| scenario(env, Broker::Embedded));
}

#[test]
fn attacks_through_mosquitto_are_refused_and_counted() {
    // Fails (does not skip) without mosquitto: `cargo xtask test` provisions it.
    run_test("security_matrix_mosquitto", |env| {
        scenario(env, Broker::Mosquitto)
    });
}

/// Where the attacker, the agents and the coordinator meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broker {
    Embedded,
    Mosquitto,
}

/// One row of the printed matrix.
struct Row {
    attempt: String,
    expected: &'static str,
    observed: String,
    ok: bool,
}

struct Matrix(Vec<Row>);

impl Matrix {
    fn row(
        &mut self,
        attempt: impl Into<String>,
        expected: &'static str,
        ok: bool,
        observed: String,
    ) {
        self.0.push(Row {
            attempt: attempt.into(),
            expected,
            observed,
            ok,
        });
    }

    fn render(&self) -> String {
        let w = |f: &dyn Fn(&Row) -> usize, min: usize| {
            self.0.iter().map(f).max().unwrap_or(0).max(min)
        };
        let (wa, we) = (w(&|r| r.attempt.len(), 7), w(&|r| r.expected.len(), 8));
        let mut out = format!("{:<wa$}  {:<we$}  observed\n", "attempt", "expected");
        out.push_str(&format!(
            "{}  {}  {}\n",
            "-".repeat(wa),
            "-".repeat(we),
            "-".repeat(40)
        ));
        for r in &self.0 {
            out.push_str(&format!(
                "{:<wa$}  {:<we$}  {}{}\n",
                r.attempt,
                r.expected,
                if r.ok { "" } else { "FAILED: " },
                r.observed
            ));
        }
        out
    }
}

/// Runs one attack in its own process; returns its JSON summary line.
fn attacker(port: u16, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-attacker"))
        .arg(port.to_string())
        .args(args)
        .output()
        .context("cannot run edge-attacker")?;
    ensure!(
        out.status.success(),
        "edge-attacker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("attacker said {text:?}"))
}

/// Starts a capture in the background (it waits for the first message on `filter`).
fn start_capture(port: u16, filter: &str, file: &Path) -> Result<std::process::Child> {
    Command::new(env!("CARGO_BIN_EXE_edge-attacker"))
        .arg(port.to_string())
        .args(["capture", filter])
        .arg(file)
        .spawn()
        .context("cannot start edge-attacker capture")
}

/// Authentication refusals the coordinator journaled, by reason, summed over its periodic
/// `auth_rejected` events.
fn refused(events: &[Event]) -> std::collections::BTreeMap<String, u64> {
    let mut total = std::collections::BTreeMap::new();
    for e in events.iter().filter(|e| e.is("auth_rejected")) {
        if let Some(counts) = e.raw.get("reasons").and_then(|v| v.as_object()) {
            for (reason, n) in counts {
                *total.entry(reason.clone()).or_insert(0) += n.as_u64().unwrap_or(0);
            }
        }
    }
    total
}

fn refused_total(events: &[Event]) -> u64 {
    refused(events).values().sum()
}

/// Waits until the coordinator's refusals grew by at least `n` over `before`; returns the
/// growth by reason.
fn wait_refused(
    journal: &mut Journal,
    before: &std::collections::BTreeMap<String, u64>,
    n: u64,
    what: &str,
) -> Result<String> {
    let base: u64 = before.values().sum();
    journal.wait_for(&format!("{n} refusals for {what}"), WAIT, |j| {
        refused_total(j) >= base + n
    })?;
    let now = refused(journal.events());
    let grown: Vec<String> = now
        .iter()
        .filter_map(|(r, c)| {
            let d = c - before.get(r).copied().unwrap_or(0);
            (d > 0).then(|| format!("{r} {d}"))
        })
        .collect();
    Ok(grown.join(", "))
}

/// The newest telemetry of `device` after journal position `from` with `path` (`a.b`) set.
fn telemetry_u64(events: &[Event], device: &str, from: usize, path: &[&str]) -> Option<u64> {
    events[from.min(events.len())..]
        .iter()
        .rev()
        .filter(|e| e.is_for("telemetry", device))
        .find_map(|e| {
            path.iter()
                .try_fold(&e.raw, |v, k| v.get(*k))
                .and_then(|v| v.as_u64())
        })
}

/// Sum of the agent's own authentication refusals in its newest telemetry after `from`.
fn agent_refusals(events: &[Event], device: &str, from: usize) -> Option<u64> {
    events[from.min(events.len())..]
        .iter()
        .rev()
        .filter(|e| e.is_for("telemetry", device))
        .find_map(|e| {
            e.raw
                .get("auth")?
                .get("rejected")?
                .as_object()
                .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        })
}

fn scenario(env: &TestEnv, kind: Broker) -> Result<()> {
    let mut m = Matrix(Vec::new());
    let files = env.path("files");
    std::fs::create_dir_all(files.join("models"))?;

    // The coordinator: offload service, the harness's claims, a small pending cap.
    let offload_model = files.join("models/mlp.onnx");
    std::fs::write(
        &offload_model,
        onnx_builder::mlp(&onnx_builder::mlp_layers(&[64, 32, 10], 1)),
    )?;
    let config = files.join("coordinator.toml");
    let mut root: toml::Table = toml::from_str(&offload_coordinator_config(&offload_model))?;
    let mut enrollment = coordinator_enrollment()?;
    enrollment.insert(
        "max_pending".into(),
        toml::Value::Integer(MAX_PENDING as i64),
    );
    root.insert("enrollment".into(), toml::Value::Table(enrollment));
    std::fs::write(&config, toml::to_string(&root)?)?;
    let coord_dir = env.path("coordinator");
    // Made before the first start, so every agent pins it instead of trusting on first use.
    let pin = coordinator_identity(&coord_dir.join("state"))?;
    let args = vec!["--config".into(), config.display().to_string()];
    let broker = match kind {
        Broker::Mosquitto => Some(Mosquitto::start(&env.path("mosquitto"))?),
        Broker::Embedded => None,
    };
    let coord = match &broker {
        Some(b) => Coordinator::start_external_with_args(&coord_dir, &b.url(), args)?,
        None => Coordinator::start_embedded_with_args(&coord_dir, args)?,
    };
    let port = match &broker {
        Some(b) => b.port(),
        None => coord.port().context("coordinator port")?,
    };
    let mut journal = coord.journal();
    let key = SigningKey::generate(&env.path("keys/deploy.key"))?;

    // The fleet: two lab agents for the rollout, two federated agents, one offloading agent.
    let mut agents = Vec::new();
    for d in LAB {
        let mut o = AgentOptions::new(d, coord.url());
        o.telemetry_interval_s = 1;
        o.coordinator_key = Some(pin.clone());
        o.trust_deployments(&key, &["lab"], 1000);
        agents.push(Agent::start(&env.path(d), o)?);
    }
    let task_dir = env.path("task");
    let fl_model = onnx_builder::mlp(&onnx_builder::mlp_layers(&[64, 32, 10], 1));
    let (digits, shards) = federated_data(
        &task_dir,
        FL.len(),
        edge_tests::digits::Split::Iid,
        &fl_model,
    )?;
    let mut fl_agents = Vec::new();
    for (d, shard) in FL.iter().zip(&shards) {
        let mut o = AgentOptions::new(*d, coord.url());
        o.telemetry_interval_s = 1;
        o.coordinator_key = Some(pin.clone());
        federated_agent(
            &mut o,
            &env.path(&format!("pipelines/{d}")),
            &digits,
            shard,
            &fl_model,
            &key,
        )?;
        fl_agents.push(Agent::start(&env.path(d), o)?);
    }
    let off_pipeline = files.join("offload-pipeline.toml");
    std::fs::write(&off_pipeline, edge_tests::OFFLOAD_PIPELINE)?;
    std::fs::copy(&offload_model, files.join("models/mlp.onnx")).ok();
    let mut o = AgentOptions::new(OFFLOADER, coord.url());
    o.telemetry_interval_s = 1;
    o.coordinator_key = Some(pin.clone());
    offloading_agent(&mut o, &off_pipeline)?;
    let offloader = Agent::start(&env.path(OFFLOADER), o)?;
    for d in LAB.iter().chain(&FL).chain([&OFFLOADER]) {
        journal.wait_registered(d, WAIT)?;
    }

    // Captures for the replays, listening before anything is sent.
    let round_file = files.join("round.json");
    let update_file = files.join("update.json");
    let mut cap_update =
        start_capture(port, &protocol::v1::topics::fl_update(FL[0]), &update_file)?;

    // The legitimate work that must finish during the attack.
    FlTask {
        round_interval_s: 1,
        ..FlTask::new("secure", 3, FL.len())
    }
    .start(&coord, &task_dir, &key)?;
    let pdir = PipelineDir::create(
        &files.join("rollout"),
        &features_pipeline("vibration", "raw"),
        &[FEATURES_MODULE],
    )?;
    let mut cap_round = start_capture(port, &protocol::v1::topics::fl_round(FL[0]), &round_file)?;

    std::thread::scope(|scope| -> Result<()> {
        let rollout = scope.spawn(|| {
            deploy(
                &coord,
                &["--group", "lab"],
                &pdir,
                &key,
                1,
                &[
                    "--health-messages",
                    "10",
                    "--health-seconds",
                    "0",
                    "--timeout-s",
                    "180",
                ],
            )
        });
        let mark = journal.len();
        let legit: Vec<_> = agents
            .iter()
            .map(|a| {
                let msgs = test_messages(
                    &format!("legit-{}", a.device_id()),
                    200,
                    &[Class::Control, Class::Results, Class::Telemetry],
                );
                a.api()
                    .and_then(|mut api| api.publish_all(&msgs, 20))
                    .map(|e| (a.device_id().to_owned(), e))
            })
            .collect::<Result<_>>()?;

        // 1. Impersonation on every device topic.
        let before = refused(journal.events());
        let r = attacker(port, &["impersonate", LAB[0]])?;
        let sent = r["sent"].as_u64().unwrap_or(0);
        let grown = wait_refused(&mut journal, &before, sent, "impersonation")?;
        let forged_seen = journal.events()[mark..].iter().any(|e| {
            (e.is_for("data", LAB[0]) && e.str_field("stream") == Some("forged"))
                || e.is_for("offline", LAB[0])
                || (e.is_for("registered", LAB[0]) && e.str_field("agent_version") == Some("evil"))
        });
        m.row(
            format!(
                "impersonate {} on its 8 device topics ({sent} msgs, bare and forged MAC)",
                LAB[0]
            ),
            "all refused, counted",
            !forged_seen,
            format!("refused: {grown}; forged data/status/registration in journal: {forged_seen}"),
        );

        // 2-3. Enrolling an enrolled id under a new key, without and with a stolen claim.
        let stolen = write_claim_key(&files.join("stolen-claim.key"), &["lab"])?;
        for (label, args) in [
            (
                "register as an enrolled device with a new key",
                vec!["enroll-as", LAB[1]],
            ),
            (
                "same, with a claim key stolen from an image",
                vec!["enroll-as", LAB[1], stolen.to_str().context("utf-8")?],
            ),
        ] {
            let from = journal.len();
            attacker(port, &args)?;
            let e = journal.wait_for_event("enrollment_conflict", from, WAIT, |e| {
                e.is_for("enrollment_conflict", LAB[1])
            })?;
            m.row(
                label,
                "refused, reported",
                true,
                format!(
                    "enrollment_conflict: key {} refused, {} kept",
                    e.str_field("key_id").unwrap_or("-"),
                    e.str_field("enrolled_key_id").unwrap_or("-")
                ),
            );
        }

        // 4. Sybils: new ids without a claim.
        let from = journal.len();
        let before = refused(journal.events());
        attacker(port, &["sybil", &SYBILS.to_string()])?;
        // The first MAX_PENDING wait for an operator; the rest are refused (`max_pending`); the
        // telemetry of all of them is refused (`not_enrolled` or `unenrolled`).
        journal.wait_for("the Sybils' requests answered", WAIT, |j| {
            j[from.min(j.len())..]
                .iter()
                .filter(|e| {
                    e.is("enrollment_pending")
                        && e.device.as_deref().is_some_and(|d| d.starts_with("sybil-"))
                })
                .count()
                >= MAX_PENDING
        })?;
        let overflow = (SYBILS - MAX_PENDING) as u64;
        let grown = wait_refused(&mut journal, &before, SYBILS as u64 + overflow, "Sybils")?;
        let events = &journal.events()[from..];
        let count = |k: &str| {
            events
                .iter()
                .filter(|e| e.is(k) && e.device.as_deref().is_some_and(|d| d.starts_with("sybil-")))
                .count()
        };
        let (enrolled, pending) = (count("device_enrolled"), count("enrollment_pending"));
        m.row(
            format!("{SYBILS} Sybil enrollments without a claim, then their telemetry"),
            "none enrolled, pending capped",
            enrolled == 0 && pending == MAX_PENDING && grown.contains("max_pending"),
            format!("enrolled {enrolled}, pending {pending}; refused: {grown}"),
        );

        // 5. A forged `healthy` for the rollout.
        let before = refused(journal.events());
        attacker(port, &["forge-status", LAB[1], "forged", "1"])?;
        let grown = wait_refused(&mut journal, &before, 2, "forged status")?;
        m.row(
            "forged deploy status `healthy`",
            "refused, counted",
            true,
            format!("refused: {grown}"),
        );

        // 6. Forged chunks while the rollout downloads.
        attacker(port, &["forge-chunk", LAB[0], "5"])?;
        attacker(port, &["forge-chunk", LAB[1], "5"])?;

        // 7. Forged FL updates for a selected device.
        let before = refused(journal.events());
        attacker(port, &["forge-update", FL[0], "3"])?;
        let grown = wait_refused(&mut journal, &before, 6, "forged updates")?;
        m.row(
            format!("forged FL updates for {} (3 bare, 3 forged MAC)", FL[0]),
            "refused, counted",
            true,
            format!("refused: {grown}"),
        );

        // 8. A captured update, replayed.
        wait_child(&mut cap_update, "update capture")?;
        let before = refused(journal.events());
        attacker(port, &["replay", update_file.to_str().context("utf-8")?])?;
        let grown = wait_refused(&mut journal, &before, 1, "replayed update")?;
        m.row(
            "replayed FL update (captured off the broker)",
            "refused as replay",
            grown.contains("replay"),
            format!("refused: {grown}"),
        );

        // 9. Forged offload answer and capacity advert, at the device.
        let from = journal.len();
        attacker(port, &["forge-offload", OFFLOADER])?;
        journal.wait_for("the offloader counts the forgeries", WAIT, |j| {
            agent_refusals(j, OFFLOADER, from).unwrap_or(0) >= 2
        })?;
        m.row(
            "forged offload response and capacity advert",
            "dropped by the device, counted",
            true,
            format!(
                "{OFFLOADER} auth refusals: {}",
                agent_refusals(journal.events(), OFFLOADER, from).unwrap_or(0)
            ),
        );

        // 10. The flood, with readings published at the same time.
        let before = refused(journal.events());
        let during = scope.spawn(|| -> Result<Vec<(String, Vec<edge_tests::Expected>)>> {
            agents
                .iter()
                .map(|a| {
                    let msgs =
                        test_messages(&format!("flood-{}", a.device_id()), 200, &[Class::Results]);
                    let mut api = a.api()?;
                    Ok((a.device_id().to_owned(), api.publish_all(&msgs, 5)?))
                })
                .collect()
        });
        let r = attacker(port, &["flood", LAB[0], &FLOOD.to_string()])?;
        let grown = wait_refused(
            &mut journal,
            &before,
            r["acked"].as_u64().unwrap_or(0),
            "flood",
        )?;
        let during = during
            .join()
            .map_err(|_| anyhow::anyhow!("publisher thread panicked"))??;
        m.row(
            format!("flood of {FLOOD} unauthenticated messages"),
            "all refused, counted",
            r["acked"].as_u64() == Some(FLOOD as u64),
            format!("broker acked {}, refused: {grown}", r["acked"]),
        );

        // The legitimate work finished correctly.
        let run = rollout
            .join()
            .map_err(|_| anyhow::anyhow!("rollout thread panicked"))??;
        ensure!(
            run.success,
            "the rollout failed during the attack:\n{}\n{}",
            run.stdout,
            run.stderr
        );
        let dropped: u64 = LAB
            .iter()
            .map(|d| {
                journal
                    .events()
                    .iter()
                    .filter(|e| e.is_for("deploy", d))
                    .filter_map(|e| e.raw.get("chunks_dropped").and_then(|v| v.as_u64()))
                    .max()
                    .unwrap_or(0)
            })
            .sum();
        m.row(
            "forged chunks, 5 per lab device, during the rollout",
            "rollout healthy on v1",
            true,
            format!(
                "deploy --wait succeeded; chunks the agents dropped as forged: {dropped} (the rest came \
                 after their download; tests/tests/deploy.rs forces the overlap)"
            ),
        );
        journal.wait_for("the federated task finished", WAIT * 2, |j| {
            task_finished(j, "secure")
        })?;
        let updates = journal
            .events()
            .iter()
            .filter(|e| e.is("fl_update") && e.str_field("task") == Some("secure"))
            .count();
        m.row(
            "(federated task during the attack)",
            "3 rounds, real updates only",
            updates == 3 * FL.len(),
            format!("{updates} updates accepted"),
        );
        for (d, expected) in &legit {
            let mut all = expected.clone();
            all.extend(
                during
                    .iter()
                    .filter(|(x, _)| x == d)
                    .flat_map(|(_, e)| e.iter().cloned()),
            );
            journal.wait_for_data_ids(d, all.iter().map(|x| x.id.as_str()), WAIT)?;
            DeliveryReport::check(&journal, d, &all).ensure_ok()?;
        }
        m.row(
            "(400 readings from each lab agent, 200 during the flood)",
            "each delivered once",
            true,
            "all delivered once".into(),
        );
        Ok(())
    })?;

    // 11. A captured round message, replayed (retained) after the task moved on, then across a
    // restart of the device.
    wait_child(&mut cap_round, "round capture")?;
    let from = journal.len();
    attacker(port, &["replay", round_file.to_str().context("utf-8")?])?;
    journal.wait_for("the device refuses the old round", WAIT, |j| {
        telemetry_u64(j, FL[0], from, &["fl", "rejected"]).unwrap_or(0) >= 1
    })?;
    m.row(
        "replayed (retained) round message",
        "refused by the device",
        true,
        "fl.rejected >= 1".into(),
    );
    let from = journal.len();
    fl_agents[0].stop()?;
    fl_agents[0].restart()?;
    journal.wait_for("the restarted device refuses it again", WAIT, |j| {
        telemetry_u64(j, FL[0], from, &["fl", "rejected"]).unwrap_or(0) >= 1
    })?;
    m.row(
        "same, after the device restarts",
        "still refused (persisted)",
        true,
        "fl.rejected >= 1 after restart".into(),
    );

    for a in agents.iter_mut().chain(fl_agents.iter_mut()) {
        ensure!(a.is_running(), "{} exited during the attack", a.device_id());
    }
    drop(offloader);
    let table = format!("broker: {kind:?}\n{}", m.render());
    println!("\n{table}");
    std::fs::write(env.path("security-matrix.txt"), &table)?;
    if m.0.iter().any(|r| !r.ok) {
        bail!("attack matrix has failures:\n{table}");
    }
    Ok(())
}

fn wait_child(child: &mut std::process::Child, what: &str) -> Result<()> {
    let status = child
        .wait()
        .with_context(|| format!("{what} did not finish"))?;
    ensure!(status.success(), "{what} failed");
    Ok(())
}
