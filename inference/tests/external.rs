//! Models with weights in external data files, as torch's default export writes them
//! (`inference/testmodels/exported/torch_{mlp,cnn}.onnx` + `.onnx.data`), on the real ONNX
//! Runtime: they load and give torch's own numbers, and every bad file layout a user can make
//! is refused with an error naming the file and the cause.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::runtime;
use edge_inference::{ExternalError, Model, ModelError, ModelFiles, Tensor};
use edge_testmodels::exported_path;

/// torch's scores for digits row 0, as `make_torch_external.py` recorded them.
fn torch_scores(model: &str) -> Vec<f32> {
    let text = std::fs::read_to_string(exported_path("torch_external_layout.txt")).unwrap();
    let prefix = format!("{model} scores row 0: [");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .expect("scores line");
    line.trim_end_matches(']')
        .split(", ")
        .map(|v| v.parse().unwrap())
        .collect()
}

/// Digits row 0 (pixel values / 16), from the committed data set.
fn digits_row0() -> Vec<f32> {
    let gz = std::fs::read(common::root().join("tests/data/digits.csv.gz")).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
    let first = text.lines().next().unwrap();
    first
        .split(',')
        .take(64)
        .map(|v| v.parse::<f32>().unwrap() / 16.0)
        .collect()
}

/// A folder holding a copy of one fixture pair, to break in the ways a user would.
fn copy_pair(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join(name);
    std::fs::copy(exported_path(name), &model).unwrap();
    let data = format!("{name}.data");
    std::fs::copy(exported_path(&data), dir.path().join(&data)).unwrap();
    (dir, model)
}

/// Loads the model at `path` both ways: data files left on disk for ONNX Runtime to map
/// (`ModelFiles::open`, the agent's local models) and read into memory (`ModelFiles::read`, the
/// coordinator). The two must agree: both load (each is returned, mapped first), or both fail
/// with the same error.
fn load(path: &Path) -> Result<Vec<Model>, String> {
    let each = [ModelFiles::open(path), ModelFiles::read(path)].map(|files| {
        let files = files.map_err(|e| e.to_string())?;
        Model::load_with_data(&runtime(), "m", "1", &files.graph, &files.data)
            .map_err(|e| e.to_string())
    });
    match each {
        [Ok(a), Ok(b)] => Ok(vec![a, b]),
        [Err(a), Err(b)] => {
            assert_eq!(a, b, "open and read fail alike");
            Err(a)
        }
        [a, b] => panic!(
            "open and read disagree: {:?} / {:?}",
            a.map(drop),
            b.map(drop)
        ),
    }
}

#[test]
fn open_leaves_the_data_on_disk_and_read_reads_it() {
    let path = exported_path("torch_mlp.onnx");
    let opened = ModelFiles::open(&path).unwrap();
    let read = ModelFiles::read(&path).unwrap();
    let on_disk = &opened.data["torch_mlp.onnx.data"];
    let in_memory = &read.data["torch_mlp.onnx.data"];
    assert!(
        matches!(on_disk, edge_inference::DataFile::OnDisk { .. }),
        "{on_disk:?}"
    );
    assert!(
        matches!(in_memory, edge_inference::DataFile::Bytes(_)),
        "{in_memory:?}"
    );
    assert_eq!(on_disk.len(), in_memory.len());
    assert_eq!(on_disk.bytes().unwrap()[..], in_memory.bytes().unwrap()[..]);
    assert_eq!(
        on_disk.range(8, 40).unwrap()[..],
        in_memory.range(8, 40).unwrap()[..]
    );
    let end = on_disk.len() as usize;
    assert!(on_disk.range(end - 4, end + 4).is_err(), "past the end");
}

