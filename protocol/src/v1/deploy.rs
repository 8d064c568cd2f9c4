//! Signed deployments: manifest, signature envelope, artifact chunks, resend requests and
//! the agent's status reports.
//!
//! ```text
//! coordinator                                              agent
//!   SignedManifest (JSON)  --deploy/manifest-->   verify(signature, key) -> Manifest checks
//!   Chunk (binary, below MAX_PAYLOAD_BYTES) --deploy/chunk-->  assemble, sha256, store
//!                         <--deploy/resend--   Envelope<ResendRequest> (missing indexes)
//!                         <--deploy/status--   Envelope<DeployStatus> (every step)
//! ```
//!
//! The signature covers the exact bytes of `manifest_json` as transmitted, so nothing is ever
//! re-serialised before verification and there is no canonical-JSON question to get wrong.
//! Chunks are not signed one by one: the signed manifest carries, for every artifact, its
//! sha256 and size and the sha256 of each of its chunks in order (`chunk_sha256`). The agent
//! checks every chunk against that list as it arrives, so a chunk forged by anyone who can
//! publish on the broker is dropped and asked for again, never assembled; the whole-artifact
//! check at the end stays.
//!
//! Why a plain list and not a Merkle root with a proof in every chunk: the list fits. One
//! digest costs 69 bytes of the signed manifest (64 hex digits, quotes escaped inside
//! `manifest_json`, a comma). The largest deployment the agent accepts by default (16
//! artifacts, 32 MiB in all) at the default 64 KiB chunks is at most 527 chunks (511 full ones
//! and a partial last one in each of the 16 artifacts), about 36 KB of digests, well inside
//! [`MAX_PAYLOAD_BYTES`] (96 KiB) with room for the pipeline description (the agent's
//! `deploy::machine` tests build that manifest and check it). What does not fit (from about 80
//! MiB at 64 KiB chunks, depending on names and the description; proportionally less at a
//! smaller `chunk_size`) is refused by the coordinator when it builds the package, with the
//! manifest's size in the error; no manifest is ever sent without the list.

use ed25519_dalek::{Signature, Signer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{MAX_PAYLOAD_BYTES, VERSION, validate_device_id, validate_message_id};

pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// Most data bytes one chunk may carry. With the header (at most ~120 bytes) a chunk stays
/// well under [`MAX_PAYLOAD_BYTES`].
pub const MAX_CHUNK_DATA: usize = 64 * 1024;

/// Chunk size the coordinator uses unless told otherwise.
pub const DEFAULT_CHUNK_SIZE: u32 = MAX_CHUNK_DATA as u32;

/// Most chunk indexes one resend request lists; the agent asks again for the rest later.
pub const MAX_RESEND_INDEXES: usize = 2048;

/// Longest artifact name (a path as written in the pipeline description).
pub const MAX_ARTIFACT_NAME_LEN: usize = 255;

const CHUNK_MAGIC: &[u8; 2] = b"DC";

/// Errors from signing, verifying and decoding deployment messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeployError {
    #[error("manifest is not signed")]
    Unsigned,
    #[error("manifest is signed by unknown key {key_id}")]
    UnknownKey { key_id: String },
    #[error("bad signature on manifest by key {key_id}: {detail}")]
    BadSignature { key_id: String, detail: String },
    #[error("malformed manifest: {0}")]
    Malformed(String),
    #[error("invalid public key {key:?}: {detail}")]
    PublicKey { key: String, detail: String },
    #[error("malformed chunk: {0}")]
    Chunk(String),
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

/// Who a manifest is for. JSON: `{"device": "pi-1"}` or `{"group": "lab"}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Device(String),
    Group(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Device(d) => write!(f, "device {d}"),
            Target::Group(g) => write!(f, "group {g}"),
        }
    }
}

/// What the deployment replaces on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployKind {
    /// A whole pipeline (description plus its modules and models).
    Pipeline,
    /// Only model files of the running pipeline.
    Model,
}

