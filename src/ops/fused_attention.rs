//! Attention over the projections' own layout, `[b, t, heads, d]`, as one op with a fused
//! first-order backward.
//!
//! The composed [`super::attention`] needs `[b, h, t, d]`: the transposes and contiguous copies
//! before and after it, and its chain of matmul / scale / mask / softmax / matmul nodes, each cost
//! candle's backward a zero-filled gradient buffer and an addition into it, on one thread. Here
//! the forward's tasks for the rayon pool are (batch, query head, block of query rows) and the
//! backward's (batch, key/value head): scores, mask, softmax and the product with the values stay
//! in a per-task buffer, and the backward recomputes the probabilities instead of keeping them
//! (attention is a few percent of a step's FLOPs). A block of query rows stops at the last key
//! its mask rows can see, so causal attention skips the hidden upper triangle. The products run on
//! `ops::panel_gemm`'s kernel in f32 (x86-64 with AVX2, head sizes a multiple of 16), on gemm
//! otherwise. Where a graph of the gradients is kept (second-order MAML) or off the CPU, the
//! composed op runs.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use super::exp::{exp_from_max, ExpSlice};
use super::{attention, cpu_slice, first_order_fused, with_cpu_slices};

/// Attention for `q: [b, tq, h * d]`, `k, v: [b, tk, h_kv * d]` (the projections' outputs; the
/// head axis may also be split out, `[b, tq, h, d]`), `heads = (h, h_kv)` with `h` a multiple of
/// `h_kv`, `mask` additive and broadcastable to `[b, h, tq, tk]`. Returns `[b, tq, h * d]`.
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: (usize, usize),
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let dm = Dims::check(q, k, v, heads)?;
    if let Some(op) = FusedAttention::new(q, k, v, dm, mask, scale)? {
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    let Dims {
        b,
        tq,
        tk,
        h,
        hkv,
        d,
    } = dm;
    let split = |x: &Tensor, t: usize, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2);
    let (q, k, v) = (split(q, tq, h)?, split(k, tk, hkv)?, split(v, tk, hkv)?);
    attention(&q, &k, &v, mask, scale)?
        .transpose(1, 2)?
        .reshape((b, tq, h * d))
}

struct FusedAttention {
    dims: Dims,
    /// The mask, contiguous `[mb, mh, mq, tk]` in the inputs' dtype, held as a constant.
    mask: Option<Tensor>,
    scale: f64,
}

impl FusedAttention {
    /// The op, or `None` where the composed attention must run.
    fn new(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dims: Dims,
        mask: Option<&Tensor>,
        scale: f64,
    ) -> Result<Option<Self>> {
        if !first_order_fused(&[q, k, v]) {
            return Ok(None);
        }
        let Dims { b, tq, tk, h, .. } = dims;
        let mask = match mask {
            None => None,
            Some(m) => {
                let Ok((mb, mh, mq, mk)) = m.dims4() else {
                    return Ok(None);
                };
                let fits = |m: usize, s: usize| m == s || m == 1;
                if !(fits(mb, b) && fits(mh, h) && fits(mq, tq) && mk == tk) {
                    candle_core::bail!(
                        "attention: mask {:?} does not broadcast to [{b}, {h}, {tq}, {tk}]",
                        m.dims()
                    );
                }
                Some(m.to_dtype(q.dtype())?.contiguous()?.detach())
            }
        };
        Ok(Some(Self { dims, mask, scale }))
    }
}

/// The element types the kernels run on (f32, f64).
pub(crate) trait Elem:
    WithDType + Float + ExpSlice + std::ops::AddAssign + std::ops::SubAssign + std::ops::MulAssign
{
}

impl<T> Elem for T where
    T: WithDType
        + Float
        + ExpSlice
        + std::ops::AddAssign
        + std::ops::SubAssign
        + std::ops::MulAssign
{
}

/// Shapes of one call: batch, query and key lengths, heads, key/value heads, head size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub tq: usize,
    pub tk: usize,
    pub h: usize,
    pub hkv: usize,
    pub d: usize,
}

