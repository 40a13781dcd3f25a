//! A linear map by a frozen weight: `y = x W^T`, whose backward computes only the input gradient.
//!
//! candle's matmul backward always computes the weight gradient too: for a frozen base that is a
//! whole wasted matmul per linear per step. The backward here is the same op with the weight's
//! orientation flipped, so it is itself differentiable (second-order MAML) and still skips `dW`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// lhs layout, rhs layout, (batch, m, n, k), output shape.
type MatmulPlan = (Layout, Layout, (usize, usize, usize, usize), Shape);

struct FrozenMatmul {
    /// false: `y = x W^T` with `W: [n, k]`; true: `y = x W` with `W: [k, n]`.
    weight_is_kn: bool,
}

impl FrozenMatmul {
    fn plan(&self, l1: &Layout, l2: &Layout) -> Result<MatmulPlan> {
        let xd = l1.dims();
        let k = *xd.last().unwrap_or(&0);
        let m = l1.shape().elem_count() / k.max(1);
        let (wr, wc) = match l2.dims() {
            [r, c] => (*r, *c),
            d => candle_core::bail!("frozen_linear: weight must be 2-d, got {d:?}"),
        };
        let (n, rhs) = if self.weight_is_kn {
            (wc, l2.clone())
        } else {
            (wr, l2.transpose(0, 1)?)
        };
        let wk = if self.weight_is_kn { wr } else { wc };
        if wk != k {
            candle_core::bail!(
                "frozen_linear: input has {k} features but the weight is {:?}",
                l2.dims()
            );
        }
        let lhs = Layout::contiguous_with_offset((m, k), l1.start_offset());
        let mut out = xd.to_vec();
        if let Some(last) = out.last_mut() {
            *last = n;
        }
        Ok((lhs, rhs, (1, m, n, k), Shape::from(out)))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "metapeft-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (lhs, rhs, bmnk, shape) = self.plan(l1, l2)?;
        let (_, m, n, k) = bmnk;
        if !self.weight_is_kn
            && m <= super::matvec::MAX_ROWS
            && l2.is_contiguous()
            && super::matvec::enabled()
        {
            if let (CpuStorage::F32(_), CpuStorage::F32(_)) = (s1, s2) {
                // A few rows (decoding): stream the weight once instead of packing it for gemm.
                let x = super::cpu_slice::<f32>(s1, &lhs)?;
                let w = super::cpu_slice::<f32>(s2, l2)?;
                let mut out = vec![0f32; m * n];
                super::matvec::matvec_f32(x, m, w, n, k, &mut out);
                return Ok((CpuStorage::F32(out), shape));
            }
        }
        let mnk = (m, n, k);
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::BF16(_) | CpuStorage::F16(_))
                if !super::par_gemm::enabled() =>
            {
                let (w, rhs) = widen_weight(s2, l2, &rhs)?;
                Ok((s1.matmul(&w, bmnk, &lhs, &rhs)?, shape))
            }
            _ if !super::par_gemm::enabled() => Ok((s1.matmul(s2, bmnk, &lhs, &rhs)?, shape)),
            (CpuStorage::F32(_), CpuStorage::BF16(_) | CpuStorage::F16(_)) => {
                // A half-precision frozen weight is widened into a temporary that lives only for
                // this product: the graph keeps the half-size weight, the matmul runs in f32.
                let (w, rhs) = widen_weight(s2, l2, &rhs)?;
                let (x, w) = (s1.as_slice::<f32>()?, w.as_slice::<f32>()?);
                let y = banded(mnk, x, &lhs, w, &rhs)?;
                Ok((CpuStorage::F32(y), shape))
            }
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                Ok((CpuStorage::F32(banded(mnk, x, &lhs, w, &rhs)?), shape))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                Ok((CpuStorage::F64(banded(mnk, x, &lhs, w, &rhs)?), shape))
            }
            _ => Ok((s1.matmul(s2, bmnk, &lhs, &rhs)?, shape)),
        }
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (lhs, rhs, bmnk, shape) = self.plan(l1, l2)?;
        Ok((s1.matmul(s2, bmnk, &lhs, &rhs)?, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let flipped = FrozenMatmul {
            weight_is_kn: !self.weight_is_kn,
        };
        Ok((Some(g.contiguous()?.apply_op2(w, flipped)?), None))
    }
}

