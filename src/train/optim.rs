//! Optimisers over named `Var`s with state that can be saved and restored exactly:
//! AdamW (decoupled weight decay, Loshchilov & Hutter) and SGD with momentum.

use std::collections::HashMap;

use candle_core::{
    backprop::GradStore, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerConfig {
    AdamW {
        #[serde(default = "b1")]
        beta1: f64,
        #[serde(default = "b2")]
        beta2: f64,
        #[serde(default = "eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
    },
    Sgd {
        #[serde(default)]
        momentum: f64,
        #[serde(default)]
        weight_decay: f64,
    },
}

fn b1() -> f64 {
    0.9
}
fn b2() -> f64 {
    0.999
}
fn eps() -> f64 {
    1e-8
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct Optimizer {
    cfg: OptimizerConfig,
    vars: Vec<(String, Var)>,
    /// Per variable: first moment (AdamW) or velocity (SGD), and second moment (AdamW).
    pub(crate) state: HashMap<String, (Tensor, Option<Tensor>)>,
    pub(crate) steps: usize,
}

impl Optimizer {
    pub fn new(cfg: OptimizerConfig, vars: Vec<(String, Var)>) -> Result<Self> {
        if vars.is_empty() {
            return Err(Error::invalid("nothing to train: no trainable parameters"));
        }
        let mut state = HashMap::new();
        for (n, v) in &vars {
            // Separate buffers: the fused step updates them in place.
            let second = match cfg {
                OptimizerConfig::AdamW { .. } => Some(v.zeros_like()?),
                OptimizerConfig::Sgd { .. } => None,
            };
            state.insert(n.clone(), (v.zeros_like()?, second));
        }
        Ok(Self {
            cfg,
            vars,
            state,
            steps: 0,
        })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with learning rate `lr` from `grads` (variables without a gradient are left
    /// alone, their state unchanged).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let gs: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).cloned())
            .collect();
        self.step_with(&gs, lr)
    }

    /// One update from gradients aligned with [`Optimizer::vars`] (`None`: left alone). For
    /// gradients that did not come from one backward pass (meta-gradients averaged over episodes).
    pub fn step_with(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::invalid(format!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )));
        }
        self.steps += 1;
        let t = self.steps as i32;
        for ((name, var), g) in self.vars.iter().zip(grads) {
            let Some(g) = g else {
                continue;
            };
            let g = g.detach();
            let (m, v) = self
                .state
                .get_mut(name)
                .ok_or_else(|| Error::invalid(format!("no optimiser state for {name}")))?;
            let w = var.as_tensor().detach();
            match self.cfg {
                OptimizerConfig::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let v2 = v
                        .as_mut()
                        .ok_or_else(|| Error::invalid("AdamW state without second moment"))?;
                    let step = AdamStep {
                        lr,
                        weight_decay,
                        eps,
                        bias1: 1.0 - beta1.powi(t),
                        bias2: 1.0 - beta2.powi(t),
                    };
                    if fused_adamw(var.as_tensor(), &g, m, v2, (beta1, beta2), &step)? {
                        continue;
                    }
                    *m = ((&*m * beta1)? + (&g * (1.0 - beta1))?)?;
                    *v2 = ((&*v2 * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let mh = (&*m / (1.0 - beta1.powi(t)))?;
                    let vh = (&*v2 / (1.0 - beta2.powi(t)))?;
                    let update = (mh / (vh.sqrt()? + eps)?)?;
                    let decayed = (&w * (1.0 - lr * weight_decay))?;
                    var.set(&(decayed - (update * lr)?)?)?;
                }
                OptimizerConfig::Sgd {
                    momentum,
                    weight_decay,
                } => {
                    let g = if weight_decay > 0.0 {
                        (g + (&w * weight_decay)?)?
                    } else {
                        g
                    };
                    *m = if momentum > 0.0 {
                        ((&*m * momentum)? + &g)?
                    } else {
                        g
                    };
                    var.set(&(w - (&*m * lr)?)?)?;
                }
            }
        }
        Ok(())
    }
}

/// The scalars of one AdamW update.
struct AdamStep {
    lr: f64,
    weight_decay: f64,
    eps: f64,
    /// `1 - beta1^t` and `1 - beta2^t`.
    bias1: f64,
    bias2: f64,
}

/// `moment = beta * moment + (1 - beta) * g` (or `g^2`), in place.
struct Moment {
    beta: f64,
    square: bool,
}

/// `w = w (1 - lr wd) - lr (m / bias1) / (sqrt(v / bias2) + eps)`, in place.
struct Apply<'a>(&'a AdamStep);

