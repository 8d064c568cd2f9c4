//! Clipping of client update norms, and the optional Gaussian differential-privacy mode with
//! its accountant. No I/O and no clock; the DP noise comes from the caller's random source.
//!
//! **Clipping** (on by default, `[aggregate] clip`): before the round's deltas are combined,
//! each one whose L2 norm exceeds the round's threshold is scaled down to it. The threshold is
//! either fixed (`clip = 2.5`) or `auto`: `clip_multiplier` (default 2) times the median norm
//! of the round's updates. An honest fleet is rarely clipped at twice its median, while one
//! device that scales its update up (a "model replacement" attack, Bagdasaryan et al. 2020,
//! "How To Backdoor Federated Learning"; norm bounding as the defence, Sun et al. 2019, "Can
//! You Really Backdoor Federated Learning?") is held to twice a typical update's size, as long
//! as fewer than half of the round's updates are hostile.
//!
//! **Differential privacy** (`[privacy]`, off by default): DP-FedAvg with a central Gaussian
//! mechanism (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
//! Models"). Each update is clipped to the fixed norm `C` (`aggregate.clip`, a number; an
//! `auto` threshold depends on the data and would void the guarantee), the clipped deltas
//! (each scaled by its staleness discount, at most 1) are summed unweighted (sample counts
//! would raise the sensitivity), Gaussian noise of standard deviation `z * C` is added to every
//! coordinate of the sum (`z`: `noise_multiplier`), and the sum is divided by the number of
//! updates. Adding or removing one device's update moves the sum by at most `C`, so each
//! round is the Gaussian mechanism with sensitivity `C`: Rényi-DP of order `a` at
//! `a / (2 z^2)` (Mironov 2017, "Rényi Differential Privacy", Prop. 7), composed over the
//! rounds that released a model by adding (Prop. 1), and turned into `(epsilon, delta)` with
//! Prop. 12 of Canonne, Kamath and Steinke 2020 ("The Discrete Gaussian for Differential
//! Privacy"), minimised over a grid of orders.
//!
//! What the stated epsilon covers, and what it does not:
//! - It is user-level (device-level) privacy of the released global models against anyone who
//!   sees them, the devices included; the coordinator itself sees every raw update.
//! - No amplification by sampling is claimed: the coordinator selects the devices that are
//!   online, not a uniform random sample, so the bound is the plain composition (conservative).
//! - The number of updates per round is treated as public.

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::aggregate::ClientUpdate;

/// How update norms are bounded before they are combined.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "clip", rename_all = "lowercase")]
pub enum Clip {
    Off,
    /// `multiplier` times the median norm of the round's updates.
    Auto {
        multiplier: f32,
    },
    /// A fixed L2 norm.
    Norm {
        norm: f32,
    },
}

impl Default for Clip {
    fn default() -> Self {
        Clip::Auto { multiplier: 2.0 }
    }
}

impl std::fmt::Display for Clip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Clip::Off => f.write_str("off"),
            Clip::Auto { multiplier } => write!(f, "auto ({multiplier} x median norm)"),
            Clip::Norm { norm } => write!(f, "{norm}"),
        }
    }
}

/// The Gaussian mechanism's settings (`[privacy]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Privacy {
    /// `z`: the noise's standard deviation over the clip norm.
    pub noise_multiplier: f32,
    pub delta: f64,
    /// The task stops before a round that would take epsilon past this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_epsilon: Option<f64>,
}

/// What clipping did to one round's updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clipped {
    pub threshold: f32,
    /// Updates scaled down to the threshold.
    pub clipped: u32,
    pub median_norm: f32,
}

