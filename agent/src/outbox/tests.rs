//! Outbox tests on a real sled store in a temp dir, and the same logic over the in-memory
//! store the fleet simulator uses.

use super::*;

fn msg(class: Class, n: u32) -> NewMessage {
    NewMessage {
        class,
        topic: format!("t/{class}"),
        body: format!("{{\"n\":{n}}}").into_bytes(),
        ttl: None,
    }
}

fn drain(ob: &Outbox) -> Vec<(Class, u64, String)> {
    let mut out = Vec::new();
    for class in Class::ALL {
        let mut after = None;
        while let Some(s) = ob.next_in_class(class, after).expect("read") {
            after = Some(s.key.seq);
            out.push((
                class,
                s.key.seq,
                String::from_utf8(s.record.body).expect("utf8"),
            ));
        }
    }
    out
}

fn cfg() -> OutboxConfig {
    OutboxConfig {
        max_bytes: 64 * 1024,
        ..OutboxConfig::default()
    }
}

#[tokio::test]
async fn priority_order_then_fifo_and_resume_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = {
        let ob = Outbox::open(dir.path(), &cfg()).expect("open");
        let res = ob
            .enqueue_batch(vec![
                msg(Class::Telemetry, 1),
                msg(Class::Results, 2),
                msg(Class::Control, 3),
                msg(Class::Results, 4),
            ])
            .await;
        res.into_iter()
            .map(|r| r.expect("accepted").id)
            .collect::<Vec<_>>()
    };
    let ob = Outbox::open(dir.path(), &cfg()).expect("reopen");
    let order: Vec<_> = drain(&ob).into_iter().map(|(_, _, b)| b).collect();
    assert_eq!(order, ["{\"n\":3}", "{\"n\":2}", "{\"n\":4}", "{\"n\":1}"]);
    assert_eq!(ob.stats().depth, [1, 0, 2, 1]);
    // Ids stay unique across reopen even after everything was acked.
    for (class, seq, _) in drain(&ob) {
        ob.ack(Key { class, seq });
    }
    ob.close().await.expect("close");
    drop(ob);
    let ob = Outbox::open(dir.path(), &cfg()).expect("reopen");
    let next = ob.enqueue(msg(Class::Results, 5)).await.expect("accepted");
    assert!(!ids.contains(&next.id));
    assert_eq!(next.seq, 4);
    assert_eq!(ob.stats().delivered, 0, "counters are per process");
}

/// Where a test's outbox keeps its records.
enum Backing {
    Disk(tempfile::TempDir),
    Memory(MemoryStore),
}

impl Backing {
    fn both() -> [Backing; 2] {
        [
            Backing::Disk(tempfile::tempdir().expect("tempdir")),
            Backing::Memory(MemoryStore::default()),
        ]
    }

    fn open(&self) -> Outbox {
        match self {
            Backing::Disk(dir) => Outbox::open(dir.path(), &cfg()).expect("open"),
            Backing::Memory(m) => {
                Outbox::open_in_memory(Path::new("sim/outbox"), m.clone(), &cfg()).expect("open")
            }
        }
    }
}

#[tokio::test]
async fn in_memory_store_orders_acks_and_survives_a_reopen_over_the_same_records() {
    let records = MemoryStore::default();
    let label = Path::new("dev-1/outbox");
    let ob = Outbox::open_in_memory(label, records.clone(), &cfg()).expect("open");
    let res = ob
        .enqueue_batch(vec![
            msg(Class::Telemetry, 1),
            msg(Class::Results, 2),
            msg(Class::Control, 3),
            msg(Class::Results, 4),
        ])
        .await;
    let ids: Vec<_> = res.into_iter().map(|r| r.expect("accepted").id).collect();
    let order: Vec<_> = drain(&ob).into_iter().map(|(_, _, b)| b).collect();
    assert_eq!(order, ["{\"n\":3}", "{\"n\":2}", "{\"n\":4}", "{\"n\":1}"]);
    let first = Key {
        class: Class::Results,
        seq: 1,
    };
    assert_eq!(
        ob.prev_in_class(Key { seq: 3, ..first }).expect("prev"),
        Some(1)
    );
    assert_eq!(ob.ack_range(Class::Results, 0, 1), vec![first]);
    assert!(!ob.holds(first));
    assert_eq!(
        ob.prev_in_class(Key { seq: 3, ..first }).expect("prev"),
        None
    );
    ob.close().await.expect("close");
    let incarnation = ob.incarnation();
    drop(ob);
    // A reboot that keeps the records: same incarnation, what was left, fresh seqs.
    let ob = Outbox::open_in_memory(label, records.clone(), &cfg()).expect("reopen");
    assert_eq!(ob.incarnation(), incarnation);
    assert_eq!(ob.stats().depth, [1, 0, 1, 1]);
    let next = ob.enqueue(msg(Class::Results, 5)).await.expect("accepted");
    assert!(!ids.contains(&next.id));
    assert_eq!(next.seq, 4);
    assert_eq!(records.len(), 4);
    // A power cut: fresh records, a new incarnation, so new ids.
    let ob = Outbox::open_in_memory(label, MemoryStore::default(), &cfg()).expect("open");
    assert_ne!(ob.incarnation(), incarnation);
    assert!(drain(&ob).is_empty());
    assert_eq!(ob.commits(), 0);
}

