//! Hostile test module `spin`: an endless loop that makes no host calls, in `process` (or
//! in `init` with `when = "init"`). Only the host's execution deadline (epoch interruption
//! or fuel) can stop it; the host must trap the call and keep running.
//!
//! Config: `when` = `"process"` (default) | `"init"`.

use edge_guest::{Frame, Guest, config};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Where to spin: `process` or `init`.
    #[serde(default)]
    when: When,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum When {
    #[default]
    Process,
    Init,
}

fn spin() -> ! {
    // black_box keeps the loop (and its counter) from being optimised into nothing.
    let mut n = 0u64;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

struct Component;

impl Guest for Component {
    fn init(text: String) -> Result<(), String> {
        let c: Config = config::parse(&text)?;
        if c.when == When::Init {
            spin();
        }
        Ok(())
    }

    fn process(_frame: Frame) -> Result<Vec<Frame>, String> {
        spin();
    }
}

edge_guest::export_stage!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        assert_eq!(config::parse::<Config>("").unwrap().when, When::Process);
        assert!(
            config::parse::<Config>(r#"{"when": "later"}"#)
                .unwrap_err()
                .starts_with("when:")
        );
    }
}
