//! Closing rounds, late updates, deadlines, evaluation outcomes, finishing and restarts.

use super::*;
use protocol::v1::topics;

#[test]
fn quorum_closes_the_round_with_the_weighted_mean_and_opens_the_next() {
    let fleet = TestFleet::with(3);
    let mut e = Engine::default();
    let out = e.start(spec_with_holdout(), key(), vec![0.0; N], 1_000, &fleet);
    assert_eq!(rounds_published(&out).len(), 3);
    let _ = e.take_writes();
    let out = e.on_update(
        "d0",
        &update_payload("d0", 1, 0, 10, &[1.0; N]),
        2_000,
        &fleet,
    );
    assert!(matches!(
        events(&out)[..],
        [Event::FlUpdate { staleness: 0, .. }]
    ));
    let writes = e.take_writes();
    assert!(
        writes
            .iter()
            .any(|w| matches!(w, Write::Update { update, .. } if update.device == "d0"))
    );
    e.on_update(
        "d1",
        &update_payload("d1", 1, 0, 30, &[3.0; N]),
        2_000,
        &fleet,
    );
    let out = e.on_update(
        "d2",
        &update_payload("d2", 1, 0, 60, &[0.0; N]),
        2_000,
        &fleet,
    );
    // The next round opened at once; the closed round's line waits for its evaluation.
    assert!(closed_metrics(&out).is_none(), "held until evaluated");
    assert_eq!(e.state("t").expect("known").evaluating, BTreeSet::from([1]));
    let requests = e.take_evaluations();
    assert_eq!(requests.len(), 1);
    assert_eq!((requests[0].task.as_str(), requests[0].version), ("t", 1));
    assert!(requests[0].weights.iter().all(|w| (w - 1.0).abs() < 1e-6));
    let evaluated = e.on_evaluated("t", 1, fixed_eval(1));
    let closed = closed_metrics(&evaluated).expect("round closed");
    assert!(e.state("t").expect("known").evaluating.is_empty());
    assert!(
        e.on_evaluated("t", 1, fixed_eval(1)).is_empty(),
        "a second outcome for the same version is ignored"
    );
    assert_eq!(
        (closed.round, closed.version, closed.new_version),
        (1, 0, Some(1))
    );
    assert_eq!(
        (
            closed.selected,
            closed.received,
            closed.on_time,
            closed.late
        ),
        (3, 3, 3, 0)
    );
    assert_eq!(closed.close_reason.as_deref(), Some("quorum"));
    assert_eq!(closed.train_loss, Some(0.5));
    assert!(
        closed
            .eval_note
            .as_deref()
            .is_some_and(|n| n.starts_with("eval unavailable: "))
    );
    assert!(closed.bytes_in > 0 && closed.bytes_out > 0);
    // (10 * 1 + 30 * 3 + 60 * 0) / 100 = 1.0
    let g = e.global("t").expect("known");
    assert!(g.iter().all(|w| (w - 1.0).abs() < 1e-6), "{g:?}");
    let published = rounds_published(&out);
    assert_eq!(published.len(), 3);
    assert!(
        published
            .iter()
            .all(|(_, h, w)| h.round == 2 && h.version == 1 && w == &vec![1.0; N])
    );
    let writes = e.take_writes();
    assert!(
        writes
            .iter()
            .any(|w| matches!(w, Write::Weights { version: 1, .. }))
    );
    assert!(
        writes
            .iter()
            .any(|w| matches!(w, Write::ClearUpdates { .. }))
    );
    assert!(writes.iter().any(|w| matches!(w, Write::Server { .. })));
}

#[test]
fn an_update_scaled_up_by_an_attacker_is_clipped_and_reported() {
    let fleet = TestFleet::with(3);
    let mut e = Engine::default();
    let sp = TaskSpec {
        clip: Clip::default(),
        ..spec()
    };
    let _ = e.start(sp, key(), vec![0.0; N], 1_000, &fleet);
    e.on_update(
        "d0",
        &update_payload("d0", 1, 0, 10, &[1.0; N]),
        2_000,
        &fleet,
    );
    e.on_update(
        "d1",
        &update_payload("d1", 1, 0, 10, &[1.0; N]),
        2_000,
        &fleet,
    );
    // A thousand times an honest update, claiming most of the samples.
    let out = e.on_update(
        "d2",
        &update_payload("d2", 1, 0, 1_000, &[1_000.0; N]),
        2_000,
        &fleet,
    );
    let closed = closed_metrics(&out).expect("closed");
    let honest = (N as f32).sqrt();
    assert!((closed.clip_threshold.expect("reported") - 2.0 * honest).abs() < 1e-4);
    assert_eq!(closed.clipped, 1);
    assert_eq!(closed.epsilon, None, "no privacy mode");
    // Weighted mean of 1, 1 and the clipped 2: the model moved by at most 2 per weight,
    // not by ~980 as it would have unclipped.
    let g = e.global("t").expect("known");
    assert!(g.iter().all(|&w| w > 1.0 && w <= 2.0 + 1e-4), "{g:?}");
}

