//! Federated learning on the coordinator: tasks, rounds, validation of device updates,
//! aggregation, persistence and per-round metrics.
//!
//! ```text
//! fl start TASK.toml ─► task::load (validate, read initial ONNX weights) ─► files: spool
//! serve: host picks it up ─► engine: select ─► signed RoundMessage, retained, per member
//!        fl/update ─► engine.on_update: validate ─► accept | reject by reason
//!        quorum or deadline ─► aggregate + server optimizer ─► new global version
//!        ─► next round | done (at once)
//!        ─► eval request ─► worker thread (ONNX Runtime, held-out set) ─► outcome event
//!           ─► fl_round_closed (with eval figures) [─► fl_task_finished after the last]
//!        every change ─► files (state.json is the commit point) ─► then publish
//! fl status ─► reads state.json
//! ```
//!
//! Round rules:
//! - A round opens when at least `min_clients` members are online (status online, enrolled and
//!   registered, in the task's group (the groups enrollment gave the device) or device list);
//!   until then the task waits and `fl status` says why.
//!   It selects `max(min_clients, ceil(fraction * online))` online members by a shuffle seeded
//!   from the task's `seed`, the round and the task id (replayable), sets the deadline
//!   `round_timeout_s` ahead and publishes a signed round message, retained, QoS 1, to every
//!   registered member: with a train order for the selected, weights only for the others.
//! - The round closes early when `ceil(quorum * selected)` updates trained for it are in. At
//!   the deadline it closes if at least `min_updates` updates (on time or late) are in;
//!   otherwise it is extended by another `round_timeout_s`, and online members not selected
//!   yet are added (train orders to them only) until as many selected members are online as
//!   a fresh selection would pick. Stragglers and devices that dropped out simply do not count
//!   unless their update arrives; the extension repeats until `min_updates` is met, at most
//!   `max_extensions` times: at the next deadline the round fails (below).
//! - **Failures.** A selected device that cannot train sends a failure report (envelope kind
//!   `fl-failure` on its `fl/update` topic: task, round, kind `model|data|resources|timeout`,
//!   reason). One per device and round is recorded in the round's metrics and journaled
//!   (`fl_train_failed`); reports for another round are journaled only, ones from devices not
//!   selected are refused `not_selected`. Once every selected device has either failed or
//!   sent an update, the round closes (`failures`) if `min_updates` are in, and otherwise
//!   **fails**: it ends without a new global version (`close_reason` `failed`, journaled as
//!   `fl_round_failed` with every device's reason) and the next round opens: at once if every
//!   failure was of kind `model` (it will fail the same way), otherwise after a round timeout
//!   (no labeled data yet, a busy board: causes that pass). After
//!   `max_failed_rounds` failed rounds in a row the task finishes with `failed: ...` and the
//!   reasons; a round that closes normally resets the count.
//! - Validation, in order; a refused update is counted by reason in the round's metrics and
//!   journaled, and never reaches the aggregate: `malformed` (not a binary envelope of kind
//!   fl-update from the topic's device, or an update header that does not decode),
//!   `unknown_task`, `task_finished`, `unregistered` (the registry has no registration from
//!   the device), `unknown_round` (round 0, not opened yet, or no longer known),
//!   `late_dropped` (see below), `not_selected`, `duplicate` (an update for the same task,
//!   round and device was already accepted; counted as a duplicate, not a rejection; updates
//!   are idempotent by (task, round, device), so broker redeliveries and agent resends are
//!   harmless), `base_version` (trained from another global version than the round sent),
//!   `non_finite` (NaN or infinity in the loss, accuracy or delta), `wrong_length` and
//!   `bad_payload` (the codec payload does not decode to the model's weight count).
//! - **Late updates.** An update for round `r` that arrives after `r` closed, while round `o`
//!   is current (open, or waiting to open), is applied to round `o` if `o - r <=
//!   max_staleness`, with its aggregation weight multiplied by `1 / (1 + (o - r))` (its delta
//!   was computed from an older global model); it must still come from a device selected in
//!   `r` and name `r`'s global version. Late updates count for `min_updates` at the deadline
//!   but not for the quorum (which counts updates trained for the round itself). Older ones
//!   are dropped and counted as `late_dropped`. `max_staleness = 0` drops every late update.
//! - Clipping ([`privacy::clip`], before aggregation): each delta whose L2 norm exceeds the
//!   round's threshold (`clip_multiplier` x the round's median norm by default, or a fixed
//!   norm, or off) is scaled down to it; the threshold and the number clipped are reported per
//!   round. With `[privacy]`, deltas are clipped to the fixed norm, summed unweighted, noised
//!   and divided by their count ([`privacy::noisy_mean`]); the epsilon spent so far is reported
//!   per round, and a task with `max_epsilon` finishes before a round that would pass it.
//! - Aggregation ([`aggregate()`]): FedAvg weights each delta by `samples / (1 + staleness)`;
//!   trimmed mean and median are unweighted, stale deltas scaled by `1 / (1 + staleness)`.
//!   The server optimizer (SGD, FedAvgM, FedAdam) then moves the global weights; its state is
//!   persisted with each version.
//! - After the last round, or `fl stop`, every member gets the final weights with `done`.
//! - A task over a group with at least 32 members to send weights only sends those once, on
//!   the group's round topic, and a message on a device's own topic only to the selected
//!   (`engine::messages`).
//! - A device has one round topic, so a task whose members (registered devices, the same
//!   group, or a shared listed device) overlap a running task's is refused when `serve`
//!   takes it (it ends at once with the reason, publishing nothing); stop the other first.
//!   Devices that join both groups later are not detected.
//!
//! Persistence and restart: every change is written under `state_dir/fl/tasks/{id}/`
//! ([`files`]) before anything is published; a restarted coordinator reloads each task at the
//! same round with its selection, deadline, optimizer state and the updates it had accepted,
//! and announces the open round again (an embedded broker forgot its retained messages).
//! Accepted updates are durable before the service commits the batch they came in, so with
//! an external broker (acknowledged after the commit) none is lost; with the embedded broker
//! the usual window applies (see ARCHITECTURE.md).
//!
//! Metrics per round ([`RoundMetrics`]): selected, received (on time + late), rejected by
//! reason, duplicates, bytes in (update bodies) and out (round messages), the
//! sample-weighted training loss and accuracy the devices reported, and the new global
//! model's accuracy and cross-entropy on the optional held-out set ([`eval`]). Evaluation
//! runs on its own thread ([`worker`]), never in the service loop: a closing round opens the
//! next one at once, and its `fl_round_closed` is journaled when the figures are in (so each
//! round still has one complete line, and `fl_task_finished` still comes after the last one).
//! Until then `state.json` lists the version under `evaluating`; a restart runs the current
//! version's evaluation again and records older ones (only possible when rounds close faster
//! than evaluations run) as `eval unavailable: ...restarted...`. Held-out sets are capped at
//! [`eval::MAX_HOLDOUT_ROWS`] rows; without an ONNX Runtime library it records
//! `eval unavailable: REASON` and the task goes on.
//!
//! Code map:
//! - `aggregate`: aggregation rules and server optimizers. Invariant: pure functions, no I/O;
//!   never panics on mismatched lengths. Boundary: the engine, benchmarks.
//! - `task`: the task file and its validation. Invariant: every error names the file and key.
//!   Boundary: the binary (`fl start`), the host.
//! - `trainer_check`: the task's trainer run once in the devices' sandbox (`edge-sandbox`)
//!   under the task's device limits, on a synthetic batch. Invariant: writes nothing but a
//!   throwaway cache. Boundary: `task`.
//! - `engine`: rounds, selection, validation, aggregation, round messages, evaluation
//!   requests and outcomes. Invariant: no I/O, no clock, no evaluation of its own; a refused
//!   update never touches the aggregate; writes are handed out before the actions that depend
//!   on them. Boundary: the host, tests. Split by job: `engine/selection.rs`,
//!   `admission.rs`, `rounds.rs`, `messages.rs`, tests under `engine/tests/`.
//! - `state`: persisted task state and round metrics (also the `fl status --json` shape).
//! - `eval`: held-out sets and ONNX evaluation. Invariant: a missing runtime is a reason, never
//!   a panic. Boundary: the worker.
//! - `worker`: the evaluation thread. Invariant: one outcome per request, in order. Boundary:
//!   the host.
//! - `files`: spool, task directories, stop requests. Invariant: every file appears whole;
//!   `state.json` is written after the files it names and before the ones it no longer needs
//!   are deleted. Boundary: the binary, the host.
//! - `host`: the service's glue (owns engine, worker, files). Boundary: the service.
//! - `status`: the `fl status` table.

pub mod aggregate;
pub mod engine;
pub mod eval;
pub mod files;
pub mod host;
pub mod parts;
pub mod privacy;
pub mod state;
pub mod status;
pub mod task;
pub mod trainer_check;
pub mod worker;

pub use aggregate::{ClientUpdate, Rule, ServerOptimizer, ServerState, aggregate};
pub use host::FlHost;
pub use state::{Phase, RoundMetrics, TaskState};
pub use task::{LoadedTask, TaskError, TaskSpec};
