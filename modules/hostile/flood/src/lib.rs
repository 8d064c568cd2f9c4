//! Hostile test module `flood`: hammers one host interface or returns oversized results
//! from `process`, so a host test can check that its quotas hold and that it reports them.
//!
//! Config:
//! - `target`:
//!   - `"kv"`: `set` keys `flood/0`, `flood/1`, .. of `size_kib` each until an error or
//!     `count` keys; the report says how many succeeded and the error (quota expected)
//!   - `"log"`: `count` log lines of `size_kib` each (rate limiting/truncation expected)
//!   - `"counters"`: `count` distinct counter and gauge names (a name cap expected)
//!   - `"frames"`: return `count` small frames from one `process` call
//!   - `"big-frame"`: return one `bytes` frame of `size_kib`
//!   - `"big-meta"`: return one frame with `count` labels
//!   - `"big-error"`: return `err` with a message of `size_kib`
//! - `count` (default 100000), `size_kib` (default 64)
//!
//! The report (targets that return normally) is a JSON frame:
//! `{"target": "kv", "done": 123, "error": "quota exceeded: .."}`.

use edge_guest::{Frame, Guest, Payload, config, counters, kv, log};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    target: Target,
    #[serde(default = "default_count")]
    count: u32,
    #[serde(default = "default_size")]
    size_kib: u32,
}

fn default_count() -> u32 {
    100_000
}

fn default_size() -> u32 {
    64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Target {
    Kv,
    Log,
    Counters,
    Frames,
    BigFrame,
    BigMeta,
    BigError,
}

#[derive(Serialize)]
struct Report<'a> {
    target: &'a str,
    done: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn parse(text: &str) -> Result<Config, String> {
    let c: Config = config::parse(text)?;
    if c.size_kib > 1 << 20 {
        return Err(config::invalid(
            "size_kib",
            format!("at most {} (1 GiB), got {}", 1 << 20, c.size_kib),
        ));
    }
    Ok(c)
}

thread_local! {
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
}

fn report(
    frame: &Frame,
    target: &str,
    done: u32,
    error: Option<String>,
) -> Result<Vec<Frame>, String> {
    let text = serde_json::to_string(&Report {
        target,
        done,
        error,
    })
    .map_err(|e| e.to_string())?;
    Ok(vec![Frame {
        payload: Payload::Json(text),
        ..frame.clone()
    }])
}

struct Component;

impl Guest for Component {
    fn init(text: String) -> Result<(), String> {
        let c = parse(&text)?;
        CONFIG.with(|s| *s.borrow_mut() = Some(c));
        Ok(())
    }

    fn process(frame: Frame) -> Result<Vec<Frame>, String> {
        let c = CONFIG
            .with(|s| s.borrow().clone())
            .ok_or("process called before init")?;
        let size = c.size_kib as usize * 1024;
        match c.target {
            Target::Kv => {
                let value = vec![0x5Au8; size];
                for i in 0..c.count {
                    if let Err(e) = kv::set(&format!("flood/{i}"), &value) {
                        return report(&frame, "kv", i, Some(format!("{e:?}")));
                    }
                }
                report(&frame, "kv", c.count, None)
            }
            Target::Log => {
                let line = "x".repeat(size);
                for _ in 0..c.count {
                    log::log(log::Level::Error, &line);
                }
                report(&frame, "log", c.count, None)
            }
            Target::Counters => {
                for i in 0..c.count {
                    counters::increment(&format!("flood_{i}"), 1);
                    counters::set_gauge(&format!("flood_gauge_{i}"), f64::from(i));
                }
                report(&frame, "counters", c.count, None)
            }
            Target::Frames => Ok((0..c.count)
                .map(|i| Frame {
                    payload: Payload::Json(format!(r#"{{"i":{i}}}"#)),
                    ..frame.clone()
                })
                .collect()),
            Target::BigFrame => Ok(vec![Frame {
                payload: Payload::Bytes(vec![0x5A; size]),
                ..frame
            }]),
            Target::BigMeta => {
                let meta = (0..c.count)
                    .map(|i| (format!("label_{i}"), "x".repeat(16)))
                    .collect();
                Ok(vec![Frame { meta, ..frame }])
            }
            Target::BigError => Err("e".repeat(size)),
        }
    }
}

edge_guest::export_stage!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        assert!(parse("").unwrap_err().contains("target"));
        assert_eq!(
            parse(r#"{"target": "big-frame"}"#).unwrap().target,
            Target::BigFrame
        );
        assert!(
            parse(r#"{"target": "disk"}"#)
                .unwrap_err()
                .starts_with("target:")
        );
        assert!(
            parse(r#"{"target": "kv", "size_kib": 2000000}"#)
                .unwrap_err()
                .starts_with("size_kib:")
        );
    }
}
