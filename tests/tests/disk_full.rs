//! The disk under the outbox fills up: the agent refuses new messages with an error that says
//! so (and stays up); after the disk grows and the broker is back, every message it accepted
//! is delivered. Needs root for the tmpfs mount, and fails (does not skip) without it.

use anyhow::{Context, bail, ensure};
use edge_tests::{
    Agent, AgentOptions, Class, Coordinator, Expected, Publish, Tmpfs, free_port, require_root,
    run_test,
};

/// Size of the agent's disk. Big enough that the agent accepts messages before refusing (it
/// keeps a few MiB in reserve), small enough to fill quickly.
const DISK: &str = "16m";
/// Payload size per message; the disk fills after roughly two thousand.
const PAYLOAD_BYTES: usize = 8192;
/// Upper bound on messages sent before giving up on seeing a refusal (~80 MiB of payload).
const MAX_MESSAGES: usize = 10_000;

#[test]
fn outbox_disk_full_refuses_then_delivers_everything_accepted() {
    run_test("disk_full", |env| {
        require_root("the outbox disk-full test")?;
        let state = env.path("agent-state");
        // Declared before the agent, so it is unmounted after the agent is killed.
        let disk = Tmpfs::mount(&state, DISK)?;
        let port = free_port()?;
        let mut opts = AgentOptions::new("d1", format!("mqtt://127.0.0.1:{port}"));
        opts.state_dir = Some(state.clone());
        let mut agent = Agent::start(&env.path("agent"), opts)?;

        let mut api = agent.api()?;
        let mut expected: Vec<Expected> = Vec::new();
        let mut refusal = None;
        let mut n = 0;
        while refusal.is_none() && n < MAX_MESSAGES {
            let batch: Vec<Publish> = (n..n + 10)
                .map(|i| {
                    let filler: String = (0..PAYLOAD_BYTES)
                        .map(|k| char::from(b'a' + ((i * 31 + k * 7) % 26) as u8))
                        .collect();
                    Publish::new(
                        "test/fill",
                        Class::Results,
                        serde_json::json!({ "i": i, "filler": filler }),
                    )
                })
                .collect();
            n += batch.len();
            let out = api.publish_batch(&batch);
            for (i, acc) in out.accepted() {
                expected.push(Expected::new(acc, &batch[i].stream, &batch[i].payload));
            }
            refusal = out.refused().next().map(|(_, e)| e.to_owned());
            if refusal.is_none()
                && let Some(e) = &out.error
            {
                bail!(
                    "the local API failed while the disk was filling, after {} accepted: {e}",
                    expected.len()
                );
            }
        }
        let refusal = refusal.with_context(|| {
            format!("the agent accepted {} messages of {PAYLOAD_BYTES} bytes into a {DISK} disk without refusing one", expected.len())
        })?;
        let lower = refusal.to_lowercase();
        ensure!(
            lower.contains("space") || lower.contains("disk"),
            "the refusal on a full disk should say the disk is full, got: {refusal:?}"
        );
        ensure!(
            agent.is_running(),
            "the agent exited when the disk filled up"
        );
        eprintln!(
            "accepted {} messages before the refusal {refusal:?}",
            expected.len()
        );
        drop(api);
        // Clean or not: what was acknowledged must survive either way.
        let status = agent.terminate()?;
        eprintln!("agent exited with {status} on SIGTERM while the disk was full");

        disk.resize("64m")?;
        let coord = Coordinator::start_embedded_at(&env.path("coordinator"), port)?;
        agent.restart()?;
        let mut journal = coord.journal();
        journal.expect_delivered("d1", &expected)
    });
}
