//! `y = x W^T` for a few rows of `x` (decoding): the weight is streamed once, split over rayon
//! threads by output rows, each row dotted with every input row while it is in L1.
//!
//! The `gemm` crate packs both operands for every call and is poor at `m = 1`, where a decode
//! step is bound by memory bandwidth (every weight byte is read once per token).

use rayon::prelude::*;

/// Inputs with at most this many rows take the matrix-vector path.
pub(crate) const MAX_ROWS: usize = 8;

/// Whether the path is on: `METAPEFT_MATVEC=0` turns it off (for A/B timing against gemm).
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("METAPEFT_MATVEC").map_or(true, |v| v != "0"))
}

/// Output rows handed to one rayon task.
const ROWS_PER_TASK: usize = 64;

/// `out[i * n + j] = dot(x[i * k..], w[j * k..])` for `x: [m, k]`, `w: [n, k]`, `m <= MAX_ROWS`.
pub(crate) fn matvec_f32(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, out: &mut [f32]) {
    debug_assert!(m <= MAX_ROWS && x.len() == m * k && w.len() == n * k && out.len() == m * n);
    let dot = dot_fn();
    if m == 1 {
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(c, o)| {
                let j0 = c * ROWS_PER_TASK;
                for (jj, y) in o.iter_mut().enumerate() {
                    let j = j0 + jj;
                    *y = dot(x, &w[j * k..(j + 1) * k]);
                }
            });
        return;
    }
    // Several rows: compute `[n, m]` in parallel (contiguous per task), then transpose.
    let mut t = vec![0f32; n * m];
    t.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(c, o)| {
            let j0 = c * ROWS_PER_TASK;
            for (jj, ys) in o.chunks_mut(m).enumerate() {
                let wr = &w[(j0 + jj) * k..(j0 + jj + 1) * k];
                for (i, y) in ys.iter_mut().enumerate() {
                    *y = dot(&x[i * k..(i + 1) * k], wr);
                }
            }
        });
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = t[j * m + i];
        }
    }
}

pub(crate) type DotFn = fn(&[f32], &[f32]) -> f32;

/// `out[i] = W[rows.start + i] . x` for a weight `W: [n, k]` kept in 16-row panels (the layout of
/// `ops::panel_gemm`: panel `p` is `[k][16]`, rows `16p..16p + 16`): every panel that `rows`
/// touches is read once, whole, as one linear stream, and its 16 sums kept where `rows` wants
/// them.
pub(crate) fn panel_rows(
    w: &[f32],
    k: usize,
    x: &[f32],
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    use super::panel_gemm::PANEL;
    let x = &x[..k];
    for p in rows.start / PANEL..rows.end.div_ceil(PANEL) {
        let panel = &w[p * PANEL * k..(p + 1) * PANEL * k];
        let sums = panel_dot(panel, x);
        for (i, s) in sums.iter().enumerate() {
            let j = p * PANEL + i;
            if rows.contains(&j) {
                out[j - rows.start] = *s;
            }
        }
    }
}

/// The 16 sums `panel[.][i] . x` of one panel `[k][16]`: the panel kernel with one token.
fn panel_dot(panel: &[f32], x: &[f32]) -> [f32; 16] {
    let mut out = [0f32; 16];
    #[cfg(target_arch = "x86_64")]
    if super::panel_gemm::available() {
        let k = x.len();
        assert!(panel.len() >= k * 16);
        // SAFETY: AVX2 and FMA were checked; one row of `k` values against one whole panel,
        // written into 16 values.
        unsafe { super::panel_gemm::product(x, (1, k, k), panel, 16, out.as_mut_ptr(), 16, false) };
        return out;
    }
    for (line, &v) in panel.chunks_exact(16).zip(x) {
        for (a, &w) in out.iter_mut().zip(line) {
            *a += v * w;
        }
    }
    out
}

pub(crate) fn dot_fn() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return dot_avx2;
        }
    }
    dot_scalar
}

/// `x . w` with a half-precision `w` widened on the fly (decoding from a bf16/f16 base).
pub(crate) type DotHalfFn<H> = fn(&[f32], &[H]) -> f32;

pub(crate) fn dot_bf16_fn() -> DotHalfFn<half::bf16> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just checked.
            return |x, w| unsafe { dot_bf16_avx2(x, w) };
        }
    }
    |x, w| x.iter().zip(w).map(|(a, b)| a * b.to_f32()).sum()
}

