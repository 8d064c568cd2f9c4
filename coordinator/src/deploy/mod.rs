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
//! Code map:
//! - `keys`: key generation and loading. Invariant: never overwrites a key file, never reads a
//!   key file others can read. Boundary: the binary.
//! - `package`: building and signing a deployment (pure) plus [`package::load`], which reads the
//!   pipeline TOML and the artifact files it names. Invariant: the signed manifest fits one
//!   MQTT payload; chunks are derived from the same bytes the manifest hashes.
//!   Boundary: the binary, the service (later).
//! - `rollout`: what was sent to and reported by each device. Invariant: no I/O, no clock;
//!   ignores reports for other deployments. Boundary: the service (later), tests.

pub mod keys;
pub mod package;
pub mod rollout;

pub use keys::{KeyError, generate_key_file, load_signing_key};
pub use package::{ArtifactFile, Package, PackageError, PackageSpec};
pub use rollout::{DeviceProgress, Rollout};
