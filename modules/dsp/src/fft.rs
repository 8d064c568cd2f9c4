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
    /// the compiler vectorises (in the wasm module too, with simd128). Indices below 8 are
    /// unused (zero): the first three stages' twiddles are constants. Computed in f64 and
    /// rounded once.
    tw_re: Vec<f32>,
    tw_im: Vec<f32>,
    /// `rev[k]`: `k` with its `log2 n` bits reversed, the input order the butterflies need.
    rev: Vec<u32>,
}

/// `exp(-2πik/n)` computed in f64, rounded to f32.
fn twiddle(k: usize, n: usize) -> (f32, f32) {
    let angle = -2.0 * std::f64::consts::PI * k as f64 / n as f64;
    (angle.cos() as f32, angle.sin() as f32)
}

// Speed notes (`cargo xtask bench sandbox` compares the WASM module with this code compiled
// natively). In the module every loop iteration pays an epoch check (the call deadline), and
// Cranelift allocates registers less well than LLVM in a large function: so the loops below
// do more work per iteration (blocks of eight butterflies, three stages in the first pass,
// four bins per split step), and each stage is a function of its own (`#[inline(never)]`),
// where its pointers and the epoch counter stay in registers instead of being spilled around
// a loop of the inlined whole. Natively the changes cost nothing: LLVM unrolls and
// vectorises the same loops anyway.

