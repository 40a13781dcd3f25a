//! `y = x W^T` with the weight side in panels of 16 rows: panel `p` holds rows `16p..16p + 16`
//! of `W: [n, k]` as `[k][16]`, so one step of the reduction reads the 16 rows' values in one
//! contiguous 64-byte line.
//!
//! gemm packs its weight operand into such panels itself on every call, one value at a time. A
//! weight that arrives in blocks anyway (a GGUF's quantized rows, dequantized tile by tile) is
//! written straight into panels here, instead of into rows that gemm then packs again; an f32
//! weight's rows are put into panels by eight-wide transposes, tile by tile
//! ([`weight_product`], the forward of every frozen linear layer through `par_gemm`). A base
//! loaded in the inference layout (`BaseStorage::Packed`) keeps its weights as panels, read in
//! place with the next tile fetched meanwhile ([`product_prefetching`]). The 16x6 AVX2 kernel
//! below reads the panels and the activation rows in place. Other CPUs take gemm on the rows.

/// Rows per panel.
pub(crate) const PANEL: usize = 16;

/// Most reduction steps per block: a block of panels (8 x 768 lines of 64 bytes) stays in L2
/// while the token groups pass over it.
const KC: usize = 768;

/// Panels per block (128 weight rows).
const BLOCK_PANELS: usize = 8;

/// Tokens per kernel call.
const NR: usize = 6;

/// Whether the panel kernels run here (x86-64 with AVX2 and FMA).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::exp::avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows `[n, k]` (row-major) written into `ceil(n / 16)` panels of `[k][16]`, the last one's
/// missing rows zero.
pub(crate) fn rows_to_panels(rows: &[f32], k: usize, panels: &mut [f32]) {
    for (rows, panel) in rows.chunks(PANEL * k).zip(panels.chunks_mut(PANEL * k)) {
        rows_to_panel(rows, k, panel);
    }
}

/// Rows `[rows, k]` (row-major, `rows <= 16`) written into one panel `[k][16]`, missing rows
/// zero.
fn rows_to_panel(rows: &[f32], k: usize, panel: &mut [f32]) {
    let n = rows.len() / k.max(1);
    debug_assert!(n <= PANEL && panel.len() >= k * PANEL);
    #[cfg(target_arch = "x86_64")]
    if n == PANEL && available() {
        // SAFETY: AVX2 checked; 16 rows of `k` values in, `k` lines of 16 out.
        unsafe { avx2::transpose_16(rows, k, panel) };
        return;
    }
    if n < PANEL {
        panel[..k * PANEL].iter_mut().for_each(|v| *v = 0.0);
    }
    for (i, row) in rows.chunks_exact(k).enumerate() {
        for (p, &v) in row.iter().enumerate() {
            panel[p * PANEL + i] = v;
        }
    }
}

/// `out[t][j] (+)= sum_p x[t][p] * panel_j[p]` for the `cols <= 16 * panels` columns a run of
/// panels gives, over all `m` rows of `x: [m, k]` (row stride `ldx`): `panels` holds
/// `ceil(cols / 16)` panels of `[k][16]`, `out` has row stride `ldo` and receives columns
/// `0..cols`, written, or increased when `accumulate`.
///
/// gemm's loop order: a group of six tokens (in L1) meets every panel of a block (in L2) before
/// the next group, so each token row is read from memory once per block of panels rather than
/// once per panel (1.05-1.2x the panel-by-panel order, `BENCHMARKS.md`).
///
/// # Safety
/// Needs [`available`]; `out` must be valid for `m` rows of `cols` values at stride `ldo`, and
/// no other thread may touch those values meanwhile.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    x: &[f32],
    (m, k, ldx): (usize, usize, usize),
    panels: &[f32],
    cols: usize,
    out: *mut f32,
    ldo: usize,
    accumulate: bool,
) {
    product_prefetching(x, (m, k, ldx), panels, cols, out, ldo, accumulate, &[])
}