/// The contiguous slice a layout covers.
fn slice<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused AdamW: non-contiguous tensor".into()))?;
    Ok(&v[a..b])
}

fn slice_mut<'a, T>(v: &'a mut [T], l: &Layout) -> candle_core::Result<&'a mut [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused AdamW: non-contiguous tensor".into()))?;
    Ok(&mut v[a..b])
}

/// Elements per rayon task: small tensors (LoRA factors) stay on one thread.
const CHUNK: usize = 1 << 16;

impl Moment {
    fn run<T: num_traits::Float + Send + Sync>(&self, m: &mut [T], g: &[T]) {
        let (b, c) = (
            T::from(self.beta).unwrap(),
            T::from(1.0 - self.beta).unwrap(),
        );
        let square = self.square;
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = if square { g * g } else { g };
                    *m = *m * b + g * c;
                }
            });
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "metapeft-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        match (s1, s2) {
            (CpuStorage::F32(m), CpuStorage::F32(g)) => self.run(slice_mut(m, l1)?, slice(g, l2)?),
            (CpuStorage::F64(m), CpuStorage::F64(g)) => self.run(slice_mut(m, l1)?, slice(g, l2)?),
            _ => candle_core::bail!("fused AdamW: f32 or f64 only"),
        }
        Ok(())
    }
}

impl Apply<'_> {
    fn run<T: num_traits::Float + Send + Sync>(&self, w: &mut [T], m: &[T], v: &[T]) {
        let s = self.0;
        let f = |x: f64| T::from(x).unwrap();
        let (decay, lr, eps) = (f(1.0 - s.lr * s.weight_decay), f(s.lr), f(s.eps));
        let (b1, b2) = (f(s.bias1), f(s.bias2));
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(w, (m, v))| {
                for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                    let update = (m / b1) / ((v / b2).sqrt() + eps);
                    *w = *w * decay - update * lr;
                }
            });
    }
}

impl InplaceOp3 for Apply<'_> {
    fn name(&self) -> &'static str {
        "metapeft-adamw-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        match (s1, s2, s3) {
            (CpuStorage::F32(w), CpuStorage::F32(m), CpuStorage::F32(v)) => {
                self.run(slice_mut(w, l1)?, slice(m, l2)?, slice(v, l3)?)
            }
            (CpuStorage::F64(w), CpuStorage::F64(m), CpuStorage::F64(v)) => {
                self.run(slice_mut(w, l1)?, slice(m, l2)?, slice(v, l3)?)
            }
            _ => candle_core::bail!("fused AdamW: f32 or f64 only"),
        }
        Ok(())
    }
}

/// The AdamW update of `w` in three in-place passes (the two moments, then the weights) instead
/// of a dozen full-size temporaries: for full fine-tuning that is most of the optimiser's time
/// and memory. Returns `false` (nothing done) where it does not apply (other devices or dtypes,
/// non-contiguous buffers); the caller then takes the composed path. Aliasing between an op's
/// destination and sources is refused by candle itself; the two moments are distinct buffers
/// by construction (`Optimizer::new`, checkpoint restore).
fn fused_adamw(
    w: &Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    (beta1, beta2): (f64, f64),
    step: &AdamStep,
) -> Result<bool> {
    let ok = [w, g, &*m, &*v].iter().all(|t| {
        t.device().is_cpu()
            && matches!(t.dtype(), DType::F32 | DType::F64)
            && t.dtype() == w.dtype()
            && t.shape() == w.shape()
            && t.is_contiguous()
    });
    if !ok {
        return Ok(false);
    }
    m.inplace_op2(
        g,
        &Moment {
            beta: beta1,
            square: false,
        },
    )?;
    v.inplace_op2(
        g,
        &Moment {
            beta: beta2,
            square: true,
        },
    )?;
    w.inplace_op3(&*m, &*v, &Apply(step))?;
    Ok(true)
}

/// Scale `grads` in place so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let mut gs: Vec<Option<Tensor>> = vars
        .iter()
        .map(|(_, v)| grads.get(v.as_tensor()).cloned())
        .collect();
    let norm = clip_grad_norm_slice(&mut gs, max_norm)?;
    for ((_, v), g) in vars.iter().zip(gs) {
        if let Some(g) = g {
            grads.insert(v.as_tensor(), g);
        }
    }
    Ok(norm)
}

