//! A deployment ready to send: the signed manifest and the artifact bytes its chunks (and any
//! resends) are cut from. The manifest lists the sha256 of every chunk (`chunk_sha256`), so
//! agents drop a forged chunk on arrival; both are cut from the same bytes at the same
//! `chunk_size`, and a spooled package whose digests disagree with its bytes is refused.
//!
//! [`Package::build`] is pure; [`load`] is the I/O around it: it reads the pipeline TOML, finds
//! the artifacts it names (string values ending in `.wasm` or `.onnx`, relative to the TOML's
//! directory), reads them and builds the package. [`load_models`] builds a model deployment
//! (kind `model`): `.onnx` files under the names the running pipeline gives them. Either way
//! each model's external data files (`m.onnx.data`) go with it as artifacts of their own
//! (media type `onnx-data`, [`ModelData`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use protocol::v1::deploy::{
    Artifact, Chunk, DeployError, DeployKind, HealthCheck, Manifest, MediaType, ResendRequest,
    SignedManifest, SigningKey, Target, artifact_chunk, chunk_digests, data_artifact_name,
    sha256_hex, sign,
};
use protocol::v1::{MAX_PAYLOAD_BYTES, VERSION};

/// Errors from building a package; each names the file or artifact.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("pipeline description {path} is not valid TOML: {error}")]
    Toml { path: PathBuf, error: String },
    #[error("artifact {name}: unknown media type (expected a .wasm or .onnx file)")]
    MediaType { name: String },
    #[error(
        "signed manifest is {size} bytes, over the payload limit of {limit} bytes (it lists \
         the sha256 of each of the {chunks} chunks; a larger chunk size, up to {max_chunk} \
         bytes, means fewer)"
    )]
    TooLarge {
        size: usize,
        limit: usize,
        chunks: usize,
        max_chunk: usize,
    },
    #[error("model {name}: a model deployment carries .onnx files only")]
    NotAModel { name: String },
    #[error("model {model}: {error}")]
    ModelData {
        model: String,
        /// Boxed: it is the largest variant by far, and every `Result` carries the size.
        error: Box<edge_inference::ExternalError>,
    },
    #[error(
        "data file {file}: models {first} and {second} name it with different contents; \
         save one of them under another file name"
    )]
    DataConflict {
        file: String,
        first: String,
        second: String,
    },
    #[error("invalid manifest: {0}")]
    Invalid(#[from] DeployError),
    #[error("artifact {name} ({sha256}): {reason}")]
    Artifact {
        name: String,
        sha256: String,
        reason: String,
    },
}

/// What the manifest says besides the artifacts.
#[derive(Debug, Clone)]
pub struct PackageSpec {
    pub deployment_id: String,
    pub target: Target,
    pub version: u64,
    pub now_ms: u64,
    /// How long agents accept the manifest.
    pub ttl_ms: u64,
    pub kind: DeployKind,
    pub pipeline_toml: Option<String>,
    pub chunk_size: u32,
    pub health: HealthCheck,
}

/// One artifact's name (as the pipeline refers to it), version and bytes.
#[derive(Debug, Clone)]
pub struct ArtifactFile {
    pub name: String,
    pub version: String,
    pub bytes: Vec<u8>,
}

/// A built, signed deployment.
#[derive(Debug, Clone)]
pub struct Package {
    pub manifest: Manifest,
    pub signed: SignedManifest,
    /// Artifact bytes by sha256 (a module listed twice is kept and sent once).
    blobs: BTreeMap<String, Vec<u8>>,
}

/// Media type from a file name's extension.
pub fn media_type_for(name: &str) -> Result<MediaType, PackageError> {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".wasm") {
        Ok(MediaType::WasmComponent)
    } else if lower.ends_with(".onnx") {
        Ok(MediaType::Onnx)
    } else {
        Err(PackageError::MediaType {
            name: name.to_owned(),
        })
    }
}