#[tokio::test]
async fn full_outbox_evicts_telemetry_and_refuses_the_rest() {
    for backing in Backing::both() {
        full_outbox_case(backing.open()).await;
    }
}

async fn full_outbox_case(ob: Outbox) {
    let big = |class| NewMessage {
        class,
        topic: "t".into(),
        body: vec![b'1'; 10_000],
        ttl: None,
    };
    for _ in 0..3 {
        ob.enqueue(big(Class::Telemetry))
            .await
            .expect("telemetry fits");
    }
    for _ in 0..3 {
        ob.enqueue(big(Class::Results)).await.expect("results fit");
    }
    // 6 x ~10 KB in 64 KiB: the next results message evicts the oldest telemetry.
    ob.enqueue(big(Class::Results))
        .await
        .expect("evicts telemetry");
    let s = ob.stats();
    assert!(s.evicted >= 1, "{s:?}");
    // Fill with results until no telemetry is left; then results are refused, not dropped.
    let mut refused = None;
    for _ in 0..10 {
        if let Err(e) = ob.enqueue(big(Class::Results)).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("eventually refused");
    assert!(
        matches!(
            e,
            OutboxError::Full {
                class: Class::Results,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("outbox full"), "{e}");
    let s = ob.stats();
    assert_eq!(s.depth[Class::Telemetry.index()], 0);
    assert_eq!(s.refused, 1);
    let too_big = NewMessage {
        class: Class::Control,
        topic: "t".into(),
        body: vec![0; 70_000],
        ttl: None,
    };
    assert!(matches!(
        ob.enqueue(too_big).await,
        Err(OutboxError::TooLarge { .. })
    ));
}

#[tokio::test]
async fn expired_messages_are_not_sent_and_free_room_first() {
    for backing in Backing::both() {
        expired_case(backing.open()).await;
    }
}

async fn expired_case(ob: Outbox) {
    let short = NewMessage {
        ttl: Some(Duration::from_millis(1)),
        ..msg(Class::Results, 1)
    };
    ob.enqueue(short).await.expect("accepted");
    ob.enqueue(msg(Class::Results, 2)).await.expect("accepted");
    std::thread::sleep(Duration::from_millis(5)); // lets the 1 ms TTL pass; not a synchronisation
    let bodies: Vec<_> = drain(&ob).into_iter().map(|(_, _, b)| b).collect();
    assert_eq!(bodies, ["{\"n\":2}"]);
    assert_eq!(ob.stats().expired, 1);
}

#[tokio::test]
async fn damaged_store_is_refused_or_quarantined() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let ob = Outbox::open(dir.path(), &cfg()).expect("open");
        ob.enqueue(msg(Class::Results, 1)).await.expect("accepted");
        ob.close().await.expect("close");
    }
    // Replace the log with garbage: sled may recover an empty log from it, which must not
    // pass as a valid (empty) outbox.
    let db = dir.path().join("outbox").join("db");
    let len = std::fs::metadata(&db).expect("db").len() as usize;
    std::fs::write(&db, vec![0xA5u8; len]).expect("overwrite");
    let err = Outbox::open(dir.path(), &cfg()).expect_err("refused");
    assert!(matches!(err, OutboxError::Corrupted { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&dir.path().join("outbox").display().to_string()),
        "{err}"
    );

    let q = OutboxConfig {
        on_corruption: OnCorruption::Quarantine,
        ..cfg()
    };
    let ob = Outbox::open(dir.path(), &q).expect("quarantined and reopened");
    assert_eq!(ob.stats().depth, [0; 4]);
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("outbox.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1);
}

#[tokio::test]
async fn concurrent_enqueues_share_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ob = Arc::new(Outbox::open(dir.path(), &OutboxConfig::default()).expect("open"));
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let ob = ob.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                ob.enqueue(msg(Class::Results, t * 100 + i))
                    .await
                    .expect("accepted");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(ob.stats().depth[Class::Results.index()], 200);
    assert!(ob.commits() <= 200);
}

#[tokio::test]
async fn write_ahead_log_is_replayed_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let ob = Outbox::open(dir.path(), &cfg()).expect("open");
        ob.enqueue(msg(Class::Results, 1)).await.expect("accepted");
        ob.close().await.expect("close");
    }
    // What a crash leaves behind: committed log entries that sled never got to disk.
    let rec = Record {
        created_ms: 1,
        expires_ms: None,
        topic: "t/results".into(),
        body: b"{\"n\":2}".to_vec(),
    };
    let mut frames = Vec::new();
    wal::encode(
        &wal::Op::Insert(
            Key {
                class: Class::Results,
                seq: 1,
            },
            rec.encode(),
        ),
        &mut frames,
    );
    wal::encode(
        &wal::Op::Delete(Key {
            class: Class::Results,
            seq: 0,
        }),
        &mut frames,
    );
    frames.extend_from_slice(&[0, 0, 0, 9, 1]); // torn tail
    std::fs::write(dir.path().join(WAL_FILE), &frames).expect("write log");

    let ob = Outbox::open(dir.path(), &cfg()).expect("reopen");
    let bodies: Vec<_> = drain(&ob).into_iter().map(|(_, seq, b)| (seq, b)).collect();
    assert_eq!(bodies, [(1, "{\"n\":2}".to_string())]);
    assert_eq!(
        ob.enqueue(msg(Class::Results, 3))
            .await
            .expect("accepted")
            .seq,
        2
    );
    assert!(
        std::fs::metadata(dir.path().join(WAL_FILE))
            .expect("log")
            .len()
            > 0
    );
}

