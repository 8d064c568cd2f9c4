//! `cargo xtask bench rss --image`: the agent's memory inside the flashed aarch64 image
//! booted under qemu-system-aarch64, where the kernel's own accounting (`smaps_rollup` of a
//! real arm64 kernel, its page size, its page cache) applies, unlike qemu-user's process.
//!
//! The image's smoke boot ([`crate::image`]) gets a probe in its copy (never in the image
//! itself): a oneshot unit that waits for the agent to log that it enrolled, lets it settle,
//! samples its `smaps_rollup` [`SAMPLES`] times, then runs a bare tokio+rumqttc client
//! (`agent/examples/bare_mqtt.rs`, cross-built) against the same broker and samples that the
//! same way. Then it restarts the image's own agent service with each of [`LOADS`]' configs
//! (the image's config with `[pipeline] file` set: the vibration pipeline, compiling its
//! modules; the same again with the module cache that start filled; one small ONNX model
//! served by the image's packaged ONNX Runtime) and samples it once the pipeline has started
//! and settled. Each sample is one `EDGE-FOOTPRINT` line on the serial console, which the host
//! reads from the console log. The probe also prints where the agent's memory is (`map`
//! lines: the idle agent's largest mappings by PSS; `where`: threads, whether ONNX Runtime is
//! mapped, per load), which the host prints as they are.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::image::{chmod, mkdir, write};

/// Samples per process, [`SAMPLE_GAP_S`] apart.
const SAMPLES: usize = 3;
const SAMPLE_GAP_S: u32 = 10;
/// Running time before the first sample. Under TCG emulation the guest runs about 10-20x
/// slower than the board, so this is longer than the host bench's 5 s.
pub const SETTLE_S: u32 = 30;
/// Longest wait, inside the guest, for a restarted agent to log that its pipeline started
/// (compiling two modules under TCG included).
const LOAD_WAIT_S: u32 = 300;
/// From the agent's registration to the probe's last line: idle and bare samples, then each
/// of [`LOADS`] restarted, started and sampled.
const PROBE_WAIT: Duration = Duration::from_secs(1800);
const MARK: &str = "EDGE-FOOTPRINT";
/// Where the probe's files go in the copy.
const DIR: &str = "usr/local/lib/edge-footprint";
const UNIT: &str = "etc/systemd/system/edge-footprint.service";
const WANTS: &str = "etc/systemd/system/multi-user.target.wants/edge-footprint.service";

/// The loads the probe restarts the agent with after the idle and bare samples, in order:
/// the probe's label for them and the pipeline (in the probe's folder) their config runs.
/// `vibration-warm` runs the same pipeline as `vibration` with the module cache it filled.
pub const LOADS: [(&str, &str); 3] = [
    ("vibration", "vibration/pipeline.toml"),
    ("vibration-warm", "vibration/pipeline.toml"),
    ("model", "model/pipeline.toml"),
];
/// The modules `config/pipelines/vibration.toml` names, and the folder it names them in.
const VIBRATION_MODULES: [&str; 2] = ["feature_extractor.wasm", "anomaly_detector.wasm"];
const VIBRATION_MODULE_DIR: &str = "../../modules/target/wasm32-wasip2/release/";

/// The probe to put in the smoke copy.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The bare client's aarch64 binary.
    pub bare: PathBuf,
    /// `config/pipelines/vibration.toml` and the folder holding its built modules.
    pub vibration: PathBuf,
    pub modules: PathBuf,
    /// The one-model load: its pipeline text (model path `models/linear.onnx`) and model.
    pub model_pipeline: String,
    pub model: Vec<u8>,
}

/// One `smaps_rollup` sample, KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub rss: u64,
    pub pss: u64,
    pub pss_anon: u64,
    pub pss_file: u64,
}

