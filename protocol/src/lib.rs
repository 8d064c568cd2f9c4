//! Wire protocol between edge agents and the coordinator.
//!
//! This is the only crate whose types travel over MQTT; the agent and the coordinator share
//! nothing else. The inference crate (used by both) depends on it too, only to convert its
//! tensors to and from the wire's (`v1::tensor`) in one place. Everything lives under a version module (`v1`); a breaking change adds `v2`
//! beside it and the topic tree carries the version (`edge/v1/...`), so old and new devices can
//! share one broker during a fleet upgrade.

pub mod keyfile;
pub mod v1;
