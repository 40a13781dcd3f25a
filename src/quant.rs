//! Integer kernels for decoding from GGUF blocks (Q8_0, Q4_1): a linear map quantizes its few
//! input rows to 8-bit blocks and takes integer dot products (AVX2 `maddubs`, with a scalar
//! fallback), split over output rows with rayon.
//!
//! The weights themselves live in [`crate::ops::QuantizedWeight`]; `ops::quantized_linear` views
//! them here (no copy) inside `ops::with_integer_kernels`. No backward: training and prompts take
//! the exact tiled product there.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Elements per quantization block.
pub const BLOCK: usize = 32;

/// The block formats with a kernel here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QKind {
    /// `f16 d, i8 q[32]`: x = d q.
    Q8_0,
    /// `f16 d, f16 m, u8 q[16]` (low nibbles are elements 0..16, high nibbles 16..32): x = d q + m.
    Q4_1,
}

impl QKind {
    pub fn block_bytes(self) -> usize {
        match self {
            QKind::Q8_0 => 34,
            QKind::Q4_1 => 20,
        }
    }

    pub fn from_ggml(dt: GgmlDType) -> Result<Self> {
        match dt {
            GgmlDType::Q8_0 => Ok(QKind::Q8_0),
            GgmlDType::Q4_1 => Ok(QKind::Q4_1),
            other => Err(Error::invalid(format!(
                "quantized inference supports Q8_0 and Q4_1 weights, not {other:?} (load the \
                 model in f32, or requantize to q8_0)"
            ))),
        }
    }
}

/// A quantized weight `[n, k]`, rows of whole blocks, exactly as GGUF stores them.
#[derive(Clone)]
pub struct QWeight {
    pub kind: QKind,
    pub n: usize,
    pub k: usize,
    data: std::sync::Arc<Vec<u8>>,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QWeight({:?}, [{}, {}])", self.kind, self.n, self.k)
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

impl QWeight {
    pub fn from_qtensor(q: &QTensor) -> Result<Self> {
        let kind = QKind::from_ggml(q.dtype())?;
        let (n, k) = q.shape().dims2()?;
        let data = q.data()?.into_owned();
        Self::from_bytes(kind, n, k, data)
    }

    /// A view of blocks held elsewhere (a [`crate::ops::QuantizedWeight`]): nothing is copied.
    pub(crate) fn from_shared(
        kind: QKind,
        n: usize,
        k: usize,
        data: std::sync::Arc<Vec<u8>>,
    ) -> Self {
        debug_assert_eq!(data.len(), n * (k / BLOCK) * kind.block_bytes());
        Self { kind, n, k, data }
    }

    pub fn from_bytes(kind: QKind, n: usize, k: usize, data: Vec<u8>) -> Result<Self> {
        if !k.is_multiple_of(BLOCK) {
            return Err(Error::invalid(format!(
                "quantized weight [{n}, {k}]: rows must be whole {BLOCK}-element blocks"
            )));
        }
        if data.len() != n * (k / BLOCK) * kind.block_bytes() {
            return Err(Error::invalid(format!(
                "quantized weight [{n}, {k}] {kind:?}: {} bytes, expected {}",
                data.len(),
                n * (k / BLOCK) * kind.block_bytes()
            )));
        }
        Ok(Self {
            kind,
            n,
            k,
            data: std::sync::Arc::new(data),
        })
    }

    /// Quantize an f32 weight `[n, k]` (the "requantize" path).
    pub fn quantize(w: &Tensor, kind: QKind) -> Result<Self> {
        let dt = match kind {
            QKind::Q8_0 => GgmlDType::Q8_0,
            QKind::Q4_1 => GgmlDType::Q4_1,
        };
        Self::from_qtensor(&QTensor::quantize(
            &w.to_dtype(candle_core::DType::F32)?,
            dt,
        )?)
    }

    fn row_bytes(&self) -> usize {
        self.k / BLOCK * self.kind.block_bytes()
    }

    fn row(&self, j: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[j * rb..(j + 1) * rb]
    }

    /// Row `j` in f32.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let bb = self.kind.block_bytes();
        for (b, o) in self
            .row(j)
            .chunks_exact(bb)
            .zip(out.chunks_exact_mut(BLOCK))
        {
            match self.kind {
                QKind::Q8_0 => {
                    let d = f16_at(b, 0);
                    for (y, &q) in o.iter_mut().zip(&b[2..34]) {
                        *y = d * (q as i8) as f32;
                    }
                }
                QKind::Q4_1 => {
                    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                    for (l, &q) in b[4..20].iter().enumerate() {
                        o[l] = d * (q & 15) as f32 + m;
                        o[l + 16] = d * (q >> 4) as f32 + m;
                    }
                }
            }
        }
    }

