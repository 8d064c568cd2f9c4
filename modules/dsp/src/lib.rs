//! Signal features for one window of sensor samples: time-domain statistics and FFT band
//! energies.
//!
//! Plain Rust with no dependencies, so the same code compiles into the `feature-extractor`
//! WASM module and natively (for unit tests and for the WASM-vs-native benchmark).
//! [`Extractor`] owns its FFT plan and scratch buffers and reuses them across windows: after
//! the first window of a given length, extracting allocates nothing but the output.
#![forbid(unsafe_code)]

mod fft;

pub use fft::{Fft, RealFft};

/// Window function applied before the FFT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Window {
    /// No windowing. Band energies then sum exactly to the mean square of the window
    /// (Parseval), but a tone between bins leaks into neighbouring bands.
    Rect,
    /// Periodic Hann window: much less leakage; band energies are normalised by the
    /// window's power, so a stationary signal's bands still sum to about its mean square.
    #[default]
    Hann,
}

/// Time-domain statistics of a window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stats {
    /// Arithmetic mean.
    pub mean: f32,
    /// Root mean square (includes the mean: RMS of a constant c is |c|).
    pub rms: f32,
    /// Largest absolute value.
    pub peak: f32,
    /// `peak / rms`; 0 when `rms` is 0 (silent window).
    pub crest_factor: f32,
}

/// Lanes of the per-sample loops: independent accumulators the compiler turns into SIMD
/// (LLVM may not reorder one float sum by itself): two wasm `f32x4` vectors.
const LANES: usize = 8;

/// Samples per block of the per-sample loops. In the WASM module every loop iteration pays
/// an epoch check (the call deadline), and Cranelift keeps a loop's vector accumulators in
/// stack slots around it (the check's slow path is a call that may clobber every vector
/// register): a block of 32 samples per iteration, its inner loop unrolled away, pays both
/// once per 32 samples instead of once per four. (`cargo xtask bench sandbox`; natively
/// LLVM unrolls the same loops anyway.)
const BLOCK: usize = 32;

/// f32 sums of one block in [`LANES`] lanes, then added into f64 accumulators: the f32
/// partial sums of 4 values each lose nothing that matters, and the f64 totals keep a long
/// window's sums exact enough. Converting every sample to f64 (as before) kept the module's
/// loop scalar: LLVM does not vectorise the f32 -> f64 conversion for wasm.
#[derive(Clone, Copy)]
struct Acc {
    sum: [f64; LANES],
    sum_sq: [f64; LANES],
    peak: [f32; LANES],
}

impl Acc {
    fn new() -> Self {
        Acc {
            sum: [0.0; LANES],
            sum_sq: [0.0; LANES],
            peak: [0.0; LANES],
        }
    }

    #[inline(always)]
    fn block(&mut self, block: &[f32; BLOCK]) {
        let (mut s, mut q) = ([0.0f32; LANES], [0.0f32; LANES]);
        let (chunks, _) = block.as_chunks::<LANES>();
        for chunk in chunks {
            for j in 0..LANES {
                let x = chunk[j];
                s[j] += x;
                q[j] += x * x;
                self.peak[j] = larger(self.peak[j], x.abs());
            }
        }
        for j in 0..LANES {
            self.sum[j] += f64::from(s[j]);
            self.sum_sq[j] += f64::from(q[j]);
        }
    }

    fn one(&mut self, j: usize, x: f32) {
        let xf = f64::from(x);
        self.sum[j] += xf;
        self.sum_sq[j] += xf * xf;
        self.peak[j] = larger(self.peak[j], x.abs());
    }
}

/// The larger of `m` and `v`; `m` if `v` is NaN. Not `f32::max`: its NaN rule has no wasm
/// instruction, so in the module it was a call to libm's `fmaxf` per sample (seen in a perf
/// profile of the stage).
#[inline(always)]
fn larger(m: f32, v: f32) -> f32 {
    if v > m { v } else { m }
}

/// Pairwise total of the lanes.
fn total(x: [f64; LANES]) -> f64 {
    ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]))
}

