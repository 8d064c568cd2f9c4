//! Models whose weights live in external data files: `m.onnx` holds the graph and `m.onnx.data`
//! the weights, as torch (2.9 and later) writes by default and as ONNX does for any model over
//! 2 GB. Finds the files a graph names, checks every location and extent, and either leaves each
//! file on disk for ONNX Runtime to map or reads it once ([`DataFiles`]).
//!
//! Why not let ONNX Runtime find the files on its own: loading from bytes, it resolves a
//! location against the process's working directory, and loading from a path it trusts the
//! location as written. We check every location first. Then either ONNX Runtime gets the
//! checked folder to map the files from ([`DataFile::OnDisk`], what [`ModelFiles::open`]
//! gives: the weights are held once, in ONNX Runtime's mapping), or the bytes by name
//! ([`DataFile::Bytes`], `AddExternalInitializersFromFilesInMemory`: a deployment's artifacts,
//! weights patched in by a federated round).
//!
//! The external-data keys (`location`, `offset`, `length`, `checksum`) and their meaning are
//! those of the spec, <https://github.com/onnx/onnx/blob/main/docs/ExternalData.md>: `location`
//! is relative to the model file's folder; `offset` defaults to 0; without `length` the
//! tensor's own size is read.
//!
//! Invariant: never reads outside the model's folder (absolute locations, `..`, and symlinks
//! that leave it are refused), and every error names the file and the cause.
//! Boundary: [`crate::Model`] checks every graph against the data it is given; the agent and
//! `check-config` open local files through [`ModelFiles::open`], the coordinator reads them
//! through [`ModelFiles::read`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use prost::Message;

use crate::onnx::{DATA_LOCATION_EXTERNAL, ModelHead, TensorHead, TensorProto, data_type};

/// A model's external data files, by location as the graph writes it.
pub type DataFiles = BTreeMap<String, DataFile>;

/// One external data file: its bytes, or a checked file on disk that is not read.
#[derive(Clone)]
pub enum DataFile {
    /// The file's bytes (a deployment's artifact, weights patched in by a federated round).
    Bytes(Arc<[u8]>),
    /// `folder/location` on disk, checked when it was opened (inside the model's `folder`, a
    /// regular file of `len` bytes) and not read: ONNX Runtime maps it when it builds the
    /// session, so the weights are held once. `folder` is canonical.
    OnDisk {
        folder: PathBuf,
        path: PathBuf,
        len: u64,
    },
}

impl std::fmt::Debug for DataFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataFile::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            DataFile::OnDisk { path, len, .. } => {
                write!(f, "OnDisk({}, {len} bytes)", path.display())
            }
        }
    }
}

impl From<Arc<[u8]>> for DataFile {
    fn from(b: Arc<[u8]>) -> DataFile {
        DataFile::Bytes(b)
    }
}

impl From<Vec<u8>> for DataFile {
    fn from(b: Vec<u8>) -> DataFile {
        DataFile::Bytes(b.into())
    }
}

impl DataFile {
    /// Size in bytes (for a file on disk, as it was when opened).
    pub fn len(&self) -> u64 {
        match self {
            DataFile::Bytes(b) => b.len() as u64,
            DataFile::OnDisk { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole file's bytes (a file on disk is read now).
    pub fn bytes(&self) -> std::io::Result<Arc<[u8]>> {
        match self {
            DataFile::Bytes(b) => Ok(Arc::clone(b)),
            DataFile::OnDisk { path, len, .. } => {
                let mut file = std::fs::File::open(path)?;
                read_exactly(&mut file, *len)
            }
        }
    }

    /// [`DataFile::bytes`], an error naming the file (`location` as the graph writes it).
    pub fn read_all(&self, location: &str) -> Result<Arc<[u8]>, ExternalError> {
        self.bytes().map_err(|e| ExternalError::ReadFile {
            file: match self {
                DataFile::OnDisk { path, .. } => path.display().to_string(),
                DataFile::Bytes(_) => location.to_owned(),
            },
            detail: e.to_string(),
        })
    }

    /// Bytes `start..end` (a file on disk: only that range is read).
    pub fn range(&self, start: usize, end: usize) -> std::io::Result<Cow<'_, [u8]>> {
        let short = || std::io::Error::other(format!("range {start}..{end} is past the end"));
        match self {
            DataFile::Bytes(b) => b.get(start..end).map(Cow::Borrowed).ok_or_else(short),
            DataFile::OnDisk { path, .. } => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; end.checked_sub(start).ok_or_else(short)?];
                std::fs::File::open(path)?.read_exact_at(&mut buf, start as u64)?;
                Ok(Cow::Owned(buf))
            }
        }
    }