/// What the probe printed.
#[derive(Debug, Clone, Default)]
pub struct GuestFootprint {
    /// The idle agent (no pipeline).
    pub agent: Vec<Sample>,
    pub bare: Vec<Sample>,
    /// Samples per label of [`LOADS`].
    pub loads: BTreeMap<String, Vec<Sample>>,
    /// `uname -r` and `getconf PAGESIZE` inside the guest.
    pub kernel: String,
    pub page_size: String,
    /// The probe's `where` and `map` lines about the agent, as printed.
    pub notes: Vec<String>,
}

impl Probe {
    /// Writes the probe into `rootfs` (a tree about to become the smoke copy's disk), its
    /// bare client pointed at the host's broker on `port` and one agent config per load made
    /// from `agent_config` (the copy's own); returns the paths to remove once the disk is made.
    pub fn install(&self, rootfs: &Path, port: u16, agent_config: &str) -> Result<Vec<PathBuf>> {
        let dir = rootfs.join(DIR);
        mkdir(&dir)?;
        let copy = |from: &Path, to: &Path| {
            fs::copy(from, to)
                .map(|_| ())
                .with_context(|| format!("cannot copy {}", from.display()))
        };
        let bare = dir.join("bare_mqtt");
        copy(&self.bare, &bare)?;
        let vibration = fs::read_to_string(&self.vibration)
            .with_context(|| format!("cannot read {}", self.vibration.display()))?;
        ensure!(
            VIBRATION_MODULES
                .iter()
                .all(|m| vibration.contains(&format!("\"{VIBRATION_MODULE_DIR}{m}\""))),
            "{} no longer names its modules in {VIBRATION_MODULE_DIR}",
            self.vibration.display()
        );
        // Module paths are relative to the pipeline file: the modules go beside it.
        write(
            &dir.join("vibration/pipeline.toml"),
            &vibration.replace(VIBRATION_MODULE_DIR, ""),
        )?;
        for m in VIBRATION_MODULES {
            copy(&self.modules.join(m), &dir.join("vibration").join(m))?;
        }
        write(&dir.join("model/pipeline.toml"), &self.model_pipeline)?;
        mkdir(&dir.join("model/models"))?;
        fs::write(dir.join("model/models/linear.onnx"), &self.model)
            .context("cannot write the probe's model")?;
        for (label, pipeline) in LOADS {
            let mut set = toml::Table::new();
            set.insert(
                "file".into(),
                toml::Value::String(format!("/{DIR}/{pipeline}")),
            );
            let mut overrides = toml::Table::new();
            overrides.insert("pipeline".into(), toml::Value::Table(set));
            let config = crate::cross::override_config(agent_config, &overrides)?;
            ensure!(
                config.contains(&format!("/{DIR}/{pipeline}")),
                "the image's agent config has no [pipeline] file key to set"
            );
            write(&dir.join(format!("{label}.agent.toml")), &config)?;
        }
        let script = dir.join("probe.sh");
        write(&script, &script_text(port))?;
        chmod(&bare, 0o755)?;
        chmod(&script, 0o755)?;
        write(&rootfs.join(UNIT), &unit_text())?;
        let wants = rootfs.join(WANTS);
        std::os::unix::fs::symlink("../edge-footprint.service", &wants)
            .with_context(|| format!("cannot link {}", wants.display()))?;
        Ok(vec![wants, rootfs.join(UNIT), dir])
    }

    /// Removes what [`Probe::install`] wrote.
    pub fn remove(installed: &[PathBuf]) -> Result<()> {
        for p in installed {
            let meta = fs::symlink_metadata(p);
            let gone = match meta {
                Ok(m) if m.is_dir() => fs::remove_dir_all(p),
                Ok(_) => fs::remove_file(p),
                Err(_) => Ok(()),
            };
            gone.with_context(|| format!("cannot remove {}", p.display()))?;
        }
        Ok(())
    }
}

