//! Tests of task files: parsing, validation, initial weights and the size check.
use super::*;
use edge_testmodels::onnx_builder;

fn write_task(dir: &Path, toml: &str) -> PathBuf {
    let model = onnx_builder::linear(4, 3, &[0.5; 12], &[0.1; 3]);
    std::fs::write(dir.join("m.onnx"), model).expect("writes model");
    std::fs::write(dir.join("holdout.csv"), "1,2,3,4,0\n0,0,0,1,2\n").expect("writes csv");
    let path = dir.join("task.toml");
    std::fs::write(&path, toml).expect("writes task");
    path
}

const BASE: &str =
    "id = \"t1\"\nmodel = \"models/m.onnx\"\ninitial = \"m.onnx\"\ngroup = \"fl\"\nrounds = 3\n";

fn err(dir: &Path, toml: &str) -> String {
    load(&write_task(dir, toml))
        .expect_err("refused")
        .to_string()
}

#[test]
fn minimal_task_gets_defaults_and_every_f32_initializer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = load(&write_task(dir.path(), BASE)).expect("loads");
    assert_eq!(t.spec.params.len(), 2);
    assert_eq!(
        t.spec.params[0],
        ParamSpec {
            name: "W".into(),
            shape: vec![4, 3]
        }
    );
    assert_eq!(t.initial.len(), 15);
    assert_eq!(&t.initial[12..], &[0.1; 3]);
    assert_eq!(t.spec.members, Members::Group("fl".into()));
    assert_eq!(t.spec.rule, Rule::FedAvg);
    assert_eq!(t.spec.server_optimizer, ServerOptimizer::Sgd { lr: 1.0 });
    assert_eq!(
        (t.spec.quorum, t.spec.min_clients, t.spec.max_staleness),
        (1.0, 1, 1)
    );
    assert!(!t.spec.holdout);
    assert_eq!(
        t.spec.clip,
        Clip::Auto { multiplier: 2.0 },
        "clipping is on by default"
    );
    assert_eq!(t.spec.privacy, None);
}

#[test]
fn clipping_and_privacy_parse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = |extra: &str| {
        load(&write_task(dir.path(), &format!("{BASE}{extra}")))
            .expect("loads")
            .spec
    };
    assert_eq!(t("[aggregate]\nclip = \"off\"\n").clip, Clip::Off);
    assert_eq!(
        t("[aggregate]\nclip_multiplier = 3.0\n").clip,
        Clip::Auto { multiplier: 3.0 }
    );
    assert_eq!(
        t("[aggregate]\nclip = 0.5\n").clip,
        Clip::Norm { norm: 0.5 }
    );
    let spec =
        t("[aggregate]\nclip = 0.5\n[privacy]\nnoise_multiplier = 1.1\nmax_epsilon = 20.0\n");
    assert_eq!(
        spec.privacy,
        Some(Privacy {
            noise_multiplier: 1.1,
            delta: 1e-5,
            max_epsilon: Some(20.0)
        })
    );
    // A task persisted before clipping existed keeps running without it.
    let mut old = serde_json::to_value(&spec).expect("json");
    old.as_object_mut().expect("object").remove("clip");
    let old: TaskSpec = serde_json::from_value(old).expect("reads");
    assert_eq!(old.clip, Clip::Off);
}