/// How an artifact's bytes are to be interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MediaType {
    WasmComponent,
    Onnx,
    /// An ONNX external data file (weights a `.onnx` graph names by `location`). Its name is
    /// the location joined to the folder of the model's name (`models/m.onnx` names
    /// `m.onnx.data`: artifact `models/m.onnx.data`).
    OnnxData,
}

/// The artifact name of external data file `location` of the model named `model`: the
/// location joined to the model's folder, `.` parts dropped (`models/m.onnx` and
/// `m.onnx.data` give `models/m.onnx.data`). The coordinator names data artifacts so, and the
/// agent finds them so. Locations are checked before (relative, no `..`).
pub fn data_artifact_name(model: &str, location: &str) -> String {
    let folder = model.rsplit_once('/').map_or("", |(dir, _)| dir);
    folder
        .split('/')
        .chain(location.split('/'))
        .filter(|p| !p.is_empty() && *p != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// One file a deployment needs, identified by content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Name as the pipeline description refers to it (e.g. `modules/features.wasm`).
    pub name: String,
    /// Lowercase hex sha256 of the bytes; also the key in the agent's content-addressed store.
    pub sha256: String,
    pub size: u64,
    /// The artifact's own version, informational (shown in status and logs).
    pub version: String,
    pub media_type: MediaType,
    /// Lowercase hex sha256 of each chunk's data, in chunk order: one entry per chunk at the
    /// manifest's `chunk_size` (an empty artifact travels as one empty chunk, so it lists the
    /// digest of no bytes). Signed with the rest, so the agent checks each chunk on arrival.
    /// `default` only so that manifests persisted by an older agent still load; every manifest
    /// that is verified must list them all ([`Manifest::validate`]).
    #[serde(default)]
    pub chunk_sha256: Vec<String>,
}

/// When a started deployment counts as healthy: after `messages` messages processed without
/// a trap or error, or `seconds` seconds without one, whichever comes first (0 disables that
/// criterion; both 0 means healthy as soon as it started).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub messages: u32,
    pub seconds: u32,
}

/// What a deployment installs. Travels only inside a [`SignedManifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Protocol version, always [`VERSION`].
    pub v: u8,
    pub deployment_id: String,
    pub target: Target,
    /// Increases with every deployment to the same target; the agent refuses anything not newer
    /// than what it installed (replayed or downgraded manifests).
    pub version: u64,
    pub created_ms: u64,
    /// The agent refuses the manifest after this time (ms since the Unix epoch).
    pub expires_ms: u64,
    pub kind: DeployKind,
    /// The pipeline description (TOML); required for [`DeployKind::Pipeline`].
    pub pipeline_toml: Option<String>,
    /// Data bytes per chunk for every artifact of this deployment. Signed, so the agent can
    /// check each chunk's index, offset and length before the artifact is complete.
    pub chunk_size: u32,
    pub artifacts: Vec<Artifact>,
    pub health: HealthCheck,
}

