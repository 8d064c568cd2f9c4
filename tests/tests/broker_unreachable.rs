//! An agent that starts while its broker is unreachable still accepts messages, and delivers
//! them (and its registration) once the coordinator comes up on the configured port.

use edge_tests::{
    Agent, AgentOptions, Class, Coordinator, DELIVERY_TIMEOUT, DeliveryReport, START_TIMEOUT,
    free_port, run_test, test_messages,
};

#[test]
fn broker_unreachable_at_start() {
    run_test("broker_unreachable_at_start", |env| {
        // Nothing listens here until the coordinator starts on it below.
        let port = free_port()?;
        let agent = Agent::start(
            &env.path("agent"),
            AgentOptions::new("d1", format!("mqtt://127.0.0.1:{port}")),
        )?;
        let msgs = test_messages(
            "early",
            60,
            &[Class::Control, Class::Results, Class::Telemetry],
        );
        let expected = agent.api()?.publish_all(&msgs, 20)?;

        let coord = Coordinator::start_embedded_at(&env.path("coordinator"), port)?;
        let mut journal = coord.journal();
        journal.wait_for_data_ids(
            "d1",
            expected.iter().map(|x| x.id.as_str()),
            DELIVERY_TIMEOUT,
        )?;
        journal.wait_registered("d1", START_TIMEOUT)?;
        DeliveryReport::check(&journal, "d1", &expected).ensure_ok()
    });
}