#[test]
fn privacy_mode_reports_epsilon_and_stops_before_the_budget_is_passed() {
    let fleet = TestFleet::with(2);
    let mut e = Engine::default();
    let z = 2.0;
    // Enough for two rounds but not three.
    let max =
        (crate::fl::privacy::epsilon(2, z, 1e-5) + crate::fl::privacy::epsilon(3, z, 1e-5)) / 2.0;
    let sp = TaskSpec {
        clip: Clip::Norm { norm: 1.0 },
        privacy: Some(Privacy {
            noise_multiplier: z as f32,
            delta: 1e-5,
            max_epsilon: Some(max),
        }),
        rounds: 10,
        ..spec()
    };
    let _ = e.start(sp, key(), vec![0.0; N], 1_000, &fleet);
    let mut epsilons = Vec::new();
    for round in 1..=2 {
        let mut out = Vec::new();
        for d in ["d0", "d1"] {
            out = e.on_update(
                d,
                &update_payload(d, round, round - 1, 10, &[5.0; N]),
                2_000 * u64::from(round),
                &fleet,
            );
        }
        let closed = closed_metrics(&out).expect("closed");
        assert_eq!((closed.clipped, closed.clip_threshold), (2, Some(1.0)));
        epsilons.push(closed.epsilon.expect("epsilon reported"));
        // Clipped to norm 1 each, so without noise each weight would move 1/sqrt(N); the noise
        // (deviation z * C / 2 per weight) makes that differ.
        let g = e.global("t").expect("known");
        assert!(g.iter().all(|w| w.is_finite()));
        assert!(
            g.iter()
                .any(|&w| (w - round as f32 / (N as f32).sqrt()).abs() > 1e-3)
        );
    }
    assert!(epsilons[1] > epsilons[0]);
    let s = e.state("t").expect("known");
    match &s.phase {
        Phase::Finished { reason } => assert!(
            reason.starts_with("privacy budget: epsilon") && reason.contains("max_epsilon"),
            "{reason}"
        ),
        other => panic!("still running: {other:?}"),
    }
    assert_eq!(s.history.len(), 2);
}

#[test]
fn round_interval_holds_the_next_round_back() {
    let fleet = TestFleet::with(2);
    let mut e = Engine::default();
    let mut sp = spec();
    sp.round_interval_s = 5;
    let _ = e.start(sp, key(), vec![0.0; N], 1_000, &fleet);
    for d in ["d0", "d1"] {
        e.on_update(d, &update_payload(d, 1, 0, 10, &[1.0; N]), 2_000, &fleet);
    }
    let s = e.state("t").expect("known");
    assert_eq!((s.round, s.not_before_ms), (2, 7_000));
    assert!(matches!(s.phase, Phase::Waiting { .. }), "{:?}", s.phase);
    assert!(
        rounds_published(&e.tick(6_999, &fleet)).is_empty(),
        "too early"
    );
    let out = e.tick(7_000, &fleet);
    assert_eq!(rounds_published(&out).len(), 2);
    assert_eq!(e.state("t").expect("known").phase, Phase::Open);
}