impl Manifest {
    /// Structural checks that need no local state (version, ids, names, hashes, sizes).
    pub fn validate(&self) -> Result<(), DeployError> {
        let bad = |m: String| Err(DeployError::Malformed(m));
        if self.v != VERSION {
            return bad(format!("unsupported manifest version {}", self.v));
        }
        if validate_message_id(&self.deployment_id).is_err() {
            return bad(format!("invalid deployment id {:?}", self.deployment_id));
        }
        let name = match &self.target {
            Target::Device(d) => d,
            Target::Group(g) => g,
        };
        if validate_device_id(name).is_err() {
            return bad(format!("invalid target {}", self.target));
        }
        if self.expires_ms <= self.created_ms {
            return bad("expires_ms is not after created_ms".into());
        }
        if self.chunk_size == 0 || self.chunk_size as usize > MAX_CHUNK_DATA {
            return bad(format!(
                "chunk_size {} is outside 1..={MAX_CHUNK_DATA}",
                self.chunk_size
            ));
        }
        if self.kind == DeployKind::Pipeline && self.pipeline_toml.is_none() {
            return bad("pipeline deployment without pipeline_toml".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for a in &self.artifacts {
            if a.name.is_empty()
                || a.name.len() > MAX_ARTIFACT_NAME_LEN
                || a.name.chars().any(char::is_control)
            {
                return bad(format!("invalid artifact name {:?}", a.name));
            }
            if !names.insert(a.name.as_str()) {
                return bad(format!("artifact {:?} listed twice", a.name));
            }
            if !is_sha256_hex(&a.sha256) {
                return bad(format!(
                    "artifact {:?} has invalid sha256 {:?}",
                    a.name, a.sha256
                ));
            }
            if a.version.len() > MAX_ARTIFACT_NAME_LEN {
                return bad(format!("artifact {:?} has an overlong version", a.name));
            }
            let chunks = self.chunk_count(a.size);
            if a.chunk_sha256.len() != chunks as usize {
                return bad(format!(
                    "artifact {:?} lists {} chunk digests, but {} bytes at chunk_size {} are \
                     {chunks} chunks",
                    a.name,
                    a.chunk_sha256.len(),
                    a.size,
                    self.chunk_size
                ));
            }
            if let Some(i) = a.chunk_sha256.iter().position(|d| !is_sha256_hex(d)) {
                return bad(format!(
                    "artifact {:?} has an invalid digest for chunk {i}",
                    a.name
                ));
            }
        }
        // A module listed twice travels once, checked against the first listing's digests: a
        // second listing that disagrees would be a signed contradiction.
        for (i, a) in self.artifacts.iter().enumerate() {
            if let Some(b) = self.artifacts[..i].iter().find(|b| b.sha256 == a.sha256)
                && (b.size != a.size || b.chunk_sha256 != a.chunk_sha256)
            {
                return bad(format!(
                    "artifacts {:?} and {:?} have the same sha256 but different sizes or chunk \
                     digests",
                    b.name, a.name
                ));
            }
        }
        Ok(())
    }

    /// Number of chunks an artifact of `size` bytes travels in (at least one, so an empty
    /// artifact still completes).
    pub fn chunk_count(&self, size: u64) -> u32 {
        chunk_count(size, self.chunk_size)
    }

    /// Sum of all artifact sizes.
    pub fn total_bytes(&self) -> u64 {
        self.artifacts.iter().map(|a| a.size).sum()
    }

    pub fn to_json(&self) -> String {
        // Our own plain structs: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Lowercase hex sha256 of each chunk of `bytes` cut at `chunk_size` (clamped to
/// 1..=[`MAX_CHUNK_DATA`], as [`artifact_chunk`] cuts them): an artifact's `chunk_sha256`.
pub fn chunk_digests(bytes: &[u8], chunk_size: u32) -> Vec<String> {
    let cs = (chunk_size as usize).clamp(1, MAX_CHUNK_DATA);
    if bytes.is_empty() {
        return vec![sha256_hex(&[])];
    }
    bytes.chunks(cs).map(sha256_hex).collect()
}

/// Chunks needed for `size` bytes at `chunk_size` data bytes each (at least one).
pub fn chunk_count(size: u64, chunk_size: u32) -> u32 {
    let cs = u64::from(chunk_size.max(1));
    let n = size.div_ceil(cs).max(1);
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A manifest and the signature over its exact JSON bytes, as published on
/// `deploy/manifest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    pub v: u8,
    /// The manifest's JSON, exactly the bytes that were signed.
    pub manifest_json: String,
    /// [`key_id`] of the signing key.
    pub key_id: String,
    /// Hex of the 64-byte ed25519 signature over `manifest_json`'s bytes.
    pub signature: String,
}

impl SignedManifest {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a payload from `deploy/manifest`. A bare manifest (no signature envelope) is
    /// [`DeployError::Unsigned`], anything else that does not parse is `Malformed`.
    pub fn from_json(payload: &[u8]) -> Result<Self, DeployError> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(DeployError::TooLarge {
                size: payload.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        match serde_json::from_slice::<SignedManifest>(payload) {
            Ok(s) => Ok(s),
            Err(e) => {
                if serde_json::from_slice::<Manifest>(payload).is_ok() {
                    Err(DeployError::Unsigned)
                } else {
                    Err(DeployError::Malformed(e.to_string()))
                }
            }
        }
    }

    /// The manifest without checking the signature: only for reporting which deployment a
    /// rejection was about. Never act on it.
    pub fn peek_unverified(&self) -> Option<Manifest> {
        serde_json::from_str(&self.manifest_json).ok()
    }
}

/// Short id of a public key: hex of the first 8 bytes of sha256 over its 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..8])
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// True for 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Parses a public key written as 64 hex digits.
pub fn parse_public_key(hex_key: &str) -> Result<VerifyingKey, DeployError> {
    let err = |detail: &str| DeployError::PublicKey {
        key: hex_key.to_owned(),
        detail: detail.to_owned(),
    };
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_key.trim(), &mut bytes).map_err(|_| err("expected 64 hex digits"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| err("not a valid ed25519 point"))
}

/// Hex of a public key, the form configs and `keygen` use.
pub fn public_key_hex(key: &VerifyingKey) -> String {
    hex::encode(key.as_bytes())
}

/// The public keys an agent accepts manifests from, looked up by [`key_id`].
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(String, VerifyingKey)>,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (key_id(&k), k)).collect(),
        }
    }

    /// From hex strings (the agent config's `trusted_keys`); the error names the bad one.
    pub fn from_hex<S: AsRef<str>>(keys: &[S]) -> Result<Self, DeployError> {
        let parsed = keys
            .iter()
            .map(|k| parse_public_key(k.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedKeys::new(parsed))
    }

    pub fn get(&self, key_id: &str) -> Option<&VerifyingKey> {
        self.keys
            .iter()
            .find(|(id, _)| id == key_id)
            .map(|(_, k)| k)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Serialises and signs `manifest`.
pub fn sign(manifest: &Manifest, key: &SigningKey) -> SignedManifest {
    let manifest_json = manifest.to_json();
    let signature = key.sign(manifest_json.as_bytes());
    SignedManifest {
        v: VERSION,
        manifest_json,
        key_id: key_id(&key.verifying_key()),
        signature: hex::encode(signature.to_bytes()),
    }
}

/// Checks the signature against `trusted` and then the manifest's structure.
pub fn verify(signed: &SignedManifest, trusted: &TrustedKeys) -> Result<Manifest, DeployError> {
    if signed.v != VERSION {
        return Err(DeployError::Malformed(format!(
            "unsupported signed manifest version {}",
            signed.v
        )));
    }
    if signed.signature.is_empty() || signed.key_id.is_empty() {
        return Err(DeployError::Unsigned);
    }
    let key = trusted
        .get(&signed.key_id)
        .ok_or_else(|| DeployError::UnknownKey {
            key_id: signed.key_id.clone(),
        })?;
    let bad = |detail: &str| DeployError::BadSignature {
        key_id: signed.key_id.clone(),
        detail: detail.to_owned(),
    };
    let mut sig = [0u8; 64];
    hex::decode_to_slice(&signed.signature, &mut sig)
        .map_err(|_| bad("signature is not 128 hex digits"))?;
    // verify_strict also refuses weak keys and malleable signatures.
    key.verify_strict(
        signed.manifest_json.as_bytes(),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| bad("signature does not match the manifest"))?;
    let manifest: Manifest = serde_json::from_str(&signed.manifest_json)
        .map_err(|e| DeployError::Malformed(e.to_string()))?;
    manifest.validate()?;
    Ok(manifest)
}

/// One piece of an artifact, published on `deploy/chunk` in a compact binary layout.
///
/// ```text
/// magic "DC" | version u8 | id_len u8 | deployment_id | sha256 32 raw bytes
/// | index u32 | total u32 | offset u64 | data_len u32 | data        (big-endian)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub deployment_id: String,
    /// Lowercase hex sha256 of the whole artifact.
    pub sha256: String,
    pub index: u32,
    pub total: u32,
    pub offset: u64,
    pub data: Vec<u8>,
}

impl Chunk {
    pub fn encode(&self) -> Result<Vec<u8>, DeployError> {
        let bad = |m: &str| DeployError::Chunk(m.to_owned());
        if validate_message_id(&self.deployment_id).is_err() {
            return Err(bad("invalid deployment id"));
        }
        let mut sha = [0u8; 32];
        hex::decode_to_slice(&self.sha256, &mut sha).map_err(|_| bad("invalid sha256"))?;
        if self.data.len() > MAX_CHUNK_DATA {
            return Err(bad("data over the chunk limit"));
        }
        let mut out = Vec::with_capacity(64 + self.deployment_id.len() + self.data.len());
        out.extend_from_slice(CHUNK_MAGIC);
        out.push(VERSION);
        out.push(self.deployment_id.len() as u8);
        out.extend_from_slice(self.deployment_id.as_bytes());
        out.extend_from_slice(&sha);
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.total.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.data);
        Ok(out)
    }

    pub fn decode(payload: &[u8]) -> Result<Self, DeployError> {
        let bad = |m: &str| DeployError::Chunk(m.to_owned());
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(DeployError::TooLarge {
                size: payload.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        let mut r = Reader(payload);
        if r.take(2)? != CHUNK_MAGIC {
            return Err(bad("bad magic"));
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(bad(&format!("unsupported version {version}")));
        }
        let id_len = r.u8()? as usize;
        let deployment_id = String::from_utf8(r.take(id_len)?.to_vec())
            .map_err(|_| bad("deployment id is not utf-8"))?;
        if validate_message_id(&deployment_id).is_err() {
            return Err(bad("invalid deployment id"));
        }
        let sha256 = hex::encode(r.take(32)?);
        let index = r.u32()?;
        let total = r.u32()?;
        let offset = r.u64()?;
        let len = r.u32()? as usize;
        if len > MAX_CHUNK_DATA {
            return Err(bad("data over the chunk limit"));
        }
        let data = r.take(len)?.to_vec();
        if !r.0.is_empty() {
            return Err(bad("trailing bytes"));
        }
        if total == 0 || index >= total {
            return Err(bad("index outside 0..total"));
        }
        Ok(Chunk {
            deployment_id,
            sha256,
            index,
            total,
            offset,
            data,
        })
    }
}

/// Chunk `index` of `bytes` cut at `chunk_size` (clamped to 1..=[`MAX_CHUNK_DATA`]); `None`
/// past the end. Resends use this to rebuild exactly the chunk that was lost.
pub fn artifact_chunk(
    deployment_id: &str,
    sha256: &str,
    bytes: &[u8],
    chunk_size: u32,
    index: u32,
) -> Option<Chunk> {
    let cs = (chunk_size as usize).clamp(1, MAX_CHUNK_DATA);
    let total = chunk_count(bytes.len() as u64, cs as u32);
    if index >= total {
        return None;
    }
    let start = index as usize * cs;
    let end = (start + cs).min(bytes.len());
    Some(Chunk {
        deployment_id: deployment_id.to_owned(),
        sha256: sha256.to_owned(),
        index,
        total,
        offset: start as u64,
        data: bytes.get(start..end)?.to_vec(),
    })
}

/// Cuts an artifact into chunks of `chunk_size` data bytes (clamped to 1..=[`MAX_CHUNK_DATA`]);
/// an empty artifact gives one empty chunk.
pub fn chunk_artifact(deployment_id: &str, bytes: &[u8], chunk_size: u32) -> Vec<Chunk> {
    let sha = sha256_hex(bytes);
    let cs = chunk_size.clamp(1, MAX_CHUNK_DATA as u32);
    (0..chunk_count(bytes.len() as u64, cs))
        .filter_map(|i| artifact_chunk(deployment_id, &sha, bytes, cs, i))
        .collect()
}

/// Agent -> coordinator on `deploy/resend` (inside an `Envelope`): chunks still missing, after
/// a reconnect, a restart or a stall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResendRequest {
    pub deployment_id: String,
    pub artifacts: Vec<MissingChunks>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissingChunks {
    pub sha256: String,
    pub indexes: Vec<u32>,
}

/// Agent -> coordinator on `deploy/status` (inside an `Envelope`, class control).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployStatus {
    /// Empty when a rejected manifest did not even parse.
    pub deployment_id: String,
    pub version: u64,
    pub step: Step,
    /// Chunks of this deployment the agent dropped so far: data that does not match the
    /// signed chunk digest (forged or damaged), a wrong offset or length, an artifact or index
    /// the manifest does not list. None of them fails the deployment; those with a known index
    /// are asked for again. Left out when zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunks_dropped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One step of a deployment on the agent. JSON: `{"state": "downloading", "received": 10,
/// "total": 20}`, `{"state": "rejected", "reason": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Step {
    /// Artifact bytes received so far, of the total still to download.
    Downloading {
        received: u64,
        total: u64,
    },
    Verifying,
    Starting,
    Healthy,
    RolledBack {
        reason: String,
    },
    Failed {
        reason: String,
    },
    Rejected {
        reason: String,
    },
}

impl Step {
    /// True for the steps after which the agent does nothing more for this deployment.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Step::Healthy | Step::RolledBack { .. } | Step::Failed { .. } | Step::Rejected { .. }
        )
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DeployError> {
        if self.0.len() < n {
            return Err(DeployError::Chunk("truncated".into()));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DeployError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DeployError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, DeployError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn manifest() -> Manifest {
        Manifest {
            v: VERSION,
            deployment_id: "dep-1".into(),
            target: Target::Device("d1".into()),
            version: 3,
            created_ms: 1_000,
            expires_ms: 2_000,
            kind: DeployKind::Pipeline,
            pipeline_toml: Some("[stages]\n".into()),
            chunk_size: 4,
            artifacts: vec![Artifact {
                name: "a.wasm".into(),
                sha256: sha256_hex(b"hello"),
                size: 5,
                version: "1.0.0".into(),
                media_type: MediaType::WasmComponent,
                chunk_sha256: chunk_digests(b"hello", 4),
            }],
            health: HealthCheck {
                messages: 10,
                seconds: 30,
            },
        }
    }

    #[test]
    fn sign_then_verify_roundtrips_through_json() {
        let k = key(1);
        let signed = sign(&manifest(), &k);
        let wire = signed.to_json();
        let back = SignedManifest::from_json(&wire).expect("decodes");
        let trusted = TrustedKeys::new([k.verifying_key()]);
        assert_eq!(verify(&back, &trusted).expect("verifies"), manifest());
    }

    #[test]
    fn unsigned_unknown_key_bad_signature_and_malformed_are_distinct() {
        let k = key(1);
        let trusted = TrustedKeys::new([k.verifying_key()]);
        // A bare manifest published without the signature envelope.
        let bare = manifest().to_json();
        assert_eq!(
            SignedManifest::from_json(bare.as_bytes()),
            Err(DeployError::Unsigned)
        );
        let mut signed = sign(&manifest(), &k);
        signed.signature.clear();
        assert_eq!(verify(&signed, &trusted), Err(DeployError::Unsigned));

        let other = sign(&manifest(), &key(2));
        assert!(matches!(
            verify(&other, &trusted),
            Err(DeployError::UnknownKey { .. })
        ));

        let mut tampered = sign(&manifest(), &k);
        tampered.manifest_json = tampered
            .manifest_json
            .replace("\"version\":3", "\"version\":4");
        assert!(matches!(
            verify(&tampered, &trusted),
            Err(DeployError::BadSignature { .. })
        ));
        // Someone else's signature claiming our key id.
        let mut forged = sign(&manifest(), &key(2));
        forged.key_id = key_id(&k.verifying_key());
        assert!(matches!(
            verify(&forged, &trusted),
            Err(DeployError::BadSignature { .. })
        ));

        let mut bad = manifest();
        bad.deployment_id = "has space".into();
        assert!(matches!(
            verify(&sign(&bad, &k), &trusted),
            Err(DeployError::Malformed(_))
        ));
        assert!(matches!(
            SignedManifest::from_json(b"{nope"),
            Err(DeployError::Malformed(_))
        ));
    }

    #[test]
    fn trusted_keys_from_hex_name_the_bad_key() {
        let k = key(1).verifying_key();
        let ok = TrustedKeys::from_hex(&[public_key_hex(&k)]).expect("parses");
        assert!(ok.get(&key_id(&k)).is_some());
        assert_eq!(key_id(&k).len(), 16);
        match TrustedKeys::from_hex(&["zz"]) {
            Err(DeployError::PublicKey { key, .. }) => assert_eq!(key, "zz"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn chunks_cover_the_artifact_and_roundtrip() {
        let bytes: Vec<u8> = (0..10u8).collect();
        let chunks = chunk_artifact("dep-1", &bytes, 4);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2].offset, 8);
        assert_eq!(chunks[2].data, vec![8, 9]);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(joined, bytes);
        for c in &chunks {
            assert_eq!(
                &Chunk::decode(&c.encode().expect("encodes")).expect("decodes"),
                c
            );
        }
        assert_eq!(chunk_artifact("dep-1", b"", 4).len(), 1);
    }

    #[test]
    fn largest_chunk_fits_the_payload_limit() {
        let bytes = vec![7u8; MAX_CHUNK_DATA * 2];
        let id = "x".repeat(64);
        for c in chunk_artifact(&id, &bytes, u32::MAX) {
            assert!(c.encode().expect("encodes").len() <= MAX_PAYLOAD_BYTES);
        }
    }

    #[test]
    fn every_chunk_truncation_or_corruption_is_an_error_not_a_panic() {
        let c = &chunk_artifact("dep-1", b"hello world", 4)[1];
        let bytes = c.encode().expect("encodes");
        for n in 0..bytes.len() {
            assert!(Chunk::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(Chunk::decode(&extra).is_err());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = Chunk::decode(&b);
        }
    }

    #[test]
    fn chunk_digests_roundtrip_and_match_the_chunks() {
        let k = key(1);
        let trusted = TrustedKeys::new([k.verifying_key()]);
        let m = manifest();
        // "hello" at 4 bytes a chunk: "hell" and "o".
        assert_eq!(
            m.artifacts[0].chunk_sha256,
            vec![sha256_hex(b"hell"), sha256_hex(b"o")]
        );
        let back = verify(
            &SignedManifest::from_json(&sign(&m, &k).to_json()).expect("decodes"),
            &trusted,
        )
        .expect("verifies");
        assert_eq!(back.artifacts[0].chunk_sha256, m.artifacts[0].chunk_sha256);
        let json = m.to_json();
        assert!(json.contains("\"chunk_sha256\":["), "{json}");
        for c in chunk_artifact("dep-1", b"hello", m.chunk_size) {
            assert_eq!(
                sha256_hex(&c.data),
                m.artifacts[0].chunk_sha256[c.index as usize]
            );
        }
        // An empty artifact is one empty chunk.
        assert_eq!(chunk_digests(b"", 4), vec![sha256_hex(b"")]);
        assert_eq!(
            chunk_digests(&[1; 10], 0).len(),
            10,
            "clamped like the chunks"
        );
    }

    #[test]
    fn a_chunk_list_that_does_not_match_the_artifact_is_rejected_at_verification() {
        let k = key(1);
        let trusted = TrustedKeys::new([k.verifying_key()]);
        let verify_err = |m: &Manifest| match verify(&sign(m, &k), &trusted) {
            Err(DeployError::Malformed(reason)) => reason,
            other => panic!("expected a malformed manifest, got {other:?}"),
        };
        // One digest short, one too many, none at all (a manifest from before the field).
        let mut m = manifest();
        m.artifacts[0].chunk_sha256.pop();
        assert!(
            verify_err(&m)
                .contains("lists 1 chunk digests, but 5 bytes at chunk_size 4 are 2 chunks")
        );
        let mut m = manifest();
        m.artifacts[0].chunk_sha256.push(sha256_hex(b"x"));
        assert!(verify_err(&m).contains("lists 3 chunk digests"));
        let mut m = manifest();
        m.artifacts[0].chunk_sha256.clear();
        assert!(verify_err(&m).contains("lists 0 chunk digests"));
        let json = manifest().to_json();
        let without: String = {
            let mut v: serde_json::Value = serde_json::from_str(&json).expect("json");
            v["artifacts"][0]
                .as_object_mut()
                .expect("object")
                .remove("chunk_sha256");
            v.to_string()
        };
        let signed = SignedManifest {
            v: VERSION,
            signature: hex::encode(k.sign(without.as_bytes()).to_bytes()),
            manifest_json: without,
            key_id: key_id(&k.verifying_key()),
        };
        assert!(matches!(
            verify(&signed, &trusted),
            Err(DeployError::Malformed(r)) if r.contains("lists 0 chunk digests")
        ));
        // The size says 3 chunks, the list has 2.
        let mut m = manifest();
        m.artifacts[0].size = 9;
        assert!(verify_err(&m).contains("are 3 chunks"));
        // A digest that is not lowercase hex.
        let mut m = manifest();
        m.artifacts[0].chunk_sha256[1] = "XYZ".into();
        assert!(verify_err(&m).contains("invalid digest for chunk 1"));
        // The same module listed twice with different chunk digests.
        let mut m = manifest();
        let mut again = m.artifacts[0].clone();
        again.name = "copy/a.wasm".into();
        again.chunk_sha256.swap(0, 1);
        m.artifacts.push(again);
        assert!(verify_err(&m).contains("same sha256 but different sizes or chunk digests"));
    }

    #[test]
    fn status_json_shape() {
        let mut s = DeployStatus {
            deployment_id: "dep-1".into(),
            version: 3,
            step: Step::Downloading {
                received: 1,
                total: 2,
            },
            chunks_dropped: 0,
        };
        let json = serde_json::to_string(&s).expect("encodes");
        assert!(json.contains("\"state\":\"downloading\""), "{json}");
        // Zero is left out, so a report without drops reads as before.
        assert!(!json.contains("chunks_dropped"), "{json}");
        let back: DeployStatus = serde_json::from_str(&json).expect("decodes");
        assert_eq!(back, s);
        s.chunks_dropped = 3;
        let json = serde_json::to_string(&s).expect("encodes");
        assert!(json.contains("\"chunks_dropped\":3"), "{json}");
        assert_eq!(
            serde_json::from_str::<DeployStatus>(&json).expect("decodes"),
            s
        );
        let target = serde_json::to_string(&Target::Group("lab".into())).expect("encodes");
        assert_eq!(target, "{\"group\":\"lab\"}");
    }

    #[test]
    fn data_artifacts_are_named_beside_their_model() {
        assert_eq!(
            data_artifact_name("models/m.onnx", "m.onnx.data"),
            "models/m.onnx.data"
        );
        assert_eq!(data_artifact_name("m.onnx", "./w/a.bin"), "w/a.bin");
        assert_eq!(data_artifact_name("a/b/m.onnx", "x.bin"), "a/b/x.bin");
        assert_eq!(
            serde_json::to_string(&MediaType::OnnxData).expect("json"),
            "\"onnx-data\""
        );
    }
}
