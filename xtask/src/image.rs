//! `cargo xtask image --board NAME [--mqtt-url URL] [--claim-key FILE]
//! [--coordinator-identity FILE|JSON] [--smoke]`: a flashable Debian disk image for a board with
//! the agent installed and enabled, under `target/image/`.
//!
//! 1. `dist` builds the board's .deb (release agent, ONNX Runtime, board config, unit).
//! 2. debootstrap (`--foreign`) unpacks a minimal Debian for the board's architecture; the
//!    second stage and every later step run in a chroot through qemu-user-static, registered
//!    with binfmt_misc (the `F` flag: the emulator is opened at registration, so nothing is
//!    copied into the image); each chroot command gets `/proc` mounted for its duration
//!    (package scripts need it, see [`ProcMount`]). The result is cached per suite,
//!    architecture and package list in `target/image/cache/`, so a rerun only redoes the
//!    board-specific part.
//! 3. In the chroot: the board's `[image] packages` (kernel, firmware), the .deb (its postinst
//!    adds the service user and enables the unit), systemd-networkd with DHCP on wired
//!    interfaces, timesyncd, an empty `/etc/machine-id` so each board makes its own (the agent
//!    derives its device id from it). With `--claim-key` the fleet claim key goes to
//!    `/etc/edge-agent/claim.key` (0600, the service user's: the unit runs the agent as
//!    `edge-agent`, which the .deb's postinst made, so its ids are read from the image's own
//!    passwd and group files) and `[enrollment]` names it (and the pinned coordinator, with
//!    `--coordinator-identity`): a board that boots enrolls itself with no one logging in.
//! 4. The disk: an MBR with a FAT32 firmware partition (`RASPIFIRM`, `/boot/firmware`, what
//!    Debian's raspi-firmware fills) and an ext4 root (`RASPIROOT`), both made from folders
//!    (`mkfs.vfat` + `mcopy`, `mkfs.ext4 -d`) so no loop device or mount is needed.
//! 5. `--smoke`: the host coordinator (embedded broker, port 0), a copy of the image whose
//!    agent points at it through QEMU's user network (`10.0.2.2`), booted under
//!    qemu-system-aarch64 (`virt` machine, the image's own kernel and initrd); passes when the
//!    agent inside registers, which it does only once enrolled. The coordinator accepts the
//!    test harness's claim, which the copy gets when the image has none; an image with
//!    `--claim-key` keeps its own and the coordinator is configured to accept that one. A
//!    pinned coordinator identity is replaced in the copy by the smoke coordinator's.
//!
//! Root has no password in the image: log in needs a key or password set after flashing (or
//! a drop-in); the agent needs neither.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

use crate::cross::{Board, Target, mib, override_config};
use crate::dist::{CLAIM_KEY_PATH, Enrollment, SERVICE_USER, in_tree, with_enrollment};
use crate::image_footprint::{GuestFootprint, Probe};

/// Host tools: debootstrap, the static emulators and their binfmt files, filesystem makers.
const HOST_PACKAGES: &[&str] = &[
    "debootstrap",
    "qemu-user-static",
    "dosfstools",
    "mtools",
    "e2fsprogs",
    "fdisk",
];
/// Packages every image gets besides the board's: init, networking, time, certificates (mqtts).
const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "systemd-timesyncd",
    "udev",
    "kmod",
    "iproute2",
    "netbase",
    "ca-certificates",
];
/// The Debian suite and mirror an image is built from unless told otherwise.
pub const DEFAULT_SUITE: &str = "bookworm";
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Firmware partition size; raspi-firmware puts kernel, initrd, DTBs and the GPU blobs there.
const BOOT_MIB: u64 = 256;
/// Start of the first partition (1 MiB alignment and room for a bootloader).
const FIRST_MIB: u64 = 4;
/// The smoke test's boot, start-up under TCG emulation included.
const SMOKE_WAIT: Duration = Duration::from_secs(540);

/// Options of `cargo xtask image`.
#[derive(Debug, Clone)]
pub struct Options {
    pub board: String,
    /// Debian suite.
    pub suite: String,
    pub mirror: String,
    /// `[mqtt] url` in the image's agent config (default: the board config's).
    pub mqtt_url: Option<String>,
    /// Boot the image under qemu-system-aarch64 and wait for the agent to register.
    pub smoke: bool,
}

