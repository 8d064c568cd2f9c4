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
//!
//! Enrollment (`--claim-key`, `--coordinator-identity`, checked by [`Enrollment::from_flags`]):
//! the fleet claim key goes to `/etc/edge-agent/claim.key` (mode 0600, a conffile; the postinst
//! gives it to the service user, which only exists from then on) and `[enrollment]` in the
//! config names it and pins the coordinator. `cargo xtask image` bakes the same keys into its
//! root file system itself ([`with_enrollment`], [`Claim::write`]), from a package without them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use protocol::v1::auth::PublicIdentity;

use crate::cross::{Board, Build, Target, mib, override_config};

/// Where packages and images put the fleet claim key; `[enrollment] claim_key_file` names it.
pub const CLAIM_KEY_PATH: &str = "/etc/edge-agent/claim.key";
/// The agent's service user and group: made by the .deb's postinst (`cross/debian/postinst`),
/// named by the unit's `User=` and `Group=`. The claim key is theirs and nobody else's.
pub const SERVICE_USER: &str = "edge-agent";

/// What `dist` wrote.
#[derive(Debug, Clone)]
pub struct Dist {
    pub deb: PathBuf,
    pub tarball: PathBuf,
    /// The staged tree both were made from.
    pub tree: PathBuf,
}

/// `cargo xtask dist`.
pub fn run(target: Option<&str>, board: Option<&str>, enrollment: &Enrollment) -> Result<()> {
    let dist = build(target, board, enrollment)?;
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
    enrollment.print_notes("dist");
    if enrollment.claim.is_some() {
        println!(
            "dist: warning: {} and {} contain the fleet claim key ({CLAIM_KEY_PATH}), and so does \
             the staged tree: whoever has any of them can enroll devices into the claim's groups. \
             Distribute them like the key itself, never on a public mirror",
            dist.deb.display(),
            dist.tarball.display(),
        );
    }
    Ok(())
}

/// Builds the release agent and packages it, with `enrollment`'s claim key and config keys;
/// `cargo xtask image` installs the .deb (built with [`Enrollment::default`]).
pub fn build(target: Option<&str>, board: Option<&str>, enrollment: &Enrollment) -> Result<Dist> {
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
    let config = enrollment.agent_config(&config)?;
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
    stage_tree(
        &tree,
        &target,
        &agent,
        &libs,
        &config,
        enrollment.claim.as_ref(),
    )?;

    let deb = out.join(format!(
        "edge-agent{suffix}_{version}_{}.deb",
        target.deb_arch
    ));
    build_deb(
        &stage,
        &tree,
        &target,
        &agent,
        version,
        enrollment.claim.is_some(),
        &deb,
    )?;
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
    claim: Option<&Claim>,
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
    if let Some(claim) = claim {
        // Root's here (dpkg-deb --root-owner-group, tar --owner=0); the postinst, or the
        // tarball's instructions below, give it to the service user.
        claim.write(&tree.join(in_tree(CLAIM_KEY_PATH)), None)?;
    }
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
             {}\
             From the tarball: tar -xzf edge-agent-*.tar.gz -C / && useradd --system --user-group \
             --home-dir /var/lib/edge-agent --shell /usr/sbin/nologin edge-agent && {}\
             systemctl daemon-reload && systemctl enable --now edge-agent\n",
            target.triple,
            target.wasm_backend,
            if libs.is_empty() {
                "not included"
            } else {
                "included, from the onnxruntime wheel"
            },
            if claim.is_some() {
                format!(
                    "Enrollment: the fleet claim key {CLAIM_KEY_PATH} (mode 0600, owner \
                     {SERVICE_USER}) enrolls the device at its first start; it is a fleet secret.\n"
                )
            } else {
                "Enrollment: no claim key; the device waits for an operator \
                 (edge-coordinator devices approve) or an allowlist.\n"
                    .to_owned()
            },
            if claim.is_some() {
                format!("chown {SERVICE_USER}:{SERVICE_USER} {CLAIM_KEY_PATH} && ")
            } else {
                String::new()
            },
        ),
        0o644,
    )?;
    Ok(())
}

/// An absolute path in the installed system as a path under a staged tree or root file system.
pub fn in_tree(path: &str) -> &str {
    path.trim_start_matches('/')
}

