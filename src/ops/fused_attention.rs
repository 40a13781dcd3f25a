//! Attention over the projections' own layout, `[b, t, heads, d]`, as one op with a fused
//! first-order backward.
//!
//! The composed [`super::attention`] needs `[b, h, t, d]`: the transposes and contiguous copies
//! before and after it, and its chain of matmul / scale / mask / softmax / matmul nodes, each cost
//! candle's backward a zero-filled gradient buffer and an addition into it, on one thread. Here
//! every (batch, key/value head) pair is one task for the rayon pool: scores, mask, softmax and
//! the product with the values stay in a per-task buffer, and the backward recomputes the
//! probabilities instead of keeping them (attention is a few percent of a step's FLOPs). Where a
//! graph of the gradients is kept (second-order MAML) or off the CPU, the composed op runs.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use super::exp::ExpSlice;
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
trait Elem:
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
struct Dims {
    b: usize,
    tq: usize,
    tk: usize,
    h: usize,
    hkv: usize,
    d: usize,
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

/// The mask as a flat vector with its dims, or nothing.
type MaskRows<T> = Option<(Vec<T>, (usize, usize, usize))>;

fn mask_rows<T: WithDType>(mask: &Option<Tensor>) -> Result<MaskRows<T>> {
    match mask {
        None => Ok(None),
        Some(m) => {
            let (mb, mh, mq, _) = m.dims4()?;
            Ok(Some((m.flatten_all()?.to_vec1::<T>()?, (mb, mh, mq))))
        }
    }
}

/// `dst [m, n] (row stride dst_rs) = (acc ? dst : 0) + beta * lhs [m, k] x rhs [k, n]`, one thread.
///
/// # Safety
/// Every view must lie inside its buffer; `dst` must not overlap the inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn mm<T: 'static + Copy + num_traits::One>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    acc: bool,
    (lhs, lhs_rs, lhs_cs): (*const T, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const T, usize, usize),
    beta: T,
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
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Softmax probabilities `p: [tq, tk]` of query head `hi` in batch `bi` (scores, mask, softmax).
///
/// # Safety
/// `q` and `k` must hold the shapes `dm` describes.
unsafe fn probabilities<T: Elem>(
    dm: Dims,
    (bi, hi): (usize, usize),
    q: &[T],
    k: &[T],
    mask: &MaskRows<T>,
    scale: T,
    p: &mut [T],
) {
    let Dims {
        tq, tk, h, hkv, d, ..
    } = dm;
    let g = hi / (h / hkv);
    let qh = q.as_ptr().add((bi * tq * h + hi) * d);
    let kh = k.as_ptr().add((bi * tk * hkv + g) * d);
    // scores = scale * Q K^T, K read transposed in place.
    mm(
        (tq, tk, d),
        p.as_mut_ptr(),
        tk,
        false,
        (qh, h * d, 1),
        (kh, 1, hkv * d),
        scale,
    );
    for (qi, row) in p.chunks_exact_mut(tk).enumerate() {
        if let Some((m, (mb, mh, mq))) = mask {
            let at = ((bi % mb * mh + hi % mh) * mq + qi % mq) * tk;
            row.iter_mut()
                .zip(&m[at..at + tk])
                .for_each(|(s, &m)| *s += m);
        }
        let max = row.iter().fold(T::neg_infinity(), |a, &s| Float::max(a, s));
        row.iter_mut().for_each(|s| *s -= max);
        T::exp_in_place(row);
        let sum = row.iter().map(|&s| WithDType::to_f64(s)).sum::<f64>();
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

fn forward<T: Elem>(dm: Dims, q: &[T], k: &[T], v: &[T], mask: &MaskRows<T>, scale: f64) -> Vec<T> {
    let Dims {
        b,
        tq,
        tk,
        h,
        hkv,
        d,
    } = dm;
    let rep = h / hkv;
    let mut out = vec![T::zero(); b * tq * h * d];
    let o = Shared(out.as_mut_ptr() as usize);
    let scale = T::from(scale).unwrap_or_else(T::nan);
    (0..b * hkv).into_par_iter().for_each(|task| {
        let (bi, g) = (task / hkv, task % hkv);
        let mut p = vec![T::zero(); tq * tk];
        for hi in g * rep..(g + 1) * rep {
            // SAFETY: shapes as `dm` says; each task writes only its own heads' columns of `out`.
            unsafe {
                probabilities(dm, (bi, hi), q, k, mask, scale, &mut p);
                let vh = v.as_ptr().add((bi * tk * hkv + g) * d);
                let oh = o.ptr::<T>().add((bi * tq * h + hi) * d);
                mm(
                    (tq, d, tk),
                    oh,
                    h * d,
                    false,
                    (p.as_ptr(), tk, 1),
                    (vh, hkv * d, 1),
                    T::one(),
                );
            }
        }
    });
    out
}

/// `(dq, dk, dv)` for the output gradient `go: [b, tq, h, d]`.
fn backward<T: Elem>(
    dm: Dims,
    [q, k, v, go]: [&[T]; 4],
    mask: &MaskRows<T>,
    scale: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims {
        b,
        tq,
        tk,
        h,
        hkv,
        d,
    } = dm;
    let rep = h / hkv;
    let mut dq = vec![T::zero(); q.len()];
    let mut dk = vec![T::zero(); k.len()];
    let mut dv = vec![T::zero(); v.len()];
    let (dqs, dks, dvs) = (
        Shared(dq.as_mut_ptr() as usize),
        Shared(dk.as_mut_ptr() as usize),
        Shared(dv.as_mut_ptr() as usize),
    );
    let s = T::from(scale).unwrap_or_else(T::nan);
    (0..b * hkv).into_par_iter().for_each(|task| {
        let (bi, g) = (task / hkv, task % hkv);
        let (mut p, mut dp) = (vec![T::zero(); tq * tk], vec![T::zero(); tq * tk]);
        let kv_at = (bi * tk * hkv + g) * d;
        for (r, hi) in (g * rep..(g + 1) * rep).enumerate() {
            let q_at = (bi * tq * h + hi) * d;
            // SAFETY: shapes as `dm` says; the task owns its kv head's rows of dk/dv and its
            // query heads' columns of dq.
            unsafe {
                probabilities(dm, (bi, hi), q, k, mask, s, &mut p);
                let (gh, qh) = (go.as_ptr().add(q_at), q.as_ptr().add(q_at));
                let (kh, vh) = (k.as_ptr().add(kv_at), v.as_ptr().add(kv_at));
                let (qs, ks) = (h * d, hkv * d);
                // dV += P^T dO
                let dvh = dvs.ptr::<T>().add(kv_at);
                mm(
                    (tk, d, tq),
                    dvh,
                    ks,
                    r > 0,
                    (p.as_ptr(), 1, tk),
                    (gh, qs, 1),
                    T::one(),
                );
                // dP = dO V^T
                mm(
                    (tq, tk, d),
                    dp.as_mut_ptr(),
                    tk,
                    false,
                    (gh, qs, 1),
                    (vh, 1, ks),
                    T::one(),
                );
                // dS = scale * P (dP - rowsum(dP P))
                for (pr, dr) in p.chunks_exact(tk).zip(dp.chunks_exact_mut(tk)) {
                    let dot = pr
                        .iter()
                        .zip(dr.iter())
                        .fold(T::zero(), |a, (&p, &g)| a + p * g);
                    dr.iter_mut()
                        .zip(pr)
                        .for_each(|(g, &p)| *g = s * p * (*g - dot));
                }
                // dQ = dS K, dK += dS^T Q
                let dqh = dqs.ptr::<T>().add(q_at);
                mm(
                    (tq, d, tk),
                    dqh,
                    qs,
                    false,
                    (dp.as_ptr(), tk, 1),
                    (kh, ks, 1),
                    T::one(),
                );
                let dkh = dks.ptr::<T>().add(kv_at);
                mm(
                    (tk, d, tq),
                    dkh,
                    ks,
                    r > 0,
                    (dp.as_ptr(), 1, tk),
                    (qh, qs, 1),
                    T::one(),
                );
            }
        }
    });
    (dq, dk, dv)
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
                &mask_rows(&self.mask)?,
                self.scale,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(forward(
                dm,
                cpu_slice::<f64>(s1, l1)?,
                cpu_slice(s2, l2)?,
                cpu_slice(s3, l3)?,
                &mask_rows(&self.mask)?,
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
            let mask = mask_rows(&self.mask)?;
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

    fn masks(b: usize, t: usize) -> Result<Vec<Option<Tensor>>> {
        let dev = Device::Cpu;
        let keep: Vec<u32> = (0..b * t)
            .map(|i| u32::from(i % t < t - i / t % t))
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
        // GQA (6 query heads over 2 kv heads) and plain multi-head.
        for (h, hkv) in [(6, 2), (3, 3)] {
            let (b, t, d) = (3, 7, 5);
            let q = Var::from_tensor(&randn_f64(&[b, t, h, d], 71, 1.0)?)?;
            let k = Var::from_tensor(&randn_f64(&[b, t, hkv, d], 72, 1.0)?)?;
            let v = Var::from_tensor(&randn_f64(&[b, t, hkv, d], 73, 1.0)?)?;
            let w = randn_f64(&[b, t, h * d], 74, 1.0)?;
            for m in masks(b, t)? {
                let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                let got =
                    pool.install(|| attention_heads(qt, kt, vt, (h, hkv), m.as_ref(), 0.4))?;
                let want = composed(qt, kt, vt, m.as_ref())?.reshape((b, t, h * d))?;
                assert_same_value_and_gradients(&pool, &got, &want, &w, &[&q, &k, &v], 1e-12)?;
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
        let m = masks(2, 4)?.pop().flatten();
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