/// `cargo xtask image`, baking in `enrollment` (checked flags).
pub fn run(opts: &Options, enrollment: &Enrollment) -> Result<()> {
    build(opts, enrollment, None).map(|_| ())
}

/// Builds the image; with `opts.smoke` boots a copy, with `probe` in it, and returns what the
/// probe measured (`cargo xtask bench rss --image`).
pub fn build(
    opts: &Options,
    enrollment: &Enrollment,
    probe: Option<&Probe>,
) -> Result<Option<GuestFootprint>> {
    let board = Board::load(&opts.board)?;
    let image = board
        .image
        .clone()
        .with_context(|| format!("board {} has no [image] section", opts.board))?;
    let target = Target::load(&board.target)?;
    ensure!(
        nix::unistd::Uid::effective().is_root(),
        "cargo xtask image must run as root (debootstrap, chroot, binfmt_misc)"
    );
    crate::provision::ensure_debian_packages(HOST_PACKAGES)?;
    register_binfmt(&target)?;

    let started = Instant::now();
    // The package stays free of the fleet secret; the claim goes straight into the rootfs.
    let dist = crate::dist::build(None, Some(&opts.board), &Enrollment::default())?;
    let out = crate::root().join("target/image");
    let work = out.join(format!("work-{}", opts.board));
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    mkdir(&work)?;
    let rootfs = work.join("rootfs");

    let mut packages: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
    packages.extend(image.packages.iter().cloned());
    base_system(opts, &target, &packages, &out.join("cache"), &rootfs)?;
    configure(&rootfs, &opts.board, &image.console)?;
    install_agent(&rootfs, &dist.deb)?;
    let config = match &opts.mqtt_url {
        Some(url) => with_mqtt_url(&board.agent_config()?, url)?,
        None => board.agent_config()?,
    };
    write(
        &rootfs.join("etc/edge-agent/agent.toml"),
        &enrollment.agent_config(&config)?,
    )?;
    if let Some(claim) = &enrollment.claim {
        claim.write(
            &rootfs.join(in_tree(CLAIM_KEY_PATH)),
            Some(service_ids(rootfs.as_path())?),
        )?;
    }

    let disk = out.join(format!("edge-{}.img", opts.board));
    make_disk(&rootfs, &work, &disk)?;
    let len = fs::metadata(&disk)
        .with_context(|| format!("cannot stat {}", disk.display()))?
        .len();
    println!(
        "image: {} ({:.0} MiB, Debian {} {}) in {:.0} s; flash with: dd if={} of=/dev/sdX bs=4M conv=fsync",
        disk.display(),
        mib(len),
        opts.suite,
        target.deb_arch,
        started.elapsed().as_secs_f64(),
        disk.display()
    );
    enrollment.print_notes("image");
    if enrollment.claim.is_some() {
        println!(
            "image: {} holds the fleet claim key: keep it (and {}) like the key itself",
            disk.display(),
            work.display()
        );
    }
    if opts.smoke {
        return smoke(&target, &rootfs, &work, &board, enrollment, probe);
    }
    Ok(None)
}

/// The service user's uid and the service group's gid in the image (the unit's `User=` and
/// `Group=`), from its own `/etc/passwd` and `/etc/group`: the .deb's postinst made them
/// there, so the host's ids mean nothing.
fn service_ids(rootfs: &Path) -> Result<(u32, u32)> {
    let id = |file: &str| -> Result<u32> {
        let path = rootfs.join(file);
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        id_of(&text, SERVICE_USER).with_context(|| {
            format!(
                "{} has no {SERVICE_USER} (the .deb's postinst should have added it)",
                path.display()
            )
        })
    };
    Ok((id("etc/passwd")?, id("etc/group")?))
}