#[test]
fn full_task_parses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "{BASE}params = [\"B\", \"W\"]\nfraction = 0.5\nmin_clients = 2\nquorum = 0.7\nround_timeout_s = 9\nmax_staleness = 2\nseed = 7\n\
         [train]\nepochs = 5\nlr = 0.1\nbatch_size = 16\nmu = 0.01\ncodec = \"topk:0.1\"\nmax_samples = 100\n\
         [aggregate]\nrule = \"trimmed-mean\"\ntrim = 0.2\nserver_optimizer = \"fedadam\"\nbeta2 = 0.9\n\
         [eval]\nholdout = \"holdout.csv\"\n"
    );
    let t = load(&write_task(dir.path(), &toml)).expect("loads");
    assert_eq!(
        t.spec.params,
        vec![
            ParamSpec {
                name: "W".into(),
                shape: vec![4, 3]
            },
            ParamSpec {
                name: "B".into(),
                shape: vec![3]
            }
        ],
        "listed in any order, sent in layer order"
    );
    assert_eq!(&t.initial[12..], &[0.1; 3]);
    assert_eq!(t.spec.rule, Rule::TrimmedMean { trim: 0.2 });
    assert_eq!(
        t.spec.server_optimizer,
        ServerOptimizer::FedAdam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.9,
            tau: 1e-3
        }
    );
    assert_eq!(t.spec.train.codec, Codec::TopK { fraction: 0.1 });
    assert!(t.spec.holdout && t.holdout_text.is_some());
    assert_eq!(t.spec.selection_count(10), 5);
    assert_eq!(t.spec.selection_count(3), 2);
    assert_eq!(t.spec.selection_count(1), 1);
    assert_eq!(t.spec.quorum_count(5), 4);
    // No f32 rounding surprises: 0.7 of 10 is 7, 0.3 of 20 is 6.
    assert_eq!(ceil_fraction(0.7, 10), 7);
    assert_eq!(ceil_fraction(0.3, 20), 6);
    assert_eq!(ceil_fraction(0.1, 10_000), 1_000);
    assert_eq!(ceil_fraction(0.7, 3), 3);
    assert_eq!(ceil_fraction(0.6, 3), 2);
}

#[test]
fn errors_name_the_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cases = [
        (format!("{BASE}fraction = 0.0\n"), "fraction"),
        (format!("{BASE}quorum = 1.5\n"), "quorum"),
        (format!("{BASE}min_clients = 0\n"), "min_clients"),
        (format!("{BASE}params = [\"nope\"]\n"), "params"),
        (format!("{BASE}params = [\"W\", \"W\"]\n"), "params"),
        (format!("{BASE}params = [\"B\"]\n"), "params"),
        (format!("{BASE}[eval]\noutput = \"nope\"\n"), "eval.output"),
        (format!("{BASE}devices = [\"a\"]\n"), "group"),
        (
            BASE.replace("group = \"fl\"\n", "devices = [\"a\"]\nmin_clients = 2\n"),
            "min_clients",
        ),
        (BASE.replace("rounds = 3", "rounds = 0"), "rounds"),
        (BASE.replace("id = \"t1\"", "id = \"a b\""), "id"),
        (BASE.replace("id = \"t1\"", "id = \"..\""), "id"),
        (format!("{BASE}[train]\ncodec = \"zip\"\n"), "train.codec"),
        (format!("{BASE}[train]\nlr = -1.0\n"), "train.lr"),
        (
            format!("{BASE}[aggregate]\nrule = \"mean\"\n"),
            "aggregate.rule",
        ),
        (format!("{BASE}[aggregate]\ntrim = 0.1\n"), "aggregate.trim"),
        (
            format!("{BASE}[aggregate]\nrule = \"trimmed-mean\"\ntrim = 0.5\n"),
            "aggregate.trim",
        ),
        (
            format!("{BASE}[aggregate]\nmomentum = 0.9\n"),
            "aggregate.momentum",
        ),
        (
            format!("{BASE}[aggregate]\nserver_optimizer = \"fedavgm\"\nmomentum = 1.0\n"),
            "aggregate.momentum",
        ),
        (
            format!("{BASE}[aggregate]\nserver_optimizer = \"adagrad\"\n"),
            "aggregate.server_optimizer",
        ),
        (
            format!("{BASE}[aggregate]\nclip = \"median\"\n"),
            "aggregate.clip",
        ),
        (
            format!("{BASE}[aggregate]\nclip = -1.0\n"),
            "aggregate.clip",
        ),
        (
            format!("{BASE}[aggregate]\nclip = 1.0\nclip_multiplier = 3.0\n"),
            "aggregate.clip_multiplier",
        ),
        (
            format!("{BASE}[aggregate]\nclip_multiplier = 0.5\n"),
            "aggregate.clip_multiplier",
        ),
        // DP needs a fixed norm, FedAvg, a positive multiplier and a delta in (0, 1)
        (
            format!("{BASE}[privacy]\nnoise_multiplier = 1.0\n"),
            "aggregate.clip",
        ),
        (
            format!(
                "{BASE}[aggregate]\nclip = 1.0\nrule = \"median\"\n[privacy]\nnoise_multiplier = 1.0\n"
            ),
            "aggregate.rule",
        ),
        (
            format!("{BASE}[aggregate]\nclip = 1.0\n[privacy]\nnoise_multiplier = 0.0\n"),
            "privacy.noise_multiplier",
        ),
        (
            format!(
                "{BASE}[aggregate]\nclip = 1.0\n[privacy]\nnoise_multiplier = 1.0\ndelta = 1.0\n"
            ),
            "privacy.delta",
        ),
        // one round at z = 1 already costs about 4.7
        (
            format!(
                "{BASE}[aggregate]\nclip = 1.0\n[privacy]\nnoise_multiplier = 1.0\nmax_epsilon = 1.0\n"
            ),
            "privacy.max_epsilon",
        ),
    ];
    for (toml, key) in cases {
        let msg = err(d, &toml);
        assert!(msg.contains(&format!("invalid {key}:")), "{key}: {msg}");
        assert!(msg.contains("task.toml"), "{msg}");
    }
    let msg = err(d, &format!("{BASE}rounds_max = 3\n"));
    assert!(
        msg.contains("rounds_max") && msg.contains("line 6"),
        "{msg}"
    );
    let msg = err(d, &BASE.replace("m.onnx\"\ngroup", "missing.onnx\"\ngroup"));
    assert!(msg.contains("missing.onnx"), "{msg}");
    std::fs::write(d.join("bad.csv"), "1,2,x\n").expect("writes");
    let path = d.join("task.toml");
    std::fs::write(&path, format!("{BASE}[eval]\nholdout = \"bad.csv\"\n")).expect("writes");
    let msg = load(&path).expect_err("refused").to_string();
    assert!(
        msg.contains("eval.holdout") && msg.contains("bad.csv"),
        "{msg}"
    );
}