impl Dims {
    fn check(q: &Tensor, k: &Tensor, v: &Tensor, (h, hkv): (usize, usize)) -> Result<Self> {
        let bad = || {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit {h} query and {hkv} key/value heads",
                q.dims(),
                k.dims(),
                v.dims()
            )
        };
        let (qd, kd) = (q.dims(), k.dims());
        let vd = v.dims();
        if qd.len() < 3 || kd.len() < 3 || vd.len() < 3 {
            return bad();
        }
        let same_kv = vd[..2] == kd[..2] && v.elem_count() == k.elem_count();
        if !same_kv || h == 0 || hkv == 0 || h % hkv != 0 {
            return bad();
        }
        let (b, tq, tk) = (qd[0], qd[1], kd[1]);
        let d = q.elem_count() / (b * tq * h).max(1);
        if kd[0] != b || q.elem_count() != b * tq * h * d || k.elem_count() != b * tk * hkv * d {
            return bad();
        }
        Ok(Self {
            b,
            tq,
            tk,
            h,
            hkv,
            d,
        })
    }
}

/// Query rows per block where the mask differs between query rows (causal attention): a block's
/// scores, softmax and products stop at the last key its rows can see, so a causal 128-token
/// pass does 62% of the full work. A mask the same for every query row (padding) gives every
/// block the same keys, and the rows stay one block: half as many small products.
const QUERY_BLOCK: usize = 32;

/// A mask entry at or below this hides its key exactly: `exp` of it (scores are far smaller)
/// is 0 in f32 and f64, so leaving the key out changes nothing.
const HIDDEN: f64 = super::attention::MASKED / 2.0;

/// The additive mask, flat `[mb, mh, mq, tk]`, and for each of its `mb * mh * mq` rows how many
/// leading keys it needs: one past its last visible key, or all of them for a row that hides
/// every key (the unfused softmax then spreads over the masked scores, so nothing is left out).
pub(crate) struct MaskRows<T> {
    values: Option<(Vec<T>, (usize, usize, usize))>,
    needed: Vec<usize>,
    tk: usize,
}

impl<T: WithDType> MaskRows<T> {
    pub(crate) fn new(mask: &Option<Tensor>, tk: usize) -> Result<Self> {
        let Some(m) = mask else {
            return Ok(Self {
                values: None,
                needed: vec![],
                tk,
            });
        };
        let (mb, mh, mq, _) = m.dims4()?;
        let values = m.flatten_all()?.to_vec1::<T>()?;
        let needed = values
            .chunks_exact(tk.max(1))
            .map(|row| match row.iter().rposition(|v| v.to_f64() > HIDDEN) {
                Some(last) => last + 1,
                None => tk,
            })
            .collect();
        Ok(Self {
            values: Some((values, (mb, mh, mq))),
            needed,
            tk,
        })
    }

    /// Query rows per block for `tq` queries (see [`QUERY_BLOCK`]).
    fn query_block(&self, tq: usize) -> usize {
        match &self.values {
            Some((_, (_, _, mq))) if *mq > 1 => QUERY_BLOCK,
            _ => tq.max(1),
        }
    }

    /// Index of the mask row for query `qi` of head `hi` in batch `bi`.
    fn row(&self, (bi, hi, qi): (usize, usize, usize)) -> Option<usize> {
        let (_, (mb, mh, mq)) = self.values.as_ref()?;
        Some((bi % mb * mh + hi % mh) * mq + qi % mq)
    }

    /// The mask values over the first `kend` keys for query `qi` of head `hi` in batch `bi`.
    fn values(&self, at: (usize, usize, usize), kend: usize) -> Option<&[T]> {
        let r = self.row(at)?;
        let (m, _) = self.values.as_ref()?;
        Some(&m[r * self.tk..r * self.tk + kend])
    }

    /// Keys that query rows `r0..r1` of head `hi` in batch `bi` need (a prefix of all keys).
    fn keys_for(&self, (bi, hi): (usize, usize), (r0, r1): (usize, usize)) -> usize {
        if self.values.is_none() {
            return self.tk;
        }
        (r0..r1)
            .filter_map(|qi| self.row((bi, hi, qi)).map(|r| self.needed[r]))
            .max()
            .unwrap_or(self.tk)
    }
}

