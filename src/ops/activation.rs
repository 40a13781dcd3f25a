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

/// erf in f32 by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7 in exact arithmetic, about
/// 4e-7 in f32: the resolution of `1 + erf`), several times cheaper than candle's f64 series.
fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_72 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * (-a * a).exp();
    y.copysign(x)
}

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

struct Gelu;

use candle_core::cpu::erf::erf_f64;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "metapeft-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(map(cpu_slice::<f32>(s, l)?, |v| {
                0.5 * v * (1.0 + erf_f32(v * std::f32::consts::FRAC_1_SQRT_2))
            })),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(map(cpu_slice::<f64>(s, l)?, |v| {
                0.5 * v * (1.0 + erf_f64(v / std::f64::consts::SQRT_2))
            })),
            _ => candle_core::bail!("gelu: unsupported dtype"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((g * gelu_prime(x)?)?))
    }
}

/// `gelu'(x) = Phi(x) + x phi(x)`, fused: the backward of GELU is then one kernel and one
/// product instead of eight tensor ops, each with its own temporary.
struct GeluPrime;

impl CustomOp1 for GeluPrime {
    fn name(&self) -> &'static str {
        "metapeft-gelu-prime"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(map(cpu_slice::<f32>(s, l)?, |v| {
                let cdf = 0.5 * (1.0 + erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
                cdf + v * (FRAC_1_SQRT_2PI as f32) * (-0.5 * v * v).exp()
            })),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(map(cpu_slice::<f64>(s, l)?, |v| {
                let cdf = 0.5 * (1.0 + erf_f64(v / std::f64::consts::SQRT_2));
                cdf + v * FRAC_1_SQRT_2PI * (-0.5 * v * v).exp()
            })),
            _ => candle_core::bail!("gelu: unsupported dtype"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // gelu''(x) = phi(x) (2 - x^2); composed, so third-order graphs stay right too.
        let pdf = ((x.sqr()? * -0.5)?.exp()? * FRAC_1_SQRT_2PI)?;
        let d = (pdf * (2.0 - x.sqr()?)?)?;
        Ok(Some((g * d)?))
    }
}

/// `gelu'(x)`, differentiable.
fn gelu_prime(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(GeluPrime)
    } else {
        let cdf = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
        let pdf = (x.sqr()? * -0.5)?.exp()? * FRAC_1_SQRT_2PI;
        cdf? + (x * pdf?)?
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
    fn gelu_second_derivative_matches_finite_differences() -> Result<()> {
        let x = randn_f64(&[4, 6], 43, 3.0)?;
        let err = check(|t| gelu_prime(&t[0]), &[x], 1e-6)?;
        assert!(err < 1e-7, "rel error {err}");
        Ok(())
    }

    #[test]
    fn f32_erf_is_within_its_bound_and_gelu_f32_matches_f64() -> Result<()> {
        let mut worst = 0f64;
        for i in -6000..=6000 {
            let x = i as f64 / 1000.0;
            worst = worst.max((erf_f32(x as f32) as f64 - erf_f64(x)).abs());
        }
        assert!(worst < 5e-7, "erf error {worst}");
        let x = randn_f64(&[64, 32], 44, 3.0)?;
        let want = gelu(&x)?;
        let got = gelu(&x.to_dtype(candle_core::DType::F32)?)?.to_dtype(candle_core::DType::F64)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-5, "gelu f32 vs f64: {diff}");
        let want = gelu_prime(&x)?;
        let got =
            gelu_prime(&x.to_dtype(candle_core::DType::F32)?)?.to_dtype(candle_core::DType::F64)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-5, "gelu' f32 vs f64: {diff}");
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
