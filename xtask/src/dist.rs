//! `cargo xtask dist --target TRIPLE | --board NAME`: a .deb and a tarball of the agent for an
//! ARM board, under `target/dist/`.
//!
//! Both carry the same tree: `/usr/lib/edge-agent/edge-agent` (release build, stripped) with
//! the onnxruntime wheel's libraries beside it (the agent finds `libonnxruntime.so` next to
//! its executable; none on armhf), `/usr/bin/edge-agent` linking to it, the default config at
//! `/etc/edge-agent/agent.toml` (a board's overrides applied) and the hardened systemd unit
//! from `cross/systemd/`. The .deb is built with `dpkg-deb` from a staged tree (maintainer
//! scripts in `cross/debian/` add the service user and enable the unit); the tarball holds
//! the tree to unpack at `/`. Staging starts from an empty folder each time, so a run never
//! ships a file a previous run left.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cross::{Board, Build, Target, mib};

/// What `dist` wrote.
#[derive(Debug, Clone)]
pub struct Dist {
    pub deb: PathBuf,
    pub tarball: PathBuf,
    /// The staged tree both were made from.
    pub tree: PathBuf,
}

/// `cargo xtask dist`.
pub fn run(target: Option<&str>, board: Option<&str>) -> Result<()> {
    let dist = build(target, board)?;
    for f in [&dist.deb, &dist.tarball] {
        let len = fs::metadata(f)
            .with_context(|| format!("cannot stat {}", f.display()))?
            .len();
        println!("{}: {:.1} MiB", f.display(), mib(len));
    }
    println!(
        "dist: staged tree (what both contain): {}",
        dist.tree.display()
    );
    Ok(())
}

/// Builds the release agent and packages it; `cargo xtask image` installs the .deb.
pub fn build(target: Option<&str>, board: Option<&str>) -> Result<Dist> {
    let board = board
        .map(|b| Board::load(b).map(|p| (b.to_owned(), p)))
        .transpose()?;
    let triple = match (&board, target) {
        (Some((name, b)), Some(t)) if b.target != t => {
            bail!("board {name} is {}, not {t}", b.target)
        }
        (Some((_, b)), _) => b.target.clone(),
        (None, Some(t)) => t.to_owned(),
        (None, None) => bail!("name a --target or a --board"),
    };
    let target = Target::load(&triple)?;
    let build = Build {
        target: target.clone(),
        release: true,
        coordinator: false,
        target_cpu: None,
    };
    let agent = build
        .run()?
        .into_iter()
        .next()
        .context("the cross build returned no binary")?;
    let config = match &board {
        Some((_, b)) => b.agent_config()?,
        None => fs::read_to_string(crate::root().join("config/agent.toml"))
            .context("cannot read config/agent.toml")?,
    };
    let libs = if target.onnxruntime {
        let lib = crate::ort::ensure_ort(&crate::root(), &target.triple, false)?;
        ort_files(lib.parent().context("library path has no folder")?)?
    } else {
        println!(
            "dist: no onnxruntime library for {} (none on PyPI): the package runs without inference \
             unless [inference] library names a vendor build",
            target.triple
        );
        Vec::new()
    };

    let version = env!("CARGO_PKG_VERSION");
    let suffix = board
        .as_ref()
        .map(|(n, _)| format!("-{n}"))
        .unwrap_or_default();
    let out = crate::root().join("target/dist");
    let stage = out.join(format!("stage-{}{suffix}", target.triple));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("cannot clear {}", stage.display()))?;
    }
    let tree = stage.join("root");
    stage_tree(&tree, &target, &agent, &libs, &config)?;

    let deb = out.join(format!(
        "edge-agent{suffix}_{version}_{}.deb",
        target.deb_arch
    ));
    build_deb(&stage, &tree, &target, &agent, version, &deb)?;
    let tarball = out.join(format!(
        "edge-agent{suffix}-{version}-{}.tar.gz",
        target.triple
    ));
    build_tarball(&tree, &tarball)?;
    Ok(Dist { deb, tarball, tree })
}

