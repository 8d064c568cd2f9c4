//! The deployment package file: a signed deployment in one file, written offline by
//! `edge-coordinator deploy ... --out FILE` (which holds the signing key) and uploaded to a
//! running `serve` with `POST /api/deployments` (which holds none).
//!
//! ```text
//! magic "EDGEPKG1" (8 bytes)
//! count u8                     1, or 2 when the deployment's rollback follows it (--strategy canary)
//! per package:
//!   manifest_len u32 BE        at most protocol::v1::MAX_PAYLOAD_BYTES
//!   signed manifest JSON       exactly the payload published on deploy/manifest
//!   per distinct artifact, in the manifest's order (first appearance of each sha256):
//!     len u64 BE               must equal the manifest's size for that artifact
//!     bytes
//! end of file                  trailing bytes are refused
//! ```
//!
//! Every length is checked against what is left before anything is read, so a truncated or
//! garbage file is refused naming where it broke, without allocating more than the file.
//! Decoding only parses; the signature, digests and chunk digests are checked by
//! [`Package::from_signed`] and the caller's `verify`.

use std::collections::BTreeMap;

use protocol::v1::MAX_PAYLOAD_BYTES;
use protocol::v1::deploy::SignedManifest;

use super::package::{Package, PackageError};

const MAGIC: &[u8; 8] = b"EDGEPKG1";

/// Why a package file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(
        "not a deployment package file (it does not start with \"EDGEPKG1\"; make one with `edge-coordinator deploy ... --out FILE`)"
    )]
    Magic,
    #[error(
        "package file is truncated: {what} needs {needed} bytes at offset {offset}, {left} are left"
    )]
    Truncated {
        what: String,
        offset: usize,
        needed: u64,
        left: usize,
    },
    #[error(
        "package file holds {0} packages; expected 1 (a deployment) or 2 (a deployment and its rollback)"
    )]
    Count(u8),
    #[error("package {index}: signed manifest of {size} bytes is over the limit of {limit} bytes")]
    ManifestSize {
        index: usize,
        size: usize,
        limit: usize,
    },
    #[error("package {index}: signed manifest: {error}")]
    Manifest { index: usize, error: String },
    #[error(
        "package {index}: artifact {name} is {actual} bytes in the file, the manifest says {signed}"
    )]
    Size {
        index: usize,
        name: String,
        actual: u64,
        signed: u64,
    },
    #[error("package {index}: {error}")]
    Package { index: usize, error: PackageError },
    #[error("{0} bytes after the last package; the file is damaged or not one package file")]
    Trailing(usize),
}

/// A decoded file: the deployment and, for a staged rollout, its rollback.
#[derive(Debug)]
pub struct PackageFile {
    pub package: Package,
    pub rollback: Option<Package>,
}

/// Writes `package` (and its rollback) in the format above.
pub fn encode(package: &Package, rollback: Option<&Package>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.push(1 + u8::from(rollback.is_some()));
    for p in std::iter::once(package).chain(rollback) {
        let manifest = p.manifest_payload();
        out.extend_from_slice(&(manifest.len() as u32).to_be_bytes());
        out.extend_from_slice(&manifest);
        for (_, bytes) in ordered_blobs(p) {
            out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
            out.extend_from_slice(bytes);
        }
    }
    out
}

/// The distinct artifacts of a package in the manifest's order.
fn ordered_blobs(p: &Package) -> Vec<(&str, &[u8])> {
    let blobs: BTreeMap<&str, &[u8]> = p.blobs().collect();
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for a in &p.manifest.artifacts {
        if seen.contains(&a.sha256.as_str()) {
            continue;
        }
        seen.push(a.sha256.as_str());
        if let Some(b) = blobs.get(a.sha256.as_str()) {
            out.push((a.sha256.as_str(), *b));
        }
    }
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: impl Fn() -> String) -> Result<&'a [u8], FileError> {
        let left = self.bytes.len() - self.at;
        if n > left as u64 {
            return Err(FileError::Truncated {
                what: what(),
                offset: self.at,
                needed: n,
                left,
            });
        }
        let start = self.at;
        self.at += n as usize;
        Ok(&self.bytes[start..self.at])
    }
}

