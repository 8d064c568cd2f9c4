//! The edge agent: durable outbox, MQTT uplink, telemetry and the local publish API.
//!
//! Entry point is [`agent::run`]; the binary in `main.rs` only parses the command line.

pub mod agent;
pub mod command;
pub mod config;
pub mod dataset;
pub mod deploy;
pub mod enrollment;
pub mod fl;
pub mod fsutil;
pub mod identity;
pub mod inbox;
pub mod inference;
pub mod link;
pub mod local_api;
pub mod memory;
pub mod metrics;
pub mod offload;
pub mod outbox;
pub mod pipeline;
/// The WASM sandbox, its own crate (`sandbox/`, shared with the coordinator's task checks).
pub use edge_sandbox as sandbox;
pub mod sd_notify;
pub use edge_sandbox::setting;
pub mod statedb;
pub mod telemetry;
pub mod uplink;
