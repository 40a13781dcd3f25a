//! Element-wise activations: SiLU (Llama FFN) and exact (erf) GELU (BERT).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use super::exp::ExpSlice;
use super::{chunk_of, cpu_slice, first_order_fused, fused_ok, par_fill, with_cpu_slices};

const CHUNK: usize = 4096;

fn map<T: WithDType + Float>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let f = &f;
    par_fill(
        x.len(),
        CHUNK,
        |i| chunk_of(x, CHUNK, i).iter().map(move |&v| f(v)),
        |_, _| {},
    )
}

/// `f(x, exp(arg(x)))` per element, the exponentials over whole chunks (vectorised).
fn map_with_exp<T: WithDType + Float + ExpSlice>(
    x: &[T],
    arg: impl Fn(T) -> T + Sync,
    f: impl Fn(T, T) -> T + Sync,
) -> Vec<T> {
    let arg = &arg;
    par_fill(
        x.len(),
        CHUNK,
        |i| chunk_of(x, CHUNK, i).iter().map(move |&v| arg(v)),
        |i, o| {
            T::exp_in_place(o);
            let xs = chunk_of(x, CHUNK, i);
            o.iter_mut().zip(xs).for_each(|(o, &v)| *o = f(v, *o));
        },
    )
}

/// `f(x, exp(-x))` per element.
fn map_with_exp_neg<T: WithDType + Float + ExpSlice>(
    x: &[T],
    f: impl Fn(T, T) -> T + Sync,
) -> Vec<T> {
    map_with_exp(x, |v| -v, f)
}

/// `f(x, exp(-x^2 / 2))` per element, in f32: GELU's `erf(x / sqrt 2)` and `phi(x)` share it.
fn map_with_gauss_f32(x: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    map_with_exp(x, |v| -0.5 * v * v, f)
}

/// `f(x, exp(arg(x)), g)` per element of `x` and `g`, the exponentials over whole chunks.
fn zip_map_with_exp<T: WithDType + Float + ExpSlice>(
    x: &[T],
    g: &[T],
    arg: impl Fn(T) -> T + Sync,
    f: impl Fn(T, T, T) -> T + Sync,
) -> Vec<T> {
    let arg = &arg;
    par_fill(
        x.len(),
        CHUNK,
        |i| chunk_of(x, CHUNK, i).iter().map(move |&v| arg(v)),
        |i, o| {
            T::exp_in_place(o);
            let (xs, gs) = (chunk_of(x, CHUNK, i), chunk_of(g, CHUNK, i));
            for ((o, &v), &g) in o.iter_mut().zip(xs).zip(gs) {
                *o = f(v, *o, g);
            }
        },
    )
}

fn silu_of<T: Float>(v: T, exp_neg: T) -> T {
    v / (T::one() + exp_neg)
}

struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "metapeft-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => {
                f32::to_cpu_storage_owned(map_with_exp_neg(cpu_slice::<f32>(s, l)?, silu_of))
            }
            CpuStorage::F64(_) => {
                f64::to_cpu_storage_owned(map_with_exp_neg(cpu_slice::<f64>(s, l)?, silu_of))
            }
            _ => candle_core::bail!("silu: unsupported dtype"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if first_order_fused(&[x, g]) {
            let (shape, dev) = (x.shape(), x.device());
            fn d<T: Float>(v: T, e: T, g: T) -> T {
                g * silu_prime_of(v, e)
            }
            return Ok(Some(match x.dtype() {
                candle_core::DType::F32 => with_cpu_slices::<f32, _>(&[x, g], |s| {
                    Tensor::from_vec(zip_map_with_exp(s[0], s[1], |v| -v, d), shape, dev)
                })?,
                _ => with_cpu_slices::<f64, _>(&[x, g], |s| {
                    Tensor::from_vec(zip_map_with_exp(s[0], s[1], |v| -v, d), shape, dev)
                })?,
            }));
        }
        Ok(Some((g * silu_prime(x)?)?))
    }
}