/// The id (third field) of `name` in a passwd(5) or group(5) file's text.
fn id_of(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// `[mqtt] url` set in a commented config file.
fn with_mqtt_url(config: &str, url: &str) -> Result<String> {
    let mut mqtt = toml::Table::new();
    mqtt.insert("url".into(), toml::Value::String(url.to_owned()));
    let mut o = toml::Table::new();
    o.insert("mqtt".into(), toml::Value::Table(mqtt));
    override_config(config, &o)
}

/// Registers qemu-user-static for the target's executables with binfmt_misc (mounting it if
/// needed), from the file the qemu-user-static package ships. Kept registered afterwards, as
/// the package itself does on a machine with systemd.
fn register_binfmt(target: &Target) -> Result<()> {
    let fs_dir = Path::new("/proc/sys/fs/binfmt_misc");
    if !fs_dir.join("register").exists() {
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "binfmt_misc", "binfmt_misc"]).arg(fs_dir);
        crate::run(cmd).context("cannot mount binfmt_misc")?;
    }
    let name = &target.qemu;
    if fs_dir.join(name).exists() {
        return Ok(());
    }
    let conf = PathBuf::from(format!("/usr/lib/binfmt.d/{name}.conf"));
    let text = fs::read_to_string(&conf)
        .with_context(|| format!("cannot read {} (qemu-user-static)", conf.display()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .with_context(|| format!("{} has no binfmt line", conf.display()))?;
    fs::write(fs_dir.join("register"), line)
        .with_context(|| format!("cannot register {} with binfmt_misc", conf.display()))?;
    Ok(())
}

/// Runs debootstrap into `rootfs`, or unpacks the cached result of an identical earlier run.
fn base_system(
    opts: &Options,
    target: &Target,
    packages: &[String],
    cache: &Path,
    rootfs: &Path,
) -> Result<()> {
    let key = {
        let mut h = Sha256::new();
        h.update(format!(
            "{}\n{}\n{}\n{}",
            opts.suite,
            opts.mirror,
            target.deb_arch,
            packages.join(",")
        ));
        hex::encode(h.finalize())[..16].to_owned()
    };
    let cached = cache.join(format!("{}-{}-{key}.tar", opts.suite, target.deb_arch));
    mkdir(rootfs)?;
    if cached.exists() {
        println!("image: base system from {}", cached.display());
        let mut cmd = Command::new("tar");
        cmd.arg("-C")
            .arg(rootfs)
            .args(["--numeric-owner", "-xpf"])
            .arg(&cached);
        return crate::run(cmd).context("cannot unpack the cached base system");
    }
    println!(
        "image: debootstrap {} {} from {}",
        opts.suite, target.deb_arch, opts.mirror
    );
    let mut cmd = Command::new("debootstrap");
    cmd.args([
        "--foreign",
        "--variant=minbase",
        "--components=main,non-free-firmware",
        &format!("--arch={}", target.deb_arch),
        &format!("--include={}", BASE_PACKAGES.join(",")),
        &opts.suite,
    ])
    .arg(rootfs)
    .arg(&opts.mirror);
    crate::run(cmd).context("debootstrap (first stage) failed")?;
    chroot(rootfs, &["/debootstrap/debootstrap", "--second-stage"])
        .context("debootstrap second stage under qemu-user failed")?;
    write(
        &rootfs.join("etc/apt/sources.list"),
        &format!(
            "deb {} {} main non-free-firmware\n\
             deb {} {}-updates main non-free-firmware\n\
             deb http://security.debian.org/debian-security {}-security main non-free-firmware\n",
            opts.mirror, opts.suite, opts.mirror, opts.suite, opts.suite
        ),
    )?;
    // Nothing may start services inside the chroot.
    let policy = rootfs.join("usr/sbin/policy-rc.d");
    write(&policy, "#!/bin/sh\nexit 101\n")?;
    chmod(&policy, 0o755)?;
    // raspi-firmware writes the kernel command line from this at install time.
    write(
        &rootfs.join("etc/default/raspi-firmware"),
        "# Written by cargo xtask image.\nROOTPART=LABEL=RASPIROOT\n",
    )?;
    mkdir(&rootfs.join("boot/firmware"))?;
    // The kernel's own hook builds the initrd (`update-initramfs -c`); without this the
    // initramfs-tools trigger then builds the same one again (`-u`), about ten minutes each
    // under qemu-user. Set back to the package's default after the install.
    let initramfs_conf = rootfs.join("etc/initramfs-tools/update-initramfs.conf");
    mkdir(&rootfs.join("etc/initramfs-tools"))?;
    write(&initramfs_conf, &update_initramfs_conf(false))?;
    chroot(rootfs, &["apt-get", "update", "-q"])?;
    let extra: Vec<&str> = packages
        .iter()
        .map(String::as_str)
        .filter(|p| !BASE_PACKAGES.contains(p))
        .collect();
    // confold: keep our /etc/default/raspi-firmware and update-initramfs.conf over the
    // packages' copies.
    let mut args = vec![
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-o",
        "Dpkg::Options::=--force-confold",
    ];
    args.extend(extra);
    chroot(rootfs, &args).context("installing the board's packages failed")?;
    write(&initramfs_conf, &update_initramfs_conf(true))?;
    chroot(rootfs, &["apt-get", "clean"])?;

    mkdir(cache)?;
    let partial = cached.with_extension("partial");
    let mut cmd = Command::new("tar");
    cmd.arg("-C")
        .arg(rootfs)
        .args(["--numeric-owner", "--xattrs", "-cpf"])
        .arg(&partial)
        .arg(".");
    crate::run(cmd).context("cannot cache the base system")?;
    fs::rename(&partial, &cached)
        .with_context(|| format!("cannot rename {}", partial.display()))?;
    Ok(())
}

/// initramfs-tools' `update-initramfs.conf` (kept by `--force-confold` when the package
/// installs); `update = true` is the package's default.
fn update_initramfs_conf(update: bool) -> String {
    format!(
        "# Written by cargo xtask image (the package's defaults).\n\
         # update_initramfs: yes regenerates initrds on updates (\"update-initramfs -u\").\n\
         update_initramfs={}\n\
         backup_initramfs=no\n",
        if update { "yes" } else { "no" }
    )
}

/// Host name, fstab, network, console, first-boot identity.
fn configure(rootfs: &Path, board: &str, console: &str) -> Result<()> {
    let host = format!("edge-{board}");
    write(&rootfs.join("etc/hostname"), &format!("{host}\n"))?;
    write(
        &rootfs.join("etc/hosts"),
        &format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{host}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        ),
    )?;
    write(
        &rootfs.join("etc/fstab"),
        "# Written by cargo xtask image.\n\
         LABEL=RASPIROOT\t/\text4\trw,noatime\t0\t1\n\
         LABEL=RASPIFIRM\t/boot/firmware\tvfat\trw,noatime,umask=0077\t0\t2\n",
    )?;
    write(
        &rootfs.join("etc/systemd/network/10-wired.network"),
        "# Written by cargo xtask image: DHCP on every wired interface.\n\
         [Match]\nName=e*\n\n[Network]\nDHCP=yes\n",
    )?;
    // The serial console the kernel logs to on the board, kept in the firmware's cmdline.
    let default = rootfs.join("etc/default/raspi-firmware");
    if default.exists() {
        let (tty, _) = console.split_once(',').unwrap_or((console, ""));
        write(
            &default,
            &format!(
                "# Written by cargo xtask image.\nROOTPART=LABEL=RASPIROOT\nCONSOLES=\"{console} tty0\"\n"
            ),
        )?;
        chroot(
            rootfs,
            &[
                "systemctl",
                "enable",
                &format!("serial-getty@{tty}.service"),
            ],
        )?;
    }
    chroot(
        rootfs,
        &[
            "systemctl",
            "enable",
            "systemd-networkd",
            "systemd-timesyncd",
        ],
    )?;
    // Empty, not absent: systemd makes a new one at first boot, so every flashed board has
    // its own id (and so its own agent device id).
    write(&rootfs.join("etc/machine-id"), "")?;
    let dbus_id = rootfs.join("var/lib/dbus/machine-id");
    if dbus_id.exists() {
        fs::remove_file(&dbus_id)
            .with_context(|| format!("cannot remove {}", dbus_id.display()))?;
    }
    Ok(())
}

