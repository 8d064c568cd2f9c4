//! The append-only JSON-lines event journal, rotated at a size cap.
//!
//! One line per [`Event`], `{"ts_ms":N,"event":"..",...}`, written with a single `write` call
//! so a reader tailing the file never sees half a line from us, and handed to the OS before
//! the next message is processed (tests and the demo tail it). [`Journal::sync`] fsyncs it at
//! the service's group commits.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::event::Event;

/// Errors from the journal file.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot open journal {path}: {error}")]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot write journal {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot rotate journal {path}: {error}")]
    Rotate {
        path: PathBuf,
        error: std::io::Error,
    },
}

#[derive(Serialize)]
struct Line<'a> {
    ts_ms: u64,
    #[serde(flatten)]
    event: &'a Event,
}

/// An open journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    /// Rotated files kept: `PATH.1` (newest) to `PATH.{keep}`.
    keep: u32,
}

impl Journal {
    /// Opens `path` for appending (creating it and its directory if needed); at `max_bytes`
    /// it is rotated, and `keep` (at least 1) rotated files are kept.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> Result<Journal, JournalError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|error| JournalError::Open {
                path: path.to_owned(),
                error,
            })?;
        }
        let file = open_append(path)?;
        let size = file
            .metadata()
            .map_err(|error| JournalError::Open {
                path: path.to_owned(),
                error,
            })?
            .len();
        Ok(Journal {
            path: path.to_owned(),
            file,
            size,
            max_bytes,
            keep: keep.max(1),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event line stamped `ts_ms`.
    pub fn append(&mut self, ts_ms: u64, event: &Event) -> Result<(), JournalError> {
        // Serializing our own event types cannot fail (string keys only).
        let mut line = serde_json::to_vec(&Line { ts_ms, event }).unwrap_or_default();
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file
            .write_all(&line)
            .map_err(|error| JournalError::Write {
                path: self.path.clone(),
                error,
            })?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// fsyncs what was appended so far.
    pub fn sync(&self) -> Result<(), JournalError> {
        self.file.sync_data().map_err(|error| JournalError::Write {
            path: self.path.clone(),
            error,
        })
    }

    fn rotate(&mut self) -> Result<(), JournalError> {
        let rotated = rotated_path(&self.path);
        let err = |error| JournalError::Rotate {
            path: self.path.clone(),
            error,
        };
        self.file.sync_data().map_err(err)?;
        // PATH.{keep} is replaced (dropped); each older one moves up by one.
        for k in (1..self.keep).rev() {
            match std::fs::rename(
                numbered_path(&self.path, k),
                numbered_path(&self.path, k + 1),
            ) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
                _ => {}
            }
        }
        std::fs::rename(&self.path, &rotated).map_err(err)?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        tracing::info!(journal = %self.path.display(), rotated = %rotated.display(), "journal rotated");
        Ok(())
    }
}

/// Visits the (device, id) of every processed message journaled in the last `window` bytes
/// of the journal (continuing into `PATH.1` if the current file is shorter), newest first,
/// until `visit` returns false.
///
/// Used at start-up: the journal reaches the OS before the database commit, so after a crash
/// its tail names messages the database forgot. Unparseable lines are skipped.
pub fn scan_tail(
    path: &Path,
    window: u64,
    mut visit: impl FnMut(&str, &str) -> bool,
) -> Result<(), JournalError> {
    let current = read_tail(path, window)?;
    let older = match window.checked_sub(current.len() as u64) {
        Some(rest) if rest > 0 => read_tail(&rotated_path(path), rest)?,
        _ => Vec::new(),
    };
    for chunk in [&current, &older] {
        // The first line of a tail may be cut; it fails to parse and is skipped.
        for line in chunk.split(|b| *b == b'\n').rev() {
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            let processed = matches!(
                value["event"].as_str(),
                Some("data" | "telemetry" | "registered" | "deploy")
            );
            let (Some(device), Some(id)) = (value["device"].as_str(), value["id"].as_str()) else {
                continue;
            };
            if processed && !visit(device, id) {
                return Ok(());
            }
        }
    }
    Ok(())
}

fn read_tail(path: &Path, window: u64) -> Result<Vec<u8>, JournalError> {
    use std::io::{Read, Seek, SeekFrom};
    let err = |error| JournalError::Open {
        path: path.to_owned(),
        error,
    };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(e)),
    };
    let len = file.metadata().map_err(err)?.len();
    let start = len.saturating_sub(window);
    file.seek(SeekFrom::Start(start)).map_err(err)?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    file.read_to_end(&mut buf).map_err(err)?;
    Ok(buf)
}