    /// The whole weight in f32 (tests and reference).
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut v = vec![0f32; self.n * self.k];
        for (j, o) in v.chunks_exact_mut(self.k).enumerate() {
            self.dequantize_row(j, o);
        }
        Ok(Tensor::from_vec(
            v,
            (self.n, self.k),
            &candle_core::Device::Cpu,
        )?)
    }

    /// `x W^T` for `x: [..., k]` (f32, CPU).
    pub fn linear(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.last() != Some(&self.k) {
            return Err(Error::invalid(format!(
                "quantized linear: input {dims:?} does not end in {} features",
                self.k
            )));
        }
        let m = x.elem_count() / self.k;
        let xv = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let out = self.matmul(&xv, m);
        let mut od = dims;
        od.pop();
        od.push(self.n);
        Ok(Tensor::from_vec(out, od, x.device())?)
    }

    /// `out[j - rows.start] = W[j] . x` for the weight rows in `rows`, one quantized input row
    /// (the fused decoder's per-thread share of a matrix-vector product).
    pub(crate) fn dot_rows(&self, xq: &[Q8Block], rows: std::ops::Range<usize>, out: &mut [f32]) {
        debug_assert_eq!(xq.len(), self.k / BLOCK);
        let dot = dot_fn(self.kind);
        for (j, y) in rows.zip(out) {
            *y = dot(self.row(j), xq);
        }
    }

    /// `[m, n]` = `x [m, k]` times the transposed weight.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let nb = self.k / BLOCK;
        let mut xq = Vec::new();
        quantize_input(x, &mut xq);
        let dot = dot_fn(self.kind);
        let dot4 = dot4_fn(self.kind);
        let rb = self.row_bytes();
        // Tasks own weight rows; each weight row (at most a few KiB) is dotted with every input row.
        let rows_per_task = (16384 / rb.max(1)).clamp(4, 64);
        let mut t = vec![0f32; self.n * m];
        t.par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|(c, o)| {
                let j0 = c * rows_per_task;
                for (jj, ys) in o.chunks_mut(m).enumerate() {
                    let wr = self.row(j0 + jj);
                    let mut i = 0;
                    // Four input rows per pass over the weight row: its blocks are unpacked once.
                    while i + 4 <= m {
                        let xs = [0, 1, 2, 3].map(|r| &xq[(i + r) * nb..(i + r + 1) * nb]);
                        ys[i..i + 4].copy_from_slice(&dot4(wr, xs));
                        i += 4;
                    }
                    while i < m {
                        ys[i] = dot(wr, &xq[i * nb..(i + 1) * nb]);
                        i += 1;
                    }
                }
            });
        if m == 1 {
            return t;
        }
        let mut out = vec![0f32; m * self.n];
        for j in 0..self.n {
            for i in 0..m {
                out[i * self.n + j] = t[j * m + i];
            }
        }
        out
    }
}

/// An input block quantized to 8 bits: x ~ d q; `s = d * sum(q)` (for Q4_1's offset term).
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Q8Block {
    q: [i8; BLOCK],
    d: f32,
    s: f32,
}

/// `x` (whole blocks) as 8-bit blocks in `out`, the input side of [`QWeight::dot_rows`].
pub(crate) fn quantize_input(x: &[f32], out: &mut Vec<Q8Block>) {
    out.clear();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present.
        out.extend(
            x.chunks_exact(BLOCK)
                .map(|b| unsafe { quantize_block_avx2(b) }),
        );
        return;
    }
    out.extend(x.chunks_exact(BLOCK).map(quantize_block));
}

/// `|x - x'|` (Euclidean), `x'` being `x` as the blocks `xq` that [`quantize_input`] made of it.
pub(crate) fn q8_input_error_norm(x: &[f32], xq: &[Q8Block]) -> f64 {
    let mut sum = 0f64;
    for (b, q) in x.chunks_exact(BLOCK).zip(xq) {
        for (&v, &qi) in b.iter().zip(&q.q) {
            sum += (v as f64 - (q.d * qi as f32) as f64).powi(2);
        }
    }
    sum.sqrt()
}

