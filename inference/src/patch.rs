//! Weight patching: replace named initializers of an ONNX model with new tensors (federated
//! learning applies each new global model this way), and read them back.
//!
//! Invariant: everything but the replaced initializers is copied byte for byte. The model is
//! split into raw protobuf fields ([`crate::onnx::raw_fields`]); only the graph's initializer
//! fields are decoded, and only those being replaced are re-encoded. Decoding the whole model
//! through our partial prost structs would silently drop the fields they do not declare.
//! Only the main graph's initializers are patchable (not those inside If/Loop subgraphs).
//! A model with external data files keeps its layout ([`patch_initializers_with_data`]): new
//! weights go into copies of the data files at the same offsets.

use std::collections::BTreeMap;

use prost::Message;

use crate::onnx::{self, GRAPH_INITIALIZER_FIELD, MODEL_GRAPH_FIELD, TensorHead, TensorProto};
use crate::tensor::{DType, Tensor, TensorError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("model is not valid onnx: {0}")]
    Decode(onnx::DecodeError),
    #[error("model has no graph")]
    NoGraph,
    #[error("initializer {name} is not in the model (it has: {available})")]
    UnknownName { name: String, available: String },
    #[error("initializer {name} given twice")]
    Duplicate { name: String },
    #[error("initializer {name}: the model has dtype {expected}, the update has {got}")]
    DType {
        name: String,
        expected: String,
        got: DType,
    },
    #[error("initializer {name}: the model has shape {expected:?}, the update has {got:?}")]
    Shape {
        name: String,
        expected: Vec<i64>,
        got: Vec<u32>,
    },
    #[error("initializer {name}: {source}")]
    Tensor { name: String, source: TensorError },
    #[error("external data: {detail}")]
    External { detail: String },
    #[error("new weights for {name}: {detail}")]
    Source { name: String, detail: String },
}

fn decode_err(e: prost::DecodeError) -> PatchError {
    PatchError::Decode(e.into())
}

/// Returns `model` with each named initializer replaced by its tensor. Names must exist, and
/// dtype and shape must match the initializer being replaced; nothing is written on any error.
pub fn patch_initializers(model: &[u8], updates: &[(&str, Tensor)]) -> Result<Vec<u8>, PatchError> {
    patch_values(model, updates.iter().map(|(name, t)| (*name, t)))
}

/// [`patch_initializers`] over borrowed updates.
fn patch_values<'u>(
    model: &[u8],
    updates: impl IntoIterator<Item = (&'u str, &'u Tensor)>,
) -> Result<Vec<u8>, PatchError> {
    patch_with(
        model,
        updates,
        |init, update| Ok(update.to_onnx(&init.name)),
    )
}

/// [`patch_initializers`] with each replaced initializer encoded by `encode(old head, update)`
/// (after the dtype and shape checks).
fn patch_with<'u, U: Typed + 'u>(
    model: &[u8],
    updates: impl IntoIterator<Item = (&'u str, &'u U)>,
    mut encode: impl FnMut(&TensorHead, &U) -> Result<TensorProto, PatchError>,
) -> Result<Vec<u8>, PatchError> {
    let mut pending: BTreeMap<&str, &U> = BTreeMap::new();
    for (name, t) in updates {
        if pending.insert(name, t).is_some() {
            return Err(PatchError::Duplicate {
                name: name.to_owned(),
            });
        }
    }
    let mut seen_names = Vec::new();
    let mut out = Vec::with_capacity(model.len());
    let mut saw_graph = false;
    for field in onnx::raw_fields(model).map_err(PatchError::Decode)? {
        if field.number != MODEL_GRAPH_FIELD {
            out.extend_from_slice(field.bytes);
            continue;
        }
        saw_graph = true;
        let mut graph = Vec::with_capacity(field.payload.len());
        for g in onnx::raw_fields(field.payload).map_err(PatchError::Decode)? {
            if g.number != GRAPH_INITIALIZER_FIELD {
                graph.extend_from_slice(g.bytes);
                continue;
            }
            // The head only: an initializer that is not replaced is copied as it is, and one
            // that is replaced needs no more (its values are never decoded).
            let init = TensorHead::decode(g.payload).map_err(decode_err)?;
            match pending.remove(init.name.as_str()) {
                Some(update) => {
                    check(&init, update)?;
                    onnx::put_len_field(
                        &mut graph,
                        GRAPH_INITIALIZER_FIELD,
                        &encode(&init, update)?.encode_to_vec(),
                    );
                }
                None => graph.extend_from_slice(g.bytes),
            }
            seen_names.push(init.name);
        }
        onnx::put_len_field(&mut out, MODEL_GRAPH_FIELD, &graph);
    }
    if !saw_graph {
        return Err(PatchError::NoGraph);
    }
    if let Some(name) = pending.keys().next() {
        let mut available = seen_names[..seen_names.len().min(20)].join(", ");
        if seen_names.len() > 20 {
            available.push_str(&format!(", ... ({} in all)", seen_names.len()));
        }
        return Err(PatchError::UnknownName {
            name: (*name).to_owned(),
            available,
        });
    }
    Ok(out)
}

