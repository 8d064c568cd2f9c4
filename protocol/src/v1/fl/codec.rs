//! Update codecs: how a weight delta is compressed for the uplink.
//!
//! Every encoded payload is self-describing (`tag u8 | n u32 | body`, little-endian numbers),
//! so the coordinator decodes it without knowing what the device chose, and checks it against
//! the length it expects before anything reaches the aggregate.
//!
//! | codec       | body                                                        | bytes per weight |
//! |-------------|-------------------------------------------------------------|------------------|
//! | `fp32`      | n x f32                                                     | 4                |
//! | `fp16`      | n x f16 (round to nearest, clamped to the f16 range)        | 2                |
//! | `int8`      | per block of 256: scale f32, 256 x i8 (stochastic rounding) | ~1.02            |
//! | `int4`      | per block of 256: scale f32, 128 bytes of packed nibbles    | ~0.52            |
//! | `topk:F`    | k u32, k indexes (u16 when n <= 65536, else u32), k x f16   | 4..6 per kept    |
//! | `sign`      | per block of 1024: scale f32 (mean abs), 128 bytes of signs | ~0.13            |
//!
//! Stochastic rounding makes `int8`/`int4` unbiased (E[decode(encode(x))] = x), so they need
//! no memory. `topk` and `sign` are biased; they use **error feedback**: the caller keeps a
//! residual per weight, the codec compresses `delta + residual` and leaves in the residual what
//! it did not send, so nothing is lost, only delayed (Seide et al. 2014; Karimireddy et al. 2019,
//! "Error Feedback Fixes SignSGD"). The residual must survive a reboot for that to hold; the
//! agent keeps it in sled.

use std::fmt;
use std::str::FromStr;

use half::f16;

/// Weights per scale block of `int8` and `int4`.
pub const BLOCK: usize = 256;

/// Weights per scale block of `sign` (larger: at 1 bit per weight a 4-byte scale per 256
/// would cost 12% of the payload).
pub const SIGN_BLOCK: usize = 1024;

/// Largest delta one update may carry (weights). 16 M weights is far beyond what an update on
/// the wire can hold ([`super::super::MAX_PAYLOAD_BYTES`]); it only bounds allocations when a
/// hostile payload declares a huge `n`.
pub const MAX_WEIGHTS: usize = 1 << 24;

const TAG_FP32: u8 = 1;
const TAG_FP16: u8 = 2;
const TAG_INT8: u8 = 3;
const TAG_INT4: u8 = 4;
const TAG_TOPK: u8 = 5;
const TAG_SIGN: u8 = 6;

/// How an update is compressed. Written in task files and round orders as `fp32`, `fp16`,
/// `int8`, `int4`, `topk:0.02` (the fraction of weights kept) or `sign`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Codec {
    Fp32,
    Fp16,
    Int8,
    Int4,
    TopK { fraction: f32 },
    Sign,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("unknown codec {0:?}: use fp32, fp16, int8, int4, topk:FRACTION or sign")]
    Unknown(String),
    #[error("topk fraction {0:?}: must be a number in (0, 1]")]
    Fraction(String),
    #[error("update payload truncated: {0}")]
    Truncated(&'static str),
    #[error("update payload has {got} weights, the model has {expected}")]
    Length { expected: usize, got: usize },
    #[error("update payload: unknown codec tag {0}")]
    Tag(u8),
    #[error("update payload: {0}")]
    Invalid(String),
    #[error("update payload: non-finite value at weight {index}")]
    NonFinite { index: usize },
    #[error("update payload: {extra} bytes after the end")]
    Trailing { extra: usize },
}

impl Codec {
    /// True for codecs that need the caller's error-feedback residual.
    pub fn uses_error_feedback(&self) -> bool {
        matches!(self, Codec::TopK { .. } | Codec::Sign)
    }