/// Waits for the probe's last line in the console log and parses what it printed.
pub fn collect(console_log: &Path) -> Result<GuestFootprint> {
    let started = Instant::now();
    loop {
        let text = fs::read(console_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if text.contains(&format!("{MARK} done")) {
            return parse(&text);
        }
        if started.elapsed() > PROBE_WAIT {
            bail!(
                "the image's footprint probe printed no `{MARK} done` within {} s (console log: {})",
                PROBE_WAIT.as_secs(),
                console_log.display()
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The probe's lines: `EDGE-FOOTPRINT agent|bare Rss: N kB Pss: N kB ...` and
/// `EDGE-FOOTPRINT done kernel=K pagesize=P`; anything else on the console is skipped.
fn parse(console: &str) -> Result<GuestFootprint> {
    let mut out = GuestFootprint::default();
    for line in console.lines() {
        let Some(rest) = line.find(MARK).map(|i| &line[i + MARK.len()..]) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        match words.next() {
            Some(who)
                if who == "agent" || who == "bare" || LOADS.iter().any(|(l, _)| *l == who) =>
            {
                let fields: Vec<&str> = words.collect();
                let field = |name: &str| -> Result<u64> {
                    let i = fields
                        .iter()
                        .position(|w| *w == name)
                        .with_context(|| format!("no {name} in the probe's line {line:?}"))?;
                    fields
                        .get(i + 1)
                        .and_then(|v| v.parse().ok())
                        .with_context(|| format!("bad {name} in the probe's line {line:?}"))
                };
                let sample = Sample {
                    rss: field("Rss:")?,
                    pss: field("Pss:")?,
                    pss_anon: field("Pss_Anon:")?,
                    pss_file: field("Pss_File:")?,
                };
                match who {
                    "agent" => out.agent.push(sample),
                    "bare" => out.bare.push(sample),
                    load => out.loads.entry(load.to_owned()).or_default().push(sample),
                }
            }
            Some("done") => {
                for w in words {
                    if let Some(k) = w.strip_prefix("kernel=") {
                        out.kernel = k.to_owned();
                    } else if let Some(p) = w.strip_prefix("pagesize=") {
                        out.page_size = p.to_owned();
                    }
                }
            }
            Some(kind @ ("where" | "map")) => out
                .notes
                .push(format!("{kind} {}", words.collect::<Vec<_>>().join(" "))),
            Some("error") => bail!("the image's footprint probe failed: {}", rest.trim()),
            _ => {}
        }
    }
    ensure!(
        !out.agent.is_empty() && !out.bare.is_empty(),
        "the image's footprint probe printed {} agent and {} bare samples",
        out.agent.len(),
        out.bare.len()
    );
    for (label, _) in LOADS {
        ensure!(
            out.loads.get(label).is_some_and(|s| !s.is_empty()),
            "the image's footprint probe printed no samples of the agent with the {label} load"
        );
    }
    Ok(out)
}

fn unit_text() -> String {
    "[Unit]\n\
     Description=edge footprint probe (cargo xtask bench rss --image)\n\
     After=edge-agent.service\n\n\
     [Service]\n\
     Type=oneshot\n\
     ExecStart=/usr/local/lib/edge-footprint/probe.sh\n\n\
     [Install]\n\
     WantedBy=multi-user.target\n"
        .to_owned()
}

/// The guest's script. It prints to `/dev/console` (the serial port the host logs).
fn script_text(port: u16) -> String {
    let loads: Vec<&str> = LOADS.iter().map(|(label, _)| *label).collect();
    let loads = loads.join(" ");
    format!(
        r#"#!/bin/sh
say() {{ echo "{MARK} $*" > /dev/console; }}
sample() {{ say "$1" $(grep -E '^(Rss|Pss|Pss_Anon|Pss_File):' "/proc/$2/smaps_rollup" | tr '\n' ' '); }}
# Samples the running agent as $1 after it has settled; sets $agent.
measure() {{
  sleep {SETTLE_S}
  agent=$(pidof edge-agent) || {{ say error "no edge-agent process ($1)"; exit 1; }}
  for i in $(seq {SAMPLES}); do sample "$1" "$agent"; sleep {SAMPLE_GAP_S}; done
}}
until journalctl -u edge-agent --no-pager -q | grep -q 'enrolled: messages are sealed and sent'; do sleep 2; done
measure agent
say where threads=$(ls /proc/$agent/task | wc -l) onnxruntime=$(grep -c onnxruntime /proc/$agent/maps)
awk '/^[0-9a-f]+-/{{m=$2" "$6}} /^Pss:/{{print $2, m}}' /proc/$agent/smaps | sort -rn | head -12 | while read -r l; do say map $l; done
/{DIR}/bare_mqtt idle 10.0.2.2 {port} > /dev/null 2>&1 &
bare=$!
sleep {SETTLE_S}
kill -0 "$bare" 2> /dev/null || {{ say error "bare_mqtt exited"; exit 1; }}
for i in $(seq {SAMPLES}); do sample bare "$bare"; sleep {SAMPLE_GAP_S}; done
kill "$bare"
# Each load: the image's agent service restarted with a config that runs its pipeline.
for load in {loads}; do
  since=$(date '+%Y-%m-%d %H:%M:%S')
  cp "/{DIR}/$load.agent.toml" /etc/edge-agent/agent.toml
  systemctl restart edge-agent
  waited=0
  until journalctl -u edge-agent --since "$since" --no-pager -q | grep -q 'pipeline started'; do
    waited=$((waited + 2))
    [ "$waited" -gt {LOAD_WAIT_S} ] && {{ say error "the agent started no pipeline within {LOAD_WAIT_S} s with the $load config: $(journalctl -u edge-agent --since "$since" --no-pager -q | grep -iE 'error|warn' | tail -n 3 | tr '\n' ' ')"; exit 1; }}
    sleep 2
  done
  measure "$load"
  say where load=$load threads=$(ls /proc/$agent/task | wc -l) onnxruntime=$(grep -c onnxruntime /proc/$agent/maps)
done
say done kernel=$(uname -r) pagesize=$(getconf PAGESIZE)
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_probes_lines_among_console_noise() {
        let console = "[  12.1] systemd[1]: Started x\n\
            EDGE-FOOTPRINT agent Rss: 9000 kB Pss: 8000 kB Pss_Anon: 2000 kB Pss_File: 6000 kB \n\
            [  13.0] random: crng init done\n\
            \x1b[0mEDGE-FOOTPRINT bare Rss: 3000 kB Pss: 1500 kB Pss_Anon: 700 kB Pss_File: 800 kB\n\
            EDGE-FOOTPRINT where threads=12 onnxruntime=0\n\
            EDGE-FOOTPRINT vibration Rss: 20000 kB Pss: 18000 kB Pss_Anon: 9000 kB Pss_File: 9000 kB\n\
            EDGE-FOOTPRINT vibration-warm Rss: 16000 kB Pss: 14000 kB Pss_Anon: 7000 kB Pss_File: 7000 kB\n\
            EDGE-FOOTPRINT vibration-warm Rss: 16100 kB Pss: 14100 kB Pss_Anon: 7000 kB Pss_File: 7100 kB\n\
            EDGE-FOOTPRINT model Rss: 40000 kB Pss: 38000 kB Pss_Anon: 9000 kB Pss_File: 29000 kB\n\
            EDGE-FOOTPRINT where load=model threads=14 onnxruntime=5\n\
            EDGE-FOOTPRINT done kernel=6.1.0-28-arm64 pagesize=4096\n";
        let f = parse(console).expect("parses");
        assert_eq!(f.loads["vibration-warm"].len(), 2);
        assert_eq!(f.loads["vibration-warm"][1].pss, 14100);
        assert_eq!(f.loads["model"][0].pss_file, 29000);
        assert_eq!(
            f.agent,
            vec![Sample {
                rss: 9000,
                pss: 8000,
                pss_anon: 2000,
                pss_file: 6000
            }]
        );
        assert_eq!(f.bare[0].pss, 1500);
        assert_eq!(
            f.notes,
            vec![
                "where threads=12 onnxruntime=0".to_owned(),
                "where load=model threads=14 onnxruntime=5".to_owned()
            ]
        );
        assert_eq!(
            (f.kernel.as_str(), f.page_size.as_str()),
            ("6.1.0-28-arm64", "4096")
        );
    }

    #[test]
    fn a_probe_error_or_missing_samples_is_an_error() {
        let err = parse("EDGE-FOOTPRINT error no edge-agent process\nEDGE-FOOTPRINT done\n")
            .expect_err("error line");
        assert!(format!("{err:#}").contains("no edge-agent process"));
        let err = parse("EDGE-FOOTPRINT done kernel=k pagesize=4096\n").expect_err("no samples");
        assert!(format!("{err:#}").contains("0 agent and 0 bare"));
        let idle_only = "EDGE-FOOTPRINT agent Rss: 1 kB Pss: 1 kB Pss_Anon: 1 kB Pss_File: 0 kB\n\
            EDGE-FOOTPRINT bare Rss: 1 kB Pss: 1 kB Pss_Anon: 1 kB Pss_File: 0 kB\n\
            EDGE-FOOTPRINT done kernel=k pagesize=4096\n";
        let err = parse(idle_only).expect_err("no load samples");
        assert!(format!("{err:#}").contains("with the vibration load"));
    }

    #[test]
    fn install_writes_and_remove_clears_the_probe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("rootfs");
        fs::create_dir_all(root.join("etc/systemd/system/multi-user.target.wants")).expect("tree");
        let bare = dir.path().join("bare");
        fs::write(&bare, b"\x7fELF").expect("bare");
        let modules = dir.path().join("modules");
        fs::create_dir_all(&modules).expect("modules");
        for m in VIBRATION_MODULES {
            fs::write(modules.join(m), b"\0asm").expect("module");
        }
        let probe = Probe {
            bare,
            vibration: crate::root().join("config/pipelines/vibration.toml"),
            modules,
            model_pipeline: "name = \"m\"\n".into(),
            model: b"onnx".to_vec(),
        };
        let agent_config =
            fs::read_to_string(crate::root().join("config/agent.toml")).expect("agent config");
        let installed = probe.install(&root, 4242, &agent_config).expect("installs");
        let probe_dir = root.join(DIR);
        let script = fs::read_to_string(probe_dir.join("probe.sh")).expect("script");
        assert!(script.contains("bare_mqtt idle 10.0.2.2 4242"));
        assert!(script.contains("for load in vibration vibration-warm model; do"));
        let syntax = std::process::Command::new("sh")
            .arg("-n")
            .arg(probe_dir.join("probe.sh"))
            .output()
            .expect("sh -n");
        assert!(
            syntax.status.success(),
            "probe.sh: {}",
            String::from_utf8_lossy(&syntax.stderr)
        );
        // The pipeline names its modules beside it, and they are there.
        let pipeline: toml::Table = toml::from_str(
            &fs::read_to_string(probe_dir.join("vibration/pipeline.toml")).expect("pipeline"),
        )
        .expect("pipeline parses");
        let stages = pipeline["stage"].as_array().expect("stages");
        for (stage, m) in stages.iter().zip(VIBRATION_MODULES) {
            assert_eq!(stage["module"].as_str(), Some(m));
            assert!(probe_dir.join("vibration").join(m).is_file());
        }
        assert!(probe_dir.join("model/models/linear.onnx").is_file());
        // Each load's config is the image's with its pipeline set.
        for (label, pipeline) in LOADS {
            let text =
                fs::read_to_string(probe_dir.join(format!("{label}.agent.toml"))).expect("config");
            let config: toml::Table = toml::from_str(&text).expect("config parses");
            assert_eq!(
                config["pipeline"]["file"].as_str(),
                Some(format!("/{DIR}/{pipeline}").as_str())
            );
            assert_eq!(
                config["mqtt"],
                toml::from_str::<toml::Table>(&agent_config).expect("parses")["mqtt"]
            );
        }
        assert!(fs::symlink_metadata(root.join(WANTS)).is_ok());
        Probe::remove(&installed).expect("removes");
        assert!(!root.join(DIR).exists() && !root.join(UNIT).exists());
        assert!(fs::symlink_metadata(root.join(WANTS)).is_err());
    }
}
