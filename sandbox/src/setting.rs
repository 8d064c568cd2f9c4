//! The error a config section's own check returns. Each part of the agent owns its section
//! and its checks (see the agent's `config`), so the type they share lives here, outside the
//! root config, and the dependencies keep running one way: the sandbox's `[sandbox]` check
//! returns it too, and the agent re-exports it as `edge_agent::setting`.

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