    /// Number of weights `topk` keeps out of `n`.
    fn keep(fraction: f32, n: usize) -> usize {
        ((fraction as f64 * n as f64).ceil() as usize).clamp(1, n.max(1))
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::Fp32 => f.write_str("fp32"),
            Codec::Fp16 => f.write_str("fp16"),
            Codec::Int8 => f.write_str("int8"),
            Codec::Int4 => f.write_str("int4"),
            Codec::TopK { fraction } => write!(f, "topk:{fraction}"),
            Codec::Sign => f.write_str("sign"),
        }
    }
}

impl FromStr for Codec {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Codec, CodecError> {
        Ok(match s {
            "fp32" => Codec::Fp32,
            "fp16" => Codec::Fp16,
            "int8" => Codec::Int8,
            "int4" => Codec::Int4,
            "sign" => Codec::Sign,
            other => {
                let Some(frac) = other.strip_prefix("topk:") else {
                    return Err(CodecError::Unknown(other.to_owned()));
                };
                match frac.parse::<f32>() {
                    Ok(f) if f > 0.0 && f <= 1.0 => Codec::TopK { fraction: f },
                    _ => return Err(CodecError::Fraction(frac.to_owned())),
                }
            }
        })
    }
}

impl serde::Serialize for Codec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Codec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Codec, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// SplitMix64: a tiny deterministic generator for stochastic rounding (quality is ample for
/// dithering; determinism makes runs reproducible from the round's seed).
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn to_f16(x: f32) -> f16 {
    f16::from_f32(x.clamp(-65504.0, 65504.0))
}

/// Rounds `x` (in units of the quantization step) down or up at random, with the probability
/// of rounding up equal to the fractional part, then clamps to `[-qmax, qmax]`.
fn stochastic_round(x: f32, qmax: i32, rng: &mut SplitMix) -> i32 {
    let floor = x.floor();
    let up = rng.unit() < x - floor;
    (floor as i32 + i32::from(up)).clamp(-qmax, qmax)
}

/// Encodes `delta`. For error-feedback codecs `residual` (same length as `delta`; zeros at
/// first) is added before compressing and replaced by what was not sent; other codecs leave it
/// untouched. `seed` drives stochastic rounding.
///
/// Non-finite inputs are the caller's bug (training already refuses them); they are encoded
/// as zero here so one bad weight cannot poison the residual forever.
pub fn encode(codec: Codec, delta: &[f32], residual: Option<&mut [f32]>, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + delta.len() * 4);
    encode_into(codec, delta, residual, seed, &mut out);
    out
}

/// The bytes [`encode`] gives, of `n` values, for the codecs that encode each value on its own
/// ([`Codec::Fp32`], [`Codec::Fp16`]; neither keeps a residual); `None` for the others. The
/// payload is then [`ElementWise::begin`] and [`ElementWise::push`] of the values a piece at a
/// time, so a sender need not hold the whole delta beside its encoding.
pub fn element_wise(codec: Codec, n: usize) -> Option<ElementWise> {
    let (tag, width) = match codec {
        Codec::Fp32 => (TAG_FP32, 4),
        Codec::Fp16 => (TAG_FP16, 2),
        _ => return None,
    };
    Some(ElementWise { tag, width, n })
}

/// An encoder fed a piece at a time ([`element_wise`]).
#[derive(Debug, Clone, Copy)]
pub struct ElementWise {
    tag: u8,
    width: usize,
    n: usize,
}

impl ElementWise {
    /// Bytes of the payload's header: the codec's tag and the value count.
    const HEADER: usize = 5;

    /// The payload's length.
    pub fn len(&self) -> usize {
        self.at(self.n)
    }

    /// Where value `i` starts in the payload (`at(0)`: the header's length).
    pub fn at(&self, i: usize) -> usize {
        Self::HEADER + i * self.width
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The payload's header (its first bytes).
    pub fn header(&self) -> [u8; Self::HEADER] {
        let n = (self.n as u32).to_le_bytes();
        [self.tag, n[0], n[1], n[2], n[3]]
    }

    /// Appends the payload's header.
    pub fn begin(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header());
    }

