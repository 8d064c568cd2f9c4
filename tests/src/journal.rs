//! Reader for the coordinator's journal: JSON lines appended and flushed per event.
//!
//! The reader keeps a byte offset and reads only what was appended since the last look, so a
//! test can poll it cheaply; an incomplete last line waits for its newline.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One journal line.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Position in the journal, 0-based.
    pub index: usize,
    pub ts_ms: u64,
    /// `ready`, `online`, `offline`, `registered`, `telemetry`, `data`, `duplicate`, `rejected`.
    pub event: String,
    pub device: Option<String>,
    pub id: Option<String>,
    pub class: Option<String>,
    pub seq: Option<u64>,
    /// The whole line, for fields the typed ones above do not cover.
    pub raw: Value,
}

impl Event {
    fn parse(index: usize, line: &str) -> Option<Event> {
        let raw: Value = serde_json::from_str(line).ok()?;
        let s = |k: &str| raw.get(k).and_then(Value::as_str).map(str::to_owned);
        Some(Event {
            index,
            ts_ms: raw.get("ts_ms").and_then(Value::as_u64).unwrap_or(0),
            event: s("event")?,
            device: s("device"),
            id: s("id"),
            class: s("class"),
            seq: raw.get("seq").and_then(Value::as_u64),
            raw: raw.clone(),
        })
    }

    pub fn is(&self, event: &str) -> bool {
        self.event == event
    }

    /// True for an event of kind `event` about `device`.
    pub fn is_for(&self, event: &str, device: &str) -> bool {
        self.event == event && self.device.as_deref() == Some(device)
    }

    /// A string field of the raw line.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.raw.get(key).and_then(Value::as_str)
    }

    /// A numeric field of the raw line.
    pub fn f64_field(&self, key: &str) -> Option<f64> {
        self.raw.get(key).and_then(Value::as_f64)
    }
}

/// Incremental reader of one journal file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// Inode of the file `offset` is in: the coordinator rotates a full journal by renaming it
    /// to `PATH.1` and starting a new `PATH`.
    inode: Option<u64>,
    offset: u64,
    partial: Vec<u8>,
    events: Vec<Event>,
    bad_lines: Vec<String>,
}