/// Computes [`Stats`]; all zero for an empty window.
#[inline(never)]
pub fn stats(samples: &[f32]) -> Stats {
    if samples.is_empty() {
        return Stats::default();
    }
    let mut acc = Acc::new();
    let (blocks, rest) = samples.as_chunks::<BLOCK>();
    for block in blocks {
        acc.block(block);
    }
    for (i, &x) in rest.iter().enumerate() {
        acc.one(i % LANES, x);
    }
    if !(total(acc.sum).is_finite() && total(acc.sum_sq).is_finite()) {
        // A sample beyond about 1.8e19 overflowed its f32 square (or four huge ones their f32
        // sum): the window again with every sample in f64, where the sums of finite samples
        // stay finite (a NaN or infinite sample keeps them non-finite).
        acc = Acc::new();
        for (i, &x) in samples.iter().enumerate() {
            acc.one(i % LANES, x);
        }
    }
    let n = samples.len() as f64;
    let (sum, sum_sq) = (total(acc.sum), total(acc.sum_sq));
    let peak = acc.peak.into_iter().fold(0.0, larger);
    let rms = (sum_sq / n).sqrt() as f32;
    Stats {
        mean: (sum / n) as f32,
        rms,
        peak,
        crest_factor: if rms > 0.0 { peak / rms } else { 0.0 },
    }
}

/// Sum of `x` in f32 blocks added into f64 lanes (see [`Acc`]).
fn sum(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (blocks, rest) = x.as_chunks::<BLOCK>();
    for block in blocks {
        let mut s = [0.0f32; LANES];
        for chunk in block.as_chunks::<LANES>().0 {
            for j in 0..LANES {
                s[j] += chunk[j];
            }
        }
        for j in 0..LANES {
            acc[j] += f64::from(s[j]);
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        acc[i % LANES] += f64::from(v);
    }
    total(acc)
}

/// Index of the first sample that is NaN or infinite, if any.
///
/// Checks blocks of [`BLOCK`] samples without an early exit inside a block (a vectorisable
/// OR of the exponent test), then finds the index in the one block that failed: a valid
/// window, the common case, costs a fraction of a per-sample `position`.
#[inline(never)]
pub fn first_non_finite(samples: &[f32]) -> Option<usize> {
    let (blocks, _) = samples.as_chunks::<BLOCK>();
    let start = blocks
        .iter()
        .position(|block| block.iter().fold(false, |bad, x| bad | !x.is_finite()))
        .unwrap_or(blocks.len())
        * BLOCK;
    samples[start..]
        .iter()
        .position(|x| !x.is_finite())
        .map(|i| start + i)
}

/// Smallest power of two `>= n` (1 for 0).
pub fn next_pow2(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// Settings of an [`Extractor`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExtractorConfig {
    /// Sample rate of the windows in Hz; only scales frequencies in the output.
    pub sample_rate_hz: f32,
    /// Number of equal-width bands between 0 Hz and Nyquist (at least 1).
    pub bands: usize,
    /// Window function applied before the FFT.
    pub window: Window,
    /// Subtract the mean before the FFT, so the 0 Hz bin (and the first band) carries no DC
    /// offset such as gravity on an accelerometer.
    pub remove_dc: bool,
}

/// Everything extracted from one window.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Features {
    /// Number of samples in the window (before zero-padding).
    pub len: usize,
    /// Time-domain statistics (of the raw samples, DC included).
    pub stats: Stats,
    /// Frequency of the strongest non-DC bin in Hz (0 for a window shorter than 2 samples
    /// or a flat spectrum).
    pub dominant_hz: f32,
    /// Energy per band, band `i` covering `[i, i+1) * nyquist / bands` (the Nyquist bin
    /// goes to the last band). Units are the square of the sample unit: with a rectangular
    /// window and no DC removal they sum to `rms²`.
    pub bands: Vec<f32>,
}

impl Features {
    /// Width of one band in Hz.
    pub fn band_width_hz(sample_rate_hz: f32, bands: usize) -> f32 {
        sample_rate_hz / 2.0 / bands.max(1) as f32
    }