/// [`clip_grad_norm`] for gradients held in a slice.
pub fn clip_grad_norm_slice(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut total = 0.0;
    for g in grads.iter().flatten() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if norm > max_norm && norm.is_finite() {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_first_step_matches_the_formula() -> Result<()> {
        // After one step, m_hat = g and v_hat = g^2, so w -= lr * (g / (|g| + eps)) + lr*wd*w.
        let v = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu)?)?;
        let mut o = Optimizer::new(
            OptimizerConfig::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
            vec![("w".into(), v.clone())],
        )?;
        let loss = (v.as_tensor().sqr()?.sum_all()? * 0.5)?; // grad = w
        o.step(&loss.backward()?, 0.01)?;
        let got = v.as_tensor().to_vec1::<f64>()?;
        let want = [
            1.0 * (1.0 - 0.001) - 0.01 * (1.0 / (1.0 + 1e-8)),
            -2.0 * (1.0 - 0.001) + 0.01 * (2.0 / (2.0 + 1e-8)),
        ];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn sgd_momentum_and_clipping() -> Result<()> {
        let v = Var::from_tensor(&Tensor::new(&[3.0f64, 4.0], &Device::Cpu)?)?;
        let vars = vec![("w".to_string(), v.clone())];
        let mut o = Optimizer::new(
            OptimizerConfig::Sgd {
                momentum: 0.5,
                weight_decay: 0.0,
            },
            vars.clone(),
        )?;
        let loss = (v.as_tensor().sqr()?.sum_all()? * 0.5)?; // grad = w = [3, 4], norm 5
        let mut g = loss.backward()?;
        let n = clip_grad_norm(&mut g, &vars, 1.0)?;
        assert!((n - 5.0).abs() < 1e-12);
        o.step(&g, 1.0)?;
        let got = v.as_tensor().to_vec1::<f64>()?;
        assert!(
            (got[0] - (3.0 - 0.6)).abs() < 1e-5 && (got[1] - (4.0 - 0.8)).abs() < 1e-5,
            "{got:?}"
        );
        Ok(())
    }

    /// The fused in-place AdamW against the textbook formula over several steps, on a tensor
    /// large enough to be split across threads, in f32 and f64.
    #[test]
    fn fused_adamw_matches_the_formula_over_steps() -> Result<()> {
        let (b1, b2, eps, wd, lr) = (0.9, 0.99, 1e-8, 0.05, 0.01);
        let n = 3 * CHUNK + 17;
        for dtype in [DType::F64, DType::F32] {
            let w0: Vec<f64> = (0..n)
                .map(|i| ((i * 37 % 101) as f64 - 50.0) / 25.0)
                .collect();
            let var =
                Var::from_tensor(&Tensor::new(w0.as_slice(), &Device::Cpu)?.to_dtype(dtype)?)?;
            let mut o = Optimizer::new(
                OptimizerConfig::AdamW {
                    beta1: b1,
                    beta2: b2,
                    eps,
                    weight_decay: wd,
                },
                vec![("w".into(), var.clone())],
            )?;
            let (mut w, mut m, mut v) = (w0.clone(), vec![0.0; n], vec![0.0; n]);
            for t in 1..=3 {
                // loss = sum(w^3) / 3: gradient w^2, different at every step.
                let loss = (var.as_tensor().powf(3.0)?.sum_all()? / 3.0)?;
                o.step(&loss.backward()?, lr)?;
                for i in 0..n {
                    let g = w[i] * w[i];
                    m[i] = b1 * m[i] + (1.0 - b1) * g;
                    v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                    let mh = m[i] / (1.0 - b1.powi(t));
                    let vh = v[i] / (1.0 - b2.powi(t));
                    w[i] = w[i] * (1.0 - lr * wd) - lr * mh / (vh.sqrt() + eps);
                }
            }
            let got = var.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            for (i, (a, b)) in got.iter().zip(&w).enumerate() {
                assert!(
                    (a - b).abs() < tol * b.abs().max(1.0),
                    "{dtype:?} [{i}]: {a} vs {b}"
                );
            }
            // The moments were updated in place in two distinct buffers.
            let (sm, sv) = &o.state["w"];
            let sv = sv
                .as_ref()
                .unwrap()
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            let sm = sm.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            assert!((sm[5] - m[5]).abs() < tol * m[5].abs().max(1.0) && sm[5] != sv[5]);
        }
        Ok(())
    }
}
