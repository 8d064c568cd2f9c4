//! End-to-end tests of edge-inference on the real ONNX Runtime library (provisioned by
//! `cargo xtask ort` when missing), with models built in Rust by `onnx_builder`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use common::{assert_close, runtime, runtime_with};
use edge_inference::{
    DType, Model, ModelError, ModelRegistry, PatchError, Placement, Provider, RegistryError,
    Tensor, patch_initializers, read_initializers,
};
use edge_testmodels::onnx_builder::{self, SmallCnn};
use half::f16;

fn linear_model() -> (Vec<f32>, Vec<f32>, Vec<u8>) {
    // y = x · W + B with W [3, 2], B [2].
    let w = vec![1.0, 0.5, -1.0, 2.0, 0.25, 0.0];
    let b = vec![0.1, -0.2];
    let bytes = onnx_builder::linear(3, 2, &w, &b);
    (w, b, bytes)
}

fn linear_ref(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    x.chunks_exact(3)
        .flat_map(|row| {
            (0..2).map(move |j| b[j] + (0..3).map(|i| row[i] * w[i * 2 + j]).sum::<f32>())
        })
        .collect()
}

#[test]
fn add_runs_with_correct_numbers() {
    let rt = runtime();
    let m = Model::load(&rt, "add", "1", &onnx_builder::add(3)).unwrap();
    let a = Tensor::from_f32(vec![3], &[1.0, 2.0, 3.0]).unwrap();
    let b = Tensor::from_f32(vec![3], &[10.0, 20.0, -3.0]).unwrap();
    let out = m.run(&[a, b]).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].shape(), &[3]);
    assert_eq!(out[0].to_f32().unwrap(), vec![11.0, 22.0, 0.0]);
    assert_eq!(m.inputs()[0].name, "a");
    assert_eq!(m.outputs()[0].dtype, Some(DType::F32));
}

#[test]
fn linear_layer_runs_with_dynamic_batch() {
    let rt = runtime();
    let (w, b, bytes) = linear_model();
    let m = Model::load(&rt, "linear", "1", &bytes).unwrap();
    assert_eq!(m.inputs()[0].shape, vec![None, Some(3)]);
    for n in [1u32, 4] {
        let x: Vec<f32> = (0..n * 3).map(|i| i as f32 * 0.5 - 1.0).collect();
        let out = m.run(&[Tensor::from_f32(vec![n, 3], &x).unwrap()]).unwrap();
        assert_eq!(out[0].shape(), &[n, 2]);
        assert_close(&out[0].to_f32().unwrap(), &linear_ref(&x, &w, &b));
    }
}

#[test]
fn small_cnn_matches_the_reference() {
    let rt = runtime();
    let cnn = SmallCnn::example();
    let m = Model::load(&rt, "cnn", "1", &cnn.to_onnx()).unwrap();
    m.health_check(None).unwrap();
    let x = cnn.example_input(3);
    let out = m.run(std::slice::from_ref(&x)).unwrap();
    assert_eq!(out[0].shape(), &[3, 10]);
    let got = out[0].to_f32().unwrap();
    assert_close(&got, &cnn.reference(3, &x.to_f32().unwrap()));
    // Softmax rows sum to one: the numbers are not trivially zero.
    assert!((got[..10].iter().sum::<f32>() - 1.0).abs() < 1e-5);
}

#[test]
fn every_wit_dtype_round_trips() {
    let rt = runtime();
    let cases = [
        Tensor::from_f32(vec![2, 2], &[1.5, -2.0, 0.0, 3.25]).unwrap(),
        Tensor::from_f16(
            vec![3],
            &[f16::from_f32(0.5), f16::ONE, f16::from_f32(-2.0)],
        )
        .unwrap(),
        Tensor::from_i64(vec![2], &[i64::MIN, 42]).unwrap(),
        Tensor::from_i32(vec![1, 3], &[-1, 0, i32::MAX]).unwrap(),
        Tensor::from_u8(vec![4], &[0, 1, 200, 255]).unwrap(),
        Tensor::from_bool(vec![3], &[true, false, true]).unwrap(),
        Tensor::from_i64(vec![], &[7]).unwrap(),
    ];
    for t in cases {
        let dims: Vec<i64> = t.shape().iter().map(|&d| i64::from(d)).collect();
        let m = Model::load(
            &rt,
            "identity",
            t.dtype().as_str(),
            &onnx_builder::identity(t.dtype(), &dims),
        )
        .unwrap();
        let out = m.run(std::slice::from_ref(&t)).unwrap();
        assert_eq!(out[0], t, "dtype {}", t.dtype());
    }
}