/// `dst [m, n] (row stride dst_rs) = (acc ? dst : 0) + lhs [m, k] x rhs [k, n]`, one thread.
///
/// # Safety
/// Every view must lie inside its buffer; `dst` must not overlap the inputs.
unsafe fn mm<T: 'static + Copy + num_traits::One>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, acc): (*mut T, usize, bool),
    (lhs, lhs_rs, lhs_cs): (*const T, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const T, usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        acc,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Keys or values of the (batch, kv head) a task works on.
#[derive(Clone, Copy)]
enum Which {
    Keys,
    Values,
}

/// The products attention's passes are made of, against one (batch, kv head)'s keys and values
/// `M: [tk, d]` (rows `ks` apart in the projections' layout): `a M^T` (scores, `dP = dO V^T`),
/// `a M` (`P V`, `dQ = dS K`) and `a^T r` (`dV += P^T dO`, `dK += dS^T Q`).
trait KeysValues<'a, T: 'a>: Sized + Send + Sync {
    /// For keys and values at offset `at` of `k` and `v`; `transposed_values` when `times_mt`
    /// will be asked for the values too.
    fn new(k: &'a [T], v: &'a [T], at: usize, dm: Dims, transposed_values: bool) -> Self;

    /// `p [rows, kend] = a [rows, d] (row stride lda) M[..kend]^T`.
    ///
    /// # Safety
    /// `a` must hold `rows` rows of `d` values `lda` apart; `kend <= tk`.
    unsafe fn times_mt(&self, m: Which, a: (*const T, usize), rows: usize, p: &mut [T]);

    /// `out [rows, d] (row stride ldo) = a [rows, kend] M[..kend]`.
    ///
    /// # Safety
    /// `out` must hold `rows` rows of `d` values `ldo` apart that no other thread touches.
    unsafe fn times_m(&self, m: Which, a: &[T], shape: (usize, usize), out: (*mut T, usize));

    /// `out [kend, d] (row stride ldo) += a^T r` for `a: [rows, kend]` and `r: [rows, d]` (row
    /// stride `ldr`).
    ///
    /// # Safety
    /// As [`Self::times_m`], and `r` must hold `rows` rows of `d` values `ldr` apart.
    unsafe fn acc_at_r(
        &self,
        a: &[T],
        shape: (usize, usize),
        r: (*const T, usize),
        out: (*mut T, usize),
    );
}

/// The products through gemm, reading every operand in place (any element type).
struct GemmKv<'a, T> {
    k: &'a [T],
    v: &'a [T],
    at: usize,
    dm: Dims,
}

impl<'a, T: Elem> GemmKv<'a, T> {
    fn of(&self, m: Which) -> *const T {
        let s = match m {
            Which::Keys => self.k,
            Which::Values => self.v,
        };
        s[self.at..].as_ptr()
    }
}

impl<'a, T: Elem> KeysValues<'a, T> for GemmKv<'a, T> {
    fn new(k: &'a [T], v: &'a [T], at: usize, dm: Dims, _: bool) -> Self {
        Self { k, v, at, dm }
    }

    unsafe fn times_mt(&self, m: Which, (a, lda): (*const T, usize), rows: usize, p: &mut [T]) {
        let (d, ks) = (self.dm.d, self.dm.hkv * self.dm.d);
        let kend = p.len() / rows.max(1);
        mm(
            (rows, kend, d),
            (p.as_mut_ptr(), kend, false),
            (a, lda, 1),
            (self.of(m), 1, ks),
        );
    }

    unsafe fn times_m(
        &self,
        m: Which,
        a: &[T],
        (rows, kend): (usize, usize),
        out: (*mut T, usize),
    ) {
        let (d, ks) = (self.dm.d, self.dm.hkv * self.dm.d);
        mm(
            (rows, d, kend),
            (out.0, out.1, false),
            (a.as_ptr(), kend, 1),
            (self.of(m), ks, 1),
        );
    }

    unsafe fn acc_at_r(
        &self,
        a: &[T],
        (rows, kend): (usize, usize),
        r: (*const T, usize),
        out: (*mut T, usize),
    ) {
        mm(
            (kend, self.dm.d, rows),
            (out.0, out.1, true),
            (a.as_ptr(), 1, kend),
            (r.0, r.1, 1),
        );
    }
}

/// The products on the panel kernel (f32, AVX2, head size a multiple of 16). gemm packs both
/// operands of every one of these small products (a block of 32 query rows against at most the
/// sequence's keys); here `M` and the rows `r` are read in place as the kernel's panels (16
/// adjacent values of a row), and only `M^T` is packed, once per (batch, kv head). A LoRA
/// step's attention core took ~0.82x gemm's time (`BENCHMARKS.md`).
#[cfg(target_arch = "x86_64")]
struct PanelKv<'a> {
    k: &'a [f32],
    v: &'a [f32],
    at: usize,
    dm: Dims,
    /// Panels of `K^T` and (when asked for) `V^T`: 16 keys' values per line.
    kt: Vec<f32>,
    vt: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