#[test]
fn late_updates_within_the_window_count_discounted_and_older_ones_are_dropped() {
    let fleet = TestFleet::with(3);
    let mut s = spec();
    s.quorum = 0.6; // 2 of 3
    s.rounds = 5;
    let mut e = Engine::default();
    e.start(s, key(), vec![0.0; N], 1_000, &fleet);
    e.on_update(
        "d0",
        &update_payload("d0", 1, 0, 10, &[1.0; N]),
        2_000,
        &fleet,
    );
    e.on_update(
        "d1",
        &update_payload("d1", 1, 0, 10, &[1.0; N]),
        2_000,
        &fleet,
    );
    assert_eq!(e.state("t").expect("known").round, 2);
    // d2's round-1 update arrives during round 2: applied with staleness 1.
    let late = update_payload("d2", 1, 0, 10, &[4.0; N]);
    let out = e.on_update("d2", &late, 3_000, &fleet);
    assert!(matches!(
        events(&out)[..],
        [Event::FlUpdate {
            staleness: 1,
            round: 1,
            applied_round: 2,
            ..
        }]
    ));
    // Its replay is a duplicate (not a second late update).
    assert_eq!(
        rejected_reason(&e.on_update("d2", &late, 3_000, &fleet)),
        Some("duplicate")
    );
    // An on-time round-2 update from d0 (10 samples, delta 1) plus the late one (10
    // samples at half weight, delta 4): (10 * 1 + 5 * 4) / 15 = 2. Quorum needs 2 on time.
    e.on_update(
        "d0",
        &update_payload("d0", 2, 1, 10, &[1.0; N]),
        3_000,
        &fleet,
    );
    assert_eq!(
        e.state("t").expect("known").round,
        2,
        "a late update does not count for the quorum"
    );
    let out = e.on_update(
        "d1",
        &update_payload("d1", 2, 1, 10, &[1.0; N]),
        3_000,
        &fleet,
    );
    let closed = events(&out)
        .into_iter()
        .find_map(|e| match e {
            Event::FlRoundClosed { metrics, .. } => Some(metrics.clone()),
            _ => None,
        })
        .expect("closed");
    assert_eq!((closed.received, closed.on_time, closed.late), (3, 2, 1));
    // Round 1 moved the model by 1; round 2 by (10 + 10 + 5 * 4) / 25 = 1.6.
    let g = e.global("t").expect("known");
    assert!(g.iter().all(|w| (w - 2.6).abs() < 1e-5), "{g:?}");
    // Round 3 is open; a round-1 update is now 2 rounds old.
    let out = e.on_update(
        "d2",
        &update_payload("d2", 1, 0, 10, &[4.0; N]),
        4_000,
        &fleet,
    );
    assert_eq!(rejected_reason(&out), Some("late_dropped"));
    // d2's round-2 update is one round late and it was selected then: accepted.
    let out = e.on_update(
        "d2",
        &update_payload("d2", 2, 1, 10, &[0.0; N]),
        4_000,
        &fleet,
    );
    assert!(rejected_reason(&out).is_none());
    assert_eq!(
        e.state("t")
            .expect("known")
            .current
            .rejected
            .get("late_dropped"),
        Some(&1)
    );
}

#[test]
fn deadline_closes_with_min_updates_or_extends_and_tops_up() {
    let mut fleet = TestFleet::with(4);
    let mut s = spec();
    s.fraction = 0.5;
    s.min_updates = 2;
    let mut e = Engine::default();
    e.start(s, key(), vec![0.0; N], 1_000, &fleet);
    let selected: Vec<String> = e
        .state("t")
        .expect("known")
        .selected
        .iter()
        .cloned()
        .collect();
    e.on_update(
        &selected[0],
        &update_payload(&selected[0], 1, 0, 5, &[1.0; N]),
        2_000,
        &fleet,
    );
    // The other selected device went offline; before the deadline nothing happens.
    fleet.0.insert(selected[1].clone(), (true, false));
    assert!(e.tick(10_999, &fleet).is_empty());
    // At the deadline, 1 < min_updates: extended, one fresh online member added.
    let out = e.tick(11_000, &fleet);
    let added = events(&out)
        .into_iter()
        .find_map(|e| match e {
            Event::FlRoundExtended {
                added, deadline_ms, ..
            } => Some((added.clone(), *deadline_ms)),
            _ => None,
        })
        .expect("extended");
    assert_eq!(added.0.len(), 1);
    assert_eq!(added.1, 21_000);
    let published = rounds_published(&out);
    assert_eq!(published.len(), 1);
    assert!(published[0].1.train.is_some());
    let s = e.state("t").expect("known");
    assert_eq!((s.selected.len(), s.current.extensions, s.round), (3, 1, 1));
    // The added device delivers; at the new deadline the round closes with 2 updates.
    let d = &added.0[0];
    e.on_update(d, &update_payload(d, 1, 0, 5, &[3.0; N]), 12_000, &fleet);
    let out = e.tick(21_000, &fleet);
    assert!(events(&out).iter().any(|e| matches!(e, Event::FlRoundClosed { metrics, .. } if metrics.close_reason.as_deref() == Some("deadline") && metrics.received == 2)));
    let g = e.global("t").expect("known");
    assert!(g.iter().all(|w| (w - 2.0).abs() < 1e-6), "{g:?}");
}

