//! `cargo xtask hot-text`: lays out the code an idle agent runs next to each other.
//!
//! An idle agent's resident memory is mostly its own code: the kernel maps a binary's text
//! in 64 KiB windows around each page fault (`fault_around_bytes`), and the functions that a
//! connected, idle agent runs (start-up, MQTT keep-alive, telemetry, the outbox) are spread
//! over the whole 20 MB text section: before this layout 6.3 MB of it was resident in an idle
//! agent, for about 1,900 functions and 1.8 MB of code that ran (callgrind).
//!
//! This command profiles the release agent connected to an embedded coordinator under
//! callgrind (an unstripped build in `target/hot-text/`), takes every function of the agent's
//! binary that ran, and writes `agent/hot-text.ld`: a linker script that puts those
//! functions' sections first, in an output section of their own before `.text`
//! (`INSERT BEFORE .text`, which keeps the linker's default layout for everything else).
//! `agent/build.rs` passes it to release links. Rust names each function's section
//! `.text.<mangled name>`; the script matches the name with its hash (`17h<16 hex>E`, which
//! changes with the target, features, profile settings and compiler version) replaced by `*`,
//! so one profile serves x86_64, aarch64 and armv7 and later commits; a generic function
//! whose other instantiations would bring in much cold code is left out (see [`patterns`]).
//! A function added since the profile is laid out as before; a renamed one falls back to the
//! default layout. Rerun the command after large changes to what the agent does at start or
//! when idle. `cargo xtask bench rss`: idle PSS 10.2 -> 9.4 MB with the committed script.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use edge_tests::{Agent, AgentOptions, Coordinator};
use nix::sys::signal::Signal;

/// How long the profiled agent idles after it registered. Under callgrind it runs some 50
/// times slower, so this covers several telemetry intervals and MQTT keep-alives.
const IDLE: Duration = Duration::from_secs(90);

/// Bytes of code that did not run which one globbed name may bring into the hot section.
const GLOB_SLACK: u64 = 4096;

/// The script's output section (a name no input section has).
const SECTION: &str = ".text.edge_hot";

pub fn run(root: &Path, reuse: bool) -> Result<()> {
    let target_dir = root.join("target/hot-text");
    let agent_bin = target_dir.join("release/edge-agent");
    // Kept for a look with callgrind_annotate, and for `--reuse`.
    let out = target_dir.join("callgrind.out");
    if !reuse {
        profile(root, &target_dir, &agent_bin, &out)?;
    }

    write_script(root, &agent_bin, &out)
}

/// Builds the unstripped agent and profiles it, idle and connected, into `out`.
fn profile(root: &Path, target_dir: &Path, agent_bin: &Path, out: &Path) -> Result<()> {
    crate::provision::ensure_debian_packages(&["valgrind"])?;
    // The coordinator the profiled agent connects to (release, as in `bench rss`).
    crate::bench::build_release(root)?;
    let mut build = crate::cargo();
    build
        .args([
            "build",
            "--release",
            "-p",
            "edge-agent",
            "--bin",
            "edge-agent",
        ])
        .arg("--target-dir")
        .arg(target_dir)
        // Callgrind needs the symbols the release profile strips.
        .env("CARGO_PROFILE_RELEASE_STRIP", "none")
        // Profile the default layout, not one an earlier profile made.
        .env("EDGE_LINK_NO_HOT_TEXT", "1");
    crate::run(build).context("unstripped release build failed")?;

    let dir = tempfile::tempdir()?;
    let wrapper = dir.path().join("agent-under-callgrind");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec valgrind --tool=callgrind --demangle=no --callgrind-out-file={} {} \"$@\"\n",
            out.display(),
            agent_bin.display()
        ),
    )?;
    crate::image::chmod(&wrapper, 0o755)?;

    let coord = Coordinator::start_embedded(&dir.path().join("coordinator"))?;
    let port = coord.port().context("coordinator port")?;
    let mut journal = coord.journal();
    let mut o = AgentOptions::new("hot-text", format!("mqtt://127.0.0.1:{port}"));
    o.bin = Some(wrapper);
    let mut agent = Agent::spawn(&dir.path().join("agent"), o)?;
    // Start-up under callgrind takes far longer than the harness's usual minute.
    agent.wait_ready(Duration::from_secs(600))?;
    journal.wait_registered("hot-text", Duration::from_secs(600))?;
    println!(
        "hot-text: the agent registered under callgrind; idling {} s",
        IDLE.as_secs()
    );
    std::thread::sleep(IDLE); // the profile's length, not a sync
    agent.signal(Signal::SIGTERM)?;
    agent
        .wait_exit(Duration::from_secs(300))
        .context("the profiled agent did not exit after SIGTERM")?;

    Ok(())
}

