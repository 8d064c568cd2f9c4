//! Installs what the test suite needs beyond the Rust toolchain, so a fresh machine (or CI)
//! passes with nothing done by hand.
//!
//! Debian packages come through apt-get as root; without root a missing package is an error
//! that names it. Each provisioning step is idempotent and cheap when already satisfied.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Everything `cargo xtask demo` and `cargo xtask test` need before they start a process: the
/// tools and libraries below, then the guest modules and the workspace's binaries. Both
/// commands call this one function, so the README's first command never depends on a step
/// that only the tests take (it once did: the demo failed on a fresh machine for want of the
/// `wasm32-wasip2` target and the modules).
pub fn prepare() -> Result<()> {
    provision()?;
    crate::build_modules()?;
    crate::build_bins()
}

/// The tools and libraries: mosquitto, ONNX Runtime.
fn provision() -> Result<()> {
    let mut apt = Apt::default();
    ensure_mosquitto(&mut apt)?;
    // (The `wasm32-wasip2` target comes with the modules: `build_modules` installs it.)
    // The ONNX Runtime library from the `onnxruntime` wheel on PyPI (the inference tests
    // find it under target/ort/).
    crate::ort::ensure_ort(&crate::root(), crate::ort::host_triple(), false)?;
    // Later steps go here, each as its own function: the ARM targets, cross linkers and
    // qemu-user (Debian packages through `apt`).
    Ok(())
}

/// `rustup target add`, only when the target's standard library is not installed yet.
pub fn ensure_rust_target(target: &str) -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup (the Rust toolchain must come from rustup to add targets)")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == target)
    {
        return Ok(());
    }
    eprintln!("xtask: installing the Rust target {target}");
    let status = Command::new("rustup")
        .args(["target", "add", target])
        .status()
        .context("cannot run rustup")?;
    if !status.success() {
        bail!("rustup target add {target} failed with {status}");
    }
    Ok(())
}

/// The end-to-end tests run private mosquitto brokers on free ports (never the system service
/// on 1883, which the Debian package may start; it is left alone and does not matter).
fn ensure_mosquitto(apt: &mut Apt) -> Result<()> {
    if edge_tests::mosquitto_bin().is_ok() {
        return Ok(());
    }
    eprintln!(
        "xtask: mosquitto is missing; installing the Debian packages mosquitto and mosquitto-clients"
    );
    apt.install(&["mosquitto", "mosquitto-clients"])?;
    edge_tests::mosquitto_bin()
        .context("apt-get installed mosquitto but its binary is still not found")?;
    Ok(())
}

/// Debian's `chromium` for the dashboard test (`tests/tests/dashboard.rs`, headless).
/// `EDGE_CHROMIUM` naming another browser binary skips the package.
pub fn ensure_chromium() -> Result<()> {
    if edge_tests::browser::chromium_bin().is_ok() {
        return Ok(());
    }
    eprintln!("xtask: chromium is missing (the dashboard test runs it headless); installing it");
    // Apt installs without recommends: the GUI extras the headless test does not need.
    Apt::default().install(&["chromium"])?;
    edge_tests::browser::chromium_bin()
        .context("apt-get installed chromium but its binary is still not found")?;
    Ok(())
}

/// Installs the Debian packages among `packages` that are not installed yet (cross compilers,
/// qemu-user, ...). Without root, a missing package is an error naming it.
pub fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let missing = missing_debian_packages(packages)?;
    if missing.is_empty() {
        return Ok(());
    }
    let missing: Vec<&str> = missing.iter().map(String::as_str).collect();
    eprintln!(
        "xtask: installing the Debian packages {}",
        missing.join(", ")
    );
    Apt::default().install(&missing)
}

/// The packages among `packages` that dpkg does not list as installed.
pub fn missing_debian_packages(packages: &[&str]) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for p in packages {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${db:Status-Status}", p])
            .output()
            .context("cannot run dpkg-query (provisioning expects a Debian system)")?;
        if String::from_utf8_lossy(&out.stdout).trim() != "installed" {
            missing.push((*p).to_owned());
        }
    }
    Ok(missing)
}

/// apt-get, with `apt-get update` run at most once per xtask run.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn install(&mut self, packages: &[&str]) -> Result<()> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!(
                "missing Debian package(s) {}: install them (`sudo apt-get install -y {}`) or run \
                 `cargo xtask test` as root so it can",
                packages.join(", "),
                packages.join(" ")
            );
        }
        if !self.updated {
            apt_get(&["update"])?;
            self.updated = true;
        }
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend_from_slice(packages);
        apt_get(&args).with_context(|| format!("cannot install {}", packages.join(", ")))
    }
}

fn apt_get(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed with {status}", args.join(" "));
    }
    Ok(())
}
