//! Offline/reconnect: the broker goes away, the agent keeps accepting messages into its
//! outbox, the broker comes back and every accepted message arrives exactly once, in seq
//! order within its class. Once with the coordinator's embedded broker (the coordinator is
//! the broker, so it is stopped and restarted), once with mosquitto (the coordinator stays
//! up; only the broker restarts, with its persistence).

use edge_tests::{
    Agent, AgentOptions, Class, Coordinator, Mosquitto, START_TIMEOUT, run_test, test_messages,
};

/// Messages published while the broker is down.
const M: usize = 200;
const CLASSES: [Class; 3] = [Class::Control, Class::Results, Class::Telemetry];

#[test]
fn offline_reconnect_embedded_broker() {
    run_test("offline_reconnect_embedded", |env| {
        let mut coord = Coordinator::start_embedded(&env.path("coordinator"))?;
        let agent = Agent::start(&env.path("agent"), AgentOptions::new("d1", coord.url()))?;
        let mut journal = coord.journal();
        journal.wait_registered("d1", START_TIMEOUT)?;

        coord.stop()?;
        let msgs = test_messages("offline", M, &CLASSES);
        let expected = agent.api()?.publish_all(&msgs, 25)?;

        coord.start()?;
        journal.expect_delivered("d1", &expected)
    });
}

#[test]
fn offline_reconnect_mosquitto() {
    run_test("offline_reconnect_mosquitto", |env| {
        // Fails (does not skip) without mosquitto: `cargo xtask test` provisions it.
        let mut broker = Mosquitto::start(&env.path("mosquitto"))?;
        let coord = Coordinator::start_external(&env.path("coordinator"), &broker.url())?;
        let agent = Agent::start(&env.path("agent"), AgentOptions::new("d1", broker.url()))?;
        let mut journal = coord.journal();
        journal.wait_registered("d1", START_TIMEOUT)?;

        broker.stop()?;
        let msgs = test_messages("offline", M, &CLASSES);
        let expected = agent.api()?.publish_all(&msgs, 25)?;

        broker.start_again()?;
        journal.expect_delivered("d1", &expected)
    });
}