impl PanelKv<'_> {
    /// Whether the panel kernel takes attention with head size `d` here.
    fn fits(d: usize) -> bool {
        d.is_multiple_of(super::panel_gemm::PANEL) && super::panel_gemm::available()
    }
}

#[cfg(target_arch = "x86_64")]
impl<'a> KeysValues<'a, f32> for PanelKv<'a> {
    fn new(k: &'a [f32], v: &'a [f32], at: usize, dm: Dims, transposed_values: bool) -> Self {
        use super::panel_gemm::{strided_rows_to_panels, PANEL};
        let Dims { tk, hkv, d, .. } = dm;
        assert!(
            Self::fits(d),
            "attention panels: head size {d} or CPU does not fit"
        );
        let pack = |m: &[f32]| {
            assert!(tk == 0 || m.len() >= at + (tk - 1) * hkv * d + d);
            let mut panels = vec![0f32; tk.div_ceil(PANEL) * PANEL * d];
            // SAFETY: AVX2 checked above; `tk` rows of `d` values at `at`, `hkv * d` apart.
            unsafe { strided_rows_to_panels(m.as_ptr().add(at), (tk, d, hkv * d), &mut panels) };
            panels
        };
        let (kt, vt) = (pack(k), if transposed_values { pack(v) } else { vec![] });
        Self {
            k,
            v,
            at,
            dm,
            kt,
            vt,
        }
    }

    unsafe fn times_mt(&self, m: Which, (a, lda): (*const f32, usize), rows: usize, p: &mut [f32]) {
        let panels = match m {
            Which::Keys => &self.kt,
            Which::Values => &self.vt,
        };
        let kend = p.len() / rows.max(1);
        let d = self.dm.d;
        let x = std::slice::from_raw_parts(a, (rows.max(1) - 1) * lda + d);
        super::panel_gemm::product(x, (rows, d, lda), panels, kend, p.as_mut_ptr(), kend, false);
    }

    unsafe fn times_m(
        &self,
        m: Which,
        a: &[f32],
        (rows, kend): (usize, usize),
        out: (*mut f32, usize),
    ) {
        let s = match m {
            Which::Keys => self.k,
            Which::Values => self.v,
        };
        let (d, ks) = (self.dm.d, self.dm.hkv * self.dm.d);
        let b = (s.as_ptr().add(self.at), ks, d);
        super::panel_gemm::product_rows(a.as_ptr(), false, (rows, kend, kend), b, out, false);
    }

    unsafe fn acc_at_r(
        &self,
        a: &[f32],
        (rows, kend): (usize, usize),
        r: (*const f32, usize),
        out: (*mut f32, usize),
    ) {
        let b = (r.0, r.1, self.dm.d);
        super::panel_gemm::product_rows(a.as_ptr(), true, (kend, rows, kend), b, out, true);
    }
}

/// Softmax probabilities `p: [r1 - r0, kend]` of query rows `r0..r1` of head `hi` in batch
/// `bi` over the first `kend` keys (scores, mask, softmax).
///
/// # Safety
/// `q` must hold the shapes `dm` describes, `r1 <= tq`, `kend <= tk`.
#[allow(clippy::too_many_arguments)]
unsafe fn probabilities<'a, T: Elem, K: KeysValues<'a, T>>(
    dm: Dims,
    (bi, hi): (usize, usize),
    (r0, r1): (usize, usize),
    kend: usize,
    q: &[T],
    kv: &K,
    mask: &MaskRows<T>,
    scale: T,
    p: &mut [T],
) {
    let Dims { tq, h, d, .. } = dm;
    let qh = q.as_ptr().add(((bi * tq + r0) * h + hi) * d);
    kv.times_mt(Which::Keys, (qh, h * d), r1 - r0, p);
    for (qi, row) in (r0..r1).zip(p.chunks_exact_mut(kend)) {
        match mask.values((bi, hi, qi), kend) {
            Some(m) => row
                .iter_mut()
                .zip(m)
                .for_each(|(s, &m)| *s = *s * scale + m),
            None => row.iter_mut().for_each(|s| *s *= scale),
        }
        let (_, sum) = exp_from_max(row);
        let inv = T::from(sum.recip()).unwrap_or_else(T::nan);
        row.iter_mut().for_each(|s| *s *= inv);
    }
}