    /// Feeds the file's bytes to `sink` (a hasher) without holding the whole file.
    pub fn write_to(&self, sink: &mut impl std::io::Write) -> std::io::Result<()> {
        match self {
            DataFile::Bytes(b) => sink.write_all(b),
            DataFile::OnDisk { path, .. } => {
                std::io::copy(&mut std::fs::File::open(path)?, sink).map(drop)
            }
        }
    }
}

/// Reads `len` bytes from `file` into one buffer allocated once: never a second copy.
fn read_exactly(file: &mut std::fs::File, len: u64) -> std::io::Result<Arc<[u8]>> {
    let len = usize::try_from(len)
        .map_err(|_| std::io::Error::other("larger than this machine's address space"))?;
    // Collecting a `repeat_n` (exact size) allocates the shared buffer once; the file is read
    // straight into it.
    let mut buf: Arc<[u8]> = std::iter::repeat_n(0u8, len).collect();
    let Some(dst) = Arc::get_mut(&mut buf) else {
        return Err(std::io::Error::other("buffer is shared"));
    };
    file.read_exact(dst).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("{e} (the file changed while it was read)"),
        )
    })?;
    Ok(buf)
}

/// One initializer stored outside the model file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRef {
    pub initializer: String,
    /// As written in the graph, relative to the model file's folder.
    pub location: String,
    pub offset: u64,
    /// Bytes; from the entry, or the tensor's size when the entry has none.
    pub length: u64,
}

/// Why a model's external data cannot be used. `file` is a path (files read from disk) or the
/// location as the graph writes it (bytes from a deployment).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExternalError {
    #[error("cannot read model file {file}: {detail}")]
    ReadModel { file: String, detail: String },
    #[error("model file {file} is not an onnx model: {detail}")]
    Graph { file: String, detail: String },
    #[error("initializer {initializer}: bad external data entry: {detail}")]
    Entry { initializer: String, detail: String },
    #[error("initializer {initializer}: external data location {location:?} is refused: {reason}")]
    Location {
        initializer: String,
        location: String,
        reason: String,
    },
    #[error("initializer {initializer}: data file {file} is missing: {detail}")]
    Missing {
        initializer: String,
        file: String,
        detail: String,
    },
    #[error("initializer {initializer}: cannot read data file {file}: {detail}")]
    ReadData {
        initializer: String,
        file: String,
        detail: String,
    },
    #[error("cannot read data file {file}: {detail}")]
    ReadFile { file: String, detail: String },
    #[error(
        "initializer {initializer}: data file {file} is truncated: it has {size} bytes, the \
         initializer needs offset {offset} + length {length}"
    )]
    Truncated {
        initializer: String,
        file: String,
        size: u64,
        offset: u64,
        length: u64,
    },
}

/// A model read from disk: the graph's bytes and every data file it names.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub graph: Vec<u8>,
    pub data: DataFiles,
}

impl ModelFiles {
    /// A model without external data (or whose data the caller adds).
    pub fn graph_only(graph: Vec<u8>) -> ModelFiles {
        ModelFiles {
            graph,
            data: DataFiles::new(),
        }
    }