/// [`product`], fetching `ahead` (the weight's next panels, still in memory) into L2 meanwhile,
/// spread over the kernel calls: read only when the first token group gets to them, those panels
/// would keep that group waiting on memory (64 bytes per 192 flops is more than one core's share
/// of the memory bandwidth); the other groups find them in L2.
///
/// # Safety
/// As [`product`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product_prefetching(
    x: &[f32],
    (m, k, ldx): (usize, usize, usize),
    panels: &[f32],
    cols: usize,
    out: *mut f32,
    ldo: usize,
    accumulate: bool,
    ahead: &[f32],
) {
    debug_assert!(k <= ldx && (m == 0 || x.len() >= (m - 1) * ldx + k));
    debug_assert!(panels.len() >= cols.div_ceil(PANEL) * k * PANEL);
    let view = PanelView {
        base: panels.as_ptr(),
        panel_stride: k * PANEL,
        line_stride: PANEL,
    };
    drive::<false>(
        x.as_ptr(),
        (m, k, ldx),
        view,
        cols,
        out,
        ldo,
        accumulate,
        ahead,
    )
}

/// Where the kernel finds panel `p`'s line `i`: `base + p * panel_stride + i * line_stride`.
/// Packed panels have lines of 16 (`line_stride = 16`); a row-major `[k, n]` matrix's rows are
/// panels in place (`panel_stride = 16`, `line_stride` its row stride).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct PanelView {
    base: *const f32,
    panel_stride: usize,
    line_stride: usize,
}

/// `out (+)= x P` over the `cols` columns of the panels `view`, in gemm's loop order (see
/// [`product`]); `x` is `[m, k]` at row stride `ldx`, or, when `XT`, read transposed: its value
/// `(t, p)` at `x[p * ldx + t]`.
///
/// # Safety
/// Needs [`available`]; every view must lie in its buffer, `out` as for [`product`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn drive<const XT: bool>(
    x: *const f32,
    (m, k, ldx): (usize, usize, usize),
    view: PanelView,
    cols: usize,
    out: *mut f32,
    ldo: usize,
    accumulate: bool,
    ahead: &[f32],
) {
    let np = cols.div_ceil(PANEL);
    // Equal reduction blocks of at most KC steps.
    let kc = k.div_ceil(k.div_ceil(KC).max(1)).max(1);
    // Lines of 64 bytes of `ahead` per kernel call, spread over all the calls.
    let mut groups = 0;
    let mut t = 0;
    while t < m {
        t += token_group(m - t);
        groups += 1;
    }
    let calls = (k.div_ceil(kc) * groups * np).max(1);
    let lines = ahead.len().div_ceil(PANEL);
    let per_call = lines.div_ceil(calls);
    let mut fetched = 0;
    let mut kb = 0;
    while kb < k {
        let kl = kc.min(k - kb);
        let first = kb == 0 && !accumulate;
        let mut p0 = 0;
        while p0 < np {
            let p1 = (p0 + BLOCK_PANELS).min(np);
            let mut t = 0;
            while t < m {
                let rows = token_group(m - t);
                let xs = match XT {
                    false => x.add(t * ldx + kb),
                    true => x.add(kb * ldx + t),
                };
                for p in p0..p1 {
                    let n = per_call.min(lines - fetched).min(kl);
                    let pf = match n {
                        0 => (std::ptr::null(), 0),
                        n => (ahead.as_ptr().add(fetched * PANEL), n),
                    };
                    fetched += n;
                    let panel = view.base.add(p * view.panel_stride + kb * view.line_stride);
                    let ls = view.line_stride;
                    let c0 = p * PANEL;
                    let width = PANEL.min(cols - c0);
                    let o = out.add(t * ldo + c0);
                    let kernel: avx2::Kernel = match rows {
                        6 => avx2::kernel::<6, XT>,
                        5 => avx2::kernel::<5, XT>,
                        4 => avx2::kernel::<4, XT>,
                        3 => avx2::kernel::<3, XT>,
                        2 => avx2::kernel::<2, XT>,
                        _ => avx2::kernel::<1, XT>,
                    };
                    kernel(kl, (panel, ls), xs, ldx, o, ldo, width, first, pf);
                }
                t += rows;
            }
            p0 = p1;
        }
        kb += kl;
    }
}

