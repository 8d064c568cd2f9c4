//! Unit tests of the deployment state machine: every forged or broken deployment from issue 4
//! is rejected with its reason and leaves the running pipeline alone; the happy path commits,
//! a failed health check rolls back; a forged, damaged or misplaced chunk is dropped, counted
//! and asked for again without failing the deployment or burning its version. The coordinator
//! side is played with `protocol` calls (sign, chunk), exactly what `edge-coordinator deploy`
//! sends.

use protocol::v1::deploy::{
    Artifact, Chunk, DeployKind, DeployStatus, HealthCheck, MAX_CHUNK_DATA, Manifest, MediaType,
    SignedManifest, SigningKey, Step, Target, chunk_artifact, chunk_digests, public_key_hex,
    sha256_hex, sign,
};
use protocol::v1::{MAX_PAYLOAD_BYTES, VERSION};

use super::*;
use crate::deploy::TrustedKeyList;
use crate::deploy::store::MemoryStore;

const NOW: u64 = 1_700_000_000_000;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn config() -> DeployConfig {
    // Field by field: the section has a private field (the removed `groups` key).
    let mut c = DeployConfig::default();
    c.trusted_keys = TrustedKeyList::from_hex(vec![public_key_hex(&key().verifying_key())])
        .expect("a valid key");
    c.max_artifact_bytes = 1024;
    c.max_artifacts = 4;
    c.max_total_bytes = 2048;
    c.resend_after_ms = 5_000;
    c.max_stalled_resends = 3;
    c
}

fn module(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect()
}

/// What the coordinator would build: a manifest over `files`, chunked at 16 bytes.
fn deployment(id: &str, version: u64, files: &[(&str, &[u8])]) -> Manifest {
    Manifest {
        v: VERSION,
        deployment_id: id.into(),
        target: Target::Device("d1".into()),
        version,
        created_ms: NOW - 1_000,
        expires_ms: NOW + 3_600_000,
        kind: DeployKind::Pipeline,
        pipeline_toml: Some("[[stages]]\nmodule = \"a.wasm\"\n".into()),
        chunk_size: 16,
        artifacts: files
            .iter()
            .map(|(name, bytes)| Artifact {
                name: (*name).into(),
                sha256: sha256_hex(bytes),
                size: bytes.len() as u64,
                version: "1.0.0".into(),
                media_type: MediaType::WasmComponent,
                chunk_sha256: chunk_digests(bytes, 16),
            })
            .collect(),
        health: HealthCheck {
            messages: 5,
            seconds: 60,
        },
    }
}

fn chunks(m: &Manifest, bytes: &[u8]) -> Vec<Chunk> {
    chunk_artifact(&m.deployment_id, bytes, m.chunk_size)
}

/// The chunks the actions say were dropped.
fn dropped(actions: &[Action]) -> Vec<&DroppedChunk> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ChunkDropped(d) => Some(d),
            _ => None,
        })
        .collect()
}

/// The (digest, indexes) the actions ask for again.
fn resends(actions: &[Action]) -> Vec<(String, Vec<u32>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::RequestResend(r) => Some(r),
            _ => None,
        })
        .flat_map(|r| r.artifacts.iter())
        .map(|m| (m.sha256.clone(), m.indexes.clone()))
        .collect()
}

/// The counts of dropped chunks the status reports carry.
fn dropped_counts(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Report(s) => Some(s.chunks_dropped),
            _ => None,
        })
        .collect()
}

/// A chunk with the real header and other bytes of the right length: what someone who can
/// publish on the broker and read the (unencrypted) manifest can make.
fn forged(real: &Chunk) -> Chunk {
    Chunk {
        data: real.data.iter().map(|b| b ^ 0x5a).collect(),
        ..real.clone()
    }
}

fn statuses(actions: &[Action]) -> Vec<Step> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Report(DeployStatus { step, .. }) => Some(step.clone()),
            _ => None,
        })
        .collect()
}

