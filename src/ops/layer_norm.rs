//! LayerNorm over the last dimension: `y = (x - mean) / sqrt(var + eps) * w + b`.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType, D};
use num_traits::Float;

use super::norm_grad::{fused_norm_backward, row_stats};
use super::{chunk_of, cpu_slice, fused_ok, par_fill};

struct LayerNorm {
    eps: f64,
}

/// LayerNorm over rows of `w.len()` values, on the threads.
pub(crate) fn fwd<T: WithDType + Float>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let dim = w.len();
    par_fill(
        x.len(),
        dim,
        |i| {
            let xr = chunk_of(x, dim, i);
            let (mean, r) = row_stats(xr, true, eps);
            let r = T::from(r).unwrap_or_else(T::nan);
            let mean = T::from(mean).unwrap_or_else(T::nan);
            xr.iter()
                .zip(w)
                .zip(b)
                .map(move |((&x, &w), &b)| (x - mean) * r * w + b)
        },
        |_, _| {},
    )
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "metapeft-layer-norm"
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
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                f32::to_cpu_storage_owned(fwd(
                    cpu_slice(s1, l1)?,
                    cpu_slice(s2, l2)?,
                    cpu_slice(s3, l3)?,
                    self.eps,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                f64::to_cpu_storage_owned(fwd(
                    cpu_slice(s1, l1)?,
                    cpu_slice(s2, l2)?,
                    cpu_slice(s3, l3)?,
                    self.eps,
                ))
            }
            _ => candle_core::bail!("layer_norm: unsupported dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_w, want_b) = (w.track_op(), b.track_op());
        if let Some(f) = fused_norm_backward(x, w, g, self.eps, true, want_w || want_b)? {
            let dw = f.dw.filter(|_| want_w);
            let db = f.db.filter(|_| want_b);
            return Ok((Some(f.dx), dw, db));
        }
        let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xhat = xc.broadcast_mul(&r)?;
        let gx = g.broadcast_mul(w)?;
        let m1 = gx.mean_keepdim(D::Minus1)?;
        let m2 = (&gx * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = gx
            .broadcast_sub(&m1)?
            .sub(&xhat.broadcast_mul(&m2)?)?
            .broadcast_mul(&r)?;
        // Frozen parameters get no gradient (candle would keep it until the backward ends).
        let dim = w.elem_count();
        let dw = match want_w {
            true => Some(
                (g * &xhat)?
                    .reshape(((), dim))?
                    .sum(0)?
                    .reshape(w.shape())?,
            ),
            false => None,
        };
        let db = match want_b {
            true => Some(g.reshape(((), dim))?.sum(0)?.reshape(b.shape())?),
            false => None,
        };
        Ok((Some(dx), dw, db))
    }
}

/// LayerNorm with weight and bias of shape `[dim]` over the last dimension of `x`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let (w, b) = (&w.to_dtype(x.dtype())?, &b.to_dtype(x.dtype())?);
    if fused_ok(x) {
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps })
    } else {
        let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        xc.broadcast_mul(&r)?.broadcast_mul(w)?.broadcast_add(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, randn_f64};

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let x = randn_f64(&[2, 3, 8], 11, 1.0)?;
        let w = randn_f64(&[8], 12, 1.0)?;
        let b = randn_f64(&[8], 13, 1.0)?;
        let err = check(|t| layer_norm(&t[0], &t[1], &t[2], 1e-5), &[x, w, b], 1e-6)?;
        assert!(err < 1e-7, "rel error {err}");
        Ok(())
    }

    #[test]
    fn normalises_rows() -> Result<()> {
        let x = randn_f64(&[4, 32], 14, 3.0)?;
        let w = Tensor::ones(32, candle_core::DType::F64, x.device())?;
        let b = Tensor::zeros(32, candle_core::DType::F64, x.device())?;
        let y = layer_norm(&x, &w, &b, 0.0)?;
        let mean = y.mean(D::Minus1)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let var = y.sqr()?.mean(D::Minus1)?.to_vec1::<f64>()?;
        assert!(mean < 1e-12);
        assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-9), "{var:?}");
        Ok(())
    }
}
