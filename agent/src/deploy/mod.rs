//! Signed deployments on the agent: the I/O-free [`Deployer`] state machine and the
//! content-addressed artifact store it writes verified artifacts to.
//!
//! ```text
//! deploy/manifest ─► Deployer::on_manifest_payload ─► verify key + signature, target, expiry,
//!                                                     version, limits ─► Rejected | Downloading
//! deploy/chunk    ─► Deployer::on_chunk_payload    ─► check against the signed chunk digest
//!                                                     (bad: Action::ChunkDropped, asked for
//!                                                     again) ─► assemble, sha256 of the whole
//!                                                     ─► ArtifactStore::put
//!                                                     all present ─► Action::Start
//! pipeline health ─► Deployer::on_health / on_tick ─► Action::Commit | Action::Rollback
//! reconnect/stall ─► Deployer::on_reconnect / on_tick ─► Action::RequestResend
//! ```
//!
//! The caller (the agent's deploy task, `task`) owns the clock and drives the MQTT side and
//! the pipeline host: it passes events in with the current time and executes the returned
//! [`Action`]s in order. The state persists with [`Deployer::to_bytes`] whenever an
//! [`Action::Persist`] comes out (and at shutdown); after a restart [`Deployer::from_bytes`]
//! then [`Deployer::on_restart`] resume a download or roll back an unfinished health check.
//!
//! Code map:
//! - `machine`: the state machine. Invariant: no I/O besides the injected store, no clock;
//!   a rejection never emits Start, Commit or Rollback; a chunk is assembled only after it
//!   matched its signed digest, and a bad chunk never ends a deployment. Boundary: the
//!   agent's deploy task, tests.
//! - `unpack`: a deployed model's data files written out of the store into
//!   `STATE_DIR/models/` for ONNX Runtime to map. Invariant: a file is checked against its
//!   digest before use and replaced only by a rename. Boundary: `task`.
//! - `task`: the async task that decides which pipeline runs: MQTT messages in, actions
//!   executed, candidates started in shadow, committed (swapped in) or rolled back (discarded)
//!   by commands to the pipeline host, which owns the pipelines. Invariant: only a passed
//!   health check replaces the running pipeline. Boundary: `agent::run`.
//! - `config`: [`DeployConfig`], the `[deploy]` section; trusted keys parsed as the file is
//!   read. Boundary: `crate::config` aggregates it, `agent::run` hands it to the deployer.
//! - `store`: [`ArtifactStore`] with the sled and in-memory implementations.
//!   Invariant: a key is the sha256 of its value, checked on every put. Boundary: `machine`,
//!   the pipeline loader.

pub mod config;
mod machine;
pub mod store;
pub mod task;
pub mod unpack;

pub use config::{DeployConfig, TrustedKeyList};
pub use machine::{Action, Deployer, DroppedChunk, Health, StateError};
pub use store::{ArtifactStore, FileStore, MemoryStore, StoreError};
