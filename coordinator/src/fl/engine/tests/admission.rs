//! Selection, opening rounds, update validation and task admission.

use super::*;

#[test]
fn selection_is_deterministic_sized_and_a_subset() {
    let devices: Vec<String> = (0..20).map(|i| format!("d{i}")).collect();
    let a = select(devices.clone(), 5, 42);
    assert_eq!(
        a,
        select(devices.iter().rev().cloned().collect(), 5, 42),
        "input order does not matter"
    );
    assert_eq!(a.len(), 5);
    assert!(a.iter().all(|d| devices.contains(d)));
    assert_ne!(
        a,
        select(devices.clone(), 5, 43),
        "another seed, another selection"
    );
    assert_eq!(select(devices.clone(), 50, 1).len(), 20);
    let mut s = spec();
    s.fraction = 0.3;
    s.min_clients = 2;
    assert_eq!(s.selection_count(20), 6);
    assert_eq!(s.selection_count(4), 2);
    assert_eq!(s.selection_count(1), 1);
}

#[test]
fn waits_for_min_clients_then_opens_and_announces_to_every_member() {
    let mut fleet = TestFleet::with(3);
    for d in ["d1", "d2"] {
        fleet.0.insert(d.into(), (true, false));
    }
    let (mut e, out) = started(&fleet);
    assert!(matches!(
        events(&out)[..],
        [Event::FlTaskStarted { .. }, Event::FlRoundWaiting { .. }]
    ));
    assert!(matches!(
        e.state("t").expect("known").phase,
        Phase::Waiting { .. }
    ));
    // Nothing changes, nothing new is said.
    assert!(e.tick(2_000, &fleet).is_empty());
    fleet.0.insert("d1".into(), (true, true));
    let out = e.tick(3_000, &fleet);
    let published = rounds_published(&out);
    assert_eq!(published.len(), 3, "every registered member gets the round");
    for (topic, h, w) in &published {
        assert_eq!((h.round, h.version), (1, 0));
        assert_eq!(w, &vec![0.0; N]);
        let device = topic.split('/').nth(2).expect("device in topic");
        assert_eq!(
            h.train.is_some(),
            device != "d2",
            "{topic}: the offline member only gets weights"
        );
    }
    let s = e.state("t").expect("known");
    assert_eq!(s.phase, Phase::Open);
    assert_eq!(s.selected.len(), 2);
    assert_eq!(s.deadline_ms, 13_000);
    let writes = e.take_writes();
    assert!(
        writes
            .iter()
            .any(|w| matches!(w, Write::Weights { version: 0, .. }))
    );
    assert!(writes.iter().any(|w| matches!(w, Write::State { .. })));
}