/// The L2 norm, accumulated in f64.
pub fn l2_norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// Scales every update whose norm exceeds the round's threshold down to it. `None` with
/// clipping off or no updates. A non-finite or non-positive threshold (every update zero)
/// clips nothing.
pub fn clip(rule: &Clip, updates: &mut [ClientUpdate]) -> Option<Clipped> {
    if updates.is_empty() || matches!(rule, Clip::Off) {
        return None;
    }
    let norms: Vec<f64> = updates.iter().map(|u| l2_norm(&u.delta)).collect();
    let mut sorted = norms.clone();
    sorted.sort_unstable_by(f64::total_cmp);
    let m = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 {
        sorted[m]
    } else {
        (sorted[m - 1] + sorted[m]) / 2.0
    };
    let threshold = match *rule {
        Clip::Off => return None,
        Clip::Auto { multiplier } => f64::from(multiplier) * median,
        Clip::Norm { norm } => f64::from(norm),
    };
    let mut clipped = 0;
    if threshold.is_finite() && threshold > 0.0 {
        for (u, &norm) in updates.iter_mut().zip(&norms) {
            if norm > threshold {
                let scale = (threshold / norm) as f32;
                u.delta.iter_mut().for_each(|d| *d *= scale);
                clipped += 1;
            }
        }
    }
    Some(Clipped {
        threshold: threshold as f32,
        clipped,
        median_norm: median as f32,
    })
}

/// DP-FedAvg's combination of updates already clipped to `clip_norm`: the unweighted sum of
/// the (staleness-discounted) deltas plus Gaussian noise of deviation `z * clip_norm` per
/// coordinate, over the number of updates. Updates whose length differs from the first are
/// ignored, as in [`super::aggregate::aggregate`].
pub fn noisy_mean(
    updates: &[ClientUpdate],
    clip_norm: f32,
    noise_multiplier: f32,
    rng: &mut dyn RngCore,
) -> Vec<f32> {
    let Some(first) = updates.first() else {
        return Vec::new();
    };
    let n = first.delta.len();
    let usable: Vec<&ClientUpdate> = updates.iter().filter(|u| u.delta.len() == n).collect();
    let mut sum = vec![0f64; n];
    for u in &usable {
        let w = f64::from(u.discount());
        for (s, &d) in sum.iter_mut().zip(&u.delta) {
            *s += w * f64::from(d);
        }
    }
    let sd = f64::from(noise_multiplier) * f64::from(clip_norm);
    let count = usable.len() as f64;
    sum.into_iter()
        .map(|s| ((s + sd * standard_normal(rng)) / count) as f32)
        .collect()
}