pub(crate) fn dot_f16_fn() -> DotHalfFn<half::f16> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features were just checked.
            return |x, w| unsafe { dot_f16_avx2(x, w) };
        }
    }
    |x, w| x.iter().zip(w).map(|(a, b)| a * b.to_f32()).sum()
}

/// bf16 is the top half of an f32: widening is a 16-bit shift.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(a: &[f32], b: &[half::bf16]) -> f32 {
    use std::arch::x86_64::*;
    dot_widened(a, b, |p| {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(a: &[f32], b: &[half::f16]) -> f32 {
    use std::arch::x86_64::*;
    dot_widened(a, b, |p| {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    })
}

/// `a . b` for 16-bit `b`, `widen` turning 8 of its elements at a pointer into f32 lanes.
/// Inlined into the callers above, so it is compiled with their target features.
///
/// # Safety
/// The callers' features are present; `H` is a 16-bit float.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_widened<H: Copy + Into<f32>>(
    a: &[f32],
    b: &[H],
    widen: impl Fn(*const u16) -> std::arch::x86_64::__m256,
) -> f32 {
    use std::arch::x86_64::*;
    let k = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr() as *const u16);
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= k {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), widen(pb.add(i)), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), widen(pb.add(i + 8)), s1);
        i += 16;
    }
    let mut s = hsum256(_mm256_add_ps(s0, s1));
    while i < k {
        s += a[i] * b[i].into();
        i += 1;
    }
    s
}

/// Portable dot product (8 independent sums, so the compiler can vectorise it).
pub(crate) fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: chosen by `dot_fn` only when AVX2 and FMA are present.
    unsafe { dot_avx2_impl(a, b) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_impl(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let k = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= k {
        for (l, s) in acc.iter_mut().enumerate() {
            let o = i + 8 * l;
            *s = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *s);
        }
        i += 32;
    }
    while i + 8 <= k {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let s = hsum256(s);
    let mut tail = 0f32;
    while i < k {
        tail += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    s + tail
}

/// Horizontal sum of 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any range of rows of a panel-packed weight (37 rows: a partial last panel; ranges that
    /// start and end inside panels; odd and even `k`) gets each row's dot product.
    #[test]
    fn panel_rows_are_the_rows_dot_products() {
        for k in [1, 7, 64, 77] {
            let (n, x) = (37, data(k, 3));
            let w = data(n * k, 5);
            let mut panels = vec![0f32; n.next_multiple_of(16) * k];
            super::super::panel_gemm::rows_to_panels(&w, k, &mut panels);
            for rows in [0..37, 3..20, 16..32, 30..37, 5..6, 9..9] {
                let mut out = vec![f32::NAN; rows.len()];
                panel_rows(&panels, k, &x, rows.clone(), &mut out);
                for (j, got) in rows.clone().zip(&out) {
                    let want: f32 = x
                        .iter()
                        .zip(&w[j * k..(j + 1) * k])
                        .map(|(a, b)| a * b)
                        .sum();
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "k {k}, rows {rows:?}, row {j}: {got} vs {want}"
                    );
                }
            }
        }
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_naive_product() {
        for &(m, n, k) in &[(1, 200, 576), (3, 130, 37), (1, 1, 5), (8, 65, 1536)] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let mut out = vec![0f32; m * n];
            matvec_f32(&x, m, &w, n, k, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                        .sum();
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{got} {want}"
                    );
                }
            }
            let s = dot_scalar(&x[..k], &w[..k]);
            assert!((s - out[0]).abs() < 1e-3 * (1.0 + s.abs()));
            // Half-precision weights against the same dot on their widened values.
            let wb: Vec<half::bf16> = w[..k].iter().map(|&v| half::bf16::from_f32(v)).collect();
            let wh: Vec<half::f16> = w[..k].iter().map(|&v| half::f16::from_f32(v)).collect();
            let want_b = dot_scalar(&x[..k], &wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>());
            let want_h = dot_scalar(&x[..k], &wh.iter().map(|v| v.to_f32()).collect::<Vec<_>>());
            let (got_b, got_h) = (dot_bf16_fn()(&x[..k], &wb), dot_f16_fn()(&x[..k], &wh));
            assert!(
                (got_b - want_b).abs() < 1e-4 * (1.0 + want_b.abs()),
                "{got_b} {want_b}"
            );
            assert!(
                (got_h - want_h).abs() < 1e-4 * (1.0 + want_h.abs()),
                "{got_h} {want_h}"
            );
        }
    }
}