/// Where a full journal is moved: `PATH.1`.
pub fn rotated_path(path: &Path) -> PathBuf {
    numbered_path(path, 1)
}

/// `PATH.k`: the k-th newest rotated journal.
fn numbered_path(path: &Path, k: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{k}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> Result<File, JournalError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| JournalError::Open {
            path: path.to_owned(),
            error,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("readable")
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is json"))
            .collect()
    }

    #[test]
    fn lines_have_the_contract_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/journal.jsonl");
        let mut j = Journal::open(&path, 1 << 20, 1).expect("opens");
        j.append(
            5,
            &Event::Ready {
                broker: "mqtt://127.0.0.1:1".into(),
                embedded: true,
            },
        )
        .expect("writes");
        j.append(
            6,
            &Event::Offline {
                device: "d1".into(),
                since_ms: 3,
                reason: None,
            },
        )
        .expect("writes");
        j.append(7, &Event::Stopped {}).expect("writes");
        let got = lines(&path);
        assert_eq!(
            got[0],
            serde_json::json!({"ts_ms":5,"event":"ready","broker":"mqtt://127.0.0.1:1","embedded":true})
        );
        assert_eq!(
            got[1],
            serde_json::json!({"ts_ms":6,"event":"offline","device":"d1","since_ms":3})
        );
        assert_eq!(got[2], serde_json::json!({"ts_ms":7,"event":"stopped"}));
        // Reopening appends.
        drop(j);
        let mut j = Journal::open(&path, 1 << 20, 1).expect("reopens");
        j.append(8, &Event::Stopped {}).expect("writes");
        assert_eq!(lines(&path).len(), 4);
    }

    #[test]
    fn tail_scan_finds_processed_ids_newest_first_across_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.jsonl");
        let mut j = Journal::open(&path, 4096, 1).expect("opens");
        let data = |i: u64| Event::Data {
            device: "d1".into(),
            id: format!("m{i}"),
            class: protocol::v1::Class::Results,
            seq: i,
            stream: "s".into(),
            created_ms: 0,
            payload: serde_json::json!("x".repeat(100)).into(),
        };
        for i in 0..40 {
            j.append(i, &data(i)).expect("writes");
            j.append(
                i,
                &Event::Duplicate {
                    device: "d1".into(),
                    id: format!("m{i}"),
                    topic: "t".into(),
                },
            )
            .expect("writes");
        }
        assert!(rotated_path(&path).exists(), "the test needs a rotation");
        let mut ids = Vec::new();
        scan_tail(&path, 1 << 20, |_, id| {
            ids.push(id.to_owned());
            true
        })
        .expect("scans");
        // Newest first, each once (duplicate lines are not processed messages), and the scan
        // reached into the rotated file.
        assert_eq!(ids.first().map(String::as_str), Some("m39"));
        assert!(ids.windows(2).all(|w| w[0] != w[1]));
        assert!(ids.len() > 20, "{}", ids.len());
        let mut seen = 0;
        scan_tail(&path, 1 << 20, |_, id| {
            seen += 1;
            id != "m37"
        })
        .expect("scans");
        assert_eq!(seen, 3, "stops when told");
        scan_tail(&dir.path().join("missing.jsonl"), 1 << 20, |_, _| {
            panic!("no lines")
        })
        .expect("missing is empty");
    }

    #[test]
    fn rotates_at_the_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.jsonl");
        let mut j = Journal::open(&path, 4096, 3).expect("opens");
        let ev = |i: u64| Event::Rejected {
            topic: "t".repeat(100),
            reason: format!("{i}"),
            device: None,
        };
        for i in 0..100 {
            j.append(i, &ev(i)).expect("writes");
        }
        let current = std::fs::metadata(&path).expect("exists").len();
        assert!(current <= 4096, "{current}");
        // Three rotated files, each older than the one before, and no fourth.
        let mut newer = lines(&path)[0]["ts_ms"].as_u64().expect("ts");
        for k in 1..=3 {
            let rotated = numbered_path(&path, k);
            assert!(std::fs::metadata(&rotated).expect("rotated").len() <= 4096);
            let l = lines(&rotated);
            assert!(l.iter().all(|l| l["event"] == "rejected"));
            let last = l.last().expect("lines")["ts_ms"].as_u64().expect("ts");
            assert_eq!(last + 1, newer, "PATH.{k} ends where the newer one starts");
            newer = l[0]["ts_ms"].as_u64().expect("ts");
        }
        assert!(!numbered_path(&path, 4).exists());
    }
}