/// Asserts the actions are exactly one rejection report containing `needle`, nothing that
/// touches the running pipeline, and returns the reason.
fn assert_rejected(actions: &[Action], needle: &str) -> String {
    assert_eq!(actions.len(), 1, "{actions:?}");
    match &actions[0] {
        Action::Report(DeployStatus {
            step: Step::Rejected { reason },
            ..
        }) => {
            assert!(
                reason.contains(needle),
                "reason {reason:?} lacks {needle:?}"
            );
            reason.clone()
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// Runs a deployment through to a started candidate; returns the actions of the last chunk.
fn download(d: &mut Deployer, store: &MemoryStore, m: &Manifest, files: &[&[u8]]) -> Vec<Action> {
    let acts = d.on_manifest(&sign(m, &key()), NOW, store);
    assert!(
        matches!(statuses(&acts)[0], Step::Downloading { .. }),
        "{acts:?}"
    );
    let mut last = acts;
    for f in files {
        for c in chunks(m, f) {
            last = d.on_chunk(&c, NOW, store);
        }
    }
    last
}

/// A deployer with `m` (over `bytes`) installed and committed.
fn installed(m: &Manifest, bytes: &[u8]) -> (Deployer, MemoryStore) {
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    let acts = download(&mut d, &store, m, &[bytes]);
    assert!(acts.contains(&Action::Start {
        manifest: m.clone()
    }));
    let acts = d.on_health(Health::Passed, NOW);
    assert!(acts.contains(&Action::Commit {
        manifest: m.clone()
    }));
    (d, store)
}

#[test]
fn happy_path_commits_then_failed_health_rolls_back_to_the_previous() {
    let a = module(1, 100);
    let b = module(2, 40);
    let m1 = deployment("dep-1", 1, &[("a.wasm", &a), ("b.wasm", &b)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();

    let acts = d.on_manifest(&sign(&m1, &key()), NOW, &store);
    assert_eq!(
        statuses(&acts),
        vec![Step::Downloading {
            received: 0,
            total: 140
        }]
    );
    let mut all = Vec::new();
    for c in chunks(&m1, &a).into_iter().chain(chunks(&m1, &b)) {
        all.extend(d.on_chunk(&c, NOW + 10, &store));
    }
    let steps = statuses(&all);
    assert!(steps.contains(&Step::Verifying));
    assert!(steps.contains(&Step::Starting));
    assert_eq!(
        all.iter()
            .filter(|a| matches!(a, Action::Start { .. }))
            .count(),
        1
    );
    assert_eq!(store.len(), 2);
    assert_eq!(store.get(&sha256_hex(&a)).expect("get"), Some(a.clone()));

    // Health: 5 messages needed.
    assert!(d.on_health(Health::Processed(3), NOW + 20).is_empty());
    let acts = d.on_health(Health::Processed(2), NOW + 30);
    assert_eq!(statuses(&acts), vec![Step::Healthy]);
    assert!(acts.contains(&Action::Commit {
        manifest: m1.clone()
    }));
    assert_eq!(d.installed(), Some(&m1));
    assert!(d.in_progress().is_none());

    // Version 2 fails its health check: back to version 1, which stays installed.
    let c = module(3, 50);
    let m2 = deployment("dep-2", 2, &[("a.wasm", &a), ("c.wasm", &c)]);
    let acts = download(&mut d, &store, &m2, &[&c]);
    assert!(acts.contains(&Action::Start {
        manifest: m2.clone()
    }));
    let acts = d.on_health(Health::Failed("stage features trapped".into()), NOW + 40);
    assert_eq!(
        acts[0],
        Action::Rollback {
            to: Some(m1.clone()),
            reason: "health check failed: stage features trapped".into()
        }
    );
    assert!(matches!(statuses(&acts)[0], Step::RolledBack { .. }));
    assert_eq!(d.installed(), Some(&m1));

    // Version 3 passes on time: previous becomes version 1.
    let m3 = deployment("dep-3", 3, &[("a.wasm", &a)]);
    let acts = d.on_manifest(&sign(&m3, &key()), NOW + 50, &store);
    // a.wasm is already stored: nothing to download, straight to start.
    assert!(acts.contains(&Action::Start {
        manifest: m3.clone()
    }));
    assert!(d.on_tick(NOW + 50 + 59_000).is_empty());
    let acts = d.on_tick(NOW + 50 + 60_000);
    assert!(acts.contains(&Action::Commit {
        manifest: m3.clone()
    }));
    assert_eq!(d.installed(), Some(&m3));
    assert_eq!(d.previous(), Some(&m1));
    assert!(d.pinned_artifacts().contains(&sha256_hex(&b)));
}

#[test]
fn unsigned_manifest_is_rejected() {
    let a = module(1, 10);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    // Published bare, without the signature envelope.
    let acts = d.on_manifest_payload(m.to_json().as_bytes(), NOW, &store);
    assert_rejected(&acts, "manifest is not signed");
    // Or with the signature fields emptied.
    let mut signed = sign(&m, &key());
    signed.signature.clear();
    assert_rejected(
        &d.on_manifest_payload(&signed.to_json(), NOW, &store),
        "manifest is not signed",
    );
    assert!(d.in_progress().is_none());
}

#[test]
fn manifest_signed_by_an_unknown_key_is_rejected() {
    let a = module(1, 10);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let stranger = SigningKey::from_bytes(&[9; 32]);
    let acts = d.on_manifest(&sign(&m, &stranger), NOW, &MemoryStore::default());
    assert_rejected(&acts, "signed by unknown key");
    // The report still says which deployment it was about.
    assert!(matches!(&acts[0], Action::Report(s) if s.deployment_id == "dep-1"));
}

#[test]
fn manifest_with_a_bad_signature_is_rejected() {
    let a = module(1, 10);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let mut signed = sign(&m, &key());
    // Raise the version after signing.
    signed.manifest_json = signed
        .manifest_json
        .replace("\"version\":1,", "\"version\":9,");
    let acts = d.on_manifest(&signed, NOW, &MemoryStore::default());
    assert_rejected(&acts, "bad signature");
    let garbage = SignedManifest {
        signature: "00".into(),
        ..sign(&m, &key())
    };
    assert_rejected(
        &d.on_manifest(&garbage, NOW, &MemoryStore::default()),
        "bad signature",
    );
}

#[test]
fn a_manifest_whose_chunk_digests_contradict_its_artifact_digest_is_rejected_at_the_end() {
    // Only the signer can make this: chunk digests over other bytes than the artifact's
    // sha256. Every chunk passes its check; the whole-artifact check still catches it.
    let a = module(1, 40);
    let mut tampered = a.clone();
    tampered[20] ^= 1;
    let mut m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    m.artifacts[0].chunk_sha256 = chunk_digests(&tampered, m.chunk_size);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    let mut last = Vec::new();
    for mut c in chunks(&m, &tampered) {
        // Chunks name the artifact by its signed digest; only the bytes differ.
        c.sha256 = sha256_hex(&a);
        last = d.on_chunk(&c, NOW, &store);
    }
    let reason = format!(
        "hash mismatch for a.wasm: expected {} got {}",
        sha256_hex(&a),
        sha256_hex(&tampered)
    );
    assert_eq!(statuses(&last), vec![Step::Rejected { reason }]);
    assert!(!last.iter().any(|a| matches!(a, Action::Start { .. })));
    assert!(store.is_empty());
    assert!(d.in_progress().is_none());
}

#[test]
fn version_lower_or_equal_to_the_installed_one_is_rejected() {
    let a = module(1, 10);
    let m3 = deployment("dep-3", 3, &[("a.wasm", &a)]);
    let (mut d, store) = installed(&m3, &a);
    let equal = deployment("dep-3b", 3, &[("a.wasm", &a)]);
    assert_rejected(
        &d.on_manifest(&sign(&equal, &key()), NOW, &store),
        "version 3 is not newer than installed version 3 (deployed to device:d1)",
    );
    // The floor holds across targets: a group deployment cannot downgrade the device.
    let mut via_group = deployment("dep-2g", 2, &[("a.wasm", &a)]);
    via_group.target = Target::Group("lab".into());
    let mut d_lab =
        Deployer::from_bytes("d1", d.config().clone(), &d.to_bytes()).expect("state round trip");
    d_lab.set_groups(vec!["lab".into()]);
    assert_rejected(
        &d_lab.on_manifest(&sign(&via_group, &key()), NOW, &store),
        "not newer than installed version 3",
    );
    let lower = deployment("dep-2", 2, &[("a.wasm", &a)]);
    assert_rejected(
        &d.on_manifest(&sign(&lower, &key()), NOW, &store),
        "version 2 is not newer than installed version 3",
    );
    assert_eq!(d.installed(), Some(&m3));
    // Redelivery of the installed manifest itself is answered, not rejected.
    let acts = d.on_manifest(&sign(&m3, &key()), NOW, &store);
    assert_eq!(statuses(&acts), vec![Step::Healthy]);
}

#[test]
fn replaying_a_rolled_back_version_is_rejected() {
    let a = module(1, 10);
    let m1 = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let (mut d, store) = installed(&m1, &a);
    let m2 = deployment("dep-2", 2, &[("a.wasm", &a)]);
    d.on_manifest(&sign(&m2, &key()), NOW, &store);
    d.on_health(Health::Failed("init failed".into()), NOW);
    assert_rejected(
        &d.on_manifest(&sign(&m2, &key()), NOW, &store),
        "version 2 is not newer than version 2 already attempted",
    );
}

#[test]
fn expired_manifest_is_rejected() {
    let a = module(1, 10);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let acts = d.on_manifest(&sign(&m, &key()), m.expires_ms, &MemoryStore::default());
    assert_rejected(&acts, "manifest expired at");
}

#[test]
fn manifest_for_another_device_or_group_is_rejected() {
    let a = module(1, 10);
    let mut m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    m.target = Target::Device("d2".into());
    let mut d = Deployer::new("d1", config());
    d.set_groups(vec!["lab".into()]);
    let store = MemoryStore::default();
    assert_rejected(
        &d.on_manifest(&sign(&m, &key()), NOW, &store),
        "manifest is for device d2, this is device d1",
    );
    m.target = Target::Group("other".into());
    assert_rejected(
        &d.on_manifest(&sign(&m, &key()), NOW, &store),
        "manifest is for group other, which device d1 is not in",
    );
    // Our own group (assigned at enrollment) is fine; without groups, no group is.
    m.target = Target::Group("lab".into());
    let mut unenrolled = Deployer::new("d1", config());
    assert_rejected(
        &unenrolled.on_manifest(&sign(&m, &key()), NOW, &store),
        "manifest is for group lab, which device d1 is not in",
    );
    let acts = d.on_manifest(&sign(&m, &key()), NOW, &store);
    assert!(matches!(statuses(&acts)[0], Step::Downloading { .. }));
}

#[test]
fn oversized_artifact_too_many_and_too_large_in_total_are_rejected() {
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    let big = module(1, 1025);
    let m = deployment("dep-1", 1, &[("big.wasm", &big)]);
    assert_rejected(
        &d.on_manifest(&sign(&m, &key()), NOW, &store),
        "artifact big.wasm is 1025 bytes, over the limit of 1024 bytes",
    );
    let files: Vec<Vec<u8>> = (0..5).map(|i| module(i, 10)).collect();
    let named: Vec<(String, &[u8])> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (format!("m{i}.wasm"), f.as_slice()))
        .collect();
    let refs: Vec<(&str, &[u8])> = named.iter().map(|(n, f)| (n.as_str(), *f)).collect();
    let m = deployment("dep-2", 2, &refs);
    assert_rejected(
        &d.on_manifest(&sign(&m, &key()), NOW, &store),
        "manifest lists 5 artifacts, over the limit of 4",
    );
    let (x, y, z) = (module(1, 1000), module(2, 1000), module(3, 1000));
    let m = deployment("dep-3", 3, &[("x", &x), ("y", &y), ("z", &z)]);
    assert_rejected(
        &d.on_manifest(&sign(&m, &key()), NOW, &store),
        "artifacts total 3000 bytes, over the limit of 2048 bytes",
    );
    assert!(d.in_progress().is_none());
}

#[test]
fn chunks_out_of_order_assemble() {
    let a = module(1, 100);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    let mut cs = chunks(&m, &a);
    cs.reverse();
    cs.swap(1, 4);
    let mut all = Vec::new();
    for c in cs {
        all.extend(d.on_chunk(&c, NOW, &store));
    }
    assert!(dropped(&all).is_empty());
    assert!(all.contains(&Action::Start { manifest: m }));
}

#[test]
fn duplicated_chunks_are_ignored_and_conflicting_ones_rejected() {
    let a = module(1, 100);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    let cs = chunks(&m, &a);
    d.on_chunk(&cs[0], NOW, &store);
    assert!(d.on_chunk(&cs[0], NOW, &store).is_empty());
    let mut conflicting = cs[0].clone();
    conflicting.data[0] ^= 0xff;
    // Already received: dropped and counted, nothing to ask for.
    let acts = d.on_chunk(&conflicting, NOW, &store);
    assert!(
        matches!(&acts[..], [Action::ChunkDropped(DroppedChunk { reason, index: 0, dropped: 1, .. })]
        if reason.contains("does not match the signed chunk digest"))
    );
    let mut all = Vec::new();
    for c in &cs[1..] {
        all.extend(d.on_chunk(c, NOW, &store));
        all.extend(d.on_chunk(c, NOW, &store));
    }
    assert_eq!(
        all.iter()
            .filter(|a| matches!(a, Action::Start { .. }))
            .count(),
        1
    );
    // Late duplicates after completion are harmless.
    assert!(d.on_chunk(&cs[3], NOW, &store).is_empty());
}

#[test]
fn chunks_with_wrong_offset_size_or_count_are_rejected() {
    let a = module(1, 100);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    let good = chunks(&m, &a)[2].clone();
    let cases = [
        (
            Chunk {
                offset: 33,
                ..good.clone()
            },
            "do not match the expected offset 32 and size 16",
        ),
        (
            Chunk {
                data: vec![0; 15],
                ..good.clone()
            },
            "do not match",
        ),
        (
            Chunk {
                total: 9,
                ..good.clone()
            },
            "expected 7 chunks",
        ),
        (
            Chunk {
                sha256: sha256_hex(b"other"),
                ..good.clone()
            },
            "does not list",
        ),
    ];
    for (c, needle) in cases {
        let acts = d.on_chunk(&c, NOW, &store);
        assert!(
            matches!(dropped(&acts)[..], [DroppedChunk { reason, .. }] if reason.contains(needle)),
            "{needle}: {acts:?}"
        );
    }
    assert!(matches!(
        &d.on_chunk_payload(b"garbage", NOW, &store)[..],
        [Action::ChunkRejected { .. }]
    ));
    // The deployment is intact and the good chunk still lands.
    let acts = d.on_chunk(&good, NOW, &store);
    assert!(dropped(&acts).is_empty(), "{acts:?}");
    assert!(d.in_progress().is_some());
}

#[test]
fn missing_chunks_are_requested_after_a_stall_and_on_reconnect() {
    let a = module(1, 100);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    let cs = chunks(&m, &a);
    for c in cs.iter().filter(|c| c.index != 2 && c.index != 5) {
        d.on_chunk(c, NOW, &store);
    }
    assert!(d.on_tick(NOW + 4_999).is_empty());
    let expected = Action::RequestResend(ResendRequest {
        deployment_id: "dep-1".into(),
        artifacts: vec![MissingChunks {
            sha256: sha256_hex(&a),
            indexes: vec![2, 5],
        }],
    });
    assert_eq!(d.on_tick(NOW + 5_000), vec![expected.clone()]);
    // Reconnect asks at once.
    assert!(d.on_reconnect(NOW + 6_000).contains(&expected));
    d.on_chunk(&cs[2], NOW + 7_000, &store);
    let acts = d.on_chunk(&cs[5], NOW + 7_000, &store);
    assert!(acts.contains(&Action::Start { manifest: m }));
}

#[test]
fn a_transfer_that_stays_stalled_fails() {
    let a = module(1, 100);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    d.on_manifest(&sign(&m, &key()), NOW, &MemoryStore::default());
    // Each request waits twice as long as the one before: 5, 10, 20 s; then 40 s more
    // without a chunk and it gives up.
    let mut t = NOW;
    for wait in [5_000, 10_000, 20_000] {
        assert!(
            d.on_tick(t + wait - 1).is_empty(),
            "too early at +{wait} ms"
        );
        t += wait;
        assert!(matches!(&d.on_tick(t)[..], [Action::RequestResend(_)]));
    }
    assert!(d.on_tick(t + 39_999).is_empty());
    let acts = d.on_tick(t + 40_000);
    assert!(matches!(&statuses(&acts)[..], [Step::Failed { reason }]
        if reason.contains("transfer stalled")));
    assert!(d.in_progress().is_none());
}

#[test]
fn state_persists_mid_download_and_resumes_after_restart() {
    let a = module(1, 100);
    let b = module(2, 30);
    let m = deployment("dep-1", 1, &[("a.wasm", &a), ("b.wasm", &b)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    let ca = chunks(&m, &a);
    for c in chunks(&m, &b).iter().chain(&ca[..3]) {
        d.on_chunk(c, NOW, &store);
    }
    let bytes = d.to_bytes();
    drop(d);

    let mut d = Deployer::from_bytes("d1", config(), &bytes).expect("restores");
    let acts = d.on_restart(NOW + 100);
    let want: Vec<u32> = (3..7).collect();
    assert!(
        acts.iter().any(|a| matches!(a, Action::RequestResend(r)
            if r.artifacts.len() == 1 && r.artifacts[0].indexes == want)),
        "{acts:?}"
    );
    let mut all = Vec::new();
    for c in &ca[3..] {
        all.extend(d.on_chunk(c, NOW + 200, &store));
    }
    assert!(all.contains(&Action::Start { manifest: m }));
    assert_eq!(store.get(&sha256_hex(&a)).expect("get"), Some(a));

    assert!(Deployer::from_bytes("d1", config(), &bytes[..bytes.len() - 1]).is_err());
    assert!(Deployer::from_bytes("d1", config(), b"junk").is_err());
}

#[test]
fn restart_during_the_health_check_rolls_back() {
    let a = module(1, 10);
    let m1 = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let (mut d, store) = installed(&m1, &a);
    let b = module(2, 10);
    let m2 = deployment("dep-2", 2, &[("b.wasm", &b)]);
    download(&mut d, &store, &m2, &[&b]);
    let mut d = Deployer::from_bytes("d1", config(), &d.to_bytes()).expect("restores");
    let acts = d.on_restart(NOW);
    assert_eq!(
        acts[0],
        Action::Rollback {
            to: Some(m1.clone()),
            reason: "agent restarted during the health check".into()
        }
    );
    assert_eq!(d.installed(), Some(&m1));
}

#[test]
fn a_module_used_twice_or_already_stored_travels_once() {
    let a = module(1, 40);
    let m = deployment("dep-1", 1, &[("a.wasm", &a), ("copy/a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    let acts = d.on_manifest(&sign(&m, &key()), NOW, &store);
    assert_eq!(
        statuses(&acts),
        vec![Step::Downloading {
            received: 0,
            total: 40
        }]
    );
    for c in chunks(&m, &a) {
        d.on_chunk(&c, NOW, &store);
    }
    assert_eq!(store.len(), 1);
    // Another deployer (a later deployment) finds it stored: nothing to download.
    let m2 = deployment("dep-2", 2, &[("a.wasm", &a)]);
    let acts = Deployer::new("d1", config()).on_manifest(&sign(&m2, &key()), NOW, &store);
    assert!(acts.contains(&Action::Start { manifest: m2 }), "{acts:?}");
    assert_eq!(store.len(), 1);
}

#[test]
fn manifest_redelivered_during_download_resumes_instead_of_rejecting() {
    let a = module(1, 100);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    let acts = d.on_manifest(&sign(&m, &key()), NOW + 1, &store);
    assert!(matches!(statuses(&acts)[0], Step::Downloading { .. }));
    assert!(acts.iter().any(|a| matches!(a, Action::RequestResend(_))));
    // A newer version supersedes the download.
    let m2 = deployment("dep-2", 2, &[("a.wasm", &a)]);
    let acts = d.on_manifest(&sign(&m2, &key()), NOW + 2, &store);
    assert!(
        matches!(&statuses(&acts)[0], Step::Failed { reason } if reason.contains("superseded"))
    );
    assert_eq!(d.in_progress(), Some(&m2));
}

#[test]
fn a_rejection_while_downloading_leaves_the_download_alone() {
    let a = module(1, 100);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    let mut other = deployment("dep-x", 5, &[("a.wasm", &a)]);
    other.target = Target::Device("d2".into());
    assert_rejected(
        &d.on_manifest(&sign(&other, &key()), NOW, &store),
        "device d2",
    );
    assert_eq!(d.in_progress(), Some(&m));
}

#[test]
fn end_to_end_over_wire_payloads_with_a_lost_chunk() {
    // Exactly the bytes the coordinator publishes: signed manifest JSON and binary chunks.
    let a = module(1, 300);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    let acts = d.on_manifest_payload(&sign(&m, &key()).to_json(), NOW, &store);
    assert!(matches!(statuses(&acts)[0], Step::Downloading { .. }));
    let payloads: Vec<Vec<u8>> = chunks(&m, &a)
        .iter()
        .map(|c| c.encode().expect("encodes"))
        .collect();
    for (i, p) in payloads.iter().enumerate().rev() {
        if i != 4 {
            d.on_chunk_payload(p, NOW, &store);
        }
    }
    let resend = d.on_reconnect(NOW + 1);
    let Some(Action::RequestResend(r)) = resend.last() else {
        panic!("no resend in {resend:?}");
    };
    assert_eq!(r.artifacts[0].indexes, vec![4]);
    let acts = d.on_chunk_payload(&payloads[4], NOW + 2, &store);
    assert!(acts.contains(&Action::Start {
        manifest: m.clone()
    }));
    let acts = d.on_health(Health::Processed(5), NOW + 3);
    assert!(acts.contains(&Action::Commit { manifest: m }));
    assert_eq!(store.get(&sha256_hex(&a)).expect("get"), Some(a));
}

#[test]
fn a_model_deployment_overrides_models_and_keeps_the_pipeline_installed() {
    let a = module(1, 40);
    let m1 = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let (mut d, store) = installed(&m1, &a);
    let v2 = module(7, 30);
    let mut model = deployment("model-2", 2, &[("models/x.onnx", &v2)]);
    model.kind = DeployKind::Model;
    model.pipeline_toml = None;
    download(&mut d, &store, &model, &[&v2]);
    let acts = d.on_health(Health::Passed, NOW);
    assert!(acts.contains(&Action::Commit {
        manifest: model.clone()
    }));
    assert_eq!(d.installed(), Some(&m1), "the pipeline stays installed");
    assert_eq!(
        d.model_overrides().get("models/x.onnx"),
        Some(&sha256_hex(&v2))
    );
    assert!(d.pinned_artifacts().contains(&sha256_hex(&v2)));
    assert!(d.pinned_artifacts().contains(&sha256_hex(&a)));
    // Redelivered: healthy again, not a downgrade rejection.
    let again = d.on_manifest(&sign(&model, &key()), NOW, &store);
    assert_eq!(statuses(&again), vec![Step::Healthy]);
    // Survives a restart.
    let d2 = Deployer::from_bytes("d1", config(), &d.to_bytes()).expect("restores");
    assert_eq!(d2.model_overrides(), d.model_overrides());

    // A failed model health check rolls back to the installed pipeline, overrides unchanged.
    let v3 = module(8, 30);
    let mut bad = deployment("model-3", 3, &[("models/x.onnx", &v3)]);
    bad.kind = DeployKind::Model;
    bad.pipeline_toml = None;
    download(&mut d, &store, &bad, &[&v3]);
    let acts = d.on_health(Health::Failed("nan".into()), NOW);
    assert!(acts.contains(&Action::Rollback {
        to: Some(m1.clone()),
        reason: "health check failed: nan".into()
    }));
    assert_eq!(
        d.model_overrides().get("models/x.onnx"),
        Some(&sha256_hex(&v2))
    );

    // A new pipeline brings its own models: overrides go.
    let b = module(9, 20);
    let m4 = deployment("dep-4", 4, &[("b.wasm", &b)]);
    download(&mut d, &store, &m4, &[&b]);
    d.on_health(Health::Passed, NOW);
    assert!(d.model_overrides().is_empty());
}

#[test]
fn a_forged_chunk_is_dropped_counted_and_asked_for_again_then_the_real_one_completes() {
    let a = module(1, 100);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    let cs = chunks(&m, &a);
    for c in &cs[..3] {
        d.on_chunk(c, NOW, &store);
    }

    let acts = d.on_chunk(&forged(&cs[3]), NOW + 1, &store);
    assert_eq!(
        dropped(&acts),
        vec![&DroppedChunk {
            deployment_id: "dep-1".into(),
            artifact: "a.wasm".into(),
            index: 3,
            reason: "chunk 3 of a.wasm: data does not match the signed chunk digest".into(),
            dropped: 1,
        }]
    );
    // Asked for again at once through the resend path; nothing reported as failed.
    assert_eq!(resends(&acts), vec![(sha256_hex(&a), vec![3])]);
    assert!(statuses(&acts).is_empty(), "{acts:?}");
    assert_eq!(d.in_progress(), Some(&m));

    let mut all = Vec::new();
    for c in &cs[3..] {
        all.extend(d.on_chunk(c, NOW + 2, &store));
    }
    assert!(all.contains(&Action::Start {
        manifest: m.clone()
    }));
    // Every report after the drop says so, up to the commit.
    assert!(dropped_counts(&all).iter().all(|&n| n == 1), "{all:?}");
    let acts = d.on_health(Health::Passed, NOW + 3);
    assert!(acts.contains(&Action::Commit {
        manifest: m.clone()
    }));
    assert_eq!(dropped_counts(&acts), vec![1]);
    assert_eq!(store.get(&sha256_hex(&a)).expect("get"), Some(a));
    assert_eq!(d.installed(), Some(&m), "installed on the same version");
}

#[test]
fn a_forged_chunk_for_every_index_fails_nothing_and_burns_no_version() {
    let a = module(1, 100);
    let b = module(2, 30);
    let m = deployment("dep-1", 1, &[("a.wasm", &a), ("b.wasm", &b)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    let real: Vec<Chunk> = chunks(&m, &a).into_iter().chain(chunks(&m, &b)).collect();
    assert_eq!(real.len(), 7 + 2);

    // Every forged chunk before any real one: all dropped; the first is asked for at once,
    // the rest once the gap has passed, each index once.
    let mut acts = Vec::new();
    for c in &real {
        acts.extend(d.on_chunk(&forged(c), NOW, &store));
    }
    let drops = dropped(&acts);
    assert_eq!(drops.len(), real.len());
    assert_eq!(drops.last().map(|x| x.dropped), Some(real.len() as u64));
    assert!(statuses(&acts).is_empty(), "{acts:?}");
    assert_eq!(resends(&acts), vec![(sha256_hex(&a), vec![0])]);
    assert!(d.on_tick(NOW + 999).is_empty(), "held back by the gap");
    let later = d.on_tick(NOW + 1_000);
    assert_eq!(
        resends(&later),
        vec![
            (sha256_hex(&a), (1..7).collect()),
            (sha256_hex(&b), vec![0, 1])
        ]
    );
    assert!(
        d.on_tick(NOW + 3_000).is_empty(),
        "each drop is asked for once"
    );

    // The real chunks, each followed by another forgery of the same (now received) index:
    // those are dropped too, but nothing is asked for.
    let mut acts = Vec::new();
    for c in &real {
        acts.extend(d.on_chunk(c, NOW + 3_000, &store));
        if matches!(d.state.phase, Phase::Downloading(_)) {
            acts.extend(d.on_chunk(&forged(c), NOW + 3_000, &store));
        }
    }
    assert!(resends(&acts).is_empty(), "{acts:?}");
    assert!(acts.contains(&Action::Start {
        manifest: m.clone()
    }));
    let acts = d.on_health(Health::Passed, NOW + 4_000);
    let healthy = acts
        .iter()
        .find_map(|a| match a {
            Action::Report(s) if s.step == Step::Healthy => Some(s.clone()),
            _ => None,
        })
        .expect("a healthy report");
    // 9 forged before, 8 after (the last real chunk completed the download).
    assert_eq!(healthy.chunks_dropped, 9 + 8);
    assert_eq!(healthy.version, 1);
    assert_eq!(d.installed(), Some(&m));
    // The version floor is the committed version, as for any healthy deployment.
    let next = deployment("dep-2", 2, &[("a.wasm", &a)]);
    let acts = d.on_manifest(&sign(&next, &key()), NOW + 5_000, &store);
    assert!(acts.contains(&Action::Start { manifest: next }), "{acts:?}");
}

#[test]
fn chunks_of_the_wrong_length_or_for_an_unknown_artifact_or_index_are_dropped() {
    let a = module(1, 100);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    let cs = chunks(&m, &a);

    // Too short, too long, and the last chunk (4 bytes) padded to a full one.
    let short = Chunk {
        data: cs[2].data[..8].to_vec(),
        ..cs[2].clone()
    };
    let mut long = cs[2].clone();
    long.data.push(0);
    let mut padded = cs[6].clone();
    padded.data.resize(16, 0);
    let mut asked = Vec::new();
    for (c, index) in [(short, 2), (long, 2), (padded, 6)] {
        let acts = d.on_chunk(&c, NOW, &store);
        assert!(
            matches!(dropped(&acts)[..], [DroppedChunk { reason, index: i, .. }]
                if *i == index && reason.contains("do not match the expected offset")),
            "{acts:?}"
        );
        asked.extend(resends(&acts));
    }
    // The first at once, the others (2 came again after its request) after the gap.
    assert_eq!(asked, vec![(sha256_hex(&a), vec![2])]);
    assert_eq!(
        resends(&d.on_tick(NOW + 1_000)),
        vec![(sha256_hex(&a), vec![2, 6])]
    );
    let t = NOW + 1_000;

    // An artifact the deployment does not list, an index past the end: dropped and counted,
    // nothing to ask for.
    let stranger = Chunk {
        sha256: sha256_hex(b"other"),
        ..cs[0].clone()
    };
    let past_end = Chunk {
        index: 7,
        total: 8,
        offset: 112,
        ..cs[0].clone()
    };
    for c in [stranger, past_end] {
        let acts = d.on_chunk(&c, t, &store);
        assert_eq!(dropped(&acts).len(), 1, "{acts:?}");
        assert!(resends(&acts).is_empty(), "{acts:?}");
    }
    assert!(dropped(&d.on_chunk(&cs[0], t, &store)).is_empty());

    // Still downloading; the real chunks finish it and the count went into the reports.
    let mut all = Vec::new();
    for c in &cs[1..] {
        all.extend(d.on_chunk(c, t, &store));
    }
    assert!(all.contains(&Action::Start { manifest: m }));
    assert!(dropped_counts(&all).iter().all(|&n| n == 5), "{all:?}");
}

#[test]
fn chunks_before_their_manifest_are_ignored_and_checked_once_it_is_there() {
    let a = module(1, 100);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    let cs = chunks(&m, &a);
    // Nothing is downloading: real and forged chunks alike are ignored, as before (they are
    // not kept, so none can skip the check later).
    for c in &cs {
        assert!(d.on_chunk(&forged(c), NOW, &store).is_empty());
        assert!(d.on_chunk(c, NOW, &store).is_empty());
    }
    assert!(store.is_empty());
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    // The same forgeries once the manifest is there: dropped.
    let acts = d.on_chunk(&forged(&cs[0]), NOW, &store);
    assert_eq!(dropped(&acts).len(), 1);
    // Redelivery of the manifest asks for everything missing (the early real chunks too).
    let acts = d.on_manifest(&sign(&m, &key()), NOW + 1, &store);
    assert_eq!(resends(&acts), vec![(sha256_hex(&a), (0..7).collect())]);
    let mut all = Vec::new();
    for c in &cs {
        all.extend(d.on_chunk(c, NOW + 2, &store));
    }
    assert!(all.contains(&Action::Start { manifest: m }));
    assert_eq!(store.get(&sha256_hex(&a)).expect("get"), Some(a));
}

#[test]
fn a_download_persisted_without_chunk_digests_is_not_resumed() {
    let a = module(1, 100);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    d.on_chunk(&chunks(&m, &a)[0], NOW, &store);
    // What an agent version before chunk digests persisted: the same state without them.
    let bytes = d.to_bytes();
    let len = usize::try_from(u64::from_be_bytes(
        bytes[4..12].try_into().expect("8 bytes"),
    ))
    .expect("length");
    let mut state: serde_json::Value = serde_json::from_slice(&bytes[12..12 + len]).expect("json");
    let download = &mut state["phase"]["Downloading"];
    for a in download["manifest"]["artifacts"]
        .as_array_mut()
        .expect("artifacts")
    {
        a.as_object_mut().expect("artifact").remove("chunk_sha256");
    }
    let json = serde_json::to_vec(&state).expect("json");
    let mut old = b"EDS1".to_vec();
    old.extend_from_slice(&(json.len() as u64).to_be_bytes());
    old.extend_from_slice(&json);
    old.extend_from_slice(&bytes[12 + len..]);

    let mut d = Deployer::from_bytes("d1", config(), &old).expect("an older state loads");
    let acts = d.on_restart(NOW + 1);
    assert!(
        matches!(&statuses(&acts)[..], [Step::Failed { reason }] if reason.contains("without chunk digests")),
        "{acts:?}"
    );
    assert!(d.in_progress().is_none());
}

#[test]
fn the_largest_default_deployment_fits_one_manifest() {
    // The worst case for the chunk digest list under the default limits: every artifact as
    // long a name and version as allowed, the most chunks 32 MiB can make in 16 artifacts
    // (511 full 64 KiB chunks and a 1-byte last chunk in each: 527 digests).
    let limits = DeployConfig::default();
    let cs = MAX_CHUNK_DATA as u64;
    let count = u64::from(limits.max_artifacts);
    let full_chunks = limits.max_total_bytes / cs - 1;
    let mut sizes: Vec<u64> = (0..count).map(|_| 1).collect();
    let mut left = full_chunks;
    for s in &mut sizes {
        let k = left.min(limits.max_artifact_bytes / cs - 1);
        *s += k * cs;
        left -= k;
    }
    assert_eq!(left, 0);
    assert!(sizes.iter().sum::<u64>() <= limits.max_total_bytes);
    assert!(sizes.iter().all(|&s| s <= limits.max_artifact_bytes));
    let mut m = deployment("d".repeat(64).as_str(), u64::MAX, &[]);
    m.chunk_size = MAX_CHUNK_DATA as u32;
    m.pipeline_toml = None;
    m.kind = DeployKind::Model;
    m.target = Target::Group("g".repeat(64));
    m.artifacts = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| Artifact {
            name: format!("{i:02}{}.onnx", "n".repeat(248)),
            // Digests are fixed-width: any valid ones give the size.
            sha256: sha256_hex(&[i as u8]),
            size,
            version: "v".repeat(255),
            media_type: MediaType::Onnx,
            chunk_sha256: (0..m.chunk_count(size))
                .map(|j| sha256_hex(&j.to_be_bytes()))
                .collect(),
        })
        .collect();
    let digests: usize = m.artifacts.iter().map(|a| a.chunk_sha256.len()).sum();
    assert_eq!(digests, 527);
    m.validate().expect("a valid manifest");
    let size = sign(&m, &key()).to_json().len();
    // The rest of the payload is what a pipeline description may take.
    let room = MAX_PAYLOAD_BYTES - size;
    println!("worst-case signed manifest: {size} bytes, {room} bytes left of {MAX_PAYLOAD_BYTES}");
    assert!(room > 40 * 1024, "{size} bytes leaves only {room}");
}