    /// Appends the next values (non-finite ones as zero, as [`encode`] does).
    pub fn push(&self, values: &[f32], out: &mut Vec<u8>) {
        let at = out.len();
        out.resize(at + values.len() * self.width, 0);
        self.write(values, &mut out[at..]);
    }

    /// Encodes `values` into `out` (their bytes in the payload, see [`ElementWise::at`]): where
    /// they go in the payload is the caller's to say, so a payload can be filled in any order.
    pub fn write(&self, values: &[f32], out: &mut [u8]) {
        let clean = |x: f32| if x.is_finite() { x } else { 0.0 };
        if self.tag == TAG_FP32 {
            for (x, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&clean(*x).to_le_bytes());
            }
        } else {
            for (x, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&to_f16(clean(*x)).to_le_bytes());
            }
        }
    }
}

/// [`encode`], appending to `out`.
pub fn encode_into(
    codec: Codec,
    delta: &[f32],
    residual: Option<&mut [f32]>,
    seed: u64,
    out: &mut Vec<u8>,
) {
    let n = delta.len();
    let clean = |x: f32| if x.is_finite() { x } else { 0.0 };
    let mut rng = SplitMix(seed);
    let push_header = |out: &mut Vec<u8>, tag: u8| {
        out.push(tag);
        out.extend_from_slice(&(n as u32).to_le_bytes());
    };
    match codec {
        Codec::Fp32 | Codec::Fp16 => {
            if let Some(e) = element_wise(codec, n) {
                e.begin(out);
                e.push(delta, out);
            }
        }
        Codec::Int8 | Codec::Int4 => {
            let (tag, qmax) = if codec == Codec::Int8 {
                (TAG_INT8, 127)
            } else {
                (TAG_INT4, 7)
            };
            push_header(out, tag);
            for block in delta.chunks(BLOCK) {
                let absmax = block.iter().map(|&x| clean(x).abs()).fold(0.0f32, f32::max);
                let scale = if absmax > 0.0 {
                    absmax / qmax as f32
                } else {
                    0.0
                };
                out.extend_from_slice(&scale.to_le_bytes());
                let q = block.iter().map(|&x| {
                    if scale > 0.0 {
                        stochastic_round(clean(x) / scale, qmax, &mut rng)
                    } else {
                        0
                    }
                });
                if tag == TAG_INT8 {
                    out.extend(q.map(|v| v as i8 as u8));
                } else {
                    let nibbles: Vec<u8> = q.map(|v| (v + 8) as u8).collect();
                    out.extend(
                        nibbles
                            .chunks(2)
                            .map(|p| p[0] | (p.get(1).copied().unwrap_or(8) << 4)),
                    );
                }
            }
        }
        Codec::TopK { fraction } => {
            let mut acc = with_residual(delta, residual.as_deref(), clean);
            let k = Codec::keep(fraction, n);
            let mut order: Vec<u32> = (0..n as u32).collect();
            if k < n {
                order.select_nth_unstable_by(k, |&a, &b| {
                    acc[b as usize].abs().total_cmp(&acc[a as usize].abs())
                });
                order.truncate(k);
            }
            order.sort_unstable();
            push_header(out, TAG_TOPK);
            out.extend_from_slice(&(order.len() as u32).to_le_bytes());
            for &i in &order {
                if n <= 1 << 16 {
                    out.extend_from_slice(&(i as u16).to_le_bytes());
                } else {
                    out.extend_from_slice(&i.to_le_bytes());
                }
            }
            for &i in &order {
                let sent = to_f16(acc[i as usize]);
                out.extend_from_slice(&sent.to_le_bytes());
                acc[i as usize] -= sent.to_f32();
            }
            if let Some(r) = residual {
                r.copy_from_slice(&acc);
            }
        }
        Codec::Sign => {
            let mut acc = with_residual(delta, residual.as_deref(), clean);
            push_header(out, TAG_SIGN);
            for block in acc.chunks_mut(SIGN_BLOCK) {
                let scale = block.iter().map(|x| x.abs()).sum::<f32>() / block.len() as f32;
                out.extend_from_slice(&scale.to_le_bytes());
                let mut bits = vec![0u8; block.len().div_ceil(8)];
                for (i, x) in block.iter_mut().enumerate() {
                    if *x >= 0.0 {
                        bits[i / 8] |= 1 << (i % 8);
                        *x -= scale;
                    } else {
                        *x += scale;
                    }
                }
                out.extend_from_slice(&bits);
            }
            if let Some(r) = residual {
                r.copy_from_slice(&acc);
            }
        }
    }
}

