//! The local dataset store: labeled samples written by pipeline `dataset` sinks, read by
//! local training. Bounded by sample count and bytes; the oldest samples go first.
//!
//! Layout: one sled tree `dataset`, key = global sequence number (big-endian, so iteration is
//! oldest first), value = `[name len u8][name][timestamp_ms u64 BE][has label u8][label i64 BE]
//! [n u32 BE][n x f32 LE]`.
//!
//! **Invariant:** the store never holds more than `max_samples` samples or `max_bytes` value
//! bytes after an append returns. Samples are training data nobody acknowledged: they are
//! flushed by sled's background flush, not fsync'd per append. **Boundary:** the pipeline's
//! dataset sink writes; training reads.

use std::sync::Mutex;

use serde::Deserialize;

use crate::setting::InvalidSetting;

const TREE: &str = "dataset";

/// `[dataset]` of the agent config: the local dataset store fed by pipeline `dataset` sinks
/// (training samples).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetConfig {
    /// Most samples kept; the oldest go first beyond it.
    pub max_samples: u64,
    /// Most bytes of samples kept; the oldest go first beyond it.
    pub max_bytes: u64,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        DatasetConfig {
            max_samples: 10_000,
            max_bytes: 16 * 1024 * 1024,
        }
    }
}

impl DatasetConfig {
    /// Checks the values serde cannot; the message names the keys (`dataset.KEY`).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.max_samples == 0 || self.max_bytes < 1024 {
            return Err(
                "dataset.max_samples must be at least 1 and dataset.max_bytes at least 1024".into(),
            );
        }
        Ok(())
    }
}

/// One training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub timestamp_ms: u64,
    pub label: Option<i64>,
    pub features: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset store: {0}")]
    Backend(String),
    #[error("sample of {size} bytes exceeds the dataset store's max_bytes {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("malformed sample record {key}")]
    Malformed { key: u64 },
}

#[derive(Debug)]
struct Meta {
    next_seq: u64,
    count: u64,
    bytes: u64,
}

/// The store; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Dataset {
    tree: sled::Tree,
    max_samples: u64,
    max_bytes: u64,
    meta: Mutex<Meta>,
}

fn backend(e: sled::Error) -> DatasetError {
    DatasetError::Backend(e.to_string())
}