/// Installs the .deb (postinst: user, unit enabled) and refreshes the firmware partition's
/// files for the final config.
fn install_agent(rootfs: &Path, deb: &Path) -> Result<()> {
    let inside = rootfs.join("tmp/edge-agent.deb");
    fs::copy(deb, &inside).with_context(|| format!("cannot copy {}", deb.display()))?;
    chroot(rootfs, &["dpkg", "-i", "/tmp/edge-agent.deb"])
        .context("installing the agent's .deb in the image failed")?;
    fs::remove_file(&inside).with_context(|| format!("cannot remove {}", inside.display()))?;
    // The link points at an absolute path inside the image (`/lib/systemd/...`), so only the
    // link itself is checked here: following it would look on the host.
    let wants = rootfs.join("etc/systemd/system/multi-user.target.wants/edge-agent.service");
    ensure!(
        fs::symlink_metadata(&wants).is_ok(),
        "the agent's unit is not enabled in the image ({} missing)",
        wants.display()
    );
    // raspi-firmware's hook rewrites cmdline.txt/config.txt from /etc/default/raspi-firmware
    // (the console set in `configure`).
    if rootfs
        .join("etc/kernel/postinst.d/z50-raspi-firmware")
        .exists()
    {
        let kernel = newest_kernel(rootfs)?;
        // The hook does nothing unless told it runs for a package's configure step (the
        // package's own postinst calls it the same way).
        chroot(
            rootfs,
            &[
                "env",
                "DEB_MAINT_PARAMS=configure",
                "/etc/kernel/postinst.d/z50-raspi-firmware",
                &kernel,
            ],
        )?;
    }
    let policy = rootfs.join("usr/sbin/policy-rc.d");
    if policy.exists() {
        fs::remove_file(&policy).with_context(|| format!("cannot remove {}", policy.display()))?;
    }
    Ok(())
}

