//! Hostile test module `sleep`: `process` blocks in `std::thread::sleep` for an hour. The wait
//! happens inside the host (a WASI monotonic-clock subscription), where wasmtime's epoch
//! deadline cannot reach it, so the host must bound blocking waits itself and time the call out.
//!
//! Config: none (`{}`).

use edge_guest::{Frame, Guest, config};
use serde::Deserialize;

/// No keys: an unknown one is an error naming it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {}

struct Component;

impl Guest for Component {
    fn init(text: String) -> Result<(), String> {
        config::parse::<Config>(&text).map(|_| ())
    }

    fn process(_frame: Frame) -> Result<Vec<Frame>, String> {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        Ok(Vec::new())
    }
}

edge_guest::export_stage!(Component);
