//! Offloading inference to the coordinator (issue 7): the decision policy ([`policy`], pure),
//! what it learns about both sides ([`estimate`], pure), the client that runs a frame here
//! or there ([`client`]) and its config section ([`config`]).

pub mod client;
pub mod config;
pub mod estimate;
pub mod policy;

pub use client::Offloader;
pub use config::OffloadConfig;