/// The updates of a model with external data files, split: those whose initializer is in a
/// data file (with its entry, the update's bytes checked to fill its extent exactly), and the
/// inline ones. Reads no weights: dtypes and shapes come from the graph's entries.
/// The inline updates are borrowed, not copied: a model of millions of inline weights would
/// otherwise be held once more while it is patched.
type Split<'u> = (
    Vec<(crate::external::DataRef, &'u [u8])>,
    Vec<(&'u str, &'u Tensor)>,
);

fn split_updates<'u>(
    layout: &crate::external::ExternalLayout,
    updates: &'u [(&'u str, Tensor)],
) -> Result<Split<'u>, PatchError> {
    let mut on_disk = Vec::new();
    let mut inline = Vec::new();
    for (name, update) in updates {
        let bytes = update.data();
        match in_data_file(layout, name, update, bytes.len())? {
            Some((r, _)) => on_disk.push((r.clone(), bytes)),
            None => inline.push((*name, update)),
        }
    }
    Ok((on_disk, inline))
}

/// Where the update of initializer `name` goes when that initializer is stored in a data file:
/// its entry and its extent's start, the update checked against the entry (dtype, shape) and its
/// `len` bytes against the extent. `None`: the initializer is not in a data file.
fn in_data_file<'l>(
    layout: &'l crate::external::ExternalLayout,
    name: &str,
    update: &impl Typed,
    len: usize,
) -> Result<Option<(&'l crate::external::DataRef, usize)>, PatchError> {
    let Some((r, entry)) = layout
        .initializers
        .iter()
        .find(|(r, _)| r.initializer == name)
    else {
        return Ok(None);
    };
    check(entry, update)?;
    let (start, _) = crate::external::extent(r)
        .filter(|(s, e)| e - s == len)
        .ok_or_else(|| PatchError::External {
            detail: format!(
                "initializer {name}: {len} bytes do not fill its {} bytes in {}",
                r.length, r.location
            ),
        })?;
    Ok(Some((r, start)))
}

