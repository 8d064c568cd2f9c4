//! Stage configuration parsing.
//!
//! `init` receives the stage's config as the text of a JSON object (the host converts the
//! TOML table of the pipeline definition), `{}` or empty for "no configuration". Errors
//! carry the path of the offending key, e.g.
//! `limits.rms.max: invalid type: string "x", expected f64`, so the operator sees which key
//! to fix.
//!
//! Only JSON, on purpose: a TOML parser would add ~200 KB to every module, and the host
//! already has the config parsed. Modules define their config as a serde struct
//! with `#[serde(deny_unknown_fields)]` (a misspelt key is an error, not silently ignored)
//! and check value ranges with [`invalid`].

use serde::de::DeserializeOwned;

/// Parses stage config text (a JSON object) into `T`. Empty text (or whitespace) parses as
/// `{}`, so defaults apply and required keys are reported as missing.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    if !text.trim_start().starts_with('{') {
        return Err("config: expected a json object".into());
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        // At the top level serde_path_to_error reports ".", which names nothing.
        if path == "." {
            format!("config: {}", err.inner())
        } else {
            format!("{path}: {}", err.inner())
        }
    })?;
    de.end().map_err(|e| format!("config: {e}"))?;
    Ok(value)
}

/// Error for a key whose value parsed but is out of range: `"{key}: {why}"`.
pub fn invalid(key: &str, why: impl std::fmt::Display) -> String {
    format!("{key}: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        min: Option<f64>,
        max: Option<f64>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[serde(default = "eight")]
        bands: u32,
        #[serde(default)]
        limits: BTreeMap<String, Limits>,
    }

    fn eight() -> u32 {
        8
    }

    #[test]
    fn empty_text_gives_defaults() {
        let c: Cfg = parse("  \n").unwrap();
        assert_eq!(c.bands, 8);
    }

    #[test]
    fn nested_keys() {
        let a: Cfg = parse(r#"{"bands": 4, "limits": {"rms": {"max": 2.5}}}"#).unwrap();
        assert_eq!(a.bands, 4);
        assert_eq!(
            a.limits["rms"],
            Limits {
                min: None,
                max: Some(2.5)
            }
        );
        let b: Cfg = parse("{}").unwrap();
        assert_eq!(b.bands, 8);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse::<Cfg>(r#"{"bands": "many"}"#).unwrap_err();
        assert!(e.starts_with("bands: "), "{e}");
        let e = parse::<Cfg>(r#"{"limits": {"rms": {"max": "x"}}}"#).unwrap_err();
        assert!(e.starts_with("limits.rms.max: "), "{e}");
        let e = parse::<Cfg>(r#"{"bandz": 3}"#).unwrap_err();
        assert!(e.contains("bandz"), "{e}");
        let e = parse::<Cfg>(r#"{"bands": 4} trailing"#).unwrap_err();
        assert!(e.starts_with("config: "), "{e}");
        let e = parse::<Cfg>("bands = 3").unwrap_err();
        assert_eq!(e, "config: expected a json object");
        let e = parse::<Cfg>(r#"{"bands": "#).unwrap_err();
        assert!(e.starts_with("bands: ") || e.starts_with("config: "), "{e}");
    }

    #[test]
    fn missing_required_key_is_named() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Req {
            sample_rate_hz: f64,
        }
        let e = parse::<Req>("").unwrap_err();
        assert!(e.contains("sample_rate_hz"), "{e}");
    }
}