/// Tokens for the next kernel call with `left` tokens to go: six, except that the last 7-9 are
/// split into two calls of 3-5. The kernel's accumulators are its only independent chains of
/// FMAs, and two FMA pipes of 4 cycles' latency need eight of them: a call of 4-6 tokens (8-12
/// accumulators) runs at the kernel's peak, one of 2 tokens at half of it (m = 128 = 21 x 6 + 2).
fn token_group(left: usize) -> usize {
    match left {
        7 | 8 => 4,
        9 => 5,
        _ => NR.min(left),
    }
}

/// `out (+)= x B` for a row-major `B: [k, n]` (row stride `ldb`) whose rows are the panels in
/// place (`n` a multiple of 16): no packing, for operands small enough to stay in cache (the
/// products inside attention). `x` is `[m, k]` at row stride `ldx`, or, when `x_transposed`,
/// its value `(t, p)` is `x[p * ldx + t]`; `out` as for [`product`].
///
/// # Safety
/// Needs [`available`]; `x`, `b` and `out` must hold the shapes described, and no other thread
/// may touch `out`'s values meanwhile.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product_rows(
    x: *const f32,
    x_transposed: bool,
    (m, k, ldx): (usize, usize, usize),
    (b, ldb, n): (*const f32, usize, usize),
    (out, ldo): (*mut f32, usize),
    accumulate: bool,
) {
    debug_assert!(n.is_multiple_of(PANEL) && ldb >= n);
    let view = PanelView {
        base: b,
        panel_stride: PANEL,
        line_stride: ldb,
    };
    match x_transposed {
        false => drive::<false>(x, (m, k, ldx), view, n, out, ldo, accumulate, &[]),
        true => drive::<true>(x, (m, k, ldx), view, n, out, ldo, accumulate, &[]),
    }
}

/// Rows `[n, k]` at row stride `ld` written into `ceil(n / 16)` panels of `[k][16]` (as
/// [`rows_to_panels`]), the last one's missing rows zero.
///
/// # Safety
/// Needs [`available`]; `src` must hold `n` rows of `k` values `ld` apart.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn strided_rows_to_panels(
    src: *const f32,
    (n, k, ld): (usize, usize, usize),
    panels: &mut [f32],
) {
    assert!(panels.len() >= n.div_ceil(PANEL) * PANEL * k);
    for (p, panel) in panels
        .chunks_mut(PANEL * k)
        .take(n.div_ceil(PANEL))
        .enumerate()
    {
        let rows = PANEL.min(n - p * PANEL);
        let at = src.add(p * PANEL * ld);
        if rows == PANEL {
            avx2::transpose_16_strided(at, ld, k, panel.as_mut_ptr());
            continue;
        }
        panel.iter_mut().for_each(|v| *v = 0.0);
        for i in 0..rows {
            for c in 0..k {
                panel[c * PANEL + i] = *at.add(i * ld + c);
            }
        }
    }
}