    /// Flattens into `[mean, rms, peak, crest_factor, dominant_hz, band_0, .., band_n-1]`,
    /// the order of the `feature-extractor` tensor output.
    pub fn to_vec(&self) -> Vec<f32> {
        let mut v = Vec::with_capacity(5 + self.bands.len());
        v.extend_from_slice(&[
            self.stats.mean,
            self.stats.rms,
            self.stats.peak,
            self.stats.crest_factor,
            self.dominant_hz,
        ]);
        v.extend_from_slice(&self.bands);
        v
    }
}

impl Features {
    /// The `feature-extractor`'s JSON output:
    /// `{"n":..,"mean":..,"rms":..,"peak":..,"crest_factor":..,"dominant_hz":..,"bands":[..]}`,
    /// each number the shortest text that reads back as the same f32 (a non-finite one, which
    /// the extractor does not produce from finite samples, as `null`, as serde_json writes it).
    ///
    /// Written here rather than through serde_json: its float formatting multiplies 64-bit
    /// numbers into 128-bit ones, which wasm has no instruction for (a call per multiply; 18%
    /// of the stage's time in a profile of the module), where ryu's f32 path stays within 64
    /// bits. `cargo xtask bench sandbox`: an 8-sample frame 2.38 -> 2.10 us through the stage,
    /// a 1024-sample window about 3% faster, in WASM and natively alike (the native side calls
    /// this same function).
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(96 + self.bands.len() * 16);
        let mut num = ryu::Buffer::new();
        let mut put = |out: &mut String, v: f32| {
            out.push_str(if v.is_finite() {
                num.format_finite(v)
            } else {
                "null"
            })
        };
        out.push_str("{\"n\":");
        out.push_str(itoa(self.len, &mut [0u8; 20]));
        for (key, v) in [
            ("mean", self.stats.mean),
            ("rms", self.stats.rms),
            ("peak", self.stats.peak),
            ("crest_factor", self.stats.crest_factor),
            ("dominant_hz", self.dominant_hz),
        ] {
            out.push_str(",\"");
            out.push_str(key);
            out.push_str("\":");
            put(&mut out, v);
        }
        out.push_str(",\"bands\":[");
        for (i, &b) in self.bands.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            put(&mut out, b);
        }
        out.push_str("]}");
        out
    }
}

/// `n` in decimal, written into the end of `buf`.
fn itoa(mut n: usize, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&buf[at..]).unwrap_or("0")
}

/// Reusable feature extractor: keeps the FFT plan, window table and scratch buffers for the
/// last window length seen.
#[derive(Debug, Clone)]
pub struct Extractor {
    config: ExtractorConfig,
    fft: Option<RealFft>,
    /// Window coefficients for `window_len` samples, and their sum of squares.
    window_len: usize,
    window: Vec<f32>,
    window_power: f64,
    /// The windowed, zero-padded input of the FFT (`n` samples).
    padded: Vec<f32>,
    /// One-sided spectrum, bins `0..=n/2`.
    re: Vec<f32>,
    im: Vec<f32>,
    /// Power per bin of the one-sided spectrum (summed per band in f64, so thousands of
    /// small bins add up without loss).
    power: Vec<f32>,
}

impl Extractor {
    /// `config.bands` is clamped to at least 1.
    pub fn new(mut config: ExtractorConfig) -> Self {
        config.bands = config.bands.max(1);
        Self {
            config,
            fft: None,
            window_len: 0,
            window: Vec::new(),
            window_power: 0.0,
            padded: Vec::new(),
            re: Vec::new(),
            im: Vec::new(),
            power: Vec::new(),
        }
    }

    /// The settings this extractor was built with.
    pub fn config(&self) -> &ExtractorConfig {
        &self.config
    }

    /// Extracts features from one window of any length (zero-padded to a power of two for
    /// the FFT). An empty window gives all-zero features.
    pub fn extract(&mut self, samples: &[f32]) -> Features {
        let stats = stats(samples);
        self.extract_with(samples, stats)
    }