/// A batch whose log append fails part of the way (the disk fills between two parts of an
/// update) is taken back whole: every message refused as a full disk, none left in the store
/// or in the log, nothing back after a reopen; the next batch goes in.
#[tokio::test]
async fn a_batch_the_log_cannot_take_whole_is_taken_back_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let ob = Outbox::open(dir.path(), &cfg()).expect("open");
        ob.enqueue(msg(Class::Results, 1)).await.expect("accepted");
        let Store::Disk(d) = &ob.store else {
            panic!("a disk outbox")
        };
        let before = d.wal_lock().len();
        // Room for two of the five frames.
        let mut one = Vec::new();
        wal::encode(
            &wal::Op::Insert(
                Key {
                    class: Class::Model,
                    seq: 0,
                },
                vec![0; 40],
            ),
            &mut one,
        );
        d.wal_lock().full_at = Some(before + 2 * one.len() as u64 + 20);
        let out = ob
            .enqueue_batch((10..15).map(|n| msg(Class::Model, n)).collect())
            .await;
        assert_eq!(out.len(), 5);
        for r in &out {
            assert!(
                matches!(r, Err(OutboxError::DiskFull { .. })),
                "{:?}",
                r.as_ref().map(|a| a.seq)
            );
        }
        assert_eq!(d.wal_lock().len(), before, "the log cut back");
        assert_eq!(
            std::fs::metadata(dir.path().join(WAL_FILE))
                .expect("log")
                .len(),
            before
        );
        let left: Vec<_> = drain(&ob).into_iter().map(|(_, _, b)| b).collect();
        assert_eq!(left, ["{\"n\":1}"]);
        d.wal_lock().full_at = None;
        ob.close().await.expect("close");
    }
    let ob = Outbox::open(dir.path(), &cfg()).expect("reopen");
    let left: Vec<_> = drain(&ob).into_iter().map(|(_, _, b)| b).collect();
    assert_eq!(left, ["{\"n\":1}"], "nothing of the batch replayed");
    let out = ob
        .enqueue_batch(vec![msg(Class::Model, 20), msg(Class::Model, 21)])
        .await;
    assert!(out.iter().all(Result::is_ok));
    assert_eq!(drain(&ob).len(), 3);
}
