//! Updates too big for one message arrive in parts (`v1::fl::UpdatePart`, each its own outbox
//! message, acknowledged end to end once committed). Each part is written to disk before the
//! service acknowledges it, so a coordinator restart loses none; when the last one is in, the
//! update is put together, checked against the digest the parts carry, and admitted like any
//! other. Disk use is bounded: one update in progress per device and task (a part of a newer
//! round or of another attempt replaces the older set).
//!
//! A part of an older round than a set this device already has on disk for the task is
//! dropped (and acknowledged like any committed message): it is a resend of an update that
//! was put together or abandoned already (its set went when the newer round's first part
//! came), so it could complete nothing, and keeping it would throw away the newer set, whose
//! parts the coordinator has acknowledged and the device no longer holds. So is a part of the
//! update this process last put together for the device and task.
//!
//! Layout: `STATE/fl/parts/{sha256(task, device)[..32]}/{round}-{digest[..16]}/{index}`; the
//! ids are hashed so no device id (`..` is a valid one) names a path.

use std::path::{Path, PathBuf};

use protocol::v1::fl::{self, FlError, UpdatePart};
use sha2::{Digest, Sha256};

/// Why a part was not kept or its update not put together.
#[derive(Debug, thiserror::Error)]
pub enum PartsError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Part(#[from] FlError),
}

/// The parts directory of a state directory.
pub struct Parts {
    dir: PathBuf,
    fsync: bool,
    /// The part indexes on disk per set this process has touched: counting them is not a
    /// directory read per part.
    held: std::collections::HashMap<PathBuf, std::collections::BTreeSet<u32>>,
    /// Per owner directory, the set this process last put together: its parts come again
    /// when a device resends what was acknowledged late.
    done: std::collections::HashMap<PathBuf, PathBuf>,
}

/// A set directory's round (its name is `{round}-{digest}`).
fn set_round(set: &Path) -> Option<u32> {
    set.file_name()?.to_str()?.split('-').next()?.parse().ok()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PartsError + '_ {
    move |error| PartsError::Io {
        path: path.to_owned(),
        error,
    }
}

impl Parts {
    pub fn new(state_dir: &Path, fsync: bool) -> Parts {
        Parts {
            dir: super::files::fl_dir(state_dir).join("parts"),
            fsync,
            held: std::collections::HashMap::new(),
            done: std::collections::HashMap::new(),
        }
    }

    fn owner_dir(&self, task: &str, device: &str) -> PathBuf {
        let mut h = Sha256::new();
        h.update(task.as_bytes());
        h.update([0]);
        h.update(device.as_bytes());
        self.dir.join(&hex::encode(h.finalize())[..32])
    }

    /// Whether a part of `round` for the not yet started `set` is a resend of something
    /// finished: the set this process last put together for `owner`, or a round older than a
    /// set `owner` has on disk (see the module docs).
    fn stale(&self, owner: &Path, set: &Path, round: u32) -> bool {
        if self.done.get(owner).is_some_and(|d| d == set) {
            return true;
        }
        let Ok(entries) = std::fs::read_dir(owner) else {
            return false;
        };
        entries
            .flatten()
            .filter_map(|e| set_round(&e.path()))
            .any(|r| r > round)
    }