/// `y = x W^T + b` for a frozen `W: [n, k]` and a frozen bias `b: [n]` (f32/f64 on the CPU): the
/// output starts as the bias rows and the product accumulates onto it, so the bias costs no
/// separate pass and no node of its own.
struct FrozenLinearBias {
    bias: Tensor,
}

impl FrozenLinearBias {
    fn run<T: candle_core::WithDType>(
        &self,
        x: &[T],
        w: &[T],
        mnk: (usize, usize, usize),
    ) -> Result<Vec<T>> {
        let bias = self.bias.flatten_all()?.to_vec1::<T>()?;
        frozen_product(x, w, Some(&bias), mnk)
    }
}

/// `x W^T (+ bias)` for row-major `x: [m, k]`, `W: [n, k]` and `bias: [n]`, banded over the
/// threads: the output starts as the bias rows (or is written once by the product).
pub(crate) fn frozen_product<T: candle_core::WithDType>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    (m, n, k): (usize, usize, usize),
) -> Result<Vec<T>> {
    use super::par_gemm::{matmul, matmul_acc, Strided};
    if bias.is_some_and(|b| b.len() != n) || x.len() != m * k || w.len() != n * k {
        candle_core::bail!(
            "frozen_linear: x of {}, W of {}, bias of {:?} for [{m}, {n}, {k}]",
            x.len(),
            w.len(),
            bias.map(<[T]>::len)
        );
    }
    let (xv, wt) = (Strided::row_major(x, 0, k), Strided::transposed(w, 0, k));
    let Some(bias) = bias else {
        return matmul((m, n, k), xv, wt);
    };
    let mut out = Vec::with_capacity(m * n);
    for _ in 0..m {
        out.extend_from_slice(bias);
    }
    matmul_acc(&mut out, (m, n, k), xv, wt, T::one())?;
    Ok(out)
}

/// `residual (+ bias) + x W^T` for row-major `x: [m, k]`, `W: [n, k]`, `bias: [n]` and
/// `residual: [m, n]`: the output starts as a copy of the residual (made on the threads) and the
/// product accumulates onto it.
pub(crate) fn frozen_product_onto<T: candle_core::WithDType>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    residual: &[T],
    (m, n, k): (usize, usize, usize),
) -> Result<Vec<T>> {
    use super::par_gemm::{matmul_acc, Strided};
    if residual.len() != m * n || bias.is_some_and(|b| b.len() != n) {
        candle_core::bail!(
            "frozen_linear: residual of {}, bias of {:?} for [{m}, {n}]",
            residual.len(),
            bias.map(<[T]>::len)
        );
    }
    let mut out = super::par_copy(residual, n * super::rows_per_task(n), |rows| {
        if let Some(b) = bias {
            for row in rows.chunks_exact_mut(n) {
                row.iter_mut().zip(b).for_each(|(o, &b)| *o += b);
            }
        }
    });
    let (xv, wt) = (Strided::row_major(x, 0, k), Strided::transposed(w, 0, k));
    matmul_acc(&mut out, (m, n, k), xv, wt, T::one())?;
    Ok(out)
}

/// Whether an op built on a frozen product (`w` untracked) may run its fused first-order
/// kernels on `rows` rows of `ts`: CPU f32/f64 of one dtype, no graph of gradients kept, banded
/// products on, and more rows than decoding's matrix-vector kernel takes.
pub(crate) fn frozen_product_fuses(ts: &[&Tensor], w: &Tensor, rows: usize) -> bool {
    super::first_order_fused(ts)
        && super::par_gemm::enabled()
        && !w.track_op()
        && rows > super::matvec::MAX_ROWS
}

impl CustomOp2 for FrozenLinearBias {
    fn name(&self) -> &'static str {
        "metapeft-frozen-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = l2.shape().dims2()?;
        let m = l1.shape().elem_count() / k.max(1);
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(self.run(
                super::cpu_slice(s1, l1)?,
                super::cpu_slice(s2, l2)?,
                (m, n, k),
            )?),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(self.run(
                super::cpu_slice(s1, l1)?,
                super::cpu_slice(s2, l2)?,
                (m, n, k),
            )?),
            _ => candle_core::bail!("frozen_linear: fused bias needs f32 or f64"),
        };
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = g
            .contiguous()?
            .apply_op2(w, FrozenMatmul { weight_is_kn: true })?;
        Ok((Some(dx), None))
    }
}

