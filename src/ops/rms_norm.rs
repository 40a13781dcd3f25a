//! RMSNorm over the last dimension: `y = x / sqrt(mean(x^2) + eps) * w`.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType, D};
use num_traits::Float;

use super::norm_grad::{fused_norm_backward, row_stats};
use super::{chunk_of, cpu_slice, fused_ok, par_fill};

struct RmsNorm {
    eps: f64,
}

pub(crate) fn fwd<T: WithDType + Float>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let dim = w.len();
    // eps as the input's dtype holds it.
    let eps = WithDType::to_f64(T::from(eps).unwrap_or_else(T::epsilon));
    par_fill(
        x.len(),
        dim,
        |i| {
            let xr = chunk_of(x, dim, i);
            let (_, r) = row_stats(xr, false, eps);
            let r = T::from(r).unwrap_or_else(T::nan);
            xr.iter().zip(w).map(move |(&xv, &wv)| xv * r * wv)
        },
        |_, _| {},
    )
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "metapeft-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                f32::to_cpu_storage_owned(fwd(cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, self.eps))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                f64::to_cpu_storage_owned(fwd(cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, self.eps))
            }
            _ => candle_core::bail!("rms_norm: unsupported dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if let Some(f) = fused_norm_backward(x, w, g, self.eps, false, w.track_op())? {
            return Ok((Some(f.dx), f.dw));
        }
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xhat = x.broadcast_mul(&r)?;
        let gx = g.broadcast_mul(w)?;
        let proj = (&gx * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = gx.sub(&xhat.broadcast_mul(&proj)?)?.broadcast_mul(&r)?;
        // A frozen weight gets no gradient (candle would keep it until the backward ends).
        if !w.track_op() {
            return Ok((Some(dx), None));
        }
        let dim = w.elem_count();
        let dw = (g * &xhat)?
            .reshape(((), dim))?
            .sum(0)?
            .reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// RMSNorm with a weight of shape `[dim]` over the last dimension of `x`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    // Weights stored in bf16/f16 compute in the activations' dtype.
    let w = &w.to_dtype(x.dtype())?;
    if fused_ok(x) {
        x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
    } else {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&r)?.broadcast_mul(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, randn_f64};

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let x = randn_f64(&[2, 3, 8], 1, 1.0)?;
        let w = randn_f64(&[8], 2, 1.0)?;
        let err = check(|t| rms_norm(&t[0], &t[1], 1e-5), &[x, w], 1e-6)?;
        assert!(err < 1e-7, "rel error {err}");
        Ok(())
    }

    #[test]
    fn fused_matches_composed_in_f32() -> Result<()> {
        let x = randn_f64(&[5, 16], 3, 2.0)?.to_dtype(candle_core::DType::F32)?;
        let w = randn_f64(&[16], 4, 1.0)?.to_dtype(candle_core::DType::F32)?;
        let fused = rms_norm(&x, &w, 1e-6)?;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?
            .sqrt()?
            .recip()?;
        let composed = x.broadcast_mul(&r)?.broadcast_mul(&w)?;
        let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "diff {diff}");
        Ok(())
    }
}
