//! `edge-coordinator fl status`: a task's state and its rounds as a table.

use std::fmt::Write as _;

use super::state::{Phase, RoundMetrics, TaskState};

fn opt(v: Option<f32>, f: impl Fn(f32) -> String) -> String {
    v.map_or_else(|| "-".to_owned(), f)
}

fn counts(map: &std::collections::BTreeMap<String, u64>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn row(m: &RoundMetrics, state: String, privacy: bool) -> Vec<String> {
    let mut r = vec![
        m.round.to_string(),
        m.selected.to_string(),
        m.received.to_string(),
        m.on_time.to_string(),
        m.late.to_string(),
        m.rejected_total().to_string(),
        m.duplicates.to_string(),
        m.bytes_in.to_string(),
        m.bytes_out.to_string(),
        opt(m.train_loss, |v| format!("{v:.4}")),
        opt(m.eval_loss, |v| format!("{v:.4}")),
        match (m.eval_accuracy, &m.eval_note) {
            (Some(a), _) => format!("{:.1}%", a * 100.0),
            (None, Some(_)) => "n/a".into(),
            (None, None) => "-".into(),
        },
        // threshold (updates clipped)
        opt(m.clip_threshold, |t| format!("{t:.3} ({})", m.clipped)),
    ];
    if privacy {
        r.push(m.epsilon.map_or_else(|| "-".into(), |e| format!("{e:.2}")));
    }
    r.push(state);
    r
}

/// Renders one task: a summary, then one line per round (closed rounds, then the current
/// one unless the task finished), then notes (rejections by reason, evaluation problems).
pub fn render(s: &TaskState, now_ms: u64) -> String {
    let spec = &s.spec;
    let mut out = String::new();
    let phase = match &s.phase {
        Phase::Open => format!(
            "round {} of {} open, deadline in {} s",
            s.round,
            spec.rounds,
            s.deadline_ms.saturating_sub(now_ms).div_ceil(1000)
        ),
        Phase::Waiting { reason } => {
            format!("round {} of {} waiting: {reason}", s.round, spec.rounds)
        }
        Phase::Finished { reason } => {
            format!("finished ({reason}) after {} rounds", s.history.len())
        }
    };
    let _ = writeln!(
        out,
        "task {}: {phase}; global version {}",
        spec.id, s.version
    );
    let _ = writeln!(
        out,
        "  model {}, {} weights, members {}, {} + {}, codec {}, quorum {}, min_clients {}, max_staleness {}",
        spec.model,
        spec.weight_count(),
        spec.members,
        spec.rule,
        spec.server_optimizer,
        spec.train.codec,
        spec.quorum,
        spec.min_clients,
        spec.max_staleness
    );
    let privacy = spec.privacy.is_some();
    let _ = write!(out, "  clip {}", spec.clip);
    if let Some(p) = &spec.privacy {
        let spent = s
            .history
            .iter()
            .rev()
            .find_map(|m| m.epsilon)
            .unwrap_or(0.0);
        let _ = write!(
            out,
            "; differential privacy: gaussian, noise_multiplier {}, delta {}, epsilon spent {spent:.2}{}",
            p.noise_multiplier,
            p.delta,
            p.max_epsilon
                .map_or_else(String::new, |m| format!(" of max {m}"))
        );
    }
    let _ = writeln!(out);
    let mut header = vec![
        "ROUND",
        "SELECTED",
        "RECEIVED",
        "ON TIME",
        "LATE",
        "REJECTED",
        "DUPS",
        "BYTES IN",
        "BYTES OUT",
        "TRAIN LOSS",
        "EVAL LOSS",
        "ACCURACY",
        "CLIP (N)",
    ];
    if privacy {
        header.push("EPSILON");
    }
    header.push("STATE");
    let mut rows = vec![header.into_iter().map(str::to_owned).collect::<Vec<_>>()];
    for m in &s.history {
        let evaluating = m.new_version.is_some_and(|v| s.evaluating.contains(&v));
        rows.push(row(
            m,
            format!(
                "closed ({}){}",
                m.close_reason.as_deref().unwrap_or("-"),
                if evaluating { ", evaluating" } else { "" }
            ),
            privacy,
        ));
    }
    if !matches!(s.phase, Phase::Finished { .. }) {
        rows.push(row(&s.current, s.phase.name().to_owned(), privacy));
    }
    let columns = rows[0].len();
    let mut widths = vec![0usize; columns];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in &rows {
        let mut line = String::new();
        for (i, (c, &w)) in r.iter().zip(&widths).enumerate() {
            if i == columns - 1 {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    if !s.totals.rejected.is_empty() || s.totals.duplicates > 0 {
        let _ = writeln!(
            out,
            "rejected updates: {}; duplicates {}",
            if s.totals.rejected.is_empty() {
                "none".to_owned()
            } else {
                counts(&s.totals.rejected)
            },
            s.totals.duplicates
        );
    }
    // Failures per round and device: what each device said, so a stuck or failed task
    // explains itself here rather than in the devices' logs.
    let current = (!matches!(s.phase, Phase::Finished { .. })).then_some(&s.current);
    for m in s.history.iter().chain(current) {
        if let Some(why) = &m.failed {
            let _ = writeln!(out, "round {} failed: {why}", m.round);
        }
        for f in &m.failures {
            let _ = writeln!(out, "round {} device {f}", m.round);
        }
    }
    if let Some(note) = s.history.iter().rev().find_map(|m| m.eval_note.as_deref()) {
        let _ = writeln!(out, "{note}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fl::aggregate::{Rule, ServerOptimizer};
    use crate::fl::state::Totals;
    use crate::fl::task::{Members, TaskSpec, TrainSpec};
    use protocol::v1::fl::{Codec, ParamSpec};

    #[test]
    fn renders_rounds_and_notes() {
        let closed = RoundMetrics {
            round: 1,
            version: 0,
            new_version: Some(1),
            selected: 3,
            received: 3,
            on_time: 3,
            rejected: [("non_finite".to_owned(), 2)].into_iter().collect(),
            bytes_in: 120,
            bytes_out: 900,
            train_loss: Some(0.6),
            eval_accuracy: Some(0.875),
            eval_loss: Some(0.5),
            close_reason: Some("quorum".into()),
            clip_threshold: Some(0.25),
            clipped: 1,
            ..RoundMetrics::default()
        };
        let s = TaskState {
            spec: TaskSpec {
                id: "digits".into(),
                model: "models/d.onnx".into(),
                params: vec![ParamSpec {
                    name: "W".into(),
                    shape: vec![2, 2],
                }],
                members: Members::Group("fl".into()),
                rounds: 5,
                fraction: 1.0,
                min_clients: 1,
                quorum: 1.0,
                round_timeout_s: 60,
                round_interval_s: 0,
                min_updates: 1,
                max_staleness: 1,
                seed: 0,
                train: TrainSpec {
                    epochs: 1,
                    lr: 0.1,
                    batch_size: 8,
                    mu: 0.0,
                    codec: Codec::Int8,
                    max_samples: None,
                },
                rule: Rule::Median,
                server_optimizer: ServerOptimizer::Sgd { lr: 1.0 },
                frozen: None,
                clip: crate::fl::privacy::Clip::default(),
                privacy: None,
                holdout: true,
                max_failed_rounds: 3,
                max_extensions: 10,
                eval_output: None,
            },
            version: 1,
            round: 2,
            phase: Phase::Open,
            selected: Default::default(),
            evaluating: Default::default(),
            deadline_ms: 10_500,
            not_before_ms: 0,
            recent: Default::default(),
            current: RoundMetrics {
                round: 2,
                version: 1,
                selected: 3,
                ..RoundMetrics::default()
            },
            history: vec![closed],
            totals: Totals {
                rejected: [("non_finite".to_owned(), 2)].into_iter().collect(),
                ..Totals::default()
            },
            failed_in_a_row: 0,
            started_ms: 0,
            finished_ms: None,
        };
        let text = render(&s, 1_000);
        assert!(
            text.contains("task digits: round 2 of 5 open, deadline in 10 s; global version 1"),
            "{text}"
        );
        assert!(text.contains("median + sgd(lr 1), codec int8"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[2], "  clip auto (2 x median norm)", "{text}");
        assert!(lines[3].starts_with("ROUND"), "{text}");
        assert!(
            lines[4].contains("87.5%")
                && lines[4].contains("0.250 (1)")
                && lines[4].ends_with("closed (quorum)"),
            "{text}"
        );
        assert!(lines[5].ends_with("open"), "{text}");
        assert!(
            text.contains("rejected updates: non_finite 2; duplicates 0"),
            "{text}"
        );
    }
}