#[test]
fn the_last_round_finishes_the_task_with_done_messages() {
    let fleet = TestFleet::with(2);
    let mut s = spec();
    s.rounds = 1;
    let mut e = Engine::default();
    e.start(s, key(), vec![0.0; N], 1_000, &fleet);
    e.on_update(
        "d0",
        &update_payload("d0", 1, 0, 5, &[1.0; N]),
        2_000,
        &fleet,
    );
    let out = e.on_update(
        "d1",
        &update_payload("d1", 1, 0, 5, &[1.0; N]),
        2_000,
        &fleet,
    );
    assert!(events(&out).iter().any(|e| matches!(e, Event::FlTaskFinished { reason, rounds_closed: 1, version: 1, .. } if reason == "completed")));
    let published = rounds_published(&out);
    assert_eq!(published.len(), 2);
    assert!(
        published
            .iter()
            .all(|(_, h, w)| h.done && h.train.is_none() && w == &vec![1.0; N])
    );
    assert!(matches!(
        e.state("t").expect("known").phase,
        Phase::Finished { .. }
    ));
    assert_eq!(e.active_count(), 0);
    let out = e.on_update(
        "d0",
        &update_payload("d0", 1, 0, 5, &[1.0; N]),
        3_000,
        &fleet,
    );
    assert_eq!(rejected_reason(&out), Some("task_finished"));
    assert!(
        e.stop("t", "stopped", 3_000, &fleet).is_empty(),
        "already finished"
    );
}

#[test]
fn stop_sends_done_with_the_current_weights() {
    let fleet = TestFleet::with(2);
    let (mut e, _) = started(&fleet);
    let out = e.stop("t", "stopped by fl stop", 5_000, &fleet);
    assert!(
        rounds_published(&out)
            .iter()
            .all(|(_, h, _)| h.done && h.version == 0)
    );
    assert!(
        matches!(&e.state("t").expect("known").phase, Phase::Finished { reason } if reason == "stopped by fl stop")
    );
}

#[test]
fn restore_resumes_the_open_round_with_its_accepted_updates() {
    let fleet = TestFleet::with(3);
    let (mut e, _) = started(&fleet);
    e.on_update(
        "d0",
        &update_payload("d0", 1, 0, 10, &[3.0; N]),
        2_000,
        &fleet,
    );
    // Persist as the service would, then rebuild a fresh engine from what was written.
    let mut state = None;
    let mut weights = None;
    let mut server = None;
    let mut updates = Vec::new();
    for w in e.take_writes() {
        match w {
            Write::State { state: s, .. } => state = Some(*s),
            Write::Weights { weights: v, .. } => weights = Some(v),
            Write::Server { state: s, .. } => server = Some(s),
            Write::Update { update, .. } => updates.push(update),
            _ => {}
        }
    }
    let mut resumed = Engine::default();
    let out = resumed.restore(
        state.expect("state written"),
        key(),
        weights.expect("weights written"),
        server.expect("server written"),
        updates,
        5_000,
        &fleet,
    );
    assert!(matches!(
        events(&out)[0],
        Event::FlTaskStarted {
            resumed: true,
            round: 1,
            ..
        }
    ));
    let published = rounds_published(&out);
    assert_eq!(published.len(), 3, "the open round is announced again");
    for (topic, h, _) in &published {
        assert_eq!(
            h.train.is_some(),
            !topic.contains("/d0/"),
            "{topic}: d0 already delivered"
        );
        assert_eq!(
            h.train.as_ref().map(|t| t.deadline_ms),
            h.train.as_ref().map(|_| 11_000),
            "deadline kept"
        );
    }
    // The replayed update is a duplicate; the other two close the round with all three.
    let dup = resumed.on_update(
        "d0",
        &update_payload("d0", 1, 0, 10, &[3.0; N]),
        6_000,
        &fleet,
    );
    assert_eq!(rejected_reason(&dup), Some("duplicate"));
    resumed.on_update(
        "d1",
        &update_payload("d1", 1, 0, 10, &[0.0; N]),
        6_000,
        &fleet,
    );
    resumed.on_update(
        "d2",
        &update_payload("d2", 1, 0, 10, &[0.0; N]),
        6_000,
        &fleet,
    );
    let g = resumed.global("t").expect("known");
    assert!(g.iter().all(|w| (w - 1.0).abs() < 1e-6), "{g:?}");
    assert_eq!(resumed.state("t").expect("known").history[0].received, 3);
}