    /// [`Extractor::extract`] for a window that must hold only finite samples: the index of
    /// the first NaN or infinite one is the error. The check rides on the statistics (a
    /// non-finite sample makes the RMS non-finite), so a valid window is read once for both;
    /// only a failed one is searched for the index.
    pub fn extract_finite(&mut self, samples: &[f32]) -> Result<Features, usize> {
        let stats = stats(samples);
        if !stats.rms.is_finite()
            && let Some(i) = first_non_finite(samples)
        {
            return Err(i);
        }
        Ok(self.extract_with(samples, stats))
    }

    fn extract_with(&mut self, samples: &[f32], stats: Stats) -> Features {
        let mut bands = vec![0.0f32; self.config.bands];
        if samples.is_empty() {
            return Features {
                len: 0,
                stats,
                dominant_hz: 0.0,
                bands,
            };
        }
        let dominant_bin = self.band_energies(samples, &stats, &mut bands);
        let n = self.padded.len();
        Features {
            len: samples.len(),
            stats,
            dominant_hz: dominant_bin as f32 * self.config.sample_rate_hz / n as f32,
            bands,
        }
    }

    /// Fills `bands` with band energies and returns the strongest non-DC bin.
    fn band_energies(&mut self, samples: &[f32], stats: &Stats, bands: &mut [f32]) -> usize {
        let len = samples.len();
        let n = next_pow2(len);
        if self.fft.as_ref().map(RealFft::len) != Some(n) {
            self.fft = Some(RealFft::new(n));
            self.padded.resize(n, 0.0);
            self.re.resize(n / 2 + 1, 0.0);
            self.im.resize(n / 2 + 1, 0.0);
        }
        if self.window_len != len {
            self.prepare_window(len);
        }
        let offset = if self.config.remove_dc {
            stats.mean
        } else {
            0.0
        };
        apply_window(&mut self.padded[..len], samples, &self.window, offset);
        self.padded[len..].fill(0.0);
        if let Some(fft) = &self.fft {
            fft.process(&self.padded, &mut self.re, &mut self.im);
        }

        // One-sided power spectrum: bins 1..n/2 stand for their negative-frequency mirror
        // too, so they count twice; DC and Nyquist once. Dividing by n * sum(w²) makes the
        // total the (window-weighted) mean square of the input, by Parseval.
        let half = n / 2;
        // Power per bin first (one vectorisable pass, which also finds the strongest non-DC
        // bin's power), then per band a sum over its range of bins: no per-bin branch on the
        // band, so both loops run as SIMD.
        let power = &mut self.power;
        power.resize(half + 1, 0.0);
        let mut peak = power_spectrum(&self.re, &self.im, power);
        // The power per bin is an f32: a bin past about 1.8e19 (a loud window: a bin is at
        // most n * 2 * peak) squares past its range. Then the spectrum is scaled down by a
        // power of two, which is exact (nothing rounds differently), the powers computed
        // again, and the band energies divided by the scale's square in f64.
        let mut scale_exp = 0;
        if !(peak.is_finite() && power[0].is_finite()) {
            let bound = 2.0 * f64::from(stats.peak) * n as f64;
            scale_exp = 60 - bound.log2().ceil() as i32;
            let scale = 2f32.powi(scale_exp);
            for v in self.re.iter_mut().chain(self.im.iter_mut()) {
                *v *= scale;
            }
            peak = power_spectrum(&self.re, &self.im, power);
        }
        let norm =
            1.0 / (n as f64 * self.window_power.max(f64::MIN_POSITIVE)) / 2f64.powi(2 * scale_exp);
        // Band of bin k: floor(k / half * nbands), the Nyquist bin clamped into the last, so
        // band b starts at the first k with k * nbands >= b * half. (n = 1 has half = 0: its
        // single bin goes to band 0.)
        let nbands = bands.len();
        let first_bin = |b: usize| match half {
            0 => usize::from(b > 0),
            _ => (b * half).div_ceil(nbands),
        };
        for (b, dst) in bands.iter_mut().enumerate() {
            let lo = first_bin(b);
            let hi = if b + 1 == nbands {
                half + 1
            } else {
                first_bin(b + 1)
            };
            let Some(range) = power.get(lo..hi) else {
                continue;
            };
            let mut energy = 2.0 * sum(range);
            if lo == 0 {
                energy -= f64::from(power[0]);
            }
            if hi == half + 1 && half > 0 {
                energy -= f64::from(power[half]);
            }
            *dst = (energy * norm) as f32;
        }
        // Strongest non-DC bin: the first with the largest power, none if all are 0.
        if peak > 0.0 {
            power[1..]
                .iter()
                .position(|&p| p == peak)
                .map_or(0, |i| i + 1)
        } else {
            0
        }
    }

