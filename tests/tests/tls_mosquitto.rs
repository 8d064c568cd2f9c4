//! Mutual TLS with a real mosquitto: the coordinator and an agent that present a client
//! certificate signed by the test CA get through, and every accepted message arrives exactly
//! once; an agent that trusts the CA but has no client certificate is refused by the broker,
//! keeps running, says so in its log and keeps its messages queued, which it delivers once it
//! is given the certificate.

use std::time::Duration;

use edge_tests::{
    Agent, AgentOptions, Class, Coordinator, DeliveryReport, Mosquitto, START_TIMEOUT, TlsFiles,
    run_test, test_messages,
};

/// Messages published by each agent.
const M: usize = 50;
const CLASSES: [Class; 3] = [Class::Control, Class::Results, Class::Telemetry];
/// How long the journal is watched for messages that must never arrive. Absence cannot be
/// waited on as an event; the refused agent has already failed its handshake by then and
/// retries at least once a second (`reconnect_max_ms` 1000), so this covers several attempts.
const ABSENCE_WINDOW: Duration = Duration::from_secs(3);

/// An agent whose `[mqtt]` points at `broker` over TLS, with or without the client certificate.
fn tls_agent(
    device: &str,
    broker: &Mosquitto,
    tls: &TlsFiles,
    client_cert: bool,
) -> anyhow::Result<AgentOptions> {
    let mut opts = AgentOptions::new(device, broker.url());
    opts.extra.insert(
        "mqtt".into(),
        toml::Value::Table(tls.agent_mqtt(client_cert)?),
    );
    Ok(opts)
}

#[test]
fn tls_mosquitto_mutual_auth() {
    run_test("tls_mosquitto", |env| {
        let tls = TlsFiles::generate(&env.path("pki"))?;
        // Fails (does not skip) without mosquitto: `cargo xtask test` provisions it.
        let broker = Mosquitto::start_tls(&env.path("mosquitto"), &tls)?;
        let coord = Coordinator::start_external_with_args(
            &env.path("coordinator"),
            &broker.url(),
            tls.coordinator_args()?,
        )?;
        let mut journal = coord.journal();

        // Refused first, so its failed handshakes overlap the good agent's whole delivery.
        let mut refused = Agent::start(
            &env.path("agent-nocert"),
            tls_agent("d-nocert", &broker, &tls, false)?,
        )?;
        let refused_msgs = test_messages("nocert", M, &CLASSES);
        let refused_expected = refused.api()?.publish_all(&refused_msgs, 25)?;
        wait_for_warning(
            &refused,
            &["broker unreachable", &broker.url()],
            START_TIMEOUT,
        )?;

        let agent = Agent::start(&env.path("agent"), tls_agent("d1", &broker, &tls, true)?)?;
        journal.wait_registered("d1", START_TIMEOUT)?;
        let msgs = test_messages("tls", M, &CLASSES);
        let expected = agent.api()?.publish_all(&msgs, 25)?;
        journal.expect_delivered("d1", &expected)?;

        let leaked = journal.wait_for("any event from d-nocert", ABSENCE_WINDOW, |events| {
            events
                .iter()
                .any(|e| e.device.as_deref() == Some("d-nocert"))
        });
        anyhow::ensure!(
            leaked.is_err(),
            "an agent without a client certificate got through the broker: {:?}",
            journal
                .events()
                .iter()
                .filter(|e| e.device.as_deref() == Some("d-nocert"))
                .map(|e| &e.raw)
                .collect::<Vec<_>>()
        );
        let report = DeliveryReport::check(&journal, "d-nocert", &refused_expected);
        anyhow::ensure!(
            report.delivered == 0 && report.missing.len() == refused_expected.len(),
            "messages of the refused agent arrived:\n{report}"
        );
        anyhow::ensure!(
            refused.is_running(),
            "the agent without a client certificate exited; its log:\n{}",
            refused.log()
        );

        // Queued, not dropped: with the certificate, the same outbox delivers all of them.
        let with_cert = tls.agent_mqtt(true)?;
        refused.stop()?;
        refused.reconfigure(|o| {
            o.extra.insert("mqtt".into(), toml::Value::Table(with_cert));
        })?;
        refused.restart()?;
        journal.expect_delivered("d-nocert", &refused_expected)
    });
}

/// Waits until the agent has logged a WARN line containing every one of `needles`.
fn wait_for_warning(agent: &Agent, needles: &[&str], timeout: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let log = agent.log();
        if log
            .lines()
            .any(|l| l.contains("WARN") && needles.iter().all(|n| l.contains(n)))
        {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "agent {} logged no warning containing {needles:?} within {timeout:?}; its log:\n{log}",
                agent.device_id()
            );
        }
        std::thread::sleep(edge_tests::POLL);
    }
}
