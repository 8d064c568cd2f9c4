//! `cargo xtask hot-text`: lays out the code an idle agent runs next to each other.
//!
//! An idle agent's resident memory is mostly its own code: the kernel maps a binary's text
//! in 64 KiB windows around each page fault (`fault_around_bytes`), and the functions that a
//! connected, idle agent runs (start-up, MQTT keep-alive, telemetry, the outbox) are spread
//! over the whole 20 MB text section: before this layout 6.3 MB of it was resident in an idle
//! agent, for about 1,900 functions and 1.8 MB of code that ran (callgrind).
//!
//! This command profiles the release agent under callgrind (an unstripped build in
//! `target/hot-text/`), connected to an embedded coordinator and then with the coordinator
//! gone (a board on a flaky link idles offline too), takes every function of the agent's
//! binary that ran, and writes `agent/hot-text.ld`: a linker script that puts those
//! functions' sections first, in an output section of their own before `.text`
//! (`INSERT BEFORE .text`, which keeps the linker's default layout for everything else).
//! `agent/build.rs` passes it to release links. Rust names each function's section
//! `.text.<mangled name>`. The workspace uses v0 mangling (`.cargo/config.toml`), whose names
//! spell a generic function's arguments; the script matches each name with what changes
//! between builds globbed (see [`stem`]), so one profile serves x86_64, aarch64 and armv7 and
//! later commits, although the unstripped profile build's crate hashes differ from the
//! release build's. A function added since the profile is laid out as before; a renamed one
//! falls back to the default layout. Rerun the command after large changes to what the agent
//! does at start or when idle.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use edge_tests::{Agent, AgentOptions, Coordinator};
use nix::sys::signal::Signal;

/// How long the profiled agent idles after it registered. Under callgrind it runs some 50
/// times slower, so this covers several telemetry intervals and MQTT keep-alives.
const IDLE: Duration = Duration::from_secs(90);
/// How long it then idles with its broker gone (a board on a flaky link: reconnect attempts,
/// telemetry into the outbox).
const IDLE_OFFLINE: Duration = Duration::from_secs(60);

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

    let mut coord = Coordinator::start_embedded(&dir.path().join("coordinator"))?;
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
    coord.stop()?;
    println!(
        "hot-text: the coordinator and its broker stopped; idling offline {} s",
        IDLE_OFFLINE.as_secs()
    );
    std::thread::sleep(IDLE_OFFLINE); // as above
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

/// The input-section patterns for a function: `.text.` and `.text.unlikely.` with its
/// [`stem`], and where the stem does not already end in `*`, the same with ThinLTO's
/// `.llvm.N` suffix. `None` for what is not a linkable name (see [`linkable`]).
fn pattern(name: &str) -> Option<String> {
    let name = base(name);
    if !linkable(name) {
        return None;
    }
    let stem = stem(name);
    Some(if name.starts_with("_ZN") && stem != name {
        format!(".text.{stem} .text.unlikely.{stem}")
    } else {
        exact(&stem)
    })
}

/// A name without what differs between builds of the same code: a legacy-mangled Rust name's
/// hash (`17h` and 16 hex digits, then `E`) and anything after it as `*`; a v0-mangled name
/// (ours, `.cargo/config.toml`, and the standard library's) with its crate disambiguators
/// (`Cs<base-62>_`, from the crate's metadata, which the target and profile change) and its
/// back-references (`B<base-62>_`, offsets into the name, which move when a disambiguator's
/// length does) as `*`; a C name as it is. v0 spells a generic function's arguments, so its
/// stem still names one instantiation.
fn stem(name: &str) -> String {
    match rust_hash_at(name) {
        Some(at) => format!("{}*", &name[..at]),
        // (v0 names are ASCII; the scan slices by byte.)
        None if name.starts_with("_R") && name.is_ascii() => v0_globbed(name),
        None => name.to_owned(),
    }
}

