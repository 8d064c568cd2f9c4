//! Aggregation of client updates and the server optimizer: plain functions over `f32` slices,
//! no I/O, no clock, no randomness, so the round engine and the benchmark call the same code.
//!
//! Sign convention: a client's `delta` is `new local weights - global weights` (what it
//! trained minus what it was sent), so applying an aggregate means `global += lr * step`.
//!
//! - [`aggregate`] turns the round's deltas into one combined delta: [`Rule::FedAvg`] is the
//!   mean weighted by `samples / (1 + staleness)` (McMahan et al. 2017, "Communication-Efficient
//!   Learning of Deep Networks from Decentralized Data", with the staleness discount of the
//!   coordinator's late-update rule); [`Rule::TrimmedMean`] and [`Rule::Median`] are the
//!   coordinate-wise robust estimators of Yin et al. 2018 ("Byzantine-Robust Distributed
//!   Learning: Towards Optimal Statistical Rates"). They are unweighted (a sample count is a
//!   claim a hostile client can inflate); a stale update's delta is scaled by
//!   `1 / (1 + staleness)` before it enters them.
//! - [`ServerState::apply`] moves the global weights by the combined delta with a
//!   [`ServerOptimizer`]: plain SGD (`lr = 1` is FedAvg), FedAvgM (server momentum, Hsu et al.
//!   2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
//!   Classification") or FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization",
//!   Algorithm 2, without bias correction as in the paper).

use serde::{Deserialize, Serialize};

/// One accepted client update, as the aggregate sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientUpdate {
    pub device: String,
    /// Samples the local training used (FedAvg's weight).
    pub samples: u32,
    /// Rounds between the round the update was trained for and the round it is applied to
    /// (0 for an update on time).
    pub staleness: u32,
    /// New local weights minus the global weights the client started from.
    pub delta: Vec<f32>,
}

impl ClientUpdate {
    /// The late-update discount `1 / (1 + staleness)`.
    pub fn discount(&self) -> f32 {
        1.0 / (1.0 + self.staleness as f32)
    }
}

/// How the round's deltas are combined.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum Rule {
    /// Mean weighted by `samples / (1 + staleness)`.
    FedAvg,
    /// Per coordinate: drop the `floor(trim * n)` smallest and largest values, average the
    /// rest. `trim` is in `[0, 0.5)`.
    TrimmedMean { trim: f32 },
    /// Per coordinate median (the mean of the two middle values for an even count).
    Median,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::FedAvg => f.write_str("fedavg"),
            Rule::TrimmedMean { trim } => write!(f, "trimmed-mean({trim})"),
            Rule::Median => f.write_str("median"),
        }
    }
}

/// Combines the updates' deltas into one. Every delta must have the length of the first one;
/// an update of another length is ignored (the engine never passes one). No updates, or a
/// FedAvg whose weights sum to zero, give an empty or all-zero delta.
pub fn aggregate(rule: &Rule, updates: &[ClientUpdate]) -> Vec<f32> {
    let Some(first) = updates.first() else {
        return Vec::new();
    };
    let n = first.delta.len();
    let usable: Vec<&ClientUpdate> = updates.iter().filter(|u| u.delta.len() == n).collect();
    match rule {
        Rule::FedAvg => fedavg(&usable, n),
        Rule::TrimmedMean { trim } => {
            let k = trimmed_count(*trim, usable.len());
            coordinatewise(&usable, n, |column| {
                let kept = &column[k..column.len() - k];
                kept.iter().sum::<f32>() / kept.len() as f32
            })
        }
        Rule::Median => coordinatewise(&usable, n, |column| {
            let m = column.len() / 2;
            if column.len() % 2 == 1 {
                column[m]
            } else {
                (column[m - 1] + column[m]) / 2.0
            }
        }),
    }
}

/// Values dropped at each end: `floor(trim * n)`, leaving at least one.
fn trimmed_count(trim: f32, n: usize) -> usize {
    let trim = if trim.is_finite() {
        trim.clamp(0.0, 0.5)
    } else {
        0.0
    };
    ((trim as f64 * n as f64).floor() as usize).min(n.saturating_sub(1) / 2)
}

