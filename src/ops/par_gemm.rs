//! Matrix products split across the rayon pool: each thread runs a whole single-threaded gemm on
//! its share of the output.
//!
//! candle's CPU matmul hands one call to gemm's own `Parallelism::Rayon`, which on this project's
//! 2-core machine scales poorly at training-step sizes (1024 x 384 x 384 to 512 x 1536 x 576:
//! 1.2-1.6x a single thread where MKL gets 2x; see BENCHMARKS.md), and it zero-fills its output
//! before gemm overwrites it. Here the output is split into as many row (or column) bands as the
//! pool has threads, so the threads never synchronise inside a product, and the output is written
//! once.

use candle_core::{bail, Layout, Result, WithDType};
use rayon::prelude::*;

/// Whether products go through here: `METAPEFT_PAR_GEMM=0` hands them to candle's matmul (for
/// A/B timing).
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("METAPEFT_PAR_GEMM").map_or(true, |v| v != "0"))
}

/// A read-only matrix view: element `(i, j)` is `data[offset + i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a, T> {
    pub data: &'a [T],
    pub offset: usize,
    pub rs: isize,
    pub cs: isize,
}

impl<'a, T> Strided<'a, T> {
    /// A row-major `[rows, cols]` matrix starting at `offset`.
    pub fn row_major(data: &'a [T], offset: usize, cols: usize) -> Self {
        Self {
            data,
            offset,
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major `[rows, cols]` matrix starting at `offset`, read in place.
    pub fn transposed(data: &'a [T], offset: usize, cols: usize) -> Self {
        Self {
            data,
            offset,
            rs: 1,
            cs: cols as isize,
        }
    }

    /// The 2-d view a candle layout describes over `data`.
    pub fn from_layout(data: &'a [T], l: &Layout) -> Result<Self> {
        let [rs, cs] = l.stride() else {
            bail!("par_gemm: expected a 2-d layout, got {:?}", l.dims());
        };
        Ok(Self {
            data,
            offset: l.start_offset(),
            rs: *rs as isize,
            cs: *cs as isize,
        })
    }

    /// Highest element index the view reaches for `[rows, cols]` (bounds check before gemm).
    fn reach(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            return self.offset;
        }
        self.offset + (rows - 1) * self.rs as usize + (cols - 1) * self.cs as usize
    }
}

/// Whether f32 products against a row-major weight go through [`super::panel_gemm`]:
/// `METAPEFT_PANEL_GEMM=0` leaves them to gemm (for A/B timing).
#[cfg(target_arch = "x86_64")]
fn panels_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("METAPEFT_PANEL_GEMM").map_or(true, |v| v != "0"))
}

/// `lhs` as f32 rows and `rhs`'s transpose as a contiguous row-major f32 weight `[n, k]`, when
/// the product is `x W^T` of that kind (the forward of a linear layer) and big enough for the
/// panel kernel; `None` sends it to gemm. Products scaled by anything but 1 stay with gemm.
#[cfg(target_arch = "x86_64")]
fn weight_operands<'a, T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    beta: T,
    lhs: &Strided<'a, T>,
    rhs: &Strided<'a, T>,
) -> Option<(&'a [f32], &'a [f32])> {
    let fits = T::DTYPE == candle_core::DType::F32
        && beta == T::one()
        && lhs.cs == 1
        && lhs.rs as usize >= k
        && rhs.rs == 1
        && rhs.cs as usize == k
        && m >= 8
        && n >= 32
        && k >= 16;
    if !fits || !super::panel_gemm::available() || !panels_enabled() {
        return None;
    }
    let (x, w) = (super::as_f32(lhs.data)?, super::as_f32(rhs.data)?);
    Some((&x[lhs.offset..], &w[rhs.offset..rhs.offset + n * k]))
}

/// Below this many multiply-adds a product runs on the calling thread: waking another worker
/// costs about as much as the work it would take over.
const PARALLEL_MIN_MACS: usize = 1 << 22;

/// `lhs [m, k] x rhs [k, n]` as a new row-major `[m, n]` buffer.
pub(crate) fn matmul<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    lhs: Strided<'_, T>,
    rhs: Strided<'_, T>,
) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(m * n);
    // SAFETY: `out` has room for `m * n` elements, every one of which gemm writes (it does not
    // read the destination when told not to); the length is set only afterwards.
    unsafe {
        product(m, n, k, out.as_mut_ptr(), n, (false, T::one()), lhs, rhs)?;
        out.set_len(m * n);
    }
    Ok(out)
}

