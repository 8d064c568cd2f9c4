//! In-place iterative radix-2 FFT with a precomputed plan, and a real-input FFT built on it.
//!
//! Small on purpose (a few hundred bytes of wasm instead of a general FFT crate): sensor
//! windows are zero-padded to a power of two, so radix-2 is all the feature extractor needs.
//! Sensor samples are real, so [`RealFft`] transforms `n` of them with one complex FFT of
//! `n/2` points and a split pass, half the butterflies of a complex FFT of the padded window.

/// FFT plan for one power-of-two length: twiddle factors and the bit-reversal permutation.
#[derive(Debug, Clone)]
pub struct Fft {
    n: usize,
    /// Twiddles laid out per stage: the stage with butterflies of half-size `h` reads
    /// `exp(-2πik/2h)` for `k in 0..h` at `[h..2h]`, so its inner loop walks contiguous slices
    /// the compiler vectorises (in the wasm module too, with simd128). Index 0 is unused.
    /// Computed in f64 and rounded once.
    tw_re: Vec<f32>,
    tw_im: Vec<f32>,
    /// Pairs `(i, j)`, `i < j`, to swap for the bit-reversed input order.
    swaps: Vec<(u32, u32)>,
}

/// `exp(-2πik/n)` computed in f64, rounded to f32.
fn twiddle(k: usize, n: usize) -> (f32, f32) {
    let angle = -2.0 * std::f64::consts::PI * k as f64 / n as f64;
    (angle.cos() as f32, angle.sin() as f32)
}

impl Fft {
    /// Plans an FFT of length `n`.
    ///
    /// # Panics
    /// If `n` is not a power of two (callers zero-pad; see [`crate::next_pow2`]).
    pub fn new(n: usize) -> Self {
        assert!(n.is_power_of_two(), "fft length {n} is not a power of two");
        let (mut tw_re, mut tw_im) = (vec![0.0; n], vec![0.0; n]);
        let mut h = 1;
        while h < n {
            for k in 0..h {
                (tw_re[h + k], tw_im[h + k]) = twiddle(k, 2 * h);
            }
            h *= 2;
        }
        let bits = n.trailing_zeros();
        let mut swaps = Vec::new();
        if bits > 0 {
            for i in 0..n {
                let j = i.reverse_bits() >> (usize::BITS - bits);
                if i < j {
                    swaps.push((i as u32, j as u32));
                }
            }
        }
        Self {
            n,
            tw_re,
            tw_im,
            swaps,
        }
    }

