//! Inference stages in real pipelines: ONNX models built in Rust (`onnx_builder`) written to a
//! temp dir, the workspace's ONNX Runtime library, real outbox and state database. Bad input
//! (wrong shape, wrong dtype, NaN) fails one frame and the pipeline keeps running.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use edge_agent::inference::Inference;
use edge_agent::pipeline::run_start;
use edge_agent::pipeline::{Deps, LocalFiles, Mode, Origin, Pipeline, PipelineError, PipelineSpec};
use edge_agent::sandbox::SandboxConfig;
use edge_inference::onnx::GraphProto;
use edge_inference::{DType, InferenceConfig, Provider};
use edge_testmodels::onnx_builder::{self, attr_int, node, value_info};
use protocol::v1::{Class, PipelineTelemetry};

struct Fixture {
    deps: Deps,
    dir: tempfile::TempDir,
}

fn inference() -> Inference {
    let inf = Inference::new(&InferenceConfig {
        library: Some(common::ort_library()),
        providers: vec![Provider::Cpu],
        intra_threads: 1,
        reject_non_finite: true,
    });
    assert!(inf.status().available, "{:?}", inf.status());
    inf
}

fn fixture_with(inference: Inference) -> Fixture {
    let dir = tempfile::tempdir().expect("tmp");
    Fixture {
        deps: common::pipeline_deps(dir.path(), &SandboxConfig::default(), inference),
        dir,
    }
}

fn fixture() -> Fixture {
    fixture_with(inference())
}

/// `y = 2x + 1` on `[N, 4]`.
fn double_plus_one() -> Vec<u8> {
    let mut w = vec![0.0; 16];
    for i in 0..4 {
        w[i * 4 + i] = 2.0;
    }
    onnx_builder::linear(4, 4, &w, &[1.0; 4])
}

/// `y = sqrt(x)` on `[N, 4]`: finite on the zero probe, NaN for negative input.
fn sqrt_model() -> Vec<u8> {
    onnx_builder::model(GraphProto {
        name: "sqrt".into(),
        node: vec![node("Sqrt", &["x"], &["y"], vec![])],
        input: vec![value_info("x", DType::F32, &[-1, 4])],
        output: vec![value_info("y", DType::F32, &[-1, 4])],
        ..Default::default()
    })
}

/// `y = int64(x)` on `[N, 4]`.
fn cast_to_i64() -> Vec<u8> {
    onnx_builder::model(GraphProto {
        name: "cast".into(),
        node: vec![node("Cast", &["x"], &["y"], vec![attr_int("to", 7)])],
        input: vec![value_info("x", DType::F32, &[-1, 4])],
        output: vec![value_info("y", DType::I64, &[-1, 4])],
        ..Default::default()
    })
}

impl Fixture {
    fn write(&self, name: &str, bytes: &[u8]) {
        let path = self.dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(path, bytes).expect("write");
    }

    async fn start(&self, toml: &str) -> Result<Pipeline, PipelineError> {
        let spec = PipelineSpec::parse(toml).expect("valid description");
        let files = LocalFiles {
            dir: self.dir.path().to_owned(),
        };
        run_start(
            spec,
            Box::new(files),
            self.deps.clone(),
            Mode::Live,
            Origin::default(),
        )
        .await
    }