/// `y = x W^T` for a trained `W: [n, k]`, first order only (the caller keeps candle's matmul where
/// a graph of the gradients is kept): the backward gives `dX = g W` through the frozen op and
/// `dW = g^T x` through [`WeightGrad`], both banded over the threads.
struct TrainedMatmul;

impl CustomOp2 for TrainedMatmul {
    fn name(&self) -> &'static str {
        "metapeft-trained-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let as_frozen = FrozenMatmul {
            weight_is_kn: false,
        };
        as_frozen.cpu_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = match x.track_op() {
            true => Some(g.apply_op2(&w.detach(), FrozenMatmul { weight_is_kn: true })?),
            false => None,
        };
        Ok((dx, Some(weight_grad(&g, x)?)))
    }
}

/// `g^T x` for `g: [..., n]` and `x: [..., k]`: a linear's weight gradient `[n, k]`, first order
/// (no graph through it).
pub(crate) fn weight_grad(g: &Tensor, x: &Tensor) -> Result<Tensor> {
    g.contiguous()?
        .detach()
        .apply_op2(&x.contiguous()?.detach(), WeightGrad)
}

struct WeightGrad;

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "metapeft-linear-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use super::par_gemm::{matmul, Strided};
        let n = *l1.dims().last().unwrap_or(&0);
        let k = *l2.dims().last().unwrap_or(&0);
        let m = l1.shape().elem_count() / n.max(1);
        if l2.shape().elem_count() != m * k {
            candle_core::bail!("linear weight gradient: {:?} vs {:?}", l1.dims(), l2.dims());
        }
        fn go<T: candle_core::WithDType>(
            g: &[T],
            x: &[T],
            (m, n, k): (usize, usize, usize),
        ) -> Result<Vec<T>> {
            matmul(
                (n, k, m),
                Strided::transposed(g, 0, n),
                Strided::row_major(x, 0, k),
            )
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(go(
                super::cpu_slice::<f32>(s1, l1)?,
                super::cpu_slice::<f32>(s2, l2)?,
                (m, n, k),
            )?),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(go(
                super::cpu_slice::<f64>(s1, l1)?,
                super::cpu_slice::<f64>(s2, l2)?,
                (m, n, k),
            )?),
            _ => candle_core::bail!("linear weight gradient: f32 or f64 on the CPU only"),
        };
        Ok((out, Shape::from((n, k))))
    }
}

/// The product through [`super::par_gemm`] (one gemm per thread, output written once).
fn banded<T: candle_core::WithDType>(
    mnk: (usize, usize, usize),
    x: &[T],
    lx: &Layout,
    w: &[T],
    lw: &Layout,
) -> Result<Vec<T>> {
    use super::par_gemm::{matmul, Strided};
    matmul(
        mnk,
        Strided::from_layout(x, lx)?,
        Strided::from_layout(w, lw)?,
    )
}

/// The contiguous bf16/f16 weight of layout `l` as f32, with `rhs` (a view of `l`) re-based onto
/// the copy.
fn widen_weight(s: &CpuStorage, l: &Layout, rhs: &Layout) -> Result<(CpuStorage, Layout)> {
    let out = widen_to_vec(s, l)?;
    let rebased = Layout::new(rhs.shape().clone(), rhs.stride().to_vec(), 0);
    Ok((CpuStorage::F32(out), rebased))
}

/// The contiguous bf16/f16 data of layout `l`, widened to f32 on the threads.
fn widen_to_vec(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("frozen_linear: weight not contiguous".into()))?;
    let mut out = vec![0f32; b - a];
    const CHUNK: usize = 1 << 16;
    match s {
        CpuStorage::BF16(v) => out
            .par_chunks_mut(CHUNK)
            .zip(v[a..b].par_chunks(CHUNK))
            .for_each(|(o, i)| o.iter_mut().zip(i).for_each(|(o, i)| *o = i.to_f32())),
        CpuStorage::F16(v) => out
            .par_chunks_mut(CHUNK)
            .zip(v[a..b].par_chunks(CHUNK))
            .for_each(|(o, i)| o.iter_mut().zip(i).for_each(|(o, i)| *o = i.to_f32())),
        _ => candle_core::bail!("frozen_linear: cannot widen a {:?} weight", s.dtype()),
    }
    Ok(out)
}

