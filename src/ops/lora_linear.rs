//! A LoRA-adapted linear as one op: `y = x W^T (+ b) + scale * (x A^T) B^T` for a frozen `W`
//! (and frozen bias `b`) and trained factors `A: [r, k]`, `B: [n, r]`.
//!
//! Composed, the base product, the first factor and the low-rank add are three nodes, and the
//! graph keeps the base output `x W^T` and `x A^T` alive until the backward (a `[tokens, out]`
//! tensor per adapted linear: ~47 MB of a SmolLM2 LoRA q,v step at 4 x 128 tokens). Here the
//! graph keeps only `x` (kept anyway by the layer's other projections) and the two factors; the
//! backward recomputes the rank-`r` product `x A^T`, which costs `r / n` of the base product.
//! Where a graph of the gradients is kept (second-order MAML), off the CPU, for mixed dtypes or
//! for a few rows (decoding takes the matrix-vector kernel), the composed ops run.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

use super::frozen_linear::{frozen_product, frozen_product_fuses};
use super::par_gemm::{matmul, matmul_acc, Strided};
use super::{cpu_slice, with_cpu_slices};

/// Whether LoRA-adapted linears run as one op: `METAPEFT_FUSED_LORA=0` keeps the composed ops
/// (for A/B timing).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("METAPEFT_FUSED_LORA").map_or(true, |v| v != "0"))
}

/// `x W^T (+ bias) + scale * (x A^T) B^T` for `x: [..., k]`, frozen `w: [n, k]` and `bias: [n]`,
/// `a: [r, k]`, `b: [n, r]`. Gradients flow to `x`, `a` and `b` (and a tracked bias), never to
/// `w`.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let (r, ka) = a.dims2()?;
    if x.dims().last() != Some(&k) || ka != k || b.dims2()? != (n, r) {
        candle_core::bail!(
            "LoRA linear: x {:?}, W {:?}, A {:?}, B {:?} do not fit",
            x.dims(),
            w.dims(),
            a.dims(),
            b.dims()
        );
    }
    let rows = x.elem_count() / k.max(1);
    let frozen_bias = bias.filter(|b| !b.track_op() && b.dtype() == x.dtype());
    let fuses = frozen_product_fuses(&[x, w, a, b], w, rows)
        && bias.is_none_or(|b| b.elem_count() == n && b.dtype() == x.dtype());
    if !fuses {
        let y = super::linear(x, w, bias)?;
        let z = super::linear(x, a, None)?;
        return super::add_low_rank(&y, &z, b, scale);
    }
    let op = LoraLinear {
        w: w.contiguous()?.detach(),
        bias: frozen_bias.map(Tensor::detach),
        scale,
    };
    let y = x
        .contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?;
    match bias {
        // A trained bias (LoRA's `bias = "all"`, BitFit) is added outside: it needs its gradient.
        Some(bb) if frozen_bias.is_none() => y.broadcast_add(bb),
        _ => Ok(y),
    }
}

struct LoraLinear {
    /// The frozen weight `[n, k]`, contiguous.
    w: Tensor,
    /// The frozen bias `[n]`, if any.
    bias: Option<Tensor>,
    scale: f64,
}

/// Sizes of one call: rows, outputs, inputs, rank.
#[derive(Clone, Copy)]
pub(crate) struct Mnkr {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
}

fn forward<T: WithDType>(
    [x, w, a, b]: [&[T]; 4],
    bias: Option<&[T]>,
    sz: Mnkr,
    scale: f64,
) -> Result<Vec<T>> {
    let Mnkr { m, n, k, .. } = sz;
    let mut out = frozen_product(x, w, bias, (m, n, k))?;
    add_low_rank_onto(&mut out, [x, a, b], sz, scale)?;
    Ok(out)
}

/// `out += scale * (x A^T) B^T` for `out: [m, n]`, `x: [m, k]`, `A: [r, k]`, `B: [n, r]`.
pub(crate) fn add_low_rank_onto<T: WithDType>(
    out: &mut [T],
    [x, a, b]: [&[T]; 3],
    Mnkr { m, n, k, r }: Mnkr,
    scale: f64,
) -> Result<()> {
    let z = matmul(
        (m, r, k),
        Strided::row_major(x, 0, k),
        Strided::transposed(a, 0, k),
    )?;
    matmul_acc(
        out,
        (m, n, r),
        Strided::row_major(&z, 0, r),
        Strided::transposed(b, 0, r),
        T::from_f64(scale),
    )
}

