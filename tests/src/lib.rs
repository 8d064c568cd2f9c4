//! Harness for end-to-end tests that run the real binaries: the coordinator (with its embedded
//! broker or against mosquitto) and one or more agents, each a child process in a temp dir.
//!
//! Everything a test needs to drive and observe them lives here so `tests/tests/*.rs` read as
//! scenarios and `cargo xtask demo|soak` reuse the same parts:
//!
//! - [`Coordinator`], [`Mosquitto`], [`Agent`]: start/stop/kill/restart, logs to files in the
//!   test dir, killed on drop so a panicking test leaks no process;
//! - [`LocalApi`]: the agent's Unix-socket publish API, single and pipelined;
//! - [`Journal`]: tails the coordinator's JSON-lines journal and waits on predicates with a
//!   deadline (no sleeps as synchronisation);
//! - [`DeliveryReport`]: checks that every accepted message arrived once and in order;
//! - [`crash_loop`]: the SIGKILL crash loop shared by the test suite and `cargo xtask soak`;
//! - [`SigningKey`], [`PipelineDir`], [`deploy`]: signed deployments through the coordinator's CLI;
//! - [`RawMqtt`]: a bare MQTT client for hostile input; [`Tmpfs`]: a small disk to fill;
//! - [`TlsFiles`]: a throwaway CA with server and client certificates, for mqtts tests;
//! - [`LinkProxy`]: a fault-injecting TCP proxy (delay, jitter, bandwidth cap, stall of both
//!   directions or only the uplink, resets, cut/restore) between a client and its broker;
//! - [`digits`]: the digits data set and its federated splits (IID, Dirichlet, two classes);
//! - [`federated_agent`], [`FlTask`]: an agent training on its digits shard, a task, its rounds;
//! - [`run_test`]/[`TestEnv`]: a temp dir per test whose child logs are printed on failure.
//!
//! Invariant: never binds a fixed port or a shared path; every wait has a deadline.
//! Boundary: used by `tests/tests/*.rs` and by `xtask`; talks to the binaries only through their
//! command lines, config files, sockets and journal (never links agent or coordinator code).

mod agent;
pub mod api;
mod bins;
pub mod browser;
mod coordinator;
mod crash;
mod delivery;
mod deploy;
pub mod digits;
pub mod enroll;
mod env;
mod fl;
mod journal;
mod local_api;
mod mosquitto;
mod net;
mod offload;
mod process;
mod proxy;
mod raw_mqtt;
pub mod sim;
mod tls;
mod tmpfs;

use std::time::Duration;

pub use agent::{Agent, AgentOptions};
pub use bins::{agent_bin, coordinator_bin, sim_bin};
pub use coordinator::Coordinator;
pub use crash::{CrashLoopOptions, CrashLoopReport, crash_loop};
pub use delivery::{DeliveryReport, Expected};
pub use deploy::{
    DeployRun, FEATURES_MODULE, PipelineDir, SigningKey, deploy, deploy_models, features_pipeline,
    wasm_dir,
};
pub use env::{TestEnv, run_test};
pub use fl::{
    FL_GROUP, FL_MODEL, FlTask, closed_rounds, federated_agent, federated_agent_in, federated_data,
    final_accuracy, fl_status, task_finished,
};
pub use journal::{Event, Journal, served_model};
pub use local_api::{Accepted, BatchOutcome, LocalApi, Publish, Reply, test_messages};
pub use mosquitto::{Mosquitto, mosquitto_bin};
pub use net::{free_port, wait_for_tcp};
pub use offload::{
    OFFLOAD_MODEL, OFFLOAD_PIPELINE, latest_offload, offload_coordinator_config, offload_count,
    offloading_agent,
};
pub use process::{ChildProc, stop_all_children};
pub use protocol::v1::Class;
pub use proxy::{Link, LinkProxy, ProxyStats};
pub use raw_mqtt::{RawMqtt, RawOutcome};
pub use tls::{CLIENT_CN, TlsFiles};
pub use tmpfs::{Tmpfs, require_root};

/// How long a process may take to become ready (socket up, journal "ready").
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long queued messages may go without one more of them reaching the coordinator's journal
/// (a stall; a long backlog may take longer in all while it keeps moving).
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);
/// Poll interval for every wait in the harness: short enough not to slow tests down, long
/// enough not to compete with the processes under test on a 2-core machine.
pub const POLL: Duration = Duration::from_millis(20);