#[test]
fn models_past_one_message_load_and_past_the_task_limit_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("task.toml");
    std::fs::write(&path, BASE.replace("m.onnx\"\ngroup", "big.onnx\"\ngroup")).expect("writes");
    // 40,200 weights: over one round message, so they travel in chunks.
    let (i, o) = (200u32, 200u32);
    let model = onnx_builder::linear(i, o, &vec![0.0; (i * o) as usize], &vec![0.0; o as usize]);
    std::fs::write(dir.path().join("big.onnx"), model).expect("writes");
    let task = load(&path).expect("loads");
    assert_eq!(protocol::v1::fl::weight_count(&task.spec.params), 40_200);
    // Past the limit (8,388,608 + 4,096 weights).
    let (i, o) = (2048u32, 4096u32);
    let model = onnx_builder::linear(i, o, &vec![0.0; (i * o) as usize], &vec![0.0; o as usize]);
    std::fs::write(dir.path().join("big.onnx"), model).expect("writes");
    let msg = load(&path).expect_err("refused").to_string();
    assert!(
        msg.contains("invalid initial") && msg.contains("a task may have at most"),
        "{msg}"
    );
}

/// A task over each exporter's model (`inference/testmodels/exported/`) loads as exported:
/// the params are each dense layer's weight and bias in layer order, found from the graph.
#[test]
fn exported_models_load_unchanged_and_unsupported_ones_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    type Params<'a> = &'a [(&'a str, &'a [u32])];
    let cases: [(&str, Params); 4] = [
        (
            "sklearn_mlp.onnx",
            &[
                ("coefficient", &[64, 16]),
                ("intercepts", &[1, 16]),
                ("coefficient1", &[16, 10]),
                ("intercepts1", &[1, 10]),
            ],
        ),
        (
            "sklearn_sgd.onnx",
            &[("coef", &[64, 10]), ("intercept", &[10])],
        ),
        (
            "torch_gemm.onnx",
            &[
                ("0.weight", &[16, 64]),
                ("0.bias", &[16]),
                ("2.weight", &[10, 16]),
                ("2.bias", &[10]),
            ],
        ),
        (
            "torch_dynamo.onnx",
            &[
                ("0.weight", &[16, 64]),
                ("0.bias", &[16]),
                ("2.weight", &[10, 16]),
                ("2.bias", &[10]),
            ],
        ),
    ];
    let path = dir.path().join("task.toml");
    for (file, want) in cases {
        std::fs::write(dir.path().join("m.onnx"), onnx_builder::exported(file)).expect("model");
        std::fs::write(&path, BASE).expect("task");
        let t = load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        let got: Vec<(&str, &[u32])> = t
            .spec
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.shape.as_slice()))
            .collect();
        assert_eq!(got, want, "{file}");
        assert_eq!(t.initial.len(), t.spec.weight_count(), "{file}");
    }
    // skl2onnx's `label` is int64: naming it for evaluation is refused.
    std::fs::write(
        dir.path().join("m.onnx"),
        onnx_builder::exported("sklearn_mlp.onnx"),
    )
    .expect("model");
    std::fs::write(&path, format!("{BASE}[eval]\noutput = \"label\"\n")).expect("task");
    let e = load(&path).expect_err("label is not scores").to_string();
    assert!(
        e.contains("eval.output") && e.contains("probabilities f32"),
        "{e}"
    );
    std::fs::write(
        dir.path().join("m.onnx"),
        onnx_builder::exported("sklearn_logreg.onnx"),
    )
    .expect("model");
    std::fs::write(&path, BASE).expect("task");
    // skl2onnx's LogisticRegression: its LinearClassifier trained as one Gemm layer.
    let t = load(&path).expect("a linear classifier trains");
    let names: Vec<&str> = t.spec.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "LinearClassifier.coefficients",
            "LinearClassifier.intercepts"
        ]
    );
    assert_eq!(t.initial.len(), 10 * 64 + 10);
}