/// Rounds half to even, like the AVX2 version's conversion.
fn quantize_block(x: &[f32]) -> Q8Block {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    let mut sum = 0i32;
    for (o, v) in q.iter_mut().zip(x) {
        *o = (v * inv).round_ties_even() as i8;
        sum += *o as i32;
    }
    Q8Block {
        q,
        d,
        s: d * sum as f32,
    }
}

/// [`quantize_block`] in AVX2 (the scalar version's `round` was a libm call per element).
///
/// # Safety
/// Needs AVX2; `x` has `BLOCK` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_block_avx2(x: &[f32]) -> Q8Block {
    use std::arch::x86_64::*;
    debug_assert_eq!(x.len(), BLOCK);
    let p = x.as_ptr();
    let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
    let sign = _mm256_set1_ps(-0.0);
    let abs = v.map(|v| _mm256_andnot_ps(sign, v));
    let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    let amax = _mm_cvtss_f32(m);
    let d = amax / 127.0;
    let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    // Converting rounds to nearest, ties to even (the default MXCSR mode).
    let i = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)));
    let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    let sum = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256(sum, 1),
    );
    let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
    let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01));
    let sum = _mm_cvtsi128_si32(sum);
    // Pack 32 x i32 -> 32 x i8; the packs interleave 128-bit lanes, the permute restores order.
    let w01 = _mm256_packs_epi32(i[0], i[1]);
    let w23 = _mm256_packs_epi32(i[2], i[3]);
    let b = _mm256_packs_epi16(w01, w23);
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut out = Q8Block {
        q: [0; BLOCK],
        d,
        s: d * sum as f32,
    };
    _mm256_storeu_si256(out.q.as_mut_ptr() as *mut __m256i, b);
    out
}

type QDot = fn(&[u8], &[Q8Block]) -> f32;

fn dot_fn(kind: QKind) -> QDot {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return match kind {
                QKind::Q8_0 => dot_q8_0_avx2,
                QKind::Q4_1 => dot_q4_1_avx2,
            };
        }
    }
    match kind {
        QKind::Q8_0 => dot_q8_0_scalar,
        QKind::Q4_1 => dot_q4_1_scalar,
    }
}

type QDot4 = fn(&[u8], [&[Q8Block]; 4]) -> [f32; 4];

fn dot4_fn(kind: QKind) -> QDot4 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return match kind {
                QKind::Q8_0 => |w, x| unsafe { dot_q8_0_avx2_rows(w, x) },
                QKind::Q4_1 => |w, x| unsafe { dot_q4_1_avx2_rows(w, x) },
            };
        }
    }
    match kind {
        QKind::Q8_0 => |w, x| x.map(|x| dot_q8_0_scalar(w, x)),
        QKind::Q4_1 => |w, x| x.map(|x| dot_q4_1_scalar(w, x)),
    }
}

fn dot_q8_0_scalar(w: &[u8], x: &[Q8Block]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in w.chunks_exact(34).zip(x) {
        let s: i32 = b[2..34]
            .iter()
            .zip(&xb.q)
            .map(|(&a, &c)| (a as i8) as i32 * c as i32)
            .sum();
        acc += f16_at(b, 0) * xb.d * s as f32;
    }
    acc
}