fn fedavg(updates: &[&ClientUpdate], n: usize) -> Vec<f32> {
    // f64 accumulators: thousands of clients of similar magnitude would lose bits in f32.
    let mut acc = vec![0f64; n];
    let mut total = 0f64;
    for u in updates {
        let w = f64::from(u.samples) * f64::from(u.discount());
        if w <= 0.0 {
            continue;
        }
        total += w;
        for (a, &d) in acc.iter_mut().zip(&u.delta) {
            *a += w * f64::from(d);
        }
    }
    if total <= 0.0 {
        return vec![0.0; n];
    }
    acc.into_iter().map(|a| (a / total) as f32).collect()
}

/// Applies `reduce` to each coordinate's sorted values (stale deltas discounted first).
fn coordinatewise(updates: &[&ClientUpdate], n: usize, reduce: impl Fn(&[f32]) -> f32) -> Vec<f32> {
    if updates.is_empty() {
        return vec![0.0; n];
    }
    let discounts: Vec<f32> = updates.iter().map(|u| u.discount()).collect();
    let mut column = Vec::with_capacity(updates.len());
    (0..n)
        .map(|i| {
            column.clear();
            column.extend(updates.iter().zip(&discounts).map(|(u, s)| u.delta[i] * s));
            column.sort_unstable_by(f32::total_cmp);
            reduce(&column)
        })
        .collect()
}

/// How the server moves the global weights by the combined delta.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "optimizer", rename_all = "lowercase")]
pub enum ServerOptimizer {
    /// `global += lr * delta` (`lr = 1`: plain FedAvg).
    Sgd { lr: f32 },
    /// Server momentum (Hsu et al. 2019): `m = momentum * m + delta; global += lr * m`.
    FedAvgM { lr: f32, momentum: f32 },
    /// Adam on the server (Reddi et al. 2021): `m = b1 m + (1 - b1) delta;
    /// v = b2 v + (1 - b2) delta^2; global += lr * m / (sqrt(v) + tau)`.
    FedAdam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        tau: f32,
    },
}

impl std::fmt::Display for ServerOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerOptimizer::Sgd { lr } => write!(f, "sgd(lr {lr})"),
            ServerOptimizer::FedAvgM { lr, momentum } => {
                write!(f, "fedavgm(lr {lr}, momentum {momentum})")
            }
            ServerOptimizer::FedAdam {
                lr,
                beta1,
                beta2,
                tau,
            } => write!(
                f,
                "fedadam(lr {lr}, beta1 {beta1}, beta2 {beta2}, tau {tau})"
            ),
        }
    }
}