/// `silu'(x) = s (1 + x (1 - s))`, `s = sigmoid(x)`, as one kernel; its own backward is composed
/// (`silu''(x) = s (1 - s) (2 + x (1 - 2 s))`), so higher-order gradients stay right.
struct SiluPrime;

fn silu_prime_of<T: Float>(v: T, exp_neg: T) -> T {
    let s = T::one() / (T::one() + exp_neg);
    s * (T::one() + v * (T::one() - s))
}

impl CustomOp1 for SiluPrime {
    fn name(&self) -> &'static str {
        "metapeft-silu-prime"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => {
                f32::to_cpu_storage_owned(map_with_exp_neg(cpu_slice::<f32>(s, l)?, silu_prime_of))
            }
            CpuStorage::F64(_) => {
                f64::to_cpu_storage_owned(map_with_exp_neg(cpu_slice::<f64>(s, l)?, silu_prime_of))
            }
            _ => candle_core::bail!("silu: unsupported dtype"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let s = (x.neg()?.exp()? + 1.0)?.recip()?;
        let one_minus = (1.0 - &s)?;
        let d = ((&s * &one_minus)? * ((x * (1.0 - (&s * 2.0)?)?)? + 2.0)?)?;
        Ok(Some((g * d)?))
    }
}

/// `silu'(x)`, differentiable.
fn silu_prime(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(SiluPrime)
    } else {
        let s = (x.neg()?.exp()? + 1.0)?.recip()?;
        ((x * (1.0 - &s)?)? + 1.0)?.mul(&s)
    }
}

/// The SwiGLU gate `silu(gate) * up` of a Llama FFN as one op: one pass and one output instead of
/// the activation, the product and the activation's gradient being accumulated separately. The
/// backward is `d gate = g * up * silu'(gate)`, `d up = g * silu(gate)`, from differentiable ops.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "metapeft-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        let out =
            match (s1, s2) {
                (CpuStorage::F32(_), CpuStorage::F32(_)) => f32::to_cpu_storage_owned(
                    swiglu_values(cpu_slice::<f32>(s1, l1)?, cpu_slice::<f32>(s2, l2)?),
                ),
                (CpuStorage::F64(_), CpuStorage::F64(_)) => f64::to_cpu_storage_owned(
                    swiglu_values(cpu_slice::<f64>(s1, l1)?, cpu_slice::<f64>(s2, l2)?),
                ),
                _ => candle_core::bail!("swiglu: unsupported dtypes"),
            };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if first_order_fused(&[gate, up, g]) {
            let (dgate, dup) = match gate.dtype() {
                candle_core::DType::F32 => swiglu_grads::<f32>(gate, up, g)?,
                _ => swiglu_grads::<f64>(gate, up, g)?,
            };
            return Ok((Some(dgate), Some(dup)));
        }
        let dgate = ((g * up)? * silu_prime(gate)?)?;
        let dup = (g * silu(gate)?)?;
        Ok((Some(dgate), Some(dup)))
    }
}

/// `silu(gate) * up` per element, over the threads.
pub(crate) fn swiglu_values<T: WithDType + Float + ExpSlice>(gate: &[T], up: &[T]) -> Vec<T> {
    // o = exp(-a), then a / (1 + exp(-a)) * b.
    par_fill(
        gate.len(),
        CHUNK,
        |i| chunk_of(gate, CHUNK, i).iter().map(|&a| -a),
        |i, o| {
            T::exp_in_place(o);
            let (gs, us) = (chunk_of(gate, CHUNK, i), chunk_of(up, CHUNK, i));
            for ((o, &a), &b) in o.iter_mut().zip(gs).zip(us) {
                *o = a / (T::one() + *o) * b;
            }
        },
    )
}

