//! Durable enqueue rate of the outbox against the plain limit of the same disk.
//!
//! Baseline: a loop that appends one record to a file and calls `fdatasync` (what any
//! "durable before acknowledging" queue must pay per record without batching). Measured in the
//! same run, same directory, same record size; reported as medians of several rounds and as
//! ratios. `cargo bench -p edge-agent --bench outbox [-- ROUNDS N]`.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use edge_agent::config::OutboxConfig;
use edge_agent::outbox::{NewMessage, Outbox};
use protocol::v1::Class;

const RECORD: usize = 200;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn baseline(dir: &std::path::Path, n: usize) -> f64 {
    let path = dir.join("baseline.log");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("open baseline");
    let rec = vec![b'x'; RECORD];
    let start = Instant::now();
    for _ in 0..n {
        f.write_all(&rec).expect("write");
        f.sync_data().expect("fdatasync");
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(path);
    rate
}

fn msg() -> NewMessage {
    NewMessage {
        class: Class::Results,
        topic: "edge/v1/bench/data/x".into(),
        body: format!("{{\"x\":\"{}\"}}", "y".repeat(RECORD - 8)).into_bytes(),
        ttl: None,
    }
}

async fn outbox_rate(dir: &std::path::Path, n: usize, producers: usize) -> f64 {
    let ob = Arc::new(Outbox::open(dir, &OutboxConfig::default()).expect("open outbox"));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let ob = ob.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / producers {
                ob.enqueue(msg()).await.expect("enqueue");
            }
        }));
    }
    for t in tasks {
        t.await.expect("producer");
    }
    (n / producers * producers) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .iter()
        .position(|a| a == "ROUNDS")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let n: usize = args
        .iter()
        .position(|a| a == "N")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    // Same disk as the repository's target dir (not /tmp, which may be tmpfs).
    let base = std::env::var("EDGE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    std::fs::create_dir_all(&base).expect("bench dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (mut b, mut s1, mut s16) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let dir = tempfile::tempdir_in(&base).expect("tempdir");
        b.push(baseline(dir.path(), n));
        let d1 = tempfile::tempdir_in(&base).expect("tempdir");
        s1.push(rt.block_on(outbox_rate(d1.path(), n, 1)));
        let d16 = tempfile::tempdir_in(&base).expect("tempdir");
        s16.push(rt.block_on(outbox_rate(d16.path(), n * 4, 16)));
    }
    let (b, s1, s16) = (median(b), median(s1), median(s16));
    println!(
        "durable enqueue, {RECORD}-byte records, median of {rounds} rounds, dir {}",
        base.display()
    );
    println!("  baseline append+fdatasync loop : {b:>10.0} rec/s");
    println!(
        "  outbox, 1 producer             : {s1:>10.0} msg/s  ratio {:.2}x of baseline",
        s1 / b
    );
    println!(
        "  outbox, 16 producers (group)   : {s16:>10.0} msg/s  ratio {:.2}x of baseline",
        s16 / b
    );
}
