//! The error a config section's own check returns. Each part owns its section and its
//! checks (see `crate::config`), so the type they share lives here, outside the root config,
//! and the dependencies keep running one way.

/// A setting out of range or inconsistent with another; the message names the key(s) as
/// written in the file (`mqtt.keepalive_s must be at least 5`). The config loader adds the
/// file's path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSetting(pub String);

impl From<String> for InvalidSetting {
    fn from(message: String) -> Self {
        InvalidSetting(message)
    }
}

impl From<&str> for InvalidSetting {
    fn from(message: &str) -> Self {
        InvalidSetting(message.to_owned())
    }
}
