//! `edge-sim`, the fleet simulator: N simulated devices in one process, each with its own MQTT
//! connection to a real broker, talking to the real coordinator with the agent library's own
//! protocol code (enrollment and sealing, outbox, uplink, deploy state machine, telemetry).
//! What it leaves out: WASM and ONNX Runtime; a device's candidate pipeline passes or fails
//! its health check by the scenario's rule. See `sim/README.md` for the scenario file.

pub mod device;
pub mod fleet;
pub mod link;
pub mod results;
pub mod rogue;
pub mod scenario;
pub mod timeline;

pub use fleet::run;
pub use results::{DeviceEnd, Report, Summary};
pub use scenario::Scenario;
