//! `cargo xtask ort`: provisions the ONNX Runtime shared library from the official PyPI wheels,
//! and the benchmark model (`silero_vad.onnx` from the `silero-vad` wheel).
//!
//! ort's own downloader cannot work here (only package registries are reachable), and pip is
//! not assumed: the wheel is found through the PyPI JSON API, its sha256 checked against the
//! one PyPI lists, and the `lib*.so*` files under `onnxruntime/capi/` unpacked into
//! `target/ort/{triple}[-gpu]/`. A stamp file records the wheel and each unpacked file's
//! sha256, so a second run only re-hashes the files and downloads nothing.
//!
//! The test suite and the demo call [`ensure_ort`] themselves; the benchmark calls
//! [`ensure_silero`].

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The CPU build. 1.24 is the oldest the agent accepts (ort's `api-24`); pinned so every
/// machine runs the same binary.
pub const ORT_VERSION: &str = "1.32.0";
/// `onnxruntime-gpu` (CUDA/TensorRT providers) lags the CPU wheel by a release on PyPI.
pub const ORT_GPU_VERSION: &str = "1.31.1";
/// The wheel that carries `silero_vad.onnx` (MIT), the benchmark's real model.
pub const SILERO_VERSION: &str = "6.2.3";

const PYPI_JSON: &str = "https://pypi.org/pypi";
const STAMP: &str = ".wheel-stamp";
/// The JSON of a package lists every release: about 1 MB for onnxruntime.
const JSON_LIMIT: u64 = 64 << 20;

/// The Rust target triple of this machine, as `target/ort/` is keyed.
pub fn host_triple() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "aarch64-unknown-linux-gnu",
        "arm" => "armv7-unknown-linux-gnueabihf",
        _ => "x86_64-unknown-linux-gnu",
    }
}

/// The folder the library for `triple` is unpacked into.
pub fn ort_dir(root: &Path, triple: &str, gpu: bool) -> PathBuf {
    let name = if gpu {
        format!("{triple}-gpu")
    } else {
        triple.to_owned()
    };
    root.join("target").join("ort").join(name)
}

/// Makes sure `target/ort/{triple}[-gpu]/libonnxruntime.so` exists and matches the pinned
/// wheel; downloads and unpacks it otherwise. Returns the library's path.
pub fn ensure_ort(root: &Path, triple: &str, gpu: bool) -> Result<PathBuf> {
    let arch = match triple.split('-').next() {
        Some("x86_64") => "x86_64",
        Some("aarch64") => "aarch64",
        _ => bail!(
            "no onnxruntime wheel on PyPI for {triple}: only x86_64 and aarch64 are published \
             (armv7 needs a vendor or source build, given to the agent as inference.library)"
        ),
    };
    let (package, version) = if gpu {
        ("onnxruntime-gpu", ORT_GPU_VERSION)
    } else {
        ("onnxruntime", ORT_VERSION)
    };
    let dir = ort_dir(root, triple, gpu);
    let lib = dir.join("libonnxruntime.so");
    if stamp_ok(&dir)? && lib.exists() {
        return Ok(lib);
    }
    let wheel = find_wheel(package, version, |f| {
        f.contains("-manylinux")
            && f.ends_with(&format!("_{arch}.whl"))
            && !f.contains("t-manylinux")
    })?;
    eprintln!(
        "xtask: fetching {} ({} MB)",
        wheel.filename,
        wheel.size >> 20
    );
    let bytes = download(&wheel)?;
    // Clear what an interrupted or older unpack left, so the folder holds one version only.
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    let files = unpack(&bytes, &dir, |name| {
        name.strip_prefix("onnxruntime/capi/")
            .filter(|f| f.starts_with("lib") && f.contains(".so") && !f.contains('/'))
            .map(str::to_owned)
    })?;
    // The versioned file (libonnxruntime.so.1.32.0) under its plain name, which is what the
    // agent and ort look for.
    let versioned = files
        .iter()
        .find(|f| f.starts_with("libonnxruntime.so."))
        .with_context(|| {
            format!(
                "{} holds no onnxruntime/capi/libonnxruntime.so.*",
                wheel.filename
            )
        })?;
    std::os::unix::fs::symlink(versioned, &lib)
        .with_context(|| format!("cannot link {}", lib.display()))?;
    write_stamp(&dir, &wheel, &files)?;
    Ok(lib)
}

/// Makes sure `target/models/silero_vad.onnx` exists (from the pinned `silero-vad` wheel).
pub fn ensure_silero(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target").join("models");
    let model = dir.join("silero_vad.onnx");
    if stamp_ok(&dir)? && model.exists() {
        return Ok(model);
    }
    let wheel = find_wheel("silero-vad", SILERO_VERSION, |f| {
        f.ends_with("-none-any.whl")
    })?;
    eprintln!(
        "xtask: fetching {} ({} MB)",
        wheel.filename,
        wheel.size >> 20
    );
    let bytes = download(&wheel)?;
    let files = unpack(&bytes, &dir, |name| {
        (name.ends_with("/silero_vad.onnx")).then(|| "silero_vad.onnx".to_owned())
    })?;
    if files.is_empty() {
        bail!("{} holds no silero_vad.onnx", wheel.filename);
    }
    write_stamp(&dir, &wheel, &files)?;
    Ok(model)
}