/// `dst = lhs [m, k] x rhs [k, n]` into the first `m * n` values of `dst` (row-major), whatever
/// they held.
pub(crate) fn matmul_to<T: WithDType>(
    dst: &mut [T],
    (m, n, k): (usize, usize, usize),
    lhs: Strided<'_, T>,
    rhs: Strided<'_, T>,
) -> Result<()> {
    if dst.len() < m * n {
        bail!(
            "par_gemm: destination of {} elements for [{m}, {n}]",
            dst.len()
        );
    }
    // SAFETY: `dst` holds `[m, n]` row-major, checked above.
    unsafe { product(m, n, k, dst.as_mut_ptr(), n, (false, T::one()), lhs, rhs) }
}

/// `dst += beta * lhs [m, k] x rhs [k, n]` for a row-major `dst: [m, n]`.
pub(crate) fn matmul_acc<T: WithDType>(
    dst: &mut [T],
    (m, n, k): (usize, usize, usize),
    lhs: Strided<'_, T>,
    rhs: Strided<'_, T>,
    beta: T,
) -> Result<()> {
    if dst.len() < m * n {
        bail!(
            "par_gemm: destination of {} elements for [{m}, {n}]",
            dst.len()
        );
    }
    // SAFETY: `dst` holds `[m, n]` row-major, checked above.
    unsafe { product(m, n, k, dst.as_mut_ptr(), n, (true, beta), lhs, rhs) }
}