impl Package {
    /// Hashes the artifacts, builds the manifest, checks it and signs it.
    pub fn build(
        spec: PackageSpec,
        files: Vec<ArtifactFile>,
        key: &SigningKey,
    ) -> Result<Package, PackageError> {
        Package::build_with_data(spec, files, Vec::new(), key)
    }

    /// [`Package::build`] with the external data files of its models (media type
    /// `onnx-data`, named by [`data_artifact_name`]; see [`ModelData`]).
    pub fn build_with_data(
        spec: PackageSpec,
        files: Vec<ArtifactFile>,
        data: Vec<ArtifactFile>,
        key: &SigningKey,
    ) -> Result<Package, PackageError> {
        let mut blobs = BTreeMap::new();
        let mut artifacts = Vec::with_capacity(files.len() + data.len());
        let typed = files
            .into_iter()
            .map(|f| Ok((media_type_for(&f.name)?, f)))
            .chain(data.into_iter().map(|f| Ok((MediaType::OnnxData, f))))
            .collect::<Result<Vec<_>, PackageError>>()?;
        for (media_type, f) in typed {
            let sha256 = sha256_hex(&f.bytes);
            artifacts.push(Artifact {
                media_type,
                name: f.name,
                sha256: sha256.clone(),
                size: f.bytes.len() as u64,
                version: f.version,
                chunk_sha256: chunk_digests(&f.bytes, spec.chunk_size),
            });
            blobs.entry(sha256).or_insert(f.bytes);
        }
        let manifest = Manifest {
            v: VERSION,
            deployment_id: spec.deployment_id,
            target: spec.target,
            version: spec.version,
            created_ms: spec.now_ms,
            expires_ms: spec.now_ms.saturating_add(spec.ttl_ms),
            kind: spec.kind,
            pipeline_toml: spec.pipeline_toml,
            chunk_size: spec.chunk_size,
            artifacts,
            health: spec.health,
        };
        manifest.validate()?;
        let signed = sign(&manifest, key);
        check_size(&manifest, &signed)?;
        Ok(Package {
            manifest,
            signed,
            blobs,
        })
    }

    /// A package from a signed manifest and the artifact bytes (a spooled deployment): checks
    /// the manifest's structure and that every artifact it lists is there with the signed
    /// size and sha256. The signature itself is the agents' to check (the coordinator holds no
    /// list of trusted keys).
    pub fn from_signed(
        signed: SignedManifest,
        mut blobs: BTreeMap<String, Vec<u8>>,
    ) -> Result<Package, PackageError> {
        let manifest: Manifest = serde_json::from_str(&signed.manifest_json)
            .map_err(|e| DeployError::Malformed(e.to_string()))?;
        manifest.validate()?;
        check_size(&manifest, &signed)?;
        let bad = |a: &Artifact, reason: String| PackageError::Artifact {
            name: a.name.clone(),
            sha256: a.sha256.clone(),
            reason,
        };
        for a in &manifest.artifacts {
            let Some(bytes) = blobs.get(&a.sha256) else {
                return Err(bad(a, "missing".into()));
            };
            if bytes.len() as u64 != a.size {
                return Err(bad(
                    a,
                    format!("{} bytes, the manifest says {}", bytes.len(), a.size),
                ));
            }
            let actual = sha256_hex(bytes);
            if actual != a.sha256 {
                return Err(bad(a, format!("content has sha256 {actual}")));
            }
            // Agents would drop every chunk that disagrees and the rollout would stall.
            if let Some(i) = chunk_digests(bytes, manifest.chunk_size)
                .iter()
                .zip(&a.chunk_sha256)
                .position(|(actual, signed)| actual != signed)
            {
                return Err(bad(
                    a,
                    format!("chunk {i} does not match the manifest's chunk digest"),
                ));
            }
        }
        blobs.retain(|sha, _| manifest.artifacts.iter().any(|a| &a.sha256 == sha));
        Ok(Package {
            manifest,
            signed,
            blobs,
        })
    }

    /// Distinct artifact bytes by sha256.
    pub fn blobs(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.blobs.iter().map(|(s, b)| (s.as_str(), b.as_slice()))
    }