    /// The planned length.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Always false: a plan has length at least 1.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Forward DFT in place: `X[k] = Σ x[t]·exp(-2πikt/n)`, unnormalised.
    ///
    /// # Panics
    /// If `re` or `im` is not exactly the planned length.
    pub fn process(&self, re: &mut [f32], im: &mut [f32]) {
        assert!(
            re.len() == self.n && im.len() == self.n,
            "fft buffer length mismatch"
        );
        for &(i, j) in &self.swaps {
            re.swap(i as usize, j as usize);
            im.swap(i as usize, j as usize);
        }
        // The first two stages have the trivial twiddles 1 and -i: no multiplies, and their
        // blocks are too short for the general loop to vectorise. For n >= 4 both run in one
        // pass over blocks of four (half the iterations: in the WASM module every loop
        // iteration also pays an epoch check).
        if self.n >= 4 {
            for (r, i) in re.chunks_exact_mut(4).zip(im.chunks_exact_mut(4)) {
                let (r0, r1, r2, r3) = (r[0] + r[1], r[0] - r[1], r[2] + r[3], r[2] - r[3]);
                let (i0, i1, i2, i3) = (i[0] + i[1], i[0] - i[1], i[2] + i[3], i[2] - i[3]);
                (r[0], r[2], i[0], i[2]) = (r0 + r2, r0 - r2, i0 + i2, i0 - i2);
                (r[1], r[3], i[1], i[3]) = (r1 + i3, r1 - i3, i1 - r3, i1 + r3);
            }
        } else if self.n == 2 {
            let (r0, r1, i0, i1) = (re[0], re[1], im[0], im[1]);
            (re[0], re[1], im[0], im[1]) = (r0 + r1, r0 - r1, i0 + i1, i0 - i1);
        }
        // Iterators over split halves and the stage's twiddle slice instead of indexing: no
        // bounds check per butterfly. Four butterflies per iteration (h is a multiple of 4
        // from here on): a fixed-length inner loop the compiler turns into one SIMD operation
        // per line (a per-butterfly loop over six zipped slices stayed scalar in the WASM
        // module), and a quarter of the iterations, each of which pays the module's epoch
        // check.
        let mut h = 4;
        while h < self.n {
            let (tw_re, tw_im) = (&self.tw_re[h..2 * h], &self.tw_im[h..2 * h]);
            for (re_blk, im_blk) in re.chunks_exact_mut(2 * h).zip(im.chunks_exact_mut(2 * h)) {
                let (re_a, re_b) = re_blk.split_at_mut(h);
                let (im_a, im_b) = im_blk.split_at_mut(h);
                // `as_chunks`: arrays of four, so no index is checked.
                let (ra4, _) = re_a.as_chunks_mut::<4>();
                let (ia4, _) = im_a.as_chunks_mut::<4>();
                let (rb4, _) = re_b.as_chunks_mut::<4>();
                let (ib4, _) = im_b.as_chunks_mut::<4>();
                let (wr4, _) = tw_re.as_chunks::<4>();
                let (wi4, _) = tw_im.as_chunks::<4>();
                for (((((ra, ia), rb), ib), wr), wi) in ra4
                    .iter_mut()
                    .zip(ia4.iter_mut())
                    .zip(rb4.iter_mut())
                    .zip(ib4.iter_mut())
                    .zip(wr4)
                    .zip(wi4)
                {
                    // Read into locals first: the compiler cannot tell that the six chunks
                    // do not overlap, and would keep each line scalar.
                    let (xr, xi, yr, yi) = (*ra, *ia, *rb, *ib);
                    let mut tr = [0.0f32; 4];
                    let mut ti = [0.0f32; 4];
                    for j in 0..4 {
                        tr[j] = yr[j] * wr[j] - yi[j] * wi[j];
                        ti[j] = yr[j] * wi[j] + yi[j] * wr[j];
                    }
                    for j in 0..4 {
                        rb[j] = xr[j] - tr[j];
                        ib[j] = xi[j] - ti[j];
                        ra[j] = xr[j] + tr[j];
                        ia[j] = xi[j] + ti[j];
                    }
                }
            }
            h *= 2;
        }
    }
}

/// FFT plan for `n` real samples (`n` a power of two): the one-sided spectrum, bins
/// `0..=n/2`, from one complex FFT of `n/2` points.
#[derive(Debug, Clone)]
pub struct RealFft {
    n: usize,
    half: Fft,
    /// `exp(-2πik/n)` for `k in 0..n/2`: the split pass's twiddles.
    tw_re: Vec<f32>,
    tw_im: Vec<f32>,
}

impl RealFft {
    /// Plans a real FFT of length `n`.
    ///
    /// # Panics
    /// If `n` is not a power of two.
    pub fn new(n: usize) -> Self {
        assert!(n.is_power_of_two(), "fft length {n} is not a power of two");
        let m = n / 2;
        let (tw_re, tw_im) = (0..m).map(|k| twiddle(k, n)).unzip();
        Self {
            n,
            half: Fft::new(m.max(1)),
            tw_re,
            tw_im,
        }
    }

    /// The planned length (number of real samples).
    pub fn len(&self) -> usize {
        self.n
    }

