//! Element-wise activations: SiLU (Llama FFN) and exact (erf) GELU (BERT).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use super::{cpu_slice, fused_ok};

const CHUNK: usize = 4096;

fn map<T: WithDType + Float>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, xs)| o.iter_mut().zip(xs).for_each(|(o, &v)| *o = f(v)));
    out
}

struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "metapeft-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => {
                f32::to_cpu_storage_owned(map(cpu_slice::<f32>(s, l)?, |v| v / (1.0 + (-v).exp())))
            }
            CpuStorage::F64(_) => {
                f64::to_cpu_storage_owned(map(cpu_slice::<f64>(s, l)?, |v| v / (1.0 + (-v).exp())))
            }
            _ => candle_core::bail!("silu: unsupported dtype"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // silu'(x) = s (1 + x (1 - s)), s = sigmoid(x)
        let s = (x.neg()?.exp()? + 1.0)?.recip()?;
        let d = ((x * (1.0 - &s)?)? + 1.0)?.mul(&s)?;
        Ok(Some((g * d)?))
    }
}

/// `x * sigmoid(x)`, with a backward.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Silu)
    } else {
        x * (x.neg()?.exp()? + 1.0)?.recip()?
    }
}

struct Gelu;

use candle_core::cpu::erf::erf_f64;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "metapeft-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(map(cpu_slice::<f32>(s, l)?, |v| {
                (0.5 * v as f64 * (1.0 + erf_f64(v as f64 / std::f64::consts::SQRT_2))) as f32
            })),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(map(cpu_slice::<f64>(s, l)?, |v| {
                0.5 * v * (1.0 + erf_f64(v / std::f64::consts::SQRT_2))
            })),
            _ => candle_core::bail!("gelu: unsupported dtype"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // gelu'(x) = Phi(x) + x phi(x)
        let cdf = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
        let pdf = (x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
        let d = (cdf? + (x * pdf?)?)?;
        Ok(Some((g * d)?))
    }
}

/// Exact GELU, `x * Phi(x)` (the `gelu` of BERT configs), with a backward.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x * (((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, randn_f64};

    #[test]
    fn silu_gradient_matches_finite_differences() -> Result<()> {
        let x = randn_f64(&[4, 6], 41, 4.0)?;
        let err = check(|t| silu(&t[0]), &[x], 1e-6)?;
        assert!(err < 1e-7, "rel error {err}");
        Ok(())
    }

    #[test]
    fn gelu_gradient_matches_finite_differences() -> Result<()> {
        let x = randn_f64(&[4, 6], 42, 4.0)?;
        let err = check(|t| gelu(&t[0]), &[x], 1e-6)?;
        assert!(err < 1e-7, "rel error {err}");
        Ok(())
    }

    #[test]
    fn gelu_known_values() -> Result<()> {
        // torch.nn.functional.gelu(torch.tensor([-1., 0.5, 2.]), approximate='none')
        let x = Tensor::new(&[-1f64, 0.5, 2.0], &candle_core::Device::Cpu)?;
        let y = gelu(&x)?.to_vec1::<f64>()?;
        let want = [
            -0.15865525393145707,
            0.34573123063700656,
            1.9544997361036416,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        Ok(())
    }
}
