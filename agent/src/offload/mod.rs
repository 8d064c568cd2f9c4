//! Offloading inference to the coordinator (issue 7): the decision policy ([`policy`], pure),
//! what it learns about both sides ([`estimate`], pure), the client's bookkeeping without I/O
//! ([`core`]: decisions, probes, counters), the client that runs a frame here or there around
//! it ([`client`]) and its config section ([`config`]).

pub mod client;
pub mod config;
pub mod core;
pub mod estimate;
pub mod policy;

pub use client::Offloader;
pub use config::OffloadConfig;
pub use core::OffloadCore;