/// The library files the wheel unpacked (`libonnxruntime.so.1.x`, providers), and the
/// `libonnxruntime.so` link to them.
fn ort_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("lib") && n.contains(".so"))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn stage_tree(
    tree: &Path,
    target: &Target,
    agent: &Path,
    libs: &[PathBuf],
    config: &str,
) -> Result<()> {
    let libdir = tree.join("usr/lib/edge-agent");
    mkdir(&libdir)?;
    copy(agent, &libdir.join("edge-agent"), 0o755)?;
    for lib in libs {
        let name = lib.file_name().context("library without a name")?;
        let dest = libdir.join(name);
        if lib.is_symlink() {
            let to = fs::read_link(lib)
                .with_context(|| format!("cannot read link {}", lib.display()))?;
            symlink(&to, &dest)?;
        } else {
            copy(lib, &dest, 0o644)?;
        }
    }
    mkdir(&tree.join("usr/bin"))?;
    symlink(
        Path::new("../lib/edge-agent/edge-agent"),
        &tree.join("usr/bin/edge-agent"),
    )?;
    mkdir(&tree.join("etc/edge-agent"))?;
    write(&tree.join("etc/edge-agent/agent.toml"), config, 0o644)?;
    let unit_dir = tree.join("usr/lib/systemd/system");
    mkdir(&unit_dir)?;
    copy(
        &crate::root().join("cross/systemd/edge-agent.service"),
        &unit_dir.join("edge-agent.service"),
        0o644,
    )?;
    let doc = tree.join("usr/share/doc/edge-agent");
    mkdir(&doc)?;
    write(
        &doc.join("README"),
        &format!(
            "edge-agent for {} (WASM: {}; ONNX Runtime: {}).\n\
             Config: /etc/edge-agent/agent.toml (set mqtt.url and deploy.trusted_keys).\n\
             Service: systemctl status edge-agent; logs: journalctl -u edge-agent.\n\
             State (outbox, identity): /var/lib/edge-agent.\n\
             From the tarball: tar -xzf edge-agent-*.tar.gz -C / && useradd --system --user-group \
             --home-dir /var/lib/edge-agent --shell /usr/sbin/nologin edge-agent && \
             systemctl daemon-reload && systemctl enable --now edge-agent\n",
            target.triple,
            target.wasm_backend,
            if libs.is_empty() {
                "not included"
            } else {
                "included, from the onnxruntime wheel"
            }
        ),
        0o644,
    )?;
    Ok(())
}

fn build_deb(
    stage: &Path,
    tree: &Path,
    target: &Target,
    agent: &Path,
    version: &str,
    deb: &Path,
) -> Result<()> {
    let pkg = stage.join("deb");
    // dpkg-deb builds from one folder: the tree plus DEBIAN/.
    copy_tree(tree, &pkg)?;
    let debian = pkg.join("DEBIAN");
    mkdir(&debian)?;
    let src = crate::root().join("cross/debian");
    let control = fs::read_to_string(src.join("control"))
        .with_context(|| format!("cannot read {}", src.join("control").display()))?
        .replace("@VERSION@", version)
        .replace("@ARCH@", &target.deb_arch)
        .replace(
            "@DEPENDS@",
            &format!("libc6 (>= {}), passwd", glibc_needed(target, agent)?),
        )
        .replace("@INSTALLED_SIZE@", &(du_bytes(tree, 1)? / 1024).to_string());
    write(&debian.join("control"), &control, 0o644)?;
    copy(&src.join("conffiles"), &debian.join("conffiles"), 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(&src.join(script), &debian.join(script), 0o755)?;
    }
    if !which_ok("dpkg-deb") {
        crate::provision::ensure_debian_packages(&["dpkg"])?;
    }
    let mut cmd = Command::new("dpkg-deb");
    cmd.args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&pkg)
        .arg(deb);
    crate::run(cmd).with_context(|| format!("dpkg-deb could not build {}", deb.display()))
}