#[test]
fn a_task_without_holdout_closes_at_once_and_asks_for_no_evaluation() {
    let fleet = TestFleet::with(2);
    let (mut e, _) = started(&fleet);
    e.on_update(
        "d0",
        &update_payload("d0", 1, 0, 5, &[1.0; N]),
        2_000,
        &fleet,
    );
    let out = e.on_update(
        "d1",
        &update_payload("d1", 1, 0, 5, &[1.0; N]),
        2_000,
        &fleet,
    );
    let closed = closed_metrics(&out).expect("closed at once");
    assert_eq!(
        (closed.eval_accuracy, closed.eval_note.as_deref()),
        (None, None)
    );
    assert!(e.take_evaluations().is_empty());
    assert!(e.state("t").expect("known").evaluating.is_empty());
}

#[test]
fn the_last_rounds_evaluation_comes_before_the_task_finished_line() {
    let fleet = TestFleet::with(2);
    let mut e = Engine::default();
    let mut s = spec_with_holdout();
    s.rounds = 2;
    e.start(s, key(), vec![0.0; N], 1_000, &fleet);
    for round in 1..=2 {
        for d in ["d0", "d1"] {
            let p = update_payload(d, round, round - 1, 5, &[1.0; N]);
            let out = e.on_update(d, &p, 2_000, &fleet);
            if round == 2 && d == "d1" {
                // Final weights go out at once; the end waits for the evaluation.
                assert!(rounds_published(&out).iter().all(|(_, h, _)| h.done));
                assert_eq!(rounds_published(&out).len(), 2);
                assert!(events(&out).iter().all(|e| !matches!(
                    e,
                    Event::FlRoundClosed { .. } | Event::FlTaskFinished { .. }
                )));
                assert!(matches!(
                    e.state("t").expect("known").phase,
                    Phase::Finished { .. }
                ));
            }
        }
    }
    // Both rounds closed before either evaluation came back (rounds outran them).
    assert_eq!(
        e.state("t").expect("known").evaluating,
        BTreeSet::from([1, 2])
    );
    let out = run_evaluations(&mut e);
    let names: Vec<&str> = events(&out)
        .into_iter()
        .map(|e| match e {
            Event::FlRoundClosed { metrics, .. } if metrics.round == 1 => "closed 1",
            Event::FlRoundClosed { metrics, .. } if metrics.round == 2 => "closed 2",
            Event::FlTaskFinished { .. } => "finished",
            _ => "other",
        })
        .collect();
    assert_eq!(names, ["closed 1", "closed 2", "finished"]);
    let last = closed_metrics(&out[1..]).expect("round 2");
    assert_eq!((last.eval_accuracy, last.eval_rows), (Some(0.5), Some(4)));
    assert!(events(&out).iter().any(|e| matches!(
        e,
        Event::FlTaskFinished {
            rounds_closed: 2,
            version: 2,
            ..
        }
    )));
    let h = &e.state("t").expect("known").history;
    assert_eq!(
        h[1].eval_accuracy,
        Some(0.5),
        "the history has the figures too"
    );
    assert!(h[0].eval_note.is_some());
    assert!(
        e.take_writes()
            .iter()
            .any(|w| matches!(w, Write::State { state, .. } if state.evaluating.is_empty())),
        "the state without pending evaluations is written"
    );
}

