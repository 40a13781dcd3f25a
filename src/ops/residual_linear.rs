//! A block's last frozen linear with the residual add taken inside the product:
//! `residual + x W^T (+ b)` (attention's output projection),
//! `residual + swiglu(gate, up) W^T (+ b)` (Llama's feed-forward tail) and
//! `residual + gelu(x) W^T (+ b)` (BERT's).
//!
//! Composed, the projection's output is a tensor of its own that the add node keeps for the
//! backward although the add's backward never reads it, and the activation's output is kept for
//! the down projection's backward; both are `[tokens, width]` per layer, and the add and the
//! activation are more nodes whose backward each costs candle a zero-filled buffer and an addition
//! on one thread (for the activation, `[tokens, 4 x width]`). Here the output starts as a copy of
//! the residual and the product accumulates onto it; the feed-forward tails compute the
//! activation into a temporary that is dropped after the product and recompute it (one cheap
//! element-wise pass) in the backward. Where a graph of the gradients is kept (second-order MAML),
//! off the CPU, for mixed dtypes, a trained weight or bias, or a few rows (decoding takes the
//! matrix-vector kernel), the composed ops run.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use num_traits::Float;

use super::activation::{swiglu_grads_in_place, swiglu_values, GeluSlice};
use super::exp::ExpSlice;
use super::frozen_linear::{frozen_product_fuses, frozen_product_onto};
use super::par_gemm::{matmul, Strided};
use super::{cpu_slice, with_cpu_slices};

/// Whether the fused op may run for input `x: [..., k]`, frozen `w: [n, k]`, `bias` and
/// `residual: [..., n]` (besides the shape checks the callers make).
fn fuses(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, residual: &Tensor) -> bool {
    let rows = x.elem_count() / w.dim(1).unwrap_or(1).max(1);
    frozen_product_fuses(&[x, w, residual], w, rows)
        && bias.is_none_or(|b| !b.track_op() && b.dtype() == x.dtype())
}

fn check_shapes(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, residual: &Tensor) -> Result<()> {
    let (n, k) = w.dims2()?;
    let rows = x.elem_count() / k.max(1);
    let mut want = x.dims().to_vec();
    if let Some(last) = want.last_mut() {
        *last = n;
    }
    let bias_ok = bias.is_none_or(|b| b.elem_count() == n);
    if x.dims().last() != Some(&k) || residual.dims() != want || !bias_ok || rows * k == 0 {
        candle_core::bail!(
            "residual linear: x {:?}, W {:?}, bias {:?}, residual {:?} do not fit",
            x.dims(),
            w.dims(),
            bias.map(|b| b.dims().to_vec()),
            residual.dims()
        );
    }
    Ok(())
}