/// A bf16/f16 CPU tensor widened to f32 on the threads (other tensors as they are): a frozen
/// half-precision weight, for one product or one fused op.
pub(crate) fn widened(t: &Tensor) -> Result<Tensor> {
    if !t.device().is_cpu() || !matches!(t.dtype(), DType::BF16 | DType::F16) {
        return Ok(t.clone());
    }
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else {
        candle_core::bail!("widened: not a CPU tensor");
    };
    let w = widen_to_vec(s, l)?;
    Tensor::from_vec(w, t.shape(), t.device())
}

/// Whether the op takes `w` as stored: half-precision weights with f32 activations on the CPU are
/// widened inside the op, so a bf16 base keeps half the weight memory.
pub(crate) fn widened_in_op(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && matches!(w.dtype(), DType::BF16 | DType::F16)
}

/// `x W^T` for a frozen `W: [out, in]` and `x: [..., in]`; no gradient flows to `W`.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = if w.dtype() != x.dtype() && !widened_in_op(x, w) {
        w.to_dtype(x.dtype())?
    } else {
        w.clone()
    };
    let w = if w.is_contiguous() {
        w
    } else {
        w.contiguous()?
    };
    x.contiguous()?.apply_op2(
        &w.detach(),
        FrozenMatmul {
            weight_is_kn: false,
        },
    )
}

/// Whether a frozen linear takes its frozen bias inside the product ([`FrozenLinearBias`]).
fn bias_fuses(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    super::fused_ok(x)
        && super::par_gemm::enabled()
        && !b.track_op()
        && w.dtype() == x.dtype()
        && b.dtype() == x.dtype()
        && w.is_contiguous()
        && w.rank() == 2
        && b.elem_count() == w.dim(0).unwrap_or(0)
        && x.dims().last() == w.dims().last()
        // A few rows (decoding) take the matrix-vector kernel.
        && x.elem_count() / w.dim(1).unwrap_or(1).max(1) > super::matvec::MAX_ROWS
}

/// `x W` for a frozen `W: [in, out]` (the orientation of a linear's input gradient); no gradient
/// flows to `W`.
pub(crate) fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &w.contiguous()?.detach(),
        FrozenMatmul { weight_is_kn: true },
    )
}