    /// The payload for `deploy/manifest`.
    pub fn manifest_payload(&self) -> Vec<u8> {
        self.signed.to_json()
    }

    /// Chunk `index` of the artifact with digest `sha256`, if both exist.
    pub fn chunk(&self, sha256: &str, index: u32) -> Option<Chunk> {
        let bytes = self.blobs.get(sha256)?;
        artifact_chunk(
            &self.manifest.deployment_id,
            sha256,
            bytes,
            self.manifest.chunk_size,
            index,
        )
    }

    /// Every chunk of every distinct artifact, in order.
    pub fn chunks(&self) -> impl Iterator<Item = Chunk> + '_ {
        self.blobs.iter().flat_map(move |(sha, bytes)| {
            (0..self.manifest.chunk_count(bytes.len() as u64))
                .filter_map(move |i| self.chunk(sha, i))
        })
    }

    /// The chunks a resend request asks for; unknown digests and indexes are skipped.
    pub fn resend(&self, request: &ResendRequest) -> Vec<Chunk> {
        if request.deployment_id != self.manifest.deployment_id {
            return Vec::new();
        }
        request
            .artifacts
            .iter()
            .flat_map(|m| m.indexes.iter().filter_map(|&i| self.chunk(&m.sha256, i)))
            .collect()
    }

    /// Total chunks to send to one device (distinct artifacts only).
    pub fn chunk_total(&self) -> u32 {
        self.blobs
            .values()
            .map(|b| self.manifest.chunk_count(b.len() as u64))
            .sum()
    }
}

/// Refuses a signed manifest over the payload limit (agents could not take it).
fn check_size(manifest: &Manifest, signed: &SignedManifest) -> Result<(), PackageError> {
    let size = signed.to_json().len();
    if size > MAX_PAYLOAD_BYTES {
        return Err(PackageError::TooLarge {
            size,
            limit: MAX_PAYLOAD_BYTES,
            chunks: manifest
                .artifacts
                .iter()
                .map(|a| a.chunk_sha256.len())
                .sum(),
            max_chunk: protocol::v1::deploy::MAX_CHUNK_DATA,
        });
    }
    Ok(())
}

/// Artifact references in a pipeline description: every string value ending in `.wasm` or
/// `.onnx`, sorted, without repeats.
pub fn artifact_refs(pipeline_toml: &str) -> Result<Vec<String>, toml::de::Error> {
    let value: toml::Value = toml::from_str(pipeline_toml)?;
    let mut out = Vec::new();
    collect_refs(&value, &mut out);
    out.sort();
    Ok(out)
}

fn collect_refs(v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::String(s) if media_type_for(s).is_ok() && !out.contains(s) => {
            out.push(s.clone());
        }
        toml::Value::Array(items) => items.iter().for_each(|i| collect_refs(i, out)),
        toml::Value::Table(t) => t.values().for_each(|i| collect_refs(i, out)),
        _ => {}
    }
}

/// The external data files of the models in a package, as artifacts: each model's files are
/// read and checked beside it (locations, symlinks, extents) before anything is sent, so a
/// model whose data file is missing or short is refused here, naming it.
#[derive(Debug, Default)]
pub struct ModelData {
    /// Artifact name to (the model that first named it, the file).
    files: BTreeMap<String, (String, ArtifactFile)>,
}