    /// Reads the model at `path` and the data files its graph names, resolved against the
    /// model's folder (never the working directory). Each data file is read once, straight
    /// into the buffer that ONNX Runtime will use. See [`ModelFiles::open`] for a model that
    /// is only to be loaded.
    pub fn read(path: &Path) -> Result<ModelFiles, ExternalError> {
        ModelFiles::load(path, true)
    }

    /// [`ModelFiles::read`] without reading the data files: each is checked (location, inside
    /// the model's folder, a regular file long enough for every initializer) and left on disk
    /// ([`DataFile::OnDisk`]) for ONNX Runtime to map when the model is loaded, so loading a
    /// model holds its weights once.
    pub fn open(path: &Path) -> Result<ModelFiles, ExternalError> {
        ModelFiles::load(path, false)
    }

    /// [`ModelFiles::open`] for a graph that is not a file (a deployment's artifact, `shown`
    /// in errors) whose data files lie in `folder` as it names them.
    pub fn open_in(
        graph: Vec<u8>,
        shown: &str,
        folder: &Path,
    ) -> Result<ModelFiles, ExternalError> {
        ModelFiles::with_data(graph, shown, folder, false)
    }

    fn load(path: &Path, read: bool) -> Result<ModelFiles, ExternalError> {
        let shown = path.display().to_string();
        let graph = std::fs::read(path).map_err(|e| ExternalError::ReadModel {
            file: shown.clone(),
            detail: e.to_string(),
        })?;
        ModelFiles::with_data(graph, &shown, path.parent().unwrap_or(Path::new(".")), read)
    }

    fn with_data(
        graph: Vec<u8>,
        shown: &str,
        folder: &Path,
        read: bool,
    ) -> Result<ModelFiles, ExternalError> {
        let refs = data_refs(&graph).map_err(|e| match e {
            ExternalError::Graph { detail, .. } => ExternalError::Graph {
                file: shown.to_owned(),
                detail,
            },
            other => other,
        })?;
        let mut data = DataFiles::new();
        for r in &refs {
            if !data.contains_key(&r.location) {
                let file = open_data_file(folder, r, read)?;
                data.insert(r.location.clone(), file);
            }
        }
        check_extents(&refs, &data, |loc| folder.join(loc).display().to_string())?;
        Ok(ModelFiles { graph, data })
    }
}

/// The initializers of `graph` stored in external data files, with each location checked.
pub fn data_refs(graph: &[u8]) -> Result<Vec<DataRef>, ExternalError> {
    ExternalLayout::of(graph).map(|l| l.refs)
}

/// A graph's external data, from one decode of the graph's structure ([`ModelHead`]: inline
/// values are passed over, not copied).
#[derive(Debug, Clone)]
pub struct ExternalLayout {
    /// Every tensor stored outside (initializers and `Constant` values), location checked.
    pub refs: Vec<DataRef>,
    /// The initializers among them, with their graph entries (name, dtype, dims; no values).
    pub initializers: Vec<(DataRef, TensorHead)>,
}

impl ExternalLayout {
    pub fn of(graph: &[u8]) -> Result<ExternalLayout, ExternalError> {
        let model = ModelHead::decode(graph).map_err(|e| ExternalError::Graph {
            file: String::new(),
            detail: e.to_string(),
        })?;
        let Some(g) = model.graph else {
            return Ok(ExternalLayout {
                refs: Vec::new(),
                initializers: Vec::new(),
            });
        };
        let refs = refs_in(&g)?;
        let initializers = refs
            .iter()
            .filter_map(|r| {
                // A `Constant` node's external tensor is not an initializer: nothing to patch.
                let init = g.initializer.iter().find(|t| t.name == r.initializer)?;
                Some((r.clone(), init.clone()))
            })
            .collect();
        Ok(ExternalLayout { refs, initializers })
    }