/// [`patch_initializers`] for a model with external data files, keeping its layout: an
/// initializer stored in a data file gets its new bytes at the same offset of a copy of that
/// file (the graph keeps pointing there); an inline one is patched in the graph. Returns the
/// graph and the data files (files without updates are shared, not copied).
/// [`patch_initializers_to_disk`] writes the copies to files instead of memory.
pub fn patch_initializers_with_data(
    graph: &[u8],
    data: &crate::DataFiles,
    updates: &[(&str, Tensor)],
) -> Result<(Vec<u8>, crate::DataFiles), PatchError> {
    let (on_disk, inline) = split_updates(&layout(graph)?, updates)?;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (r, bytes) in on_disk {
        let file = match files.entry(r.location.clone()) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let old = data.get(&r.location).map(|d| d.read_all(&r.location));
                let old = old.transpose().map_err(|e| PatchError::External {
                    detail: e.to_string(),
                })?;
                v.insert(old.map(|b| b.to_vec()).unwrap_or_default())
            }
        };
        let (start, end) = crate::external::extent(&r).unwrap_or_default();
        file.get_mut(start..end)
            .ok_or_else(|| PatchError::External {
                detail: format!("{} is shorter than {}'s extent", r.location, r.initializer),
            })?
            .copy_from_slice(bytes);
    }
    let graph = if inline.is_empty() {
        graph.to_vec()
    } else {
        patch_values(graph, inline)?
    };
    let mut out = data.clone();
    for (location, bytes) in files {
        out.insert(location, bytes.into());
    }
    Ok((graph, out))
}

/// [`patch_initializers_with_data`] with the new weights written into files of `folder`, and
/// returned as files on disk ([`crate::DataFile::OnDisk`]) for ONNX Runtime to map: they are
/// never held in memory as a whole file. Each data file the graph names becomes a copy of the
/// given one (streamed) with the updates written at their offsets; updates of inline
/// initializers go into one more file ([`WEIGHTS_FILE`], each at a page-aligned offset) that
/// the graph then names, so a model without external data is served from a mapped file too.
/// Every file is written under a temporary name and renamed into place, so a session mapping
/// the previous one keeps it.
pub fn patch_initializers_to_disk(
    graph: &[u8],
    data: &crate::DataFiles,
    updates: &[(&str, Tensor)],
    folder: &std::path::Path,
) -> Result<(Vec<u8>, crate::DataFiles), PatchError> {
    struct Given<'a, 'u>(&'a [(&'u str, Tensor)]);
    impl UpdateBytes for Given<'_, '_> {
        fn write(&mut self, i: usize, sink: &mut Sink<'_>) -> Result<(), PatchError> {
            sink(self.0[i].1.data())
        }
    }
    let specs: Vec<UpdateSpec<'_>> = updates
        .iter()
        .map(|(name, t)| UpdateSpec {
            name,
            dtype: t.dtype(),
            shape: t.shape(),
        })
        .collect();
    patch_initializers_to_disk_from(graph, data, &specs, &mut Given(updates), folder)
}

/// An update of [`patch_initializers_to_disk_from`]: what it replaces and its element type and
/// shape; its bytes come from the caller's [`UpdateBytes`].
#[derive(Debug, Clone, Copy)]
pub struct UpdateSpec<'u> {
    pub name: &'u str,
    pub dtype: DType,
    pub shape: &'u [u32],
}

impl UpdateSpec<'_> {
    fn bytes(&self) -> Result<usize, PatchError> {
        crate::tensor::element_count(self.shape)
            .and_then(|n| n.checked_mul(self.dtype.size()))
            .ok_or_else(|| PatchError::Tensor {
                name: self.name.to_owned(),
                source: TensorError::TooLarge(self.shape.to_vec()),
            })
    }
}

/// Where [`UpdateBytes::write`] puts its pieces.
pub type Sink<'s> = dyn FnMut(&[u8]) -> Result<(), PatchError> + 's;

