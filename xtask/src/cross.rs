//! `cargo xtask cross --target TRIPLE | --board NAME [--release] [--coordinator]`: builds the
//! agent for an ARM board with Debian's cross compilers (no Docker, no `cross` tool).
//!
//! The per-target settings live in `cross/targets/TRIPLE.toml` (Debian packages, tool prefix,
//! qemu binary and sysroot, .deb architecture, whether an onnxruntime wheel exists) and the
//! board profiles in `cross/boards/NAME.toml` (target, `-C target-cpu`, config overrides, image
//! packages). This file reads them, provisions the toolchain idempotently (apt packages and
//! `rustup target add`) and points cargo at the cross linker through environment variables,
//! so nothing outside `cross/` has to know about ARM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// One file of `cross/targets/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Rust target triple.
    pub triple: String,
    /// Debian packages of the cross compiler and the target's libc.
    pub packages: Vec<String>,
    /// Prefix of the cross tools (`PREFIX-gcc`, `PREFIX-strip`).
    pub tool_prefix: String,
    /// qemu-user emulator binary.
    pub qemu: String,
    /// Where qemu-user finds the target's dynamic linker and libc.
    pub sysroot: PathBuf,
    /// Debian architecture for the .deb.
    pub deb_arch: String,
    /// Whether PyPI has an onnxruntime wheel for this architecture.
    pub onnxruntime: bool,
    /// `cranelift` or `pulley`, for the messages.
    pub wasm_backend: String,
}

/// One file of `cross/boards/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Board {
    /// What the board is, for messages.
    pub description: String,
    /// Triple of a `cross/targets/` file.
    pub target: String,
    /// `-C target-cpu` for a board-tuned build.
    pub target_cpu: String,
    /// Smallest RAM variant the overrides are sized for.
    pub memory_mb: u32,
    /// Agent config keys merged over `config/agent.toml` in packages and images.
    #[serde(default)]
    pub agent: toml::Table,
    /// Disk image settings; `None` for boards whose images come from the vendor.
    pub image: Option<BoardImage>,
}

/// `[image]` of a board profile (`cargo xtask image`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardImage {
    /// Debian packages installed into the image besides the agent (kernel, firmware).
    pub packages: Vec<String>,
    /// Kernel console on the board's serial port.
    pub console: String,
}

impl Target {
    /// Reads `cross/targets/{triple}.toml`; an unknown triple lists the known ones.
    pub fn load(triple: &str) -> Result<Target> {
        let dir = crate::root().join("cross/targets");
        let path = dir.join(format!("{triple}.toml"));
        if !path.exists() {
            bail!(
                "no cross settings for target {triple} ({} is missing); known targets: {}",
                path.display(),
                known(&dir)?.join(", ")
            );
        }
        let t: Target = read_toml(&path)?;
        if t.triple != triple {
            bail!("{}: triple is {} not {triple}", path.display(), t.triple);
        }
        Ok(t)
    }

    /// `aarch64_unknown_linux_gnu`, as `cc` reads `CC_{triple}`.
    fn underscored(&self) -> String {
        self.triple.replace('-', "_")
    }

    /// `AARCH64_UNKNOWN_LINUX_GNU`, as cargo reads `CARGO_TARGET_{TRIPLE}_*`.
    pub fn env_key(&self) -> String {
        self.underscored().to_uppercase()
    }

    pub fn tool(&self, name: &str) -> String {
        format!("{}-{name}", self.tool_prefix)
    }

    /// Where cargo puts this target's binaries for a profile, under `target_dir`.
    pub fn out_dir(&self, target_dir: &Path, release: bool) -> PathBuf {
        target_dir
            .join(&self.triple)
            .join(if release { "release" } else { "debug" })
    }

    /// Points `cmd` (a cargo command) at the cross linker and C compiler.
    pub fn cargo_env(&self, cmd: &mut Command) {
        let key = self.env_key();
        let gcc = self.tool("gcc");
        cmd.env(format!("CARGO_TARGET_{key}_LINKER"), &gcc)
            // ring and zstd-sys build C through the `cc` crate.
            .env(format!("CC_{}", self.underscored()), &gcc)
            .env(format!("AR_{}", self.underscored()), self.tool("ar"));
    }