impl Journal {
    /// A reader from the start of `path`; the file need not exist yet.
    pub fn open(path: impl Into<PathBuf>) -> Journal {
        Journal {
            path: path.into(),
            inode: None,
            offset: 0,
            partial: Vec::new(),
            events: Vec::new(),
            bad_lines: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what was appended since the last call; returns how many new events.
    pub fn refresh(&mut self) -> Result<usize> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot open journal {}", self.path.display()));
            }
        };
        let inode = std::os::unix::fs::MetadataExt::ino(
            &f.metadata()
                .with_context(|| format!("cannot stat journal {}", self.path.display()))?,
        );
        let mut buf = Vec::new();
        if self.inode.is_some_and(|i| i != inode) {
            // Rotated since the last read: the rest of the old file is in `PATH.1` (unless it
            // was rotated twice meanwhile, which a reader polling this seldom cannot recover).
            let rotated = std::path::PathBuf::from(format!("{}.1", self.path.display()));
            if let Ok(mut old) = File::open(&rotated)
                && old
                    .metadata()
                    .is_ok_and(|m| Some(std::os::unix::fs::MetadataExt::ino(&m)) == self.inode)
            {
                old.seek(SeekFrom::Start(self.offset))?;
                old.read_to_end(&mut buf)?;
            }
            self.offset = 0;
        }
        self.inode = Some(inode);
        f.seek(SeekFrom::Start(self.offset))
            .with_context(|| format!("cannot seek journal {}", self.path.display()))?;
        let before_len = buf.len();
        f.read_to_end(&mut buf)
            .with_context(|| format!("cannot read journal {}", self.path.display()))?;
        self.offset += (buf.len() - before_len) as u64;
        self.partial.extend_from_slice(&buf);
        let before = self.events.len();
        let Some(last_nl) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(0);
        };
        let complete: Vec<u8> = self.partial.drain(..=last_nl).collect();
        for line in complete.split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(line);
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            match Event::parse(self.events.len(), line) {
                Some(ev) => self.events.push(ev),
                None => self.bad_lines.push(line.to_owned()),
            }
        }
        Ok(self.events.len() - before)
    }

    /// Events read so far (call [`Journal::refresh`] or a wait first).
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Lines that were not a JSON object with an `event` field.
    pub fn bad_lines(&self) -> &[String] {
        &self.bad_lines
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Polls until `pred(events)` holds; errs after `timeout` naming `what` and showing the
    /// journal's last lines.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[Event]) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.refresh()?;
            if pred(&self.events) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "journal {}: no {what} within {timeout:?}; last events:\n{}",
                    self.path.display(),
                    self.tail(15)
                );
            }
            std::thread::sleep(crate::POLL);
        }
    }

    /// Waits for the first event at position >= `from` that satisfies `pred` and returns it.
    pub fn wait_for_event(
        &mut self,
        what: &str,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Result<Event> {
        let mut found = None;
        self.wait_for(what, timeout, |events| {
            found = events.iter().skip(from).find(|e| pred(e)).cloned();
            found.is_some()
        })?;
        found.context("wait_for returned without an event")
    }

    /// Waits for `device`'s `registered` event (from any start) and returns it.
    pub fn wait_registered(&mut self, device: &str, timeout: Duration) -> Result<Event> {
        self.wait_for_event(
            &format!("\"registered\" event for {device}"),
            0,
            timeout,
            |e| e.is_for("registered", device),
        )
    }

    /// Waits until every id in `ids` has a `data` event from `device`, for as long as more of
    /// them keep arriving: it fails once `stall` passes without a new one. A backlog of
    /// hundreds of thousands (a soak) drains at its own pace; a lost message stalls.
    pub fn wait_for_data_ids<'a>(
        &mut self,
        device: &str,
        ids: impl IntoIterator<Item = &'a str>,
        stall: Duration,
    ) -> Result<()> {
        let mut missing: HashSet<String> = ids.into_iter().map(str::to_owned).collect();
        let total = missing.len();
        let mut scanned = 0;
        let mut deadline = Instant::now() + stall;
        loop {
            let before = missing.len();
            self.refresh()?;
            for e in &self.events[scanned..] {
                if e.is_for("data", device)
                    && let Some(id) = &e.id
                {
                    missing.remove(id);
                }
            }
            scanned = self.events.len();
            if missing.is_empty() {
                return Ok(());
            }
            if missing.len() < before {
                deadline = Instant::now() + stall;
            } else if Instant::now() >= deadline {
                let mut sample: Vec<&String> = missing.iter().collect();
                sample.sort();
                sample.truncate(5);
                bail!(
                    "{} of {total} accepted messages from {device} have not arrived, and none came \
                     in the last {stall:?} \
                     (e.g. {sample:?}); journal {} last events:\n{}",
                    missing.len(),
                    self.path.display(),
                    self.tail(15)
                );
            }
            std::thread::sleep(crate::POLL);
        }
    }

    /// Waits until every `expected` message from `device` arrived, then requires each exactly
    /// once as data, in order per class and unaltered ([`DeliveryReport`]).
    pub fn expect_delivered(&mut self, device: &str, expected: &[crate::Expected]) -> Result<()> {
        self.wait_for_data_ids(
            device,
            expected.iter().map(|x| x.id.as_str()),
            crate::DELIVERY_TIMEOUT,
        )?;
        crate::DeliveryReport::check(self, device, expected).ensure_ok()
    }

    /// `data` events from `device`, in journal order.
    pub fn data_events(&self, device: &str) -> Vec<&Event> {
        self.events
            .iter()
            .filter(|e| e.is_for("data", device))
            .collect()
    }

    /// How many `data` events each id of `device` has.
    pub fn data_counts(&self, device: &str) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for e in self.data_events(device) {
            if let Some(id) = &e.id {
                *counts.entry(id.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Number of events of kind `event` about `device`.
    pub fn count(&self, event: &str, device: &str) -> usize {
        self.events
            .iter()
            .filter(|e| e.is_for(event, device))
            .count()
    }

    /// Number of events of kind `event`, any device.
    pub fn count_kind(&self, event: &str) -> usize {
        self.events.iter().filter(|e| e.is(event)).count()
    }

    /// The last `n` raw lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let start = self.events.len().saturating_sub(n);
        self.events[start..]
            .iter()
            .map(|e| format!("  {}", e.raw))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The model (`name@version`) the device's inference stage ran in its latest telemetry.
pub fn served_model(events: &[Event], device: &str) -> Option<String> {
    let stages = events
        .iter()
        .rev()
        .find(|e| e.is_for("telemetry", device))?
        .raw
        .get("pipeline")?
        .get("stages")?
        .as_array()?
        .clone();
    stages
        .iter()
        .find(|s| s.get("kind").and_then(|k| k.as_str()) == Some("inference"))?
        .get("module")?
        .as_str()
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_appended_lines_and_waits_for_the_newline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.jsonl");
        let mut j = Journal::open(&path);
        assert_eq!(j.refresh().expect("missing file is empty"), 0);
        let mut f = std::fs::File::create(&path).expect("create");
        write!(
            f,
            "{{\"ts_ms\":1,\"event\":\"ready\"}}\n{{\"ts_ms\":2,\"event\":\"da"
        )
        .expect("write");
        assert_eq!(j.refresh().expect("refresh"), 1);
        write!(
            f,
            "ta\",\"device\":\"d1\",\"id\":\"a\",\"seq\":3,\"class\":\"results\"}}\nnot json\n"
        )
        .expect("write");
        assert_eq!(j.refresh().expect("refresh"), 1);
        assert_eq!(j.data_events("d1").len(), 1);
        assert_eq!(j.events()[1].seq, Some(3));
        assert_eq!(j.bad_lines(), ["not json"]);
        j.wait_for_data_ids("d1", ["a"], Duration::from_millis(10))
            .expect("id a is there");
        assert!(
            j.wait_for_data_ids("d1", ["b"], Duration::from_millis(10))
                .is_err()
        );
    }

    #[test]
    fn a_rotation_between_reads_loses_nothing() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.jsonl");
        let line = |n: u32| {
            format!("{{\"ts_ms\":{n},\"event\":\"data\",\"device\":\"d1\",\"id\":\"m{n}\"}}\n")
        };
        let append = |p: &Path, n: u32| {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .expect("open");
            f.write_all(line(n).as_bytes()).expect("write");
        };
        let mut j = Journal::open(&path);
        append(&path, 1);
        assert_eq!(j.refresh().expect("reads"), 1);
        // Written after our read, then rotated as the coordinator does, then a new file.
        append(&path, 2);
        std::fs::rename(&path, dir.path().join("journal.jsonl.1")).expect("rotate");
        append(&path, 3);
        assert_eq!(j.refresh().expect("reads"), 2);
        let ids: Vec<&str> = j.events().iter().filter_map(|e| e.id.as_deref()).collect();
        assert_eq!(ids, ["m1", "m2", "m3"]);
    }
}