/// `dst = (read_dst ? dst : 0) + beta * lhs x rhs`, the output split into bands over the pool.
///
/// # Safety
/// `dst` must be valid for writes (and for reads when `read_dst`) of `[m, n]` with row stride
/// `dst_rs` and unit column stride.
#[allow(clippy::too_many_arguments)]
unsafe fn product<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    (read_dst, beta): (bool, T),
    lhs: Strided<'_, T>,
    rhs: Strided<'_, T>,
) -> Result<()> {
    if lhs.rs < 0 || lhs.cs < 0 || rhs.rs < 0 || rhs.cs < 0 {
        bail!("par_gemm: negative strides");
    }
    if k > 0 && (lhs.reach(m, k) >= lhs.data.len() || rhs.reach(k, n) >= rhs.data.len()) {
        bail!("par_gemm: a matrix view runs past its buffer");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !read_dst {
            for i in 0..m {
                std::ptr::write_bytes(dst.add(i * dst_rs), 0, n);
            }
        }
        return Ok(());
    }
    let parallel = m * n * k >= PARALLEL_MIN_MACS;
    #[cfg(target_arch = "x86_64")]
    if let Some((x, w)) = weight_operands(m, n, k, beta, &lhs, &rhs) {
        // SAFETY: the views were bounds-checked above; `dst` is the caller's `[m, n]`.
        unsafe {
            super::panel_gemm::weight_product(
                x,
                (m, k, lhs.rs as usize),
                w,
                n,
                dst as *mut f32,
                dst_rs,
                read_dst,
                parallel,
            )
        };
        return Ok(());
    }
    // Bands along the longer output side, each a multiple of gemm's 16-wide register tile.
    let threads = rayon::current_num_threads();
    let (long, tile) = (m.max(n), 16);
    let bands = if !parallel {
        1
    } else {
        threads.min(long.div_ceil(tile)).max(1)
    };
    let band = long.div_ceil(bands).div_ceil(tile) * tile;
    let split_rows = m >= n;
    let (dst_addr, lhs_addr, rhs_addr) = (
        dst as usize,
        lhs.data.as_ptr().add(lhs.offset) as usize,
        rhs.data.as_ptr().add(rhs.offset) as usize,
    );
    let run = |b: usize| {
        let start = b * band;
        if start >= long {
            return;
        }
        let len = band.min(long - start);
        let (mm, nn, d, l, r) = if split_rows {
            (
                len,
                n,
                dst_addr as *mut T as usize + start * dst_rs * std::mem::size_of::<T>(),
                lhs_addr + start * lhs.rs as usize * std::mem::size_of::<T>(),
                rhs_addr,
            )
        } else {
            (
                m,
                len,
                dst_addr + start * std::mem::size_of::<T>(),
                lhs_addr,
                rhs_addr + start * rhs.cs as usize * std::mem::size_of::<T>(),
            )
        };
        // SAFETY: the bands are disjoint parts of `dst`; the views were bounds-checked above.
        unsafe {
            gemm::gemm(
                mm,
                nn,
                k,
                d as *mut T,
                1,
                dst_rs as isize,
                read_dst,
                l as *const T,
                lhs.cs,
                lhs.rs,
                r as *const T,
                rhs.cs,
                rhs.rs,
                T::one(),
                beta,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    if bands == 1 {
        run(0);
    } else {
        (0..bands).into_par_iter().for_each(run);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &Strided<f64>, b: &Strided<f64>) -> Vec<f64> {
        let at = |v: &Strided<f64>, i: usize, j: usize| {
            v.data[v.offset + i * v.rs as usize + j * v.cs as usize]
        };
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| at(a, i, p) * at(b, p, j)).sum();
            }
        }
        out
    }

    fn data(len: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f64 / (1u64 << 31) as f64) - 0.5
            })
            .collect()
    }

    #[test]
    fn bands_match_a_naive_product_in_every_orientation() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        // Shapes large enough to be split (tall, wide, ragged bands), and one small.
        for &(m, n, k) in &[(300, 40, 400), (40, 300, 400), (257, 255, 70), (5, 7, 3)] {
            let a = data(m * k + 3, 1);
            let b = data(k * n + 5, 2);
            for a_t in [false, true] {
                for b_t in [false, true] {
                    let av = if a_t {
                        Strided::transposed(&a, 3, m)
                    } else {
                        Strided::row_major(&a, 3, k)
                    };
                    let bv = if b_t {
                        Strided::transposed(&b, 5, k)
                    } else {
                        Strided::row_major(&b, 5, n)
                    };
                    let want = naive(m, n, k, &av, &bv);
                    let got = pool.install(|| matmul((m, n, k), av, bv))?;
                    let mut acc = vec![1.0; m * n];
                    pool.install(|| matmul_acc(&mut acc, (m, n, k), av, bv, 0.5))?;
                    for i in 0..m * n {
                        assert!((got[i] - want[i]).abs() < 1e-9, "{m}x{n}x{k} at {i}");
                        let off = acc[i] - 1.0 - 0.5 * want[i];
                        assert!(off.abs() < 1e-9, "acc {m}x{n}x{k} at {i}");
                    }
                }
            }
        }
        Ok(())
    }

    /// f32 products of the linear-layer kind (`x W^T`, row-major weight) go through the panel
    /// kernel: written and accumulated, row offsets and strides, small (one thread) and split,
    /// and the shapes left to gemm (scaled, too small, weights not in plain rows), all equal
    /// to a plain product.
    #[test]
    fn f32_weight_products_match_a_naive_product() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        for &(m, n, k) in &[(512, 200, 64), (9, 40, 16), (4, 64, 32), (130, 33, 600)] {
            let (lda, a) = (k + 3, f32s(data(m * (k + 3) + 2, 5)));
            let b = f32s(data(n * k + 1, 6));
            let av = Strided {
                data: &a,
                offset: 2,
                rs: lda as isize,
                cs: 1,
            };
            let weight = Strided::transposed(&b, 1, k);
            let rows = Strided::row_major(&b, 1, n);
            let (a64, b64): (Vec<f64>, Vec<f64>) = (
                a.iter().map(|&x| x as f64).collect(),
                b.iter().map(|&x| x as f64).collect(),
            );
            fn to64<'d>(v: &Strided<f32>, data: &'d [f64]) -> Strided<'d, f64> {
                Strided {
                    data,
                    offset: v.offset,
                    rs: v.rs,
                    cs: v.cs,
                }
            }
            for bv in [weight, rows] {
                let want = naive(m, n, k, &to64(&av, &a64), &to64(&bv, &b64));
                let got = pool.install(|| matmul((m, n, k), av, bv))?;
                for beta in [1.0f32, 0.5] {
                    let mut acc = vec![1f32; m * n];
                    pool.install(|| matmul_acc(&mut acc, (m, n, k), av, bv, beta))?;
                    for i in 0..m * n {
                        let tol = 1e-4 * (k as f64).sqrt();
                        assert!((got[i] as f64 - want[i]).abs() < tol, "{m}x{n}x{k} at {i}");
                        let off = acc[i] as f64 - 1.0 - beta as f64 * want[i];
                        assert!(off.abs() < tol, "acc {beta} {m}x{n}x{k} at {i}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_view_past_its_buffer_is_an_error() {
        let a = vec![0f32; 10];
        let v = Strided::row_major(&a, 0, 4);
        assert!(matmul((3, 4, 4), v, v).is_err());
    }
}