/// Writes agent/hot-text.ld from the profile `out` of `agent_bin`.
fn write_script(root: &Path, agent_bin: &Path, out: &Path) -> Result<()> {
    let profile = std::fs::read_to_string(out)
        .with_context(|| format!("callgrind wrote no profile at {}", out.display()))?;
    let functions = executed_functions(&profile, agent_bin);
    let symbols = symbol_sizes(agent_bin)?;
    let patterns = patterns(&functions, &symbols);
    if patterns.len() < 100 {
        bail!(
            "the profile names only {} functions of {}: was the binary stripped?",
            patterns.len(),
            agent_bin.display()
        );
    }
    let script = root.join("agent/hot-text.ld");
    std::fs::write(&script, linker_script(&patterns))?;
    println!(
        "hot-text: {} functions ran in the agent's binary; wrote {} ({} section patterns)",
        functions.len(),
        script.display(),
        patterns.len()
    );
    Ok(())
}

/// The raw (mangled) names of the functions of `bin` that have cost in a callgrind profile
/// written with `--demangle=no` and the default string compression (`fn=(id) name` or
/// `cfn=(id) name` the first time a name appears, `fn=(id)` after; objects alike with `ob=`
/// and `cob=`).
fn executed_functions(profile: &str, bin: &Path) -> Vec<String> {
    let bin = bin.canonicalize().unwrap_or_else(|_| bin.to_owned());
    let mut names: HashMap<String, String> = HashMap::new();
    let mut objects: HashMap<String, PathBuf> = HashMap::new();
    let mut in_bin = false;
    let mut ran = BTreeSet::new();
    for line in profile.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            // An object's name is given where its id first appears, in `ob=` or a call's `cob=`.
            "ob" | "cob" => {
                let (id, path) = compressed(value);
                if let Some(p) = path {
                    objects.insert(id.to_owned(), PathBuf::from(p));
                }
                if key == "ob" {
                    let path = objects.get(id).cloned().unwrap_or_default();
                    // Callgrind names the object by the path it was mapped from.
                    in_bin = path == bin || path.file_name() == bin.file_name();
                }
            }
            "fn" | "cfn" => {
                let (id, name) = compressed(value);
                if let Some(n) = name {
                    names.insert(id.to_owned(), n.to_owned());
                }
                if key == "fn" && in_bin {
                    ran.insert(id.to_owned());
                }
            }
            _ => {}
        }
    }
    let mut out: Vec<String> = ran
        .into_iter()
        .filter_map(|id| names.get(&id).cloned())
        .collect();
    out.sort();
    out
}

/// `(id) name` -> (`(id)`, Some(name)); `(id)` -> (`(id)`, None); an uncompressed `name` is
/// its own id.
fn compressed(value: &str) -> (&str, Option<&str>) {
    if value.starts_with('(')
        && let Some(end) = value.find(')')
    {
        let name = value[end + 1..].trim();
        return (&value[..=end], (!name.is_empty()).then_some(name));
    }
    (value, Some(value))
}

/// The input-section patterns for a function: `.text.` and its name, a Rust hash
/// (`17h` and 16 hex digits, then `E`) and anything after it (ThinLTO's `.llvm.N` suffix)
/// globbed; v0-mangled names with their crate disambiguators globbed. `None` for what is not
/// a linkable name (see [`linkable`]).
fn pattern(name: &str) -> Option<String> {
    let name = base(name);
    if !linkable(name) {
        return None;
    }
    Some(match rust_hash_at(name) {
        Some(at) => format!(".text.{}*", &name[..at]),
        // v0 mangling (the standard library's): crate disambiguators `Cs<base62>_` globbed.
        None if name.starts_with("_R") => exact(&v0_globbed(name)),
        // A C function (zstd, ring's glue).
        None => exact(name),
    })
}