impl Dataset {
    pub fn open(db: &sled::Db, cfg: &DatasetConfig) -> Result<Dataset, DatasetError> {
        let tree = db.open_tree(TREE).map_err(backend)?;
        let mut meta = Meta {
            next_seq: 0,
            count: 0,
            bytes: 0,
        };
        for kv in tree.iter() {
            let (k, v) = kv.map_err(backend)?;
            meta.count += 1;
            meta.bytes += v.len() as u64;
            meta.next_seq = key_seq(&k).saturating_add(1).max(meta.next_seq);
        }
        let ds = Dataset {
            tree,
            max_samples: cfg.max_samples,
            max_bytes: cfg.max_bytes,
            meta: Mutex::new(meta),
        };
        // The bounds may have shrunk since the last run.
        ds.evict(&mut ds.lock())?;
        Ok(ds)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a sample to `dataset`, evicting the oldest samples (of any dataset) to stay
    /// within the bounds.
    pub fn append(&self, dataset: &str, sample: &Sample) -> Result<(), DatasetError> {
        let value = encode(dataset, sample);
        let size = value.len() as u64;
        if size > self.max_bytes {
            return Err(DatasetError::TooLarge {
                size,
                limit: self.max_bytes,
            });
        }
        let mut meta = self.lock();
        let seq = meta.next_seq;
        self.tree
            .insert(seq.to_be_bytes(), value)
            .map_err(backend)?;
        meta.next_seq += 1;
        meta.count += 1;
        meta.bytes += size;
        self.evict(&mut meta)
    }

    fn evict(&self, meta: &mut Meta) -> Result<(), DatasetError> {
        while meta.count > self.max_samples || meta.bytes > self.max_bytes {
            let Some((_, v)) = self.tree.pop_min().map_err(backend)? else {
                meta.count = 0;
                meta.bytes = 0;
                break;
            };
            meta.count -= 1;
            meta.bytes = meta.bytes.saturating_sub(v.len() as u64);
        }
        Ok(())
    }

    /// Samples in the whole store.
    pub fn len(&self) -> u64 {
        self.lock().count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples of `dataset`, oldest first.
    pub fn samples(&self, dataset: &str) -> Result<Vec<Sample>, DatasetError> {
        let mut out = Vec::new();
        for kv in self.tree.iter() {
            let (k, v) = kv.map_err(backend)?;
            let (name, sample) = decode(&v).ok_or(DatasetError::Malformed { key: key_seq(&k) })?;
            if name == dataset {
                out.push(sample);
            }
        }
        Ok(out)
    }
}

fn key_seq(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if k.len() == 8 {
        b.copy_from_slice(k);
    }
    u64::from_be_bytes(b)
}

fn encode(dataset: &str, s: &Sample) -> Vec<u8> {
    let name = &dataset.as_bytes()[..dataset.len().min(255)];
    let mut v = Vec::with_capacity(1 + name.len() + 21 + 4 * s.features.len());
    v.push(name.len() as u8);
    v.extend_from_slice(name);
    v.extend_from_slice(&s.timestamp_ms.to_be_bytes());
    v.push(u8::from(s.label.is_some()));
    v.extend_from_slice(&s.label.unwrap_or(0).to_be_bytes());
    v.extend_from_slice(&(s.features.len() as u32).to_be_bytes());
    for f in &s.features {
        v.extend_from_slice(&f.to_le_bytes());
    }
    v
}

fn decode(v: &[u8]) -> Option<(String, Sample)> {
    let (&n, rest) = v.split_first()?;
    let (name, rest) = rest.split_at_checked(n as usize)?;
    let (ts, rest) = rest.split_at_checked(8)?;
    let (&has, rest) = rest.split_first()?;
    let (label, rest) = rest.split_at_checked(8)?;
    let (count, rest) = rest.split_at_checked(4)?;
    let count = u32::from_be_bytes(count.try_into().ok()?) as usize;
    if rest.len() != count.checked_mul(4)? {
        return None;
    }
    let features = rest
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some((
        String::from_utf8(name.to_vec()).ok()?,
        Sample {
            timestamp_ms: u64::from_be_bytes(ts.try_into().ok()?),
            label: (has == 1).then(|| i64::from_be_bytes(label.try_into().unwrap_or_default())),
            features,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: u64) -> Sample {
        Sample {
            timestamp_ms: i,
            label: i.is_multiple_of(2).then_some(i as i64),
            features: vec![i as f32; 4],
        }
    }

    #[test]
    fn appends_reads_back_evicts_oldest_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .expect("db");
        let cfg = DatasetConfig {
            max_samples: 5,
            max_bytes: 1 << 20,
        };
        let ds = Dataset::open(&db, &cfg).expect("open");
        for i in 0..8 {
            ds.append(if i == 7 { "other" } else { "a" }, &sample(i))
                .expect("append");
        }
        assert_eq!(ds.len(), 5);
        let a = ds.samples("a").expect("read");
        assert_eq!(
            a.iter().map(|s| s.timestamp_ms).collect::<Vec<_>>(),
            vec![3, 4, 5, 6]
        );
        assert_eq!(a[1], sample(4));
        drop(ds);
        let tight = DatasetConfig {
            max_samples: 2,
            max_bytes: 1 << 20,
        };
        let ds = Dataset::open(&db, &tight).expect("reopen");
        assert_eq!(ds.len(), 2, "shrunk bound applied at open");
        ds.append("a", &sample(9)).expect("append");
        assert_eq!(ds.samples("other").expect("read").len(), 1);
        let huge = Sample {
            timestamp_ms: 0,
            label: None,
            features: vec![0.0; 1 << 20],
        };
        assert!(matches!(
            ds.append("a", &huge),
            Err(DatasetError::TooLarge { .. })
        ));
    }
}