#[test]
fn torch_default_exports_load_and_give_torchs_numbers() {
    let x = digits_row0();
    for (name, shape) in [("torch_mlp", vec![1, 64]), ("torch_cnn", vec![1, 1, 8, 8])] {
        // Loaded from another working directory's point of view: only the model's folder counts.
        for m in load(&exported_path(&format!("{name}.onnx"))).unwrap() {
            let out = m
                .run(&[Tensor::from_f32(shape.clone(), &x).unwrap()])
                .unwrap();
            let got = out[0].to_f32().unwrap();
            let want = torch_scores(name);
            assert_eq!(got.len(), want.len(), "{name}");
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{name}: {got:?} vs torch {want:?}");
            }
            assert!(
                m.size_bytes()
                    > std::fs::metadata(exported_path(&format!("{name}.onnx.data")))
                        .unwrap()
                        .len() as usize
            );
        }
    }
}

#[test]
fn the_graph_alone_is_refused_naming_the_data_file() {
    let bytes = std::fs::read(exported_path("torch_mlp.onnx")).unwrap();
    let e = Model::load(&runtime(), "m", "1", &bytes).unwrap_err();
    assert!(
        matches!(
            &e,
            ModelError::ExternalData {
                source: ExternalError::Missing { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("data file torch_mlp.onnx.data is missing"),
        "{e}"
    );
}

#[test]
fn a_missing_data_file_is_named() {
    let (dir, model) = copy_pair("torch_mlp.onnx");
    std::fs::remove_file(dir.path().join("torch_mlp.onnx.data")).unwrap();
    let e = load(&model).unwrap_err();
    assert!(e.contains("torch_mlp.onnx.data is missing"), "{e}");
    assert!(
        e.contains(&dir.path().display().to_string()),
        "names the path: {e}"
    );
}

#[test]
fn a_truncated_data_file_is_named_with_the_extent() {
    let (dir, model) = copy_pair("torch_mlp.onnx");
    let data = dir.path().join("torch_mlp.onnx.data");
    let len = std::fs::metadata(&data).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(len - 4)
        .unwrap();
    let e = load(&model).unwrap_err();
    assert!(e.contains("torch_mlp.onnx.data is truncated"), "{e}");
    assert!(e.contains(&format!("it has {} bytes", len - 4)), "{e}");
}

/// Rewrites the location string in the graph to another of the same length (so the protobuf
/// stays valid): what a hand-edited or hostile model file looks like.
fn with_location(model: &Path, location: &str) {
    let old = b"torch_mlp.onnx.data";
    assert_eq!(location.len(), old.len());
    let mut bytes = std::fs::read(model).unwrap();
    let mut hits = 0;
    let mut i = 0;
    while i + old.len() <= bytes.len() {
        if &bytes[i..i + old.len()] == old {
            bytes[i..i + old.len()].copy_from_slice(location.as_bytes());
            hits += 1;
        }
        i += 1;
    }
    assert!(hits > 0);
    std::fs::write(model, bytes).unwrap();
}

#[test]
fn locations_leaving_the_models_folder_are_refused() {
    for (location, cause) in [
        ("../../../etc/passwd", "'..'"),
        ("/torch_mlp.onnx.dat", "absolute"),
    ] {
        let (_dir, model) = copy_pair("torch_mlp.onnx");
        with_location(&model, location);
        let e = load(&model).unwrap_err();
        assert!(e.contains(location) && e.contains(cause), "{location}: {e}");
    }
}

#[test]
fn a_symlink_out_of_the_folder_is_refused_and_one_inside_is_followed() {
    let (dir, model) = copy_pair("torch_mlp.onnx");
    let data = dir.path().join("torch_mlp.onnx.data");
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().join("weights.bin");
    std::fs::rename(&data, &outside).unwrap();
    std::os::unix::fs::symlink(&outside, &data).unwrap();
    let e = load(&model).unwrap_err();
    assert!(e.contains("outside the model's folder"), "{e}");

    std::fs::remove_file(&data).unwrap();
    std::fs::rename(&outside, dir.path().join("real.bin")).unwrap();
    std::os::unix::fs::symlink("real.bin", &data).unwrap();
    load(&model).unwrap();
}

#[test]
fn inlined_and_patched_models_keep_torchs_numbers_and_the_layout() {
    let files = ModelFiles::read(&exported_path("torch_mlp.onnx")).unwrap();
    let x = Tensor::from_f32(vec![1, 64], &digits_row0()).unwrap();
    let want = torch_scores("torch_mlp");
    let close = |got: &[f32], want: &[f32]| got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-4);

    // Inline: one self-contained model, same numbers.
    let inline = edge_inference::external::inline(&files.graph, &files.data).unwrap();
    let m = Model::load(&runtime(), "inline", "1", &inline).unwrap();
    let got = m.run(std::slice::from_ref(&x)).unwrap()[0]
        .to_f32()
        .unwrap();
    assert!(close(&got, &want), "{got:?} vs {want:?}");

    // Patch every external initializer with itself doubled: the graph is untouched, the data
    // file has the new values at the same offsets, the result is what the doubled net gives.
    let ext = edge_inference::external::external_tensors(&files.graph, &files.data).unwrap();
    assert_eq!(
        ext.len(),
        2,
        "torch put both weight matrices in the data file"
    );
    let doubled: Vec<(String, Tensor)> = ext
        .iter()
        .map(|(r, t)| {
            let v: Vec<f32> = t.to_f32().unwrap().iter().map(|v| v * 2.0).collect();
            (
                r.initializer.clone(),
                Tensor::from_f32(t.shape().to_vec(), &v).unwrap(),
            )
        })
        .collect();
    let updates: Vec<(&str, Tensor)> = doubled
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let (graph, data) =
        edge_inference::patch_initializers_with_data(&files.graph, &files.data, &updates).unwrap();
    assert_eq!(
        graph, files.graph,
        "the graph keeps pointing at the data file"
    );
    let new = &data["torch_mlp.onnx.data"];
    let old = &files.data["torch_mlp.onnx.data"];
    assert_eq!(new.len(), old.len());
    for (r, t) in &ext {
        let (s, e) = (r.offset as usize, (r.offset + r.length) as usize);
        let before: Vec<f32> = old
            .range(s, e)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let after: Vec<f32> = new
            .range(s, e)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(before, t.to_f32().unwrap());
        assert!(before.iter().zip(&after).all(|(b, a)| *a == b * 2.0));
    }
    let patched = Model::load_with_data(&runtime(), "p", "1", &graph, &data).unwrap();
    let got = patched.run(std::slice::from_ref(&x)).unwrap()[0]
        .to_f32()
        .unwrap();
    assert!(!close(&got, &want), "new weights change the scores");

    // The same updates on the inline copy give the same numbers.
    let inline_patched = edge_inference::patch_initializers(&inline, &updates).unwrap();
    let m = Model::load(&runtime(), "ip", "1", &inline_patched).unwrap();
    let want2 = m.run(std::slice::from_ref(&x)).unwrap()[0]
        .to_f32()
        .unwrap();
    assert!(close(&got, &want2), "{got:?} vs {want2:?}");

    // The same updates written to disk, from the data file left on disk: the same bytes, in a
    // file of the given folder that ONNX Runtime maps, the same numbers; a second patch renames
    // a new file over it, and a session on the first keeps its weights.
    let opened = ModelFiles::open(&exported_path("torch_mlp.onnx")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (graph_d, data_d) = edge_inference::patch_initializers_to_disk(
        &opened.graph,
        &opened.data,
        &updates,
        dir.path(),
    )
    .unwrap();
    assert_eq!(graph_d, files.graph);
    let written = &data_d["torch_mlp.onnx.data"];
    assert!(
        matches!(written, edge_inference::DataFile::OnDisk { .. }),
        "{written:?}"
    );
    assert_eq!(written.bytes().unwrap()[..], new.bytes().unwrap()[..]);
    let on_disk = Model::load_with_data(&runtime(), "d", "1", &graph_d, &data_d).unwrap();
    let run = |m: &Model| {
        m.run(std::slice::from_ref(&x)).unwrap()[0]
            .to_f32()
            .unwrap()
    };
    assert!(close(&run(&on_disk), &got));
    edge_inference::patch_initializers_to_disk(&opened.graph, &opened.data, &[], dir.path())
        .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("torch_mlp.onnx.data")).unwrap(),
        std::fs::read(exported_path("torch_mlp.onnx.data")).unwrap(),
        "no updates: a copy of the file"
    );
    assert!(
        close(&run(&on_disk), &got),
        "the first session kept its file"
    );

    // A wrong shape is refused and nothing is written.
    let bad = Tensor::from_f32(vec![1], &[0.0]).unwrap();
    let e = edge_inference::patch_initializers_with_data(
        &files.graph,
        &files.data,
        &[(ext[0].0.initializer.as_str(), bad.clone())],
    );
    assert!(e.is_err());
    let empty = tempfile::tempdir().unwrap();
    let e = edge_inference::patch_initializers_to_disk(
        &opened.graph,
        &opened.data,
        &[(ext[0].0.initializer.as_str(), bad)],
        empty.path(),
    );
    assert!(e.is_err());
    assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
}

/// A model without external data (torch's TorchScript export, weights inline): patched to
/// disk, its new values go into one file the graph then names, mapped by ONNX Runtime; the
/// numbers are those of the same patch made in memory.
#[test]
fn an_inline_model_patched_to_disk_gives_the_in_memory_patchs_numbers() {
    let graph = edge_testmodels::exported("torch_gemm.onnx");
    let halved: Vec<(String, Tensor)> = edge_inference::read_initializers(&graph)
        .unwrap()
        .into_iter()
        .filter_map(|(n, t)| {
            let v: Vec<f32> = t.to_f32()?.iter().map(|v| v * 0.5).collect();
            Some((n, Tensor::from_f32(t.shape().to_vec(), &v).unwrap()))
        })
        .collect();
    assert!(halved.len() >= 2, "weights and biases");
    let updates: Vec<(&str, Tensor)> = halved
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let (g, data) = edge_inference::patch_initializers_to_disk(
        &graph,
        &edge_inference::DataFiles::new(),
        &updates,
        dir.path(),
    )
    .unwrap();
    assert!(g.len() < graph.len(), "the values left the graph");
    let file = &data[edge_inference::WEIGHTS_FILE];
    assert!(
        matches!(file, edge_inference::DataFile::OnDisk { .. }),
        "{file:?}"
    );
    let in_memory = edge_inference::patch_initializers(&graph, &updates).unwrap();
    let x = Tensor::from_f32(vec![1, 64], &digits_row0()).unwrap();
    let run = |m: Model| {
        m.run(std::slice::from_ref(&x)).unwrap()[0]
            .to_f32()
            .unwrap()
    };
    let want = run(Model::load(&runtime(), "mem", "1", &in_memory).unwrap());
    let got = run(Model::load_with_data(&runtime(), "disk", "1", &g, &data).unwrap());
    assert_eq!(got.len(), want.len());
    assert!(
        got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5),
        "{got:?} vs {want:?}"
    );
}