/// The bytes of [`patch_initializers_to_disk_from`]'s updates.
pub trait UpdateBytes {
    /// Hands update `i`'s bytes (little-endian, row-major) to `sink`, a piece at a time.
    /// Called once per update, in the order given.
    fn write(&mut self, i: usize, sink: &mut Sink<'_>) -> Result<(), PatchError>;

    /// Called after the last update's bytes are written and before any file is put in place:
    /// an error (the bytes did not check out as a whole) leaves the previous files as they were.
    fn finish(&mut self) -> Result<(), PatchError> {
        Ok(())
    }
}

/// [`patch_initializers_to_disk`] with the updates' bytes streamed from `bytes`, each straight
/// into its place in its file: the new weights are never in memory as a whole (a federated
/// round's kept chunks are read into the files as they are). Dtypes, shapes and extents are
/// checked before anything is written; each update must get exactly its size.
pub fn patch_initializers_to_disk_from(
    graph: &[u8],
    data: &crate::DataFiles,
    updates: &[UpdateSpec<'_>],
    bytes: &mut dyn UpdateBytes,
    folder: &std::path::Path,
) -> Result<(Vec<u8>, crate::DataFiles), PatchError> {
    use std::os::unix::fs::FileExt;
    const ALIGN: u64 = 4096;
    let external = |detail: String| PatchError::External { detail };
    // One decode of the graph for everything below (it copies every inline value).
    let layout = layout(graph)?;
    let mut files = layout.file_names();
    let data_files = files.len();
    // Where each update's bytes go: (file index, offset, length).
    let mut places = Vec::with_capacity(updates.len());
    // Inline updates: their offsets in WEIGHTS_FILE, in the order given.
    let mut inline: Vec<(&str, &UpdateSpec<'_>, u64)> = Vec::new();
    let mut weights_end = 0u64;
    for (i, u) in updates.iter().enumerate() {
        if updates[..i].iter().any(|o| o.name == u.name) {
            return Err(PatchError::Duplicate {
                name: u.name.to_owned(),
            });
        }
        let len = u.bytes()?;
        match in_data_file(&layout, u.name, u, len)? {
            Some((r, start)) => {
                // `files` lists every location the layout's entries name.
                let file = files
                    .iter()
                    .position(|f| *f == r.location)
                    .ok_or_else(|| external(format!("data file {} is not listed", r.location)))?;
                places.push((file, start as u64, len));
            }
            None => {
                inline.push((u.name, u, weights_end));
                places.push((data_files, weights_end, len));
                weights_end = (weights_end + len as u64).div_ceil(ALIGN) * ALIGN;
            }
        }
    }
    // The graph: each inline update's initializer now points into WEIGHTS_FILE (checked
    // against it first, like the others).
    let graph = if inline.is_empty() {
        graph.to_vec()
    } else {
        if files.iter().any(|n| n == WEIGHTS_FILE) {
            return Err(external(format!(
                "the model already names a data file {WEIGHTS_FILE}"
            )));
        }
        files.push(WEIGHTS_FILE.to_owned());
        patch_with(
            graph,
            inline.iter().map(|&(name, u, _)| (name, u)),
            |init, u| {
                let offset = inline
                    .iter()
                    .find(|(name, ..)| *name == init.name)
                    .map_or(0, |&(.., offset)| offset);
                let entry = |key: &str, value: String| onnx::StringStringEntryProto {
                    key: key.into(),
                    value,
                };
                Ok(TensorProto {
                    name: init.name.clone(),
                    dims: init.dims.clone(),
                    data_type: init.data_type,
                    data_location: onnx::DATA_LOCATION_EXTERNAL,
                    external_data: vec![
                        entry("location", WEIGHTS_FILE.into()),
                        entry("offset", offset.to_string()),
                        entry("length", u.bytes()?.to_string()),
                    ],
                    ..Default::default()
                })
            },
        )?
    };
    // Each file under a temporary name (a data file starts as a copy of the given one), the
    // updates written into their places in the order given, then every file renamed into place.
    let mut written: Vec<(std::path::PathBuf, std::path::PathBuf)> = Vec::new();
    let result = (|| -> Result<(), PatchError> {
        let mut open = Vec::with_capacity(files.len());
        for (k, location) in files.iter().enumerate() {
            let target = folder.join(location);
            let tmp = target.with_file_name(format!(
                ".{}.{}.tmp",
                target
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
                std::process::id()
            ));
            let io = |e: std::io::Error| external(format!("{}: {e}", tmp.display()));
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            let mut file = std::fs::File::create(&tmp).map_err(io)?;
            written.push((tmp.clone(), target));
            if k < data_files {
                let source = data.get(location).ok_or_else(|| {
                    external(format!("data file {location} is not given with the model"))
                })?;
                source.write_to(&mut file).map_err(io)?;
            }
            open.push(file);
        }
        for (i, &(file, offset, len)) in places.iter().enumerate() {
            let (tmp, _) = &written[file];
            let mut at = 0usize;
            bytes.write(i, &mut |piece: &[u8]| {
                if at + piece.len() > len {
                    return Err(external(format!(
                        "initializer {}: more than its {len} bytes given",
                        updates[i].name
                    )));
                }
                open[file]
                    .write_all_at(piece, offset + at as u64)
                    .map_err(|e| external(format!("{}: {e}", tmp.display())))?;
                at += piece.len();
                Ok(())
            })?;
            if at != len {
                return Err(external(format!(
                    "initializer {}: {at} of its {len} bytes given",
                    updates[i].name
                )));
            }
        }
        bytes.finish()?;
        for (tmp, target) in &written {
            std::fs::rename(tmp, target)
                .map_err(|e| external(format!("{}: {e}", target.display())))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for (tmp, _) in &written {
            let _ = std::fs::remove_file(tmp);
        }
        return Err(e);
    }
    let files =
        crate::ModelFiles::open_in(graph, &folder.display().to_string(), folder).map_err(|e| {
            PatchError::External {
                detail: e.to_string(),
            }
        })?;
    Ok((files.graph, files.data))
}

/// The file of [`patch_initializers_to_disk`] that holds the new values of inline initializers.
pub const WEIGHTS_FILE: &str = "patched-weights.bin";

fn layout(graph: &[u8]) -> Result<crate::external::ExternalLayout, PatchError> {
    crate::external::ExternalLayout::of(graph).map_err(|e| PatchError::External {
        detail: e.to_string(),
    })
}

/// An update's element type and shape: what is checked against the initializer it replaces.
trait Typed {
    fn dtype(&self) -> DType;
    fn shape(&self) -> &[u32];
}

impl Typed for Tensor {
    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }
    fn shape(&self) -> &[u32] {
        Tensor::shape(self)
    }
}

impl Typed for UpdateSpec<'_> {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> &[u32] {
        self.shape
    }
}

fn check(init: &TensorHead, update: &impl Typed) -> Result<(), PatchError> {
    if init.data_type != update.dtype().onnx_code() {
        return Err(PatchError::DType {
            name: init.name.clone(),
            expected: DType::from_onnx_code(init.data_type).map_or_else(
                || format!("onnx type {}", init.data_type),
                |d| d.to_string(),
            ),
            got: update.dtype(),
        });
    }
    let same_shape = init.dims.len() == update.shape().len()
        && init
            .dims
            .iter()
            .zip(update.shape())
            .all(|(&a, &b)| a == i64::from(b));
    if !same_shape {
        return Err(PatchError::Shape {
            name: init.name.clone(),
            expected: init.dims.clone(),
            got: update.shape().to_vec(),
        });
    }
    Ok(())
}

/// The main graph's initializers, in file order (e.g. to send the local weights in a
/// federated round).
pub fn read_initializers(model: &[u8]) -> Result<Vec<(String, Tensor)>, PatchError> {
    let mut found = Vec::new();
    for field in onnx::raw_fields(model).map_err(PatchError::Decode)? {
        if field.number != MODEL_GRAPH_FIELD {
            continue;
        }
        for g in onnx::raw_fields(field.payload).map_err(PatchError::Decode)? {
            if g.number != GRAPH_INITIALIZER_FIELD {
                continue;
            }
            let init = TensorProto::decode(g.payload).map_err(decode_err)?;
            let t = Tensor::from_onnx(&init).map_err(|source| PatchError::Tensor {
                name: init.name.clone(),
                source,
            })?;
            found.push((init.name, t));
        }
    }
    Ok(found)
}
