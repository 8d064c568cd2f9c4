//! The digits data set (`tests/data/digits.csv.gz`, see `tests/data/README.md`) and the ways
//! federated-learning runs split it over clients.
//!
//! Features are the 64 pixel counts scaled to [0, 1] (divided by 16); labels 0..9. Every split
//! is a pure function of its seed, so the test and the benchmark are reproducible.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

pub const FEATURES: usize = 64;
pub const CLASSES: usize = 10;

#[derive(Debug, Clone)]
pub struct Digits {
    pub x: Vec<Vec<f32>>,
    pub y: Vec<u8>,
}

/// Path of the compressed CSV in the source tree.
pub fn path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits.csv.gz")
}

/// Loads all 1797 samples.
pub fn load() -> Result<Digits> {
    let p = path();
    let f = std::fs::File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
    let r = BufReader::new(flate2::read::GzDecoder::new(f));
    let mut d = Digits {
        x: Vec::new(),
        y: Vec::new(),
    };
    for (i, line) in r.lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", p.display(), i + 1))?;
        let cols: Vec<&str> = line.trim().split(',').collect();
        if cols.len() != FEATURES + 1 {
            bail!(
                "{}: line {}: {} columns, expected 65",
                p.display(),
                i + 1,
                cols.len()
            );
        }
        let x = cols[..FEATURES]
            .iter()
            .map(|c| c.parse::<f32>().map(|v| v / 16.0))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: line {}", p.display(), i + 1))?;
        let y: u8 = cols[FEATURES]
            .parse()
            .with_context(|| format!("{}: line {}: label", p.display(), i + 1))?;
        d.x.push(x);
        d.y.push(y);
    }
    Ok(d)
}

/// How the training samples are spread over clients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    /// Shuffled and dealt evenly.
    Iid,
    /// Per class, client shares drawn from Dirichlet(alpha) (Hsu et al. 2019); smaller alpha,
    /// more skew.
    Dirichlet(f64),
    /// Sorted by label and cut into `2 * clients` shards, two per client (McMahan et al. 2017):
    /// most clients see only two classes.
    TwoClasses,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Split::Iid => f.write_str("iid"),
            Split::Dirichlet(a) => write!(f, "dirichlet({a})"),
            Split::TwoClasses => f.write_str("2-class"),
        }
    }
}

