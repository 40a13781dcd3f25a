//! The first-order backward of LayerNorm and RMSNorm in one pass over the rows.
//!
//! Composed from tensor ops, a norm's backward is about fifteen element-wise ops over the
//! activations, each allocating its output: ~900 ops per SmolLM2 training step (61 norms) and
//! ~200 per MiniLM step. Where no graph of the gradient is kept (everything but exact
//! second-order MAML, see `meta::second_order`), the gradient is a constant anyway and one kernel
//! computes it; with a graph kept, the ops compose it as before so that it stays differentiable.
//!
//! Per row, with `xhat = (x - mean) r`, `r = 1 / sqrt(var + eps)` (no mean and `var = mean(x^2)`
//! for RMSNorm) and `gx = g w`: `dx = (gx - mean(gx) - xhat mean(gx xhat)) r` (RMSNorm drops the
//! `mean(gx)` term), `dw = sum over rows of g xhat`, `db = sum over rows of g`.

use candle_core::{Device, Result, Storage, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use super::reduce::{sum3_by, sum_by};
use super::{chunk_of, cpu_slice, par_fill, rows_per_task};

/// Gradients of a norm's input, weight and bias.
pub(crate) struct NormGrads {
    pub dx: Tensor,
    /// `Some` when asked for.
    pub dw: Option<Tensor>,
    pub db: Option<Tensor>,
}

/// The fused backward of LayerNorm (`centered`) or RMSNorm at input `x` with weight `w`, for the
/// output gradient `g`; `None` where the composed backward must run (a graph of the gradient is
/// kept, or the tensors are not f32/f64 on the CPU).
pub(crate) fn fused_norm_backward(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    centered: bool,
    want_params: bool,
) -> Result<Option<NormGrads>> {
    if !super::first_order_fused(&[x, w, g]) {
        return Ok(None);
    }
    let norm = Norm {
        eps,
        centered,
        want_params,
    };
    match x.dtype() {
        candle_core::DType::F32 => run::<f32>([x, w, g], norm).map(Some),
        candle_core::DType::F64 => run::<f64>([x, w, g], norm).map(Some),
        _ => Ok(None),
    }
}

/// A norm's constants: `centered` for LayerNorm (RMSNorm subtracts no mean).
#[derive(Clone, Copy)]
pub(crate) struct Norm {
    pub eps: f64,
    pub centered: bool,
    pub want_params: bool,
}

fn run<T: WithDType + Float>([x, w, g]: [&Tensor; 3], norm: Norm) -> Result<NormGrads> {
    let want_params = norm.want_params;
    let (x, w, g) = (x.contiguous()?, w.contiguous()?, g.contiguous()?);
    let dim = w.elem_count();
    if dim == 0 || x.elem_count() != g.elem_count() || x.dims().last() != Some(&dim) {
        candle_core::bail!(
            "norm backward: input {:?}, weight {:?}, gradient {:?}",
            x.dims(),
            w.dims(),
            g.dims()
        );
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(gs)) = (&*xs, &*ws, &*gs) else {
        candle_core::bail!("norm backward: CPU tensors only");
    };
    let (xv, wv, gv) = (
        cpu_slice::<T>(xs, xl)?,
        cpu_slice::<T>(ws, wl)?,
        cpu_slice::<T>(gs, gl)?,
    );
    let (dx, partials) = rows_backward(xv, wv, gv, norm);
    let dx = Tensor::from_vec(dx, x.shape(), &Device::Cpu)?;
    if !want_params {
        return Ok(NormGrads {
            dx,
            dw: None,
            db: None,
        });
    }
    let (mut dw, mut db) = (vec![0f64; dim], vec![0f64; dim]);
    for (pw, pb) in partials {
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    let back = |v: Vec<f64>| -> Result<Tensor> {
        let v: Vec<T> = v
            .into_iter()
            .map(|a| T::from(a).unwrap_or_else(T::nan))
            .collect();
        Tensor::from_vec(v, w.shape(), &Device::Cpu)
    };
    Ok(NormGrads {
        dx,
        dw: Some(back(dw)?),
        db: Some(back(db)?),
    })
}

/// A row's mean (0 for RMSNorm, `centered` false) and `1 / sqrt(var + eps)`, where RMSNorm's
/// `var` is `mean(x^2)`: what the norms' forward and backward both compute per row. The sums run
/// in f64 (see `reduce`): f32 sums over thousands of features are a visible share of a model's
/// rounding error.
pub(crate) fn row_stats<T: WithDType>(xr: &[T], centered: bool, eps: f64) -> (f64, f64) {
    let n = xr.len().max(1) as f64;
    let mean = match centered {
        true => sum_by(xr, |v| v) / n,
        false => 0.0,
    };
    let var = sum_by(xr, |v| (v - mean) * (v - mean)) / n;
    (mean, (var + eps).sqrt().recip())
}

/// Per task, partial sums of a norm's weight and bias gradients.
pub(crate) type ParamPartials = Vec<(Vec<f64>, Vec<f64>)>;

/// The norm's input gradient over rows of `w.len()` values, and per task the partial sums of the
/// weight and bias gradients (empty unless `norm.want_params`).
pub(crate) fn rows_backward<T: WithDType + Float>(
    xv: &[T],
    wv: &[T],
    gv: &[T],
    norm: Norm,
) -> (Vec<T>, ParamPartials) {
    let Norm {
        eps,
        centered,
        want_params,
    } = norm;
    let dim = wv.len();
    let n = dim as f64;
    let stats = |xr: &[T]| row_stats(xr, centered, eps);
    let dx = par_fill(
        xv.len(),
        dim,
        |i| {
            let (xr, gr) = (chunk_of(xv, dim, i), chunk_of(gv, dim, i));
            let (mean, r) = stats(xr);
            let m1 = match centered {
                true => sum3_by(gr, wv, xr, |g, w, _| g * w) / n,
                false => 0.0,
            };
            let m2 = sum3_by(gr, wv, xr, |g, w, x| g * w * (x - mean)) * r / n;
            // dx = (g w - m1 - xhat m2) r = g w r - m1 r - (x - mean) m2 r^2, in T.
            let t = |v: f64| T::from(v).unwrap_or_else(T::nan);
            let (rt, m1r, m2rr, mt) = (t(r), t(m1 * r), t(m2 * r * r), t(mean));
            xr.iter()
                .zip(gr)
                .zip(wv)
                .map(move |((&x, &g), &w)| g * w * rt - m1r - (x - mt) * m2rr)
        },
        |_, _| {},
    );
    if !want_params {
        return (dx, vec![]);
    }
    // The weight's and bias's gradients (trained norms only), a second pass over the rows.
    let per = dim * rows_per_task(dim);
    let f = |v: T| WithDType::to_f64(v);
    let partials = xv
        .par_chunks(per)
        .zip(gv.par_chunks(per))
        .map(|(xc, gc)| {
            let (mut dw, mut db) = (vec![0f64; dim], vec![0f64; dim]);
            for (xr, gr) in xc.chunks_exact(dim).zip(gc.chunks_exact(dim)) {
                let (mean, r) = stats(xr);
                for ((&x, &g), (dw, db)) in xr.iter().zip(gr).zip(dw.iter_mut().zip(&mut db)) {
                    *dw += f(g) * (f(x) - mean) * r;
                    *db += f(g);
                }
            }
            (dw, db)
        })
        .collect();
    (dx, partials)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Var};

    use crate::ops::gradcheck::randn_f64;
    use crate::Result;

    /// Gradients of `sum(norm(x, w, b) * c)` for x (non-contiguous), and for w and b when
    /// `train`: on this thread (fused backward) and on a graph-keeping thread (composed).
    fn grads(centered: bool, train: bool, dtype: DType) -> Result<Vec<Vec<f64>>> {
        let x = Var::from_tensor(&randn_f64(&[6, 3, 40], 1, 2.0)?.to_dtype(dtype)?)?;
        let w = randn_f64(&[40], 2, 1.0)?.to_dtype(dtype)?;
        let b = randn_f64(&[40], 3, 1.0)?.to_dtype(dtype)?;
        let c = randn_f64(&[3, 6, 40], 4, 1.0)?.to_dtype(dtype)?;
        let (wv, bv) = (Var::from_tensor(&w)?, Var::from_tensor(&b)?);
        let (w, b) = match train {
            true => (wv.as_tensor().clone(), bv.as_tensor().clone()),
            false => (w, b),
        };
        let run = || -> Result<Vec<Vec<f64>>> {
            let xt = x.as_tensor().transpose(0, 1)?;
            let y = match centered {
                true => crate::ops::layer_norm(&xt, &w, &b, 1e-5)?,
                false => crate::ops::rms_norm(&xt, &w, 1e-5)?,
            };
            // A non-contiguous output gradient.
            let loss = (y * c.transpose(0, 1)?.contiguous()?.transpose(0, 1)?)?.sum_all()?;
            let g = loss.backward()?;
            let mut out = vec![];
            for v in [&x, &wv, &bv] {
                if let Some(t) = g.get(v.as_tensor()) {
                    out.push(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
                }
            }
            Ok(out)
        };
        let fused = run()?;
        let composed = crate::meta::second_order::on_graph_thread(run)?;
        assert_eq!(fused.len(), composed.len());
        let mut all = vec![];
        for (f, c) in fused.into_iter().zip(composed) {
            all.push(f);
            all.push(c);
        }
        Ok(all)
    }

    #[test]
    fn the_fused_backward_equals_the_composed_one() -> Result<()> {
        for centered in [true, false] {
            for train in [true, false] {
                for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
                    let g = grads(centered, train, dtype)?;
                    let expected = match (centered, train) {
                        (true, true) => 3,
                        (false, true) => 2,
                        _ => 1,
                    };
                    assert_eq!(g.len(), 2 * expected, "centered {centered} train {train}");
                    for pair in g.chunks_exact(2) {
                        let scale = pair[1].iter().fold(1f64, |a, v| a.max(v.abs()));
                        for (a, b) in pair[0].iter().zip(&pair[1]) {
                            assert!(
                                (a - b).abs() <= tol * scale,
                                "centered {centered} train {train} {dtype:?}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