    fn prepare_window(&mut self, len: usize) {
        self.window.clear();
        match self.config.window {
            Window::Rect => self.window.resize(len, 1.0),
            // Periodic Hann (the spectral-analysis form, 2πi/len); a 1-sample window stays 1
            // so it is not zeroed out.
            Window::Hann if len > 1 => self.window.extend((0..len).map(|i| {
                let phase = 2.0 * std::f64::consts::PI * i as f64 / len as f64;
                (0.5 - 0.5 * phase.cos()) as f32
            })),
            Window::Hann => self.window.push(1.0),
        }
        self.window_power = self
            .window
            .iter()
            .map(|&w| f64::from(w) * f64::from(w))
            .sum();
        self.window_len = len;
    }
}

/// `dst[i] = (x[i] - offset) * w[i]`, sixteen samples per iteration (see [`BLOCK`]).
#[inline(never)]
fn apply_window(dst: &mut [f32], x: &[f32], w: &[f32], offset: f32) {
    let (d16, d_rest) = dst.as_chunks_mut::<16>();
    let (x16, x_rest) = x.as_chunks::<16>();
    let (w16, w_rest) = w.as_chunks::<16>();
    for ((d, x), w) in d16.iter_mut().zip(x16).zip(w16) {
        for j in 0..16 {
            d[j] = (x[j] - offset) * w[j];
        }
    }
    for ((d, &x), &w) in d_rest.iter_mut().zip(x_rest).zip(w_rest) {
        *d = (x - offset) * w;
    }
}