/// `out (+)= x W^T` for `x: [m, k]` (row stride `ldx`) and a row-major weight `W: [n, k]`:
/// the weight's rows are put into panels tile by tile (up to 128 rows, one task each, split over
/// the pool when `parallel`) and run through [`product`]. gemm packs the same rows itself on every
/// call, gathering one value at a time; the transposes here are eight-wide, and the kernel's
/// order suits a weight that is read once per call (`BENCHMARKS.md`).
///
/// # Safety
/// Needs [`available`]; `x` must hold `m` rows at stride `ldx >= k`, `w` `n * k` values, and
/// `out` must be valid for `m` rows of `n` values at stride `ldo` that no other thread touches
/// meanwhile.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn weight_product(
    x: &[f32],
    (m, k, ldx): (usize, usize, usize),
    w: &[f32],
    n: usize,
    out: *mut f32,
    ldo: usize,
    accumulate: bool,
    parallel: bool,
) {
    use rayon::prelude::*;
    use std::cell::RefCell;
    thread_local! {
        // One tile's panels per thread, kept between calls: a fresh buffer per task would be
        // mapped and zeroed by the kernel again and again.
        static PANELS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    debug_assert!(w.len() >= n * k);
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let tile_rows = n
        .div_ceil(threads * 4)
        .next_multiple_of(PANEL)
        .clamp(PANEL, TILE_ROWS);
    let out = out as usize;
    let tile = |i: usize| {
        let r0 = i * tile_rows;
        let r = tile_rows.min(n - r0);
        let len = r.div_ceil(PANEL) * PANEL * k;
        PANELS.with_borrow_mut(|panels| {
            if panels.len() < len {
                panels.resize(len, 0.0);
            }
            rows_to_panels(&w[r0 * k..(r0 + r) * k], k, panels);
            // SAFETY: AVX2 and the shapes are the caller's; this tile writes only the columns
            // r0..r0 + r of `out`.
            unsafe {
                product(
                    x,
                    (m, k, ldx),
                    &panels[..len],
                    r,
                    (out as *mut f32).add(r0),
                    ldo,
                    accumulate,
                )
            };
        });
    };
    let tiles = n.div_ceil(tile_rows);
    if threads == 1 {
        (0..tiles).for_each(tile);
    } else {
        (0..tiles).into_par_iter().for_each(tile);
    }
}

/// Weight rows per tile of [`weight_product`]: eight panels, a block of [`product`].
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = PANEL * BLOCK_PANELS;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::PANEL;

    /// 16 rows of `k` values into `k` lines of 16, eight columns at a time by 8x8 register
    /// transposes.
    ///
    /// # Safety
    /// Needs AVX2; `rows` holds `16 * k` values, `panel` at least `16 * k`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transpose_16(rows: &[f32], k: usize, panel: &mut [f32]) {
        transpose_16_strided(rows.as_ptr(), k, k, panel.as_mut_ptr())
    }

    /// [`transpose_16`] for rows `ld` apart.
    ///
    /// # Safety
    /// Needs AVX2; `src` holds 16 rows of `k` values `ld` apart, `dst` room for `16 * k`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transpose_16_strided(src: *const f32, ld: usize, k: usize, dst: *mut f32) {
        let full = k / 8 * 8;
        for c in (0..full).step_by(8) {
            for half in 0..2 {
                let r = |i: usize| _mm256_loadu_ps(src.add((half * 8 + i) * ld + c));
                let t = tr8([r(0), r(1), r(2), r(3), r(4), r(5), r(6), r(7)]);
                for (j, v) in t.iter().enumerate() {
                    _mm256_storeu_ps(dst.add((c + j) * PANEL + half * 8), *v);
                }
            }
        }
        for c in full..k {
            for i in 0..PANEL {
                *dst.add(c * PANEL + i) = *src.add(i * ld + c);
            }
        }
    }

    /// Transpose of an 8x8 block held as 8 rows.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tr8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// A [`kernel`] for some number of tokens.
    pub(super) type Kernel = unsafe fn(
        usize,
        (*const f32, usize),
        *const f32,
        usize,
        *mut f32,
        usize,
        usize,
        bool,
        (*const f32, usize),
    );

    /// `R` tokens against one panel over `kl` steps: `o[r][0..width]` (row stride `ldo`) set to
    /// the sums when `first`, else increased by them. The panel's lines of 16 floats are `ls`
    /// apart; token `r`'s value `p` is `x[r * ldx + p]`, or `x[p * ldx + r]` when `XT`.
    /// Meanwhile the `pf.1 <= kl` lines of 64 bytes at `pf.0` are fetched into L2, one every
    /// `kl / pf.1` steps (a burst of them would stall the loads on the core's few outstanding
    /// misses).
    ///
    /// # Safety
    /// Needs AVX2 and FMA; `panel` holds `kl` lines of 16 floats `ls` apart, `x` `R` tokens of
    /// `kl` values, `o` `R` rows of `width <= 16` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel<const R: usize, const XT: bool>(
        kl: usize,
        (panel, ls): (*const f32, usize),
        x: *const f32,
        ldx: usize,
        o: *mut f32,
        ldo: usize,
        width: usize,
        first: bool,
        pf: (*const f32, usize),
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut step = |p: usize| {
            let w0 = _mm256_loadu_ps(panel.add(p * ls));
            let w1 = _mm256_loadu_ps(panel.add(p * ls + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let at = match XT {
                    false => r * ldx + p,
                    true => p * ldx + r,
                };
                let b = _mm256_broadcast_ss(&*x.add(at));
                a[0] = _mm256_fmadd_ps(w0, b, a[0]);
                a[1] = _mm256_fmadd_ps(w1, b, a[1]);
            }
        };
        let (lines, stride) = match pf.1 {
            0 => (0, kl),
            n => (n, kl / n),
        };
        for l in 0..lines {
            _mm_prefetch::<_MM_HINT_T1>(pf.0.add(l * PANEL) as *const i8);
            for p in l * stride..(l + 1) * stride {
                step(p);
            }
        }
        for p in lines * stride..kl {
            step(p);
        }
        for (r, a) in acc.iter().enumerate() {
            let dst = o.add(r * ldo);
            if width == PANEL {
                let (d0, d1) = (dst, dst.add(8));
                let (mut v0, mut v1) = (a[0], a[1]);
                if !first {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(d0));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(d1));
                }
                _mm256_storeu_ps(d0, v0);
                _mm256_storeu_ps(d1, v1);
            } else {
                let mut lanes = [0f32; PANEL];
                _mm256_storeu_ps(lanes.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), a[1]);
                for (j, &v) in lanes[..width].iter().enumerate() {
                    let d = dst.add(j);
                    *d = if first { v } else { *d + v };
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// `x W^T` in f64 for `x` rows at stride `ldx`.
    fn plain(x: &[f32], (m, k, ldx): (usize, usize, usize), w: &[f32], n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for t in 0..m {
            for j in 0..n {
                y[t * n + j] = (0..k)
                    .map(|p| x[t * ldx + p] as f64 * w[j * k + p] as f64)
                    .sum();
            }
        }
        y
    }

    /// Token groups cover every count exactly, none wider than the kernel, and from three tokens
    /// on none narrower than three.
    #[test]
    fn token_groups_cover_the_tokens_in_wide_calls() {
        for m in 1..200 {
            let mut groups = vec![];
            let mut t = 0;
            while t < m {
                let g = token_group(m - t);
                assert!((1..=NR).contains(&g), "{m} tokens: a group of {g}");
                groups.push(g);
                t += g;
            }
            assert_eq!(t, m);
            if m >= 3 {
                assert!(groups.iter().all(|&g| g >= 3), "{m} tokens: {groups:?}");
            }
        }
        assert_eq!(token_group(8), 4);
    }

    /// Every token count (kernel widths 1 to 6 and their mixtures), partial last panels, more
    /// panels than a block, reductions split into several blocks, token rows wider than the
    /// reduction, written and accumulated outputs: all agree with a plain f64 product, and no
    /// column past the output is touched.
    #[test]
    fn panels_give_the_plain_product() {
        if !available() {
            eprintln!("no AVX2/FMA here: the panel kernels are not used on this CPU");
            return;
        }
        for &(m, n, k, ldx) in &[
            (1, 16, 7, 7),
            (5, 20, 300, 303),
            (13, 37, 513, 513),
            (64, 48, 64, 64),
            (7, 3, 1, 2),
            (9, 150, 1600, 1601),
            (2, 40, 33, 35),
            (8, 17, 20, 20),
        ] {
            let x = data(m * ldx, 1);
            let w = data(n * k, 2);
            let mut panels = vec![1f32; n.div_ceil(PANEL) * k * PANEL];
            rows_to_panels(&w, k, &mut panels);
            let want = plain(&x, (m, k, ldx), &w, n);
            for accumulate in [false, true] {
                // A wider output: columns past `n` must stay untouched.
                let ldo = n + 3;
                let mut out = vec![7f32; m * ldo];
                let dims = (m, k, ldx);
                unsafe { product(&x, dims, &panels, n, out.as_mut_ptr(), ldo, accumulate) };
                let base = if accumulate { 7.0 } else { 0.0 };
                for t in 0..m {
                    for j in 0..ldo {
                        let got = out[t * ldo + j];
                        if j >= n {
                            assert_eq!(got, 7.0, "column {j} past the output was written");
                            continue;
                        }
                        let want = base + want[t * n + j];
                        let tol = 1e-5 * (k as f64).sqrt();
                        assert!(
                            (got as f64 - want).abs() < tol,
                            "[{m}, {n}, {k}] acc {accumulate} at ({t}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Rows of a row-major `B: [k, n]` read in place as panels, with `x` in rows or read
    /// transposed, give the plain product `x B` (written or accumulated; reductions longer than
    /// a block, every token count up to two groups); strided rows packed into panels give the
    /// plain `x W^T`, the last panel's missing rows zero.
    #[test]
    fn rows_in_place_and_strided_panels_give_the_plain_product() {
        if !available() {
            eprintln!("no AVX2/FMA here: the panel kernels are not used on this CPU");
            return;
        }
        for &(m, n, k) in &[(1, 16, 5), (7, 64, 33), (13, 32, 1000), (32, 48, 128)] {
            let (ldb, ldx) = (n + 8, k + 3);
            let b = data(k * ldb, 5);
            let x = data(m * ldx, 6);
            // x^T stored as [k, m] with row stride m + 2.
            let ldt = m + 2;
            let mut xt = vec![0f32; k * ldt];
            for t in 0..m {
                for p in 0..k {
                    xt[p * ldt + t] = x[t * ldx + p];
                }
            }
            let want: Vec<f64> = (0..m * n)
                .map(|i| {
                    let (t, j) = (i / n, i % n);
                    (0..k)
                        .map(|p| x[t * ldx + p] as f64 * b[p * ldb + j] as f64)
                        .sum()
                })
                .collect();
            for (transposed, accumulate) in [(false, false), (true, false), (false, true)] {
                let ldo = n + 1;
                let mut out = vec![3f32; m * ldo];
                let (xp, lx) = match transposed {
                    false => (x.as_ptr(), ldx),
                    true => (xt.as_ptr(), ldt),
                };
                unsafe {
                    product_rows(
                        xp,
                        transposed,
                        (m, k, lx),
                        (b.as_ptr(), ldb, n),
                        (out.as_mut_ptr(), ldo),
                        accumulate,
                    )
                };
                let base = if accumulate { 3.0 } else { 0.0 };
                for t in 0..m {
                    assert_eq!(out[t * ldo + n], 3.0, "column past the output written");
                    for j in 0..n {
                        let (got, want) = (out[t * ldo + j] as f64, base + want[t * n + j]);
                        assert!(
                            (got - want).abs() < 1e-5 * (k as f64).sqrt(),
                            "[{m}, {n}, {k}] xt {transposed} acc {accumulate} ({t}, {j})"
                        );
                    }
                }
            }
        }
        // Strided rows (every panel fill: full panels by transposes, a partial last one).
        for &(rows, k) in &[(16, 8), (37, 64), (5, 3), (32, 21)] {
            let ld = k + 11;
            let src = data(rows * ld, 7);
            let mut panels = vec![9f32; rows.div_ceil(PANEL) * PANEL * k];
            unsafe { strided_rows_to_panels(src.as_ptr(), (rows, k, ld), &mut panels) };
            for p in 0..rows.div_ceil(PANEL) {
                for c in 0..k {
                    for i in 0..PANEL {
                        let r = p * PANEL + i;
                        let want = if r < rows { src[r * ld + c] } else { 0.0 };
                        assert_eq!(panels[(p * k + c) * PANEL + i], want, "{rows}x{k} row {r}");
                    }
                }
            }
        }
    }

    /// The tiled weight product on one thread and split over a pool (tiles of every size, a
    /// last partial panel) equals the plain product, written or accumulated.
    #[test]
    fn weight_tiles_give_the_plain_product() {
        if !available() {
            eprintln!("no AVX2/FMA here: the panel kernels are not used on this CPU");
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for &(m, n, k) in &[(8, 32, 16), (37, 301, 70), (20, 1000, 40)] {
            let ldx = k + 5;
            let x = data(m * ldx, 3);
            let w = data(n * k, 4);
            let want = plain(&x, (m, k, ldx), &w, n);
            for (parallel, accumulate) in [(false, false), (true, false), (true, true)] {
                let mut out = vec![2f32; m * n];
                pool.install(|| unsafe {
                    weight_product(
                        &x,
                        (m, k, ldx),
                        &w,
                        n,
                        out.as_mut_ptr(),
                        n,
                        accumulate,
                        parallel,
                    )
                });
                let base = if accumulate { 2.0 } else { 0.0 };
                for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - base - want).abs() < 1e-4,
                        "[{m}, {n}, {k}] parallel {parallel} acc {accumulate} at {i}: {got}"
                    );
                }
            }
        }
    }
}