/// `(dx, dA, dB)` for the output gradient `g: [m, n]`; `dx` only when `want_dx`.
type Grads<T> = (Option<Vec<T>>, Vec<T>, Vec<T>);

fn backward<T: WithDType>(
    [g, x, w, a, b]: [&[T]; 5],
    sz: Mnkr,
    scale: f64,
    want_dx: bool,
) -> Result<Grads<T>> {
    let Mnkr { m, n, k, .. } = sz;
    let mut dx = match want_dx {
        true => Some(matmul(
            (m, k, n),
            Strided::row_major(g, 0, n),
            Strided::row_major(w, 0, k),
        )?),
        false => None,
    };
    let (da, db) = low_rank_grads([g, x, a, b], sz, scale, dx.as_deref_mut())?;
    Ok((dx, da, db))
}

/// `(dA, dB)` of `scale * (x A^T) B^T` for the output gradient `g: [m, n]`, adding the low-rank
/// path's input gradient `scale * (g B) A` onto `dx` when given.
pub(crate) fn low_rank_grads<T: WithDType>(
    [g, x, a, b]: [&[T]; 4],
    Mnkr { m, n, k, r }: Mnkr,
    scale: f64,
    dx: Option<&mut [T]>,
) -> Result<(Vec<T>, Vec<T>)> {
    let s = T::from_f64(scale);
    let (g_view, x_view) = (Strided::row_major(g, 0, n), Strided::row_major(x, 0, k));
    // gb = scale * g B: [m, r], the gradient reaching the rank-r bottleneck.
    let mut gb = matmul((m, r, n), g_view, Strided::row_major(b, 0, r))?;
    gb.iter_mut().for_each(|v| *v *= s);
    if let Some(dx) = dx {
        let (gb_view, a_view) = (Strided::row_major(&gb, 0, r), Strided::row_major(a, 0, k));
        matmul_acc(dx, (m, k, r), gb_view, a_view, T::one())?;
    }
    // dA = gb^T x: [r, k].
    let da = matmul((r, k, m), Strided::transposed(&gb, 0, r), x_view)?;
    // dB = scale * g^T (x A^T): [n, r], the bottleneck recomputed rather than kept.
    let mut z = matmul((m, r, k), x_view, Strided::transposed(a, 0, k))?;
    z.iter_mut().for_each(|v| *v *= s);
    let db = matmul(
        (n, r, m),
        Strided::transposed(g, 0, n),
        Strided::row_major(&z, 0, r),
    )?;
    Ok((da, db))
}

impl LoraLinear {
    fn sizes(&self, x_elems: usize, a: &Layout) -> Result<Mnkr> {
        let (n, k) = self.w.dims2()?;
        let (r, _) = a.shape().dims2()?;
        Ok(Mnkr {
            m: x_elems / k.max(1),
            n,
            k,
            r,
        })
    }