    /// The data file names (`location`s), sorted, without repeats.
    pub fn file_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.refs.iter().map(|r| r.location.clone()).collect();
        names.sort();
        names.dedup();
        names
    }
}

fn refs_in(g: &crate::onnx::GraphHead) -> Result<Vec<DataRef>, ExternalError> {
    // Initializers, and tensors in the graph's node attributes (a `Constant` node's value may
    // be stored outside too). Subgraphs are not decoded by our `onnx.proto` subset.
    let attributes = g
        .node
        .iter()
        .flat_map(|n| n.attribute.iter().filter_map(|a| a.t.as_ref()))
        .map(TensorProto::head);
    let mut out = Vec::new();
    for t in g.initializer.iter().cloned().chain(attributes) {
        if t.data_location == DATA_LOCATION_EXTERNAL {
            let r = data_ref(&t)?;
            check_location(&r)?;
            out.push(r);
        }
    }
    Ok(out)
}

/// The data file names (`location`s) a graph refers to, sorted, without repeats.
pub fn data_file_names(graph: &[u8]) -> Result<Vec<String>, ExternalError> {
    ExternalLayout::of(graph).map(|l| l.file_names())
}

/// Checks `graph`'s external data against `data` (the files as a deployment or the caller
/// gives them, by location): every file named is there and long enough. Files nobody names
/// are allowed (a package may carry a file two models share).
pub fn check(graph: &[u8], data: &DataFiles) -> Result<Vec<DataRef>, ExternalError> {
    let refs = data_refs(graph)?;
    check_extents(&refs, data, str::to_owned)?;
    Ok(refs)
}

fn check_extents(
    refs: &[DataRef],
    data: &DataFiles,
    show: impl Fn(&str) -> String,
) -> Result<(), ExternalError> {
    for r in refs {
        let Some(bytes) = data.get(&r.location) else {
            return Err(ExternalError::Missing {
                initializer: r.initializer.clone(),
                file: show(&r.location),
                detail: "not given with the model".into(),
            });
        };
        let size = bytes.len();
        if r.offset.checked_add(r.length).is_none_or(|end| end > size) {
            return Err(ExternalError::Truncated {
                initializer: r.initializer.clone(),
                file: show(&r.location),
                size,
                offset: r.offset,
                length: r.length,
            });
        }
    }
    Ok(())
}

fn data_ref(t: &TensorHead) -> Result<DataRef, ExternalError> {
    let bad = |detail: String| ExternalError::Entry {
        initializer: t.name.clone(),
        detail,
    };
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for e in &t.external_data {
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| bad(format!("{} {v:?} is not a byte count", e.key)))
        };
        match e.key.as_str() {
            "location" => location = Some(e.value.clone()),
            "offset" => offset = number(&e.value)?,
            "length" => length = Some(number(&e.value)?),
            // `checksum` (SHA-1, optional) and unknown keys: ONNX Runtime ignores them too.
            _ => {}
        }
    }
    let location = location.ok_or_else(|| bad("no location".into()))?;
    let length = match length {
        Some(l) => l,
        None => tensor_bytes(t).ok_or_else(|| {
            bad(format!(
                "no length, and element type {} has no fixed size",
                t.data_type
            ))
        })?,
    };
    Ok(DataRef {
        initializer: t.name.clone(),
        location,
        offset,
        length,
    })
}

/// Bytes of a dense tensor of a fixed-size element type.
fn tensor_bytes(t: &TensorHead) -> Option<u64> {
    let elem: u64 = match t.data_type {
        data_type::UINT8 | data_type::BOOL | 3 /* int8 */ => 1,
        data_type::FLOAT16 | 4 /* uint16 */ | 5 /* int16 */ | 16 /* bfloat16 */ => 2,
        data_type::FLOAT | data_type::INT32 | 12 /* uint32 */ => 4,
        data_type::INT64 | 11 /* double */ | 13 /* uint64 */ => 8,
        _ => return None,
    };
    t.dims
        .iter()
        .try_fold(elem, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?))
}