/// `.text.NAME`, or with ThinLTO's `.llvm.N` suffix.
fn exact(name: &str) -> String {
    format!(".text.{name} .text.{name}.llvm.*")
}

/// A name without ThinLTO's `.llvm.N` suffix or callgrind's `'N` (a recursion level).
fn base(name: &str) -> &str {
    let name = name.split('\'').next().unwrap_or(name);
    name.split(".llvm.").next().unwrap_or(name)
}

/// Whether a linker script can hold the name unquoted (callgrind's `0x...` for code without
/// a symbol and `(below main)` cannot).
fn linkable(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with("0x")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.$".contains(c))
}

/// The script's patterns for the functions that ran. A Rust name's hash is globbed (one
/// pattern for every target and build) unless that would take in more than [`GLOB_SLACK`]
/// bytes of code that did not run: a generic function's instantiations share the name
/// without the hash (`<&T as Debug>::fmt` has 300 KB of them). Those are left out: the hash
/// cannot name them instead, since it differs between the profiled (unstripped) build and a
/// release build, and between targets. With v0 symbol mangling, whose names carry the
/// generic arguments, they could be named exactly; that is the next step.
fn patterns(functions: &[String], symbols: &HashMap<String, u64>) -> BTreeSet<String> {
    let stem = |name: &str| rust_hash_at(base(name)).map(|at| base(name)[..at].to_owned());
    let mut all: HashMap<String, u64> = HashMap::new();
    for (name, size) in symbols {
        if let Some(st) = stem(name) {
            *all.entry(st).or_default() += size;
        }
    }
    let mut ran: HashMap<String, u64> = HashMap::new();
    for f in functions {
        if let Some(st) = stem(f) {
            *ran.entry(st).or_default() += symbols.get(base_keep_llvm(f)).copied().unwrap_or(0);
        }
    }
    functions
        .iter()
        .filter_map(|f| match stem(f) {
            Some(st) if all.get(&st).copied().unwrap_or(0) > ran[&st] + GLOB_SLACK => None,
            _ => pattern(f),
        })
        .collect()
}

/// A name without callgrind's `'N` only: the symbol table's spelling.
fn base_keep_llvm(name: &str) -> &str {
    name.split('\'').next().unwrap_or(name)
}

/// Sizes of the text symbols of `bin` (`nm -S`), by name.
fn symbol_sizes(bin: &Path) -> Result<HashMap<String, u64>> {
    let out = std::process::Command::new("nm")
        .args(["-S", "--defined-only"])
        .arg(bin)
        .output()
        .context("cannot run nm (binutils)")?;
    if !out.status.success() {
        bail!(
            "nm {} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, size, kind, name) = (f.next()?, f.next()?, f.next()?, f.next()?);
            if !matches!(kind, "t" | "T" | "W" | "w" | "i") {
                return None;
            }
            Some((name.to_owned(), u64::from_str_radix(size, 16).ok()?))
        })
        .collect())
}

