//! Device identity on the coordinator: who may join the fleet (enrollment), and proof of who
//! sent each message (the authentication gate). The contract with the agent is
//! `protocol::v1::auth` and `protocol::v1::enroll`.
//!
//! ```text
//! {d}/enroll ──► core: open_request (device key, claim key) ─► policy (claim|manual|allowlist)
//!                 ─► record (sled tree `enrollment`) + journal + signed answer, retained ─► {d}/enroll/answer
//! `devices approve|reject|revoke` ─► files: spool ─► serve ─► core ─► same as above
//! every other inbound message ─► gate: enrolled? MAC by the session's up key? replay window?
//!                 ─► routed without its trailer | dropped, counted by reason
//! every outbound message ─► gate: down MAC | coordinator signature | as is (per topic)
//! ```
//!
//! Parts:
//! - `config`: the `[enrollment]` section. Invariant: keys and ids are checked when the file is
//!   read. Boundary: `crate::config`.
//! - `core`: decisions on requests and operator commands. Invariant: no I/O, no clock; a record
//!   bound to a key is never rebound to another (except a rejected one), and a refusal about
//!   another key is never retained. Boundary: the service, tests.
//! - `gate`: inbound verification, outbound sealing, replay windows, drop counters.
//!   Invariant: no I/O, no clock; nothing unauthenticated is routed, except topics outside the
//!   tree (the core rejects those). Boundary: the service.
//! - `files`: identity, epoch, command spool, snapshot. Invariant: the epoch only rises; every
//!   file appears whole. Boundary: the service and the binary (`identity`, `devices ...`).
//!
//! Persistence: records and replay windows are in the store (`crate::store`), written with
//! the service's batch commit; the snapshot file is a view for the commands, which cannot open
//! sled while `serve` holds it.

pub mod config;
pub mod core;
pub mod files;
pub mod gate;

pub use config::{EnrollmentConfig, Mode, Policy};
pub use core::{Answer, CommandError, EnrollmentRecord, Enrollments, Outcome};
pub use gate::{Gate, Outgoing, SealError, Verdict};

use crate::core::Core;
use crate::registry::DeviceRecord;

/// The registry as group membership sees it: only enrolled devices, in the groups their
/// enrollment gave them (what a registration says about groups is ignored).
#[derive(Debug, Clone, Copy)]
pub struct EnrolledFleet<'a> {
    pub registry: &'a Core,
    pub enrollments: &'a Enrollments,
}

impl<'a> EnrolledFleet<'a> {
    pub fn new(registry: &'a Core, enrollments: &'a Enrollments) -> EnrolledFleet<'a> {
        EnrolledFleet {
            registry,
            enrollments,
        }
    }

    /// Enrolled devices that registered, with their groups.
    pub fn registered(&self) -> impl Iterator<Item = (&'a DeviceRecord, &'a [String])> + 'a {
        let enrollments = self.enrollments;
        self.registry.devices().filter_map(move |r| {
            r.registration.as_ref()?;
            Some((r, enrollments.groups(&r.device)?))
        })
    }

    /// The groups of an enrolled device that registered.
    pub fn groups(&self, device: &str) -> Option<&'a [String]> {
        self.registry.device(device)?.registration.as_ref()?;
        self.enrollments.groups(device)
    }
}
