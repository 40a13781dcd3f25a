//! `y + scale * z B^T`: a low-rank update (LoRA's second factor, its scale and the residual add)
//! as one op.
//!
//! Composed, it is a matmul, a scale and an add, each a node whose backward costs candle a
//! zero-filled `[tokens, out]` buffer and an addition into it, on one thread, for every adapted
//! linear. Here `y` is copied once and the product accumulates onto it; the backward hands `y` the
//! incoming gradient as it is and computes the two small factor gradients directly. Where a graph
//! of the gradients is kept (second-order MAML), off the CPU or with mixed dtypes, the composed
//! ops run.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

use super::frozen_linear::{frozen_matmul, linear, weight_grad};
use super::par_gemm::{self, Strided};
use super::{cpu_slice, first_order_fused};

/// `y + scale * z B^T` for `y: [..., n]`, `z: [..., r]`, `b: [n, r]`.
pub fn add_low_rank(y: &Tensor, z: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    if !first_order_fused(&[y, z, b]) {
        let d = (linear(z, b, None)? * scale)?.to_dtype(y.dtype())?;
        return y + d;
    }
    let (n, r) = b.dims2()?;
    let (yd, zd) = (y.dims(), z.dims());
    if yd.last() != Some(&n)
        || zd.last() != Some(&r)
        || y.elem_count() / n.max(1) != z.elem_count() / r.max(1)
    {
        candle_core::bail!(
            "low-rank add: y {yd:?}, z {zd:?}, B {:?} do not fit",
            b.dims()
        );
    }
    y.contiguous()?
        .apply_op3(&z.contiguous()?, &b.contiguous()?, LowRankAdd { scale })
}

struct LowRankAdd {
    scale: f64,
}

fn forward<T: WithDType>(
    y: &[T],
    z: &[T],
    b: &[T],
    (m, n, r): (usize, usize, usize),
    scale: f64,
) -> Result<Vec<T>> {
    let mut out = super::par_copy(y, 1 << 14, |_| {});
    let bt = Strided::transposed(b, 0, r);
    let beta = T::from_f64(scale);
    par_gemm::matmul_acc(&mut out, (m, n, r), Strided::row_major(z, 0, r), bt, beta)?;
    Ok(out)
}

impl CustomOp3 for LowRankAdd {
    fn name(&self) -> &'static str {
        "metapeft-low-rank-add"
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
        let (n, r) = l3.shape().dims2()?;
        let m = l1.shape().elem_count() / n.max(1);
        let mnr = (m, n, r);
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(forward(
                cpu_slice::<f32>(s1, l1)?,
                cpu_slice(s2, l2)?,
                cpu_slice(s3, l3)?,
                mnr,
                self.scale,
            )?),
            CpuStorage::F64(_) => CpuStorage::F64(forward(
                cpu_slice::<f64>(s1, l1)?,
                cpu_slice(s2, l2)?,
                cpu_slice(s3, l3)?,
                mnr,
                self.scale,
            )?),
            _ => candle_core::bail!("low-rank add: f32 or f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        z: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dy = y.track_op().then(|| g.clone());
        let dz = match z.track_op() {
            true => Some((frozen_matmul(&g, b)? * self.scale)?),
            false => None,
        };
        let db = match b.track_op() {
            true => Some((weight_grad(&g, z)? * self.scale)?),
            false => None,
        };
        Ok((dy, dz, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{assert_same_value_and_gradients, check, randn_f64};
    use candle_core::Var;

    #[test]
    fn value_and_gradients_equal_the_composed_ops() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        // 600 x 300 x 8 is above the size where the product is split over the threads.
        for (t, n) in [(3, 5), (300, 300)] {
            let y = Var::from_tensor(&randn_f64(&[2, t, n], 81, 1.0)?)?;
            let z = Var::from_tensor(&randn_f64(&[2, t, 8], 82, 1.0)?)?;
            let b = Var::from_tensor(&randn_f64(&[n, 8], 83, 1.0)?)?;
            let w = randn_f64(&[2, t, n], 84, 1.0)?;
            let (yt, zt, bt) = (y.as_tensor(), z.as_tensor(), b.as_tensor());
            let got = pool.install(|| add_low_rank(yt, zt, bt, 0.7))?;
            let want = (yt + (zt.broadcast_matmul(&bt.t()?)? * 0.7)?)?;
            assert_same_value_and_gradients(&pool, &got, &want, &w, &[&y, &z, &b], 1e-10)?;
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let y = randn_f64(&[2, 3, 5], 85, 1.0)?;
        let z = randn_f64(&[2, 3, 2], 86, 1.0)?;
        let b = randn_f64(&[5, 2], 87, 1.0)?;
        let err = check(|t| add_low_rank(&t[0], &t[1], &t[2], 1.5), &[y, z, b], 1e-6)?;
        assert!(err < 1e-8, "rel error {err}");
        Ok(())
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() -> Result<()> {
        let y = randn_f64(&[2, 3, 5], 88, 1.0)?;
        let z = randn_f64(&[2, 4, 2], 89, 1.0)?;
        let b = randn_f64(&[5, 2], 90, 1.0)?;
        assert!(add_low_rank(&y, &z, &b, 1.0).is_err());
        Ok(())
    }
}
