//! Softmax over the last dimension.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType, D};
use num_traits::Float;
use rayon::prelude::*;

use super::exp::{exp_from_max, ExpSlice};
use super::{cpu_slice, fused_ok, rows_per_task};

struct Softmax;

fn fwd<T: WithDType + Float + ExpSlice + std::ops::AddAssign + std::ops::MulAssign>(
    x: &[T],
    dim: usize,
) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .with_min_len(rows_per_task(dim))
        .for_each(|(o, xr)| {
            o.copy_from_slice(xr);
            let (_, sum) = exp_from_max(o);
            let inv = T::from(sum.recip()).unwrap_or_else(T::nan);
            o.iter_mut().for_each(|o| *o *= inv);
        });
    out
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "metapeft-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dim = l.dims().last().copied().unwrap_or(1);
        let out = match s {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(fwd(cpu_slice(s, l)?, dim)),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(fwd(cpu_slice(s, l)?, dim)),
            _ => candle_core::bail!("softmax: unsupported dtype"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some(g.broadcast_sub(&dot)?.mul(y)?))
    }
}

/// Softmax over the last dimension, with a backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        let e = x
            .broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?
            .exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, randn_f64};

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let x = randn_f64(&[3, 7], 21, 2.0)?;
        let err = check(|t| softmax_last_dim(&t[0]), &[x], 1e-6)?;
        assert!(err < 1e-7, "rel error {err}");
        Ok(())
    }

    #[test]
    fn backward_matches_closed_form() -> Result<()> {
        // d/dx sum(softmax(x) * c) = (c - sum(c * y)) * y
        let x = randn_f64(&[2, 5], 22, 1.0)?;
        let c = randn_f64(&[2, 5], 23, 1.0)?;
        let y = softmax_last_dim(&x)?;
        let expected = (&c - (&c * &y)?.sum_keepdim(D::Minus1)?.broadcast_as((2, 5))?)?.mul(&y)?;
        let xv = candle_core::Var::from_tensor(&x)?;
        let g = (softmax_last_dim(xv.as_tensor())? * &c)?
            .sum_all()?
            .backward()?;
        let got = g.get(xv.as_tensor()).expect("gradient");
        let diff = (got - expected)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        Ok(())
    }
}
