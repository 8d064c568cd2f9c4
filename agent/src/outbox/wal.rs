//! Write-ahead log in front of sled: what makes an enqueue durable.
//!
//! sled's `flush()` writes each dirty log buffer with its own `pwrite` + `sync_file_range(WAIT)`,
//! several per flush, and is still not power-safe without an fsync after it. Appending the new
//! records to this file and calling `fdatasync` once per group commit is the cheapest durable
//! write there is; sled is brought to disk only at checkpoints (flush + fsync), after which the
//! log is truncated.
//!
//! Frame: `len u32 BE | crc32 u32 BE | body`, body = `op u8 | class u8 | seq u64 BE | record`.
//! `op` 1 inserts a record, 2 deletes one (acks are logged without a sync: if the delete is
//! lost, the message is sent again and the coordinator drops the duplicate).
//!
//! A crash can leave a torn last frame; replay stops there and truncates it. A bad frame with
//! more data after it cannot come from a torn append and is reported as corruption.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use protocol::v1::Class;

use super::Key;

const OP_INSERT: u8 = 1;
const OP_DELETE: u8 = 2;
const HEADER: usize = 8;
const BODY_HEADER: usize = 1 + 1 + 8;
/// Larger than any frame we write (records are bounded by the wire payload limit).
const MAX_FRAME: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Insert(Key, Vec<u8>),
    Delete(Key),
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write-ahead log {path} is corrupted at byte {offset}: {reason}")]
    Corrupted {
        path: PathBuf,
        offset: u64,
        reason: &'static str,
    },
}

pub struct Wal {
    path: PathBuf,
    file: File,
    len: u64,
    /// Tests: appends that would take the log past this many bytes fail as on a full disk.
    #[cfg(test)]
    pub(super) full_at: Option<u64>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish()
    }
}

pub fn encode(op: &Op, out: &mut Vec<u8>) {
    let (code, key, record): (u8, Key, &[u8]) = match op {
        Op::Insert(k, r) => (OP_INSERT, *k, r),
        Op::Delete(k) => (OP_DELETE, *k, &[]),
    };
    let mut body = Vec::with_capacity(BODY_HEADER + record.len());
    body.push(code);
    body.push(key.class.index() as u8);
    body.extend_from_slice(&key.seq.to_be_bytes());
    body.extend_from_slice(record);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&body);
}

fn decode_body(body: &[u8]) -> Option<Op> {
    if body.len() < BODY_HEADER {
        return None;
    }
    let class = Class::from_index(body[1])?;
    let mut s = [0u8; 8];
    s.copy_from_slice(&body[2..10]);
    let key = Key {
        class,
        seq: u64::from_be_bytes(s),
    };
    match body[0] {
        OP_INSERT => Some(Op::Insert(key, body[BODY_HEADER..].to_vec())),
        OP_DELETE if body.len() == BODY_HEADER => Some(Op::Delete(key)),
        _ => None,
    }
}

/// Parses a log image: the operations, and the length of the valid prefix.
pub fn parse(bytes: &[u8], path: &Path) -> Result<(Vec<Op>, u64), WalError> {
    let mut ops = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let bad = |reason| {
            // A torn append leaves at most one partial frame, or zeros, at the very end.
            let rest = &bytes[at..];
            if rest.len() <= MAX_FRAME + HEADER || rest.iter().all(|&b| b == 0) {
                Ok(())
            } else {
                Err(WalError::Corrupted {
                    path: path.to_owned(),
                    offset: at as u64,
                    reason,
                })
            }
        };
        if bytes.len() - at < HEADER {
            bad("truncated frame header")?;
            break;
        }
        let len =
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let crc = u32::from_be_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        // A zero-length frame with a zero checksum is what a zero-filled tail looks like.
        if !(BODY_HEADER..=MAX_FRAME).contains(&len) || bytes.len() - at - HEADER < len {
            bad("frame length past the end")?;
            break;
        }
        let body = &bytes[at + HEADER..at + HEADER + len];
        if crc32fast::hash(body) != crc {
            bad("checksum mismatch")?;
            break;
        }
        match decode_body(body) {
            Some(op) => ops.push(op),
            None => {
                return Err(WalError::Corrupted {
                    path: path.to_owned(),
                    offset: at as u64,
                    reason: "unknown operation",
                });
            }
        }
        at += HEADER + len;
    }
    Ok((ops, at as u64))
}

impl Wal {
    /// Opens the log, returning it with the operations it holds (a torn tail is cut off).
    pub fn open(path: &Path) -> Result<(Wal, Vec<Op>), WalError> {
        let io = |source| WalError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let (ops, valid) = parse(&bytes, path)?;
        if valid < bytes.len() as u64 {
            tracing::warn!(path = %path.display(), cut = bytes.len() as u64 - valid, "write-ahead log had a torn tail from a crash; cut it off");
            file.set_len(valid).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        Ok((
            Wal {
                path: path.to_owned(),
                file,
                len: valid,
                #[cfg(test)]
                full_at: None,
            },
            ops,
        ))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends encoded frames (not yet durable: see [`Wal::syncer`]).
    pub fn append(&mut self, frames: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if self
            .full_at
            .is_some_and(|at| self.len + frames.len() as u64 > at)
        {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if let Err(e) = self.file.write_all(frames) {
            // A short write leaves a partial frame; cut it so later frames stay parseable.
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += frames.len() as u64;
        Ok(())
    }

    /// Cuts the log back to `len` (not past its end), dropping what was appended since: a
    /// batch whose later frames could not be appended.
    pub fn cut(&mut self, len: u64) -> std::io::Result<()> {
        if len < self.len {
            self.file.set_len(len)?;
            self.len = len;
        }
        Ok(())
    }

    /// A handle whose `sync_data` makes every append made before the call durable.
    pub fn syncer(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Empties the log after its content is durable elsewhere (sled checkpoint).
    pub fn truncate(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.len = 0;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seq: u64) -> Key {
        Key {
            class: Class::Results,
            seq,
        }
    }

    #[test]
    fn roundtrip_and_torn_tail() {
        let ops = vec![
            Op::Insert(key(1), b"abc".to_vec()),
            Op::Delete(key(1)),
            Op::Insert(key(2), vec![]),
        ];
        let mut img = Vec::new();
        for op in &ops {
            encode(op, &mut img);
        }
        let p = Path::new("w");
        assert_eq!(
            parse(&img, p).expect("parses"),
            (ops.clone(), img.len() as u64)
        );
        // Every cut of the last frame is a torn tail: the first two ops survive.
        let two = {
            let mut v = Vec::new();
            encode(&ops[0], &mut v);
            encode(&ops[1], &mut v);
            v.len()
        };
        for cut in two..img.len() {
            let (got, valid) = parse(&img[..cut], p).expect("torn tail is fine");
            assert_eq!(got, ops[..2].to_vec(), "cut {cut}");
            assert_eq!(valid, two as u64);
        }
        // Trailing zeros (ext4 after a crash) are a torn tail too.
        let mut zeros = img.clone();
        zeros.extend(std::iter::repeat_n(0u8, 3 * MAX_FRAME));
        assert_eq!(parse(&zeros, p).expect("zeros").0, ops);
    }

    #[test]
    fn damage_followed_by_data_is_corruption() {
        let mut img = Vec::new();
        encode(&Op::Insert(key(1), b"abc".to_vec()), &mut img);
        img[HEADER] ^= 0xff;
        img.extend(std::iter::repeat_n(7u8, 2 * MAX_FRAME));
        assert!(matches!(
            parse(&img, Path::new("w")),
            Err(WalError::Corrupted { .. })
        ));
    }
}