fn dot_q4_1_scalar(w: &[u8], x: &[Q8Block]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in w.chunks_exact(20).zip(x) {
        let mut s = 0i32;
        for (l, &q) in b[4..20].iter().enumerate() {
            s += (q & 15) as i32 * xb.q[l] as i32 + (q >> 4) as i32 * xb.q[l + 16] as i32;
        }
        acc += f16_at(b, 0) * xb.d * s as f32 + f16_at(b, 2) * xb.s;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
fn dot_q8_0_avx2(w: &[u8], x: &[Q8Block]) -> f32 {
    // SAFETY: chosen by `dot_fn` only when AVX2, FMA and F16C are present.
    unsafe { dot_q8_0_avx2_rows::<1>(w, [x])[0] }
}

#[cfg(target_arch = "x86_64")]
fn dot_q4_1_avx2(w: &[u8], x: &[Q8Block]) -> f32 {
    // SAFETY: as above.
    unsafe { dot_q4_1_avx2_rows::<1>(w, [x])[0] }
}

/// Both f16 words at `p` (Q4_1's scale and minimum; Q8_0's scale and its first two weights) as
/// f32 lanes 0 and 1. One 32-bit load and one conversion, written to a fresh register: a 16-bit
/// insert would merge into whatever register the compiler picks, which once made each block wait
/// for the previous block's accumulation.
///
/// # Safety
/// Needs F16C; `p` points at 4 readable bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_pair(p: *const u8) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)))
}

/// One weight row against `R` input rows (prefill): each weight block is loaded once. Even and
/// odd blocks go to separate accumulators, so two FMA chains overlap.
///
/// # Safety
/// Needs AVX2, FMA and F16C; every `x[r]` has as many blocks as `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `i` indexes the weight's and every input's blocks
unsafe fn dot_q8_0_avx2_rows<const R: usize>(w: &[u8], x: [&[Q8Block]; R]) -> [f32; R] {
    use std::arch::x86_64::*;
    let nb = x.iter().fold(w.len() / 34, |a, r| a.min(r.len()));
    let ones = _mm256_set1_epi16(1);
    let (mut even, mut odd) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let p = w.as_ptr();
    macro_rules! block {
        ($i:expr, $acc:ident) => {{
            let b = p.add($i * 34);
            let qw = _mm256_loadu_si256(b.add(2) as *const __m256i);
            let aw = _mm256_sign_epi8(qw, qw);
            let dw = _mm_cvtss_f32(f16_pair(b));
            for r in 0..R {
                let xb = &x[r][$i];
                let qx = _mm256_load_si256(xb.q.as_ptr() as *const __m256i);
                let s16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(qx, qw));
                let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
                $acc[r] = _mm256_fmadd_ps(s, _mm256_set1_ps(dw * xb.d), $acc[r]);
            }
        }};
    }
    let mut i = 0;
    while i + 2 <= nb {
        block!(i, even);
        block!(i + 1, odd);
        i += 2;
    }
    if i < nb {
        block!(i, even);
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = crate::ops::matvec::hsum256(_mm256_add_ps(even[r], odd[r]));
    }
    out
}