#[test]
fn bad_updates_are_counted_by_reason_and_leave_the_aggregate_alone() {
    let mut fleet = TestFleet::with(3);
    fleet.0.insert("ghost".into(), (false, true));
    let mut s = spec();
    s.quorum = 0.5; // two on-time updates close the round
    let mut e = Engine::default();
    e.start(s, key(), vec![0.0; N], 1_000, &fleet);
    // The codec encodes NaN as 0, so the NaN payload is built by hand (tag 1 = fp32).
    let mut nan_body = vec![1u8];
    nan_body.extend_from_slice(&(N as u32).to_le_bytes());
    for i in 0..N {
        nan_body.extend_from_slice(&(if i == 2 { f32::NAN } else { 0.5 }).to_le_bytes());
    }
    let template = Update::decode(
        &BinaryEnvelope::decode(&update_payload("d0", 1, 0, 5, &[0.0; N]))
            .expect("env")
            .body,
    )
    .expect("u");
    let nan = raw_update(
        "d0",
        &Update {
            payload: nan_body,
            ..template.clone()
        },
    );
    let bad_codec = {
        let mut p = codec::encode(Codec::Fp32, &[0.5; N], None, 0);
        p.truncate(p.len() - 2);
        p
    };
    let mut wrong_task = Update::decode(
        &BinaryEnvelope::decode(&update_payload("d0", 1, 0, 5, &[0.5; N]))
            .expect("env")
            .body,
    )
    .expect("u");
    wrong_task.task = "other".into();
    let mut nan_loss = wrong_task.clone();
    nan_loss.task = "t".into();
    nan_loss.loss = f32::INFINITY;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "d0",
            update_payload("d0", 1, 0, 5, &[0.5; N - 1]),
            "wrong_length",
        ),
        ("d0", nan, "non_finite"),
        (
            "d0",
            raw_update(
                "d0",
                &Update {
                    payload: bad_codec,
                    ..template.clone()
                },
            ),
            "bad_payload",
        ),
        (
            "d0",
            update_payload("d0", 7, 0, 5, &[0.5; N]),
            "unknown_round",
        ),
        (
            "d0",
            update_payload("d0", 0, 0, 5, &[0.5; N]),
            "unknown_round",
        ),
        (
            "d0",
            update_payload("d0", 1, 3, 5, &[0.5; N]),
            "base_version",
        ),
        (
            "ghost",
            update_payload("ghost", 1, 0, 5, &[0.5; N]),
            "unregistered",
        ),
        ("d0", raw_update("d0", &nan_loss), "non_finite"),
        ("d1", update_payload("d0", 1, 0, 5, &[0.5; N]), "malformed"),
        ("d0", b"garbage".to_vec(), "malformed"),
        ("d0", raw_update("d0", &wrong_task), "unknown_task"),
    ];
    for (device, payload, want) in &cases {
        let out = e.on_update(device, payload, 2_000, &fleet);
        assert_eq!(rejected_reason(&out), Some(*want), "{want}");
    }
    // The good one, then its replay.
    let good = update_payload("d0", 1, 0, 5, &[0.5; N]);
    assert!(rejected_reason(&e.on_update("d0", &good, 2_000, &fleet)).is_none());
    assert_eq!(
        rejected_reason(&e.on_update("d0", &good, 2_000, &fleet)),
        Some("duplicate")
    );
    let m = &e.state("t").expect("known").current;
    assert_eq!(m.received, 1);
    assert_eq!(m.duplicates, 1);
    let want: BTreeMap<String, u64> = [
        ("wrong_length", 1),
        ("non_finite", 2),
        ("bad_payload", 1),
        ("unknown_round", 2),
        ("base_version", 1),
        ("unregistered", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(m.rejected, want);
    assert_eq!(e.unattributed().get("malformed"), Some(&2));
    assert_eq!(e.unattributed().get("unknown_task"), Some(&1));
    // The round closes on the second good update; the aggregate is the two good deltas.
    e.on_update(
        "d1",
        &update_payload("d1", 1, 0, 5, &[1.5; N]),
        2_000,
        &fleet,
    );
    let g = e.global("t").expect("known");
    assert!(g.iter().all(|w| (w - 1.0).abs() < 1e-6), "{g:?}");
}

#[test]
fn a_device_not_selected_is_refused() {
    let fleet = TestFleet::with(4);
    let mut s = spec();
    s.fraction = 0.5;
    let mut e = Engine::default();
    e.start(s, key(), vec![0.0; N], 1_000, &fleet);
    let selected = e.state("t").expect("known").selected.clone();
    assert_eq!(selected.len(), 2);
    let outsider = (0..4)
        .map(|i| format!("d{i}"))
        .find(|d| !selected.contains(d))
        .expect("one left out");
    let out = e.on_update(
        &outsider,
        &update_payload(&outsider, 1, 0, 5, &[0.5; N]),
        2_000,
        &fleet,
    );
    assert_eq!(rejected_reason(&out), Some("not_selected"));
}

#[test]
fn a_task_sharing_members_with_a_running_one_is_refused_without_publishing() {
    let fleet = TestFleet::with(2);
    let (mut e, _) = started(&fleet);
    let mut other = spec();
    other.id = "t2".into();
    let out = e.start(other, key(), vec![0.0; N], 2_000, &fleet);
    assert!(rounds_published(&out).is_empty());
    assert!(
        matches!(&e.state("t2").expect("known").phase, Phase::Finished { reason } if reason.contains("running task t"))
    );
    assert_eq!(
        e.state("t").expect("known").phase,
        Phase::Open,
        "the running task goes on"
    );
    // Once the first one ended, a new task over the same members runs.
    e.stop("t", "stopped", 3_000, &fleet);
    let mut third = spec();
    third.id = "t3".into();
    let out = e.start(third, key(), vec![0.0; N], 4_000, &fleet);
    assert_eq!(rounds_published(&out).len(), 2);
}

#[test]
fn a_member_registering_mid_round_gets_the_round() {
    let fleet = TestFleet::with(2);
    let (mut e, _) = started(&fleet);
    let out = e.on_registered("d9", &["fl".into()], 3_000);
    let p = rounds_published(&out);
    assert_eq!(p.len(), 1);
    assert!(p[0].0.ends_with("/d9/fl/round") && p[0].1.train.is_none());
    assert!(e.on_registered("d8", &["other".into()], 3_000).is_empty());
}