#[test]
fn several_models_at_once_from_many_threads() {
    let reg = Arc::new(ModelRegistry::new(runtime()));
    let (w, b, linear) = linear_model();
    reg.install("add", "1", &onnx_builder::add(3), None)
        .unwrap();
    reg.install("linear", "1", &linear, None).unwrap();
    let cnn = SmallCnn::example();
    reg.install("cnn", "1", &cnn.to_onnx(), None).unwrap();
    assert_eq!(reg.models().len(), 3);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let reg = Arc::clone(&reg);
            let (w, b, cnn) = (w.clone(), b.clone(), cnn.clone());
            std::thread::spawn(move || {
                for i in 0..25 {
                    let v = (t * 100 + i) as f32;
                    let sum = reg
                        .run(
                            "add",
                            &[
                                Tensor::from_f32(vec![3], &[v, 1.0, 2.0]).unwrap(),
                                Tensor::from_f32(vec![3], &[1.0; 3]).unwrap(),
                            ],
                        )
                        .unwrap();
                    assert_eq!(sum[0].to_f32().unwrap(), vec![v + 1.0, 2.0, 3.0]);
                    let x = [v, 1.0, -1.0];
                    let y = reg
                        .run("linear", &[Tensor::from_f32(vec![1, 3], &x).unwrap()])
                        .unwrap();
                    assert_close(&y[0].to_f32().unwrap(), &linear_ref(&x, &w, &b));
                    let img = cnn.example_input(1);
                    let p = reg.run("cnn", std::slice::from_ref(&img)).unwrap();
                    assert_close(
                        &p[0].to_f32().unwrap(),
                        &cnn.reference(1, &img.to_f32().unwrap()),
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(matches!(
        reg.run("nope", &[]),
        Err(RegistryError::NotLoaded(_))
    ));
}

#[test]
fn hot_swap_under_concurrent_requests_drops_nothing_and_frees_the_old_session() {
    let reg = Arc::new(ModelRegistry::new(runtime()));
    // Version n computes y = x · W + B with B = [n, n]: every answer tells which version served it.
    let w = vec![0.0; 6];
    let version = |n: u32| onnx_builder::linear(3, 2, &w, &[n as f32, n as f32]);
    reg.install("m", "1", &version(1), None).unwrap();
    let old = Arc::downgrade(&reg.get("m").unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(5));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (reg, stop, served, start) = (
                Arc::clone(&reg),
                Arc::clone(&stop),
                Arc::clone(&served),
                Arc::clone(&start),
            );
            std::thread::spawn(move || {
                start.wait();
                let mut last = 1.0f32;
                loop {
                    // The request after `stop` is seen starts after the last install returned.
                    let stopping = stop.load(Ordering::SeqCst);
                    let y = reg
                        .run(
                            "m",
                            &[Tensor::from_f32(vec![1, 3], &[1.0, 2.0, 3.0]).unwrap()],
                        )
                        .expect("no request fails during a swap");
                    let v = y[0].to_f32().unwrap()[0];
                    // Versions only move forward for one client.
                    assert!(v >= last, "went back from version {last} to {v}");
                    last = v;
                    served.fetch_add(1, Ordering::Relaxed);
                    if stopping {
                        break last;
                    }
                }
            })
        })
        .collect();
    start.wait();
    for n in 2..=5 {
        let done = reg.install("m", &n.to_string(), &version(n), None).unwrap();
        assert_eq!(done.replaced.as_deref(), Some((n - 1).to_string().as_str()));
        // Let some requests land on each version (waiting on progress, not on time).
        let seen = served.load(Ordering::Relaxed);
        while served.load(Ordering::Relaxed) < seen + 20 {
            std::thread::yield_now();
        }
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        assert_eq!(
            c.join().unwrap(),
            5.0,
            "every client ends on the newest version"
        );
    }
    assert!(
        old.upgrade().is_none(),
        "version 1's session is freed once no request holds it"
    );
    assert_eq!(reg.get("m").unwrap().version(), "5");
}

#[test]
fn failed_health_check_keeps_the_old_version() {
    let reg = ModelRegistry::new(runtime());
    let (_, _, linear) = linear_model();
    reg.install("m", "1", &linear, None).unwrap();
    let err = reg
        .install("m", "2", &onnx_builder::nan_on_probe(), None)
        .unwrap_err();
    assert!(matches!(err, ModelError::Health { .. }), "{err}");
    assert!(
        err.to_string().contains("m@2") && err.to_string().contains("not finite"),
        "{err}"
    );
    // A corrupt version is refused the same way.
    assert!(reg.install("m", "3", b"not a model", None).is_err());
    let m = reg.get("m").unwrap();
    assert_eq!(m.version(), "1");
    assert!(
        reg.run(
            "m",
            &[Tensor::from_f32(vec![1, 3], &[1.0, 2.0, 3.0]).unwrap()]
        )
        .is_ok()
    );
}

#[test]
fn weight_patching_changes_outputs_and_validates() {
    let rt = runtime();
    let (w, b, bytes) = linear_model();
    let w2: Vec<f32> = w.iter().map(|v| v * -3.0 + 1.0).collect();
    let b2 = vec![5.0, 6.0];
    let patched = patch_initializers(
        &bytes,
        &[
            ("W", Tensor::from_f32(vec![3, 2], &w2).unwrap()),
            ("B", Tensor::from_f32(vec![2], &b2).unwrap()),
        ],
    )
    .unwrap();
    let m = Model::load(&rt, "linear", "2", &patched).unwrap();
    let x = [0.5, -1.0, 2.0];
    let y = m.run(&[Tensor::from_f32(vec![1, 3], &x).unwrap()]).unwrap();
    assert_close(&y[0].to_f32().unwrap(), &linear_ref(&x, &w2, &b2));

    let read = read_initializers(&patched).unwrap();
    assert_eq!(
        read.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["W", "B"]
    );
    assert_eq!(read[0].1.to_f32().unwrap(), w2);
    // Patching back restores the original bytes exactly: nothing else was touched.
    let back = patch_initializers(
        &patched,
        &[
            ("W", Tensor::from_f32(vec![3, 2], &w).unwrap()),
            ("B", Tensor::from_f32(vec![2], &b).unwrap()),
        ],
    )
    .unwrap();
    assert_eq!(back, bytes);

    let err = patch_initializers(&bytes, &[("nope", Tensor::from_f32(vec![2], &b2).unwrap())])
        .unwrap_err();
    assert!(
        matches!(&err, PatchError::UnknownName { name, available } if name == "nope" && available == "W, B"),
        "{err}"
    );
    let err = patch_initializers(
        &bytes,
        &[("B", Tensor::from_i64(vec![2], &[1, 2]).unwrap())],
    )
    .unwrap_err();
    assert!(matches!(err, PatchError::DType { .. }), "{err}");
    let err = patch_initializers(&bytes, &[("W", Tensor::from_f32(vec![2, 3], &w2).unwrap())])
        .unwrap_err();
    assert!(matches!(err, PatchError::Shape { .. }), "{err}");
    let err = patch_initializers(b"\xff\xff\xff", &[]).unwrap_err();
    assert!(matches!(err, PatchError::Decode(_)), "{err}");
}

#[test]
fn corrupt_model_is_a_clear_error() {
    let rt = runtime();
    let mut bytes = SmallCnn::example().to_onnx();
    bytes.truncate(bytes.len() / 2);
    for bad in [&b"definitely not onnx"[..], &bytes[..]] {
        let err = Model::load(&rt, "cnn", "7", bad).unwrap_err();
        assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("model cnn@7: corrupt model file"),
            "{err}"
        );
    }
}

#[test]
fn unsupported_operator_is_a_clear_error() {
    let rt = runtime();
    let err = Model::load(&rt, "odd", "1", &onnx_builder::unknown_operator()).unwrap_err();
    assert!(
        matches!(err, ModelError::UnsupportedOperator { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("odd@1") && err.to_string().contains("EdgeNoSuchOperator"),
        "{err}"
    );
}

#[test]
fn wrong_inputs_are_rejected_naming_model_and_input() {
    let rt = runtime();
    let (_, _, bytes) = linear_model();
    let m = Model::load(&rt, "linear", "1", &bytes).unwrap();
    let err = m
        .run(&[Tensor::from_f32(vec![1, 4], &[0.0; 4]).unwrap()])
        .unwrap_err();
    assert!(matches!(err, ModelError::InputShape { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "model linear@1 input x: expected shape [?, 3], got [1, 4]"
    );
    let err = m
        .run(&[Tensor::from_f32(vec![3], &[0.0; 3]).unwrap()])
        .unwrap_err();
    assert!(matches!(err, ModelError::InputShape { .. }), "{err}");
    let err = m
        .run(&[Tensor::from_i64(vec![1, 3], &[0; 3]).unwrap()])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "model linear@1 input x: expected dtype f32, got i64"
    );
    let err = m.run(&[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "model linear@1: expected 1 inputs (x), got 0"
    );
    // The model keeps serving after bad requests.
    assert!(
        m.run(&[Tensor::from_f32(vec![1, 3], &[0.0; 3]).unwrap()])
            .is_ok()
    );
}

#[test]
fn nan_and_infinite_inputs_are_rejected() {
    let rt = runtime();
    let m = Model::load(&rt, "add", "1", &onnx_builder::add(3)).unwrap();
    let ok = Tensor::from_f32(vec![3], &[1.0; 3]).unwrap();
    let nan = Tensor::from_f32(vec![3], &[1.0, f32::NAN, 0.0]).unwrap();
    let err = m.run(&[ok.clone(), nan.clone()]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "model add@1 input b: element 1 is not finite (NaN or infinity)"
    );
    let inf = Tensor::from_f32(vec![3], &[f32::INFINITY, 0.0, 0.0]).unwrap();
    assert!(matches!(
        m.run(&[inf, ok.clone()]),
        Err(ModelError::NonFinite { .. })
    ));

    // Configurable: with the check off, NaN goes through to the model.
    let mut config = rt.config().clone();
    config.reject_non_finite = false;
    let lax = edge_inference::Runtime::load(&config).unwrap();
    let m = Model::load(&lax, "add", "1", &onnx_builder::add(3)).unwrap();
    let out = m.run(&[ok, nan]).unwrap();
    assert!(out[0].to_f32().unwrap()[1].is_nan());
}

#[test]
fn provider_report_on_a_cpu_only_library() {
    let rt = runtime_with(&[
        Provider::Cuda,
        Provider::Tensorrt,
        Provider::Xnnpack,
        Provider::Cpu,
    ]);
    assert!(rt.built_in_providers().contains(&Provider::Cpu));
    assert!(!rt.built_in_providers().contains(&Provider::Cuda));
    let m = Model::load(&rt, "add", "1", &onnx_builder::add(3)).unwrap();
    let report = m.provider_report();
    assert_eq!(report.provider, Provider::Cpu);
    assert_eq!(report.placement, Placement::Full);
    let skipped: Vec<Provider> = report.skipped.iter().map(|s| s.provider).collect();
    assert_eq!(
        skipped,
        [Provider::Cuda, Provider::Tensorrt, Provider::Xnnpack]
    );
    for s in &report.skipped {
        assert!(
            s.reason.contains("not built into onnx runtime 1."),
            "{}",
            s.reason
        );
    }
    assert!(
        report
            .to_string()
            .starts_with("cpu; cuda skipped: not built into"),
        "{report}"
    );

    // Without cpu in the list and no accelerator, the model is refused with every reason.
    let rt = runtime_with(&[Provider::Cuda]);
    let err = Model::load(&rt, "add", "1", &onnx_builder::add(3)).unwrap_err();
    assert!(
        matches!(&err, ModelError::NoProvider { skipped, .. } if skipped.len() == 1),
        "{err}"
    );
}
