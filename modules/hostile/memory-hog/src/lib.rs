//! Hostile test module `memory-hog`: allocates (and touches) memory in chunks without
//! bound in `process` (or `init`). The host's memory limit must make `memory.grow` fail,
//! which traps the instance (the allocation failure aborts), without affecting the host.
//!
//! Config:
//! - `when` = `"process"` (default) | `"init"`
//! - `chunk_kib` (default 1024): size of each allocation
//! - `max_mib` (optional): stop after this much and return normally, reporting the
//!   total; lets a test check that memory just under the limit is granted
//! - `graceful` (default false): on allocation failure return `err("out of memory after N
//!   KiB")` instead of trapping; shows that the host limit made `memory.grow` fail cleanly

use edge_guest::{Frame, Guest, Payload, config};
use serde::Deserialize;
use std::cell::RefCell;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    when: When,
    #[serde(default = "default_chunk")]
    chunk_kib: u32,
    #[serde(default)]
    max_mib: Option<u32>,
    #[serde(default)]
    graceful: bool,
}

fn default_chunk() -> u32 {
    1024
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum When {
    #[default]
    Process,
    Init,
}

fn parse(text: &str) -> Result<Config, String> {
    let c: Config = config::parse(text)?;
    if c.chunk_kib == 0 || c.chunk_kib > 1 << 20 {
        return Err(config::invalid(
            "chunk_kib",
            format!("must be between 1 and {}, got {}", 1 << 20, c.chunk_kib),
        ));
    }
    if c.max_mib == Some(0) {
        return Err(config::invalid("max_mib", "must be at least 1"));
    }
    Ok(c)
}

thread_local! {
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
    // Held forever so nothing is freed between calls.
    static HOARD: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Allocates until failure or `max_mib`; returns the KiB held in total.
fn hog(c: &Config) -> Result<u64, String> {
    let chunk = c.chunk_kib as usize * 1024;
    let max = c.max_mib.map(|m| u64::from(m) * 1024);
    HOARD.with(|h| {
        let mut hoard = h.borrow_mut();
        let mut held_kib: u64 = hoard.iter().map(|v| v.len() as u64 / 1024).sum();
        loop {
            if max.is_some_and(|m| held_kib + u64::from(c.chunk_kib) > m) {
                return Ok(held_kib);
            }
            let mut v: Vec<u8> = Vec::new();
            if c.graceful {
                if v.try_reserve_exact(chunk).is_err() {
                    return Err(format!("out of memory after {held_kib} KiB"));
                }
            } else {
                v.reserve_exact(chunk); // aborts (traps) when memory.grow fails
            }
            // Touch every page so the memory is really committed on the host.
            v.resize(chunk, 0xAB);
            hoard.push(std::hint::black_box(v));
            held_kib += u64::from(c.chunk_kib);
        }
    })
}

struct Component;

impl Guest for Component {
    fn init(text: String) -> Result<(), String> {
        let c = parse(&text)?;
        if c.when == When::Init {
            hog(&c)?;
        }
        CONFIG.with(|s| *s.borrow_mut() = Some(c));
        Ok(())
    }

    fn process(frame: Frame) -> Result<Vec<Frame>, String> {
        let c = CONFIG
            .with(|s| s.borrow().clone())
            .ok_or("process called before init")?;
        let kib = hog(&c)?;
        Ok(vec![Frame {
            payload: Payload::Json(format!(r#"{{"held_kib":{kib}}}"#)),
            ..frame
        }])
    }
}

edge_guest::export_stage!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_hog_stops_at_max() {
        let c = parse(r#"{"chunk_kib": 256, "max_mib": 1, "graceful": true}"#).unwrap();
        assert_eq!(hog(&c), Ok(1024));
    }

    #[test]
    fn config_is_checked() {
        assert!(
            parse(r#"{"chunk_kib": 0}"#)
                .unwrap_err()
                .starts_with("chunk_kib:")
        );
        assert!(
            parse(r#"{"max_mib": 0}"#)
                .unwrap_err()
                .starts_with("max_mib:")
        );
        assert!(parse(r#"{"size": 1}"#).unwrap_err().contains("size"));
    }
}