/// The version of the newest `/boot/vmlinuz-*`.
fn newest_kernel(rootfs: &Path) -> Result<String> {
    let mut versions: Vec<String> = fs::read_dir(rootfs.join("boot"))
        .context("cannot list the image's /boot")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_owned)
        })
        .collect();
    versions.sort();
    versions.pop().context("the image has no kernel in /boot")
}

/// The disk image: MBR, FAT32 firmware partition from `/boot/firmware`, ext4 root from the
/// rest of the tree.
fn make_disk(rootfs: &Path, work: &Path, disk: &Path) -> Result<()> {
    let firmware = rootfs.join("boot/firmware");
    // The firmware files go to their own partition; the root keeps the empty mount point.
    let boot_tree = work.join("firmware");
    if boot_tree.exists() {
        fs::remove_dir_all(&boot_tree)
            .with_context(|| format!("cannot clear {}", boot_tree.display()))?;
    }
    fs::rename(&firmware, &boot_tree)
        .with_context(|| format!("cannot move {}", firmware.display()))?;
    mkdir(&firmware)?;
    let result = make_partitions(rootfs, &boot_tree, work, disk);
    // Put them back, so the tree stays whole for the smoke test's copy.
    fs::remove_dir(&firmware).with_context(|| format!("cannot remove {}", firmware.display()))?;
    fs::rename(&boot_tree, &firmware)
        .with_context(|| format!("cannot move back {}", firmware.display()))?;
    result
}

