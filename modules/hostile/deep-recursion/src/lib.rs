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

/// Never true; read through black_box so the compiler cannot prove the recursion endless
/// (and replace it with a trap or a loop).
fn stop() -> bool {
    black_box(false)
}

#[inline(never)]
fn native(depth: u64) -> u64 {
    if stop() {
        return depth;
    }
    // The result goes through black_box before use, so this is no tail call and not an
    // accumulator LLVM could turn into a loop.
    black_box(native(depth + 1)).rotate_left(1) ^ depth
}

#[inline(never)]
fn shadow(depth: u64) -> u64 {
    let mut buf = [0u8; 4096];
    buf[0] = depth as u8;
    // Taking the address forces the buffer into linear memory (the shadow stack).
    black_box(&mut buf);
    if stop() {
        return depth;
    }
    black_box(shadow(depth + 1)) ^ u64::from(buf[(depth % 4096) as usize])
}

fn recurse(mode: Mode) -> u64 {
    match mode {
        Mode::Native => native(0),
        Mode::Shadow => shadow(0),
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
        assert_eq!(config::parse::<Config>(r#"{"mode": "shadow"}"#).unwrap().mode, Mode::Shadow);
        assert!(config::parse::<Config>(r#"{"mode": "tail"}"#).unwrap_err().starts_with("mode:"));
    }
}