    /// Always false: a plan has length at least 1.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// One-sided forward DFT of the real `x`: on return `re[k] + i·im[k] = X[k]` for
    /// `k in 0..=n/2`, unnormalised (the other bins are the conjugate mirror).
    ///
    /// # Panics
    /// If `x` is not the planned length or `re`/`im` are not `n/2 + 1` long.
    pub fn process(&self, x: &[f32], re: &mut [f32], im: &mut [f32]) {
        let m = self.n / 2;
        assert!(
            x.len() == self.n && re.len() == m + 1 && im.len() == m + 1,
            "real fft buffer length mismatch"
        );
        if m == 0 {
            (re[0], im[0]) = (x[0], 0.0);
            return;
        }
        // Even samples as the real part, odd ones as the imaginary part of n/2 points.
        for ((r, i), pair) in re.iter_mut().zip(im.iter_mut()).zip(x.chunks_exact(2)) {
            (*r, *i) = (pair[0], pair[1]);
        }
        self.half.process(&mut re[..m], &mut im[..m]);
        // Split: with Z the half-size transform, E[k] = (Z[k] + conj Z[m-k]) / 2 is the even
        // samples' spectrum and O[k] = (Z[k] - conj Z[m-k]) / 2i the odd ones';
        // X[k] = E[k] + W^k·O[k]. Bins k and m-k are computed together (each needs the
        // other's input), from the outside in; Z[m] is Z[0].
        let (z0r, z0i) = (re[0], im[0]);
        (re[0], im[0]) = (z0r + z0i, 0.0);
        (re[m], im[m]) = (z0r - z0i, 0.0);
        for k in 1..=m / 2 {
            let j = m - k;
            let (ar, ai, br, bi) = (re[k], im[k], re[j], im[j]);
            let (er, ei) = (0.5 * (ar + br), 0.5 * (ai - bi));
            let (or, oi) = (0.5 * (ai + bi), -0.5 * (ar - br));
            let (wr, wi) = (self.tw_re[k], self.tw_im[k]);
            re[k] = er + wr * or - wi * oi;
            im[k] = ei + wr * oi + wi * or;
            // Bin j from the same inputs: E[j] = conj E[k], O[j] = conj O[k], W^j = -conj W^k.
            re[j] = er - wr * or + wi * oi;
            im[j] = -ei + wr * oi + wi * or;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dft(x: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let n = x.len();
        (0..n)
            .map(|k| {
                x.iter().enumerate().fold((0.0, 0.0), |(r, i), (t, &v)| {
                    let a = -2.0 * std::f64::consts::PI * (k * t) as f64 / n as f64;
                    (r + f64::from(v) * a.cos(), i + f64::from(v) * a.sin())
                })
            })
            .unzip()
    }

    fn signal(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 + 11) % 17) as f32 / 8.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_naive_dft() {
        for n in [1usize, 2, 4, 8, 16, 64, 256] {
            let x = signal(n);
            let (er, ei) = naive_dft(&x);
            let mut re = x.clone();
            let mut im = vec![0.0; n];
            Fft::new(n).process(&mut re, &mut im);
            let tol = 1e-5 * n as f64;
            for k in 0..n {
                assert!((f64::from(re[k]) - er[k]).abs() < tol, "n={n} k={k}");
                assert!((f64::from(im[k]) - ei[k]).abs() < tol, "n={n} k={k}");
            }
        }
    }

    #[test]
    fn complex_input_matches_naive_dft() {
        // Imaginary input exercises the im half of every butterfly (real input leaves it 0).
        let n = 32;
        let (xr, xi) = (signal(n), signal(n + 3)[3..].to_vec());
        let mut re = xr.clone();
        let mut im = xi.clone();
        Fft::new(n).process(&mut re, &mut im);
        // DFT(xr + i·xi) = DFT(xr) + i·DFT(xi).
        let (ar, ai) = naive_dft(&xr);
        let (br, bi) = naive_dft(&xi);
        for k in 0..n {
            assert!((f64::from(re[k]) - (ar[k] - bi[k])).abs() < 1e-4, "k={k}");
            assert!((f64::from(im[k]) - (ai[k] + br[k])).abs() < 1e-4, "k={k}");
        }
    }

    #[test]
    fn real_fft_matches_naive_dft() {
        for n in [1usize, 2, 4, 8, 16, 64, 1024] {
            let x = signal(n);
            let (er, ei) = naive_dft(&x);
            let mut re = vec![0.0; n / 2 + 1];
            let mut im = vec![0.0; n / 2 + 1];
            RealFft::new(n).process(&x, &mut re, &mut im);
            let tol = 1e-5 * n as f64;
            for k in 0..=n / 2 {
                assert!((f64::from(re[k]) - er[k]).abs() < tol, "n={n} k={k}");
                assert!((f64::from(im[k]) - ei[k]).abs() < tol, "n={n} k={k}");
            }
        }
    }

    #[test]
    fn impulse_has_flat_spectrum() {
        let mut re = vec![0.0; 8];
        re[0] = 1.0;
        let mut im = vec![0.0; 8];
        Fft::new(8).process(&mut re, &mut im);
        assert!(re.iter().all(|&v| (v - 1.0).abs() < 1e-6));
        assert!(im.iter().all(|&v| v.abs() < 1e-6));
    }

    #[test]
    #[should_panic(expected = "not a power of two")]
    fn rejects_non_power_of_two() {
        let _ = Fft::new(12);
    }

    #[test]
    #[should_panic(expected = "not a power of two")]
    fn real_fft_rejects_non_power_of_two() {
        let _ = RealFft::new(12);
    }
}
