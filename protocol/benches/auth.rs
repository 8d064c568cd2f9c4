//! Per-message cost of authentication (`cargo xtask bench auth`): the MAC every device message
//! carries, against the ed25519 signature that was the alternative, side by side with what each
//! message already costs (building its JSON envelope). Medians of 5 rounds; the machine is
//! shared, so read the ratios.
//!
//! The offload line adds what one offloaded frame pays for authentication on its round trip:
//! the device seals the request, the coordinator opens it, seals the answer, the device opens it.

use std::hint::black_box;
use std::time::Instant;

use protocol::v1::auth::{Identity, Stamp};
use protocol::v1::{Class, Data, Envelope, VERSION};

const ROUNDS: usize = 5;

/// Median over [`ROUNDS`] of the time per call of `f`, in microseconds.
fn per_call_us(iters: u32, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() * 1e6 / f64::from(iters)
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[ROUNDS / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; under qemu the xtask passes a label.
    let emulated = std::env::var("EDGE_BENCH_EMULATED").is_ok();
    let arch = std::env::consts::ARCH;
    let iters: u32 = if emulated { 2_000 } else { 20_000 };
    let device = Identity::generate();
    let coord = Identity::generate();
    let (dp, cp) = (device.public(), coord.public());
    let keys = device.session_keys(&cp, "pi-1", &dp, &cp).expect("keys");
    let topic = "edge/v1/pi-1/data/vibration/features";

    println!(
        "auth per message on {arch}{}: median of {ROUNDS} rounds x {iters} calls, microseconds",
        if emulated {
            " (EMULATED under qemu-user: relative figures only)"
        } else {
            ""
        }
    );
    println!("{:<34} {:>10} {:>10}", "", "200 B", "1 KiB");
    let mut rows: Vec<(&str, [f64; 2])> = Vec::new();
    let sizes = [200usize, 1024];
    let mut measure = |label: &'static str, f: &mut dyn FnMut(&[u8]) -> usize| {
        let mut out = [0.0; 2];
        for (i, n) in sizes.iter().enumerate() {
            let payload = vec![b'x'; *n];
            out[i] = per_call_us(iters, || {
                black_box(f(black_box(&payload)));
            });
        }
        rows.push((label, out));
    };
    let mut counter = 0u64;
    measure("baseline: JSON envelope", &mut |p| {
        let env = Envelope {
            v: VERSION,
            id: protocol::v1::message_id(7, 42),
            device: "pi-1".into(),
            class: Class::Results,
            seq: 42,
            prev: None,
            created_ms: 1,
            body: Data {
                stream: "vibration/features".into(),
                payload: serde_json::Value::String(String::from_utf8_lossy(p).into_owned()).into(),
            },
        };
        env.to_json().len()
    });
    measure("hmac seal (device)", &mut |p| {
        counter += 1;
        keys.up.seal(topic, p, Stamp { epoch: 1, counter }).len()
    });
    let sealed: Vec<Vec<u8>> = sizes
        .iter()
        .map(|n| {
            keys.up.seal(
                topic,
                &vec![b'x'; *n],
                Stamp {
                    epoch: 1,
                    counter: 1,
                },
            )
        })
        .collect();
    measure("hmac open (coordinator)", &mut |p| {
        let s = if p.len() == 200 {
            &sealed[0]
        } else {
            &sealed[1]
        };
        keys.up.open(topic, s).map(|(b, _)| b.len()).unwrap_or(0)
    });
    measure("ed25519 sign (the alternative)", &mut |p| {
        device.seal(topic, p, 1).len()
    });
    let signed: Vec<Vec<u8>> = sizes
        .iter()
        .map(|n| device.seal(topic, &vec![b'x'; *n], 1))
        .collect();
    measure("ed25519 verify (the alternative)", &mut |p| {
        let s = if p.len() == 200 {
            &signed[0]
        } else {
            &signed[1]
        };
        dp.open(topic, s).map(|(b, _)| b.len()).unwrap_or(0)
    });
    let get = |label: &str| {
        rows.iter()
            .find(|r| r.0 == label)
            .map(|r| r.1)
            .unwrap_or_default()
    };
    let (base, seal, open, sign, verify) = (
        get("baseline: JSON envelope"),
        get("hmac seal (device)"),
        get("hmac open (coordinator)"),
        get("ed25519 sign (the alternative)"),
        get("ed25519 verify (the alternative)"),
    );
    for (label, v) in &rows {
        println!("{label:<34} {:>10.3} {:>10.3}", v[0], v[1]);
    }
    println!(
        "ratios at 200 B: hmac seal / envelope {:.2}x; ed25519 sign / hmac seal {:.0}x; ed25519 verify / hmac open {:.0}x",
        seal[0] / base[0],
        sign[0] / seal[0],
        verify[0] / open[0]
    );
    println!(
        "offload round trip, 1 KiB each way: authentication adds {:.1} us (hmac: seal + open, both directions); ed25519 would add {:.1} us",
        2.0 * (seal[1] + open[1]),
        2.0 * (sign[1] + verify[1])
    );
}
