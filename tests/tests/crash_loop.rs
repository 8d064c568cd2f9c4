//! Crash loop: the agent is SIGKILLed at random moments under heavy local-API load (several
//! connections, pipelined batches) and restarted, at least 20 times. Every message it
//! acknowledged must reach the coordinator; re-deliveries may appear only as `duplicate`
//! events. `cargo xtask soak` runs the same loop with many more kills.

use edge_tests::{CrashLoopOptions, crash_loop, run_test};

#[test]
fn crash_loop_loses_nothing_acknowledged() {
    run_test("crash_loop", |env| {
        // A new seed per run explores new kill timings; EDGE_TESTS_SEED replays one.
        let seed = match std::env::var("EDGE_TESTS_SEED") {
            Ok(s) => s.parse()?,
            Err(_) => time_seed(),
        };
        let opts = CrashLoopOptions {
            kills: 20,
            seed,
            writers: 3,
            batch: 16,
            ..CrashLoopOptions::default()
        };
        eprintln!("crash loop seed {seed} (EDGE_TESTS_SEED={seed} replays the kill delays)");
        let report = crash_loop(env.dir(), &opts)?;
        eprintln!("{report}");
        anyhow::ensure!(
            report.kills == opts.kills,
            "only {} of {} kills happened:\n{report}",
            report.kills,
            opts.kills
        );
        anyhow::ensure!(report.is_ok(), "{report}");
        Ok(())
    });
}

fn time_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}
