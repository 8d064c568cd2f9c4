//! Hostile test module `trap`: passes frames through unchanged, but traps on every Nth
//! `process` call (or in `init`). The host must discard the trapped instance, count it, and
//! (if its policy says so) start a fresh one; frames around the trap are unaffected.
//!
//! Config:
//! - `every` (default 1): trap on calls N, 2N, 3N, ... (1: every call)
//! - `kind` = `"panic"` (default; Rust panic, the message goes to stderr, then
//!   `unreachable`) | `"unreachable"` (the bare wasm instruction) | `"oob"` (a load
//!   outside linear memory)
//! - `in_init` (default false): trap in `init` instead

use edge_guest::{Frame, Guest, config};
use serde::Deserialize;
use std::cell::Cell;

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "one")]
    every: u32,
    #[serde(default)]
    kind: Kind,
    #[serde(default)]
    in_init: bool,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    #[default]
    Panic,
    Unreachable,
    Oob,
}

fn parse(text: &str) -> Result<Config, String> {
    let c: Config = config::parse(text)?;
    if c.every == 0 {
        return Err(config::invalid("every", "must be at least 1"));
    }
    Ok(c)
}

#[allow(unsafe_code)] // the whole point of this module is to fault
fn trap(kind: Kind, call: u64) -> ! {
    match kind {
        Kind::Panic => panic!("hostile trap module: deliberate panic on call {call}"),
        #[cfg(target_arch = "wasm32")]
        Kind::Unreachable => core::arch::wasm32::unreachable(),
        #[cfg(target_arch = "wasm32")]
        Kind::Oob => {
            // 4 GiB - 16: outside any linear memory a 32-bit module can have.
            let p = std::hint::black_box(0xFFFF_FFF0usize) as *const u64;
            // SAFETY: not safe at all; the load traps, which is what the host test needs.
            let v = unsafe { core::ptr::read_volatile(p) };
            panic!("out-of-bounds load returned {v}")
        }
        #[cfg(not(target_arch = "wasm32"))]
        _ => std::process::abort(),
    }
}

thread_local! {
    static CONFIG: Cell<Option<Config>> = const { Cell::new(None) };
    static CALLS: Cell<u64> = const { Cell::new(0) };
}

/// Whether call number `call` (1-based) traps.
fn traps_on(every: u32, call: u64) -> bool {
    call % u64::from(every) == 0
}

struct Component;

impl Guest for Component {
    fn init(text: String) -> Result<(), String> {
        let c = parse(&text)?;
        if c.in_init {
            trap(c.kind, 0);
        }
        CONFIG.with(|s| s.set(Some(c)));
        Ok(())
    }

    fn process(frame: Frame) -> Result<Vec<Frame>, String> {
        let c = CONFIG.with(Cell::get).ok_or("process called before init")?;
        let call = CALLS.with(|n| {
            n.set(n.get() + 1);
            n.get()
        });
        if traps_on(c.every, call) {
            trap(c.kind, call);
        }
        Ok(vec![frame])
    }
}

edge_guest::export_stage!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nth() {
        let hits: Vec<u64> = (1..=9).filter(|&c| traps_on(3, c)).collect();
        assert_eq!(hits, vec![3, 6, 9]);
        assert!(traps_on(1, 1));
    }

    #[test]
    fn config_is_checked() {
        assert!(parse(r#"{"every": 0}"#).unwrap_err().starts_with("every:"));
        assert!(
            parse(r#"{"kind": "segfault"}"#)
                .unwrap_err()
                .starts_with("kind:")
        );
        assert_eq!(parse(r#"{"kind": "oob"}"#).unwrap().kind, Kind::Oob);
    }
}