fn build_tarball(tree: &Path, tarball: &Path) -> Result<()> {
    let mut cmd = Command::new("tar");
    cmd.arg("-C")
        .arg(tree)
        .args([
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--sort=name",
            "-czf",
        ])
        .arg(tarball)
        .args(["etc", "usr"]);
    crate::run(cmd).with_context(|| format!("tar could not write {}", tarball.display()))
}

/// The newest `GLIBC_2.x` symbol version the binary needs (for the .deb's Depends), from
/// `PREFIX-objdump -T`.
fn glibc_needed(target: &Target, bin: &Path) -> Result<String> {
    let tool = target.tool("objdump");
    let out = Command::new(&tool)
        .arg("-T")
        .arg(bin)
        .output()
        .with_context(|| format!("cannot run {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} -T {} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    newest_glibc(&text).with_context(|| format!("{} needs no GLIBC symbol version", bin.display()))
}

fn newest_glibc(objdump: &str) -> Option<String> {
    objdump
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let parts: Option<Vec<u32>> = v.split('.').map(|p| p.parse().ok()).collect();
            parts.map(|p| (p, v.to_owned()))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, v)| v)
}

/// Bytes under `dir`: each file's size rounded up to `block` bytes, and `block` per folder
/// when `block > 1` (a filesystem's usage); `block = 1`: the files' apparent sizes only.
pub fn du_bytes(dir: &Path, block: u64) -> Result<u64> {
    let block = block.max(1);
    let mut total = 0;
    for e in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e?;
        let meta = fs::symlink_metadata(e.path())?;
        total += if meta.is_dir() {
            (if block > 1 { block } else { 0 }) + du_bytes(&e.path(), block)?
        } else {
            meta.len().div_ceil(block) * block
        };
    }
    Ok(total)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    mkdir(to)?;
    for e in fs::read_dir(from).with_context(|| format!("cannot list {}", from.display()))? {
        let e = e?;
        let (src, dest) = (e.path(), to.join(e.file_name()));
        let meta = fs::symlink_metadata(&src)?;
        if meta.is_symlink() {
            symlink(&fs::read_link(&src)?, &dest)?;
        } else if meta.is_dir() {
            copy_tree(&src, &dest)?;
        } else {
            copy(&src, &dest, meta.permissions().mode() & 0o777)?;
        }
    }
    Ok(())
}

fn mkdir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Folders in a package are 0755 whatever the umask of the machine that built it.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", dir.display()))
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", to.display()))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

fn symlink(to: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(to, link)
        .with_context(|| format!("cannot link {} to {}", link.display(), to.display()))
}

fn which_ok(bin: &str) -> bool {
    Command::new(bin).arg("--version").output().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_glibc_compares_versions_numerically() {
        let dump = "0000 DF *UND* 0000 (GLIBC_2.17) memcpy\n0000 DF *UND* 0000 (GLIBC_2.9) x\n\
                    0000 DF *UND* 0000 GLIBC_2.34 pthread_create\n0000 w D *UND* GLIBC_PRIVATE y\n";
        assert_eq!(newest_glibc(dump).as_deref(), Some("2.34"));
        assert_eq!(newest_glibc("nothing"), None);
    }

    #[test]
    fn the_unit_is_hardened_and_restarts() {
        let unit = fs::read_to_string(crate::root().join("cross/systemd/edge-agent.service"))
            .expect("unit file");
        for line in [
            "Restart=on-failure",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/edge-agent",
            "StateDirectory=edge-agent",
            "NoNewPrivileges=yes",
            "ExecStart=/usr/lib/edge-agent/edge-agent run --config /etc/edge-agent/agent.toml",
        ] {
            assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
        }
        assert!(unit.lines().any(|l| l.starts_with("MemoryMax=")));
        // The agent speaks sd_notify (agent/src/sd_notify.rs): readiness and a watchdog.
        for line in ["Type=notify", "NotifyAccess=main"] {
            assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
        }
        assert!(unit.lines().any(|l| l.starts_with("WatchdogSec=")));
    }
}
