//! Rotary position embeddings in the Hugging Face ("rotate half") layout.
//!
//! For a head vector `x` of size `d` and `h = d / 2`: `y[i] = x[i] cos_i - x[i+h] sin_i`,
//! `y[i+h] = x[i+h] cos_i + x[i] sin_i`. The map is a rotation, so its backward is the same kernel
//! with `-sin`, which keeps the backward itself differentiable.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use super::{cpu_slice, fused_ok};

/// How RoPE frequencies are rescaled for long contexts (Hugging Face `rope_scaling`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Precomputed `cos`/`sin` tables of shape `[max_positions, head_dim / 2]`.
#[derive(Clone, Debug)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: Option<&RopeScaling>,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                scale_frequency(f, scaling)
            })
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// The tables for positions `offset .. offset + len`.
    pub fn window(&self, offset: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let max = self.cos.dim(0)?;
        if offset + len > max {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's maximum of {max}",
                offset + len
            );
        }
        Ok((
            self.cos.narrow(0, offset, len)?,
            self.sin.narrow(0, offset, len)?,
        ))
    }
}

fn scale_frequency(f: f64, scaling: Option<&RopeScaling>) -> f64 {
    match scaling {
        None => f,
        Some(RopeScaling::Linear { factor }) => f / factor,
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * f / factor + smooth * f
            }
        }
    }
}

struct Rope;

pub(crate) fn fwd<T: WithDType + Float>(x: &[T], cos: &[T], sin: &[T], dims: &[usize]) -> Vec<T> {
    let (t, h, d) = (dims[1], dims[2], dims[3]);
    let half = d / 2;
    let mut out = vec![T::zero(); x.len()];
    // One chunk per (batch, position): all heads at that position share the same angles.
    out.par_chunks_mut(h * d)
        .zip(x.par_chunks(h * d))
        .enumerate()
        .for_each(|(row, (o, xr))| {
            let pos = row % t;
            let c = &cos[pos * half..(pos + 1) * half];
            let s = &sin[pos * half..(pos + 1) * half];
            for (oh, xh) in o.chunks_mut(d).zip(xr.chunks(d)) {
                for i in 0..half {
                    let (a, b) = (xh[i], xh[i + half]);
                    oh[i] = a * c[i] - b * s[i];
                    oh[i + half] = b * c[i] + a * s[i];
                }
            }
        });
    out
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "metapeft-rope"
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
        let dims = l1.dims();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                f32::to_cpu_storage_owned(fwd(
                    cpu_slice(s1, l1)?,
                    cpu_slice(s2, l2)?,
                    cpu_slice(s3, l3)?,
                    dims,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                f64::to_cpu_storage_owned(fwd(
                    cpu_slice(s1, l1)?,
                    cpu_slice(s2, l2)?,
                    cpu_slice(s3, l3)?,
                    dims,
                ))
            }
            _ => candle_core::bail!("rope: unsupported dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(rope(g, cos, &sin.neg()?)?), None, None))
    }
}

/// Apply RoPE to `x` of shape `[batch, seq, heads, head_dim]` with tables `[seq, head_dim / 2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, t, _h, d) = x.dims4()?;
    if cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        candle_core::bail!(
            "rope: tables {:?} do not fit input {:?}",
            cos.dims(),
            x.dims()
        );
    }
    if fused_ok(x) && x.dtype() == cos.dtype() {
        x.contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)
    } else {
        let half = d / 2;
        let c = cos.unsqueeze(1)?; // [t, 1, half]
        let s = sin.unsqueeze(1)?;
        let a = x.narrow(3, 0, half)?;
        let b = x.narrow(3, half, half)?;
        let ya = (a.broadcast_mul(&c)? - b.broadcast_mul(&s)?)?;
        let yb = (b.broadcast_mul(&c)? + a.broadcast_mul(&s)?)?;
        Tensor::cat(&[ya, yb], 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, randn_f64};

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let tables = RopeTables::new(8, 10000.0, None, 16, DType::F64, &Device::Cpu)?;
        let (c, s) = tables.window(3, 5)?;
        let x = randn_f64(&[2, 5, 3, 8], 31, 1.0)?;
        let err = check(|t| rope(&t[0], &c, &s), &[x], 1e-6)?;
        assert!(err < 1e-7, "rel error {err}");
        Ok(())
    }

    #[test]
    fn fused_matches_composed_and_preserves_norm() -> Result<()> {
        let tables = RopeTables::new(8, 10000.0, None, 16, DType::F32, &Device::Cpu)?;
        let (c, s) = tables.window(2, 4)?;
        let x = randn_f64(&[1, 4, 2, 8], 32, 1.0)?.to_dtype(DType::F32)?;
        let fused = rope(&x, &c, &s)?;
        let half = 4;
        let (a, b) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
        let (cc, ss) = (c.unsqueeze(1)?, s.unsqueeze(1)?);
        let composed = Tensor::cat(
            &[
                (a.broadcast_mul(&cc)? - b.broadcast_mul(&ss)?)?,
                (b.broadcast_mul(&cc)? + a.broadcast_mul(&ss)?)?,
            ],
            3,
        )?;
        let diff = (&fused - composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        let n0 = x.sqr()?.sum_all()?.to_scalar::<f32>()?;
        let n1 = fused.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!((n0 - n1).abs() < 1e-4 * n0);
        Ok(())
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        assert_eq!(scale_frequency(1.0, Some(&s)), 1.0);
        assert!((scale_frequency(1e-5, Some(&s)) - 1e-5 / 8.0).abs() < 1e-15);
    }
}