impl ModelData {
    /// Adds the data files the model at `path` (named `name` in the package) names.
    pub fn add(&mut self, name: &str, path: &Path) -> Result<(), PackageError> {
        let model = match edge_inference::ModelFiles::read(path) {
            Ok(m) => m,
            // Not a model we can read: the agent refuses it with ONNX Runtime's reason (and
            // a deployment of it rolls back), as for any broken model.
            Err(edge_inference::ExternalError::Graph { .. }) => return Ok(()),
            Err(error) => {
                return Err(PackageError::ModelData {
                    model: name.to_owned(),
                    error: Box::new(error),
                });
            }
        };
        for (location, data) in model.data {
            let file = data_artifact_name(name, &location);
            let bytes = data
                .read_all(&location)
                .map_err(|error| PackageError::ModelData {
                    model: name.to_owned(),
                    error: Box::new(error),
                })?;
            if let Some((first, known)) = self.files.get(&file) {
                if known.bytes[..] != bytes[..] {
                    return Err(PackageError::DataConflict {
                        file,
                        first: first.clone(),
                        second: name.to_owned(),
                    });
                }
                continue;
            }
            let bytes = bytes.to_vec();
            let version = sha256_hex(&bytes)[..12].to_owned();
            self.files.insert(
                file.clone(),
                (
                    name.to_owned(),
                    ArtifactFile {
                        name: file,
                        version,
                        bytes,
                    },
                ),
            );
        }
        Ok(())
    }

    /// The data artifacts, by name.
    pub fn into_files(self) -> Vec<ArtifactFile> {
        self.files.into_values().map(|(_, f)| f).collect()
    }
}

/// Reads `pipeline` and the artifacts it names (relative to its directory), then builds and
/// signs the package. Artifact versions are their digests' first 12 hex digits.
pub fn load(
    pipeline: &Path,
    mut spec: PackageSpec,
    key: &SigningKey,
) -> Result<Package, PackageError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| PackageError::Read {
            path: path.to_owned(),
            error,
        })
    };
    let text = String::from_utf8(read(pipeline)?).map_err(|_| PackageError::Toml {
        path: pipeline.to_owned(),
        error: "not utf-8".into(),
    })?;
    let refs = artifact_refs(&text).map_err(|e| PackageError::Toml {
        path: pipeline.to_owned(),
        error: e.to_string(),
    })?;
    let base = pipeline.parent().unwrap_or(Path::new("."));
    let mut files = Vec::with_capacity(refs.len());
    let mut data = ModelData::default();
    for name in refs {
        let bytes = read(&base.join(&name))?;
        if media_type_for(&name)? == MediaType::Onnx {
            data.add(&name, &base.join(&name))?;
        }
        let version = sha256_hex(&bytes)[..12].to_owned();
        files.push(ArtifactFile {
            name,
            version,
            bytes,
        });
    }
    spec.pipeline_toml = Some(text);
    Package::build_with_data(spec, files, data.into_files(), key)
}