    /// Keeps one part (the body of an `fl-part` envelope from `device`); the whole update once
    /// every part is in (the parts are then removed).
    pub fn add(&mut self, device: &str, body: &[u8]) -> Result<Option<Vec<u8>>, PartsError> {
        let part = UpdatePart::decode(body)?;
        let owner = self.owner_dir(&part.task, device);
        let set = owner.join(format!(
            "{}-{}",
            part.round,
            &hex::encode(part.sha256)[..16]
        ));
        if !self.held.contains_key(&set) {
            if self.stale(&owner, &set, part.round) {
                tracing::debug!(%device, task = %part.task, round = part.round, index = part.index, "update part of an update already put together or replaced; dropped");
                return Ok(None);
            }
            // A set this process has not seen: older sets of this device and task (an earlier
            // round, another attempt) go, and the parts already on disk (from before a
            // restart) count. Once per set, not once per part.
            if let Ok(entries) = std::fs::read_dir(&owner) {
                for e in entries.flatten() {
                    if e.path() != set {
                        self.held.remove(&e.path());
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            std::fs::create_dir_all(&set).map_err(io(&set))?;
            let on_disk = std::fs::read_dir(&set)
                .map_err(io(&set))?
                .flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
                .collect();
            self.held.insert(set.clone(), on_disk);
        }
        if self.held.get(&set).is_some_and(|h| h.contains(&part.index)) {
            // A resend of a part on disk: the set's digest pins its bytes; no second write.
            return Ok(None);
        }
        let path = set.join(format!("{:05}", part.index));
        crate::spooldir::replace_file(&path, body, self.fsync).map_err(io(&path))?;
        let have = self.held.get_mut(&set).map(|h| {
            h.insert(part.index);
            h.len()
        });
        if have.unwrap_or(0) < part.count as usize {
            return Ok(None);
        }
        self.held.remove(&set);
        self.done.insert(owner, set.clone());
        let mut parts = Vec::with_capacity(part.count as usize);
        for i in 0..part.count {
            let p = set.join(format!("{i:05}"));
            let bytes = std::fs::read(&p).map_err(io(&p))?;
            parts.push(UpdatePart::decode(&bytes)?);
        }
        // Whatever the outcome, this set is done: a bad one would only be refused again.
        let whole = fl::chunks::assemble(&parts);
        drop(parts);
        let _ = std::fs::remove_dir_all(&set);
        Ok(Some(whole?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_survive_a_restart_and_put_the_update_together() {
        let dir = tempfile::tempdir().expect("tmp");
        let update: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let parts: Vec<UpdatePart> = UpdatePart::split("big", 4, &update).collect();
        assert_eq!(parts.len(), 4);
        let mut first = Parts::new(dir.path(), false);
        assert!(
            first
                .add("pi-1", &parts[2].encode())
                .expect("kept")
                .is_none()
        );
        assert!(
            first
                .add("pi-1", &parts[0].encode())
                .expect("kept")
                .is_none()
        );
        // Another device's parts of the same round are another set.
        assert!(
            first
                .add("pi-2", &parts[1].encode())
                .expect("kept")
                .is_none()
        );
        let mut again = Parts::new(dir.path(), false);
        assert!(
            again
                .add("pi-1", &parts[1].encode())
                .expect("kept")
                .is_none()
        );
        // A duplicate is harmless, and not written again.
        let kept = std::fs::read_dir(again.owner_dir("big", "pi-1"))
            .expect("owner")
            .flatten()
            .map(|set| set.path().join("00001"))
            .find(|p| p.exists())
            .expect("part 1 on disk");
        let inode =
            |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("meta"));
        let before = inode(&kept);
        assert!(
            again
                .add("pi-1", &parts[1].encode())
                .expect("kept")
                .is_none()
        );
        assert_eq!(inode(&kept), before, "a resent part is not written again");
        let whole = again.add("pi-1", &parts[3].encode()).expect("kept");
        assert_eq!(whole.as_deref(), Some(&update[..]));
        // A device id that is a path component elsewhere names no path here.
        assert!(again.add("..", &parts[0].encode()).expect("kept").is_none());
        assert!(!dir.path().join("fl/big").exists());
    }

    /// A device whose acks came late sends its last round's parts again, after the coordinator
    /// put that update together and while the next round's parts arrive: those resends must
    /// not throw away the newer parts (acknowledged, so the device will not send them again).
    #[test]
    fn resent_parts_of_a_finished_update_keep_the_next_rounds_parts() {
        let dir = tempfile::tempdir().expect("tmp");
        let (one, two) = (vec![1u8; 150_000], vec![2u8; 150_000]);
        let old: Vec<UpdatePart> = UpdatePart::split("big", 1, &one).collect();
        let new: Vec<UpdatePart> = UpdatePart::split("big", 2, &two).collect();
        let mut p = Parts::new(dir.path(), false);
        let mut whole = None;
        for part in &old {
            whole = p.add("pi-1", &part.encode()).expect("kept");
        }
        assert_eq!(whole.as_deref(), Some(&one[..]));
        // A resend of round 1 before round 2 starts: nothing to put together again.
        assert!(p.add("pi-1", &old[0].encode()).expect("kept").is_none());
        assert!(p.add("pi-1", &new[0].encode()).expect("kept").is_none());
        // Round 1's parts again, this time behind round 2's first part.
        for part in &old {
            assert!(p.add("pi-1", &part.encode()).expect("kept").is_none());
        }
        // Round 2 completes from the parts not sent yet; part 0 was kept. The same holds for
        // a coordinator restarted in between (what is on disk decides).
        let mut again = Parts::new(dir.path(), false);
        assert!(again.add("pi-1", &old[1].encode()).expect("kept").is_none());
        let mut whole = None;
        for part in &new[1..] {
            whole = again.add("pi-1", &part.encode()).expect("kept");
        }
        assert_eq!(whole.as_deref(), Some(&two[..]));
    }

    #[test]
    fn a_newer_round_replaces_an_unfinished_set_and_forged_parts_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut p = Parts::new(dir.path(), false);
        let (one, two) = (vec![1u8; 100_000], vec![2u8; 100_000]);
        let old: Vec<UpdatePart> = UpdatePart::split("big", 1, &one).collect();
        let new: Vec<UpdatePart> = UpdatePart::split("big", 2, &two).collect();
        assert!(p.add("pi-1", &old[0].encode()).expect("kept").is_none());
        assert!(p.add("pi-1", &new[0].encode()).expect("kept").is_none());
        let mut forged = new[1].clone();
        forged.data[0] ^= 1;
        assert!(
            p.add("pi-1", &forged.encode()).is_err(),
            "digest of the whole"
        );
        // The old set went when the newer round's first part came: its second part starts
        // it again rather than completing it.
        assert!(p.add("pi-1", &old[1].encode()).expect("kept").is_none());
        assert!(p.add("pi-1", b"FPgarbage").is_err());
    }
}