/// `residual + x W^T (+ bias)` for a frozen `w: [n, k]` (and frozen `bias: [n]`).
pub fn linear_residual(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Tensor> {
    check_shapes(x, w, bias, residual)?;
    if !fuses(x, w, bias, residual) {
        return residual + super::linear(x, w, bias)?;
    }
    let op = ResidualLinear::new(w, bias)?;
    x.contiguous()?.apply_op2(&residual.contiguous()?, op)
}

/// `residual + swiglu(gate, up) W^T (+ bias)` for a frozen `w: [n, f]`, `gate` and `up` of
/// shape `[..., f]`.
pub fn swiglu_linear_residual(
    gate: &Tensor,
    up: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Tensor> {
    check_shapes(gate, w, bias, residual)?;
    if gate.shape() != up.shape() {
        candle_core::bail!(
            "residual linear: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    if !fuses(gate, w, bias, residual) || up.dtype() != gate.dtype() {
        return residual + super::linear(&super::swiglu(gate, up)?, w, bias)?;
    }
    let op = ResidualLinear::new(w, bias)?;
    gate.contiguous()?
        .apply_op3(&up.contiguous()?, &residual.contiguous()?, op)
}

/// `residual + gelu(x) W^T (+ bias)` for a frozen `w: [n, f]` and `x: [..., f]` (the
/// pre-activation of BERT's intermediate layer).
pub fn gelu_linear_residual(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Tensor> {
    check_shapes(x, w, bias, residual)?;
    if !fuses(x, w, bias, residual) {
        return residual + super::linear(&super::gelu(x)?, w, bias)?;
    }
    let op = GeluResidualLinear(ResidualLinear::new(w, bias)?);
    x.contiguous()?.apply_op2(&residual.contiguous()?, op)
}

/// The frozen weight and bias of a residual linear; the inputs are the op's arguments.
struct ResidualLinear {
    /// `[n, k]`, contiguous.
    w: Tensor,
    bias: Option<Tensor>,
}

impl ResidualLinear {
    fn new(w: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        Ok(Self {
            w: w.contiguous()?.detach(),
            bias: bias.map(Tensor::detach),
        })
    }

    /// `residual (+ bias) + x W^T` for a row-major `x: [m, k]`.
    fn forward<T: WithDType>(&self, x: &[T], residual: &[T]) -> Result<Vec<T>> {
        let (n, k) = self.w.dims2()?;
        let m = x.len() / k.max(1);
        let mut ts = vec![&self.w];
        ts.extend(self.bias.as_ref());
        with_cpu_slices::<T, _>(&ts, |s| {
            frozen_product_onto(x, s[0], s.get(1).copied(), residual, (m, n, k))
        })
    }

    /// `g W: [m, k]`, the gradient reaching the product's input.
    fn input_grad<T: WithDType>(&self, g: &[T]) -> Result<Vec<T>> {
        let (n, k) = self.w.dims2()?;
        let m = g.len() / n.max(1);
        with_cpu_slices::<T, _>(&[&self.w], |s| {
            matmul(
                (m, k, n),
                Strided::row_major(g, 0, n),
                Strided::row_major(s[0], 0, k),
            )
        })
    }

    fn swiglu_forward<T: WithDType + Float + ExpSlice>(
        &self,
        gate: &[T],
        up: &[T],
        residual: &[T],
    ) -> Result<Vec<T>> {
        let act = swiglu_values(gate, up);
        self.forward(&act, residual)
    }
}

fn output_shape(x: &Layout, n: usize) -> Shape {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Shape::from(dims)
}

impl CustomOp2 for ResidualLinear {
    fn name(&self) -> &'static str {
        "metapeft-linear-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.forward::<f32>(cpu_slice(s1, l1)?, cpu_slice(s2, l2)?)?)
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.forward::<f64>(cpu_slice(s1, l1)?, cpu_slice(s2, l2)?)?)
            }
            _ => candle_core::bail!("residual linear: f32 or f64 only"),
        };
        Ok((out, l2.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        residual: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = match x.track_op() {
            false => None,
            true => Some(match x.dtype() {
                candle_core::DType::F32 => with_cpu_slices::<f32, _>(&[&g], |s| {
                    Tensor::from_vec(self.input_grad(s[0])?, x.shape(), x.device())
                })?,
                _ => with_cpu_slices::<f64, _>(&[&g], |s| {
                    Tensor::from_vec(self.input_grad(s[0])?, x.shape(), x.device())
                })?,
            }),
        };
        Ok((dx, residual.track_op().then_some(g)))
    }
}

/// [`gelu_linear_residual`]: GELU recomputed from the kept pre-activation in the backward.
struct GeluResidualLinear(ResidualLinear);

impl CustomOp2 for GeluResidualLinear {
    fn name(&self) -> &'static str {
        "metapeft-gelu-linear-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, res) = (s1, s2);
        let out = match x {
            CpuStorage::F32(_) => CpuStorage::F32(
                self.0
                    .forward(&f32::gelu_values(cpu_slice(x, l1)?), cpu_slice(res, l2)?)?,
            ),
            CpuStorage::F64(_) => CpuStorage::F64(
                self.0
                    .forward(&f64::gelu_values(cpu_slice(x, l1)?), cpu_slice(res, l2)?)?,
            ),
            _ => candle_core::bail!("residual linear: f32 or f64 only"),
        };
        Ok((out, output_shape(l1, self.0.w.dim(0)?)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        residual: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = match x.track_op() {
            false => None,
            true => Some(match x.dtype() {
                candle_core::DType::F32 => with_cpu_slices::<f32, _>(&[&g, x], |s| {
                    let dact = self.0.input_grad(s[0])?;
                    Tensor::from_vec(f32::gelu_grads(s[1], &dact), x.shape(), x.device())
                })?,
                _ => with_cpu_slices::<f64, _>(&[&g, x], |s| {
                    let dact = self.0.input_grad(s[0])?;
                    Tensor::from_vec(f64::gelu_grads(s[1], &dact), x.shape(), x.device())
                })?,
            }),
        };
        Ok((dx, residual.track_op().then_some(g)))
    }
}

impl CustomOp3 for ResidualLinear {
    fn name(&self) -> &'static str {
        "metapeft-swiglu-linear-residual"
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
        let n = self.w.dim(0)?;
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(self.swiglu_forward::<f32>(
                cpu_slice(s1, l1)?,
                cpu_slice(s2, l2)?,
                cpu_slice(s3, l3)?,
            )?),
            CpuStorage::F64(_) => CpuStorage::F64(self.swiglu_forward::<f64>(
                cpu_slice(s1, l1)?,
                cpu_slice(s2, l2)?,
                cpu_slice(s3, l3)?,
            )?),
            _ => candle_core::bail!("residual linear: f32 or f64 only"),
        };
        Ok((out, output_shape(l1, n)))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        residual: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (shape, dev) = (gate.shape(), gate.device());
        macro_rules! run {
            ($t:ty) => {
                with_cpu_slices::<$t, _>(&[&g, gate, up], |s| {
                    let mut dgate = self.input_grad(s[0])?;
                    let dup = swiglu_grads_in_place(s[1], s[2], &mut dgate);
                    Ok((
                        Tensor::from_vec(dgate, shape, dev)?,
                        Tensor::from_vec(dup, shape, dev)?,
                    ))
                })
            };
        }
        let (dgate, dup) = match gate.dtype() {
            candle_core::DType::F32 => run!(f32)?,
            _ => run!(f64)?,
        };
        let dgate = gate.track_op().then_some(dgate);
        let dup = up.track_op().then_some(dup);
        Ok((dgate, dup, residual.track_op().then_some(g)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{assert_same_value_and_gradients, check, randn_f64};
    use candle_core::Var;

    fn pool() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
    }

    /// Both ops equal the composed ops in value and in every gradient, with and without a frozen
    /// bias, below and above the size at which products are split over the threads.
    #[test]
    fn value_and_gradients_equal_the_composed_ops() -> Result<()> {
        let pool = pool();
        for (t, n, k, with_bias) in [(5, 6, 7, false), (5, 6, 7, true), (300, 280, 320, true)] {
            let x = Var::from_tensor(&randn_f64(&[2, t, k], 121, 1.0)?)?;
            let u = Var::from_tensor(&randn_f64(&[2, t, k], 122, 1.0)?)?;
            let res = Var::from_tensor(&randn_f64(&[2, t, n], 123, 1.0)?)?;
            let w = randn_f64(&[n, k], 124, 1.0)?;
            let bias = randn_f64(&[n], 125, 1.0)?;
            let bias = with_bias.then_some(&bias);
            let probe = randn_f64(&[2, t, n], 126, 1.0)?;
            let (xt, ut, rt) = (x.as_tensor(), u.as_tensor(), res.as_tensor());
            let plain = |a: &Tensor| -> Result<Tensor> {
                let y = a.broadcast_matmul(&w.t()?)?;
                let y = match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                rt + y
            };
            let got = pool.install(|| linear_residual(xt, &w, bias, rt))?;
            assert_same_value_and_gradients(&pool, &got, &plain(xt)?, &probe, &[&x, &res], 1e-10)?;
            let got = pool.install(|| swiglu_linear_residual(xt, ut, &w, bias, rt))?;
            let silu = (xt * (xt.neg()?.exp()? + 1.0)?.recip()?)?;
            let want = plain(&(silu * ut)?)?;
            assert_same_value_and_gradients(&pool, &got, &want, &probe, &[&x, &u, &res], 1e-10)?;
            let got = pool.install(|| gelu_linear_residual(xt, &w, bias, rt))?;
            let gelu = (xt * (((xt / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5)?)?;
            assert_same_value_and_gradients(
                &pool,
                &got,
                &plain(&gelu)?,
                &probe,
                &[&x, &res],
                1e-10,
            )?;
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        // 12 rows: above the matrix-vector cut-off, so the fused ops run.
        let x = randn_f64(&[3, 4, 5], 127, 1.0)?;
        let u = randn_f64(&[3, 4, 5], 128, 1.0)?;
        let res = randn_f64(&[3, 4, 6], 129, 1.0)?;
        let w = randn_f64(&[6, 5], 130, 1.0)?;
        let bias = randn_f64(&[6], 131, 1.0)?;
        let f = |t: &[Tensor]| linear_residual(&t[0], &w, Some(&bias), &t[1]);
        let err = check(f, &[x.clone(), res.clone()], 1e-6)?;
        assert!(err < 1e-8, "linear + residual: rel error {err}");
        let f = |t: &[Tensor]| gelu_linear_residual(&t[0], &w, Some(&bias), &t[1]);
        let err = check(f, &[x.clone(), res.clone()], 1e-6)?;
        assert!(err < 1e-8, "gelu + linear + residual: rel error {err}");
        let f = |t: &[Tensor]| swiglu_linear_residual(&t[0], &t[1], &w, Some(&bias), &t[2]);
        let err = check(f, &[x, u, res], 1e-6)?;
        assert!(err < 1e-8, "swiglu + linear + residual: rel error {err}");
        Ok(())
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() -> Result<()> {
        let x = randn_f64(&[3, 4, 5], 132, 1.0)?;
        let w = randn_f64(&[6, 5], 133, 1.0)?;
        let res = randn_f64(&[3, 4, 6], 134, 1.0)?;
        let bad_res = randn_f64(&[3, 4, 5], 135, 1.0)?;
        assert!(linear_residual(&x, &w, None, &bad_res).is_err());
        assert!(linear_residual(&x, &w, Some(&randn_f64(&[5], 136, 1.0)?), &res).is_err());
        assert!(linear_residual(&res, &w, None, &res).is_err());
        let u_bad = randn_f64(&[3, 4, 4], 137, 1.0)?;
        assert!(swiglu_linear_residual(&x, &u_bad, &w, None, &res).is_err());
        assert!(gelu_linear_residual(&u_bad, &w, None, &res).is_err());
        assert!(gelu_linear_residual(&x, &w, None, &bad_res).is_err());
        Ok(())
    }
}
