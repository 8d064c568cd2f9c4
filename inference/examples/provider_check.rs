//! `provider_check LIB_PATH [PROVIDERS]`: which execution provider really runs two small models
//! (the `onnx_builder` CNN and a linear layer) on this machine, how fast at batch 1, and how far
//! their outputs are from the CPU provider's.
//!
//! `PROVIDERS` is a comma list of our provider names (default `cuda,cpu`). Loads the runtime
//! from `LIB_PATH`, loads each model with those providers and prints its `ProviderReport`, runs
//! it 200 times (after a warm-up) and prints the median, then does the same on `cpu` alone and
//! prints the max abs difference between the two outputs.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use edge_inference::{InferenceConfig, Model, Provider, Runtime, Tensor};
use edge_testmodels::onnx_builder::{self, SmallCnn};

const WARMUP: usize = 20;
const ITERS: usize = 200;

fn parse_provider(s: &str) -> Option<Provider> {
    Provider::ALL
        .into_iter()
        .find(|p| p.as_str() == s.trim().to_ascii_lowercase())
}

/// Median latency of `ITERS` runs, and the last output (first output tensor as f32).
fn bench(model: &Model, input: &Tensor) -> Result<(Duration, Vec<f32>), String> {
    let inputs = std::slice::from_ref(input);
    for _ in 0..WARMUP {
        model.run(inputs).map_err(|e| e.to_string())?;
    }
    let mut times = Vec::with_capacity(ITERS);
    let mut last = Vec::new();
    for _ in 0..ITERS {
        let t = Instant::now();
        let out = model.run(inputs).map_err(|e| e.to_string())?;
        times.push(t.elapsed());
        last = out
            .first()
            .and_then(Tensor::to_f32)
            .ok_or("output is not f32")?;
    }
    times.sort();
    Ok((times[ITERS / 2], last))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(lib) = args.next() else {
        eprintln!("usage: provider_check LIB_PATH [providers, default cuda,cpu]");
        return ExitCode::from(2);
    };
    let list = args.next().unwrap_or_else(|| "cuda,cpu".into());
    let mut providers = Vec::new();
    for name in list.split(',').filter(|s| !s.trim().is_empty()) {
        match parse_provider(name) {
            Some(p) => providers.push(p),
            None => {
                eprintln!("unknown provider {name:?}");
                return ExitCode::from(2);
            }
        }
    }

    let config = InferenceConfig {
        library: Some(PathBuf::from(&lib)),
        providers: providers.clone(),
        ..InferenceConfig::default()
    };
    let rt = match Runtime::load(&config) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let built: Vec<&str> = rt.built_in_providers().iter().map(|p| p.as_str()).collect();
    println!(
        "runtime {} at {} (built in: {})",
        rt.version(),
        rt.library().display(),
        built.join(", ")
    );
    // The same library (loaded once per process) with only the CPU provider: the reference.
    let cpu_rt = Runtime::load(&InferenceConfig {
        providers: vec![Provider::Cpu],
        ..config.clone()
    })
    .expect("the library is already loaded");

    let cnn = SmallCnn::example();
    let (lin_in, lin_out) = (256u32, 128u32);
    let w: Vec<f32> = (0..lin_in * lin_out)
        .map(|i| (i as f32 * 0.37).sin() * 0.1)
        .collect();
    let b: Vec<f32> = (0..lin_out).map(|i| 0.01 * i as f32).collect();
    let lin_x: Vec<f32> = (0..lin_in).map(|i| (i as f32 * 0.11).cos()).collect();
    let models: Vec<(&str, Vec<u8>, Tensor)> = vec![
        ("small_cnn", cnn.to_onnx(), cnn.example_input(1)),
        (
            "linear_256x128",
            onnx_builder::linear(lin_in, lin_out, &w, &b),
            Tensor::from_f32(vec![1, lin_in], &lin_x).unwrap(),
        ),
    ];

    let mut failed = false;
    for (name, bytes, input) in &models {
        println!("== {name}");
        let model = match Model::load(&rt, name, "1", bytes) {
            Ok(m) => m,
            Err(e) => {
                println!("  load with [{list}] failed: {e}");
                failed = true;
                continue;
            }
        };
        println!("  report: {}", model.provider_report());
        println!(
            "  provider={} placement={:?}",
            model.provider_report().provider,
            model.provider_report().placement
        );
        for s in &model.provider_report().skipped {
            println!("  skipped {}: {}", s.provider, s.reason);
        }
        let cpu_model = Model::load(&cpu_rt, name, "cpu", bytes).expect("cpu provider loads it");
        let (t_sel, out_sel) = match bench(&model, input) {
            Ok(r) => r,
            Err(e) => {
                println!("  run on {} failed: {e}", model.provider_report().provider);
                failed = true;
                continue;
            }
        };
        let (t_cpu, out_cpu) = bench(&cpu_model, input).expect("cpu run");
        println!(
            "  median latency batch 1 over {ITERS} runs: {} {:.1} us, cpu {:.1} us",
            model.provider_report().provider,
            t_sel.as_secs_f64() * 1e6,
            t_cpu.as_secs_f64() * 1e6
        );
        println!(
            "  max abs diff vs cpu: {:e} ({} values)",
            max_abs_diff(&out_sel, &out_cpu),
            out_cpu.len()
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
