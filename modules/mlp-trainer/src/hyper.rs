//! The `params` argument of `train`: hyperparameters as the text of one JSON object. Errors
//! name the key (`lr: must be a positive finite number, got 0`), unknown keys included.

use serde::Deserialize;

/// Most epochs one call may ask for: far more than federated rounds use (1-20), low enough
/// that a typo fails at once instead of running into the host's time limit.
pub const MAX_EPOCHS: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hyper {
    /// Passes over the samples.
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    /// SGD learning rate.
    #[serde(default = "default_lr")]
    pub lr: f32,
    /// Samples per gradient step (the last step of an epoch may have fewer).
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// FedProx proximal weight: the loss gains mu/2 * ||w - w_start||^2; 0 is plain SGD.
    #[serde(default)]
    pub mu: f32,
    /// Seeds the shuffling of each epoch.
    #[serde(default)]
    pub seed: u64,
    /// Train on at most this many samples (the first ones in the host's order).
    #[serde(default)]
    pub max_samples: Option<u32>,
}

fn default_epochs() -> u32 {
    1
}

fn default_lr() -> f32 {
    0.01
}

fn default_batch_size() -> u32 {
    32
}

impl Hyper {
    /// Parses and checks `text`; empty text means all defaults.
    pub fn parse(text: &str) -> Result<Hyper, String> {
        let text = if text.trim().is_empty() { "{}" } else { text };
        if !text.trim_start().starts_with('{') {
            return Err("params: expected a json object".into());
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let h: Hyper = serde_path_to_error::deserialize(&mut de).map_err(|err| {
            let path = err.path().to_string();
            if path == "." {
                format!("params: {}", err.inner())
            } else {
                format!("{path}: {}", err.inner())
            }
        })?;
        de.end().map_err(|e| format!("params: {e}"))?;
        h.check()?;
        Ok(h)
    }

    fn check(&self) -> Result<(), String> {
        if self.epochs == 0 || self.epochs > MAX_EPOCHS {
            return Err(format!(
                "epochs: must be between 1 and {MAX_EPOCHS}, got {}",
                self.epochs
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!(
                "lr: must be a positive finite number, got {}",
                self.lr
            ));
        }
        if self.batch_size == 0 {
            return Err("batch_size: must be at least 1, got 0".into());
        }
        if !(self.mu.is_finite() && self.mu >= 0.0) {
            return Err(format!("mu: must be a finite number >= 0, got {}", self.mu));
        }
        if self.max_samples == Some(0) {
            return Err("max_samples: must be at least 1, got 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_object() {
        let h = Hyper::parse("").unwrap();
        assert_eq!(
            (h.epochs, h.lr, h.batch_size, h.mu, h.seed),
            (1, 0.01, 32, 0.0, 0)
        );
        assert_eq!(h.max_samples, None);
        let h = Hyper::parse(
            r#"{"epochs": 5, "lr": 0.1, "batch_size": 8, "mu": 0.01, "seed": 18446744073709551615, "max_samples": 100}"#,
        )
        .unwrap();
        assert_eq!(h.epochs, 5);
        assert_eq!(h.seed, u64::MAX);
        assert_eq!(h.max_samples, Some(100));
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key) in [
            (r#"{"epochs": 0}"#, "epochs:"),
            (r#"{"lr": 0}"#, "lr:"),
            (r#"{"lr": -1}"#, "lr:"),
            (r#"{"lr": 1e50}"#, "lr:"),
            (r#"{"batch_size": 0}"#, "batch_size:"),
            (r#"{"mu": -0.5}"#, "mu:"),
            (r#"{"max_samples": 0}"#, "max_samples:"),
            (r#"{"epochs": "x"}"#, "epochs:"),
            (r#"{"learning_rate": 0.1}"#, "learning_rate"),
            ("[1]", "params:"),
            (r#"{"lr": 0.1} x"#, "params:"),
        ] {
            let err = Hyper::parse(text).unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