/// A restart while evaluations run: the current version's is asked for again, an older
/// one is recorded unavailable; every closed round still gets its line, and a task that
/// finished meanwhile its end.
#[test]
fn restore_reruns_the_current_evaluation_and_gives_up_older_ones() {
    let fleet = TestFleet::with(2);
    let mut e = Engine::default();
    let mut s = spec_with_holdout();
    s.rounds = 2;
    e.start(s, key(), vec![0.0; N], 1_000, &fleet);
    for round in 1..=2 {
        for d in ["d0", "d1"] {
            let p = update_payload(d, round, round - 1, 5, &[1.0; N]);
            e.on_update(d, &p, 2_000, &fleet);
        }
    }
    let asked = e.take_evaluations();
    assert_eq!(asked.len(), 2);
    let mut state = None;
    let mut weights = None;
    let mut server = None;
    for w in e.take_writes() {
        match w {
            Write::State { state: s, .. } => state = Some(*s),
            Write::Weights {
                version: 2,
                weights: v,
                ..
            } => weights = Some(v),
            Write::Server {
                version: 2,
                state: s,
                ..
            } => server = Some(s),
            _ => {}
        }
    }
    let state = state.expect("state written");
    assert_eq!(
        state.evaluating,
        BTreeSet::from([1, 2]),
        "persisted as pending"
    );
    let mut resumed = Engine::default();
    let out = resumed.restore(
        state,
        key(),
        weights.expect("weights written"),
        server.expect("server written"),
        Vec::new(),
        5_000,
        &fleet,
    );
    // Round 1's evaluation is given up at once; round 2's runs again.
    let closed = closed_metrics(&out).expect("round 1's line");
    assert_eq!(closed.round, 1);
    assert_eq!(
        closed.eval_note,
        Some(format!("eval unavailable: {EVAL_LOST_ON_RESTART}"))
    );
    assert!(
        !events(&out)
            .iter()
            .any(|e| matches!(e, Event::FlTaskFinished { .. }))
    );
    assert!(
        rounds_published(&out).is_empty(),
        "a finished task announces nothing"
    );
    let again = resumed.take_evaluations();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].version, 2);
    assert_eq!(again[0].weights, asked[1].weights);
    let out = resumed.on_evaluated("t", 2, fixed_eval(2));
    assert_eq!(
        closed_metrics(&out).and_then(|m| m.eval_accuracy),
        Some(0.5)
    );
    assert!(
        events(&out)
            .iter()
            .any(|e| matches!(e, Event::FlTaskFinished { .. }))
    );
}

fn failure_payload(device: &str, round: u32, kind: fl::FailureKind, reason: &str) -> Vec<u8> {
    BinaryEnvelope {
        id: message_id(2, u64::from(round)),
        device: device.into(),
        class: Class::Model,
        seq: 2,
        created_ms: 0,
        kind: fl::FAILURE_KIND.into(),
        body: fl::TrainFailure {
            task: "t".into(),
            round,
            base_version: 0,
            kind,
            reason: reason.into(),
        }
        .encode(),
    }
    .encode()
    .expect("encodes")
}

fn round_failed(actions: &[Action]) -> Option<(u32, String, usize)> {
    events(actions).into_iter().find_map(|e| match e {
        Event::FlRoundFailed {
            round,
            reason,
            failures,
            ..
        } => Some((*round, reason.clone(), failures.len())),
        _ => None,
    })
}

/// Every selected device reports a failure: the round ends `failed` with their reasons (no
/// new version), the next opens; after `max_failed_rounds` such rounds the task stops with
/// an error that carries a device's reason.
#[test]
fn rounds_where_every_device_fails_end_failed_and_stop_the_task() {
    let fleet = TestFleet::with(2);
    let (mut e, _) = started(&fleet);
    let reason = "model models/m.onnx: unsupported layer: node \"c\" (Conv) cannot be trained";
    let mut now = 2_000;
    for round in 1..=3u32 {
        let a = e.on_update(
            "d0",
            &failure_payload("d0", round, fl::FailureKind::Model, reason),
            now,
            &fleet,
        );
        assert!(
            round_failed(&a).is_none(),
            "one of two failed: the round goes on"
        );
        assert_eq!(e.state("t").expect("task").current.failures.len(), 1);
        // A second report from the same device is a duplicate, not a second failure.
        let dup = e.on_update(
            "d0",
            &failure_payload("d0", round, fl::FailureKind::Model, reason),
            now,
            &fleet,
        );
        assert_eq!(rejected_reason(&dup), Some("duplicate"));
        let a = e.on_update(
            "d1",
            &failure_payload(
                "d1",
                round,
                fl::FailureKind::Data,
                "sample 3: label 12 is outside 0..10",
            ),
            now,
            &fleet,
        );
        let (r, why, n) = round_failed(&a).expect("round failed");
        assert_eq!(
            (r, why.as_str(), n),
            (round, "every selected device failed", 2)
        );
        let s = e.state("t").expect("task");
        let last = s.history.last().expect("history");
        assert_eq!(last.close_reason.as_deref(), Some("failed"));
        assert_eq!(last.new_version, None);
        assert_eq!(s.version, 0, "no new global version");
        assert_eq!(s.failed_in_a_row, round);
        if round < 3 {
            // d1's failure is about its data, which may change: the next round waits a round
            // timeout instead of opening at once.
            let opens = s.not_before_ms;
            assert!(opens >= now + u64::from(s.spec.round_timeout_s) * 1000);
            assert!(rounds_published(&e.tick(opens - 1, &fleet)).is_empty());
            now = opens;
            assert!(!rounds_published(&e.tick(now, &fleet)).is_empty());
        }
    }
    let s = e.state("t").expect("task");
    let Phase::Finished { reason: why } = &s.phase else {
        panic!("stopped after 3 failed rounds: {:?}", s.phase);
    };
    assert!(why.starts_with("failed: 3 rounds in a row failed"), "{why}");
    assert!(
        why.contains("d0 (model): model models/m.onnx: unsupported layer"),
        "{why}"
    );
    assert!(why.contains("d1 (data): sample 3"), "{why}");
    let text = crate::fl::status::render(s, now);
    assert!(
        text.contains("round 2 device d1 (data): sample 3"),
        "{text}"
    );
    assert!(
        text.contains("round 3 failed: every selected device failed"),
        "{text}"
    );
}

