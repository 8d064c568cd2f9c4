//! A corrupted outbox at start: with `on_corruption = "refuse"` the agent exits non-zero and
//! names the directory (leaving the evidence alone); with `"quarantine"` it moves the
//! directory aside to `outbox.corrupt-*`, starts empty and delivers new messages.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, bail, ensure};
use edge_tests::{
    Agent, AgentOptions, Class, Coordinator, START_TIMEOUT, TestEnv, run_test, test_messages,
};

/// What `conf` is overwritten with: no `key: value` lines, so sled cannot parse it.
const GARBAGE_CONF: &[u8] = b"this is not a sled config\n\x00\x01\x02 garbage garbage garbage\n";

/// Runs an agent once so its outbox holds real data, stops it, and damages the outbox.
fn corrupted_agent(env: &TestEnv, coord: &Coordinator) -> anyhow::Result<Agent> {
    let mut agent = Agent::start(&env.path("agent"), AgentOptions::new("d1", coord.url()))?;
    let msgs = test_messages("before", 30, &[Class::Results, Class::Telemetry]);
    agent.api()?.publish_all(&msgs, 10)?;
    agent.stop()?;
    corrupt(&agent.outbox_dir())?;
    Ok(agent)
}

/// Overwrites sled's `conf` with garbage and scribbles over parts of `db`.
fn corrupt(outbox: &Path) -> anyhow::Result<()> {
    let conf = outbox.join("conf");
    let db = outbox.join("db");
    ensure!(
        conf.is_file() && db.is_file(),
        "expected sled files conf and db in {}",
        outbox.display()
    );
    std::fs::write(&conf, GARBAGE_CONF)
        .with_context(|| format!("cannot overwrite {}", conf.display()))?;
    let len = std::fs::metadata(&db)?.len();
    let mut f = std::fs::OpenOptions::new().write(true).open(&db)?;
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    for offset in [0, len / 3, len / 2] {
        f.seek(SeekFrom::Start(offset))?;
        f.write_all(&noise[..noise.len().min((len - offset).max(1) as usize)])?;
    }
    f.sync_all()?;
    Ok(())
}

#[test]
fn corrupted_outbox_refuse_exits_naming_the_directory() {
    run_test("corrupted_outbox_refuse", |env| {
        let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
        let mut agent = corrupted_agent(env, &coord)?;
        agent.reconfigure(|o| o.on_corruption = Some("refuse".into()))?;
        agent.respawn()?;
        let status = match agent.wait_exit(START_TIMEOUT) {
            Ok(status) => status,
            Err(_) => bail!(
                "with on_corruption=\"refuse\" the agent kept running on a corrupted outbox; its log:\n{}",
                agent.last_log()
            ),
        };
        let log = agent.last_log();
        ensure!(
            !status.success(),
            "with on_corruption=\"refuse\" the agent exited with {status}; its log:\n{log}"
        );
        let outbox = agent.outbox_dir();
        let outbox = outbox.to_str().context("utf-8 path")?;
        ensure!(
            log.contains(outbox),
            "the agent refused to start but its stderr does not name the outbox directory {outbox}:\n{log}"
        );
        ensure!(
            std::fs::read(agent.outbox_dir().join("conf"))? == GARBAGE_CONF,
            "\"refuse\" must leave the corrupted outbox as it was"
        );
        Ok(())
    });
}

#[test]
fn corrupted_outbox_quarantine_moves_it_aside() {
    run_test("corrupted_outbox_quarantine", |env| {
        let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
        let mut agent = corrupted_agent(env, &coord)?;
        agent.reconfigure(|o| o.on_corruption = Some("quarantine".into()))?;
        agent.restart()?;
        let quarantined: Vec<String> = std::fs::read_dir(agent.state_dir())?
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| n.starts_with("outbox.corrupt-"))
            .collect();
        ensure!(
            quarantined.len() == 1,
            "expected one outbox.corrupt-* directory in {}, found {quarantined:?}",
            agent.state_dir().display()
        );

        // Back in business with an empty outbox.
        let msgs = test_messages("after", 10, &[Class::Control, Class::Results]);
        let expected = agent.api()?.publish_all(&msgs, 10)?;
        let mut journal = coord.journal();
        journal.expect_delivered("d1", &expected)
    });
}