/// SwiGLU's first-order gradients `(g * up * silu'(gate), g * silu(gate))` in one pass over the
/// threads; `g` (the output gradient) is overwritten with `d gate`, `d up` is returned.
pub(crate) fn swiglu_grads_in_place<T: WithDType + Float + ExpSlice>(
    gate: &[T],
    up: &[T],
    g: &mut [T],
) -> Vec<T> {
    let mut dup = vec![T::zero(); gate.len()];
    g.par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|((gs, du), (xs, us))| {
            // du first holds exp(-gate), then d up.
            du.iter_mut().zip(xs).for_each(|(o, &v)| *o = -v);
            T::exp_in_place(du);
            for (((g, du), &v), &u) in gs.iter_mut().zip(du).zip(xs).zip(us) {
                let sig = T::one() / (T::one() + *du);
                *du = *g * v * sig;
                *g = *g * u * sig * (T::one() + v * (T::one() - sig));
            }
        });
    dup
}

/// SwiGLU's first-order gradients as tensors.
fn swiglu_grads<T: WithDType + Float + ExpSlice>(
    gate: &Tensor,
    up: &Tensor,
    g: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (shape, dev) = (gate.shape(), gate.device());
    with_cpu_slices::<T, _>(&[gate, up, g], |s| {
        let mut dgate = s[2].to_vec();
        let dup = swiglu_grads_in_place(s[0], s[1], &mut dgate);
        Ok((
            Tensor::from_vec(dgate, shape, dev)?,
            Tensor::from_vec(dup, shape, dev)?,
        ))
    })
}

/// `silu(gate) * up` (Llama's gated FFN), with a backward.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_ok(gate) && gate.dtype() == up.dtype() && gate.shape() == up.shape() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    } else {
        silu(gate)? * up
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
#[cfg(test)]
fn erf_f32(x: f32) -> f32 {
    erf_given_exp(x, (-x * x).exp())
}

/// [`erf_f32`] with `exp(-x^2)` computed by the caller.
fn erf_given_exp(x: f32, exp_neg_x2: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_72 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_neg_x2;
    y.copysign(x)
}

/// `Phi(v) = (1 + erf(v / sqrt 2)) / 2` given `e = exp(-v^2 / 2)`.
fn gauss_cdf_f32(v: f32, e: f32) -> f32 {
    0.5 * (1.0 + erf_given_exp(v * std::f32::consts::FRAC_1_SQRT_2, e))
}

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

struct Gelu;

use candle_core::cpu::erf::erf_f64;

/// GELU and its first-order gradient over slices, on the threads: f32 through the vectorised
/// `exp` (one per element feeds both `erf` and `phi`), f64 through libm's `erf`.
pub(crate) trait GeluSlice: WithDType + Float + ExpSlice {
    /// `gelu(x)` per element.
    fn gelu_values(x: &[Self]) -> Vec<Self>;
    /// `g * gelu'(x)` per element, new.
    fn gelu_grads(x: &[Self], g: &[Self]) -> Vec<Self>;
}

impl GeluSlice for f32 {
    fn gelu_values(x: &[f32]) -> Vec<f32> {
        map_with_gauss_f32(x, |v, e| v * gauss_cdf_f32(v, e))
    }

    fn gelu_grads(x: &[f32], g: &[f32]) -> Vec<f32> {
        let d =
            |v: f32, e: f32, g: f32| g * (gauss_cdf_f32(v, e) + v * (FRAC_1_SQRT_2PI as f32) * e);
        zip_map_with_exp(x, g, |v| -0.5 * v * v, d)
    }
}

impl GeluSlice for f64 {
    fn gelu_values(x: &[f64]) -> Vec<f64> {
        map(x, |v| {
            0.5 * v * (1.0 + erf_f64(v / std::f64::consts::SQRT_2))
        })
    }