/// `.text.NAME`, or with ThinLTO's `.llvm.N` suffix, and both as `.text.unlikely.` (where
/// LLVM puts a function it deems cold: one that runs only at start-up often is).
fn exact(name: &str) -> String {
    format!(".text.{name} .text.{name}.llvm.* .text.unlikely.{name} .text.unlikely.{name}.llvm.*")
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

/// The script's patterns for the functions that ran. A pattern is the name's [`stem`] (one
/// pattern for every target and build), unless that would take in more than [`GLOB_SLACK`]
/// bytes of code that did not run: a legacy-mangled generic function's instantiations share
/// the name without the hash (`<&T as Debug>::fmt` had 300 KB of them), so those are left out.
/// v0 names, which spell the generic arguments, rarely share a stem.
fn patterns(functions: &[String], symbols: &HashMap<String, u64>) -> BTreeSet<String> {
    let mut all: HashMap<String, u64> = HashMap::new();
    for (name, size) in symbols {
        *all.entry(stem(base(name))).or_default() += size;
    }
    let mut ran: HashMap<String, u64> = HashMap::new();
    for f in functions {
        *ran.entry(stem(base(f))).or_default() +=
            symbols.get(base_keep_llvm(f)).copied().unwrap_or(0);
    }
    functions
        .iter()
        .filter(|f| {
            let st = stem(base(f));
            all.get(&st).copied().unwrap_or(0) <= ran[&st] + GLOB_SLACK
        })
        .filter_map(|f| pattern(f))
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

/// A v0-mangled name with each crate disambiguator (`Cs`, base-62 digits, `_`) as `Cs*_` and
/// each back-reference (`B`, base-62 digits or none, `_`) as `B*_`. Identifiers (a decimal
/// length, an optional `_`, then that many bytes) and the other base-62 numbers (`s`: a
/// disambiguator, `L`: a lifetime, `G`: a binder) are copied as they are, so a `B` or `Cs` in
/// an identifier is never taken for one, nor are a number's digits for a length; anything the
/// scan misreads stays exact, which only makes the pattern narrower.
fn v0_globbed(name: &str) -> String {
    let bytes = name.as_bytes();
    // The base-62 digits then `_` from `at`: the index after the `_`.
    let number_end = |at: usize| {
        let digits = bytes[at.min(bytes.len())..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        (bytes.get(at + digits) == Some(&b'_')).then_some((digits, at + digits + 1))
    };
    let mut out = String::with_capacity(name.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"Cs")
            && let Some((digits, end)) = number_end(i + 2)
            && digits > 0
        {
            out.push_str("Cs*_");
            i = end;
        } else if bytes[i] == b'B'
            && let Some((_, end)) = number_end(i + 1)
        {
            out.push_str("B*_");
            i = end;
        } else if matches!(bytes[i], b's' | b'L' | b'G')
            && let Some((_, end)) = number_end(i + 1)
        {
            // A disambiguator within a path, a lifetime, a binder: as it is (its digits are
            // not an identifier's length).
            out.push_str(&name[i..end]);
            i = end;
        } else if bytes[i].is_ascii_digit()
            && let Some(end) = const_data_end(bytes, i)
        {
            // An array length or a const generic argument: hex digits, not a length.
            out.push_str(&name[i..end]);
            i = end;
        } else if bytes[i].is_ascii_digit() {
            let digits = bytes[i..].iter().take_while(|b| b.is_ascii_digit()).count();
            let len: usize = name[i..i + digits].parse().unwrap_or(0);
            let mut end = i + digits;
            if bytes.get(end) == Some(&b'_') {
                end += 1;
            }
            let end = (end + len).min(bytes.len());
            out.push_str(&name[i..end]);
            i = end;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    out
}

/// The end (after its `_`) of a v0 const's data starting at `at`, where the bytes before it
/// read as one: `A` or `K`, then an integer type, or `A`, a basic element type and an integer
/// type (`RAhj8_`: `&[u8; 8]`). Other consts (an array of a named type) are not recognised.
fn const_data_end(bytes: &[u8], at: usize) -> Option<usize> {
    const INTEGER: &[u8] = b"abchijlmnostxy";
    const BASIC: &[u8] = b"abcdfhijlmnostxy";
    let before = |k: usize| at.checked_sub(k).map(|i| bytes[i]);
    let is_const = (matches!(before(2), Some(b'A' | b'K'))
        && before(1).is_some_and(|b| INTEGER.contains(&b)))
        || (before(3) == Some(b'A')
            && before(2).is_some_and(|b| BASIC.contains(&b))
            && before(1).is_some_and(|b| INTEGER.contains(&b)));
    if !is_const {
        return None;
    }
    let hex = bytes[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        .count();
    (bytes.get(at + hex) == Some(&b'_')).then_some(at + hex + 1)
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
            Some(
                ".text._ZN10edge_agent6uplink3run17h* .text.unlikely._ZN10edge_agent6uplink3run17h*"
            )
        );
        assert_eq!(
            pattern("_ZN4core3ptr13drop_in_place$LT$u8$GT$17hfedcba9876543210E.llvm.1234")
                .as_deref(),
            Some(
                ".text._ZN4core3ptr13drop_in_place$LT$u8$GT$17h* \
                 .text.unlikely._ZN4core3ptr13drop_in_place$LT$u8$GT$17h*"
            )
        );
        assert_eq!(
            pattern("ZSTD_compressBlock.llvm.77").as_deref(),
            Some(
                ".text.ZSTD_compressBlock .text.ZSTD_compressBlock.llvm.* \
                 .text.unlikely.ZSTD_compressBlock .text.unlikely.ZSTD_compressBlock.llvm.*"
            )
        );
        assert_eq!(
            pattern("_RNvMsa_NtCsgEmfK2I1SDS_4core3fmtNtB5_9Formatter3pad").as_deref(),
            Some(
                ".text._RNvMsa_NtCs*_4core3fmtNtB*_9Formatter3pad \
                 .text._RNvMsa_NtCs*_4core3fmtNtB*_9Formatter3pad.llvm.* \
                 .text.unlikely._RNvMsa_NtCs*_4core3fmtNtB*_9Formatter3pad \
                 .text.unlikely._RNvMsa_NtCs*_4core3fmtNtB*_9Formatter3pad.llvm.*"
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
        assert_eq!(p, vec![".text._ZN1b3run17h* .text.unlikely._ZN1b3run17h*"]);
    }

    #[test]
    fn v0_names_keep_their_generic_arguments_and_lose_what_a_build_changes() {
        // `<u8 as Debug>::fmt`-like instantiations in two builds whose crate hashes differ in
        // length, so the back-reference moves: one stem for both builds, one per argument.
        let a = "_RINvNtCs1234567890a_4core3fmt3fmtNtCsAbc_5bytes4ByteEB4_";
        let b = "_RINvNtCsZZ_4core3fmt3fmtNtCsXyz12_5bytes4ByteEB5_";
        let other = "_RINvNtCs1234567890a_4core3fmt3fmtNtCsAbc_5bytes4WordEB4_";
        assert_eq!(stem(a), stem(b));
        assert_eq!(stem(a), "_RINvNtCs*_4core3fmt3fmtNtCs*_5bytes4ByteEB*_");
        assert_ne!(stem(a), stem(other));
        // Back-reference 0 (`B_`) too; an identifier's own characters stay.
        assert_eq!(v0_globbed("_RNvB_3foo"), "_RNvB*_3foo");
        assert_eq!(v0_globbed("_RNvCs_3Csv"), "_RNvCs_3Csv");
        assert_eq!(v0_globbed("_RNvCsQ_7B_Cs12_3foo"), "_RNvCs*_7B_Cs12_3foo");
        // An array's length is not an identifier's length either.
        assert_eq!(
            v0_globbed("_RINvMs4_NtCsAb_4sled4treeNtB6_4Tree6insertRShRAhj8_ECsQ_10edge_agent"),
            "_RINvMs4_NtCs*_4sled4treeNtB*_4Tree6insertRShRAhj8_ECs*_10edge_agent"
        );
        // A disambiguator's digits (`Ms4_`) are not an identifier's length.
        assert_eq!(
            v0_globbed("_RINvMs4_NtCs9ag7LwNYl6E_4sled4treeNtB6_4Tree3getRShECsgpvq_10edge_agent"),
            "_RINvMs4_NtCs*_4sled4treeNtB*_4Tree3getRShECs*_10edge_agent"
        );
        let symbols: HashMap<String, u64> = [(a, 100), (other, 10_000)]
            .into_iter()
            .map(|(n, s)| (n.to_owned(), s))
            .collect();
        let p: Vec<String> = patterns(&[a.to_owned()], &symbols).into_iter().collect();
        assert_eq!(p, vec![exact(&stem(a))]);
    }

    #[test]
    fn the_script_inserts_one_section_before_text() {
        let p: BTreeSet<String> = [".text._ZN1a3run17h*".to_owned()].into();
        let s = linker_script(&p);
        assert!(s.contains("*(.text._ZN1a3run17h*)"));
        assert!(s.trim_end().ends_with("INSERT BEFORE .text;"));
    }
}
