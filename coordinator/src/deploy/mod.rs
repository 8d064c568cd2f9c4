//! Signed deployments on the coordinator side: signing keys, manifest packages (build, sign,
//! chunk, answer resends) and the per-device rollout tracker.
//!
//! ```text
//! keygen ─► key file (0600) ──┐
//! pipeline.toml + artifacts ──┴─► Package::build ─► SignedManifest ─► deploy/manifest
//!                                        └─► chunks ─► deploy/chunk ◄─ resend requests
//! deploy/status ─► Rollout::on_status ─► per-device progress (progress bar, journal)
//! ```
//!
//! Process split: `edge-coordinator deploy` builds and signs the package and writes it to the
//! spool under the state directory; the long-running `serve` takes it from there, owns the
//! rollout (publishes, answers resends, tracks status, survives restarts) and rewrites the
//! rollout's progress file, which `deploy` reads to draw its progress bars.
//!
//! Code map:
//! - `protocol::keyfile`: key generation and loading (shared with the agent and the coordinator's other keys). Invariant: never overwrites a key file, never reads a
//!   key file others can read. Boundary: the binary.
//! - `package`: building and signing a deployment (pure) plus [`package::load`], which reads the
//!   pipeline TOML and the artifact files it names. Invariant: the signed manifest fits one
//!   MQTT payload; chunks are derived from the same bytes the manifest hashes.
//!   Boundary: the binary, the service.
//! - `rollout`: what was sent to and reported by each device. Invariant: no I/O, no clock;
//!   ignores reports for other deployments. Boundary: the engine, tests.
//! - `engine`: every active rollout, the paced chunk queue, resend and status handling; says
//!   what to publish and journal. Invariant: no I/O, no clock; at most `MAX_RESEND_CHUNKS`
//!   chunks per resend request; never sends for a finished rollout. Boundary: the host, tests.
//! - `waves`: staged rollouts (`--strategy canary`): canary and batches, health gate, soak,
//!   failure budget, halt. Invariant: no I/O, no clock; a halted rollout never launches a
//!   wave again. Boundary: the engine, tests.
//! - `host`: the service's glue (owns the engine, takes the spool, resumes rollouts, writes
//!   progress files), mirroring `fl::host`. Boundary: the service.
//! - `file`: the one-file package format (`deploy --out`, `POST /api/deployments`).
//!   Invariant: reads no length it has not checked against what is left; only parses (the
//!   caller verifies the signature). Boundary: the binary, the API.
//! - `progress`: the progress file's shape (persisted rollout state, read by `deploy`).
//! - `control`: pause/resume/abort from outside serve (the CLI and the HTTP API): checks the
//!   progress file, spools the request, waits until serve applied it. Boundary: the binary, the API.
//! - `spool`: the spool and rollout directories on disk. Invariant: every file appears whole
//!   (temporary name, fsync, rename); a package is checked against its signed manifest when
//!   read. Boundary: the binary (writes the spool, reads progress), the service.

pub mod control;
pub mod engine;
pub mod file;
pub mod host;
pub mod package;
pub mod progress;
pub mod rollout;
pub mod spool;
pub mod waves;

pub use package::{ArtifactFile, Package, PackageError, PackageSpec};
pub use protocol::keyfile::{KeyError, generate_key_file, load_signing_key};
pub use rollout::{DeviceProgress, Rollout};
