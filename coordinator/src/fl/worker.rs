//! The evaluation thread: held-out evaluations run here, one at a time in the order they were
//! asked for, so the service loop never waits on ONNX Runtime (loading the library and running
//! up to [`super::eval::MAX_HOLDOUT_ROWS`] rows would hold back every ack, chunk and offload
//! answer of the fleet behind it).
//!
//! A dedicated thread rather than `spawn_blocking` per evaluation: it owns the evaluator (the
//! runtime, loaded once, and every task's model and held-out set) without a lock, and one
//! queue keeps the outcomes in round order, so `fl_round_closed` lines come out in order.
//!
//! Invariant: every request sent gets exactly one outcome while the thread lives (a panic in
//! an evaluation is caught and reported as the reason). Boundary: [`super::host::FlHost`].

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::thread::JoinHandle;

use protocol::v1::fl::ParamSpec;
use tokio::sync::mpsc::UnboundedSender;

use super::engine::{EvalOutcome, EvalRequest};
use super::eval::{Evaluator, Holdout, OnnxEvaluator};

/// An evaluation's outcome, on its way back to the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluated {
    pub task: String,
    pub version: u32,
    pub outcome: EvalOutcome,
}

enum Job {
    /// A task's model and held-out set, sent before any of its evaluations.
    Add {
        task: String,
        model: Vec<u8>,
        params: Vec<ParamSpec>,
        holdout: Holdout,
        output: Option<String>,
    },
    Evaluate(EvalRequest),
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start the evaluation thread: {0}")]
    Spawn(std::io::Error),
    #[error("the evaluation thread has stopped")]
    Stopped,
}

/// Handle of the evaluation thread. Outcomes go to the sender it was started with.
pub struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl Worker {
    pub fn start(results: UnboundedSender<Evaluated>) -> Result<Worker, WorkerError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("fl-eval".into())
            .spawn(move || run(&rx, &results))
            .map_err(WorkerError::Spawn)?;
        Ok(Worker {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    /// Registers a task's held-out set; its evaluations may follow at once.
    pub fn add(
        &self,
        task: &str,
        model: Vec<u8>,
        params: Vec<ParamSpec>,
        holdout: Holdout,
        output: Option<String>,
    ) -> Result<(), WorkerError> {
        self.send(Job::Add {
            task: task.to_owned(),
            model,
            params,
            holdout,
            output,
        })
    }

    pub fn evaluate(&self, request: EvalRequest) -> Result<(), WorkerError> {
        self.send(Job::Evaluate(request))
    }

    fn send(&self, job: Job) -> Result<(), WorkerError> {
        self.jobs
            .as_ref()
            .ok_or(WorkerError::Stopped)?
            .send(job)
            .map_err(|_| WorkerError::Stopped)
    }

    /// Lets the thread finish what it was asked (outcomes still go out) and joins it; on a
    /// blocking thread, so the runtime keeps serving meanwhile.
    pub async fn shutdown(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::warn!("the federated evaluation thread panicked");
            }
        }
    }
}

fn run(jobs: &mpsc::Receiver<Job>, results: &UnboundedSender<Evaluated>) {
    let mut eval = OnnxEvaluator::default();
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Add {
                task,
                model,
                params,
                holdout,
                output,
            } => eval.add(&task, model, params, holdout, output),
            Job::Evaluate(r) => {
                let started = std::time::Instant::now();
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    eval.evaluate(&r.task, r.version, &r.weights)
                }))
                .map_or_else(
                    |_| EvalOutcome::Unavailable("the evaluation panicked".into()),
                    EvalOutcome::from,
                );
                tracing::debug!(task = %r.task, version = r.version, ms = started.elapsed().as_millis() as u64, "held-out evaluation done");
                let done = Evaluated {
                    task: r.task,
                    version: r.version,
                    outcome,
                };
                if results.send(done).is_err() {
                    // The host is gone: nobody is left to record it.
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outcomes come back in order, one per request, and an unknown task is `NoHoldout`.
    /// With a library (`cargo xtask ort`) the registered task is scored; without one its
    /// outcome says why (the evaluator's own test checks the figures).
    #[tokio::test]
    async fn outcomes_come_back_in_order_one_per_request() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut w = Worker::start(tx).expect("thread starts");
        let (model, params) = crate::fl::eval::linear_2x2_for_test();
        let holdout = Holdout::parse("1,0,0\n0,1,1\n").expect("parses");
        w.add("t", model, params, holdout, None).expect("queued");
        for (task, version) in [("t", 1), ("other", 1), ("t", 2)] {
            w.evaluate(EvalRequest {
                task: task.into(),
                version,
                weights: vec![2.0, 0.0, 0.0, 2.0, 0.0, 0.0],
            })
            .expect("queued");
        }
        w.shutdown().await;
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            got.push(e);
        }
        let order: Vec<(&str, u32)> = got.iter().map(|e| (e.task.as_str(), e.version)).collect();
        assert_eq!(order, [("t", 1), ("other", 1), ("t", 2)]);
        assert_eq!(got[1].outcome, EvalOutcome::NoHoldout);
        for e in [&got[0], &got[2]] {
            match &e.outcome {
                EvalOutcome::Metrics(m) => assert_eq!((m.rows, m.accuracy), (2, 1.0)),
                EvalOutcome::Unavailable(why) => assert!(why.contains("unavailable"), "{why}"),
                EvalOutcome::NoHoldout => panic!("the task is registered"),
            }
        }
        assert!(
            matches!(
                w.evaluate(EvalRequest {
                    task: "t".into(),
                    version: 3,
                    weights: Vec::new(),
                }),
                Err(WorkerError::Stopped)
            ),
            "nothing is taken after shutdown"
        );
    }
}