    /// Installs what building for this target needs, if missing: the Debian cross packages
    /// and the Rust standard library.
    pub fn prepare(&self) -> Result<()> {
        let packages: Vec<&str> = self.packages.iter().map(String::as_str).collect();
        crate::provision::ensure_debian_packages(&packages)
            .with_context(|| format!("cannot provision the cross toolchain for {}", self.triple))?;
        crate::provision::ensure_rust_target(&self.triple)
    }
}

impl Board {
    pub fn load(name: &str) -> Result<Board> {
        let dir = crate::root().join("cross/boards");
        let path = dir.join(format!("{name}.toml"));
        if !path.exists() {
            bail!(
                "no board profile {name} ({} is missing); known boards: {}",
                path.display(),
                known(&dir)?.join(", ")
            );
        }
        read_toml(&path)
    }

    /// `config/agent.toml` with this board's `[agent]` keys set (comments kept for the keys
    /// it does not change, so the packaged file still documents itself).
    pub fn agent_config(&self) -> Result<String> {
        let default = std::fs::read_to_string(crate::root().join("config/agent.toml"))
            .context("cannot read config/agent.toml")?;
        override_config(&default, &self.agent)
    }
}

/// Sets `[table] key = value` lines of a commented TOML file in place, keeping everything else.
/// Keys must already be there (the defaults file names every key).
pub fn override_config(text: &str, overrides: &toml::Table) -> Result<String> {
    let mut wanted: BTreeMap<(String, String), String> = BTreeMap::new();
    for (table, keys) in overrides {
        let keys = keys
            .as_table()
            .with_context(|| format!("board [agent.{table}] is not a table"))?;
        for (k, v) in keys {
            wanted.insert((table.clone(), k.clone()), v.to_string());
        }
    }
    let mut table = String::new();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            table = name.trim().to_owned();
        }
        let key = t.split_once('=').map(|(k, _)| k.trim().to_owned());
        match key.and_then(|k| wanted.remove(&(table.clone(), k.clone())).map(|v| (k, v))) {
            Some((k, v)) if !t.starts_with('#') => out.push_str(&format!("{k} = {v}")),
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    if let Some(((table, key), _)) = wanted.into_iter().next() {
        bail!("board override [{table}] {key} is not a key of config/agent.toml");
    }
    Ok(out)
}

/// cargo's target dir: `CARGO_TARGET_DIR` when set (as cargo reads it), else `target/`.
pub fn cargo_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::root().join("target"))
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
}

fn known(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".toml"))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// What `cargo xtask cross` builds.
#[derive(Debug, Clone)]
pub struct Build {
    pub target: Target,
    pub release: bool,
    /// Also build `edge-coordinator` (a coordinator on an ARM gateway).
    pub coordinator: bool,
    /// Board-tuned build: `-C target-cpu`, in its own target dir so it does not evict the
    /// generic build.
    pub target_cpu: Option<String>,
}

impl Build {
    /// The cargo target dir: `target/`, or `target/cpu-{cpu}/` for a tuned build.
    pub fn target_dir(&self) -> PathBuf {
        let base = cargo_target_dir();
        match &self.target_cpu {
            Some(cpu) => base.join(format!("cpu-{cpu}")),
            None => base,
        }
    }

    pub fn out_dir(&self) -> PathBuf {
        self.target.out_dir(&self.target_dir(), self.release)
    }

    /// Provisions the toolchain, builds, and returns the binaries' paths.
    pub fn run(&self) -> Result<Vec<PathBuf>> {
        self.target.prepare()?;
        let mut cmd = crate::cargo();
        cmd.args(["build", "--bins", "--target", &self.target.triple]);
        cmd.args(["-p", "edge-agent"]);
        if self.coordinator {
            cmd.args(["-p", "edge-coordinator"]);
        }
        if self.release {
            cmd.arg("--release");
        }
        if let Some(cpu) = &self.target_cpu {
            cmd.env("CARGO_TARGET_DIR", self.target_dir());
            cmd.env(
                format!("CARGO_TARGET_{}_RUSTFLAGS", self.target.env_key()),
                // Replaces .cargo/config.toml's `build.rustflags`: keep its mangling.
                format!("-C target-cpu={cpu} -C symbol-mangling-version=v0"),
            );
        }
        self.target.cargo_env(&mut cmd);
        crate::run(cmd)
            .with_context(|| format!("cross build for {} failed", self.target.triple))?;
        let mut bins = vec![self.out_dir().join("edge-agent")];
        if self.coordinator {
            bins.push(self.out_dir().join("edge-coordinator"));
        }
        Ok(bins)
    }
}