    fn gelu_grads(x: &[f64], g: &[f64]) -> Vec<f64> {
        let d = |v: f64, e: f64, g: f64| {
            let cdf = 0.5 * (1.0 + erf_f64(v / std::f64::consts::SQRT_2));
            g * (cdf + v * FRAC_1_SQRT_2PI * e)
        };
        zip_map_with_exp(x, g, |v| -0.5 * v * v, d)
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "metapeft-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(f32::gelu_values(cpu_slice(s, l)?)),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(f64::gelu_values(cpu_slice(s, l)?)),
            _ => candle_core::bail!("gelu: unsupported dtype"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if first_order_fused(&[x, g]) {
            let (shape, dev) = (x.shape(), x.device());
            return Ok(Some(match x.dtype() {
                candle_core::DType::F32 => with_cpu_slices::<f32, _>(&[x, g], |s| {
                    Tensor::from_vec(f32::gelu_grads(s[0], s[1]), shape, dev)
                })?,
                _ => with_cpu_slices::<f64, _>(&[x, g], |s| {
                    Tensor::from_vec(f64::gelu_grads(s[0], s[1]), shape, dev)
                })?,
            }));
        }
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
            CpuStorage::F32(_) => {
                f32::to_cpu_storage_owned(map_with_gauss_f32(cpu_slice::<f32>(s, l)?, |v, e| {
                    gauss_cdf_f32(v, e) + v * (FRAC_1_SQRT_2PI as f32) * e
                }))
            }
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
    fn one_pass_f32_backwards_equal_the_composed_ones() -> Result<()> {
        use candle_core::{DType, Var};
        let f32t = |seed| randn_f64(&[3, 5000], seed, 2.0)?.to_dtype(DType::F32);
        let (x, u, w) = (
            Var::from_tensor(&f32t(31)?)?,
            Var::from_tensor(&f32t(32)?)?,
            f32t(33)?,
        );
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        let xt = x.as_tensor();
        let gx = |y: Tensor| -> Result<Tensor> {
            Ok((y * &w)?.sum_all()?.backward()?.get(xt).unwrap().clone())
        };
        assert!(close(&gx(gelu(xt)?)?, &(&w * gelu_prime(xt)?)?)? < 1e-6);
        assert!(close(&gx(silu(xt)?)?, &(&w * silu_prime(xt)?)?)? < 1e-6);
        let g = (swiglu(xt, u.as_tensor())? * &w)?.sum_all()?.backward()?;
        let want_gate = ((&w * u.as_tensor())? * silu_prime(xt)?)?;
        let want_up = (&w * silu(xt)?)?;
        assert!(close(g.get(xt).unwrap(), &want_gate)? < 1e-5);
        assert!(close(g.get(u.as_tensor()).unwrap(), &want_up)? < 1e-5);
        Ok(())
    }

    #[test]
    fn silu_gradient_matches_finite_differences() -> Result<()> {
        let x = randn_f64(&[4, 6], 41, 4.0)?;
        let err = check(|t| silu(&t[0]), &[x], 1e-6)?;
        assert!(err < 1e-7, "rel error {err}");
        Ok(())
    }

    #[test]
    fn silu_second_derivative_matches_finite_differences() -> Result<()> {
        // The gradient of silu'(x): what a double backward through silu (MAML) differentiates.
        let x = randn_f64(&[4, 6], 43, 4.0)?;
        let err = check(|t| silu_prime(&t[0]), &[x], 1e-6)?;
        assert!(err < 1e-7, "rel error {err}");
        Ok(())
    }

    #[test]
    fn swiglu_gradient_matches_finite_differences_and_composition() -> Result<()> {
        let g = randn_f64(&[3, 2, 5], 44, 3.0)?;
        let u = randn_f64(&[3, 2, 5], 45, 1.0)?;
        let err = check(|t| swiglu(&t[0], &t[1]), &[g.clone(), u.clone()], 1e-6)?;
        assert!(err < 1e-7, "rel error {err}");
        let want = (silu(&g)? * &u)?;
        let diff = (swiglu(&g, &u)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-14, "{diff}");
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
