//! Device identity: from config, else derived from the machine id, else random and persisted.
//!
//! The derived id is a hash of /etc/machine-id (never the raw id, which systemd documents as
//! confidential), so it is stable across agent restarts and reinstalls on the same system.

use std::path::Path;

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write device id file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("device id file {path} holds an invalid id: {source}")]
    Invalid {
        path: String,
        source: protocol::v1::Error,
    },
}

const MACHINE_ID_FILES: [&str; 2] = ["/etc/machine-id", "/var/lib/dbus/machine-id"];

/// Resolves the device id. `configured` wins when non-empty.
pub fn resolve(configured: &str, state_dir: &Path) -> Result<String, IdentityError> {
    if !configured.is_empty() {
        return Ok(configured.to_owned());
    }
    for f in MACHINE_ID_FILES {
        if let Ok(raw) = std::fs::read_to_string(f)
            && let Some(id) = from_machine_id(&raw)
        {
            return Ok(id);
        }
    }
    persisted_random(state_dir)
}

/// `edge-` plus the first 12 hex digits of sha256("edge-agent:" + machine-id).
pub fn from_machine_id(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    let digest = Sha256::digest(format!("edge-agent:{raw}").as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    Some(format!("edge-{hex}"))
}

fn persisted_random(state_dir: &Path) -> Result<String, IdentityError> {
    let path = state_dir.join("device-id");
    let io = |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim().to_owned();
            protocol::v1::validate_device_id(&id).map_err(|source| IdentityError::Invalid {
                path: path.display().to_string(),
                source,
            })?;
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("edge-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
            std::fs::create_dir_all(state_dir).map_err(io)?;
            crate::fsutil::write_durably(&path, id.as_bytes()).map_err(io)?;
            Ok(id)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_id_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(resolve("pi-7", dir.path()).expect("id"), "pi-7");
    }

    #[test]
    fn machine_id_derivation_is_stable_and_valid() {
        let a = from_machine_id("0123456789abcdef0123456789abcdef\n").expect("id");
        assert_eq!(
            a,
            from_machine_id("0123456789abcdef0123456789abcdef").expect("id")
        );
        assert_ne!(
            a,
            from_machine_id("fedcba9876543210fedcba9876543210").expect("id")
        );
        protocol::v1::validate_device_id(&a).expect("valid");
        assert_eq!(from_machine_id("  \n"), None);
    }

    #[test]
    fn random_id_is_persisted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = persisted_random(dir.path()).expect("id");
        assert_eq!(a, persisted_random(dir.path()).expect("id"));
    }
}