/// A location must be a plain relative path inside the model's folder.
fn check_location(r: &DataRef) -> Result<(), ExternalError> {
    let refuse = |reason: &str| {
        Err(ExternalError::Location {
            initializer: r.initializer.clone(),
            location: r.location.clone(),
            reason: reason.to_owned(),
        })
    };
    let loc = r.location.as_str();
    if loc.is_empty() {
        return refuse("it is empty");
    }
    // Windows-style locations would mean something else on another host: refuse them here too.
    if loc.starts_with('/') || loc.starts_with('\\') || loc.contains(':') {
        return refuse("it is absolute; locations are relative to the model's folder");
    }
    if loc.contains('\\') || loc.contains('\0') {
        return refuse("it contains a backslash or a nul byte");
    }
    for c in Path::new(loc).components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return refuse("it contains '..', leaving the model's folder"),
            Component::RootDir | Component::Prefix(_) => {
                return refuse("it is absolute; locations are relative to the model's folder");
            }
        }
    }
    Ok(())
}

/// Opens `folder/location` (refusing a symlink that leads out of `folder`, and anything but a
/// regular file); reads it once when `read`, else leaves it on disk ([`DataFile::OnDisk`]).
fn open_data_file(folder: &Path, r: &DataRef, read: bool) -> Result<DataFile, ExternalError> {
    let path = folder.join(&r.location);
    let file_name = path.display().to_string();
    let missing = |e: std::io::Error| ExternalError::Missing {
        initializer: r.initializer.clone(),
        file: file_name.clone(),
        detail: e.to_string(),
    };
    let real = std::fs::canonicalize(&path).map_err(missing)?;
    let real_folder = std::fs::canonicalize(folder).map_err(missing)?;
    if !real.starts_with(&real_folder) {
        return Err(ExternalError::Location {
            initializer: r.initializer.clone(),
            location: r.location.clone(),
            reason: format!(
                "{file_name} resolves to {}, outside the model's folder {}",
                real.display(),
                real_folder.display()
            ),
        });
    }
    let read_err = |e: std::io::Error| ExternalError::ReadData {
        initializer: r.initializer.clone(),
        file: file_name.clone(),
        detail: e.to_string(),
    };
    let mut file = std::fs::File::open(&real).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(std::io::Error::other("not a regular file")));
    }
    if read {
        return read_exactly(&mut file, meta.len())
            .map(DataFile::Bytes)
            .map_err(read_err);
    }
    // ONNX Runtime opens `folder/location` itself; keep the checked folder, not `real`, so a
    // symlink inside the folder resolves there the same way.
    Ok(DataFile::OnDisk {
        path: real_folder.join(&r.location),
        folder: real_folder,
        len: meta.len(),
    })
}

/// The external initializers of `graph` as tensors, their bytes read from `data` (checked
/// extents), in file order.
pub fn external_tensors(
    graph: &[u8],
    data: &DataFiles,
) -> Result<Vec<(DataRef, crate::Tensor)>, ExternalError> {
    let layout = ExternalLayout::of(graph)?;
    check_extents(&layout.refs, data, str::to_owned)?;
    let mut out = Vec::new();
    for (r, init) in layout.initializers {
        let bad = |detail: String| ExternalError::Entry {
            initializer: r.initializer.clone(),
            detail,
        };
        let file = data
            .get(&r.location)
            .ok_or_else(|| bad("data file vanished".into()))?;
        let (start, end) = extent(&r).ok_or_else(|| bad("extent out of range".into()))?;
        let raw = file
            .range(start, end)
            .map_err(|e| ExternalError::ReadData {
                initializer: r.initializer.clone(),
                file: r.location.clone(),
                detail: e.to_string(),
            })?;
        let inline = TensorProto {
            dims: init.dims,
            data_type: init.data_type,
            name: init.name,
            raw_data: raw.into_owned(),
            ..TensorProto::default()
        };
        let t = crate::Tensor::from_onnx(&inline).map_err(|e| bad(e.to_string()))?;
        out.push((r, t));
    }
    Ok(out)
}