#[test]
fn trainable_names_the_head_and_the_rest_stays_frozen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("task.toml");
    std::fs::write(
        dir.path().join("m.onnx"),
        onnx_builder::exported("torch_gemm.onnx"),
    )
    .expect("model");
    let with = |extra: &str| {
        std::fs::write(&path, format!("{BASE}{extra}")).expect("task");
        load(&path)
    };
    let t = with("[train]\ntrainable = [\"2.bias\", \"2.weight\"]\n").expect("a head");
    let names: Vec<&str> = t.spec.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["2.weight", "2.bias"], "only the head is sent");
    assert_eq!(t.initial.len(), 16 * 10 + 10);
    let refused = |extra: &str, key: &str, words: &[&str]| {
        let msg = with(extra).expect_err("refused").to_string();
        assert!(msg.contains(&format!("invalid {key}:")), "{msg}");
        for w in words {
            assert!(msg.contains(w), "{w}: {msg}");
        }
    };
    // a frozen head over a trained first layer
    refused(
        "[train]\ntrainable = [\"0.weight\", \"0.bias\"]\n",
        "train.trainable",
        &["0.weight is trained but 2.weight", "only the last layers"],
    );
    // half a layer
    refused(
        "[train]\ntrainable = [\"2.weight\"]\n",
        "train.trainable",
        &["2.bias is not listed"],
    );
    // a name the model does not have
    refused(
        "[train]\ntrainable = [\"head.weight\"]\n",
        "train.trainable",
        &["no initializer head.weight"],
    );
    // both spellings
    refused(
        "params = [\"2.weight\", \"2.bias\"]\n[train]\ntrainable = [\"2.weight\", \"2.bias\"]\n",
        "train.trainable",
        &["keep one"],
    );
}

/// The real trainer module (`cargo xtask modules` builds it), copied beside a task as `name`.
fn trainer_beside(dir: &Path, module: &str, name: &str) {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../modules/target/wasm32-wasip2/release")
        .join(format!("{module}.wasm"));
    std::fs::copy(&built, dir.join(name)).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (build the modules: cargo xtask modules)",
            built.display()
        )
    });
}