/// Addresses of buffers written by several tasks at disjoint places.
#[derive(Clone, Copy)]
struct Shared(usize);

impl Shared {
    fn ptr<T>(self) -> *mut T {
        self.0 as *mut T
    }
}

/// Whether f32 attention runs on the panel kernel: `METAPEFT_ATTENTION_PANELS=0` leaves it to
/// gemm (for A/B timing and tests).
#[cfg(target_arch = "x86_64")]
fn panels_for<T: 'static>(d: usize) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on =
        *ON.get_or_init(|| std::env::var("METAPEFT_ATTENTION_PANELS").map_or(true, |v| v != "0"));
    on && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() && PanelKv::fits(d)
}

pub(crate) fn forward<T: Elem>(
    dm: Dims,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: &MaskRows<T>,
    scale: f64,
) -> Vec<T> {
    let mut out = vec![T::zero(); dm.b * dm.tq * dm.h * dm.d];
    #[cfg(target_arch = "x86_64")]
    if panels_for::<T>(dm.d) {
        if let (Some(q), Some(k), Some(v), Some(o), Some(m)) = (
            super::as_f32(q),
            super::as_f32(k),
            super::as_f32(v),
            super::as_f32_mut(&mut out),
            (mask as &dyn std::any::Any).downcast_ref::<MaskRows<f32>>(),
        ) {
            forward_with::<f32, PanelKv>(dm, [q, k, v], m, scale, o);
            return out;
        }
    }
    forward_with::<T, GemmKv<T>>(dm, [q, k, v], mask, scale, &mut out);
    out
}