/// Size of `bin` as built and after `PREFIX-strip` (a copy is stripped; release builds are
/// already stripped by the profile).
pub fn sizes(target: &Target, bin: &Path) -> Result<(u64, u64)> {
    let size = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .with_context(|| format!("cannot stat {}", p.display()))
    };
    let built = size(bin)?;
    let stripped = bin.with_extension("stripped");
    let mut cmd = Command::new(target.tool("strip"));
    cmd.arg("-o").arg(&stripped).arg(bin);
    crate::run(cmd).with_context(|| format!("cannot strip {}", bin.display()))?;
    let s = size(&stripped)?;
    std::fs::remove_file(&stripped)
        .with_context(|| format!("cannot remove {}", stripped.display()))?;
    Ok((built, s))
}

/// `cargo xtask cross`.
pub fn run(
    target: Option<&str>,
    board: Option<&str>,
    release: bool,
    coordinator: bool,
) -> Result<()> {
    let (target, target_cpu) = match (target, board) {
        (_, Some(name)) => {
            let b = Board::load(name)?;
            if let Some(t) = target.filter(|t| *t != b.target) {
                bail!("board {name} is {}, not {t}", b.target);
            }
            println!(
                "board {name}: {} (-C target-cpu={}; config sized for {} MB)",
                b.description, b.target_cpu, b.memory_mb
            );
            (Target::load(&b.target)?, Some(b.target_cpu))
        }
        (Some(t), None) => (Target::load(t)?, None),
        (None, None) => bail!("name a --target or a --board"),
    };
    let build = Build {
        target,
        release,
        coordinator,
        target_cpu,
    };
    let started = std::time::Instant::now();
    let bins = build.run()?;
    println!(
        "built for {} in {:.0} s (wasm: {}; onnxruntime wheel: {})",
        build.target.triple,
        started.elapsed().as_secs_f64(),
        build.target.wasm_backend,
        if build.target.onnxruntime {
            "yes"
        } else {
            "none on PyPI"
        }
    );
    for bin in bins {
        let (built, stripped) = sizes(&build.target, &bin)?;
        println!(
            "{}: {:.1} MiB, stripped {:.1} MiB",
            bin.display(),
            mib(built),
            mib(stripped)
        );
    }
    Ok(())
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_and_board_file_parses_and_boards_name_known_targets() {
        let root = crate::root();
        for t in known(&root.join("cross/targets")).expect("lists targets") {
            Target::load(&t).unwrap_or_else(|e| panic!("{t}: {e:#}"));
        }
        for b in known(&root.join("cross/boards")).expect("lists boards") {
            let board = Board::load(&b).unwrap_or_else(|e| panic!("{b}: {e:#}"));
            Target::load(&board.target).unwrap_or_else(|e| panic!("{b}: {e:#}"));
            board
                .agent_config()
                .unwrap_or_else(|e| panic!("{b}: {e:#}"));
        }
    }

    #[test]
    fn overrides_replace_only_the_named_keys() {
        let text = "# top\n[outbox]\n# cache\ncache_bytes = 8\nmax_bytes = 1\n[sandbox]\nmax_instances = 16\n";
        let mut o = toml::Table::new();
        let mut outbox = toml::Table::new();
        outbox.insert("cache_bytes".into(), toml::Value::Integer(4));
        o.insert("outbox".into(), toml::Value::Table(outbox));
        let got = override_config(text, &o).expect("overrides");
        assert_eq!(
            got,
            "# top\n[outbox]\n# cache\ncache_bytes = 4\nmax_bytes = 1\n[sandbox]\nmax_instances = 16\n"
        );
        let mut bad = toml::Table::new();
        let mut t = toml::Table::new();
        t.insert("nope".into(), toml::Value::Integer(1));
        bad.insert("outbox".into(), toml::Value::Table(t));
        assert!(override_config(text, &bad).is_err());
    }
}
