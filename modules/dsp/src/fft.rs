//! In-place iterative radix-2 FFT with a precomputed plan.
//!
//! Small on purpose (a few hundred bytes of wasm instead of a general FFT crate): sensor
//! windows are zero-padded to a power of two, so radix-2 is all the feature extractor needs.

/// FFT plan for one power-of-two length: twiddle factors and the bit-reversal permutation.
#[derive(Debug, Clone)]
pub struct Fft {
    n: usize,
    /// `exp(-2πik/n)` for `k in 0..n/2`, computed in f64 and rounded once.
    tw_re: Vec<f32>,
    tw_im: Vec<f32>,
    /// Pairs `(i, j)`, `i < j`, to swap for the bit-reversed input order.
    swaps: Vec<(u32, u32)>,
}

impl Fft {
    /// Plans an FFT of length `n`.
    ///
    /// # Panics
    /// If `n` is not a power of two (callers zero-pad; see [`crate::next_pow2`]).
    pub fn new(n: usize) -> Self {
        assert!(n.is_power_of_two(), "fft length {n} is not a power of two");
        let half = n / 2;
        let (mut tw_re, mut tw_im) = (Vec::with_capacity(half), Vec::with_capacity(half));
        for k in 0..half {
            let angle = -2.0 * std::f64::consts::PI * k as f64 / n as f64;
            tw_re.push(angle.cos() as f32);
            tw_im.push(angle.sin() as f32);
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
        // Iterators over split halves instead of indexing: no bounds check per butterfly
        // (in the wasm module each one was a compare and branch in the hottest loop).
        let mut size = 2;
        while size <= self.n {
            let half = size / 2;
            let step = self.n / size;
            for (re_blk, im_blk) in re.chunks_exact_mut(size).zip(im.chunks_exact_mut(size)) {
                let (re_a, re_b) = re_blk.split_at_mut(half);
                let (im_a, im_b) = im_blk.split_at_mut(half);
                let tw = self
                    .tw_re
                    .iter()
                    .step_by(step)
                    .zip(self.tw_im.iter().step_by(step));
                for ((((ra, ia), rb), ib), (&wr, &wi)) in re_a
                    .iter_mut()
                    .zip(im_a.iter_mut())
                    .zip(re_b.iter_mut())
                    .zip(im_b.iter_mut())
                    .zip(tw)
                {
                    let tr = *rb * wr - *ib * wi;
                    let ti = *rb * wi + *ib * wr;
                    *rb = *ra - tr;
                    *ib = *ia - ti;
                    *ra += tr;
                    *ia += ti;
                }
            }
            size *= 2;
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

    #[test]
    fn matches_naive_dft() {
        for n in [1usize, 2, 4, 16, 64] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 + 11) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let (er, ei) = naive_dft(&x);
            let mut re = x.clone();
            let mut im = vec![0.0; n];
            Fft::new(n).process(&mut re, &mut im);
            for k in 0..n {
                assert!((f64::from(re[k]) - er[k]).abs() < 1e-4, "n={n} k={k}");
                assert!((f64::from(im[k]) - ei[k]).abs() < 1e-4, "n={n} k={k}");
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
}