/// `x W^T + b`, choosing the frozen op when `W` is not being trained.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = if w.track_op()
        && super::fused_ok(x)
        && x.dtype() == w.dtype()
        && super::par_gemm::enabled()
        && !crate::meta::second_order::keeps_grad_graph()
    {
        x.contiguous()?.apply_op2(&w.contiguous()?, TrainedMatmul)?
    } else if w.track_op() {
        let (out, inp) = w.dims2()?;
        let mut dims = x.dims().to_vec();
        let m = x.elem_count() / inp.max(1);
        let y = x.reshape((m, inp))?.matmul(&w.t()?)?;
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        y.reshape(dims)?
    } else {
        if let Some(b) = b.filter(|b| bias_fuses(x, w, b)) {
            return x
                .contiguous()?
                .apply_op2(&w.detach(), FrozenLinearBias { bias: b.detach() });
        }
        frozen_linear(x, w)?
    };
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{assert_same_value_and_gradients, check, randn_f64};
    use candle_core::Var;

    #[test]
    fn input_gradient_matches_finite_differences() -> Result<()> {
        let x = randn_f64(&[2, 3, 5], 51, 1.0)?;
        let w = randn_f64(&[4, 5], 52, 1.0)?;
        let err = check(|t| frozen_linear(&t[0], &w), &[x], 1e-6)?;
        assert!(err < 1e-8, "rel error {err}");
        Ok(())
    }

    #[test]
    fn matches_matmul_and_gives_no_weight_gradient() -> Result<()> {
        let x = randn_f64(&[3, 5], 53, 1.0)?;
        let w = Var::from_tensor(&randn_f64(&[4, 5], 54, 1.0)?)?;
        let y = frozen_linear(&x, w.as_tensor())?;
        let want = x.matmul(&w.as_tensor().t()?)?;
        let diff = (&y - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12);
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(w.as_tensor()).is_none());
        Ok(())
    }

    #[test]
    fn trainable_weight_path_gets_both_gradients() -> Result<()> {
        let x = randn_f64(&[2, 3, 5], 55, 1.0)?;
        let w = randn_f64(&[4, 5], 56, 1.0)?;
        let b = randn_f64(&[4], 57, 1.0)?;
        let err = check(|t| linear(&t[0], &t[1], Some(&t[2])), &[x, w, b], 1e-6)?;
        assert!(err < 1e-8, "rel error {err}");
        Ok(())
    }

    #[test]
    fn a_trained_weight_gets_the_matmul_gradients_at_banded_sizes() -> Result<()> {
        use candle_core::Var;
        // 600 x 100 x 200: above the size where the product is split over the threads.
        let x = Var::from_tensor(&randn_f64(&[2, 300, 200], 61, 1.0)?)?;
        let w = Var::from_tensor(&randn_f64(&[100, 200], 62, 1.0)?)?;
        let r = randn_f64(&[2, 300, 100], 63, 1.0)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let got = pool.install(|| linear(x.as_tensor(), w.as_tensor(), None))?;
        let want = x.as_tensor().broadcast_matmul(&w.as_tensor().t()?)?;
        assert_same_value_and_gradients(&pool, &got, &want, &r, &[&x, &w], 1e-9)?;
        Ok(())
    }

    #[test]
    fn a_frozen_bias_inside_the_product_equals_adding_it() -> Result<()> {
        use candle_core::Var;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for t in [5, 300] {
            let x = Var::from_tensor(&randn_f64(&[2, t, 200], 91, 1.0)?)?;
            let w = randn_f64(&[100, 200], 92, 1.0)?;
            let b = randn_f64(&[100], 93, 1.0)?;
            let r = randn_f64(&[2, t, 100], 94, 1.0)?;
            let got = pool.install(|| linear(x.as_tensor(), &w, Some(&b)))?;
            let want = x.as_tensor().broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
            assert_same_value_and_gradients(&pool, &got, &want, &r, &[&x], 1e-10)?;
        }
        Ok(())
    }

    #[test]
    fn half_precision_weights_are_widened_inside_the_op() -> Result<()> {
        use candle_core::Var;
        let x = Var::from_tensor(&randn_f64(&[2, 3, 64], 60, 1.0)?.to_dtype(DType::F32)?)?;
        let w32 = randn_f64(&[48, 64], 61, 1.0)?.to_dtype(DType::F32)?;
        for dt in [DType::BF16, DType::F16] {
            let wh = w32.to_dtype(dt)?;
            // The reference: the same rounded weight, in f32.
            let wr = wh.to_dtype(DType::F32)?;
            let y = frozen_linear(x.as_tensor(), &wh)?;
            assert_eq!(y.dtype(), DType::F32);
            let want = frozen_linear(x.as_tensor(), &wr)?;
            // Relative to the largest value: the two products may sum in different orders (the
            // f32 reference can take the matrix-vector path, the widened weight gemm).
            let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
                let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
                Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
            };
            let diff = rel(&y, &want)?;
            assert!(diff < 1e-5, "{dt:?}: forward differs by {diff}");
            let g = (y.sqr()?.sum_all()?).backward()?;
            let gw = (want.sqr()?.sum_all()?).backward()?;
            let (a, b) = (
                g.get(x.as_tensor()).unwrap(),
                gw.get(x.as_tensor()).unwrap(),
            );
            let diff = rel(a, b)?;
            assert!(diff < 1e-5, "{dt:?}: input gradient differs by {diff}");
            // A non-contiguous half-precision weight is made contiguous, still in half precision.
            let strided = wh.t()?.contiguous()?.t()?;
            let y2 = frozen_linear(x.as_tensor(), &strided)?;
            assert!(rel(&y2, &y)? < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn wrong_input_width_is_an_error() -> Result<()> {
        let x = randn_f64(&[2, 6], 58, 1.0)?;
        let w = randn_f64(&[4, 5], 59, 1.0)?;
        let err = frozen_linear(&x, &w).unwrap_err().to_string();
        assert!(err.contains("6 features"), "{err}");
        Ok(())
    }
}
