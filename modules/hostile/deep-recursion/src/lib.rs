//! Hostile test module `deep-recursion`: recurses without bound in `process` (or `init`).
//! The host must trap on stack exhaustion and survive.
//!
//! Config:
//! - `when` = `"process"` (default) | `"init"`
//! - `mode` = `"native"` (default): frames hold only wasm locals, exhausting the engine's
//!   wasm stack (wasmtime `max_wasm_stack`); `"shadow"`: each frame puts a 4 KiB buffer
//!   on Rust's in-memory shadow stack (1 MiB at the bottom of linear memory), which
//!   overflows first and faults on an out-of-bounds access

use edge_guest::{Frame, Guest, config};
use serde::Deserialize;
use std::cell::Cell;
use std::hint::black_box;

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    when: When,
    #[serde(default)]
    mode: Mode,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum When {
    #[default]
    Process,
    Init,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Native,
    Shadow,
}

/// Recursion without any linear-memory use: `limit` is never reached (it is u64::MAX, hidden
/// from the optimiser by the caller), and the result is combined after the call with two
/// operations, so this is neither a tail call nor an accumulator LLVM could turn into a loop.
#[inline(never)]
fn native(depth: u64, limit: u64) -> u64 {
    if depth == limit {
        return depth;
    }
    native(depth + 1, limit).rotate_left(1) ^ depth
}

/// Recursion with a 4 KiB buffer per frame on the shadow stack.
#[inline(never)]
fn shadow(depth: u64, limit: u64) -> u64 {
    let mut buf = [0u8; 4096];
    buf[0] = depth as u8;
    // Taking the address forces the buffer into linear memory (the shadow stack).
    black_box(&mut buf);
    if depth == limit {
        return depth;
    }
    shadow(depth + 1, limit) ^ u64::from(buf[(depth % 4096) as usize])
}

fn recurse(mode: Mode) -> u64 {
    // Opaque to the compiler, so it cannot prove the recursion endless (and replace it
    // with a trap or drop it).
    let limit = black_box(u64::MAX);
    match mode {
        Mode::Native => native(0, limit),
        Mode::Shadow => shadow(0, limit),
    }
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Native) };
}

struct Component;

impl Guest for Component {
    fn init(text: String) -> Result<(), String> {
        let c: Config = config::parse(&text)?;
        if c.when == When::Init {
            black_box(recurse(c.mode));
        }
        MODE.with(|m| m.set(c.mode));
        Ok(())
    }

    fn process(_frame: Frame) -> Result<Vec<Frame>, String> {
        let depth = recurse(MODE.with(Cell::get));
        Err(format!("recursion returned at depth {depth}"))
    }
}

edge_guest::export_stage!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        assert_eq!(
            config::parse::<Config>(r#"{"mode": "shadow"}"#)
                .unwrap()
                .mode,
            Mode::Shadow
        );
        assert!(
            config::parse::<Config>(r#"{"mode": "tail"}"#)
                .unwrap_err()
                .starts_with("mode:")
        );
    }
}