impl Fft {
    /// Plans an FFT of length `n`.
    ///
    /// # Panics
    /// If `n` is not a power of two (callers zero-pad; see [`crate::next_pow2`]).
    pub fn new(n: usize) -> Self {
        assert!(n.is_power_of_two(), "fft length {n} is not a power of two");
        let (mut tw_re, mut tw_im) = (vec![0.0; n], vec![0.0; n]);
        let mut h = 8;
        while h < n {
            for k in 0..h {
                (tw_re[h + k], tw_im[h + k]) = twiddle(k, 2 * h);
            }
            h *= 2;
        }
        let bits = n.trailing_zeros();
        let rev = (0..n)
            .map(|i| match bits {
                0 => 0,
                _ => (i.reverse_bits() >> (usize::BITS - bits)) as u32,
            })
            .collect();
        Self {
            n,
            tw_re,
            tw_im,
            rev,
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
        for (i, &j) in self.rev.iter().enumerate() {
            let j = j as usize;
            if i < j {
                re.swap(i, j);
                im.swap(i, j);
            }
        }
        self.butterflies(re, im);
    }

    /// The butterfly stages, on input already in bit-reversed order.
    fn butterflies(&self, re: &mut [f32], im: &mut [f32]) {
        // The first three stages have the constant twiddles 1, -i and the eighth roots of
        // unity: one pass over blocks of eight does them with no table and few multiplies.
        match self.n {
            8.. => first_three_stages(re, im),
            4 => {
                if let (Some(r), Some(i)) = (re.first_chunk_mut(), im.first_chunk_mut()) {
                    radix4(r, i);
                }
            }
            2 => {
                let (r0, r1, i0, i1) = (re[0], re[1], im[0], im[1]);
                (re[0], re[1], im[0], im[1]) = (r0 + r1, r0 - r1, i0 + i1, i0 - i1);
            }
            _ => {}
        }
        let mut h = 8;
        while h < self.n {
            stage(re, im, &self.tw_re[h..2 * h], &self.tw_im[h..2 * h]);
            h *= 2;
        }
    }
}

/// Stages one and two (twiddles 1 and -i) on a block of four, in place.
#[inline(always)]
fn radix4(r: &mut [f32; 4], i: &mut [f32; 4]) {
    let (r0, r1, r2, r3) = (r[0] + r[1], r[0] - r[1], r[2] + r[3], r[2] - r[3]);
    let (i0, i1, i2, i3) = (i[0] + i[1], i[0] - i[1], i[2] + i[3], i[2] - i[3]);
    (r[0], r[2], i[0], i[2]) = (r0 + r2, r0 - r2, i0 + i2, i0 - i2);
    (r[1], r[3], i[1], i[3]) = (r1 + i3, r1 - i3, i1 - r3, i1 + r3);
}

/// Stages one to three over blocks of eight: two radix-4 halves, then the butterflies of
/// half-size 4, whose twiddles are `exp(-2πik/8)`, `k in 0..4`: 1, `c - ic`, `-i`, `-c - ic`
/// with `c = √½`.
#[inline(never)]
fn first_three_stages(re: &mut [f32], im: &mut [f32]) {
    const C: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let (re8, _) = re.as_chunks_mut::<8>();
    let (im8, _) = im.as_chunks_mut::<8>();
    for (r, i) in re8.iter_mut().zip(im8) {
        let (mut ar, mut br) = ([r[0], r[1], r[2], r[3]], [r[4], r[5], r[6], r[7]]);
        let (mut ai, mut bi) = ([i[0], i[1], i[2], i[3]], [i[4], i[5], i[6], i[7]]);
        radix4(&mut ar, &mut ai);
        radix4(&mut br, &mut bi);
        // t = b·w for the four twiddles above.
        let tr = [br[0], C * (br[1] + bi[1]), bi[2], C * (bi[3] - br[3])];
        let ti = [bi[0], C * (bi[1] - br[1]), -br[2], -C * (br[3] + bi[3])];
        for j in 0..4 {
            (r[j], r[j + 4]) = (ar[j] + tr[j], ar[j] - tr[j]);
            (i[j], i[j + 4]) = (ai[j] + ti[j], ai[j] - ti[j]);
        }
    }
}

/// One stage of butterflies of half-size `h = tw_re.len()` (a multiple of 8) over blocks of
/// `2h`, eight butterflies per iteration.
#[inline(never)]
fn stage(re: &mut [f32], im: &mut [f32], tw_re: &[f32], tw_im: &[f32]) {
    let h = tw_re.len();
    // `as_chunks`: arrays of eight, so no index is checked.
    let (wr8, _) = tw_re.as_chunks::<8>();
    let (wi8, _) = tw_im.as_chunks::<8>();
    for (re_blk, im_blk) in re.chunks_exact_mut(2 * h).zip(im.chunks_exact_mut(2 * h)) {
        let (re_a, re_b) = re_blk.split_at_mut(h);
        let (im_a, im_b) = im_blk.split_at_mut(h);
        let (ra8, _) = re_a.as_chunks_mut::<8>();
        let (ia8, _) = im_a.as_chunks_mut::<8>();
        let (rb8, _) = re_b.as_chunks_mut::<8>();
        let (ib8, _) = im_b.as_chunks_mut::<8>();
        for (((((ra, ia), rb), ib), wr), wi) in ra8
            .iter_mut()
            .zip(ia8.iter_mut())
            .zip(rb8.iter_mut())
            .zip(ib8.iter_mut())
            .zip(wr8)
            .zip(wi8)
        {
            // Read into locals first: the compiler cannot tell that the six chunks do not
            // overlap, and would keep each line scalar.
            let (xr, xi, yr, yi) = (*ra, *ia, *rb, *ib);
            let mut tr = [0.0f32; 8];
            let mut ti = [0.0f32; 8];
            for j in 0..8 {
                tr[j] = yr[j] * wr[j] - yi[j] * wi[j];
                ti[j] = yr[j] * wi[j] + yi[j] * wr[j];
            }
            for j in 0..8 {
                rb[j] = xr[j] - tr[j];
                ib[j] = xi[j] - ti[j];
                ra[j] = xr[j] + tr[j];
                ia[j] = xi[j] + ti[j];
            }
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
        gather_pairs(x, &self.half.rev, &mut re[..m], &mut im[..m]);
        self.half.butterflies(&mut re[..m], &mut im[..m]);
        split(re, im, &self.tw_re, &self.tw_im);
    }
}

/// Even samples as the real part, odd ones as the imaginary part of `n/2` points, read in
/// the bit-reversed order `rev` (the copy does the permutation, so no swap pass follows).
#[inline(never)]
fn gather_pairs(x: &[f32], rev: &[u32], re: &mut [f32], im: &mut [f32]) {
    let (pairs, _) = x.as_chunks::<2>();
    let (rev4, rev_rest) = rev.as_chunks::<4>();
    let (re4, re_rest) = re.as_chunks_mut::<4>();
    let (im4, im_rest) = im.as_chunks_mut::<4>();
    for ((r, i), p) in re4.iter_mut().zip(im4.iter_mut()).zip(rev4) {
        for j in 0..4 {
            [r[j], i[j]] = pairs[p[j] as usize];
        }
    }
    for ((r, i), &p) in re_rest.iter_mut().zip(im_rest).zip(rev_rest) {
        [*r, *i] = pairs[p as usize];
    }
}

/// The split pass: with Z the half-size transform of `m` points in `re[..m]`/`im[..m]`,
/// `E[k] = (Z[k] + conj Z[m-k]) / 2` is the even samples' spectrum and
/// `O[k] = (Z[k] - conj Z[m-k]) / 2i` the odd ones'; `X[k] = E[k] + W^k·O[k]`. Bins `k` and
/// `m-k` are computed together (each needs the other's input), four pairs per iteration;
/// `Z[m]` is `Z[0]`, and the middle bin `m/2` pairs with itself: `X[m/2] = conj Z[m/2]`.
#[inline(never)]
fn split(re: &mut [f32], im: &mut [f32], tw_re: &[f32], tw_im: &[f32]) {
    let m = re.len() - 1;
    let (z0r, z0i) = (re[0], im[0]);
    (re[0], im[0]) = (z0r + z0i, 0.0);
    (re[m], im[m]) = (z0r - z0i, 0.0);
    if m < 2 {
        return;
    }
    let mid = m / 2;
    im[mid] = -im[mid];
    // Bins 1..mid (k, ascending) and mid+1..m (j = m - k, the same pairs read from the end).
    let (re_lo, re_hi) = re[1..m].split_at_mut(mid - 1);
    let (im_lo, im_hi) = im[1..m].split_at_mut(mid - 1);
    let (re_hi, im_hi) = (&mut re_hi[1..], &mut im_hi[1..]);
    let (wr, wi) = (&tw_re[1..mid], &tw_im[1..mid]);

    let (rl4, rl_rest) = re_lo.as_chunks_mut::<4>();
    let (il4, il_rest) = im_lo.as_chunks_mut::<4>();
    let (wr4, wr_rest) = wr.as_chunks::<4>();
    let (wi4, wi_rest) = wi.as_chunks::<4>();
    // From the end, so the first chunk holds j = m-1 down to m-4 (read reversed).
    let (rh_rest, rh4) = re_hi.as_rchunks_mut::<4>();
    let (ih_rest, ih4) = im_hi.as_rchunks_mut::<4>();
    for (((((rl, il), rh), ih), wr), wi) in rl4
        .iter_mut()
        .zip(il4.iter_mut())
        .zip(rh4.iter_mut().rev())
        .zip(ih4.iter_mut().rev())
        .zip(wr4)
        .zip(wi4)
    {
        let (ar, ai) = (*rl, *il);
        let (br, bi) = ([rh[3], rh[2], rh[1], rh[0]], [ih[3], ih[2], ih[1], ih[0]]);
        let mut out = [[0.0f32; 4]; 4];
        for l in 0..4 {
            let x = split_pair(ar[l], ai[l], br[l], bi[l], wr[l], wi[l]);
            for (o, v) in out.iter_mut().zip(x) {
                o[l] = v;
            }
        }
        let [xr, xi, yr, yi] = out;
        (*rl, *il) = (xr, xi);
        *rh = [yr[3], yr[2], yr[1], yr[0]];
        *ih = [yi[3], yi[2], yi[1], yi[0]];
    }
    for (((((rl, il), rh), ih), &wr), &wi) in rl_rest
        .iter_mut()
        .zip(il_rest.iter_mut())
        .zip(rh_rest.iter_mut().rev())
        .zip(ih_rest.iter_mut().rev())
        .zip(wr_rest)
        .zip(wi_rest)
    {
        [*rl, *il, *rh, *ih] = split_pair(*rl, *il, *rh, *ih, wr, wi);
    }
}

/// `X[k]` and `X[m-k]` (real, imaginary of each) from `a = Z[k]`, `b = Z[m-k]` and
/// `w = W^k`. Bin `m-k` uses `E[m-k] = conj E[k]`, `O[m-k] = conj O[k]` and
/// `W^(m-k) = -conj W^k`.
#[inline(always)]
fn split_pair(ar: f32, ai: f32, br: f32, bi: f32, wr: f32, wi: f32) -> [f32; 4] {
    let (er, ei) = (0.5 * (ar + br), 0.5 * (ai - bi));
    let (or, oi) = (0.5 * (ai + bi), -0.5 * (ar - br));
    [
        er + wr * or - wi * oi,
        ei + wr * oi + wi * or,
        er - wr * or + wi * oi,
        -ei + wr * oi + wi * or,
    ]
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
