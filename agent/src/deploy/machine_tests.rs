//! Unit tests of the deployment state machine: every forged or broken deployment from issue 4
//! is rejected with its reason and leaves the running pipeline alone; the happy path commits,
//! a failed health check rolls back. The coordinator side is played with `protocol` calls
//! (sign, chunk), exactly what `edge-coordinator deploy` sends.

use protocol::v1::VERSION;
use protocol::v1::deploy::{
    Artifact, Chunk, DeployKind, DeployStatus, HealthCheck, Manifest, MediaType, SignedManifest,
    SigningKey, Step, Target, chunk_artifact, public_key_hex, sha256_hex, sign,
};

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
fn tampered_artifact_is_rejected_with_the_hash_mismatch() {
    let a = module(1, 40);
    let m = deployment("dep-1", 1, &[("a.wasm", &a)]);
    let mut d = Deployer::new("d1", config());
    let store = MemoryStore::default();
    d.on_manifest(&sign(&m, &key()), NOW, &store);
    let mut tampered = a.clone();
    tampered[20] ^= 1;
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
    assert!(
        !all.iter()
            .any(|a| matches!(a, Action::ChunkRejected { .. }))
    );
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
    let acts = d.on_chunk(&conflicting, NOW, &store);
    assert!(matches!(&acts[..], [Action::ChunkRejected { reason }]
        if reason.contains("differs from the copy already received")));
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
            matches!(&acts[..], [Action::ChunkRejected { reason }] if reason.contains(needle)),
            "{needle}: {acts:?}"
        );
    }
    assert!(matches!(
        &d.on_chunk_payload(b"garbage", NOW, &store)[..],
        [Action::ChunkRejected { .. }]
    ));
    // The deployment is intact and the good chunk still lands.
    let acts = d.on_chunk(&good, NOW, &store);
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::ChunkRejected { .. })),
        "{acts:?}"
    );
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
    let mut t = NOW;
    for _ in 0..3 {
        t += 5_000;
        assert!(matches!(&d.on_tick(t)[..], [Action::RequestResend(_)]));
    }
    let acts = d.on_tick(t + 5_000);
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