/// Parses a package file and checks each package against its manifest (sizes, sha256, chunk
/// digests). The signature is not checked here.
pub fn decode(bytes: &[u8]) -> Result<PackageFile, FileError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(FileError::Magic);
    }
    let mut r = Reader {
        bytes,
        at: MAGIC.len(),
    };
    let count = r.take(1, || "the package count".into())?[0];
    if !(1..=2).contains(&count) {
        return Err(FileError::Count(count));
    }
    let mut packages = Vec::with_capacity(count as usize);
    for index in 1..=count as usize {
        let len = r.take(4, || format!("package {index}'s manifest length"))?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > MAX_PAYLOAD_BYTES {
            return Err(FileError::ManifestSize {
                index,
                size: len,
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        let json = r.take(len as u64, || format!("package {index}'s signed manifest"))?;
        let signed = SignedManifest::from_json(json).map_err(|e| FileError::Manifest {
            index,
            error: e.to_string(),
        })?;
        let manifest = signed
            .peek_unverified()
            .ok_or_else(|| FileError::Manifest {
                index,
                error: "manifest_json does not parse".into(),
            })?;
        let mut blobs = BTreeMap::new();
        for a in &manifest.artifacts {
            if blobs.contains_key(&a.sha256) {
                continue;
            }
            let len = r.take(8, || {
                format!("package {index}'s length of artifact {}", a.name)
            })?;
            let mut be = [0u8; 8];
            be.copy_from_slice(len);
            let len = u64::from_be_bytes(be);
            if len != a.size {
                return Err(FileError::Size {
                    index,
                    name: a.name.clone(),
                    actual: len,
                    signed: a.size,
                });
            }
            let data = r.take(len, || format!("package {index}'s artifact {}", a.name))?;
            blobs.insert(a.sha256.clone(), data.to_vec());
        }
        packages.push(
            Package::from_signed(signed, blobs)
                .map_err(|error| FileError::Package { index, error })?,
        );
    }
    if r.at != bytes.len() {
        return Err(FileError::Trailing(bytes.len() - r.at));
    }
    let mut packages = packages.into_iter();
    let package = packages.next().ok_or(FileError::Count(0))?;
    Ok(PackageFile {
        package,
        rollback: packages.next(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::package::{ArtifactFile, PackageSpec};
    use protocol::v1::deploy::{DeployKind, HealthCheck, SigningKey, Target};

    fn package(id: &str, bytes: &[u8]) -> Package {
        Package::build(
            PackageSpec {
                deployment_id: id.into(),
                target: Target::Group("lab".into()),
                version: 1,
                now_ms: 0,
                ttl_ms: 1_000,
                kind: DeployKind::Pipeline,
                pipeline_toml: Some(String::new()),
                chunk_size: 4,
                health: HealthCheck {
                    messages: 0,
                    seconds: 0,
                },
            },
            vec![
                ArtifactFile {
                    name: "a.wasm".into(),
                    version: "1".into(),
                    bytes: bytes.to_vec(),
                },
                ArtifactFile {
                    name: "b.wasm".into(),
                    version: "1".into(),
                    bytes: b"second".to_vec(),
                },
            ],
            &SigningKey::from_bytes(&[5; 32]),
        )
        .expect("builds")
    }

    #[test]
    fn roundtrips_with_and_without_a_rollback() {
        let p = package("dep-1", b"hello world");
        let rb = package("dep-1-rollback", b"older");
        let one = decode(&encode(&p, None)).expect("decodes");
        assert_eq!(one.package.manifest, p.manifest);
        assert!(one.rollback.is_none());
        let two = decode(&encode(&p, Some(&rb))).expect("decodes");
        assert_eq!(two.package.manifest_payload(), p.manifest_payload());
        assert_eq!(
            two.rollback.expect("rollback").manifest.deployment_id,
            "dep-1-rollback"
        );
    }

    #[test]
    fn refuses_truncation_tampering_garbage_and_trailing_bytes() {
        let p = package("dep-1", b"hello world");
        let file = encode(&p, None);
        for cut in [0, 5, 8, 9, 12, file.len() - 1] {
            let e = decode(&file[..cut]).expect_err("truncated");
            assert!(
                matches!(e, FileError::Magic | FileError::Truncated { .. }),
                "{cut}: {e}"
            );
        }
        let at = file
            .windows(11)
            .position(|w| w == b"hello world")
            .expect("artifact bytes");
        let mut tampered = file.clone();
        tampered[at] = b'j';
        let e = decode(&tampered).expect_err("tampered").to_string();
        assert!(e.contains("a.wasm") && e.contains("sha256"), "{e}");
        let e = decode(b"{\"not\": \"a package\"}").expect_err("garbage");
        assert!(matches!(e, FileError::Magic), "{e}");
        let mut long = file.clone();
        long.push(0);
        assert!(matches!(decode(&long), Err(FileError::Trailing(1))));
        let mut count = file;
        count[8] = 3;
        assert!(matches!(decode(&count), Err(FileError::Count(3))));
    }
}