/// A task over the skl2onnx MLP as exported, with `extra` keys at the end.
fn sklearn_task(dir: &Path, extra: &str) -> PathBuf {
    let path = write_task(dir, &format!("{BASE}trainer = \"t.wasm\"\n{extra}"));
    std::fs::write(
        dir.join("m.onnx"),
        onnx_builder::exported("sklearn_mlp.onnx"),
    )
    .expect("model");
    path
}

#[test]
fn the_trainer_runs_once_under_the_device_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    trainer_beside(dir.path(), "mlp_trainer", "t.wasm");
    let t = load(&sklearn_task(
        dir.path(),
        "[train]\nbatch_size = 8\nepochs = 2\n",
    ))
    .expect("a real trainer trains the exported model");
    let run = t.trainer.expect("checked");
    assert_eq!((run.rows, run.epochs), (8, 2));
    assert_eq!(
        run.max_memory_bytes,
        edge_sandbox::SandboxConfig::default().max_memory_bytes
    );
    assert!(
        run.peak_memory_bytes > 0 && run.peak_memory_bytes <= run.max_memory_bytes,
        "{run:?}"
    );
    assert!(
        run.to_string()
            .contains("t.wasm: one step on a synthetic batch of 8 rows ok")
    );
    // No trainer: not checked, and limits without one are refused rather than ignored.
    let plain = load(&write_task(dir.path(), BASE)).expect("loads");
    assert_eq!(plain.trainer, None);
    let e = err(
        dir.path(),
        &format!("{BASE}[device]\nmax_memory_bytes = 65536\n"),
    );
    assert!(
        e.contains("invalid device:") && e.contains("no trainer"),
        "{e}"
    );
}

#[test]
fn a_trainer_that_cannot_train_the_task_refuses_it_with_the_sandbox_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let refused = |extra: &str| {
        load(&sklearn_task(d, extra))
            .expect_err("refused")
            .to_string()
    };
    // A module of another world (a pipeline stage).
    trainer_beside(d, "encoder", "t.wasm");
    let e = refused("");
    assert!(
        e.contains("the trainer t.wasm cannot train model m.onnx")
            && e.contains("not a `trainer` component"),
        "{e}"
    );
    trainer_beside(d, "mlp_trainer", "t.wasm");
    // The trainer's own refusal of the task's hyperparameters.
    let e = refused("[train]\nepochs = 20000\n");
    assert!(e.contains("refused to train: epochs"), "{e}");
    // Device limits: a bad one names its key; memory too small for the module itself.
    let e = refused("[device]\nmax_memory_bytes = 1\n");
    assert!(e.contains("invalid device: device.max_memory_bytes"), "{e}");
    let e = refused("[device]\nmax_memory_bytes = 65536\n");
    assert!(
        e.contains("max_memory_bytes=65536") && e.contains("memory"),
        "{e}"
    );
    let e = refused("[device]\ncache_dir = \"/tmp\"\n");
    assert!(e.contains("device.cache_dir"), "{e}");
}

#[test]
fn a_model_too_large_for_the_device_memory_is_refused_naming_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    trainer_beside(d, "mlp_trainer", "t.wasm");
    // 76,810 weights (300 KiB): the module starts in about 1.1 MiB, and training needs the
    // weights, their gradients and copies in and out on top.
    let model = onnx_builder::mlp(&onnx_builder::mlp_layers(&[64, 1024, 10], 1));
    let task = |limit: u64| {
        let path = write_task(
            d,
            &format!("{BASE}trainer = \"t.wasm\"\n[device]\nmax_memory_bytes = {limit}\n"),
        );
        std::fs::write(d.join("m.onnx"), &model).expect("model");
        load(&path)
    };
    let limit = 24 * 65536;
    let e = task(limit).expect_err("too small").to_string();
    assert!(
        e.contains(&format!("max_memory_bytes={limit}")) && e.contains("memory limit"),
        "{e}"
    );
    let run = task(64 << 20)
        .expect("fits in the default")
        .trainer
        .expect("ran");
    assert!(run.peak_memory_bytes > limit, "{run:?}");
}