/// `power[k] = re[k]² + im[k]²`, sixteen bins per iteration; returns the largest power of
/// the bins after the first (the DC bin), NaN skipped, 0 if there are none.
#[inline(never)]
fn power_spectrum(re: &[f32], im: &[f32], power: &mut [f32]) -> f32 {
    let mut m = [0.0f32; 16];
    let Some((dc, power)) = power.split_first_mut() else {
        return 0.0;
    };
    *dc = re[0] * re[0] + im[0] * im[0];
    let (re, im) = (&re[1..], &im[1..]);
    let (p16, p_rest) = power.as_chunks_mut::<16>();
    let (r16, r_rest) = re.as_chunks::<16>();
    let (i16, i_rest) = im.as_chunks::<16>();
    for ((p, r), i) in p16.iter_mut().zip(r16).zip(i16) {
        for j in 0..16 {
            p[j] = r[j] * r[j] + i[j] * i[j];
            m[j] = larger(m[j], p[j]);
        }
    }
    for (((p, &r), &i), j) in p_rest.iter_mut().zip(r_rest).zip(i_rest).zip(0..) {
        *p = r * r + i * i;
        m[j] = larger(m[j], *p);
    }
    m.into_iter().fold(0.0, larger)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(freq: f32, rate: f32, len: usize, amp: f32) -> Vec<f32> {
        (0..len)
            .map(|i| amp * (2.0 * std::f32::consts::PI * freq * i as f32 / rate).sin())
            .collect()
    }

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol * b.abs().max(1.0)
    }

    fn config(bands: usize, window: Window) -> ExtractorConfig {
        ExtractorConfig {
            sample_rate_hz: 1000.0,
            bands,
            window,
            remove_dc: false,
        }
    }

    #[test]
    fn stats_of_constant() {
        let s = stats(&[3.0; 100]);
        assert!(close(s.mean, 3.0, 1e-6));
        assert!(close(s.rms, 3.0, 1e-6));
        assert!(close(s.peak, 3.0, 1e-6));
        assert!(close(s.crest_factor, 1.0, 1e-6));
    }

    #[test]
    fn stats_of_negative_constant_use_absolute_peak() {
        let s = stats(&[-2.0; 10]);
        assert!(close(s.mean, -2.0, 1e-6));
        assert!(close(s.rms, 2.0, 1e-6));
        assert!(close(s.peak, 2.0, 1e-6));
    }

    #[test]
    fn stats_of_odd_lengths_use_every_sample() {
        // Lengths that leave a remainder after the lanes: the remainder counts too.
        for len in 1..=9usize {
            let x: Vec<f32> = (0..len).map(|i| i as f32 - 3.0).collect();
            let s = stats(&x);
            let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / len as f64;
            let peak = x.iter().fold(0.0f32, |p, v| p.max(v.abs()));
            assert!(close(s.mean, mean as f32, 1e-6), "{len}");
            assert_eq!(s.peak, peak, "{len}");
        }
    }

    #[test]
    fn first_non_finite_finds_the_first_bad_sample() {
        let mut x = vec![0.5f32; 300];
        assert_eq!(first_non_finite(&x), None);
        assert_eq!(first_non_finite(&[]), None);
        x[200] = f32::INFINITY;
        x[250] = f32::NAN;
        assert_eq!(first_non_finite(&x), Some(200));
        x[3] = f32::NEG_INFINITY;
        assert_eq!(first_non_finite(&x), Some(3));
        assert_eq!(first_non_finite(&x[251..]), None);
        assert_eq!(first_non_finite(&x[64..]), Some(136));
    }

    #[test]
    fn extract_finite_names_the_first_bad_sample() {
        let mut ex = Extractor::new(config(8, Window::Hann));
        let good = sine(50.0, 1000.0, 1000, 1.0);
        assert_eq!(ex.extract_finite(&good), Ok(ex.clone().extract(&good)));
        // In a block of 32 and in the remainder after the blocks (1000 = 31 * 32 + 8).
        for (at, bad) in [
            (0, f32::NAN),
            (37, f32::INFINITY),
            (995, f32::NEG_INFINITY),
            (999, f32::NAN),
        ] {
            let mut x = good.clone();
            x[at] = bad;
            assert_eq!(ex.extract_finite(&x), Err(at), "{bad} at {at}");
        }
        let mut x = good.clone();
        (x[600], x[700]) = (f32::INFINITY, f32::NEG_INFINITY);
        assert_eq!(ex.extract_finite(&x), Err(600));
        // Huge but finite samples are a window, not an error.
        let huge = vec![f32::MAX, -f32::MAX, f32::MAX, f32::MAX];
        let f = ex.extract_finite(&huge).expect("finite window");
        assert_eq!(f.stats.peak, f32::MAX);
        assert!(f.stats.rms.is_finite() && f.stats.mean.is_finite());
    }

    #[test]
    fn stats_of_sine() {
        // Whole number of periods: RMS = A/√2, crest factor √2.
        let s = stats(&sine(50.0, 1000.0, 1000, 2.0));
        assert!(s.mean.abs() < 1e-4);
        assert!(close(s.rms, 2.0 / 2f32.sqrt(), 1e-4));
        assert!(close(s.peak, 2.0, 1e-3));
        assert!(close(s.crest_factor, 2f32.sqrt(), 1e-3));
    }

    #[test]
    fn empty_and_silent_windows_give_zeros_not_nan() {
        assert_eq!(stats(&[]), Stats::default());
        let mut ex = Extractor::new(config(4, Window::Hann));
        let f = ex.extract(&[]);
        assert_eq!(f.bands, vec![0.0; 4]);
        let f = ex.extract(&[0.0; 64]);
        assert_eq!(f.stats.crest_factor, 0.0);
        assert_eq!(f.dominant_hz, 0.0);
        assert!(f.bands.iter().all(|&b| b == 0.0));
    }

    #[test]
    fn sine_energy_lands_in_its_band() {
        // 1024 samples at 1 kHz, 8 bands of 62.5 Hz: 300 Hz belongs to band 4.
        for window in [Window::Rect, Window::Hann] {
            let mut ex = Extractor::new(config(8, window));
            let f = ex.extract(&sine(300.0, 1000.0, 1024, 1.0));
            let total: f32 = f.bands.iter().sum();
            assert!(f.bands[4] / total > 0.95, "{window:?}: {:?}", f.bands);
            assert!(
                (f.dominant_hz - 300.0).abs() < 1000.0 / 1024.0 + 1e-3,
                "{}",
                f.dominant_hz
            );
        }
    }

    #[test]
    fn loud_and_long_windows_keep_their_precision() {
        // Powers per bin are f32 and sums go through f32 blocks: a window whose bins would
        // square past f32's range (scaled by a power of two), or whose samples square past it
        // (those blocks summed in f64), gives the features of the unit window times the
        // amplitude (squared for energies), as the f64 code before did.
        let unit = sine(300.0, 1000.0, 1024, 1.0);
        let base = Extractor::new(config(8, Window::Hann)).extract(&unit);
        for amp in [1e17f32, 1e18] {
            let loud: Vec<f32> = unit.iter().map(|&x| x * amp).collect();
            let f = Extractor::new(config(8, Window::Hann)).extract(&loud);
            assert_eq!(f.dominant_hz, base.dominant_hz, "{amp}");
            assert!(close(f.stats.rms, base.stats.rms * amp, 1e-5), "{amp}");
            let a2 = f64::from(amp) * f64::from(amp);
            for (b, (&l, &u)) in f.bands.iter().zip(&base.bands).enumerate() {
                let want = f64::from(u) * a2;
                assert!(
                    (f64::from(l) - want).abs() <= 1e-4 * want.max(1e-9 * a2),
                    "{amp} band {b}: {l} vs {want}"
                );
            }
        }
        let huge = [3e19f32, -2e19, 1.0, 0.5];
        let s = stats(&huge.repeat(16));
        let rms = (huge.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / 4.0).sqrt();
        assert!(close(s.rms, rms as f32, 1e-6), "{} vs {rms}", s.rms);
        // A long window: mean and rms to f32 precision against an f64 reference.
        let long: Vec<f32> = (0..1 << 16)
            .map(|i| 9.81 + (i as f32 * 0.37).sin())
            .collect();
        let s = stats(&long);
        let n = long.len() as f64;
        let mean = long.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let rms = (long.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n).sqrt();
        assert!(close(s.mean, mean as f32, 1e-6), "{} vs {mean}", s.mean);
        assert!(close(s.rms, rms as f32, 1e-6), "{} vs {rms}", s.rms);
    }

    #[test]
    fn rect_band_energies_sum_to_mean_square() {
        // Parseval, with a non-power-of-two length (zero-padded 1000 -> 1024).
        let samples: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0 + 0.3)
            .collect();
        let mut ex = Extractor::new(config(16, Window::Rect));
        let f = ex.extract(&samples);
        let total: f32 = f.bands.iter().sum();
        assert!(
            close(total, f.stats.rms * f.stats.rms, 1e-4),
            "{total} vs {}",
            f.stats.rms
        );
    }

    #[test]
    fn hann_bands_approximate_mean_square_of_stationary_signal() {
        let samples = sine(123.0, 1000.0, 2048, 1.5);
        let mut ex = Extractor::new(config(10, Window::Hann));
        let f = ex.extract(&samples);
        let total: f32 = f.bands.iter().sum();
        assert!(close(total, 1.5 * 1.5 / 2.0, 0.02), "{total}");
    }

    #[test]
    fn remove_dc_empties_the_dc_bin() {
        let samples: Vec<f32> = sine(250.0, 1000.0, 512, 1.0)
            .iter()
            .map(|x| x + 9.81)
            .collect();
        let mut with_dc = Extractor::new(config(4, Window::Rect));
        let mut without = Extractor::new(ExtractorConfig {
            remove_dc: true,
            ..config(4, Window::Rect)
        });
        let a = with_dc.extract(&samples);
        let b = without.extract(&samples);
        assert!(a.bands[0] > 90.0, "{:?}", a.bands);
        assert!(b.bands[0] < 1e-3, "{:?}", b.bands);
        assert!(close(b.bands[2], 0.5, 1e-3), "{:?}", b.bands);
        // Stats are of the raw samples either way.
        assert!(close(b.stats.mean, 9.81, 1e-4));
    }

    #[test]
    fn extractor_handles_changing_lengths_and_tiny_windows() {
        let mut ex = Extractor::new(config(3, Window::Hann));
        for len in [1usize, 2, 3, 5, 8, 100, 7, 1] {
            let f = ex.extract(&vec![1.0; len]);
            assert_eq!(f.len, len);
            assert_eq!(f.bands.len(), 3);
            assert!(
                f.bands.iter().all(|b| b.is_finite() && *b >= 0.0),
                "{len}: {:?}",
                f.bands
            );
        }
    }

    #[test]
    fn one_sample_window_goes_to_the_first_band() {
        let mut ex = Extractor::new(config(3, Window::Rect));
        let f = ex.extract(&[2.0]);
        assert_eq!(f.bands, vec![4.0, 0.0, 0.0]);
    }

    #[test]
    fn bins_land_in_the_band_the_division_rule_gives() {
        // One bin at a time (a cosine exactly on bin k), against floor(k * bands / half)
        // clamped, for band counts that do and do not divide the bin count.
        let n = 64;
        for nbands in [1usize, 3, 5, 8, 32, 100] {
            let mut ex = Extractor::new(config(nbands, Window::Rect));
            for k in 1..=n / 2 {
                let x: Vec<f32> = (0..n)
                    .map(|t| (2.0 * std::f64::consts::PI * (k * t) as f64 / n as f64).cos() as f32)
                    .collect();
                let f = ex.extract(&x);
                let want = (k * nbands / (n / 2)).min(nbands - 1);
                let got = f
                    .bands
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i);
                assert_eq!(got, Some(want), "bands={nbands} k={k}: {:?}", f.bands);
            }
        }
    }

    #[test]
    fn more_bands_than_bins_leaves_empty_bands() {
        let mut ex = Extractor::new(config(16, Window::Rect));
        let f = ex.extract(&[1.0, -1.0, 1.0, -1.0]);
        assert_eq!(f.bands.len(), 16);
        let total: f32 = f.bands.iter().sum();
        assert!(close(total, 1.0, 1e-5));
        // All energy at Nyquist, which goes to the last band.
        assert!(close(f.bands[15], 1.0, 1e-5), "{:?}", f.bands);
    }

    #[test]
    fn to_vec_order() {
        let f = Features {
            len: 4,
            stats: Stats {
                mean: 1.0,
                rms: 2.0,
                peak: 3.0,
                crest_factor: 4.0,
            },
            dominant_hz: 5.0,
            bands: vec![6.0, 7.0],
        };
        assert_eq!(f.to_vec(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        assert_eq!(Features::band_width_hz(1000.0, 8), 62.5);
    }

    #[test]
    fn json_reads_back_as_the_same_values() {
        let f = Features {
            len: 1024,
            stats: Stats {
                mean: -0.25,
                rms: std::f32::consts::FRAC_1_SQRT_2,
                peak: 1.0e-7,
                crest_factor: 3.4e38,
            },
            dominant_hz: 0.0,
            bands: vec![1.5, f32::NAN, 123456.79],
        };
        let text = f.to_json();
        assert_eq!(
            text,
            "{\"n\":1024,\"mean\":-0.25,\"rms\":0.70710677,\"peak\":1e-7,\
             \"crest_factor\":3.4e38,\"dominant_hz\":0.0,\"bands\":[1.5,null,123456.79]}"
        );
        let mut empty = f.clone();
        empty.bands.clear();
        empty.len = 0;
        assert!(
            empty.to_json().starts_with("{\"n\":0,"),
            "{}",
            empty.to_json()
        );
        assert!(empty.to_json().ends_with("\"bands\":[]}"));
    }

    #[test]
    fn next_pow2_rounds_up() {
        assert_eq!(next_pow2(0), 1);
        assert_eq!(next_pow2(1), 1);
        assert_eq!(next_pow2(1000), 1024);
        assert_eq!(next_pow2(1024), 1024);
    }
}