fn make_partitions(rootfs: &Path, boot_tree: &Path, work: &Path, disk: &Path) -> Result<()> {
    let boot_img = work.join("boot.vfat");
    let root_img = work.join("root.ext4");
    for f in [&boot_img, &root_img, &disk.to_path_buf()] {
        if f.exists() {
            fs::remove_file(f).with_context(|| format!("cannot remove {}", f.display()))?;
        }
    }
    let mut cmd = Command::new("mkfs.vfat");
    cmd.args(["-F", "32", "-n", "RASPIFIRM", "-C"])
        .arg(&boot_img)
        .arg((BOOT_MIB * 1024).to_string());
    crate::run(cmd).context("mkfs.vfat failed")?;
    let entries: Vec<PathBuf> = fs::read_dir(boot_tree)
        .with_context(|| format!("cannot list {}", boot_tree.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    if !entries.is_empty() {
        let mut cmd = Command::new("mcopy");
        cmd.arg("-s")
            .arg("-i")
            .arg(&boot_img)
            .args(&entries)
            .arg("::");
        crate::run(cmd).context("mcopy into the firmware partition failed")?;
    }

    // Room for the tree plus a quarter and 512 MiB: logs, the outbox, module caches.
    let used = crate::dist::du_bytes(rootfs, 4096)?;
    let root_mib = (used + used / 4) / (1024 * 1024) + 512;
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-L", "RASPIROOT", "-d"])
        .arg(rootfs)
        .arg(&root_img)
        .arg(format!("{root_mib}M"));
    crate::run(cmd).context("mkfs.ext4 -d failed")?;

    let total_mib = FIRST_MIB + BOOT_MIB + root_mib;
    let f = fs::File::create(disk).with_context(|| format!("cannot create {}", disk.display()))?;
    f.set_len(total_mib * 1024 * 1024)
        .with_context(|| format!("cannot size {}", disk.display()))?;
    drop(f);
    let sectors = |m: u64| m * 2048;
    let table = format!(
        "label: dos\nunit: sectors\n\n\
         start={}, size={}, type=c, bootable\n\
         start={}, size={}, type=83\n",
        sectors(FIRST_MIB),
        sectors(BOOT_MIB),
        sectors(FIRST_MIB + BOOT_MIB),
        sectors(root_mib)
    );
    let mut sfdisk = Command::new("sfdisk");
    sfdisk
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(disk);
    run_with_stdin(sfdisk, &table).context("sfdisk failed")?;
    for (img, at) in [(&boot_img, FIRST_MIB), (&root_img, FIRST_MIB + BOOT_MIB)] {
        let mut dd = Command::new("dd");
        dd.arg(format!("if={}", img.display()))
            .arg(format!("of={}", disk.display()))
            .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
            .arg(format!("seek={at}"));
        crate::run(dd).with_context(|| format!("cannot write {} into the disk", img.display()))?;
        fs::remove_file(img).with_context(|| format!("cannot remove {}", img.display()))?;
    }
    Ok(())
}

/// Boots a copy of the image (agent pointed at a coordinator on the host) under
/// qemu-system-aarch64 and waits for the agent to enroll and register; with `probe`, also
/// for the probe's figures.
fn smoke(
    target: &Target,
    rootfs: &Path,
    work: &Path,
    board: &Board,
    enrollment: &Enrollment,
    probe: Option<&Probe>,
) -> Result<Option<GuestFootprint>> {
    ensure!(
        target.deb_arch == "arm64",
        "the smoke test boots arm64 images only (qemu-system-aarch64 virt)"
    );
    crate::provision::ensure_debian_packages(&["qemu-system-arm"])?;
    crate::build_bins()?;
    let env = edge_tests::TestEnv::new("image-smoke")?;
    let coord = match &enrollment.claim {
        // The harness's coordinators accept the harness's claims.
        None => edge_tests::Coordinator::start_embedded(&env.path("coordinator"))?,
        // With a config of our own that has [enrollment], the harness adds none of its claims.
        Some(claim) => {
            let file = env.path("smoke-coordinator.toml");
            write(&file, &smoke_coordinator_config(&claim.public_hex)?)?;
            edge_tests::Coordinator::start_embedded_with_args(
                &env.path("coordinator"),
                vec!["--config".into(), path_str(&file)?],
            )?
        }
    };
    let mut journal = coord.journal();
    let port = coord
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .with_context(|| format!("no port in {}", coord.url()))?;
    // The real coordinator cannot answer here: a pinned identity becomes the smoke one's.
    let pin = match &enrollment.coordinator {
        Some(_) => Some(edge_tests::enroll::coordinator_identity(
            &coord.state_dir(),
        )?),
        None => None,
    };
    // QEMU's user network shows the host's loopback as 10.0.2.2.
    let config = with_mqtt_url(&board.agent_config()?, &format!("mqtt://10.0.2.2:{port}"))?;
    let config = with_enrollment(&config, Some(CLAIM_KEY_PATH), pin.as_ref())?;
    let conf_path = rootfs.join("etc/edge-agent/agent.toml");
    let original = fs::read_to_string(&conf_path)
        .with_context(|| format!("cannot read {}", conf_path.display()))?;
    let claim_path = rootfs.join(in_tree(CLAIM_KEY_PATH));
    let harness_claim = enrollment.claim.is_none();
    let disk = work.join("smoke.img");
    let mut probed = Vec::new();
    // The harness claim, the smoke config and the probe are for the copy only: the tree gets
    // its own config back and loses the harness claim and the probe whatever happened.
    let made = (|| {
        if let Some(p) = probe {
            probed = p.install(rootfs, port, &config)?;
        }
        if harness_claim {
            edge_tests::enroll::write_claim_key(&claim_path, &[])?;
            let (uid, gid) = service_ids(rootfs)?;
            std::os::unix::fs::chown(&claim_path, Some(uid), Some(gid))
                .with_context(|| format!("cannot chown {}", claim_path.display()))?;
        }
        write(&conf_path, &config)?;
        make_disk(rootfs, work, &disk)
    })();
    let restored = write(&conf_path, &original);
    let removed = if harness_claim && claim_path.exists() {
        fs::remove_file(&claim_path)
            .with_context(|| format!("cannot remove {}", claim_path.display()))
    } else {
        Ok(())
    };
    let unprobed = Probe::remove(&probed);
    made?;
    restored?;
    removed?;
    unprobed?;

    let kernel_version = newest_kernel(rootfs)?;
    let kernel = rootfs.join(format!("boot/vmlinuz-{kernel_version}"));
    let initrd = rootfs.join(format!("boot/initrd.img-{kernel_version}"));
    let console_log = work.join("smoke-console.log");
    let mut qemu = edge_tests::ChildProc::new(
        "qemu-system-aarch64 (image)",
        "qemu-system-aarch64",
        [
            "-M".into(),
            "virt".into(),
            "-cpu".into(),
            "cortex-a72".into(),
            "-smp".into(),
            "2".into(),
            "-m".into(),
            "1024".into(),
            "-nographic".into(),
            "-kernel".into(),
            path_str(&kernel)?,
            "-initrd".into(),
            path_str(&initrd)?,
            "-append".into(),
            "root=LABEL=RASPIROOT rw console=ttyAMA0 systemd.show_status=1".into(),
            "-drive".into(),
            format!("file={},if=virtio,format=raw", disk.display()),
            "-netdev".into(),
            "user,id=net0".into(),
            "-device".into(),
            // No option ROM: the virt machine boots the kernel directly, and Debian's
            // qemu-system-arm without its recommended ipxe-qemu has no efi-virtio.rom.
            "virtio-net-pci,netdev=net0,romfile=".into(),
        ],
        console_log.clone(),
    );
    qemu.spawn()?;
    let started = Instant::now();
    let registered = journal.wait_for("the image's agent to register", SMOKE_WAIT, |ev| {
        ev.iter().any(|e| e.event == "registered")
    });
    let elapsed = started.elapsed();
    let measured = match (&registered, probe) {
        (Ok(_), Some(_)) => Some(crate::image_footprint::collect(&console_log)),
        _ => None,
    };
    qemu.kill()?;
    if let Err(e) = registered {
        env.dump_logs();
        let _ = journal.refresh();
        bail!(
            "smoke test: {e:#}; enrollment: {}; console log: {}",
            enrollment_summary(&journal),
            console_log.display()
        );
    }
    println!(
        "image: smoke test passed: booted under qemu-system-aarch64 and the agent enrolled ({} claim) \
         and registered after {:.0} s",
        if harness_claim {
            "the test harness's"
        } else {
            "the image's"
        },
        elapsed.as_secs_f64()
    );
    fs::remove_file(&disk).with_context(|| format!("cannot remove {}", disk.display()))?;
    measured.transpose()
}

/// The smoke coordinator's config when the image has its own claim: claim mode, that claim
/// (no groups) the only one accepted.
fn smoke_coordinator_config(claim_public_hex: &str) -> Result<String> {
    let mut claim = toml::Table::new();
    claim.insert(
        "key".into(),
        toml::Value::String(claim_public_hex.to_owned()),
    );
    claim.insert("groups".into(), toml::Value::Array(Vec::new()));
    let mut enrollment = toml::Table::new();
    enrollment.insert("mode".into(), toml::Value::String("claim".into()));
    enrollment.insert(
        "claims".into(),
        toml::Value::Array(vec![toml::Value::Table(claim)]),
    );
    let mut root = toml::Table::new();
    root.insert("enrollment".into(), toml::Value::Table(enrollment));
    toml::to_string(&root).context("cannot encode the smoke coordinator's config")
}

/// What the journal says about enrollment, for a failed smoke test: whether a request came in
/// at all and what the coordinator decided.
fn enrollment_summary(journal: &edge_tests::Journal) -> String {
    let counts: Vec<String> = [
        "device_enrolled",
        "enrollment_pending",
        "enrollment_rejected",
        "enrollment_conflict",
        "auth_rejected",
    ]
    .iter()
    .map(|kind| (kind, journal.count_kind(kind)))
    .filter(|(_, n)| *n > 0)
    .map(|(kind, n)| format!("{kind} x{n}"))
    .collect();
    if counts.is_empty() {
        "no enrollment request reached the coordinator".into()
    } else {
        counts.join(", ")
    }
}

fn chroot(rootfs: &Path, args: &[&str]) -> Result<()> {
    let _proc = ProcMount::new(&rootfs.join("proc"))?;
    let mut cmd = Command::new("chroot");
    cmd.arg(rootfs)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C.UTF-8")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    crate::run(cmd).with_context(|| format!("in the image: {} failed", args.join(" ")))
}

/// `/proc` in the image for one chroot command. Package scripts need it: raspi-firmware's
/// postinst and kernel hook tell a chroot (where /boot/firmware is a plain folder) from a
/// booted board (where it must be mounted) with ischroot(1), which reads `/proc/1/root`, and
/// fail without it. Mounted per command and unmounted on drop, so a live `/proc` is never
/// archived into the cache or copied onto the disk by `mkfs.ext4 -d`.
struct ProcMount(PathBuf);

impl ProcMount {
    fn new(dir: &Path) -> Result<ProcMount> {
        mkdir(dir)?;
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "proc", "proc"]).arg(dir);
        crate::run(cmd).with_context(|| format!("cannot mount proc on {}", dir.display()))?;
        Ok(ProcMount(dir.to_path_buf()))
    }
}