/// The server optimizer's memory: the first moment (FedAvgM's momentum, FedAdam's `m`) and
/// FedAdam's second moment, allocated on first use. Persisted with the task so a restart
/// continues the same trajectory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerState {
    /// Number of weights.
    pub n: usize,
    /// Steps applied.
    pub steps: u64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl ServerState {
    pub fn new(n: usize) -> Self {
        ServerState {
            n,
            steps: 0,
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    /// Moves `global` by `delta`. A `delta` or `global` of another length than the state's is
    /// left alone (the engine never passes one).
    pub fn apply(&mut self, opt: &ServerOptimizer, global: &mut [f32], delta: &[f32]) {
        if global.len() != self.n || delta.len() != self.n {
            return;
        }
        self.steps += 1;
        match *opt {
            ServerOptimizer::Sgd { lr } => {
                for (g, d) in global.iter_mut().zip(delta) {
                    *g += lr * d;
                }
            }
            ServerOptimizer::FedAvgM { lr, momentum } => {
                self.m.resize(self.n, 0.0);
                for ((g, m), d) in global.iter_mut().zip(&mut self.m).zip(delta) {
                    *m = momentum * *m + d;
                    *g += lr * *m;
                }
            }
            ServerOptimizer::FedAdam {
                lr,
                beta1,
                beta2,
                tau,
            } => {
                self.m.resize(self.n, 0.0);
                self.v.resize(self.n, 0.0);
                for (((g, m), v), d) in global
                    .iter_mut()
                    .zip(&mut self.m)
                    .zip(&mut self.v)
                    .zip(delta)
                {
                    *m = beta1 * *m + (1.0 - beta1) * d;
                    *v = beta2 * *v + (1.0 - beta2) * d * d;
                    *g += lr * *m / (v.sqrt() + tau);
                }
            }
        }
    }

    /// Compact encoding for the store: `n u64 | steps u64 | len(m) u64 | m | len(v) u64 | v`
    /// (little-endian f32s).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 4 * (self.m.len() + self.v.len()));
        out.extend_from_slice(&(self.n as u64).to_le_bytes());
        out.extend_from_slice(&self.steps.to_le_bytes());
        for vec in [&self.m, &self.v] {
            out.extend_from_slice(&(vec.len() as u64).to_le_bytes());
            out.extend(vec.iter().flat_map(|x| x.to_le_bytes()));
        }
        out
    }

    /// Inverse of [`ServerState::to_bytes`]; `None` for anything it did not write.
    pub fn from_bytes(bytes: &[u8]) -> Option<ServerState> {
        fn take<'a>(rest: &mut &'a [u8], len: usize) -> Option<&'a [u8]> {
            if rest.len() < len {
                return None;
            }
            let (head, tail) = rest.split_at(len);
            *rest = tail;
            Some(head)
        }
        fn u64_of(rest: &mut &[u8]) -> Option<u64> {
            Some(u64::from_le_bytes(take(rest, 8)?.try_into().ok()?))
        }
        let mut rest = bytes;
        let n = usize::try_from(u64_of(&mut rest)?).ok()?;
        let steps = u64_of(&mut rest)?;
        let mut vecs = [Vec::new(), Vec::new()];
        for vec in &mut vecs {
            let len = usize::try_from(u64_of(&mut rest)?).ok()?;
            if len != 0 && len != n {
                return None;
            }
            *vec = take(&mut rest, len.checked_mul(4)?)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
        }
        if !rest.is_empty() {
            return None;
        }
        let [m, v] = vecs;
        Some(ServerState { n, steps, m, v })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(device: &str, samples: u32, staleness: u32, delta: &[f32]) -> ClientUpdate {
        ClientUpdate {
            device: device.into(),
            samples,
            staleness,
            delta: delta.to_vec(),
        }
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
    }

    /// SplitMix64 for reproducible "random" test vectors.
    fn vectors(seed: u64, clients: usize, n: usize) -> Vec<ClientUpdate> {
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        (0..clients)
            .map(|c| {
                let delta: Vec<f32> = (0..n).map(|_| next()).collect();
                update(&format!("d{c}"), 1 + (c as u32 * 7) % 50, 0, &delta)
            })
            .collect()
    }

    #[test]
    fn fedavg_is_the_sample_weighted_mean() {
        let u = [
            update("a", 10, 0, &[1.0, 0.0]),
            update("b", 30, 0, &[0.0, 4.0]),
        ];
        assert!(close(&aggregate(&Rule::FedAvg, &u), &[0.25, 3.0]));
        // Property: equals the explicit weighted mean for arbitrary vectors.
        for seed in 0..5 {
            let u = vectors(seed, 7, 33);
            let total: f32 = u.iter().map(|c| c.samples as f32).sum();
            let expected: Vec<f32> = (0..33)
                .map(|i| u.iter().map(|c| c.samples as f32 * c.delta[i]).sum::<f32>() / total)
                .collect();
            assert!(
                close(&aggregate(&Rule::FedAvg, &u), &expected),
                "seed {seed}"
            );
        }
    }

    #[test]
    fn fedavg_discounts_stale_updates() {
        // Same samples; the stale one counts half.
        let u = [update("a", 10, 0, &[3.0]), update("b", 10, 1, &[0.0])];
        assert!(close(&aggregate(&Rule::FedAvg, &u), &[2.0]));
    }

    #[test]
    fn identical_updates_aggregate_to_themselves_under_every_rule() {
        let d = [0.5, -1.0, 2.0];
        let u: Vec<_> = (0..5)
            .map(|i| update(&format!("d{i}"), 3 + i, 0, &d))
            .collect();
        for rule in [Rule::FedAvg, Rule::TrimmedMean { trim: 0.2 }, Rule::Median] {
            assert!(close(&aggregate(&rule, &u), &d), "{rule}");
        }
    }

    #[test]
    fn robust_rules_ignore_an_outlier_client() {
        let mut u: Vec<_> = (0..9)
            .map(|i| update(&format!("d{i}"), 10, 0, &[1.0 + 0.01 * i as f32, -1.0]))
            .collect();
        // A hostile client with a huge delta and a huge claimed sample count.
        u.push(update("evil", 1_000_000, 0, &[1e6, 1e6]));
        let avg = aggregate(&Rule::FedAvg, &u);
        assert!(avg[0] > 1000.0, "fedavg is dragged away: {avg:?}");
        for rule in [Rule::TrimmedMean { trim: 0.1 }, Rule::Median] {
            let a = aggregate(&rule, &u);
            assert!(
                (a[0] - 1.04).abs() < 0.06 && (a[1] + 1.0).abs() < 1e-6,
                "{rule}: {a:?}"
            );
        }
    }

    #[test]
    fn median_and_trimmed_mean_by_hand() {
        let u = [
            update("a", 1, 0, &[1.0]),
            update("b", 1, 0, &[2.0]),
            update("c", 1, 0, &[10.0]),
            update("d", 1, 0, &[3.0]),
        ];
        assert!(close(&aggregate(&Rule::Median, &u), &[2.5]));
        // trim 0.25 of 4 drops one each end: mean of 2 and 3.
        assert!(close(
            &aggregate(&Rule::TrimmedMean { trim: 0.25 }, &u),
            &[2.5]
        ));
        // trim 0 is the plain mean.
        assert!(close(
            &aggregate(&Rule::TrimmedMean { trim: 0.0 }, &u),
            &[4.0]
        ));
        // Too much trimming still keeps the middle.
        assert!(close(
            &aggregate(&Rule::TrimmedMean { trim: 0.49 }, &u[..3]),
            &[2.0]
        ));
    }

    #[test]
    fn empty_and_mismatched_input_does_not_panic() {
        assert!(aggregate(&Rule::FedAvg, &[]).is_empty());
        let u = [update("a", 1, 0, &[1.0, 2.0]), update("b", 1, 0, &[9.0])];
        assert!(close(&aggregate(&Rule::Median, &u), &[1.0, 2.0]));
        let mut s = ServerState::new(2);
        let mut g = vec![0.0; 2];
        s.apply(&ServerOptimizer::Sgd { lr: 1.0 }, &mut g, &[1.0]);
        assert_eq!(g, vec![0.0, 0.0]);
    }

    #[test]
    fn sgd_with_lr_one_adds_the_delta() {
        let mut s = ServerState::new(2);
        let mut g = vec![1.0, 1.0];
        s.apply(&ServerOptimizer::Sgd { lr: 1.0 }, &mut g, &[0.5, -0.5]);
        assert_eq!(g, vec![1.5, 0.5]);
    }

    #[test]
    fn fedavgm_and_fedadam_move_in_the_delta_direction() {
        let delta = [0.3, -0.2, 0.0, 1.0];
        let opts = [
            ServerOptimizer::FedAvgM {
                lr: 1.0,
                momentum: 0.9,
            },
            ServerOptimizer::FedAdam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            },
        ];
        for opt in opts {
            let mut s = ServerState::new(4);
            let mut g = vec![0.0; 4];
            let mut previous_step = 0.0f32;
            for step in 0..5 {
                let before = g.clone();
                s.apply(&opt, &mut g, &delta);
                for i in 0..4 {
                    let moved = g[i] - before[i];
                    assert!(moved * delta[i] >= 0.0, "{opt}: wrong direction at {i}");
                    assert_eq!(moved == 0.0, delta[i] == 0.0, "{opt}: {i}");
                }
                // Momentum builds up under a constant delta.
                let this_step = g[3] - before[3];
                if step > 0 {
                    assert!(this_step >= previous_step * 0.999, "{opt}: step shrank");
                }
                previous_step = this_step;
            }
            assert_eq!(s.steps, 5);
        }
    }

    #[test]
    fn fedadam_first_step_by_hand() {
        let mut s = ServerState::new(1);
        let mut g = vec![0.0];
        let opt = ServerOptimizer::FedAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 0.001,
        };
        s.apply(&opt, &mut g, &[2.0]);
        // m = 0.2, v = 0.04, step = 0.1 * 0.2 / (0.2 + 0.001)
        assert!((g[0] - 0.1 * 0.2 / 0.201).abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn server_state_round_trips_and_refuses_garbage() {
        let mut s = ServerState::new(3);
        let opt = ServerOptimizer::FedAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 0.001,
        };
        s.apply(&opt, &mut [0.0; 3], &[1.0, 2.0, 3.0]);
        let bytes = s.to_bytes();
        assert_eq!(ServerState::from_bytes(&bytes), Some(s.clone()));
        assert_eq!(
            ServerState::from_bytes(&ServerState::new(7).to_bytes()),
            Some(ServerState::new(7))
        );
        assert_eq!(ServerState::from_bytes(&bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(ServerState::from_bytes(&longer), None);
        assert_eq!(ServerState::from_bytes(b"x"), None);
        let json = serde_json::to_string(&s).expect("serialises");
        assert_eq!(
            serde_json::from_str::<ServerState>(&json).expect("parses"),
            s
        );
    }
}
