//! Link the agent's binary with packed relative relocations (DT_RELR) on glibc targets.
//!
//! A position-independent executable carries one 24-byte `R_*_RELATIVE` entry per pointer
//! in its data (vtables, string tables, wasmtime's and cranelift's static tables): about
//! 840 KiB for this binary, which the dynamic loader reads at every start and which then
//! stays mapped. Packed (`-z pack-relative-relocs`) they take about 9 KiB, and the idle
//! agent's PSS drops by about 1.2 MB (`cargo xtask bench rss`). The binary stays
//! position-independent (ASLR is kept); glibc 2.36 or later is needed to run it (the binary
//! then names `GLIBC_ABI_DT_RELR`, which `cargo xtask dist` turns into the package's libc6
//! dependency).
//!
//! GNU ld supports the option on x86_64 only (binutils 2.40, Debian bookworm's cross
//! binutils ignore it for aarch64 and armv7), so those targets link with the LLD that the
//! Rust toolchain ships (`rust-lld`, through its `gcc-ld/ld.lld` wrapper; rustc already links
//! x86_64-unknown-linux-gnu with it). Where that wrapper is missing the binary is linked as
//! before, with a build warning.
//!
//! Release builds also take `hot-text.ld` (written by `cargo xtask hot-text`), a linker script
//! that puts the functions a connected, idle agent runs in one output section before `.text`,
//! so that its code fills a few contiguous pages instead of fault-around windows all over the
//! binary. It goes only to the LLD links above (it has been tried with LLD alone), so
//! `EDGE_LINK_NO_RELR=1` or a missing `rust-lld` also leaves it out; `EDGE_LINK_NO_HOT_TEXT=1`
//! leaves out only it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=EDGE_LINK_NO_RELR");
    println!("cargo:rerun-if-env-changed=EDGE_LINK_NO_HOT_TEXT");
    println!("cargo:rerun-if-env-changed=EDGE_LINK_MAP");
    println!("cargo:rerun-if-changed=hot-text.ld");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" {
        return;
    }
    // Opt-out for a board whose C library is older than 2.36.
    if !var("EDGE_LINK_NO_RELR").is_empty() {
        return;
    }
    if var("CARGO_CFG_TARGET_ARCH") != "x86_64" {
        match toolchain_lld() {
            Some(dir) => {
                println!("cargo:rustc-link-arg-bins=-B{}", dir.display());
                println!("cargo:rustc-link-arg-bins=-fuse-ld=lld");
            }
            None => {
                println!(
                    "cargo:warning=no gcc-ld/ld.lld in the Rust toolchain: edge-agent is linked \
                     without packed relocations (about 1.2 MB more resident memory)"
                );
                return;
            }
        }
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    hot_text();
    // The linker's map of the binary (every input section's name, address and size), which
    // names the code of a stripped build: `cargo xtask hot-text` reads it.
    if let Some(map) = std::env::var_os("EDGE_LINK_MAP").filter(|v| !v.is_empty()) {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,-Map={}",
            PathBuf::from(map).display()
        );
    }
}

/// Release links of the bins take `hot-text.ld` where it exists (LLD reads a script of
/// `SECTIONS { ... } INSERT BEFORE .text;` as an addition to its default layout).
fn hot_text() {
    if std::env::var("PROFILE").as_deref() != Ok("release")
        || std::env::var_os("EDGE_LINK_NO_HOT_TEXT").is_some_and(|v| !v.is_empty())
    {
        return;
    }
    let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") else {
        return;
    };
    let script = PathBuf::from(dir).join("hot-text.ld");
    let (Ok(text), Some(out)) = (std::fs::read(&script), std::env::var_os("OUT_DIR")) else {
        return;
    };
    // Cargo relinks when a link argument changes, not when a file it names does: link a copy
    // named by its contents.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hasher::write(&mut h, &text);
    let copy = PathBuf::from(out).join(format!(
        "hot-text-{:016x}.ld",
        std::hash::Hasher::finish(&h)
    ));
    if std::fs::write(&copy, &text).is_ok() {
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", copy.display());
    }
}

/// The toolchain's `lib/rustlib/HOST/bin/gcc-ld`, holding the `ld.lld` wrapper around
/// `rust-lld` that `cc -fuse-ld=lld` finds through `-B`.
fn toolchain_lld() -> Option<PathBuf> {
    let rustc = std::env::var_os("RUSTC")?;
    let host = std::env::var("HOST").ok()?;
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let sysroot = String::from_utf8(out.stdout).ok()?;
    let dir = PathBuf::from(sysroot.trim()).join(format!("lib/rustlib/{host}/bin/gcc-ld"));
    dir.join("ld.lld").is_file().then_some(dir)
}