/// `offset..offset + length` as indices (checked against the file by [`check`] before).
pub(crate) fn extent(r: &DataRef) -> Option<(usize, usize)> {
    let start = usize::try_from(r.offset).ok()?;
    let end = start.checked_add(usize::try_from(r.length).ok()?)?;
    Some((start, end))
}

/// `graph` with every external initializer written inline: one self-contained model (the
/// coordinator's evaluation copy of a federated task's model).
pub fn inline(graph: &[u8], data: &DataFiles) -> Result<Vec<u8>, ExternalError> {
    let tensors = external_tensors(graph, data)?;
    let updates: Vec<(&str, crate::Tensor)> = tensors
        .iter()
        .map(|(r, t)| (r.initializer.as_str(), t.clone()))
        .collect();
    crate::patch_initializers(graph, &updates).map_err(|e| ExternalError::Graph {
        file: String::new(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{GraphProto, ModelProto, StringStringEntryProto};

    fn graph_with(location: &str, offset: &str, length: Option<&str>) -> Vec<u8> {
        let mut external = vec![
            StringStringEntryProto {
                key: "location".into(),
                value: location.into(),
            },
            StringStringEntryProto {
                key: "offset".into(),
                value: offset.into(),
            },
        ];
        if let Some(l) = length {
            external.push(StringStringEntryProto {
                key: "length".into(),
                value: l.into(),
            });
        }
        ModelProto {
            ir_version: 8,
            graph: Some(GraphProto {
                initializer: vec![TensorProto {
                    name: "w".into(),
                    dims: vec![2, 3],
                    data_type: data_type::FLOAT,
                    external_data: external,
                    data_location: DATA_LOCATION_EXTERNAL,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn refused(location: &str) -> String {
        match data_refs(&graph_with(location, "0", Some("24"))) {
            Err(e @ ExternalError::Location { .. }) => e.to_string(),
            other => panic!("{location}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn locations_outside_the_folder_are_refused_with_the_reason() {
        assert!(refused("../../etc/passwd").contains("'..'"));
        assert!(refused("a/../../b").contains("'..'"));
        assert!(refused("/etc/passwd").contains("absolute"));
        assert!(refused("C:\\w.bin").contains("absolute"));
        assert!(refused("").contains("empty"));
        let ok = data_refs(&graph_with("sub/./w.bin", "0", Some("24"))).expect("a subfolder");
        assert_eq!(ok.len(), 1);
    }

    #[test]
    fn extents_are_checked_against_the_given_bytes() {
        let g = graph_with("w.bin", "8", None); // 2x3 f32: 24 bytes from offset 8
        let mut data = DataFiles::new();
        data.insert("w.bin".into(), DataFile::from(vec![0u8; 32]));
        let refs = check(&g, &data).expect("fits");
        assert_eq!(refs[0].length, 24);
        data.insert("w.bin".into(), DataFile::from(vec![0u8; 31]));
        let e = check(&g, &data).expect_err("one byte short").to_string();
        assert!(e.contains("w.bin is truncated: it has 31 bytes"), "{e}");
        let e = check(&g, &DataFiles::new())
            .expect_err("no file")
            .to_string();
        assert!(e.contains("data file w.bin is missing"), "{e}");
        let huge = graph_with("w.bin", &u64::MAX.to_string(), Some("24"));
        assert!(matches!(
            check(&huge, &data),
            Err(ExternalError::Truncated { .. })
        ));
        let bad = graph_with("w.bin", "-1", None);
        assert!(matches!(
            check(&bad, &data),
            Err(ExternalError::Entry { .. })
        ));
    }
}
