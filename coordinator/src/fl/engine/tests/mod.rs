//! The engine's unit tests: no broker, no clock, no disk. A `TestFleet` stands in for the
//! registry, updates are built as agents encode them, and evaluations are answered the way
//! the host would (`fixed_eval`). `admission`: selection, opening, validation; `rounds`:
//! closing, late updates, deadlines, evaluation outcomes, finishing and restarts.

use super::*;
use crate::fl::aggregate::{Rule, ServerOptimizer};
use crate::fl::eval::EvalMetrics;
use crate::fl::privacy::{Clip, Privacy};
use crate::fl::task::TrainSpec;
use protocol::v1::binary::BinaryEnvelope;
use protocol::v1::deploy::TrustedKeys;
use protocol::v1::fl::{self, Codec, ParamSpec, RoundHeader, Update, codec, decode_round};
use protocol::v1::{Class, message_id};

/// devices: id -> (registered, online, groups)
#[derive(Default)]
pub(super) struct TestFleet(pub(super) BTreeMap<String, (bool, bool)>);

impl TestFleet {
    pub(super) fn with(n: usize) -> TestFleet {
        let mut f = TestFleet::default();
        for i in 0..n {
            f.0.insert(format!("d{i}"), (true, true));
        }
        f
    }
}

impl Fleet for TestFleet {
    fn is_registered(&self, device: &str) -> bool {
        self.0.get(device).is_some_and(|d| d.0)
    }
    fn members(&self, _: &Members) -> Vec<(String, bool)> {
        self.0
            .iter()
            .filter(|(_, d)| d.0)
            .map(|(k, d)| (k.clone(), d.1))
            .collect()
    }
}

/// What a host's evaluator would report: no runtime for version 1, figures after.
pub(super) fn fixed_eval(version: u32) -> EvalOutcome {
    if version == 1 {
        EvalOutcome::Unavailable("onnx runtime unavailable: test".into())
    } else {
        EvalOutcome::Metrics(EvalMetrics {
            accuracy: 0.5,
            loss: 1.0,
            rows: 4,
        })
    }
}

/// Runs every evaluation the engine asked for, as the host would, and returns what the
/// outcomes handed out.
pub(super) fn run_evaluations(e: &mut Engine) -> Vec<Action> {
    let mut out = Vec::new();
    for r in e.take_evaluations() {
        out.extend(e.on_evaluated(&r.task, r.version, fixed_eval(r.version)));
    }
    out
}

pub(super) fn closed_metrics(actions: &[Action]) -> Option<RoundMetrics> {
    events(actions).into_iter().find_map(|e| match e {
        Event::FlRoundClosed { metrics, .. } => Some((**metrics).clone()),
        _ => None,
    })
}

pub(super) fn spec_with_holdout() -> TaskSpec {
    TaskSpec {
        holdout: true,
        ..spec()
    }
}

pub(super) const N: usize = 6;

pub(super) fn key() -> SigningKey {
    SigningKey::from_bytes(&[3; 32])
}

pub(super) fn spec() -> TaskSpec {
    TaskSpec {
        id: "t".into(),
        model: "models/m.onnx".into(),
        params: vec![
            ParamSpec {
                name: "W".into(),
                shape: vec![2, 2],
            },
            ParamSpec {
                name: "B".into(),
                shape: vec![2],
            },
        ],
        members: Members::Group("fl".into()),
        rounds: 3,
        fraction: 1.0,
        min_clients: 2,
        quorum: 1.0,
        round_timeout_s: 10,
        round_interval_s: 0,
        min_updates: 1,
        max_staleness: 1,
        seed: 0,
        train: TrainSpec {
            epochs: 1,
            lr: 0.1,
            batch_size: 4,
            mu: 0.0,
            codec: Codec::Fp32,
            max_samples: None,
        },
        rule: Rule::FedAvg,
        server_optimizer: ServerOptimizer::Sgd { lr: 1.0 },
        frozen: None,
        clip: Clip::Off,
        privacy: None,
        holdout: false,
        max_failed_rounds: 3,
        max_extensions: 10,
        eval_output: None,
    }
}

pub(super) fn update_payload(
    device: &str,
    round: u32,
    base: u32,
    samples: u32,
    delta: &[f32],
) -> Vec<u8> {
    let u = Update {
        task: "t".into(),
        round,
        base_version: base,
        samples,
        loss: 0.5,
        accuracy: 0.8,
        train_ms: 1,
        payload: codec::encode(Codec::Fp32, delta, None, 0),
    };
    raw_update(device, &u)
}

pub(super) fn raw_update(device: &str, u: &Update) -> Vec<u8> {
    BinaryEnvelope {
        id: message_id(1, u64::from(u.round) * 1000 + u64::from(u.samples)),
        device: device.into(),
        class: Class::Model,
        seq: 1,
        created_ms: 0,
        kind: fl::UPDATE_KIND.into(),
        body: u.encode(),
    }
    .encode()
    .expect("encodes")
}

pub(super) fn events(actions: &[Action]) -> Vec<&Event> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event(e) => Some(e),
            _ => None,
        })
        .collect()
}

pub(super) fn rounds_published(actions: &[Action]) -> Vec<(String, RoundHeader, Vec<f32>)> {
    let trusted = TrustedKeys::new([key().verifying_key()]);
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish {
                topic,
                payload,
                retain,
            } => {
                assert!(*retain, "round messages are retained");
                let m = decode_round(payload, &trusted).expect("verifies");
                Some((topic.clone(), m.header, m.weights))
            }
            _ => None,
        })
        .collect()
}

pub(super) fn rejected_reason(actions: &[Action]) -> Option<&'static str> {
    events(actions).into_iter().find_map(|e| match e {
        Event::FlUpdateRejected { reason, .. } => Some(*reason),
        _ => None,
    })
}

pub(super) fn started(fleet: &TestFleet) -> (Engine, Vec<Action>) {
    let mut e = Engine::default();
    let out = e.start(spec(), key(), vec![0.0; N], 1_000, fleet);
    (e, out)
}

mod admission;
mod rounds;
