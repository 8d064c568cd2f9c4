//! End-to-end acknowledgements: a device keeps every message until the coordinator says it
//! has committed it, so nothing accepted is lost whatever the broker does.
//!
//! - A mosquitto without persistence, restarted twice, loses every session and what it had
//!   queued (messages it already PUBACKed included); the coordinator restarts twice (one
//!   SIGKILL), the agent is SIGKILLed at random points. Every accepted message arrives exactly
//!   once, in order per class.
//! - The embedded broker dies with its coordinator: SIGKILLed repeatedly while two agents
//!   publish. The same result.
//! - The ack stream is lost: a link proxy drops everything the broker sends to the device
//!   while its publishes still arrive. The coordinator has the messages; the device keeps them
//!   (its telemetry shows them) and, once the link is back, sends them again and its outbox
//!   drains, each message still journaled once as data.

use std::time::Duration;

use anyhow::Context;
use edge_tests::{
    Agent, AgentOptions, Class, Coordinator, Event, Expected, Journal, Link, LinkProxy, Mosquitto,
    START_TIMEOUT, run_test, test_messages,
};
use rand::{Rng, SeedableRng};

const CLASSES: [Class; 3] = [Class::Control, Class::Results, Class::Telemetry];

/// A short ack timeout, so a lost message is sent again within the test's patience (the
/// default is 10 s).
fn options(device: &str, url: String) -> AgentOptions {
    let mut o = AgentOptions::new(device, url);
    o.telemetry_interval_s = 1;
    o.extra = "[mqtt]\nack_timeout_ms = 1500\n"
        .parse()
        .expect("valid toml");
    o
}

