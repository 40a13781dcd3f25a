//! Central finite-difference gradient checks, used by every kernel's tests and by the model tests.

use candle_core::{DType, Device, Result, Tensor, Var};

/// Compare the autodiff gradient of `sum(f(xs) * w)` (with a fixed random `w`, so every output
/// element matters) with central finite differences, for every element of every input. Inputs must
/// be f64 and small. Returns the worst relative error over the inputs, measured per input as
/// `max|analytic - numeric| / max(max|numeric|, 1e-8)`.
pub fn check<F>(f: F, xs: &[Tensor], eps: f64) -> Result<f64>
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    let vars: Vec<Var> = xs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tensors)?;
    let w = fixed_weights(out.shape().dims(), out.device())?;
    let loss = (out * &w)?.sum_all()?;
    let grads = loss.backward()?;

    let scalar =
        |inputs: &[Tensor]| -> Result<f64> { (f(inputs)? * &w)?.sum_all()?.to_scalar::<f64>() };
    let mut worst: f64 = 0.0;
    for (i, v) in vars.iter().enumerate() {
        let analytic: Vec<f64> = match grads.get(v.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1()?,
            None => vec![0.0; v.elem_count()],
        };
        let base: Vec<f64> = xs[i].flatten_all()?.to_vec1()?;
        let mut numeric = vec![0.0; base.len()];
        for j in 0..base.len() {
            let eval = |delta: f64| -> Result<f64> {
                let mut p = base.clone();
                p[j] += delta;
                let mut inputs = xs.to_vec();
                inputs[i] = Tensor::from_vec(p, xs[i].shape(), xs[i].device())?;
                scalar(&inputs)
            };
            numeric[j] = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
        }
        let scale = numeric.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-8);
        let err = analytic
            .iter()
            .zip(&numeric)
            .fold(0f64, |m, (a, n)| m.max((a - n).abs()));
        worst = worst.max(err / scale);
    }
    Ok(worst)
}

/// Deterministic pseudo-random values in [-1, 1) of the given shape, in f64.
pub fn fixed_weights(dims: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, dims, device)
}

/// A random f64 test input with a given seed, values in [-scale, scale).
pub fn randn_f64(dims: &[usize], seed: u64, scale: f64) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let mut state: u64 = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(DType::F64)
}

/// The largest absolute difference between two tensors of the same shape, in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()
}

/// Check a fused op against its composition: `got` must equal `want`, and `sum(out * w)` must
/// give every one of `vars` the same gradient through both, within `tol`. `got`'s backward runs on
/// `pool`, so kernels that split work over the pool's threads are exercised.
pub fn assert_same_value_and_gradients(
    pool: &rayon::ThreadPool,
    got: &Tensor,
    want: &Tensor,
    w: &Tensor,
    vars: &[&Var],
    tol: f64,
) -> Result<()> {
    let d = max_abs_diff(got, want)?;
    assert!(d < tol, "values differ by {d}");
    let gg = pool.install(|| (got * w)?.sum_all()?.backward())?;
    let gw = (want * w)?.sum_all()?.backward()?;
    for v in vars {
        let (a, b) = (gg.get(v.as_tensor()), gw.get(v.as_tensor()));
        let (Some(a), Some(b)) = (a, b) else {
            panic!("no gradient for {:?} on one side", v.dims());
        };
        let d = max_abs_diff(a, b)?;
        assert!(d < tol, "gradients of {:?} differ by {d}", v.dims());
    }
    Ok(())
}