/// The bytes of each update handed over in pieces, as a federated round's kept chunks are;
/// `short`/`long` give one update too few or too many bytes, `refuse` fails the final check.
struct Pieces<'a> {
    updates: &'a [(&'a str, Tensor)],
    piece: usize,
    short: bool,
    long: bool,
    refuse: bool,
}

impl<'a> Pieces<'a> {
    fn of(updates: &'a [(&'a str, Tensor)]) -> Pieces<'a> {
        Pieces {
            updates,
            piece: 1000,
            short: false,
            long: false,
            refuse: false,
        }
    }
}

impl edge_inference::UpdateBytes for Pieces<'_> {
    fn write(
        &mut self,
        i: usize,
        sink: &mut edge_inference::Sink<'_>,
    ) -> Result<(), edge_inference::PatchError> {
        let data = self.updates[i].1.data();
        let data = if self.short { &data[4..] } else { data };
        for p in data.chunks(self.piece) {
            sink(p)?;
        }
        if self.long {
            sink(&[0; 4])?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), edge_inference::PatchError> {
        if self.refuse {
            return Err(edge_inference::PatchError::Source {
                name: "all".into(),
                detail: "the digest does not match".into(),
            });
        }
        Ok(())
    }
}

fn borrowed(u: &[(String, Tensor)]) -> Vec<(&str, Tensor)> {
    u.iter().map(|(n, t)| (n.as_str(), t.clone())).collect()
}

