//! Group commit: one thread fdatasyncs the write-ahead log for every waiter that queued meanwhile.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, mpsc};

use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Shared: one failed fdatasync fails every waiter of its round.
    #[error("fsync failed: {0}")]
    Io(Arc<std::io::Error>),
    #[error("commit thread stopped")]
    Stopped,
}

type Waiter = oneshot::Sender<Result<(), Arc<std::io::Error>>>;

pub struct Committer {
    tx: Option<mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Committer {
    /// Joins the thread so its handle on the database is gone when the outbox is dropped
    /// (sled holds a file lock until the last handle goes).
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Committer {
    /// `log` is a handle on the write-ahead log file; its `sync_data` covers every append.
    pub fn start(log: std::fs::File) -> std::io::Result<Committer> {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let thread = std::thread::Builder::new()
            .name("outbox-commit".into())
            .spawn(move || {
                // Ends when every sender (the Outbox) is dropped.
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let result = log.sync_data().map_err(Arc::new);
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
            })?;
        Ok(Committer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Waits until everything written to the store before this call is durable.
    pub async fn commit(&self) -> Result<(), CommitError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .ok_or(CommitError::Stopped)?
            .send(tx)
            .map_err(|_| CommitError::Stopped)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CommitError::Io(e)),
            Err(_) => Err(CommitError::Stopped),
        }
    }
}

/// fsyncs sled's log file and blob files not synced yet (sled writes blobs without fsync).
fn sync_files(path: &Path, synced_blobs: &mut HashSet<std::ffi::OsString>) -> std::io::Result<()> {
    std::fs::File::open(path.join("db"))?.sync_data()?;
    let blobs = path.join("blobs");
    let mut new_blob = false;
    match std::fs::read_dir(&blobs) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                if synced_blobs.insert(entry.file_name()) {
                    std::fs::File::open(entry.path())?.sync_data()?;
                    new_blob = true;
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if new_blob {
        crate::fsutil::sync_dir(&blobs)?;
    }
    Ok(())
}

/// One-off full sync of a freshly created store (files and directory entries).
pub fn sync_store(path: &Path) -> std::io::Result<()> {
    sync_files(path, &mut HashSet::new())?;
    for f in ["conf", "db"] {
        if path.join(f).exists() {
            std::fs::File::open(path.join(f))?.sync_all()?;
        }
    }
    crate::fsutil::sync_dir(path)?;
    if let Some(parent) = path.parent() {
        crate::fsutil::sync_dir(parent)?;
    }
    Ok(())
}
