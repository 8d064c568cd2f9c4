//! Offloading inference to the coordinator (issue 7): the decision policy ([`policy`], pure),
//! what it learns about both sides ([`estimate`], pure) and the client that runs a frame here
//! or there ([`client`]).

pub mod client;
pub mod estimate;
pub mod policy;

pub use client::{Direct, Offloader};