fn seed() -> u64 {
    match std::env::var("EDGE_TESTS_SEED") {
        Ok(s) => s.parse().unwrap_or(1),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

#[test]
fn mosquitto_without_persistence_loses_nothing_accepted() {
    run_test("e2e_acks_volatile_mosquitto", |env| {
        let seed = seed();
        eprintln!("seed {seed} (EDGE_TESTS_SEED={seed} replays the kill points)");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut broker = Mosquitto::start_volatile(&env.path("mosquitto"))?;
        let mut coord = Coordinator::start_external(&env.path("coordinator"), &broker.url())?;
        let mut agent = Agent::start(&env.path("agent"), options("d1", broker.url()))?;
        let mut journal = coord.journal();
        journal.wait_registered("d1", START_TIMEOUT)?;

        // 1,000 results in 40 chunks; the broker restarts at chunks 10 and 26, the
        // coordinator at 16 (stopped) and 32 (SIGKILL), the agent is killed at 8 random chunks.
        let msgs = test_messages("volatile", 1000, &CLASSES);
        let mut agent_kills: Vec<usize> = (0..8).map(|_| rng.gen_range(1..40)).collect();
        agent_kills.sort_unstable();
        let mut expected: Vec<Expected> = Vec::new();
        let (mut broker_restarts, mut coord_restarts, mut kills) = (0, 0, 0);
        for (i, chunk) in msgs.chunks(25).enumerate() {
            match i {
                10 | 26 => {
                    broker.stop()?;
                    std::thread::sleep(Duration::from_millis(rng.gen_range(100..800)));
                    broker.start_again()?;
                    broker_restarts += 1;
                }
                16 => {
                    coord.stop()?;
                    coord.start()?;
                    coord_restarts += 1;
                }
                32 => {
                    coord.kill()?;
                    coord.start()?;
                    coord_restarts += 1;
                }
                _ => {}
            }
            expected.extend(agent.api()?.publish_all(chunk, 25)?);
            // Let some of it be in flight when the next fault comes.
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
            while agent_kills.first() == Some(&i) {
                agent_kills.remove(0);
                agent.kill()?;
                agent.restart()?;
                kills += 1;
            }
        }
        eprintln!(
            "accepted {}, agent SIGKILLs {kills}, broker restarts {broker_restarts}, coordinator restarts {coord_restarts}",
            expected.len()
        );
        anyhow::ensure!(expected.len() == 1000, "every message accepted");
        // On failure `run_test` dumps the coordinator's, broker's and agent's logs.
        journal.expect_delivered("d1", &expected)
    });
}

#[test]
fn embedded_broker_coordinator_killed_repeatedly_loses_nothing() {
    run_test("e2e_acks_embedded_kills", |env| {
        let mut coord = Coordinator::start_embedded(&env.path("coordinator"))?;
        let devices = ["d1", "d2"];
        let mut agents = Vec::new();
        for d in devices {
            agents.push(Agent::start(&env.path(d), options(d, coord.url()))?);
        }
        let mut journal = coord.journal();
        for d in devices {
            journal.wait_registered(d, START_TIMEOUT)?;
        }
        let mut expected: Vec<Vec<Expected>> = vec![Vec::new(); devices.len()];
        let msgs = test_messages("embedded", 300, &CLASSES);
        for (i, chunk) in msgs.chunks(20).enumerate() {
            for (n, agent) in agents.iter().enumerate() {
                expected[n].extend(agent.api()?.publish_all(chunk, 20)?);
            }
            if i % 4 == 3 {
                // Mid-stream: whatever the broker PUBACKed and had not handed over dies here.
                std::thread::sleep(Duration::from_millis(30));
                coord.kill()?;
                coord.start()?;
            }
        }
        for (n, d) in devices.iter().enumerate() {
            journal.expect_delivered(d, &expected[n])?;
        }
        Ok(())
    });
}

#[test]
fn lost_acks_keep_messages_until_the_link_is_back() {
    run_test("e2e_acks_lost_downstream", |env| {
        let coord = Coordinator::start_embedded(&env.path("coordinator"))?;
        let port = coord.port().context("embedded broker port")?;
        let proxy = LinkProxy::to_port(port)?;
        let agent = Agent::start(&env.path("agent"), options("d1", proxy.url()))?;
        let mut journal = coord.journal();
        journal.wait_registered("d1", START_TIMEOUT)?;

        let first = agent
            .api()?
            .publish_all(&test_messages("before", 40, &[Class::Results]), 20)?;
        journal.expect_delivered("d1", &first)?;

        // Nothing comes back to the device; its publishes still arrive.
        proxy.set(Link {
            drop_down: true,
            ..Link::default()
        });
        let lost = agent
            .api()?
            .publish_all(&test_messages("lost", 40, &[Class::Results]), 20)?;
        journal.wait_for_data_ids("d1", lost.iter().map(|x| x.id.as_str()), START_TIMEOUT)?;
        // The coordinator has them, the device still holds them: its telemetry says so.
        let results = Class::Results.index();
        let since = journal.len();
        let held = wait_telemetry(&mut journal, since, |depth| depth[results] >= 40)?;
        eprintln!("while acks are lost: outbox depth {held:?}");

        proxy.set(Link::default());
        let since = journal.len();
        wait_telemetry(&mut journal, since, |depth| depth[results] == 0)?;
        let all: Vec<Expected> = first.into_iter().chain(lost).collect();
        journal.expect_delivered("d1", &all)?;
        let duplicates = journal.count("duplicate", "d1");
        eprintln!("sent again and dropped as duplicates: {duplicates}");
        anyhow::ensure!(
            duplicates > 0,
            "the device sent the unacknowledged messages again"
        );
        Ok(())
    });
}

/// Waits for a telemetry event from d1 after `since` whose outbox depth satisfies `ok`.
fn wait_telemetry(
    journal: &mut Journal,
    since: usize,
    ok: impl Fn(&[u64]) -> bool,
) -> anyhow::Result<Vec<u64>> {
    let depth = |e: &Event| -> Vec<u64> {
        e.raw
            .get("outbox_depth")
            .and_then(|d| d.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default()
    };
    let event = journal.wait_for_event(
        "telemetry from d1 with the expected outbox depth",
        since,
        START_TIMEOUT,
        |e| {
            e.is_for("telemetry", "d1") && {
                let d = depth(e);
                d.len() == 4 && ok(&d)
            }
        },
    )?;
    Ok(depth(&event))
}
