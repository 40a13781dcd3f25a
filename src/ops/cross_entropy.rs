//! Mean cross-entropy over the targets that are not `ignore_index` (PyTorch semantics, except that
//! a batch with no counted target gives 0 rather than NaN).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType, D};
use num_traits::Float;

use super::{cpu_slice, fused_ok, softmax_last_dim};

struct CrossEntropy {
    targets: Vec<i64>,
    ignore_index: i64,
}

impl CrossEntropy {
    fn fwd<T: WithDType + Float>(&self, x: &[T], vocab: usize) -> Result<Vec<T>> {
        let mut total = 0f64;
        let mut count = 0usize;
        for (row, &t) in x.chunks(vocab).zip(&self.targets) {
            if t == self.ignore_index {
                continue;
            }
            if t < 0 || t as usize >= vocab {
                candle_core::bail!("cross_entropy: target {t} outside the {vocab} classes");
            }
            let max = row.iter().fold(T::neg_infinity(), |m, &v| Float::max(m, v));
            let sum: f64 = row.iter().map(|&v| WithDType::to_f64(v - max).exp()).sum();
            let lse = WithDType::to_f64(max) + sum.ln();
            total += lse - WithDType::to_f64(row[t as usize]);
            count += 1;
        }
        let mean = if count == 0 {
            0.0
        } else {
            total / count as f64
        };
        Ok(vec![T::from(mean).unwrap_or_else(T::nan)])
    }

    fn counted(&self) -> usize {
        self.targets
            .iter()
            .filter(|&&t| t != self.ignore_index)
            .count()
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "metapeft-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let vocab = l.dims()[1];
        let out = match s {
            CpuStorage::F32(_) => {
                f32::to_cpu_storage_owned(self.fwd(cpu_slice::<f32>(s, l)?, vocab)?)
            }
            CpuStorage::F64(_) => {
                f64::to_cpu_storage_owned(self.fwd(cpu_slice::<f64>(s, l)?, vocab)?)
            }
            _ => candle_core::bail!("cross_entropy: unsupported dtype"),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (n, vocab) = x.dims2()?;
        let count = self.counted();
        if count == 0 {
            return Ok(Some(x.zeros_like()?));
        }
        let mut onehot = vec![0f32; n * vocab];
        let mut keep = vec![0f64; n]; // f64: 1/count exact for f64 gradients
        for (i, &t) in self.targets.iter().enumerate() {
            if t != self.ignore_index {
                onehot[i * vocab + t as usize] = 1.0;
                keep[i] = 1.0 / count as f64;
            }
        }
        let onehot = Tensor::from_vec(onehot, (n, vocab), x.device())?.to_dtype(x.dtype())?;
        let keep = Tensor::from_vec(keep, (n, 1), x.device())?.to_dtype(x.dtype())?;
        let p = softmax_last_dim(x)?;
        let d = (p - onehot)?.broadcast_mul(&keep)?;
        Ok(Some(d.broadcast_mul(g)?))
    }
}

/// Mean cross-entropy of `logits: [..., vocab]` against integer `targets: [...]`, skipping
/// positions whose target is `ignore_index` (use -100 as in PyTorch).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
    let vocab = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), vocab))?;
    let targets: Vec<i64> = targets.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
    if targets.len() != logits.dim(0)? {
        candle_core::bail!(
            "cross_entropy: {} targets for {} rows of logits",
            targets.len(),
            logits.dim(0)?
        );
    }
    if fused_ok(&logits) {
        return logits.contiguous()?.apply_op1(CrossEntropy {
            targets,
            ignore_index,
        });
    }
    let n = targets.len();
    let count = targets.iter().filter(|&&t| t != ignore_index).count();
    let keep: Vec<f32> = targets
        .iter()
        .map(|&t| (t != ignore_index) as u8 as f32)
        .collect();
    let idx: Vec<u32> = targets
        .iter()
        .map(|&t| if t == ignore_index { 0 } else { t as u32 })
        .collect();
    let idx = Tensor::from_vec(idx, (n, 1), logits.device())?;
    let keep = Tensor::from_vec(keep, n, logits.device())?.to_dtype(logits.dtype())?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&idx, D::Minus1)?;
    let nll = (lse - picked)?.squeeze(1)?;
    (nll * keep)?.sum_all()? / count.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, randn_f64};
    use candle_core::Device;

    #[test]
    fn gradient_matches_finite_differences_with_ignored_rows() -> Result<()> {
        let x = randn_f64(&[2, 3, 5], 71, 2.0)?;
        let t = Tensor::new(&[[1i64, -100, 4], [0, 2, -100]], &Device::Cpu)?;
        let err = check(|a| cross_entropy(&a[0], &t, -100), &[x], 1e-6)?;
        assert!(err < 1e-7, "rel error {err}");
        Ok(())
    }

    #[test]
    fn matches_composed_and_known_value() -> Result<()> {
        // uniform logits over 4 classes: loss = ln 4
        let x = Tensor::zeros((3, 4), DType::F32, &Device::Cpu)?;
        let t = Tensor::new(&[0u32, 3, 2], &Device::Cpu)?;
        let l = cross_entropy(&x, &t, -100)?.to_scalar::<f32>()?;
        assert!((l - 4f32.ln()).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn target_out_of_range_is_an_error() -> Result<()> {
        let x = Tensor::zeros((1, 4), DType::F32, &Device::Cpu)?;
        let t = Tensor::new(&[7u32], &Device::Cpu)?;
        assert!(cross_entropy(&x, &t, -100).is_err());
        Ok(())
    }
}