fn with_residual(delta: &[f32], residual: Option<&[f32]>, clean: impl Fn(f32) -> f32) -> Vec<f32> {
    match residual {
        Some(r) if r.len() == delta.len() => delta
            .iter()
            .zip(r)
            .map(|(&d, &r)| clean(d) + clean(r))
            .collect(),
        _ => delta.iter().map(|&d| clean(d)).collect(),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        if self.buf.len() < n {
            return Err(CodecError::Truncated(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn scale(&mut self, index: usize) -> Result<f32, CodecError> {
        let b = self.take(4, "block scale")?;
        let s = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if !s.is_finite() || s < 0.0 {
            return Err(CodecError::NonFinite { index });
        }
        Ok(s)
    }
}

/// Decodes a payload made by [`encode`] into `expected` weights. Refuses (naming the cause)
/// anything truncated, of another length, with trailing bytes, with a non-finite value or
/// scale, or with out-of-range / unsorted / duplicate top-k indexes.
pub fn decode(payload: &[u8], expected: usize) -> Result<Vec<f32>, CodecError> {
    let mut r = Reader { buf: payload };
    let tag = r.take(1, "codec tag")?[0];
    let n = r.u32("weight count")? as usize;
    if n != expected {
        return Err(CodecError::Length { expected, got: n });
    }
    if n > MAX_WEIGHTS {
        return Err(CodecError::Invalid(format!(
            "{n} weights exceeds {MAX_WEIGHTS}"
        )));
    }
    let mut out = Vec::with_capacity(n);
    match tag {
        TAG_FP32 => {
            for c in r.take(n * 4, "fp32 values")?.chunks_exact(4) {
                out.push(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
        }
        TAG_FP16 => {
            for c in r.take(n * 2, "fp16 values")?.chunks_exact(2) {
                out.push(f16::from_le_bytes([c[0], c[1]]).to_f32());
            }
        }
        TAG_INT8 | TAG_INT4 => {
            let mut start = 0;
            while start < n {
                let len = BLOCK.min(n - start);
                let scale = r.scale(start)?;
                if tag == TAG_INT8 {
                    for &b in r.take(len, "int8 block")? {
                        out.push(b as i8 as f32 * scale);
                    }
                } else {
                    let bytes = r.take(len.div_ceil(2), "int4 block")?;
                    for i in 0..len {
                        let nib = (bytes[i / 2] >> ((i % 2) * 4)) & 0x0F;
                        out.push((nib as i32 - 8) as f32 * scale);
                    }
                }
                start += len;
            }
        }
        TAG_TOPK => {
            let k = r.u32("top-k count")? as usize;
            if k > n {
                return Err(CodecError::Invalid(format!(
                    "top-k keeps {k} of {n} weights"
                )));
            }
            let wide = n > 1 << 16;
            let idx_bytes = r.take(k * if wide { 4 } else { 2 }, "top-k indexes")?;
            let indexes: Vec<usize> = if wide {
                idx_bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
                    .collect()
            } else {
                idx_bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as usize)
                    .collect()
            };
            for w in indexes.windows(2) {
                if w[1] <= w[0] {
                    return Err(CodecError::Invalid(format!(
                        "top-k indexes not strictly increasing ({} then {})",
                        w[0], w[1]
                    )));
                }
            }
            if let Some(&last) = indexes.last()
                && last >= n
            {
                return Err(CodecError::Invalid(format!(
                    "top-k index {last} out of range for {n} weights"
                )));
            }
            out.resize(n, 0.0);
            let values = r.take(k * 2, "top-k values")?;
            for (&i, c) in indexes.iter().zip(values.chunks_exact(2)) {
                out[i] = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        TAG_SIGN => {
            let mut start = 0;
            while start < n {
                let len = SIGN_BLOCK.min(n - start);
                let scale = r.scale(start)?;
                let bits = r.take(len.div_ceil(8), "sign bits")?;
                for i in 0..len {
                    let positive = bits[i / 8] & (1 << (i % 8)) != 0;
                    out.push(if positive { scale } else { -scale });
                }
                start += len;
            }
        }
        other => return Err(CodecError::Tag(other)),
    }
    if !r.buf.is_empty() {
        return Err(CodecError::Trailing { extra: r.buf.len() });
    }
    if let Some(index) = out.iter().position(|x| !x.is_finite()) {
        return Err(CodecError::NonFinite { index });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix(seed);
        (0..n).map(|_| (rng.unit() - 0.5) * 0.2).collect()
    }

    const ALL: [Codec; 6] = [
        Codec::Fp32,
        Codec::Fp16,
        Codec::Int8,
        Codec::Int4,
        Codec::TopK { fraction: 0.05 },
        Codec::Sign,
    ];

    #[test]
    fn element_wise_codecs_encode_the_same_in_pieces() {
        let mut delta = sample(10_007, 3);
        delta[5] = f32::NAN;
        delta[6] = f32::INFINITY;
        for c in ALL {
            let Some(e) = element_wise(c, delta.len()) else {
                assert!(!matches!(c, Codec::Fp32 | Codec::Fp16), "{c}");
                continue;
            };
            let mut out = b"head".to_vec();
            e.begin(&mut out);
            for piece in delta.chunks(999) {
                e.push(piece, &mut out);
            }
            assert_eq!(out[4..], encode(c, &delta, None, 9)[..], "{c}");
            assert_eq!(out.len() - 4, e.len(), "{c}");
        }
    }

    #[test]
    fn names_round_trip() {
        for c in ALL {
            assert_eq!(c.to_string().parse::<Codec>().expect("ok"), c);
        }
        assert!(matches!(
            "topk:0".parse::<Codec>(),
            Err(CodecError::Fraction(_))
        ));
        assert!(matches!(
            "topk:1.5".parse::<Codec>(),
            Err(CodecError::Fraction(_))
        ));
        assert!(matches!(
            "gzip".parse::<Codec>(),
            Err(CodecError::Unknown(_))
        ));
    }

    #[test]
    fn every_codec_decodes_to_the_right_length_and_is_close() {
        let delta = sample(1000, 1);
        for c in ALL {
            let mut residual = vec![0.0; delta.len()];
            let bytes = encode(c, &delta, Some(&mut residual), 7);
            let back = decode(&bytes, delta.len()).expect("ok");
            assert_eq!(back.len(), delta.len(), "{c}");
            match c {
                Codec::Fp32 => assert_eq!(back, delta),
                Codec::Fp16 => assert!(back.iter().zip(&delta).all(|(a, b)| (a - b).abs() < 1e-4)),
                Codec::Int8 => assert!(
                    back.iter()
                        .zip(&delta)
                        .all(|(a, b)| (a - b).abs() < 0.1 / 127.0 + 1e-6)
                ),
                Codec::Int4 => assert!(
                    back.iter()
                        .zip(&delta)
                        .all(|(a, b)| (a - b).abs() < 0.1 / 7.0 + 1e-6)
                ),
                // Error feedback: what was sent plus what is left is exactly what was asked.
                Codec::TopK { .. } | Codec::Sign => {
                    for i in 0..delta.len() {
                        assert!(
                            (back[i] + residual[i] - delta[i]).abs() < 1e-5,
                            "{c} at {i}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        // A constant that falls between two int4 steps: the mean over many seeds approaches it.
        let mut delta = vec![0.33f32; 256];
        delta[0] = 1.0; // sets the scale: step = 1/7
        let mut sum = 0.0f64;
        for seed in 0..400 {
            let back = decode(&encode(Codec::Int4, &delta, None, seed), 256).expect("ok");
            sum += back[1..].iter().map(|&x| x as f64).sum::<f64>() / 255.0;
        }
        assert!((sum / 400.0 - 0.33).abs() < 0.005, "mean {}", sum / 400.0);
    }

    #[test]
    fn error_feedback_delivers_everything_eventually() {
        // The same delta sent repeatedly with sign+EF: the running sum of what was decoded
        // tracks the running sum of what was asked, within one step's worth of residual.
        let delta = sample(600, 3);
        for c in [Codec::Sign, Codec::TopK { fraction: 0.02 }] {
            let mut residual = vec![0.0; delta.len()];
            let mut sent = vec![0.0f32; delta.len()];
            for round in 0..50 {
                let back = decode(&encode(c, &delta, Some(&mut residual), round), delta.len())
                    .expect("ok");
                for (s, b) in sent.iter_mut().zip(back) {
                    *s += b;
                }
            }
            for i in 0..delta.len() {
                let asked = delta[i] * 50.0;
                assert!((sent[i] + residual[i] - asked).abs() < 1e-3, "{c} at {i}");
            }
        }
    }

    #[test]
    fn compression_ratios() {
        let n = 2410;
        let delta = sample(n, 5);
        let size = |c| encode(c, &delta, Some(&mut vec![0.0; n]), 0).len();
        let fp32 = size(Codec::Fp32) as f64;
        assert!(fp32 / size(Codec::Fp16) as f64 > 1.99);
        assert!(fp32 / size(Codec::Int8) as f64 > 3.8);
        assert!(fp32 / size(Codec::Int4) as f64 > 7.0);
        assert!(fp32 / size(Codec::Sign) as f64 > 30.0);
        assert!(fp32 / size(Codec::TopK { fraction: 0.02 }) as f64 > 40.0);
    }

    #[test]
    fn bad_payloads_are_refused_with_the_cause() {
        let delta = sample(300, 9);
        let good = encode(Codec::Fp32, &delta, None, 0);
        assert!(matches!(
            decode(&good, 299),
            Err(CodecError::Length {
                expected: 299,
                got: 300
            })
        ));
        assert!(matches!(
            decode(&good[..good.len() - 1], 300),
            Err(CodecError::Truncated(_))
        ));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            decode(&long, 300),
            Err(CodecError::Trailing { extra: 1 })
        ));
        let mut nan = good.clone();
        nan[5 + 4 * 7..5 + 4 * 8].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            decode(&nan, 300),
            Err(CodecError::NonFinite { index: 7 })
        ));
        let mut tag = good.clone();
        tag[0] = 99;
        assert!(matches!(decode(&tag, 300), Err(CodecError::Tag(99))));
        let int8 = encode(Codec::Int8, &delta, None, 0);
        let mut bad_scale = int8.clone();
        bad_scale[5..9].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert!(matches!(
            decode(&bad_scale, 300),
            Err(CodecError::NonFinite { index: 0 })
        ));
        // top-k with a duplicated index.
        let mut topk = encode(
            Codec::TopK { fraction: 0.01 },
            &delta,
            Some(&mut vec![0.0; 300]),
            0,
        );
        let k = u32::from_le_bytes(topk[5..9].try_into().expect("ok"));
        assert_eq!(k, 3);
        let first = [topk[9], topk[10]];
        topk[11] = first[0];
        topk[12] = first[1];
        assert!(matches!(decode(&topk, 300), Err(CodecError::Invalid(_))));
        assert!(matches!(decode(&[], 300), Err(CodecError::Truncated(_))));
    }

    #[test]
    fn non_finite_deltas_are_sent_as_zero() {
        let delta = [1.0, f32::NAN, f32::INFINITY, -1.0];
        for c in ALL {
            let mut residual = vec![0.0; 4];
            let back = decode(&encode(c, &delta, Some(&mut residual), 1), 4).expect("ok");
            assert!(back.iter().all(|x| x.is_finite()), "{c}");
            assert!(residual.iter().all(|x| x.is_finite()), "{c}");
        }
    }
}
