//! Offloading inference to the coordinator (issue 7). So far: the decision policy
//! ([`policy`]), pure and unit-tested; the request client and its wiring into inference
//! stages come next.

pub mod policy;