fn forward_with<'a, T: Elem, K: KeysValues<'a, T>>(
    dm: Dims,
    [q, k, v]: [&'a [T]; 3],
    mask: &MaskRows<T>,
    scale: f64,
    out: &mut [T],
) {
    let Dims {
        b,
        tq,
        tk,
        h,
        hkv,
        d,
    } = dm;
    let rep = h / hkv;
    let o = Shared(out.as_mut_ptr() as usize);
    let scale = T::from(scale).unwrap_or_else(T::nan);
    let rows = mask.query_block(tq);
    let blocks = tq.div_ceil(rows);
    let kvs: Vec<K> = (0..b * hkv)
        .into_par_iter()
        .map(|t| K::new(k, v, (t / hkv * tk * hkv + t % hkv) * d, dm, false))
        .collect();
    // One task per (batch, query head, query block): a single sequence still has work for
    // every thread, and each task writes only its own rows of its head's columns of `out`.
    (0..b * h * blocks).into_par_iter().for_each(|task| {
        let (bi, hi, blk) = (task / (h * blocks), task / blocks % h, task % blocks);
        let (r0, r1) = (blk * rows, ((blk + 1) * rows).min(tq));
        let kend = mask.keys_for((bi, hi), (r0, r1));
        let kv = &kvs[bi * hkv + hi / rep];
        let mut p = vec![T::zero(); (r1 - r0) * kend];
        // SAFETY: shapes as `dm` says; the task's rows and head are its own.
        unsafe {
            probabilities(dm, (bi, hi), (r0, r1), kend, q, kv, mask, scale, &mut p);
            let oh = o.ptr::<T>().add(((bi * tq + r0) * h + hi) * d);
            kv.times_m(Which::Values, &p, (r1 - r0, kend), (oh, h * d));
        }
    });
}

/// `(dq, dk, dv)` for the output gradient `go: [b, tq, h, d]`.
pub(crate) fn backward<T: Elem>(
    dm: Dims,
    [q, k, v, go]: [&[T]; 4],
    mask: &MaskRows<T>,
    scale: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut dq = vec![T::zero(); q.len()];
    let mut dk = vec![T::zero(); k.len()];
    let mut dv = vec![T::zero(); v.len()];
    #[cfg(target_arch = "x86_64")]
    if panels_for::<T>(dm.d) {
        if let (Some(q), Some(k), Some(v), Some(go), Some(m)) = (
            super::as_f32(q),
            super::as_f32(k),
            super::as_f32(v),
            super::as_f32(go),
            (mask as &dyn std::any::Any).downcast_ref::<MaskRows<f32>>(),
        ) {
            if let (Some(dq32), Some(dk32), Some(dv32)) = (
                super::as_f32_mut(&mut dq),
                super::as_f32_mut(&mut dk),
                super::as_f32_mut(&mut dv),
            ) {
                backward_with::<f32, PanelKv>(dm, [q, k, v, go], m, scale, [dq32, dk32, dv32]);
                return (dq, dk, dv);
            }
        }
    }
    backward_with::<T, GemmKv<T>>(dm, [q, k, v, go], mask, scale, [&mut dq, &mut dk, &mut dv]);
    (dq, dk, dv)
}

fn backward_with<'a, T: Elem, K: KeysValues<'a, T>>(
    dm: Dims,
    [q, k, v, go]: [&'a [T]; 4],
    mask: &MaskRows<T>,
    scale: f64,
    [dq, dk, dv]: [&mut [T]; 3],
) {
    let Dims {
        b,
        tq,
        tk,
        h,
        hkv,
        d,
    } = dm;
    let rep = h / hkv;
    let (dqs, dks, dvs) = (
        Shared(dq.as_mut_ptr() as usize),
        Shared(dk.as_mut_ptr() as usize),
        Shared(dv.as_mut_ptr() as usize),
    );
    let s = T::from(scale).unwrap_or_else(T::nan);
    let block = mask.query_block(tq);
    let blocks = tq.div_ceil(block);
    (0..b * hkv).into_par_iter().for_each(|task| {
        let (bi, g) = (task / hkv, task % hkv);
        let (mut p, mut dp) = (
            vec![T::zero(); block.min(tq) * tk],
            vec![T::zero(); block.min(tq) * tk],
        );
        let kv_at = (bi * tk * hkv + g) * d;
        let kv = K::new(k, v, kv_at, dm, true);
        let (qs, ks) = (h * d, hkv * d);
        for hi in g * rep..(g + 1) * rep {
            for blk in 0..blocks {
                let (r0, r1) = (blk * block, ((blk + 1) * block).min(tq));
                let (rows, kend) = (r1 - r0, mask.keys_for((bi, hi), (r0, r1)));
                let (p, dp) = (&mut p[..rows * kend], &mut dp[..rows * kend]);
                let q_at = ((bi * tq + r0) * h + hi) * d;
                // SAFETY: shapes as `dm` says; the task owns its kv head's rows of dk/dv
                // (zeroed by the caller, so every block accumulates) and its query heads'
                // columns of dq.
                unsafe {
                    probabilities(dm, (bi, hi), (r0, r1), kend, q, &kv, mask, s, p);
                    let (gh, qh) = (go.as_ptr().add(q_at), q.as_ptr().add(q_at));
                    // dV += P^T dO
                    let dvh = dvs.ptr::<T>().add(kv_at);
                    kv.acc_at_r(p, (rows, kend), (gh, qs), (dvh, ks));
                    // dP = dO V^T
                    kv.times_mt(Which::Values, (gh, qs), rows, dp);
                    // dS = scale * P (dP - rowsum(dP P))
                    for (pr, dr) in p.chunks_exact(kend).zip(dp.chunks_exact_mut(kend)) {
                        let dot = super::reduce::dot(pr, dr);
                        dr.iter_mut()
                            .zip(pr)
                            .for_each(|(g, &p)| *g = s * p * (*g - dot));
                    }
                    // dQ = dS K, dK += dS^T Q
                    let dqh = dqs.ptr::<T>().add(q_at);
                    kv.times_m(Which::Keys, dp, (rows, kend), (dqh, qs));
                    let dkh = dks.ptr::<T>().add(kv_at);
                    kv.acc_at_r(dp, (rows, kend), (qh, qs), (dkh, ks));
                }
            }
        }
    });
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "metapeft-fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = self.dims;
        let Dims {
            b,
            tq,
            tk,
            h,
            hkv,
            d,
        } = dm;
        let (nq, nk) = (l1.shape().elem_count(), l2.shape().elem_count());
        if nq != b * tq * h * d || nk != b * tk * hkv * d || l3.shape().elem_count() != nk {
            candle_core::bail!("fused attention: inputs do not match {dm:?}");
        }
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(forward(
                dm,
                cpu_slice::<f32>(s1, l1)?,
                cpu_slice(s2, l2)?,
                cpu_slice(s3, l3)?,
                &MaskRows::new(&self.mask, tk)?,
                self.scale,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(forward(
                dm,
                cpu_slice::<f64>(s1, l1)?,
                cpu_slice(s2, l2)?,
                cpu_slice(s3, l3)?,
                &MaskRows::new(&self.mask, tk)?,
                self.scale,
            )),
            _ => candle_core::bail!("fused attention: f32 or f64 only"),
        };
        Ok((out, Shape::from((b, tq, h * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let grads = match q.dtype() {
            candle_core::DType::F32 => self.grads::<f32>([q, k, v, &g])?,
            candle_core::DType::F64 => self.grads::<f64>([q, k, v, &g])?,
            dt => candle_core::bail!("fused attention: {dt:?} gradients"),
        };
        let [dq, dk, dv] = grads;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl FusedAttention {
    fn grads<T: Elem>(&self, ts: [&Tensor; 4]) -> Result<[Tensor; 3]> {
        if ts[3].elem_count() != ts[0].elem_count() {
            candle_core::bail!("fused attention: gradient {:?}", ts[3].dims());
        }
        let (dq, dk, dv) = with_cpu_slices::<T, _>(&ts, |s| {
            let mask = MaskRows::new(&self.mask, self.dims.tk)?;
            Ok(backward(
                self.dims,
                [s[0], s[1], s[2], s[3]],
                &mask,
                self.scale,
            ))
        })?;
        let dev = ts[0].device();
        Ok([
            Tensor::from_vec(dq, ts[0].shape(), dev)?,
            Tensor::from_vec(dk, ts[1].shape(), dev)?,
            Tensor::from_vec(dv, ts[2].shape(), dev)?,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{assert_same_value_and_gradients, check, randn_f64};
    use crate::ops::{causal_mask, padding_mask};
    use candle_core::{DType, Device, Var};

    /// The composed attention on the `[b, t, h, d]` layout, for reference.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, m: Option<&Tensor>) -> Result<Tensor> {
        let t = |x: &Tensor| x.transpose(1, 2);
        attention(&t(q)?, &t(k)?, &t(v)?, m, 0.4)?.transpose(1, 2)
    }

    /// No mask, causal, right padding (the first sequence whole, the others ever shorter; with
    /// `empty_last`, the last one all padding: rows that hide every key), and both.
    fn masks(b: usize, t: usize, empty_last: bool) -> Result<Vec<Option<Tensor>>> {
        let dev = Device::Cpu;
        let parts = if empty_last { b.max(2) - 1 } else { b };
        let keep: Vec<u32> = (0..b * t)
            .map(|i| u32::from(i % t < t * (parts - (i / t).min(parts)) / parts))
            .collect();
        let am = Tensor::from_vec(keep, (b, t), &dev)?;
        let causal = causal_mask(t, t, 0, DType::F64, &dev)?;
        Ok(vec![
            None,
            Some(causal.clone()),
            Some(padding_mask(&am, DType::F64)?),
            Some(causal.broadcast_add(&padding_mask(&am, DType::F64)?)?),
        ])
    }

    #[test]
    fn value_and_gradients_equal_the_composed_attention() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        // GQA (6 query heads over 2 kv heads) and plain multi-head; one query block, and three
        // (the last ragged) whose key ranges the masks cut short.
        for (h, hkv, t) in [(6, 2, 7), (3, 3, 7), (6, 2, 2 * QUERY_BLOCK + 6)] {
            let (b, d) = (3, 5);
            let q = Var::from_tensor(&randn_f64(&[b, t, h, d], 71, 1.0)?)?;
            let k = Var::from_tensor(&randn_f64(&[b, t, hkv, d], 72, 1.0)?)?;
            let v = Var::from_tensor(&randn_f64(&[b, t, hkv, d], 73, 1.0)?)?;
            let w = randn_f64(&[b, t, h * d], 74, 1.0)?;
            for m in masks(b, t, true)? {
                let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                let got =
                    pool.install(|| attention_heads(qt, kt, vt, (h, hkv), m.as_ref(), 0.4))?;
                let want = composed(qt, kt, vt, m.as_ref())?.reshape((b, t, h * d))?;
                assert_same_value_and_gradients(&pool, &got, &want, &w, &[&q, &k, &v], 1e-12)?;
            }
        }
        Ok(())
    }

    /// In f32 the panel kernel's products give gemm's values and gradients: head sizes 16-64,
    /// GQA and plain heads, query blocks the masks cut short (key counts not a multiple of a
    /// panel), padding rows that hide every key.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn panel_products_give_the_values_and_gradients_of_gemm() -> Result<()> {
        if !PanelKv::fits(16) {
            eprintln!("no AVX2/FMA here: attention runs on gemm on this CPU");
            return Ok(());
        }
        let close = |got: &[f32], want: &[f32], what: &str| {
            let top = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!((g - w).abs() <= 2e-5 * top, "{what} at {i}: {g} vs {w}");
            }
        };
        // (b, tq, tk, h, hkv, d); the masks are made for tq == tk, so the last case (more
        // keys than queries, as after a prefix) runs unmasked only.
        for (b, t, tk, h, hkv, d) in [
            (2, 7, 7, 4, 2, 16),
            (2, 2 * QUERY_BLOCK + 6, 2 * QUERY_BLOCK + 6, 6, 2, 32),
            (1, 45, 45, 3, 3, 64),
            (2, 128, 128, 9, 3, 64),
            (2, 5, 21, 4, 2, 16),
        ] {
            let dm = Dims {
                b,
                tq: t,
                tk,
                h,
                hkv,
                d,
            };
            let vals = |n: usize, seed: u64| -> Result<Vec<f32>> {
                randn_f64(&[n], seed, 1.0)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()
            };
            let (q, k, v) = (
                vals(b * t * h * d, 81)?,
                vals(b * tk * hkv * d, 82)?,
                vals(b * tk * hkv * d, 83)?,
            );
            let go = vals(b * t * h * d, 84)?;
            let masks = match t == tk {
                true => masks(b, t, true)?,
                false => vec![None],
            };
            for m in masks {
                let m = m.map(|m| m.to_dtype(DType::F32)).transpose()?;
                let rows = MaskRows::<f32>::new(&m, tk)?;
                let what = format!("[{b}, {t}, {h}/{hkv}, {d}] mask {}", m.is_some());
                let mut want = vec![0f32; q.len()];
                forward_with::<f32, GemmKv<f32>>(dm, [&q, &k, &v], &rows, 0.4, &mut want);
                let mut got = vec![0f32; q.len()];
                forward_with::<f32, PanelKv>(dm, [&q, &k, &v], &rows, 0.4, &mut got);
                close(&got, &want, &format!("{what}: values"));
                let grads = |panels: bool| {
                    let (mut dq, mut dk, mut dv) = (
                        vec![0f32; q.len()],
                        vec![0f32; k.len()],
                        vec![0f32; v.len()],
                    );
                    let (ins, outs) = ([&q[..], &k, &v, &go], [&mut dq[..], &mut dk, &mut dv]);
                    match panels {
                        true => backward_with::<f32, PanelKv>(dm, ins, &rows, 0.4, outs),
                        false => backward_with::<f32, GemmKv<f32>>(dm, ins, &rows, 0.4, outs),
                    }
                    [dq, dk, dv]
                };
                for (i, (got, want)) in grads(true).iter().zip(grads(false)).enumerate() {
                    close(got, &want, &format!("{what}: gradient {i}"));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        // Packed heads, as the projections give them.
        let q = randn_f64(&[2, 4, 12], 75, 1.0)?;
        let k = randn_f64(&[2, 4, 6], 76, 1.0)?;
        let v = randn_f64(&[2, 4, 6], 77, 1.0)?;
        // (A row hiding every key sits at -1e9 in every score: too coarse for differences.)
        let m = masks(2, 4, false)?.pop().flatten();
        let err = check(
            |t| attention_heads(&t[0], &t[1], &t[2], (4, 2), m.as_ref(), 0.6),
            &[q, k, v],
            1e-6,
        )?;
        assert!(err < 1e-7, "rel error {err}");
        Ok(())
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() -> Result<()> {
        let q = randn_f64(&[1, 3, 4, 2], 78, 1.0)?;
        let k = randn_f64(&[1, 3, 3, 2], 79, 1.0)?;
        assert!(attention_heads(&q, &k, &k, (4, 3), None, 1.0).is_err());
        assert!(attention_heads(&q, &k, &k, (5, 1), None, 1.0).is_err());
        let k = randn_f64(&[1, 3, 2, 2], 79, 1.0)?;
        let bad_mask = randn_f64(&[1, 1, 2, 3], 80, 1.0)?;
        assert!(attention_heads(&q, &k, &k, (4, 2), Some(&bad_mask), 1.0).is_err());
        Ok(())
    }
}