/// The Q4_1 version of [`dot_q8_0_avx2_rows`]; the minimum's term `m * sum(x)` accumulates in
/// lane 1 of a small vector next to the scale's.
///
/// # Safety
/// As there.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // as above
unsafe fn dot_q4_1_avx2_rows<const R: usize>(w: &[u8], x: [&[Q8Block]; R]) -> [f32; R] {
    use std::arch::x86_64::*;
    let nb = x.iter().fold(w.len() / 20, |a, r| a.min(r.len()));
    let ones = _mm256_set1_epi16(1);
    let low = _mm_set1_epi8(15);
    let (mut even, mut odd) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let mut offs = [_mm_setzero_ps(); R];
    let p = w.as_ptr();
    macro_rules! block {
        ($i:expr, $acc:ident) => {{
            let b = p.add($i * 20);
            let raw = _mm_loadu_si128(b.add(4) as *const __m128i);
            let lo = _mm_and_si128(raw, low);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
            let qw = _mm256_set_m128i(hi, lo);
            // lanes: [d, m, 0, 0]
            let dm = f16_pair(b);
            let dw = _mm_cvtss_f32(dm);
            for r in 0..R {
                let xb = &x[r][$i];
                let qx = _mm256_load_si256(xb.q.as_ptr() as *const __m256i);
                let s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), ones);
                $acc[r] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_set1_ps(dw * xb.d), $acc[r]);
                // lane 1: m * (d_x * sum q_x)
                offs[r] = _mm_fmadd_ps(dm, _mm_set1_ps(xb.s), offs[r]);
            }
        }};
    }
    let mut i = 0;
    while i + 2 <= nb {
        block!(i, even);
        block!(i + 1, odd);
        i += 2;
    }
    if i < nb {
        block!(i, even);
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let m = _mm_cvtss_f32(_mm_shuffle_ps(offs[r], offs[r], 1));
        out[r] = crate::ops::matvec::hsum256(_mm256_add_ps(even[r], odd[r])) + m;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn randn(n: usize, k: usize, seed: u64) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..n * k).map(|_| r.random_range(-1.0f32..1.0)).collect();
        Ok(Tensor::from_vec(v, (n, k), &Device::Cpu)?)
    }

    /// The quantized product against the product with the dequantized weight, both kernels.
    #[test]
    fn kernels_match_the_dequantized_product() -> Result<()> {
        for kind in [QKind::Q8_0, QKind::Q4_1] {
            // Even and odd block counts (the kernels pair blocks), one and several input rows.
            for &(m, n, k) in &[
                (1usize, 70usize, 576usize),
                (5, 33, 64),
                (1, 3, 32),
                (1, 7, 96),
                (4, 9, 160),
            ] {
                let w = QWeight::quantize(&randn(n, k, 1)?, kind)?;
                let x = randn(m, k, 2)?;
                let want = x.matmul(&w.dequantize()?.t()?)?;
                let got = w.linear(&x)?;
                let err = ((&got - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()?
                    / want.sqr()?.sum_all()?.to_scalar::<f32>()?)
                .sqrt();
                // Only the input's 8-bit rounding separates them.
                assert!(err < 1.5e-2, "{kind:?} {m}x{n}x{k}: rel err {err}");
                let xv = x.flatten_all()?.to_vec1::<f32>()?;
                let xq: Vec<Q8Block> = xv.chunks_exact(BLOCK).map(quantize_block).collect();
                let nb = k / BLOCK;
                let scalar = match kind {
                    QKind::Q8_0 => dot_q8_0_scalar(w.row(0), &xq[..nb]),
                    QKind::Q4_1 => dot_q4_1_scalar(w.row(0), &xq[..nb]),
                };
                let fast = dot_fn(kind)(w.row(0), &xq[..nb]);
                assert!((scalar - fast).abs() < 1e-3 * (1.0 + scalar.abs()));
            }
        }
        Ok(())
    }

    /// The decoder's row-range product against one row at a time with the scalar kernels.
    #[test]
    fn row_ranges_match_the_scalar_kernels() -> Result<()> {
        for kind in [QKind::Q8_0, QKind::Q4_1] {
            for k in [32, 96, 576] {
                let w = QWeight::quantize(&randn(23, k, 7)?, kind)?;
                let x = randn(1, k, 8)?.flatten_all()?.to_vec1::<f32>()?;
                let mut xq = Vec::new();
                quantize_input(&x, &mut xq);
                for rows in [0..23, 3..10, 5..6, 7..7] {
                    let mut got = vec![f32::NAN; rows.len()];
                    w.dot_rows(&xq, rows.clone(), &mut got);
                    for (j, g) in rows.zip(&got) {
                        let want = match kind {
                            QKind::Q8_0 => dot_q8_0_scalar(w.row(j), &xq),
                            QKind::Q4_1 => dot_q4_1_scalar(w.row(j), &xq),
                        };
                        assert!(
                            (want - g).abs() < 1e-4 * (1.0 + want.abs()),
                            "{kind:?} k {k} row {j}: {g} vs {want}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn vector_and_scalar_activation_quantization_agree() -> Result<()> {
        let mut x = randn(1, 32 * 40, 5)?.flatten_all()?.to_vec1::<f32>()?;
        // An all-zero block, and one whose scaled values are exact halves (ties round to even).
        x[..32].copy_from_slice(&[0.0; 32]);
        for (i, v) in x[32..64].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { i as f32 + 0.5 };
        }
        let mut fast = Vec::new();
        quantize_input(&x, &mut fast);
        for (b, f) in x.chunks_exact(BLOCK).zip(&fast) {
            let s = quantize_block(b);
            assert_eq!((s.q, s.d, s.s), (f.q, f.d, f.s));
            for (&q, &v) in s.q.iter().zip(b) {
                assert!((q as f32 * s.d - v).abs() <= 0.5 * s.d + 1e-6);
            }
        }
        Ok(())
    }

    #[test]
    fn unsupported_types_and_shapes_are_clear_errors() -> Result<()> {
        let err = QKind::from_ggml(GgmlDType::Q4K).unwrap_err().to_string();
        assert!(err.contains("Q8_0 and Q4_1"), "{err}");
        let err = QWeight::from_bytes(QKind::Q8_0, 2, 33, vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("whole 32-element blocks"), "{err}");
        let w = QWeight::quantize(&randn(4, 32, 3)?, QKind::Q8_0)?;
        assert!(w.linear(&randn(1, 64, 4)?).is_err());
        // Embedding rows come from the stored weight (`ops::QuantizedWeight::rows`).
        let stored = crate::ops::QuantizedWeight::quantize(&randn(4, 32, 3)?, GgmlDType::Q8_0)?;
        assert!(stored
            .rows(&Tensor::new(&[9u32], &candle_core::Device::Cpu)?)
            .is_err());
        Ok(())
    }
}