/// A Python venv at `target/ort/venv` with the pinned onnxruntime wheel and numpy, for the
/// benchmark's baseline (ONNX Runtime's own Python API). Returns its `python`.
pub fn ensure_bench_venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target").join("ort").join("venv");
    let python = venv.join("bin").join("python");
    let ready = venv.join(format!(".onnxruntime-{ORT_VERSION}"));
    if ready.exists() && python.exists() {
        return Ok(python);
    }
    eprintln!(
        "xtask: creating {} with onnxruntime {ORT_VERSION} and numpy",
        venv.display()
    );
    crate::run({
        let mut c = std::process::Command::new("python3");
        c.args(["-m", "venv"]).arg(&venv);
        c
    })
    .context("python3 -m venv failed (the benchmark baseline needs python3 with venv)")?;
    crate::run({
        let mut c = std::process::Command::new(&python);
        c.args(["-m", "pip", "install", "--quiet"])
            .arg(format!("onnxruntime=={ORT_VERSION}"))
            .arg("numpy");
        c
    })
    .context("pip install onnxruntime numpy failed")?;
    fs::write(&ready, "").with_context(|| format!("cannot write {}", ready.display()))?;
    Ok(python)
}

/// One file of a release, as the PyPI JSON API lists it.
#[derive(Debug, Clone)]
pub struct WheelFile {
    pub filename: String,
    pub url: String,
    pub sha256: String,
    pub size: u64,
}

/// Finds the wheel of `package` `version` whose file name `pick` accepts (the first in name
/// order, so every machine picks the same one).
pub fn find_wheel(package: &str, version: &str, pick: impl Fn(&str) -> bool) -> Result<WheelFile> {
    let json_url = format!("{PYPI_JSON}/{package}/json");
    let text = agent()
        .get(&json_url)
        .call()
        .with_context(|| format!("cannot fetch {json_url}"))?
        .body_mut()
        .with_config()
        .limit(JSON_LIMIT)
        .read_to_string()
        .with_context(|| format!("cannot read {json_url}"))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{json_url} is not JSON"))?;
    let files = doc["releases"][version]
        .as_array()
        .with_context(|| format!("{package} {version} is not on PyPI ({json_url})"))?;
    let base = url::Url::parse(&json_url).context("bad PyPI url")?;
    let mut found: Vec<WheelFile> = files
        .iter()
        .filter_map(|f| {
            let filename = f["filename"].as_str()?;
            if f["packagetype"].as_str() != Some("bdist_wheel") || !pick(filename) {
                return None;
            }
            // Mirrors (and the proxy here) give URLs relative to the JSON document.
            let url = base.join(f["url"].as_str()?).ok()?;
            Some(WheelFile {
                filename: filename.to_owned(),
                url: url.to_string(),
                sha256: f["digests"]["sha256"].as_str()?.to_owned(),
                size: f["size"].as_u64().unwrap_or(0),
            })
        })
        .collect();
    found.sort_by(|a, b| a.filename.cmp(&b.filename));
    found
        .into_iter()
        .next()
        .with_context(|| format!("{package} {version} has no wheel for this platform on PyPI"))
}

/// Downloads a wheel into memory (the largest, onnxruntime-gpu, is ~250 MB) and checks its
/// sha256 against PyPI's.
pub fn download(wheel: &WheelFile) -> Result<Vec<u8>> {
    let mut resp = agent()
        .get(&wheel.url)
        .call()
        .with_context(|| format!("cannot fetch {}", wheel.url))?;
    let mut bytes = Vec::with_capacity(usize::try_from(wheel.size).unwrap_or(0));
    resp.body_mut()
        .with_config()
        .limit(u64::MAX)
        .reader()
        .read_to_end(&mut bytes)
        .with_context(|| format!("download of {} broke off", wheel.url))?;
    let got = hex::encode(Sha256::digest(&bytes));
    if got != wheel.sha256 {
        bail!(
            "{}: sha256 {got} does not match PyPI's {}",
            wheel.filename,
            wheel.sha256
        );
    }
    Ok(bytes)
}

/// Unpacks the entries `rename` maps to a file name into `dir`; returns the names written.
fn unpack(
    wheel: &[u8],
    dir: &Path,
    rename: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut zip =
        zip::ZipArchive::new(std::io::Cursor::new(wheel)).context("wheel is not a zip")?;
    let mut written = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).context("corrupt wheel entry")?;
        let entry_name = entry
            .name()
            .context("wheel entry with a bad name")?
            .into_owned();
        let Some(name) = rename(&entry_name) else {
            continue;
        };
        let dest = dir.join(&name);
        let tmp = dir.join(format!(".{name}.part"));
        let mut out =
            fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        std::io::copy(&mut entry, &mut out)
            .with_context(|| format!("cannot unpack {entry_name}"))?;
        out.flush()?;
        fs::rename(&tmp, &dest).with_context(|| format!("cannot write {}", dest.display()))?;
        written.push(name);
    }
    Ok(written)
}

/// Stamp: the wheel's name and sha256, then one `sha256  file` line per unpacked file.
fn write_stamp(dir: &Path, wheel: &WheelFile, files: &[String]) -> Result<()> {
    let mut text = format!("{} {}\n", wheel.filename, wheel.sha256);
    for f in files {
        text.push_str(&format!("{}  {f}\n", file_sha256(&dir.join(f))?));
    }
    let path = dir.join(STAMP);
    fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Whether every file the stamp lists is there with the recorded sha256.
fn stamp_ok(dir: &Path) -> Result<bool> {
    let Ok(text) = fs::read_to_string(dir.join(STAMP)) else {
        return Ok(false);
    };
    for line in text.lines().skip(1) {
        let Some((sum, file)) = line.split_once("  ") else {
            return Ok(false);
        };
        match file_sha256(&dir.join(file)) {
            Ok(got) if got == sum => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

fn file_sha256(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// The system's CA store: a TLS-intercepting proxy's CA is installed there, not in
/// webpki-roots.
fn agent() -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::PlatformVerifier)
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .build()
        .new_agent()
}