/// A failure from a device that was not selected, for an unknown task, or garbled, is
/// refused by reason; one that names an old round is journaled and changes nothing.
#[test]
fn failure_reports_are_validated() {
    let mut fleet = TestFleet::with(3);
    fleet.0.insert("x".into(), (false, true));
    let (mut e, _) = started(&fleet);
    let a = e.on_update(
        "x",
        &failure_payload("x", 1, fl::FailureKind::Timeout, "t"),
        2_000,
        &fleet,
    );
    assert_eq!(rejected_reason(&a), Some("not_selected"));
    let mut bad = failure_payload("d0", 1, fl::FailureKind::Timeout, "t");
    let env = BinaryEnvelope::decode(&bad).expect("decodes");
    bad = BinaryEnvelope {
        body: b"{not json".to_vec(),
        ..env
    }
    .encode()
    .expect("encodes");
    assert_eq!(
        rejected_reason(&e.on_update("d0", &bad, 2_000, &fleet)),
        Some("malformed")
    );
    let a = e.on_update(
        "d0",
        &failure_payload("d0", 7, fl::FailureKind::Timeout, "t"),
        2_000,
        &fleet,
    );
    assert!(rejected_reason(&a).is_none());
    assert!(e.state("t").expect("task").current.failures.is_empty());
}

/// One device fails, the other's update is in: the round closes with the update (it met
/// `min_updates`) as soon as every selected device has answered one way or the other.
#[test]
fn a_failure_with_enough_updates_closes_the_round_normally() {
    let fleet = TestFleet::with(2);
    let (mut e, _) = started(&fleet);
    e.on_update(
        "d0",
        &update_payload("d0", 1, 0, 10, &[0.5; N]),
        2_000,
        &fleet,
    );
    let a = e.on_update(
        "d1",
        &failure_payload("d1", 1, fl::FailureKind::Resources, "memory limit"),
        2_000,
        &fleet,
    );
    let m = closed_metrics(&a).expect("closed");
    assert_eq!(m.close_reason.as_deref(), Some("failures"));
    assert_eq!(m.failures.len(), 1);
    assert_eq!(e.state("t").expect("task").version, 1);
    // The other way round: the failure first, then the last update closes the round.
    let a = e.on_update(
        "d0",
        &failure_payload("d0", 2, fl::FailureKind::Data, "no labeled samples"),
        3_000,
        &fleet,
    );
    assert!(closed_metrics(&a).is_none());
    let a = e.on_update(
        "d1",
        &update_payload("d1", 2, 1, 10, &[0.5; N]),
        3_000,
        &fleet,
    );
    let m = closed_metrics(&a).expect("closed");
    assert_eq!((m.round, m.close_reason.as_deref()), (2, Some("failures")));
}