/// One draw from N(0, 1) (Box-Muller). `u1` is kept away from 0 so the log is finite.
fn standard_normal(rng: &mut dyn RngCore) -> f64 {
    let unit = |r: &mut dyn RngCore| (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let u1 = unit(rng).max(f64::MIN_POSITIVE);
    let u2 = unit(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The `epsilon` of `rounds` releases of the Gaussian mechanism with noise multiplier `z` at
/// `delta` (see the module docs): `min over a` of `rounds * a / (2 z^2) + ln((a - 1) / a) -
/// (ln delta + ln a) / (a - 1)`. 0 rounds cost nothing; `z <= 0` is no privacy (infinity).
pub fn epsilon(rounds: u32, noise_multiplier: f64, delta: f64) -> f64 {
    if rounds == 0 {
        return 0.0;
    }
    let usable = noise_multiplier > 0.0 && delta > 0.0 && delta < 1.0;
    if !usable {
        return f64::INFINITY;
    }
    let per_order = f64::from(rounds) / (2.0 * noise_multiplier * noise_multiplier);
    // Orders from 1.001 to 10^4, log-spaced: the best order is near 1 when the per-round
    // divergence is large (little noise, many rounds) and large when it is small.
    (0..=4000)
        .map(|i| 1.0 + 10f64.powf(-3.0 + 7.0 * f64::from(i) / 4000.0))
        .map(|a| per_order * a + ((a - 1.0) / a).ln() - (delta.ln() + a.ln()) / (a - 1.0))
        .fold(f64::INFINITY, f64::min)
        .max(0.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn update(device: &str, delta: Vec<f32>) -> ClientUpdate {
        ClientUpdate {
            device: device.into(),
            samples: 10,
            staleness: 0,
            delta,
        }
    }

    #[test]
    fn auto_clip_bounds_an_update_scaled_up_by_an_attacker() {
        let mut ups = vec![
            update("a", vec![3.0, 4.0]),        // norm 5
            update("b", vec![0.0, 4.0]),        // 4
            update("c", vec![6.0, 0.0]),        // 6
            update("evil", vec![300.0, 400.0]), // 500
        ];
        let c = clip(&Clip::default(), &mut ups).unwrap();
        // median of 4, 5, 6, 500 = 5.5; threshold 11
        assert_eq!(c.median_norm, 5.5);
        assert_eq!(c.threshold, 11.0);
        assert_eq!(c.clipped, 1);
        assert!((l2_norm(&ups[3].delta) - 11.0).abs() < 1e-4);
        assert_eq!(ups[0].delta, vec![3.0, 4.0], "honest updates untouched");
        // the direction is kept
        assert!((ups[3].delta[0] / ups[3].delta[1] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn fixed_clip_and_off() {
        let mut ups = vec![update("a", vec![3.0, 4.0]), update("b", vec![0.3, 0.4])];
        let c = clip(&Clip::Norm { norm: 1.0 }, &mut ups).unwrap();
        assert_eq!(c.clipped, 1);
        assert!((l2_norm(&ups[0].delta) - 1.0).abs() < 1e-6);
        assert_eq!(ups[1].delta, vec![0.3, 0.4]);
        assert!(clip(&Clip::Off, &mut ups).is_none());
        assert!(clip(&Clip::default(), &mut []).is_none());
        // all-zero updates: a zero threshold clips nothing (no division by zero)
        let mut zeros = vec![update("a", vec![0.0; 3])];
        assert_eq!(clip(&Clip::default(), &mut zeros).unwrap().clipped, 0);
        assert_eq!(zeros[0].delta, vec![0.0; 3]);
    }

    #[test]
    fn noisy_mean_without_noise_is_the_unweighted_mean_and_noise_has_the_stated_deviation() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut ups = vec![update("a", vec![1.0, 0.0]), update("b", vec![0.0, 1.0])];
        ups[0].samples = 1000; // sample counts do not weigh in DP mode
        assert_eq!(noisy_mean(&ups, 1.0, 0.0, &mut rng), vec![0.5, 0.5]);
        // 200,000 coordinates of pure noise over one update: deviation z * C.
        let zero = vec![update("a", vec![0.0; 200_000])];
        let noise = noisy_mean(&zero, 2.0, 1.5, &mut rng);
        let n = noise.len() as f64;
        let mean = noise.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let sd = (noise
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((sd - 3.0).abs() < 0.03, "sd {sd}");
    }

    #[test]
    fn epsilon_matches_known_values_and_behaves() {
        // One release at z = 1, delta = 1e-5. The plain RDP conversion (Mironov, Prop. 3)
        // gives 0.5 + sqrt(2 ln 1e5) = 5.30; the tighter conversion must be below that and
        // above the exact (analytic) Gaussian mechanism's ~4.4 (Balle & Wang 2018).
        let e1 = epsilon(1, 1.0, 1e-5);
        assert!(e1 < 5.30 && e1 > 4.3, "{e1}");
        // Composition: more rounds cost more, more noise costs less.
        assert!(epsilon(10, 1.0, 1e-5) > e1);
        assert!(epsilon(10, 2.0, 1e-5) < epsilon(10, 1.0, 1e-5));
        assert!(epsilon(10, 1.0, 1e-3) < epsilon(10, 1.0, 1e-5));
        assert_eq!(epsilon(0, 1.0, 1e-5), 0.0);
        assert_eq!(epsilon(1, 0.0, 1e-5), f64::INFINITY);
        // 100 rounds at z = 1.1, delta 1e-5: the plain composition bound is about
        // 100/(2*1.21) + sqrt(2*100*11.51)/1.1 = 41.3 + 43.6 = 85; the tighter one is below.
        let e = epsilon(100, 1.1, 1e-5);
        assert!(e < 85.0 && e > 60.0, "{e}");
    }
}