    fn run_forward<T: WithDType>(&self, [x, a, b]: [&[T]; 3], sz: Mnkr) -> Result<Vec<T>> {
        let (w, bias) = (&self.w, self.bias.as_ref());
        let ts: Vec<&Tensor> = std::iter::once(w).chain(bias).collect();
        with_cpu_slices::<T, _>(&ts, |s| {
            forward([x, s[0], a, b], s.get(1).copied(), sz, self.scale)
        })
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "metapeft-lora-linear"
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
        let sz = self.sizes(l1.shape().elem_count(), l2)?;
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = sz.n;
        }
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(self.run_forward(
                [cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?],
                sz,
            )?),
            CpuStorage::F64(_) => CpuStorage::F64(self.run_forward(
                [cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?],
                sz,
            )?),
            _ => candle_core::bail!("LoRA linear: f32 or f64 only"),
        };
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sz = self.sizes(x.elem_count(), a.layout())?;
        let want_dx = x.track_op();
        let ts = [g, x, &self.w, a, b];
        macro_rules! run {
            ($t:ty) => {
                with_cpu_slices::<$t, _>(&ts, |s| {
                    let (dx, da, db) =
                        backward([s[0], s[1], s[2], s[3], s[4]], sz, self.scale, want_dx)?;
                    let dx = dx
                        .map(|d| Tensor::from_vec(d, x.shape(), x.device()))
                        .transpose()?;
                    let da = Tensor::from_vec(da, a.shape(), a.device())?;
                    let db = Tensor::from_vec(db, b.shape(), b.device())?;
                    Ok((dx, Some(da), Some(db)))
                })
            };
        }
        match x.dtype() {
            candle_core::DType::F32 => run!(f32),
            candle_core::DType::F64 => run!(f64),
            dt => candle_core::bail!("LoRA linear: f32 or f64 only, got {dt:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{assert_same_value_and_gradients, check, randn_f64};
    use candle_core::Var;

    /// The op and the composed ops (base linear, first factor, low-rank add) agree in value and
    /// in every gradient, with and without a frozen bias, below and above the size at which
    /// products are split over the threads.
    #[test]
    fn value_and_gradients_equal_the_composed_ops() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for (t, n, k, with_bias) in [(5, 6, 7, false), (5, 6, 7, true), (300, 320, 280, true)] {
            let x = Var::from_tensor(&randn_f64(&[2, t, k], 91, 1.0)?)?;
            let a = Var::from_tensor(&randn_f64(&[4, k], 92, 0.5)?)?;
            let b = Var::from_tensor(&randn_f64(&[n, 4], 93, 0.5)?)?;
            let w = randn_f64(&[n, k], 94, 1.0)?;
            let bias = randn_f64(&[n], 95, 1.0)?;
            let bias = with_bias.then_some(&bias);
            let probe = randn_f64(&[2, t, n], 96, 1.0)?;
            let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
            let got = pool.install(|| lora_linear(xt, &w, bias, at, bt, 0.7))?;
            let mut want = xt.broadcast_matmul(&w.t()?)?;
            if let Some(bias) = bias {
                want = want.broadcast_add(bias)?;
            }
            let low = xt.broadcast_matmul(&at.t()?)?.broadcast_matmul(&bt.t()?)?;
            let want = (want + (low * 0.7)?)?;
            assert_same_value_and_gradients(&pool, &got, &want, &probe, &[&x, &a, &b], 1e-10)?;
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        // 12 rows: above the matrix-vector cut-off, so the fused op runs.
        let x = randn_f64(&[3, 4, 5], 97, 1.0)?;
        let a = randn_f64(&[2, 5], 98, 1.0)?;
        let b = randn_f64(&[6, 2], 99, 1.0)?;
        let w = randn_f64(&[6, 5], 100, 1.0)?;
        let bias = randn_f64(&[6], 101, 1.0)?;
        let f = |t: &[Tensor]| lora_linear(&t[0], &w, Some(&bias), &t[1], &t[2], 1.5);
        let err = check(f, &[x, a, b], 1e-6)?;
        assert!(err < 1e-8, "rel error {err}");
        Ok(())
    }

    /// A trained bias stays outside the op and gets its gradient.
    #[test]
    fn trained_bias_gets_its_gradient() -> Result<()> {
        let x = randn_f64(&[3, 4, 5], 102, 1.0)?;
        let a = randn_f64(&[2, 5], 103, 1.0)?;
        let b = randn_f64(&[6, 2], 104, 1.0)?;
        let w = randn_f64(&[6, 5], 105, 1.0)?;
        let bias = randn_f64(&[6], 106, 1.0)?;
        let f = |t: &[Tensor]| lora_linear(&t[0], &w, Some(&t[3]), &t[1], &t[2], 0.5);
        let err = check(f, &[x, a, b, bias], 1e-6)?;
        assert!(err < 1e-8, "rel error {err}");
        Ok(())
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() -> Result<()> {
        let x = randn_f64(&[3, 4, 5], 107, 1.0)?;
        let w = randn_f64(&[6, 5], 108, 1.0)?;
        let a = randn_f64(&[2, 5], 109, 1.0)?;
        assert!(lora_linear(&x, &w, None, &a, &randn_f64(&[6, 3], 110, 1.0)?, 1.0).is_err());
        assert!(lora_linear(&x, &w, None, &randn_f64(&[2, 4], 111, 1.0)?, &a.t()?, 1.0).is_err());
        let x_bad = randn_f64(&[3, 4, 4], 112, 1.0)?;
        assert!(lora_linear(&x_bad, &w, None, &a, &randn_f64(&[6, 2], 113, 1.0)?, 1.0).is_err());
        Ok(())
    }
}