    /// Published f32 tensors: (stream, shape, values).
    fn outbox_tensors(&self) -> Vec<(String, Vec<u64>, Vec<f32>)> {
        let mut out = Vec::new();
        let mut cursor = None;
        while let Some(s) = self
            .deps
            .outbox
            .next_in_class(Class::Results, cursor)
            .expect("read outbox")
        {
            cursor = Some(s.key.seq);
            let body: serde_json::Value = serde_json::from_slice(&s.record.body).expect("json");
            let t = &body["payload"]["tensor"];
            assert_eq!(t["dtype"], "f32", "{body}");
            let data = base64::engine::general_purpose::STANDARD
                .decode(t["data_b64"].as_str().expect("data"))
                .expect("base64");
            let values = data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let shape = t["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .filter_map(|d| d.as_u64())
                .collect();
            out.push((
                body["stream"].as_str().unwrap_or("").to_owned(),
                shape,
                values,
            ));
        }
        out
    }
}

async fn finish(p: Pipeline) -> PipelineTelemetry {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.is_finished() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the pipeline to drain"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = p.stats().telemetry();
    tokio::task::spawn_blocking(move || p.stop())
        .await
        .expect("stop");
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inference_stage_turns_sample_frames_into_output_tensors() {
    let fx = fixture();
    fx.write("models/affine.onnx", &double_plus_one());
    let p = fx
        .start(
            r#"
name = "infer"
[[source]]
name = "imu"
kind = "synthetic"
stream = "motor-1"
rate_hz = 0
count = 20
window = 4
on_full = "block"
[[stage]]
name = "affine"
kind = "inference"
model = "models/affine.onnx"
input = "imu"
[[sink]]
kind = "outbox"
input = "affine"
"#,
        )
        .await
        .expect("starts");
    let t = finish(p).await;
    let stage = &t.stages[0];
    assert_eq!(stage.kind, "inference");
    assert!(
        stage.module.starts_with("models/affine.onnx@"),
        "{}",
        stage.module
    );
    assert_eq!(
        (stage.calls, stage.ok, stage.errors, stage.frames_out),
        (20, 20, 0, 20)
    );
    let out = fx.outbox_tensors();
    assert_eq!(out.len(), 20);
    for (stream, shape, values) in &out {
        assert_eq!(stream, "motor-1", "the stream is kept");
        assert_eq!(shape, &[1, 4]);
        assert!(values.iter().all(|v| v.is_finite()));
    }
    let m = &fx.deps.inference.telemetry().models;
    assert!(m.is_empty(), "a stopped pipeline unloads its models: {m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_encoder_feeds_a_model_and_batches_give_the_same_results() {
    let fx = fixture();
    fx.write("encoder.wasm", &common::module("encoder"));
    fx.write("affine.onnx", &double_plus_one());
    let rows: String = (0..12)
        .map(|i| format!("{i},{},{},{}\n", i + 1, i + 2, i + 3))
        .collect();
    fx.write("rows.csv", rows.as_bytes());
    let toml = |batch: u32| {
        format!(
            r#"
name = "mixed"
[[source]]
name = "rec"
kind = "file"
format = "lines"
path = "rows.csv"
[[stage]]
name = "enc"
module = "encoder.wasm"
input = "rec"
config = {{ format = "csv", columns = [0, 1, 2, 3] }}
[[stage]]
name = "affine"
kind = "inference"
model = "affine.onnx"
input = "enc"
max_batch = {batch}
max_wait_ms = 20
[[sink]]
kind = "outbox"
input = "affine"
"#
        )
    };
    let t = finish(fx.start(&toml(1)).await.expect("starts")).await;
    assert_eq!((t.stages[1].ok, t.stages[1].errors), (12, 0), "{t:?}");
    let single = fx.outbox_tensors();
    assert_eq!(single.len(), 12);
    assert_eq!(single[3].2, vec![7.0, 9.0, 11.0, 13.0], "2x + 1 of row 3");

    let t = finish(fx.start(&toml(4)).await.expect("starts")).await;
    assert_eq!((t.stages[1].ok, t.stages[1].errors), (12, 0), "{t:?}");
    let all = fx.outbox_tensors();
    assert_eq!(
        &all[12..],
        &single[..],
        "batched runs give the same frames in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_shape_nan_and_wrong_dtype_fail_one_frame_each_and_the_pipeline_goes_on() {
    let fx = fixture();
    fx.write("sqrt.onnx", &sqrt_model());
    fx.write("affine.onnx", &double_plus_one());
    fx.write("cast.onnx", &cast_to_i64());
    // Line 2 has 3 values (shape [1, 3]); line 3's sqrt(-1) is NaN for the next model.
    fx.write("rec.txt", b"1,4,9,16\n1,2,3\n-1,4,9,16\n4,4,4,4\n");
    let p = fx
        .start(
            r#"
name = "bad-input"
[[source]]
name = "rec"
kind = "file"
format = "samples"
path = "rec.txt"
[[stage]]
name = "sqrt"
kind = "inference"
model = "sqrt.onnx"
input = "rec"
[[stage]]
name = "affine"
kind = "inference"
model = "affine.onnx"
input = "sqrt"
[[stage]]
name = "cast"
kind = "inference"
model = "cast.onnx"
input = "rec"
[[stage]]
name = "after-cast"
kind = "inference"
model = "affine.onnx"
input = "cast"
[[sink]]
kind = "outbox"
input = "affine"
[[sink]]
kind = "log"
input = "after-cast"
"#,
        )
        .await
        .expect("starts");
    let stats = p.stats();
    let t = finish(p).await;
    let by_name = |n: &str| t.stages.iter().find(|s| s.name == n).expect("stage");
    assert_eq!(
        (by_name("sqrt").ok, by_name("sqrt").errors),
        (3, 1),
        "wrong shape"
    );
    assert_eq!(
        (by_name("affine").ok, by_name("affine").errors),
        (2, 1),
        "NaN"
    );
    assert_eq!((by_name("cast").ok, by_name("cast").errors), (3, 1));
    assert_eq!(by_name("after-cast").errors, 3, "i64 into an f32 model");
    let out = fx.outbox_tensors();
    assert_eq!(out.len(), 2, "the good frames still come out");
    assert_eq!(out[1].2, vec![5.0, 5.0, 5.0, 5.0]);
    let (_, failure) = stats.health();
    let failure = failure.expect("a failure is recorded");
    assert!(
        failure.contains("sqrt.onnx@")
            || failure.contains("affine.onnx@")
            || failure.contains("cast.onnx@"),
        "{failure}"
    );
    assert!(failure.contains("input x"), "names the input: {failure}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_models_and_an_unavailable_runtime_fail_the_start_with_the_reason() {
    let fx = fixture();
    fx.write("corrupt.onnx", b"this is not a model");
    fx.write("unknown.onnx", &onnx_builder::unknown_operator());
    fx.write("two.onnx", &onnx_builder::add(4));
    let pipeline = |model: &str| {
        format!(
            "name = \"p\"\n[[source]]\nname = \"imu\"\nkind = \"synthetic\"\nwindow = 4\n\
             [[stage]]\nname = \"m\"\nkind = \"inference\"\nmodel = \"{model}\"\ninput = \"imu\"\n\
             [[sink]]\nkind = \"log\"\ninput = \"m\"\n"
        )
    };
    let err = |r: Result<Pipeline, PipelineError>| match r {
        Ok(_) => panic!("started"),
        Err(e) => e.to_string(),
    };
    let e = err(fx.start(&pipeline("corrupt.onnx")).await);
    assert!(e.contains("corrupt.onnx") && e.contains("corrupt"), "{e}");
    let e = err(fx.start(&pipeline("unknown.onnx")).await);
    assert!(e.contains("unsupported operator"), "{e}");
    let e = err(fx.start(&pipeline("two.onnx")).await);
    assert!(e.contains("exactly one"), "{e}");
    let e = err(fx.start(&pipeline("missing.onnx")).await);
    assert!(e.contains("missing.onnx"), "{e}");

    let fx = fixture_with(Inference::unavailable("no library at /nowhere.so"));
    fx.write("two.onnx", &onnx_builder::add(4));
    let e = err(fx.start(&pipeline("two.onnx")).await);
    assert!(
        e.contains("unavailable") && e.contains("/nowhere.so"),
        "{e}"
    );
}