fn build_deb(
    stage: &Path,
    tree: &Path,
    target: &Target,
    agent: &Path,
    version: &str,
    with_claim: bool,
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
    write(&debian.join("conffiles"), &conffiles(with_claim)?, 0o644)?;
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

/// `cross/debian/conffiles`, and the claim key when the package has one: a conffile, so a
/// local replacement of the key survives upgrades (and purge removes it).
fn conffiles(with_claim: bool) -> Result<String> {
    let path = crate::root().join("cross/debian/conffiles");
    let mut text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    if with_claim {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{CLAIM_KEY_PATH}\n"));
    }
    Ok(text)
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

/// The newest `GLIBC_2.x` version the binary needs (for the .deb's Depends), from the
/// version references `PREFIX-objdump -p` lists (every version a symbol needs, and
/// `GLIBC_ABI_DT_RELR`, which names no symbol: see `agent/build.rs`).
fn glibc_needed(target: &Target, bin: &Path) -> Result<String> {
    let tool = target.tool("objdump");
    let out = Command::new(&tool)
        .arg("-p")
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

/// glibc 2.36 is the first to load packed relative relocations (DT_RELR).
const GLIBC_DT_RELR: &str = "2.36";

fn newest_glibc(objdump: &str) -> Option<String> {
    objdump
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .map(|v| if v == "ABI_DT_RELR" { GLIBC_DT_RELR } else { v })
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

/// What `--claim-key` and `--coordinator-identity` bake into a package or an image, checked.
/// The default bakes nothing: devices enroll unclaimed and trust the first coordinator that
/// accepts them.
#[derive(Default)]
pub struct Enrollment {
    /// The fleet claim key: `[enrollment] claim_key_file`, the file at [`CLAIM_KEY_PATH`].
    pub claim: Option<Claim>,
    /// The coordinator's public identity: `[enrollment] coordinator`.
    pub coordinator: Option<PublicIdentity>,
}

/// A fleet claim key read from a `--claim-key` file. No `Debug`: it holds the secret.
pub struct Claim {
    /// The key file's text as `protocol::keyfile` writes it (hex seed and a newline).
    file_text: String,
    /// The public half, hex, as a coordinator's `[[enrollment.claims]] key` lists it.
    pub public_hex: String,
}

impl Enrollment {
    /// Checks the flags: the claim key must load as `protocol::keyfile` loads it (so the agent
    /// will too), the identity must be the JSON line `edge-coordinator identity` prints (given
    /// as the line itself or a file holding it) with both keys valid.
    pub fn from_flags(claim_key: Option<&Path>, coordinator: Option<&str>) -> Result<Enrollment> {
        Ok(Enrollment {
            claim: claim_key.map(Claim::load).transpose()?,
            coordinator: coordinator.map(parse_identity).transpose()?,
        })
    }

    /// `config` with the `[enrollment]` keys these flags set (unchanged without flags).
    pub fn agent_config(&self, config: &str) -> Result<String> {
        with_enrollment(
            config,
            self.claim.as_ref().map(|_| CLAIM_KEY_PATH),
            self.coordinator.as_ref(),
        )
    }

    /// What devices built without either flag will do, printed as `{verb}: note: ..`.
    pub fn print_notes(&self, verb: &str) {
        if self.claim.is_none() {
            println!(
                "{verb}: note: no --claim-key: devices send unclaimed enrollment requests and wait \
                 until an operator runs `edge-coordinator devices approve ID` (or the coordinator's \
                 [enrollment] allowlist names them)"
            );
        }
        if self.coordinator.is_none() {
            println!(
                "{verb}: note: no --coordinator-identity: devices trust the coordinator whose \
                 answer first accepts them (trust on first use, logged at WARN by the agent)"
            );
        }
    }
}

impl Claim {
    fn load(path: &Path) -> Result<Claim> {
        let key = protocol::keyfile::load_signing_key(path).with_context(|| {
            format!(
                "--claim-key {}: not a usable fleet claim key (make one with \
                 `edge-coordinator keygen --out claim.key`)",
                path.display()
            )
        })?;
        Ok(Claim {
            file_text: format!("{}\n", hex::encode(key.to_bytes())),
            public_hex: protocol::v1::deploy::public_key_hex(&key.verifying_key()),
        })
    }

    /// Writes the key file at `path`, mode 0600 from creation on, and gives it to `owner`
    /// (uid, gid) when one is named.
    pub fn write(&self, path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        // `mode` applies only to a file this call created.
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot chmod {}", path.display()))?;
        f.write_all(self.file_text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("cannot chown {} to {uid}:{gid}", path.display()))?;
        }
        Ok(())
    }
}

/// `--coordinator-identity`: the JSON line itself, or a file holding it (the last line that
/// starts with `{`, so a file that also caught the command's stderr works).
fn parse_identity(arg: &str) -> Result<PublicIdentity> {
    let what = format!("--coordinator-identity {arg}");
    let text = if arg.trim_start().starts_with('{') {
        arg.to_owned()
    } else {
        fs::read_to_string(arg).with_context(|| {
            format!("{what}: cannot read the file (give the file or the JSON line that `edge-coordinator identity --state-dir DIR` prints)")
        })?
    };
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|l| l.starts_with('{'))
        .with_context(|| format!("{what}: no JSON line (expected {IDENTITY_SHAPE})"))?;
    let identity: PublicIdentity = serde_json::from_str(line).with_context(|| {
        format!("{what}: not a coordinator identity (expected {IDENTITY_SHAPE})")
    })?;
    identity
        .validate()
        .with_context(|| format!("{what}: not a coordinator identity"))?;
    Ok(identity)
}

const IDENTITY_SHAPE: &str =
    r#"{"sign":"<64 hex>","agree":"<64 hex>"} as `edge-coordinator identity` prints it"#;

/// `[enrollment] claim_key_file` and `coordinator` set in a commented agent config with
/// [`override_config`], everything else kept. The defaults file shows these optional keys as
/// comments (`# claim_key_file = ".."`): such a line is made live in place, so the key keeps
/// its documentation; a key the table lacks is added at its end, and a file without
/// `[enrollment]` gets the table at its end.
pub fn with_enrollment(
    config: &str,
    claim_key_file: Option<&str>,
    coordinator: Option<&PublicIdentity>,
) -> Result<String> {
    let mut keys = toml::Table::new();
    if let Some(file) = claim_key_file {
        keys.insert(
            "claim_key_file".into(),
            toml::Value::String(file.to_owned()),
        );
    }
    if let Some(c) = coordinator {
        let mut pin = toml::Table::new();
        pin.insert("sign".into(), toml::Value::String(c.sign.clone()));
        pin.insert("agree".into(), toml::Value::String(c.agree.clone()));
        keys.insert("coordinator".into(), toml::Value::Table(pin));
    }
    if keys.is_empty() {
        return Ok(config.to_owned());
    }
    let mut text = config.to_owned();
    for key in keys.keys() {
        text = with_live_key(&text, "enrollment", key);
    }
    let mut o = toml::Table::new();
    o.insert("enrollment".into(), toml::Value::Table(keys));
    override_config(&text, &o)
}

/// The table a `[name]` (or `[[name]]`) line opens.
fn table_header(line: &str) -> Option<&str> {
    let t = line.trim();
    (t.starts_with('[') && t.ends_with(']')).then(|| t.trim_matches(['[', ']']).trim())
}

/// `text` with a live `key = ..` line in `[table]` for [`override_config`] to set: the
/// commented example line uncommented, else a placeholder at the table's end (after its last
/// non-blank line), else a new table at the end of the file.
fn with_live_key(text: &str, table: &str, key: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let assigns = |l: &str| {
        l.trim()
            .split_once('=')
            .is_some_and(|(k, _)| k.trim() == key)
    };
    let Some(start) = lines.iter().position(|l| table_header(l) == Some(table)) else {
        let mut out = text.to_owned();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("\n[{table}]\n{key} = \"\"\n"));
        return out;
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| table_header(l).is_some())
        .map_or(lines.len(), |i| start + 1 + i);
    let section = start + 1..end;
    let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    if lines[section.clone()]
        .iter()
        .any(|l| !l.trim_start().starts_with('#') && assigns(l))
    {
        return text.to_owned();
    }
    let commented = section.clone().find(|&i| {
        lines[i]
            .trim_start()
            .strip_prefix('#')
            .is_some_and(|rest| assigns(rest) && !rest.trim_start().starts_with('#'))
    });
    match commented {
        Some(i) => {
            let rest = lines[i].trim_start().trim_start_matches('#');
            out[i] = rest.trim_start().to_owned();
        }
        None => {
            let last = section
                .clone()
                .rev()
                .find(|&i| !lines[i].trim().is_empty())
                .unwrap_or(start);
            out.insert(last + 1, format!("{key} = \"\""));
        }
    }
    let mut joined = out.join("\n");
    if text.ends_with('\n') {
        joined.push('\n');
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of `[enrollment]` in the agent's defaults file: the optional keys as comments.
    const COMMENTED: &str = "# top\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n\n\
        [enrollment]\n# Fleet claim key baked into the image (key file, mode 0600).\n\
        # claim_key_file = \"/etc/edge-agent/claim.key\"\n\
        # The coordinator's public identity, as `edge-coordinator identity` prints it.\n\
        # coordinator = { sign = \"64 hex digits\", agree = \"64 hex digits\" }\n\
        retry_ms = 5000\n\n[dataset]\nmax_samples = 10\n";

    fn identity() -> PublicIdentity {
        protocol::v1::auth::Identity::generate().public()
    }

    fn parsed(text: &str) -> toml::Table {
        toml::from_str(text).expect("valid TOML")
    }

    #[test]
    fn enrollment_keys_replace_their_commented_examples_and_nothing_else() {
        let id = identity();
        let got = with_enrollment(COMMENTED, Some(CLAIM_KEY_PATH), Some(&id)).expect("sets");
        let want = COMMENTED
            .replace(
                "# claim_key_file = \"/etc/edge-agent/claim.key\"",
                "claim_key_file = \"/etc/edge-agent/claim.key\"",
            )
            .replace(
                "# coordinator = { sign = \"64 hex digits\", agree = \"64 hex digits\" }",
                &format!(
                    "coordinator = {{ agree = \"{}\", sign = \"{}\" }}",
                    id.agree, id.sign
                ),
            );
        assert_eq!(got, want);
        let t = parsed(&got);
        let pin: PublicIdentity = t["enrollment"]["coordinator"]
            .clone()
            .try_into()
            .expect("an identity");
        assert_eq!(pin, id);
        assert_eq!(t["enrollment"]["retry_ms"].as_integer(), Some(5000));
    }

    #[test]
    fn enrollment_keys_only_as_asked() {
        assert_eq!(
            with_enrollment(COMMENTED, None, None).expect("no-op"),
            COMMENTED
        );
        let got = with_enrollment(COMMENTED, Some("/k"), None).expect("sets");
        assert!(got.contains("\nclaim_key_file = \"/k\"\n"), "{got}");
        assert!(got.contains("\n# coordinator = {"), "{got}");
        let got = with_enrollment(COMMENTED, None, Some(&identity())).expect("sets");
        assert!(got.contains("\n# claim_key_file = "), "{got}");
        assert!(parsed(&got)["enrollment"].get("claim_key_file").is_none());
    }

    #[test]
    fn enrollment_keys_overwrite_live_ones_and_fill_a_table_without_them() {
        let live = "[enrollment]\nclaim_key_file = \"/old\"\nretry_ms = 1\n";
        assert_eq!(
            with_enrollment(live, Some("/new"), None).expect("sets"),
            "[enrollment]\nclaim_key_file = \"/new\"\nretry_ms = 1\n"
        );
        // No example line: added after the table's last line, before the blank and the next table.
        let bare = "[enrollment]\nretry_ms = 1\n\n[dataset]\nmax_samples = 10\n";
        assert_eq!(
            with_enrollment(bare, Some("/k"), None).expect("sets"),
            "[enrollment]\nretry_ms = 1\nclaim_key_file = \"/k\"\n\n[dataset]\nmax_samples = 10\n"
        );
        // A key of that name in another table is not the one.
        let other = "[mqtt]\ncoordinator = 1\n";
        let got = with_enrollment(other, None, Some(&identity())).expect("sets");
        assert!(got.starts_with("[mqtt]\ncoordinator = 1\n\n[enrollment]\ncoordinator = {"));
        assert_eq!(parsed(&got)["mqtt"]["coordinator"].as_integer(), Some(1));
    }

    #[test]
    fn the_default_agent_config_takes_the_enrollment_keys() {
        let default = fs::read_to_string(crate::root().join("config/agent.toml")).expect("reads");
        let id = identity();
        let got = with_enrollment(&default, Some(CLAIM_KEY_PATH), Some(&id)).expect("sets");
        let (mut before, mut after) = (parsed(&default), parsed(&got));
        let enrollment = after
            .remove("enrollment")
            .and_then(|v| v.as_table().cloned())
            .expect("an [enrollment] table");
        assert_eq!(enrollment["claim_key_file"].as_str(), Some(CLAIM_KEY_PATH));
        assert_eq!(
            enrollment["coordinator"]["sign"].as_str(),
            Some(id.sign.as_str())
        );
        assert_eq!(
            enrollment["coordinator"]["agree"].as_str(),
            Some(id.agree.as_str())
        );
        // Every other key of [enrollment] and every other table as it was.
        let mut rest = enrollment.clone();
        rest.remove("claim_key_file");
        rest.remove("coordinator");
        let old = before
            .remove("enrollment")
            .and_then(|v| v.as_table().cloned())
            .unwrap_or_default();
        assert_eq!(rest, old);
        assert_eq!(after, before);
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn a_claim_key_flag_must_name_a_private_key_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("claim.key");
        let public = protocol::keyfile::generate_key_file(&path).expect("keygen");
        let e = Enrollment::from_flags(Some(&path), None).expect("a good key loads");
        let claim = e.claim.expect("a claim");
        assert_eq!(
            claim.public_hex,
            protocol::v1::deploy::public_key_hex(&public)
        );
        // Written out as the agent will load it: same key, 0600 even over a looser file.
        let out = dir.path().join("etc/edge-agent/claim.key");
        fs::create_dir_all(out.parent().expect("parent")).expect("mkdir");
        fs::write(&out, "old").expect("writes");
        fs::set_permissions(&out, fs::Permissions::from_mode(0o644)).expect("chmod");
        claim.write(&out, None).expect("writes");
        assert_eq!(mode(&out), 0o600);
        assert_eq!(
            fs::read(&out).expect("reads"),
            fs::read(&path).expect("reads")
        );
        assert_eq!(
            protocol::keyfile::load_signing_key(&out)
                .expect("loads")
                .verifying_key(),
            public
        );

        let refused = |p: &Path| match Enrollment::from_flags(Some(p), None) {
            Ok(_) => panic!("{} accepted", p.display()),
            Err(e) => format!("{e:#}"),
        };
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let msg = refused(&path);
        assert!(
            msg.contains("--claim-key") && msg.contains("chmod 600"),
            "{msg}"
        );
        let garbage = dir.path().join("garbage.key");
        fs::write(&garbage, "not hex\n").expect("writes");
        fs::set_permissions(&garbage, fs::Permissions::from_mode(0o600)).expect("chmod");
        let msg = refused(&garbage);
        assert!(
            msg.contains("does not hold a key") && msg.contains("keygen"),
            "{msg}"
        );
        let msg = refused(&dir.path().join("missing.key"));
        assert!(msg.contains("missing.key"), "{msg}");
    }

    #[test]
    fn a_coordinator_identity_flag_is_the_identity_line_or_a_file_with_it() {
        let id = identity();
        let line = serde_json::to_string(&id).expect("encodes");
        let from_line = Enrollment::from_flags(None, Some(&line)).expect("the JSON line");
        assert_eq!(from_line.coordinator.as_ref(), Some(&id));
        assert!(from_line.claim.is_none());

        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("coordinator.json");
        fs::write(
            &file,
            format!("created the coordinator identity /s/coordinator.key (mode 0600)\n{line}\n"),
        )
        .expect("writes");
        let from_file = Enrollment::from_flags(None, Some(file.to_str().expect("utf-8")))
            .expect("a file with the line");
        assert_eq!(from_file.coordinator, Some(id.clone()));

        let refused = |arg: &str| match Enrollment::from_flags(None, Some(arg)) {
            Ok(_) => panic!("{arg} accepted"),
            Err(e) => format!("{e:#}"),
        };
        let short = format!(r#"{{"sign":"{}","agree":"00"}}"#, id.sign);
        assert!(refused(&short).contains("--coordinator-identity"));
        let extra = format!(r#"{{"sign":"{}","agree":"{}","x":1}}"#, id.sign, id.agree);
        assert!(refused(&extra).contains("not a coordinator identity"));
        let not_hex = format!(r#"{{"sign":"{}","agree":"{}"}}"#, "zz".repeat(32), id.agree);
        assert!(refused(&not_hex).contains("not a coordinator identity"));
        assert!(refused("/nonexistent/coordinator.json").contains("cannot read the file"));
        let empty = dir.path().join("empty.json");
        fs::write(&empty, "\n").expect("writes");
        assert!(refused(empty.to_str().expect("utf-8")).contains("no JSON line"));
    }

    #[test]
    fn the_claim_key_is_a_conffile_only_when_shipped() {
        assert!(!conffiles(false).expect("reads").contains(CLAIM_KEY_PATH));
        let with = conffiles(true).expect("reads");
        assert!(with.lines().any(|l| l == CLAIM_KEY_PATH), "{with}");
        assert!(
            with.lines().any(|l| l == "/etc/edge-agent/agent.toml"),
            "{with}"
        );
    }

    #[test]
    fn the_claim_key_belongs_to_the_user_the_unit_runs_the_agent_as() {
        let unit = fs::read_to_string(crate::root().join("cross/systemd/edge-agent.service"))
            .expect("unit file");
        for line in [
            format!("User={SERVICE_USER}"),
            format!("Group={SERVICE_USER}"),
        ] {
            assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
        }
        let postinst =
            fs::read_to_string(crate::root().join("cross/debian/postinst")).expect("postinst");
        let lines: Vec<&str> = postinst.lines().map(str::trim).collect();
        let user = lines
            .iter()
            .position(|l| l.starts_with("useradd"))
            .expect("postinst adds the user");
        let chown = lines
            .iter()
            .position(|l| *l == format!("chown {SERVICE_USER}:{SERVICE_USER} {CLAIM_KEY_PATH}"))
            .expect("postinst gives the claim key to the service user");
        assert!(
            chown > user,
            "the claim key is chowned before the user exists"
        );
        assert!(lines.contains(&format!("chmod 0600 {CLAIM_KEY_PATH}").as_str()));
    }

    #[test]
    fn the_staged_tree_has_the_claim_key_for_the_agent_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = dir.path().join("claim.key");
        protocol::keyfile::generate_key_file(&key).expect("keygen");
        let e = Enrollment::from_flags(Some(&key), None).expect("loads");
        let agent = dir.path().join("edge-agent");
        fs::write(&agent, "binary").expect("writes");
        let target = Target::load("aarch64-unknown-linux-gnu").expect("target");
        let config = e.agent_config("[enrollment]\n").expect("config");
        let tree = dir.path().join("root");
        stage_tree(&tree, &target, &agent, &[], &config, e.claim.as_ref()).expect("stages");
        let staged = tree.join(in_tree(CLAIM_KEY_PATH));
        assert_eq!(mode(&staged), 0o600);
        assert_eq!(
            fs::read(&staged).expect("reads"),
            fs::read(&key).expect("reads")
        );
        let readme =
            fs::read_to_string(tree.join("usr/share/doc/edge-agent/README")).expect("readme");
        assert!(readme.contains(&format!(
            "chown {SERVICE_USER}:{SERVICE_USER} {CLAIM_KEY_PATH}"
        )));

        let plain = dir.path().join("plain");
        stage_tree(&plain, &target, &agent, &[], "", None).expect("stages");
        assert!(!plain.join(in_tree(CLAIM_KEY_PATH)).exists());
    }

    #[test]
    fn newest_glibc_compares_versions_numerically() {
        let dump = "0000 DF *UND* 0000 (GLIBC_2.17) memcpy\n0000 DF *UND* 0000 (GLIBC_2.9) x\n\
                    0000 DF *UND* 0000 GLIBC_2.34 pthread_create\n0000 w D *UND* GLIBC_PRIVATE y\n";
        assert_eq!(newest_glibc(dump).as_deref(), Some("2.34"));
        assert_eq!(newest_glibc("nothing"), None);
        let relr = "Version References:\n  required from libc.so.6:\n    0x0 0x00 04 GLIBC_ABI_DT_RELR\n\
                    0x0 0x00 03 GLIBC_2.34\n";
        assert_eq!(newest_glibc(relr).as_deref(), Some("2.36"));
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
