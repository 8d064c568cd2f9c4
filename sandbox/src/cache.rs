//! On-disk cache of compiled modules, keyed by the module's sha256 digest and the engine's
//! compatibility hash (wasmtime version, target and every codegen-relevant setting).
//!
//! File layout: `MAGIC | module digest (32) | engine key (32) | sha256 of artifact (32) |
//! artifact length (u64 LE) | artifact`, named `<digest hex>-<engine key hex, 16>.cwasm`.
//! Files are written to a temporary name and renamed into place, so a reader sees a whole
//! file or none. A file that fails any check (short, wrong magic, another module or engine,
//! artifact hash mismatch) is reported as corrupt; the caller deletes it and recompiles.
//!
//! Invariant: this is the only source of bytes the sandbox deserializes. Only
//! [`Cache::write`] creates files here, always from an artifact our own engine just
//! compiled, and the directory is created private (0700). The artifact hash makes a torn or
//! bit-flipped file a cache miss instead of undefined behaviour in wasmtime's loader, which
//! checks the header but trusts the code it maps. (Anyone who can write this directory can
//! also run code as the agent; the hash is against damage, not against that.)

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"EDGEWC01";
const HEADER: usize = 8 + 32 + 32 + 32 + 8;

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Digest of the engine's compatibility hash: equal only for engines that can load each
/// other's artifacts.
pub(crate) fn engine_key(engine: &wasmtime::Engine) -> [u8; 32] {
    struct ShaHasher(Sha256);
    impl Hasher for ShaHasher {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        fn finish(&self) -> u64 {
            0
        }
    }
    let mut h = ShaHasher(Sha256::new());
    h.0.update(b"edge-agent sandbox cache v1\0");
    engine.precompile_compatibility_hash().hash(&mut h);
    h.0.finalize().into()
}

#[derive(Debug)]
pub(crate) struct Cache {
    dir: PathBuf,
    engine_key: [u8; 32],
}

/// Why a cache file was not used.
#[derive(Debug)]
pub(crate) enum Lookup {
    Missing,
    Hit(Vec<u8>),
    Corrupt(CacheFileError),
}

/// Why a cache file does not hold the artifact it is named for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CacheFileError {
    #[error("file of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("bad magic")]
    Magic,
    #[error("file is for another module")]
    OtherModule,
    #[error("file is for another engine configuration")]
    OtherEngine,
    #[error("artifact is {actual} bytes, header says {header}")]
    Length { actual: usize, header: u64 },
    #[error("artifact checksum mismatch")]
    Checksum,
}

impl Cache {
    pub(crate) fn open(dir: &Path, engine_key: [u8; 32]) -> std::io::Result<Cache> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let meta = std::fs::metadata(dir)?;
        if meta.permissions().mode() & 0o022 != 0 {
            // Someone else could plant artifacts that we would then map as code.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            tracing::warn!(dir = %dir.display(), "module cache was group/world-writable; made it private");
        }
        Ok(Cache {
            dir: dir.to_owned(),
            engine_key,
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn engine_key(&self) -> &[u8; 32] {
        &self.engine_key
    }

    pub(crate) fn path(&self, digest: &[u8; 32]) -> PathBuf {
        self.dir.join(format!(
            "{}-{}.cwasm",
            hex(digest),
            &hex(&self.engine_key)[..16]
        ))
    }

    pub(crate) fn read(&self, digest: &[u8; 32]) -> std::io::Result<Lookup> {
        let bytes = match std::fs::read(self.path(digest)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lookup::Missing),
            Err(e) => return Err(e),
        };
        Ok(match self.check(digest, &bytes) {
            Ok(()) => {
                let mut bytes = bytes;
                bytes.drain(..HEADER);
                Lookup::Hit(bytes)
            }
            Err(reason) => Lookup::Corrupt(reason),
        })
    }

    fn check(&self, digest: &[u8; 32], bytes: &[u8]) -> Result<(), CacheFileError> {
        if bytes.len() < HEADER {
            return Err(CacheFileError::Short(bytes.len()));
        }
        if &bytes[..8] != MAGIC {
            return Err(CacheFileError::Magic);
        }
        if bytes[8..40] != digest[..] {
            return Err(CacheFileError::OtherModule);
        }
        if bytes[40..72] != self.engine_key {
            return Err(CacheFileError::OtherEngine);
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[104..112]);
        let len = u64::from_le_bytes(len);
        let artifact = &bytes[HEADER..];
        if artifact.len() as u64 != len {
            return Err(CacheFileError::Length {
                actual: artifact.len(),
                header: len,
            });
        }
        if Sha256::digest(artifact).as_slice() != &bytes[72..104] {
            return Err(CacheFileError::Checksum);
        }
        Ok(())
    }

    /// Stores `artifact` atomically (temporary file, then rename). Not fsync'd: after a
    /// power cut the file is whole, missing, or fails the checks and is recompiled.
    pub(crate) fn write(&self, digest: &[u8; 32], artifact: &[u8]) -> std::io::Result<()> {
        let path = self.path(digest);
        let tmp = self.dir.join(format!(
            ".{}.tmp-{}-{:016x}",
            hex(digest),
            std::process::id(),
            rand::random::<u64>()
        ));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            let mut header = Vec::with_capacity(HEADER);
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(digest);
            header.extend_from_slice(&self.engine_key);
            header.extend_from_slice(&Sha256::digest(artifact));
            header.extend_from_slice(&(artifact.len() as u64).to_le_bytes());
            f.write_all(&header)?;
            f.write_all(artifact)?;
            drop(f);
            std::fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    pub(crate) fn remove(&self, digest: &[u8; 32]) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(&dir.path().join("c"), [7; 32]).expect("open");
        let d = [1u8; 32];
        assert!(matches!(cache.read(&d).expect("read"), Lookup::Missing));
        cache.write(&d, b"artifact bytes").expect("write");
        match cache.read(&d).expect("read") {
            Lookup::Hit(a) => assert_eq!(a, b"artifact bytes"),
            other => panic!("{other:?}"),
        }
        let path = cache.path(&d);
        let good = std::fs::read(&path).expect("read file");
        let flip = |i: usize| {
            let mut b = good.clone();
            b[i] ^= 1;
            b
        };
        for (bytes, why) in [
            (good[..10].to_vec(), "shorter"),
            (flip(0), "magic"),
            (flip(9), "another module"),
            (flip(41), "another engine"),
            (flip(HEADER + 3), "checksum"),
            (good[..good.len() - 1].to_vec(), "header says"),
        ] {
            std::fs::write(&path, bytes).expect("write");
            match cache.read(&d).expect("read") {
                Lookup::Corrupt(reason) => {
                    assert!(reason.to_string().contains(why), "{reason} / {why}")
                }
                other => panic!("{why}: {other:?}"),
            }
        }
        cache.remove(&d).expect("remove");
        cache.remove(&d).expect("remove twice");
        let mode = std::fs::metadata(cache.dir())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
    }
}