/// Reads each `(name, file)` and builds a signed model deployment: the agent swaps model
/// `name` (the `model =` path of an inference stage) in its running pipeline for the file's
/// bytes, after a health check. Versions are the files' digests' first 12 hex digits.
pub fn load_models(
    models: &[(String, PathBuf)],
    mut spec: PackageSpec,
    key: &SigningKey,
) -> Result<Package, PackageError> {
    let mut files = Vec::with_capacity(models.len());
    let mut data = ModelData::default();
    for (name, path) in models {
        if media_type_for(name).ok() != Some(MediaType::Onnx) {
            return Err(PackageError::NotAModel { name: name.clone() });
        }
        data.add(name, path)?;
        let bytes = std::fs::read(path).map_err(|error| PackageError::Read {
            path: path.clone(),
            error,
        })?;
        files.push(ArtifactFile {
            name: name.clone(),
            version: sha256_hex(&bytes)[..12].to_owned(),
            bytes,
        });
    }
    spec.kind = DeployKind::Model;
    spec.pipeline_toml = None;
    Package::build_with_data(spec, files, data.into_files(), key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::v1::deploy::{MissingChunks, TrustedKeys, verify};

    fn spec() -> PackageSpec {
        PackageSpec {
            deployment_id: "dep-1".into(),
            target: Target::Device("d1".into()),
            version: 1,
            now_ms: 1_000,
            ttl_ms: 60_000,
            kind: DeployKind::Pipeline,
            pipeline_toml: Some("[x]\n".into()),
            chunk_size: 8,
            health: HealthCheck {
                messages: 1,
                seconds: 1,
            },
        }
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[3; 32])
    }

    #[test]
    fn build_signs_what_it_hashes_and_chunks_reassemble() {
        let a: Vec<u8> = (0..50).collect();
        let files = vec![
            ArtifactFile {
                name: "a.wasm".into(),
                version: "1".into(),
                bytes: a.clone(),
            },
            ArtifactFile {
                name: "again/a.wasm".into(),
                version: "1".into(),
                bytes: a.clone(),
            },
        ];
        let p = Package::build(spec(), files, &key()).expect("builds");
        let trusted = TrustedKeys::new([key().verifying_key()]);
        let wire = SignedManifest::from_json(&p.manifest_payload()).expect("decodes");
        let m = verify(&wire, &trusted).expect("verifies");
        assert_eq!(m.artifacts.len(), 2);
        assert_eq!(m.artifacts[0].sha256, sha256_hex(&a));
        // The module listed twice travels once.
        assert_eq!(p.chunk_total(), 7);
        let mut joined = Vec::new();
        for c in p.chunks() {
            let c = Chunk::decode(&c.encode().expect("encodes")).expect("decodes");
            assert_eq!(c.offset as usize, joined.len());
            joined.extend(c.data);
        }
        assert_eq!(joined, a);
        let again = p.resend(&ResendRequest {
            deployment_id: "dep-1".into(),
            artifacts: vec![MissingChunks {
                sha256: sha256_hex(&a),
                indexes: vec![6, 2, 99],
            }],
        });
        assert_eq!(
            again.iter().map(|c| c.index).collect::<Vec<_>>(),
            vec![6, 2]
        );
    }

    #[test]
    fn unknown_media_type_and_oversized_manifest_are_errors() {
        let files = vec![ArtifactFile {
            name: "a.bin".into(),
            version: "1".into(),
            bytes: vec![1],
        }];
        assert!(matches!(
            Package::build(spec(), files, &key()),
            Err(PackageError::MediaType { .. })
        ));
        let mut big = spec();
        big.pipeline_toml = Some("#".repeat(MAX_PAYLOAD_BYTES));
        assert!(matches!(
            Package::build(big, Vec::new(), &key()),
            Err(PackageError::TooLarge { .. })
        ));
    }

    #[test]
    fn the_manifest_lists_every_chunk_digest_and_too_many_chunks_are_refused() {
        let a: Vec<u8> = (0..50).collect();
        let p = Package::build(
            spec(),
            vec![ArtifactFile {
                name: "a.wasm".into(),
                version: "1".into(),
                bytes: a.clone(),
            }],
            &key(),
        )
        .expect("builds");
        let digests = &p.manifest.artifacts[0].chunk_sha256;
        assert_eq!(digests.len(), 7);
        for c in p.chunks() {
            assert_eq!(digests[c.index as usize], sha256_hex(&c.data));
        }
        // 2 MiB at 16-byte chunks: 131,072 digests cannot fit in one manifest; the error
        // says why and what to change.
        let mut tiny = spec();
        tiny.chunk_size = 16;
        let err = Package::build(
            tiny,
            vec![ArtifactFile {
                name: "big.wasm".into(),
                version: "1".into(),
                bytes: vec![0; 2 << 20],
            }],
            &key(),
        )
        .expect_err("too many chunks");
        assert!(
            matches!(
                err,
                PackageError::TooLarge {
                    chunks: 131_072,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("a larger chunk size"), "{err}");
    }

    #[test]
    fn a_spooled_manifest_whose_chunk_digests_disagree_with_the_bytes_is_refused() {
        let a: Vec<u8> = (0..50).collect();
        let p = Package::build(
            spec(),
            vec![ArtifactFile {
                name: "a.wasm".into(),
                version: "1".into(),
                bytes: a.clone(),
            }],
            &key(),
        )
        .expect("builds");
        let blobs: BTreeMap<String, Vec<u8>> =
            p.blobs().map(|(s, b)| (s.to_owned(), b.to_vec())).collect();
        assert!(Package::from_signed(p.signed.clone(), blobs.clone()).is_ok());
        let mut wrong = p.manifest.clone();
        wrong.artifacts[0].chunk_sha256[3] = sha256_hex(b"not chunk 3");
        match Package::from_signed(sign(&wrong, &key()), blobs) {
            Err(PackageError::Artifact { name, reason, .. }) => {
                assert_eq!(name, "a.wasm");
                assert!(reason.contains("chunk 3"), "{reason}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn load_models_builds_a_model_deployment() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("v2.onnx");
        std::fs::write(&file, b"onnx v2").expect("write");
        let p = load_models(&[("models/vad.onnx".into(), file.clone())], spec(), &key())
            .expect("builds");
        assert_eq!(p.manifest.kind, DeployKind::Model);
        assert!(p.manifest.pipeline_toml.is_none());
        assert_eq!(p.manifest.artifacts[0].name, "models/vad.onnx");
        assert_eq!(p.manifest.artifacts[0].media_type, MediaType::Onnx);
        assert!(matches!(
            load_models(&[("features.wasm".into(), file)], spec(), &key()),
            Err(PackageError::NotAModel { .. })
        ));
    }

    #[test]
    fn load_finds_artifacts_named_in_the_pipeline() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("modules")).expect("mkdir");
        std::fs::write(dir.path().join("modules/features.wasm"), b"\0asm1").expect("write");
        std::fs::write(dir.path().join("vad.onnx"), b"onnx").expect("write");
        let toml = "[[stages]]\nname = \"f\"\nmodule = \"modules/features.wasm\"\n\
                    [[stages]]\nname = \"g\"\nmodule = \"modules/features.wasm\"\n\
                    [inference]\nmodel = \"vad.onnx\"\n";
        let path = dir.path().join("pipeline.toml");
        std::fs::write(&path, toml).expect("write");
        let p = load(&path, spec(), &key()).expect("loads");
        let names: Vec<&str> = p
            .manifest
            .artifacts
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        assert_eq!(names, vec!["modules/features.wasm", "vad.onnx"]);
        assert_eq!(p.manifest.artifacts[1].media_type, MediaType::Onnx);
        assert_eq!(p.manifest.pipeline_toml.as_deref(), Some(toml));

        std::fs::remove_file(dir.path().join("vad.onnx")).expect("rm");
        match load(&path, spec(), &key()) {
            Err(PackageError::Read { path, .. }) => assert!(path.ends_with("vad.onnx")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_models_external_data_file_travels_beside_it_or_the_package_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("models")).expect("mkdir");
        for f in ["torch_mlp.onnx", "torch_mlp.onnx.data"] {
            std::fs::copy(
                edge_testmodels::exported_path(f),
                dir.path().join("models").join(f),
            )
            .expect("copy fixture");
        }
        let toml =
            "[[stage]]\nname = \"m\"\nkind = \"inference\"\nmodel = \"models/torch_mlp.onnx\"\n";
        let path = dir.path().join("pipeline.toml");
        std::fs::write(&path, toml).expect("write");
        let big_chunks = || PackageSpec {
            chunk_size: 16 * 1024,
            ..spec()
        };
        let p = load(&path, big_chunks(), &key()).expect("loads");
        let listed: Vec<(&str, MediaType)> = p
            .manifest
            .artifacts
            .iter()
            .map(|a| (a.name.as_str(), a.media_type))
            .collect();
        assert_eq!(
            listed,
            vec![
                ("models/torch_mlp.onnx", MediaType::Onnx),
                ("models/torch_mlp.onnx.data", MediaType::OnnxData),
            ]
        );
        let data = std::fs::read(dir.path().join("models/torch_mlp.onnx.data")).expect("read");
        assert_eq!(p.manifest.artifacts[1].sha256, sha256_hex(&data));

        std::fs::remove_file(dir.path().join("models/torch_mlp.onnx.data")).expect("rm");
        let e = load(&path, big_chunks(), &key()).expect_err("data file missing");
        assert!(
            matches!(&e, PackageError::ModelData { model, .. } if model == "models/torch_mlp.onnx")
                && e.to_string().contains("torch_mlp.onnx.data is missing"),
            "{e}"
        );
    }
}