/// Stratified hold-out: `fraction` of each class goes to the test side.
pub fn holdout(d: &Digits, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for c in 0..CLASSES as u8 {
        let mut idx: Vec<usize> = (0..d.y.len()).filter(|&i| d.y[i] == c).collect();
        idx.shuffle(&mut rng);
        let n_test = (idx.len() as f64 * fraction).round() as usize;
        test.extend_from_slice(&idx[..n_test]);
        train.extend_from_slice(&idx[n_test..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

/// Splits the samples `idx` over `clients` clients.
pub fn partition(
    d: &Digits,
    idx: &[usize],
    clients: usize,
    split: Split,
    seed: u64,
) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = vec![Vec::new(); clients];
    match split {
        Split::Iid => {
            let mut all = idx.to_vec();
            all.shuffle(&mut rng);
            for (i, s) in all.into_iter().enumerate() {
                out[i % clients].push(s);
            }
        }
        Split::Dirichlet(alpha) => {
            // Redraw until every client has at least 10 samples, as the usual implementations do.
            for _ in 0..1000 {
                out.iter_mut().for_each(Vec::clear);
                for c in 0..CLASSES as u8 {
                    let mut of_c: Vec<usize> =
                        idx.iter().copied().filter(|&i| d.y[i] == c).collect();
                    of_c.shuffle(&mut rng);
                    let p = dirichlet(&mut rng, alpha, clients);
                    let mut start = 0;
                    let mut acc = 0.0;
                    for (k, pk) in p.iter().enumerate() {
                        acc += pk;
                        let end = if k + 1 == clients {
                            of_c.len()
                        } else {
                            ((acc * of_c.len() as f64).round() as usize).min(of_c.len())
                        };
                        out[k].extend_from_slice(&of_c[start..end.max(start)]);
                        start = end.max(start);
                    }
                }
                if out.iter().all(|c| c.len() >= 10) {
                    break;
                }
            }
        }
        Split::TwoClasses => {
            let mut sorted = idx.to_vec();
            sorted.shuffle(&mut rng);
            sorted.sort_by_key(|&i| d.y[i]);
            let shards = 2 * clients;
            let size = sorted.len() / shards;
            let mut ids: Vec<usize> = (0..shards).collect();
            ids.shuffle(&mut rng);
            for (k, pair) in ids.chunks(2).enumerate() {
                for &s in pair {
                    let end = if s + 1 == shards {
                        sorted.len()
                    } else {
                        (s + 1) * size
                    };
                    out[k].extend_from_slice(&sorted[s * size..end]);
                }
            }
        }
    }
    out
}

/// One draw from Dirichlet(alpha, ..., alpha) over `k` categories.
fn dirichlet(rng: &mut StdRng, alpha: f64, k: usize) -> Vec<f64> {
    let g: Vec<f64> = (0..k).map(|_| gamma(rng, alpha)).collect();
    let sum: f64 = g.iter().sum();
    if sum <= 0.0 {
        return vec![1.0 / k as f64; k];
    }
    g.into_iter().map(|x| x / sum).collect()
}

/// Gamma(alpha, 1) by Marsaglia and Tsang (2000), with the `U^(1/alpha)` boost for alpha < 1.
fn gamma(rng: &mut StdRng, alpha: f64) -> f64 {
    if alpha < 1.0 {
        let u: f64 = rng.r#gen::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, alpha + 1.0) * u.powf(1.0 / alpha);
    }
    let d = alpha - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.r#gen();
        if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.r#gen::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.r#gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// One weight tensor of the MLP: ONNX initializer name, shape, row-major values.
pub type Param = (String, Vec<u32>, Vec<f32>);

/// Initial weights of a dense MLP with `layers` widths (e.g. `[64, 32, 10]`): per layer
/// `fc{i}.weight` `[in, out]` drawn from He-uniform(in) and `fc{i}.bias` `[out]` zero, the layout
/// `mlp_trainer.wasm` trains and `edge_testmodels::onnx_builder::mlp` builds.
pub fn initial_mlp(layers: &[u32], seed: u64) -> Vec<Param> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (i, w) in layers.windows(2).enumerate() {
        let (fan_in, fan_out) = (w[0], w[1]);
        let bound = (6.0 / fan_in as f64).sqrt() as f32;
        let weights = (0..fan_in * fan_out)
            .map(|_| rng.gen_range(-bound..bound))
            .collect();
        out.push((
            format!("fc{}.weight", i + 1),
            vec![fan_in, fan_out],
            weights,
        ));
        out.push((
            format!("fc{}.bias", i + 1),
            vec![fan_out],
            vec![0.0; fan_out as usize],
        ));
    }
    out
}

/// Writes samples as JSON lines `{"features": [...], "label": n}`, what a pipeline's `file`
/// source with `format = "jsonl"` feeds a dataset sink.
pub fn write_jsonl(d: &Digits, idx: &[usize], path: &Path) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    for &i in idx {
        let line = serde_json::json!({ "features": d.x[i], "label": d.y[i] });
        writeln!(f, "{line}")?;
    }
    f.flush()?;
    Ok(())
}

/// Writes samples as CSV rows `features...,label`, the coordinator's hold-out format.
pub fn write_csv(d: &Digits, idx: &[usize], path: &Path) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    for &i in idx {
        let row: Vec<String> = d.x[i].iter().map(|v| v.to_string()).collect();
        writeln!(f, "{},{}", row.join(","), d.y[i])?;
    }
    f.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_splits() {
        let d = load().expect("digits");
        assert_eq!(d.x.len(), 1797);
        assert!(
            d.x.iter()
                .all(|x| x.len() == FEATURES && x.iter().all(|v| (0.0..=1.0).contains(v)))
        );
        let (train, test) = holdout(&d, 0.2, 1);
        assert_eq!(train.len() + test.len(), 1797);
        for split in [Split::Iid, Split::Dirichlet(0.5), Split::TwoClasses] {
            let parts = partition(&d, &train, 10, split, 7);
            let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, train, "{split}: every training sample exactly once");
            assert!(parts.iter().all(|p| !p.is_empty()), "{split}");
            if split == Split::TwoClasses {
                for p in &parts {
                    let classes: std::collections::BTreeSet<u8> =
                        p.iter().map(|&i| d.y[i]).collect();
                    assert!(
                        classes.len() <= 4,
                        "two shards, each at most two classes at a boundary"
                    );
                }
            }
        }
    }
}