impl Drop for ProcMount {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(&self.0).status().is_ok_and(|s| s.success())
        };
        // debootstrap's second stage mounts and unmounts /proc itself, taking ours along.
        let mounted = Command::new("mountpoint")
            .arg("-q")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        // Lazy as a fallback: a process the package scripts left behind keeps it busy.
        if mounted && !umount(false) && !umount(true) {
            eprintln!(
                "image: cannot unmount {}; unmount it by hand",
                self.0.display()
            );
        }
    }
}

fn run_with_stdin(mut cmd: Command, input: &str) -> Result<()> {
    use std::io::Write;
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {shown}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())
        .with_context(|| format!("cannot write to {shown}"))?;
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for {shown}"))?;
    ensure!(status.success(), "{shown} failed with {status}");
    Ok(())
}

pub(crate) fn mkdir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

pub(crate) fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        mkdir(dir)?;
    }
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

pub(crate) fn chmod(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_url_override_keeps_the_rest_of_the_config() {
        let text =
            "# top\n[mqtt]\n# the broker\nurl = \"mqtt://127.0.0.1:1883\"\nkeepalive_s = 30\n";
        let got = with_mqtt_url(text, "mqtt://10.0.2.2:4242").expect("overrides");
        assert_eq!(
            got,
            "# top\n[mqtt]\n# the broker\nurl = \"mqtt://10.0.2.2:4242\"\nkeepalive_s = 30\n"
        );
    }

    #[test]
    fn service_ids_come_from_the_images_own_files() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      edge-agentx:x:5:5::/:/bin/false\n\
                      edge-agent:x:999:996:edge-node runtime agent:/var/lib/edge-agent:/usr/sbin/nologin\n";
        assert_eq!(id_of(passwd, "edge-agent"), Some(999));
        assert_eq!(id_of("edge-agent:x:996:\n", "edge-agent"), Some(996));
        assert_eq!(id_of(passwd, "nobody"), None);
        assert_eq!(id_of("edge-agent:x:notanumber:1\n", "edge-agent"), None);
    }

    #[test]
    fn the_smoke_coordinator_accepts_exactly_the_images_claim() {
        let text = smoke_coordinator_config(&"ab".repeat(32)).expect("encodes");
        let t: toml::Table = toml::from_str(&text).expect("valid TOML");
        let enrollment = t["enrollment"].as_table().expect("[enrollment]");
        assert_eq!(enrollment["mode"].as_str(), Some("claim"));
        let claims = enrollment["claims"].as_array().expect("claims");
        assert_eq!(claims.len(), 1);
        assert_eq!(claims[0]["key"].as_str(), Some("ab".repeat(32).as_str()));
        assert_eq!(claims[0]["groups"].as_array().map(Vec::len), Some(0));
        assert!(text.contains("[[enrollment.claims]]"), "{text}");
    }

    #[test]
    fn every_image_board_names_packages_and_a_console() {
        let dir = crate::root().join("cross/boards");
        for e in fs::read_dir(&dir).expect("lists boards") {
            let path = e.expect("entry").path();
            let Some(name) = path.file_stem().and_then(|n| n.to_str()) else {
                continue;
            };
            let board = Board::load(name).expect("parses");
            if let Some(image) = board.image {
                assert!(!image.packages.is_empty(), "{name}: no image packages");
                assert!(!image.console.is_empty(), "{name}: no console");
            }
        }
    }
}