/// With no update at all the round is not extended for ever: after `max_extensions`
/// deadlines it fails, saying so.
#[test]
fn a_round_without_updates_fails_after_max_extensions() {
    let fleet = TestFleet::with(2);
    let mut e = Engine::default();
    let spec = TaskSpec {
        max_extensions: 2,
        max_failed_rounds: 1,
        ..spec()
    };
    e.start(spec, key(), vec![0.0; N], 1_000, &fleet);
    let mut now = 1_000;
    let mut failed = None;
    for _ in 0..5 {
        now += 10_001;
        let a = e.tick(now, &fleet);
        if let Some(f) = round_failed(&a) {
            failed = Some(f);
            break;
        }
    }
    let (round, why, _) = failed.expect("failed");
    assert_eq!(round, 1);
    assert_eq!(why, "0 of min_updates 1 updates after 3 deadlines of 10 s");
    assert_eq!(e.state("t").expect("task").history[0].extensions, 2);
    assert!(matches!(
        &e.state("t").expect("task").phase,
        Phase::Finished { reason } if reason.contains("failed: 1 round failed (max_failed_rounds)")
    ));
}

/// What a group task's round publishes: (messages on the group's topic, train orders on
/// devices' own topics, devices whose own topic is cleared).
type Fanout = (
    Vec<RoundHeader>,
    BTreeMap<String, RoundHeader>,
    BTreeSet<String>,
);

fn fanout(actions: &[Action]) -> Fanout {
    let trusted = TrustedKeys::new([key().verifying_key()]);
    let mut out = Fanout::default();
    for a in actions {
        let Action::Publish {
            topic,
            payload,
            retain,
        } = a
        else {
            continue;
        };
        assert!(*retain, "{topic}: round messages and clears are retained");
        if payload.is_empty() {
            let device = topic.split('/').nth(2).expect("device").to_owned();
            out.2.insert(device);
            continue;
        }
        let h = decode_round(payload, &trusted).expect("verifies").header;
        if topic == &topics::group_fl_round("fl") {
            out.0.push(h);
        } else {
            assert_eq!(topic, &topics::fl_round(&h.device));
            out.1.insert(h.device.clone(), h);
        }
    }
    out
}

/// A task over a group of 40: each round's weights go once on the group's topic, train
/// orders (issued after it) to the selected only, the earlier selected's own topics are
/// cleared, the final weights go to the group too, and a member that registers again while
/// not selected is sent nothing (its group's message is retained).
#[test]
fn a_large_group_gets_the_weights_once_and_only_the_selected_get_messages() {
    let fleet = TestFleet::with(40);
    let mut e = Engine::default();
    let s = TaskSpec {
        fraction: 0.05,
        rounds: 2,
        ..spec()
    };
    let out = e.start(s, key(), vec![0.0; N], 1_000, &fleet);
    let (group, own, cleared) = fanout(&out);
    assert_eq!(group.len(), 1);
    let g = &group[0];
    assert_eq!(g.device, topics::group_recipient("fl"));
    assert!(g.train.is_none() && !g.done);
    assert_eq!((g.round, g.issued_ms), (1, 1_000));
    let first: BTreeSet<String> = own.keys().cloned().collect();
    assert_eq!(first, e.state("t").expect("known").selected);
    assert_eq!(first.len(), 2);
    assert!(
        own.values()
            .all(|h| h.train.is_some() && h.issued_ms == 1_001)
    );
    assert!(cleared.is_empty());
    let idle = (0..40)
        .map(|i| format!("d{i}"))
        .find(|d| !first.contains(d))
        .expect("a member not selected");
    assert!(e.on_registered(&idle, &["fl".into()], 1_500).is_empty());
    let selected = first.iter().next().expect("selected").clone();
    let again = fanout(&e.on_registered(&selected, &["fl".into()], 1_500));
    assert!(again.1[&selected].train.is_some(), "its train order again");

    let mut out = Vec::new();
    for d in &first {
        out = e.on_update(d, &update_payload(d, 1, 0, 10, &[1.0; N]), 2_000, &fleet);
    }
    let (group, own, cleared) = fanout(&out);
    assert_eq!(group.len(), 1);
    assert_eq!((group[0].round, group[0].version), (2, 1));
    let second: BTreeSet<String> = own.keys().cloned().collect();
    assert_eq!(second, e.state("t").expect("known").selected);
    assert_eq!(
        cleared,
        first.difference(&second).cloned().collect::<BTreeSet<_>>(),
        "the first round's selected not selected again are cleared"
    );

    let mut out = Vec::new();
    for d in &second {
        out = e.on_update(d, &update_payload(d, 2, 1, 10, &[1.0; N]), 3_000, &fleet);
    }
    let (group, own, cleared) = fanout(&out);
    assert_eq!(group.len(), 1);
    assert!(group[0].done);
    assert!(own.is_empty());
    assert_eq!(
        cleared, second,
        "train orders are older than the final weights"
    );
}