fn files_in(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// A patch streamed in pieces (how an agent applies a round's kept chunks) writes the same
/// graph and files as the patch of whole tensors, for a model with a data file and for one with
/// its weights inline; one that gets too few or too many bytes for an update, or whose source
/// refuses the whole at the end, leaves the last patch's files in place and no temporary file.
#[test]
fn a_patch_streamed_in_pieces_writes_what_whole_tensors_do_or_nothing() {
    for model in ["torch_mlp.onnx", "torch_gemm.onnx"] {
        let opened = ModelFiles::open(&exported_path(model)).unwrap();
        let all = edge_inference::external::inline(&opened.graph, &opened.data).unwrap();
        let scaled = |k: f32| -> Vec<(String, Tensor)> {
            edge_inference::read_initializers(&all)
                .unwrap()
                .into_iter()
                .filter_map(|(n, t)| {
                    let v: Vec<f32> = t.to_f32()?.iter().map(|v| v * k).collect();
                    Some((n, Tensor::from_f32(t.shape().to_vec(), &v).unwrap()))
                })
                .collect()
        };
        let (doubled, zeroed) = (scaled(2.0), scaled(0.0));
        let (doubled, zeroed) = (borrowed(&doubled), borrowed(&zeroed));
        assert!(doubled.len() >= 4, "{model}: weights and biases");
        let specs: Vec<edge_inference::UpdateSpec<'_>> = doubled
            .iter()
            .map(|(name, t)| edge_inference::UpdateSpec {
                name,
                dtype: t.dtype(),
                shape: t.shape(),
            })
            .collect();
        let whole = tempfile::tempdir().unwrap();
        let (g1, _) = edge_inference::patch_initializers_to_disk(
            &opened.graph,
            &opened.data,
            &doubled,
            whole.path(),
        )
        .unwrap();
        let streamed = tempfile::tempdir().unwrap();
        let patch = |bytes: &mut Pieces<'_>| {
            edge_inference::patch_initializers_to_disk_from(
                &opened.graph,
                &opened.data,
                &specs,
                bytes,
                streamed.path(),
            )
        };
        let (g2, _) = patch(&mut Pieces::of(&doubled)).unwrap();
        assert_eq!(g1, g2, "{model}");
        let patched = files_in(streamed.path());
        assert_eq!(files_in(whole.path()), patched, "{model}");

        for (what, mut bytes, says) in [
            (
                "short",
                Pieces {
                    short: true,
                    ..Pieces::of(&zeroed)
                },
                "bytes given",
            ),
            (
                "long",
                Pieces {
                    long: true,
                    ..Pieces::of(&zeroed)
                },
                "more than its",
            ),
            (
                "refused",
                Pieces {
                    refuse: true,
                    ..Pieces::of(&zeroed)
                },
                "the digest does not match",
            ),
        ] {
            let e = patch(&mut bytes).expect_err(what).to_string();
            assert!(e.contains(says), "{model} {what}: {e}");
            assert_eq!(files_in(streamed.path()), patched, "{model} {what}");
        }
    }
}