/// A v0-mangled name with each crate disambiguator (`Cs`, base-62 digits, `_`) as `Cs*_`.
fn v0_globbed(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find("Cs") {
        let after = &rest[at + 2..];
        let digits = after.bytes().take_while(u8::is_ascii_alphanumeric).count();
        if digits > 0 && after.as_bytes().get(digits) == Some(&b'_') {
            out.push_str(&rest[..at]);
            out.push_str("Cs*_");
            rest = &after[digits + 1..];
        } else {
            out.push_str(&rest[..at + 2]);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Where a legacy-mangled Rust name's hash starts: the byte after `17h` in `..17h<16 hex>E`.
fn rust_hash_at(name: &str) -> Option<usize> {
    if !name.starts_with("_ZN") {
        return None;
    }
    let bytes = name.as_bytes();
    let at = name.rfind("17h")?;
    let hex = bytes.get(at + 3..at + 19)?;
    (hex.iter().all(u8::is_ascii_hexdigit) && bytes.get(at + 19) == Some(&b'E')).then_some(at + 3)
}

fn linker_script(patterns: &BTreeSet<String>) -> String {
    let mut s = String::from(
        "/* Written by `cargo xtask hot-text` (xtask/src/hot_text.rs): the functions a connected,\n   \
         idle edge-agent ran under callgrind, laid out together before the rest of .text so that\n   \
         the few pages they fill are all the code an idle agent keeps resident. */\nSECTIONS\n{\n",
    );
    s.push_str(&format!("  {SECTION} : {{\n"));
    for p in patterns {
        s.push_str(&format!("    *({p})\n"));
    }
    s.push_str("  }\n}\nINSERT BEFORE .text;\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_names_lose_their_hash_and_c_names_stay_exact() {
        assert_eq!(
            pattern("_ZN10edge_agent6uplink3run17h0123456789abcdefE").as_deref(),
            Some(".text._ZN10edge_agent6uplink3run17h*")
        );
        assert_eq!(
            pattern("_ZN4core3ptr13drop_in_place$LT$u8$GT$17hfedcba9876543210E.llvm.1234")
                .as_deref(),
            Some(".text._ZN4core3ptr13drop_in_place$LT$u8$GT$17h*")
        );
        assert_eq!(
            pattern("ZSTD_compressBlock.llvm.77").as_deref(),
            Some(".text.ZSTD_compressBlock .text.ZSTD_compressBlock.llvm.*")
        );
        assert_eq!(
            pattern("_RNvMsa_NtCsgEmfK2I1SDS_4core3fmtNtB5_9Formatter3pad").as_deref(),
            Some(
                ".text._RNvMsa_NtCs*_4core3fmtNtB5_9Formatter3pad \
                 .text._RNvMsa_NtCs*_4core3fmtNtB5_9Formatter3pad.llvm.*"
            )
        );
        assert_eq!(pattern("(below main)"), None);
        assert_eq!(pattern("0x0000000000401000"), None);
        assert_eq!(pattern("operator new(unsigned long)"), None);
    }

    #[test]
    fn only_functions_of_the_binary_that_had_cost_are_taken() {
        let profile = "\
version: 1
ob=(2) /lib/libc.so.6
fn=(4) memset
cob=(1) /bin/agent
cfn=(1) _ZN1a3run17h0123456789abcdefE
calls=1 0
0 1
ob=(1)
fl=(1) ???
fn=(1)
0 5
cob=(2)
cfi=(2) ???
cfn=(2) memcpy
calls=1 0
0 3
fn=(3) _ZN1a4idle17h0123456789abcdefE
0 1
ob=(2)
fn=(2)
0 3
ob=(1)
fn=(1)
0 2
";
        let f = executed_functions(profile, Path::new("/bin/agent"));
        assert_eq!(
            f,
            vec![
                "_ZN1a3run17h0123456789abcdefE",
                "_ZN1a4idle17h0123456789abcdefE"
            ]
        );
    }

    #[test]
    fn a_generic_name_with_much_code_that_did_not_run_is_left_out() {
        let symbols: HashMap<String, u64> = [
            ("_ZN1a3fmt17h1111111111111111E", 100),
            ("_ZN1a3fmt17h2222222222222222E", 10_000),
            ("_ZN1b3run17h3333333333333333E", 50),
            ("_ZN1b3run17h4444444444444444E", 60),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_owned(), s))
        .collect();
        let ran = vec![
            "_ZN1a3fmt17h1111111111111111E'2".to_owned(),
            "_ZN1b3run17h3333333333333333E".to_owned(),
        ];
        let p: Vec<String> = patterns(&ran, &symbols).into_iter().collect();
        assert_eq!(p, vec![".text._ZN1b3run17h*"]);
    }

    #[test]
    fn the_script_inserts_one_section_before_text() {
        let p: BTreeSet<String> = [".text._ZN1a3run17h*".to_owned()].into();
        let s = linker_script(&p);
        assert!(s.contains("*(.text._ZN1a3run17h*)"));
        assert!(s.trim_end().ends_with("INSERT BEFORE .text;"));
    }
}
